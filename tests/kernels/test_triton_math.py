"""kernels._triton_math: the Triton helpers the kernels share, against torch (interpreter on CPU)."""

import importlib
import warnings

import torch
import triton
import triton.language as tl

from helpers import DEVICE

triton_math = importlib.import_module("kernels._triton_math")


@triton.jit
def _tanh_kernel(X, Y, N, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < N
    tl.store(Y + offsets, triton_math.tanh(tl.load(X + offsets, mask=mask)), mask=mask)


def test_tanh_matches_torch_over_the_fp32_range():
    magnitudes = torch.cat([torch.logspace(-12, 4, 2000), torch.linspace(0, 20, 2001)])
    x = torch.cat([magnitudes, -magnitudes, torch.tensor([1e4, -1e4, float("inf"), float("-inf"), float("nan")])])
    x = x.float().to(DEVICE)
    y = torch.empty_like(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the interpreter's numpy reports an overflowing exp (2 * sigmoid(2x) - 1 does)
        _tanh_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    finite = x.isfinite()
    golden = torch.tanh(x[finite].double())
    # The sigmoid form errs by 1.7e-7 (three ulps of a result near 1) and 1.2e-4 relative.
    assert (y[finite].double() - golden).abs().max() <= 1.5e-7
    large = x[finite].abs() >= 1e-3
    assert ((y[finite].double() - golden).abs() / golden.abs())[large].max() <= 6e-5
    assert y[-5:-1].tolist() == [1.0, -1.0, 1.0, -1.0] and y[-1].isnan()


def test_attention_and_cross_entropy_share_the_tanh():
    attention, cross_entropy = (importlib.import_module(f"kernels.{m}") for m in ("attention", "cross_entropy"))
    assert attention._tanh is triton_math.tanh and cross_entropy.tanh is triton_math.tanh
