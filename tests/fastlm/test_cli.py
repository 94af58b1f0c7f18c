"""The command line: overrides, the error paths, train -> resume -> sample through main(argv)."""

import io
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from fastlm.cli import main
from fastlm.config import PRESETS, ConfigError, preset
from helpers import MICRO, ROOT, losses


@pytest.mark.parametrize("argv, message", [
    (["--preset", "huge"], "unknown preset 'huge'; valid presets: " + ", ".join(PRESETS)),
    (["--n_layers", "4"], "unknown config field 'n_layers'; valid fields:\n  vocab_size"),
    (["--n_layer", "four"], "n_layer must be an integer, got 'four'"),
    (["--n_layer", "0"], "n_layer must be positive"),
    (["--norm", "batchnorm"], "norm must be one of layernorm, rmsnorm"),
    (["--set", "lr"], "--set expects FIELD=VALUE"),
    (["--lr"], "--lr needs a value"),
    (["--n_head", "5"], "n_embd (128) must be divisible by n_head (5)"),
    (["--data", "/nonexistent/corpus"], "data path /nonexistent/corpus does not exist"),
])
def test_usage_errors(tmp_path, capsys, argv, message):
    assert main(["train", "--out", str(tmp_path / "run"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing written


def test_overrides_are_typed():
    from fastlm.cli import _parse_overrides

    cfg = preset("tiny")
    _parse_overrides(cfg, ["lr=1e-3"], ["--n_kv_head", "2", "--compile", "--bias=false", "--mlp_hidden", "none"])
    assert (cfg.train.lr, cfg.model.n_kv_head, cfg.train.compile, cfg.model.bias, cfg.model.mlp_hidden) == \
        (1e-3, 2, True, False, None)
    with pytest.raises(ConfigError, match="n_kv_head .* must divide n_head"):
        _parse_overrides(cfg, ["n_kv_head=3"], [])


def test_sample_is_deterministic_with_a_seed(trained_run, capsys):
    run, _ = trained_run
    outputs = []
    for seed in (1, 1, 2):
        assert main(["sample", "--run", str(run), "--prompt", "def ", "--max_new_tokens", "20",
                     "--seed", str(seed), "--backend", "reference"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] != outputs[2]
    assert outputs[0].startswith("def ")


def test_run_dir_is_protected_and_resume_checks_config(trained_run, tmp_path, capsys):
    run, corpus = trained_run
    assert main(["train", "--data", str(corpus), "--out", str(run), *MICRO]) == 1
    assert "already exists; continue it with --resume" in capsys.readouterr().err

    assert main(["train", "--resume", str(run), "--n_layer", "3"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume with a different configuration" in err and "n_layer: 2 in the run, 3 requested" in err

    assert main(["train", "--resume", str(tmp_path)]) == 1
    assert "not a fastlm run directory" in capsys.readouterr().err


def test_resume_refuses_a_corrupted_checkpoint(trained_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(trained_run[0], run)
    metrics = (run / "metrics.jsonl").read_text()
    weights = run / "checkpoints" / "step_00000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(["train", "--resume", str(run), "--max_steps", "4"]) == 1
    err = capsys.readouterr().err
    assert "truncated or corrupted" in err and "step_00000002" in err  # points at the older checkpoint
    assert (run / "metrics.jsonl").read_text() == metrics

    # The older checkpoint resumes; the last steps are redone, with the same losses.
    assert main(["train", "--resume", str(run / "checkpoints" / "step_00000002")]) == 0
    assert losses(run) == losses(trained_run[0])


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "fastlm", "presets"], capture_output=True, text=True, check=True)
    assert "tiny" in out.stdout and "llama-1b" in out.stdout


def test_importing_fastlm_leaves_the_process_alone():
    """A library import loads no torch and sets no environment; the command line sets OpenMP's wait policy
    before torch starts, and loads torch only inside main() (where Ctrl-C is an "interrupted" line)."""
    code = ("import os, sys; os.environ.pop('OMP_WAIT_POLICY', None); import fastlm; "
            "assert 'torch' not in sys.modules and 'OMP_WAIT_POLICY' not in os.environ; "
            "import fastlm.cli; assert os.environ['OMP_WAIT_POLICY'] == 'PASSIVE'; assert 'torch' not in sys.modules; "
            "print(fastlm.GPT.__name__)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "GPT", result.stderr


def test_readme_names_the_run_directory_as_it_is(trained_run):
    """The README's run-directory bullet: every entry fastlm writes there, the checkpoints' folder name, every
    field of metrics.jsonl, and the default run name and the --resume example in its form."""
    from fastlm.checkpoint import checkpoint_dir
    from fastlm.rundir import RUN_ENTRIES, default_run_dir

    readme = " ".join((ROOT / "README.md").read_text().split())
    listing = re.search(r"\*\*Run directory\*\*:? (.*?) Checkpoints are written", readme).group(1)
    run = trained_run[0]
    for entry in RUN_ENTRIES:
        assert f"`{entry}" in listing, entry
    assert f"`checkpoints/{checkpoint_dir(run, 500).name}/`" in listing
    fields = {name for line in (run / "metrics.jsonl").read_text().splitlines() for name in json.loads(line)}
    for name in fields:
        assert re.search(rf"\b{name}\b", listing), name
    def shape(text):  # a timestamp's digits, or its YYYYMMDD-HHMMSS placeholder, as #
        return re.sub(r"\d|YYYY|MM|DD|HH|SS", lambda m: "#" * len(m.group()), text)
    assert f"by default `{shape(str(default_run_dir('PRESET')))}`" in shape(listing)
    resumed = re.search(r"fastlm train --resume (runs/tiny-\S+)", readme).group(1)
    assert shape(resumed) == shape(str(default_run_dir("tiny")))


def test_paths_given_with_a_tilde_are_the_home_directory(trained_run, tmp_path, monkeypatch, capsys):
    """``--out=~/run`` (which the shell leaves as it is) is a run in the home directory, as --data's ``~`` was,
    not a folder named ``~`` in the working directory; --resume, --run, --to and --checkpoint alike."""
    run, corpus = trained_run
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    shutil.copytree(run, tmp_path / "home" / "run")
    assert main(["train", "--resume", "~/run"]) == 0
    assert "already finished its 4 steps" in capsys.readouterr().out
    assert main(["sample", "--run", "~/run", "--checkpoint", "~/run/checkpoints/step_00000002",
                 "--max_new_tokens", "2", "--backend", "reference"]) == 0
    assert main(["export", "--run", "~/run", "--to", "~/exported"]) == 0
    assert (tmp_path / "home" / "exported" / "model.safetensors").is_file()
    assert main(["train", "--data", str(corpus), "--out=~/new", *MICRO, "--max_steps", "1"]) == 0
    assert (tmp_path / "home" / "new" / "config.json").is_file()
    assert not (tmp_path / "~").exists()


def test_a_relative_data_path_set_as_a_field_is_kept_absolute(trained_run, tmp_path, monkeypatch, capsys):
    """``--set data=corpus`` means the corpus in the working directory, as ``--data corpus`` does: the run
    records its absolute path, so it resumes from anywhere."""
    shutil.copytree(trained_run[1], tmp_path / "corpus")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--set", "data=corpus", "--out", "run", *MICRO, "--max_steps", "1"]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["data"] == str(tmp_path / "corpus")
    monkeypatch.chdir(tmp_path / "run")
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0
    assert "already finished its 1 steps" in capsys.readouterr().out


def test_checkpoints_are_named_alike_by_sample_and_export(trained_run, tmp_path, capsys):
    """--checkpoint takes a step number, a checkpoint's folder name or its path, for sample and export alike."""
    run, _ = trained_run
    outputs = []
    for checkpoint in ("2", "step_00000002", str(run / "checkpoints" / "step_00000002")):
        assert main(["sample", "--run", str(run), "--checkpoint", checkpoint, "--max_new_tokens", "4",
                     "--backend", "reference"]) == 0, capsys.readouterr().err
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] == outputs[2]
    for i, checkpoint in enumerate(("2", "step_00000002")):
        assert main(["export", "--run", str(run), "--checkpoint", checkpoint, "--to", str(tmp_path / f"e{i}")]) == 0
    assert (tmp_path / "e0" / "model.safetensors").read_bytes() == (tmp_path / "e1" / "model.safetensors").read_bytes()
    assert main(["sample", "--run", str(run), "--checkpoint", "step_00000003"]) == 1
    assert "has no checkpoint step_00000003; it has: step_00000002, step_00000004" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_sample_on_a_missing_gpu_names_the_flag(trained_run, capsys):
    assert main(["sample", "--run", str(trained_run[0]), "--device", "cuda"]) == 2
    assert "fastlm: error: --device cuda: CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "caf\udce9"], "--prompt is not valid UTF-8"),  # how Python passes a Latin-1 byte in argv
    (["--escapes", "--prompt", "ends in \\"], "--prompt with --escapes: \\ at end of string"),
    (["--escapes", "--prompt", "\\x4"], "--prompt with --escapes: truncated \\xXX escape"),
])
def test_bad_prompt_text_names_the_flag(trained_run, capsys, argv, message):
    assert main(["sample", "--run", str(trained_run[0]), "--backend", "reference", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastlm: error: ") and message in err, err


def test_standard_input_that_is_not_utf8_is_named(trained_run, monkeypatch, capsys):
    stdin = io.TextIOWrapper(io.BytesIO(b"caf\xe9\n"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    assert main(["translate", "--run", str(trained_run[0])]) == 2
    assert "fastlm: error: standard input is not valid UTF-8" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--data", ""], "data must be a path (or none: the built-in data set), got an empty string"),
    (["--set", "data="], "data must be a path (or none: the built-in data set), got an empty string"),
    (["--out", ""], "argument --out: expected a path, got an empty string"),
])
def test_an_empty_path_is_refused_not_taken_as_the_working_directory(tmp_path, monkeypatch, capsys, argv, message):
    """``--data "$DATA"`` with DATA unset trained on whatever the working directory held; ``--out ""`` wrote the
    run into it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine\n")
    try:
        code = main(["train", *MICRO, *(["--out", "run"] if "--out" not in argv else []), *argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2 and message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
