"""Hugging Face checkpoints in and out: same logits both ways, sharded files, the CLI, clear errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastlm.checkpoint import CheckpointError
from fastlm.cli import main
from fastlm.config import ModelConfig
from fastlm.hf import export_model, import_checkpoint
from fastlm.model import GPT
from fastlm.rundir import load_run
from helpers import MICRO, write_corpus

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 300, 12
FASTLM_CONFIGS = {
    "gpt2": ModelConfig(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=2, n_embd=32),
    "llama": ModelConfig(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                         mlp_hidden=48, norm="rmsnorm", mlp="swiglu", position="rope", bias=False,
                         tie_embeddings=False, rope_theta=500.0),
}


def hf_config(family: str):
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=0, eos_token_id=0)
    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                    rope_parameters={"rope_type": "default", "rope_theta": 500.0},
                                    bos_token_id=0, eos_token_id=0)


def fastlm_logits(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    return model.hidden_states(ids) @ model.head_weight.T  # (B, T, vocab)


IDS = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_import_of_a_transformers_checkpoint(family, tmp_path):
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(hf_config(family)).eval()
    reference.save_pretrained(tmp_path, max_shard_size="20KB")  # sharded, with an index
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = import_checkpoint(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(fastlm_logits(model, IDS), reference(IDS).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_export_then_from_pretrained(family, tmp_path):
    torch.manual_seed(0)
    model = GPT(FASTLM_CONFIGS[family]).eval()
    export_model(model, tmp_path / "out")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, fastlm_logits(model, IDS), rtol=1e-5, atol=1e-5)
    back = import_checkpoint(tmp_path / "out")  # and back: the very same tensors
    for name, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name


def test_export_refuses_to_overwrite(tmp_path):
    model = GPT(FASTLM_CONFIGS["gpt2"])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="exists and is not empty; pass --overwrite"):
        export_model(model, tmp_path / "busy")
    with pytest.raises(CheckpointError, match="refusing to overwrite .* not a model checkpoint"):
        export_model(model, tmp_path / "busy", overwrite=True)
    export_model(model, tmp_path / "out")
    export_model(model, tmp_path / "out", overwrite=True)  # a previous export may be replaced when asked
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".fastlm-export.json", "config.json",
                                                                     "model.safetensors"]
    with pytest.raises(CheckpointError, match="no transformers architecture matches"):
        export_model(GPT(ModelConfig(vocab_size=VOCAB, block_size=32, n_layer=1, n_head=2, n_embd=32,
                                     norm="rmsnorm")), tmp_path / "other")


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="is not a directory"):
        import_checkpoint(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="has no config.json"):
        import_checkpoint(tmp_path)

    good = tmp_path / "good"
    export_model(GPT(FASTLM_CONFIGS["llama"]), good)
    config = json.loads((good / "config.json").read_text())

    def variant(name: str, config_changes: dict = None, drop: str = None, extra: str = None):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**config, **(config_changes or {})}))
        tensors = load_file(str(good / "model.safetensors"))
        if drop:
            del tensors[drop]
        if extra:
            tensors[extra] = torch.zeros(1)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder

    with pytest.raises(CheckpointError, match="unsupported architecture 'bert'.*imports and exports: gpt2, llama"):
        import_checkpoint(variant("bert", {"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="weights do not match config.json"):
        import_checkpoint(variant("wide", {"intermediate_size": 64}))
    with pytest.raises(CheckpointError, match="weights lack 'model.layers.1.mlp.up_proj.weight'"):
        import_checkpoint(variant("short", drop="model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match="weights that config.json does not explain.*model.layers.9"):
        import_checkpoint(variant("long", extra="model.layers.9.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match="needs plain rotary positions"):
        import_checkpoint(variant("scaled", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}))
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="no model.safetensors .*pytorch_model.bin is not read"):
        import_checkpoint(tmp_path / "pickled")
    with pytest.raises(CheckpointError, match="does not fit this model:\n  n_layer: 2 in"):
        from fastlm.hf import load_hf_weights
        load_hf_weights(good, GPT(ModelConfig(**{**FASTLM_CONFIGS["llama"].__dict__, "n_layer": 3})))


def test_cli_export_then_train_from_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTLM_CACHE", str(tmp_path / "cache"))
    corpus = write_corpus(tmp_path / "corpus")
    assert main(["train", "--data", str(corpus), "--out", str(tmp_path / "run"), *MICRO]) == 0
    assert main(["export", "--run", str(tmp_path / "run"), "--to", str(tmp_path / "hf")]) == 0
    assert main(["export", "--run", str(tmp_path / "run"), "--to", str(tmp_path / "hf")]) == 1
    assert "pass --overwrite" in capsys.readouterr().err

    source, tokenizer, _ = load_run(tmp_path / "run")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tokenizer("def f(x):").input_ids == tokenizer.encode("def f(x):").ids
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, fastlm_logits(source, IDS), rtol=1e-5, atol=1e-5)

    # A new run from the export: its shape, its tokenizer, its weights (one step at a tiny lr away).
    micro = ["--seq_len", "32", "--batch_size", "4", "--max_steps", "1", "--set", "warmup_steps=1",
             "--eval_batches", "1", "--backend", "reference", "--quiet", "--set", "lr=1e-5", "--set", "min_lr=0"]
    assert main(["train", "--data", str(corpus), "--out", str(tmp_path / "tuned"),
                 "--init-from", str(tmp_path / "hf"), *micro]) == 0
    tuned, tuned_tokenizer, cfg = load_run(tmp_path / "tuned")
    assert tuned_tokenizer.to_str() == tokenizer.to_str() and cfg.model.n_layer == 2
    for name, value in source.state_dict().items():
        torch.testing.assert_close(tuned.state_dict()[name], value, rtol=0, atol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")

    assert main(["train", "--out", str(tmp_path / "x"), "--init-from", str(tmp_path / "run")]) == 1
    assert "unsupported architecture None" in capsys.readouterr().err  # a run directory is not a checkpoint


def test_init_from_a_checkpoint_without_its_tokenizer_is_refused(tmp_path, monkeypatch, capsys):
    """The imported embeddings belong to the checkpoint's own token ids: a tokenizer trained here would give
    each row another token, so without tokenizer.json the run does not start (and writes nothing)."""
    monkeypatch.setenv("FASTLM_CACHE", str(tmp_path / "cache"))
    export_model(GPT(FASTLM_CONFIGS["gpt2"]), tmp_path / "hf")  # weights only, no tokenizer
    micro = ["--seq_len", "16", "--batch_size", "2", "--max_steps", "1", "--set", "warmup_steps=1",
             "--eval_batches", "1", "--backend", "reference", "--quiet"]
    assert main(["train", "--data", str(write_corpus(tmp_path / "corpus")), "--out", str(tmp_path / "run"),
                 "--init-from", str(tmp_path / "hf"), *micro]) == 1
    assert f"{tmp_path / 'hf'} has no tokenizer.json" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_shape_override_that_does_not_fit_the_checkpoint_is_refused_before_anything_is_written(
        trained_run, tmp_path, capsys):
    run, corpus = trained_run
    assert main(["export", "--run", str(run), "--to", str(tmp_path / "hf")]) == 0
    assert main(["train", "--data", str(corpus), "--out", str(tmp_path / "run"), "--init-from", str(tmp_path / "hf"),
                 "--n_layer", "3", "--seq_len", "32", "--max_steps", "1", "--backend", "reference", "--quiet"]) == 1
    assert f"does not fit this model:\n  n_layer: 2 in {tmp_path / 'hf'}, 3 in the model" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_init_from_a_fastlm_run_says_how_to_start_from_it(trained_run, tmp_path, capsys):
    """A fine-tune from one's own run: the run directory is not a Hugging Face checkpoint, and the error says
    what to do with it (export it, or resume it)."""
    run, _ = trained_run
    assert main(["train", "--out", str(tmp_path / "x"), "--init-from", str(run)]) == 1
    err = capsys.readouterr().err
    assert f"{run} is a fastlm run directory: export it (fastlm export --run {run} --to DIR) and start from DIR" in err
    assert not (tmp_path / "x").exists()
