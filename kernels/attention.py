"""Fused (flash-style) attention: Triton kernels, forward and backward.

Layout of this module: the kernels, their launchers and launch configurations,
the ``fastlm::attention`` and ``fastlm::attention_backward`` ops (design in
:mod:`kernels._library`), the public functions. Tensors are (batch, heads, seq,
head_dim) with any strides. The math, per (batch, query head h), with kv head
``h // group`` (grouped-query attention reads the shared k/v in place):

    S = scale * Q K^T,   masked entries = -inf
    P = softmax(S),  O = P V,  lse = logsumexp(S)          (per query row)
    backward, with delta = rowsum(dO * O) - dlse:
    dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta),  dQ = scale * dS K,  dK = scale * dS^T Q

Masking: query i sees key j when ``j <= i + causal_offset`` (causal) and
``j < kv_len`` (``kv_lens``). ``kernels.attention`` aligns causal bottom-right
(offset Nk - Nq, as FlashAttention), ``scaled_dot_product_attention`` top-left
(offset 0, as torch): one code path. A row with no visible key gets output 0,
gradient 0 and ``lse = -inf``.

Forward: one program per block of BLOCK_M query rows, streaming key blocks with
an online softmax in the exp2 domain (``scale * log2(e)`` folded into one FMA)
and fp32 accumulators. Key blocks past the causal diagonal are never visited;
blocks fully visible to every row run without a mask, and only the diagonal
blocks (and the last, partial one) apply it. On sm_90+, inputs TMA can read
(``_tma_qualifies``) run ``_attn_fwd_tma_kernel``: tensor descriptors, one key
loop, and warp-specialized autotune candidates; the rest, and sm_80, the pointer
kernel.

Backward, deterministic (no atomics): a preprocess kernel forms ``delta``; one
kernel per block of keys accumulates dK and dV over all query blocks and, for
GQA, over all the query heads sharing that kv head, so a shared head's gradient
is summed inside one program; a separate kernel per block of queries forms dQ.

Batch and head offsets are int64. On a GPU the block shapes are autotuned per
(head dim, causal, dtype, sequence-length bucket); under the interpreter one
small configuration runs.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._autograd import first_order_only, triton_only_first_order
from ._backend import use_triton
from ._library import autocast_dtype, autocast_inputs, check_values, define_op, launch
from ._launch import TRITON_DTYPE, KernelSpec, cdiv, next_power_of_2
from ._validate import as_int64, check_float, check_integer, check_same_device, check_same_dtype
from . import reference
from .reference.attention import masked_attention

try:  # host-side TMA descriptors (triton >= 3.3); without them every GPU runs the pointer path
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton
    TensorDescriptor = None
# tl.range(..., warp_specialize=True): without it the warp-specialized configurations are dropped.
HAS_WARP_SPECIALIZE = "warp_specialize" in inspect.signature(tl.range).parameters

LOG2E = 1.4426950408889634  # the kernels spell it (and ln 2) as literals: plain globals are not constexpr
MAX_HEAD_DIM = 256

# ----------------------------------------------------------------------------- kernels


@triton.jit
def _load_tile(base, rows, n_rows, stride_row, cols, stride_col,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr):
    # A (rows, BLOCK_D) tile of one head; zeros past n_rows (when CHECK_ROWS) and past HEAD_DIM.
    ptrs = base + rows[:, None] * stride_row + cols[None, :] * stride_col
    if CHECK_ROWS:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM), other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=cols[None, :] < HEAD_DIM, other=0.0)
    return x


@triton.jit
def _store_tile(base, x, rows, n_rows, stride_row, cols, stride_col, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    ptrs = base + rows[:, None] * stride_row + cols[None, :] * stride_col
    if HEAD_DIM == BLOCK_D:
        tl.store(ptrs, x, mask=rows[:, None] < n_rows)
    else:
        tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM))


@triton.jit
def _key_range(start_m, Nq, kv_len, causal_offset, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys [0, full_end) are visible to every row of the query block; [full_end, end) need the mask."""
    end = kv_len
    full_end = kv_len
    if CAUSAL:
        # The last real row of the block sees keys < its index + 1 + offset; the first row, fewest.
        end = tl.minimum(end, tl.minimum(start_m + BLOCK_M, Nq) + causal_offset)
        full_end = tl.minimum(full_end, start_m + 1 + causal_offset)
    end = tl.maximum(end, 0)
    full_end = (tl.maximum(full_end, 0) // BLOCK_N) * BLOCK_N
    return full_end, end


@triton.jit
def _softmax_step(acc, l_i, m_i, qk, v, qk_scale, DOT_PRECISION: tl.constexpr):
    """One key tile of the online softmax. ``qk`` is unscaled, -inf where masked (scale > 0: max commutes)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    # A row that has seen no visible key yet keeps m = -inf; subtract 0 instead (p = 0, no NaN).
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk * qk_scale - m_use[:, None])  # the scale folded into one FMA per score
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _mask_scores(qk, cols, offs_m, kv_len, causal_offset, CAUSAL: tl.constexpr):
    visible = cols[None, :] < kv_len
    if CAUSAL:
        visible = visible & (cols[None, :] <= offs_m[:, None] + causal_offset)
    return tl.where(visible, qk, float("-inf"))


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_n, offs_d,
              kv_len, causal_offset, qk_scale,
              stride_kn, stride_kd, stride_vn, stride_vd,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    cols = start_n + offs_n
    k = _load_tile(k_base, cols, kv_len, stride_kn, offs_d, stride_kd, HEAD_DIM, BLOCK_D, MASKED)
    v = _load_tile(v_base, cols, kv_len, stride_vn, offs_d, stride_vd, HEAD_DIM, BLOCK_D, MASKED)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASKED:
        qk = _mask_scores(qk, cols, offs_m, kv_len, causal_offset, CAUSAL)
    return _softmax_step(acc, l_i, m_i, qk, v, qk_scale, DOT_PRECISION)


@triton.jit
def _kv_len(KV_LENS, b, Nk, HAS_KV_LENS: tl.constexpr):
    """Batch b's visible key count."""
    if HAS_KV_LENS:
        return tl.minimum(tl.load(KV_LENS + b).to(tl.int32), Nk)
    return Nk


@triton.jit
def _forward_program(group, CAUSAL: tl.constexpr):
    """This program's query block, query head, batch and kv head."""
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m  # longest rows first: a shorter tail
    h = tl.program_id(1)
    return pid_m, h, tl.program_id(2), h // group


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, KV_LENS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, group, Nq, Nk, causal_offset, qk_scale,
    tune_nq, tune_nk,  # sequence-length buckets: only the autotuner's cache key reads them
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_KV_LENS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m, h, b, hk = _forward_program(group, CAUSAL)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    lse_base = LSE + (b * tl.num_programs(1) + h).to(tl.int64) * Nq

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_len = _kv_len(KV_LENS, b, Nk, HAS_KV_LENS)

    q = _load_tile(q_base, offs_m, Nq, stride_qm, offs_d, stride_qd, HEAD_DIM, BLOCK_D, True)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    full_end, end = _key_range(start_m, Nq, kv_len, causal_offset, CAUSAL, BLOCK_M, BLOCK_N)
    for start_n in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_n, offs_d,
                                  kv_len, causal_offset, qk_scale, stride_kn, stride_kd, stride_vn, stride_vd,
                                  HEAD_DIM, BLOCK_D, False, CAUSAL, DOT_PRECISION)
    for start_n in range(full_end, end, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_n, offs_d,
                                  kv_len, causal_offset, qk_scale, stride_kn, stride_kd, stride_vn, stride_vd,
                                  HEAD_DIM, BLOCK_D, True, CAUSAL, DOT_PRECISION)

    out, lse = _fwd_finish(acc, l_i, m_i)
    _store_tile(o_base, out.to(O.dtype.element_ty), offs_m, Nq, stride_om, offs_d, stride_od, HEAD_DIM, BLOCK_D)
    tl.store(lse_base + offs_m, lse, mask=offs_m < Nq)


@triton.jit
def _fwd_finish(acc, l_i, m_i):
    # Rows with no visible key: l = 0, acc = 0 -> output 0, lse = -inf.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)  # x ln 2
    return acc / l_safe[:, None], lse


@triton.jit
def _attn_fwd_tma_kernel(
    desc_q, desc_k, desc_v, desc_o, LSE, KV_LENS,
    H, group, Nq, Nk, causal_offset, qk_scale,
    tune_nq, tune_nk,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_KV_LENS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    """The forward on Hopper: q, k, v, o move by TMA through (B, heads, seq, head_dim) tensor descriptors.

    The descriptors zero-fill rows past the sequence and columns past HEAD_DIM, so no
    tile needs a load mask. One key loop, in which only the boundary tiles (diagonal,
    ragged end, kv_len) apply the score mask, or, with WARP_SPECIALIZE, every tile
    (branch-free, so the compiler splits the loop into a TMA producer warp and a
    wgmma consumer warpgroup).
    """
    pid_m, h, b, hk = _forward_program(group, CAUSAL)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    kv_len = _kv_len(KV_LENS, b, Nk, HAS_KV_LENS)

    q = desc_q.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    full_end, end = _key_range(start_m, Nq, kv_len, causal_offset, CAUSAL, BLOCK_M, BLOCK_N)
    # Triton's warp-specialization pass takes no branch inside its loop (3.8 leaves such a
    # loop unspecialized): there every tile runs the mask as arithmetic. It neither takes
    # the register round trip that zeroes padded values, so with kv_lens the loop is plain.
    SPECIALIZE: tl.constexpr = WARP_SPECIALIZE and not HAS_KV_LENS
    for start_n in tl.range(0, end, BLOCK_N, warp_specialize=SPECIALIZE):
        k = desc_k.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        v = desc_v.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        cols = start_n + offs_n
        if SPECIALIZE:
            qk = _mask_scores(qk, cols, offs_m, kv_len, causal_offset, CAUSAL)
        elif start_n >= full_end:  # only the boundary tiles: diagonal, ragged end, kv_len
            qk = _mask_scores(qk, cols, offs_m, kv_len, causal_offset, CAUSAL)
            if HAS_KV_LENS:
                # Keys past kv_len are the caller's padding, maybe NaN: P = 0 there is not enough.
                v = tl.where(cols[:, None] < kv_len, v, 0.0)
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, qk, v, qk_scale, DOT_PRECISION)

    out, lse = _fwd_finish(acc, l_i, m_i)
    desc_o.store([b, h, start_m, 0], out.to(desc_o.dtype).reshape(1, 1, BLOCK_M, BLOCK_D))
    tl.store(LSE + (b * H + h).to(tl.int64) * Nq + offs_m, lse, mask=offs_m < Nq)


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO, DLSE, DELTA,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    Nq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # delta = rowsum(dO * O) - dlse (the lse's own gradient enters dS through delta).
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh, offs_m, Nq, stride_om,
                   offs_d, stride_od, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh, offs_m, Nq, stride_dom,
                    offs_d, stride_dod, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row = (b * tl.num_programs(1) + h).to(tl.int64) * Nq + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + row, mask=offs_m < Nq, other=0.0)
    tl.store(DELTA + row, delta, mask=offs_m < Nq)


@triton.jit
def _load_row_stats(LSE, DELTA, row, offs_m, Nq):
    # lse in the exp2 domain, with +inf for rows that see no key (and rows past Nq), so P = 0 there.
    lse = tl.load(LSE + row, mask=offs_m < Nq, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + row, mask=offs_m < Nq, other=0.0)
    return lse2, delta


@triton.jit
def _dkdv_tile(dk, dv, k, v, q_base, do_base, LSE, DELTA, row_base, start_m, diag_end, offs_n, offs_d,
               Nq, causal_offset, qk_scale,
               stride_qm, stride_qd, stride_dom, stride_dod,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    # Transposed tile (keys x queries), so P^T and dS^T feed the dK/dV dots without a transpose.
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_tile(q_base, offs_m, Nq, stride_qm, offs_d, stride_qd, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(do_base, offs_m, Nq, stride_dom, offs_d, stride_dod, HEAD_DIM, BLOCK_D, True)
    lse2, delta = _load_row_stats(LSE, DELTA, row_base + offs_m, offs_m, Nq)
    qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
    p_t = tl.math.exp2(qk_t * qk_scale - lse2[None, :])
    if MASKED:
        if start_m < diag_end:  # only query blocks on the diagonal pay for the mask
            p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + causal_offset, p_t, 0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, KV_LENS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, group, Nq, Nk, causal_offset, sm_scale, qk_scale,
    tune_nq, tune_nk,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_KV_LENS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_len = _kv_len(KV_LENS, b, Nk, HAS_KV_LENS)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if start_n < kv_len:
        k = _load_tile(K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh, offs_n, kv_len, stride_kn,
                       offs_d, stride_kd, HEAD_DIM, BLOCK_D, True)
        v = _load_tile(V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh, offs_n, kv_len, stride_vn,
                       offs_d, stride_vd, HEAD_DIM, BLOCK_D, True)
        # Query rows [lo, full_start) see part of this key block (diagonal: masked); rows from
        # full_start on see all of it. Rows before lo see none of it and are skipped.
        lo = 0
        full_start = 0
        if CAUSAL:
            lo = (tl.maximum(start_n - causal_offset, 0) // BLOCK_M) * BLOCK_M
            full_start = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - causal_offset, 0), BLOCK_M) * BLOCK_M
        diag_end = tl.minimum(full_start, Nq)
        for g in range(0, group):
            # Every query head of the group, summed here: no atomics, one owner per dK/dV tile.
            h = hk * group + g
            q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
            do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
            row_base = (b * H + h).to(tl.int64) * Nq
            # One loop (two would each keep a software pipeline's buffers live: spills at head dim 128).
            for start_m in range(lo, Nq, BLOCK_M):
                dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, LSE, DELTA, row_base, start_m, diag_end,
                                    offs_n, offs_d, Nq, causal_offset, qk_scale,
                                    stride_qm, stride_qd, stride_dom, stride_dod,
                                    HEAD_DIM, BLOCK_D, BLOCK_M, CAUSAL, DOT_PRECISION)
    # Keys past kv_len are masked out of every row: their gradients are exactly zero.
    key_visible = (offs_n < kv_len)[:, None]
    dk = tl.where(key_visible, dk * sm_scale, 0.0)
    dv = tl.where(key_visible, dv, 0.0)
    _store_tile(DK + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh, dk.to(DK.dtype.element_ty),
                offs_n, Nk, stride_dkn, offs_d, stride_dkd, HEAD_DIM, BLOCK_D)
    _store_tile(DV + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh, dv.to(DV.dtype.element_ty),
                offs_n, Nk, stride_dvn, offs_d, stride_dvd, HEAD_DIM, BLOCK_D)


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, k_base, v_base, start_n, offs_m, offs_n, offs_d,
             kv_len, causal_offset, qk_scale,
             stride_kn, stride_kd, stride_vn, stride_vd,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
             DOT_PRECISION: tl.constexpr):
    cols = start_n + offs_n
    k = _load_tile(k_base, cols, kv_len, stride_kn, offs_d, stride_kd, HEAD_DIM, BLOCK_D, MASKED)
    v = _load_tile(v_base, cols, kv_len, stride_vn, offs_d, stride_vd, HEAD_DIM, BLOCK_D, MASKED)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    p = tl.math.exp2(qk * qk_scale - lse2[:, None])
    if MASKED:
        visible = cols[None, :] < kv_len
        if CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None] + causal_offset)
        p = tl.where(visible, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KV_LENS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, group, Nq, Nk, causal_offset, sm_scale, qk_scale,
    tune_nq, tune_nk,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_KV_LENS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1)
    b = tl.program_id(2)
    hk = h // group
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_len = _kv_len(KV_LENS, b, Nk, HAS_KV_LENS)

    q = _load_tile(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh, offs_m, Nq, stride_qm,
                   offs_d, stride_qd, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh, offs_m, Nq, stride_dom,
                    offs_d, stride_dod, HEAD_DIM, BLOCK_D, True)
    lse2, delta = _load_row_stats(LSE, DELTA, (b * H + h).to(tl.int64) * Nq + offs_m, offs_m, Nq)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    full_end, end = _key_range(start_m, Nq, kv_len, causal_offset, CAUSAL, BLOCK_M, BLOCK_N)
    for start_n in range(0, full_end, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, start_n, offs_m, offs_n, offs_d,
                      kv_len, causal_offset, qk_scale, stride_kn, stride_kd, stride_vn, stride_vd,
                      HEAD_DIM, BLOCK_D, False, CAUSAL, DOT_PRECISION)
    for start_n in range(full_end, end, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, start_n, offs_m, offs_n, offs_d,
                      kv_len, causal_offset, qk_scale, stride_kn, stride_kd, stride_vn, stride_vd,
                      HEAD_DIM, BLOCK_D, True, CAUSAL, DOT_PRECISION)
    _store_tile(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh, (dq * sm_scale).to(DQ.dtype.element_ty),
                offs_m, Nq, stride_dqm, offs_d, stride_dqd, HEAD_DIM, BLOCK_D)


# ----------------------------------------------------------------------------- launch configurations


@dataclass(frozen=True)
class TileConfig:
    """BLOCK_M (query rows) x BLOCK_N (keys) per program step, and the launch options.

    ``warp_specialize`` (TMA forward only): the key loop is split by the compiler into
    a TMA producer warp and a wgmma consumer warpgroup with rebalanced registers.
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    warp_specialize: bool = False


# Under the interpreter: one configuration, rectangular like the GPU's so the
# block-range arithmetic is exercised with BLOCK_M != BLOCK_N.
_INTERPRET = {
    "fwd": TileConfig(64, 32, 4, 1),
    "fwd_tma": TileConfig(64, 32, 4, 1),
    "dkdv": TileConfig(32, 64, 4, 1),  # 64 keys per program, 32 queries per step
    "dq": TileConfig(64, 32, 4, 1),
}

# GPU candidates for the autotuner, per GPU family, kernel and padded head dim, for
# fp16/bf16 operands. "sm90" (Hopper and newer) runs warpgroup MMA (HGMMA) with
# operands in shared memory; "sm80" (Ampere, Ada) runs mma.sync with operands in
# registers, so its large tiles spill and are left out. Every entry is compiled by
# compile_specs() for its family's target, and none spills there.
_GPU_CONFIGS_16BIT = {
    "sm90": {
        "fwd": {
            64: [TileConfig(128, 64, 8, 3), TileConfig(128, 128, 8, 3), TileConfig(64, 64, 4, 3)],
            128: [TileConfig(128, 64, 8, 3), TileConfig(128, 64, 8, 2), TileConfig(128, 128, 8, 2),
                  TileConfig(64, 64, 4, 3)],
            256: [TileConfig(64, 64, 8, 2), TileConfig(128, 32, 8, 2), TileConfig(64, 32, 4, 2)],
        },
        # The TMA forward (inputs that qualify, see _tma_qualifies). Warp-specialized configs
        # keep BLOCK_M=64 with 4 warps (one consumer warpgroup): Triton 3.8's pass fails to
        # split a 128-row Q tile between two consumers ("descriptor block and tensor must
        # have the same number of elements") and leaves 8-warp loops unspecialized.
        "fwd_tma": {
            64: [TileConfig(128, 64, 8, 3), TileConfig(128, 128, 8, 3), TileConfig(64, 64, 4, 3, True),
                 TileConfig(64, 128, 4, 3, True), TileConfig(64, 64, 4, 3)],
            128: [TileConfig(128, 64, 8, 3), TileConfig(128, 64, 8, 2), TileConfig(128, 128, 8, 2),
                  TileConfig(64, 64, 4, 2, True), TileConfig(64, 128, 4, 2, True), TileConfig(64, 64, 4, 3)],
            256: [TileConfig(64, 64, 8, 2), TileConfig(128, 32, 8, 2), TileConfig(64, 32, 4, 2),
                  TileConfig(64, 32, 4, 2, True)],
        },
        # dK/dV keeps k, v and two fp32 accumulators of BLOCK_N keys live: few queries per step.
        # At head dim 128 no BLOCK_M=16 (64x16 wgmma, bound by shared memory) and nothing
        # that spills: (64, 128, 8w) and (64, 64, 4w) do, causal. Head dim 256 with 64 keys
        # is on wgmma (32 keys compiled to mma.sync); only 16 queries per step fit there.
        "dkdv": {
            64: [TileConfig(32, 128, 8, 3), TileConfig(64, 64, 8, 3), TileConfig(32, 64, 4, 3)],
            128: [TileConfig(32, 128, 8, 2), TileConfig(64, 64, 8, 2)],
            256: [TileConfig(16, 64, 8, 2)],
        },
        "dq": {
            64: [TileConfig(128, 32, 8, 3), TileConfig(128, 64, 8, 3), TileConfig(64, 64, 4, 3)],
            128: [TileConfig(128, 32, 8, 2), TileConfig(128, 64, 8, 2), TileConfig(64, 64, 4, 2)],
            256: [TileConfig(128, 32, 8, 2), TileConfig(64, 32, 8, 2)],
        },
    },
    "sm80": {
        "fwd": {
            64: [TileConfig(128, 64, 8, 3), TileConfig(64, 64, 4, 3)],
            128: [TileConfig(128, 64, 8, 3), TileConfig(128, 64, 8, 2)],
            256: [TileConfig(64, 64, 8, 2)],
        },
        "dkdv": {
            64: [TileConfig(32, 128, 8, 3)],
            128: [TileConfig(32, 64, 8, 2)],  # (16, 128, 8w) spills on mma.sync since dK/dV runs one loop
            256: [TileConfig(16, 32, 8, 2), TileConfig(32, 32, 8, 2)],
        },
        "dq": {
            64: [TileConfig(128, 32, 8, 3), TileConfig(128, 64, 8, 3), TileConfig(64, 64, 4, 3)],
            128: [TileConfig(128, 32, 8, 2), TileConfig(64, 64, 4, 2)],
            256: [TileConfig(64, 32, 8, 2)],
        },
    },
}
# fp32 operands use exact (IEEE) dots on CUDA cores, the same on every family: a
# correctness path (training runs bf16), small tiles. Triton's FMA dot keeps whole
# operand rows in registers, so from head dim 128 even these spill a little; the
# compile check reports fp32 specs as not hot.
_GPU_CONFIGS_FP32 = {
    "fwd": {64: [TileConfig(32, 32, 4, 2)], 128: [TileConfig(32, 32, 8, 1)], 256: [TileConfig(16, 32, 8, 1)]},
    "dkdv": {64: [TileConfig(16, 32, 4, 2)], 128: [TileConfig(16, 32, 8, 1)], 256: [TileConfig(16, 32, 8, 1)]},
    "dq": {64: [TileConfig(32, 32, 4, 2)], 128: [TileConfig(32, 32, 8, 1)], 256: [TileConfig(16, 32, 8, 1)]},
}
_PREPROCESS_BLOCK_M = 64
_KERNELS = {"fwd": _attn_fwd_kernel, "fwd_tma": _attn_fwd_tma_kernel, "dkdv": _attn_bwd_dkdv_kernel,
            "dq": _attn_bwd_dq_kernel}


def _block_d(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


GPU_FAMILIES = {"sm90": 90, "sm80": 80}  # family -> the compute capability compile_specs() builds for


def gpu_family(device: torch.device) -> str:
    return "sm90" if torch.cuda.get_device_capability(device)[0] >= 9 else "sm80"


def gpu_configs(kind: str, block_d: int, dtype: torch.dtype, family: str = "sm90") -> list[TileConfig]:
    """The autotuner's candidates for one kernel ('fwd', 'fwd_tma', 'dkdv', 'dq') at a padded head dim.

    Empty where the kernel never runs: 'fwd_tma' on sm80 and in fp32.
    """
    table = _GPU_CONFIGS_FP32 if dtype == torch.float32 else _GPU_CONFIGS_16BIT[family]
    configs = table.get(kind, {}).get(max(64, block_d), [])
    return [c for c in configs if HAS_WARP_SPECIALIZE or not c.warp_specialize]


def _tma_qualifies(*tensors: torch.Tensor) -> bool:
    """Whether (B, H, N, D) tensors can be read by TMA: what a tensor descriptor needs.

    16-bit dtypes (fp32 runs exact dots on CUDA cores, where TMA buys nothing), a
    contiguous last dimension, 16-byte aligned base and strides (no stride-0
    broadcasts), and on a GPU compute capability 9.0+ (the interpreter runs it
    anywhere). The others take the pointer kernel: same results.
    """
    if TensorDescriptor is None:
        return False
    for t in tensors:
        size = t.element_size()
        if (t.dtype not in (torch.float16, torch.bfloat16) or t.stride(-1) != 1 or t.data_ptr() % 16
                or any(st <= 0 or st * size % 16 for st in t.stride()[:-1]) or 0 in t.shape):
            return False
    device = tensors[0].device
    return device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9


def _descriptor(t: torch.Tensor, rows: int, block_d: int) -> TensorDescriptor:
    # Whole (B, H, N, D) tensor: TMA zero-fills rows past N and columns past D per head.
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, block_d])


def _set_block_shapes(nargs: dict) -> None:
    """Autotuner pre-hook: each configuration's tile shape into the TMA descriptors."""
    for name, rows in (("desc_q", "BLOCK_M"), ("desc_o", "BLOCK_M"), ("desc_k", "BLOCK_N"), ("desc_v", "BLOCK_N")):
        nargs[name].block_shape = [1, 1, nargs[rows], nargs["BLOCK_D"]]


def _seq_bucket(n: int) -> int:
    # Autotune once per power-of-two range of lengths, not per length (KV-cache decoding grows by one).
    return min(next_power_of_2(max(n, 1)), 1 << 16)


@functools.lru_cache(maxsize=None)
def _autotuned(kind: str, block_d: int, dtype: torch.dtype, family: str):
    configs = [
        triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n, **_ws_kwarg(kind, c)}, num_warps=c.num_warps,
                      num_stages=c.num_stages, pre_hook=_set_block_shapes if kind == "fwd_tma" else None)
        for c in gpu_configs(kind, block_d, dtype, family)
    ]
    return triton.autotune(configs=configs, key=["HEAD_DIM", "CAUSAL", "HAS_KV_LENS", "tune_nq", "tune_nk"])(
        _KERNELS[kind]
    )


def _ws_kwarg(kind: str, c: TileConfig) -> dict:
    return {"WARP_SPECIALIZE": c.warp_specialize} if kind == "fwd_tma" else {}


def _launch(kind: str, grid_rows: int, heads: int, batch: int, args: tuple, consts: dict, device: torch.device):
    """Run kernel ``kind`` over a (row blocks, heads, batch) grid: autotuned on GPU, fixed on the interpreter."""
    if device.type == "cuda":
        kernel = launch(_autotuned(kind, consts["BLOCK_D"], consts["_dtype"], gpu_family(device)))
        consts = {k: v for k, v in consts.items() if not k.startswith("_")}
        block = "BLOCK_N" if kind == "dkdv" else "BLOCK_M"
        kernel[lambda meta: (cdiv(grid_rows, meta[block]), heads, batch)](*args, **consts)
    else:
        c = _INTERPRET[kind]
        consts = {k: v for k, v in consts.items() if not k.startswith("_")} | _ws_kwarg(kind, c)
        if kind == "fwd_tma":
            _set_block_shapes({**dict(zip(_attn_fwd_tma_kernel.arg_names, args)), **consts,
                               "BLOCK_M": c.block_m, "BLOCK_N": c.block_n})
        rows_per_program = c.block_n if kind == "dkdv" else c.block_m
        launch(_KERNELS[kind])[(cdiv(grid_rows, rows_per_program), heads, batch)](
            *args, **consts, BLOCK_M=c.block_m, BLOCK_N=c.block_n, num_warps=c.num_warps, num_stages=c.num_stages
        )


def _common_consts(q: torch.Tensor, causal_offset: int | None, kv_lens: torch.Tensor | None) -> dict:
    return {
        "HEAD_DIM": q.shape[-1],
        "BLOCK_D": _block_d(q.shape[-1]),
        "CAUSAL": causal_offset is not None,
        "HAS_KV_LENS": kv_lens is not None,
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
        "_dtype": q.dtype,
    }


def _attention_forward(q, k, v, scale, causal_offset, kv_lens):
    """Launch the forward. Returns ``o`` (contiguous, q's dtype) and ``lse`` (B, H, Nq) fp32."""
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    o = torch.empty((B, H, Nq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    consts = _common_consts(q, causal_offset, kv_lens)
    if _tma_qualifies(q, k, v, o):
        block_d = consts["BLOCK_D"]  # the row counts are placeholders until the tile is chosen
        args = (
            _descriptor(q, 16, block_d), _descriptor(k, 16, block_d), _descriptor(v, 16, block_d),
            _descriptor(o, 16, block_d), lse, kv_lens if kv_lens is not None else lse,
            H, H // Hkv, Nq, Nk, causal_offset or 0, scale * LOG2E, _seq_bucket(Nq), _seq_bucket(Nk),
        )
        _launch("fwd_tma", Nq, H, B, args, consts, q.device)
        return o, lse
    args = (
        q, k, v, o, lse, kv_lens if kv_lens is not None else lse,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        H, H // Hkv, Nq, Nk, causal_offset or 0, scale * LOG2E, _seq_bucket(Nq), _seq_bucket(Nk),
    )
    _launch("fwd", Nq, H, B, args, consts, q.device)
    return o, lse


def _attention_backward(do, q, k, v, o, lse, dlse, scale, causal_offset, kv_lens):
    """Launch the backward. Returns dq, dk, dv in the inputs' dtype."""
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if dq.numel() == 0 or dk.numel() == 0:  # no queries, or no keys (every row empty)
        return dq.zero_(), dk.zero_(), dv.zero_()
    block_d = _block_d(D)
    delta = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    launch(_attn_bwd_preprocess_kernel)[(cdiv(Nq, _PREPROCESS_BLOCK_M), H, B)](
        o, do, dlse if dlse is not None else delta, delta, *o.stride(), *do.stride(), Nq,
        HEAD_DIM=D, BLOCK_D=block_d, HAS_DLSE=dlse is not None, BLOCK_M=_PREPROCESS_BLOCK_M,
        num_warps=4 if block_d <= 128 else 8,
    )
    consts = _common_consts(q, causal_offset, kv_lens)
    shared = (H, H // Hkv, Nq, Nk, causal_offset or 0, scale, scale * LOG2E, _seq_bucket(Nq), _seq_bucket(Nk))
    kv_lens_arg = kv_lens if kv_lens is not None else lse
    _launch("dkdv", Nk, Hkv, B, (
        q, k, v, do, lse, delta, dk, dv, kv_lens_arg,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), *shared,
    ), consts, q.device)
    _launch("dq", Nq, H, B, (
        q, k, v, do, lse, delta, dq, kv_lens_arg,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), *shared,
    ), consts, q.device)
    return dq, dk, dv


_POINTERS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
_FP32_POINTERS = {"LSE", "DELTA", "DLSE"}


def _signature(kernel, ptr: str, consts: dict) -> dict[str, str]:
    """``triton.compile``'s signature for one of the kernels above, in argument order."""
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.startswith("desc_"):  # (B, H, N, D) descriptors of one (rows, BLOCK_D) tile
            rows = consts["BLOCK_N"] if name in ("desc_k", "desc_v") else consts["BLOCK_M"]
            sig[name] = f"tensordesc<{ptr[1:]}[1, 1, {rows}, {consts['BLOCK_D']}]>"
        elif name in _POINTERS:
            sig[name] = ptr
        elif name in _FP32_POINTERS:
            sig[name] = "*fp32"
        elif name == "KV_LENS":
            sig[name] = "*i32"
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _divisible_by_16(sig: dict[str, str], head_dim: int) -> tuple[str, ...]:
    """Arguments the launcher marks divisible by 16 for aligned tensors laid out (B, H, N, head_dim) contiguously."""
    return tuple(name for name, ty in sig.items()
                 if ty.startswith("*") or (name.startswith("stride_") and ty == "i32" and head_dim % 16 == 0))


def compile_specs() -> list[KernelSpec]:
    """Every configuration the launchers can pick (all autotune candidates), for the static compile check.

    Strides along the head dim are constexpr 1, as Triton specializes them at
    launch when the last dimension is contiguous (the common case). ``extra
    ["divisible_by_16"]`` names the arguments Triton's launcher then also marks
    ``tt.divisibility=16`` (16-byte-aligned pointers; the other strides when the
    head dim is a multiple of 16): pass them as ``ASTSource(attrs=...)`` to
    compile the vectorized kernel that actually runs; without them the compiler
    sees scalar loads, more registers and spills that the launched kernel lacks.
    ``extra["targets"]`` lists the compute capabilities whose autotuner can pick
    the configuration (Hopper-only tiles are never launched on sm_80).
    """
    specs = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        ptr = "*" + TRITON_DTYPE[dtype]
        for head_dim in (16, 32, 40, 64, 80, 96, 128, 256):
            block_d = _block_d(head_dim)
            for kind, kernel in _KERNELS.items():
                # Each configuration once, with the targets of the families that can pick it.
                targets: dict[TileConfig, list[int]] = {}
                for family, cc in GPU_FAMILIES.items():
                    for cfg in gpu_configs(kind, block_d, dtype, family):
                        targets.setdefault(cfg, []).append(cc)
                for causal in (False, True):
                    for cfg, ccs in targets.items():
                        c = {name: 1 for name in kernel.arg_names if name.startswith("stride_") and name.endswith("d")}
                        c |= {"HEAD_DIM": head_dim, "BLOCK_D": block_d, "CAUSAL": causal, "HAS_KV_LENS": False,
                              "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
                              "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, **_ws_kwarg(kind, cfg)}
                        sig = _signature(kernel, ptr, c)
                        specs.append(KernelSpec(
                            kernel, sig, c, cfg.num_warps, cfg.num_stages, hot=dtype != torch.float32,
                            label=f"{kind} D={head_dim} {'causal' if causal else 'full'} {dtype}",
                            extra={"divisible_by_16": _divisible_by_16(sig, head_dim), "targets": tuple(ccs),
                                   "quick": head_dim in (64, 128)},
                        ))
            c = {"stride_od": 1, "stride_dod": 1, "HEAD_DIM": head_dim, "BLOCK_D": block_d, "HAS_DLSE": False,
                 "BLOCK_M": _PREPROCESS_BLOCK_M}
            sig = _signature(_attn_bwd_preprocess_kernel, ptr, c)
            specs.append(KernelSpec(
                _attn_bwd_preprocess_kernel, sig, c, 4 if block_d <= 128 else 8, 1, hot=False,
                label=f"preprocess D={head_dim} {dtype}", extra={"divisible_by_16": _divisible_by_16(sig, head_dim)},
            ))
    return specs


# ----------------------------------------------------------------------------- ops

# fastlm::attention returns (out, lse); fastlm::attention_backward consumes them (design
# in kernels._library). Off the Triton backend both run a PyTorch twin of the kernels' math.


def _attention_backward_reference(do, q, k, v, o, lse, dlse, scale, causal_offset, kv_lens):
    """The backward kernels' math (module docstring) in fp32 PyTorch: dq, dk, dv."""
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    group = H // Hkv
    keys = torch.arange(Nk, device=q.device)
    real = torch.ones((B, Nk), dtype=torch.bool, device=q.device)
    if kv_lens is not None:
        real = keys[None, :] < kv_lens.view(-1, 1)
    qf, dof, of = q.float(), do.float(), o.float()
    kf = torch.where(real[:, None, :, None], k.float(), 0.0).repeat_interleave(group, dim=1)
    vf = torch.where(real[:, None, :, None], v.float(), 0.0).repeat_interleave(group, dim=1)
    visible = real[:, None, None, :]
    if causal_offset is not None:
        visible = visible & (keys[None, :] <= torch.arange(Nq, device=q.device)[:, None] + causal_offset)
    has_key = torch.isfinite(lse)[..., None]
    p = torch.exp(qf @ kf.transpose(-1, -2) * scale - torch.where(has_key, lse[..., None], 0.0))
    p = torch.where(visible & has_key, p, 0.0)
    delta = (dof * of).sum(-1)
    if dlse is not None:
        delta = delta - dlse
    ds = p * (dof @ vf.transpose(-1, -2) - delta[..., None])
    dq = ds @ kf * scale
    dk = (ds.transpose(-1, -2) @ qf * scale).view(B, Hkv, group, Nk, D).sum(2)
    dv = (p.transpose(-1, -2) @ dof).view(B, Hkv, group, Nk, D).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _attention_op(q, k, v, kv_lens, scale, causal_offset):
    if use_triton(q.device):
        return _attention_forward(q, k, v, scale, causal_offset, kv_lens)
    out, lse = masked_attention(q, k, v, scale, causal_offset, kv_lens)
    return out.contiguous(), lse.float()


def _attention_backward_op(grad_out, grad_lse, q, k, v, out, lse, kv_lens, scale, causal_offset):
    if use_triton(q.device):
        if grad_lse is not None:
            grad_lse = grad_lse.contiguous()  # e.g. lse.sum() hands back an expanded, stride-0 gradient
        return _attention_backward(grad_out, q, k, v, out, lse, grad_lse, scale, causal_offset, kv_lens)
    return _attention_backward_reference(grad_out, q, k, v, out, lse, grad_lse, scale, causal_offset, kv_lens)


_ARGS = "Tensor q, Tensor k, Tensor v, Tensor? kv_lens, float scale, SymInt? causal_offset"
attention_op = define_op("attention", _attention_op, f"({_ARGS}) -> (Tensor, Tensor)")
attention_backward_op = define_op(
    "attention_backward", _attention_backward_op,
    "(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? kv_lens, "
    "float scale, SymInt? causal_offset) -> (Tensor, Tensor, Tensor)",
)


def _setup_attention(ctx, inputs, output):
    q, k, v, kv_lens, scale, causal_offset = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], kv_lens)
    ctx.scale, ctx.causal_offset = scale, causal_offset
    ctx.set_materialize_grads(False)  # an unused lse (the usual case) hands back None, not zeros


@first_order_only(triton_only_first_order("attention"))
def _attention_grads(ctx, do, dlse):
    q, k, v, o, lse, kv_lens = ctx.saved_tensors
    if do is None:  # only the lse was used
        do = torch.zeros_like(o)
    dq, dk, dv = attention_backward_op(do, dlse, q, k, v, o, lse, kv_lens, ctx.scale, ctx.causal_offset)
    return dq, dk, dv, None, None, None


attention_op.register_autograd(_attention_grads, setup_context=_setup_attention)
# No register_autocast: like SDPA the op runs in autocast's own dtype, which a fixed cast rule
# cannot name; the public functions cast (autocast_inputs) before calling it.


# ----------------------------------------------------------------------------- public API


def _check(q, k, v, kv_lens, scale, names=("q", "k", "v")) -> float:
    """Validate the inputs (errors name the argument); returns the softmax scale."""
    qn, kn, vn = names
    for name, t in zip(names, (q, k, v)):
        check_float(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
    check_same_device(**{qn: q, kn: k, vn: v})
    check_same_dtype(**{qn: q, kn: k, vn: v})
    B, H, _, D = q.shape
    for name, t in ((kn, k), (vn, v)):
        if t.shape[0] != B:
            raise ValueError(f"{name} has batch size {t.shape[0]} but {qn} has {B}")
        if t.shape[3] != D:
            raise ValueError(f"{name} has head dim {t.shape[3]} but {qn} has {D}")
    if v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]:
        raise ValueError(f"{vn} must have the heads and sequence length of {kn} {tuple(k.shape[1:3])}, "
                         f"got {tuple(v.shape[1:3])}")
    if k.shape[1] == 0 or H % k.shape[1] != 0:
        raise ValueError(f"{qn} heads ({H}) must be a multiple of {kn}/{vn} heads ({k.shape[1]})")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim of {qn} must be between 1 and {MAX_HEAD_DIM}, got {D}")
    if kv_lens is not None:
        check_integer("kv_lens", kv_lens)
        check_same_device(**{qn: q, "kv_lens": kv_lens})
        if tuple(kv_lens.shape) != (B,):
            raise ValueError(f"kv_lens must have shape (batch,) = ({B},), got {tuple(kv_lens.shape)}")
        # One host sync, skipped under kernels.unchecked() and torch.compile (the kernels clamp
        # kv_lens to [0, Nk], so an unchecked bad length never reads out of bounds).
        if B and check_values() and bool(((kv_lens < 0) | (kv_lens > k.shape[2])).any()):
            raise ValueError(f"kv_lens must lie in [0, {k.shape[2]}] (the key length), "
                             f"got {kv_lens.min().item()}..{kv_lens.max().item()}")
    if scale is None:
        return D ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0 or not math.isfinite(scale):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    return float(scale)


def _autocast(q, k, v):
    """SDPA's autocast rule: q, k, v in the autocast dtype (lower precision), the output in it too."""
    if isinstance(q, torch.Tensor):
        return autocast_inputs(autocast_dtype(q.device), q, k, v)
    return q, k, v


def _kv_lens_int32(kv_lens: torch.Tensor | None) -> torch.Tensor | None:
    return None if kv_lens is None else kv_lens.to(torch.int32).contiguous()


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    kv_lens: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused attention over (batch, heads, seq, head_dim) tensors of any strides.

    - ``k``/``v`` may have fewer heads than ``q`` (grouped-query / multi-query
      attention): query head h reads kv head ``h // (q_heads // kv_heads)``, in place.
    - ``causal=True`` aligns the mask bottom-right, as FlashAttention: query i sees
      key j when ``j <= i + Nk - Nq``. It equals torch SDPA's ``is_causal`` when
      Nq == Nk; for torch's top-left alignment with Nq != Nk use
      :func:`scaled_dot_product_attention`. When Nq > Nk the first Nq - Nk rows see
      no key.
    - ``kv_lens`` (batch,) integer: keys ``j >= kv_lens[b]`` are masked (right
      padding). It does not move the causal diagonal, which uses the full lengths.
    - A row with no visible key returns zeros, zero gradients and ``lse = -inf``.
    - ``scale`` defaults to ``head_dim ** -0.5``.
    - ``return_lse=True`` also returns the natural-log log-sum-exp of the scaled,
      masked scores, (batch, heads, Nq) fp32; it is differentiable.

    Head dims up to 256 (any, padded to a power of two inside the kernel); fp16,
    bf16 and fp32 (fp32 runs exact fp32 dots, not TF32). The backward is
    deterministic, and first-order only (``create_graph=True`` raises; the
    reference backend supports it). A ``kv_lens`` tensor costs one host sync for its range check,
    skipped inside :func:`kernels.unchecked` and under ``torch.compile``.
    Under autocast, as torch's SDPA: q, k and v run in the autocast dtype.
    """
    if kv_lens is not None:
        kv_lens = as_int64("kv_lens", kv_lens)  # compared and masked in int64 whatever its dtype
    q, k, v = _autocast(q, k, v)
    scale = _check(q, k, v, kv_lens, scale)
    causal_offset = k.shape[2] - q.shape[2] if causal else None
    if not use_triton(q.device):
        return reference.attention(q, k, v, causal=causal, scale=scale, kv_lens=kv_lens, return_lse=return_lse)
    out, lse = attention_op(q, k, v, _kv_lens_int32(kv_lens), scale, causal_offset)
    return (out, lse) if return_lse else out


_warned: set[str] = set()


def _fallback_reason(query, key, value, attn_mask, dropout_p, scale, enable_gqa) -> str | None:
    """Why the kernel cannot run this SDPA call (torch's function then runs), or None."""
    if attn_mask is not None:
        return "an explicit attn_mask"
    if dropout_p != 0.0:
        return "dropout_p > 0"
    tensors = (query, key, value)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return "non-tensor inputs"
    if not all(t.dim() == 4 for t in tensors):
        return "inputs that are not 4-D (batch, heads, seq, head_dim)"
    if value.shape[-1] != query.shape[-1]:
        return "a value head dim different from the query's"
    if not enable_gqa and key.shape[1] != query.shape[1]:
        return "different query and key heads without enable_gqa=True"
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        return "a non-positive scale"
    if query.shape[-1] > MAX_HEAD_DIM:
        return f"head dim above {MAX_HEAD_DIM}"
    return None


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Drop-in for :func:`torch.nn.functional.scaled_dot_product_attention` on 4-D inputs.

    torch's semantics, including its top-left causal alignment when the query
    and key lengths differ (query i sees keys j <= i). What the kernel does not
    cover (an explicit ``attn_mask``, dropout, 3-D or 5-D inputs, a value head
    dim different from the query's, head dims over 256) runs torch's own function,
    with a warning the first time each reason occurs.
    """
    reason = _fallback_reason(query, key, value, attn_mask, dropout_p, scale, enable_gqa)
    if reason is not None:
        if reason not in _warned:
            _warned.add(reason)
            warnings.warn(f"kernels.scaled_dot_product_attention: {reason} is not supported by the fused kernel; "
                          f"running torch's scaled_dot_product_attention", stacklevel=2)
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa,
        )
    query, key, value = _autocast(query, key, value)
    scale = _check(query, key, value, None, scale, names=("query", "key", "value"))
    if not use_triton(query.device):
        return reference.scaled_dot_product_attention(query, key, value, is_causal=is_causal, scale=scale,
                                                      enable_gqa=enable_gqa)
    # Top-left alignment is causal offset 0: the same kernels as attention(causal=True).
    return attention_op(query, key, value, None, scale, 0 if is_causal else None)[0]
