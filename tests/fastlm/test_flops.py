"""Model FLOPs for MFU: attention is counted over the (query, key) pairs its mask lets through, each
layer with its own window, checked against a brute-force count of the reference kernels' mask."""

import dataclasses

import numpy as np
import pytest

from fastlm.config import ModelConfig, attention_pairs
from fastlm.metrics import classifier_flops, seq2seq_flops
from fastlm.model import SelfAttention, build_model
from kernels.reference.attention import visibility, window_bounds


def visible_pairs(attn: SelfAttention, length: int) -> int:
    """The (query, key) pairs ``attn``'s mask lets through over a sequence of ``length`` tokens, counted."""
    left, right = window_bounds(attn.causal, attn.window_size)
    return int(visibility(length, length, 0, left, right, "cpu").sum())


def brute_force_flops(model, lengths, stack=None) -> float:
    """Training FLOPs of the self-attention matmuls of ``model`` (those under ``stack``) over sequences of
    ``lengths``: 4 * head_dim per head and visible pair forward, three times that with the backward."""
    layers = [m for name, m in model.named_modules()
              if isinstance(m, SelfAttention) and (stack is None or name.startswith(stack))]
    return sum(12.0 * a.n_head * a.head_dim * visible_pairs(a, n) for a in layers for n in lengths)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_pairs_are_those_the_mask_lets_through(causal):
    for window in (None, 1, 2, 5, 16):
        attn = SelfAttention(ModelConfig(n_embd=8, n_head=2), causal=causal, window=window)
        lengths = np.arange(1, 13)
        assert attention_pairs(lengths, window, causal).tolist() == [visible_pairs(attn, n) for n in lengths], window
        assert attention_pairs(7, window, causal) == visible_pairs(attn, 7)


WINDOWED = ModelConfig(vocab_size=320, block_size=32, n_layer=4, n_head=2, n_embd=16, window=5, global_every=2)


@pytest.mark.parametrize("window", [None, 5])
def test_language_model_flops_count_each_layers_window(window):
    cfg = dataclasses.replace(WINDOWED, window=window, global_every=2 if window else 0)
    weights = 6.0 * (cfg.n_layer * cfg.layer_weights() + cfg.vocab_size * cfg.n_embd)
    model = build_model(cfg)
    for length in (1, 5, 12, 32):
        assert cfg.flops_per_token(length) * length == pytest.approx(
            weights * length + brute_force_flops(model, [length]), rel=1e-12)
    documents = np.array([1, 4, 9, 18])  # a packed row's (document_mask): attention within each
    assert cfg.lm_flops(documents) == pytest.approx(weights * 32 + brute_force_flops(model, documents), rel=1e-12)


def test_classifier_and_seq2seq_flops_count_each_layers_window():
    full = dataclasses.replace(WINDOWED, window=None, global_every=0, num_classes=3, n_encoder_layer=3)
    windowed = dataclasses.replace(full, window=5, global_every=2)
    src_lens, tgt_lens = np.array([3, 9, 17, 32]), np.array([2, 6, 11, 16])
    for cfg in (full, windowed):
        weights = 6.0 * cfg.n_layer * cfg.layer_weights() * src_lens.sum()
        assert classifier_flops(cfg, src_lens) == pytest.approx(
            weights + brute_force_flops(build_model(cfg, "classify"), src_lens), rel=1e-12)
    # The windowed encoder-decoder's FLOPs are the global one's less exactly the self-attention its windows
    # take away (cross-attention has no window).
    saved = 0.0
    for stack, lengths in (("encoder", src_lens), ("decoder", tgt_lens)):
        saved += brute_force_flops(build_model(full, "seq2seq"), lengths, stack)
        saved -= brute_force_flops(build_model(windowed, "seq2seq"), lengths, stack)
    assert saved > 0
    assert seq2seq_flops(full, src_lens, tgt_lens) - seq2seq_flops(windowed, src_lens, tgt_lens) == pytest.approx(
        saved, rel=1e-12)
