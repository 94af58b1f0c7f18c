"""Bad input meets a one-line error that names the flag, field or file, before anything is written:
config values out of range or too large for the machine, sampling flags, Hugging Face files, Ctrl-C."""

import json

import pytest

from fastlm import cli
from fastlm.checkpoint import CheckpointError
from fastlm.cli import main
from fastlm.config import ConfigError, preset
from fastlm.hf import import_checkpoint


@pytest.mark.parametrize("argv, message", [
    (["--seed", "-1"], "seed must be an integer in [0, 4294967295], got -1"),
    (["--set", f"seed={2**64}"], f"seed must be an integer in [0, 4294967295], got {2**64}"),
    (["--lr", "1e300", "--min_lr", "0"], "lr must be at most 10, got 1e+300"),
    (["--set", "vocab_size=1000000000"], "vocab_size must be at most 16777216 (2**24), got 1000000000"),
    (["--set", "grad_accum=1e9"], "batch_size 16 x grad_accum 1000000000 x seq_len 128"),
    (["--set", "batch_size=1e7"], "batch_size 10000000 x grad_accum 1 x seq_len 128"),
    (["--set", "batch_size=1e6"], "batch_size=1000000"),  # fewer tokens, but their activations do not fit
    (["--set", "vocab_size=10000000", "--n_embd", "4096", "--n_head", "32"], "vocab_size=10000000"),
])
def test_config_out_of_bounds(tmp_path, capsys, argv, message):
    assert main(["train", "--out", str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastlm: error: ") and message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing written


def test_memory_estimate_names_the_limit():
    cfg = preset("tiny")
    cfg.set("batch_size", 10**6)
    with pytest.raises(ConfigError, match=r"batch_size=1000000 .* at least [\d.]+ GiB .* has 1.0 GiB"):
        cfg.check_memory(2**30, "cpu")
    preset("llama-1b").check_memory(80 * 2**30, "cuda:0")  # a real config fits a real GPU


@pytest.mark.parametrize("argv, flag", [
    (["--num_samples", "0"], "--num_samples"),
    (["--max_new_tokens", "-1"], "--max_new_tokens"),
    (["--max-new-tokens", "0"], "--max_new_tokens"),
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["--temperature", "-0.5"], "--temperature"),
    (["--top_k", "-1"], "--top_k"),
    (["--top_p", "0"], "--top_p"),
    (["--top_p", "1.5"], "--top_p"),
    (["--top_p", "nan"], "--top_p"),
])
def test_sample_flags_out_of_range(tmp_path, capsys, argv, flag):
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--run", str(tmp_path), *argv])
    assert exit_info.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_ctrl_c_during_start_up(monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert main(["presets"]) == 130
    assert capsys.readouterr().err == "fastlm: interrupted\n"


def test_out_of_memory_is_an_error_line(monkeypatch, capsys):
    def too_big(args, rest):
        raise MemoryError

    monkeypatch.setattr(cli, "_train", too_big)
    assert main(["train"]) == 1
    assert "fastlm: error: out of memory" in capsys.readouterr().err


@pytest.mark.parametrize("damage, message", [
    ("config_list", "config.json must hold a JSON object, got a list"),
    ("index_list", "model.safetensors.index.json must hold a JSON object, got a list"),
    ("weight_map_list", "model.safetensors.index.json: weight_map must be an object"),
])
def test_malformed_hf_files(tmp_path, damage, message):
    config = {"model_type": "gpt2", "vocab_size": 300, "n_positions": 32, "n_layer": 1, "n_head": 2, "n_embd": 32}
    (tmp_path / "config.json").write_text("[1, 2]" if damage == "config_list" else json.dumps(config))
    index = [] if damage == "index_list" else {"weight_map": ["model.safetensors"]}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=message):
        import_checkpoint(tmp_path)


def test_a_backend_the_device_cannot_run_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    """--backend triton on a CPU without Triton's interpreter failed at the first step, after the run directory
    was set up: a run with no checkpoint, which neither --resume nor a plain retry could start."""
    import importlib

    from helpers import MICRO, write_corpus

    monkeypatch.setattr(importlib.import_module("kernels._backend"), "INTERPRETER", False)
    argv = ["train", "--data", str(write_corpus(tmp_path / "corpus")), "--out", str(tmp_path / "run"), *MICRO]
    assert main([*argv, "--backend", "triton", "--device", "cpu"]) == 1
    assert "FASTLM_BACKEND=triton needs CUDA tensors, or TRITON_INTERPRET=1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
