"""Pure-PyTorch references of every op, with the same signatures as the public functions.

They run anywhere PyTorch runs, they are what CPU tensors use by default, and
they are the spec the Triton kernels are tested against. One module per op.
"""

from .norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from .attention import attention, scaled_dot_product_attention
from .cross_entropy import cross_entropy, linear_cross_entropy

__all__ = ["attention", "scaled_dot_product_attention", "layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "cross_entropy", "linear_cross_entropy"]
