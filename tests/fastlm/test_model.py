"""The model: both families, parameter names and counts, the fused path against the references,
the KV cache against full recomputation, sampling."""

import pytest
import torch

import kernels
from fastlm.config import PRESETS, ModelConfig
from fastlm.generate import generate, sample_next
from fastlm.model import GPT, KVCache
from helpers import assert_fused_trains_like_reference

GPT2_MICRO = ModelConfig(vocab_size=300, block_size=16, n_layer=2, n_head=2, n_embd=32)
LLAMA_MICRO = ModelConfig(vocab_size=300, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                          norm="rmsnorm", mlp="swiglu", position="rope", bias=False, tie_embeddings=False)
FAMILIES = {"gpt2": GPT2_MICRO, "llama": LLAMA_MICRO}


def micro_model(config: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config)


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_count_matches_config(family):
    model = micro_model(FAMILIES[family])
    assert sum(p.numel() for p in model.parameters()) == FAMILIES[family].num_params()


def test_preset_sizes():
    assert round(PRESETS["gpt2"].model.num_params() / 1e6) == 124
    assert round(PRESETS["gpt2-medium"].model.num_params() / 1e6) == 355
    assert 1.0e9 < PRESETS["llama-1b"].model.num_params() < 1.2e9


def test_names_follow_gpt2_and_tied_head_is_not_duplicated():
    keys = set(micro_model(GPT2_MICRO).state_dict())
    for key in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
                "transformer.h.0.ln_1.weight", "transformer.h.0.ln_1.bias", "transformer.h.1.attn.c_attn.weight",
                "transformer.h.1.attn.c_proj.bias", "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.ln_2.bias"):
        assert key in keys, key
    assert not any(k.startswith("lm_head") for k in keys)
    llama = set(micro_model(LLAMA_MICRO).state_dict())
    assert "lm_head.weight" in llama and "transformer.wpe.weight" not in llama
    assert not any(k.endswith("bias") for k in llama)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_path_matches_reference_over_training_steps(family):
    """Three SGD steps on the Triton kernels (the interpreter on CPU) and on the references:
    the same loss at every step and the same final weights, to fp32 accuracy. (SGD, not Adam:
    Adam turns the rounding noise of a zero gradient, such as the key bias's, into full steps.)"""
    torch.manual_seed(1)
    batches = [(torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))) for _ in range(3)]
    assert_fused_trains_like_reference(lambda: micro_model(FAMILIES[family]), batches)


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_logits_equal_full_recompute(family):
    model = micro_model(FAMILIES[family]).eval()
    tokens = torch.randint(0, 300, (2, 12))
    cache = KVCache.empty(model.config, 2, torch.device("cpu"), torch.float32)
    with kernels.use_backend("reference"), torch.no_grad():
        model(tokens[:, :5], cache=cache)  # prefill
        for t in range(5, 12):
            incremental = model(tokens[:, t:t + 1], cache=cache)
            full = model(tokens[:, :t + 1])
            torch.testing.assert_close(incremental, full, rtol=1e-5, atol=1e-5)
    assert cache.length == 12


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_is_seeded_and_cache_equals_recompute(family):
    model = micro_model(FAMILIES[family]).eval()
    prompt = [5, 17, 42]
    kwargs = dict(num_samples=2, temperature=1.0, top_k=50, top_p=0.9)
    with kernels.use_backend("reference"):
        # 30 new tokens overflow block_size 16: the window slides, with and without the cache.
        cached = generate(model, prompt, 30, seed=3, use_cache=True, **kwargs)
        again = generate(model, prompt, 30, seed=3, use_cache=True, **kwargs)
        recomputed = generate(model, prompt, 30, seed=3, use_cache=False, **kwargs)
        other_seed = generate(model, prompt, 30, seed=4, use_cache=True, **kwargs)
    assert cached == again == recomputed
    assert cached != other_seed
    assert all(len(s) == 30 for s in cached)


def test_sample_next_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, 0.0, None, None, g).item() == 3  # greedy
    draws = {sample_next(logits, 1.0, 2, None, g).item() for _ in range(50)}
    assert draws == {2, 3}  # top-k 2
    draws = {sample_next(logits, 1.0, None, 0.5, g).item() for _ in range(50)}
    assert draws == {3}  # the top token alone holds 64% of the mass


def test_ids_past_the_tokenizer_are_never_sampled():
    """The model's vocabulary is padded past the tokenizer's (vocab_size 320 for a BPE that learnt fewer tokens on
    a small corpus): an id there decodes to nothing, so sampling one silently dropped a token from the text."""
    model = micro_model(FAMILIES["gpt2"]).eval()
    limit = model.config.vocab_size - 40
    with kernels.use_backend("reference"):
        free = generate(model, [5], 60, num_samples=4, temperature=1.0, seed=0)
        limited = generate(model, [5], 60, num_samples=4, temperature=1.0, seed=0, vocab_limit=limit)
        greedy = generate(model, [5], 60, temperature=0.0, vocab_limit=limit)
    assert max(max(s) for s in free) >= limit  # an untrained model does draw them
    assert max(max(s) for s in limited + greedy) < limit
