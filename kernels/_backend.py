"""The one place that decides whether an op runs its Triton kernel or its reference.

Rules, in order:

1. ``FASTLM_BACKEND=reference`` (or :func:`use_backend("reference")`) forces the
   pure-PyTorch reference everywhere.
2. ``FASTLM_BACKEND=triton`` forces the Triton kernels; on CPU tensors this needs
   ``TRITON_INTERPRET=1``, otherwise it is an error rather than a silent fallback.
3. Otherwise (``auto``, the default): CUDA tensors run the compiled Triton kernels,
   CPU tensors run the reference, unless ``TRITON_INTERPRET=1`` was set when
   :mod:`kernels` was imported, in which case CPU tensors run the Triton kernels
   through Triton's interpreter.

``TRITON_INTERPRET`` is read once, at import: ``@triton.jit`` reads it when a
kernel is decorated, so interpreted and compiled kernels cannot be mixed in one
process and changing the variable later would only make the two disagree.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

BACKENDS = ("auto", "triton", "reference")

INTERPRETER: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

_override: str | None = None


def requested_backend() -> str:
    """The backend asked for: :func:`use_backend`'s override, else ``FASTLM_BACKEND``, else ``auto``."""
    name = _override if _override is not None else os.environ.get("FASTLM_BACKEND", "auto")
    name = name.strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"FASTLM_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend (``auto``, ``triton`` or ``reference``) inside a ``with`` block.

    Takes precedence over ``FASTLM_BACKEND``. Used by the trainer's switch that runs
    a whole model on the references, and by tests.
    """
    global _override
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    previous, _override = _override, name
    try:
        yield
    finally:
        _override = previous


def use_triton(device: torch.device) -> bool:
    """True when an op on tensors of ``device`` should run its Triton kernel."""
    name = requested_backend()
    if name == "reference":
        return False
    on_gpu = device.type == "cuda"
    if name == "triton":
        if on_gpu or (device.type == "cpu" and INTERPRETER):
            return True
        raise RuntimeError(
            f"FASTLM_BACKEND=triton needs CUDA tensors, or TRITON_INTERPRET=1 set before "
            f"importing kernels to run the kernels on CPU; got tensors on {device}"
        )
    return on_gpu or (device.type == "cpu" and INTERPRETER)
