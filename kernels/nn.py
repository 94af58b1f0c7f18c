"""Drop-in ``nn.Module``s backed by the fused kernels.

Each subclasses the torch module it replaces, so the constructor, parameters,
``state_dict`` keys and ``reset_parameters`` are torch's own: checkpoints load in
both directions. Only ``forward`` changes.
"""

from __future__ import annotations

import torch

from . import norm


class LayerNorm(torch.nn.LayerNorm):
    """:class:`torch.nn.LayerNorm` running :func:`kernels.layer_norm`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return norm.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """:class:`torch.nn.RMSNorm` running :func:`kernels.rms_norm`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return norm.rms_norm(input, self.normalized_shape, self.weight, self.eps)


__all__ = ["LayerNorm", "RMSNorm"]
