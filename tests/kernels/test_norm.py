"""LayerNorm / RMSNorm (plain and with fused residual add): Triton kernels against the fp32 reference.

On a GPU these run the compiled kernels on CUDA tensors; without one, the same
kernels through the interpreter on CPU (see conftest.py). Each output and gradient must be within the rule of
kernels/numerics.py: no worse than 2x torch's own same-dtype error plus one ulp.
"""

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import _backend
from helpers import DEVICE
from kernels.numerics import assert_close_to_ref, factor, golden_dtype

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (input shape, normalized_shape): ragged, tiny, wide (streaming path), multi-dim.
SHAPES = [
    ((1, 1), (1,)),
    ((3, 123), (123,)),
    ((2, 5, 1000), (1000,)),
    ((7, 4096), (4096,)),
    ((3, 5, 7), (5, 7)),
    ((2, 20000), (20000,)),  # wider than the one-pass limits: exercises the streaming kernels
]


def _torch_norm(kind, x, ns, w, b, eps):
    if kind == "layer":
        return F.layer_norm(x, ns, w, b, eps)
    return F.rms_norm(x, ns, w, eps)


def _run(kind, fused, x, r, ns, w, b, eps):
    """The op under test; returns the tensors whose values and gradients are compared."""
    if fused:
        if kind == "layer":
            return kernels.add_layer_norm(x, r, ns, w, b, eps)
        return kernels.add_rms_norm(x, r, ns, w, eps)
    if kind == "layer":
        return (kernels.layer_norm(x, ns, w, b, eps),)
    return (kernels.rms_norm(x, ns, w, eps),)


def _torch_reference(kind, fused, x, r, ns, w, b, eps):
    if fused:
        s = x + r
        return _torch_norm(kind, s, ns, w, b, eps), s
    return (_torch_norm(kind, x, ns, w, b, eps),)


def _leaf(t, dtype):
    return None if t is None else t.detach().to(dtype).requires_grad_()


def _compare(kind, fused, shape, ns, dtype, **kw):
    _compare_on(kind, fused, shape, ns, dtype, DEVICE, **kw)


def _compare_on(kind, fused, shape, ns, dtype, device, *, affine=True, bias=True, noncontig=False, scale=1.0):
    torch.manual_seed(0)
    eps = 1e-5 if kind == "layer" else 1e-6
    base = torch.randn(shape) * scale + 0.5
    if noncontig:
        # Same values, but a transposed layout for both the input and the upstream gradient.
        base = base.transpose(0, -1).contiguous().transpose(0, -1)
    res = torch.randn(shape) if fused else None
    w = torch.randn(ns) if affine else None
    b = torch.randn(ns) if (affine and bias and kind == "layer") else None
    grads = [torch.randn(shape) for _ in range(2 if fused else 1)]
    if noncontig:
        grads = [g.transpose(0, -1).contiguous().transpose(0, -1) for g in grads]

    def run(fn, dt):
        leaves = [_leaf(t.to(device) if t is not None else None, dt) for t in (base, res, w, b)]  # .to() keeps a permuted layout
        outs = fn(kind, fused, leaves[0], leaves[1], ns, leaves[2], leaves[3], eps)
        torch.autograd.backward(outs, [g.to(device, dt) for g in grads])
        return list(outs) + [t.grad for t in leaves if t is not None]

    if noncontig:
        assert not base.is_contiguous() and not grads[0].is_contiguous()
    out = run(_run, dtype)
    ref32 = run(_torch_reference, golden_dtype(dtype))
    ref_lp = run(_torch_reference, dtype)
    names = (["y", "s", "dx", "dres"] if fused else ["y", "dx"]) + ["dw", "db"]
    op = ("add_" if fused else "") + f"{kind}_norm"
    for o, r32, rlp, name in zip(out, ref32, ref_lp, names):
        assert o.dtype == rlp.dtype, f"{name}: dtype {o.dtype} != {rlp.dtype}"
        rule = factor(op, gradient=name.startswith("d"))
        assert_close_to_ref(o, r32, rlp, factor=rule, name=f"{kind} {name} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,ns", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_norm_matches_reference(kind, shape, ns, dtype):
    _compare(kind, False, shape, ns, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,ns", [((3, 123), (123,)), ((2, 3, 1000), (1000,)), ((2, 20000), (20000,))], ids=str)
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_add_norm_matches_reference(kind, shape, ns, dtype):
    _compare(kind, True, shape, ns, dtype)


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("affine,bias", [(False, False), (True, False)])
def test_without_weight_or_bias(kind, affine, bias):
    _compare(kind, False, (5, 300), (300,), torch.float16, affine=affine, bias=bias)


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_non_contiguous_input_and_grad(kind):
    _compare(kind, False, (64, 6, 96), (96,), torch.float32, noncontig=True)
    _compare(kind, True, (64, 6, 96), (96,), torch.float16, noncontig=True)


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_large_offset_input(kind):
    # Large mean relative to spread: fp32 statistics must stay accurate.
    _compare(kind, False, (4, 512), (512,), torch.float16, scale=30.0)


def test_strided_row_view_is_not_copied_wrongly():
    # A view with a row stride larger than the row (e.g. a slice of a wider buffer).
    torch.manual_seed(1)
    big = torch.randn(6, 200)
    x = big[:, :150]
    w = torch.randn(150)
    out = kernels.rms_norm(x, (150,), w, 1e-6)
    torch.testing.assert_close(out, F.rms_norm(x, (150,), w, 1e-6), rtol=1e-5, atol=1e-5)


def test_empty_leading_dims():
    x = torch.randn(0, 3, 64, requires_grad=True)
    w = torch.randn(64, requires_grad=True)
    b = torch.randn(64, requires_grad=True)
    y = kernels.layer_norm(x, (64,), w, b)
    assert y.shape == (0, 3, 64)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros(64)) and torch.equal(b.grad, torch.zeros(64))


def test_backward_is_deterministic():
    torch.manual_seed(2)
    x = torch.randn(37, 300, requires_grad=True)
    w = torch.randn(300, requires_grad=True)
    g = torch.randn(37, 300)
    grads = []
    for _ in range(2):
        x.grad = w.grad = None
        kernels.rms_norm(x, 300, w).backward(g)
        grads.append((x.grad.clone(), w.grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_rms_norm_default_eps_is_torchs(dtype):
    # eps=None is torch's default: the epsilon of the dtype the statistics are computed in (fp32 for
    # fp16/bf16 inputs, as aten and torch's decomposition pick it), not finfo(bf16).eps = 0.0078, which
    # swamps the mean square of small activations. Both backends, the function and the module.
    x = torch.full((2, 8), 1e-3, dtype=dtype)
    expected = F.rms_norm(x, (8,))
    assert expected.float().min() > 0.9  # 1e-3 / sqrt(1e-6 + 1.2e-7) (with 0.0078: 0.011)
    for backend in ("auto", "reference"):
        with kernels.use_backend(backend):
            torch.testing.assert_close(kernels.rms_norm(x, 8), expected)
            torch.testing.assert_close(kernels.add_rms_norm(x, torch.zeros_like(x), 8)[0], expected)
            torch.testing.assert_close(kernels.reference.rms_norm(x, 8), expected)
            torch.testing.assert_close(kernels.nn.RMSNorm(8, dtype=dtype)(x), torch.nn.RMSNorm(8, dtype=dtype)(x))


# ------------------------------------------------------------------ drop-in modules


@pytest.mark.parametrize("cls,torch_cls", [(kernels.nn.LayerNorm, torch.nn.LayerNorm), (kernels.nn.RMSNorm, torch.nn.RMSNorm)])
def test_modules_are_drop_in(cls, torch_cls):
    torch.manual_seed(3)
    theirs = torch_cls((4, 32), eps=1e-5)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p))
    ours = cls((4, 32), eps=1e-5)
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())  # and back
    x = torch.randn(3, 4, 32)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_layer_norm_module_without_bias():
    m = kernels.nn.LayerNorm(48, bias=False)
    assert m.bias is None
    x = torch.randn(5, 48)
    torch.testing.assert_close(m(x), F.layer_norm(x, (48,), m.weight, None, m.eps))


# ------------------------------------------------------------------ backend dispatch


def test_reference_backend_forced(monkeypatch):
    x = torch.randn(4, 16)
    monkeypatch.setenv("FASTLM_BACKEND", "reference")
    y = kernels.layer_norm(x, 16)
    assert y.grad_fn is None or "fastlm" not in type(y.grad_fn).__name__
    with kernels.use_backend("triton"):
        x.requires_grad_()
        y = kernels.layer_norm(x, 16)
        assert "fastlm_norm" in type(y.grad_fn).__name__  # the fastlm::norm op's autograd


def test_triton_backend_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setattr(_backend, "INTERPRETER", False)
    monkeypatch.setenv("FASTLM_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.rms_norm(torch.randn(2, 8), 8)
    monkeypatch.setenv("FASTLM_BACKEND", "auto")
    # auto on CPU without the interpreter: the reference, no error
    kernels.rms_norm(torch.randn(2, 8), 8)


def test_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("FASTLM_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="FASTLM_BACKEND"):
        kernels.rms_norm(torch.randn(2, 8), 8)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: kernels.layer_norm(torch.randn(2, 8), 8, weight=torch.randn(7)), ValueError, "weight"),
        (lambda: kernels.layer_norm(torch.randn(2, 8), 8, bias=torch.randn(8, 1)), ValueError, "bias"),
        (lambda: kernels.rms_norm(torch.randn(2, 8), 7), ValueError, "normalized_shape"),
        (lambda: kernels.rms_norm(torch.randn(2, 8), (2, 8, 1)), ValueError, "normalized_shape"),
        (lambda: kernels.layer_norm(torch.ones(2, 8, dtype=torch.int32), 8), TypeError, "input"),
        (lambda: kernels.layer_norm(torch.randn(2, 8), 8, weight=torch.ones(8, dtype=torch.int64)), TypeError, "weight"),
        (lambda: kernels.layer_norm(torch.randn(2, 8), 8, eps=0.0), ValueError, "eps"),
        (lambda: kernels.rms_norm(torch.randn(2, 8), 8, eps=-1.0), ValueError, "eps"),
        (lambda: kernels.layer_norm(torch.randn(2, 8), 8, weight=torch.randn(8, device="meta")), ValueError, "device"),
        (lambda: kernels.add_rms_norm(torch.randn(2, 8), torch.randn(2, 7), 8), ValueError, "residual"),
        (lambda: kernels.add_rms_norm(torch.randn(2, 8), torch.randn(2, 8).half(), 8), TypeError, "residual"),
        (lambda: kernels.layer_norm([1.0, 2.0], 2), TypeError, "input"),
        (lambda: kernels.layer_norm(torch.randn(2, 8), "8"), (TypeError, ValueError), "normalized_shape"),
    ],
)
def test_bad_input_is_a_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_reference_matches_torch():
    torch.manual_seed(4)
    x, w, b = torch.randn(3, 7, 33), torch.randn(7, 33), torch.randn(7, 33)
    ref = kernels.reference
    torch.testing.assert_close(ref.layer_norm(x, (7, 33), w, b, 1e-5), F.layer_norm(x, (7, 33), w, b, 1e-5))
    torch.testing.assert_close(ref.rms_norm(x, (7, 33), w, 1e-6), F.rms_norm(x, (7, 33), w, 1e-6))


# ------------------------------------------------------------------ GPU only: compiled kernels, real sizes


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [4096, 5120, 16384, 65536])
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_gpu_norm_matches_reference(kind, n, dtype):
    m = max(8, (1 << 24) // n)
    for fused in (False, True):
        _compare_on(kind, fused, (m, n), (n,), dtype, "cuda")


@pytest.mark.gpu
def test_gpu_tensor_past_2_31_elements():
    # int64 offsets: the last rows of a tensor of more than 2^31 elements are normalised correctly.
    n = 4096
    m = (1 << 31) // n + 64
    x = torch.empty(m, n, device="cuda", dtype=torch.bfloat16).normal_()
    w = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    y = kernels.rms_norm(x, (n,), w, 1e-6)
    tail = slice(m - 64, m)
    torch.testing.assert_close(y[tail].float(), F.rms_norm(x[tail].float(), (n,), w.float(), 1e-6), atol=2e-2, rtol=2e-2)
    del y
    x.requires_grad_()
    kernels.rms_norm(x, (n,), w, 1e-6).backward(torch.ones_like(x))
    xt = x[tail].detach().float().requires_grad_()
    F.rms_norm(xt, (n,), w.float(), 1e-6).backward(torch.ones_like(xt))
    torch.testing.assert_close(x.grad[tail].float(), xt.grad, atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------ double backward

_NORM_OPS = {
    "layer_norm": (lambda x, r, w, b: kernels.layer_norm(x, 8, w, b), lambda x, r, w, b: F.layer_norm(x, (8,), w, b)),
    "rms_norm": (lambda x, r, w, b: kernels.rms_norm(x, 8, w, 1e-6), lambda x, r, w, b: F.rms_norm(x, (8,), w, 1e-6)),
    "add_layer_norm": (lambda x, r, w, b: kernels.add_layer_norm(x, r, 8, w, b)[0],
                       lambda x, r, w, b: F.layer_norm(x + r, (8,), w, b)),
    "add_rms_norm": (lambda x, r, w, b: kernels.add_rms_norm(x, r, 8, w, 1e-6)[0],
                     lambda x, r, w, b: F.rms_norm(x + r, (8,), w, 1e-6)),
}


def _second_order(fn, x, r, w, b):
    """Gradient of a gradient penalty, ||d<y, g>/dx||^2, with respect to x and w."""
    g = torch.linspace(-1, 1, x.numel(), device=x.device).view_as(x)
    (gx,) = torch.autograd.grad((fn(x, r, w, b) * g).sum(), x, create_graph=True)
    return torch.autograd.grad(gx.square().sum(), (x, w))


@pytest.mark.parametrize("op", list(_NORM_OPS))
def test_double_backward_is_an_error_on_triton_and_exact_on_reference(op):
    ours, theirs = _NORM_OPS[op]
    torch.manual_seed(0)
    x, r, w, b = (t.to(DEVICE).requires_grad_() for t in (torch.randn(3, 8), torch.randn(3, 8), torch.randn(8), torch.randn(8)))
    with kernels.use_backend("triton"):
        with pytest.raises(RuntimeError, match=rf"kernels\.{op} \(Triton backend\) does not support double backward"):
            _second_order(ours, x, r, w, b)
    with kernels.use_backend("reference"):
        for got, want in zip(_second_order(ours, x, r, w, b), _second_order(theirs, x, r, w, b)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ rows whose values are all equal


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("n", [1, 7, 20000])  # 20000: the streaming kernels
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_layer_norm_of_constant_rows_is_exact(backend, n, dtype):
    # x - mean is exactly 0 on a row whose values are all equal (every row at hidden size 1):
    # y is exactly the bias, dW exactly 0 and, at hidden size 1, dX exactly 0, as in exact math
    # and in torch at fp64; one rounding in the mean would be magnified by rstd = 1/sqrt(eps).
    g = torch.Generator().manual_seed(0)
    m = 16
    rows = (torch.randn(m, 1, generator=g) * torch.logspace(-2, 3, m)[:, None]).to(dtype)
    rows[0] = 0.0
    x, r = (rows.expand(m, n) * 0.5).to(DEVICE), (rows.expand(m, n) * 0.5).to(DEVICE)  # x + r: exactly rows
    w, b = (torch.randn(n, generator=g).to(DEVICE, dtype) for _ in range(2))
    dy = torch.randn(m, n, generator=g).to(DEVICE, dtype)
    with kernels.use_backend(backend):
        for fused in (False, True):
            leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]
            xs = leaves[0] + leaves[1] if not fused else leaves[0]
            if fused:
                y, s = kernels.add_layer_norm(leaves[0], leaves[1], n, leaves[2], leaves[3])
            else:
                y = kernels.layer_norm(xs, n, leaves[2], leaves[3])
            dx, dw, db = torch.autograd.grad(y, (leaves[0], leaves[2], leaves[3]), dy)
            assert torch.equal(y, b.expand_as(y)), f"fused={fused}: y is not exactly the bias"
            assert torch.equal(dw, torch.zeros_like(dw)), f"fused={fused}: dW {dw.abs().max().item():g}"
            torch.testing.assert_close(db, dy.sum(0), rtol=1e-3, atol=1e-3)
            # The exact dX: rstd * (g - mean(g)) with g = dy * w and rstd = 1 / sqrt(eps).
            g64 = dy.double() * w.double()
            exact = (g64 - g64.mean(-1, keepdim=True)) / 1e-5**0.5
            if n == 1:
                assert torch.equal(dx, torch.zeros_like(dx)), f"fused={fused}: dX {dx.abs().max().item():g}"
            else:
                assert (dx.double() - exact).abs().max() <= 4 * torch.finfo(dtype).eps * exact.abs().max()


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_rms_norm_of_zero_rows_is_exact(backend):
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(3, 7, device=DEVICE, requires_grad=True)
    w = torch.randn(7, generator=g).to(DEVICE).requires_grad_()
    dy = torch.randn(3, 7, generator=g).to(DEVICE)
    with kernels.use_backend(backend):
        y = kernels.rms_norm(x, 7, w, 1e-6)
        dx, dw = torch.autograd.grad(y, (x, w), dy)
    assert torch.equal(y, torch.zeros_like(y)) and torch.equal(dw, torch.zeros_like(dw))
    torch.testing.assert_close(dx, dy * w / 1e-6**0.5, rtol=1e-6, atol=0)


# ------------------------------------------------------------------ RMSNorm offset (Gemma's 1 + w) and casting modes


def _hf_llama_rms_norm(x, w, eps):
    """transformers' LlamaRMSNorm.forward (Mistral and Qwen2 share it), verbatim."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(input_dtype)


def _hf_gemma_rms_norm(x, w, eps):
    """transformers' GemmaRMSNorm.forward (Gemma2 shares it), verbatim: the weight stored as w, scaled by 1 + w."""
    out = x.float()
    out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + eps)
    return (out * (1.0 + w.float())).type_as(x)


MODES = ["gemma", "llama", "none"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,ns", [((3, 123), (123,)), ((2, 20000), (20000,))], ids=str)
@pytest.mark.parametrize("casting_mode", MODES)
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "add"])
def test_rms_norm_offset_and_casting_mode_match_reference(fused, casting_mode, shape, ns, dtype):
    # Golden: the reference in fp32/fp64, where the three modes are one function; the same-dtype
    # reference rounds where the mode rounds. Gemma's offset 1 with weights near 0, as Gemma's are.
    torch.manual_seed(0)
    base, res, w = torch.randn(shape) + 0.5, torch.randn(shape), torch.randn(ns) * 0.1
    grads = [torch.randn(shape) for _ in range(2 if fused else 1)]
    options = dict(offset=1.0, casting_mode=casting_mode)

    def run(module, dt):
        x, r, wt = (_leaf(t.to(DEVICE), dt) for t in (base, res, w))
        outs = (module.add_rms_norm(x, r, ns, wt, 1e-6, **options) if fused
                else (module.rms_norm(x, ns, wt, 1e-6, **options),))
        torch.autograd.backward(outs, [g.to(DEVICE, dt) for g in grads])
        return list(outs) + [x.grad] + ([r.grad] if fused else []) + [wt.grad]

    out, ref32, ref_lp = run(kernels, dtype), run(kernels.reference, golden_dtype(dtype)), run(kernels.reference, dtype)
    names = (["y", "s", "dx", "dres"] if fused else ["y", "dx"]) + ["dw"]
    for o, r32, rlp, name in zip(out, ref32, ref_lp, names):
        assert o.dtype == rlp.dtype, f"{name}: dtype {o.dtype} != {rlp.dtype}"
        rule = factor("add_rms_norm" if fused else "rms_norm", gradient=name.startswith("d"))
        assert_close_to_ref(o, r32, rlp, factor=rule, name=f"{casting_mode} {name} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_reference_casting_modes_are_the_hf_modules(dtype):
    # The reference reproduces transformers' modules to the bit, so patched models compute what they did.
    torch.manual_seed(5)
    x, w = torch.randn(4, 3, 96).to(dtype), (torch.randn(96) * 0.3).to(dtype)
    ref = kernels.reference
    assert torch.equal(ref.rms_norm(x, 96, w, 1e-6, casting_mode="llama"), _hf_llama_rms_norm(x, w, 1e-6))
    assert torch.equal(ref.rms_norm(x, 96, w, 1e-6, offset=1.0, casting_mode="gemma"), _hf_gemma_rms_norm(x, w, 1e-6))
    # Llama's fp32 weight on a low-precision input: the product, and the result, are fp32.
    w32 = w.float() + 0.01
    y = ref.rms_norm(x, 96, w32, 1e-6, casting_mode="llama")
    assert y.dtype == torch.float32 and torch.equal(y, _hf_llama_rms_norm(x, w32, 1e-6))
    # The casts are where the modes differ: at this dtype they give different numbers.
    assert not torch.equal(ref.rms_norm(x, 96, w, 1e-6, casting_mode="llama"),
                           ref.rms_norm(x, 96, w, 1e-6, casting_mode="gemma"))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_llama_mode_promotes_to_the_weight_dtype(backend):
    torch.manual_seed(6)
    x = torch.randn(5, 64, device=DEVICE).bfloat16().requires_grad_()
    w = torch.randn(64, device=DEVICE, requires_grad=True)
    with kernels.use_backend(backend):
        y = kernels.rms_norm(x, 64, w, 1e-6, casting_mode="llama")
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, _hf_llama_rms_norm(x, w, 1e-6), rtol=1e-5, atol=2e-5)
        dx, dw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
    assert dx.dtype == torch.bfloat16 and dw.dtype == torch.float32


def test_rms_norm_module_with_offset_starts_at_scale_one_and_round_trips():
    torch.manual_seed(7)
    gemma = kernels.nn.RMSNorm(32, eps=1e-6, offset=1.0, casting_mode="gemma")
    assert torch.equal(gemma.weight, torch.zeros(32))  # Gemma's initialisation: 1 + 0
    x = torch.randn(3, 32)
    torch.testing.assert_close(gemma(x), F.rms_norm(x, (32,), eps=1e-6))
    with torch.no_grad():
        gemma.weight.normal_()
    plain = kernels.nn.RMSNorm(32, eps=1e-6)
    plain.load_state_dict(gemma.state_dict())  # same keys; the offset is the module's, not the checkpoint's
    torch.testing.assert_close(gemma(x), _hf_gemma_rms_norm(x, gemma.weight, 1e-6))
    torch.testing.assert_close(gemma(x), plain(x) + F.rms_norm(x, (32,), eps=1e-6), rtol=1e-5, atol=1e-5)
    assert "offset=1.0, casting_mode='gemma'" in repr(gemma) and "offset" not in repr(plain)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: kernels.rms_norm(torch.randn(2, 8), 8, casting_mode="llama3"), ValueError, "casting_mode"),
        (lambda: kernels.add_rms_norm(torch.randn(2, 8), torch.randn(2, 8), 8, casting_mode=1), ValueError,
         "casting_mode"),
        (lambda: kernels.rms_norm(torch.randn(2, 8), 8, offset="1"), TypeError, "offset"),
        (lambda: kernels.rms_norm(torch.randn(2, 8), 8, offset=float("nan")), TypeError, "offset"),
    ],
)
def test_bad_rms_options_are_a_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
