"""Cross-entropy and fused linear cross-entropy: Triton kernels against torch.

Without a GPU these run the real Triton kernels through the interpreter (see
conftest.py). The oracle is torch itself (``F.cross_entropy``, plus the z-loss
term), computed in a golden precision and in the kernel's own dtype; every loss
and gradient must be within the rule of kernels/numerics.py.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# The modules (``kernels.cross_entropy`` the attribute is the function).
ce_module = importlib.import_module("kernels.cross_entropy")
ce_reference = importlib.import_module("kernels.reference.cross_entropy")
from kernels.numerics import assert_close_to_ref, factor, golden_dtype, loss_atol

IGNORE = -100
LOWP = [torch.float16, torch.bfloat16]


# ----------------------------------------------------------------------------- oracles and helpers


def torch_cross_entropy(x, t, weight=None, *, ignore_index=IGNORE, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                        softcap=None):
    """The spec, in torch ops at ``x``'s own precision: F.cross_entropy (of softcapped logits) plus z-loss
    (times the target's class weight), 'mean' 0 when all are ignored."""
    C = x.shape[-1]
    x2, t2 = x.reshape(-1, C), t.reshape(-1)
    if softcap:
        x2 = softcap * torch.tanh(x2 / softcap)
    w = weight.to(x.dtype) if weight is not None else None
    loss = F.cross_entropy(x2, t2, w, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    valid = t2 != ignore_index
    if z_loss:
        w_t = w[torch.where(valid, t2, 0)] if w is not None else 1.0
        loss = loss + torch.where(valid, z_loss * w_t * torch.logsumexp(x2, dim=1).square(), 0.0)
    if reduction == "none":
        return loss.view(t.shape)
    if reduction == "sum":
        return loss.sum()
    denom = valid.sum().to(x.dtype) if w is None else torch.where(valid, w[torch.where(valid, t2, 0)], 0.0).sum()
    return loss.sum() / denom if valid.any() else loss.sum() * 0.0


def make_targets(shape, C, ignore_frac=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, C, shape, generator=g)
    t[torch.rand(shape, generator=g) < ignore_frac] = IGNORE
    return t


def upstream(reduction, shape, seed=1):
    """A non-trivial upstream gradient: per token for 'none', a scalar != 1 otherwise."""
    if reduction == "none":
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return torch.tensor(0.75)


def run_ce(fn, logits, t, dtype, g, **kw):
    x = logits.detach().to(dtype).requires_grad_()
    w = kw.pop("weight", None)
    loss = fn(x, t, w.to(dtype) if w is not None else None, **kw)
    loss.backward(g.to(device=loss.device, dtype=loss.dtype))
    return loss.detach(), x.grad


def check_ce(logits, t, dtype, *, g=None, name="", **kw):
    """Kernel vs torch in golden precision vs torch in ``dtype``: loss and gradient."""
    g = upstream(kw.get("reduction", "mean"), t.shape) if g is None else g
    if kw.get("weight") is not None:
        kw["weight"] = kw["weight"].to(dtype)  # all three see the same (rounded) inputs
    out = run_ce(kernels.cross_entropy, logits.to(dtype), t, dtype, g, **dict(kw))
    ref = run_ce(torch_cross_entropy, logits.to(dtype), t, golden_dtype(dtype), g, **dict(kw))
    ref_lp = run_ce(torch_cross_entropy, logits.to(dtype), t, dtype, g, **dict(kw))
    assert out[0].dtype == torch.float32 and out[1].dtype == dtype
    assert_close_to_ref(out[0], ref[0], ref_lp[0], factor=factor("cross_entropy", gradient=False),
                        atol=loss_atol(ref[0], dtype), name=f"{name} loss")
    assert_close_to_ref(out[1], ref[1], ref_lp[1], factor=factor("cross_entropy", gradient=True), name=f"{name} grad")


# ----------------------------------------------------------------------------- cross_entropy


@pytest.mark.parametrize("dtype", [torch.float32, *LOWP])
@pytest.mark.parametrize("C,N", [(1, 9), (7, 33), (1000, 17), (32000, 3), (50257, 3)])
def test_vocab_sizes(C, N, dtype):
    torch.manual_seed(C)
    logits = torch.randn(N, C) * 2
    t = make_targets((N,), C)
    check_ce(logits, t, dtype, name=f"C={C}", label_smoothing=0.1 if C > 1 else 0.0)


OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "smoothing": {"label_smoothing": 0.2},
    "weight+smoothing": {"weight": True, "label_smoothing": 0.3},
    "z_loss": {"z_loss": 1e-3},
    "softcap": {"softcap": 5.0},  # well inside the logits' range (x3 normal): the cap bends them
    "all": {"weight": True, "label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 4.0},
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("C", [1000, 9000])  # 9000 is past the one-pass limit: the two-sweep kernel
def test_options(C, option, reduction):
    torch.manual_seed(0)
    N = 24
    logits = torch.randn(N, C) * 3
    t = make_targets((N,), C)
    kw = dict(OPTIONS[option], reduction=reduction)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(C) + 0.1
    check_ce(logits, t, torch.float32, name=option, **kw)


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_options_low_precision(dtype, reduction):
    torch.manual_seed(0)
    C = 3000
    logits = torch.randn(20, C) * 3
    t = make_targets((20,), C)
    check_ce(logits, t, dtype, reduction=reduction, weight=torch.rand(C) + 0.1, label_smoothing=0.1, z_loss=1e-3)
    check_ce(logits, t, dtype, name="softcap", reduction=reduction, softcap=4.0)


@pytest.mark.parametrize("dtype", [torch.float32, *LOWP])
@pytest.mark.parametrize("C", [1000, 9000])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_huge_logits(C, reduction, dtype):
    torch.manual_seed(0)
    logits = torch.randn(8, C) * 1e4  # exp overflows fp32 without the max shift
    logits[0] = 1e4  # a row of ties at the top
    t = make_targets((8,), C, ignore_frac=0.2)
    check_ce(logits, t, dtype, name="huge", reduction=reduction, label_smoothing=0.1)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 12),
    c=st.integers(1, 300),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    weighted=st.booleans(),
    label_smoothing=st.sampled_from([0.0, 0.05, 1.0]),
    z_loss=st.sampled_from([0.0, 1e-2]),
    ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_random_combinations(n, c, reduction, weighted, label_smoothing, z_loss, ignore_frac, seed):
    torch.manual_seed(seed)
    logits = torch.randn(n, c) * 4
    t = make_targets((n,), c, ignore_frac, seed)
    kw = dict(reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss)
    if weighted:
        kw["weight"] = torch.rand(c) + 0.05
    check_ce(logits, t, torch.float32, name="random", **kw)


def test_vocab_262144():
    torch.manual_seed(0)
    C = 262144
    logits = torch.randn(2, C) * 4
    t = torch.tensor([5, C - 1])
    check_ce(logits, t, torch.float32, label_smoothing=0.1, z_loss=1e-4)


def test_three_dims_and_noncontiguous():
    torch.manual_seed(0)
    B, T, C = 2, 5, 300
    t = make_targets((B, T), C)
    # (B, T, C) logits whose rows are strided (a slice of a wider buffer) ...
    wide = torch.randn(B, T, C + 13)
    check_ce(wide[..., :C], t, torch.float32, name="row-strided", reduction="none")
    # ... and whose classes are not stride 1 (a transposed buffer), with a non-contiguous upstream gradient.
    transposed = torch.randn(C, T, B).permute(2, 1, 0)
    assert transposed.stride(-1) != 1
    g = torch.randn(T, B).t()
    check_ce(transposed, t, torch.float32, name="transposed", reduction="none", g=g)
    check_ce(transposed, t, torch.bfloat16, name="transposed", reduction="mean")


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("C", [300, 9000])
def test_softcap_huge_and_infinite_logits(C, backend):
    # Capped logits are bounded: huge ones saturate (gradient ~0) and -inf ones become -softcap,
    # as torch's tanh makes them; None and 0 are both "off".
    torch.manual_seed(0)
    logits = torch.randn(6, C) * 1e4
    logits[1, ::3] = float("-inf")
    t = make_targets((6,), C, ignore_frac=0.2)
    t[1] = 1
    with kernels.use_backend(backend):
        check_ce(logits, t, torch.float32, name="softcap huge", softcap=30.0, label_smoothing=0.1)
        x = torch.randn(4, C)
        tt = make_targets((4,), C, ignore_frac=0.0)
        off = kernels.cross_entropy(x, tt)
        assert torch.equal(kernels.cross_entropy(x, tt, softcap=None), off)
        assert torch.equal(kernels.cross_entropy(x, tt, softcap=0), off)


def torch_z_loss(x, t, weight=None, *, reduction="mean", z_loss=0.0, softcap=None, **_):
    """The z-loss term of torch_cross_entropy's loss, reduced as the loss is (same 'mean' denominator)."""
    x2, t2 = x.reshape(-1, x.shape[-1]).double(), t.reshape(-1)
    if softcap:
        x2 = softcap * torch.tanh(x2 / softcap)
    valid = t2 != IGNORE
    w = weight.double() if weight is not None else torch.ones(x2.shape[1], dtype=torch.float64)
    rows = torch.where(valid, z_loss * w[torch.where(valid, t2, 0)] * torch.logsumexp(x2, dim=1).square(), 0.0)
    if reduction == "none":
        return rows.view(t.shape)
    if reduction == "sum" or not valid.any():
        return rows.sum()
    return rows.sum() / w[t2[valid]].sum()


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_class_weights_weigh_the_z_loss_like_the_rest_of_the_token_loss(backend):
    # A class weight weighs a token's whole loss, z-loss included: 'mean' stays the weighted mean of the
    # per-token losses ('none' summed over sum(w[y])), which scaling every weight leaves unchanged (as torch's
    # weighted mean), and a class of weight 0 adds nothing, as an ignored target. Unweighted, the z-loss term
    # divided by sum(w[y]) shrank as the weights grew.
    torch.manual_seed(0)
    C, z = 50, 0.05
    logits, t = torch.randn(12, C) * 3, make_targets((12,), C)
    w = torch.rand(C) + 0.1
    valid = t != IGNORE
    lse = torch.logsumexp(logits, dim=1)
    w_t = torch.where(valid, w[torch.where(valid, t, 0)], 0.0)
    with kernels.use_backend(backend):
        rows, z_rows = kernels.cross_entropy(logits, t, w, reduction="none", z_loss=z, return_z_loss=True)
        torch.testing.assert_close(z_rows, w_t * z * lse.square(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rows, F.cross_entropy(logits, t, w, ignore_index=IGNORE, reduction="none")
                                   + z_rows, rtol=1e-5, atol=1e-6)
        for fn, args in ((kernels.cross_entropy, (logits, t)), (lambda *a, weight, **kw: kernels.linear_cross_entropy(
                *a, class_weight=weight, chunk_size=5, **kw), (logits, torch.eye(C), t))):
            mean = fn(*args, weight=w, z_loss=z)
            torch.testing.assert_close(mean, rows.sum() / w_t.sum(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(fn(*args, weight=4 * w, z_loss=z), mean, rtol=1e-5, atol=1e-6)
            zero, ignored, first = w.clone(), t.clone(), t[valid][0]
            zero[first] = 0.0  # a class of weight 0: as if its targets were ignored
            ignored[t == first] = IGNORE
            torch.testing.assert_close(fn(*args[:-1], t, weight=zero, z_loss=z, reduction="sum"),
                                       fn(*args[:-1], ignored, weight=zero, z_loss=z, reduction="sum"))


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_return_z_loss(reduction, backend):
    torch.manual_seed(0)
    C = 300
    logits = torch.randn(10, C) * 3
    t = make_targets((10,), C)
    kw = dict(weight=torch.rand(C) + 0.1, reduction=reduction, label_smoothing=0.1, z_loss=1e-2, softcap=5.0)
    with kernels.use_backend(backend):
        for requires_grad in (True, False):  # the eager autograd path and the op
            x = logits.clone().requires_grad_(requires_grad)
            plain = kernels.cross_entropy(x, t, **kw)
            loss, z = kernels.cross_entropy(x, t, return_z_loss=True, **kw)
            torch.testing.assert_close(loss, plain, rtol=0, atol=0)  # the same loss, z-loss term included
            assert not z.requires_grad and z.dtype == torch.float32 and z.shape == loss.shape
            torch.testing.assert_close(z.double(), torch_z_loss(logits, t, **kw), rtol=1e-5, atol=1e-7)
            if requires_grad:  # the gradient is the loss's, z-loss term included, nothing more
                loss.backward(upstream(reduction, t.shape))
                leaf = logits.clone().requires_grad_()
                want = torch.autograd.grad(torch_cross_entropy(leaf, t, **kw), leaf, upstream(reduction, t.shape))
                torch.testing.assert_close(x.grad, want[0], rtol=1e-5, atol=1e-7)
        # Without a z-loss coefficient the term is 0; all ignored: 0, not NaN.
        _, z0 = kernels.cross_entropy(logits, t, return_z_loss=True, reduction=reduction)
        assert torch.equal(z0, torch.zeros_like(z0))
        _, z_ignored = kernels.cross_entropy(logits, torch.full_like(t, IGNORE), return_z_loss=True, z_loss=1e-2,
                                             reduction=reduction)
        assert torch.equal(z_ignored, torch.zeros_like(z_ignored))


def test_unbatched_input():
    logits = torch.randn(11)
    check_ce(logits, torch.tensor(4), torch.float32, reduction="none")
    check_ce(logits, torch.tensor(4), torch.float32, reduction="mean")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_is_zero_not_nan(reduction):
    x = torch.randn(6, 50, requires_grad=True)
    t = torch.full((6,), IGNORE)
    loss = kernels.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1, z_loss=1e-2)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_mean_divides_by_the_weight_sum_whatever_its_sign(backend):
    # Only a batch with no selected target takes the 0 path: torch divides by the sum of the
    # selected class weights even when it is negative (or 0, giving NaN as torch does).
    x = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, -2.0]])
    w = torch.tensor([-1.0, 1.0, 1.0])
    for t in (torch.tensor([0, IGNORE]), torch.tensor([0, 0]), torch.tensor([0, 1])):
        leaf, want_leaf = x.clone().requires_grad_(), x.clone().requires_grad_()
        with kernels.use_backend(backend):
            loss = kernels.cross_entropy(leaf, t, w)
        want = F.cross_entropy(want_leaf, t, w, ignore_index=IGNORE)
        torch.testing.assert_close(loss, want, equal_nan=True, msg=f"targets {t.tolist()}")
        if want.isfinite():
            loss.backward()
            want.backward()
            torch.testing.assert_close(leaf.grad, want_leaf.grad, msg=f"targets {t.tolist()}")
    assert F.cross_entropy(x[:1], torch.tensor([0]), w).item() == pytest.approx(1.7413, abs=1e-4)  # the report


def test_empty_batch():
    x = torch.randn(0, 10, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long)
    assert kernels.cross_entropy(x, t).item() == 0
    assert kernels.cross_entropy(x, t, reduction="none").shape == (0,)
    kernels.cross_entropy(x, t, reduction="sum").backward()
    assert x.grad.shape == (0, 10)


@pytest.mark.parametrize("C", [1000, 9000])
def test_never_writes_into_logits(C):
    torch.manual_seed(0)
    x = torch.randn(6, C, requires_grad=True)
    before = x.detach().clone()
    loss = kernels.cross_entropy(x, make_targets((6,), C), label_smoothing=0.1)
    loss.backward()
    assert torch.equal(x.detach(), before)


@pytest.mark.parametrize("C", [1000, 9000])
def test_inplace_backward(C):
    torch.manual_seed(0)
    t = make_targets((6,), C)
    w = torch.randn(C, 5)
    h = torch.randn(6, 5, requires_grad=True)
    logits = h @ w.t()
    expected = torch.autograd.grad(torch_cross_entropy(logits, t, z_loss=1e-3), logits, retain_graph=True)[0]
    buffer = logits.detach()  # the same memory
    loss = kernels.cross_entropy(logits, t, z_loss=1e-3, inplace_backward=True)
    # The forward wrote the gradient over the logits: that is the point of the option.
    torch.testing.assert_close(buffer, expected, rtol=1e-5, atol=1e-7)
    (loss * 2).backward()
    torch.testing.assert_close(h.grad, 2 * expected @ w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("C", [1000, 9000])
def test_inplace_backward_on_overlapping_logits_uses_a_separate_buffer(C):
    # Expanded (stride-0) rows, and rows overlapping by half: one gradient row written over
    # the logits would be read back as another row's logits. The option is a memory hint;
    # on memory whose rows overlap the gradient goes to its own buffer.
    torch.manual_seed(0)
    t = make_targets((4,), C, ignore_frac=0.0)
    base = torch.randn(C, requires_grad=True)
    flat = torch.randn(C // 2 * 5, requires_grad=True)
    for name, leaf, make in (("expanded", base, lambda p: p.expand(4, C)),
                             ("overlapping", flat, lambda p: p.as_strided((4, C), (C // 2, 1)))):
        before = leaf.detach().clone()
        loss = kernels.cross_entropy(make(leaf), t, inplace_backward=True)
        loss.backward()
        ours = leaf.grad.clone()
        assert torch.equal(leaf.detach(), before), f"{name}: the logits were written"
        leaf.grad = None
        want = torch_cross_entropy(make(leaf), t)
        want.backward()
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(ours, leaf.grad, rtol=1e-5, atol=1e-6, msg=name)
        leaf.grad = None


class _StoragesOfSize(TorchDispatchMode):
    """The storages of every tensor of ``numel`` elements that an op produces while the mode is on."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.storages = numel, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.storages |= {o.untyped_storage().data_ptr() for o in tree_leaves(out)
                          if isinstance(o, torch.Tensor) and o.numel() == self.numel}
        return out


@pytest.mark.parametrize("upstream", [1.0, 0.37])
def test_eager_backward_holds_no_second_gradient_buffer(upstream):
    """The forward's gradient buffer is handed to autograd scaled in place: every logits-sized tensor
    the backward touches lives in that one buffer (the compiled path's op multiplies out of place instead)."""
    torch.manual_seed(0)
    N, C = 8, 1000
    logits = torch.randn(N, C, requires_grad=True)
    t = make_targets((N,), C)
    with _StoragesOfSize(N * C) as forward:
        loss = kernels.cross_entropy(logits, t)
    with _StoragesOfSize(N * C) as backward:
        (loss * upstream).backward()
    buffers = forward.storages - {logits.untyped_storage().data_ptr()}
    assert len(buffers) == 1 and backward.storages <= buffers, (forward.storages, backward.storages)
    assert logits.grad.untyped_storage().data_ptr() in buffers
    want = torch.autograd.grad(torch_cross_entropy(logits, t) * upstream, logits)[0]
    torch.testing.assert_close(logits.grad, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_eager_backward_holds_no_second_weight_gradient(reduction):
    """The same for linear_cross_entropy's weight gradient (vocabulary x hidden: gigabytes for a large
    vocabulary): the backward scales the forward's buffer in place (both backends run this chunk loop)."""
    torch.manual_seed(0)
    N, H, C = 16, 24, 700
    x = torch.randn(N, H, requires_grad=True)
    w = (0.1 * torch.randn(C, H)).requires_grad_()
    t = make_targets((N,), C)
    with _StoragesOfSize(C * H) as forward:
        loss = kernels.linear_cross_entropy(x, w, t, reduction=reduction)
    with _StoragesOfSize(C * H) as backward:
        (loss * 0.37).backward()
    buffers = forward.storages - {w.untyped_storage().data_ptr()}
    assert backward.storages <= buffers, (forward.storages, backward.storages)
    assert w.grad.untyped_storage().data_ptr() in buffers
    want = torch.autograd.grad(torch_cross_entropy(x @ w.t(), t, reduction=reduction) * 0.37, (x, w))
    torch.testing.assert_close(x.grad, want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, want[1], rtol=1e-5, atol=1e-6)


def test_inplace_backward_refused_when_logits_are_saved():
    # exp saves its output for its backward; overwriting it must make autograd refuse, not compute garbage.
    z = torch.randn(4, 30, requires_grad=True)
    logits = z.exp()
    loss = kernels.cross_entropy(logits, torch.tensor([1, 2, 3, 4]), inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_upstream_gradient_one_skips_scaling_and_matches():
    torch.manual_seed(0)
    x = torch.randn(5, 2000, requires_grad=True)
    t = make_targets((5,), 2000)
    kernels.cross_entropy(x, t).backward()
    g1 = x.grad.clone()
    x.grad = None
    (kernels.cross_entropy(x, t) / 4).backward()
    torch.testing.assert_close(x.grad, g1 / 4, rtol=1e-6, atol=0)


def test_second_backward_raises():
    x = torch.randn(3, 10, requires_grad=True)
    loss = kernels.cross_entropy(x, torch.tensor([1, 2, 3]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


def test_no_grad_matches():
    torch.manual_seed(0)
    x = torch.randn(7, 500)
    t = make_targets((7,), 500)
    with torch.no_grad():
        a = kernels.cross_entropy(x.requires_grad_(), t, label_smoothing=0.1)
    b = kernels.cross_entropy(x.detach(), t, label_smoothing=0.1)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_legacy_reduction_arguments():
    x = torch.randn(4, 9)
    t = torch.tensor([1, 2, IGNORE, 8])
    with pytest.warns(UserWarning, match="deprecated"):  # torch's own warning, as with F.cross_entropy
        ours, theirs = kernels.cross_entropy(x, t, reduce=False), F.cross_entropy(x, t, reduce=False)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- linear_cross_entropy


def run_linear(fn, x, w, b, t, dtype, g, **kw):
    leaves = [p.detach().to(dtype).requires_grad_() if p is not None else None for p in (x, w, b)]
    loss = fn(leaves[0], leaves[1], t, leaves[2], **kw)
    loss.backward(g.to(device=loss.device, dtype=loss.dtype))
    return [loss.detach()] + [p.grad for p in leaves if p is not None]


def naive_linear(x, w, t, b=None, **kw):
    kw.pop("chunk_size", None)
    return torch_cross_entropy(F.linear(x, w, b), t, kw.pop("class_weight", None), **kw)


def check_linear(x, w, b, t, dtype, *, g=None, **kw):
    g = upstream(kw.get("reduction", "mean"), t.shape) if g is None else g
    out = run_linear(kernels.linear_cross_entropy, x, w, b, t, dtype, g, **kw)
    ref = run_linear(naive_linear, x, w, b, t, golden_dtype(dtype), g, **kw)
    ref_lp = run_linear(naive_linear, x, w, b, t, dtype, g, **kw)
    for name, o, r, r_lp in zip(["loss", "grad_input", "grad_weight", "grad_bias"], out, ref, ref_lp):
        assert o.dtype == (torch.float32 if name == "loss" else dtype)
        loss = name == "loss"
        assert_close_to_ref(o, r, r_lp, factor=factor("linear_cross_entropy", gradient=not loss),
                            atol=loss_atol(r, dtype) if loss else None, name=name)


def linear_inputs(N, H, C, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g)
    w = torch.randn(C, H, generator=g) / H**0.5 * 2
    b = torch.randn(C, generator=g) if bias else None
    return x, w, b, make_targets((N,), C, seed=seed)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, *LOWP])
def test_linear(dtype, reduction):
    x, w, b, t = linear_inputs(37, 100, 1000)
    check_linear(x, w, b, t, dtype, reduction=reduction, chunk_size=8)


@pytest.mark.parametrize("H,C,bias,chunk", [(48, 7, False, None), (129, 9000, True, 5), (1, 300, True, 64)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_shapes_and_options(H, C, bias, chunk, reduction):
    x, w, b, t = linear_inputs(21, H, C, bias)
    check_linear(x, w, b, t, torch.float32, reduction=reduction, chunk_size=chunk, label_smoothing=0.1, z_loss=1e-3)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_class_weight(dtype, reduction, backend):
    # torch's class weights: each token's loss times w[y] (label smoothing weighs every class),
    # 'mean' divides by the sum of the selected weights over the whole call, not per chunk.
    x, w, b, t = linear_inputs(23, 40, 500)
    cw = torch.rand(500, generator=torch.Generator().manual_seed(5)) * 2 + 0.1
    with kernels.use_backend(backend):
        check_linear(x, w, b, t, dtype, reduction=reduction, chunk_size=7, class_weight=cw.to(dtype),
                     label_smoothing=0.1)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_linear_mean_divides_by_a_negative_weight_sum(backend):
    x, w, b, t = linear_inputs(6, 8, 5)
    t = torch.tensor([0, 0, IGNORE, 1, 0, IGNORE])
    cw = torch.tensor([-1.0, 0.5, 1.0, 1.0, 1.0])  # selected weights sum to -2.5
    with kernels.use_backend(backend):
        ours = run_linear(kernels.linear_cross_entropy, x, w, b, t, torch.float32, torch.tensor(1.0), chunk_size=4,
                          class_weight=cw)
    want = run_linear(naive_linear, x, w, b, t, torch.float64,
                      torch.tensor(1.0), class_weight=cw.double())
    assert want[0] != 0
    for a, r in zip(ours, want):
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_return_z_loss(reduction, backend):
    x, w, b, t = linear_inputs(17, 24, 200)
    cw = torch.rand(200) + 0.1
    kw = dict(reduction=reduction, z_loss=1e-2, softcap=4.0, class_weight=cw, chunk_size=5)
    with kernels.use_backend(backend):
        for requires_grad in (True, False):
            head = w.clone().requires_grad_(requires_grad)
            plain = kernels.linear_cross_entropy(x, head, t, b, **kw)
            loss, z = kernels.linear_cross_entropy(x, head, t, b, return_z_loss=True, **kw)
            torch.testing.assert_close(loss, plain, rtol=0, atol=0)
            assert not z.requires_grad and z.dtype == torch.float32 and z.shape == loss.shape
            want = torch_z_loss(F.linear(x, w, b), t, cw, **kw)
            torch.testing.assert_close(z.double(), want, rtol=1e-5, atol=1e-7)
            if requires_grad:
                loss.backward(upstream(reduction, t.shape))
                expected = torch.autograd.grad(naive_linear(x, head, t, b, **kw), head, upstream(reduction, t.shape))
                torch.testing.assert_close(head.grad, expected[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_softcap(dtype, reduction, backend):
    x, w, b, t = linear_inputs(19, 32, 300)
    with kernels.use_backend(backend):
        check_linear(x * 3, w, b, t, dtype, reduction=reduction, chunk_size=6, softcap=3.0, z_loss=1e-3)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("N,H,C", [(8, 8, 8), (8, 3, 4), (33, 64, 1000)])
def test_linear_low_precision_logits_stay_fp32(N, H, C, dtype, backend):
    """Each chunk's logits come from the GEMM's fp32 accumulator and stay fp32, as torch's chunked loss keeps them.

    The first two shapes are torch's OpInfo samples with a bias, where rounding the logits to
    fp16 missed the rule. Truth: the loss of the rounded inputs' exact logits; same-precision
    reference: the same loss from fp32-accumulated logits; the loss is fp32, so fp32 slack.
    """
    x, w, b, t = (v.to(dtype) if v.is_floating_point() else v for v in linear_inputs(N, H, C, seed=2))
    with kernels.use_backend(backend):
        check_fp32_logits(x, w, b, t)


def check_fp32_logits(x, w, b, t):
    out = kernels.linear_cross_entropy(x, w, t, b, chunk_size=5)
    golden = torch_cross_entropy(F.linear(x.double(), w.double(), b.double()), t)
    same_dtype = torch_cross_entropy(F.linear(x.float(), w.float(), b.float()), t)
    assert_close_to_ref(out, golden, same_dtype, factor=factor("linear_cross_entropy", gradient=False),
                        atol=loss_atol(golden, torch.float32), name=f"{x.dtype} loss")


def test_linear_three_dims_and_frozen_weight():
    x, w, b, t = linear_inputs(12, 40, 500)
    x3, t3 = x.view(3, 4, 40), t.view(3, 4)
    check_linear(x3, w, b, t3, torch.float32, reduction="none", chunk_size=5)
    # Non-contiguous input and weight (transposed storage).
    check_linear(x.t().contiguous().t(), w.t().contiguous().t(), b, t, torch.float32, reduction="mean", chunk_size=5)
    # Only the input needs a gradient (a frozen head): no weight gradient is produced.
    xi = x3.clone().requires_grad_()
    kernels.linear_cross_entropy(xi, w, t3, b, chunk_size=5).backward()
    expected = torch.autograd.grad(naive_linear(xi, w, t3, b), xi)[0]
    torch.testing.assert_close(xi.grad, expected, rtol=1e-5, atol=1e-6)


def test_linear_chunk_size_does_not_change_the_result():
    x, w, b, t = linear_inputs(30, 64, 700)
    results = [run_linear(kernels.linear_cross_entropy, x, w, b, t, torch.float32, torch.tensor(1.0), chunk_size=c)
               for c in (1, 7, 30)]
    for other in results[1:]:
        for a, r in zip(results[0], other):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


def test_linear_empty_batch():
    x, w, b, t = linear_inputs(0, 16, 50)
    out = run_linear(kernels.linear_cross_entropy, x, w, b, t, torch.float32, torch.tensor(1.0))
    assert out[0].item() == 0 and out[1].shape == (0, 16)
    assert torch.equal(out[2], torch.zeros_like(w)) and torch.equal(out[3], torch.zeros_like(b))


def test_linear_all_ignored():
    x, w, b, t = linear_inputs(9, 16, 50)
    t[:] = IGNORE
    out = run_linear(kernels.linear_cross_entropy, x, w, b, t, torch.float32, torch.tensor(1.0), chunk_size=4)
    assert all(torch.equal(o, torch.zeros_like(o)) for o in out)


def test_gradient_accumulation_step_by_step():
    """Micro-batches with the usual scaling accumulate exactly the big batch's gradients, at every step."""
    x, w, b, t = linear_inputs(40, 36, 400, seed=3)
    bounds = [(0, 11), (11, 30), (30, 40)]  # uneven micro-batches, each with ignored targets
    n_valid = (t != IGNORE).sum()
    params = [w.clone().requires_grad_(), b.clone().requires_grad_()]
    golden = [w.double().requires_grad_(), b.double().requires_grad_()]
    for lo, hi in bounds:
        loss = kernels.linear_cross_entropy(x[lo:hi], *params[:1], t[lo:hi], params[1], reduction="sum", chunk_size=4)
        (loss / n_valid).backward()
        ref = naive_linear(x[lo:hi].double(), golden[0], t[lo:hi], golden[1], reduction="sum")
        (ref / n_valid).backward()
        for p, q in zip(params, golden):  # after every step, not only at the end
            torch.testing.assert_close(p.grad, q.grad.float(), rtol=1e-5, atol=1e-6)
    big = [w.clone().requires_grad_(), b.clone().requires_grad_()]
    kernels.linear_cross_entropy(x, big[0], t, big[1], chunk_size=4).backward()
    for p, q in zip(params, big):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)

    # Equal micro-batches without ignored targets: 'mean' divided by the number of steps is the big mean.
    t_full = t.clone()
    t_full[t_full == IGNORE] = 0
    accum = w.clone().requires_grad_()
    for lo in range(0, 40, 10):
        (kernels.linear_cross_entropy(x[lo:lo + 10], accum, t_full[lo:lo + 10], chunk_size=3) / 4).backward()
    whole = w.clone().requires_grad_()
    kernels.linear_cross_entropy(x, whole, t_full).backward()
    torch.testing.assert_close(accum.grad, whole.grad, rtol=1e-5, atol=1e-6)


def test_linear_training_matches_naive():
    """A tiny language-model head trained 15 SGD steps with the fused loss and with torch: same losses and weights."""
    torch.manual_seed(0)
    V, H, N = 97, 24, 30
    init = [torch.randn(V, H) * 0.1, torch.randn(V, H) * 0.1]  # embedding, head
    runs = []
    for fused in (True, False):
        emb, head = (p.clone().requires_grad_() for p in init)
        opt = torch.optim.SGD([emb, head], lr=0.5)
        losses = []
        for step in range(15):
            g = torch.Generator().manual_seed(step)
            tokens = torch.randint(0, V, (N,), generator=g)
            h = torch.tanh(emb[tokens])
            target = (tokens * 7 + 3) % V  # a learnable next token
            target[::5] = IGNORE
            if fused:
                loss = kernels.linear_cross_entropy(h, head, target, chunk_size=7, label_smoothing=0.05)
            else:
                loss = F.cross_entropy(h @ head.t(), target, label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        runs.append((losses, emb.detach(), head.detach()))
    (l1, e1, h1), (l2, e2, h2) = runs
    assert l1[-1] < l1[0]
    torch.testing.assert_close(torch.tensor(l1), torch.tensor(l2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(e1, e2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h1, h2, rtol=1e-5, atol=1e-6)


def test_linear_second_backward_raises_except_none():
    x, w, b, t = linear_inputs(6, 8, 20)
    w.requires_grad_()
    loss = kernels.linear_cross_entropy(x, w, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()
    # 'none' recomputes in its backward, so it can run twice.
    w.grad = None
    loss = kernels.linear_cross_entropy(x, w, t, reduction="none")
    loss.sum().backward(retain_graph=True)
    once = w.grad.clone()
    loss.sum().backward()
    torch.testing.assert_close(w.grad, 2 * once)


# ----------------------------------------------------------------------------- references, modules, errors


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", [o for o in OPTIONS if o not in ("z_loss", "softcap", "all")])
def test_reference_equals_torch(option, reduction):
    torch.manual_seed(0)
    C = 37
    x = torch.randn(3, 5, C, dtype=torch.float64)
    t = make_targets((3, 5), C)
    kw = dict(OPTIONS[option], reduction=reduction)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(C, dtype=torch.float64)
    ours = ce_reference.cross_entropy(x, t, ignore_index=IGNORE, **kw)
    theirs = F.cross_entropy(x.reshape(-1, C), t.reshape(-1), ignore_index=IGNORE, **kw)
    torch.testing.assert_close(ours, theirs.view(ours.shape), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reference_linear_and_rows_equal_torch(reduction):
    x, w, b, t = linear_inputs(23, 30, 200)
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    g = upstream(reduction, t.shape)
    theirs = run_linear(naive_linear, x, w, b, t, torch.float64, g, **kw)
    # The spec, and what the reference backend runs: the chunk loop with the PyTorch per-chunk loss.
    spec = run_linear(ce_reference.linear_cross_entropy, x, w, b, t, torch.float32, g, chunk_size=6, **kw)
    with kernels.use_backend("reference"):
        chunked = run_linear(kernels.linear_cross_entropy, x, w, b, t, torch.float32, g, chunk_size=6, **kw)
    for ours in (spec, chunked):
        for a, r in zip(ours, theirs):
            torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-6)
    # The per-chunk function, with class weights, against autograd.
    logits = torch.randn(9, 40, dtype=torch.float32)
    cw = torch.rand(40)
    tt = make_targets((9,), 40)
    scale = torch.rand(9)
    grad = torch.empty_like(logits)
    rows = ce_reference.cross_entropy_rows(logits, tt, cw, IGNORE, 0.2, 1e-2, scale, grad)
    leaf = logits.double().requires_grad_()
    expected = torch_cross_entropy(leaf, tt, cw.double(), reduction="none", label_smoothing=0.2, z_loss=1e-2)
    expected.backward(scale.double())
    torch.testing.assert_close(rows.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), leaf.grad, rtol=1e-5, atol=1e-7)


def test_reference_path_matches_kernels():
    x, w, b, t = linear_inputs(10, 20, 300)
    with kernels.use_backend("reference"):
        ref = kernels.linear_cross_entropy(x, w, t, b, label_smoothing=0.1)
        ref_ce = kernels.cross_entropy(x @ w.t(), t, z_loss=1e-2)
    torch.testing.assert_close(kernels.linear_cross_entropy(x, w, t, b, label_smoothing=0.1), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kernels.cross_entropy(x @ w.t(), t, z_loss=1e-2), ref_ce, rtol=1e-5, atol=1e-6)


def test_cross_entropy_module_is_drop_in():
    torch.manual_seed(0)
    C = 60
    cw = torch.rand(C) + 0.5
    ours = kernels.nn.CrossEntropyLoss(weight=cw, ignore_index=3, label_smoothing=0.1)
    theirs = torch.nn.CrossEntropyLoss(weight=cw, ignore_index=3, label_smoothing=0.1)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(8, C, requires_grad=True)
    t = torch.randint(0, C, (8,))
    t[:2] = 3
    a, b = ours(x, t), theirs(x, t)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ga, gb = (torch.autograd.grad(v, x)[0] for v in (a, b))
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)
    z = kernels.nn.CrossEntropyLoss(reduction="sum", z_loss=1e-2, softcap=2.0)
    torch.testing.assert_close(z(x, t), torch_cross_entropy(x, t, reduction="sum", z_loss=1e-2, softcap=2.0),
                               rtol=1e-5, atol=1e-5)


def test_linear_cross_entropy_module():
    x, w, b, t = linear_inputs(14, 20, 90)
    module = kernels.nn.LinearCrossEntropyLoss(reduction="sum", label_smoothing=0.1, softcap=2.0, chunk_size=4)
    torch.testing.assert_close(
        module(x, w, t, b), naive_linear(x, w, t, b, reduction="sum", label_smoothing=0.1, softcap=2.0),
        rtol=1e-5, atol=1e-5,
    )
    assert "chunk_size=4" in repr(module)
    cw = torch.rand(90) + 0.5
    weighted = kernels.nn.LinearCrossEntropyLoss(class_weight=cw)
    assert torch.equal(weighted.state_dict()["class_weight"], cw)
    torch.testing.assert_close(weighted(x, w, t, b), naive_linear(x, w, t, b, class_weight=cw), rtol=1e-5, atol=1e-5)


# Every integer dtype the validator accepts for targets (uint64 is refused: int64 cannot hold it).
TARGET_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32]


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", TARGET_DTYPES, ids=str)
def test_every_integer_target_dtype_gives_torchs_loss(dtype, reduction, backend):
    # ignore_index=-100 compared in uint8 wraps to 156: real class 156 must still count.
    torch.manual_seed(0)
    C = 200 if dtype != torch.int8 else 120
    target = torch.tensor([156, 3, 156, 0, C - 1]) if dtype != torch.int8 else torch.tensor([100, 3, 100, 0, C - 1])
    x = torch.randn(5, C, requires_grad=True)
    w = torch.randn(C, 8) / 3
    h = torch.randn(5, 8, requires_grad=True)
    with kernels.use_backend(backend):
        for name, ours, theirs in (
            ("cross_entropy", lambda t: kernels.cross_entropy(x, t, reduction=reduction, z_loss=1e-3),
             lambda t: torch_cross_entropy(x, t, reduction=reduction, z_loss=1e-3)),
            ("linear_cross_entropy", lambda t: kernels.linear_cross_entropy(h, w, t, reduction=reduction, z_loss=1e-3),
             lambda t: torch_cross_entropy(h @ w.t(), t, reduction=reduction, z_loss=1e-3)),
        ):
            got, want = ours(target.to(dtype)), theirs(target)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{name} loss")
            leaf = x if name == "cross_entropy" else h
            g_got, = torch.autograd.grad(got.sum(), leaf)
            g_want, = torch.autograd.grad(want.sum(), leaf)
            torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-6, msg=f"{name} gradient")
    with pytest.raises(ValueError, match=r"target holds class index 1?20"):
        kernels.cross_entropy(x, torch.tensor([1, 2, 3, 4, 200]).to(dtype) if dtype != torch.int8 else
                              torch.tensor([1, 2, 3, 4, 120], dtype=dtype), ignore_index=-100)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_strided_targets_give_torchs_loss(reduction, backend):
    # A 1-D target that is a column of a wider tensor (stride 2): reshape(-1) keeps it strided, and
    # the kernel must still read each row's own target, not every other one.
    torch.manual_seed(0)
    C = 11
    target = torch.randint(0, C, (6, 2))[:, 1]
    target[2] = IGNORE
    assert target.stride() == (2,)
    x = torch.randn(6, C, requires_grad=True)
    w = torch.randn(C, 8) / 3
    h = torch.randn(6, 8, requires_grad=True)
    with kernels.use_backend(backend):
        for name, got, want, leaf in (
            ("cross_entropy", kernels.cross_entropy(x, target, reduction=reduction),
             torch_cross_entropy(x, target, reduction=reduction), x),
            ("linear_cross_entropy", kernels.linear_cross_entropy(h, w, target, reduction=reduction, chunk_size=4),
             torch_cross_entropy(h @ w.t(), target, reduction=reduction), h),
        ):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{name} loss")
            g_got, = torch.autograd.grad(got.sum(), leaf)
            g_want, = torch.autograd.grad(want.sum(), leaf)
            torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-6, msg=f"{name} gradient")


def test_uint64_targets_are_a_clear_error():
    x = torch.randn(2, 5)
    for fn in (lambda t: kernels.cross_entropy(x, t), lambda t: kernels.linear_cross_entropy(x, torch.randn(3, 5), t)):
        with pytest.raises(TypeError, match="target .*uint64"):
            fn(torch.tensor([1, 2], dtype=torch.uint64))


def test_bad_input_cross_entropy():
    x = torch.randn(4, 10)
    t = torch.tensor([1, 2, 3, IGNORE])
    with pytest.raises(TypeError, match="target"):
        kernels.cross_entropy(x, t.float())
    with pytest.raises(ValueError, match="target"):
        kernels.cross_entropy(x, t[:3])
    with pytest.raises(ValueError, match="weight"):
        kernels.cross_entropy(x, t, torch.ones(9))
    with pytest.raises(TypeError, match="input"):
        kernels.cross_entropy(x.long(), t)
    for bad in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match="label_smoothing"):
            kernels.cross_entropy(x, t, label_smoothing=bad)
    with pytest.raises(ValueError, match="reduction"):
        kernels.cross_entropy(x, t, reduction="avg")
    with pytest.raises(ValueError, match="z_loss"):
        kernels.cross_entropy(x, t, z_loss=-1.0)
    with pytest.raises(TypeError, match="return_z_loss must be a bool"):
        kernels.cross_entropy(x, t, return_z_loss=1)
    for bad_softcap in (-30.0, float("inf"), float("nan"), True, "30"):
        with pytest.raises(ValueError, match="softcap must be None .off., 0 .off. or a finite number > 0"):
            kernels.cross_entropy(x, t, softcap=bad_softcap)
    for bad_target in (10, -1):
        with pytest.raises(ValueError, match=r"target .*outside \[0, 10\)"):
            kernels.cross_entropy(x, torch.tensor([1, 2, bad_target, IGNORE]))
    with pytest.raises(ValueError, match="device"):
        kernels.cross_entropy(x, t.to("meta"))
    with pytest.raises(ValueError, match="at least one class"):
        kernels.cross_entropy(torch.randn(4, 0), t)
    # The opt-out skips the range check; ignore_index itself is never out of range.
    kernels.cross_entropy(x, torch.tensor([1, 2, 10, IGNORE]), check_targets=False)
    kernels.cross_entropy(x, torch.tensor([1, 2, 7, 7]), ignore_index=7)


def test_bad_input_linear_cross_entropy():
    x, w, b, t = linear_inputs(4, 6, 10)
    lce = kernels.linear_cross_entropy
    with pytest.raises(ValueError, match="weight"):
        lce(x, torch.randn(10, 7), t)
    with pytest.raises(ValueError, match="bias"):
        lce(x, w, t, torch.randn(11))
    with pytest.raises(TypeError, match="weight"):
        lce(x, w.double(), t)
    with pytest.raises(TypeError, match="target"):
        lce(x, w, t.float())
    with pytest.raises(ValueError, match="target"):
        lce(x, w, t[:2])
    with pytest.raises(ValueError, match="label_smoothing"):
        lce(x, w, t, label_smoothing=2.0)
    with pytest.raises(ValueError, match="chunk_size"):
        lce(x, w, t, chunk_size=0)
    with pytest.raises(ValueError, match="softcap"):
        lce(x, w, t, softcap=-1.0)
    with pytest.raises(ValueError, match=r"class_weight must have shape \(10,\)"):
        lce(x, w, t, class_weight=torch.ones(9))
    with pytest.raises(TypeError, match="class_weight"):
        lce(x, w, t, class_weight=torch.ones(10, dtype=torch.long))
    with pytest.raises(ValueError, match="target"):
        lce(x, w, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="device"):
        lce(x, w.to("meta"), t)


def test_compile_specs_cover_every_launch_config():
    specs = ce_module.compile_specs()
    fwd = {(s.constexprs["BLOCK_C"], s.constexprs["ONE_PASS"], s.num_warps, s.num_stages)
           for s in specs if s.name == "_ce_fwd_kernel"}
    scale = {(s.constexprs["BLOCK_C"], s.num_warps) for s in specs if s.name == "_ce_scale_kernel"}
    for C in [1, 2, 7, 16, 17, 100, 1000, 2048, 2049, 4096, 5000, 8192, 8193, 50257, 128256, 262144, 1 << 20]:
        assert ce_module._fwd_config(C) in fwd, C
        assert ce_module._scale_config(C) in scale, C


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("C", [32000, 128256])
def test_gpu_large_vocab_bf16(C):
    torch.manual_seed(0)
    logits = torch.randn(512, C, device="cuda") * 3
    t = make_targets((512,), C).cuda()
    check_ce(logits, t, torch.bfloat16, name="gpu", label_smoothing=0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_linear(dtype):
    x, w, b, t = (v.cuda() if v is not None else None for v in linear_inputs(1000, 1000, 32000))
    check_linear(x, w, b, t, dtype, reduction="mean", chunk_size=256)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOWP)
def test_gpu_linear_low_precision_logits_stay_fp32(dtype):
    # cuBLAS's fp32-output GEMM (out_dtype) path, which CPUs do not have; the softcap and
    # class weights with it, against the naive loss.
    x, w, b, t = (v.cuda().to(dtype) if v.is_floating_point() else v.cuda() for v in linear_inputs(333, 256, 5000))
    check_fp32_logits(x, w, b, t)
    check_linear(x, w, b, t, dtype, reduction="sum", chunk_size=100, softcap=30.0, class_weight=torch.rand(5000).cuda())


# ----------------------------------------------------------------------------- double backward


def _ce_second_order(fn, x, t):
    (gx,) = torch.autograd.grad(fn(x, t), x, create_graph=True)
    return torch.autograd.grad(gx.square().sum(), x)[0]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_double_backward_is_an_error_on_triton_and_exact_on_reference(reduction):
    torch.manual_seed(0)
    x = torch.randn(4, 9, requires_grad=True)
    t = torch.tensor([1, IGNORE, 8, 0])

    def ours(x, t):
        return kernels.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1).sum()

    with kernels.use_backend("triton"):
        with pytest.raises(RuntimeError, match=r"kernels\.cross_entropy \(Triton backend\) does not support double "
                                               r"backward \(create_graph=True\)"):
            _ce_second_order(ours, x, t)
    with kernels.use_backend("reference"):
        want = _ce_second_order(lambda x, t: F.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1).sum(), x, t)
        torch.testing.assert_close(_ce_second_order(ours, x, t), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_double_backward_is_a_clear_error(reduction, backend):
    # Both backends share the chunk loop, whose gradients are computed outside autograd.
    x, w, b, t = linear_inputs(6, 8, 20)
    x.requires_grad_(), w.requires_grad_()
    with kernels.use_backend(backend):
        with pytest.raises(RuntimeError, match=r"linear_cross_entropy does not support double backward "
                                               r"\(create_graph=True\)"):
            loss = kernels.linear_cross_entropy(x, w, t, b, reduction=reduction).sum()
            gx, gw = torch.autograd.grad(loss, (x, w), create_graph=True)
            torch.autograd.grad(gx.square().sum() + gw.square().sum(), (x, w))


def test_ignore_index_outside_int64_is_a_clear_error():
    x, t = torch.randn(3, 5), torch.tensor([1, 2, 3])
    for fn in (lambda: kernels.cross_entropy(x, t, ignore_index=2**70),
               lambda: kernels.linear_cross_entropy(x, torch.randn(4, 5), t, ignore_index=-(2**64))):
        with pytest.raises(ValueError, match="ignore_index must fit in int64"):
            fn()
