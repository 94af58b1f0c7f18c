"""Inference from a trained run: sampling from a language model (temperature, top-k, top-p, a seed,
and a KV cache), greedy and beam-search decoding for the encoder-decoder, label prediction for the
classifier.

The prompt is run once to fill the cache (prefill), then each new token costs
one position. When the context reaches ``block_size`` the window slides: the
last ``block_size // 2`` tokens are run again to refill the cache. Without the
cache (``use_cache=False``) the same window is recomputed every step, which is
how the tests check the cache.

The encoder-decoder encodes the source once; its cross-attention keys and values
are computed once per layer, and the decoder's self-attention runs on a KV cache
that beam search reorders as beams are kept and dropped.

Each computes in the ``dtype`` it is given, a ``TrainConfig.dtype`` setting applied by
:mod:`fastlm.precision`: the command line passes the run's own, so a run trained in fp32 samples
in fp32 (the default, ``auto``, is bf16 autocast on a GPU).
"""

from __future__ import annotations


import torch
from torch import nn
from tokenizers import Tokenizer

from .batching import encode_texts, pad
from .model import GPT, Classifier, KVCache, Seq2Seq
from .precision import active_dtype, autocast_context
from .tokenizer import eot_id


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
             seed: int = 0, use_cache: bool = True, dtype: str = "auto",
             vocab_limit: int | None = None) -> list[list[int]]:
    """``num_samples`` continuations of ``prompt`` (token ids), each ``max_new_tokens`` long, computed in
    ``dtype`` (the run's ``TrainConfig.dtype``: see :mod:`fastlm.precision`); with ``vocab_limit``, ids at and
    past it (the model's vocabulary padded past its tokenizer's, which decodes them to nothing) are never drawn."""
    if not prompt:
        raise ValueError("prompt must hold at least one token")
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError("need temperature >= 0, top_k >= 1 and 0 < top_p <= 1")
    device = next(model.parameters()).device
    block = model.config.block_size
    generator = torch.Generator(device).manual_seed(seed)
    autocast = autocast_context(dtype, device)
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
                    cache, fed = KVCache.empty(model.config, num_samples, device, _cache_dtype(model)), window
                logits = model(tokens[:, fed:], cache=cache)
                fed = tokens.size(1)
        if vocab_limit is not None:
            logits[:, vocab_limit:] = float("-inf")
        next_token = sample_next(logits, temperature, top_k, top_p, generator)
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
    return tokens[:, len(prompt):].tolist()


def complete(model: GPT, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, **kwargs) -> list[str]:
    """Prompt text in, one text per sample out, each cut at the first end-of-document token."""
    eot = eot_id(tokenizer)
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids if prompt else [eot]
    texts = []
    for sample in generate(model, ids, max_new_tokens, vocab_limit=tokenizer.get_vocab_size(), **kwargs):
        if eot in sample:
            sample = sample[:sample.index(eot)]
        texts.append(prompt + tokenizer.decode(sample))
    return texts


# ----------------------------------------------------------------------------- encoder-decoder


def _padded(seqs: list, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists right-padded into (B, S), and their lengths (B,)."""
    if any(len(s) == 0 for s in seqs):
        raise ValueError("every source must hold at least one token")
    return pad(seqs, 0).to(device), torch.tensor([len(s) for s in seqs], device=device)


def _cut(ids: list[int], eot: int) -> list[int]:
    return ids[:ids.index(eot)] if eot in ids else ids


@torch.no_grad()
def decode_batch(model: Seq2Seq, sources: list, max_new_tokens: int, eot: int, *, beam_size: int = 1,
                 length_penalty: float = 1.0, use_cache: bool = True, fixed_steps: bool = False) -> list[list[int]]:
    """The decoded target ids (end token excluded) for each source (a list of token ids).

    ``beam_size=1`` is greedy decoding (:func:`greedy_decode`), larger beams are :func:`beam_search`.
    Decoding starts from the end token (the start token in training) and stops at it, or after
    ``max_new_tokens``; ``fixed_steps`` always runs them all (every rank the same number of forwards).
    """
    if beam_size < 1 or max_new_tokens < 1:
        raise ValueError(f"need beam_size >= 1 and max_new_tokens >= 1, got {beam_size} and {max_new_tokens}")
    if beam_size > 1:
        return beam_search(model, sources, max_new_tokens, eot, beam_size=beam_size, length_penalty=length_penalty,
                           use_cache=use_cache, fixed_steps=fixed_steps)
    return greedy_decode(model, sources, max_new_tokens, eot, use_cache=use_cache, fixed_steps=fixed_steps)


@torch.no_grad()
def greedy_decode(model: Seq2Seq, sources: list, max_new_tokens: int, eot: int, *, use_cache: bool = True,
                  fixed_steps: bool = False) -> list[list[int]]:
    """The most likely next token at every step, until the end token (see :func:`decode_batch`)."""
    device = next(model.parameters()).device
    src, src_lens = _padded(sources, device)
    memory = model.encode(src, src_lens)
    tokens = torch.full((len(sources), 1), eot, dtype=torch.long, device=device)
    done = torch.zeros(len(sources), dtype=torch.bool, device=device)
    cache = KVCache.empty(model.config, len(sources), device, _cache_dtype(model)) if use_cache else None
    for _ in range(max_new_tokens):
        logits = model.next_logits(tokens[:, -1:] if use_cache else tokens, memory, src_lens, cache)
        token = logits.argmax(dim=-1).masked_fill(done, eot)
        tokens = torch.cat([tokens, token[:, None]], dim=1)
        done |= token == eot
        if done.all() and not fixed_steps:
            break
    return [_cut(row, eot) for row in tokens[:, 1:].tolist()]


def _cache_dtype(model: nn.Module) -> torch.dtype:
    """The dtype keys and values are computed in: autocast's where it is on, else the weights'."""
    return active_dtype(next(model.parameters()))


@torch.no_grad()
def beam_search(model: Seq2Seq, sources: list, max_new_tokens: int, eot: int, *, beam_size: int,
                length_penalty: float = 1.0, use_cache: bool = True, fixed_steps: bool = False) -> list[list[int]]:
    """Beam search (see :func:`decode_batch`): each source keeps ``beam_size`` live partial targets,
    the best by summed log-probability. A candidate ending in the end token among a step's best
    ``beam_size`` is set aside as finished (the live beams are the best candidates that do not end);
    a source is done once it has ``beam_size`` finished targets. The answer is the target with the
    best ``score / length ** length_penalty`` (the end token counted in the length) among the
    finished ones and, for a source cut off by ``max_new_tokens``, its live ones. With one beam
    this is greedy decoding.
    """
    device = next(model.parameters()).device
    B, K = len(sources), beam_size
    src, src_lens = _padded(sources, device)
    src, src_lens = src.repeat_interleave(K, dim=0), src_lens.repeat_interleave(K)  # row b * K + k
    memory = model.encode(src, src_lens)
    tokens = torch.full((B * K, 1), eot, dtype=torch.long, device=device)
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # one live beam per source at the start, so the first step does not pick K copies
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]  # (normalised score, ids)
    done = [False] * B
    cache = KVCache.empty(model.config, B * K, device, _cache_dtype(model)) if use_cache else None
    for step in range(max_new_tokens):
        logits = model.next_logits(tokens[:, -1:] if use_cache else tokens, memory, src_lens, cache)
        logp = torch.log_softmax(logits.float(), dim=-1)
        V = logp.size(-1)
        top, index = (scores.view(B * K, 1) + logp).view(B, K * V).topk(2 * K, dim=-1)
        top, index = top.tolist(), index.tolist()
        parents, next_tokens, next_scores = [], [], []
        for b in range(B):
            live: list[tuple[int, int, float]] = []
            if not done[b]:
                for rank, (value, i) in enumerate(zip(top[b], index[b])):
                    parent, token = b * K + i // V, i % V
                    if value == float("-inf"):
                        break
                    if token == eot:
                        if rank < K:  # a finished target must be among the step's best K
                            ids = tokens[parent, 1:].tolist()
                            finished[b].append((value / (step + 1) ** length_penalty, ids))
                    else:
                        live.append((parent, token, value))
                        if len(live) == K:
                            break
                done[b] = len(finished[b]) >= K or not live
            live += [(b * K, eot, float("-inf"))] * (K - len(live))  # placeholders for a done source
            for parent, token, value in live:
                parents.append(parent)
                next_tokens.append(token)
                next_scores.append(value)
        parent = torch.tensor(parents, device=device)
        tokens = torch.cat([tokens[parent], torch.tensor(next_tokens, device=device)[:, None]], dim=1)
        scores = torch.tensor(next_scores, device=device).view(B, K)
        if cache is not None:
            cache.reorder(parent)
        if all(done) and not fixed_steps:
            break
    out = []
    for b in range(B):
        pool = list(finished[b])
        if not done[b]:  # cut off by max_new_tokens: its live beams compete too, unfinished
            length = tokens.size(1) - 1
            pool += [(scores[b, k].item() / length ** length_penalty, tokens[b * K + k, 1:].tolist())
                     for k in range(K) if scores[b, k].item() > float("-inf")]
        out.append(max(pool, key=lambda item: item[0])[1])
    return out


def translate(model: Seq2Seq, tokenizer: Tokenizer, texts: list[str], *, max_new_tokens: int, max_source_len: int,
              beam_size: int = 1, length_penalty: float = 1.0, batch_size: int = 16,
              dtype: str = "auto") -> list[str]:
    """The model's target text for each source text, computed in ``dtype`` (the run's ``TrainConfig.dtype``);
    sources longer than ``max_source_len`` tokens are truncated with a TruncationWarning."""
    eot = eot_id(tokenizer)
    sources = encode_texts(tokenizer, list(texts), max_source_len, "sources")
    device = next(model.parameters()).device
    out = []
    with autocast_context(dtype, device):
        for i in range(0, len(sources), batch_size):
            out += decode_batch(model, sources[i:i + batch_size], max_new_tokens, eot, beam_size=beam_size,
                                length_penalty=length_penalty)
    return [tokenizer.decode(ids) for ids in out]


@torch.no_grad()
def classify(model: Classifier, tokenizer: Tokenizer, labels: list[str], texts: list[str], *,
             max_len: int, batch_size: int = 32, dtype: str = "auto") -> list[dict[str, float]]:
    """Label probabilities of each text, most likely first, computed in ``dtype`` (the run's
    ``TrainConfig.dtype``); texts longer than ``max_len`` tokens are truncated with a TruncationWarning."""
    seqs = encode_texts(tokenizer, list(texts), max_len, "texts")
    device = next(model.parameters()).device
    out = []
    with autocast_context(dtype, device):
        for i in range(0, len(seqs), batch_size):
            x, lens = _padded(seqs[i:i + batch_size], device)
            probs = torch.softmax(model(x, lens).float(), dim=-1).cpu()
            for row in probs:
                order = row.argsort(descending=True).tolist()
                out.append({labels[j]: row[j].item() for j in order})
    return out
