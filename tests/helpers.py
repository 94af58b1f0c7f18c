"""What several test modules share: the device, the repository root, corpora and task data to train on,
micro configurations and the checks built on them.

Test modules import these from here, never from one another or from conftest.py (pyproject.toml puts
tests/ on the import path; the test modules themselves are imported by path, so two may share a name).
Importing this module imports ``kernels``, so conftest.py, which must set ``TRITON_INTERPRET`` first,
imports it only after doing so.
"""

import importlib
import json
import random
import shutil
from pathlib import Path

import torch

import kernels
from fastlm.config import Config, ModelConfig, TrainConfig

ROOT = Path(__file__).resolve().parent.parent  # the repository
HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"

# Command-line flags of a 4-step micro language-model run on the references (checkpoints at steps 2 and 4).
MICRO = ["--vocab_size", "320", "--block_size", "32", "--n_layer", "2", "--n_head", "2", "--n-embd=32",
         "--seq_len", "32", "--batch_size", "4", "--max_steps", "4", "--set", "warmup_steps=1",
         "--save_interval", "2", "--eval_interval", "2", "--eval_batches", "1", "--log_interval", "1",
         "--backend", "reference", "--quiet"]


def attention_kernels_launched(monkeypatch, family: str) -> list[str]:
    """Record which attention kernel of a family each launch runs: 'fwd' ('fwd_tma' or 'fwd') or 'dq' ('dq_tma',
    'dq'): where TMA can read the inputs, sm_90+ and the interpreter take the TMA kernels."""
    module = importlib.import_module("kernels.attention")  # kernels.attention is also the function
    kinds = []
    launch = module._launch

    def recording(kind, *args, **kwargs):
        if kind.split("_")[0] == family:
            kinds.append(kind)
        return launch(kind, *args, **kwargs)

    monkeypatch.setattr(module, "_launch", recording)
    return kinds


def write_corpus(folder: Path, files: int = 24) -> Path:
    """A small, learnable corpus of Python-looking files."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        body = "".join(f"def func_{j % 7}(x, y):\n    return x * {(i + j) % 5} + y\n\n" for j in range(40))
        (folder / f"mod_{i:02d}.py").write_text(f"# module {i}\nimport os\n\n" + body)
    return folder


def write_short_documents(folder: Path, files: int = 80) -> Path:
    """A corpus of documents a few lines long: rows of 32 tokens hold several, so masking them matters."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        body = "".join(f"def f{j}(x):\n    return x + {(i * j) % 9}\n" for j in range(1 + i % 3))
        (folder / f"doc_{i:02d}.py").write_text(f"# doc {i}\n" + body)
    return folder


def micro_config(data: Path, **train_overrides) -> Config:
    train_fields = dict(data=str(data), seq_len=32, batch_size=4, max_steps=8, lr=3e-3, min_lr=3e-4,
                        warmup_steps=2, eval_interval=4, eval_batches=2, log_interval=1, save_interval=4,
                        keep_last=5, backend="reference", seed=0)
    train_fields.update(train_overrides)
    return Config(ModelConfig(vocab_size=320, block_size=32, n_layer=2, n_head=2, n_embd=32),
                  TrainConfig(**train_fields)).validate()


def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


def stop_after_checkpoint(run: Path, copy: Path, drop: str, metric_lines: int) -> None:
    """``copy``: ``run`` as if it had stopped before checkpoint ``drop``, having logged ``metric_lines`` lines
    (the step-4 checkpoint and a step past it, in the tests)."""
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / drop)
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    (copy / "metrics.jsonl").write_text("\n".join(lines[:metric_lines]) + "\n")


def assert_fused_trains_like_reference(make_model, batches) -> None:
    """SGD steps on ``batches`` (each the model's positional arguments) on the Triton kernels and on
    the references, from the same initial model: the same losses and final weights to fp32 accuracy."""
    results = {}
    for backend in ("triton", "reference"):
        model = make_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        step_losses = []
        with kernels.use_backend(backend):
            for batch in batches:
                loss = model(*batch)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                step_losses.append(loss.item())
        results[backend] = (step_losses, model.state_dict())
    fused, ref = results["triton"], results["reference"]
    torch.testing.assert_close(torch.tensor(fused[0]), torch.tensor(ref[0]), rtol=1e-5, atol=1e-5)
    for name in ref[1]:
        torch.testing.assert_close(fused[1][name], ref[1][name], rtol=1e-4, atol=1e-5, msg=name)


WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda omicron".split()
TOPICS = {"fruit": "apple pear plum cherry grape lemon".split(), "tool": "hammer saw drill chisel wrench file".split(),
          "color": "red green blue yellow purple orange".split()}


def write_classification(path: Path, rows: int = 240, seed: int = 0) -> Path:
    """Texts of filler words with a few words of one topic; the topic is the label."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        f.write("id,text,label\n")
        for i in range(rows):
            label = rng.choice(sorted(TOPICS))
            words = rng.sample(WORDS, rng.randint(2, 6)) + rng.sample(TOPICS[label], 2)
            rng.shuffle(words)
            f.write(f"{i},{' '.join(words)},{label}\n")
    return path


def task_config(task: str, data: Path, **overrides) -> Config:
    """A micro configuration of ``task`` (classify or seq2seq) on the data file ``data``, on the references."""
    cfg = Config(ModelConfig(vocab_size=320, block_size=32, n_layer=2, n_head=2, n_embd=64),
                 TrainConfig(task=task, data=str(data), seq_len=32, target_len=16, batch_size=16, max_steps=8,
                             lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_interval=4, eval_batches=2, log_interval=1,
                             save_interval=4, keep_last=5, backend="reference", seed=0, val_fraction=0.2))
    for name, value in overrides.items():
        cfg.set(name, value)
    return cfg.validate()


def write_copy_task(path: Path, rows: int = 300, seed: int = 0) -> Path:
    """Target = source: learnable in a few hundred steps only if cross-attention works."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(rows):
            text = " ".join(rng.sample(WORDS, rng.randint(2, 5)))
            f.write(json.dumps({"source": text, "target": text}) + "\n")
    return path
