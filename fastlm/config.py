"""Typed configuration: the model's shape, the training recipe, the named presets.

One flat namespace of field names across :class:`ModelConfig` and
:class:`TrainConfig`, so ``--n_layer 4`` or ``--set lr=1e-3`` on the command
line needs no prefix. Every override is parsed with the field's declared type
and checked by :meth:`Config.validate`; an unknown name or a bad value is an
error that lists what is valid.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np

from .jsonfile import read_json_object


def attention_pairs(lengths: Any, window: int | None, causal: bool) -> Any:
    """The (query, key) pairs attention computes over a sequence of ``lengths`` tokens (an int, or an
    array of lengths: elementwise): every query sees the keys within ``window`` of it (itself included;
    None: all), only earlier ones when ``causal``. The pairs ``window`` or more apart, ``k * (k + 1) / 2``
    of them each way with ``k = length - window``, are what a window leaves out."""
    lengths = np.asarray(lengths, dtype=np.int64)  # squares overflow int32 past 46,340 tokens
    far = 0 if window is None else np.maximum(lengths - window, 0)
    if causal:
        return lengths * (lengths + 1) // 2 - far * (far + 1) // 2
    return lengths * lengths - far * (far + 1)


class ConfigError(ValueError):
    """A configuration the user asked for cannot be built; the message says why and what is valid."""


# Sanity bounds, far above anything trained in practice, that catch a typo before it turns into an
# allocation failure, an overflow or a step that never ends.
MAX_SEED = 2**32 - 1  # each rank seeds torch with seed * 1_000_003 + rank, which must fit in 64 bits
MAX_LR = 10.0  # AdamW moves each weight by about lr a step: beyond ~1 every run diverges
MAX_VOCAB_SIZE = 2**24  # the tokenizer trainer allocates per possible token (1e9 aborts it); real ones are <= 2**18
MAX_TOKENS_PER_STEP = 2**30  # batch_size x grad_accum x seq_len: ~60x the largest published LLM batches
# An empty data path would read as the working directory: --data "$DATA" with DATA unset trained on whatever it held.
EMPTY_DATA = "data must be a path (or none: the built-in data set), got an empty string"


@dataclass
class ModelConfig:
    """The shape of a transformer; GPT-2 and Llama are two settings of it. The same fields shape the
    encoder classifier and the encoder-decoder (see ``TrainConfig.task``)."""

    vocab_size: int = 50304
    block_size: int = 1024  # longest sequence the model sees (learned positions, RoPE tables, KV cache)
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: Optional[int] = None  # None: n_head (multi-head); fewer: grouped-query attention
    n_embd: int = 768
    mlp_hidden: Optional[int] = None  # None: 4*n_embd for GELU, ~8/3*n_embd (multiple of 64) for SwiGLU
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    mlp: Literal["gelu", "swiglu"] = "gelu"
    position: Literal["learned", "rope"] = "learned"
    bias: bool = True
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02
    # Dropout on the embeddings and on each branch's output (attention, cross-attention, MLP) in training;
    # not inside attention, whose fused kernel has none.
    dropout: float = 0.0
    num_classes: int = 0  # task classify: number of labels (0: set from the data when training starts)
    n_encoder_layer: Optional[int] = None  # task seq2seq: encoder blocks (None: n_layer); the decoder has n_layer
    # Sliding-window attention (Mistral's and Gemma's sliding_window): each query sees the `window` most recent
    # tokens, itself included (causal; an encoder's, `window` - 1 on either side). None: every token before it.
    window: Optional[int] = None
    # With window: every global_every-th layer (the last of each group) attends globally, the rest locally, as
    # Gemma 2 (2) and Gemma 3 (6) do; 0: every layer is local.
    global_every: int = 0

    @property
    def encoder_layers(self) -> int:
        return self.n_layer if self.n_encoder_layer is None else self.n_encoder_layer

    def layer_window(self, layer: int) -> int | None:
        """The window of block ``layer`` (counted from 0 in its stack); None where it attends globally."""
        if self.window is None or (self.global_every and (layer + 1) % self.global_every == 0):
            return None
        return self.window

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp == "gelu":
            return 4 * self.n_embd
        return 64 * math.ceil(8 * self.n_embd / 3 / 64)

    def num_params(self) -> int:
        """Parameters counted from the shape (the tied head counted once)."""
        d, hd, kv = self.n_embd, self.head_dim, self.kv_heads
        attn = d * (self.n_head + 2 * kv) * hd + self.n_head * hd * d
        mlp = d * self.hidden * (3 if self.mlp == "swiglu" else 2)
        norms = 2 * d * (2 if self.norm == "layernorm" else 1)
        biases = 0
        if self.bias:
            biases = (self.n_head + 2 * kv) * hd + d + self.hidden * (2 if self.mlp == "swiglu" else 1) + d
        per_layer = attn + mlp + norms + biases
        emb = self.vocab_size * d + (self.block_size * d if self.position == "learned" else 0)
        head = 0 if self.tie_embeddings else self.vocab_size * d
        final_norm = d * (2 if self.norm == "layernorm" else 1)
        return self.n_layer * per_layer + emb + head + final_norm

    def layer_weights(self, cross_attention: bool = False) -> int:
        """Weights of one block's matmuls (attention and MLP; with ``cross_attention``, a decoder
        block's cross-attention queries and output too, whose keys and values run on the source)."""
        d, hd, kv = self.n_embd, self.head_dim, self.kv_heads
        weights = d * (self.n_head + 2 * kv) * hd + self.n_head * hd * d
        weights += d * self.hidden * (3 if self.mlp == "swiglu" else 2)
        if cross_attention:
            weights += 2 * self.n_head * hd * d
        return weights

    def attention_flops(self, lengths: Any, causal: bool, layers: int | None = None) -> float:
        """Training FLOPs (forward + backward) of self-attention's two matmuls in a stack of ``layers``
        blocks (default ``n_layer``), each with its :meth:`layer_window`, over sequences of ``lengths``
        tokens (an int or an array of them, on the host): 12 * n_head * head_dim per (query, key) pair
        the mask lets through (:func:`attention_pairs`), 4 * head_dim a head forward, twice that backward."""
        layers = self.n_layer if layers is None else layers
        pairs = sum(int(np.sum(attention_pairs(lengths, self.layer_window(i), causal))) for i in range(layers))
        return 12.0 * self.n_head * self.head_dim * pairs

    def lm_flops(self, lengths: Any) -> float:
        """Training FLOPs (forward + backward) of the decoder-only LM over sequences of ``lengths`` tokens
        (an int or an array of them: rows, or the documents packed in rows): 6 per weight of every matmul
        and token (the head included, the embedding lookups not), plus causal attention's (each layer's
        window included)."""
        weights = self.n_layer * self.layer_weights() + self.vocab_size * self.n_embd
        return 6.0 * weights * int(np.sum(lengths)) + self.attention_flops(lengths, causal=True)

    def flops_per_token(self, seq_len: int) -> float:
        """:meth:`lm_flops` per token of a sequence of ``seq_len`` tokens."""
        return self.lm_flops(seq_len) / seq_len


@dataclass
class TrainConfig:
    """The training recipe and where its data comes from."""

    # lm: next-token prediction (decoder-only); classify: text -> label (encoder + head); seq2seq: text -> text
    # (encoder-decoder). Each has a built-in default data set made from the Python standard library.
    task: Literal["lm", "classify", "seq2seq"] = "lm"
    # lm: a text file or a folder of them; classify: a .csv/.jsonl of text,label; seq2seq: a .jsonl (or .csv)
    # of source,target. None: the task's built-in data from the Python standard library.
    data: Optional[str] = None
    val_fraction: float = 0.05  # share of documents held out for validation
    seq_len: int = 256  # lm: tokens per sequence; classify/seq2seq: longest input (longer ones are truncated)
    # lm: each row is a window of the token stream, documents one after another with <|endoftext|> before each.
    # true: a token attends only to its own document's tokens in the row and positions restart at each
    # document (its <|endoftext|> at 0); false: to every earlier token of the row.
    document_mask: bool = False
    target_len: int = 64  # seq2seq: longest target in tokens, end token included (longer ones are truncated)
    batch_size: int = 16  # sequences per micro-batch, over all processes together
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # global gradient norm; 0 disables clipping
    eval_interval: int = 200
    eval_batches: int = 20
    log_interval: int = 10
    save_interval: int = 500
    keep_last: int = 3  # checkpoints kept on disk
    seed: int = 1337
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    backend: Literal["auto", "triton", "reference"] = "auto"  # kernels backend for the whole model
    compile: bool = False
    # Under torchrun: ddp (DistributedDataParallel) or fsdp (FSDP2, parameters, gradients and optimizer
    # state sharded across the processes); ignored in a single process.
    parallel: Literal["ddp", "fsdp"] = "ddp"

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # -- serialisation (config.json in a run directory)

    def to_dict(self) -> dict[str, Any]:
        return {"model": dataclasses.asdict(self.model), "train": dataclasses.asdict(self.train)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a JSON object with model and train sections, got {d!r:.60}")
        cfg = cls()
        for section in ("model", "train"):
            fields = d.get(section, {})
            if not isinstance(fields, dict):
                raise ConfigError(f"{section} must be a JSON object of fields, got {fields!r:.60}")
            for name, value in fields.items():
                cfg.set(name, value)
        cfg.validate()
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "Config":
        """The config in a ``config.json``; an error naming the file (and the field) when it is damaged."""
        d = read_json_object(Path(path), ConfigError)
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    # -- overrides

    def section_of(self, name: str) -> Any:
        for section in (self.model, self.train):
            if name in _field_types(type(section)):
                return section
        raise ConfigError(f"unknown config field {name!r}; valid fields:\n{describe_fields()}")

    def set(self, name: str, value: Any) -> None:
        """Set one field, parsing strings with the field's declared type."""
        section = self.section_of(name)
        kind = _field_types(type(section))[name]
        setattr(section, name, _coerce(name, value, kind))

    def validate(self) -> "Config":
        m, t = self.model, self.train
        positive = [("vocab_size", m.vocab_size), ("block_size", m.block_size), ("n_layer", m.n_layer),
                    ("n_head", m.n_head), ("n_embd", m.n_embd), ("seq_len", t.seq_len),
                    ("batch_size", t.batch_size), ("grad_accum", t.grad_accum), ("max_steps", t.max_steps),
                    ("eval_interval", t.eval_interval), ("eval_batches", t.eval_batches),
                    ("log_interval", t.log_interval), ("save_interval", t.save_interval),
                    ("keep_last", t.keep_last), ("norm_eps", m.norm_eps), ("rope_theta", m.rope_theta),
                    ("init_std", m.init_std), ("lr", t.lr), ("target_len", t.target_len)]
        for name, value in positive:
            if not value > 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        for name, value in (("min_lr", t.min_lr), ("warmup_steps", t.warmup_steps),
                            ("weight_decay", t.weight_decay), ("grad_clip", t.grad_clip)):
            if value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value}")
        if m.n_embd % m.n_head:
            raise ConfigError(f"n_embd ({m.n_embd}) must be divisible by n_head ({m.n_head})")
        if m.kv_heads <= 0 or m.n_head % m.kv_heads:
            raise ConfigError(f"n_kv_head ({m.n_kv_head}) must divide n_head ({m.n_head})")
        if m.position == "rope" and m.head_dim % 2:
            raise ConfigError(f"rotary positions need an even head_dim, got {m.head_dim}")
        if not 0 <= m.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {m.dropout}")
        if m.n_encoder_layer is not None and m.n_encoder_layer <= 0:
            raise ConfigError(f"n_encoder_layer must be positive, got {m.n_encoder_layer}")
        if m.window is not None and m.window < 1:
            raise ConfigError(f"window must be a positive number of tokens (or none: global attention), got {m.window}")
        if m.global_every < 0:
            raise ConfigError(f"global_every must be >= 0 (0: every layer local), got {m.global_every}")
        if m.global_every and m.window is None:
            raise ConfigError(f"global_every ({m.global_every}) picks the global layers among windowed ones: "
                              "it needs a window (set window, or global_every=0)")
        if t.document_mask and t.task != "lm":
            raise ConfigError(f"document_mask applies to task lm, whose rows pack documents; task {t.task} pads "
                              "each example in a row of its own")
        if m.num_classes < 0 or m.num_classes == 1:
            raise ConfigError(f"num_classes must be 0 (from the data) or at least 2, got {m.num_classes}")
        if t.task == "seq2seq" and t.target_len > m.block_size:
            raise ConfigError(f"target_len ({t.target_len}) cannot exceed block_size ({m.block_size})")
        if m.mlp_hidden is not None and m.mlp_hidden <= 0:
            raise ConfigError(f"mlp_hidden must be positive, got {m.mlp_hidden}")
        if m.vocab_size < 260:
            raise ConfigError(f"vocab_size must be at least 260 (256 bytes plus special tokens), got {m.vocab_size}")
        if t.seq_len > m.block_size:
            raise ConfigError(f"seq_len ({t.seq_len}) cannot exceed block_size ({m.block_size})")
        if t.data is not None and not t.data.strip():
            raise ConfigError(EMPTY_DATA)
        if not 0 < t.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1), got {t.val_fraction}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(t, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(t, name)}")
        if t.min_lr > t.lr:
            raise ConfigError(f"min_lr ({t.min_lr}) cannot exceed lr ({t.lr})")
        self._check_bounds()
        return self

    def _check_bounds(self) -> None:
        """Values past the sanity bounds above: wrong, whatever the machine."""
        m, t = self.model, self.train
        if not 0 <= t.seed <= MAX_SEED:
            raise ConfigError(f"seed must be an integer in [0, {MAX_SEED}], got {t.seed}")
        if t.lr > MAX_LR:
            raise ConfigError(f"lr must be at most {MAX_LR:g}, got {t.lr:g}")
        if m.vocab_size > MAX_VOCAB_SIZE:
            raise ConfigError(f"vocab_size must be at most {MAX_VOCAB_SIZE} (2**24), got {m.vocab_size}")
        if t.tokens_per_step > MAX_TOKENS_PER_STEP:
            raise ConfigError(f"batch_size {t.batch_size} x grad_accum {t.grad_accum} x seq_len {t.seq_len} = "
                              f"{t.tokens_per_step:,} tokens per step, more than the {MAX_TOKENS_PER_STEP:,} "
                              "(2**30) allowed; lower grad_accum or batch_size")

    def memory_estimate(self, world_size: int = 1) -> tuple[int, int]:
        """A lower estimate of the bytes one process holds to train this config: (model state, activations).

        Model state: fp32 weights, gradients and AdamW's two moments, 16 bytes a parameter (the decoder's
        count: an encoder adds more), sharded under FSDP. Activations: the residual stream twice and the
        MLP's hidden layer once per token and layer, in 2-byte numbers, for one process's micro-batch
        (the real figure is several times that, so only a config that cannot fit is refused).
        """
        m, t = self.model, self.train
        state = 16 * m.num_params() // (world_size if t.parallel == "fsdp" else 1)
        tokens = max(1, t.batch_size // world_size) * (t.seq_len + (t.target_len if t.task == "seq2seq" else 0))
        layers = m.n_layer + (m.encoder_layers if t.task == "seq2seq" else 0)
        activations = tokens * layers * (2 * m.n_embd + m.hidden) * 2
        return state, activations

    def check_memory(self, available: int, device: str, world_size: int = 1) -> None:
        """Refuse, naming the field that drives it, a config whose lower memory estimate exceeds the
        ``available`` bytes of ``device`` (a lower bound, so a config refused here cannot train there)."""
        state, activations = self.memory_estimate(world_size)
        if state + activations <= available:
            return
        m, t = self.model, self.train
        needs = (f"needs at least {_gib(state + activations)} of {device} memory to train (a lower estimate: "
                 f"{_gib(state)} for the weights, gradients and AdamW state of {m.num_params():,} parameters, "
                 f"{_gib(activations)} of activations per micro-batch), but the {device} has {_gib(available)}")
        if activations >= state:
            raise ConfigError(f"batch_size={t.batch_size} (x seq_len={t.seq_len}) {needs}; lower batch_size "
                              "(and raise grad_accum to keep the step's size)")
        embedding = m.vocab_size * m.n_embd * (1 if m.tie_embeddings else 2)
        positions = m.block_size * m.n_embd if m.position == "learned" else 0
        field_name, value = max([("vocab_size", m.vocab_size, embedding), ("block_size", m.block_size, positions),
                                 ("n_layer", m.n_layer, m.num_params() - embedding - positions)],
                                key=lambda f: f[2])[:2]
        raise ConfigError(f"{field_name}={value} (with n_embd={m.n_embd}) {needs}; lower {field_name} or n_embd")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


# ----------------------------------------------------------------------------- field parsing


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(name: str, value: Any, kind: Any) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Union:  # Optional[X]
        inner = [a for a in args if a is not type(None)][0]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(name, value, inner)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name} must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be a boolean (true/false), got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            number = float(value) if isinstance(value, float) else float(str(value).replace("_", ""))
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {value!r}") from None
        if not number.is_integer():
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return int(number)
    if kind is float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{name} must be finite, got {value!r}")
        return number
    if kind is str:
        return str(value)
    raise TypeError(f"unsupported config field type {kind} for {name}")


def _type_name(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Union:
        return _type_name([a for a in args if a is not type(None)][0]) + " or none"
    if origin is Literal:
        return "|".join(map(str, args))
    return kind.__name__


def describe_fields() -> str:
    """One line per overridable field: name, type, default."""
    lines = []
    for cls in (ModelConfig, TrainConfig):
        defaults = cls()
        for name, kind in _field_types(cls).items():
            lines.append(f"  {name:<15} {_type_name(kind):<32} default {getattr(defaults, name)!r}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- presets


def _gpt2(n_layer: int, n_head: int, n_embd: int) -> ModelConfig:
    return ModelConfig(vocab_size=50304, block_size=1024, n_layer=n_layer, n_head=n_head, n_embd=n_embd)


def _llama(n_layer: int, n_head: int, n_kv_head: int, n_embd: int, mlp_hidden: int, vocab_size: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, block_size=2048, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
                       n_embd=n_embd, mlp_hidden=mlp_hidden, norm="rmsnorm", mlp="swiglu", position="rope",
                       bias=False, tie_embeddings=False, norm_eps=1e-5, rope_theta=500000.0)


PRESETS: dict[str, Config] = {
    # Sized to learn the standard library's source in a few minutes on 2 CPU cores.
    "tiny": Config(
        ModelConfig(vocab_size=4096, block_size=128, n_layer=4, n_head=4, n_embd=128),
        TrainConfig(seq_len=128, batch_size=16, max_steps=500, lr=3e-3, min_lr=3e-4, warmup_steps=30,
                    eval_interval=100, eval_batches=8, log_interval=10, save_interval=250),
    ),
    "tiny-llama": Config(
        ModelConfig(vocab_size=4096, block_size=128, n_layer=4, n_head=4, n_kv_head=2, n_embd=128,
                    norm="rmsnorm", mlp="swiglu", position="rope", bias=False, tie_embeddings=False),
        TrainConfig(seq_len=128, batch_size=16, max_steps=500, lr=3e-3, min_lr=3e-4, warmup_steps=30,
                    eval_interval=100, eval_batches=8, log_interval=10, save_interval=250),
    ),
    # The other two tasks' built-in data sets (see fastlm.taskdata), a few minutes each on 2 CPU cores.
    "tiny-classify": Config(
        # Two small layers with dropout: on these ~3,000 windows a 4-layer, 128-wide encoder did no
        # better at three times the time, and dropout 0.1 gained 0.02 accuracy over none.
        ModelConfig(vocab_size=4096, block_size=128, n_layer=2, n_head=4, n_embd=64, dropout=0.1),
        TrainConfig(task="classify", seq_len=128, batch_size=32, max_steps=400, lr=1e-3, min_lr=1e-4,
                    warmup_steps=30, val_fraction=0.2, eval_interval=100, log_interval=10, save_interval=200),
    ),
    "tiny-seq2seq": Config(
        ModelConfig(vocab_size=4096, block_size=128, n_layer=3, n_encoder_layer=3, n_head=4, n_embd=128),
        TrainConfig(task="seq2seq", seq_len=128, target_len=32, batch_size=16, max_steps=800, lr=3e-3,
                    min_lr=3e-4, warmup_steps=30, val_fraction=0.05, eval_interval=200, eval_batches=4,
                    log_interval=10, save_interval=400),
    ),
    "gpt2": Config(_gpt2(12, 12, 768), TrainConfig(seq_len=1024, batch_size=16, grad_accum=8, max_steps=5000,
                                                   warmup_steps=200)),
    "gpt2-medium": Config(_gpt2(24, 16, 1024), TrainConfig(seq_len=1024, batch_size=8, grad_accum=16,
                                                           max_steps=5000, lr=3e-4, min_lr=3e-5, warmup_steps=200)),
    # Llama-style, ~1.1B parameters (TinyLlama's shape).
    "llama-1b": Config(_llama(22, 32, 4, 2048, 5632, 32000),
                       TrainConfig(seq_len=2048, batch_size=4, grad_accum=32, max_steps=5000, lr=4e-4,
                                   min_lr=4e-5, warmup_steps=200)),
}


def preset(name: str) -> Config:
    """A fresh copy of a named preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return Config.from_dict(PRESETS[name].to_dict())
