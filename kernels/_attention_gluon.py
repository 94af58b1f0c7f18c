"""An experimental attention forward for Hopper (sm_90) in Triton's Gluon dialect.

Opt-in (``FASTLM_ATTENTION=gluon``, see :mod:`kernels._backend`), off by default, and
so far built and read only by the compiler (``python -m bench.compile``), never run
on a GPU. It produces what ``kernels.attention``'s Triton forward produces, ``o``
and the natural-log ``lse`` (B, H, Nq) fp32, so the Triton backward consumes them
unchanged. Where it does not apply (see :func:`qualifies`) the Triton forward runs.

The design is FlashAttention-3's, written out by hand where Triton's compiler
decides for itself:

- Q once, and K and V tiles through a ring of ``STAGES`` shared-memory buffers, by
  TMA (4-D (B, H, N, D) descriptors of one (rows, D) tile; rows past N read as zero,
  rows of O past N are not written), each buffer with its own mbarrier for K and for V.
- One warpgroup (4 warps) per 64 query rows; ``num_warps=8`` gives BLOCK_M=128, two
  consumer warpgroups.
- Async wgmma with one group in flight: tile j's ``S = Q K_j^T`` and the previous
  tile's ``O += P_{j-1} V_{j-1}`` are issued back to back, the wait for one group
  outstanding returns S while the P V product still runs, and the softmax of tile j
  overlaps it. P goes to the second wgmma from registers.
- The loads run ``STAGES - 1`` tiles ahead: a slot is refilled as soon as the wgmma
  that read it has been waited for.
- Only boundary tiles (the causal diagonal, the partial last tile) apply the mask.

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
from .attention import _key_range  # a @triton.jit of scalars, which Gluon calls as its own

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
    AVAILABLE = all(hasattr(gl, name) for name in ("NVMMADistributedLayout", "NVMMASharedLayout", "DotOperandLayout",
                                                   "SliceLayout", "allocate_shared_memory", "warp_specialize"))
    UNAVAILABLE_REASON = "" if AVAILABLE else "this Triton's Gluon lacks a layout or builtin the kernel uses"
except (ImportError, AttributeError) as e:  # a Triton without Gluon's Hopper API: the Triton forward runs
    AVAILABLE = False
    UNAVAILABLE_REASON = f"this Triton has no usable Gluon Hopper API ({type(e).__name__}: {e})"

HEAD_DIMS = (64, 128)
LOG2E = 1.4426950408889634

if AVAILABLE:

    @gluon.jit
    def _load_kv(desc_k, desc_v, k_smem, v_smem, k_bars, v_bars, b, hk, tile, STAGES: gl.constexpr,
                 BLOCK_N: gl.constexpr):
        # Tile ``tile`` of K and of V into ring slot tile % STAGES, each signalling its own barrier.
        slot = tile % STAGES
        mbarrier.expect(k_bars.index(slot), desc_k.block_type.nbytes)
        _tma_load(desc_k, [b, hk, tile * BLOCK_N, 0], k_bars.index(slot), k_smem.index(slot))
        mbarrier.expect(v_bars.index(slot), desc_v.block_type.nbytes)
        _tma_load(desc_v, [b, hk, tile * BLOCK_N, 0], v_bars.index(slot), v_smem.index(slot))

    @gluon.jit
    def _masked(s, rows, start_n, cols, Nk, causal_offset, CAUSAL: gl.constexpr):
        # Keys past Nk (TMA's zero fill) and, causal, past each row's diagonal: -inf.
        keys = start_n + cols
        visible = keys[None, :] < Nk
        if CAUSAL:
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
    def _attn_fwd_gluon_kernel(desc_q, desc_k, desc_v, desc_o, LSE, H, group, Nq, Nk, causal_offset, qk_scale,
                         tune_nq, tune_nk,  # sequence-length buckets: only the autotuner's cache key reads them
                         BLOCK_D: gl.constexpr, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr,
                         BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
        NUM_WARPS: gl.constexpr = gl.num_warps()
        dtype: gl.constexpr = desc_q.dtype
        # Warpgroup MMA layouts: NUM_WARPS // 4 warpgroups of 64 rows each along M.
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                           instr_shape=[16, BLOCK_D, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)

        pid_m = gl.program_id(0)
        if CAUSAL:
            pid_m = gl.num_programs(0) - 1 - pid_m  # longest rows first: a shorter tail
        h = gl.program_id(1)
        b = gl.program_id(2)
        hk = h // group
        start_m = pid_m * BLOCK_M

        # Keys [0, end) are visited; tiles from full_end on need the mask (the diagonal, the partial end):
        # the Triton forward's own bounds (no window, kv_len = Nk).
        _, _, full_end, end = _key_range(start_m, Nq, Nk, causal_offset, 0, CAUSAL, False, BLOCK_M, BLOCK_N)
        n_tiles = gl.cdiv(end, BLOCK_N)

        q_smem = gl.allocate_shared_memory(dtype, desc_q.block_type.shape, desc_q.layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES] + desc_k.block_type.shape, desc_k.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES] + desc_v.block_type.shape, desc_v.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_bars.index(i), count=1)
            mbarrier.init(v_bars.index(i), count=1)
        fence_async_shared()

        mbarrier.expect(q_bar, desc_q.block_type.nbytes)
        _tma_load(desc_q, [b, h, start_m, 0], q_bar, q_smem)
        for i in gl.static_range(STAGES):
            if i < n_tiles:
                _load_kv(desc_k, desc_v, k_smem, v_smem, k_bars, v_bars, b, hk, i, STAGES, BLOCK_N)

        q = q_smem.reshape([BLOCK_M, BLOCK_D])
        rows = start_m + gl.arange(0, BLOCK_M, layout=row_layout)
        cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_layout)
        l_i = gl.full([BLOCK_M], 0.0, gl.float32, layout=row_layout)
        acc = gl.zeros([BLOCK_M, BLOCK_D], gl.float32, layout=o_layout)
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
        mbarrier.wait(q_bar, 0)

        if n_tiles > 0:
            # Tile 0: scores and softmax, its P V product joins the next tile's wgmma.
            mbarrier.wait(k_bars.index(0), 0)
            k = k_smem.index(0).reshape([BLOCK_N, BLOCK_D])
            s = warpgroup_mma(q, k.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(0, deps=[s, q, k])[0]
            if 0 >= full_end:
                s = _masked(s, rows, 0, cols, Nk, causal_offset, CAUSAL)
            p, alpha, m_i, l_i = _softmax(s, m_i, l_i, qk_scale)
            for j in range(1, n_tiles):
                slot = j % STAGES
                prev = (j - 1) % STAGES
                mbarrier.wait(k_bars.index(slot), (j // STAGES) & 1)
                k = k_smem.index(slot).reshape([BLOCK_N, BLOCK_D])
                s = warpgroup_mma(q, k.permute((1, 0)), s_zero, use_acc=False, is_async=True)
                mbarrier.wait(v_bars.index(prev), ((j - 1) // STAGES) & 1)
                v = v_smem.index(prev).reshape([BLOCK_N, BLOCK_D])
                acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v, acc, is_async=True)
                # One group left in flight: S_j is ready, P_{j-1} V_{j-1} still runs under the softmax.
                s = warpgroup_mma_wait(1, deps=[s, q, k])[0]
                start_n = j * BLOCK_N
                if start_n >= full_end:
                    s = _masked(s, rows, start_n, cols, Nk, causal_offset, CAUSAL)
                p, alpha, m_i, l_i = _softmax(s, m_i, l_i, qk_scale)
                acc = warpgroup_mma_wait(0, deps=[acc, v])[0]
                # Slot prev is read by no wgmma any more (in any warpgroup: the barrier): refill it.
                _cta_barrier()
                if j - 1 + STAGES < n_tiles:
                    _load_kv(desc_k, desc_v, k_smem, v_smem, k_bars, v_bars, b, hk, j - 1 + STAGES, STAGES,
                             BLOCK_N)
                acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
            last = (n_tiles - 1) % STAGES
            mbarrier.wait(v_bars.index(last), ((n_tiles - 1) // STAGES) & 1)
            v = v_smem.index(last).reshape([BLOCK_N, BLOCK_D])
            acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v, acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=[acc, v])[0]

        mbarrier.invalidate(q_bar)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(k_bars.index(i))
            mbarrier.invalidate(v_bars.index(i))

        # As _fwd_finish: rows with no visible key (l = 0) get output 0 and lse = -inf.
        l_safe = gl.where(l_i == 0.0, 1.0, l_i)
        lse = gl.where(l_i == 0.0, float("-inf"), (m_i + gl.log2(l_safe)) * 0.6931471805599453)
        out = acc / gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout))[:, None]
        gl.store(LSE + (b * H + h).to(gl.int64) * Nq + rows, lse, mask=rows < Nq)
        # Q is read by no wgmma any more: its buffer stages O for the TMA store (rows past Nq are dropped).
        q.store(out.to(dtype))
        fence_async_shared()
        _tma_store(desc_o, [b, h, start_m, 0], q_smem)
        tma.store_wait(0)


# ----------------------------------------------------------------------------- launcher


@dataclass(frozen=True)
class GluonConfig:
    """One launch configuration: BLOCK_M query rows (64 per warpgroup: num_warps = BLOCK_M / 16), BLOCK_N keys, STAGES."""

    block_m: int
    block_n: int
    stages: int

    @property
    def num_warps(self) -> int:
        return self.block_m // 16


# Autotune candidates per head dim: FlashAttention-3's 128 query rows (two consumer warpgroups)
# with 128 or 64 keys a tile. Shared memory: Q (BLOCK_M x D) and STAGES x (K + V) tiles of
# BLOCK_N x D, 16-bit: 160 KB at D=128 (128, 128, 2). Each is compiled by compile_specs()
# (none spills); few, since the first run on a GPU compiles each.
CONFIGS = {
    64: [GluonConfig(128, 128, 3), GluonConfig(128, 64, 4)],
    128: [GluonConfig(128, 128, 2), GluonConfig(128, 64, 3)],
}
_DESCRIPTOR_ROWS = {"desc_q": "BLOCK_M", "desc_o": "BLOCK_M", "desc_k": "BLOCK_N", "desc_v": "BLOCK_N"}


def _gl_dtype(dtype: torch.dtype):
    return {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[dtype]


def _layout(rows: int, head_dim: int, dtype: torch.dtype):
    """The shared-memory layout TMA writes one (rows, head_dim) tile of a (B, H, N, D) tensor in (and wgmma reads)."""
    return gl.NVMMASharedLayout.get_default_for([1, 1, rows, head_dim], _gl_dtype(dtype))


def _set_block_shapes(nargs: dict) -> None:
    """Autotuner pre-hook: each configuration's tile rows into the four descriptors."""
    for name, rows in _DESCRIPTOR_ROWS.items():
        desc = nargs[name]
        desc.block_shape = [1, 1, nargs[rows], nargs["BLOCK_D"]]
        desc.layout = _layout(nargs[rows], nargs["BLOCK_D"], desc.base.dtype)


@functools.lru_cache(maxsize=None)
def _autotuned(head_dim: int):
    configs = [triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "STAGES": c.stages},
                             num_warps=c.num_warps, num_stages=1, pre_hook=_set_block_shapes)
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
                    consts = {"BLOCK_D": head_dim, "CAUSAL": causal, "BLOCK_M": c.block_m, "BLOCK_N": c.block_n,
                              "STAGES": c.stages}
                    rows = {"BLOCK_M": c.block_m, "BLOCK_N": c.block_n}
                    sig = {name: "constexpr" if name in consts
                           else descriptor_type(dtype, rows[_DESCRIPTOR_ROWS[name]], head_dim)
                           if name in _DESCRIPTOR_ROWS else "*fp32" if name == "LSE"
                           else "fp32" if name == "qk_scale" else "i32"
                           for name in _attn_fwd_gluon_kernel.arg_names}
                    specs.append(KernelSpec(
                        _attn_fwd_gluon_kernel, sig, consts, c.num_warps, 1,
                        label=f"fwd_gluon D={head_dim} {'causal' if causal else 'full'} {dtype}",
                        extra={"divisible_by_16": ("LSE",), "targets": (90,), "quick": True},
                    ))
    return specs
