"""The ops' ``torch.library`` side: one namespace (``fastlm::``), and what every op module shares.

Why the ops exist: ``torch.compile`` and ``torch.export`` see a registered op as
one node with a known schema, fake (meta) implementation and autograd formula,
where a Python ``autograd.Function`` around a Triton launch is something they
must trace into or break the graph on.

How dispatch works, and why the public function picks, not the op:

- Each ``kernels.*`` function validates its arguments eagerly (clear errors
  that name the argument), then asks :func:`kernels._backend.use_triton`.
  On the **reference** backend it runs :mod:`kernels.reference` directly: plain
  torch ops, which autograd (double backward included), autocast and
  ``torch.compile`` understand natively; no op is involved. On the **Triton**
  backend it calls ``torch.ops.fastlm.<op>``, whose backward is another
  ``fastlm::`` op registered with ``register_autograd``.
  (``linear_cross_entropy`` calls its op on both backends: both run the same
  chunk loop, only the per-chunk loss differs.)
- Each op has one implementation for every device, which asks the backend
  switch again: the Triton kernel when :func:`use_triton` says so (CUDA tensors,
  or CPU tensors under ``TRITON_INTERPRET=1``), otherwise a pure-PyTorch twin
  of the kernel's contract (the same extra outputs: statistics, gradients).
  So the CPU implementation is the reference unless the interpreter is on,
  the CUDA one the compiled kernel, and ``opcheck`` can test either.
- :func:`define_op` registers the op with ``torch.library.triton_op`` where torch
  has it (2.6+) and the kernels are compiled: Inductor then traces into the
  implementation and sees the kernels (launched through :func:`launch`, i.e.
  ``wrap_triton``). The same function is the fake implementation, so it must
  be traceable: no ``.item()``, no ``data_ptr()``. Under the interpreter, and on
  torch without a ``triton_op`` that takes our schema (before 2.14 it infers one
  from type annotations instead), it falls back to an opaque ``custom_op`` whose
  fake implementation is the same function with every launch skipped.

Autocast: each public function does what the torch op it replaces does under
autocast (see :func:`autocast_inputs`): the norms follow torch's norm policy on
that device (fp32 on CUDA; CPU autocast leaves norms alone), attention and the
GEMM of ``linear_cross_entropy`` run in the autocast dtype, the cross-entropy
itself always computes in fp32 and returns an fp32 loss.

Value checks (targets in range, ``kv_lens`` in range) need the tensors' values,
that is a host synchronisation per call. They run eagerly by default; inside
:func:`unchecked`, and while ``torch.compile`` traces, they are skipped (the
kernels clamp what they index, so an unchecked bad value gives a wrong result,
never an out-of-bounds access): validate where the values are born instead.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Callable, Iterator

import numpy
import torch
import triton
import triton.language as tl

from ._backend import INTERPRETER

NAMESPACE = "fastlm"

# triton_op needs wrap_triton to accept the kernels: compiled ones only (the interpreter's
# InterpretedFunction cannot be traced into a graph, so those ops stay opaque).
USE_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton") and not INTERPRETER


def define_op(name: str, fn: Callable, schema: str, mutates_args: tuple[str, ...] = ()):
    """Register ``fastlm::name`` with implementation (and fake implementation) ``fn``; returns the op."""
    global USE_TRITON_OP
    qualname = f"{NAMESPACE}::{name}"
    if USE_TRITON_OP:
        try:
            return torch.library.triton_op(qualname, fn, schema=schema, mutates_args=mutates_args)
        except (TypeError, ValueError):
            # torch before 2.14 (2.13 checked; the GPU machine has 2.11) ignores schema= and infers one from
            # fn's type annotations, which ours do not have; older ones reject the keyword. Both fail
            # before registering anything: every op is then an opaque custom op, and launch() runs the
            # kernels directly (custom_op below still raises on a schema that is itself wrong).
            USE_TRITON_OP = False
    op = torch.library.custom_op(qualname, fn, schema=schema, mutates_args=mutates_args)
    op.register_fake(fn)
    return op


class _SkipWhenFake:
    """``kernel[grid](...)`` that launches on real tensors and does nothing on fake ones (shape propagation)."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            if torch._guards.detect_fake_mode(list(args) + list(kwargs.values())) is not None:
                return None
            if INTERPRETER:
                check_interpreter()
            return self.kernel[grid](*args, **kwargs)

        return run


def launch(kernel):
    """How an op implementation launches a Triton kernel: ``launch(kernel)[grid](*args)``.

    ``wrap_triton`` for ops registered with ``triton_op`` (Inductor sees the launch);
    otherwise the kernel itself, skipped while the op's fake implementation runs.
    """
    if USE_TRITON_OP:
        return torch.library.wrap_triton(kernel)
    return _SkipWhenFake(kernel)


@triton.jit
def _loop_bound_probe(X, n):
    for i in range(0, n + tl.program_id(0)):  # a bound the interpreter reads from a scalar tensor
        tl.store(X, i)


@functools.cache
def check_interpreter() -> None:
    """Raise a clear error where Triton's interpreter cannot run the kernels (checked once, on CPU).

    Triton 3.6 and older convert a scalar such as a runtime loop bound with ``int()`` of its
    1-element array, which NumPy 2.4 refuses (triton-lang/triton#9171; later Triton squeezes
    first): every kernel with such a bound would fail with "only 0-dimensional arrays can be
    converted to Python scalars".
    """
    try:
        with torch._subclasses.fake_tensor.unset_fake_temporarily():  # a real tensor even while tracing
            _loop_bound_probe[(1,)](torch.zeros(1, dtype=torch.int32), 2)
    except Exception as e:
        raise RuntimeError(
            f"Triton {triton.__version__}'s interpreter cannot run the kernels with NumPy {numpy.__version__}: "
            f"it reads a loop bound as int() of a 1-element array, which NumPy 2.4 refuses. Install "
            f"'numpy<2.4' or a newer triton, or run the references (FASTLM_BACKEND=reference)"
        ) from e


def no_tensor(like: torch.Tensor) -> torch.Tensor:
    """The stand-in an op returns for an absent optional tensor output (ops cannot return None)."""
    return like.new_empty((0,))


def present(t: torch.Tensor) -> torch.Tensor | None:
    """Undo :func:`no_tensor`."""
    return None if t.numel() == 0 and t.dim() == 1 else t


# ----------------------------------------------------------------------------- autocast


def _has_autocast_kernel(aten_op: str, device_type: str) -> bool:
    """Whether torch's own op has an autocast rule on ``device_type`` (norms: always the fp32 rule)."""
    key = {"cuda": "AutocastCUDA", "cpu": "AutocastCPU"}.get(device_type)
    try:
        return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(aten_op, key)
    except (AttributeError, RuntimeError):
        return device_type == "cuda"  # torch's documented CUDA fp32 list holds layer_norm


# Read once at import: torch's registrations do not change, and compiled code reads a constant.
NORM_RUNS_IN_FP32 = {
    (op, dev): _has_autocast_kernel(f"aten::{op}", dev) for op in ("layer_norm", "rms_norm") for dev in ("cuda", "cpu")
}


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype active for ``device``'s type, or None when autocast is off there."""
    if device.type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def autocast_inputs(dtype: torch.dtype | None, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Cast the floating tensors to ``dtype`` (autograd records the casts), as autocast casts an op's inputs."""
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype else t
                 for t in tensors)


_autocast_library: torch.library.Library | None = None


def register_autocast(name: str, rule: Callable[[str, tuple], torch.dtype | None]) -> None:
    """The autocast rule of ``fastlm::name``, for callers of ``torch.ops.fastlm.*`` (the public functions
    cast first): ``rule(device_type, args)`` is the dtype its floating inputs run in, or None to leave them.

    A rule of the arguments, where ``torch.library.register_autocast`` casts every call alike: one norm
    op stands for both ``layer_norm`` and ``rms_norm``, whose rules torch may set apart.
    """
    global _autocast_library
    if _autocast_library is None:
        _autocast_library = torch.library.Library(NAMESPACE, "IMPL")
    overload = getattr(getattr(torch.ops, NAMESPACE), name).default
    for device_type in ("cuda", "cpu"):
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        autocast_keys = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_, *args, device_type=device_type, autocast_keys=autocast_keys):
            dtype = rule(device_type, args)
            if dtype is not None:  # as autocast casts: this device's floating tensors, fp64 excepted
                args = tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point()
                             and a.device.type == device_type and a.dtype != torch.float64 else a for a in args)
            with torch._C._ExcludeDispatchKeyGuard(autocast_keys):
                return overload(*args)

        _autocast_library.impl(name, kernel, key, with_keyset=True)


# ----------------------------------------------------------------------------- value checks

_state = threading.local()


@contextlib.contextmanager
def unchecked() -> Iterator[None]:
    """Skip the checks that read tensor values (one host synchronisation each) inside a ``with`` block.

    ``kernels.cross_entropy``/``linear_cross_entropy`` then skip the target range
    check and ``kernels.attention`` the ``kv_lens`` range check, so a training step
    makes no host sync in the kernels. Shapes, dtypes and devices are still checked.
    Validate the values where they are made (the data pipeline) instead: an
    out-of-range value gives an undefined result (never an out-of-bounds access).
    ``torch.compile`` skips these checks too, as if inside this block.
    """
    previous = getattr(_state, "unchecked", False)
    _state.unchecked = True
    try:
        yield
    finally:
        _state.unchecked = previous


def checks_enabled() -> bool:
    """Whether value checks (a host sync each) run now: eager, outside :func:`unchecked`; False while
    ``torch.compile`` traces. Public (``kernels.checks_enabled``) for code that checks its own values
    alongside the kernels' and should skip them where the kernels do."""
    if torch.compiler.is_compiling():
        return False
    return not getattr(_state, "unchecked", False)


check_values = checks_enabled  # the name the op modules use
