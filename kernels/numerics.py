"""The one numeric rule a kernel is judged by: the self-check, the tests and the benchmarks use it.

Three results from the same inputs: the kernel's, a golden reference computed in
higher precision (fp32, or fp64 when the kernel itself runs in fp32: see
:func:`golden_dtype`), and the same reference computed in the kernel's own dtype.
Each output and each gradient passes when::

    max|kernel - golden| <= factor * max|same-dtype reference - golden| + atol

``factor`` is 2 for outputs and gradients, except attention's gradients: 3
(FlashAttention's rule, :data:`FACTORS`). ``atol`` is about one ulp of an O(1)
value in the kernel's dtype (:data:`ATOL`), for outputs where torch itself is
exact; a reduced loss, a sum over many tokens, adds one fp32 ulp of its own
magnitude (:func:`loss_atol`).
"""

from __future__ import annotations

import torch

# Slack per dtype: about one ulp of an O(1) value (bf16 also covers the interpreter's
# truncating fp32->bf16 cast). A dtype not listed (fp64) gets fp32's.
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# op -> (factor for its outputs, factor for its gradients).
FACTORS = {
    "layer_norm": (2.0, 2.0),
    "rms_norm": (2.0, 2.0),
    "add_layer_norm": (2.0, 2.0),
    "add_rms_norm": (2.0, 2.0),
    "cross_entropy": (2.0, 2.0),
    "linear_cross_entropy": (2.0, 2.0),
    "attention": (2.0, 3.0),  # FlashAttention: 2x forward, 3x gradients (dq, dk, dv)
    "rope": (2.0, 2.0),
    "swiglu": (2.0, 2.0),
    "geglu": (2.0, 2.0),
}


def golden_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of the golden reference for a kernel running in ``dtype``."""
    return torch.float64 if dtype == torch.float32 else torch.float32


def factor(op: str, *, gradient: bool) -> float:
    """How many times the same-dtype reference's error ``op``'s output (or gradient) may have."""
    if op not in FACTORS:
        raise KeyError(f"no numeric rule for op {op!r}; known: {sorted(FACTORS)}")
    return FACTORS[op][1 if gradient else 0]


def loss_atol(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """The slack of a loss (fp32) of a kernel running in ``dtype``: ``ATOL[dtype]`` plus one fp32 ulp of it.

    A sum over many tokens is not O(1), so a fixed slack would be less than its rounding.
    """
    return ATOL[dtype] + torch.finfo(torch.float32).eps * ref.abs().max().item()


def _atol(ref_lowp: torch.Tensor, atol: float | None) -> float:
    return ATOL.get(ref_lowp.dtype, ATOL[torch.float32]) if atol is None else atol


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def compare(out, ref32, ref_lowp, *, factor: float, atol: float | None = None) -> tuple[float, float, float]:
    """``(max|out - ref32|, max|ref_lowp - ref32|, bound)``; ``out`` passes when the first is <= the bound.

    ``atol`` defaults to :data:`ATOL` of ``ref_lowp``'s dtype.
    """
    atol = _atol(ref_lowp, atol)
    torch_err = max_err(ref_lowp, ref32)
    return max_err(out, ref32), torch_err, factor * torch_err + atol


def assert_close_to_ref(out, ref32, ref_lowp, *, factor: float, atol: float | None = None, name: str = "output"):
    """Assert the rule: ``max|out - ref32| <= factor * max|ref_lowp - ref32| + atol``, and matching shapes, finite."""
    assert out.shape == ref32.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref32.shape)}"
    assert torch.isfinite(out.float()).all(), f"{name}: non-finite values"
    atol = _atol(ref_lowp, atol)
    err, torch_err, bound = compare(out, ref32, ref_lowp, factor=factor, atol=atol)
    assert err <= bound, f"{name}: max error {err:.3g} > {factor} x torch's same-dtype error {torch_err:.3g} + {atol:g}"
