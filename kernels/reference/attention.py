"""Pure-PyTorch attention: the spec the flash-attention kernels are tested against.

Layout (batch, heads, seq, head_dim) as in torch's SDPA; the packed (varlen)
layout is flash-attention's, (total tokens, heads, head_dim) with ``cu_seqlens``.
The matmuls run in the input dtype (as torch's own math path does) and the
softmax in fp32, so running it on fp16 inputs gives "the same-dtype PyTorch
computation" of the test rule and running it on fp32 inputs gives the fp32 reference.

Masking (see :func:`kernels.attention`), with the diagonal offset ``off`` (Nk - Nq,
bottom-right; per sequence in the packed layout): query i sees key j when

- ``j <= i + off + right`` if ``right >= 0`` (``causal`` is ``right = 0``),
- ``j >= i + off - left`` if ``left >= 0``,
- ``j < kv_lens[b]`` with ``kv_lens``.

``softcap > 0`` replaces each scaled score s by ``softcap * tanh(s / softcap)``;
``sinks`` (heads,) adds ``exp(sinks[h])`` to every row's softmax denominator (a
key with no value). A query row with no visible key returns zeros, zero
gradients and ``lse = -inf``, sink or not. Keys and values past ``kv_lens`` are
never read into a result: whatever they hold (NaN, inf) changes no output, and
their gradients are exactly 0.
"""

from __future__ import annotations

import torch


def window_bounds(causal: bool, window_size: tuple[int, int]) -> tuple[int, int]:
    """``(left, right)`` with causal folded in (right = 0, as flash-attention does); -1 = unbounded."""
    left, right = window_size
    return left, (0 if causal else right)


def in_window(i, j, offset, left: int, right: int) -> torch.Tensor:
    """Key j lies inside query i's window about the diagonal ``i + offset`` (bool, broadcast over i and j)."""
    visible = torch.ones((), dtype=torch.bool, device=j.device)
    if right >= 0:
        visible = visible & (j <= i + offset + right)
    if left >= 0:
        visible = visible & (j >= i + offset - left)
    return visible


def visibility(Nq: int, Nk: int, offset, left: int, right: int, device, kv_lens=None) -> torch.Tensor:
    """Which keys each query sees: bool (batch or 1, Nq, Nk), masks built explicitly."""
    i = torch.arange(Nq, device=device)[:, None]
    j = torch.arange(Nk, device=device)[None, :]
    visible = torch.ones((1, Nq, Nk), dtype=torch.bool, device=device) & in_window(i, j, offset, left, right)
    if kv_lens is not None:
        visible = visible & (j < kv_lens.to(device).view(-1, 1, 1))
    return visible


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    visible: torch.Tensor,
    *,
    real_keys: torch.Tensor | None = None,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of softmax(q k^T * scale, masked by ``visible``) v; lse fp32 (fp64 for fp64 inputs).

    ``visible`` broadcasts against (batch, Nq, Nk). ``real_keys`` (batch, Nk), when
    given, marks the keys that exist: the others (padding) are zeroed before any product.
    """
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    group = H // Hkv
    if real_keys is not None:
        # Keys past kv_lens are padding that may hold anything, NaN or inf: a zero probability
        # times NaN is still NaN, so they are replaced by zeros (which also gives them exactly
        # zero gradient) before any product, not just masked out of the softmax.
        real = real_keys[:, None, :, None]
        k, v = torch.where(real, k, 0.0), torch.where(real, v, 0.0)
    # Grouped-query attention by broadcasting: q heads h*group..h*group+group-1 share kv head h.
    qg = q.reshape(B, Hkv, group, Nq, D)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32  # fp64 for a golden reference
    scores = torch.matmul(qg, k.unsqueeze(2).transpose(-1, -2)).to(acc_dtype) * scale  # (B, Hkv, group, Nq, Nk)
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    if sinks is not None:
        # The sink joins each row as one more logit whose value is zero.
        sink = sinks.to(acc_dtype).view(1, Hkv, group, 1, 1).expand(B, Hkv, group, Nq, 1)
        scores = torch.cat([scores, sink], dim=-1)

    # A softmax that stays finite (and differentiable) on rows with no visible key.
    has_key = visible[:, None, None].any(-1, keepdim=True)
    m = scores.amax(-1, keepdim=True).detach() if scores.shape[-1] else scores.new_zeros(scores.shape[:-1] + (1,))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.where(has_key, torch.exp(scores - m), 0.0)
    l = e.sum(-1, keepdim=True)
    l_safe = torch.where(has_key, l, torch.ones_like(l))
    p = e / l_safe
    lse = torch.where(has_key, m + torch.log(l_safe), torch.full_like(l, float("-inf")))
    if sinks is not None:
        p = p[..., :Nk]

    out = torch.matmul(p.to(v.dtype), v.unsqueeze(2))  # (B, Hkv, group, Nq, D)
    return out.reshape(B, H, Nq, v.shape[-1]).to(q.dtype), lse.reshape(B, H, Nq)


def attention(q, k, v, *, causal=False, scale=None, kv_lens=None, window_size=(-1, -1), softcap=0.0, sinks=None,
              return_lse=False):
    """Reference of :func:`kernels.attention`: causal and windows aligned bottom-right (offset Nk - Nq)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    left, right = window_bounds(causal, tuple(window_size))
    plain = left < 0 and softcap == 0 and sinks is None and (right < 0 or causal)
    if (plain and q.dtype == torch.float32 and kv_lens is None and not return_lse
            and (not causal or q.shape[2] == k.shape[2]) and k.shape[2] > 0):
        # Every row sees a key, and the alignments agree: torch's fused SDPA computes the
        # same function faster, and fp32 on CPU is the trainer's reference path.
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )
    Nq, Nk = q.shape[2], k.shape[2]
    visible = visibility(Nq, Nk, Nk - Nq, left, right, q.device, kv_lens)
    real = None
    if kv_lens is not None:
        real = torch.arange(Nk, device=q.device) < kv_lens.to(q.device).view(-1, 1)
    out, lse = masked_attention(q, k, v, scale, visible, real_keys=real, softcap=softcap, sinks=sinks)
    return (out, lse) if return_lse else out


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, *, causal=False,
                     scale=None, window_size=(-1, -1), softcap=0.0, sinks=None, return_lse=False):
    """Reference of :func:`kernels.varlen_attention`: one :func:`attention` call per sequence.

    q (total_q, heads, head_dim), k/v (total_k, kv_heads, head_dim); sequence b is
    rows ``cu_seqlens[b]:cu_seqlens[b + 1]``. lse is (heads, total_q), as flash-attention's.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs, lses = [], []
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(bounds_q) - 1):
        qb = q[bounds_q[b]:bounds_q[b + 1]].transpose(0, 1)[None]
        kb = k[bounds_k[b]:bounds_k[b + 1]].transpose(0, 1)[None]
        vb = v[bounds_k[b]:bounds_k[b + 1]].transpose(0, 1)[None]
        out, lse = attention(qb, kb, vb, causal=causal, scale=scale, window_size=window_size, softcap=softcap,
                             sinks=sinks, return_lse=True)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    out = torch.cat(outs, 0) if outs else q.new_zeros(q.shape)
    lse = torch.cat(lses, 1) if lses else torch.empty((q.shape[1], 0), dtype=torch.float32, device=q.device)
    return (out, lse) if return_lse else out


def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """Reference of :func:`kernels.scaled_dot_product_attention`: torch's own function."""
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
        enable_gqa=enable_gqa,
    )


def packed_positions(cu_seqlens, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each packed token's sequence and position in it, int64 (total,): tensor ops only (no host copy)."""
    cu = cu_seqlens.long()
    tokens = torch.arange(total, device=cu.device)
    seq = torch.searchsorted(cu, tokens, right=True) - 1  # the last sequence starting at or before
    return seq, tokens - cu[seq]


def varlen_rule(seq_q, i, seq_k, j, offset, left: int, right: int) -> torch.Tensor:
    """Query (seq_q, i) sees key (seq_k, j): same sequence, inside the window about the diagonal ``i + offset``.

    Queries index dim -2 of the result and keys dim -1 (``seq_q``/``i``/``offset`` (..., nq, 1),
    ``seq_k``/``j`` (..., 1, nk)); ``right`` has causal folded in (:func:`window_bounds`).
    """
    return (seq_q == seq_k) & in_window(i, j, offset, left, right)


def varlen_visibility(cu_seqlens_q, cu_seqlens_k, total_q: int, total_k: int, left: int, right: int) -> torch.Tensor:
    """The packed batch's mask as one (total_q, total_k) bool: block-diagonal, windows per sequence.

    Built from ``cu_seqlens`` with tensor ops only (no host copy), so it also runs
    on fake tensors; ``right`` has causal folded in (:func:`window_bounds`).
    """
    seq_q, i = packed_positions(cu_seqlens_q, total_q)
    seq_k, j = packed_positions(cu_seqlens_k, total_k)
    lens_q, lens_k = cu_seqlens_q.diff().long(), cu_seqlens_k.diff().long()
    offset = (lens_k - lens_q)[seq_q][:, None]  # bottom-right, per query's sequence
    return varlen_rule(seq_q[:, None], i[:, None], seq_k[None, :], j[None, :], offset, left, right)
