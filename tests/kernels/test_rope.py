"""Rotary embeddings (kernels.rope): the Triton kernel against the fp32/fp64 reference, HF's convention and tables.

On a GPU these run the compiled kernel on CUDA tensors; without one, the same
kernel through the interpreter on CPU (see conftest.py). q_rot, k_rot and both
gradients must meet the rule of kernels/numerics.py against HF's own formula run
in the same dtype.
"""

import pytest
import torch

import kernels
from helpers import DEVICE
from kernels.numerics import assert_close_to_ref, factor, golden_dtype

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (batch, q heads, kv heads, seq, head_dim, rotary_dim): ragged seq, GQA, partial rotary, head dim 256 once.
SHAPES = [
    (1, 1, 1, 1, 8, 8),
    (2, 3, 1, 17, 16, 16),
    (2, 2, 2, 127, 32, 16),
    (1, 2, 1, 129, 80, 32),
    (1, 1, 1, 128, 256, 256),
]


def _hf_rope(q, k, cos, sin, position_ids=None):
    """HF's apply_rotary_pos_emb in the inputs' dtype (tables cast to it), with partial rotary as GPT-NeoX splits it."""
    if position_ids is not None:
        cos, sin = cos[position_ids], sin[position_ids]
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    r = cos.shape[-1]

    def rotate(x):
        x_rot, x_pass = x[..., :r], x[..., r:]
        x1, x2 = x_rot.chunk(2, dim=-1)
        return torch.cat([x_rot * cos + torch.cat([-x2, x1], dim=-1) * sin, x_pass], dim=-1)

    return rotate(q), rotate(k)


def _rope_under_test(q, k, cos, sin, position_ids=None):
    return kernels.rope(q, k, cos, sin, position_ids=position_ids)


def _golden(q, k, cos, sin, position_ids=None):
    return kernels.reference.rope(q, k, cos, sin, position_ids=position_ids)


def _compare(shape, dtype, *, position_ids=None, table_rows=None, layout="bhsd", cos_batched=False):
    B, HQ, HK, S, D, R = shape
    torch.manual_seed(0)
    cos, sin = kernels.rope_tables(table_rows or S, R, theta=100.0, device=DEVICE)
    if cos_batched:  # HF's (batch, seq, rotary_dim), the batch broadcast by a stride-0 expand
        cos, sin = cos[None].expand(B, -1, -1), sin[None].expand(B, -1, -1)
    base_q, base_k = torch.randn(B, HQ, S, D), torch.randn(B, HK, S, D)
    grads = [torch.randn(B, HQ, S, D), torch.randn(B, HK, S, D)]

    def leaves(dt):
        q, k = base_q.to(DEVICE, dt, copy=True), base_k.to(DEVICE, dt, copy=True)
        if layout == "bshd":  # (batch, seq, heads, head_dim) memory viewed as (batch, heads, seq, head_dim)
            q, k = q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(1, 2).contiguous().transpose(1, 2)
        return q.requires_grad_(), k.requires_grad_()

    def run(fn, dt):
        q, k = leaves(dt)
        before = (q.detach().clone(), k.detach().clone(), cos.clone(), sin.clone())
        outs = fn(q, k, cos, sin, position_ids)
        ups = [g.to(DEVICE, dt) for g in grads]
        if layout == "bshd":
            ups = [u.transpose(1, 2).contiguous().transpose(1, 2) for u in ups]
        torch.autograd.backward(outs, ups)
        for t, b in zip((q, k, cos, sin), before):  # never writes into its inputs
            assert torch.equal(t.detach(), b)
        return [*outs, q.grad, k.grad]

    out = run(_rope_under_test, dtype)
    ref32 = run(_golden, golden_dtype(dtype))
    ref_lp = run(_hf_rope, dtype)
    for o, r32, rlp, name in zip(out, ref32, ref_lp, ["q_rot", "k_rot", "dq", "dk"]):
        assert o.dtype == dtype
        assert_close_to_ref(o, r32, rlp, factor=factor("rope", gradient=name.startswith("d")), name=f"{name} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rope_matches_reference(shape, dtype):
    _compare(shape, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_layout_and_hf_batched_tables(dtype):
    _compare((2, 4, 2, 33, 32, 32), dtype, layout="bshd", cos_batched=True)
    _compare((2, 2, 1, 9, 48, 16), dtype, layout="bshd")


@pytest.mark.parametrize("shape_of_positions", ["seq", "1xseq", "batchxseq"])
def test_position_ids_index_the_table(shape_of_positions):
    pos = {"seq": torch.tensor([3, 0, 1, 2, 0, 1, 9]), "1xseq": torch.tensor([[0, 1, 2, 0, 1, 0, 1]]),
           "batchxseq": torch.tensor([[0, 1, 2, 3, 0, 1, 2], [9, 8, 0, 1, 2, 3, 4]])}[shape_of_positions]
    _compare((2, 2, 1, 7, 16, 12), torch.float16, position_ids=pos.to(DEVICE), table_rows=10)


def test_packed_rows_whose_positions_restart_equal_the_sequences_alone():
    torch.manual_seed(0)
    cos, sin = kernels.rope_tables(16, 8, device=DEVICE)
    lengths = [5, 3, 4]
    q, k = torch.randn(1, 2, 12, 8, device=DEVICE), torch.randn(1, 1, 12, 8, device=DEVICE)
    positions = torch.cat([torch.arange(n) for n in lengths])[None].to(DEVICE)
    q_rot, k_rot = kernels.rope(q, k, cos, sin, position_ids=positions)
    start = 0
    for n in lengths:
        alone_q, alone_k = kernels.rope(q[:, :, start:start + n], k[:, :, start:start + n], cos[:n], sin[:n])
        torch.testing.assert_close(q_rot[:, :, start:start + n], alone_q, rtol=0, atol=0)
        torch.testing.assert_close(k_rot[:, :, start:start + n], alone_k, rtol=0, atol=0)
        start += n


def test_matches_hf_apply_rotary_pos_emb_with_llama3_and_yarn_tables():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama import modeling_llama

    torch.manual_seed(0)
    for rope_parameters in (
        dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
             original_max_position_embeddings=16, rope_theta=500000.0),
        dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=32, rope_theta=10000.0),
    ):
        config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=256,
                                          rope_parameters=rope_parameters)
        rotary = modeling_llama.LlamaRotaryEmbedding(config)
        q, k = torch.randn(2, 4, 24, 16), torch.randn(2, 2, 24, 16)
        position_ids = torch.tensor([list(range(24)), list(range(100, 124))])
        cos_hf, sin_hf = rotary(q, position_ids)  # (batch, seq, 16), the mscale folded in
        want = modeling_llama.apply_rotary_pos_emb(q, k, cos_hf, sin_hf)
        # HF's own tables as they are, and ours from HF's scaled frequencies.
        got = kernels.rope(q.to(DEVICE), k.to(DEVICE), cos_hf.to(DEVICE), sin_hf.to(DEVICE))
        for g, w in zip(got, want):
            torch.testing.assert_close(g.cpu(), w, rtol=1e-6, atol=1e-6)
        cos, sin = kernels.rope_tables(256, 16, inv_freq=rotary.inv_freq, attention_scaling=rotary.attention_scaling,
                                       device=DEVICE)
        got = kernels.rope(q.to(DEVICE), k.to(DEVICE), cos, sin, position_ids=position_ids.to(DEVICE))
        for g, w in zip(got, want):  # HF's angles are fp32 products: an ulp of position 123 apart
            torch.testing.assert_close(g.cpu(), w, rtol=1e-4, atol=1e-4)


def test_tables_are_built_once_and_match_the_formula():
    cos, sin = kernels.rope_tables(12, 8, theta=500000.0)
    assert kernels.rope_tables(12, 8, theta=500000.0)[0] is cos  # cached
    assert kernels.rope_tables(12, 8, theta=10000.0)[0] is not cos
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8))
    angles = torch.outer(torch.arange(12, dtype=torch.float64), inv_freq).repeat(1, 2)
    torch.testing.assert_close(cos, angles.cos().float(), rtol=0, atol=0)
    torch.testing.assert_close(sin, angles.sin().float(), rtol=0, atol=0)
    scaled = kernels.rope_tables(12, 8, inv_freq=inv_freq / 4, attention_scaling=1.5)
    torch.testing.assert_close(scaled[0], ((angles / 4).cos() * 1.5).float(), rtol=0, atol=0)


def test_tables_follow_the_default_device_and_a_meta_context_does_not_poison_the_cache():
    # `fastlm presets` counts parameters of models built under torch.device("meta").
    with torch.device("meta"):
        meta_cos, _ = kernels.rope_tables(10, 6)
    assert meta_cos.is_meta
    cos, _ = kernels.rope_tables(10, 6)
    assert cos.device.type == "cpu" and not cos.is_meta
    torch.testing.assert_close(cos[1, 0], torch.tensor(1.0).cos())


def test_double_backward_is_the_rotation_again():
    # rope is linear in q: d/dw <R^T w, z> = R z on both backends.
    torch.manual_seed(0)
    cos, sin = kernels.rope_tables(5, 8, device=DEVICE)
    q, k = torch.randn(1, 2, 5, 8, device=DEVICE, requires_grad=True), torch.randn(1, 1, 5, 8, device=DEVICE)
    z = torch.randn(1, 2, 5, 8, device=DEVICE)
    results = []
    for backend in ("triton", "reference"):
        w = torch.randn(1, 2, 5, 8, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(1),
                        requires_grad=True)
        with kernels.use_backend(backend):
            q_rot, _ = kernels.rope(q, k, cos, sin)
            (dq,) = torch.autograd.grad(q_rot, q, w, create_graph=True)
            (dw,) = torch.autograd.grad((dq * z).sum(), w)
        results.append((dq.detach(), dw))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_rotary_embedding_module():
    torch.manual_seed(0)
    q, k = torch.randn(2, 2, 6, 16, device=DEVICE), torch.randn(2, 1, 6, 16, device=DEVICE)
    module = kernels.nn.RotaryEmbedding(8, max_positions=32, theta=1000.0)
    cos, sin = kernels.rope_tables(32, 8, theta=1000.0, device=DEVICE)
    for a, b in zip(module(q, k), kernels.rope(q, k, cos[:6], sin[:6])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    pos = torch.tensor([[4, 5, 6, 0, 1, 2]], device=DEVICE)
    for a, b in zip(module(q, k, pos), kernels.rope(q, k, cos, sin, position_ids=pos)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="exceeds max_positions 4"):
        kernels.nn.RotaryEmbedding(8, max_positions=4)(q, k)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_tables_first_built_in_inference_mode_still_train(backend):
    # An evaluation under torch.inference_mode() before training builds (and caches) the tables
    # first: they must be ordinary tensors, which autograd may save for the backward.
    q, k = torch.randn(1, 2, 5, 8, device=DEVICE), torch.randn(1, 1, 5, 8, device=DEVICE)
    theta = {"auto": 777.0, "reference": 778.0}[backend]  # tables no other test (or case) has cached
    module = kernels.nn.RotaryEmbedding(8, max_positions=23, theta=theta)
    with kernels.use_backend(backend):
        with torch.inference_mode():
            module(q, k)
        leaf = q.clone().requires_grad_()
        module(leaf, k)[0].square().sum().backward()
    assert leaf.grad is not None
    assert not any(t.is_inference() for t in kernels.rope_tables(23, 8, theta=theta, device=DEVICE))


def _bad_calls():
    q, k = torch.randn(2, 4, 6, 16), torch.randn(2, 2, 6, 16)
    cos, sin = kernels.rope_tables(6, 16)
    long_cos, long_sin = kernels.rope_tables(10, 8)
    pos = torch.arange(6)[None]
    yield lambda: kernels.rope(q, k, cos[:5], sin[:5]), ValueError, r"cos of shape \(seq, rotary_dim\) must have seq = q's 6"
    yield lambda: kernels.rope(q, k, cos, sin[:, :8]), ValueError, "sin must have the shape of cos"
    yield lambda: kernels.rope(q, k, torch.zeros(6, 5), torch.zeros(6, 5)), ValueError, "rotary dim .* must be even"
    yield lambda: kernels.rope(q, k, torch.zeros(6, 18), torch.zeros(6, 18)), ValueError, "at most head_dim 16"
    yield lambda: kernels.rope(q, k[:1], cos, sin), ValueError, "k must have q's batch, seq and head_dim"
    yield lambda: kernels.rope(q[0], k, cos, sin), ValueError, "q must be 4-D"
    yield lambda: kernels.rope(q, k.half(), cos, sin), TypeError, "k has dtype torch.float16"
    yield lambda: kernels.rope(q, k, cos[None].expand(3, -1, -1), sin[None].expand(3, -1, -1)), ValueError, \
        r"must be \(2 or 1, 6, 16\)"
    yield lambda: kernels.rope(q, k, long_cos, long_sin, position_ids=pos + 5), ValueError, \
        r"position_ids must lie in \[0, 10\)"
    yield lambda: kernels.rope(q, k, long_cos, long_sin, position_ids=pos - 1), ValueError, "position_ids must lie"
    yield lambda: kernels.rope(q, k, long_cos, long_sin, position_ids=pos[:, :5]), ValueError, \
        r"position_ids must have shape \(6,\)"
    yield lambda: kernels.rope(q, k, long_cos, long_sin, position_ids=pos.float()), TypeError, \
        "position_ids must be an integer tensor"
    yield lambda: kernels.rope(q, k, cos.clone().requires_grad_(), sin), ValueError, "no gradient for cos/sin"
    yield lambda: kernels.rope_tables(8, 7), ValueError, "dim must be a positive even int"
    yield lambda: kernels.rope_tables(8, 8, inv_freq=torch.ones(3)), ValueError, r"inv_freq must have shape \(dim / 2,\)"


@pytest.mark.parametrize("case", range(len(list(_bad_calls()))))
def test_bad_input_is_a_clear_error(case):
    call, exc, match = list(_bad_calls())[case]
    with pytest.raises(exc, match=match):
        call()


def test_out_of_range_positions_unchecked_are_clamped_not_read_out_of_bounds():
    q, k = torch.randn(1, 1, 3, 8, device=DEVICE), torch.randn(1, 1, 3, 8, device=DEVICE)
    cos, sin = kernels.rope_tables(4, 8, device=DEVICE)
    with kernels.unchecked():
        q_rot, _ = kernels.rope(q, k, cos, sin, position_ids=torch.tensor([0, 3, 99], device=DEVICE))
    assert q_rot.isfinite().all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_rope_at_model_sizes(dtype):
    _compare((2, 32, 8, 1024, 128, 128), dtype, layout="bshd")
    _compare((2, 8, 8, 500, 64, 32), dtype)


def test_outputs_keep_the_memory_order_of_a_transposed_projection():
    # q/k made as HF and fastlm make them, projection.view(B, T, H, D).transpose(1, 2): the rotated
    # tensors are (B, T, H, D) in memory too, so the attention output's transpose back is a view.
    qkv = torch.randn(2, 5, (4 + 2 * 2) * 8, device=DEVICE)
    q = qkv[..., :32].view(2, 5, 4, 8).transpose(1, 2)
    k = qkv[..., 32:48].view(2, 5, 2, 8).transpose(1, 2)
    cos, sin = kernels.rope_tables(5, 8, device=DEVICE)
    q_rot, k_rot = kernels.rope(q, k, cos, sin)
    assert q_rot.transpose(1, 2).is_contiguous() and k_rot.transpose(1, 2).is_contiguous()
    q_rot, k_rot = kernels.rope(q.contiguous(), k.contiguous(), cos, sin)
    assert q_rot.is_contiguous() and k_rot.is_contiguous()
