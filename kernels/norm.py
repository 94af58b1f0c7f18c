"""LayerNorm and RMSNorm, with optional fused residual add: Triton kernels, forward and backward.

Layout of this module: the kernels, their launchers, the ``fastlm::norm``,
``fastlm::add_norm`` and ``fastlm::norm_backward`` ops (design in
:mod:`kernels._library`), the public functions. The math (per row of N features, statistics in fp32):

    LayerNorm:  xhat = (x - mean) * rstd,  rstd = 1 / sqrt(var + eps),  y = xhat * w + b
                (mean = x0 + mean(x - x0), x0 the row's first value: exactly x0 on a
                constant row, so xhat is exactly 0 there, as in exact math)
    RMSNorm:    xhat = x * rstd,           rstd = 1 / sqrt(mean(x^2) + eps),  y = xhat * (offset + w)
                (offset: Gemma stores w and scales by 1 + w; where the result is rounded is
                the casting mode, see ``CASTING_MODES``)

    backward, with g = dy * w (RMSNorm: dy * (offset + w)):
    LayerNorm:  dx = rstd * (g - xhat * mean(g * xhat) - mean(g))
    RMSNorm:    dx = rstd * (g - xhat * mean(g * xhat))
    dw = sum_rows(dy * xhat),  db = sum_rows(dy)

With a residual (``add_layer_norm``/``add_rms_norm``) the forward first forms
``s = input + residual``, stores it (the pre-norm transformer's running
residual stream) and normalizes ``s``; the backward adds the gradient flowing
into ``s`` from later layers to ``dx``, and that is the gradient of both inputs.

dW/dB are a two-stage reduction in fp32: each backward program sums its rows
into a private partial row (no atomics, deterministic), then a second kernel
sums the partial rows. Row offsets are int64 so tensors past 2^31 elements work.

Rows up to 8192 features (forward) / 4096 (backward) are held in registers (one
read of each input); wider rows are streamed in chunks (see ``_FWD``/``_BWD``).
"""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import Callable, Sequence

import torch
import triton
import triton.language as tl

from ._autograd import triton_only_first_order
from ._backend import use_triton
from ._library import NAMESPACE, NORM_RUNS_IN_FP32, autocast_dtype, autocast_inputs, define_op, launch, no_tensor, present, register_autocast
from ._launch import KernelSpec, TRITON_DTYPE, as_rows, cdiv, next_power_of_2, parallel_programs, unique_specs
from ._validate import check_float, check_positive, check_same_device, check_same_dtype
from . import reference

# ----------------------------------------------------------------------------- kernels


@triton.jit
def _row_shift(X, RES, RES_OUT, rows, row_mask, stride_x, stride_res, HAS_RES: tl.constexpr):
    # The first value of each row of the normalized input (x, or x + residual rounded as
    # RES_OUT stores it). LayerNorm's mean is taken over x - shift: on a row whose values
    # are all equal (every row at hidden size 1) that sum is exactly 0, so x - mean is
    # exactly 0 whatever the rounding of 1/N, as it is in exact math; 1/sqrt(eps) would
    # otherwise magnify one rounding of the mean into visible outputs and gradients.
    shift = tl.load(X + rows * stride_x, mask=row_mask, other=0.0).to(tl.float32)
    if HAS_RES:
        shift += tl.load(RES + rows * stride_res, mask=row_mask, other=0.0).to(tl.float32)
        shift = shift.to(RES_OUT.dtype.element_ty).to(tl.float32)
    return shift


@triton.jit
def _rounded(x, DTYPE: tl.constexpr):
    # fp32 x rounded to DTYPE (to nearest even, as torch rounds) and back to fp32. bf16 by hand:
    # Triton's interpreter truncates fp32 -> bf16; this is what a GPU's cvt.rn computes.
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(DTYPE).to(tl.float32)


@triton.jit
def _effective_weight(W, X, cols, col_mask, offset, CASTING: tl.constexpr):
    # offset + w in fp32, rounded where the casting mode rounds it (CASTING_MODES):
    # Llama adds in the weight's dtype, "none" in the input's, Gemma not at all.
    # LayerNorm passes offset 0 and CASTING 0: the weight as it is.
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    if CASTING == 2:
        w = _rounded(w, X.dtype.element_ty)
    w = w + offset
    if CASTING == 1:
        w = _rounded(w, W.dtype.element_ty)
    if CASTING == 2:
        w = _rounded(w, X.dtype.element_ty)
    return w


@triton.jit
def _normalized(x, rstd, X, CASTING: tl.constexpr):
    # xhat = x * rstd (x centred for LayerNorm, whose CASTING is 0) rounded as the casting mode
    # rounds it: Llama rounds xhat to the input dtype before the weight multiply; "none" rounds
    # rstd and xhat (the sum of squares still accumulates in fp32).
    if CASTING == 2:
        rstd = _rounded(rstd, X.dtype.element_ty)
    xhat = x * rstd
    if CASTING != 0:  # CASTING is a constexpr: the fp32 mode compiles to x * rstd alone
        xhat = _rounded(xhat, X.dtype.element_ty)
    return xhat


@triton.jit
def _norm_fwd_kernel(
    X, RES, W, B, Y, RES_OUT, MEAN, RSTD,
    M, N,
    stride_x, stride_res, stride_y, stride_res_out,
    eps, offset,
    IS_RMS: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ONE_PASS: tl.constexpr, CASTING: tl.constexpr,
):
    pid = tl.program_id(0)
    inv_n = 1.0 / N
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    rows = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    x_row = X + rows[:, None] * stride_x
    y_row = Y + rows[:, None] * stride_y
    r_row = RES + rows[:, None] * stride_res
    s_row = RES_OUT + rows[:, None] * stride_res_out

    if ONE_PASS:
        # The whole row lives in registers: one read of every input.
        col_mask = cols < N
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            x += tl.load(r_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            s = x.to(RES_OUT.dtype.element_ty)
            tl.store(s_row + cols[None, :], s, mask=mask)
            x = s.to(tl.float32)  # normalize exactly what the residual stream holds
        if IS_RMS:
            xc = x
        else:
            shift = _row_shift(X, RES, RES_OUT, rows, row_mask, stride_x, stride_res, HAS_RES)
            d = tl.where(mask, x - shift[:, None], 0.0)
            mean_d = tl.sum(d, axis=1) * inv_n
            xc = tl.where(mask, d - mean_d[:, None], 0.0)
            tl.store(MEAN + rows, shift + mean_d, mask=row_mask)
        var = tl.sum(xc * xc, axis=1) * inv_n
        rstd = tl.rsqrt(var + eps)
        tl.store(RSTD + rows, rstd, mask=row_mask)
        y = _normalized(xc, rstd[:, None], X, CASTING)
        if HAS_W:
            y = y * _effective_weight(W, X, cols, col_mask, offset, CASTING)[None, :]
        if HAS_B:
            y = y + tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_row + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    else:
        # Wide rows (BLOCK_M == 1): stream the row in chunks, two-pass statistics.
        if not IS_RMS:
            shift = _row_shift(X, RES, RES_OUT, rows, row_mask, stride_x, stride_res, HAS_RES)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for off in range(0, N, BLOCK_N):
            c = off + cols
            mask = row_mask[:, None] & (c < N)[None, :]
            x = tl.load(x_row + c[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_RES:
                x += tl.load(r_row + c[None, :], mask=mask, other=0.0).to(tl.float32)
                s = x.to(RES_OUT.dtype.element_ty)
                tl.store(s_row + c[None, :], s, mask=mask)
                x = s.to(tl.float32)
            if IS_RMS:
                acc += x * x
            else:
                acc += tl.where(mask, x - shift[:, None], 0.0)
        if HAS_RES:
            # Later passes read the sum back from RES_OUT: make this program's stores visible.
            tl.debug_barrier()
            x_row = s_row
        if IS_RMS:
            mean = tl.zeros([BLOCK_M], dtype=tl.float32)
            var = tl.sum(acc, axis=1) * inv_n
        else:
            mean = shift + tl.sum(acc, axis=1) * inv_n  # exactly the shift on a constant row
            tl.store(MEAN + rows, mean, mask=row_mask)
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for off in range(0, N, BLOCK_N):
                c = off + cols
                mask = row_mask[:, None] & (c < N)[None, :]
                x = tl.load(x_row + c[None, :], mask=mask, other=0.0).to(tl.float32)
                xc = tl.where(mask, x - mean[:, None], 0.0)
                acc += xc * xc
            var = tl.sum(acc, axis=1) * inv_n
        rstd = tl.rsqrt(var + eps)
        tl.store(RSTD + rows, rstd, mask=row_mask)
        for off in range(0, N, BLOCK_N):
            c = off + cols
            col_mask = c < N
            mask = row_mask[:, None] & col_mask[None, :]
            x = tl.load(x_row + c[None, :], mask=mask, other=0.0).to(tl.float32)
            y = _normalized(x - mean[:, None], rstd[:, None], X, CASTING)
            if HAS_W:
                y = y * _effective_weight(W, X, c, col_mask, offset, CASTING)[None, :]
            if HAS_B:
                y = y + tl.load(B + c, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(y_row + c[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(
    X, W, DY, DX, DRES, MEAN, RSTD, DW_PART, DB_PART,
    M, N,
    stride_x, stride_dy, stride_dx, stride_dres,
    rows_per_program, offset,
    IS_RMS: tl.constexpr, HAS_DRES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ONE_PASS: tl.constexpr, CASTING: tl.constexpr,
):
    # Each program owns a contiguous run of rows and one private row of the dW/dB
    # partial buffers: the reduction over rows needs no atomics and is deterministic.
    pid = tl.program_id(0)
    inv_n = 1.0 / N
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK_N)
    part = pid.to(tl.int64) * N

    if ONE_PASS:
        col_mask = cols < N
        if HAS_W:
            w = _effective_weight(W, X, cols, col_mask, offset, CASTING)[None, :]
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for r0 in range(row_start, row_end, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            row_mask = rows < row_end
            rows = rows.to(tl.int64)
            mask = row_mask[:, None] & col_mask[None, :]
            x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
            if IS_RMS:
                xhat = x * rstd[:, None]
            else:
                mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
                xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            if HAS_W:
                g = dy * w
            else:
                g = dy
            c1 = tl.sum(g * xhat, axis=1) * inv_n
            if IS_RMS:
                dx = (g - xhat * c1[:, None]) * rstd[:, None]
            else:
                c2 = tl.sum(g, axis=1) * inv_n
                dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
            if HAS_DRES:
                dx += tl.load(DRES + rows[:, None] * stride_dres + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
            if HAS_W:
                dw_acc += tl.sum(dy * xhat, axis=0)
            if HAS_B:
                db_acc += tl.sum(dy, axis=0)
        if HAS_W:
            tl.store(DW_PART + part + cols, dw_acc, mask=col_mask)
        if HAS_B:
            tl.store(DB_PART + part + cols, db_acc, mask=col_mask)
    else:
        # Wide rows, one at a time: pass 1 reduces c1 (and c2), pass 2 writes dx and
        # adds into this program's partial rows (zero-initialised by the launcher).
        for row64 in range(row_start.to(tl.int64), row_end.to(tl.int64)):
            x_row = X + row64 * stride_x
            dy_row = DY + row64 * stride_dy
            rstd = tl.load(RSTD + row64)
            if IS_RMS:
                mean = 0.0
            else:
                mean = tl.load(MEAN + row64)
            acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
            acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
            for off in range(0, N, BLOCK_N):
                c = off + cols
                mask = c < N
                x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
                g = tl.load(dy_row + c, mask=mask, other=0.0).to(tl.float32)
                if HAS_W:
                    g = g * _effective_weight(W, X, c, mask, offset, CASTING)
                xhat = tl.where(mask, (x - mean) * rstd, 0.0)
                acc1 += g * xhat
                acc2 += g
            c1 = tl.sum(acc1, axis=0) * inv_n
            c2 = tl.sum(acc2, axis=0) * inv_n
            for off in range(0, N, BLOCK_N):
                c = off + cols
                mask = c < N
                x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_row + c, mask=mask, other=0.0).to(tl.float32)
                if HAS_W:
                    g = dy * _effective_weight(W, X, c, mask, offset, CASTING)
                else:
                    g = dy
                xhat = tl.where(mask, (x - mean) * rstd, 0.0)
                if IS_RMS:
                    dx = (g - xhat * c1) * rstd
                else:
                    dx = (g - xhat * c1 - c2) * rstd
                if HAS_DRES:
                    dx += tl.load(DRES + row64 * stride_dres + c, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + row64 * stride_dx + c, dx.to(DX.dtype.element_ty), mask=mask)
                if HAS_W:
                    dw = tl.load(DW_PART + part + c, mask=mask, other=0.0)
                    tl.store(DW_PART + part + c, dw + dy * xhat, mask=mask)
                if HAS_B:
                    db = tl.load(DB_PART + part + c, mask=mask, other=0.0)
                    tl.store(DB_PART + part + c, db + dy, mask=mask)


@triton.jit
def _column_sum_kernel(PART, OUT, G, N, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
    # Second stage of the dW/dB reduction: OUT[n] = sum_g PART[g, n], in fp32.
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    acc = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        mask = (g < G)[:, None] & col_mask[None, :]
        acc += tl.load(PART + g.to(tl.int64)[:, None] * N + cols[None, :], mask=mask, other=0.0)
    tl.store(OUT + cols, tl.sum(acc, axis=0).to(OUT.dtype.element_ty), mask=col_mask)


# ----------------------------------------------------------------------------- launchers

# Launch shapes, kept spill-free on sm_80/sm_90 by `python -m bench.compile`. Rows
# up to one_pass_max features live in registers (one read of each input); wider
# rows are streamed in loop_block_n chunks. Short rows share a program in tiles
# of TILE elements. ELEMS_PER_THREAD sets the warps per tile: the backward keeps
# several times more values alive per element than the forward.
_FWD = dict(one_pass_max=8192, tile=4096, elems_per_thread=16, loop_block_n=4096)
_BWD = dict(one_pass_max=4096, tile=1024, elems_per_thread=4, loop_block_n=2048)
_BWD_FP32 = dict(_BWD, one_pass_max=2048, tile=512)  # fp32 tiles twice as large spill
_MAX_WARPS = 16
_SUM_BLOCK_G, _SUM_BLOCK_N = 32, 128


def _row_config(n: int, one_pass_max: int, tile: int, elems_per_thread: int, loop_block_n: int) -> tuple[int, int, bool, int]:
    """(BLOCK_M, BLOCK_N, ONE_PASS, num_warps) for rows of ``n`` features."""
    block_n = max(16, next_power_of_2(n))
    if block_n > one_pass_max:
        return 1, loop_block_n, False, _MAX_WARPS
    block_m = max(1, min(128, tile // block_n))
    num_warps = max(4, min(_MAX_WARPS, block_m * block_n // (32 * elems_per_thread)))
    return block_m, block_n, True, num_warps


def _fwd_config(n: int, dtype: torch.dtype) -> tuple[int, int, bool, int]:
    return _row_config(n, **_FWD)


def _bwd_config(n: int, dtype: torch.dtype) -> tuple[int, int, bool, int]:
    return _row_config(n, **(_BWD_FP32 if dtype == torch.float32 else _BWD))


def _row_stride(t: torch.Tensor) -> int:
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


# casting_mode -> the kernels' CASTING constexpr (LayerNorm: "gemma", fp32 throughout).
_CASTING = {mode: i for i, mode in enumerate(reference.norm.CASTING_MODES)}


def _norm_forward(x, residual, weight, bias, eps, is_rms, offset=0.0, casting_mode="gemma"):
    """Launch the forward on (M, N) views. Returns y, s (or None), mean, rstd."""
    M, N = x.shape
    y = torch.empty((M, N), dtype=reference.norm.rms_output_dtype(x.dtype, weight, casting_mode), device=x.device)
    s = torch.empty((M, N), dtype=x.dtype, device=x.device) if residual is not None else None
    # RMSNorm has no mean: zeros, so the op's outputs are defined everywhere.
    mean = (torch.zeros if is_rms else torch.empty)((M,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M == 0:
        return y, s, mean, rstd
    block_m, block_n, one_pass, num_warps = _fwd_config(N, x.dtype)
    launch(_norm_fwd_kernel)[(cdiv(M, block_m),)](
        x, residual if residual is not None else x, weight if weight is not None else x,
        bias if bias is not None else x, y, s if s is not None else y, mean, rstd,
        M, N,
        _row_stride(x), _row_stride(residual) if residual is not None else 0, N, N,
        eps, offset,
        IS_RMS=is_rms, HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, ONE_PASS=one_pass, CASTING=_CASTING[casting_mode], num_warps=num_warps,
    )
    return y, s, mean, rstd


def _column_sum(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    G, N = part.shape
    out = torch.empty((N,), dtype=dtype, device=part.device)
    launch(_column_sum_kernel)[(cdiv(N, _SUM_BLOCK_N),)](part, out, G, N, BLOCK_G=_SUM_BLOCK_G, BLOCK_N=_SUM_BLOCK_N, num_warps=4)
    return out


def _norm_backward(dy, x, weight, has_bias, mean, rstd, dres, is_rms, offset=0.0, casting_mode="gemma"):
    """Launch the backward on (M, N) views. Returns dx, dw (or None), db (or None)."""
    M, N = x.shape
    dx = torch.empty((M, N), dtype=x.dtype, device=x.device)
    has_w = weight is not None
    if M == 0:
        dw = torch.zeros_like(weight) if has_w else None
        db = torch.zeros((N,), dtype=weight.dtype if has_w else x.dtype, device=x.device) if has_bias else None
        return dx, dw, db
    block_m, block_n, one_pass, num_warps = _bwd_config(N, x.dtype)
    rows_per_program = cdiv(cdiv(M, parallel_programs(x.device)), block_m) * block_m
    grid = cdiv(M, rows_per_program)
    alloc = torch.empty if one_pass else torch.zeros  # the streaming path accumulates in place
    dw_part = alloc((grid, N), dtype=torch.float32, device=x.device) if has_w else None
    db_part = alloc((grid, N), dtype=torch.float32, device=x.device) if has_bias else None
    launch(_norm_bwd_kernel)[(grid,)](
        x, weight if has_w else x, dy, dx, dres if dres is not None else dy, mean, rstd,
        dw_part if has_w else mean, db_part if has_bias else mean,
        M, N,
        _row_stride(x), _row_stride(dy), N, _row_stride(dres) if dres is not None else 0,
        rows_per_program, offset,
        IS_RMS=is_rms, HAS_DRES=dres is not None, HAS_W=has_w, HAS_B=has_bias,
        BLOCK_M=block_m, BLOCK_N=block_n, ONE_PASS=one_pass, CASTING=_CASTING[casting_mode], num_warps=num_warps,
    )
    param_dtype = weight.dtype if has_w else x.dtype
    dw = _column_sum(dw_part, weight.dtype) if has_w else None
    db = _column_sum(db_part, param_dtype) if has_bias else None
    return dx, dw, db


def compile_specs() -> list[KernelSpec]:
    """Every configuration the launchers above can pick, for the static compile check.

    Sizes are multiples of 16 and tensors 16-byte aligned, as for the hidden sizes
    models use, so pointers, N and row strides carry Triton's divisibility hint.
    """
    specs = []
    # Every power of two a one-pass row can round up to, and one streamed width.
    widths = [2**k for k in range(4, 14)] + [65536]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        t = "*" + TRITON_DTYPE[dtype]
        for n in widths:
            # RMSNorm in each casting mode (the rounding steps differ); LayerNorm's is fp32.
            for is_rms, casting in [(False, 0)] + [(True, c) for c in _CASTING.values()]:
                kind = f"{'rms' if is_rms else 'ln'} N={n} {dtype}" + (f" casting={casting}" if casting else "")
                flags = {"IS_RMS": is_rms, "HAS_W": True, "HAS_B": not is_rms, "CASTING": casting}
                bm, bn, op, nw = _fwd_config(n, dtype)
                sig = {k: t for k in ("X", "RES", "W", "B", "Y", "RES_OUT")}
                sig |= {"MEAN": "*fp32", "RSTD": "*fp32", "M": "i32", "N": "i32"}
                sig |= {k: "i32" for k in ("stride_x", "stride_res", "stride_y", "stride_res_out")}
                sig |= {"eps": "fp32", "offset": "fp32"}
                for has_res in (False, True):
                    c = flags | {"HAS_RES": has_res, "BLOCK_M": bm, "BLOCK_N": bn, "ONE_PASS": op}
                    specs.append(_norm_spec(_norm_fwd_kernel, sig, c, nw, kind))
                bm, bn, op, nw = _bwd_config(n, dtype)
                sig = {k: t for k in ("X", "W", "DY", "DX", "DRES")}
                sig |= {k: "*fp32" for k in ("MEAN", "RSTD", "DW_PART", "DB_PART")}
                sig |= {"M": "i32", "N": "i32"}
                sig |= {k: "i32" for k in ("stride_x", "stride_dy", "stride_dx", "stride_dres")}
                sig |= {"rows_per_program": "i32", "offset": "fp32"}
                for has_dres in (False, True):
                    c = flags | {"HAS_DRES": has_dres, "BLOCK_M": bm, "BLOCK_N": bn, "ONE_PASS": op}
                    specs.append(_norm_spec(_norm_bwd_kernel, sig, c, nw, kind))
        c = {"BLOCK_G": _SUM_BLOCK_G, "BLOCK_N": _SUM_BLOCK_N}
        sig = {"PART": "*fp32", "OUT": t, "G": "i32", "N": "i32"}
        specs.append(_norm_spec(_column_sum_kernel, sig, c, 4, str(dtype)))
    return unique_specs(specs)


def _norm_spec(kernel, sig: dict[str, str], constexprs: dict, num_warps: int, label: str) -> KernelSpec:
    aligned = tuple(k for k, v in sig.items() if v.startswith("*") or k == "N" or k.startswith("stride_"))
    return KernelSpec(kernel, sig | {k: "constexpr" for k in constexprs}, constexprs, num_warps,
                      label=label, extra={"divisible_by_16": aligned})


# ----------------------------------------------------------------------------- ops

# Three ops (see kernels._library for the design): fastlm::norm and fastlm::add_norm
# return the statistics the backward needs next to their results, fastlm::norm_backward
# consumes them. Both forward ops serve LayerNorm and RMSNorm (is_rms).


def _norm_forward_reference(x, residual, weight, bias, eps, is_rms, offset=0.0, casting_mode="gemma"):
    """The launcher's contract in PyTorch, on (M, N) rows: y, s (or None), mean, rstd."""
    s = x + residual if residual is not None else None
    xs = s if s is not None else x
    xf = xs.float()
    n = xs.shape[1]
    w = weight.reshape(-1) if weight is not None else None
    if is_rms:
        mean = torch.zeros(xs.shape[:1], dtype=torch.float32, device=xs.device)
        rstd = torch.rsqrt(xf.square().mean(1) + eps)
        y = reference.rms_norm(xs, (n,), w, eps, offset=offset, casting_mode=casting_mode)
    else:
        mean = xf.mean(1)
        rstd = torch.rsqrt(xf.var(1, unbiased=False) + eps)
        y = reference.layer_norm(xs, (n,), w, bias.reshape(-1) if bias is not None else None, eps)
    return y, s, mean, rstd


def _norm_backward_reference(dy, x, weight, has_bias, mean, rstd, dres, is_rms, offset=0.0, casting_mode="gemma"):
    """The backward launcher's contract in PyTorch (the module docstring's formulas): dx, dw, db."""
    xf, dyf = x.float(), dy.float()
    xhat = xf * rstd[:, None] if is_rms else (xf - mean[:, None]) * rstd[:, None]
    w = reference.norm.rms_weight(weight, offset, casting_mode, x.dtype)
    g = dyf * w.reshape(-1).float() if weight is not None else dyf
    dx = g - xhat * (g * xhat).mean(1, keepdim=True)
    if not is_rms:
        dx = dx - g.mean(1, keepdim=True)
    dx = dx * rstd[:, None]
    if dres is not None:
        dx = dx + dres.float()
    param_dtype = weight.dtype if weight is not None else x.dtype
    dw = (dyf * xhat).sum(0).to(param_dtype) if weight is not None else None
    db = dyf.sum(0).to(param_dtype) if has_bias else None
    return dx.to(x.dtype), dw, db


def _norm_rows(x, residual, weight, bias, normalized_shape, eps, is_rms, offset, casting_mode):
    n = math.prod(normalized_shape)
    x2 = as_rows(x, n)
    r2 = as_rows(residual, n) if residual is not None else None
    if use_triton(x.device):
        w = weight.contiguous() if weight is not None else None
        b = bias.contiguous() if bias is not None else None
        y, s, mean, rstd = _norm_forward(x2, r2, w, b, eps, is_rms, offset, casting_mode)
    else:
        y, s, mean, rstd = _norm_forward_reference(x2, r2, weight, bias, eps, is_rms, offset, casting_mode)
    return y.view(x.shape), (s.view(x.shape) if s is not None else None), mean, rstd


def _norm_op(input, weight, bias, normalized_shape, eps, is_rms, offset=0.0, casting_mode="gemma"):
    y, _, mean, rstd = _norm_rows(input, None, weight, bias, normalized_shape, eps, is_rms, offset, casting_mode)
    return y, mean, rstd


def _add_norm_op(input, residual, weight, bias, normalized_shape, eps, is_rms, offset=0.0, casting_mode="gemma"):
    return _norm_rows(input, residual, weight, bias, normalized_shape, eps, is_rms, offset, casting_mode)


def _norm_backward_op(grad_out, grad_residual_out, x, weight, has_bias, mean, rstd, normalized_shape, is_rms,
                      offset=0.0, casting_mode="gemma"):
    n = math.prod(normalized_shape)
    dy2, x2 = as_rows(grad_out, n), as_rows(x, n)
    ds2 = as_rows(grad_residual_out, n) if grad_residual_out is not None else None
    if use_triton(x.device):
        dx, dw, db = _norm_backward(dy2, x2, weight.contiguous() if weight is not None else None, has_bias, mean,
                                    rstd, ds2, is_rms, offset, casting_mode)
    else:
        dx, dw, db = _norm_backward_reference(dy2, x2, weight, has_bias, mean, rstd, ds2, is_rms, offset, casting_mode)
    shape = tuple(normalized_shape)
    dw = dw.view(shape) if dw is not None else no_tensor(x)
    db = db.view(shape) if db is not None else no_tensor(x)
    return dx.view(x.shape), dw, db


_AFFINE = "Tensor? weight, Tensor? bias, SymInt[] normalized_shape, float eps, bool is_rms"
_RMS_OPTIONS = 'float offset=0.0, str casting_mode="gemma"'  # RMSNorm's (1 + w) and rounding; see reference.norm
norm_op = define_op("norm", _norm_op, f"(Tensor input, {_AFFINE}, {_RMS_OPTIONS}) -> (Tensor, Tensor, Tensor)")
add_norm_op = define_op("add_norm", _add_norm_op,
                        f"(Tensor input, Tensor residual, {_AFFINE}, {_RMS_OPTIONS}) -> (Tensor, Tensor, Tensor, Tensor)")
norm_backward_op = define_op(
    "norm_backward", _norm_backward_op,
    "(Tensor grad_out, Tensor? grad_residual_out, Tensor x, Tensor? weight, bool has_bias, Tensor mean, Tensor rstd, "
    f"SymInt[] normalized_shape, bool is_rms, {_RMS_OPTIONS}) -> (Tensor, Tensor, Tensor)",
)


def _op_name(is_rms: bool, has_res: bool) -> str:
    return f"{'add_' if has_res else ''}{'rms' if is_rms else 'layer'}_norm"


def _setup_norm(ctx, inputs, output):
    x, weight, bias, shape, _, is_rms, *rms_options = inputs
    ctx.save_for_backward(x, weight, output[1], output[2])
    ctx.has_bias, ctx.shape, ctx.is_rms, ctx.rms_options = bias is not None, shape, is_rms, rms_options


def _setup_add_norm(ctx, inputs, output):
    _, _, weight, bias, shape, _, is_rms, *rms_options = inputs
    ctx.save_for_backward(output[1], weight, output[2], output[3])  # the normalized sum, not the input
    ctx.has_bias, ctx.shape, ctx.is_rms, ctx.rms_options = bias is not None, shape, is_rms, rms_options


def _backward(ctx, dy, ds):
    if torch.is_grad_enabled():  # create_graph=True: these gradients would look constant
        raise RuntimeError(triton_only_first_order(_op_name(ctx.is_rms, ds is not None)))
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = norm_backward_op(dy, ds, x, weight, ctx.has_bias, mean, rstd, ctx.shape, ctx.is_rms, *ctx.rms_options)
    return dx, present(dw) if weight is not None else None, present(db) if ctx.has_bias else None


def _norm_grads(ctx, dy, dmean, drstd):
    dx, dw, db = _backward(ctx, dy, None)
    return dx, dw, db, None, None, None, None, None


def _add_norm_grads(ctx, dy, ds, dmean, drstd):
    dx, dw, db = _backward(ctx, dy, ds)
    return dx, dx, dw, db, None, None, None, None, None


norm_op.register_autograd(_norm_grads, setup_context=_setup_norm)
add_norm_op.register_autograd(_add_norm_grads, setup_context=_setup_add_norm)


def _autocast_rule(op) -> Callable[[str, tuple], torch.dtype | None]:
    """``op``'s autocast rule: torch's for the function a call stands for (``rms_norm`` when is_rms,
    else ``layer_norm``) on that device: fp32 where torch's has the fp32 rule (CUDA), else none."""
    is_rms_at = [a.name for a in op.default._schema.arguments].index("is_rms")

    def rule(device_type: str, args: tuple) -> torch.dtype | None:
        name = "rms_norm" if args[is_rms_at] else "layer_norm"
        return torch.float32 if NORM_RUNS_IN_FP32[(name, device_type)] else None
    return rule


for _name in ("norm", "add_norm"):
    register_autocast(_name, _autocast_rule(getattr(getattr(torch.ops, NAMESPACE), _name)))


# ----------------------------------------------------------------------------- public API


def _normalized_shape(input: torch.Tensor, normalized_shape, weight, bias) -> tuple[int, ...]:
    if isinstance(normalized_shape, numbers.Integral):
        normalized_shape = (int(normalized_shape),)
    try:
        if isinstance(normalized_shape, (str, bytes)) or not all(isinstance(d, numbers.Integral) for d in normalized_shape):
            raise TypeError
        shape = tuple(int(d) for d in normalized_shape)
    except TypeError:
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}") from None
    if len(shape) == 0 or any(d <= 0 for d in shape):
        raise ValueError(f"normalized_shape must be non-empty with positive sizes, got {shape}")
    if tuple(input.shape[input.dim() - len(shape):]) != shape or input.dim() < len(shape):
        raise ValueError(
            f"input of shape {tuple(input.shape)} does not end with normalized_shape {shape}"
        )
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != shape:
            raise ValueError(f"{name} must have shape normalized_shape={shape}, got {tuple(p.shape)}")
    return shape


def _check(input, residual, normalized_shape, weight, bias, eps):
    check_float("input", input)
    if residual is not None:
        check_float("residual", residual)
        check_same_dtype(input=input, residual=residual)
        if residual.shape != input.shape:
            raise ValueError(f"residual must have the shape of input {tuple(input.shape)}, got {tuple(residual.shape)}")
    if weight is not None:
        check_float("weight", weight)
    if bias is not None:
        check_float("bias", bias)
    check_same_device(input=input, residual=residual, weight=weight, bias=bias)
    check_positive("eps", eps)
    return _normalized_shape(input, normalized_shape, weight, bias)


def _rms_eps(input: torch.Tensor, eps: float | None) -> float:
    return reference.norm.default_rms_eps(input.dtype) if eps is None else eps


def _autocast(name: str, input, residual, weight, bias):
    """What autocast does to torch's ``name`` (layer_norm/rms_norm) on this device: fp32 inputs, or nothing."""
    if autocast_dtype(input.device) is not None and NORM_RUNS_IN_FP32[(name, input.device.type)]:
        return autocast_inputs(torch.float32, input, residual, weight, bias)
    return input, residual, weight, bias


def _run(input, residual, shape, weight, bias, eps, is_rms, offset=0.0, casting_mode="gemma"):
    """The reference backend's torch functions, or the fastlm:: op (see kernels._library)."""
    if not use_triton(input.device):
        rms = dict(offset=offset, casting_mode=casting_mode)
        if residual is None:
            if is_rms:
                return reference.rms_norm(input, shape, weight, eps, **rms)
            return reference.layer_norm(input, shape, weight, bias, eps)
        if is_rms:
            return reference.add_rms_norm(input, residual, shape, weight, eps, **rms)
        return reference.add_layer_norm(input, residual, shape, weight, bias, eps)
    # The public functions have cast as torch's function does (a model's casting mode: not at all); the
    # op's own autocast rule, there for direct callers, must not cast again.
    with torch.autocast(input.device.type, enabled=False) if autocast_dtype(input.device) else contextlib.nullcontext():
        if residual is None:
            return norm_op(input, weight, bias, shape, float(eps), is_rms, float(offset), casting_mode)[0]
        y, s, _, _ = add_norm_op(input, residual, weight, bias, shape, float(eps), is_rms, float(offset),
                                 casting_mode)
        return y, s


def _rms_options(input, residual, weight, offset, casting_mode):
    """Checked ``offset`` and ``casting_mode``; inputs cast as autocast casts torch's rms_norm, where the mode is None.

    An explicit casting mode reproduces a model's own module, which autocast leaves alone:
    the inputs keep their dtypes. None is torch's function, autocast rule included.
    """
    if not isinstance(offset, numbers.Real) or isinstance(offset, bool) or not math.isfinite(offset):
        raise TypeError(f"offset must be a finite float (Gemma's 1.0, or 0.0), got {offset!r}")
    if casting_mode is None:
        input, residual, weight, _ = _autocast("rms_norm", input, residual, weight, None)
        return input, residual, weight, float(offset), "gemma"
    if casting_mode not in reference.norm.CASTING_MODES:
        raise ValueError(f"casting_mode must be None or one of {', '.join(map(repr, reference.norm.CASTING_MODES))}, "
                         f"got {casting_mode!r}")
    return input, residual, weight, float(offset), casting_mode


def layer_norm(
    input: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Drop-in for :func:`torch.nn.functional.layer_norm` (fp32 statistics, any leading shape)."""
    shape = _check(input, None, normalized_shape, weight, bias, eps)
    input, _, weight, bias = _autocast("layer_norm", input, None, weight, bias)
    return _run(input, None, shape, weight, bias, eps, False)


def rms_norm(
    input: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    eps: float | None = None,
    *,
    offset: float = 0.0,
    casting_mode: str | None = None,
) -> torch.Tensor:
    """Drop-in for :func:`torch.nn.functional.rms_norm`; ``eps=None`` is torch's default, the epsilon of the
    dtype the statistics are computed in (``finfo(float32).eps`` for fp32/fp16/bf16 inputs).

    ``y = x / sqrt(mean(x^2) + eps) * (offset + weight)``: Gemma stores ``weight`` and
    scales by ``1 + weight`` (``offset=1.0``). ``casting_mode`` (Liger's name) says where
    the result is rounded, to reproduce a model's own module: ``"gemma"`` computes in fp32
    and rounds once at the end, ``"llama"`` rounds ``xhat`` to the input dtype before the
    weight multiply (result in the promoted dtype of input and weight), ``"none"`` rounds
    each step to the input dtype (:data:`kernels.reference.norm.CASTING_MODES`); these
    ignore autocast, as the modules they reproduce do. ``None`` is torch's function:
    computed as ``"gemma"``, under torch's autocast rule.
    """
    if isinstance(input, torch.Tensor) and input.is_floating_point():
        eps = _rms_eps(input, eps)
    shape = _check(input, None, normalized_shape, weight, None, eps)
    input, _, weight, offset, casting_mode = _rms_options(input, None, weight, offset, casting_mode)
    return _run(input, None, shape, weight, None, eps, True, offset, casting_mode)


def add_layer_norm(
    input: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(layer_norm(input + residual), input + residual)`` in one pass over memory."""
    shape = _check(input, residual, normalized_shape, weight, bias, eps)
    input, residual, weight, bias = _autocast("layer_norm", input, residual, weight, bias)
    return _run(input, residual, shape, weight, bias, eps, False)


def add_rms_norm(
    input: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    eps: float | None = None,
    *,
    offset: float = 0.0,
    casting_mode: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(input + residual), input + residual)`` in one pass over memory (options as :func:`rms_norm`)."""
    if isinstance(input, torch.Tensor) and input.is_floating_point():
        eps = _rms_eps(input, eps)
    shape = _check(input, residual, normalized_shape, weight, None, eps)
    input, residual, weight, offset, casting_mode = _rms_options(input, residual, weight, offset, casting_mode)
    return _run(input, residual, shape, weight, None, eps, True, offset, casting_mode)
