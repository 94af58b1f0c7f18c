"""Attention confined to each document of a packed row (``document_mask``) and sliding windows (``window``,
``global_every``): what a token may see, where positions restart, the config's checks, exact resume."""

import numpy as np
import pytest
import torch

import kernels
from fastlm.checkpoint import CheckpointError
from fastlm.config import Config, ConfigError, ModelConfig
from fastlm.data import document_spans
from fastlm.hf import hf_config_from_model
from fastlm.model import GPT, Classifier
from fastlm.train import train
from helpers import losses, micro_config, stop_after_checkpoint, write_short_documents

EOT = 0
LLAMA = dict(norm="rmsnorm", mlp="swiglu", position="rope", bias=False, tie_embeddings=False, n_kv_head=1)
FAMILIES = {"gpt2": {}, "llama": LLAMA}


def tiny(family="gpt2", **fields) -> GPT:
    torch.manual_seed(0)
    shape = dict(vocab_size=300, block_size=16, n_layer=2, n_head=2, n_embd=32)
    return GPT(ModelConfig(**{**shape, **FAMILIES[family], **fields})).eval()


def rows_with_documents() -> torch.Tensor:
    """Two rows of 12 tokens: row 0 holds documents at 0-4 and 5-11, row 1 at 0-2, 3-8 and 9-11."""
    x = torch.randint(1, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    x[0, 5] = x[1, 3] = x[1, 9] = EOT
    return x


def packed(model, x):
    return model.hidden_states(x, None, *document_spans(x.numpy(), EOT))


def test_document_spans():
    cu_seqlens, positions = document_spans(rows_with_documents().numpy(), EOT)
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 5, 12, 15, 21, 24]
    assert positions.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 0, 1, 2, 3, 4, 5, 0, 1, 2]]
    # An <|endoftext|> first in a row opens one document, not an empty one before it.
    cu_seqlens, positions = document_spans(np.array([[EOT, 5, EOT, EOT]]), EOT)
    assert cu_seqlens.tolist() == [0, 2, 3, 4] and positions.tolist() == [[0, 1, 0, 0]]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_token_never_attends_across_documents(backend, family):
    """Changing an earlier document changes no later document's states; and each document's states are those of
    the document alone in a row of its own, so positions (learned or rotary) restart at its <|endoftext|>."""
    model, x = tiny(family), rows_with_documents()
    changed = x.clone()
    changed[0, :5] = torch.arange(100, 105)
    changed[1, 3:9] = torch.arange(200, 206)
    changed[1, 3] = EOT
    with torch.no_grad(), kernels.use_backend(backend):
        states, states_changed = packed(model, x), packed(model, changed)
        torch.testing.assert_close(states_changed[0, 5:], states[0, 5:], rtol=0, atol=0)
        torch.testing.assert_close(states_changed[1, 9:], states[1, 9:], rtol=0, atol=0)
        assert not torch.allclose(states_changed[0, :5], states[0, :5])  # the changed documents did change
        for row, start, end in ((0, 0, 5), (0, 5, 12), (1, 3, 9), (1, 9, 12)):
            alone = model.hidden_states(x[row:row + 1, start:end])[0]
            torch.testing.assert_close(states[row, start:end], alone, rtol=1e-5, atol=1e-5)
        unmasked = model.hidden_states(x)
        assert not torch.allclose(unmasked[0, 5:], states[0, 5:])  # without the spans, documents see each other


def test_packed_loss_trains_and_is_checked():
    model, x = tiny("llama"), rows_with_documents()
    docs, positions = document_spans(x.numpy(), EOT)
    loss = model(x, x.roll(-1, 1), docs, positions)
    loss.backward()
    assert loss.isfinite() and all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="docs and positions .* both or neither"):
        model(x, x, docs)
    with pytest.raises(ValueError, match="docs must be int32"):
        model(x, x, docs.long(), positions)
    with pytest.raises(ValueError, match=r"positions must be an integer tensor of shape \(2, 12\)"):
        model(x, x, docs, positions[:, :6])
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 12\).*\[-1, 5\]"):
        model(x, x, docs, positions - 1)
    with pytest.raises(ValueError, match="cu_seqlens"):  # the kernel's own check of the spans
        model(x, x, torch.tensor([0, 5, 30], dtype=torch.int32), positions)


def test_window_sees_only_recent_tokens_and_global_layers_see_all():
    """One layer with a window of 4: the state at t depends on tokens t-3..t only; global_every=1 makes the one
    layer global again. Per layer, global_every=2 leaves every second layer global (Gemma 2's pattern)."""
    x = torch.randint(1, 300, (1, 12), generator=torch.Generator().manual_seed(2))
    changed = x.clone()
    changed[0, 3] = 299 - changed[0, 3]
    for family in FAMILIES:
        local = tiny(family, n_layer=1, window=4)
        with torch.no_grad():
            a, b = local.hidden_states(x), local.hidden_states(changed)
        torch.testing.assert_close(b[0, 7:], a[0, 7:], rtol=0, atol=0)  # 3 is outside every window from 7 on
        assert not torch.allclose(b[0, 3:7], a[0, 3:7])
        whole = tiny(family, n_layer=1, window=4, global_every=1)
        with torch.no_grad():
            assert not torch.allclose(whole.hidden_states(changed)[0, 7:], whole.hidden_states(x)[0, 7:])
    config = ModelConfig(n_layer=6, window=128, global_every=2)
    assert [config.layer_window(i) for i in range(6)] == [128, None, 128, None, 128, None]
    gemma3 = ModelConfig(n_layer=12, window=1024, global_every=6)
    assert [i for i in range(12) if gemma3.layer_window(i) is None] == [5, 11]
    assert [b.attn.window_size for b in tiny(n_layer=2, window=4, global_every=2).transformer.h] == [(3, 0), (-1, -1)]
    encoder = Classifier(ModelConfig(vocab_size=300, block_size=16, n_layer=1, n_head=2, n_embd=32, window=4,
                                     num_classes=2))
    assert encoder.transformer.h[0].attn.window_size == (3, 3)  # bidirectional: as many tokens ahead


def test_window_with_documents_and_kv_cache():
    """The window holds within packed documents, and incremental decoding with a cache equals recomputation."""
    model, x = tiny("llama", window=3), rows_with_documents()
    with torch.no_grad():
        states = packed(model, x)
        torch.testing.assert_close(states[0, 5:], model.hidden_states(x[:1, 5:])[0], rtol=1e-5, atol=1e-5)
        full = model(x[:1])
        from fastlm.model import KVCache
        cache = KVCache.empty(model.config, 1, torch.device("cpu"), torch.float32)
        model(x[:1, :8], cache=cache)
        for t in range(8, 12):
            last = model(x[:1, t:t + 1], cache=cache)
        torch.testing.assert_close(last, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fields, message", [
    ({"window": 0}, "window must be a positive number of tokens"),
    ({"global_every": -1}, "global_every must be >= 0"),
    ({"global_every": 2}, r"global_every \(2\) .* needs a window"),
    ({"task": "classify", "document_mask": True}, "document_mask applies to task lm"),
])
def test_config_errors(fields, message):
    cfg = Config()
    for name, value in fields.items():
        cfg.set(name, value)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


def test_config_fields_parse_from_the_command_line():
    cfg = Config()
    for name, value in (("window", "256"), ("global_every", "6"), ("document_mask", "true")):
        cfg.set(name, value)
    assert (cfg.model.window, cfg.model.global_every, cfg.train.document_mask) == (256, 6, True)
    cfg.set("window", "none")
    assert cfg.model.window is None


def test_a_windowed_model_is_not_exported_as_one_without():
    with pytest.raises(CheckpointError, match="sliding window .*window=4"):
        hf_config_from_model(ModelConfig(window=4))


def test_resume_with_document_mask_is_bit_exact(tmp_path):
    cfg = micro_config(write_short_documents(tmp_path / "docs"), document_mask=True)
    straight = tmp_path / "straight"
    train(cfg, straight, progress=False)
    resumed = tmp_path / "resumed"
    stop_after_checkpoint(straight, resumed, "step_00000008", 7)
    train(cfg, resumed, resume_from=resumed / "checkpoints" / "step_00000004", progress=False)
    assert losses(resumed) == losses(straight) and losses(resumed, "val_loss") == losses(straight, "val_loss")
    # The masking changes what is computed: the same run without it has other losses.
    cfg.train.document_mask = False
    train(cfg, tmp_path / "unmasked", progress=False)
    assert losses(tmp_path / "unmasked")[8] != losses(straight)[8]
