"""Gated linear units of a transformer MLP (SwiGLU, GeGLU): Triton kernels, forward and backward.

Layout of this module: the kernels, their launchers, the ``fastlm::glu`` and
``fastlm::glu_backward`` ops (design in :mod:`kernels._library`), the public
functions. The math, elementwise in fp32, with ``act`` SiLU or GELU (exact or
its tanh approximation)::

    y     = act(gate) * up
    dgate = dy * up * act'(gate)
    dup   = dy * act(gate)

    silu(g)      = g * sigmoid(g)                     silu'(g) = s * (1 + g * (1 - s)),  s = sigmoid(g)
                                                      (1 - s taken as sigmoid(-g), likewise for gelu_tanh)
    gelu_tanh(g) = g * sigmoid(2u),  u = sqrt(2/pi) * (g + 0.044715 g^3)     (= 0.5 g (1 + tanh u))
    gelu(g)      = g * Phi(g),  Phi(g) = (1 + erf(g / sqrt 2)) / 2          gelu'(g) = Phi(g) + g * phi(g)

The backward recomputes ``act(gate)`` from the saved inputs, so forward+backward
keeps only ``gate`` and ``up`` alive (eager PyTorch also keeps ``act(gate)``) and
moves each element five times (read gate, up; write y; then read gate, up, dy;
write dgate, dup: eight row-sized transfers in all, against eager's more than a
dozen).

The packed forms (``swiglu_packed``, ``geglu_packed``) take the (..., 2 * hidden)
output of one fused gate+up projection (fastlm's MLP ``c_fc``: gate first) and
read its two halves in place, and their backward writes one (..., 2 * hidden)
gradient: no split copy, no concatenation.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._autograd import first_order_only, triton_only_first_order
from ._backend import use_triton
from ._library import define_op, launch, no_tensor
from ._launch import KernelSpec, TRITON_DTYPE, as_rows, cdiv, next_power_of_2, row_stride, unique_specs
from ._validate import check_float, check_same_device, check_same_dtype
from .reference.glu import glu as glu_reference

ACTIVATIONS = ("silu", "gelu_tanh", "gelu")  # the kernels' ACT: 0, 1, 2

# ----------------------------------------------------------------------------- kernels


@triton.jit
def _activation(g, ACT: tl.constexpr):
    """act(g) and act'(g) in fp32 (the forward kernel's unused derivative is compiled away)."""
    # 1 - sigmoid(z) is taken as sigmoid(-z): where sigmoid(z) rounds to 1, the difference would be
    # 0 and drop the derivative's tail (about 2e-6 of gelu'(5)).
    if ACT == 0:  # silu
        s = tl.sigmoid(g)
        a = g * s
        da = s * (1.0 + g * tl.sigmoid(-g))
    elif ACT == 1:  # gelu, tanh approximation: 0.5 * (1 + tanh(u)) == sigmoid(2u)
        k0: tl.constexpr = 0.7978845608028654  # sqrt(2 / pi)
        k1: tl.constexpr = 0.044715
        z = 2.0 * k0 * (g + k1 * g * g * g)
        s = tl.sigmoid(z)
        a = g * s
        da = s + g * 2.0 * s * tl.sigmoid(-z) * k0 * (1.0 + 3.0 * k1 * g * g)
    else:  # gelu, exact
        cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
        a = g * cdf
        da = cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327  # 1 / sqrt(2 pi)
    return a, da


@triton.jit
def _glu_fwd_kernel(
    G, U, Y, M, N, stride_g, stride_u, stride_y,
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    rows = rows.to(tl.int64)[:, None]
    g = tl.load(G + rows * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    a, _ = _activation(g, ACT)
    tl.store(Y + rows * stride_y + cols[None, :], (a * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(
    DY, G, U, DG, DU, M, N, stride_dy, stride_g, stride_u, stride_dg, stride_du,
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    rows = rows.to(tl.int64)[:, None]
    dy = tl.load(DY + rows * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + rows * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    a, da = _activation(g, ACT)
    tl.store(DG + rows * stride_dg + cols[None, :], (dy * u * da).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + rows * stride_du + cols[None, :], (dy * a).to(DU.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers

# Elements per program (forward, backward: the backward keeps more values alive), and the
# widest column block; spill-free on sm_80/sm_90 per `python -m bench.compile`.
_FWD_TILE, _BWD_TILE, _MAX_BLOCK_N, _NUM_WARPS = 4096, 2048, 1024, 8


def _config(n: int, tile: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for rows of ``n`` features."""
    block_n = min(_MAX_BLOCK_N, max(16, next_power_of_2(n)))
    return max(1, tile // block_n), block_n


def _glu_forward(g, u, activation):
    """Launch the forward on (M, N) views with unit column stride; returns y (M, N)."""
    M, N = g.shape
    y = torch.empty((M, N), dtype=g.dtype, device=g.device)
    if y.numel() == 0:
        return y
    block_m, block_n = _config(N, _FWD_TILE)
    launch(_glu_fwd_kernel)[(cdiv(M, block_m), cdiv(N, block_n))](
        g, u, y, M, N, row_stride(g), row_stride(u), N,
        ACT=ACTIVATIONS.index(activation), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=_NUM_WARPS,
    )
    return y


def _glu_backward(dy, g, u, dg, du, activation):
    """Launch the backward on (M, N) views, writing dg and du (views of one buffer when packed)."""
    M, N = g.shape
    if M * N == 0:
        return
    block_m, block_n = _config(N, _BWD_TILE)
    launch(_glu_bwd_kernel)[(cdiv(M, block_m), cdiv(N, block_n))](
        dy, g, u, dg, du, M, N, row_stride(dy), row_stride(g), row_stride(u), row_stride(dg), row_stride(du),
        ACT=ACTIVATIONS.index(activation), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=_NUM_WARPS,
    )


def compile_specs() -> list[KernelSpec]:
    """Every configuration the launchers can pick, for the static compile check (hidden sizes multiples of 16)."""
    specs = []
    widths = [2**k for k in range(4, 11)]  # every column block a row can round up to
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        t = "*" + TRITON_DTYPE[dtype]
        fwd = {"G": t, "U": t, "Y": t, "M": "i32", "N": "i32", "stride_g": "i32", "stride_u": "i32", "stride_y": "i32"}
        bwd = {"DY": t, "G": t, "U": t, "DG": t, "DU": t, "M": "i32", "N": "i32"}
        bwd |= {f"stride_{a}": "i32" for a in ("dy", "g", "u", "dg", "du")}
        for act in ACTIVATIONS:
            for n in widths:
                for kernel, sig, tile in ((_glu_fwd_kernel, fwd, _FWD_TILE), (_glu_bwd_kernel, bwd, _BWD_TILE)):
                    block_m, block_n = _config(n, tile)
                    c = {"ACT": ACTIVATIONS.index(act), "BLOCK_M": block_m, "BLOCK_N": block_n}
                    aligned = tuple(k for k, v in sig.items() if v.startswith("*") or k == "N" or k.startswith("stride_"))
                    specs.append(KernelSpec(kernel, sig | {k: "constexpr" for k in c}, c, _NUM_WARPS,
                                            label=f"{act} N={n} {dtype}",
                                            extra={"divisible_by_16": aligned, "quick": n == _MAX_BLOCK_N}))
    return unique_specs(specs)


# ----------------------------------------------------------------------------- ops

# fastlm::glu(gate, up, activation) -> act(gate) * up; with up=None, gate is the packed
# (..., 2 * hidden) projection. fastlm::glu_backward returns (dgate, dup), or for a packed
# input (d(gate_up), empty).


def _split(gate: torch.Tensor, up: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(M, N) row views of the gate and up halves (no copy for a packed input), and N."""
    if up is None:
        n = gate.shape[-1] // 2
        rows = as_rows(gate, 2 * n)
        return rows[:, :n], rows[:, n:], n
    n = gate.shape[-1]
    return as_rows(gate, n), as_rows(up, n), n


def _activation_reference(g: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' ``_activation`` in PyTorch: act(g) and act'(g)."""
    if activation == "silu":
        s = torch.sigmoid(g)
        return g * s, s * (1 + g * torch.sigmoid(-g))
    if activation == "gelu_tanh":
        k0, k1 = math.sqrt(2 / math.pi), 0.044715
        z = 2 * k0 * (g + k1 * g * g * g)
        s = torch.sigmoid(z)
        return g * s, s + g * 2 * s * torch.sigmoid(-z) * k0 * (1 + 3 * k1 * g * g)
    cdf = 0.5 * (1 + torch.erf(g * math.sqrt(0.5)))
    return g * cdf, cdf + g * torch.exp(-0.5 * g * g) / math.sqrt(2 * math.pi)


def _glu_op(gate, up, activation):
    g, u, n = _split(gate, up)
    if use_triton(gate.device):
        y = _glu_forward(g, u, activation)
    else:
        y = glu_reference(g, u, activation)
    return y.reshape(*gate.shape[:-1], n)


def _glu_backward_op(grad, gate, up, activation):
    g, u, n = _split(gate, up)
    dy = as_rows(grad, n)
    if up is None:  # one gradient for the packed input, its halves written in place
        d = torch.empty((g.shape[0], 2 * n), dtype=gate.dtype, device=gate.device)
        dg, du = d[:, :n], d[:, n:]
    else:
        dg, du = torch.empty_like(g, memory_format=torch.contiguous_format), torch.empty_like(u, memory_format=torch.contiguous_format)
    if use_triton(gate.device):
        _glu_backward(dy, g, u, dg, du, activation)
    else:
        wide = torch.promote_types(gate.dtype, torch.float32)
        a, da = _activation_reference(g.to(wide), activation)
        dyf = dy.to(wide)
        dg.copy_(dyf * u.to(wide) * da)
        du.copy_(dyf * a)
    if up is None:
        return d.view(gate.shape), no_tensor(gate)
    return dg.view(gate.shape), du.view(up.shape)


glu_op = define_op("glu", _glu_op, "(Tensor gate, Tensor? up, str activation) -> Tensor")
glu_backward_op = define_op(
    "glu_backward", _glu_backward_op, "(Tensor grad, Tensor gate, Tensor? up, str activation) -> (Tensor, Tensor)"
)


def _public_name(activation: str) -> str:
    return "swiglu" if activation == "silu" else "geglu"


def _setup_glu(ctx, inputs, output):
    gate, up, activation = inputs
    ctx.save_for_backward(gate, up)  # act(gate) is recomputed, not stored
    ctx.activation = activation


@first_order_only(lambda ctx: triton_only_first_order(_public_name(ctx.activation)))
def _glu_grads(ctx, dy):
    gate, up = ctx.saved_tensors
    dgate, dup = glu_backward_op(dy, gate, up, ctx.activation)
    return dgate, dup if up is not None else None, None  # up given: dup is real, if empty (no present())


glu_op.register_autograd(_glu_grads, setup_context=_setup_glu)


# ----------------------------------------------------------------------------- public API


def activation_name(approximate: str) -> str:
    """The kernels' activation for GELU's ``approximate`` argument (a clear error for any other value)."""
    if approximate not in ("tanh", "none"):
        raise ValueError(f"approximate must be 'tanh' or 'none' (as in torch.nn.functional.gelu), got {approximate!r}")
    return "gelu_tanh" if approximate == "tanh" else "gelu"


def _run(gate: torch.Tensor, up: torch.Tensor | None, activation: str) -> torch.Tensor:
    check_float("gate_up" if up is None else "gate", gate)
    if up is None:
        if gate.dim() == 0 or gate.shape[-1] % 2:
            raise ValueError(f"gate_up must have an even last dimension (gate and up halves), "
                             f"got shape {tuple(gate.shape)}")
    else:
        check_float("up", up)
        check_same_device(gate=gate, up=up)
        check_same_dtype(gate=gate, up=up)
        if gate.shape != up.shape:
            raise ValueError(f"up must have the shape of gate {tuple(gate.shape)}, got {tuple(up.shape)}")
        if gate.dim() == 0:  # scalars, as torch's elementwise ops take them: one row of one feature
            return _run(gate.reshape(1), up.reshape(1), activation).reshape(())
    if not use_triton(gate.device):
        if up is None:
            return glu_reference(*gate.chunk(2, dim=-1), activation)
        return glu_reference(gate, up, activation)
    return glu_op(gate, up, activation)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (Llama's MLP activation) in one pass; same shapes and dtype, any strides.

    Computed in fp32, rounded once. The backward recomputes ``silu(gate)``: only
    ``gate`` and ``up`` are kept for it. First-order only on the Triton backend.
    """
    return _run(gate, up, "silu")


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """``gelu(gate, approximate) * up`` (Gemma's MLP: ``approximate="tanh"``; ``"none"``: the exact erf GELU).

    As :func:`swiglu` otherwise.
    """
    return _run(gate, up, activation_name(approximate))


def swiglu_packed(gate_up: torch.Tensor) -> torch.Tensor:
    """:func:`swiglu` of the two halves of ``gate_up`` (..., 2 * hidden) (gate first), read in place.

    The output of one fused gate+up projection, as fastlm's MLP produces it
    (``swiglu_packed(c_fc(x))``; for HF's separate ``gate_proj``/``up_proj``
    use :func:`swiglu`). Returns (..., hidden); the gradient is one
    (..., 2 * hidden) tensor, written without a split or concatenation.
    """
    return _run(gate_up, None, "silu")


def geglu_packed(gate_up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """:func:`geglu` of the two halves of ``gate_up`` (..., 2 * hidden) (gate first); see :func:`swiglu_packed`."""
    return _run(gate_up, None, activation_name(approximate))
