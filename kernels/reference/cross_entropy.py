"""Pure-PyTorch cross-entropy and fused linear cross-entropy: the spec the Triton kernels are tested against.

For a token with logits ``x`` over ``C`` classes, target ``y`` (not ``ignore_index``),
class weights ``w`` (all ones when none are given), label smoothing ``eps`` and
z-loss coefficient ``z`` (with ``softcap`` s, Gemma 2's final-logit softcapping,
``x`` stands for the capped logits ``s * tanh(logits / s)`` throughout)::

    lse  = logsumexp(x)
    loss = (1 - eps) * w[y] * (lse - x[y])  +  eps / C * sum_c w[c] * (lse - x[c])  +  w[y] * z * lse^2

The first two terms are :func:`torch.nn.functional.cross_entropy`'s, term for term.
The z-loss term (PaLM's auxiliary loss) is weighted by the target's class weight as
torch weighs the token's cross-entropy: the weights then say how much each token counts,
and ``'mean'`` is the weighted mean of whole per-token losses, whatever the weights' scale.
Ignored tokens contribute 0. ``'sum'`` adds the per-token losses; ``'mean'``
divides that sum by ``sum(w[y])`` over the non-ignored tokens (torch's
denominator, whatever its sign: the count of non-ignored tokens when unweighted),
z-loss included; ``'none'`` returns the per-token losses. Deviation from torch:
when every target is ignored, ``'mean'`` is 0 with zero gradients instead of NaN
(selected targets whose weights sum to 0 give torch's NaN). The loss is fp32 whatever the logits dtype.

The gradient, which :func:`cross_entropy_rows` computes explicitly (as the
Triton kernel does), with ``p = softmax(x)``::

    dloss/dx[c] = p[c] * ((1 - eps) * w[y] + eps / C * sum(w) + 2 * z * w[y] * lse)
                  - eps / C * w[c]  -  (1 - eps) * w[y] * [c == y]

times ``1 - (x[c] / s)^2`` (the derivative of the cap) with a softcap.

:func:`linear_cross_entropy` is ``cross_entropy(F.linear(...))`` as written, and
holds the ``(N, C)`` logits. The chunk loop that avoids them is implementation,
in :mod:`kernels._chunked_linear_cross_entropy`; the reference backend runs it
with :func:`cross_entropy_rows` as the per-chunk loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum", "none")


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average=None,
    ignore_index: int = -100,
    reduce=None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_z_loss: bool = False,
    inplace_backward: bool = False,
    check_targets: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``(..., C)`` logits against ``(...)`` class indices, by autograd through torch ops.

    ``return_z_loss=True`` returns ``(loss, z_loss)``: the z-loss term the loss
    includes, reduced the same way, detached (for logging).
    ``inplace_backward`` and ``check_targets`` have no effect here: this never
    writes into ``input``, and torch's own indexing rejects out-of-range targets.
    """
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    C = input.shape[-1]
    dtype = torch.promote_types(input.dtype, torch.float32)  # fp32, or fp64 for a float64 truth
    x = input.reshape(-1, C).to(dtype)
    if softcap:
        x = softcap * torch.tanh(x / softcap)
    t = target.reshape(-1).long()  # torch's loss takes int64; ignore_index compares exactly in it
    w = weight.detach().to(dtype) if weight is not None else None
    loss = F.cross_entropy(x, t, w, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    if z_loss or return_z_loss:
        valid = t != ignore_index
        w_t = w[torch.where(valid, t, 0)] if w is not None else 1.0
        z_rows = torch.where(valid, z_loss * w_t * torch.logsumexp(x, dim=1).square(), 0.0)
    if z_loss:
        loss = loss + z_rows
    scale = mean_scale(t, w, ignore_index, dtype) if reduction == "mean" else None

    def reduced(rows):
        return rows.view(target.shape) if reduction == "none" else reduce_loss(rows, reduction, scale)

    return (reduced(loss), reduced(z_rows.detach())) if return_z_loss else reduced(loss)


def reduce_loss(loss: torch.Tensor, reduction: str, scale: torch.Tensor | None) -> torch.Tensor:
    """'sum', or 'mean' (times ``scale``, from :func:`mean_scale`), of per-token losses.

    Summed in fp64 and rounded once: the total of many tokens keeps the precision
    of the per-token losses.
    """
    total = loss.sum(dtype=torch.float64)
    if reduction == "mean":
        total = total * scale.squeeze(0)
    return total.to(loss.dtype)


def mean_scale(
    target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``1 / sum(w[y])`` over the non-ignored targets as a 1-element tensor, or 0 when every target is ignored.

    As torch, whatever the sign of that sum (a 0 sum of selected weights gives
    inf, so a NaN or infinite loss, as torch's); only "no target selected" takes
    the 0 path, decided on the count of selected targets, never on the weights.
    Computed in ``dtype`` on the targets' device, without a host synchronisation.
    """
    valid = target != ignore_index
    count = valid.sum()
    if weight is None:
        denom = count.to(dtype)
    else:
        denom = torch.where(valid, weight.to(dtype)[torch.where(valid, target, 0)], 0.0).sum()
    return torch.where(count > 0, 1.0 / denom, 0.0).reshape(1)


def cross_entropy_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    grad_scale: torch.Tensor | None = None,
    grad_out: torch.Tensor | None = None,
    *,
    softcap: float = 0.0,
    z_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row loss (fp32, 0 for ignored rows) of ``(n, C)`` logits; optionally their gradient.

    With ``grad_out`` (``(n, C)``, may be ``logits`` itself, which is then
    overwritten), writes ``dloss_i/dlogits_i * grad_scale_i`` into it;
    ``grad_scale`` is fp32 with 1 element (every row) or ``n`` (one per row).
    ``z_rows`` (fp32, ``(n,)``) receives each row's z-loss term ``w[y] * z * lse^2`` (0 when ignored).
    The Triton launcher :func:`kernels.cross_entropy._cross_entropy_rows` has this
    signature and contract.
    """
    n, C = logits.shape
    x = logits.float()  # no copy when fp32: every read of x happens before grad_out is written
    if softcap:
        x = torch.tanh(x / softcap).mul_(softcap)  # the capped logits, a new tensor
    w = weight.float() if weight is not None else None
    valid = target != ignore_index
    t = torch.where(valid, target, 0)
    m = x.amax(dim=1)
    x_t = x.gather(1, t[:, None]).squeeze(1)
    if label_smoothing:
        weighted_x = x @ w if w is not None else x.sum(dim=1)
    # e = exp(x - max), written over the logits when they are to receive the gradient:
    # no logits-sized temporary, and p = e / sum(e) needs no second exponential.
    e = grad_out if grad_out is not None and grad_out.dtype == torch.float32 else torch.empty_like(x)
    torch.sub(x, m[:, None], out=e).exp_()
    s = e.sum(dim=1)
    lse = m + s.log()
    w_t = w[t] if w is not None else torch.ones_like(lse)
    loss = (1.0 - label_smoothing) * w_t * (lse - x_t)
    if label_smoothing:
        w_sum = w.sum() if w is not None else C
        loss = loss + label_smoothing / C * (w_sum * lse - weighted_x)
    if z_loss:
        loss = loss + z_loss * w_t * lse.square()
    loss = torch.where(valid, loss, 0.0)
    if z_rows is not None:
        z_rows.copy_(torch.where(valid, z_loss * w_t * lse.square(), 0.0))
    if grad_out is None:
        return loss

    scale = torch.where(valid, grad_scale.float().expand(n), 0.0)
    coef_p = (1.0 - label_smoothing) * w_t + 2.0 * z_loss * w_t * lse
    if label_smoothing:
        coef_p = coef_p + label_smoothing / C * w_sum
    g = e.mul_((coef_p * scale / s)[:, None])  # p * coef_p
    if label_smoothing:
        if w is not None:
            g.addr_(scale, w, alpha=-label_smoothing / C)
        else:
            g.sub_((label_smoothing / C * scale)[:, None])
    g.scatter_add_(1, t[:, None], (-(1.0 - label_smoothing) * w_t * scale)[:, None])
    if softcap:
        g.mul_(x.div_(softcap).square_().neg_().add_(1.0))  # x is read for the last time: 1 - tanh^2
    if g is not grad_out:
        grad_out.copy_(g)
    return loss


def linear_cross_entropy(
    input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    class_weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_z_loss: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``cross_entropy(F.linear(input, weight, bias), target, ...)``, literally: the spec of the fused version.

    The logits are computed by ``F.linear`` in fp32 from fp16/bf16 inputs (the
    fused version keeps its GEMM's fp32 accumulator, as torch's chunked loss does;
    fp64 for fp64 inputs), the loss by :func:`cross_entropy` in that precision,
    gradients by autograd (double backward included).
    Memory: this holds the whole ``(N, C)`` logits, their fp32 copy and, in the
    backward, their gradient: O(N * C), where the fused version needs
    O(chunk_size * C). ``chunk_size`` is accepted, for the same signature, and
    has no effect. (The reference *backend* does not run this: it runs the
    fused version's chunk loop with :func:`cross_entropy_rows` as the per-chunk
    loss, see :mod:`kernels._chunked_linear_cross_entropy`.)
    """
    dtype = torch.promote_types(input.dtype, torch.float32)
    bias = bias.to(dtype) if bias is not None else None
    return cross_entropy(
        F.linear(input.to(dtype), weight.to(dtype), bias), target, class_weight, ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, return_z_loss=return_z_loss,
    )
