"""Argument checks shared by every op: each error names the argument and what was expected.

Checks run on the host before any launch, because a kernel that reads out of
bounds or is handed the wrong dtype fails silently (or crashes the process)
instead of telling the user what was wrong.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_float(name: str, t: object) -> torch.Tensor:
    """A floating-point tensor of a dtype the kernels support (fp32, fp16, bf16)."""
    t = check_tensor(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    return t


def check_integer(name: str, t: object) -> torch.Tensor:
    t = check_tensor(name, t)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    return t


def as_int64(name: str, t: object) -> torch.Tensor:
    """An integer tensor (indices, lengths) as int64, the one index dtype the kernels and torch's ops take.

    Compared in their own dtype, narrow indices go wrong without an error: in
    uint8, ``target != -100`` compares with -100 wrapped to 156, a real class.
    uint64 is refused: int64 cannot hold its upper half. No copy for int64.
    """
    t = check_integer(name, t)
    if t.dtype == torch.uint64:
        raise TypeError(f"{name} must be an integer tensor whose values int64 can hold (not uint64), got {t.dtype}")
    return t.long()


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """All given tensors on one device; returns it. ``None`` entries are skipped."""
    present = {k: v for k, v in tensors.items() if v is not None}
    first_name, first = next(iter(present.items()))
    for name, t in present.items():
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; "
                f"all tensors must be on the same device"
            )
    return first.device


def check_same_dtype(**tensors: torch.Tensor | None) -> torch.dtype:
    present = {k: v for k, v in tensors.items() if v is not None}
    first_name, first = next(iter(present.items()))
    for name, t in present.items():
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; they must match")
    return first.dtype


def check_positive(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)
