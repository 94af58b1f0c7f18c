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

One op has a second, experimental GPU kernel: attention's forward in Gluon
(:mod:`kernels._attention_gluon`, Hopper only, built by the compiler but never run
on a GPU yet). It is off unless asked for: ``FASTLM_ATTENTION=gluon`` (or
:func:`use_attention_forward("gluon")`) runs it where the Triton kernels would
run, on CUDA tensors, never under the interpreter; ``kernels.attention`` then
takes it only for the inputs it supports and the Triton forward for the rest.

``TRITON_INTERPRET`` is read once, at import: ``@triton.jit`` reads it when a
kernel is decorated, so interpreted and compiled kernels cannot be mixed in one
process and changing the variable later would only make the two disagree.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

BACKENDS = ("auto", "triton", "reference")  # each tuple: the default first
ATTENTION_FORWARDS = ("triton", "gluon")

INTERPRETER: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

# The with-block choices, by the environment variable they take precedence over.
_overrides: dict[str, str | None] = {"FASTLM_BACKEND": None, "FASTLM_ATTENTION": None}


def _requested(variable: str, choices: tuple[str, ...]) -> str:
    """The choice in force: a with-block's override, else the environment variable, else the first choice."""
    name = _overrides[variable] if _overrides[variable] is not None else os.environ.get(variable, "")
    name = name.strip().lower() or choices[0]
    if name not in choices:
        raise ValueError(f"{variable} must be one of {choices}, got {name!r}")
    return name


@contextlib.contextmanager
def _overriding(variable: str, name: str, choices: tuple[str, ...], what: str) -> Iterator[None]:
    if name not in choices:
        raise ValueError(f"{what} must be one of {choices}, got {name!r}")
    previous, _overrides[variable] = _overrides[variable], name
    try:
        yield
    finally:
        _overrides[variable] = previous


def requested_backend() -> str:
    """The backend asked for: :func:`use_backend`'s override, else ``FASTLM_BACKEND``, else ``auto``."""
    return _requested("FASTLM_BACKEND", BACKENDS)


def use_backend(name: str) -> contextlib.AbstractContextManager[None]:
    """Force a backend (``auto``, ``triton`` or ``reference``) inside a ``with`` block.

    Takes precedence over ``FASTLM_BACKEND``. Used by the trainer's switch that runs
    a whole model on the references, and by tests.
    """
    return _overriding("FASTLM_BACKEND", name, BACKENDS, "backend")


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


def requested_attention_forward() -> str:
    """The attention forward asked for: :func:`use_attention_forward`'s override, else ``FASTLM_ATTENTION``,
    else ``triton``."""
    return _requested("FASTLM_ATTENTION", ATTENTION_FORWARDS)


def use_attention_forward(name: str) -> contextlib.AbstractContextManager[None]:
    """Choose attention's forward kernel (``triton`` or the experimental ``gluon``) inside a ``with`` block.

    Takes precedence over ``FASTLM_ATTENTION``.
    """
    return _overriding("FASTLM_ATTENTION", name, ATTENTION_FORWARDS, "attention forward")


def use_gluon_attention(device: torch.device) -> bool:
    """True when attention's forward on ``device`` should try the Gluon kernel: asked for, and a real GPU
    launch (the Triton backend on CUDA tensors; Gluon has no interpreter)."""
    return (requested_attention_forward() == "gluon" and device.type == "cuda" and not INTERPRETER
            and use_triton(device))
