"""SwiGLU / GeGLU (kernels.swiglu, geglu and their packed forms): the Triton kernels against the reference.

On a GPU these run the compiled kernels; without one, the same kernels through
the interpreter on CPU (see conftest.py). The output and both gradients must meet
the rule of kernels/numerics.py against torch's ``F.silu(gate) * up`` (or
``F.gelu``) in the same dtype.
"""

import pytest
import torch
import torch.nn.functional as F

import kernels
from helpers import DEVICE
from kernels.numerics import assert_close_to_ref, factor, golden_dtype

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (op, approximate): SwiGLU, GeGLU with GELU's tanh approximation and the exact (erf) one.
ACTIVATIONS = [("swiglu", None), ("geglu", "tanh"), ("geglu", "none")]
# Ragged, tiny, and wider than one column block (1024).
SHAPES = [(1, 1), (3, 123), (2, 5, 96), (3, 1500)]


def _torch(op, approximate):
    if op == "swiglu":
        return lambda gate, up: F.silu(gate) * up
    return lambda gate, up: F.gelu(gate, approximate=approximate) * up


def _golden(op, approximate):
    if op == "swiglu":
        return kernels.reference.swiglu
    return lambda gate, up: kernels.reference.geglu(gate, up, approximate)


def _compare(op, approximate, shape, dtype, *, packed=False, noncontig=False, scale=0.5):
    """Each function gets (gate, up) leaves; packed: one (..., 2n) leaf whose halves are gate and up.

    Inputs and upstream gradient of scale 0.5 keep the products act(gate) * up and dy * act(gate)
    O(1), the magnitude the rule's slack is one ulp of (the interpreter's fp32 -> bf16 cast
    truncates: a full ulp, which at |x| ~ 10 is 4x that slack)."""
    torch.manual_seed(0)
    n = shape[-1]
    base = torch.randn(*shape[:-1], 2 * n) * scale
    grad = torch.randn(shape) * 0.5
    if noncontig:  # same values, transposed memory for the inputs and the upstream gradient
        base = base.transpose(0, -1).contiguous().transpose(0, -1)
        grad = grad.transpose(0, -1).contiguous().transpose(0, -1)

    def run(fn, dt, fused):
        x = base.to(DEVICE, dt, copy=True)
        if noncontig:
            x = x.transpose(0, -1).contiguous().transpose(0, -1)
        before = x.clone()
        if packed:
            x.requires_grad_()
            out = fn(x) if fused else fn(*x.chunk(2, dim=-1))
            leaves = [x]
        else:
            gate, up = (t.detach().clone().requires_grad_() for t in x.chunk(2, dim=-1))
            if noncontig:
                gate, up = x[..., :n].detach().requires_grad_(), x[..., n:].detach().requires_grad_()
            before = (gate.detach().clone(), up.detach().clone())
            out = fn(gate, up)
            leaves = [gate, up]
        out.backward(grad.to(DEVICE, dt))
        if packed:
            assert torch.equal(x.detach(), before)
        else:
            assert torch.equal(leaves[0].detach(), before[0]) and torch.equal(leaves[1].detach(), before[1])
        return [out] + [t.grad for t in leaves]

    kw = {} if approximate is None else {"approximate": approximate}
    if packed:
        fused = lambda gate_up: getattr(kernels, f"{op}_packed")(gate_up, **kw)  # noqa: E731
    else:
        fused = lambda gate, up: getattr(kernels, op)(gate, up, **kw)  # noqa: E731
    out = run(fused, dtype, True)
    ref32 = run(_golden(op, approximate), golden_dtype(dtype), False)
    ref_lp = run(_torch(op, approximate), dtype, False)
    names = ["y", "dgate_up"] if packed else ["y", "dgate", "dup"]
    for o, r32, rlp, name in zip(out, ref32, ref_lp, names):
        assert o.dtype == dtype and o.shape == rlp.shape, name
        assert_close_to_ref(o, r32, rlp, factor=factor(op, gradient=name != "y"), name=f"{op} {approximate} {name} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("op,approximate", ACTIVATIONS)
def test_glu_matches_reference(op, approximate, shape, dtype):
    _compare(op, approximate, shape, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 123), (2, 5, 1100)], ids=str)
@pytest.mark.parametrize("op,approximate", ACTIVATIONS)
def test_packed_matches_reference(op, approximate, shape, dtype):
    _compare(op, approximate, shape, dtype, packed=True)


@pytest.mark.parametrize("op,approximate", ACTIVATIONS)
def test_non_contiguous_inputs_and_grad(op, approximate):
    _compare(op, approximate, (37, 4, 24), torch.float16, noncontig=True)
    _compare(op, approximate, (37, 4, 24), torch.float32, noncontig=True, packed=True)


@pytest.mark.parametrize("op,approximate", ACTIVATIONS)
def test_large_inputs(op, approximate):
    # Saturated activations (sigmoid/erf at 0 or 1) keep finite values and gradients.
    _compare(op, approximate, (4, 200), torch.float32, scale=20.0)


@pytest.mark.parametrize("op,approximate", ACTIVATIONS)
def test_zero_dim_inputs(op, approximate):
    # torch's F.silu(gate) * up takes 0-d tensors; so does the kernel (as one row of one feature).
    gate = torch.tensor(0.7, device=DEVICE, requires_grad=True)
    up = torch.tensor(-1.3, device=DEVICE, requires_grad=True)
    kw = {} if approximate is None else {"approximate": approximate}
    out = getattr(kernels, op)(gate, up, **kw)
    out.backward()
    g2, u2 = (t.detach().clone().requires_grad_() for t in (gate, up))
    expected = _torch(op, approximate)(g2, u2)
    expected.backward()
    assert out.shape == ()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close((gate.grad, up.grad), (g2.grad, u2.grad))


@pytest.mark.parametrize("shape", [(3, 0), (0,)], ids=str)
def test_zero_width_inputs(shape):
    # Rows of no features (torch's elementwise ops take them): empty outputs and gradients, no error.
    gate, up = (torch.randn(shape, device=DEVICE, requires_grad=True) for _ in range(2))
    out = kernels.swiglu(gate, up)
    out.sum().backward()
    assert out.shape == shape and gate.grad.shape == shape and up.grad.shape == shape
    packed = torch.randn(shape, device=DEVICE, requires_grad=True)
    out = kernels.geglu_packed(packed)
    out.sum().backward()
    assert out.shape == shape and packed.grad.shape == shape


def test_packed_backward_writes_one_gradient_without_a_copy_of_the_input():
    gate_up = torch.randn(6, 40, device=DEVICE, requires_grad=True)
    kernels.swiglu_packed(gate_up).sum().backward()
    assert gate_up.grad.shape == (6, 40)
    gate, up = gate_up.detach().chunk(2, dim=-1)
    torch.testing.assert_close(gate_up.grad[:, 20:], F.silu(gate), rtol=1e-5, atol=1e-6)


def test_double_backward_is_an_error_on_triton_and_exact_on_reference():
    torch.manual_seed(0)
    gate = torch.randn(3, 8, device=DEVICE, requires_grad=True)
    up = torch.randn_like(gate, requires_grad=True)
    with kernels.use_backend("triton"):
        with pytest.raises(RuntimeError, match=r"kernels.swiglu .*double backward"):
            torch.autograd.grad(kernels.swiglu(gate, up).sum(), gate, create_graph=True)
        with pytest.raises(RuntimeError, match=r"kernels.geglu .*double backward"):
            torch.autograd.grad(kernels.geglu_packed(torch.cat([gate, up], -1)).sum(), gate, create_graph=True)
    second = []
    for fn in (lambda g, u: kernels.geglu(g, u, "none"), lambda g, u: F.gelu(g) * u):
        with kernels.use_backend("reference"):
            (dg,) = torch.autograd.grad(fn(gate, up).sum(), gate, create_graph=True)
            second.append(torch.autograd.grad(dg.sum(), (gate, up)))
    for a, b in zip(*second):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_modules():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama import modeling_llama

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=88, hidden_act="silu")
    hf = modeling_llama.LlamaMLP(config).to(DEVICE)
    ours = kernels.nn.GatedMLP(32, 88).to(DEVICE)
    ours.load_state_dict(hf.state_dict())  # HF's parameter names
    x = torch.randn(2, 5, 32, device=DEVICE)
    torch.testing.assert_close(ours(x), hf(x), rtol=1e-5, atol=1e-6)
    gate, up = torch.randn(2, 7, device=DEVICE), torch.randn(2, 7, device=DEVICE)
    torch.testing.assert_close(kernels.nn.SwiGLU()(gate, up), F.silu(gate) * up, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kernels.nn.GeGLU("none")(gate, up), F.gelu(gate) * up, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="approximate must be 'tanh' or 'none'"):
        kernels.nn.GeGLU("erf")
    with pytest.raises(ValueError, match="activation must be"):
        kernels.nn.GatedMLP(4, 8, activation="relu")


def _bad_calls():
    g, u = torch.randn(3, 8), torch.randn(3, 8)
    yield lambda: kernels.swiglu(g, u[:, :4]), ValueError, r"up must have the shape of gate \(3, 8\)"
    yield lambda: kernels.geglu(g, u.half()), TypeError, "up has dtype torch.float16"
    yield lambda: kernels.geglu(g, u, approximate="erf"), ValueError, "approximate must be 'tanh' or 'none'"
    yield lambda: kernels.geglu_packed(g, approximate=None), ValueError, "approximate must be"
    yield lambda: kernels.swiglu_packed(torch.randn(3, 7)), ValueError, "gate_up must have an even last dimension"
    yield lambda: kernels.swiglu_packed(torch.tensor(1.0)), ValueError, "gate_up must have an even last dimension"
    yield lambda: kernels.swiglu(g.long(), u), TypeError, "gate must be float32, float16 or bfloat16"
    yield lambda: kernels.swiglu_packed([1.0, 2.0]), TypeError, "gate_up must be a torch.Tensor"


@pytest.mark.parametrize("case", range(len(list(_bad_calls()))))
def test_bad_input_is_a_clear_error(case):
    call, exc, match = list(_bad_calls())[case]
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("op,approximate", ACTIVATIONS)
def test_gpu_glu_at_model_sizes(op, approximate, dtype):
    _compare(op, approximate, (4096, 11008), dtype)
    _compare(op, approximate, (2, 1024, 8192), dtype, packed=True)
