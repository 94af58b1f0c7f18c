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
from .glu import activation_name, geglu, swiglu
from .rope import rope, rope_tables


class LayerNorm(torch.nn.LayerNorm):
    """:class:`torch.nn.LayerNorm` running :func:`kernels.layer_norm`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return norm.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """:class:`torch.nn.RMSNorm` running :func:`kernels.rms_norm`.

    Torch's constructor, plus the keyword-only ``offset`` and ``casting_mode`` of
    :func:`kernels.rms_norm`: ``RMSNorm(d, eps, offset=1.0, casting_mode="gemma")``
    is Gemma's norm, whose stored weight ``w`` scales by ``1 + w``; its weight then
    starts at ``1 - offset`` (zeros for Gemma), so a fresh module scales by one.
    """

    # Class defaults too: kernels.patch turns a torch.nn.RMSNorm into this class without __init__.
    offset: float = 0.0
    casting_mode: str | None = None

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None, dtype=None, *,
                 offset: float = 0.0, casting_mode: str | None = None) -> None:
        self.offset, self.casting_mode = offset, casting_mode  # before torch's __init__ calls reset_parameters
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.weight is not None and self.offset != 0:
            with torch.no_grad():
                self.weight.sub_(self.offset)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return norm.rms_norm(input, self.normalized_shape, self.weight, self.eps, offset=self.offset,
                             casting_mode=self.casting_mode)

    def extra_repr(self) -> str:
        options = "".join(f", {name}={value!r}" for name, value, default in
                          (("offset", self.offset, 0.0), ("casting_mode", self.casting_mode, None)) if value != default)
        return super().extra_repr() + options


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """:class:`torch.nn.CrossEntropyLoss` running :func:`kernels.cross_entropy`.

    Torch's constructor, plus the keyword-only ``z_loss``, ``softcap`` and ``inplace_backward``
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
        softcap: float | None = None,
        inplace_backward: bool = False,
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss = z_loss
        self.softcap = softcap
        self.inplace_backward = inplace_backward

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(
            input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
            inplace_backward=self.inplace_backward,
        )


class LinearCrossEntropyLoss(torch.nn.Module):
    """The loss of a language-model head: ``CrossEntropyLoss()(F.linear(input, weight, bias), target)``.

    Runs :func:`kernels.linear_cross_entropy`, which never materialises the logits.
    The head's parameters stay with the model; ``forward`` takes them as arguments.
    ``class_weight`` (torch's ``weight`` of the loss) is a buffer, as in torch's module.
    """

    def __init__(
        self,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        class_weight: torch.Tensor | None = None,
        z_loss: float = 0.0,
        softcap: float | None = None,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("class_weight", class_weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size

    def forward(
        self, input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return linear_cross_entropy(
            input, weight, target, bias, class_weight=self.class_weight, ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
            chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}, "
            f"chunk_size={self.chunk_size}"
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


class SwiGLU(torch.nn.Module):
    """``silu(gate) * up`` as a module: :func:`kernels.swiglu` (no parameters)."""

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return swiglu(gate, up)


class GeGLU(torch.nn.Module):
    """``gelu(gate, approximate) * up`` as a module: :func:`kernels.geglu` (no parameters)."""

    def __init__(self, approximate: str = "tanh") -> None:
        super().__init__()
        activation_name(approximate)  # a bad approximate fails here, not at forward
        self.approximate = approximate

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return geglu(gate, up, self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class GatedMLP(torch.nn.Module):
    """The Llama/Gemma MLP, ``down_proj(act(gate_proj(x)) * up_proj(x))``, with the fused activation.

    Parameter names are HF's ``LlamaMLP``/``GemmaMLP`` ones, so their state dicts
    load unchanged. ``activation``: ``"silu"`` (SwiGLU), ``"gelu_tanh"`` or
    ``"gelu"`` (GeGLU).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "silu", bias: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        if activation not in ("silu", "gelu_tanh", "gelu"):
            raise ValueError(f"activation must be 'silu', 'gelu_tanh' or 'gelu', got {activation!r}")
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.gate_proj = torch.nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = torch.nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = torch.nn.Linear(intermediate_size, hidden_size, **kw)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.activation == "silu":
            h = swiglu(gate, up)
        else:
            h = geglu(gate, up, "tanh" if self.activation == "gelu_tanh" else "none")
        return self.down_proj(h)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


class RotaryEmbedding(torch.nn.Module):
    """Rotates q and k by position: :func:`kernels.rope` with tables from :func:`kernels.rope_tables`.

    ``dim`` is the rotary dim (the head dim, or less for partial rotary);
    ``max_positions`` the table length. ``forward(q, k, position_ids=None)`` on
    (batch, heads, seq, head_dim) tensors: positions ``0..seq-1`` unless
    ``position_ids`` is given. Frequency scaling: ``inv_freq`` and
    ``attention_scaling``, as :func:`kernels.rope_tables` takes them. The tables
    are cached per device and dtype (fp32), not buffers: the module has no state.
    """

    def __init__(self, dim: int, max_positions: int, theta: float = 10000.0, inv_freq: torch.Tensor | None = None,
                 attention_scaling: float = 1.0) -> None:
        super().__init__()
        rope_tables(0, dim, theta=theta, inv_freq=inv_freq, attention_scaling=attention_scaling)  # fail early
        self.dim, self.max_positions, self.theta = dim, max_positions, theta
        self.inv_freq = None if inv_freq is None else inv_freq.detach().cpu()
        self.attention_scaling = attention_scaling

    def forward(self, q: torch.Tensor, k: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = rope_tables(self.max_positions, self.dim, theta=self.theta, inv_freq=self.inv_freq,
                               attention_scaling=self.attention_scaling, device=q.device)
        if position_ids is None:
            if q.shape[2] > self.max_positions:
                raise ValueError(f"sequence of {q.shape[2]} positions exceeds max_positions {self.max_positions}")
            cos, sin = cos[:q.shape[2]], sin[:q.shape[2]]
        return rope(q, k, cos, sin, position_ids=position_ids)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_positions={self.max_positions}, theta={self.theta}"


__all__ = ["Attention", "LayerNorm", "RMSNorm", "CrossEntropyLoss", "LinearCrossEntropyLoss", "SwiGLU", "GeGLU",
           "GatedMLP", "RotaryEmbedding"]
