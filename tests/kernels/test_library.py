"""The kernels as torch.library ops: opcheck, fullgraph torch.compile, host syncs, autocast, the name clash.

Small shapes throughout: the Triton backend runs through the interpreter here.
"""

from __future__ import annotations

import importlib
import re
import tomllib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
from helpers import DEVICE, ROOT

library = importlib.import_module("kernels._library")

IGNORE = -100


def _norm_inputs():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 40, device=DEVICE, requires_grad=True)
    r = torch.randn(2, 3, 40, device=DEVICE, requires_grad=True)
    w = torch.randn(40, device=DEVICE, requires_grad=True)
    b = torch.randn(40, device=DEVICE, requires_grad=True)
    return x, r, w, b


def _attention_inputs():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 9, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 2, 11, 16, device=DEVICE, requires_grad=True)
    v = torch.randn(2, 2, 11, 16, device=DEVICE, requires_grad=True)
    return q, k, v, torch.tensor([11, 5], dtype=torch.int32, device=DEVICE)


def _varlen_inputs():
    torch.manual_seed(0)
    q = torch.randn(10, 4, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(12, 2, 16, device=DEVICE, requires_grad=True)
    v = torch.randn(12, 2, 16, device=DEVICE, requires_grad=True)
    cu_q = torch.tensor([0, 4, 4, 10], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 5, 5, 12], dtype=torch.int32, device=DEVICE)
    return q, k, v, cu_q, cu_k


def _banded_inputs():
    """One packing for q and k with max_seqlen 3 < total / 3: the reference backend's banded twin."""
    torch.manual_seed(0)
    q = torch.randn(11, 4, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(11, 2, 16, device=DEVICE, requires_grad=True)
    v = torch.randn(11, 2, 16, device=DEVICE, requires_grad=True)
    return q, k, v, torch.tensor([0, 3, 3, 4, 7, 9, 11], dtype=torch.int32, device=DEVICE)


def _ce_inputs():
    torch.manual_seed(0)
    x = torch.randn(6, 50, device=DEVICE, requires_grad=True)
    t = torch.tensor([1, 2, IGNORE, 4, 49, 0], device=DEVICE)
    h = torch.randn(6, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(50, 8, device=DEVICE, requires_grad=True)
    b = torch.randn(50, device=DEVICE, requires_grad=True)
    return x, t, h, w, b


def _rope_inputs():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 5, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 2, 5, 16, device=DEVICE, requires_grad=True)
    cos, sin = kernels.rope_tables(9, 12, device=DEVICE)
    return q, k, cos, sin, torch.tensor([[0, 1, 2, 0, 1], [4, 5, 6, 7, 8]], device=DEVICE)


def _glu_inputs():
    torch.manual_seed(0)
    gate_up = torch.randn(2, 3, 24, device=DEVICE, requires_grad=True)
    gate = torch.randn(2, 3, 12, device=DEVICE, requires_grad=True)
    up = torch.randn(2, 3, 12, device=DEVICE, requires_grad=True)
    return gate_up, gate, up


def _op_cases():
    x, r, w, b = _norm_inputs()
    q, k, v, kv_lens = _attention_inputs()
    logits, t, h, hw, hb = _ce_inputs()
    ops = torch.ops.fastlm
    yield "norm", ops.norm.default, (x, w, b, [40], 1e-5, False)
    yield "rms_norm", ops.norm.default, (x, w, None, [40], 1e-6, True)
    yield "add_norm", ops.add_norm.default, (x, r, w, b, [40], 1e-5, False)
    yield "add_rms_norm", ops.add_norm.default, (x, r, w, None, [40], 1e-6, True)
    yield "norm_backward", ops.norm_backward.default, (
        torch.randn_like(x), None, x.detach(), w.detach(), True, torch.zeros(6), torch.ones(6), [40], False)
    # RMSNorm's offset (Gemma's 1 + w) and casting modes; Llama's promotes a bf16 input to the fp32 weight's dtype.
    yield "rms_norm_gemma", ops.norm.default, (x, w, None, [40], 1e-6, True, 1.0, "gemma")
    yield "rms_norm_llama", ops.norm.default, (x.detach().bfloat16().requires_grad_(), w, None, [40], 1e-6, True,
                                               0.0, "llama")
    yield "add_rms_norm_none", ops.add_norm.default, (x, r, w, None, [40], 1e-6, True, 1.0, "none")
    yield "rms_norm_backward_llama", ops.norm_backward.default, (
        torch.randn_like(x), None, x.detach(), w.detach(), False, torch.zeros(6), torch.ones(6), [40], True,
        1.0, "llama")
    yield "attention", ops.attention.default, (q, k, v, kv_lens, 0.25, 2)
    yield "attention_plain", ops.attention.default, (q, k, v, None, 0.25, None)
    sinks = torch.randn(4, device=DEVICE, requires_grad=True)
    yield "attention_features", ops.attention.default, (q, k, v, kv_lens, 0.25, None, 3, 2, 4.0, sinks)
    qp, kp, vp, cu_q, cu_k = _varlen_inputs()
    yield "varlen_attention", ops.varlen_attention.default, (qp, kp, vp, cu_q, cu_k, 6, 7, 0.25, -1, 0, 0.0, None)
    yield "varlen_attention_features", ops.varlen_attention.default, (
        qp, kp, vp, cu_q, cu_k, 6, 7, 0.25, 2, 0, 3.0, sinks)
    yield "cross_entropy", ops.cross_entropy.default, (
        logits, t, torch.rand(50, device=DEVICE), IGNORE, "mean", 0.1, 1e-3, 3.0, True, True)
    yield "cross_entropy_none", ops.cross_entropy.default, (
        logits, t, None, IGNORE, "none", 0.0, 0.0, 0.0, True, False)
    yield "linear_cross_entropy", ops.linear_cross_entropy.default, (
        h, hw, hb, t, torch.rand(50, device=DEVICE), True, True, True, 4, IGNORE, "mean", 0.1, 1e-3, 3.0, True)
    yield "linear_cross_entropy_none", ops.linear_cross_entropy.default, (
        h, hw, None, t, None, True, True, False, 4, IGNORE, "none", 0.0, 0.0, 0.0, False)
    q, k, cos, sin, pos = _rope_inputs()
    yield "rope", ops.rope.default, (q, k, cos[:5], sin[:5], None, False)
    yield "rope_positions_transposed", ops.rope.default, (q, k, cos, sin, pos, True)
    gate_up, gate, up = _glu_inputs()
    yield "glu_silu", ops.glu.default, (gate, up, "silu")
    yield "glu_packed_gelu", ops.glu.default, (gate_up, None, "gelu")
    yield "glu_backward", ops.glu_backward.default, (torch.randn_like(gate), gate.detach(), up.detach(), "gelu_tanh")
    yield "glu_backward_packed", ops.glu_backward.default, (torch.randn_like(gate), gate_up.detach(), None, "silu")


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("case", [name for name, _, _ in _op_cases()])
def test_opcheck(case, backend):
    # The Triton backend on CPU is the interpreter; on a GPU the compiled kernels.
    op, args = next((op, args) for name, op, args in _op_cases() if name == case)
    with kernels.use_backend(backend):
        torch.library.opcheck(op, args)


def test_every_op_lives_in_one_namespace():
    names = {name for name in dir(torch.ops.fastlm) if not name.startswith("_")}
    assert {"norm", "add_norm", "norm_backward", "attention", "attention_backward", "varlen_attention",
            "varlen_attention_backward", "cross_entropy",
            "linear_cross_entropy", "linear_cross_entropy_backward", "rope", "glu", "glu_backward"} <= names



def test_ops_register_where_triton_op_ignores_the_schema(monkeypatch):
    # torch before 2.14 takes triton_op(schema=...) but infers the schema from the implementation's type
    # annotations, which ours do not have: `import kernels` without the interpreter raised ValueError there
    # (torch 2.13; likely the GPU machine's 2.11 too). Such a torch registers the opaque custom ops instead.
    library = importlib.import_module("kernels._library")

    def triton_op_before_2_14(name, fn, *, mutates_args, schema=None):
        schema = torch.library.infer_schema(fn, mutates_args=mutates_args)
        return torch.library.custom_op(name, fn, mutates_args=mutates_args, schema=schema)

    def double(x):
        return x * 2

    monkeypatch.setattr(torch.library, "triton_op", triton_op_before_2_14)
    monkeypatch.setattr(library, "USE_TRITON_OP", True)
    monkeypatch.setattr(library, "NAMESPACE", "fastlm_schema_test")
    op = library.define_op("double", double, "(Tensor x) -> Tensor")
    assert torch.equal(op(torch.ones(3)), torch.full((3,), 2.0))
    assert not library.USE_TRITON_OP and isinstance(library.launch(object()), library._SkipWhenFake)


@pytest.mark.skipif(DEVICE != "cpu", reason="Triton's interpreter")
def test_an_interpreter_that_cannot_read_loop_bounds_is_a_clear_error(monkeypatch):
    # Triton 3.6's interpreter read a scalar (a loop bound) as int() of its 1-element array, which NumPy 2.4
    # refuses: every kernel with a runtime bound failed with "only 0-dimensional arrays can be converted".
    # Here 3.8's interpreter is given 3.6's conversion.
    import numpy
    from triton.runtime import interpreter

    library = importlib.import_module("kernels._library")
    patch_tensor = interpreter._patch_lang_tensor

    def patch_tensor_as_in_3_6(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patch_tensor_as_in_3_6)
    library.check_interpreter.cache_clear()
    try:
        q = torch.randn(1, 1, 5, 16)
        with kernels.use_backend("triton"):
            if tuple(int(p) for p in numpy.__version__.split(".")[:2]) < (2, 4):
                kernels.attention(q, q, q)  # a deprecation warning only
            else:
                with pytest.raises(RuntimeError, match=r"interpreter cannot run .* NumPy .*numpy<2\.4"):
                    kernels.attention(q, q, q)
    finally:
        library.check_interpreter.cache_clear()

# ----------------------------------------------------------------------------- torch.compile


def _compile_cases():
    x, r, w, b = _norm_inputs()
    q, k, v, kv_lens = _attention_inputs()
    logits, t, h, hw, hb = _ce_inputs()
    ln = kernels.nn.LayerNorm(40).to(DEVICE)
    rms = kernels.nn.RMSNorm(40).to(DEVICE)
    yield "layer_norm", lambda: kernels.layer_norm(x, 40, w, b), (x, w, b)
    yield "rms_norm", lambda: kernels.rms_norm(x, 40, w), (x, w)
    yield "add_layer_norm", lambda: sum(kernels.add_layer_norm(x, r, 40, w, b)), (x, r, w, b)
    yield "add_rms_norm", lambda: sum(kernels.add_rms_norm(x, r, 40, w)), (x, r, w)
    yield "attention", lambda: kernels.attention(q, k, v, causal=True, kv_lens=kv_lens), (q, k, v)
    yield "sdpa", lambda: kernels.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), (q, k, v)
    qp, kp, vp, cu_q, cu_k = _varlen_inputs()
    sinks = torch.randn(4, device=DEVICE, requires_grad=True)
    yield "varlen_attention", lambda: kernels.varlen_attention(
        qp, kp, vp, cu_q, cu_k, 6, 7, causal=True, window_size=(2, 0), softcap=3.0, sinks=sinks), (qp, kp, vp, sinks)
    qb, kb, vb, cu = _banded_inputs()
    yield "varlen_attention_banded", lambda: kernels.varlen_attention(
        qb, kb, vb, cu, cu, 3, 3, causal=True, window_size=(2, 0), softcap=3.0, sinks=sinks), (qb, kb, vb, sinks)
    yield "cross_entropy", lambda: kernels.cross_entropy(logits, t, label_smoothing=0.1), (logits,)
    yield "linear_cross_entropy", lambda: kernels.linear_cross_entropy(h, hw, t, hb, chunk_size=4), (h, hw, hb)
    cw = torch.rand(50, device=DEVICE) + 0.5
    yield "cross_entropy_softcap_z", lambda: sum(kernels.cross_entropy(
        logits, t, cw, z_loss=1e-3, softcap=3.0, return_z_loss=True)), (logits,)
    yield "linear_cross_entropy_softcap_z", lambda: sum(kernels.linear_cross_entropy(
        h, hw, t, hb, class_weight=cw, z_loss=1e-3, softcap=3.0, return_z_loss=True, chunk_size=4)), (h, hw, hb)
    yield "nn.LayerNorm", lambda: ln(x), (x, ln.weight, ln.bias)
    yield "nn.RMSNorm", lambda: rms(x), (x, rms.weight)
    yield "nn.CrossEntropyLoss", lambda: kernels.nn.CrossEntropyLoss()(logits, t), (logits,)
    yield "nn.LinearCrossEntropyLoss", lambda: kernels.nn.LinearCrossEntropyLoss(chunk_size=4)(h, hw, t), (h, hw)
    yield "nn.Attention", lambda: kernels.nn.Attention()(q, k, v, kv_lens), (q, k, v)
    rq, rk, cos, sin, pos = _rope_inputs()
    yield "rope", lambda: sum(t.sum() for t in kernels.rope(rq, rk, cos, sin, position_ids=pos)), (rq, rk)
    gate_up, gate, up = _glu_inputs()
    yield "swiglu_packed", lambda: kernels.swiglu_packed(gate_up), (gate_up,)
    yield "geglu", lambda: kernels.geglu(gate, up), (gate, up)


@pytest.mark.parametrize("case", [name for name, _, _ in _compile_cases()])
def test_fullgraph_compile_matches_eager_on_the_reference_backend(case):
    fn, params = next((fn, params) for name, fn, params in _compile_cases() if name == case)
    torch._dynamo.reset()
    with kernels.use_backend("reference"):
        explained = torch._dynamo.explain(fn)()
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1
        torch._dynamo.reset()
        outs = []
        for run in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
            out = run()
            grads = torch.autograd.grad(out.float().sum(), params)
            outs.append((out, *grads))
    for eager, compiled in zip(*outs):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_fullgraph_compile_runs_the_triton_ops():
    # On CPU the interpreter's ops are opaque to the compiler, but still one graph, no break.
    x, _, w, b = _norm_inputs()
    logits, t, h, hw, hb = _ce_inputs()

    qp, kp, vp, cu_q, cu_k = _varlen_inputs()

    def step():
        packed = kernels.varlen_attention(qp, kp, vp, cu_q, cu_k, 6, 7, causal=True, window_size=(2, 0)).sum()
        return (kernels.layer_norm(x, 40, w, b).sum() + kernels.linear_cross_entropy(h, hw, t, hb, chunk_size=4)
                + packed)

    torch._dynamo.reset()
    with kernels.use_backend("triton"):
        explained = torch._dynamo.explain(step)()
        assert explained.graph_break_count == 0, explained.break_reasons
        torch._dynamo.reset()
        eager = step()
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- host syncs


class CountSyncs(TorchDispatchMode):
    """Counts the aten calls that make the host wait for a tensor's value."""

    SYNCS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "tolist"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.SYNCS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _sync_cases():
    x, r, w, b = _norm_inputs()
    q, k, v, kv_lens = _attention_inputs()
    logits, t, h, hw, hb = _ce_inputs()
    # (name, call, syncs with the value checks on): as documented on each function.
    yield "layer_norm", lambda: kernels.layer_norm(x, 40, w, b), 0
    yield "add_rms_norm", lambda: kernels.add_rms_norm(x, r, 40, w)[0], 0
    yield "attention", lambda: kernels.attention(q, k, v, causal=True), 0
    yield "attention_kv_lens", lambda: kernels.attention(q, k, v, kv_lens=kv_lens), 1
    sinks = torch.randn(4, device=DEVICE, requires_grad=True)
    yield "attention_features", lambda: kernels.attention(q, k, v, causal=True, window_size=(3, 0), softcap=5.0,
                                                          sinks=sinks), 0
    yield "cross_entropy", lambda: kernels.cross_entropy(logits, t), 1
    yield "linear_cross_entropy", lambda: kernels.linear_cross_entropy(h, hw, t, hb, chunk_size=4), 1
    # Class weights (the 'mean' denominator decided on device), softcap, the returned z-loss, and
    # bf16 inputs (fp32 chunk logits) add none.
    cw = torch.rand(50, device=DEVICE) - 0.2
    yield "cross_entropy_options", lambda: sum(kernels.cross_entropy(
        logits, t, cw, z_loss=1e-3, softcap=3.0, return_z_loss=True)), 1
    yield "linear_cross_entropy_options", lambda: sum(kernels.linear_cross_entropy(
        h.bfloat16(), hw.bfloat16(), t, hb.bfloat16(), class_weight=cw, z_loss=1e-3, softcap=3.0, return_z_loss=True,
        chunk_size=4)), 1
    rq, rk, cos, sin, pos = _rope_inputs()
    yield "rope", lambda: kernels.rope(rq, rk, cos[:5], sin[:5])[0], 0
    yield "rope_position_ids", lambda: kernels.rope(rq, rk, cos, sin, position_ids=pos)[0], 1
    gate_up, _, _ = _glu_inputs()
    yield "swiglu_packed", lambda: kernels.swiglu_packed(gate_up), 0


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("case", [name for name, _, _ in _sync_cases()])
def test_host_syncs_per_call(case, backend):
    fn, checked = next((fn, n) for name, fn, n in _sync_cases() if name == case)
    with kernels.use_backend(backend):
        with CountSyncs() as counter:
            fn().float().sum().backward()
        assert counter.count == checked
        with kernels.unchecked(), CountSyncs() as counter:
            fn().float().sum().backward()
        assert counter.count == 0


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_varlen_host_syncs(monkeypatch, backend):
    # varlen_attention's value checks read cu_seqlens with one tolist() (one device-to-host copy),
    # which no aten call shows: count it directly, with the aten syncs.
    qp, kp, vp, cu_q, cu_k = _varlen_inputs()
    copies = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: copies.append(t) or tolist(t))

    def run():
        copies.clear()
        with CountSyncs() as counter:
            kernels.varlen_attention(qp, kp, vp, cu_q, cu_k, causal=True, window_size=(2, 0)).sum().backward()
        return counter.count + len(copies)

    with kernels.use_backend(backend):
        assert run() == 1 if backend == "triton" else run() >= 1  # the reference loops over cu_seqlens on the host
        with kernels.unchecked():
            assert run() == 0


def test_unchecked_skips_only_value_checks():
    logits, _, h, hw, _ = _ce_inputs()
    bad = torch.tensor([1, 2, 3, 4, 5, 50])
    with pytest.raises(ValueError, match="outside"):
        kernels.linear_cross_entropy(h, hw, bad)
    with kernels.unchecked():
        kernels.linear_cross_entropy(h, hw, bad)  # clamped in the kernel: no out-of-bounds read
        with pytest.raises(ValueError, match="target must have the shape"):
            kernels.cross_entropy(logits, bad[:3])
    with pytest.raises(ValueError, match="outside"):  # restored on exit
        kernels.cross_entropy(logits, bad)
    assert kernels.linear_cross_entropy(h, hw, bad, check_targets=False).isfinite()


def test_checks_enabled_says_whether_value_checks_run():
    # Public, for code that validates its own values alongside the kernels' (fastlm's model does).
    assert "checks_enabled" in kernels.__all__ and kernels.checks_enabled()
    with kernels.unchecked():
        assert not kernels.checks_enabled()
        with kernels.unchecked():
            pass
        assert not kernels.checks_enabled()  # nested blocks restore what was there
    assert kernels.checks_enabled()
    compiled = torch.compile(lambda x: x + (1 if kernels.checks_enabled() else 2), backend="eager", fullgraph=True)
    assert compiled(torch.zeros(())) == 2  # skipped while compiling


# ----------------------------------------------------------------------------- autocast


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_autocast_matches_the_torch_ops_dtypes(backend):
    x, r, w, b = _norm_inputs()
    q, k, v, _ = _attention_inputs()
    logits, t, h, hw, hb = _ce_inputs()
    with kernels.use_backend(backend), torch.autocast(DEVICE, dtype=torch.bfloat16):
        xb = x.bfloat16()
        assert kernels.layer_norm(xb, 40, w, b).dtype == F.layer_norm(xb, (40,), w, b).dtype
        assert kernels.rms_norm(xb, 40, w).dtype == F.rms_norm(xb, (40,), w).dtype
        out = kernels.attention(q, k, v.bfloat16(), causal=True)  # mixed dtypes, as autocast allows
        assert out.dtype == F.scaled_dot_product_attention(q, q, q).dtype == torch.bfloat16
        assert kernels.cross_entropy(logits.bfloat16(), t).dtype == F.cross_entropy(logits.bfloat16(), t).dtype
        # bf16 activations with an fp32 head, as in a model under autocast: the GEMM runs in bf16.
        loss = kernels.linear_cross_entropy(h.bfloat16(), hw, t, hb)
        want = F.cross_entropy(F.linear(h.bfloat16(), hw, hb), t)
    assert loss.dtype == want.dtype == torch.float32
    torch.testing.assert_close(loss, want, rtol=2e-2, atol=2e-2)
    loss.backward()
    assert hw.grad.dtype == torch.float32 and h.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_the_norm_op_under_autocast_gives_torchs_dtypes(dtype):
    # Direct callers of the op: is_rms follows torch's rms_norm, otherwise layer_norm (CPU autocast: neither casts).
    x, _, w, b = _norm_inputs()
    x = x.detach().to(dtype)
    with kernels.use_backend("triton"), torch.autocast(DEVICE, dtype=torch.bfloat16):
        assert torch.ops.fastlm.norm(x, w, None, [40], 1e-6, True)[0].dtype == F.rms_norm(x, (40,), w, 1e-6).dtype
        assert torch.ops.fastlm.norm(x, w, b, [40], 1e-5, False)[0].dtype == F.layer_norm(x, (40,), w, b).dtype


@pytest.mark.parametrize("is_rms", [True, False], ids=["rms", "layer"])
def test_the_norm_ops_autocast_rule_is_the_one_of_the_torch_op_they_replace(monkeypatch, is_rms):
    # torch 2.14 gives layer_norm and rms_norm the same rule on each device; pretend they differ on this one,
    # as on torch versions where rms_norm had no autocast rule.
    monkeypatch.setitem(library.NORM_RUNS_IN_FP32, ("rms_norm", DEVICE), is_rms)
    monkeypatch.setitem(library.NORM_RUNS_IN_FP32, ("layer_norm", DEVICE), not is_rms)
    x, r, w, _ = _norm_inputs()
    xb, rb, wb = (t.detach().bfloat16() for t in (x, r, w))
    ops = torch.ops.fastlm
    with kernels.use_backend("triton"), torch.autocast(DEVICE, dtype=torch.bfloat16):
        # Only the op standing for the function with the fp32 rule casts (the rule is the only thing flipped).
        assert ops.norm(xb, wb, None, [40], 1e-6, is_rms)[0].dtype == torch.float32
        assert ops.norm(xb, wb, None, [40], 1e-6, not is_rms)[0].dtype == torch.bfloat16
        assert ops.add_norm(xb, rb, wb, None, [40], 1e-6, is_rms)[0].dtype == torch.float32
        assert ops.add_norm(xb, rb, wb, None, [40], 1e-6, not is_rms)[0].dtype == torch.bfloat16
        # The public functions cast as torch's function would, and not at all for a model's casting mode.
        if is_rms:
            assert kernels.rms_norm(xb, 40, wb).dtype == torch.float32
            for mode in ("llama", "gemma", "none"):
                with torch.autocast(DEVICE, enabled=False):
                    expected = kernels.rms_norm(xb, 40, wb, casting_mode=mode)
                assert torch.equal(kernels.rms_norm(xb, 40, wb, casting_mode=mode), expected)
        else:
            assert kernels.layer_norm(xb, 40, wb).dtype == torch.float32
            assert kernels.rms_norm(xb, 40, wb).dtype == torch.bfloat16


# ----------------------------------------------------------------------------- the name `kernels`


def test_transformers_does_not_take_our_kernels_for_the_kernel_hub():
    transformers = pytest.importorskip("transformers")
    import_utils = importlib.import_module("transformers.utils.import_utils")
    import_utils.is_kernels_available.cache_clear()
    try:
        assert importlib.util.find_spec("kernels").origin.startswith(str(ROOT))  # ours is the one importable
        assert not transformers.utils.is_kernels_available()
        # Were fastlm installed, transformers would read the version of the distribution that
        # provides `kernels` (fastlm's): it must stay outside the hub's accepted range.
        version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
        low, high = (import_utils.version.parse(v) for v in (import_utils.KERNELS_MIN_VERSION,
                                                             import_utils.KERNELS_MAX_VERSION))
        assert not low <= import_utils.version.parse(version) < high
        assert not hasattr(kernels, "__version__")  # the fallback transformers reads without metadata
    finally:
        import_utils.is_kernels_available.cache_clear()
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2, attn_pdrop=0.0,
                                     resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = kernels.patch(transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa"))
    assert re.search("attention", str(model.kernels_patch_report))
    ids = torch.randint(0, 64, (2, 8))
    out = model.train()(input_ids=ids, labels=ids)
    out.loss.backward()
    assert out.loss.isfinite()
