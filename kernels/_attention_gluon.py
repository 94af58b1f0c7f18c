"""An experimental attention forward for Hopper (sm_90) in Triton's Gluon dialect.

Opt-in (``FASTLM_ATTENTION=gluon``, see :mod:`kernels._backend`), off by default, and
so far built and read only by the compiler (``python -m bench.compile``), never run
on a GPU. It produces what ``kernels.attention``'s Triton forward produces, ``o``
and the natural-log ``lse`` (B, H, Nq) fp32, so the Triton backward consumes them
unchanged. Where it does not apply (see :func:`qualifies`) the Triton forward runs.

The design is FlashAttention-3's, written out by hand where Triton's compiler
decides for itself. 128 query rows per program, 64 per consumer warpgroup:

- Q, and K and V tiles through a ring of ``STAGES`` shared-memory buffers, by TMA
  (4-D (B, H, N, D) descriptors of one (rows, D) tile; rows past N read as zero,
  rows of O past N are not written), each buffer with an mbarrier for K and one for V.
- Async wgmma with one group in flight: tile j's ``S = Q K_j^T`` and the previous
  tile's ``O += P_{j-1} V_{j-1}`` are issued back to back, the wait for one group
  outstanding returns S while the P V product still runs, and the softmax of tile j
  overlaps it. P goes to the second wgmma from registers.
- Only boundary tiles (the causal diagonal, the partial last tile) apply the mask.
- Two ways to run it, both autotune candidates (``WARP_SPECIALIZE``):
  not specialized (:func:`_forward_inline`), 8 warps that also issue the loads,
  ``STAGES - 1`` tiles ahead, refilling a slot once every warpgroup has waited for
  the wgmma that read it (a block barrier); warp-specialized (``gl.warp_specialize``),
  a one-warp TMA producer (:func:`_producer`, 24 registers) that refills a slot when
  both consumers give it back (``k_free``/``v_free`` mbarriers), and two consumer
  partitions (:func:`_consumer`, 240+ registers) that take turns issuing their
  wgmma (ping-pong on two ``turn`` mbarriers), so that one's softmax runs under the
  other's matrix products.

The math is :func:`kernels.attention._softmax_step` and ``_fwd_finish``'s: the exp2
domain (``qk_scale = scale * log2(e)``), a row with no visible key keeps ``m = -inf``,
gets output 0 and ``lse = -inf``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

from ._launch import KernelSpec
from .attention import _key_range  # a @triton.jit of scalars, which Gluon calls as its own (see attention's end)

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                   warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as _GluonDescriptor

    # The TMA copies were renamed (3.6: async_copy_global_to_shared / async_copy_shared_to_global;
    # 3.8: async_load / async_store; 3.9 keeps only the new names, the old ones raise).
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    _cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier  # 3.6: thread_barrier; 3.8: barrier
    # Built and read (bench.compile) with Triton 3.6, 3.8 and 3.9; Gluon's API moved a lot before 3.6
    # (warp_specialize's signature among others), so older releases take the Triton forward.
    _RELEASE = tuple(int(part) for part in triton.__version__.split(".")[:2])
    _MISSING = [name for name in ("NVMMADistributedLayout", "NVMMASharedLayout", "DotOperandLayout", "SliceLayout",
                                  "allocate_shared_memory", "warp_specialize", "to_tensor", "num_warps")
                if not hasattr(gl, name)]
    AVAILABLE = _RELEASE >= (3, 6) and not _MISSING
    UNAVAILABLE_REASON = ("" if AVAILABLE else f"Triton {triton.__version__} is older than 3.6" if _RELEASE < (3, 6)
                          else f"this Triton's Gluon lacks {', '.join(_MISSING)}")
except (ImportError, AttributeError, ValueError) as e:  # a Triton without Gluon's Hopper API: the Triton forward runs
    AVAILABLE = False
    UNAVAILABLE_REASON = f"this Triton has no usable Gluon Hopper API ({type(e).__name__}: {e})"

HEAD_DIMS = (64, 128)

if AVAILABLE:

    @gluon.constexpr_function
    def _mma_layout(num_warps, n):
        """The wgmma accumulator layout of a (rows, n) tile over ``num_warps`` warps: a warpgroup per 64 rows."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, n, 16])

    @gluon.jit
    def _load_tile(desc, smem, bars, b, hk, tile, STAGES: gl.constexpr, BLOCK_N: gl.constexpr):
        # Key tile ``tile`` of K or V into ring slot tile % STAGES, signalling that slot's barrier.
        slot = tile % STAGES
        mbarrier.expect(bars.index(slot), desc.block_type.nbytes)
        _tma_load(desc, [b, hk, tile * BLOCK_N, 0], bars.index(slot), smem.index(slot))

    @gluon.jit
    def _masked(s, row0, start_n, Nk, causal_offset, CAUSAL: gl.constexpr):
        # Keys past Nk (TMA's zero fill) and, causal, past each row's diagonal: -inf. Rows from row0.
        keys = start_n + gl.arange(0, s.shape[1], layout=gl.SliceLayout(0, s.type.layout))
        visible = keys[None, :] < Nk
        if CAUSAL:
            rows = row0 + gl.arange(0, s.shape[0], layout=gl.SliceLayout(1, s.type.layout))
            visible = visible & (keys[None, :] <= rows[:, None] + causal_offset)
        return gl.where(visible, s, float("-inf"))

    @gluon.jit
    def _softmax(s, m_i, l_i, qk_scale):
        """One tile of the online softmax on unscaled scores ``s`` (-inf where masked): (p, alpha, m, l)."""
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: p = 0, no NaN
        p = gl.exp2(s * qk_scale - m_use[:, None])
        alpha = gl.exp2(m_i - m_use)
        return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)

    @gluon.jit
    def _ring_tile(smem, bars, tile):
        """Wait for key tile ``tile`` in its slot of a K or V ring; the (BLOCK_N, BLOCK_D) view of it."""
        STAGES: gl.constexpr = smem.shape[0]
        slot = tile % STAGES
        mbarrier.wait(bars.index(slot), (tile // STAGES) & 1)
        return smem.index(slot).reshape([smem.shape[3], smem.shape[4]])

    @gluon.jit
    def _issue_scores(q, k_smem, k_bars, tile, s_zero):
        """Issue S = Q K^T of key tile ``tile``, async: (its token, the K view)."""
        k = _ring_tile(k_smem, k_bars, tile)
        return warpgroup_mma(q, k.permute((1, 0)), s_zero, use_acc=False, is_async=True), k

    @gluon.jit
    def _issue_pv(p, v_smem, v_bars, tile, acc):
        """Issue O += P V of key tile ``tile``, async, P from registers: (its token, the V view, the P operand:
        registers the wgmma reads until it is waited for, so the wait takes them as a dependency too)."""
        v = _ring_tile(v_smem, v_bars, tile)
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc.type.layout, k_width=2)
        p = gl.convert_layout(p.to(v_smem.dtype), p_layout)
        return warpgroup_mma(p, v, acc, is_async=True), v, p

    @gluon.jit
    def _tile_softmax(s, m_i, l_i, qk_scale, row0, tile, full_end, Nk, causal_offset, CAUSAL: gl.constexpr):
        """Key tile ``tile``'s scores through the online softmax, masked if it is a boundary tile."""
        start_n = tile * s.shape[1]
        if start_n >= full_end:
            s = _masked(s, row0, start_n, Nk, causal_offset, CAUSAL)
        return _softmax(s, m_i, l_i, qk_scale)

    @gluon.jit
    def _rescaled(acc, alpha):
        return acc * gl.convert_layout(alpha, gl.SliceLayout(1, acc.type.layout))[:, None]

    @gluon.jit
    def _finish(acc, m_i, l_i, o_smem, desc_o, LSE, rows, b, h, H, Nq, o_row, o_layout: gl.constexpr):
        """As _fwd_finish: O = acc / l out through ``o_smem`` by TMA (rows past Nq are dropped), lse = m + log l
        in natural log; rows with no visible key (l = 0) get output 0 and lse = -inf."""
        l_safe = gl.where(l_i == 0.0, 1.0, l_i)
        lse = gl.where(l_i == 0.0, float("-inf"), (m_i + gl.log2(l_safe)) * 0.6931471805599453)
        out = acc / gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout))[:, None]
        gl.store(LSE + (b * H + h).to(gl.int64) * Nq + rows, lse, mask=rows < Nq)
        o_smem.reshape([acc.shape[0], acc.shape[1]]).store(out.to(desc_o.dtype))
        fence_async_shared()
        _tma_store(desc_o, [b, h, o_row, 0], o_smem)
        tma.store_wait(0)

    @gluon.jit
    def _attn_fwd_gluon_kernel(desc_q, desc_k, desc_v, desc_o, LSE, H, group, Nq, Nk, causal_offset, qk_scale,
                               tune_nq, tune_nk,  # sequence-length buckets: only the autotuner's key reads them
                               BLOCK_D: gl.constexpr, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr,
                               BLOCK_N: gl.constexpr, STAGES: gl.constexpr, WARP_SPECIALIZE: gl.constexpr):
        pid_m = gl.program_id(0)
        if CAUSAL:
            pid_m = gl.num_programs(0) - 1 - pid_m  # longest rows first: a shorter tail
        h = gl.program_id(1)
        b = gl.program_id(2)
        start_m = pid_m * BLOCK_M
        # Keys [0, end) are visited; tiles from full_end on need the mask (the diagonal, the partial end):
        # the Triton forward's own bounds (no window, kv_len = Nk).
        _, _, full_end, end = _key_range(start_m, Nq, Nk, causal_offset, 0, CAUSAL, False, BLOCK_M, BLOCK_N)
        n_tiles = gl.cdiv(end, BLOCK_N)

        dtype: gl.constexpr = desc_q.dtype
        HALVES: gl.constexpr = 2 if WARP_SPECIALIZE else 1  # Q/O tiles: one per consumer warpgroup
        q_smem = gl.allocate_shared_memory(dtype, [HALVES] + desc_q.block_type.shape, desc_q.layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES] + desc_k.block_type.shape, desc_k.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES] + desc_v.block_type.shape, desc_v.layout)
        q_bars = gl.allocate_shared_memory(gl.int64, [HALVES, 1], mbarrier.MBarrierLayout())
        k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(HALVES):
            mbarrier.init(q_bars.index(i), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_bars.index(i), count=1)
            mbarrier.init(v_bars.index(i), count=1)
        if WARP_SPECIALIZE:
            # The consumers give a ring slot back on these (count 2: both must), and take turns issuing
            # their wgmma on ``turn`` (consumer 0 first: one arrival now).
            k_free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            v_free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
            for i in gl.static_range(STAGES):
                mbarrier.init(k_free.index(i), count=2)
                mbarrier.init(v_free.index(i), count=2)
            mbarrier.init(turn.index(0), count=1)
            mbarrier.init(turn.index(1), count=1)
            fence_async_shared()
            mbarrier.arrive(turn.index(0))
            # A partition takes values, not constexprs: the tile sizes come from the descriptors and the
            # ring, the consumer's index is a value, and non-causal masks no diagonal (offset Nk).
            mask_offset = causal_offset if CAUSAL else Nk
            ws_args = (desc_q, desc_k, desc_v, desc_o, LSE, H, b, h, h // group, start_m, n_tiles, full_end, Nq, Nk,
                       mask_offset, qk_scale, q_smem, k_smem, v_smem, q_bars, k_bars, v_bars, k_free, v_free, turn)
            gl.warp_specialize([(_consumer, ws_args + (gl.to_tensor(0),)), (_consumer, ws_args + (gl.to_tensor(1),)),
                                (_producer, ws_args)], [4, 1], [240, 24])
        else:
            fence_async_shared()
            _forward_inline(desc_q, desc_k, desc_v, desc_o, LSE, H, b, h, h // group, start_m, n_tiles, full_end, Nq,
                            Nk, causal_offset, qk_scale, q_smem, k_smem, v_smem, q_bars, k_bars, v_bars,
                            BLOCK_D, CAUSAL, BLOCK_N, STAGES)

    @gluon.jit
    def _forward_inline(desc_q, desc_k, desc_v, desc_o, LSE, H, b, h, hk, start_m, n_tiles, full_end, Nq, Nk,
                        causal_offset, qk_scale, q_smem, k_smem, v_smem, q_bars, k_bars, v_bars,
                        BLOCK_D: gl.constexpr, CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
        """Not specialized: the num_warps // 4 warpgroups (64 query rows each) issue the TMA loads themselves."""
        BLOCK_M: gl.constexpr = desc_q.block_type.shape[2]
        s_layout: gl.constexpr = _mma_layout(gl.num_warps(), BLOCK_N)
        o_layout: gl.constexpr = _mma_layout(gl.num_warps(), BLOCK_D)
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)

        q_smem = q_smem.index(0)
        mbarrier.expect(q_bars.index(0), desc_q.block_type.nbytes)
        _tma_load(desc_q, [b, h, start_m, 0], q_bars.index(0), q_smem)
        for i in gl.static_range(STAGES):
            if i < n_tiles:
                _load_tile(desc_k, k_smem, k_bars, b, hk, i, STAGES, BLOCK_N)
                _load_tile(desc_v, v_smem, v_bars, b, hk, i, STAGES, BLOCK_N)

        q = q_smem.reshape([BLOCK_M, BLOCK_D])
        rows = start_m + gl.arange(0, BLOCK_M, layout=row_layout)
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_layout)
        l_i = gl.full([BLOCK_M], 0.0, gl.float32, layout=row_layout)
        acc = gl.zeros([BLOCK_M, BLOCK_D], gl.float32, layout=o_layout)
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
        mbarrier.wait(q_bars.index(0), 0)

        if n_tiles > 0:
            # Tile 0: scores and softmax; its P V product joins the next tile's wgmma.
            s, k = _issue_scores(q, k_smem, k_bars, 0, s_zero)
            s = warpgroup_mma_wait(0, deps=[s, q, k])[0]
            p, alpha, m_i, l_i = _tile_softmax(s, m_i, l_i, qk_scale, start_m, 0, full_end, Nk, causal_offset, CAUSAL)
            for j in range(1, n_tiles):
                s, k = _issue_scores(q, k_smem, k_bars, j, s_zero)
                acc, v, p_op = _issue_pv(p, v_smem, v_bars, j - 1, acc)
                # One group left in flight: S_j is ready, P_{j-1} V_{j-1} still runs under the softmax.
                s = warpgroup_mma_wait(1, deps=[s, q, k])[0]
                p, alpha, m_i, l_i = _tile_softmax(s, m_i, l_i, qk_scale, start_m, j, full_end, Nk, causal_offset,
                                                   CAUSAL)
                acc = warpgroup_mma_wait(0, deps=[acc, v, p_op])[0]
                # Slot (j - 1) % STAGES is read by no wgmma any more (in any warpgroup: the barrier): refill it.
                _cta_barrier()
                if j - 1 + STAGES < n_tiles:
                    _load_tile(desc_k, k_smem, k_bars, b, hk, j - 1 + STAGES, STAGES, BLOCK_N)
                    _load_tile(desc_v, v_smem, v_bars, b, hk, j - 1 + STAGES, STAGES, BLOCK_N)
                acc = _rescaled(acc, alpha)
            acc, v, p_op = _issue_pv(p, v_smem, v_bars, n_tiles - 1, acc)
            acc = warpgroup_mma_wait(0, deps=[acc, v, p_op])[0]
        # Q is read by no wgmma any more: its buffer stages O.
        _finish(acc, m_i, l_i, q_smem, desc_o, LSE, rows, b, h, H, Nq, start_m, o_layout)

    @gluon.jit
    def _producer(desc_q, desc_k, desc_v, desc_o, LSE, H, b, h, hk, start_m, n_tiles, full_end, Nq, Nk,
                  mask_offset, qk_scale, q_smem, k_smem, v_smem, q_bars, k_bars, v_bars, k_free, v_free, turn):
        """The load warp: both consumers' Q tiles, then K and V tile after tile into the ring, each into a
        slot both consumers have given back (k_free / v_free) from the second round on."""
        HALF_M: gl.constexpr = desc_q.block_type.shape[2]
        BLOCK_N: gl.constexpr = desc_k.block_type.shape[2]
        STAGES: gl.constexpr = k_smem.shape[0]
        for c in gl.static_range(2):
            mbarrier.expect(q_bars.index(c), desc_q.block_type.nbytes)
            _tma_load(desc_q, [b, h, start_m + c * HALF_M, 0], q_bars.index(c), q_smem.index(c))
        for t in range(n_tiles):
            slot = t % STAGES
            free_phase = ((t // STAGES) & 1) ^ 1  # the release of tile t - STAGES
            mbarrier.wait(k_free.index(slot), free_phase, pred=t >= STAGES)
            _load_tile(desc_k, k_smem, k_bars, b, hk, t, STAGES, BLOCK_N)
            mbarrier.wait(v_free.index(slot), free_phase, pred=t >= STAGES)
            _load_tile(desc_v, v_smem, v_bars, b, hk, t, STAGES, BLOCK_N)

    @gluon.jit
    def _consumer(desc_q, desc_k, desc_v, desc_o, LSE, H, b, h, hk, start_m, n_tiles, full_end, Nq, Nk,
                  mask_offset, qk_scale, q_smem, k_smem, v_smem, q_bars, k_bars, v_bars, k_free, v_free, turn, C):
        """Consumer warpgroup C (0 or 1): query rows [start_m + 64 C, + 64). The two take turns issuing their
        wgmma (``turn``: C waits for its own barrier, issues, arrives on the other's), so one's softmax runs
        while the other's matrix products do (ping-pong); within each, tile j's Q K^T and tile j-1's P V
        go out together and the softmax of S_j overlaps P V, as in the inline loop. Boundary tiles mask
        keys past Nk and past ``row + mask_offset`` (the diagonal; Nk when not causal: none)."""
        HALF_M: gl.constexpr = desc_q.block_type.shape[2]
        BLOCK_N: gl.constexpr = desc_k.block_type.shape[2]
        BLOCK_D: gl.constexpr = desc_k.block_type.shape[3]
        STAGES: gl.constexpr = k_smem.shape[0]
        s_layout: gl.constexpr = _mma_layout(gl.num_warps(), BLOCK_N)
        o_layout: gl.constexpr = _mma_layout(gl.num_warps(), BLOCK_D)
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        mine = turn.index(C)
        other = turn.index(1 - C)

        q_smem = q_smem.index(C)
        q = q_smem.reshape([HALF_M, BLOCK_D])
        row0 = start_m + C * HALF_M
        rows = row0 + gl.arange(0, HALF_M, layout=row_layout)
        m_i = gl.full([HALF_M], float("-inf"), gl.float32, layout=row_layout)
        l_i = gl.full([HALF_M], 0.0, gl.float32, layout=row_layout)
        acc = gl.zeros([HALF_M, BLOCK_D], gl.float32, layout=o_layout)
        s_zero = gl.zeros([HALF_M, BLOCK_N], gl.float32, layout=s_layout)
        mbarrier.wait(q_bars.index(C), 0)

        if n_tiles > 0:
            # Turn 0: tile 0's scores.
            mbarrier.wait(mine, 0)
            s, k = _issue_scores(q, k_smem, k_bars, 0, s_zero)
            mbarrier.arrive(other)
            s = warpgroup_mma_wait(0, deps=[s, q, k])[0]
            mbarrier.arrive(k_free.index(0))
            p, alpha, m_i, l_i = _tile_softmax(s, m_i, l_i, qk_scale, row0, 0, full_end, Nk, mask_offset, True)
            for j in range(1, n_tiles):
                mbarrier.wait(mine, j & 1)  # turn j
                s, k = _issue_scores(q, k_smem, k_bars, j, s_zero)
                acc, v, p_op = _issue_pv(p, v_smem, v_bars, j - 1, acc)
                mbarrier.arrive(other)
                s = warpgroup_mma_wait(1, deps=[s, q, k])[0]  # S_j ready, P V in flight
                mbarrier.arrive(k_free.index(j % STAGES))
                p, alpha, m_i, l_i = _tile_softmax(s, m_i, l_i, qk_scale, row0, j, full_end, Nk, mask_offset, True)
                acc = warpgroup_mma_wait(0, deps=[acc, v, p_op])[0]
                mbarrier.arrive(v_free.index((j - 1) % STAGES))
                acc = _rescaled(acc, alpha)
            # Turn n_tiles: the last tile's P V.
            mbarrier.wait(mine, n_tiles & 1)
            acc, v, p_op = _issue_pv(p, v_smem, v_bars, n_tiles - 1, acc)
            mbarrier.arrive(other)
            acc = warpgroup_mma_wait(0, deps=[acc, v, p_op])[0]
            mbarrier.arrive(v_free.index((n_tiles - 1) % STAGES))
        _finish(acc, m_i, l_i, q_smem, desc_o, LSE, rows, b, h, H, Nq, row0, o_layout)


# ----------------------------------------------------------------------------- launcher


@dataclass(frozen=True)
class GluonConfig:
    """One launch configuration: BLOCK_M query rows, BLOCK_N keys a tile, a ring of STAGES K and V tiles.

    Not warp-specialized: num_warps = BLOCK_M / 16 (a warpgroup per 64 rows), which also issue the
    loads. Warp-specialized: BLOCK_M = 128, two consumer warpgroups of 64 rows (the default partition
    of 4 warps and a 4-warp worker) and a 1-warp TMA producer; Q and O move in 64-row tiles.
    """

    block_m: int
    block_n: int
    stages: int
    warp_specialize: bool = False

    @property
    def num_warps(self) -> int:
        return 4 if self.warp_specialize else self.block_m // 16

    def rows(self, descriptor: str) -> int:
        """The tile rows of descriptor ``desc_q``, ``desc_k``, ``desc_v`` or ``desc_o``."""
        if descriptor in ("desc_k", "desc_v"):
            return self.block_n
        return self.block_m // 2 if self.warp_specialize else self.block_m


# Autotune candidates per head dim: FlashAttention-3's 128 query rows (two consumer warpgroups),
# warp-specialized (a producer warp, ping-pong consumers) or not. Shared memory: Q (128 x D) and
# STAGES x (K + V) tiles of BLOCK_N x D, 16-bit: 160 KB at D=128 (128, 128, 2). Each is compiled by
# compile_specs() and none spills; the specialized D=128 one has 64-key tiles because with 128 its
# consumers spill (8-32 bytes: the two get ~240 registers each, the unspecialized loop takes 246).
# Few, since a GPU's first run compiles each.
CONFIGS = {
    64: [GluonConfig(128, 128, 3), GluonConfig(128, 128, 3, True)],
    128: [GluonConfig(128, 128, 2), GluonConfig(128, 64, 3), GluonConfig(128, 64, 4, True)],
}
DESCRIPTORS = ("desc_q", "desc_k", "desc_v", "desc_o")


def _gl_dtype(dtype: torch.dtype):
    return {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[dtype]


def _layout(rows: int, head_dim: int, dtype: torch.dtype):
    """The shared-memory layout TMA writes one (rows, head_dim) tile of a (B, H, N, D) tensor in (and wgmma reads)."""
    return gl.NVMMASharedLayout.get_default_for([1, 1, rows, head_dim], _gl_dtype(dtype))


def _config(meta: dict) -> GluonConfig:
    return GluonConfig(meta["BLOCK_M"], meta["BLOCK_N"], meta["STAGES"], meta["WARP_SPECIALIZE"])


def _set_block_shapes(nargs: dict) -> None:
    """Autotuner pre-hook: each configuration's tile rows into the four descriptors."""
    config = _config(nargs)
    for name in DESCRIPTORS:
        desc = nargs[name]
        desc.block_shape = [1, 1, config.rows(name), nargs["BLOCK_D"]]
        desc.layout = _layout(config.rows(name), nargs["BLOCK_D"], desc.base.dtype)


def _meta(c: GluonConfig) -> dict:
    return {"BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "STAGES": c.stages, "WARP_SPECIALIZE": c.warp_specialize}


@functools.lru_cache(maxsize=None)
def _autotuned(head_dim: int):
    configs = [triton.Config(_meta(c), num_warps=c.num_warps, num_stages=1, pre_hook=_set_block_shapes)
               for c in CONFIGS[head_dim]]
    return triton.autotune(configs=configs, key=["BLOCK_D", "CAUSAL", "tune_nq", "tune_nk"])(_attn_fwd_gluon_kernel)


def qualifies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the Gluon forward can run these dense (B, H, N, D) inputs: this Triton has the Gluon API,
    a Hopper GPU (wgmma is sm_90a's: not Ampere, not Blackwell), 16-bit, head dim 64 or 128, real
    (not fake or traced) tensors. The caller checks TMA alignment and the mask features."""
    return (AVAILABLE and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in HEAD_DIMS
            and torch._guards.detect_fake_mode((q, k, v)) is None and not torch.compiler.is_compiling()
            and torch.cuda.get_device_capability(q.device)[0] == 9)


def forward(q, k, v, o, lse, causal: bool, causal_offset: int, qk_scale: float, tune_nq: int, tune_nk: int) -> None:
    """Fill ``o`` (q's shape) and ``lse`` ((B, H, Nq) fp32, contiguous) for dense inputs :func:`qualifies` accepts."""
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    descriptors = [_GluonDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 64, D], _layout(64, D, t.dtype))
                   for t in (q, k, v, o)]  # the rows are set per configuration (_set_block_shapes)
    _autotuned(D)[lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]), H, B)](
        *descriptors, lse, H, H // Hkv, Nq, Nk, causal_offset, qk_scale, tune_nq, tune_nk, BLOCK_D=D, CAUSAL=causal)


# ----------------------------------------------------------------------------- compile check


def descriptor_type(dtype: torch.dtype, rows: int, head_dim: int) -> str:
    """``triton.compile``'s signature type of one (B, H, N, D) descriptor of (rows, head_dim) tiles."""
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    return f"tensordesc<{name}[1, 1, {rows}, {head_dim}],{_layout(rows, head_dim, dtype)!r}>"


def compile_specs() -> list[KernelSpec]:
    """Every configuration :func:`forward` can launch, for sm_90 only (``bench.compile``, quick: bf16)."""
    if not AVAILABLE:
        return []
    specs = []
    for dtype in (torch.bfloat16, torch.float16):
        for head_dim, configs in CONFIGS.items():
            for causal in (False, True):
                for c in configs:
                    consts = {"BLOCK_D": head_dim, "CAUSAL": causal, **_meta(c)}
                    sig = {name: "constexpr" if name in consts
                           else descriptor_type(dtype, c.rows(name), head_dim)
                           if name in DESCRIPTORS else "*fp32" if name == "LSE"
                           else "fp32" if name == "qk_scale" else "i32"
                           for name in _attn_fwd_gluon_kernel.arg_names}
                    specs.append(KernelSpec(
                        _attn_fwd_gluon_kernel, sig, consts, c.num_warps, 1,
                        label=f"fwd_gluon D={head_dim} {'causal' if causal else 'full'} {dtype}",
                        extra={"divisible_by_16": ("LSE",), "targets": (90,), "quick": True},
                    ))
    return specs
