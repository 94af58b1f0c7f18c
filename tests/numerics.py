"""The comparison rule every numerical test uses (see shared/docs/testing-kernels.md).

Three results from the same inputs: the kernel's, a golden reference computed in
higher precision (fp32, or fp64 when the kernel itself runs in fp32: see
:func:`golden_dtype`), and the same reference computed in the kernel's own dtype. The kernel passes
when its error against fp32 is no worse than ``factor`` times the same-dtype
reference's error, plus a small absolute slack ``atol`` (for outputs where
torch itself is exact, and for one-ulp rounding differences).
"""

from __future__ import annotations

import torch

# The slack per dtype and the golden precision are the self-check's, so the two apply one rule.
from kernels.selfcheck import ATOL, golden_dtype  # noqa: E402,F401


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def assert_close_to_ref(out, ref32, ref_lowp, *, factor: float = 2.0, atol: float | None = None, name: str = "output"):
    """``max|out - ref32| <= factor * max|ref_lowp - ref32| + atol``."""
    assert out.shape == ref32.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref32.shape)}"
    assert torch.isfinite(out.float()).all(), f"{name}: non-finite values"
    if atol is None:
        atol = ATOL[ref_lowp.dtype] if ref_lowp.dtype in ATOL else 1e-5
    err = max_err(out, ref32)
    torch_err = max_err(ref_lowp, ref32)
    bound = factor * torch_err + atol
    assert err <= bound, f"{name}: max error {err:.3g} > {factor} x torch's same-dtype error {torch_err:.3g} + {atol:g}"
