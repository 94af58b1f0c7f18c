"""kernels.patch on plain PyTorch and small random transformers models: same numbers as unpatched."""

import copy
import importlib
import io
import pickle
import warnings

import pytest
import torch

import kernels

transformers = pytest.importorskip("transformers")
patch_module = importlib.import_module("kernels.patch")  # the package attribute `kernels.patch` is the function

VOCAB, SEQ = 128, 12


def small_config(family: str):
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                       attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                                       bos_token_id=0, eos_token_id=0)
    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                    bos_token_id=0, eos_token_id=0)


def model_pair(family: str):
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(small_config(family), attn_implementation="sdpa")
    patched = kernels.patch(copy.deepcopy(reference))
    return reference.train(), patched.train()


def _counted(monkeypatch, name: str, kernel) -> list:
    """kernels.patch's ``name`` replaced by ``kernel`` that records each call's query shape."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(patch_module, name, counting)
    return calls


@pytest.fixture
def attention_calls(monkeypatch):
    """How many times the patched attention reached the fused kernel."""
    return _counted(monkeypatch, "attention", kernels.attention)


@pytest.fixture
def rope_calls(monkeypatch):
    """How many times a patched attention module's apply_rotary_pos_emb reached kernels.rope."""
    return _counted(monkeypatch, "rope", kernels.rope)


@pytest.fixture
def glu_calls(monkeypatch):
    """How many times a patched MLP reached kernels.swiglu / kernels.geglu."""
    calls = []
    for name in ("swiglu", "geglu"):
        kernel = getattr(kernels.nn, name)

        def counting(*args, kernel=kernel, **kwargs):
            calls.append(args[0].shape)
            return kernel(*args, **kwargs)

        monkeypatch.setattr(kernels.nn, name, counting)
    return calls


def patched_kinds(report) -> list[str]:
    """What a report's ``patched`` lines are about, in order: norm, mlp, attention, rope, loss."""
    return [line.split(":")[0] for line in report.patched]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_patched_model_matches_unpatched(family, attention_calls):
    reference, patched = model_pair(family)
    report = patched.kernels_patch_report
    # GPT-2 has learned positions and an ungated MLP: nothing of RoPE or GLU to patch, nor to report.
    expected = ["norm", "attention", "loss"] if family == "gpt2" else ["norm", "mlp", "attention", "rope", "loss"]
    assert not report.not_patched and patched_kinds(report) == expected, report
    norms = [m for m in patched.modules() if isinstance(m, (kernels.nn.LayerNorm, kernels.nn.RMSNorm))]
    assert len(norms) == 5  # 2 per block + the final one
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))

    # Training with labels: the fused loss, no logits, the same gradients.
    out_ref, out = reference(ids, labels=ids), patched(ids, labels=ids)
    assert out.logits is None
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    out_ref.loss.backward()
    out.loss.backward()
    for (name, p_ref), p in zip(reference.named_parameters(), patched.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    assert len(attention_calls) == 2  # one per layer

    # Eval: logits as usual.
    reference.eval(), patched.eval()
    with torch.no_grad():
        torch.testing.assert_close(patched(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
        # Greedy decoding goes through the KV cache (one query against many keys).
        prompt = ids[:1, :4]
        assert patched.generate(prompt, max_new_tokens=4, do_sample=False).tolist() == \
            reference.generate(prompt, max_new_tokens=4, do_sample=False).tolist()


def assert_left_padding_falls_back_alike(patched, reference, ids, fallback):
    """Left padding is not a mask the kernel takes: the patched model warns that it runs transformers'
    ``fallback`` attention, and its logits at the real positions equal the unpatched model's."""
    left = torch.ones(2, SEQ, dtype=torch.long)
    left[1, :3] = 0
    patch_module._warned.clear()
    with pytest.warns(UserWarning, match=f"running transformers' {fallback} attention"), torch.no_grad():
        got, want = patched(ids, attention_mask=left).logits, reference(ids, attention_mask=left).logits
    torch.testing.assert_close(got[:, 3:], want[:, 3:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_padding_masks(family, attention_calls):
    reference, patched = model_pair(family)
    reference.eval(), patched.eval()
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(2))
    right = torch.ones(2, SEQ, dtype=torch.long)
    right[1, 7:] = 0
    with torch.no_grad():
        got, want = patched(ids, attention_mask=right).logits, reference(ids, attention_mask=right).logits
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1, :7], want[1, :7], rtol=1e-5, atol=1e-5)  # padded positions are don't-care
    assert len(attention_calls) == 2  # right padding ran the kernel, as kv_lens

    assert_left_padding_falls_back_alike(patched, reference, ids, "sdpa")


def test_loss_honours_num_items_in_batch_and_ignored_labels():
    reference, patched = model_pair("llama")
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, :5] = -100
    n = torch.tensor(7)
    torch.testing.assert_close(patched(ids, labels=labels, num_items_in_batch=n).loss,
                               reference(ids, labels=labels, num_items_in_batch=n).loss, rtol=1e-5, atol=1e-6)


def test_patching_twice_is_harmless():
    reference, patched = model_pair("gpt2")
    params = [id(p) for p in patched.parameters()]
    forward = patched.forward
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels.patch(patched)
    assert [id(p) for p in patched.parameters()] == params and patched.forward.__func__ is forward.__func__
    ids = torch.randint(0, VOCAB, (2, SEQ))
    torch.testing.assert_close(patched(ids, labels=ids).loss, reference(ids, labels=ids).loss,
                               rtol=1e-5, atol=1e-6)


class Lookalike(torch.nn.Module):
    """Named like an HF RMSNorm, but centres its input first (a bias-free LayerNorm): must not be swapped."""

    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(n))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        x = x - x.mean(-1, keepdim=True)
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), self.weight, self.variance_epsilon)


Lookalike.__name__ = "CenteredRMSNorm"


def test_plain_torch_model_norms_are_swapped_and_the_rest_reported():
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.LayerNorm(16), torch.nn.RMSNorm(16),
                                Lookalike(16))
    weights = [model[1].weight, model[2].weight]
    x = torch.randn(4, 16)
    expected = model(x)
    with pytest.warns(UserWarning) as caught:
        kernels.patch(model)
    message = str(caught[0].message)
    assert "attention: Sequential is not a transformers causal LM" in message and "loss:" in message
    assert "CenteredRMSNorm (unknown semantics" in message
    assert type(model[1]) is kernels.nn.LayerNorm and type(model[2]) is kernels.nn.RMSNorm
    assert type(model[3]) is Lookalike
    assert model[1].weight is weights[0] and model[2].weight is weights[1]
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_hf_llama_and_gemma_norms_become_their_casting_modes(dtype):
    # Gemma stores w and scales by 1 + w, in fp32 to the end; Llama rounds x_hat before its weight.
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(8)
    model = torch.nn.Sequential(LlamaRMSNorm(48, eps=1e-5), GemmaRMSNorm(48, eps=1e-6), Gemma2RMSNorm(48, eps=1e-6))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.to(dtype)
    weights = [m.weight for m in model]
    x = torch.randn(3, 5, 48, dtype=dtype)
    expected = [m(x) for m in model]
    with pytest.warns(UserWarning, match="attention: Sequential"):
        kernels.patch(model)
    assert all(type(m) is kernels.nn.RMSNorm for m in model), model
    assert [(m.offset, m.casting_mode, m.eps) for m in model] == [
        (0.0, "llama", 1e-5), (1.0, "gemma", 1e-6), (1.0, "gemma", 1e-6)]
    assert all(m.weight is w for m, w in zip(model, weights))
    assert any("norm: 1 GemmaRMSNorm module(s)" in line for line in model.kernels_patch_report.patched)
    for m, want in zip(model, expected):
        with kernels.use_backend("reference"):
            assert torch.equal(m(x), want)  # the same function to the bit, dtype included
        torch.testing.assert_close(m(x), want)  # the kernels: within a rounding


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_convergence_with_and_without_patch(family):
    """30 AdamW steps: the loss at every step and the final parameters agree."""
    reference, patched = model_pair(family)
    lr = 3e-3
    batches = torch.randint(0, VOCAB, (3, 2, SEQ), generator=torch.Generator().manual_seed(4))
    data = [batches[step % 3] for step in range(30)]  # learnable: three batches seen ten times
    curves = []
    for model in (reference, patched):
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
        losses = []
        for batch in data:
            loss = model(batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        curves.append(losses)
    torch.testing.assert_close(torch.tensor(curves[1]), torch.tensor(curves[0]), rtol=1e-5, atol=1e-5)
    assert curves[0][-1] < curves[0][0] - 0.3  # it did learn
    for (name, p_ref), p in zip(reference.named_parameters(), patched.parameters()):
        if name.endswith("attn.c_attn.bias"):
            # The key bias adds the same q.b to every score of a row: softmax cancels it, its exact
            # gradient is zero, and Adam turns the rounding noise of either run into steps of ~lr.
            d = p.shape[0] // 3
            torch.testing.assert_close(p[d:2 * d], p_ref[d:2 * d], rtol=0, atol=lr)
            p, p_ref = torch.cat([p[:d], p[2 * d:]]), torch.cat([p_ref[:d], p_ref[2 * d:]])
        torch.testing.assert_close(p, p_ref, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


WINDOW = 5  # shorter than SEQ: the window decides what each query sees


def windowed_config(family: str):
    """Tiny random configurations of the families with sliding windows (Qwen2: on the first layer only),
    Gemma's (1 + w) norms, and Gemma 2's attention softcap and alternating local/global layers."""
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=32, bos_token_id=0, eos_token_id=0,
                  pad_token_id=0)
    if family == "mistral":
        return transformers.MistralConfig(sliding_window=WINDOW, **common)
    if family == "qwen2":
        return transformers.Qwen2Config(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, **common)
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "gemma":
        return transformers.GemmaConfig(**common)
    # Gemma 2 caps its final logits too: the fused loss's softcap.
    return transformers.Gemma2Config(sliding_window=WINDOW, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                                     query_pre_attn_scalar=8, **common)


@pytest.fixture
def varlen_calls(monkeypatch):
    """How many times the patched attention reached the fused varlen kernel."""
    return _counted(monkeypatch, "varlen_attention", kernels.varlen_attention)


def _loss_and_grads(model, ids, **kwargs):
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids, use_cache=False, **kwargs).loss
    loss.backward()
    return loss, [p.grad for p in model.parameters()]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma", "gemma2"])
def test_windows_softcap_and_packed_sequences_match_unpatched(family, attention_calls, varlen_calls, rope_calls,
                                                              glu_calls):
    """RoPE, the gated MLP, the norms, attention and the loss all fused: the same loss and gradients as
    the unpatched twin on a plain batch and on packed rows whose positions restart."""
    torch.manual_seed(0)
    # transformers' SDPA has no attention softcap: Gemma 2's reference is its eager attention.
    reference = transformers.AutoModelForCausalLM.from_config(
        windowed_config(family), attn_implementation="eager" if family == "gemma2" else "sdpa").train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything patched: no warning
        patched = kernels.patch(copy.deepcopy(reference))
    report = patched.kernels_patch_report
    assert not report.not_patched, report
    assert patched_kinds(report) == ["norm", "mlp", "attention", "rope", "loss"], report
    mlp_class = type(reference.model.layers[0].mlp).__name__
    attention_class = type(reference.model.layers[0].self_attn).__name__
    glu = "kernels.swiglu" if family in ("llama", "mistral", "qwen2") else "kernels.geglu (approximate='tanh')"
    assert f"mlp: 2 {mlp_class} module(s) run {glu}" in report.patched
    assert f"rope: 2 {attention_class} module(s) run kernels.rope" in report.patched
    if family == "gemma2":
        assert any(line.startswith("loss: gemma2 training loss runs kernels.linear_cross_entropy with softcap=3.0")
                   for line in report.patched), report
    assert all(isinstance(layer.mlp, kernels.nn.GatedMLP) for layer in patched.model.layers)
    assert patched.state_dict().keys() == reference.state_dict().keys()  # HF's names: checkpoints still load
    patch_module._warned.clear()
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(1, VOCAB, (2, SEQ), generator=generator)
    # One row of three documents (7 + 5 + 8 tokens), positions restarting at 0 as the flattening collator makes them.
    packed = torch.randint(1, VOCAB, (1, 20), generator=generator)
    positions = torch.cat([torch.arange(n) for n in (7, 5, 8)])[None]
    cu_seq_lens = torch.tensor([0, 7, 12, 20], dtype=torch.int32)
    flash_kwargs = dict(cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens, max_length_q=8, max_length_k=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to transformers' attention anywhere below
        for batch, ours, theirs in ((ids, {}, {}), (packed, {"position_ids": positions}, {"position_ids": positions}),
                                    (packed, {"position_ids": positions, **flash_kwargs}, {"position_ids": positions})):
            loss, grads = _loss_and_grads(patched, batch, **ours)
            loss_ref, grads_ref = _loss_and_grads(reference, batch, **theirs)
            torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
            for (name, _), g, g_ref in zip(reference.named_parameters(), grads, grads_ref):
                torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
        assert len(attention_calls) == 2 and len(varlen_calls) == 4  # per layer: dense, packed mask, cu_seq_lens
        assert len(rope_calls) == len(glu_calls) == 6  # per layer and batch
        patched.eval(), reference.eval()
        with torch.no_grad():
            torch.testing.assert_close(patched(packed, position_ids=positions, use_cache=False).logits,
                                       reference(packed, position_ids=positions, use_cache=False).logits,
                                       rtol=1e-5, atol=1e-5)
    # Packing is what it computed: the unpacked documents give the same logits as the packed row.
    with torch.no_grad():
        packed_logits = patched(packed, **flash_kwargs, position_ids=positions, use_cache=False).logits
        first = patched(packed[:, 7:12], use_cache=False).logits
        # transformers' prepare_fa_kwargs_from_position_ids gives the maxima as 0-d tensors.
        tensor_maxima = dict(flash_kwargs, max_length_q=torch.tensor(8), max_length_k=torch.tensor(8))
        torch.testing.assert_close(patched(packed, **tensor_maxima, position_ids=positions, use_cache=False).logits,
                                   packed_logits)
    torch.testing.assert_close(packed_logits[:, 7:12], first, rtol=1e-5, atol=1e-5)


def test_sliding_window_with_right_padding_and_a_cache(attention_calls):
    # The window's mask plus right padding is kv_lens; decoding past the window reads a sliding cache.
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(windowed_config("mistral"),
                                                              attn_implementation="sdpa").eval()
    patched = kernels.patch(copy.deepcopy(reference))
    ids = torch.randint(1, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(6))
    right = torch.ones(2, SEQ, dtype=torch.long)
    right[1, 8:] = 0
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")  # no fallback
        got, want = patched(ids, attention_mask=right).logits, reference(ids, attention_mask=right).logits
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1, :8], want[1, :8], rtol=1e-5, atol=1e-5)  # padded positions: don't-care
        assert len(attention_calls) == 2
        prompt = ids[:1, :4]
        assert patched.generate(prompt, max_new_tokens=2 * WINDOW, do_sample=False).tolist() == \
            reference.generate(prompt, max_new_tokens=2 * WINDOW, do_sample=False).tolist()


def test_sliding_window_includes_the_query_itself():
    # transformers' sliding_window w: a query sees the last w keys, itself included: flash's window (w - 1, 0).
    from transformers.masking_utils import sliding_window_causal_mask_function

    see = sliding_window_causal_mask_function(WINDOW)
    i, zero = 9, torch.tensor(0)
    assert [j for j in range(SEQ) if see(zero, zero, torch.tensor(i), torch.tensor(j))] == list(range(i - WINDOW + 1, i + 1))
    assert patch_module._window_left(WINDOW) == WINDOW - 1 and patch_module._window_left(None) == -1


def test_unsupported_family_is_reported():
    config = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                                    num_attention_heads=4, max_position_embeddings=32, word_embed_proj_dim=32)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.warns(UserWarning, match="attention: OPTForCausalLM is not a transformers causal LM of a supported"):
        kernels.patch(model)
    assert any("LayerNorm module(s) run kernels.nn" in line for line in model.kernels_patch_report.patched)
    assert model.config._attn_implementation != "fastlm" and "forward" not in model.__dict__


def llama_config(**overrides):
    return transformers.LlamaConfig(**{**dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              head_dim=8, max_position_embeddings=32, bos_token_id=0,
                                              eos_token_id=0), **overrides})


def test_an_unpatched_model_of_the_same_family_is_unaffected(rope_calls, glu_calls):
    # The RoPE patch replaces modeling_llama.apply_rotary_pos_emb: only patched attention modules may reach the kernel.
    torch.manual_seed(0)
    bystander = transformers.AutoModelForCausalLM.from_config(llama_config(), attn_implementation="sdpa").eval()
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        before = bystander(ids).logits
        patched = kernels.patch(copy.deepcopy(bystander))
        after = bystander(ids).logits
    assert rope_calls == [] and glu_calls == []
    assert torch.equal(after, before)
    assert type(bystander.model.layers[0].mlp).__name__ == "LlamaMLP" and "forward" not in vars(
        bystander.model.layers[0].self_attn)
    with torch.no_grad():
        torch.testing.assert_close(patched(ids).logits, before, rtol=1e-5, atol=1e-5)
    assert len(rope_calls) == len(glu_calls) == 2  # the patched copy's two layers


def test_the_replaced_apply_rotary_pos_emb_keeps_its_semantics(rope_calls):
    # unsqueeze_dim=2 ((batch, seq, heads, head_dim) tensors) runs the kernel on transposed views; a table
    # narrower than the head (which transformers' function cannot broadcast) goes to the original.
    from transformers.models.llama import modeling_llama

    kernels.patch(transformers.AutoModelForCausalLM.from_config(llama_config()))
    replaced = modeling_llama.apply_rotary_pos_emb
    original = replaced._kernels_original
    generator = torch.Generator().manual_seed(9)
    q, k = torch.randn(2, 5, 4, 8, generator=generator), torch.randn(2, 5, 2, 8, generator=generator)
    angles = torch.randn(2, 5, 4, generator=generator)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    assert all(torch.equal(a, b) for a, b in zip(replaced(q, k, cos, sin, 2), original(q, k, cos, sin, 2)))
    assert rope_calls == []  # outside a patched attention module: the original ran
    patch_module._ROPE_SWITCH.active = True  # as inside a patched attention module's forward
    try:
        for got, want in zip(replaced(q, k, cos, sin, unsqueeze_dim=2), original(q, k, cos, sin, 2)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for got, want in zip(replaced(q.transpose(1, 2), k.transpose(1, 2), cos, sin),
                             original(q.transpose(1, 2), k.transpose(1, 2), cos, sin)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert len(rope_calls) == 2
        with pytest.raises(RuntimeError):  # the original's own error, as unpatched
            replaced(q, k, cos[..., :4], sin[..., :4], 2)
        assert len(rope_calls) == 2
    finally:
        patch_module._ROPE_SWITCH.active = False


def test_partial_rotary_factor_matches_unpatched(rope_calls):
    # These families' rotary modules ignore partial_rotary_factor and rotate the whole head; patched, the same.
    torch.manual_seed(0)
    config = llama_config(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                           "partial_rotary_factor": 0.5})
    reference = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    patched = kernels.patch(copy.deepcopy(reference))
    assert "rope" in patched_kinds(patched.kernels_patch_report)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        torch.testing.assert_close(patched(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
    assert len(rope_calls) == 2


def test_an_unsupported_mlp_activation_is_reported_and_left_alone(glu_calls):
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(llama_config(hidden_act="relu"),
                                                              attn_implementation="sdpa").train()
    with pytest.warns(UserWarning, match="mlp: LlamaMLP with ReLU"):
        patched = kernels.patch(copy.deepcopy(reference))
    report = patched.kernels_patch_report
    assert report.not_patched == ["mlp: LlamaMLP with ReLU (not act(gate_proj(x)) * up_proj(x) with SiLU, "
                                  "tanh GELU or GELU; left as is)"], report
    assert patched_kinds(report) == ["norm", "attention", "rope", "loss"]
    assert type(patched.model.layers[0].mlp).__name__ == "LlamaMLP"
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(patched(ids, labels=ids).loss, reference(ids, labels=ids).loss, rtol=1e-5, atol=1e-6)
    assert glu_calls == []


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_pytorch_tanh"])
def test_gelu_mlps_run_geglu(hidden_act, glu_calls):
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(llama_config(hidden_act=hidden_act),
                                                              attn_implementation="sdpa").eval()
    patched = kernels.patch(copy.deepcopy(reference))
    approximate = "none" if hidden_act == "gelu" else "tanh"
    assert f"mlp: 2 LlamaMLP module(s) run kernels.geglu (approximate='{approximate}')" in \
        patched.kernels_patch_report.patched
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        torch.testing.assert_close(patched(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
    assert len(glu_calls) == 2


def test_patching_a_llama_twice_keeps_its_parameters_and_modules():
    torch.manual_seed(0)
    model = kernels.patch(transformers.AutoModelForCausalLM.from_config(llama_config(), attn_implementation="sdpa"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    params = [id(p) for p in model.parameters()]
    modules = [id(m) for m in model.modules()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels.patch(model)
    assert [id(p) for p in model.parameters()] == params and [id(m) for m in model.modules()] == modules
    report = model.kernels_patch_report
    assert "norm: RMSNorm already fused" in report.patched
    assert "mlp: GatedMLP already fused (kernels.swiglu)" in report.patched
    assert "rope: LlamaAttention already runs kernels.rope" in report.patched
    ids = torch.randint(0, VOCAB, (2, SEQ))
    model.train()(ids, labels=ids).loss.backward()
    optimizer.step()  # the optimizer built before the second patch still holds the model's parameters
    assert all(p.grad is not None for p in model.parameters())


def test_gemma2_fallback_to_eager_attention_matches_unpatched():
    # Left padding is not a mask the kernel takes; Gemma 2 (attention softcap) falls back to its eager attention,
    # which adds the mask to the scores: the boolean mask the "fastlm" implementation builds must become additive.
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(windowed_config("gemma2"),
                                                              attn_implementation="eager").eval()
    patched = kernels.patch(copy.deepcopy(reference))
    ids = torch.randint(1, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(13))
    assert_left_padding_falls_back_alike(patched, reference, ids, "eager")


def test_gemma2_attention_dropout_falls_back_to_causal_eager_attention():
    # Without padding the mask is None (plain causal); eager attention has no is_causal, so the fallback must
    # build the causal (windowed) mask itself. Same seed, same dropout draws: the same loss.
    torch.manual_seed(0)
    config = windowed_config("gemma2")
    config.attention_dropout = 0.25
    reference = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").train()
    patched = kernels.patch(copy.deepcopy(reference))
    ids = torch.randint(1, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(14))
    patch_module._warned.clear()
    losses = []
    for model in (patched, reference):
        torch.manual_seed(15)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            losses.append(model(ids, labels=ids, use_cache=False).loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_recomputes_through_the_fused_rope(rope_calls):
    # The recomputed attention forward sets the RoPE switch again: the kernel runs twice per layer, same gradients.
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(llama_config(), attn_implementation="sdpa").train()
    patched = kernels.patch(copy.deepcopy(reference))
    for model in (reference, patched):
        model.activation_checkpointing_enable()
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(16))
    loss, grads = _loss_and_grads(patched, ids)
    loss_ref, grads_ref = _loss_and_grads(reference, ids)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    for (name, _), g, g_ref in zip(reference.named_parameters(), grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    assert len(rope_calls) == 4


# ----------------------------------------------------------------------------- copies and torch.compile


def _saved_and_loaded(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("copy_of", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m)), _saved_and_loaded],
                         ids=["deepcopy", "pickle", "torch.save"])
def test_a_patched_llama_copies_whole_and_stays_patched(copy_of, rope_calls, attention_calls):
    # EMA and teacher models are deep copies, whole-model checkpoints pickles: the copy computes the same
    # numbers through its own (patched) modules, and patching it again finds everything patched.
    torch.manual_seed(0)
    model = kernels.patch(transformers.AutoModelForCausalLM.from_config(llama_config(),
                                                                        attn_implementation="sdpa")).train()
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(17))
    expected = model(ids, labels=ids, use_cache=False).loss
    twin = copy_of(model)
    assert twin.forward.__self__ is twin
    attentions = [layer.self_attn for layer in twin.model.layers]
    assert all(vars(a)["forward"].__self__ is a for a in attentions)
    assert not {id(p) for p in twin.parameters()} & {id(p) for p in model.parameters()}
    del rope_calls[:], attention_calls[:]
    out = twin(ids, labels=ids, use_cache=False)
    assert out.logits is None  # the fused loss
    assert torch.equal(out.loss, expected)
    assert len(rope_calls) == len(attention_calls) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels.patch(twin)
    assert "rope: LlamaAttention already runs kernels.rope" in twin.kernels_patch_report.patched
    assert "loss: llama training loss runs kernels.linear_cross_entropy (already)" in twin.kernels_patch_report.patched


def _graph_breaks(model, ids, **kwargs) -> tuple[int, str]:
    """Graph breaks of a training forward under ``torch._dynamo.explain``, and the traced graphs' code."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda ids: model(ids, labels=ids, **kwargs).loss)(ids)
    torch._dynamo.reset()
    return explained.graph_break_count, "\n".join(g.code for g in explained.graphs)


def test_a_patched_llama_traces_in_one_graph_with_the_fused_ops():
    # transformers' Llama compiles with fullgraph=True unpatched; patched it must too (the RoPE switch of
    # each attention module is traced, not a break). Without a cache transformers builds a mask even for a
    # plain batch while compiling, which the patch cannot read without a sync: transformers' SDPA runs it.
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(llama_config(), attn_implementation="sdpa").train()
    patched = kernels.patch(copy.deepcopy(reference))
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(18))
    fused_ops = ("fastlm.norm", "fastlm.add_norm", "fastlm.glu", "fastlm.rope", "fastlm.linear_cross_entropy")
    with kernels.use_backend("triton"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's warning, once
        for kwargs, fused_attention in (({}, True), ({"use_cache": False}, False)):
            assert _graph_breaks(reference, ids, **kwargs)[0] == 0
            breaks, code = _graph_breaks(patched, ids, **kwargs)
            assert breaks == 0
            assert all(op in code for op in fused_ops if op != "fastlm.add_norm"), code
            assert ("fastlm.attention" in code) == fused_attention


def test_packed_sequences_trace_in_one_graph_through_varlen_attention():
    # The flattening collator's keyword arguments under torch.compile: its maxima are ints; transformers'
    # prepare_fa_kwargs_from_position_ids gives 0-d tensors, whose int() was a graph break where they are
    # constants of the traced code (9 on this model) and a .item() in the graph (a host sync on a GPU)
    # where they are its inputs, while the launch grid can cover the packed length instead.
    torch.manual_seed(0)
    model = kernels.patch(transformers.AutoModelForCausalLM.from_config(llama_config(),
                                                                        attn_implementation="sdpa")).train()
    packed = torch.randint(1, VOCAB, (1, 20), generator=torch.Generator().manual_seed(20))
    positions = torch.cat([torch.arange(n) for n in (7, 5, 8)])[None]
    cu_seq_lens = torch.tensor([0, 7, 12, 20], dtype=torch.int32)
    kwargs = dict(position_ids=positions, use_cache=False, cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens)
    graphs = []

    def keep_graph(graph, example_inputs):  # Dynamo alone, as backend="eager", keeping the graph's code
        graphs.append(graph.code)
        return graph.forward

    with kernels.use_backend("triton"):
        expected = model(packed, labels=packed, **kwargs, max_length_q=8, max_length_k=8).loss
        compiled = torch.compile(model, fullgraph=True, backend=keep_graph)
        maxima = dict(max_length_q=torch.tensor(8), max_length_k=torch.tensor(8))  # as prepare_fa_kwargs_... gives
        loss = compiled(packed, labels=packed, **kwargs, **maxima).loss
    assert len(graphs) == 1
    assert "fastlm.varlen_attention" in graphs[0] and "fastlm.attention" not in graphs[0], graphs[0]
    assert ".item()" not in graphs[0], graphs[0]
    with kernels.use_backend("triton"):
        assert _graph_breaks(model, packed, **kwargs, **maxima)[0] == 0  # the maxima as constants of the code
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_the_forward_signature_is_read_once_per_class(monkeypatch):
    # inspect.signature costs tens of microseconds: not on every training step of a patched model.
    torch.manual_seed(0)
    model = kernels.patch(transformers.AutoModelForCausalLM.from_config(llama_config(),
                                                                        attn_implementation="sdpa")).train()
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(21))
    patch_module._forward_signatures.clear()
    reads = []
    signature = patch_module.inspect.signature
    monkeypatch.setattr(patch_module.inspect, "signature", lambda f, **kw: reads.append(f) or signature(f, **kw))
    with kernels.use_backend("reference"):  # the kernels are not the point: the quickest
        losses = [model(ids, labels=ids, use_cache=False).loss for _ in range(3)]
        assert reads.count(type(model).forward) == 1
        assert losses[0].equal(losses[1]) and losses[0].equal(losses[2])
        model.eval()  # the model's own forward, through the same signature
        assert model(ids, labels=ids, use_cache=False).logits is not None
    assert reads.count(type(model).forward) == 1


@pytest.mark.parametrize("family, backend, use_cache", [("llama", "eager", True), ("llama", "aot_eager", True),
                                                        ("llama", "aot_eager", False), ("gemma2", "aot_eager", True)],
                         ids=["llama-eager", "llama-aot_eager", "llama-aot_eager-no_cache", "gemma2-aot_eager"])
def test_fullgraph_compiled_patched_model_matches_eager(family, backend, use_cache):
    # backend="eager" is Dynamo alone, "aot_eager" adds AOT autograd (the ops' fake and autograd formulas);
    # without a cache the attention is transformers' SDPA on its mask (see the test above). Gemma 2: both
    # softcaps, sliding windows (masks: its eager attention while compiling) and (1 + w) norms.
    torch.manual_seed(0)
    config, implementation = (llama_config(), "sdpa") if family == "llama" else (windowed_config(family), "eager")
    model = kernels.patch(transformers.AutoModelForCausalLM.from_config(config,
                                                                        attn_implementation=implementation)).train()
    ids = torch.randint(1, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(19))
    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's warning, once
        for run in (model, torch.compile(model, fullgraph=True, backend=backend)):
            model.zero_grad(set_to_none=True)
            loss = run(ids, labels=ids, use_cache=use_cache).loss
            loss.backward()
            results.append((loss, [p.grad for p in model.parameters()]))
    (loss, grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-6)
    for (name, _), g, g_compiled in zip(model.named_parameters(), grads, compiled_grads):
        torch.testing.assert_close(g_compiled, g, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
