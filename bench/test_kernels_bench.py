"""pytest-benchmark suite: every op, fastlm against its reference and what a user would otherwise call.

    pytest bench --benchmark-only [--benchmark-group-by=param:op]

Forward + backward of each op (attention, layer_norm, rms_norm, add_rms_norm,
cross_entropy, linear_cross_entropy, rope, swiglu, geglu, swiglu_packed), one
benchmark group per op, providers:

- ``fastlm``: the Triton kernels, on a GPU only (synchronising after each call);
  on CPU fastlm runs its references, which the next row times;
- ``reference``: the pure-PyTorch reference (``kernels.reference``); for
  linear_cross_entropy what the reference backend runs, the fused chunk loop with
  the pure-PyTorch per-chunk loss (the spec holds the logits, as ``torch`` does);
- ``torch``: torch eager as a user would write it (``F.layer_norm``, ``F.rms_norm``,
  ``F.cross_entropy``, ``F.linear`` + ``F.cross_entropy``, ``F.silu(gate) * up``, HF's
  ``apply_rotary_pos_emb`` (:func:`bench.rope.eager_rope`), and for attention
  :func:`bench.attention.eager_attention`, softmax(q k^T) v with the scores materialised);
- ``torch.compile``: the same compiled (``dynamic=False``; its compile falls in the
  untimed warm-up round);
- ``sdpa`` (attention): ``F.scaled_dot_product_attention``. In fp32, the CPU dtype,
  the attention reference is this very call (``kernels.reference.attention`` says why).

Small shapes on CPU (each step tens of milliseconds at most, 20 rounds), so the whole
suite runs anywhere in well under a minute. For
bandwidth/TFLOP/s figures and the fraction of the device's ceiling use the
``python -m bench.<op>`` scripts; this suite is for regression tracking with
pytest-benchmark's own comparison tools (``--benchmark-autosave``,
``--benchmark-compare``).
"""

import pytest
import torch
import torch.nn.functional as F

import kernels
from bench.attention import eager_attention
from bench.rope import eager_rope

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
BIG = DEVICE == "cuda"


def _inputs(*shapes, requires_grad=True):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    return [torch.randn(s, device=DEVICE, dtype=DTYPE, generator=g).requires_grad_(requires_grad) for s in shapes]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _summed(fn):
    """add+norm returns (normed, x + residual), rope (q_rot, k_rot): one scalar through both, as a block's two uses would."""
    return lambda *args: sum(t.float().sum() for t in fn(*args))


def _on_reference_backend(fn, *args):
    """linear_cross_entropy's reference backend is its chunk loop with the PyTorch per-chunk loss, not the spec."""
    with kernels.use_backend("reference"):
        return fn(*args)


def _providers(ours, reference, eager, **extra):
    providers = {"fastlm": ours} if DEVICE == "cuda" else {}
    return providers | {"reference": reference, "torch": eager,
                        "torch.compile": torch.compile(eager, dynamic=False)} | extra


def _cases():
    """op -> (make the inputs, {provider: fn})."""
    rows, hidden = (16384, 4096) if BIG else (1024, 1024)
    tokens, vocab, h = (8192, 128256, 4096) if BIG else (256, 4096, 128)
    b, nh, seq, d = (4, 16, 4096, 128) if BIG else (2, 4, 256, 64)
    target = torch.randint(0, vocab, (tokens,), device=DEVICE)
    ref = kernels.reference

    cos, sin = kernels.rope_tables(seq, d, device=DEVICE, dtype=DTYPE)
    cos, sin = cos[None].expand(b, -1, -1), sin[None].expand(b, -1, -1)  # HF's (batch, seq, head_dim)
    mlp = 11008 if BIG else 1024

    def add_rms_norm(x, r, w):
        s = x + r
        return F.rms_norm(s, (hidden,), w, 1e-6), s

    return {
        "attention": (
            lambda: _inputs((b, nh, seq, d), (b, nh, seq, d), (b, nh, seq, d)),
            _providers(
                lambda q, k, v: kernels.attention(q, k, v, causal=True),
                lambda q, k, v: ref.attention(q, k, v, causal=True),
                lambda q, k, v: eager_attention(q, k, v, causal=True),
                sdpa=lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            ),
        ),
        "layer_norm": (
            lambda: _inputs((rows, hidden), (hidden,), (hidden,)),
            _providers(
                lambda x, w, b_: kernels.layer_norm(x, (hidden,), w, b_),
                lambda x, w, b_: ref.layer_norm(x, (hidden,), w, b_),
                lambda x, w, b_: F.layer_norm(x, (hidden,), w, b_),
            ),
        ),
        "rms_norm": (
            lambda: _inputs((rows, hidden), (hidden,)),
            _providers(
                lambda x, w: kernels.rms_norm(x, (hidden,), w, 1e-6),
                lambda x, w: ref.rms_norm(x, (hidden,), w, 1e-6),
                lambda x, w: F.rms_norm(x, (hidden,), w, 1e-6),
            ),
        ),
        "add_rms_norm": (
            lambda: _inputs((rows, hidden), (rows, hidden), (hidden,)),
            _providers(
                _summed(lambda x, r, w: kernels.add_rms_norm(x, r, (hidden,), w, 1e-6)),
                _summed(lambda x, r, w: ref.add_rms_norm(x, r, (hidden,), w, 1e-6)),
                _summed(add_rms_norm),
            ),
        ),
        "cross_entropy": (
            lambda: _inputs((tokens, vocab)),
            _providers(
                lambda x: kernels.cross_entropy(x, target),
                lambda x: ref.cross_entropy(x, target),
                lambda x: F.cross_entropy(x, target),
            ),
        ),
        "linear_cross_entropy": (
            lambda: _inputs((tokens, h), (vocab, h)),
            _providers(
                lambda x, w: kernels.linear_cross_entropy(x, w, target),
                lambda x, w: _on_reference_backend(kernels.linear_cross_entropy, x, w, target),
                lambda x, w: F.cross_entropy(F.linear(x, w), target),
            ),
        ),
        "rope": (
            lambda: _inputs((b, nh, seq, d), (b, nh // 4, seq, d)),
            _providers(
                _summed(lambda q, k: kernels.rope(q, k, cos, sin)),
                _summed(lambda q, k: ref.rope(q, k, cos, sin)),
                _summed(lambda q, k: eager_rope(q, k, cos, sin)),
            ),
        ),
        "swiglu": (
            lambda: _inputs((rows, mlp), (rows, mlp)),
            _providers(kernels.swiglu, ref.swiglu, lambda gate, up: F.silu(gate) * up),
        ),
        "geglu": (
            lambda: _inputs((rows, mlp), (rows, mlp)),
            _providers(kernels.geglu, ref.geglu, lambda gate, up: F.gelu(gate, approximate="tanh") * up),
        ),
        "swiglu_packed": (
            lambda: _inputs((rows, 2 * mlp)),
            _providers(kernels.swiglu_packed, ref.swiglu_packed,
                       lambda gate_up: F.silu(gate_up[:, :mlp]) * gate_up[:, mlp:]),
        ),
    }


CASES = _cases()


@pytest.mark.parametrize(("op", "provider"), [(op, p) for op, (_, providers) in CASES.items() for p in providers])
def test_forward_backward(benchmark, op, provider):
    make, providers = CASES[op]
    fn = providers[provider]
    inputs = make()
    benchmark.group = op
    benchmark.extra_info.update(device=DEVICE, dtype=str(DTYPE),
                                backend="triton" if provider == "fastlm" else "pytorch")

    def step():
        out = fn(*inputs)
        out.float().sum().backward()
        _sync()

    benchmark.pedantic(step, rounds=20, warmup_rounds=1)
