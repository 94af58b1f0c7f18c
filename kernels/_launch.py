"""Small helpers shared by the launchers, and the record of every launch configuration.

Each op module exposes ``compile_specs()``: the kernels it ships with every
configuration its launchers can choose, built by the same functions the
launchers call. ``python -m bench.compile`` compiles them all for real GPU
targets without a GPU, so a configuration that fails to build or spills is
caught on CPU.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import triton


@dataclass(frozen=True)
class KernelSpec:
    """One kernel at one launch configuration, as ``triton.compile`` needs it."""

    kernel: Any  # triton.JITFunction
    signature: dict[str, str]  # argument -> "*fp32", "i32", "i64", "fp32" or "constexpr"
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int = 1
    hot: bool = True  # spills in a hot kernel fail the compile check
    label: str = ""
    # "divisible_by_16": argument names Triton's launcher marks tt.divisibility=16 for
    # aligned tensors; "targets": compute capabilities whose launcher can pick this config;
    # "quick": False leaves the config out of `bench.compile --quick` (the test suite's subset).
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", self.kernel)
        return getattr(fn, "__name__", str(fn))

    def describe(self) -> str:
        consts = ",".join(f"{k}={v}" for k, v in self.constexprs.items() if not k.startswith("_"))
        return f"{self.label or ''}[{consts}] w{self.num_warps} s{self.num_stages}"


def unique_specs(specs: list[KernelSpec]) -> list[KernelSpec]:
    """Drop configurations that differ only in their label (first one kept)."""
    seen, unique = set(), []
    for s in specs:
        key = (s.name, tuple(sorted(s.signature.items())), tuple(sorted(s.constexprs.items())), s.num_warps, s.num_stages)
        if key not in seen:
            seen.add(key)
            unique.append(s)
    return unique


TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def parallel_programs(device: torch.device) -> int:
    """How many programs keep the device busy in a persistent-style grid.

    On a GPU, two per SM. Under the interpreter (CPU) programs run one after
    another, so a handful is enough to exercise the multi-program path.
    """
    if device.type == "cuda":
        return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """View ``t`` as (rows, n) with unit stride along the last dim, copying only if it must.

    ``n`` 0 (rows of no features): the rows are the leading dims, which -1 cannot infer from 0 elements.
    """
    t2 = t.reshape(-1, n) if n else t.reshape(math.prod(t.shape[:-1]), 0)
    if t2.stride(-1) != 1 and n > 1:
        t2 = t2.contiguous()
    return t2


def row_stride(t: torch.Tensor) -> int:
    """The row stride of a (rows, n) view; a single row may report any stride, so take it as dense."""
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def cdiv(a: int, b: int) -> int:
    return triton.cdiv(a, b)
