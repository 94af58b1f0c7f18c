"""A decoder-only transformer: GPT-2 and Llama as two settings of one config.

The hot ops run through :mod:`kernels`: attention, the residual add fused into
the following norm (``add_layer_norm`` / ``add_rms_norm``) and the head fused
into the loss (``linear_cross_entropy``), so training never materialises the
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

Rotary embeddings use the rotate-half convention of HF's Llama, so its q/k
weights need no permutation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import kernels

from .config import ModelConfig


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's if it is on for ``t``'s device, else ``t``'s own."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


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


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return kernels.nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return kernels.nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


# ----------------------------------------------------------------------------- rotary positions


def rope_tables(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (block_size, head_dim), in the rotate-half layout."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    angles = torch.outer(torch.arange(config.block_size, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, H, T, D) by position; cos/sin are (T, D). Computed in fp32."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


# ----------------------------------------------------------------------------- KV cache


@dataclass
class KVCache:
    """Keys and values of every layer for incremental decoding; ``length`` positions are filled."""

    k: list[torch.Tensor]  # per layer (B, n_kv_head, block_size, head_dim)
    v: list[torch.Tensor]
    length: int = 0

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, device: torch.device, dtype: torch.dtype) -> "KVCache":
        shape = (batch, config.kv_heads, config.block_size, config.head_dim)
        return cls([torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)],
                   [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)])


# ----------------------------------------------------------------------------- blocks


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        qkv = (config.n_head + 2 * config.kv_heads) * config.head_dim
        self.c_attn = nn.Linear(config.n_embd, qkv, bias=config.bias)
        self.c_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=config.bias)
        self.rotary = config.position == "rope"

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            start = cache.length
            cache.k[layer][:, :, start:start + T] = k
            cache.v[layer][:, :, start:start + T] = v
            k, v = cache.k[layer][:, :, :start + T], cache.v[layer][:, :, :start + T]
        # Causal masking is bottom-right aligned, so T new queries against a longer
        # cached key sequence see every cached position and their own prefix.
        y = kernels.attention(q, k, v, causal=True)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.c_proj(y)


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
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's gelu_new
        return self.c_proj(h)


class Block(nn.Module):
    """Pre-norm block over a split residual stream: ``h`` is the last branch output not yet
    added to ``residual``, so each add happens inside the next norm's fused kernel."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, h, residual, rope, cache, layer):
        x, residual = add_norm(self.ln_1, h, residual)
        h = self.attn(x, rope, cache, layer)
        x, residual = add_norm(self.ln_2, h, residual)
        return self.mlp(x), residual


# ----------------------------------------------------------------------------- the model


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        modules = {"wte": nn.Embedding(config.vocab_size, config.n_embd)}
        if config.position == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        else:
            cos, sin = rope_tables(config)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        modules["h"] = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        modules["ln_f"] = make_norm(config)
        self.transformer = nn.ModuleDict(modules)
        # A tied head is the embedding matrix itself: no separate parameter, nothing shared in checkpoints.
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.reset_parameters()

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

    @property
    def head_weight(self) -> torch.Tensor:
        return self.transformer.wte.weight if self.lm_head is None else self.lm_head.weight

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final normed hidden states (B, T, n_embd) for token ids ``idx`` (B, T)."""
        B, T = idx.shape
        start = 0 if cache is None else cache.length
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        h = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if "wpe" in self.transformer:
            h = h + self.transformer.wpe(torch.arange(start, start + T, device=idx.device))
        else:
            rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T])
        residual = None
        for layer, block in enumerate(self.transformer.h):
            h, residual = block(h, residual, rope, cache, layer)
        x, _ = add_norm(self.transformer.ln_f, h, residual)
        if cache is not None:
            cache.length += T
        return x

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """With ``targets`` (B, T): the mean cross-entropy loss, through the fused head + loss
        (no logits tensor). Without: logits (B, vocab) of the last position, for sampling."""
        x = self.hidden_states(idx, cache)
        weight = self.head_weight
        dtype = _compute_dtype(x)
        if targets is not None:
            return kernels.linear_cross_entropy(x.reshape(-1, x.size(-1)).to(dtype), weight.to(dtype),
                                                targets.reshape(-1))
        return F.linear(x[:, -1], weight)
