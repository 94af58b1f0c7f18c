"""Packed sequences (varlen), sliding windows, softcapping and sinks: kernels and references vs an oracle.

The oracle loops over the sequences in plain PyTorch with the masks built
explicitly (flash-attention's conventions, written out independently of
:mod:`kernels.reference.attention`). The kernel tests run through the public
functions (the interpreter on CPU) and are judged by FlashAttention's rule
(kernels/numerics.py): forward and every gradient, dsinks included.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import kernels
from kernels import reference
from kernels.numerics import assert_close_to_ref, factor

from helpers import DEVICE, attention_kernels_launched

attention_module = importlib.import_module("kernels.attention")
HIGH = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.float32: torch.float64}


# ----------------------------------------------------------------------------- the oracle


def oracle_sequence(q, k, v, *, causal, scale, window_size, softcap, sinks):
    """One sequence, (n, heads, D) tensors: explicit masks, torch.softmax over the scores and the sink."""
    nq, nk = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    left, right = window_size
    if causal:
        right = 0
    i = torch.arange(nq, device=q.device)[:, None] + nk - nq  # bottom-right: row i's diagonal key
    j = torch.arange(nk, device=q.device)[None, :]
    mask = torch.ones(nq, nk, dtype=torch.bool, device=q.device)
    if right >= 0:
        mask &= j <= i + right
    if left >= 0:
        mask &= j >= i - left
    scores = scores.masked_fill(~mask, float("-inf"))
    extra = (torch.zeros if sinks is None else lambda *s, **kw: sinks.to(scores.dtype).view(-1, 1, 1).expand(*s))(
        q.shape[1], nq, 1, dtype=scores.dtype, device=q.device)
    if sinks is None:
        extra = torch.full_like(extra, float("-inf"))
    full = torch.cat([scores, extra], -1)
    seen = mask.any(-1)[None, :, None]
    p = torch.softmax(torch.where(seen, full, 0.0), -1)[..., :nk] * seen
    lse = torch.where(seen[..., 0], torch.logsumexp(torch.where(seen, full, 0.0), -1), float("-inf"))
    return torch.einsum("hqk,khd->qhd", p.to(v.dtype), v), lse


def oracle(q, k, v, lens_q, lens_k, *, causal=False, scale=None, window_size=(-1, -1), softcap=0.0, sinks=None):
    """Packed (total, heads, D) tensors: one oracle_sequence per sequence; lse (heads, total_q)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs, lses, sq, sk = [], [], 0, 0
    for nq, nk in zip(lens_q, lens_k):
        o, l = oracle_sequence(q[sq:sq + nq], k[sk:sk + nk], v[sk:sk + nk], causal=causal, scale=scale,
                               window_size=window_size, softcap=softcap, sinks=sinks)
        outs.append(o), lses.append(l)
        sq, sk = sq + nq, sk + nk
    return torch.cat(outs), torch.cat(lses, 1)


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def _packed(lens_q, lens_k, H, Hkv, D, dtype, scale_by=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), H, D, generator=g) * scale_by
    k = torch.randn(sum(lens_k), Hkv, D, generator=g) * scale_by
    v = torch.randn(sum(lens_k), Hkv, D, generator=g)
    do = torch.randn(sum(lens_q), H, D, generator=g)
    dlse = torch.randn(H, sum(lens_q), generator=g)
    sinks = torch.randn(H, generator=g)
    return [t.to(DEVICE, dtype) for t in (q, k, v, do)] + [dlse.to(DEVICE), sinks.to(DEVICE)]


# ----------------------------------------------------------------------------- the references vs the oracle


REF_CASES = [  # lens_q, lens_k, causal, window, softcap, sinks
    ([5, 0, 1, 9], [5, 3, 1, 12], True, (-1, -1), 0.0, True),
    ([7, 4], [7, 9], False, (2, 1), 0.0, False),
    ([6, 6], [6, 6], True, (3, -1), 2.0, True),
    ([3, 8], [10, 8], False, (-1, 0), 5.0, False),
    ([4, 0], [0, 2], False, (0, 0), 0.0, True),
]


@pytest.mark.parametrize("lens_q,lens_k,causal,window,softcap,use_sinks", REF_CASES)
def test_references_match_the_oracle(lens_q, lens_k, causal, window, softcap, use_sinks):
    q, k, v, do, dlse, sinks = _packed(lens_q, lens_k, 4, 2, 8, torch.float64)
    sinks = sinks.double() if use_sinks else None
    kw = dict(causal=causal, window_size=window, softcap=softcap, sinks=sinks)
    want_out, want_lse = oracle(q, k, v, lens_q, lens_k, **kw)
    out, lse = reference.varlen_attention(q, k, v, _cu(lens_q), _cu(lens_k), **kw, return_lse=True)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)
    # The ops' block-diagonal twin (what fake tensors and the CPU op run) agrees too.
    with kernels.use_backend("reference"):
        left, right = reference.attention.__globals__["window_bounds"](causal, window)
        twin = attention_module._varlen_op(q, k, v, _cu(lens_q), _cu(lens_k), max(lens_q), max(lens_k), 8 ** -0.5,
                                           left, right, softcap, sinks)
    torch.testing.assert_close(twin[0], want_out)
    torch.testing.assert_close(twin[1], want_lse.float())
    if len(set(lens_q)) == 1 and lens_q == lens_k:  # equal lengths: the dense call on the batch is the same
        B, n = len(lens_q), lens_q[0]
        dense = [t.view(B, n, *t.shape[1:]).transpose(1, 2) for t in (q, k, v)]
        d_out, d_lse = reference.attention(*dense, **kw, return_lse=True)
        torch.testing.assert_close(d_out.transpose(1, 2).reshape(out.shape), want_out)
        torch.testing.assert_close(d_lse.transpose(0, 1).reshape(lse.shape), want_lse)


# ----------------------------------------------------------------------------- bad input


def _varlen_args():
    q, k, v = torch.randn(9, 4, 16), torch.randn(11, 2, 16), torch.randn(11, 2, 16)
    return dict(q=q, k=k, v=v, cu_seqlens_q=torch.tensor([0, 4, 9], dtype=torch.int32),
                cu_seqlens_k=torch.tensor([0, 6, 11], dtype=torch.int32))


VARLEN_BAD = {
    "cu int64": (dict(cu_seqlens_q=torch.tensor([0, 4, 9])), TypeError, "cu_seqlens_q must be an int32 tensor"),
    "cu float": (dict(cu_seqlens_k=torch.tensor([0.0, 6, 11])), TypeError, "cu_seqlens_k must be an int32"),
    "cu 2-D": (dict(cu_seqlens_q=torch.tensor([[0, 4, 9]], dtype=torch.int32)), ValueError,
               "cu_seqlens_q must be 1-D"),
    "cu empty": (dict(cu_seqlens_q=torch.zeros(0, dtype=torch.int32), cu_seqlens_k=torch.zeros(0, dtype=torch.int32)),
                 ValueError, "cu_seqlens_q must be 1-D of length batch"),
    "cu lengths differ": (dict(cu_seqlens_k=torch.tensor([0, 11], dtype=torch.int32)), ValueError,
                          "cu_seqlens_k has 2 entries but cu_seqlens_q has 3"),
    "cu unsorted": (dict(cu_seqlens_q=torch.tensor([0, 6, 4, 9], dtype=torch.int32),
                         cu_seqlens_k=torch.tensor([0, 3, 6, 11], dtype=torch.int32)), ValueError,
                    "cu_seqlens_q must be sorted"),
    "cu start": (dict(cu_seqlens_k=torch.tensor([1, 6, 11], dtype=torch.int32)), ValueError,
                 "cu_seqlens_k must start at 0"),
    "cu last": (dict(cu_seqlens_q=torch.tensor([0, 4, 8], dtype=torch.int32)), ValueError,
                "cu_seqlens_q must end at the total token count 9"),
    "cu not a tensor": (dict(cu_seqlens_q=[0, 4, 9]), TypeError, "cu_seqlens_q must be a torch.Tensor"),
    "max_seqlen small": (dict(max_seqlen_q=4), ValueError, r"max_seqlen_q \(4\) is less than the longest .* \(5\)"),
    "max_seqlen negative": (dict(max_seqlen_k=-1), ValueError, "max_seqlen_k must be None or an int >= 0"),
    "q 4-D": (dict(q=torch.randn(1, 9, 4, 16)), ValueError, r"q must be 3-D \(total_tokens, heads, head_dim\)"),
    "kv heads": (dict(k=torch.randn(11, 3, 16), v=torch.randn(11, 3, 16)), ValueError, "multiple of k/v heads"),
    "v tokens": (dict(v=torch.randn(10, 2, 16)), ValueError, "v must have the heads and sequence length of k"),
}
FEATURE_BAD = {
    "window below -1": (dict(window_size=(-2, 0)), ValueError, "window_size must be \\(left, right\\)"),
    "window not a pair": (dict(window_size=4), ValueError, "window_size must be"),
    "window float": (dict(window_size=(1.5, 0)), ValueError, "window_size must be"),
    "softcap negative": (dict(softcap=-1.0), ValueError, "softcap must be a finite number >= 0"),
    "softcap nan": (dict(softcap=float("nan")), ValueError, "softcap must be"),
    "sinks shape": (dict(sinks=torch.zeros(2)), ValueError, r"sinks must have shape \(heads,\) = \(4,\)"),
    "sinks dtype": (dict(sinks=torch.zeros(4, dtype=torch.int32)), TypeError, "sinks must be float32"),
    "sinks device": (dict(sinks=torch.zeros(4, device="meta")), ValueError, "sinks is on meta"),
}


@pytest.mark.parametrize("case", list(VARLEN_BAD) + list(FEATURE_BAD))
def test_varlen_bad_input(case):
    changes, error, match = (VARLEN_BAD | FEATURE_BAD)[case]
    args = _varlen_args() | changes
    with pytest.raises(error, match=match):
        kernels.varlen_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("cu_seqlens_q"),
                                 args.pop("cu_seqlens_k"), **args)


@pytest.mark.parametrize("case", list(FEATURE_BAD))
def test_dense_bad_features(case):
    changes, error, match = FEATURE_BAD[case]
    with pytest.raises(error, match=match):
        kernels.attention(torch.randn(2, 4, 8, 16), torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16), **changes)


def test_unchecked_skips_the_value_checks_and_syncs():
    # Inside kernels.unchecked() a bad last entry is not read (no host sync); shapes still are.
    args = _varlen_args() | dict(cu_seqlens_q=torch.tensor([0, 4, 9], dtype=torch.int32))
    with kernels.unchecked():
        out = kernels.varlen_attention(*args.values(), max_seqlen_q=5, max_seqlen_k=6)
        assert out.shape == (9, 4, 16)
        with pytest.raises(TypeError, match="cu_seqlens_q must be an int32"):
            kernels.varlen_attention(*(args | dict(cu_seqlens_q=args["cu_seqlens_q"].long())).values())


# ----------------------------------------------------------------------------- kernels vs the reference


def _run(fn, tensors, grad_outs):
    """(out, lse, grads of every tensor) of ``fn(*tensors)`` for upstream gradients (dout, dlse)."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in tensors]
    out, lse = fn(*leaves)
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad((out, lse), present, [g.to(o.dtype) for g, o in zip(grad_outs, (out, lse))])
    return (out.detach(), lse.detach(), *grads)


def _assert_rule(got, high, low, names):
    for name, a, hi, lo in zip(names, got, high, low):
        if name == "lse":  # rows that see no key: -inf in all three, the rest by the rule
            assert torch.equal(torch.isinf(a), torch.isinf(hi)), "lse: rows without keys differ"
            assert (a[torch.isinf(a)] < 0).all()
            a, hi, lo = (t[torch.isfinite(hi)] for t in (a, hi, lo))
        assert a.dtype == lo.dtype, name
        assert_close_to_ref(a, hi, lo, factor=factor("attention", gradient=name not in ("out", "lse")), name=name)


def check_varlen(lens_q, lens_k, H, Hkv, D, dtype, *, causal=False, window_size=(-1, -1), softcap=0.0,
                 use_sinks=False, scale_by=1.0, seed=0, **kw):
    """kernels.varlen_attention vs the reference by FlashAttention's rule: out, lse, dq, dk, dv (and dsinks)."""
    q, k, v, do, dlse, sinks = _packed(lens_q, lens_k, H, Hkv, D, dtype, scale_by=scale_by, seed=seed)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    opts = dict(causal=causal, window_size=window_size, softcap=softcap, return_lse=True)

    def call(impl):
        return lambda q, k, v, s=None: impl(q, k, v, cu_q, cu_k, **kw, **opts, sinks=s)

    tensors = (q, k, v, sinks if use_sinks else None)
    got = _run(call(kernels.varlen_attention), tensors, (do, dlse))
    high = _run(call(reference.varlen_attention), [None if t is None else t.to(HIGH[dtype]) for t in tensors[:3]]
                + [None if not use_sinks else sinks.to(HIGH[dtype])], (do.to(HIGH[dtype]), dlse))
    low = _run(call(reference.varlen_attention), tensors, (do, dlse))
    _assert_rule(got, high, low, ("out", "lse", "dq", "dk", "dv", "dsinks"))
    return got


VARLEN_CASES = {  # lens_q, lens_k, H, Hkv, D, options
    "block-edges-causal": ([0, 1, 127, 128, 129], [0, 1, 127, 128, 129], 2, 1, 32, dict(causal=True)),
    "q!=k-causal-window": ([1, 127, 129, 0], [3, 128, 100, 5], 2, 2, 64, dict(causal=True, window_size=(16, 0))),
    "window-both-softcap-sinks": ([70, 100], [70, 100], 2, 1, 40,
                                  dict(window_size=(16, 16), softcap=5.0, use_sinks=True)),
    "right-window-sinks": ([65, 31], [65, 31], 2, 1, 16, dict(window_size=(-1, 8), use_sinks=True)),
    "window-0-0": ([50, 77], [50, 77], 2, 2, 16, dict(window_size=(0, 0))),
    "full": ([33, 0, 70], [40, 7, 70], 4, 2, 24, dict()),
}


@pytest.mark.parametrize("case", list(VARLEN_CASES))
def test_varlen_fp16_matches_reference(case):
    lens_q, lens_k, H, Hkv, D, opts = VARLEN_CASES[case]
    check_varlen(lens_q, lens_k, H, Hkv, D, torch.float16, **opts)


def test_varlen_fp32_every_feature():
    check_varlen([33, 0, 70], [33, 5, 70], 2, 1, 24, torch.float32, causal=True, window_size=(20, 0), softcap=2.0,
                 use_sinks=True)


def test_packed_rows_past_int32_offsets_run_on_head_major_copies(monkeypatch):
    # Packed (total, heads, head_dim) rows lie heads * head_dim apart, and the kernels' offsets inside
    # one sequence's head are int32: past 2**31 - 1 (here lowered to these sizes) inputs and outputs
    # go head-major for the launch; the results come back in the usual layout.
    monkeypatch.setattr(importlib.import_module("kernels.attention"), "_MAX_OFFSET", 70 * 24)
    out, lse, dq, dk, dv, _ = check_varlen([33, 0, 70], [33, 5, 70], 4, 2, 24, torch.float32, causal=True,
                                          use_sinks=True)
    assert all(t.is_contiguous() for t in (out, dq, dk, dv))


def test_softcap_with_scores_near_1e4():
    # Scores of ~1e4 saturate the tanh: the capped softmax and its gradient stay finite and exact.
    check_varlen([40, 61], [40, 61], 2, 1, 16, torch.float32, causal=True, softcap=30.0, use_sinks=True,
                 scale_by=100.0)


def test_varlen_without_max_seqlen_inside_unchecked():
    # No host sync: the grid covers the totals and the programs past each sequence return.
    lens = [5, 70, 0, 19]
    q, k, v, *_ = _packed(lens, lens, 2, 1, 16, torch.float32)
    cu = _cu(lens)
    want = kernels.varlen_attention(q, k, v, cu, cu, causal=True, window_size=(8, 0))
    with kernels.unchecked():
        got = kernels.varlen_attention(q, k, v, cu, cu, causal=True, window_size=(8, 0))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ----------------------------------------------------------------------------- the banded twin (one packing)


BAND_LENS = [0, 5, 1, 8, 8, 3, 0, 7, 2]  # 34 tokens (not a multiple of M = 8), lengths 0, 1 and M
BAND_CASES = {  # H, Hkv, max_seqlen, options
    "causal-gqa-sinks": (4, 2, 8, dict(causal=True, sinks=True)),
    "window-softcap": (2, 2, 8, dict(window_size=(2, 1), softcap=3.0)),
    "causal-window-sinks-loose-max": (4, 1, 10, dict(causal=True, window_size=(3, 0), sinks=True)),
    "full": (2, 1, 8, dict()),
}


@pytest.mark.parametrize("case", list(BAND_CASES))
def test_banded_twin_matches_the_loop_reference(case):
    # One cu_seqlens tensor for q and k (the trainer's document mask) and a max_seqlen M: under
    # kernels.unchecked() the reference backend attends blockwise (M queries against 3M keys)
    # and must give the per-sequence loop's results and gradients, forward and backward ops too.
    H, Hkv, M, opts = BAND_CASES[case]
    q, k, v, do, dlse, sinks = _packed(BAND_LENS, BAND_LENS, H, Hkv, 8, torch.float32)
    cu = _cu(BAND_LENS)
    opts = dict(opts, sinks=sinks if opts.get("sinks") else None)
    tensors = (q, k, v, opts.pop("sinks"))

    def call(q, k, v, s=None):
        return kernels.varlen_attention(q, k, v, cu, cu, M, M, **opts, sinks=s, return_lse=True)

    with kernels.use_backend("reference"):
        want = _run(call, tensors, (do, dlse))  # checked: the per-sequence loop
        with kernels.unchecked():
            got = _run(call, tensors, (do, dlse))
        left, right = reference.attention.__globals__["window_bounds"](opts.get("causal", False),
                                                                       opts.get("window_size", (-1, -1)))
        args = (M, M, 8 ** -0.5, left, right, opts.get("softcap", 0.0), tensors[3])
        out, lse = attention_module._varlen_op(q, k, v, cu, cu, *args)
        grads = attention_module._varlen_backward_op(do, dlse, q, k, v, out, lse, cu, cu, *args)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv", "dsinks"), got, want):
        torch.testing.assert_close(a, b, msg=name)
    torch.testing.assert_close(out, want[0])
    torch.testing.assert_close(lse, want[1])
    for name, a, b in zip(("dq", "dk", "dv", "dsinks"), grads, want[2:]):
        torch.testing.assert_close(a, b, msg=name)


def test_banded_twin_memory_is_linear_in_the_total(monkeypatch):
    # 16 rows of T = 8 tokens flattened (model.py's document mask): every mask the reference
    # builds covers at most (total + M) x 3M, not total x total (16x the dense attention).
    lens, M = [3, 5] * 16, 8
    total = sum(lens)
    q, k, v, do, dlse, _ = _packed(lens, lens, 2, 1, 8, torch.float32)
    cu = _cu(lens)
    sizes = []

    def spy(fn):
        def wrapper(*args, **kw):
            sizes.append(next(a for a in args if isinstance(a, torch.Tensor) and a.dtype == torch.bool).numel())
            return fn(*args, **kw)
        return wrapper

    monkeypatch.setattr(attention_module, "masked_attention", spy(attention_module.masked_attention))
    monkeypatch.setattr(attention_module, "_attention_backward_reference",
                        spy(attention_module._attention_backward_reference))
    with kernels.use_backend("reference"):
        with kernels.unchecked():
            kernels.varlen_attention(q, k, v, cu, cu, M, M, causal=True)
        out, lse = attention_module._varlen_op(q, k, v, cu, cu, M, M, 0.3, -1, 0, 0.0, None)
        attention_module._varlen_backward_op(do, dlse, q, k, v, out, lse, cu, cu, M, M, 0.3, -1, 0, 0.0, None)
    assert len(sizes) == 3 and max(sizes) <= (total + M) * 3 * M, sizes


def check_dense(B, H, Hkv, Nq, Nk, D, dtype, *, kv_lens=None, use_sinks=False, seed=0, **opts):
    """kernels.attention with the new features vs the reference: out, lse and every gradient."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(B, h, n, D, generator=g).to(DEVICE, dtype)
                   for h, n in ((H, Nq), (Hkv, Nk), (Hkv, Nk), (H, Nq)))
    dlse = torch.randn(B, H, Nq, generator=g).to(DEVICE)
    sinks = torch.randn(H, generator=g).to(DEVICE) if use_sinks else None

    def call(impl):
        return lambda q, k, v, s=None: impl(q, k, v, kv_lens=kv_lens, sinks=s, return_lse=True, **opts)

    got = _run(call(kernels.attention), (q, k, v, sinks), (do, dlse))
    high = _run(call(reference.attention), [None if t is None else t.to(HIGH[dtype]) for t in (q, k, v, sinks)],
                (do.to(HIGH[dtype]), dlse))
    low = _run(call(reference.attention), (q, k, v, sinks), (do, dlse))
    _assert_rule(got, high, low, ("out", "lse", "dq", "dk", "dv", "dsinks"))
    return got


def test_batches_past_the_grid_limit_launch_in_runs(monkeypatch):
    # The kernels put the batch (the sequences, when packed) on the grid's z dimension, at most
    # 65535 on CUDA: a longer batch launches in runs (here of 2, standing in for 65535), and every
    # run's rows, lse, gradients and dsinks partials land where one launch would put them.
    monkeypatch.setattr(importlib.import_module("kernels.attention"), "_MAX_GRID_BATCH", 2)
    forwards = attention_kernels_launched(monkeypatch, "fwd")
    check_dense(5, 2, 1, 20, 30, 16, torch.float32, kv_lens=torch.tensor([30, 3, 0, 17, 30], device=DEVICE),
                use_sinks=True, causal=True)
    check_dense(3, 2, 2, 20, 20, 16, torch.float16, causal=True)  # 16-bit: the TMA kernels where they run
    check_varlen([9, 0, 20, 1, 13], [9, 4, 20, 3, 13], 2, 1, 16, torch.float32, causal=True, use_sinks=True)
    assert len(forwards) == 3 + 2 + 3  # runs of 2 of the batches of 5, 3 and 5 (the reference launches none)


def test_strided_sinks():
    # sinks as a column of a (heads, layers) parameter (stride 3): each head reads its own sink
    # and its gradient reaches that column.
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 9, 16, generator=g).to(DEVICE) for h in (4, 2, 2))
    table = torch.randn(4, 3, generator=g).to(DEVICE)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE)
    packed = [t[0].transpose(0, 1) for t in (q, k, v)]
    for name, fn, ref in (
        ("dense", lambda s: kernels.attention(q, k, v, causal=True, sinks=s),
         lambda s: reference.attention(q, k, v, causal=True, sinks=s)),
        ("packed", lambda s: kernels.varlen_attention(*packed, cu, cu, causal=True, sinks=s),
         lambda s: reference.varlen_attention(*packed, cu, cu, causal=True, sinks=s)),
    ):
        grads = []
        for impl in (fn, ref):
            leaf = table.clone().requires_grad_()
            out = impl(leaf[:, 1])
            out.square().sum().backward()
            grads.append((out.detach(), leaf.grad))
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5, msg=name)


DENSE_CASES = {  # B, H, Hkv, Nq, Nk, D, dtype, options
    "d256-causal-window-softcap-sinks": (1, 2, 1, 65, 65, 256, torch.float16,
                                         dict(causal=True, window_size=(32, 0), softcap=10.0, use_sinks=True)),
    "d128-gqa-window-both-sinks": (1, 4, 2, 100, 150, 128, torch.float16, dict(window_size=(40, 40), use_sinks=True)),
    "kv_lens-right-window-softcap": (2, 2, 1, 70, 90, 32, torch.float32,
                                     dict(window_size=(-1, 5), softcap=4.0, kv_lens=torch.tensor([90, 40]))),
    "causal-Nq>Nk-window": (2, 2, 2, 90, 50, 16, torch.float16, dict(causal=True, window_size=(7, 3))),
}


@pytest.mark.parametrize("case", list(DENSE_CASES))
def test_dense_features_match_reference(case):
    *shape, dtype, opts = DENSE_CASES[case]
    if "kv_lens" in opts:
        opts = opts | dict(kv_lens=opts["kv_lens"].to(DEVICE))
    check_dense(*shape, dtype, **opts)


def test_dense_pointer_forward_with_features(monkeypatch):
    # fp16 takes the TMA forward and dQ where strides allow; sm_80 and odd strides run the pointer kernels.
    monkeypatch.setattr(attention_module, "_tma_qualifies", lambda *tensors: False)
    check_dense(1, 4, 2, 80, 97, 32, torch.float16, causal=True, window_size=(20, 0), softcap=3.0, use_sinks=True)


def test_tma_dq_with_every_dense_feature(monkeypatch):
    # kv_lens (a key tile half padding), a window whose left edge cuts key tiles, softcap, sinks and
    # the lse's gradient, GQA, Nq != Nk: the TMA dQ against the reference, dsinks included.
    kinds = attention_kernels_launched(monkeypatch, "dq")
    check_dense(2, 4, 2, 97, 129, 32, torch.float16, kv_lens=torch.tensor([129, 50], device=DEVICE), causal=True,
                window_size=(40, 0), softcap=5.0, use_sinks=True)
    assert set(kinds) == {"dq_tma"}


@pytest.mark.parametrize("specialize", [False, True], ids=["boundary-masked", "warp-specialized"])
def test_tma_forward_windows(monkeypatch, specialize):
    if DEVICE != "cpu":
        pytest.skip("tile shapes are autotuned on a GPU")
    monkeypatch.setitem(attention_module._INTERPRET, "fwd_tma", attention_module.TileConfig(32, 16, 4, 1, specialize))
    check_dense(1, 2, 1, 70, 97, 16, torch.float16, window_size=(20, 9), use_sinks=True)


def test_small_tiles_window_edges(monkeypatch):
    # Windows narrower and wider than a tile, with BLOCK_M != BLOCK_N: the loop bounds and edge masks.
    if DEVICE != "cpu":
        pytest.skip("tile shapes are autotuned on a GPU")
    cfg = attention_module.TileConfig
    for kind, c in (("fwd", cfg(16, 32, 4, 1)), ("dkdv", cfg(32, 16, 4, 1)), ("dq", cfg(16, 32, 4, 1))):
        monkeypatch.setitem(attention_module._INTERPRET, kind, c)
    check_varlen([45, 3, 40], [50, 3, 40], 1, 1, 16, torch.float32, causal=True, window_size=(5, 0), use_sinks=True)
    check_varlen([35, 50], [50, 35], 1, 1, 16, torch.float32, window_size=(40, 2))


@pytest.mark.gpu  # the interpreter runs one program at a time: only a GPU can race
def test_backward_with_sinks_is_deterministic():
    lens = [30, 50]
    q, k, v, do, dlse, sinks = _packed(lens, lens, 2, 1, 16, torch.float16)
    cu = _cu(lens)

    def run():
        return _run(lambda q, k, v, s: kernels.varlen_attention(q, k, v, cu, cu, causal=True, window_size=(9, 0),
                                                                softcap=5.0, sinks=s, return_lse=True),
                    (q, k, v, sinks), (do, dlse))

    first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_dsinks_partials_fit_every_dq_tile():
    # The dsinks partials are sized for BLOCK_M >= _MIN_BLOCK_M: every configuration must respect it.
    tiles = [attention_module._INTERPRET["dq"], attention_module._INTERPRET["dq_tma"]]
    for dtype, family in ((torch.float16, "sm90"), (torch.float16, "sm80"), (torch.float32, "sm90")):
        for block_d in (16, 64, 128, 256):
            for features in (False, True):  # sinks always take the feature table
                for kind in ("dq", "dq_tma"):
                    tiles += attention_module.gpu_configs(kind, block_d, dtype, family, features)
    assert any(c.block_m == 128 for c in attention_module.gpu_configs("dq_tma", 128, torch.float16, "sm90"))
    assert min(c.block_m for c in tiles) >= attention_module._MIN_BLOCK_M


def test_nn_attention_passes_the_features():
    q, k, v, *_ = _packed([20], [20], 2, 1, 16, torch.float32)
    dense = [t.transpose(0, 1)[None] for t in (q, k, v)]
    sinks = torch.randn(2, device=DEVICE)
    layer = kernels.nn.Attention(causal=True, window_size=(4, 0), softcap=3.0)
    want = kernels.attention(*dense, causal=True, window_size=(4, 0), softcap=3.0, sinks=sinks)
    torch.testing.assert_close(layer(*dense, sinks=sinks), want, rtol=0, atol=0)
    assert "window_size=(4, 0)" in repr(layer)


class _NoLaunch:
    """A launcher stand-in: ``kernel[grid](*args)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.mark.parametrize("feature", ["VARLEN", "WINDOW", "SOFTCAP", "HAS_SINKS"])
def test_gpu_launch_takes_the_feature_configs(monkeypatch, feature):
    # A call with a feature on autotunes over _FEATURE_CONFIGS_16BIT (the plain tiles may spill
    # then). The launcher's test read a same-named module global that the op schema rebinds.
    picked = []
    monkeypatch.setattr(attention_module, "_autotuned", lambda *args: picked.append(args) or "kernel")
    monkeypatch.setattr(attention_module, "launch", lambda kernel: _NoLaunch())
    monkeypatch.setattr(attention_module, "gpu_family", lambda device: "sm90")
    consts = {"HEAD_DIM": 128, "BLOCK_D": 128, "CAUSAL": True, "HAS_KV_LENS": False, "VARLEN": False,
              "WINDOW": False, "SOFTCAP": False, "HAS_SINKS": False, "_dtype": torch.bfloat16}
    attention_module._launch("dq", 256, 2, 1, (), consts | {feature: True}, torch.device("cuda"))
    assert picked == [("dq", 128, torch.bfloat16, "sm90", True)]


# ----------------------------------------------------------------------------- unchecked cu_seqlens stay in bounds


def _guarded(rows, heads, D, fill, guard=32):
    """(buffer, view): ``rows`` rows of zeros in the middle of a buffer whose ``guard`` rows on
    either side hold ``fill``; a kernel that reads the guard reads ``fill``."""
    buffer = torch.full((guard + rows + guard, heads, D), fill, dtype=torch.float32, device=DEVICE)
    view = buffer[guard:guard + rows]
    view.zero_()
    return buffer, view


def _guards(buffer, guard=32):
    return buffer[:guard], buffer[buffer.shape[0] - guard:]


MALFORMED_CU = {  # cu_seqlens_q, cu_seqlens_k (totals 6 and 7), max_seqlen_q, max_seqlen_k, options
    # Past the total, negative, unsorted, the last entry short of the total; the grid sized by the totals.
    "past-negative-unsorted-causal": ([0, 9, -3, 4, 2], [0, 3, 10, -5, 5], None, None, dict(causal=True)),
    # max_seqlen shorter than the malformed spans (so also than the grid the values claim), sinks, a window.
    "short-max-window-sinks": ([-4, 5, 2, 11, 6], [3, -2, 12, 7, 1], 3, 4, dict(window_size=(2, 1), sinks=True)),
}


@pytest.mark.parametrize("case", list(MALFORMED_CU))
def test_unchecked_malformed_cu_seqlens_stay_in_bounds(monkeypatch, case):
    # Inside kernels.unchecked() no value of cu_seqlens is checked (no sync): a malformed one gives an
    # undefined result but every row and key the kernels read or write stays inside q/k/v and the
    # outputs (each sequence's bounds clamped to [0, total] and its length to max_seqlen). q, k, v and
    # grad_out are views into buffers whose guard rows hold NaN (a read there turns a result NaN); o,
    # dq, dk, dv are made inside buffers whose guard rows hold a sentinel (a write there changes it),
    # zeros in between (rows that no clamped sequence covers stay finite). Before the clamp the
    # interpreter wrote past the lse and aborted, or a guard changed.
    cu_q, cu_k, max_q, max_k, opts = MALFORMED_CU[case]
    H, Hkv, D, total_q, total_k = 2, 1, 16, 6, 7
    g = torch.Generator().manual_seed(0)
    inputs = []
    for rows, heads in ((total_q, H), (total_k, Hkv), (total_k, Hkv), (total_q, H)):
        buffer, view = _guarded(rows, heads, D, float("nan"))
        view.copy_(torch.randn(rows, heads, D, generator=g).to(DEVICE))
        inputs.append((buffer, view))
    (_, q), (_, k), (_, v), (_, do) = inputs
    outputs = []

    def guarded_output(like, rows):
        buffer, view = _guarded(like.shape[0], like.shape[1], like.shape[2], 1234.5)
        outputs.append(buffer)
        return view.to(like.dtype)

    monkeypatch.setattr(attention_module, "_output", guarded_output)
    sinks = torch.randn(H, generator=g).to(DEVICE).requires_grad_() if opts.pop("sinks", False) else None
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    cu = [torch.tensor(c, dtype=torch.int32, device=DEVICE) for c in (cu_q, cu_k)]
    with kernels.unchecked():
        out = kernels.varlen_attention(q, k, v, *cu, max_seqlen_q=max_q, max_seqlen_k=max_k, sinks=sinks, **opts)
        grads = torch.autograd.grad(out, [t for t in (q, k, v, sinks) if t is not None], do)
    assert len(outputs) == 4  # o, then dq, dk, dv
    for buffer in outputs:
        for guard in _guards(buffer):
            assert (guard == 1234.5).all(), "a kernel wrote past its output's rows"
    for buffer, _ in inputs:
        for guard in _guards(buffer):
            assert guard.isnan().all(), "a kernel wrote into an input"
    for name, t in zip(("out", "dq", "dk", "dv", "dsinks"), (out, *grads)):
        assert not t.isnan().any(), f"{name}: a kernel read past its input's rows"
