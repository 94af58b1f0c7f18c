"""Pure-PyTorch gated linear units (SwiGLU, GeGLU): the spec of :mod:`kernels.glu`.

    swiglu(gate, up) = silu(gate) * up
    geglu(gate, up)  = gelu(gate, approximate) * up

The ``*_packed`` forms take the (..., 2 * hidden) output of one projection whose
first half is the gate and second half the up projection (as fastlm's MLP lays
out its ``c_fc``). Computed in fp32 (fp64 for fp64 input) and rounded once to the
inputs' dtype, as the kernels do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def glu(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """``activation(gate) * up``; ``activation`` is ``silu``, ``gelu_tanh`` or ``gelu``."""
    g = _upcast(gate)
    if activation == "silu":
        a = F.silu(g)
    else:
        a = F.gelu(g, approximate="tanh" if activation == "gelu_tanh" else "none")
    return (a * _upcast(up)).to(gate.dtype)


def swiglu(gate, up):
    return glu(gate, up, "silu")


def geglu(gate, up, approximate="tanh"):
    return glu(gate, up, "gelu_tanh" if approximate == "tanh" else "gelu")


def swiglu_packed(gate_up):
    return swiglu(*gate_up.chunk(2, dim=-1))


def geglu_packed(gate_up, approximate="tanh"):
    return geglu(*gate_up.chunk(2, dim=-1), approximate=approximate)
