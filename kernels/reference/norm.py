"""Pure-PyTorch LayerNorm and RMSNorm: the spec the Triton kernels are tested against.

Statistics in fp32 (or fp64 for fp64 input, so the reference can serve as a
golden value), whatever the input dtype; the result is cast back to the input's
dtype, as the kernels do.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def _upcast(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.promote_types(t.dtype, torch.float32))


def _shape(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    return (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)


# torch's native functions evaluated on the upcast tensors: the math is theirs
# (mean and biased variance over the normalized dims; y = (x - mean) / sqrt(var + eps)
# * weight + bias, and y = x / sqrt(mean(x^2) + eps) * weight), the precision ours,
# and this is the CPU training path, where the native kernels are fastest.


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    y = F.layer_norm(_upcast(input), _shape(normalized_shape), _upcast(weight), _upcast(bias), eps)
    return y.to(input.dtype)


def rms_norm(input, normalized_shape, weight=None, eps=None):
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    y = F.rms_norm(_upcast(input), _shape(normalized_shape), _upcast(weight), eps)
    return y.to(input.dtype)


def add_layer_norm(input, residual, normalized_shape, weight=None, bias=None, eps=1e-5):
    s = input + residual
    return layer_norm(s, normalized_shape, weight, bias, eps), s


def add_rms_norm(input, residual, normalized_shape, weight=None, eps=None):
    s = input + residual
    return rms_norm(s, normalized_shape, weight, eps), s
