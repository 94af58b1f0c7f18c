"""Pure-PyTorch LayerNorm and RMSNorm: the spec the Triton kernels are tested against.

Statistics in fp32 (or fp64 for fp64 input, so the reference can serve as a
golden value), whatever the input dtype; the result is cast back to the input's
dtype, as the kernels do.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


def _upcast(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.promote_types(t.dtype, torch.float32))


def _shape(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    return (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)


# torch's native functions evaluated on the upcast tensors: the math is theirs
# (mean and biased variance over the normalized dims; y = (x - mean) / sqrt(var + eps)
# * weight + bias, and y = x / sqrt(mean(x^2) + eps) * weight), the precision ours,
# and this is the CPU training path, where the native kernels are fastest.


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    shape = _shape(normalized_shape)
    x, w, b = _upcast(input), _upcast(weight), _upcast(bias)
    if math.prod(shape) == 1:
        # One feature: x - mean is x - x, exactly 0, so y is exactly the bias and dX exactly
        # 0. torch's native backward rounds dX = rstd*dy*w - rstd*dy*w two ways (one ulp of
        # rstd*dy*w, with rstd = 1/sqrt(eps)); here it is g - g.
        y = x - x
        y = y * w if w is not None else y
        y = y + b if b is not None else y
        return y.to(input.dtype)
    # LayerNorm is shift-invariant: normalize x minus each row's first value (a constant to
    # autograd). A row whose values are all equal is then exactly 0, so its x - mean is exactly
    # 0 (y exactly the bias, dW exactly 0) whatever the rounding of the mean, as in the kernel.
    lead = x.dim() - len(shape)
    first = x.flatten(lead)[..., :1].detach().view(*x.shape[:lead], *(1,) * len(shape))
    return F.layer_norm(x - first, shape, w, b, eps).to(input.dtype)


def rms_norm(input, normalized_shape, weight=None, eps=None):
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    y = F.rms_norm(_upcast(input), _shape(normalized_shape), _upcast(weight), eps)
    return y.to(input.dtype)


def add_layer_norm(input, residual, normalized_shape, weight=None, bias=None, eps=1e-5):
    s = input + residual
    return layer_norm(s, normalized_shape, weight, bias, eps), s


def add_rms_norm(input, residual, normalized_shape, weight=None, eps=None):
    s = input + residual
    return rms_norm(s, normalized_shape, weight, eps), s
