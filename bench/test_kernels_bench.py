"""pytest-benchmark suite: every op, fastlm against what a user would otherwise call.

    pytest bench --benchmark-only [--benchmark-group-by=param:op]

On a GPU it times the Triton kernels (synchronising after each call) against
torch eager; on CPU, where fastlm runs its PyTorch references, it times those
against torch, so it runs anywhere. Forward + backward in each case. For
bandwidth/TFLOP/s figures and the fraction of the device's ceiling use the
``python -m bench.<op>`` scripts; this suite is for regression tracking with
pytest-benchmark's own comparison tools (``--benchmark-autosave``,
``--benchmark-compare``).
"""

import pytest
import torch
import torch.nn.functional as F

import kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
BIG = DEVICE == "cuda"


def _inputs(*shapes, requires_grad=True):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    return [torch.randn(s, device=DEVICE, dtype=DTYPE, generator=g).requires_grad_(requires_grad) for s in shapes]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _cases():
    rows, hidden = (16384, 4096) if BIG else (2048, 1024)
    tokens, vocab, h = (8192, 128256, 4096) if BIG else (1024, 8192, 256)
    b, nh, seq, d = (4, 16, 4096, 128) if BIG else (2, 4, 256, 64)
    target = torch.randint(0, vocab, (tokens,), device=DEVICE)
    cases = {
        "layer_norm": (
            lambda: _inputs((rows, hidden), (hidden,), (hidden,)),
            lambda x, w, b_: kernels.layer_norm(x, (hidden,), w, b_),
            lambda x, w, b_: F.layer_norm(x, (hidden,), w, b_),
        ),
        "rms_norm": (
            lambda: _inputs((rows, hidden), (hidden,)),
            lambda x, w: kernels.rms_norm(x, (hidden,), w, 1e-6),
            lambda x, w: F.rms_norm(x, (hidden,), w, 1e-6),
        ),
        "add_rms_norm": (
            lambda: _inputs((rows, hidden), (rows, hidden), (hidden,)),
            lambda x, r, w: sum(t.float().sum() for t in kernels.add_rms_norm(x, r, (hidden,), w, 1e-6)),
            lambda x, r, w: (lambda s: F.rms_norm(s, (hidden,), w, 1e-6).float().sum() + s.float().sum())(x + r),
        ),
        "cross_entropy": (
            lambda: _inputs((tokens, vocab)),
            lambda x: kernels.cross_entropy(x, target),
            lambda x: F.cross_entropy(x, target),
        ),
        "linear_cross_entropy": (
            lambda: _inputs((tokens, h), (vocab, h)),
            lambda x, w: kernels.linear_cross_entropy(x, w, target),
            lambda x, w: F.cross_entropy(F.linear(x, w), target),
        ),
        "attention": (
            lambda: _inputs((b, nh, seq, d), (b, nh, seq, d), (b, nh, seq, d)),
            lambda q, k, v: kernels.attention(q, k, v, causal=True),
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        ),
    }
    return cases


CASES = _cases()


@pytest.mark.parametrize("provider", ["fastlm", "torch"])
@pytest.mark.parametrize("op", list(CASES))
def test_forward_backward(benchmark, op, provider):
    make, ours, theirs = CASES[op]
    fn = ours if provider == "fastlm" else theirs
    inputs = make()
    benchmark.group = op
    benchmark.extra_info.update(device=DEVICE, dtype=str(DTYPE), backend="triton" if DEVICE == "cuda" else "reference")

    def step():
        out = fn(*inputs)
        out.float().sum().backward()
        _sync()

    benchmark.pedantic(step, rounds=5 if DEVICE == "cpu" else 20, warmup_rounds=1)
