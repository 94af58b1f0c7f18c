"""Pure-PyTorch LayerNorm and RMSNorm: the spec the Triton kernels are tested against.

Statistics in fp32 (or fp64 for fp64 input, so the reference can serve as a
golden value), whatever the input dtype; the result is cast back to the input's
dtype, as the kernels do.
"""

from __future__ import annotations

from typing import Sequence

import torch


def _dims(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    n = 1 if isinstance(normalized_shape, int) else len(tuple(normalized_shape))
    return tuple(range(-n, 0))


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = _dims(normalized_shape)
    x = _upcast(input)
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).square().mean(dims, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * _upcast(weight)
    if bias is not None:
        y = y + _upcast(bias)
    return y.to(input.dtype)


def rms_norm(input, normalized_shape, weight=None, eps=None):
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    dims = _dims(normalized_shape)
    x = _upcast(input)
    y = x * torch.rsqrt(x.square().mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * _upcast(weight)
    return y.to(input.dtype)


def add_layer_norm(input, residual, normalized_shape, weight=None, bias=None, eps=1e-5):
    s = input + residual
    return layer_norm(s, normalized_shape, weight, bias, eps), s


def add_rms_norm(input, residual, normalized_shape, weight=None, eps=None):
    s = input + residual
    return rms_norm(s, normalized_shape, weight, eps), s
