"""Rotary position embedding (HF's rotate-half convention) for q and k in one launch: Triton kernel, forward and backward.

Layout of this module: the kernel, its launcher, the ``fastlm::rope`` op (design
in :mod:`kernels._library`), the cached cos/sin tables, the public function.
The math, per token with cos/sin rows ``c = (c1, c2)``, ``s = (s1, s2)`` of
``rotary_dim = r`` values and the rotated features ``x = (x1, x2)`` (r/2 each)::

    forward:    y1 = x1 * c1 - x2 * s1        y2 = x2 * c2 + x1 * s2
    backward:   dx1 = g1 * c1 + g2 * s2       dx2 = g2 * c2 - g1 * s1

that is ``y = x * cos + rotate_half(x) * sin`` (HF's ``apply_rotary_pos_emb``)
and its transpose, which for HF's tables (``c1 == c2``, ``s1 == s2``) is the same
rotation with ``-sin``. Features past ``r`` pass through unchanged (partial
rotary, as GPT-NeoX/Phi). The map is linear in x, so the backward is this very
op with ``transpose`` flipped, and it is differentiable again (double backward
works on both backends).

One program per (batch row, block of tokens): it loads the tokens' cos/sin rows
once, in fp32, and rotates every head of q and then of k with them. Inputs may
have any strides (e.g. the (batch, seq, heads, head_dim) layout of a fused QKV
projection, viewed as (batch, heads, seq, head_dim)); outputs are new tensors in
the inputs' memory order (see ``_new_like``); the inputs are never written.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ._backend import use_triton
from ._library import check_values, define_op, launch
from ._launch import KernelSpec, TRITON_DTYPE, cdiv, next_power_of_2, unique_specs
from ._validate import as_int64, check_float, check_same_device, check_same_dtype
from . import reference

# ----------------------------------------------------------------------------- kernel


@triton.jit
def _rotate_heads(
    X, Y, n_heads, b, tokens, mask, c1, c2, s1, s2,
    stride_xb, stride_xh, stride_xs, stride_xd, stride_yb, stride_yh, stride_ys,
    HALF: tl.constexpr, D: tl.constexpr, TRANSPOSE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # Every head of one tensor (q or k) at the program's tokens, with the cos/sin already loaded.
    cols = tl.arange(0, BLOCK_H)
    m = mask[:, None] & (cols < HALF)[None, :]
    x_tok = X + b * stride_xb + tokens[:, None] * stride_xs
    y_tok = Y + b * stride_yb + tokens[:, None] * stride_ys
    for h in range(n_heads):
        h64 = tl.cast(h, tl.int64)  # heads x head stride can pass 2**31 elements
        x_row = x_tok + h64 * stride_xh
        y_row = y_tok + h64 * stride_yh
        x1 = tl.load(x_row + cols[None, :] * stride_xd, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + (cols[None, :] + HALF) * stride_xd, mask=m, other=0.0).to(tl.float32)
        if TRANSPOSE:
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        tl.store(y_row + cols[None, :], y1.to(Y.dtype.element_ty), mask=m)
        tl.store(y_row + cols[None, :] + HALF, y2.to(Y.dtype.element_ty), mask=m)
        if 2 * HALF < D:  # partial rotary: the features past rotary_dim are copied
            p = 2 * HALF + tl.arange(0, BLOCK_P)
            pm = mask[:, None] & (p < D)[None, :]
            tl.store(y_row + p[None, :], tl.load(x_row + p[None, :] * stride_xd, mask=pm, other=0.0), mask=pm)


@triton.jit
def _rope_kernel(
    Q, K, QO, KO, COS, SIN, POS,
    S, HQ, HK, n_positions,
    stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
    stride_qob, stride_qoh, stride_qos, stride_kob, stride_koh, stride_kos,
    stride_cb, stride_cs, stride_cd, stride_sb, stride_ss, stride_sd, stride_pb, stride_ps,
    HALF: tl.constexpr, D: tl.constexpr, TRANSPOSE: tl.constexpr, HAS_POS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    blocks = tl.cdiv(S, BLOCK_S)
    pid = tl.program_id(0)
    b = (pid // blocks).to(tl.int64)
    tokens = (pid % blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = tokens < S
    tokens = tokens.to(tl.int64)
    if HAS_POS:
        # Positions were range-checked on the host (unless the caller opted out); clamping
        # keeps an unchecked bad one from reading outside the table.
        pos = tl.load(POS + b * stride_pb + tokens * stride_ps, mask=mask, other=0)
        pos = tl.minimum(tl.maximum(pos, 0), n_positions - 1).to(tl.int64)
    else:
        pos = tokens
    cols = tl.arange(0, BLOCK_H)
    m = mask[:, None] & (cols < HALF)[None, :]
    c_row = COS + b * stride_cb + pos[:, None] * stride_cs
    s_row = SIN + b * stride_sb + pos[:, None] * stride_ss
    c1 = tl.load(c_row + cols[None, :] * stride_cd, mask=m, other=0.0).to(tl.float32)
    c2 = tl.load(c_row + (cols[None, :] + HALF) * stride_cd, mask=m, other=0.0).to(tl.float32)
    s1 = tl.load(s_row + cols[None, :] * stride_sd, mask=m, other=0.0).to(tl.float32)
    s2 = tl.load(s_row + (cols[None, :] + HALF) * stride_sd, mask=m, other=0.0).to(tl.float32)
    _rotate_heads(Q, QO, HQ, b, tokens, mask, c1, c2, s1, s2,
                  stride_qb, stride_qh, stride_qs, stride_qd, stride_qob, stride_qoh, stride_qos,
                  HALF, D, TRANSPOSE, BLOCK_H, BLOCK_P)
    _rotate_heads(K, KO, HK, b, tokens, mask, c1, c2, s1, s2,
                  stride_kb, stride_kh, stride_ks, stride_kd, stride_kob, stride_koh, stride_kos,
                  HALF, D, TRANSPOSE, BLOCK_H, BLOCK_P)


# ----------------------------------------------------------------------------- launcher

# Elements of one (tokens x rotary_dim / 2) tile: the cos/sin halves and x1/x2 of one
# head, all in fp32 registers (spill-free on sm_80/sm_90 per `python -m bench.compile`).
_TILE = 1024
_NUM_WARPS = 8


def _config(rotary_dim: int, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_S, BLOCK_H, BLOCK_P) for a rotary half of ``rotary_dim // 2`` and ``head_dim`` features."""
    block_h = max(1, next_power_of_2(rotary_dim // 2))
    block_p = max(1, next_power_of_2(head_dim - rotary_dim))
    return max(1, _TILE // max(block_h, block_p)), block_h, block_p


def _batched(t: torch.Tensor, dims: int) -> tuple[torch.Tensor, int]:
    """``t`` with a leading batch dim (``dims`` dims in all) and its batch stride: 0 when shared by the batch."""
    t = t if t.dim() == dims else t.unsqueeze(0)
    return t, (t.stride(0) if t.shape[0] > 1 else 0)


def _new_like(x: torch.Tensor) -> torch.Tensor:
    """An output for ``x`` (batch, heads, seq, head_dim) in its memory order: (batch, seq, heads, head_dim)
    when x's heads are inner to its positions (a projection viewed with ``.transpose(1, 2)``, as HF and
    fastlm make q and k), so the attention output's transpose back stays a view; else contiguous."""
    B, H, S, D = x.shape
    if x.stride(1) < x.stride(2):
        return torch.empty((B, S, H, D), dtype=x.dtype, device=x.device).transpose(1, 2)
    return torch.empty((B, H, S, D), dtype=x.dtype, device=x.device)


def _rope_forward(q, k, cos, sin, position_ids, transpose):
    B, HQ, S, D = q.shape
    HK = k.shape[1]
    qo, ko = _new_like(q), _new_like(k)
    if qo.numel() == 0 and ko.numel() == 0:
        return qo, ko
    cos3, cb = _batched(cos, 3)
    sin3, sb = _batched(sin, 3)
    has_pos = position_ids is not None
    if has_pos:
        pos2, pb = _batched(position_ids, 2)
        ps = pos2.stride(1)
    else:
        pos2, pb, ps = cos3, 0, 0  # unused
    r = cos.shape[-1]
    block_s, block_h, block_p = _config(r, D)
    launch(_rope_kernel)[(cdiv(S, block_s) * B,)](
        q, k, qo, ko, cos3, sin3, pos2,
        S, HQ, HK, cos3.shape[1],
        *q.stride(), *k.stride(), *qo.stride()[:3], *ko.stride()[:3],
        cb, cos3.stride(1), cos3.stride(2), sb, sin3.stride(1), sin3.stride(2), pb, ps,
        HALF=r // 2, D=D, TRANSPOSE=transpose, HAS_POS=has_pos,
        BLOCK_S=block_s, BLOCK_H=block_h, BLOCK_P=block_p, num_warps=_NUM_WARPS,
    )
    return qo, ko


def compile_specs() -> list[KernelSpec]:
    """Every configuration the launcher can pick at the head dims models use, for the static compile check."""
    specs = []
    # (head_dim, rotary_dim): full rotary at the usual head dims, and partial rotary (GPT-NeoX/Phi).
    dims = [(64, 64), (80, 80), (96, 96), (128, 128), (256, 256), (64, 32), (80, 32), (128, 64)]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        t = "*" + TRITON_DTYPE[dtype]
        sig = {"Q": t, "K": t, "QO": t, "KO": t, "COS": "*fp32", "SIN": "*fp32", "POS": "*i64",
               "S": "i32", "HQ": "i32", "HK": "i32", "n_positions": "i32"}
        strides = [f"stride_{a}{d}" for a in ("q", "k") for d in "bhsd"]
        strides += [f"stride_{a}{d}" for a in ("qo", "ko") for d in "bhs"]
        strides += [f"stride_{a}{d}" for a in ("c", "s") for d in "bsd"] + ["stride_pb", "stride_ps"]
        sig |= {s: "i32" for s in strides}
        for d, r in dims:
            block_s, block_h, block_p = _config(r, d)
            for transpose in (False, True):
                for has_pos in (False, True):
                    c = {"HALF": r // 2, "D": d, "TRANSPOSE": transpose, "HAS_POS": has_pos,
                         "BLOCK_S": block_s, "BLOCK_H": block_h, "BLOCK_P": block_p}
                    aligned = tuple(k for k in sig if sig[k].startswith("*"))
                    specs.append(KernelSpec(_rope_kernel, sig | {k: "constexpr" for k in c}, c, _NUM_WARPS,
                                            label=f"rope D={d} r={r} {dtype}",
                                            extra={"divisible_by_16": aligned, "quick": d in (64, 128)}))
    return unique_specs(specs)


# ----------------------------------------------------------------------------- op

# fastlm::rope returns new (batch, heads, seq, head_dim) tensors; ``transpose`` applies the
# transposed rotation, which is the backward: the op's gradient is the op itself.


def _rope_reference(q, k, cos, sin, position_ids, transpose):
    """The launcher's contract in PyTorch: the transposed rotation is the forward with sin = -(s2, s1)."""
    if transpose:
        s1, s2 = sin.chunk(2, dim=-1)
        sin = -torch.cat([s2, s1], dim=-1)
    qo, ko = reference.rope(q, k, cos, sin, position_ids=position_ids)
    return _new_like(q).copy_(qo), _new_like(k).copy_(ko)


def _rope_op(q, k, cos, sin, position_ids, transpose):
    if use_triton(q.device):
        return _rope_forward(q, k, cos, sin, position_ids, transpose)
    return _rope_reference(q, k, cos, sin, position_ids, transpose)


rope_op = define_op(
    "rope", _rope_op,
    "(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor? position_ids, bool transpose) -> (Tensor, Tensor)",
)


def _setup_rope(ctx, inputs, output):
    q, k, cos, sin, position_ids, transpose = inputs
    ctx.save_for_backward(cos, sin, position_ids)
    ctx.transpose = transpose
    ctx.meta = ((q.shape, q.dtype), (k.shape, k.dtype))  # for a gradient autograd leaves out (an unused output)


def _rope_grads(ctx, dq, dk):
    cos, sin, position_ids = ctx.saved_tensors
    (q_shape, q_dtype), (k_shape, k_dtype) = ctx.meta
    dq = cos.new_zeros(q_shape, dtype=q_dtype) if dq is None else dq
    dk = cos.new_zeros(k_shape, dtype=k_dtype) if dk is None else dk
    dq, dk = rope_op(dq, dk, cos, sin, position_ids, not ctx.transpose)
    return dq, dk, None, None, None, None


rope_op.register_autograd(_rope_grads, setup_context=_setup_rope)


# ----------------------------------------------------------------------------- cos/sin tables


@functools.lru_cache(maxsize=32)
def _tables(seq_len: int, dim: int, theta: float, inv_freq: tuple[float, ...] | None, attention_scaling: float,
            device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # Built on the CPU whatever the default device (a torch.device("meta") context included), then moved;
    # outside inference mode, whatever the caller's: cached, they may serve a later training step, and
    # autograd cannot save inference tensors for a backward.
    with torch.inference_mode(False):
        if inv_freq is None:
            freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim))
        else:
            freqs = torch.tensor(inv_freq, dtype=torch.float64, device="cpu")
        angles = torch.outer(torch.arange(seq_len, dtype=torch.float64, device="cpu"), freqs)
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos() * attention_scaling, angles.sin() * attention_scaling
        return cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype)


def rope_tables(
    seq_len: int,
    dim: int,
    *,
    theta: float = 10000.0,
    inv_freq: torch.Tensor | None = None,
    attention_scaling: float = 1.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (seq_len, dim), for :func:`rope`: rows are positions, in the rotate-half layout.

    ``angle[p, i] = p * inv_freq[i % (dim / 2)]``; ``inv_freq`` defaults to
    ``theta ** (-2i / dim)`` (computed in fp64, then rounded to ``dtype``). Frequency
    scaling (Llama 3, YaRN, linear, NTK) is the caller's ``inv_freq`` (dim / 2
    values, e.g. from transformers' ``ROPE_INIT_FUNCTIONS``) with its
    ``attention_scaling`` (YaRN's mscale multiplies cos and sin).

    ``device`` defaults to torch's default device (so a model built under
    ``torch.device("meta")`` gets meta tables). Built once per (seq_len, dim, theta,
    inv_freq, attention_scaling, device, dtype) and cached: the same call returns the same tensors, so treat them as
    read-only.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
        raise ValueError(f"seq_len must be a non-negative int, got {seq_len!r}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0 or dim % 2:
        raise ValueError(f"dim must be a positive even int (the rotary dim), got {dim!r}")
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not theta > 0:
        raise ValueError(f"theta must be a positive number, got {theta!r}")
    if not isinstance(attention_scaling, (int, float)) or not math.isfinite(attention_scaling):
        raise ValueError(f"attention_scaling must be a finite number, got {attention_scaling!r}")
    freqs = None
    if inv_freq is not None:
        if not isinstance(inv_freq, torch.Tensor) or not inv_freq.is_floating_point():
            raise TypeError(f"inv_freq must be a floating-point tensor, got {type(inv_freq).__name__}")
        if tuple(inv_freq.shape) != (dim // 2,):
            raise ValueError(f"inv_freq must have shape (dim / 2,) = ({dim // 2},), got {tuple(inv_freq.shape)}")
        freqs = tuple(inv_freq.detach().double().cpu().tolist())
    device = torch.device(device) if device is not None else torch.get_default_device()
    return _tables(seq_len, dim, float(theta), freqs, float(attention_scaling), device, dtype)


# ----------------------------------------------------------------------------- public API


def _check(q, k, cos, sin, position_ids):
    for name, t in (("q", q), ("k", k)):
        check_float(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
    check_same_dtype(q=q, k=k)
    check_float("cos", cos)
    check_float("sin", sin)
    check_same_device(q=q, k=k, cos=cos, sin=sin, position_ids=position_ids)
    B, _, S, D = q.shape
    if k.shape[0] != B or k.shape[2] != S or k.shape[3] != D:
        raise ValueError(f"k must have q's batch, seq and head_dim {(B, S, D)} (heads may differ), "
                         f"got {tuple(k.shape[:1] + k.shape[2:])}")
    if sin.shape != cos.shape:
        raise ValueError(f"sin must have the shape of cos {tuple(cos.shape)}, got {tuple(sin.shape)}")
    r = cos.shape[-1] if cos.dim() else 0
    if r == 0 or r % 2 or r > D:
        raise ValueError(f"the rotary dim (cos.shape[-1]) must be even, positive and at most head_dim {D}, "
                         f"got {r}")
    if (cos.requires_grad or sin.requires_grad) and torch.is_grad_enabled():
        raise ValueError("kernels.rope gives no gradient for cos/sin: pass tables that do not require grad "
                         "(e.g. built under torch.no_grad(), or .detach())")
    if position_ids is None:
        if cos.dim() == 2:
            if cos.shape[0] != S:
                raise ValueError(f"cos of shape (seq, rotary_dim) must have seq = q's {S} rows, got "
                                 f"{tuple(cos.shape)} (pass position_ids to index a longer table)")
        elif cos.dim() == 3:
            if cos.shape[0] not in (1, B) or cos.shape[1] != S:
                raise ValueError(f"cos of shape (batch, seq, rotary_dim) must be ({B} or 1, {S}, {r}), "
                                 f"got {tuple(cos.shape)}")
        else:
            raise ValueError(f"cos must be (seq, rotary_dim) or (batch, seq, rotary_dim), got {tuple(cos.shape)}")
        return None
    position_ids = as_int64("position_ids", position_ids)
    if cos.dim() != 2:
        raise ValueError(f"with position_ids, cos and sin must be (positions, rotary_dim) tables, got "
                         f"{tuple(cos.shape)}")
    if not (position_ids.dim() == 1 and position_ids.shape[0] == S
            or position_ids.dim() == 2 and position_ids.shape[0] in (1, B) and position_ids.shape[1] == S):
        raise ValueError(f"position_ids must have shape ({S},), (1, {S}) or ({B}, {S}), got "
                         f"{tuple(position_ids.shape)}")
    # One host sync, skipped under kernels.unchecked() and torch.compile (the kernel clamps).
    if position_ids.numel() and check_values() and bool(((position_ids < 0) | (position_ids >= cos.shape[0])).any()):
        raise ValueError(f"position_ids must lie in [0, {cos.shape[0]}) (the rows of cos/sin), "
                         f"got {position_ids.min().item()}..{position_ids.max().item()}")
    return position_ids


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin)``: HF's ``apply_rotary_pos_emb``.

    - ``q`` (batch, heads, seq, head_dim) and ``k`` (batch, kv_heads, seq,
      head_dim), any strides: a (batch, seq, heads, head_dim) projection is passed
      as its ``.transpose(1, 2)`` view, without a copy.
    - ``cos``/``sin`` of ``rotary_dim`` (even, <= head_dim) values per token: a
      (seq, rotary_dim) table, or (batch or 1, seq, rotary_dim) as HF's rotary
      module returns them. Features past ``rotary_dim`` pass through (partial rotary).
    - ``position_ids`` ((seq,), (1, seq) or (batch, seq), integer): token t of
      row b uses table row ``position_ids[b, t]`` of a (positions, rotary_dim)
      ``cos``/``sin``, so packed sequences whose positions restart work. Its range
      check is one host sync, skipped inside :func:`kernels.unchecked` and under
      ``torch.compile``.

    Returns new (batch, heads, seq, head_dim) tensors in q's/k's dtype (computed
    in fp32), laid out as (batch, seq, heads, head_dim) in memory when q/k are, so
    the attention output's transpose back is a view; the inputs are never written. Gradients flow to q and k
    (cos/sin must not require grad); double backward works. Tables:
    :func:`rope_tables`.
    """
    position_ids = _check(q, k, cos, sin, position_ids)
    if not use_triton(q.device):
        return reference.rope(q, k, cos, sin, position_ids=position_ids)
    return rope_op(q, k, cos, sin, position_ids, False)
