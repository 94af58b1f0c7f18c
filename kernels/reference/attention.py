"""Pure-PyTorch attention: the spec the flash-attention kernels are tested against.

Layout (batch, heads, seq, head_dim) as in torch's SDPA. The matmuls run in the
input dtype (as torch's own math path does) and the softmax in fp32, so running
it on fp16 inputs gives "the same-dtype PyTorch computation" of the test rule
and running it on fp32 inputs gives the fp32 reference.

Masking (see :func:`kernels.attention`): with ``causal_offset`` c, query i sees
key j only when ``j <= i + c``; with ``kv_lens``, only keys ``j < kv_lens[b]``.
A query row with no visible key returns zeros, zero gradients and ``lse = -inf``.
Keys and values past ``kv_lens`` are never read into a result: whatever they hold
(NaN, inf) changes no output, and their gradients are exactly 0.
"""

from __future__ import annotations

import torch


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal_offset: int | None = None,
    kv_lens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)``: softmax(q k^T * scale, masked) v, and the log-sum-exp per row (fp32; fp64 for fp64 inputs)."""
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    group = H // Hkv
    if kv_lens is not None:
        # Keys past kv_lens are padding that may hold anything, NaN or inf: a zero probability
        # times NaN is still NaN, so they are replaced by zeros (which also gives them exactly
        # zero gradient) before any product, not just masked out of the softmax.
        real = (torch.arange(Nk, device=q.device) < kv_lens.to(q.device).view(-1, 1))[:, None, :, None]
        k, v = torch.where(real, k, 0.0), torch.where(real, v, 0.0)
    # Grouped-query attention by broadcasting: q heads h*group..h*group+group-1 share kv head h.
    qg = q.reshape(B, Hkv, group, Nq, D)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32  # fp64 for a golden reference
    scores = torch.matmul(qg, k.unsqueeze(2).transpose(-1, -2)).to(acc_dtype) * scale  # (B, Hkv, group, Nq, Nk)

    i = torch.arange(Nq, device=q.device)[:, None]
    j = torch.arange(Nk, device=q.device)[None, :]
    visible = torch.ones((1, Nq, Nk), dtype=torch.bool, device=q.device)
    if causal_offset is not None:
        visible = visible & (j <= i + causal_offset)
    if kv_lens is not None:
        visible = visible & (j < kv_lens.to(q.device).view(-1, 1, 1))
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))

    # A softmax that stays finite (and differentiable) on rows with no visible key.
    m = scores.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(scores - m)
    l = e.sum(-1, keepdim=True)
    has_key = l > 0
    l_safe = torch.where(has_key, l, torch.ones_like(l))
    p = e / l_safe
    lse = torch.where(has_key, m + torch.log(l_safe), torch.full_like(l, float("-inf")))

    out = torch.matmul(p.to(v.dtype), v.unsqueeze(2))  # (B, Hkv, group, Nq, D)
    return out.reshape(B, H, Nq, v.shape[-1]).to(q.dtype), lse.reshape(B, H, Nq)


def attention(q, k, v, *, causal=False, scale=None, kv_lens=None, return_lse=False):
    """Reference of :func:`kernels.attention`: causal is aligned bottom-right (offset Nk - Nq)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.dtype == torch.float32 and kv_lens is None and not return_lse and (not causal or q.shape[2] == k.shape[2]):
        # Every row sees a key, and the alignments agree: torch's fused SDPA computes the
        # same function faster, and fp32 on CPU is the trainer's reference path.
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )
    offset = k.shape[2] - q.shape[2] if causal else None
    out, lse = masked_attention(q, k, v, scale, offset, kv_lens)
    return (out, lse) if return_lse else out


def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """Reference of :func:`kernels.scaled_dot_product_attention`: torch's own function."""
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
        enable_gqa=enable_gqa,
    )
