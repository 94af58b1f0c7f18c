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

Masking: query i sees key j when ``j <= i + causal_offset`` (CAUSAL: causal, or a
right window), ``j >= i + window_offset`` (WINDOW: a left window) and ``j < kv_len``
(``kv_lens``). ``kernels.attention`` aligns causal and windows bottom-right (offset
Nk - Nq, as FlashAttention), ``scaled_dot_product_attention`` top-left (offset 0, as
torch): one code path. A row with no visible key gets output 0, gradient 0 and
``lse = -inf``.

Packed sequences (``varlen_attention``, VARLEN) run the same kernels: each program
reads its sequence's start and length from ``cu_seqlens``, clamped into the packed
rows (:func:`_sequence`, :func:`_packed_span`: unchecked values never address outside
them), the batch stride is 0 and the offsets are shifted by ``len_k - len_q`` per
sequence; the grid covers the longest sequence and the programs past a shorter one
return.
SOFTCAP replaces the scores by ``tanh(S / softcap)`` with ``softcap`` folded into the
exp2 scale (dS picks up ``1 - tanh^2``); HAS_SINKS adds ``exp(sink)`` to each row's
denominator after the key loop, and the dQ kernel forms dsinks. Each feature is a
constexpr, so the plain kernels compile as they did without them.

Forward: one program per block of BLOCK_M query rows, streaming key blocks with
an online softmax in the exp2 domain (``scale * log2(e)`` folded into one FMA)
and fp32 accumulators. Key blocks past the causal diagonal are never visited;
blocks fully visible to every row run without a mask, and only the diagonal
blocks (and the last, partial one) apply it. On sm_90+, inputs TMA can read
(``_tma_qualifies``) run ``_attn_fwd_tma_kernel``: tensor descriptors, one key
loop, and warp-specialized autotune candidates; the rest, and sm_80, the pointer
kernel. Opted in (``FASTLM_ATTENTION=gluon``, :mod:`kernels._backend`), the plain
dense calls on Hopper run the experimental Gluon forward instead
(:mod:`kernels._attention_gluon`), which writes the same ``o`` and ``lse``.

Backward, deterministic (no atomics): a preprocess kernel forms ``delta``; one
kernel per block of keys accumulates dK and dV over all query blocks and, for
GQA, over all the query heads sharing that kv head, so a shared head's gradient
is summed inside one program; a separate kernel per block of queries forms dQ,
on sm_90+ for inputs TMA can read ``_attn_bwd_dq_tma_kernel`` (tensor descriptors,
one key loop, as the TMA forward), otherwise the pointer kernel.

Batch and head offsets are int64, offsets inside a head int32: the launchers run tensors whose
rows would pass 2**31 - 1 elements there on head-major copies (:func:`_int32_rows`). A batch
past the grid's 65535 launches in runs (:func:`_batch_runs`). On a GPU
the block shapes are autotuned per (head dim, causal, dtype, sequence-length bucket); under
the interpreter one small configuration runs.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from ._autograd import first_order_only, triton_only_first_order
from ._backend import requested_attention_forward, use_gluon_attention, use_triton
from ._library import autocast_dtype, autocast_inputs, check_values, define_op, launch, no_tensor, present
from ._triton_math import tanh as _tanh
from ._launch import TRITON_DTYPE, KernelSpec, cdiv, next_power_of_2
from ._validate import (FLOAT_DTYPES, as_int64, check_float, check_integer, check_same_device, check_same_dtype,
                        check_tensor)
from . import reference
from .reference.attention import (masked_attention, packed_positions, varlen_rule, varlen_visibility, visibility,
                                  window_bounds)

try:  # host-side TMA descriptors (triton >= 3.3); without them every GPU runs the pointer path
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton
    TensorDescriptor = None
try:  # the allocator a launch asks for the memory of descriptors made in a kernel (see _ensure_allocator)
    from triton.runtime._allocation import NullAllocator as _NullAllocator, _allocator as _current_allocator
except ImportError:  # pragma: no cover - another layout: always set ours
    _NullAllocator = _current_allocator = None
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
def _packed_span(CU, b, total, longest):
    """Sequence b's ``(start, length)`` from ``cu_seqlens``, clamped into the packed tensor's rows.

    Unchecked ``cu_seqlens`` (``kernels.unchecked()``, ``torch.compile``) may be negative, unsorted
    or past the total: the start is clamped into [0, total], the end into [start, total] and the
    length to ``longest`` (max_seqlen, the grid's extent and the int32 offset bound), so a
    malformed one gives an undefined result but every row read or written lies in [0, total).
    """
    start = tl.minimum(tl.maximum(tl.load(CU + b), 0), total)
    end = tl.minimum(tl.maximum(tl.load(CU + b + 1), start), total)
    return start, tl.minimum(end - start, longest)


@triton.jit
def _sequence(CU_Q, CU_K, KV_LENS, b, Nq, Nk, total_q, total_k, VARLEN: tl.constexpr, HAS_KV_LENS: tl.constexpr):
    """Batch b's ``(q_start, len_q, k_start, len_k, kv_len, shift)``.

    Dense: rows 0..Nq of batch b's own tensors, keys 0..Nk, of which ``kv_len`` are
    visible, shift 0 (the host's offsets already hold Nk - Nq); ``total_q``/``total_k``
    are unused. Packed: the rows ``cu_seqlens[b]..cu_seqlens[b + 1]`` of the
    ``total_q``/``total_k`` packed ones (:func:`_packed_span`), every key visible, and
    the diagonal shifted by ``len_k - len_q`` (bottom-right per sequence).
    """
    if VARLEN:  # one return: Triton types every return of a function alike
        first_q, len_q = _packed_span(CU_Q, b, total_q, Nq)
        first_k, len_k = _packed_span(CU_K, b, total_k, Nk)
        q_start = first_q.to(tl.int64)
        k_start = first_k.to(tl.int64)
        kv_len = len_k
        shift = len_k - len_q
    else:
        q_start = 0
        k_start = 0
        len_q = Nq
        len_k = Nk
        shift = 0
        if HAS_KV_LENS:
            kv_len = tl.minimum(tl.load(KV_LENS + b).to(tl.int32), Nk)
        else:
            kv_len = Nk
    return q_start, len_q, k_start, len_k, kv_len, shift


@triton.jit
def _key_range(start_m, Nq, kv_len, causal_offset, window_offset, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``(lo, full_lo, full_end, end)``: keys [full_lo, full_end) are visible to every row of the
    query block and run unmasked; [lo, full_lo) (the window's left edge) and [full_end, end)
    (the diagonal, the ragged end) need the mask. Keys outside [lo, end) are never visited."""
    end = kv_len
    full_end = kv_len
    if CAUSAL:
        # The last real row of the block sees keys < its index + 1 + offset; the first row, fewest.
        end = tl.minimum(end, tl.minimum(start_m + BLOCK_M, Nq) + causal_offset)
        full_end = tl.minimum(full_end, start_m + 1 + causal_offset)
    end = tl.maximum(end, 0)
    full_end = (tl.maximum(full_end, 0) // BLOCK_N) * BLOCK_N
    if WINDOW:
        # The first row sees keys from its index + window_offset on, the last row fewest.
        lo = (tl.maximum(start_m + window_offset, 0) // BLOCK_N) * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(tl.minimum(start_m + BLOCK_M, Nq) - 1 + window_offset, 0), BLOCK_N) * BLOCK_N
        full_lo = tl.maximum(tl.minimum(full_lo, end), lo)
        full_end = tl.maximum(full_end, full_lo)
        end = tl.maximum(end, full_end)
    else:
        lo = 0
        full_lo = 0
    return lo, full_lo, full_end, end


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
def _visible(cols, offs_m, kv_len, causal_offset, window_offset, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    # (rows, cols) of the keys each query row sees: below kv_len, at most the diagonal (+ the right
    # window), at least the window's left edge.
    visible = cols[None, :] < kv_len
    if CAUSAL:
        visible = visible & (cols[None, :] <= offs_m[:, None] + causal_offset)
    if WINDOW:
        visible = visible & (cols[None, :] >= offs_m[:, None] + window_offset)
    return visible


@triton.jit
def _mask_scores(qk, cols, offs_m, kv_len, causal_offset, window_offset, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    return tl.where(_visible(cols, offs_m, kv_len, causal_offset, window_offset, CAUSAL, WINDOW), qk, float("-inf"))


@triton.jit
def _scores(q, k, softcap_in, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """q k^T, or with SOFTCAP tanh(q k^T * scale / softcap) (the host folds softcap into qk_scale)."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if SOFTCAP:
        qk = _tanh(qk * softcap_in)
    return qk


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_n, offs_d,
              kv_len, causal_offset, window_offset, qk_scale, softcap_in,
              stride_kn, stride_kd, stride_vn, stride_vd,
              edge, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
              WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # MASKED: bounds-checked loads, and the score mask where ``edge`` (a constant, or the window loop's test).
    cols = start_n + offs_n
    k = _load_tile(k_base, cols, kv_len, stride_kn, offs_d, stride_kd, HEAD_DIM, BLOCK_D, MASKED)
    v = _load_tile(v_base, cols, kv_len, stride_vn, offs_d, stride_vd, HEAD_DIM, BLOCK_D, MASKED)
    qk = _scores(q, k, softcap_in, SOFTCAP, DOT_PRECISION)
    if MASKED:
        if edge:
            qk = _mask_scores(qk, cols, offs_m, kv_len, causal_offset, window_offset, CAUSAL, WINDOW)
    return _softmax_step(acc, l_i, m_i, qk, v, qk_scale, DOT_PRECISION)


@triton.jit
def _forward_program(group, CAUSAL: tl.constexpr):
    """This program's query block, query head, batch and kv head."""
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m  # longest rows first: a shorter tail
    h = tl.program_id(1)
    return pid_m, h, tl.program_id(2), h // group


@triton.jit
def _fwd_finish(acc, l_i, m_i, SINKS, h, HAS_SINKS: tl.constexpr):
    # Rows with no visible key: l = 0, acc = 0 -> output 0, lse = -inf (the sink joins only rows with a key).
    if HAS_SINKS:
        sink = tl.load(SINKS + h) * 1.4426950408889634  # one more logit, exp2 domain, whose value is zero
        m_new = tl.maximum(m_i, sink)
        alpha = tl.math.exp2(m_i - m_new)
        has_key = l_i > 0.0
        l_i = tl.where(has_key, l_i * alpha + tl.math.exp2(sink - m_new), 0.0)
        acc = acc * tl.where(has_key, alpha, 0.0)[:, None]
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)  # x ln 2
    return acc / l_safe[:, None], lse


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, KV_LENS, CU_Q, CU_K, SINKS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, total_q, total_k,
    H, group, Nq, Nk, causal_offset, window_offset, qk_scale, softcap_in,
    tune_nq, tune_nk,  # sequence-length buckets: only the autotuner's cache key reads them
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_KV_LENS: tl.constexpr,
    VARLEN: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m, h, b, hk = _forward_program(group, CAUSAL)
    q_start, Nq, k_start, Nk, kv_len, shift = _sequence(CU_Q, CU_K, KV_LENS, b, Nq, Nk, total_q, total_k, VARLEN,
                                                        HAS_KV_LENS)
    start_m = pid_m * BLOCK_M
    if VARLEN:
        if start_m >= Nq:  # the grid covers the longest sequence
            return
        causal_offset += shift
        window_offset += shift
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + q_start * stride_qm
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh + k_start * stride_kn
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh + k_start * stride_vn
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + q_start * stride_om
    lse_base = LSE + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q = _load_tile(q_base, offs_m, Nq, stride_qm, offs_d, stride_qd, HEAD_DIM, BLOCK_D, True)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo, full_lo, full_end, end = _key_range(start_m, Nq, kv_len, causal_offset, window_offset, CAUSAL, WINDOW,
                                            BLOCK_M, BLOCK_N)
    if WINDOW:
        # One loop over the window's keys, masking only its edge tiles: a third pipelined loop
        # would keep its own buffers live (registers spill at head dim 128).
        for start_n in range(lo, end, BLOCK_N):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_n, offs_d,
                                      kv_len, causal_offset, window_offset, qk_scale, softcap_in,
                                      stride_kn, stride_kd, stride_vn, stride_vd, (start_n < full_lo) | (start_n >= full_end),
                                      HEAD_DIM, BLOCK_D, True, CAUSAL, WINDOW, SOFTCAP, DOT_PRECISION)
    else:
        for start_n in range(0, full_end, BLOCK_N):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_n, offs_d,
                                      kv_len, causal_offset, window_offset, qk_scale, softcap_in,
                                      stride_kn, stride_kd, stride_vn, stride_vd, False,
                                      HEAD_DIM, BLOCK_D, False, CAUSAL, WINDOW, SOFTCAP, DOT_PRECISION)
        for start_n in range(full_end, end, BLOCK_N):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_n, offs_d,
                                      kv_len, causal_offset, window_offset, qk_scale, softcap_in,
                                      stride_kn, stride_kd, stride_vn, stride_vd, True,
                                      HEAD_DIM, BLOCK_D, True, CAUSAL, WINDOW, SOFTCAP, DOT_PRECISION)

    out, lse = _fwd_finish(acc, l_i, m_i, SINKS, h, HAS_SINKS)
    _store_tile(o_base, out.to(O.dtype.element_ty), offs_m, Nq, stride_om, offs_d, stride_od, HEAD_DIM, BLOCK_D)
    tl.store(lse_base + offs_m, lse, mask=offs_m < Nq)


@triton.jit
def _tma_program(KV_LENS, group, Nq, Nk, CAUSAL: tl.constexpr, HAS_KV_LENS: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """The start of the dense TMA kernels (forward and dQ): this program's query head, batch, kv head,
    first query row, the tile's query rows and key columns, and the batch's kv_len."""
    pid_m, h, b, hk = _forward_program(group, CAUSAL)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    _, _, _, _, kv_len, _ = _sequence(KV_LENS, KV_LENS, KV_LENS, b, Nq, Nk, Nq, Nk, False, HAS_KV_LENS)
    return h, b, hk, start_m, offs_m, offs_n, kv_len


@triton.jit
def _attn_fwd_tma_kernel(
    desc_q, desc_k, desc_v, desc_o, LSE, KV_LENS, SINKS, Q, O,
    stride_qb, stride_qh, stride_qm, stride_ob, stride_oh, stride_om,
    H, group, Nq, Nk, causal_offset, window_offset, qk_scale, softcap_in,
    tune_nq, tune_nk,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_KV_LENS: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    """The dense forward on Hopper: q, k, v, o move by TMA through (B, heads, seq, head_dim) tensor descriptors.

    The descriptors zero-fill rows past the sequence and columns past HEAD_DIM, so no
    tile needs a load mask. One key loop, in which only the boundary tiles (diagonal,
    ragged end, kv_len, the window's left edge) apply the score mask, or, with
    WARP_SPECIALIZE, every tile (branch-free, so the compiler splits the loop into a
    TMA producer warpgroup and two wgmma consumer warpgroups of BLOCK_M / 2 rows each, with
    rebalanced registers). ``Q``, ``O`` and their strides serve the descriptors that
    kernel makes itself (needs :func:`_ensure_allocator`).
    """
    h, b, hk, start_m, offs_m, offs_n, kv_len = _tma_program(KV_LENS, group, Nq, Nk, CAUSAL, HAS_KV_LENS,
                                                             BLOCK_M, BLOCK_N)

    # Triton's warp-specialization pass takes no branch inside its loop (3.8 leaves such a
    # loop unspecialized): there every tile runs the mask as arithmetic. It neither takes
    # the register round trip that zeroes padded values, so with kv_lens the loop is plain.
    SPECIALIZE: tl.constexpr = WARP_SPECIALIZE and not HAS_KV_LENS
    if SPECIALIZE:
        # The pass gives each consumer warpgroup 64 rows of the Q and O tiles, and so rewrites
        # their descriptors' block shape: only descriptors made here can be rewritten (a host
        # one fails, "descriptor block and tensor must have the same number of elements").
        q_rows = tl.make_tensor_descriptor(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh,
                                           [Nq, HEAD_DIM], [stride_qm, 1], [BLOCK_M, BLOCK_D])
        o_rows = tl.make_tensor_descriptor(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh,
                                           [Nq, HEAD_DIM], [stride_om, 1], [BLOCK_M, BLOCK_D])
        q = q_rows.load([start_m, 0])
    else:
        q = desc_q.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo, full_lo, full_end, end = _key_range(start_m, Nq, kv_len, causal_offset, window_offset, CAUSAL, WINDOW,
                                            BLOCK_M, BLOCK_N)
    if SPECIALIZE:
        # Masking every tile, fold the diagonal and kv_len into one end per row: one compare and
        # one select per score, not _visible's two of each (D=128 causal (64, 64, 4w): the consumer
        # loop 427 -> 379 instructions a tile, ISETP 49 -> 33, FSEL 66 -> 34; registers unchanged).
        row_end = tl.full([BLOCK_M], kv_len, tl.int32)
        if CAUSAL:
            row_end = tl.minimum(row_end, offs_m + causal_offset + 1)
    for start_n in tl.range(lo, end, BLOCK_N, warp_specialize=SPECIALIZE):
        k = desc_k.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        v = desc_v.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        qk = _scores(q, k, softcap_in, SOFTCAP, DOT_PRECISION)
        cols = start_n + offs_n
        if SPECIALIZE:
            visible = cols[None, :] < row_end[:, None]
            if WINDOW:
                visible = visible & (cols[None, :] >= offs_m[:, None] + window_offset)
            qk = tl.where(visible, qk, float("-inf"))
        elif start_n >= full_end or start_n < full_lo:  # only the boundary tiles
            qk = _mask_scores(qk, cols, offs_m, kv_len, causal_offset, window_offset, CAUSAL, WINDOW)
            if HAS_KV_LENS:
                # Keys past kv_len are the caller's padding, maybe NaN: P = 0 there is not enough.
                v = tl.where(cols[:, None] < kv_len, v, 0.0)
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, qk, v, qk_scale, DOT_PRECISION)

    out, lse = _fwd_finish(acc, l_i, m_i, SINKS, h, HAS_SINKS)
    if SPECIALIZE:
        o_rows.store([start_m, 0], out.to(desc_o.dtype))
    else:
        desc_o.store([b, h, start_m, 0], out.to(desc_o.dtype).reshape(1, 1, BLOCK_M, BLOCK_D))
    tl.store(LSE + (b * H + h).to(tl.int64) * Nq + offs_m, lse, mask=offs_m < Nq)


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO, DLSE, DELTA, CU_Q,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, total_q, total_k,
    Nq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DLSE: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # delta = rowsum(dO * O) - dlse (the lse's own gradient enters dS through delta).
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, Nq, _, _, _, _ = _sequence(CU_Q, CU_Q, CU_Q, b, Nq, Nq, total_q, total_q, VARLEN, False)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + q_start * stride_om, offs_m, Nq,
                   stride_om, offs_d, stride_od, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + q_start * stride_dom, offs_m,
                    Nq, stride_dom, offs_d, stride_dod, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row = b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start + offs_m
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
def _probabilities(q, k, lse2, qk_scale, softcap_in, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``(P, dS/dP-scale)`` of a tile: P = exp(scores - lse), and the softcap's chain-rule factor 1 - tanh^2 (or 1)."""
    qk = _scores(q, k, softcap_in, SOFTCAP, DOT_PRECISION)
    p = tl.math.exp2(qk * qk_scale - lse2)
    if SOFTCAP:
        dcap = 1.0 - qk * qk
    else:
        dcap = 1.0
    return p, dcap


@triton.jit
def _dkdv_tile(dk, dv, k, v, q_base, do_base, LSE, DELTA, row_base, start_m, diag_end, win_start, offs_n, offs_d,
               Nq, causal_offset, window_offset, qk_scale, softcap_in,
               stride_qm, stride_qd, stride_dom, stride_dod,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr,
               WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # Transposed tile (keys x queries), so P^T and dS^T feed the dK/dV dots without a transpose.
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_tile(q_base, offs_m, Nq, stride_qm, offs_d, stride_qd, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(do_base, offs_m, Nq, stride_dom, offs_d, stride_dod, HEAD_DIM, BLOCK_D, True)
    lse2, delta = _load_row_stats(LSE, DELTA, row_base + offs_m, offs_m, Nq)
    p_t, dcap_t = _probabilities(k, q, lse2[None, :], qk_scale, softcap_in, SOFTCAP, DOT_PRECISION)
    if CAUSAL:
        if start_m < diag_end:  # only query blocks on the diagonal pay for the mask
            p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + causal_offset, p_t, 0.0)
    if WINDOW:
        if start_m + BLOCK_M > win_start:  # only query blocks on the window's left edge
            p_t = tl.where(offs_n[:, None] >= offs_m[None, :] + window_offset, p_t, 0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :]) * dcap_t
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, KV_LENS, CU_Q, CU_K,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_lb, stride_lh, total_q, total_k,
    H, group, Nq, Nk, causal_offset, window_offset, sm_scale, qk_scale, softcap_in,
    tune_nq, tune_nk,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_KV_LENS: tl.constexpr,
    VARLEN: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    q_start, Nq, k_start, Nk, kv_len, shift = _sequence(CU_Q, CU_K, KV_LENS, b, Nq, Nk, total_q, total_k, VARLEN,
                                                        HAS_KV_LENS)
    if VARLEN:
        causal_offset += shift
        window_offset += shift
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if start_n < kv_len:
        k = _load_tile(K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh + k_start * stride_kn, offs_n,
                       kv_len, stride_kn, offs_d, stride_kd, HEAD_DIM, BLOCK_D, True)
        v = _load_tile(V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh + k_start * stride_vn, offs_n,
                       kv_len, stride_vn, offs_d, stride_vd, HEAD_DIM, BLOCK_D, True)
        # Query rows [lo, full_start) see part of this key block (diagonal: masked); rows from
        # full_start on see all of it. Rows before lo see none of it and are skipped; with a
        # window, so are rows from hi on, and rows from win_start on see only part of it.
        lo = 0
        full_start = 0
        hi = Nq
        win_start = Nq
        if CAUSAL:
            lo = (tl.maximum(start_n - causal_offset, 0) // BLOCK_M) * BLOCK_M
            full_start = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - causal_offset, 0), BLOCK_M) * BLOCK_M
        if WINDOW:
            hi = tl.minimum(tl.maximum(start_n + BLOCK_N - window_offset, 0), Nq)
            win_start = start_n + 1 - window_offset
        diag_end = tl.minimum(full_start, Nq)
        # At head dim 256 the loop nest is flattened into one pipelined loop: nested, its
        # prologue's values stay live beside the 128 accumulator registers and spill.
        for g in tl.range(0, group, flatten=BLOCK_D > 128):
            # Every query head of the group, summed here: no atomics, one owner per dK/dV tile.
            h = hk * group + g
            q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + q_start * stride_qm
            do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + q_start * stride_dom
            row_base = b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start
            # One loop (two would each keep a software pipeline's buffers live: spills at head dim 128).
            for start_m in range(lo, hi, BLOCK_M):
                dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, LSE, DELTA, row_base, start_m, diag_end,
                                    win_start, offs_n, offs_d, Nq, causal_offset, window_offset, qk_scale, softcap_in,
                                    stride_qm, stride_qd, stride_dom, stride_dod,
                                    HEAD_DIM, BLOCK_D, BLOCK_M, CAUSAL, WINDOW, SOFTCAP, DOT_PRECISION)
    # Keys past kv_len are masked out of every row: their gradients are exactly zero.
    key_visible = (offs_n < kv_len)[:, None]
    dk = tl.where(key_visible, dk * sm_scale, 0.0)
    dv = tl.where(key_visible, dv, 0.0)
    _store_tile(DK + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh + k_start * stride_dkn,
                dk.to(DK.dtype.element_ty), offs_n, Nk, stride_dkn, offs_d, stride_dkd, HEAD_DIM, BLOCK_D)
    _store_tile(DV + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh + k_start * stride_dvn,
                dv.to(DV.dtype.element_ty), offs_n, Nk, stride_dvn, offs_d, stride_dvd, HEAD_DIM, BLOCK_D)


@triton.jit
def _dq_step(dq, po, q, do, k, v, lse2, delta, cols, offs_m, kv_len, causal_offset, window_offset, qk_scale,
             softcap_in, edge, MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
             SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key tile of dQ (both dQ kernels): dq += dS k, and with sinks po += rowsum(P * dP).

    MASKED: the score mask where ``edge`` (a constant, or the loop's boundary test).
    """
    p, dcap = _probabilities(q, k, lse2[:, None], qk_scale, softcap_in, SOFTCAP, DOT_PRECISION)
    if MASKED:
        if edge:
            p = tl.where(_visible(cols, offs_m, kv_len, causal_offset, window_offset, CAUSAL, WINDOW), p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None]) * dcap
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    if HAS_SINKS:  # rowsum(P * dP) = dO . O in fp32, from the unrounded O
        po += tl.sum(p * dp, 1)
    return dq, po


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, k_base, v_base, start_n, offs_m, offs_n, offs_d,
             kv_len, causal_offset, window_offset, qk_scale, softcap_in,
             stride_kn, stride_kd, stride_vn, stride_vd,
             edge, po, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
             WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # The pointer kernel's tile: MASKED also bounds-checks the loads (zeros past kv_len).
    cols = start_n + offs_n
    k = _load_tile(k_base, cols, kv_len, stride_kn, offs_d, stride_kd, HEAD_DIM, BLOCK_D, MASKED)
    v = _load_tile(v_base, cols, kv_len, stride_vn, offs_d, stride_vd, HEAD_DIM, BLOCK_D, MASKED)
    return _dq_step(dq, po, q, do, k, v, lse2, delta, cols, offs_m, kv_len, causal_offset, window_offset, qk_scale,
                    softcap_in, edge, MASKED, CAUSAL, WINDOW, SOFTCAP, HAS_SINKS, DOT_PRECISION)


@triton.jit
def _dsinks_partial(SINKS, DLSE, DSINKS, b, h, row, offs_m, Nq, lse2, po, HAS_DLSE: tl.constexpr):
    # The sink is a key whose value is zero: dS_sink = p_sink * (0 - (dO . O - dlse)). lse2 is +inf on
    # rows without a key (and past Nq), so p_sink = 0 there. One slot per program: (batch, query block, head).
    p_sink = tl.math.exp2(tl.load(SINKS + h) * 1.4426950408889634 - lse2)
    if HAS_DLSE:
        po -= tl.load(DLSE + row, mask=offs_m < Nq, other=0.0)
    slot = (b * tl.num_programs(0) + tl.program_id(0)) * tl.num_programs(1) + h
    tl.store(DSINKS + slot, -tl.sum(p_sink * po, 0))


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KV_LENS, CU_Q, CU_K, SINKS, DLSE, DSINKS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_lb, stride_lh, total_q, total_k,
    H, group, Nq, Nk, causal_offset, window_offset, sm_scale, qk_scale, softcap_in,
    tune_nq, tune_nk,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_KV_LENS: tl.constexpr,
    VARLEN: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
    HAS_DLSE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ per block of queries; with sinks also this block's share of dsink = -sum_rows p_sink * (dO . O - dlse),
    written to its own slot (DSINKS is (batch, query blocks, heads), summed in a fixed order: deterministic)."""
    pid_m, h, b, hk = _forward_program(group, CAUSAL)
    q_start, Nq, k_start, Nk, kv_len, shift = _sequence(CU_Q, CU_K, KV_LENS, b, Nq, Nk, total_q, total_k, VARLEN,
                                                        HAS_KV_LENS)
    start_m = pid_m * BLOCK_M
    if VARLEN:
        if start_m >= Nq:
            return
        causal_offset += shift
        window_offset += shift
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh + k_start * stride_kn
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh + k_start * stride_vn
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q = _load_tile(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + q_start * stride_qm, offs_m, Nq,
                   stride_qm, offs_d, stride_qd, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + q_start * stride_dom, offs_m,
                    Nq, stride_dom, offs_d, stride_dod, HEAD_DIM, BLOCK_D, True)
    row = b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start + offs_m
    lse2, delta = _load_row_stats(LSE, DELTA, row, offs_m, Nq)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    po = tl.zeros([BLOCK_M], dtype=tl.float32)

    lo, full_lo, full_end, end = _key_range(start_m, Nq, kv_len, causal_offset, window_offset, CAUSAL, WINDOW,
                                            BLOCK_M, BLOCK_N)
    if WINDOW:  # one loop, masking only the edge tiles (as the forward)
        for start_n in range(lo, end, BLOCK_N):
            dq, po = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, start_n, offs_m, offs_n, offs_d,
                          kv_len, causal_offset, window_offset, qk_scale, softcap_in,
                          stride_kn, stride_kd, stride_vn, stride_vd, (start_n < full_lo) | (start_n >= full_end),
                          po, HEAD_DIM, BLOCK_D, True, CAUSAL, WINDOW, SOFTCAP, HAS_SINKS, DOT_PRECISION)
    else:
        for start_n in range(0, full_end, BLOCK_N):
            dq, po = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, start_n, offs_m, offs_n, offs_d,
                          kv_len, causal_offset, window_offset, qk_scale, softcap_in,
                          stride_kn, stride_kd, stride_vn, stride_vd, False,
                          po, HEAD_DIM, BLOCK_D, False, CAUSAL, WINDOW, SOFTCAP, HAS_SINKS, DOT_PRECISION)
        for start_n in range(full_end, end, BLOCK_N):
            dq, po = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, start_n, offs_m, offs_n, offs_d,
                          kv_len, causal_offset, window_offset, qk_scale, softcap_in,
                          stride_kn, stride_kd, stride_vn, stride_vd, True,
                          po, HEAD_DIM, BLOCK_D, True, CAUSAL, WINDOW, SOFTCAP, HAS_SINKS, DOT_PRECISION)
    _store_tile(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh + q_start * stride_dqm,
                (dq * sm_scale).to(DQ.dtype.element_ty), offs_m, Nq, stride_dqm, offs_d, stride_dqd, HEAD_DIM, BLOCK_D)
    if HAS_SINKS:
        _dsinks_partial(SINKS, DLSE, DSINKS, b, h, row, offs_m, Nq, lse2, po, HAS_DLSE)


@triton.jit
def _attn_bwd_dq_tma_kernel(
    desc_q, desc_k, desc_v, desc_do, desc_dq, LSE, DELTA, KV_LENS, SINKS, DLSE, DSINKS,
    H, group, Nq, Nk, causal_offset, window_offset, sm_scale, qk_scale, softcap_in,
    tune_nq, tune_nk,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_KV_LENS: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
    HAS_DLSE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The dense dQ on Hopper: q, dO, k, v in and dQ out by TMA through (B, heads, seq, head_dim) descriptors.

    As the TMA forward: the descriptors zero-fill rows past the sequence and columns
    past HEAD_DIM, so no load is masked, and one key loop applies the score mask on
    the boundary tiles only. (That test stays a branch in Triton 3.8's SASS: interior
    tiles jump over the mask's compares and selects, which ``bench.compile --details``
    counts as "branched"; two loops, as the pointer kernel's, cost 10 to 51 more
    registers as TMA loops.) dsinks as the pointer kernel.
    """
    h, b, hk, start_m, offs_m, offs_n, kv_len = _tma_program(KV_LENS, group, Nq, Nk, CAUSAL, HAS_KV_LENS,
                                                             BLOCK_M, BLOCK_N)

    q = desc_q.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
    do = desc_do.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
    row = (b * H + h).to(tl.int64) * Nq + offs_m
    lse2, delta = _load_row_stats(LSE, DELTA, row, offs_m, Nq)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    po = tl.zeros([BLOCK_M], dtype=tl.float32)

    lo, full_lo, full_end, end = _key_range(start_m, Nq, kv_len, causal_offset, window_offset, CAUSAL, WINDOW,
                                            BLOCK_M, BLOCK_N)
    for start_n in range(lo, end, BLOCK_N):
        k = desc_k.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        v = desc_v.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        cols = start_n + offs_n
        edge = (start_n < full_lo) | (start_n >= full_end)  # the diagonal, the ragged end, the window's left edge
        if HAS_KV_LENS:
            if edge:
                # Keys past kv_len are the caller's padding, maybe NaN or inf, which TMA reads whole:
                # P = 0 there is not enough (0 * NaN in dO V^T and in dS K).
                real = cols[:, None] < kv_len
                k = tl.where(real, k, 0.0)
                v = tl.where(real, v, 0.0)
        dq, po = _dq_step(dq, po, q, do, k, v, lse2, delta, cols, offs_m, kv_len, causal_offset, window_offset,
                          qk_scale, softcap_in, edge, True, CAUSAL, WINDOW, SOFTCAP, HAS_SINKS, DOT_PRECISION)
    desc_dq.store([b, h, start_m, 0], (dq * sm_scale).to(desc_dq.dtype).reshape(1, 1, BLOCK_M, BLOCK_D))
    if HAS_SINKS:
        _dsinks_partial(SINKS, DLSE, DSINKS, b, h, row, offs_m, Nq, lse2, po, HAS_DLSE)


# ----------------------------------------------------------------------------- launch configurations


@dataclass(frozen=True)
class TileConfig:
    """BLOCK_M (query rows) x BLOCK_N (keys) per program step, and the launch options.

    ``warp_specialize`` (TMA forward only): the key loop is split by the compiler into
    a TMA producer warpgroup and two wgmma consumer warpgroups with rebalanced registers.
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
    "dq_tma": TileConfig(64, 32, 4, 1),
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
            # (64, 64, 8w, 2s) spills 16 bytes causal on Triton 3.9, (64, 32, 4w, 2s) 56.
            256: [TileConfig(128, 32, 8, 2), TileConfig(64, 32, 8, 2)],
        },
        # The TMA forward (inputs that qualify, see _tma_qualifies). Warp-specialized configs:
        # BLOCK_M=128 with 4 warps, which Triton 3.8's pass builds as a TMA producer warpgroup (40
        # registers) and two consumer warpgroups of 64 rows each (232 registers). With
        # BLOCK_M=64 both consumers computed the same 64 rows; 8-warp loops stay unspecialized.
        "fwd_tma": {
            64: [TileConfig(128, 64, 8, 3), TileConfig(128, 128, 8, 3), TileConfig(128, 64, 4, 3, True),
                 TileConfig(128, 128, 4, 3, True), TileConfig(64, 64, 4, 3)],
            128: [TileConfig(128, 64, 8, 3), TileConfig(128, 64, 8, 2), TileConfig(128, 128, 8, 2),
                  TileConfig(128, 64, 4, 2, True), TileConfig(128, 128, 4, 2, True), TileConfig(64, 64, 4, 3)],
            # (128, 64) specialized needs 257 KB of shared memory here.
            256: [TileConfig(64, 64, 8, 2), TileConfig(128, 32, 8, 2), TileConfig(64, 32, 4, 2),
                  TileConfig(128, 32, 4, 2, True)],
        },
        # dK/dV keeps k, v and two fp32 accumulators of BLOCK_N keys live: few queries per step.
        # At head dim 128 no BLOCK_M=16 (64x16 wgmma, bound by shared memory) and nothing
        # that spills: (64, 128, 8w) and (64, 64, 4w) do, causal, and (64, 64, 8w) with 2
        # stages on Triton 3.6 (8 bytes, 56 causal) and 3.9 (32): with 1 stage it builds on
        # all three. Head dim 256 needs 64 keys for wgmma (32 compile to mma.sync) and 8 warps
        # (the accumulators take 128 registers a thread), whose two warpgroups split the BLOCK_M
        # queries of the score tile: 32 queries give 64x16 wgmma, 16 give 64x8; 64 spill, and so
        # do 4 warps, 1 stage, or a nested head loop (the kernel flattens it there). Triton 3.9
        # spills every such tile: _RELEASE_CONFIGS_16BIT.
        "dkdv": {
            64: [TileConfig(32, 128, 8, 3), TileConfig(64, 64, 8, 3), TileConfig(32, 64, 4, 3)],
            128: [TileConfig(32, 128, 8, 2), TileConfig(64, 64, 8, 1)],
            256: [TileConfig(32, 64, 8, 2), TileConfig(16, 64, 8, 2)],
        },
        # At head dim 128 the small tile is (64, 32, 4w): (64, 64, 4w, 2s) spills 48 bytes causal on Triton 3.9.
        "dq": {
            64: [TileConfig(128, 32, 8, 3), TileConfig(128, 64, 8, 3), TileConfig(64, 64, 4, 3)],
            128: [TileConfig(128, 32, 8, 2), TileConfig(128, 64, 8, 2), TileConfig(64, 32, 4, 2)],
            256: [TileConfig(128, 32, 8, 2), TileConfig(64, 32, 8, 2)],
        },
        # The TMA dQ (inputs that qualify): BLOCK_M=128 (two warpgroups of 64 rows) at every head
        # dim; at 256 a 64-key tile would need 256 KB of shared memory, over the 227 KB.
        "dq_tma": {
            64: [TileConfig(128, 32, 8, 3), TileConfig(128, 64, 8, 3), TileConfig(128, 128, 8, 2),
                 TileConfig(64, 64, 4, 3)],
            128: [TileConfig(128, 32, 8, 3), TileConfig(128, 64, 8, 3), TileConfig(128, 128, 8, 2),
                  TileConfig(64, 64, 4, 2)],
            256: [TileConfig(128, 32, 8, 2), TileConfig(64, 64, 8, 2)],
        },
    },
    "sm80": {
        "fwd": {
            # At head dim 32 the 4-warp tile with 3 stages hits the 128-register cap (8 bytes spilled): 2 stages.
            32: [TileConfig(128, 64, 8, 3), TileConfig(64, 64, 4, 2)],
            64: [TileConfig(128, 64, 8, 3), TileConfig(64, 64, 4, 3)],
            128: [TileConfig(128, 64, 8, 3), TileConfig(128, 64, 8, 2)],
            256: [TileConfig(64, 64, 8, 2)],
        },
        "dkdv": {
            64: [TileConfig(16, 128, 8, 3)],  # (32, 128, 8w, 3s) spills 8 bytes causal on Triton 3.6
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
# With a feature on (_FEATURES) the kernels hold more registers: the candidates that do not spill
# then, where they differ from the plain ones (bench.compile's sweep of the "+features" specs,
# _COMPILED_FEATURE_SETS: the most registers any call takes, with and without a window).
_FEATURES = ("VARLEN", "WINDOW", "SOFTCAP", "HAS_SINKS")
_FEATURE_CONFIGS_16BIT = {
    "sm90": {
        # (64, 64, 8w, 2s) spills 8 bytes at head dim 256 causal with no window (two key loops), and
        # on Triton 3.6 so does (128, 32, 8w, 2s) (16 bytes, 8 causal).
        # At head dims 80 to 128 (128, 128, 8w, 2s) spills on Triton 3.9 (8 bytes causal, 24 with no window).
        "fwd": {128: [TileConfig(128, 64, 8, 3), TileConfig(128, 64, 8, 2), TileConfig(64, 64, 4, 3)],
                256: [TileConfig(64, 32, 8, 2)]},
        # dK/dV: (64, 64, 8w) spills at head dim 64 on Triton 3.6 (3 stages: 56 bytes, 144 causal; 2 stages:
        # 8 bytes causal once packed sequences are clamped into their totals); at head
        # dim 128 (32, 128, 8w, 2s) spills on 3.6 (8 bytes, causal) and 3.9 (16), and (64, 64, 8w, 1s)
        # on 3.9 (its own entry in _RELEASE_CONFIGS_16BIT); at 256 (32, 64) spills 16 bytes.
        "dkdv": {64: [TileConfig(32, 128, 8, 3), TileConfig(32, 64, 4, 3)],
                 128: [TileConfig(64, 64, 8, 1)], 256: [TileConfig(16, 64, 8, 2)]},
        "dq": {256: [TileConfig(128, 32, 8, 2)]},  # (64, 32, 8w, 2s) spills 72 bytes causal, no window, on 3.9
        # (64, 64, 8w, 2s) spills 264 bytes at head dim 256 on Triton 3.9 (272 causal).
        "dq_tma": {128: [TileConfig(128, 32, 8, 3), TileConfig(128, 64, 8, 3), TileConfig(64, 64, 4, 2)],
                   256: [TileConfig(128, 32, 8, 2)]},
    },
    "sm80": {
        # (128, 64, 8w, 3s) spills 8 bytes on Triton 3.6 at head dims 16 (causal) and 32, so does
        # (128, 64, 8w, 2s) at 32: 32 keys there.
        "fwd": {32: [TileConfig(128, 32, 8, 3), TileConfig(64, 64, 4, 2)],
                64: [TileConfig(128, 32, 8, 3), TileConfig(64, 64, 4, 3)]},
        # dK/dV at head dims up to 64: the plain (16, 128, 8w, 3s) spills 16 bytes at 16, causal, on Triton 3.6
        # since packed sequences are clamped into their totals; 8-warp (16, 64) and (16, 128) spill there too.
        "dkdv": {64: [TileConfig(16, 64, 4, 3)]},
        "dq": {64: [TileConfig(128, 32, 8, 3)], 128: [TileConfig(64, 32, 8, 2), TileConfig(64, 32, 4, 2)]},
    },
}
# Where one Triton release's compiler spills a candidate above that builds spill-free on the
# others (and no tile builds spill-free on all of them): that release's own candidates, keyed by
# Triton's (major, minor), then (family, kernel, padded head dim, features). Measured with each
# release's compiler for sm_90 (`python -m bench.compile --only "dkdv D=256 full torch.bfloat16"`
# and the like under it): compiler reports, not measurements.
_RELEASE_CONFIGS_16BIT = {
    (3, 9): {
        # Every wgmma tile of head dim 256 dK/dV spills on 3.9 (16 tried, 48 to 1,472 bytes: BLOCK_M
        # 16, 32 or 64 with 64 keys, 4, 8 or 16 warps, 1 to 3 stages, the head loop flattened or
        # nested); its mma.sync tiles, Ampere's, do not (162 to 175 registers).
        ("sm90", "dkdv", 256, False): [TileConfig(16, 32, 8, 2), TileConfig(32, 32, 8, 2)],
        ("sm90", "dkdv", 256, True): [TileConfig(16, 32, 8, 2), TileConfig(32, 32, 8, 2)],
        # Every feature on, head dim 128: (64, 64, 8w, 1s) spills 128 bytes (152 causal) on 3.9,
        # (32, 128, 8w, 1s) does not there but spills 8 bytes on 3.8, (32, 128, 8w, 2s) 16 on 3.9.
        ("sm90", "dkdv", 128, True): [TileConfig(32, 128, 8, 1)],
    },
}
TRITON_RELEASE = tuple(int(part) for part in triton.__version__.split(".")[:2])  # picks _RELEASE_CONFIGS_16BIT's row
_PREPROCESS_BLOCK_M = 64
_MIN_BLOCK_M = 16  # the smallest dq BLOCK_M of any configuration: sizes the dsinks partials
_KERNELS = {"fwd": _attn_fwd_kernel, "fwd_tma": _attn_fwd_tma_kernel, "dkdv": _attn_bwd_dkdv_kernel,
            "dq": _attn_bwd_dq_kernel, "dq_tma": _attn_bwd_dq_tma_kernel}


def _block_d(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


GPU_FAMILIES = {"sm90": 90, "sm80": 80}  # family -> the compute capability compile_specs() builds for


def gpu_family(device: torch.device) -> str:
    return "sm90" if torch.cuda.get_device_capability(device)[0] >= 9 else "sm80"


def gpu_configs(kind: str, block_d: int, dtype: torch.dtype, family: str = "sm90",
                features: bool = False) -> list[TileConfig]:
    """The autotuner's candidates for one kernel ('fwd', 'fwd_tma', 'dkdv', 'dq', 'dq_tma') at a padded head dim.

    Empty where the kernel never runs: the TMA kernels on sm80 and in fp32. ``features``: a
    packed batch, window, softcap or sinks is on, which costs registers: where a plain
    candidate would spill then, :data:`_FEATURE_CONFIGS_16BIT` names the ones that do not. Where the
    installed Triton release (:data:`TRITON_RELEASE`) spills a tile the others build spill-free,
    :data:`_RELEASE_CONFIGS_16BIT` replaces it.
    """
    table = _GPU_CONFIGS_FP32 if dtype == torch.float32 else _GPU_CONFIGS_16BIT[family]
    key = block_d if block_d in table.get(kind, {}) else max(64, block_d)  # head dims up to 64 share, but for 32
    configs = table.get(kind, {}).get(key, [])
    if features and dtype != torch.float32:
        configs = _FEATURE_CONFIGS_16BIT[family].get(kind, {}).get(key, configs)
    if dtype != torch.float32:
        configs = _RELEASE_CONFIGS_16BIT.get(TRITON_RELEASE, {}).get((family, kind, key, features), configs)
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


# The TMA kernels' descriptors and the block size that gives each one's tile rows.
_DESCRIPTOR_ROWS = {"desc_q": "BLOCK_M", "desc_o": "BLOCK_M", "desc_do": "BLOCK_M", "desc_dq": "BLOCK_M",
                    "desc_k": "BLOCK_N", "desc_v": "BLOCK_N"}


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Device memory for descriptors a kernel makes itself (``tl.make_tensor_descriptor``): Triton
    asks ``triton.set_allocator``'s allocator at launch. One the caller set is kept."""
    if _current_allocator is None or isinstance(_current_allocator.get(), _NullAllocator):
        triton.set_allocator(_scratch)


def _set_block_shapes(nargs: dict) -> None:
    """Autotuner pre-hook: each configuration's tile shape into the TMA descriptors."""
    for name, rows in _DESCRIPTOR_ROWS.items():
        if name in nargs:
            nargs[name].block_shape = [1, 1, nargs[rows], nargs["BLOCK_D"]]


def _seq_bucket(n: int) -> int:
    # Autotune once per power-of-two range of lengths, not per length (KV-cache decoding grows by one).
    return min(next_power_of_2(max(n, 1)), 1 << 16)


def _is_tma(kind: str) -> bool:
    return kind.endswith("_tma")


@functools.lru_cache(maxsize=None)
def _autotuned(kind: str, block_d: int, dtype: torch.dtype, family: str, features: bool):
    configs = [
        triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n, **_ws_kwarg(kind, c)}, num_warps=c.num_warps,
                      num_stages=c.num_stages, pre_hook=_set_block_shapes if _is_tma(kind) else None)
        for c in gpu_configs(kind, block_d, dtype, family, features)
    ]
    arg_names = _KERNELS[kind].arg_names
    features = [name for name in _FEATURES if name in arg_names]  # the features this kernel has
    return triton.autotune(configs=configs, key=["HEAD_DIM", "CAUSAL", "HAS_KV_LENS", *features, "tune_nq", "tune_nk"],
                           reset_to_zero=["DSINKS"] if "DSINKS" in arg_names else None)(
        _KERNELS[kind]
    )


def _ws_kwarg(kind: str, c: TileConfig) -> dict:
    return {"WARP_SPECIALIZE": c.warp_specialize} if kind == "fwd_tma" else {}


def _launch(kind: str, grid_rows: int, heads: int, batch: int, args: tuple, consts: dict, device: torch.device):
    """Run kernel ``kind`` over a (row blocks, heads, batch) grid: autotuned on GPU, fixed on the interpreter."""
    dtype = consts["_dtype"]
    consts = {k: v for k, v in consts.items() if k in _KERNELS[kind].arg_names}  # the features this kernel has
    if device.type == "cuda":
        features = any(consts.get(name) for name in _FEATURES)
        kernel = launch(_autotuned(kind, consts["BLOCK_D"], dtype, gpu_family(device), features))
        block = "BLOCK_N" if kind == "dkdv" else "BLOCK_M"
        kernel[lambda meta: (cdiv(grid_rows, meta[block]), heads, batch)](*args, **consts)
    else:
        c = _INTERPRET[kind]
        consts = consts | _ws_kwarg(kind, c)
        if _is_tma(kind):
            _set_block_shapes({**dict(zip(_KERNELS[kind].arg_names, args)), **consts,
                               "BLOCK_M": c.block_m, "BLOCK_N": c.block_n})
        rows_per_program = c.block_n if kind == "dkdv" else c.block_m
        launch(_KERNELS[kind])[(cdiv(grid_rows, rows_per_program), heads, batch)](
            *args, **consts, BLOCK_M=c.block_m, BLOCK_N=c.block_n, num_warps=c.num_warps, num_stages=c.num_stages
        )


@dataclass(frozen=True)
class _Problem:
    """What the kernels need to know about one call beyond the tensors: the mask and the features.

    ``causal_offset``/``window_offset``: query i sees keys ``j <= i + causal_offset``
    (when ``causal``: causal, or a right window) and ``j >= i + window_offset`` (when
    ``window``). Dense: absolute offsets. Packed (``cu`` set): relative to each
    sequence's own diagonal, which the kernels add (``len_k - len_q``).
    """

    scale: float
    causal: bool
    causal_offset: int
    window: bool
    window_offset: int
    softcap: float
    sinks: torch.Tensor | None
    kv_lens: torch.Tensor | None = None
    cu: tuple | None = None  # (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)

    @property
    def qk_scale(self) -> float:  # the exp2-domain factor of the (capped) scores
        return (self.softcap if self.softcap > 0 else self.scale) * LOG2E

    @property
    def softcap_in(self) -> float:  # what multiplies q k^T inside the tanh
        return self.scale / self.softcap if self.softcap > 0 else 1.0


def _dense_problem(q, k, scale, causal_offset, kv_lens, window_left, window_right, softcap, sinks) -> _Problem:
    offset, left, right = _diagonal_bounds(causal_offset, q.shape[2], k.shape[2], window_left, window_right)
    return _Problem(scale, right >= 0, offset + max(right, 0), left >= 0, offset - left, softcap, sinks, kv_lens)


def _varlen_problem(cu, scale, window_left, window_right, softcap, sinks) -> _Problem:
    return _Problem(scale, window_right >= 0, max(window_right, 0), window_left >= 0, -window_left, softcap, sinks,
                    cu=cu)


def _strides(t: torch.Tensor) -> tuple:
    """(batch, head, row, feature) strides: dense (B, H, N, D) as is, packed (total, H, D) with batch stride 0."""
    return tuple(t.stride()) if t.dim() == 4 else (0, t.stride(1), t.stride(0), t.stride(2))


# The pointer kernels form offsets inside one head as rows * row stride in int32 (batch, head and
# packed sequence-start offsets are int64; 64-bit row arithmetic would cost every tile registers).
_MAX_OFFSET = 2**31 - 1


def _span(rows: int, row_stride: int, head_dim: int, col_stride: int = 1) -> int:
    """The largest element offset the kernels form inside one head of ``rows`` rows."""
    return (max(rows, 1) - 1) * row_stride + (head_dim - 1) * col_stride


def _head_span(t: torch.Tensor, rows: int) -> int:
    _, _, row_stride, col_stride = _strides(t)
    return _span(rows, row_stride, t.shape[-1], col_stride)


def _head_major(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` whose rows lie head_dim apart: (B, H, N, D) contiguous, or packed (H, total, D) memory."""
    return t.contiguous() if t.dim() == 4 else t.transpose(0, 1).contiguous().transpose(0, 1)


def _int32_rows(t: torch.Tensor, rows: int, name: str) -> torch.Tensor:
    """``t``, or its head-major copy where ``rows`` of its rows would take the kernels' offsets past int32.

    A (batch, seq, heads, head_dim) projection, or a packed batch, has rows heads * head_dim
    apart; head-major they are head_dim apart. Past even that, a clear error.
    """
    if _head_span(t, rows) <= _MAX_OFFSET:
        return t
    t = _head_major(t)
    if _head_span(t, rows) > _MAX_OFFSET:
        raise ValueError(f"attention: {name} has {rows} rows of head dim {t.shape[-1]} in one head, past the "
                         f"kernels' int32 offsets inside a head ({_MAX_OFFSET} elements); split the sequence")
    return t


def _output(like: torch.Tensor, rows: int) -> torch.Tensor:
    """An empty output of ``like``'s shape and dtype: contiguous, or head-major where ``rows`` rows of a
    contiguous one would pass the int32 offsets (packed); the launchers return it ``.contiguous()``."""
    if like.dim() == 3 and _span(rows, like.shape[1] * like.shape[2], like.shape[2]) > _MAX_OFFSET:
        return torch.empty((like.shape[1], like.shape[0], like.shape[2]), dtype=like.dtype,
                           device=like.device).transpose(0, 1)
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)


def _common_consts(q: torch.Tensor, p: _Problem) -> dict:
    return {
        "HEAD_DIM": q.shape[-1],
        "BLOCK_D": _block_d(q.shape[-1]),
        "CAUSAL": p.causal,
        "HAS_KV_LENS": p.kv_lens is not None,
        "VARLEN": p.cu is not None,
        "WINDOW": p.window,
        "SOFTCAP": p.softcap > 0,
        "HAS_SINKS": p.sinks is not None,
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
        "_dtype": q.dtype,
    }


def _shape(q, k, p: _Problem):
    """(batch, heads, kv heads, rows per batch, keys per batch, row args) of a call, the row args the pointer
    kernels' ``(stride_lb, stride_lh, total_q, total_k)``: the lse strides (batch, head) and the totals.

    Packed: the rows and keys are the longest sequences (they size the grid), the lse (heads, total_q),
    and the totals the packed rows and keys, inside which the kernels clamp every sequence
    (:func:`_packed_span`: unchecked ``cu_seqlens`` never take them out of bounds). Dense: totals 0, unused.
    """
    H, Hkv = q.shape[1], k.shape[1]
    if p.cu is None:
        B, Nq, Nk = q.shape[0], q.shape[2], k.shape[2]
        return B, H, Hkv, Nq, Nk, (H * Nq, Nq, 0, 0)
    cu_q, _, max_q, max_k = p.cu
    return cu_q.shape[0] - 1, H, Hkv, max_q, max_k, (0, q.shape[0], q.shape[0], k.shape[0])


def _pointers(p: _Problem, fallback: torch.Tensor) -> tuple:
    """KV_LENS, CU_Q, CU_K, SINKS: the absent ones as any tensor (the kernels never read them)."""
    kv_lens = p.kv_lens if p.kv_lens is not None else fallback
    cu_q, cu_k = (p.cu[0], p.cu[1]) if p.cu is not None else (fallback, fallback)
    return kv_lens, cu_q, cu_k, p.sinks if p.sinks is not None else fallback


# CUDA's limit on a grid's y and z dimensions; the kernels put the batch (sequences, when
# packed) on z, so a longer batch launches in runs of at most this many.
_MAX_GRID_BATCH = 65535


def _batch_runs(p: _Problem, B: int, *batched: torch.Tensor | None):
    """``(problem, tensors)`` per run of at most :data:`_MAX_GRID_BATCH` sequences.

    Dense: the batch-first tensors and ``kv_lens`` sliced (views). Packed: the tensors whole
    and ``cu_seqlens`` sliced, whose offsets are absolute.
    """
    for b0 in range(0, B, _MAX_GRID_BATCH):
        b1 = min(B, b0 + _MAX_GRID_BATCH)
        if p.cu is None:
            kv_lens = p.kv_lens[b0:b1] if p.kv_lens is not None else None
            yield replace(p, kv_lens=kv_lens), tuple(t[b0:b1] if t is not None else None for t in batched)
        else:
            cu_q, cu_k, max_q, max_k = p.cu
            yield replace(p, cu=(cu_q[b0:b1 + 1], cu_k[b0:b1 + 1], max_q, max_k)), batched


def _forward(q, k, v, p: _Problem):
    """Launch the forward. Returns ``o`` (contiguous, q's layout and dtype) and ``lse`` fp32
    ((B, H, Nq) dense, (H, total_q) packed)."""
    B, H, Hkv, Nq, Nk, row_args = _shape(q, k, p)
    q, k, v = _int32_rows(q, Nq, "q"), _int32_rows(k, Nk, "k"), _int32_rows(v, Nk, "v")
    o = _output(q, Nq)
    lse = torch.empty((B, H, Nq) if p.cu is None else (H, q.shape[0]), dtype=torch.float32, device=q.device)
    if o.numel() == 0 or B == 0:
        return o.contiguous(), lse
    for run, tensors in _batch_runs(p, B, q, k, v, o, lse):
        _forward_run(*tensors, run)
    return o.contiguous(), lse


def _forward_run(q, k, v, o, lse, p: _Problem) -> None:
    """Launch the forward kernel over one run of the batch (:func:`_batch_runs`), writing ``o`` and ``lse``."""
    B, H, Hkv, Nq, Nk, row_args = _shape(q, k, p)
    consts = _common_consts(q, p)
    kv_lens, cu_q, cu_k, sinks = _pointers(p, lse)
    offsets = (p.causal_offset, p.window_offset, p.qk_scale, p.softcap_in, _seq_bucket(Nq), _seq_bucket(Nk))
    plain = not any(consts[name] for name in ("HAS_KV_LENS", *_FEATURES))  # what the Gluon kernel implements
    if (use_gluon_attention(q.device) and plain and _attention_gluon.qualifies(q, k, v)
            and _tma_qualifies(q, k, v, o)):
        # The opt-in experimental Gluon forward (kernels._attention_gluon): the same o and lse.
        _attention_gluon.forward(q, k, v, o, lse, p.causal, p.causal_offset, p.qk_scale, _seq_bucket(Nq),
                                 _seq_bucket(Nk))
        return
    if p.cu is None and _tma_qualifies(q, k, v, o):
        block_d = consts["BLOCK_D"]  # the row counts are placeholders until the tile is chosen
        args = (
            _descriptor(q, 16, block_d), _descriptor(k, 16, block_d), _descriptor(v, 16, block_d),
            _descriptor(o, 16, block_d), lse, kv_lens, sinks, q, o, *q.stride()[:3], *o.stride()[:3],
            H, H // Hkv, Nq, Nk, *offsets,
        )
        if q.is_cuda:
            _ensure_allocator()
        _launch("fwd_tma", Nq, H, B, args, consts, q.device)
        return
    args = (
        q, k, v, o, lse, kv_lens, cu_q, cu_k, sinks,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o), *row_args,
        H, H // Hkv, Nq, Nk, *offsets,
    )
    _launch("fwd", Nq, H, B, args, consts, q.device)


def _backward(do, q, k, v, o, lse, dlse, p: _Problem):
    """Launch the backward. Returns dq, dk, dv in the inputs' dtype, and dsinks (fp32, or None)."""
    B, H, Hkv, Nq, Nk, row_args = _shape(q, k, p)
    do, q, o = _int32_rows(do, Nq, "grad_out"), _int32_rows(q, Nq, "q"), _int32_rows(o, Nq, "out")
    k, v = _int32_rows(k, Nk, "k"), _int32_rows(v, Nk, "v")
    dq, dk, dv = _output(q, Nq), _output(k, Nk), _output(v, Nk)
    dsinks = None if p.sinks is None else torch.zeros_like(p.sinks)
    if dq.numel() == 0 or dk.numel() == 0 or B == 0:  # no queries, or no keys (every row empty)
        return dq.zero_().contiguous(), dk.zero_().contiguous(), dv.zero_().contiguous(), dsinks
    delta = torch.empty_like(lse)
    for run, tensors in _batch_runs(p, B, do, q, k, v, o, lse, dlse, delta, dq, dk, dv):
        partials = _backward_run(*tensors, run)
        if p.sinks is not None:
            dsinks += partials.sum(0)  # the runs in order: deterministic
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dsinks


def _backward_run(do, q, k, v, o, lse, dlse, delta, dq, dk, dv, p: _Problem) -> torch.Tensor:
    """Launch the backward kernels over one run of the batch, writing ``dq``, ``dk``, ``dv``; returns
    the dsinks partials (a placeholder without sinks)."""
    B, H, Hkv, Nq, Nk, row_args = _shape(q, k, p)
    D = q.shape[-1]
    block_d = _block_d(D)
    kv_lens, cu_q, cu_k, sinks = _pointers(p, lse)
    launch(_attn_bwd_preprocess_kernel)[(cdiv(Nq, _PREPROCESS_BLOCK_M), H, B)](
        o, do, dlse if dlse is not None else delta, delta, cu_q, *_strides(o), *_strides(do), *row_args, Nq,
        HEAD_DIM=D, BLOCK_D=block_d, HAS_DLSE=dlse is not None, VARLEN=p.cu is not None,
        BLOCK_M=_PREPROCESS_BLOCK_M, num_warps=4 if block_d <= 128 else 8,
    )
    consts = _common_consts(q, p) | {"HAS_DLSE": dlse is not None}
    sizes = (H, H // Hkv, Nq, Nk, p.causal_offset, p.window_offset, p.scale, p.qk_scale, p.softcap_in,
             _seq_bucket(Nq), _seq_bucket(Nk))  # the TMA kernel's lse is (B, H, Nq): no strides
    shared = (*row_args, *sizes)
    _launch("dkdv", Nk, Hkv, B, (
        q, k, v, do, lse, delta, dk, dv, kv_lens, cu_q, cu_k,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv), *shared,
    ), consts, q.device)
    # dsinks: one partial per dq program, (batch, query blocks, heads), sized for the smallest BLOCK_M
    # of any configuration (zeros where no program writes; the autotuner re-zeroes it per trial),
    # summed in a fixed order: deterministic.
    partials = torch.zeros((B * cdiv(Nq, _MIN_BLOCK_M) if p.sinks is not None else 1, H), dtype=torch.float32,
                           device=q.device)
    dlse_or_any = dlse if dlse is not None else lse
    if p.cu is None and _tma_qualifies(q, k, v, do, dq):
        descriptors = tuple(_descriptor(t, 16, block_d) for t in (q, k, v, do, dq))  # rows: set per config
        _launch("dq_tma", Nq, H, B, (*descriptors, lse, delta, kv_lens, sinks, dlse_or_any, partials, *sizes),
                consts, q.device)
    else:
        _launch("dq", Nq, H, B, (
            q, k, v, do, lse, delta, dq, kv_lens, cu_q, cu_k, sinks, dlse_or_any, partials,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq), *shared,
        ), consts, q.device)
    return partials


_POINTERS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
_FP32_POINTERS = {"LSE", "DELTA", "DLSE", "SINKS", "DSINKS"}


def _signature(kernel, ptr: str, consts: dict) -> dict[str, str]:
    """``triton.compile``'s signature for one of the kernels above, in argument order."""
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in _DESCRIPTOR_ROWS:  # (B, H, N, D) descriptors of one (rows, BLOCK_D) tile
            sig[name] = f"tensordesc<{ptr[1:]}[1, 1, {consts[_DESCRIPTOR_ROWS[name]]}, {consts['BLOCK_D']}]>"
        elif name in _POINTERS:
            sig[name] = ptr
        elif name in _FP32_POINTERS:
            sig[name] = "*fp32"
        elif name in ("KV_LENS", "CU_Q", "CU_K"):
            sig[name] = "*i32"
        elif name in ("qk_scale", "sm_scale", "softcap_in"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _divisible_by_16(sig: dict[str, str], head_dim: int) -> tuple[str, ...]:
    """Arguments the launcher marks divisible by 16 for aligned tensors laid out (B, H, N, head_dim) contiguously."""
    return tuple(name for name, ty in sig.items()
                 if ty.startswith("*") or (name.startswith("stride_") and not name.startswith("stride_l")
                                           and ty == "i32" and head_dim % 16 == 0))


# What compile_specs() builds per configuration, as (label suffix, features on, window): the plain
# kernels, and the most registers each path with features takes. Every feature on (packed, window,
# softcap, sinks; the TMA dQ also kv_lens) runs the window's single key loop; with no window the
# pointer forward and dQ run two key loops (unmasked, then masked), heaviest packed with softcap
# and sinks (fwd D=128 (128, 64, 8w, 3s) sm_90: 254 registers; 191 with kv_lens instead).
_COMPILED_FEATURE_SETS = (("", False, False), (" +features", True, True), (" +features no-window", True, False))
_TWO_LOOP_KINDS = ("fwd", "dq")  # the kernels whose key loop splits in two without a window


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
                for causal in (False, True):
                    for label, features, window in _COMPILED_FEATURE_SETS:
                        if features and not window and kind not in _TWO_LOOP_KINDS:
                            continue  # one key loop with or without a window: "+features" covers it
                        targets: dict[TileConfig, list[int]] = {}
                        for family, cc in GPU_FAMILIES.items():
                            for cfg in gpu_configs(kind, block_d, dtype, family, features):
                                targets.setdefault(cfg, []).append(cc)
                        for cfg, ccs in targets.items():
                            c = {name: 1 for name in kernel.arg_names
                                 if name.startswith("stride_") and name.endswith("d")}
                            # The TMA dQ's heaviest call also zeroes keys past kv_lens on its boundary tiles.
                            c |= {"HEAD_DIM": head_dim, "BLOCK_D": block_d, "CAUSAL": causal,
                                  "HAS_KV_LENS": features and kind == "dq_tma",
                                  "VARLEN": features, "WINDOW": window, "SOFTCAP": features,
                                  "HAS_SINKS": features, "HAS_DLSE": False,
                                  "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
                                  "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, **_ws_kwarg(kind, cfg)}
                            c = {k: v for k, v in c.items() if k in kernel.arg_names}
                            sig = _signature(kernel, ptr, c)
                            specs.append(KernelSpec(
                                kernel, sig, c, cfg.num_warps, cfg.num_stages, hot=dtype != torch.float32,
                                label=f"{kind} D={head_dim} {'causal' if causal else 'full'} {dtype}{label}",
                                extra={"divisible_by_16": _divisible_by_16(sig, head_dim), "targets": tuple(ccs),
                                       "quick": head_dim in (64, 128) and not features},
                            ))
            for features in (False, True):
                c = {"stride_od": 1, "stride_dod": 1, "HEAD_DIM": head_dim, "BLOCK_D": block_d, "HAS_DLSE": False,
                     "VARLEN": features, "BLOCK_M": _PREPROCESS_BLOCK_M}
                sig = _signature(_attn_bwd_preprocess_kernel, ptr, c)
                specs.append(KernelSpec(
                    _attn_bwd_preprocess_kernel, sig, c, 4 if block_d <= 128 else 8, 1, hot=False,
                    label=f"preprocess D={head_dim} {dtype}{' +features' if features else ''}",
                    extra={"divisible_by_16": _divisible_by_16(sig, head_dim), "quick": not features},
                ))
    return specs + _attention_gluon.compile_specs()


# ----------------------------------------------------------------------------- ops

# fastlm::attention (dense) and fastlm::varlen_attention (packed) return (out, lse); their
# backward ops consume them (design in kernels._library). Off the Triton backend each runs a
# PyTorch twin of the kernels' math on an explicit mask (the packed one block-diagonal over
# the whole batch, so it needs no host copy of cu_seqlens and stays traceable).


def _diagonal_bounds(causal_offset, Nq: int, Nk: int, window_left: int, window_right: int):
    """The dense op's mask as (offset, left, right): causal_offset None -> window diagonal at Nk - Nq."""
    if causal_offset is None:
        return Nk - Nq, window_left, window_right
    return causal_offset, window_left, 0  # causal: the upper bound is the diagonal itself


def _dense_mask(q, k, kv_lens, causal_offset, window_left, window_right):
    offset, left, right = _diagonal_bounds(causal_offset, q.shape[2], k.shape[2], window_left, window_right)
    visible = visibility(q.shape[2], k.shape[2], offset, left, right, q.device, kv_lens)
    real = None if kv_lens is None else torch.arange(k.shape[2], device=q.device) < kv_lens.view(-1, 1)
    return visible, real


def _packed(t: torch.Tensor) -> torch.Tensor:
    """(total, heads, D) or (heads, total) as one batch of the dense layout, and back (its own inverse)."""
    return t.transpose(0, 1).unsqueeze(0) if t.dim() == 3 else t.unsqueeze(0)


def _attention_backward_reference(do, q, k, v, o, lse, dlse, scale, visible, real, softcap, sinks):
    """The backward kernels' math (module docstring) in fp32 PyTorch: dq, dk, dv, dsinks (fp32 or None)."""
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    group = H // Hkv
    kf, vf = k.float(), v.float()
    if real is not None:
        kf, vf = torch.where(real[:, None, :, None], kf, 0.0), torch.where(real[:, None, :, None], vf, 0.0)
    kf, vf = kf.repeat_interleave(group, dim=1), vf.repeat_interleave(group, dim=1)
    qf, dof, of = q.float(), do.float(), o.float()
    s = qf @ kf.transpose(-1, -2) * scale
    if softcap > 0:
        t = torch.tanh(s / softcap)
        s = softcap * t
    has_key = torch.isfinite(lse)
    lse0 = torch.where(has_key, lse, 0.0)
    p = torch.where(visible[:, None] & has_key[..., None], torch.exp(s - lse0[..., None]), 0.0)
    delta = (dof * of).sum(-1)
    if dlse is not None:
        delta = delta - dlse
    ds = p * (dof @ vf.transpose(-1, -2) - delta[..., None])
    if softcap > 0:
        ds = ds * (1 - t * t)  # d(softcap * tanh(s / softcap)) / ds
    dq = ds @ kf * scale
    dk = (ds.transpose(-1, -2) @ qf * scale).view(B, Hkv, group, Nk, D).sum(2)
    dv = (p.transpose(-1, -2) @ dof).view(B, Hkv, group, Nk, D).sum(2)
    dsinks = None
    if sinks is not None:  # the sink's probability times (0 - delta): a key whose value is zero
        p_sink = torch.where(has_key, torch.exp(sinks.float()[:, None] - lse0), 0.0)
        dsinks = -(p_sink * delta).sum((0, 2))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsinks


def _attention_op(q, k, v, kv_lens, scale, causal_offset, window_left=-1, window_right=-1, softcap=0.0, sinks=None):
    if use_triton(q.device):
        return _forward(q, k, v, _dense_problem(q, k, scale, causal_offset, kv_lens, window_left, window_right,
                                                softcap, sinks))
    visible, real = _dense_mask(q, k, kv_lens, causal_offset, window_left, window_right)
    out, lse = masked_attention(q, k, v, scale, visible, real_keys=real, softcap=softcap, sinks=sinks)
    return out.contiguous(), lse.float()


def _attention_backward_op(grad_out, grad_lse, q, k, v, out, lse, kv_lens, scale, causal_offset,
                           window_left=-1, window_right=-1, softcap=0.0, sinks=None):
    if use_triton(q.device):
        if grad_lse is not None:
            grad_lse = grad_lse.contiguous()  # e.g. lse.sum() hands back an expanded, stride-0 gradient
        dq, dk, dv, dsinks = _backward(grad_out, q, k, v, out, lse, grad_lse, _dense_problem(
            q, k, scale, causal_offset, kv_lens, window_left, window_right, softcap, sinks))
    else:
        visible, real = _dense_mask(q, k, kv_lens, causal_offset, window_left, window_right)
        dq, dk, dv, dsinks = _attention_backward_reference(grad_out, q, k, v, out, lse, grad_lse, scale, visible, real,
                                                           softcap, sinks)
    return dq, dk, dv, no_tensor(lse) if dsinks is None else dsinks


def _varlen_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left, window_right,
               softcap, sinks):
    if use_triton(q.device):
        cu = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        return _forward(q, k, v, _varlen_problem(cu, scale, window_left, window_right, softcap, sinks))
    out, lse = _varlen_twin(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
                            window_right, softcap, sinks)
    return out.contiguous(), lse.float()


def _varlen_twin(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left, right, softcap, sinks):
    """The packed batch as dense attention, no host sync: (out, lse (heads, total_q)).

    Banded (:class:`_Band`) where the packing bounds each query's keys; otherwise one dense
    sequence under a block-diagonal mask, total_q x total_k per head.
    """
    band = _Band.of(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k, left, right)
    if band is not None:
        out, lse = masked_attention(band.queries(q), band.keys(k), band.keys(v), scale, band.visible, softcap=softcap,
                                    sinks=sinks)
        return band.unblock(out), band.unblock_lse(lse)
    visible = varlen_visibility(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], left, right)
    out, lse = masked_attention(_packed(q), _packed(k), _packed(v), scale, visible[None], softcap=softcap, sinks=sinks)
    return out[0].transpose(0, 1), lse[0]


def _pad_rows(t: torch.Tensor, before, after, value=0) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, 0) * (t.dim() - 1) + (before, after), value=value)


class _Band:
    """The packed batch as blocks of M queries, each against the 3M keys around it (M = max_seqlen).

    When q and k share one packing (the same ``cu_seqlens`` tensor: the trainer's document
    mask) and no sequence is longer than M, the queries of block b (rows [bM, bM + M)) see
    only keys of their own sequences, all inside [bM - M, bM + 2M): attention over
    (blocks, heads, M, 3M) costs O(total * 3M) per head instead of the block-diagonal
    twin's O(total^2), with the same masks (:func:`varlen_rule`) and so the same results.
    Padding rows (sequence ids -1 for queries, -2 for keys) match nothing. Built from
    shapes, ``max_seqlen`` and tensor ops only: no value of ``cu_seqlens`` is read.
    """

    def __init__(self, cu_seqlens, total, M, left, right):
        self.total, self.M = total, M
        self.blocks = (total + M - 1) // M
        seq, pos = packed_positions(cu_seqlens, total)
        seq_q, i = self._blocked(seq, -1), self._blocked(pos, 0)  # (blocks, M)
        seq_k, j = self._windows(seq, -2), self._windows(pos, 0)  # (blocks, 3M)
        # One packing: each sequence's key and query lengths agree, so the diagonal offset is 0.
        self.visible = varlen_rule(seq_q[..., None], i[..., None], seq_k[:, None], j[:, None], 0, left, right)

    @classmethod
    def of(cls, cu_seqlens_q, cu_seqlens_k, total_q, total_k, max_seqlen_q, max_seqlen_k, left, right):
        """The band, or None where it cannot be proven from the arguments (or would save nothing)."""
        if cu_seqlens_q is not cu_seqlens_k or total_q != total_k or max_seqlen_q is None or max_seqlen_k is None:
            return None
        M = min(max_seqlen_q, max_seqlen_k)  # both bound the same lengths
        return cls(cu_seqlens_q, total_q, M, left, right) if 0 < M and 3 * M < total_q else None

    def _blocked(self, t, value=0):
        """(total, ...) rows as (blocks, M, ...), padded past the end."""
        return _pad_rows(t, 0, self.blocks * self.M - self.total, value).view(self.blocks, self.M, *t.shape[1:])

    def _windows(self, t, value=0):
        """(total, ...) rows as (blocks, 3M, ...): block b's rows [bM - M, bM + 2M), padded at both ends."""
        padded = _pad_rows(t, self.M, (self.blocks + 1) * self.M - self.total, value)
        return padded.unfold(0, 3 * self.M, self.M).movedim(-1, 1)

    def queries(self, t):
        """(total, heads, D) as (blocks, heads, M, D)."""
        return self._blocked(t).transpose(1, 2)

    def keys(self, t):
        """(total, heads, D) as (blocks, heads, 3M, D)."""
        return self._windows(t).transpose(1, 2)

    def unblock(self, t):
        """(blocks, heads, M, D) back to (total, heads, D)."""
        return t.transpose(1, 2).reshape(self.blocks * self.M, *t.shape[1:2], t.shape[-1])[:self.total]

    def lse_blocks(self, lse, value):
        """(heads, total) as (blocks, heads, M)."""
        padded = torch.nn.functional.pad(lse, (0, self.blocks * self.M - self.total), value=value)
        return padded.view(lse.shape[0], self.blocks, self.M).transpose(0, 1)

    def unblock_lse(self, lse):
        """(blocks, heads, M) back to (heads, total)."""
        return lse.transpose(0, 1).reshape(lse.shape[1], self.blocks * self.M)[:, :self.total]

    def unwindow(self, t):
        """(blocks, heads, 3M, D) key gradients summed back onto (total, heads, D) (windows overlap), fp32."""
        rows = (torch.arange(self.blocks, device=t.device)[:, None] * self.M
                + torch.arange(3 * self.M, device=t.device)).reshape(-1)
        src = t.transpose(1, 2).reshape(-1, *t.shape[1:2], t.shape[-1]).float()
        summed = src.new_zeros((self.blocks + 2) * self.M, *src.shape[1:]).index_add(0, rows, src)
        return summed[self.M:self.M + self.total]


def _varlen_backward_op(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                        scale, window_left, window_right, softcap, sinks):
    if use_triton(q.device):
        if grad_lse is not None:
            grad_lse = grad_lse.contiguous()
        cu = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        dq, dk, dv, dsinks = _backward(grad_out, q, k, v, out, lse, grad_lse,
                                       _varlen_problem(cu, scale, window_left, window_right, softcap, sinks))
        return dq, dk, dv, no_tensor(lse) if dsinks is None else dsinks
    band = _Band.of(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k, window_left,
                    window_right)
    if band is not None:
        dlse = None if grad_lse is None else band.lse_blocks(grad_lse, 0.0)
        dq, dk, dv, dsinks = _attention_backward_reference(
            band.queries(grad_out), band.queries(q), band.keys(k), band.keys(v), band.queries(out),
            band.lse_blocks(lse, float("-inf")), dlse, scale, band.visible, None, softcap, sinks)
        dq = band.unblock(dq).contiguous()
        dk, dv = band.unwindow(dk).to(k.dtype), band.unwindow(dv).to(v.dtype)
    else:
        visible = varlen_visibility(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], window_left, window_right)
        dq, dk, dv, dsinks = _attention_backward_reference(
            _packed(grad_out), _packed(q), _packed(k), _packed(v), _packed(out), _packed(lse),
            None if grad_lse is None else _packed(grad_lse), scale, visible[None], None, softcap, sinks)
        dq, dk, dv = (t[0].transpose(0, 1).contiguous() for t in (dq, dk, dv))
    return dq, dk, dv, no_tensor(lse) if dsinks is None else dsinks


# The features' op arguments (not _FEATURES, the kernels' constexprs, which the launcher reads at run time).
_FEATURE_ARGS = "int window_left=-1, int window_right=-1, float softcap=0.0, Tensor? sinks=None"
_ARGS = f"Tensor q, Tensor k, Tensor v, Tensor? kv_lens, float scale, SymInt? causal_offset, {_FEATURE_ARGS}"
attention_op = define_op("attention", _attention_op, f"({_ARGS}) -> (Tensor, Tensor)")
attention_backward_op = define_op(
    "attention_backward", _attention_backward_op,
    "(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? kv_lens, "
    f"float scale, SymInt? causal_offset, {_FEATURE_ARGS}) -> (Tensor, Tensor, Tensor, Tensor)",
)
_VARLEN_ARGS = ("Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, float scale, "
                "int window_left, int window_right, float softcap, Tensor? sinks")
varlen_op = define_op("varlen_attention", _varlen_op,
                      f"(Tensor q, Tensor k, Tensor v, {_VARLEN_ARGS}) -> (Tensor, Tensor)")
varlen_backward_op = define_op(
    "varlen_attention_backward", _varlen_backward_op,
    "(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
    f"{_VARLEN_ARGS}) -> (Tensor, Tensor, Tensor, Tensor)",
)


def _setup_attention(ctx, inputs, output):
    q, k, v, kv_lens, scale, causal_offset, window_left, window_right, softcap, sinks = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], kv_lens, sinks)
    ctx.args = (scale, causal_offset, window_left, window_right, softcap)
    ctx.set_materialize_grads(False)  # an unused lse (the usual case) hands back None, not zeros


@first_order_only(triton_only_first_order("attention"))
def _attention_grads(ctx, do, dlse):
    q, k, v, o, lse, kv_lens, sinks = ctx.saved_tensors
    if do is None:  # only the lse was used
        do = torch.zeros_like(o)
    dq, dk, dv, dsinks = attention_backward_op(do, dlse, q, k, v, o, lse, kv_lens, *ctx.args, sinks)
    return dq, dk, dv, None, None, None, None, None, None, present(dsinks) if sinks is not None else None


def _setup_varlen(ctx, inputs, output):
    q, k, v, cu_q, cu_k, *args, sinks = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_q, cu_k, sinks)
    ctx.args = tuple(args)
    ctx.set_materialize_grads(False)


@first_order_only(triton_only_first_order("varlen_attention"))
def _varlen_grads(ctx, do, dlse):
    q, k, v, o, lse, cu_q, cu_k, sinks = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv, dsinks = varlen_backward_op(do, dlse, q, k, v, o, lse, cu_q, cu_k, *ctx.args, sinks)
    return (dq, dk, dv) + (None,) * (len(ctx.args) + 2) + (present(dsinks) if sinks is not None else None,)


attention_op.register_autograd(_attention_grads, setup_context=_setup_attention)
varlen_op.register_autograd(_varlen_grads, setup_context=_setup_varlen)
# No register_autocast: like SDPA the ops run in autocast's own dtype, which a fixed cast rule
# cannot name; the public functions cast (autocast_inputs) before calling them.


# ----------------------------------------------------------------------------- public API

_LAYOUTS = {4: "(batch, heads, seq, head_dim)", 3: "(total_tokens, heads, head_dim)"}


def _check(q, k, v, kv_lens, scale, names=("q", "k", "v"), dims=4) -> float:
    """Validate the inputs (errors name the argument); returns the softmax scale.

    ``dims`` 4: the dense layout (batch, heads, seq, head_dim); 3: the packed one.
    """
    qn, kn, vn = names
    for name, t in zip(names, (q, k, v)):
        check_float(name, t)
        if t.dim() != dims:
            raise ValueError(f"{name} must be {dims}-D {_LAYOUTS[dims]}, got shape {tuple(t.shape)}")
    check_same_device(**{qn: q, kn: k, vn: v})
    check_same_dtype(**{qn: q, kn: k, vn: v})
    H, D = q.shape[1], q.shape[-1]
    seq = 2 if dims == 4 else 0
    for name, t in ((kn, k), (vn, v)):
        if dims == 4 and t.shape[0] != q.shape[0]:
            raise ValueError(f"{name} has batch size {t.shape[0]} but {qn} has {q.shape[0]}")
        if t.shape[-1] != D:
            raise ValueError(f"{name} has head dim {t.shape[-1]} but {qn} has {D}")
    if v.shape[1] != k.shape[1] or v.shape[seq] != k.shape[seq]:
        raise ValueError(f"{vn} must have the heads and sequence length of {kn} {(k.shape[1], k.shape[seq])}, "
                         f"got {(v.shape[1], v.shape[seq])}")
    if k.shape[1] == 0 or H % k.shape[1] != 0:
        raise ValueError(f"{qn} heads ({H}) must be a multiple of {kn}/{vn} heads ({k.shape[1]})")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim of {qn} must be between 1 and {MAX_HEAD_DIM}, got {D}")
    if kv_lens is not None:
        B = q.shape[0]
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


def _is_int(x) -> bool:
    return isinstance(x, (int, torch.SymInt)) and not isinstance(x, bool)


def _check_features(q, window_size, softcap, sinks) -> tuple[int, int, float, torch.Tensor | None]:
    """Validate window_size, softcap and sinks; returns (left, right, softcap, sinks as fp32)."""
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(_is_int(w) and w >= -1 for w in window_size)):
        raise ValueError(f"window_size must be (left, right), two ints each -1 (unbounded) or >= 0, "
                         f"got {window_size!r}")
    if (isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap)
            or softcap < 0):
        raise ValueError(f"softcap must be a finite number >= 0 (0 turns it off), got {softcap!r}")
    if sinks is not None:
        check_float("sinks", sinks)
        check_same_device(q=q, sinks=sinks)
        if tuple(sinks.shape) != (q.shape[1],):
            raise ValueError(f"sinks must have shape (heads,) = ({q.shape[1]},), one logit per query head, "
                             f"got {tuple(sinks.shape)}")
        # The kernels' softmax runs in fp32 (autograd casts the gradient back) and reads head h's sink at
        # SINKS + h: a strided one (a column of a (heads, layers) parameter) would read other heads'.
        sinks = sinks.float().contiguous()
    return int(window_size[0]), int(window_size[1]), float(softcap), sinks


def _check_cu_seqlens(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> tuple[int, int]:
    """Validate the packed layout's sequence boundaries; returns (max_seqlen_q, max_seqlen_k).

    Shapes and dtypes always; the values (start at 0, sorted, end at the total, the
    maxima) cost one host sync, made only when :func:`check_values` says so. There a
    missing ``max_seqlen`` is read off ``cu_seqlens``; unchecked, it defaults to the
    total (no sync: the kernels then launch programs that find no rows and return).
    """
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_tensor(name, cu)
        if cu.dtype != torch.int32:
            raise TypeError(f"{name} must be an int32 tensor (flash-attention's convention), got {cu.dtype}")
        if cu.dim() != 1 or cu.shape[0] < 1:
            raise ValueError(f"{name} must be 1-D of length batch + 1 (prefix sums starting at 0), "
                             f"got shape {tuple(cu.shape)}")
        check_same_device(q=q, **{name: cu})
    if cu_seqlens_k.shape[0] != cu_seqlens_q.shape[0]:
        raise ValueError(f"cu_seqlens_k has {cu_seqlens_k.shape[0]} entries but cu_seqlens_q has "
                         f"{cu_seqlens_q.shape[0]}: both must be batch + 1 long")
    maxima = []
    for name, given in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if given is not None and (not _is_int(given) or given < 0):
            raise ValueError(f"{name} must be None or an int >= 0, got {given!r}")
        maxima.append(given)
    if not check_values():
        return (q.shape[0] if maxima[0] is None else maxima[0], k.shape[0] if maxima[1] is None else maxima[1])
    stats = []  # one host sync for every value check of both tensors
    for cu in (cu_seqlens_q, cu_seqlens_k):
        lens = cu[1:] - cu[:-1]
        stats.append(torch.stack([cu[0], cu[-1], lens.min() if len(lens) else cu[0] * 0,
                                  lens.max() if len(lens) else cu[0] * 0]))
    stats = torch.stack(stats).tolist()
    out = []
    for (name, cu_name, total), (first, last, shortest, longest), given in zip(
            (("max_seqlen_q", "cu_seqlens_q", q.shape[0]), ("max_seqlen_k", "cu_seqlens_k", k.shape[0])),
            stats, maxima):
        if first != 0:
            raise ValueError(f"{cu_name} must start at 0, got {first}")
        if shortest < 0:
            raise ValueError(f"{cu_name} must be sorted (non-decreasing prefix sums of the sequence lengths)")
        if last != total:
            raise ValueError(f"{cu_name} must end at the total token count {total} (the first dim of "
                             f"{'q' if cu_name.endswith('q') else 'k/v'}), got {last}")
        if given is not None and given < longest:
            raise ValueError(f"{name} ({given}) is less than the longest sequence in {cu_name} ({longest})")
        out.append(longest if given is None else given)
    return out[0], out[1]


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
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
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
    - ``window_size=(left, right)``: sliding-window (local) attention, flash-attention's
      convention: query i sees keys ``i + Nk - Nq - left <= j <= i + Nk - Nq + right``,
      -1 meaning unbounded on that side. With ``causal`` the right bound is the
      diagonal (right = 0). Key blocks wholly outside the window are never visited.
    - ``softcap > 0``: each scaled score s becomes ``softcap * tanh(s / softcap)``
      before the softmax (Gemma 2), with the exact backward.
    - ``sinks`` (heads,) float: one logit per query head that joins every row's
      softmax denominator with no value (gpt-oss); its gradient is returned. The
      returned lse includes it.
    - ``kv_lens`` (batch,) integer: keys ``j >= kv_lens[b]`` are masked (right
      padding). It does not move the causal or window diagonal, which use the full lengths.
    - A row with no visible key returns zeros, zero gradients and ``lse = -inf``
      (with or without a sink).
    - ``scale`` defaults to ``head_dim ** -0.5``.
    - ``return_lse=True`` also returns the natural-log log-sum-exp of the scaled,
      masked (and capped) scores, (batch, heads, Nq) fp32; it is differentiable.

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
    left, right, softcap, sinks32 = _check_features(q, window_size, softcap, sinks)
    requested_attention_forward()  # a bad FASTLM_ATTENTION is an error on every backend
    if not use_triton(q.device):
        return reference.attention(q, k, v, causal=causal, scale=scale, kv_lens=kv_lens, window_size=(left, right),
                                   softcap=softcap, sinks=sinks, return_lse=return_lse)
    causal_offset = k.shape[2] - q.shape[2] if causal else None
    out, lse = attention_op(q, k, v, _kv_lens_int32(kv_lens), scale, causal_offset, left, right, softcap, sinks32)
    return (out, lse) if return_lse else out


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    *,
    causal: bool = False,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over packed sequences, flash-attention's ``flash_attn_varlen_func`` convention.

    ``q`` is (total_q, heads, head_dim), ``k``/``v`` (total_k, kv_heads, head_dim);
    ``cu_seqlens_q``/``cu_seqlens_k`` are int32 prefix sums of length batch + 1
    (sequence b is rows ``cu_seqlens[b]:cu_seqlens[b + 1]``; no sequence sees
    another). Lengths 0 and 1 are legal. Causal masks and windows are aligned
    bottom-right within each sequence (offset ``len_k - len_q``); ``window_size``,
    ``softcap``, ``sinks``, ``scale``, GQA and the backward are as in :func:`attention`.
    ``return_lse=True`` also returns the lse as (heads, total_q) fp32, flash-attention's layout.

    ``max_seqlen_q``/``max_seqlen_k`` (the longest sequences) size the launch grid. The
    value checks of ``cu_seqlens`` (starts at 0, sorted, ends at the total, maxima)
    cost one host sync, skipped inside :func:`kernels.unchecked` and under
    ``torch.compile``; there pass the maxima (without them the grid covers the
    totals: correct, but slower). Unchecked, malformed values give an undefined
    result but no out-of-bounds access: the kernels clamp each sequence into the
    packed rows and its length to the maxima (:func:`_packed_span`).
    """
    q, k, v = _autocast(q, k, v)
    scale = _check(q, k, v, None, scale, dims=3)
    left, right, softcap, sinks32 = _check_features(q, window_size, softcap, sinks)
    max_seqlen_q, max_seqlen_k = _check_cu_seqlens(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if not use_triton(q.device) and check_values():
        return reference.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                          causal=causal, scale=scale, window_size=(left, right), softcap=softcap,
                                          sinks=sinks, return_lse=return_lse)
    left, right = window_bounds(causal, (left, right))
    if not use_triton(q.device):
        # The reference's loop reads cu_seqlens on the host: under kernels.unchecked() and
        # torch.compile the ops' twin (banded where it can be) runs instead (no sync, traceable), plain
        # torch ops, differentiable to any order.
        out, lse = _varlen_twin(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left, right,
                                softcap, sinks)
        return (out, lse) if return_lse else out
    out, lse = varlen_op(q, k, v, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), max_seqlen_q, max_seqlen_k,
                         scale, left, right, softcap, sinks32)
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
    if not all(t.dtype in FLOAT_DTYPES for t in tensors):
        return "a dtype other than float32, float16 or bfloat16"
    if value.shape[-1] != query.shape[-1]:
        return "a value head dim different from the query's"
    if not enable_gqa and key.shape[1] != query.shape[1]:
        return "different query and key heads without enable_gqa=True"
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        return "a non-positive scale"
    if query.shape[-1] > MAX_HEAD_DIM:
        return f"head dim above {MAX_HEAD_DIM}"
    return None


def _broadcast_batch(query, key, value):
    """The three expanded to one batch size where the others' is 1, as torch's SDPA broadcasts them.

    Stride 0 along the batch, no copy (the kernels take any strides); autograd sums the
    broadcast gradients. Batch sizes that do not broadcast are left for the checks to name.
    """
    batch = max(t.shape[0] for t in (query, key, value))
    if all(t.shape[0] in (1, batch) for t in (query, key, value)):
        return tuple(t.expand(batch, *t.shape[1:]) for t in (query, key, value))
    return query, key, value


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
    and key lengths differ (query i sees keys j <= i), and its broadcast of a batch of
    1 against the others'. What the kernel does not cover (an explicit ``attn_mask``,
    dropout, 3-D or 5-D inputs, float64, a value head dim different from the query's,
    head dims over 256) runs torch's own function, with a warning the first time each
    reason occurs.
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
    query, key, value = _broadcast_batch(*_autocast(query, key, value))
    scale = _check(query, key, value, None, scale, names=("query", "key", "value"))
    if not use_triton(query.device):
        return reference.scaled_dot_product_attention(query, key, value, is_causal=is_causal, scale=scale,
                                                      enable_gqa=enable_gqa)
    # Top-left alignment is causal offset 0: the same kernels as attention(causal=True).
    return attention_op(query, key, value, None, scale, 0 if is_causal else None)[0]


# The experimental Gluon forward (used by _forward and compile_specs above) calls this module's
# _key_range, so it is imported once everything here is defined.
from . import _attention_gluon  # noqa: E402
