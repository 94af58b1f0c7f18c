"""Sampling from a trained run: temperature, top-k, top-p, a seed, and a KV cache.

The prompt is run once to fill the cache (prefill), then each new token costs
one position. When the context reaches ``block_size`` the window slides: the
last ``block_size // 2`` tokens are run again to refill the cache. Without the
cache (``use_cache=False``) the same window is recomputed every step, which is
how the tests check the cache.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer

from .checkpoint import CheckpointError, list_checkpoints, load_weights, verify_checkpoint
from .config import Config
from .model import GPT, KVCache
from .tokenizer import eot_id, load_tokenizer


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None,
             device: torch.device | str = "cpu") -> tuple[GPT, Tokenizer, Config]:
    """The model of a run (its latest checkpoint unless one is named), its tokenizer and config."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise CheckpointError(f"{run_dir} is not a fastlm run directory (no config.json)")
    cfg = Config.from_dict(json.loads((run_dir / "config.json").read_text()))
    if checkpoint is None:
        found = list_checkpoints(run_dir)
        if not found:
            raise CheckpointError(f"run {run_dir} has no checkpoint yet")
        checkpoint = found[-1]
    verify_checkpoint(Path(checkpoint))
    model = GPT(cfg.model)
    load_weights(Path(checkpoint), model)
    return model.to(device).eval(), load_tokenizer(run_dir / "tokenizer.json"), cfg


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator) -> torch.Tensor:
    """One token per row of ``logits`` (B, V); temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the more likely ones already reach top_p; the most likely always stays.
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: GPT, prompt: list[int], max_new_tokens: int, *, num_samples: int = 1,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, use_cache: bool = True) -> list[list[int]]:
    """``num_samples`` continuations of ``prompt`` (token ids), each ``max_new_tokens`` long."""
    if not prompt:
        raise ValueError("prompt must hold at least one token")
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError("need temperature >= 0, top_k >= 1 and 0 < top_p <= 1")
    device = next(model.parameters()).device
    block = model.config.block_size
    generator = torch.Generator(device).manual_seed(seed)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    cache_dtype = torch.bfloat16 if device.type == "cuda" else next(model.parameters()).dtype
    tokens = torch.tensor([prompt] * num_samples, device=device)  # (B, T)
    window = max(0, tokens.size(1) - block + 1)  # first position the model sees
    cache, fed = None, 0  # the cache holds tokens[:, window:fed]
    for _ in range(max_new_tokens):
        if tokens.size(1) - window >= block:
            window = tokens.size(1) - block // 2
            cache = None
        with autocast:
            if not use_cache:
                logits = model(tokens[:, window:])
            else:
                if cache is None:
                    cache, fed = KVCache.empty(model.config, num_samples, device, cache_dtype), window
                logits = model(tokens[:, fed:], cache=cache)
                fed = tokens.size(1)
        next_token = sample_next(logits, temperature, top_k, top_p, generator)
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
    return tokens[:, len(prompt):].tolist()


def complete(model: GPT, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, **kwargs) -> list[str]:
    """Prompt text in, one text per sample out, each cut at the first end-of-document token."""
    eot = eot_id(tokenizer)
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids if prompt else [eot]
    texts = []
    for sample in generate(model, ids, max_new_tokens, **kwargs):
        if eot in sample:
            sample = sample[:sample.index(eot)]
        texts.append(prompt + tokenizer.decode(sample))
    return texts
