"""Pure-PyTorch rotary position embedding (HF's rotate-half convention): the spec of :func:`kernels.rope`.

For q (or k) of shape (batch, heads, seq, head_dim) and cos/sin rows of
``rotary_dim`` values per token, the first ``rotary_dim`` features are rotated
and the rest pass through::

    x1, x2 = x[..., :r/2], x[..., r/2:r]
    out[..., :r] = x[..., :r] * cos + cat(-x2, x1) * sin      (r = rotary_dim)
    out[..., r:] = x[..., r:]

cos/sin are a (seq, rotary_dim) table, or (batch or 1, seq, rotary_dim) as HF's
rotary module returns them; with ``position_ids`` ((batch or 1, seq) or (seq,))
they are a (positions, rotary_dim) table and token t of row b reads row
``position_ids[b, t]``. Computed in fp32 (fp64 for fp64 input, so the reference
can serve as a golden value) and cast back to the input's dtype, as the kernel does.
"""

from __future__ import annotations

import torch


def _per_token(table: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
    """cos or sin of each token, shaped to broadcast over (batch, heads, seq, rotary_dim)."""
    if position_ids is not None:
        table = table[position_ids]  # (batch or 1, seq, r) or (seq, r)
    return table.unsqueeze(-3) if table.dim() == 3 else table


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` rotated by per-token ``cos``/``sin`` (already broadcastable to ``x[..., :rotary_dim]``), in fp32."""
    r = cos.shape[-1]
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    cos, sin = cos.to(xf.dtype), sin.to(xf.dtype)
    rot = xf if r == x.shape[-1] else xf[..., :r]
    x1, x2 = rot.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    out = rot * cos + rotated * sin
    if r != x.shape[-1]:
        out = torch.cat([out, xf[..., r:]], dim=-1)
    return out.to(x.dtype)


def rope(q, k, cos, sin, *, position_ids=None):
    cos, sin = _per_token(cos, position_ids), _per_token(sin, position_ids)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
