"""Transformers on the fused kernels: the decoder-only LM (GPT-2 and Llama as two settings of one
config), a bidirectional encoder classifier and an encoder-decoder, built from the same blocks.

The hot ops run through :mod:`kernels`: attention, rotary positions, the SwiGLU
activation, the residual add fused into the following norm (``add_layer_norm`` /
``add_rms_norm``) and the head fused into the loss (``linear_cross_entropy``), so training never materialises the
(tokens x vocab) logits. Which implementation runs (Triton or the PyTorch
reference) is the kernels package's choice, switched from outside with
``kernels.use_backend``; the model knows nothing about it, nor about
parallelism or logging.

Parameter names follow GPT-2 (nanoGPT's layout), so importing weights is a key
mapping:

    GPT-2 (HF)                         fastlm
    transformer.wte / wpe / ln_f       transformer.wte / wpe / ln_f
    transformer.h.i.ln_1 / ln_2        transformer.h.i.ln_1 / ln_2
    transformer.h.i.attn.c_attn        transformer.h.i.attn.c_attn   (HF Conv1D: transpose)
    transformer.h.i.attn.c_proj        transformer.h.i.attn.c_proj   (transpose)
    transformer.h.i.mlp.c_fc / c_proj  transformer.h.i.mlp.c_fc / c_proj (transpose)

    Llama (HF)                          fastlm
    model.embed_tokens / model.norm     transformer.wte / transformer.ln_f
    layers.i.input_layernorm            transformer.h.i.ln_1
    layers.i.post_attention_layernorm   transformer.h.i.ln_2
    layers.i.self_attn.{q,k,v}_proj     transformer.h.i.attn.c_attn   (concatenated q, k, v rows)
    layers.i.self_attn.o_proj           transformer.h.i.attn.c_proj
    layers.i.mlp.{gate,up}_proj         transformer.h.i.mlp.c_fc      (concatenated gate, up rows)
    layers.i.mlp.down_proj              transformer.h.i.mlp.c_proj
    lm_head                             lm_head

Rotary embeddings (``kernels.rope``) use the rotate-half convention of HF's
Llama, so its q/k weights need no permutation; the SwiGLU activation
(``kernels.swiglu_packed``) reads the gate and up halves of ``c_fc``'s output in
place.

The encoder (:class:`Classifier`, and the first half of :class:`Seq2Seq`) is the
same stack with bidirectional attention; right padding is masked by passing the
true lengths to the attention kernel as ``kv_lens``, so a padded position is never
a key and changing it changes no real position's output. The decoder of
:class:`Seq2Seq` adds cross-attention (queries from the target, keys and values
from the encoder output, ``kv_lens`` again) between self-attention and the MLP.

Self-attention may be local: ``ModelConfig.window`` and ``global_every`` give each
layer a sliding window (the kernel's ``window_size``) or none. A language model's
rows may pack documents that must not see each other: the batch then brings the
documents' spans (``docs``, flash-attention's ``cu_seqlens`` over the flattened
rows) and each token's position in its document, and attention runs through
``kernels.varlen_attention``, one sequence per document.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import kernels

from .config import ModelConfig
from .precision import active_dtype


def add_norm(norm: nn.Module, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(x + residual), x + residual)`` in one fused pass; ``residual=None`` starts the stream.

    The residual stream keeps the dtype it started in (fp32 under autocast), so a
    branch output computed in bf16 is cast up before it is added.
    """
    if residual is None:
        return norm(x), x
    x = x.to(residual.dtype)
    if isinstance(norm, nn.RMSNorm):
        return kernels.add_rms_norm(x, residual, norm.normalized_shape, norm.weight, norm.eps)
    return kernels.add_layer_norm(x, residual, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _dropout(config: ModelConfig) -> nn.Module:
    """Dropout at ``config.dropout``; none at all (not even a no-op call) when it is 0."""
    return nn.Dropout(config.dropout) if config.dropout else nn.Identity()


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return kernels.nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return kernels.nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


# ----------------------------------------------------------------------------- KV cache


@dataclass
class KVCache:
    """Keys and values of every layer for incremental decoding; ``length`` positions are filled.
    An encoder-decoder also keeps each layer's cross-attention keys and values of the source in
    ``cross``, computed by the layer on its first step."""

    k: list[torch.Tensor]  # per layer (B, n_kv_head, block_size, head_dim)
    v: list[torch.Tensor]
    length: int = 0
    cross: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, device: torch.device, dtype: torch.dtype) -> "KVCache":
        shape = (batch, config.kv_heads, config.block_size, config.head_dim)
        return cls([torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)],
                   [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)],
                   cross=[None] * config.n_layer)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the rows ``index`` (beam search: each surviving beam continues its parent's cache)."""
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]
        self.cross = [None if kv is None else (kv[0].index_select(0, index), kv[1].index_select(0, index))
                      for kv in self.cross]


# ----------------------------------------------------------------------------- blocks


class SelfAttention(nn.Module):
    """Multi-head (or grouped-query) self-attention; causal for decoders, bidirectional for encoders; over the
    whole sequence or a sliding ``window`` of it (the ``window`` most recent tokens, itself included, and as many
    ahead when not causal). Over packed rows (``docs``) a token attends only within its own document."""

    def __init__(self, config: ModelConfig, causal: bool = True, window: int | None = None):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        qkv = (config.n_head + 2 * config.kv_heads) * config.head_dim
        self.c_attn = nn.Linear(config.n_embd, qkv, bias=config.bias)
        self.c_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=config.bias)
        self.rotary = config.position == "rope"
        self.causal = causal
        # flash-attention's (left, right) keys either side of the diagonal; -1: unbounded.
        self.window_size = (-1, -1) if window is None else (window - 1, 0 if causal else window - 1)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, ...] | None,
                cache: KVCache | None, layer: int, kv_lens: torch.Tensor | None = None,
                docs: torch.Tensor | None = None) -> torch.Tensor:
        """``docs``: the rows' documents as int32 prefix sums over the flattened (B * T) tokens
        (``cu_seqlens``, see :func:`fastlm.data.document_spans`); none crosses a row."""
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin, positions = rope
            q, k = kernels.rope(q, k, cos, sin, position_ids=positions)
        if cache is not None:
            start = cache.length
            cache.k[layer][:, :, start:start + T] = k
            cache.v[layer][:, :, start:start + T] = v
            k, v = cache.k[layer][:, :, :start + T], cache.v[layer][:, :, :start + T]
        if docs is not None:  # each document of the packed rows its own sequence; T bounds their lengths
            q, k, v = (t.transpose(1, 2).reshape(B * T, t.size(1), self.head_dim) for t in (q, k, v))
            y = kernels.varlen_attention(q, k, v, docs, docs, T, T, causal=self.causal, window_size=self.window_size)
            return self.c_proj(y.reshape(B, T, self.n_head * self.head_dim))
        # Causal masking (and the window) is bottom-right aligned, so T new queries against a longer
        # cached key sequence see every cached position and their own prefix.
        y = kernels.attention(q, k, v, causal=self.causal, kv_lens=kv_lens, window_size=self.window_size)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # from (B, H, T, D)
        return self.c_proj(y)


class CrossAttention(nn.Module):
    """Decoder queries over the encoder output ("memory"). Its keys and values depend on the
    source alone, so decoding computes them once and keeps them in the KV cache."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.n_embd, config.n_head * config.head_dim, bias=config.bias)
        self.kv_proj = nn.Linear(config.n_embd, 2 * config.kv_heads * config.head_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=config.bias)

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, Hkv, S, D) of the encoder output ``memory`` (B, S, n_embd)."""
        B, S, _ = memory.shape
        k, v = self.kv_proj(memory).view(B, S, 2, self.n_kv_head, self.head_dim).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x: torch.Tensor, memory: torch.Tensor, src_lens: torch.Tensor,
                cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if cache is None:
            k, v = self.memory_kv(memory)
        else:
            if cache.cross[layer] is None:
                cache.cross[layer] = self.memory_kv(memory)
            k, v = cache.cross[layer]
        y = kernels.attention(q, k.to(q.dtype), v.to(q.dtype), causal=False, kv_lens=src_lens)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        width = config.hidden * (2 if self.swiglu else 1)  # SwiGLU: gate and up projections in one matmul
        self.c_fc = nn.Linear(config.n_embd, width, bias=config.bias)
        self.c_proj = nn.Linear(config.hidden, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.swiglu:
            h = kernels.swiglu_packed(h)  # silu(gate) * up of the two halves, read in place
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's gelu_new
        return self.c_proj(h)


class Block(nn.Module):
    """Pre-norm block over a split residual stream: ``h`` is the last branch output not yet
    added to ``residual``, so each add happens inside the next norm's fused kernel."""

    def __init__(self, config: ModelConfig, causal: bool = True, window: int | None = None):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = SelfAttention(config, causal, window)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)
        self.drop = _dropout(config)  # on each branch's output, before it joins the residual

    def forward(self, h, residual, rope, cache, layer, kv_lens=None, docs=None):
        x, residual = add_norm(self.ln_1, h, residual)
        h = self.drop(self.attn(x, rope, cache, layer, kv_lens, docs))
        x, residual = add_norm(self.ln_2, h, residual)
        return self.drop(self.mlp(x)), residual


class DecoderBlock(nn.Module):
    """Causal self-attention, cross-attention to the encoder output, MLP; pre-norm, split residual."""

    def __init__(self, config: ModelConfig, window: int | None = None):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = SelfAttention(config, causal=True, window=window)
        self.ln_2 = make_norm(config)
        self.cross = CrossAttention(config)
        self.ln_3 = make_norm(config)
        self.mlp = MLP(config)
        self.drop = _dropout(config)

    def forward(self, h, residual, rope, cache, layer, memory, src_lens):
        x, residual = add_norm(self.ln_1, h, residual)
        h = self.drop(self.attn(x, rope, cache, layer))
        x, residual = add_norm(self.ln_2, h, residual)
        h = self.drop(self.cross(x, memory, src_lens, cache, layer))
        x, residual = add_norm(self.ln_3, h, residual)
        return self.drop(self.mlp(x)), residual


# ----------------------------------------------------------------------------- shared by the models


class _Transformer(nn.Module):
    """Positions (a learned table or rotary buffers), embedding of a token stream, GPT-2's init:
    what the three models below share."""

    config: ModelConfig

    def _position_modules(self, config: ModelConfig) -> dict[str, nn.Module]:
        """``{"wpe": table}`` for learned positions; for rotary ones, registers the cos/sin buffers (once)."""
        if config.position == "learned":
            return {"wpe": nn.Embedding(config.block_size, config.n_embd)}
        if not hasattr(self, "rope_cos"):
            # Copies of the shared cached tables: buffers follow the model's .to() and dtype casts.
            cos, sin = kernels.rope_tables(config.block_size, config.head_dim, theta=config.rope_theta)
            self.register_buffer("rope_cos", cos.clone(), persistent=False)
            self.register_buffer("rope_sin", sin.clone(), persistent=False)
        return {}

    def _embed(self, stack: nn.ModuleDict, h: torch.Tensor, start: int, positions: torch.Tensor | None = None):
        """Token embeddings ``h`` (B, T, C) at positions ``start..start+T`` of ``stack``, or at ``positions``
        (B, T) (each token's own, as in packed rows): with learned positions added, or with the rotary tables
        for those positions."""
        T = h.size(1)
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        rope = None  # (cos, sin, None) for this call's positions, or (cos, sin, positions (B, T)) into the tables
        if "wpe" in stack:
            h = h + stack.wpe(torch.arange(start, start + T, device=h.device) if positions is None else positions)
        elif positions is None:
            rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T], None)
        else:
            rope = (self.rope_cos, self.rope_sin, positions)  # the tables, indexed per token by the kernel
        if self.config.dropout:
            h = F.dropout(h, self.config.dropout, self.training)
        return h, rope

    def reset_parameters(self) -> None:
        """GPT-2's init: N(0, 0.02), output projections scaled by 1/sqrt(2 * n_layer), zero biases."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                if name.endswith("bias"):
                    nn.init.zeros_(p)
                else:
                    nn.init.ones_(p)  # norm weights
            elif name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)

    def blocks(self) -> list[nn.Module]:
        """The repeated blocks, in order: the units FSDP shards."""
        raise NotImplementedError


def _check_lengths(idx: torch.Tensor, lens: torch.Tensor, name: str) -> None:
    """``lens`` (B,) integer, each in [1, T] for token ids ``idx`` (B, T): a padded batch's true lengths.

    The range check reads values (a host sync), so like the kernels' own it is skipped inside
    ``kernels.unchecked()`` and while compiling: the trainer's batches are checked where they are made."""
    if lens.dim() != 1 or lens.size(0) != idx.size(0) or lens.dtype.is_floating_point or lens.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of shape ({idx.size(0)},), one length per sequence; "
                         f"got {lens.dtype} of shape {tuple(lens.shape)}")
    if not kernels.checks_enabled():
        return
    lo, hi = lens.min().item(), lens.max().item()
    if lo < 1 or hi > idx.size(1):
        raise ValueError(f"{name} must lie in [1, {idx.size(1)}] (the padded length); got values in [{lo}, {hi}]")


def _check_documents(idx: torch.Tensor, docs: torch.Tensor, positions: torch.Tensor) -> None:
    """``docs`` int32 (documents + 1,) and ``positions`` integer (B, T) for token ids ``idx`` (B, T). Their values
    (prefix sums ending at B * T, positions in [0, T)) are checked by the attention kernel and, with a host sync,
    here, both skipped inside ``kernels.unchecked()`` and while compiling: the trainer makes them valid."""
    if docs.dim() != 1 or docs.dtype != torch.int32 or docs.numel() < 2:
        raise ValueError(f"docs must be int32 prefix sums of the documents' lengths, shape (documents + 1,); "
                         f"got {docs.dtype} of shape {tuple(docs.shape)}")
    if positions.shape != idx.shape or positions.dtype.is_floating_point or positions.dtype == torch.bool:
        raise ValueError(f"positions must be an integer tensor of shape {tuple(idx.shape)}, one per token; "
                         f"got {positions.dtype} of shape {tuple(positions.shape)}")
    if kernels.checks_enabled() and idx.numel():
        lo, hi = positions.min().item(), positions.max().item()
        if lo < 0 or hi >= idx.size(1):
            raise ValueError(f"positions must lie in [0, {idx.size(1)}) (a document's place in its row); "
                             f"got values in [{lo}, {hi}]")


def _encode(model: _Transformer, stack: nn.ModuleDict, h: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Bidirectional blocks of ``stack`` over embeddings ``h`` (B, T, C), right padding masked by ``lens``;
    the final normed hidden states (B, T, C)."""
    h, rope = model._embed(stack, h, 0)
    residual = None
    for layer, block in enumerate(stack.h):
        h, residual = block(h, residual, rope, None, layer, lens)
    return add_norm(stack.ln_f, h, residual)[0]


# ----------------------------------------------------------------------------- the models


class GPT(_Transformer):
    """The decoder-only language model."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        modules = {"wte": nn.Embedding(config.vocab_size, config.n_embd), **self._position_modules(config)}
        modules["h"] = nn.ModuleList([Block(config, window=config.layer_window(i)) for i in range(config.n_layer)])
        modules["ln_f"] = make_norm(config)
        self.transformer = nn.ModuleDict(modules)
        # A tied head is the embedding matrix itself: no separate parameter, nothing shared in checkpoints.
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.reset_parameters()

    def blocks(self) -> list[nn.Module]:
        return list(self.transformer.h)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.transformer.wte.weight if self.lm_head is None else self.lm_head.weight

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None, docs: torch.Tensor | None = None,
                      positions: torch.Tensor | None = None) -> torch.Tensor:
        """Final normed hidden states (B, T, n_embd) for token ids ``idx`` (B, T); with ``docs`` and
        ``positions``, of rows that pack documents (see :meth:`forward`)."""
        if (docs is None) != (positions is None):
            raise ValueError("docs and positions describe packed documents together: pass both or neither")
        if docs is not None:
            if cache is not None:
                raise ValueError("packed documents (docs) are for training and evaluation, not a KV cache")
            _check_documents(idx, docs, positions)
        start = 0 if cache is None else cache.length
        h, rope = self._embed(self.transformer, self.transformer.wte(idx), start, positions)
        residual = None
        for layer, block in enumerate(self.transformer.h):
            h, residual = block(h, residual, rope, cache, layer, docs=docs)
        x, _ = add_norm(self.transformer.ln_f, h, residual)
        if cache is not None:
            cache.length += idx.size(1)
        return x

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, docs: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, *, cache: KVCache | None = None) -> torch.Tensor:
        """With ``targets`` (B, T): the mean cross-entropy loss, through the fused head + loss
        (no logits tensor). Without: logits (B, vocab) of the last position, for sampling.

        Rows that pack several documents, each attending only within itself, come with ``docs``, the
        int32 prefix sums of the documents' lengths over the flattened (B * T) tokens (flash-attention's
        ``cu_seqlens``; no document crosses a row), and ``positions`` (B, T), each token's position in its
        document: :func:`fastlm.data.document_spans` makes both."""
        x = self.hidden_states(idx, cache, docs, positions)
        weight = self.head_weight
        dtype = active_dtype(x)
        if targets is not None:
            return kernels.linear_cross_entropy(x.reshape(-1, x.size(-1)).to(dtype), weight.to(dtype),
                                                targets.reshape(-1))
        return F.linear(x[:, -1], weight)


class Classifier(_Transformer):
    """A bidirectional encoder, mean-pooled over each sequence's real tokens, and a linear head over
    ``config.num_classes`` labels."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.num_classes < 2:
            raise ValueError(f"a classifier needs num_classes >= 2, got {config.num_classes}")
        self.config = config
        modules = {"wte": nn.Embedding(config.vocab_size, config.n_embd), **self._position_modules(config)}
        modules["h"] = nn.ModuleList([Block(config, causal=False, window=config.layer_window(i))
                                      for i in range(config.n_layer)])
        modules["ln_f"] = make_norm(config)
        self.transformer = nn.ModuleDict(modules)
        self.head = nn.Linear(config.n_embd, config.num_classes)
        self.reset_parameters()

    def blocks(self) -> list[nn.Module]:
        return list(self.transformer.h)

    def forward(self, idx: torch.Tensor, lens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids ``idx`` (B, T) right-padded to T, true lengths ``lens`` (B,). With ``labels`` (B,):
        the mean cross-entropy loss; without: logits (B, num_classes)."""
        _check_lengths(idx, lens, "lens")
        x = _encode(self, self.transformer, self.transformer.wte(idx), lens)
        real = (torch.arange(idx.size(1), device=idx.device) < lens[:, None]).to(x.dtype)  # (B, T)
        pooled = (x * real[..., None]).sum(dim=1) / lens[:, None].to(x.dtype)
        logits = self.head(pooled)
        if labels is None:
            return logits
        return kernels.cross_entropy(logits, labels)


class Seq2Seq(_Transformer):
    """An encoder and a causal decoder with cross-attention, sharing one token embedding (and,
    with ``tie_embeddings``, the output head). The encoder has ``config.encoder_layers`` blocks,
    the decoder ``config.n_layer``; each has its own positions and final norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.encoder = nn.ModuleDict({
            **self._position_modules(config),
            "h": nn.ModuleList([Block(config, causal=False, window=config.layer_window(i))
                                for i in range(config.encoder_layers)]),
            "ln_f": make_norm(config)})
        self.decoder = nn.ModuleDict({
            **self._position_modules(config),
            "h": nn.ModuleList([DecoderBlock(config, config.layer_window(i)) for i in range(config.n_layer)]),
            "ln_f": make_norm(config)})
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.reset_parameters()

    def blocks(self) -> list[nn.Module]:
        return [*self.encoder.h, *self.decoder.h]

    @property
    def head_weight(self) -> torch.Tensor:
        return self.wte.weight if self.lm_head is None else self.lm_head.weight

    def encode(self, src: torch.Tensor, src_lens: torch.Tensor) -> torch.Tensor:
        """The encoder output ("memory", (B, S, C), final-normed) for source ids ``src`` (B, S),
        right-padded, true lengths ``src_lens`` (B,)."""
        _check_lengths(src, src_lens, "src_lens")
        return _encode(self, self.encoder, self.wte(src), src_lens)

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor, src_lens: torch.Tensor,
               cache: KVCache | None = None) -> torch.Tensor:
        """Final normed decoder states (B, T, C) for target ids ``tgt`` (B, T) (continuing ``cache``)."""
        start = 0 if cache is None else cache.length
        h, rope = self._embed(self.decoder, self.wte(tgt), start)
        residual = None
        for layer, block in enumerate(self.decoder.h):
            h, residual = block(h, residual, rope, cache, layer, memory, src_lens)
        x, _ = add_norm(self.decoder.ln_f, h, residual)
        if cache is not None:
            cache.length += tgt.size(1)
        return x

    def forward(self, src: torch.Tensor, src_lens: torch.Tensor, tgt_in: torch.Tensor,
                tgt_out: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: decoder inputs ``tgt_in`` (B, T) (the target shifted right behind a start
        token). With ``tgt_out`` (B, T) (the next tokens, ``-100`` where padded): the mean cross-entropy
        over the real target tokens, through the fused head + loss. Without: logits (B, T, vocab)."""
        x = self.decode(tgt_in, self.encode(src, src_lens), src_lens)
        weight = self.head_weight
        if tgt_out is None:
            return F.linear(x, weight)
        dtype = active_dtype(x)
        return kernels.linear_cross_entropy(x.reshape(-1, x.size(-1)).to(dtype), weight.to(dtype),
                                            tgt_out.reshape(-1))

    def next_logits(self, tgt: torch.Tensor, memory: torch.Tensor, src_lens: torch.Tensor,
                    cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, vocab) for the token after ``tgt`` (the new tokens only, when ``cache`` holds the rest)."""
        return F.linear(self.decode(tgt, memory, src_lens, cache)[:, -1], self.head_weight)


MODELS = {"lm": GPT, "classify": Classifier, "seq2seq": Seq2Seq}


def build_model(config: ModelConfig, task: str = "lm") -> nn.Module:
    """The model for a training task: ``lm`` (GPT), ``classify`` (Classifier) or ``seq2seq`` (Seq2Seq)."""
    if task not in MODELS:
        raise ValueError(f"task must be one of {', '.join(MODELS)}; got {task!r}")
    return MODELS[task](config)
