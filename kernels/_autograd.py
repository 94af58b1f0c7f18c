"""What the ops' backward functions (registered with torch.library) share: first-order only.

A backward written as kernels (or as a chunk loop outside autograd) hands back
gradients that autograd sees as constants. Asked to record a graph of the
backward (``create_graph=True``: a gradient penalty, a Hessian-vector product),
it would silently drop every second-order term. :func:`first_order_only` makes
that request a clear error instead; first-order gradients are unaffected.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch


def first_order_only(message: str | Callable[[object], str]):
    """Decorate a backward (an autograd Function's, or an op's ``register_autograd`` one) that is first-order only.

    Autograd runs a backward with grad mode on only when asked to record a graph
    of it (``create_graph=True``): then the decorated backward raises
    ``RuntimeError(message)`` instead of returning gradients that look constant.
    ``message`` may be a function of ``ctx``.
    """

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            if torch.is_grad_enabled():
                raise RuntimeError(message(ctx) if callable(message) else message)
            return backward(ctx, *grad_outputs)

        return wrapper

    return decorate


def triton_only_first_order(op: str) -> str:
    """The error for a Triton op's double backward: the reference backend has one."""
    return (
        f"kernels.{op} (Triton backend) does not support double backward (create_graph=True): its backward "
        f"kernels compute first-order gradients only; use the reference backend (FASTLM_BACKEND=reference "
        f"or kernels.use_backend('reference')) for higher-order gradients"
    )
