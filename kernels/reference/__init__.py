"""Pure-PyTorch references of every op, with the same signatures as the public functions.

They run anywhere PyTorch runs, they are the spec the Triton kernels are tested
against, and they are what CPU tensors use by default, but for
``linear_cross_entropy``: its spec here holds the whole logits, so the reference
backend runs the kernel's chunk loop (:mod:`kernels._chunked_linear_cross_entropy`)
with this package's per-chunk loss instead. One module per op.
"""

from .norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from .attention import attention, scaled_dot_product_attention, varlen_attention
from .cross_entropy import cross_entropy, linear_cross_entropy

__all__ = ["attention", "varlen_attention", "scaled_dot_product_attention", "layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "cross_entropy", "linear_cross_entropy"]
