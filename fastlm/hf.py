"""Hugging Face checkpoints in and out: GPT-2 and Llama, as ``config.json`` + safetensors.

:func:`import_checkpoint` reads a transformers checkpoint directory (one
``model.safetensors`` or shards listed in ``model.safetensors.index.json``) into
a :class:`fastlm.model.GPT`; :func:`export_model` writes a fastlm model so that
``transformers.AutoModelForCausalLM.from_pretrained(dir)`` gives the same logits.
Neither needs ``transformers`` installed, and nothing is unpickled.

The key mapping is the table in :mod:`fastlm.model`. The two layouts differ in:

- GPT-2's ``Conv1D`` stores weights (in, out): transposed both ways.
- Llama's separate q/k/v and gate/up projections are fastlm's fused ``c_attn``
  and ``c_fc`` (rows concatenated in that order).
- Rotary embeddings: both use rotate-half on split halves, so q/k need no
  permutation (the round-trip tests compare logits).

Weights are imported as fp32 (training runs autocast) and exported as fp32.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .checkpoint import CheckpointError
from .config import ModelConfig
from .files import atomic_write
from .jsonfile import read_json_object, require
from .model import GPT
from .rundir import DirectoryLock, check_export_target, mark

SUPPORTED = ("gpt2", "llama")


# ----------------------------------------------------------------------------- configs


def _read_hf_config(path: Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; expected a Hugging Face checkpoint "
                              "(config.json + *.safetensors)")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a Hugging Face checkpoint: it has no config.json")
    return read_json_object(path / "config.json", CheckpointError)


def _require(hf: dict, name: str, ok: bool, detail: str) -> None:
    if not ok:
        raise CheckpointError(f"unsupported {hf.get('model_type')} checkpoint: {name}={hf.get(name)!r}; "
                              f"fastlm's model needs {detail}")


def model_config_from_hf(hf: dict) -> ModelConfig:
    """fastlm's :class:`ModelConfig` for a transformers ``config.json`` (as a dict)."""
    kind = hf.get("model_type")
    try:
        if kind == "gpt2":
            _require(hf, "activation_function", hf.get("activation_function", "gelu_new") in
                     ("gelu_new", "gelu_pytorch_tanh"), "the tanh GELU (gelu_new)")
            _require(hf, "scale_attn_weights", hf.get("scale_attn_weights", True), "scale_attn_weights=true")
            _require(hf, "scale_attn_by_inverse_layer_idx", not hf.get("scale_attn_by_inverse_layer_idx", False),
                     "scale_attn_by_inverse_layer_idx=false")
            _require(hf, "add_cross_attention", not hf.get("add_cross_attention", False), "a decoder-only model")
            return ModelConfig(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                               n_head=hf["n_head"], n_embd=hf["n_embd"], mlp_hidden=hf.get("n_inner"),
                               norm="layernorm", mlp="gelu", position="learned", bias=True,
                               tie_embeddings=hf.get("tie_word_embeddings", True),
                               norm_eps=hf.get("layer_norm_epsilon", 1e-5))
        if kind == "llama":
            rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
            _require(hf, "rope_parameters", rope.get("rope_type", rope.get("type", "default")) == "default",
                     "plain rotary positions (rope_type 'default', no scaling)")
            _require(hf, "hidden_act", hf.get("hidden_act", "silu") == "silu", "SwiGLU (hidden_act 'silu')")
            _require(hf, "attention_bias", hf.get("attention_bias", False) == hf.get("mlp_bias", False),
                     "attention_bias == mlp_bias (one bias switch for every projection)")
            n_head = hf["num_attention_heads"]
            head_dim = hf.get("head_dim") or hf["hidden_size"] // n_head
            _require(hf, "head_dim", head_dim * n_head == hf["hidden_size"], "head_dim * heads == hidden_size")
            return ModelConfig(vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 2048),
                               n_layer=hf["num_hidden_layers"], n_head=n_head,
                               n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=hf["hidden_size"],
                               mlp_hidden=hf["intermediate_size"], norm="rmsnorm", mlp="swiglu", position="rope",
                               bias=bool(hf.get("attention_bias", False)),
                               tie_embeddings=hf.get("tie_word_embeddings", False),
                               norm_eps=hf.get("rms_norm_eps", 1e-6),
                               rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    except KeyError as e:
        raise CheckpointError(f"{kind} config.json lacks the field {e.args[0]!r}") from None
    raise CheckpointError(f"unsupported architecture {kind!r} (architectures {hf.get('architectures')}); "
                          f"fastlm imports and exports: {', '.join(SUPPORTED)}")


def hf_config_from_model(config: ModelConfig, eos_token_id: int | None = None) -> dict:
    """The transformers ``config.json`` for a fastlm :class:`ModelConfig`."""
    c = config
    if c.window is not None:
        raise CheckpointError(f"this model attends through a sliding window (window={c.window}); GPT-2 and Llama, "
                              "the transformers architectures fastlm exports, have none")
    common = {"vocab_size": c.vocab_size, "tie_word_embeddings": c.tie_embeddings, "dtype": "float32",
              "bos_token_id": eos_token_id, "eos_token_id": eos_token_id}
    if (c.norm, c.mlp, c.position, c.bias) == ("layernorm", "gelu", "learned", True):
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **common,
                "n_positions": c.block_size, "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd,
                "n_inner": c.hidden, "activation_function": "gelu_new", "layer_norm_epsilon": c.norm_eps,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    if (c.norm, c.mlp, c.position) == ("rmsnorm", "swiglu", "rope"):
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common,
                "max_position_embeddings": c.block_size, "num_hidden_layers": c.n_layer,
                "num_attention_heads": c.n_head, "num_key_value_heads": c.kv_heads, "hidden_size": c.n_embd,
                "head_dim": c.head_dim, "intermediate_size": c.hidden, "hidden_act": "silu",
                "rms_norm_eps": c.norm_eps, "attention_bias": c.bias, "mlp_bias": c.bias,
                "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta}}
    raise CheckpointError(f"no transformers architecture matches this model (norm={c.norm}, mlp={c.mlp}, "
                          f"position={c.position}, bias={c.bias}); exportable: layernorm+gelu+learned+bias "
                          "(GPT-2) or rmsnorm+swiglu+rope (Llama)")


# ----------------------------------------------------------------------------- weights


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index, CheckpointError)
        require(weight_map, index, {"weight_map": dict}, CheckpointError)
        shards = list(weight_map["weight_map"].values())
        if not all(isinstance(name, str) for name in shards):
            raise CheckpointError(f"{index}: weight_map must map tensor names to file names, got {shards[:3]!r}")
        files = sorted(set(shards))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{path} has no model.safetensors or model.safetensors.index.json "
                              "(pickled pytorch_model.bin is not read: convert it to safetensors)")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            tensors.update(load_file(str(path / name)))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {path / name}: {e}") from None
    return tensors


def _hf_to_fastlm(kind: str, config: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fastlm state_dict from HF tensors (consumed: what is left afterwards was not used)."""
    out: dict[str, torch.Tensor] = {}

    def take(key: str) -> torch.Tensor:
        if key not in hf:
            raise CheckpointError(f"the weights lack {key!r}, which config.json implies")
        return hf.pop(key).float()

    if kind == "gpt2":
        renamed = {k.removeprefix("transformer."): v for k, v in hf.items()
                   if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # causal-mask buffers of old checkpoints
        hf.clear()
        hf.update(renamed)
        for name in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"):
            out[f"transformer.{name}"] = take(name)
        for i in range(config.n_layer):
            for name in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.c_attn.bias",
                         "attn.c_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias"):
                out[f"transformer.h.{i}.{name}"] = take(f"h.{i}.{name}")
            for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):  # Conv1D: (in, out)
                out[f"transformer.h.{i}.{name}.weight"] = take(f"h.{i}.{name}.weight").t().contiguous()
        if not config.tie_embeddings:
            out["lm_head.weight"] = take("lm_head.weight")
        hf.pop("lm_head.weight", None)  # a tied copy
        return out

    out["transformer.wte.weight"] = take("model.embed_tokens.weight")
    out["transformer.ln_f.weight"] = take("model.norm.weight")
    for i in range(config.n_layer):
        src, dst = f"model.layers.{i}", f"transformer.h.{i}"
        out[f"{dst}.ln_1.weight"] = take(f"{src}.input_layernorm.weight")
        out[f"{dst}.ln_2.weight"] = take(f"{src}.post_attention_layernorm.weight")
        suffixes = ("weight", "bias") if config.bias else ("weight",)
        for s in suffixes:
            out[f"{dst}.attn.c_attn.{s}"] = torch.cat([take(f"{src}.self_attn.{p}_proj.{s}") for p in "qkv"])
            out[f"{dst}.attn.c_proj.{s}"] = take(f"{src}.self_attn.o_proj.{s}")
            out[f"{dst}.mlp.c_fc.{s}"] = torch.cat([take(f"{src}.mlp.{p}_proj.{s}") for p in ("gate", "up")])
            out[f"{dst}.mlp.c_proj.{s}"] = take(f"{src}.mlp.down_proj.{s}")
    if not config.tie_embeddings:
        out["lm_head.weight"] = take("lm_head.weight")
    hf.pop("lm_head.weight", None)
    return out


def _fastlm_to_hf(kind: str, config: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().float().cpu() for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {}
    if kind == "gpt2":
        for key, value in sd.items():
            transposed = key.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
            out[key] = value.t() if transposed else value
    else:
        out["model.embed_tokens.weight"] = sd.pop("transformer.wte.weight")
        out["model.norm.weight"] = sd.pop("transformer.ln_f.weight")
        if "lm_head.weight" in sd:
            out["lm_head.weight"] = sd.pop("lm_head.weight")
        q, kv = config.n_head * config.head_dim, config.kv_heads * config.head_dim
        for i in range(config.n_layer):
            src, dst = f"transformer.h.{i}", f"model.layers.{i}"
            out[f"{dst}.input_layernorm.weight"] = sd[f"{src}.ln_1.weight"]
            out[f"{dst}.post_attention_layernorm.weight"] = sd[f"{src}.ln_2.weight"]
            for s in ("weight", "bias") if config.bias else ("weight",):
                for p, t in zip("qkv", sd[f"{src}.attn.c_attn.{s}"].split([q, kv, kv])):
                    out[f"{dst}.self_attn.{p}_proj.{s}"] = t
                out[f"{dst}.self_attn.o_proj.{s}"] = sd[f"{src}.attn.c_proj.{s}"]
                gate, up = sd[f"{src}.mlp.c_fc.{s}"].chunk(2)
                out[f"{dst}.mlp.gate_proj.{s}"], out[f"{dst}.mlp.up_proj.{s}"] = gate, up
                out[f"{dst}.mlp.down_proj.{s}"] = sd[f"{src}.mlp.c_proj.{s}"]
    return {k: v.contiguous() for k, v in out.items()}


# ----------------------------------------------------------------------------- public API


def read_model_config(path: str | Path) -> ModelConfig:
    """fastlm's :class:`ModelConfig` for the transformers checkpoint directory at ``path``."""
    hf = _read_hf_config(Path(path))
    try:
        return model_config_from_hf(hf)
    except CheckpointError as e:
        if {"model", "train"} <= set(hf):  # a fastlm run's config.json: starting from one's own run
            raise CheckpointError(f"{e}. {path} is a fastlm run directory: export it (fastlm export --run {path} "
                                  f"--to DIR) and start from DIR, or continue it with --resume {path}") from None
        raise


def check_has_tokenizer(path: str | Path) -> None:
    """A run started from the checkpoint at ``path`` needs its ``tokenizer.json``: the embeddings are indexed
    by that tokenizer's ids, and one trained on new data would give every row another token."""
    if not (Path(path) / "tokenizer.json").is_file():
        raise CheckpointError(f"{path} has no tokenizer.json, so a run started from it cannot know which token "
                              "each row of its embeddings stands for (a tokenizer trained here would give them "
                              "other tokens). Save the checkpoint's own tokenizer there as tokenizer.json (with "
                              "transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)) and start "
                              "again")


def check_fits(path: str | Path, config: ModelConfig) -> dict:
    """The config.json of the HF checkpoint at ``path``, whose shape must be ``config``'s exactly (a run's
    overrides of fields that shape no weight, such as dropout, may differ); a run checks this before it
    writes anything."""
    hf_config = _read_hf_config(Path(path))
    expected = model_config_from_hf(hf_config)
    shape = ("vocab_size", "n_layer", "n_head", "kv_heads", "n_embd", "hidden", "norm", "mlp", "position",
             "bias", "tie_embeddings")
    differ = [f"{n}: {getattr(expected, n)} in {path}, {getattr(config, n)} in the model"
              for n in shape if getattr(expected, n) != getattr(config, n)]
    if differ:
        raise CheckpointError("the checkpoint does not fit this model:\n  " + "\n  ".join(differ))
    return hf_config


def load_hf_weights(path: str | Path, model: GPT) -> None:
    """Load the HF checkpoint at ``path`` into ``model``, whose config must match it exactly."""
    path = Path(path)
    hf_config = check_fits(path, model.config)
    tensors = _load_tensors(path)
    state = _hf_to_fastlm(hf_config["model_type"], model.config, tensors)
    if tensors:
        raise CheckpointError(f"{path} holds weights that config.json does not explain: {sorted(tensors)[:5]}")
    own = model.state_dict()
    wrong = [f"{k}: {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} expected"
             for k, v in state.items() if own[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{path}: weights do not match config.json:\n  " + "\n  ".join(wrong[:5]))
    model.load_state_dict(state)


def import_checkpoint(path: str | Path) -> GPT:
    """A fastlm model holding the transformers GPT-2 or Llama checkpoint at ``path``."""
    model = GPT(read_model_config(path))
    load_hf_weights(path, model)
    return model


def export_model(model: GPT, out_dir: str | Path, *, tokenizer_json: str | Path | None = None,
                 eos_token_id: int | None = None, overwrite: bool = False,
                 source_run: str | Path | None = None) -> Path:
    """Write ``model`` as a transformers checkpoint to ``out_dir`` (config.json, model.safetensors,
    and the tokenizer when given), each file atomically, into a directory marked as an export and locked
    while it is written. Never into a training run (nor inside or around ``source_run``, the run being
    exported); an existing non-empty ``out_dir`` is replaced only with ``overwrite=True``, and only if it
    is an earlier export (see :func:`fastlm.rundir.check_export_target`)."""
    out_dir = Path(out_dir)
    check_export_target(out_dir, overwrite, source_run)
    hf_config = hf_config_from_model(model.config, eos_token_id)
    tensors = _fastlm_to_hf(hf_config["model_type"], model.config, model.state_dict())

    with DirectoryLock(out_dir, "export directory") as lock:
        lock.acquire(create=True)
        check_export_target(out_dir, overwrite, source_run)  # again, now that no other process can change it
        mark(out_dir, "export")
        atomic_write(out_dir / "model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        if tokenizer_json is not None:
            atomic_write(out_dir / "tokenizer.json", Path(tokenizer_json).read_bytes())
            atomic_write(out_dir / "tokenizer_config.json", json.dumps(
                {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
                 "bos_token": "<|endoftext|>", "model_max_length": model.config.block_size}, indent=2) + "\n")
        else:  # an earlier export's tokenizer does not belong to this model
            for name in ("tokenizer.json", "tokenizer_config.json"):
                (out_dir / name).unlink(missing_ok=True)
        atomic_write(out_dir / "config.json", json.dumps(hf_config, indent=2) + "\n")
    return out_dir
