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


# Where an RMSNorm rounds (``casting_mode``; Liger's names), y = xhat * (offset + w):
#   "gemma": everything in fp32 (the weight too), one rounding to the input dtype at the end:
#            Gemma's modules, and torch.nn.functional.rms_norm's fused kernel.
#   "llama": xhat = x * rstd in fp32, rounded to the input dtype, then multiplied by offset + w
#            in the weight's dtype; the result has the promoted dtype of input and weight
#            (Llama's, Mistral's and Qwen2's modules: ``weight * xhat.to(input_dtype)``).
#   "none":  the input dtype throughout, as a model written without casts: rstd, xhat,
#            offset + w and y each rounded to it (the sum of squares still accumulates in fp32).
# In fp32 (and for the fp64 golden values) the three are the same function.
CASTING_MODES = ("gemma", "llama", "none")


def rms_weight(weight, offset, casting_mode, input_dtype):
    """``offset + weight`` as ``casting_mode`` rounds it (None without a weight)."""
    if weight is None:
        return None
    if casting_mode == "gemma":
        weight = _upcast(weight)
    elif casting_mode == "none":
        weight = weight.to(input_dtype)
    return weight + offset if offset != 0 else weight


def rms_output_dtype(input_dtype, weight, casting_mode):
    """Llama's ``weight * xhat`` promotes; the other modes return the input's dtype."""
    if casting_mode == "llama" and weight is not None:
        return torch.promote_types(input_dtype, weight.dtype)
    return input_dtype


def default_rms_eps(input_dtype: torch.dtype) -> float:
    """torch.nn.functional.rms_norm's ``eps=None``: the epsilon of the dtype its statistics are computed in.

    That is fp32 for fp16/bf16 inputs (aten's opmath type, and torch's decomposition), not the
    input's own: finfo(bfloat16).eps = 0.0078 would swamp the mean square of small activations.
    """
    return torch.finfo(torch.promote_types(input_dtype, torch.float32)).eps


def rms_norm(input, normalized_shape, weight=None, eps=None, *, offset=0.0, casting_mode=None):
    casting_mode = casting_mode or "gemma"  # None: torch's, which computes as Gemma does
    if eps is None:
        eps = default_rms_eps(input.dtype)
    shape = _shape(normalized_shape)
    w = rms_weight(weight, offset, casting_mode, input.dtype)
    if casting_mode == "gemma":
        return F.rms_norm(_upcast(input), shape, w, eps).to(input.dtype)
    x = _upcast(input)
    rstd = torch.rsqrt(x.square().mean(tuple(range(-len(shape), 0)), keepdim=True) + eps)
    xhat = input * rstd.to(input.dtype) if casting_mode == "none" else (x * rstd).to(input.dtype)
    return xhat if w is None else xhat * w


def add_layer_norm(input, residual, normalized_shape, weight=None, bias=None, eps=1e-5):
    s = input + residual
    return layer_norm(s, normalized_shape, weight, bias, eps), s


def add_rms_norm(input, residual, normalized_shape, weight=None, eps=None, *, offset=0.0, casting_mode=None):
    s = input + residual
    return rms_norm(s, normalized_shape, weight, eps, offset=offset, casting_mode=casting_mode), s
