"""fastlm's fused Triton kernels, each with a pure-PyTorch reference of the same signature.

Which implementation runs is decided in one place, :mod:`kernels._backend`:
CUDA tensors run the compiled Triton kernels, CPU tensors the reference (or the
kernels through Triton's interpreter when ``TRITON_INTERPRET=1``), and
``FASTLM_BACKEND=triton|reference`` or :func:`use_backend` forces one;
``FASTLM_ATTENTION=gluon`` or :func:`use_attention_forward` opts into attention's
experimental Gluon forward on Hopper.
Every op is registered with ``torch.library`` as ``torch.ops.fastlm.*`` (design:
:mod:`kernels._library`); :func:`unchecked` skips the checks that read tensor
values (a host sync each), and :func:`checks_enabled` says whether they run. :func:`patch` puts the kernels into an existing model (torch norms, transformers
GPT-2/Llama/Mistral/Qwen2/Gemma/Gemma 2 attention and loss).
"""

from . import nn, reference
from ._backend import use_attention_forward, use_backend
from ._library import checks_enabled, unchecked
from .norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from .attention import attention, scaled_dot_product_attention, varlen_attention
from .cross_entropy import cross_entropy, linear_cross_entropy
from .rope import rope, rope_tables
from .glu import geglu, geglu_packed, swiglu, swiglu_packed
from .patch import patch

__all__ = [
    "attention",
    "varlen_attention",
    "scaled_dot_product_attention",
    "layer_norm",
    "rms_norm",
    "add_layer_norm",
    "add_rms_norm",
    "cross_entropy",
    "linear_cross_entropy",
    "rope",
    "rope_tables",
    "swiglu",
    "geglu",
    "swiglu_packed",
    "geglu_packed",
    "use_backend",
    "use_attention_forward",
    "unchecked",
    "checks_enabled",
    "patch",
    "nn",
    "reference",
]
