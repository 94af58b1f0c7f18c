"""Drop-in ``nn.Module``s backed by the fused kernels.

Each subclasses the torch module it replaces, so the constructor, parameters,
``state_dict`` keys and ``reset_parameters`` are torch's own: checkpoints load in
both directions. Only ``forward`` changes.
"""

from __future__ import annotations

import torch

from . import norm
from .attention import attention
from .cross_entropy import cross_entropy, linear_cross_entropy


class LayerNorm(torch.nn.LayerNorm):
    """:class:`torch.nn.LayerNorm` running :func:`kernels.layer_norm`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return norm.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """:class:`torch.nn.RMSNorm` running :func:`kernels.rms_norm`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return norm.rms_norm(input, self.normalized_shape, self.weight, self.eps)


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """:class:`torch.nn.CrossEntropyLoss` running :func:`kernels.cross_entropy`.

    Torch's constructor, plus the keyword-only ``z_loss`` and ``inplace_backward``
    of :func:`kernels.cross_entropy`. Classes are the last dimension of the input.
    """

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        inplace_backward: bool = False,
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss = z_loss
        self.inplace_backward = inplace_backward

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(
            input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, inplace_backward=self.inplace_backward,
        )


class LinearCrossEntropyLoss(torch.nn.Module):
    """The loss of a language-model head: ``CrossEntropyLoss()(F.linear(input, weight, bias), target)``.

    Runs :func:`kernels.linear_cross_entropy`, which never materialises the logits.
    The head's parameters stay with the model; ``forward`` takes them as arguments.
    """

    def __init__(
        self,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.chunk_size = chunk_size

    def forward(
        self, input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return linear_cross_entropy(
            input, weight, target, bias, ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, chunk_size={self.chunk_size}"
        )



class Attention(torch.nn.Module):
    """The attention core of a transformer block, running :func:`kernels.attention`.

    No projections and no parameters: model code holds one where it would call
    :func:`torch.nn.functional.scaled_dot_product_attention`, on (batch, heads,
    seq, head_dim) tensors; ``k``/``v`` may have fewer heads than ``q``
    (grouped-query attention, no copies). ``causal`` is aligned bottom-right
    (FlashAttention's convention; torch's when Nq == Nk). ``window_size`` and
    ``softcap`` are :func:`kernels.attention`'s (a sliding-window or Gemma-2 layer).
    ``forward`` takes the optional ``kv_lens`` (batch,) of right-padded keys and
    ``sinks`` (heads,): a learned sink lives with the model, like the projections.
    For torch's exact function signature use :func:`kernels.scaled_dot_product_attention`.
    """

    def __init__(self, causal: bool = True, scale: float | None = None, window_size: tuple[int, int] = (-1, -1),
                 softcap: float = 0.0) -> None:
        super().__init__()
        self.causal = causal
        self.scale = scale
        self.window_size = tuple(window_size)
        self.softcap = softcap

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lens: torch.Tensor | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return attention(q, k, v, causal=self.causal, scale=self.scale, kv_lens=kv_lens, window_size=self.window_size,
                         softcap=self.softcap, sinks=sinks)

    def extra_repr(self) -> str:
        return f"causal={self.causal}, scale={self.scale}, window_size={self.window_size}, softcap={self.softcap}"


__all__ = ["Attention", "LayerNorm", "RMSNorm", "CrossEntropyLoss", "LinearCrossEntropyLoss"]
