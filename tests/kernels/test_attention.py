"""Fused attention against the reference: FlashAttention's rule, masks, GQA, strides, determinism, errors.

Without a GPU the Triton kernels run through the interpreter (fp32 and fp16:
the interpreter's bf16 dots are garbage, so bf16 is tested on a GPU). Shapes
are small and ragged; the case matrix pairs each (Nq, Nk) with one head dim and
one kv-head count instead of the full product, and targeted tests cover the rest.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import warnings

import pytest
import torch

import kernels
from kernels import reference
from kernels.attention import TileConfig
from kernels.numerics import assert_close_to_ref, factor

from helpers import DEVICE, HAS_GPU, ROOT, attention_kernels_launched

# The module (kernels.attention is the function of the same name).
attention_module = importlib.import_module("kernels.attention")

# The reference one step more precise than the kernel's dtype: fp32 for fp16/bf16 (the
# rule's "fp32 reference"), fp64 for fp32 so that fp32 is judged against torch's fp32 error.
HIGH = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.float32: torch.float64}


def _inputs(B, H, Hkv, Nq, Nk, D, dtype, scale_by=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, D, generator=g) * scale_by for h, n in ((H, Nq), (Hkv, Nk), (Hkv, Nk)))
    do = torch.randn(B, H, Nq, D, generator=g)
    return [t.to(DEVICE, dtype) for t in (q, k, v, do)]


def _grads(fn, q, k, v, do):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    return out.detach(), dq, dk, dv


def check_against_reference(q, k, v, do, *, causal=False, kv_lens=None, scale=None):
    """Kernel vs high-precision reference, within 2x (output) / 3x (grads) the same-dtype reference's error."""
    dtype = q.dtype
    kernel = _grads(lambda q, k, v: kernels.attention(q, k, v, causal=causal, kv_lens=kv_lens, scale=scale), q, k, v, do)

    def ref(q, k, v):
        return reference.attention(q, k, v, causal=causal, kv_lens=kv_lens, scale=scale)

    high = _grads(ref, *(t.to(HIGH[dtype]) for t in (q, k, v, do)))
    low = _grads(ref, q, k, v, do)
    for name, out, hi, lo in zip(("out", "dq", "dk", "dv"), kernel, high, low):
        assert out.dtype == dtype, name
        assert_close_to_ref(out, hi, lo, factor=factor("attention", gradient=name != "out"), name=name)
    return kernel


# (Nq, Nk) from the issue, each also swapped; each paired with a head dim and a kv-head count.
SHAPES = [
    (1, 1, 16, 4), (17, 17, 40, 2), (113, 203, 64, 1), (127, 513, 80, 4), (128, 128, 128, 2),
    (203, 113, 40, 4), (513, 127, 64, 2),
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("Nq,Nk,D,Hkv", SHAPES, ids=[f"{a}x{b}-d{d}-kv{h}" for a, b, d, h in SHAPES])
def test_fp16_matches_reference(Nq, Nk, D, Hkv, causal):
    check_against_reference(*_inputs(1, 4, Hkv, Nq, Nk, D, torch.float16), causal=causal)


@pytest.mark.parametrize("Nq,Nk,D,Hkv", SHAPES[1:5], ids=[f"{a}x{b}-d{d}-kv{h}" for a, b, d, h in SHAPES[1:5]])
def test_fp32_matches_reference(Nq, Nk, D, Hkv):
    check_against_reference(*_inputs(1, 4, Hkv, Nq, Nk, D, torch.float32), causal=True)


@pytest.mark.parametrize("D", [1, 16, 40, 64, 80, 96, 128, 256])
def test_head_dims(D):
    check_against_reference(*_inputs(1, 2, 1, 65, 97, D, torch.float16, seed=D), causal=True)


@pytest.mark.parametrize("Hkv", [4, 2, 1])
def test_grouped_query_heads(Hkv):
    check_against_reference(*_inputs(2, 4, Hkv, 77, 77, 32, torch.float16), causal=True)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_inputs_scaled_by_5(causal):
    check_against_reference(*_inputs(1, 2, 2, 113, 203, 64, torch.float16, scale_by=5.0), causal=causal)


def test_explicit_scale():
    check_against_reference(*_inputs(1, 2, 1, 40, 70, 24, torch.float16), causal=True, scale=0.37)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_kv_lens_and_fully_masked_rows(dtype):
    # Bottom-right causal with Nq > Nk: the first 30 rows see no key; batch 1 sees no key at all.
    B, H, Hkv, Nq, Nk, D = 3, 4, 2, 70, 40, 32
    q, k, v, do = _inputs(B, H, Hkv, Nq, Nk, D, dtype)
    kv_lens = torch.tensor([40, 0, 17], device=DEVICE)
    out, dq, dk, dv = check_against_reference(q, k, v, do, causal=True, kv_lens=kv_lens)
    _, lse = kernels.attention(q, k, v, causal=True, kv_lens=kv_lens, return_lse=True)

    empty = torch.zeros(B, Nq, dtype=torch.bool, device=DEVICE)
    empty[:, : Nq - Nk] = True
    empty[1] = True
    assert torch.equal(torch.isinf(lse), empty[:, None, :].expand(B, H, Nq))
    assert (lse[torch.isinf(lse)] < 0).all()
    assert not torch.isnan(lse).any()
    assert (out.transpose(1, 2)[empty] == 0).all() and (dq.transpose(1, 2)[empty] == 0).all()
    for b, n in enumerate(kv_lens.tolist()):  # keys past kv_len get exactly zero gradient
        assert (dk[b, :, n:] == 0).all() and (dv[b, :, n:] == 0).all()


def test_lse_and_its_gradient():
    q, k, v, do = _inputs(2, 4, 2, 50, 90, 48, torch.float32)
    dlse = torch.randn(2, 4, 50, dtype=torch.float32, device=DEVICE)
    kv_lens = torch.tensor([90, 33], device=DEVICE)

    def run(fn, q, k, v):
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        out, lse = fn(q, k, v, causal=True, kv_lens=kv_lens, return_lse=True)
        assert lse.dtype == torch.float32 or fn is reference.attention
        loss = (out * do.to(out.dtype)).sum() + (lse * dlse.to(lse.dtype)).sum()
        return (lse.detach(), *torch.autograd.grad(loss, (q, k, v)))

    got = run(kernels.attention, q, k, v)
    high = run(reference.attention, *(t.double() for t in (q, k, v)))
    low = run(reference.attention, q, k, v)
    for name, a, hi, lo in zip(("lse", "dq", "dk", "dv"), got, high, low):
        assert_close_to_ref(a, hi, lo, factor=factor("attention", gradient=name != "lse"), name=name)


def test_only_lse_used():
    q, k, v, _ = _inputs(1, 2, 2, 20, 30, 16, torch.float32)
    q.requires_grad_()
    _, lse = kernels.attention(q, k, v, return_lse=True)
    (dq,) = torch.autograd.grad(lse.sum(), q)
    qr = q.detach().double().requires_grad_()
    _, lse_ref = reference.attention(qr, k.double(), v.double(), return_lse=True)
    (dq_ref,) = torch.autograd.grad(lse_ref.sum(), qr)
    torch.testing.assert_close(dq.double(), dq_ref, rtol=1e-5, atol=1e-5)


def test_non_contiguous_inputs_and_grad():
    # q/k/v as views of a (B, N, H, 2*D) buffer: heads and sequence swapped, every other feature.
    B, H, Hkv, Nq, Nk, D = 2, 4, 2, 45, 67, 40
    q, k, v, do = _inputs(B, H, Hkv, Nq, Nk, D, torch.float16)

    def strided(t):
        buf = torch.zeros(t.shape[0], t.shape[2], t.shape[1], 2 * t.shape[3], dtype=t.dtype, device=t.device)
        view = buf.transpose(1, 2)[..., ::2]
        view.copy_(t)
        return view

    qs, ks, vs = strided(q), strided(k), strided(v)
    dos = do.transpose(-1, -2).contiguous().transpose(-1, -2)  # column-major dO
    assert not any(t.is_contiguous() for t in (qs, ks, vs, dos)) and qs.stride(-1) == 2
    got = check_against_reference(qs, ks, vs, dos, causal=True)
    base = _grads(lambda q, k, v: kernels.attention(q, k, v, causal=True), q, k, v, do)
    for a, b in zip(got, base):
        assert torch.equal(a, b)  # same math whatever the strides


def test_rows_past_int32_offsets_run_on_head_major_copies(monkeypatch):
    # The pointer kernels form offsets inside one head in int32 (batch and head offsets are int64).
    # A (batch, seq, heads, head_dim) projection's rows lie heads * head_dim apart, so a long
    # sequence's last rows would wrap past 2**31 elements and read and write elsewhere. The
    # launchers run such tensors on head-major copies (rows head_dim apart) and refuse what not
    # even those fit. A limit lowered to these sizes stands in for 2**31 - 1.
    B, H, Hkv, Nq, Nk, D = 1, 4, 2, 40, 50, 16
    q, k, v, do = _inputs(B, H, Hkv, Nq, Nk, D, torch.float32)
    q, k, v, do = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v, do))  # (B, N, H, D) memory
    monkeypatch.setattr(attention_module, "_MAX_OFFSET", Nk * D)  # head-major fits; rows H * D apart do not
    check_against_reference(q, k, v, do, causal=True)
    monkeypatch.setattr(attention_module, "_MAX_OFFSET", Nq * D // 2)  # not even head-major
    with pytest.raises(ValueError, match="q has 40 rows of head dim 16"):
        kernels.attention(q, k, v)


def test_backward_is_deterministic():
    q, k, v, do = _inputs(1, 4, 1, 97, 130, 32, torch.float16)
    first = _grads(lambda q, k, v: kernels.attention(q, k, v, causal=True), q, k, v, do)
    second = _grads(lambda q, k, v: kernels.attention(q, k, v, causal=True), q, k, v, do)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "fwd,dkdv,dq",
    [
        (TileConfig(16, 16, 4, 1), TileConfig(16, 16, 4, 1), TileConfig(16, 16, 4, 1)),
        (TileConfig(32, 64, 4, 1), TileConfig(64, 32, 4, 1), TileConfig(32, 64, 4, 1)),
    ],
    ids=["16x16", "tall-keys"],
)
def test_other_tile_shapes(monkeypatch, fwd, dkdv, dq):
    # The block-range arithmetic (causal diagonal, kv_lens, ragged ends) for other tile shapes.
    if DEVICE != "cpu":
        pytest.skip("tile shapes are autotuned on a GPU")
    for kind, cfg in (("fwd", fwd), ("dkdv", dkdv), ("dq", dq)):
        monkeypatch.setitem(attention_module._INTERPRET, kind, cfg)
    q, k, v, do = _inputs(2, 2, 1, 61, 83, 24, torch.float32)
    check_against_reference(q, k, v, do, causal=True, kv_lens=torch.tensor([83, 29], device=DEVICE))


def test_empty_sizes():
    q, k, v, _ = _inputs(1, 2, 2, 0, 5, 16, torch.float32)
    assert kernels.attention(q, k, v).shape == (1, 2, 0, 16)
    q, k, v, do = _inputs(1, 2, 2, 4, 0, 16, torch.float32)  # no keys: every row empty
    out, dq, dk, dv = _grads(kernels.attention, q, k, v, do)
    assert (out == 0).all() and (dq == 0).all() and dk.shape == k.shape


# ----------------------------------------------------------------------------- SDPA drop-in


def _torch_sdpa(**kw):
    return lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)


@pytest.mark.parametrize(
    "Nq,Nk,Hkv,is_causal",
    [(50, 80, 4, True), (80, 50, 4, True), (64, 64, 2, True), (33, 71, 1, False)],
)
def test_sdpa_matches_torch(Nq, Nk, Hkv, is_causal):
    # torch aligns is_causal top-left when Nq != Nk (query i sees keys j <= i).
    q, k, v, do = _inputs(2, 4, Hkv, Nq, Nk, 32, torch.float16)
    kw = dict(is_causal=is_causal, enable_gqa=Hkv != 4, scale=0.2 if Hkv == 1 else None)
    got = _grads(lambda q, k, v: kernels.scaled_dot_product_attention(q, k, v, **kw), q, k, v, do)
    high = _grads(_torch_sdpa(**kw), *(t.float() for t in (q, k, v, do)))
    low = _grads(_torch_sdpa(**kw), q, k, v, do)
    for name, a, hi, lo in zip(("out", "dq", "dk", "dv"), got, high, low):
        assert_close_to_ref(a, hi, lo, factor=factor("attention", gradient=name != "out"), name=name)


def test_sdpa_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(attention_module, "_warned", set())
    q, k, v, _ = _inputs(1, 2, 2, 8, 8, 16, torch.float32)
    mask = torch.rand(8, 8, device=DEVICE) > 0.3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = kernels.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        kernels.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert len([w for w in caught if "attn_mask" in str(w.message)]) == 1
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    with pytest.warns(UserWarning, match="dropout"):
        kernels.scaled_dot_product_attention(q, k, v, dropout_p=0.5)


def test_sdpa_runs_torch_for_float64(monkeypatch):
    # torch's SDPA takes fp64 (gradcheck does); the kernel does not, so the drop-in runs torch's.
    monkeypatch.setattr(attention_module, "_warned", set())
    q, k, v, _ = _inputs(1, 2, 2, 5, 7, 8, torch.float64)
    with pytest.warns(UserWarning, match="dtype"):
        out = kernels.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_sdpa_broadcasts_batch_as_torch():
    # torch's SDPA broadcasts a batch of 1 against the others' (one prompt's keys for many queries);
    # the drop-in runs the kernel on the stride-0 expansion, and autograd sums the broadcast gradients.
    q, _, _, _ = _inputs(3, 2, 2, 5, 7, 16, torch.float32)
    _, k, v, _ = _inputs(1, 2, 2, 5, 7, 16, torch.float32)
    do = torch.randn(3, 2, 5, 16, device=DEVICE)
    got = _grads(lambda q, k, v: kernels.scaled_dot_product_attention(q, k, v, is_causal=True), q, k, v, do)
    high = _grads(_torch_sdpa(is_causal=True), *(t.double() for t in (q, k, v, do)))
    low = _grads(_torch_sdpa(is_causal=True), q, k, v, do)
    for name, a, hi, lo in zip(("out", "dq", "dk", "dv"), got, high, low):
        assert a.shape == lo.shape, name
        assert_close_to_ref(a, hi, lo, factor=factor("attention", gradient=name != "out"), name=name)
    got = kernels.scaled_dot_product_attention(q[:1], k.expand(3, -1, -1, -1), v)  # q's batch of 1, v's too
    torch.testing.assert_close(got, torch.nn.functional.scaled_dot_product_attention(q[:1], k.expand(3, -1, -1, -1), v))


def test_nn_attention_module():
    q, k, v, _ = _inputs(1, 4, 2, 20, 20, 16, torch.float32)
    layer = kernels.nn.Attention(causal=True)
    torch.testing.assert_close(layer(q, k, v), kernels.attention(q, k, v, causal=True), rtol=0, atol=0)
    assert list(layer.state_dict()) == []


def test_reference_backend_is_the_reference():
    q, k, v, _ = _inputs(1, 2, 1, 9, 12, 8, torch.float32)
    with kernels.use_backend("reference"):
        out = kernels.attention(q, k, v, causal=True)
        sdpa = kernels.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.equal(out, reference.attention(q, k, v, causal=True))
    assert torch.equal(sdpa, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))


# ----------------------------------------------------------------------------- bad input


def _bad_cases():
    q = torch.randn(2, 4, 8, 16)
    k = torch.randn(2, 2, 8, 16)
    cases = {
        "batch": (dict(k=torch.randn(3, 2, 8, 16)), ValueError, "k has batch size 3"),
        "head dim": (dict(v=torch.randn(2, 2, 8, 32)), ValueError, "v has head dim 32"),
        "kv shape": (dict(v=torch.randn(2, 2, 9, 16)), ValueError, "v must have the heads and sequence length"),
        "dtype": (dict(k=k.half()), TypeError, "k has dtype torch.float16"),
        "int dtype": (dict(q=q.long()), TypeError, "q must be float32"),
        "not 4-D": (dict(q=q[0]), ValueError, "q must be 4-D"),
        "heads": (dict(k=torch.randn(2, 3, 8, 16), v=torch.randn(2, 3, 8, 16)), ValueError, "multiple of k/v heads"),
        "head dim > 256": (dict(q=torch.randn(1, 1, 2, 257), k=torch.randn(1, 1, 2, 257), v=torch.randn(1, 1, 2, 257)),
                           ValueError, "head dim of q must be between 1 and 256"),
        "kv_lens shape": (dict(kv_lens=torch.tensor([8])), ValueError, r"kv_lens must have shape \(batch,\)"),
        "kv_lens dtype": (dict(kv_lens=torch.tensor([8.0, 8.0])), TypeError, "kv_lens must be an integer tensor"),
        "kv_lens range": (dict(kv_lens=torch.tensor([8, 9])), ValueError, r"kv_lens must lie in \[0, 8\]"),
        "kv_lens negative": (dict(kv_lens=torch.tensor([-1, 3])), ValueError, "kv_lens must lie in"),
        "scale": (dict(scale=0.0), ValueError, "scale must be a positive"),
    }
    if torch.cuda.is_available():
        cases["device"] = (dict(k=k.cuda()), ValueError, "k is on cuda")
    else:
        cases["device"] = (dict(k=k.to("meta"), v=torch.randn(2, 2, 8, 16, device="meta")), ValueError, "k is on meta")
    return cases


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input(case):
    changes, error, match = _bad_cases()[case]
    args = dict(q=torch.randn(2, 4, 8, 16), k=torch.randn(2, 2, 8, 16), v=torch.randn(2, 2, 8, 16)) | changes
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(error, match=match):
        kernels.attention(q, k, v, **args)


def test_sdpa_bad_input_names_sdpa_arguments():
    with pytest.raises(ValueError, match="key has batch size 3"):
        kernels.scaled_dot_product_attention(torch.randn(2, 4, 8, 16), torch.randn(3, 4, 8, 16), torch.randn(3, 4, 8, 16))


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("Nq,Nk,D,Hkv", [(1023, 1024, 128, 2), (1024, 1023, 64, 8), (513, 2049, 96, 1), (4096, 4096, 128, 8)])
def test_gpu_matches_reference(Nq, Nk, D, Hkv, causal, dtype):
    q, k, v, do = _inputs(2, 8, Hkv, Nq, Nk, D, dtype)
    check_against_reference(q, k, v, do, causal=causal, kv_lens=torch.tensor([Nk, Nk // 3], device=DEVICE))


@pytest.mark.gpu
def test_gpu_fp32_and_determinism():
    q, k, v, do = _inputs(2, 8, 2, 700, 900, 80, torch.float32)
    check_against_reference(q, k, v, do, causal=True)
    q, k, v, do = _inputs(4, 16, 2, 2048, 2048, 128, torch.bfloat16)
    runs = [_grads(lambda q, k, v: kernels.attention(q, k, v, causal=True), q, k, v, do) for _ in range(5)]
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


@pytest.mark.skipif(HAS_GPU, reason="CPU-only structural check")
def test_compile_specs_cover_every_config():
    specs = attention_module.compile_specs()
    for s in specs:
        assert list(s.signature) == list(s.kernel.arg_names)
        assert all(s.signature[k] == "constexpr" for k in s.constexprs)
    seen = {(s.name, s.constexprs["BLOCK_M"], s.constexprs.get("BLOCK_N"), s.num_warps, s.num_stages) for s in specs}
    for dtype, family in ((torch.float16, "sm90"), (torch.float16, "sm80"), (torch.float32, "sm90")):
        for kind, kernel in attention_module._KERNELS.items():
            for block_d in (16, 32, 64, 128, 256):
                for c in (attention_module.gpu_configs(kind, block_d, dtype, family)
                          + attention_module.gpu_configs(kind, block_d, dtype, family, features=True)):
                    assert (kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__, c.block_m, c.block_n,
                            c.num_warps, c.num_stages) in seen


def test_gpu_configs_take_the_installed_triton_releases_tiles(monkeypatch):
    # Triton 3.9 spills every wgmma tile of head dim 256 dK/dV and the every-feature head dim 128
    # tile the others build: gpu_configs gives that release its own candidates, the others the table's.
    bf16 = torch.bfloat16
    monkeypatch.setattr(attention_module, "TRITON_RELEASE", (3, 9))
    for features in (False, True):
        tiles = attention_module.gpu_configs("dkdv", 256, bf16, "sm90", features)
        assert tiles == attention_module._RELEASE_CONFIGS_16BIT[(3, 9)][("sm90", "dkdv", 256, features)]
        assert tiles and all(c.block_n == 32 for c in tiles)  # mma.sync: 32 keys
    assert attention_module.gpu_configs("dkdv", 128, bf16, "sm90", features=True) == [TileConfig(32, 128, 8, 1)]
    release_39 = {(kind, d, f): attention_module.gpu_configs(kind, d, bf16, "sm90", f)
                  for kind in attention_module._KERNELS for d in (64, 128) for f in (False, True)}
    assert attention_module.gpu_configs("dkdv", 256, torch.float32, "sm90") == [TileConfig(16, 32, 8, 1)]
    for release in ((3, 6), (3, 8)):
        monkeypatch.setattr(attention_module, "TRITON_RELEASE", release)
        for features in (False, True):  # wgmma: 64 keys
            assert all(c.block_n == 64 for c in attention_module.gpu_configs("dkdv", 256, bf16, "sm90", features))
        assert attention_module.gpu_configs("dkdv", 128, bf16, "sm90", features=True) == [TileConfig(64, 64, 8, 1)]
        # Elsewhere every release takes the same table.
        assert {key: tiles for key, tiles in release_39.items() if key != ("dkdv", 128, True)} == {
            (kind, d, f): attention_module.gpu_configs(kind, d, bf16, "sm90", f)
            for kind, d, f in release_39 if (kind, d, f) != ("dkdv", 128, True)}
    # No release's own tiles bring back 64x16 wgmma at head dim 128 (BLOCK_M=16 on Hopper dK/dV).
    for own in attention_module._RELEASE_CONFIGS_16BIT.values():
        assert all(c.block_m >= 32 for (family, kind, d, _), tiles in own.items() for c in tiles
                   if (family, kind, d) == ("sm90", "dkdv", 128))


# ----------------------------------------------------------------------------- double backward


def _softmax_attention(q, k, v, scale):
    """Attention in plain torch ops, every order differentiable: the second-order oracle."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return torch.softmax(q @ k.transpose(-1, -2) * scale, -1) @ v


def _attention_second_order(fn, q, k, v):
    g = torch.linspace(-1, 1, q.numel(), device=q.device).view_as(q)
    (gq,) = torch.autograd.grad((fn(q, k, v) * g).sum(), q, create_graph=True)
    return torch.autograd.grad(gq.square().sum(), (q, k, v))


def test_double_backward_is_an_error_on_triton_and_exact_on_reference():
    q, k, v, _ = _inputs(1, 2, 1, 5, 6, 8, torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    full = torch.tensor([6], device=DEVICE)  # kv_lens that mask nothing: the reference's masked path

    def ours(q, k, v):
        return kernels.attention(q, k, v, kv_lens=full)

    with kernels.use_backend("triton"):
        for fn in (ours, lambda q, k, v: kernels.scaled_dot_product_attention(q, k, v, enable_gqa=True)):
            with pytest.raises(RuntimeError, match=r"kernels\.attention \(Triton backend\) does not support double "
                                                   r"backward \(create_graph=True\).*reference backend"):
                _attention_second_order(fn, q, k, v)
    with kernels.use_backend("reference"):
        want = _attention_second_order(lambda q, k, v: _softmax_attention(q, k, v, 8**-0.5), q, k, v)
        for got, w in zip(_attention_second_order(ours, q, k, v), want):
            torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_every_integer_kv_lens_dtype(backend):
    q, k, v, _ = _inputs(2, 2, 1, 5, 9, 8, torch.float32)
    with kernels.use_backend(backend):
        want = kernels.attention(q, k, v, kv_lens=torch.tensor([9, 4], device=DEVICE))
        for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.uint16, torch.uint32):
            got = kernels.attention(q, k, v, kv_lens=torch.tensor([9, 4], dtype=dtype, device=DEVICE))
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=str(dtype))
        with pytest.raises(TypeError, match="kv_lens .*uint64"):
            kernels.attention(q, k, v, kv_lens=torch.tensor([9, 4], dtype=torch.uint64, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_nan_and_inf_past_kv_lens_change_nothing(monkeypatch, backend, causal, dtype):
    # Padded keys/values are garbage the caller never wrote: NaN and inf there must not reach
    # any output or any gradient, and the padded positions' own gradients are exactly 0. fp16
    # runs the TMA kernels, which read the padding whole (a key tile of 4 real keys, 5 padded):
    # P = 0 there is not enough, 0 * NaN in dP = dO v^T and in dS k would reach dQ.
    kinds = attention_kernels_launched(monkeypatch, "dq")
    q, k, v, do = _inputs(3, 2, 1, 5, 9, 8, dtype)
    kv_lens = torch.tensor([9, 4, 0], device=DEVICE)
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[1, :, 4:6], k_bad[1, :, 6:] = float("nan"), float("inf")
    v_bad[1, :, 4:6], v_bad[1, :, 6:] = float("-inf"), float("nan")
    k_bad[2], v_bad[2] = float("nan"), float("inf")
    with kernels.use_backend(backend):
        def fn(q, k, v):
            return kernels.attention(q, k, v, causal=causal, kv_lens=kv_lens)
        clean, bad = _grads(fn, q, k, v, do), _grads(fn, q, k_bad, v_bad, do)
    for name, a, b in zip(("out", "dq", "dk", "dv"), clean, bad):
        assert torch.isfinite(b).all(), f"{name}: non-finite values"
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    for b, n in enumerate(kv_lens.tolist()):
        assert (bad[2][b, :, n:] == 0).all() and (bad[3][b, :, n:] == 0).all()
    assert set(kinds) == (set() if backend == "reference" else {"dq_tma" if dtype == torch.float16 else "dq"})


# ----------------------------------------------------------------------------- TMA forward and pointer forward


def _forward_kinds(monkeypatch):
    """Record which forward kernel ('fwd_tma' or 'fwd') each launch runs."""
    return attention_kernels_launched(monkeypatch, "fwd")


def test_strides_tma_cannot_read_take_the_pointer_path_and_agree(monkeypatch):
    # D=40 fp16: rows of 80 bytes qualify; a view padded to 41 columns (82-byte rows) and a
    # view with every other feature do not. Same results either way, bit for bit.
    kinds = _forward_kinds(monkeypatch)
    q, k, v, do = _inputs(1, 4, 2, 45, 70, 40, torch.float16)
    base = check_against_reference(q, k, v, do, causal=True)
    assert kinds and set(kinds) == {"fwd_tma"}

    def padded(t):
        buf = torch.zeros(*t.shape[:-1], 41, dtype=t.dtype, device=t.device)
        buf[..., :40] = t
        return buf[..., :40]

    def every_other(t):
        buf = torch.zeros(*t.shape[:-1], 80, dtype=t.dtype, device=t.device)
        buf[..., ::2] = t
        return buf[..., ::2]

    for layout in (padded, every_other):
        kinds.clear()
        got = check_against_reference(layout(q), layout(k), layout(v), do, causal=True)
        assert set(kinds) == {"fwd"}, layout.__name__
        for a, b in zip(got, base):
            assert torch.equal(a, b), layout.__name__
    assert not attention_module._tma_qualifies(q.float(), k.float(), v.float())  # fp32: pointer path


@pytest.mark.parametrize("Nq,Nk,D,Hkv", SHAPES, ids=[f"{a}x{b}-d{d}-kv{h}" for a, b, d, h in SHAPES])
def test_pointer_forward_matches_reference(monkeypatch, Nq, Nk, D, Hkv):
    # The fp16 tests above run the TMA forward where strides allow; sm_80 runs this one.
    monkeypatch.setattr(attention_module, "_tma_qualifies", lambda *tensors: False)
    kinds = _forward_kinds(monkeypatch)
    check_against_reference(*_inputs(1, 4, Hkv, Nq, Nk, D, torch.float16), causal=True)
    assert set(kinds) == {"fwd"}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_warp_specialized_forward_masks_every_tile(monkeypatch, causal):
    # The warp-specialized loop applies the mask to every tile as arithmetic; with kv_lens
    # it falls back to the boundary-only loop. Both against the reference, GQA, Nq != Nk.
    if DEVICE != "cpu":
        pytest.skip("tile shapes are autotuned on a GPU")
    monkeypatch.setitem(attention_module._INTERPRET, "fwd_tma", TileConfig(64, 32, 4, 1, warp_specialize=True))
    kinds = _forward_kinds(monkeypatch)
    q, k, v, do = _inputs(2, 4, 2, 70, 97, 32, torch.float16)
    check_against_reference(q, k, v, do, causal=causal)
    check_against_reference(q, k, v, do, causal=causal, kv_lens=torch.tensor([97, 40], device=DEVICE))
    assert set(kinds) == {"fwd_tma"}


def test_nan_past_kv_lens_changes_nothing_on_the_tma_path(monkeypatch):
    # TMA reads the padded keys and values whole (it zero-fills only past the tensor's end).
    kinds = _forward_kinds(monkeypatch)
    q, k, v, do = _inputs(3, 2, 1, 5, 40, 16, torch.float16)
    kv_lens = torch.tensor([40, 4, 0], device=DEVICE)
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[1, :, 4:], v_bad[1, :, 4:] = float("nan"), float("inf")
    k_bad[2], v_bad[2] = float("inf"), float("nan")
    for causal in (False, True):
        clean = kernels.attention(q, k, v, causal=causal, kv_lens=kv_lens)
        bad = kernels.attention(q, k_bad, v_bad, causal=causal, kv_lens=kv_lens)
        assert torch.isfinite(bad).all()
        torch.testing.assert_close(bad, clean, rtol=0, atol=0)
    assert set(kinds) == {"fwd_tma"}


# ----------------------------------------------------------------------------- TMA dQ and pointer dQ

# Ragged around the interpreter's 64-row, 32-key tile (127/128/129), Nq != Nk both ways (Nq > Nk
# causal: empty rows), GQA, a head dim TMA pads (40 -> 64 columns), kv_lens with an empty batch.
TMA_DQ_CASES = {
    "127x128-d64-kv2-full": (2, 127, 128, 64, dict()),
    "128x129-d40-kv1-causal": (1, 128, 129, 40, dict(causal=True)),
    "129x127-d32-kv4-causal-kv_lens": (4, 129, 127, 32, dict(causal=True, kv_lens=[127, 0, 61])),
}


@pytest.mark.parametrize("case", list(TMA_DQ_CASES))
def test_tma_dq_matches_reference(monkeypatch, case):
    Hkv, Nq, Nk, D, opts = TMA_DQ_CASES[case]
    kinds = attention_kernels_launched(monkeypatch, "dq")
    kv_lens = opts.get("kv_lens")
    B = 1 if kv_lens is None else len(kv_lens)
    q, k, v, do = _inputs(B, 4, Hkv, Nq, Nk, D, torch.float16, seed=Nq)
    check_against_reference(q, k, v, do, causal=opts.get("causal", False),
                            kv_lens=None if kv_lens is None else torch.tensor(kv_lens, device=DEVICE))
    assert set(kinds) == {"dq_tma"}


def test_dq_strides_tma_cannot_read_take_the_pointer_dq_and_agree(monkeypatch):
    # A column-major dO (q, k, v qualify, dO does not), and no TMA at all (sm_80): the pointer dQ,
    # bit for bit the TMA dQ's results.
    kinds = attention_kernels_launched(monkeypatch, "dq")
    q, k, v, do = _inputs(2, 4, 2, 129, 70, 32, torch.float16)
    kv_lens = torch.tensor([70, 33], device=DEVICE)
    base = check_against_reference(q, k, v, do, causal=True, kv_lens=kv_lens)
    column_major = do.transpose(-1, -2).contiguous().transpose(-1, -2)
    got = check_against_reference(q, k, v, column_major, causal=True, kv_lens=kv_lens)
    monkeypatch.setattr(attention_module, "_tma_qualifies", lambda *tensors: False)
    no_tma = check_against_reference(q, k, v, do, causal=True, kv_lens=kv_lens)
    assert kinds == ["dq_tma", "dq", "dq"]
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), base, got, no_tma):
        assert torch.equal(a, b) and torch.equal(a, c), name


# ----------------------------------------------------------------------------- Gluon forward (opt-in)

gluon_module = importlib.import_module("kernels._attention_gluon")


def _gluon_forward_calls(monkeypatch) -> list[tuple]:
    """Record each launch of the Gluon forward as (head dim, causal)."""
    calls = []
    forward = gluon_module.forward

    def recording(q, k, v, o, lse, causal, *args):
        calls.append((q.shape[-1], causal))
        return forward(q, k, v, o, lse, causal, *args)

    monkeypatch.setattr(gluon_module, "forward", recording)
    return calls


def test_bad_attention_forward_is_an_error(monkeypatch):
    q, k, v, _ = _inputs(1, 2, 2, 8, 8, 16, torch.float32)
    monkeypatch.setenv("FASTLM_ATTENTION", "flash")
    for backend in ("auto", "reference"):
        with kernels.use_backend(backend), pytest.raises(ValueError, match=r"FASTLM_ATTENTION must be one of "
                                                                           r"\('triton', 'gluon'\), got 'flash'"):
            kernels.attention(q, k, v)
    with pytest.raises(ValueError, match=r"attention forward must be one of \('triton', 'gluon'\), got 'fa3'"):
        with kernels.use_attention_forward("fa3"):
            pass


@pytest.mark.skipif(HAS_GPU, reason="the fallback off a GPU")
@pytest.mark.parametrize("how", ["env", "context"])
def test_gluon_forward_falls_back_off_a_gpu(monkeypatch, how):
    # Opted in on CPU (the interpreter, or the reference): the Triton kernels run, bit for bit, and the
    # Gluon forward is never asked; the qualification itself refuses CPU tensors.
    calls = _gluon_forward_calls(monkeypatch)
    q, k, v, do = _inputs(1, 4, 2, 45, 70, 64, torch.float16)
    base = _grads(lambda q, k, v: kernels.attention(q, k, v, causal=True), q, k, v, do)
    if how == "env":
        monkeypatch.setenv("FASTLM_ATTENTION", " Gluon ")  # as FASTLM_BACKEND: case and spaces do not matter
        got = _grads(lambda q, k, v: kernels.attention(q, k, v, causal=True), q, k, v, do)
    else:
        with kernels.use_attention_forward("gluon"):
            got = _grads(lambda q, k, v: kernels.attention(q, k, v, causal=True), q, k, v, do)
    assert not calls
    for a, b in zip(got, base):
        assert torch.equal(a, b)
    assert not gluon_module.qualifies(q, k, v)


@pytest.mark.parametrize("triton_lacks,setup,reason", [
    ("hopper-module", "sys.modules['triton.experimental.gluon.language.nvidia.hopper'] = None  # import fails",
     "no usable Gluon Hopper API"),
    ("old-release", "import triton; triton.__version__ = '3.5.1'", "Triton 3.5.1 is older than 3.6"),
])
def test_gluon_forward_is_unavailable_without_its_triton_api(tmp_path, triton_lacks, setup, reason):
    # A Triton whose Gluon lacks the Hopper module, or a release before 3.6 (another Gluon API): kernels
    # still imports, the path reports itself unavailable (and so never qualifies), and it ships
    # nothing to compile.
    script = tmp_path / "no_gluon.py"
    script.write_text(
        "import sys\n"
        f"{setup}\n"
        "import kernels, kernels._attention_gluon as g\n"
        f"assert not g.AVAILABLE and {reason!r} in g.UNAVAILABLE_REASON, g.UNAVAILABLE_REASON\n"
        "assert g.compile_specs() == []\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


# (Nq, Nk, D, Hkv): ragged lengths around a 128-key tile (partial tiles through TMA's zero fill),
# Nq != Nk both ways (causal: a diagonal offset, rows that see no key), GQA, both head dims.
GLUON_SHAPES = [(127, 127, 64, 2), (128, 128, 128, 8), (129, 129, 128, 1), (129, 385, 64, 4), (385, 129, 128, 2),
                (1023, 1024, 128, 2), (50, 700, 64, 1)]


@pytest.fixture
def gluon_config(monkeypatch, request):
    """Pin the Gluon forward's autotuner to candidate ``request.param`` of each head dim (the last one where a
    head dim has fewer): every candidate is checked, not only the one the autotuner would pick."""
    if not gluon_module.qualifies(*_inputs(1, 1, 1, 1, 1, 64, torch.bfloat16)[:3]):
        pytest.skip(f"the Gluon forward does not run here: {gluon_module.UNAVAILABLE_REASON or 'not sm_90'}")
    pinned = {d: [configs[min(request.param, len(configs) - 1)]] for d, configs in gluon_module.CONFIGS.items()}
    monkeypatch.setattr(gluon_module, "CONFIGS", pinned)
    gluon_module._autotuned.cache_clear()
    yield pinned
    gluon_module._autotuned.cache_clear()


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("gluon_config", [0, 1, 2], indirect=True, ids=["config0", "config1", "config2"])
def test_gpu_gluon_forward_matches_reference(monkeypatch, gluon_config, causal):
    # Forward and backward through the public function with the opt-in on: the Triton backward
    # consumes the Gluon forward's o and lse. The lse itself against the Triton forward's. bf16 here,
    # fp16 below (each dtype, head dim, causal setting and candidate compiles once).
    calls = _gluon_forward_calls(monkeypatch)
    for Nq, Nk, D, Hkv in GLUON_SHAPES:
        q, k, v, do = _inputs(2, 8, Hkv, Nq, Nk, D, torch.bfloat16)
        calls.clear()
        with kernels.use_attention_forward("gluon"):
            check_against_reference(q, k, v, do, causal=causal)
            out, lse = kernels.attention(q, k, v, causal=causal, return_lse=True)
        assert calls and set(calls) == {(D, causal)}, (Nq, Nk, D)
        _, lse_triton = kernels.attention(q, k, v, causal=causal, return_lse=True)
        torch.testing.assert_close(lse, lse_triton, rtol=1e-4, atol=1e-4)
        if causal and Nq > Nk:  # rows that see no key
            assert (out[:, :, :Nq - Nk] == 0).all() and (lse[:, :, :Nq - Nk] == float("-inf")).all()


@pytest.mark.gpu
@pytest.mark.parametrize("gluon_config", [2], indirect=True, ids=["config2"])
def test_gpu_gluon_forward_fp16(monkeypatch, gluon_config):
    calls = _gluon_forward_calls(monkeypatch)
    with kernels.use_attention_forward("gluon"):
        check_against_reference(*_inputs(2, 8, 2, 385, 129, 128, torch.float16), causal=True)
    assert calls == [(128, True)]


@pytest.mark.gpu
def test_gpu_gluon_forward_falls_back_where_it_does_not_apply(monkeypatch):
    # Opted in, inputs it does not take run the Triton forward, silently and correctly.
    calls = _gluon_forward_calls(monkeypatch)
    q, k, v, do = _inputs(2, 4, 2, 200, 300, 64, torch.bfloat16)
    odd = _inputs(2, 4, 2, 200, 300, 96, torch.bfloat16)
    with kernels.use_attention_forward("gluon"):
        check_against_reference(q, k, v, do, causal=True, kv_lens=torch.tensor([300, 77], device=DEVICE))
        check_against_reference(*odd, causal=True)  # head dim 96
        check_against_reference(*(t.float() for t in (q, k, v, do)), causal=True)  # fp32
        check_against_reference(q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v, do)  # no TMA: strides
        out = kernels.attention(q, k, v, causal=True, window_size=(64, 0))
        assert_close_to_ref(out, reference.attention(q.float(), k.float(), v.float(), causal=True, window_size=(64, 0)),
                            reference.attention(q, k, v, causal=True, window_size=(64, 0)),
                            factor=factor("attention", gradient=False))
    assert not calls
