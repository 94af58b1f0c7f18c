"""Data-parallel training on CPU with gloo: 2 processes under torchrun against 1 process.

Each 2-process run is a real ``torchrun --standalone --nproc_per_node=2 -m fastlm train``
in a subprocess (with a timeout, so a hang fails the test instead of stalling CI); the
single-process runs go through ``main(argv)`` in this process. The micro model runs on
the PyTorch references, so a run takes seconds.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

from fastlm.cli import main
from fastlm.config import Config
from fastlm.model import GPT
from helpers import ROOT as REPO, losses, write_classification, write_copy_task

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# A global micro-batch of 4 sequences (2 per rank), 2 micro-steps per step, checkpoints at steps 3 and 6.
MICRO = ["--vocab_size", "320", "--block_size", "32", "--n_layer", "2", "--n_head", "2", "--n_embd", "32",
         "--seq_len", "32", "--batch_size", "4", "--grad_accum", "2", "--max_steps", "6", "--warmup_steps", "2",
         "--eval_interval", "3", "--eval_batches", "2", "--log_interval", "1", "--save_interval", "3",
         "--seed", "0", "--backend", "reference", "--device", "cpu", "--quiet"]

pytestmark = pytest.mark.slow


def torchrun(args: list[str], timeout: float = 90) -> subprocess.CompletedProcess:
    """Run ``args`` (``-m fastlm train ...`` or a script) in 2 processes; fail on a hang."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*TORCHRUN, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def train_2(*args: str) -> None:
    result = torchrun(["-m", "fastlm", "train", *args])
    assert result.returncode == 0, result.stdout + result.stderr


def assert_close(a: dict[int, float], b: dict[int, float], rel: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    assert all(abs(a[k] - b[k]) <= rel * abs(b[k]) for k in a), (a, b)


@pytest.mark.parametrize("parallel, dtype", [("ddp", "float32"), ("fsdp", "float32"), ("fsdp", "bfloat16")])
def test_two_processes_match_one(tmp_path, corpus, parallel, dtype):
    """fp32: the same losses and weights up to the order of the gradient reduction. bf16 (autocast in one
    process, FSDP2's bf16 mixed-precision policy in two, as on GPU): the same losses to bf16 rounding
    (Adam turns that rounding into weight differences of the order of lr, so weights are not compared)."""
    rel = 1e-5 if dtype == "float32" else 1e-3
    assert main(["train", "--data", str(corpus), "--out", str(tmp_path / "one"), *MICRO, "--dtype", dtype]) == 0
    train_2("--data", str(corpus), "--out", str(tmp_path / "two"), "--parallel", parallel, *MICRO, "--dtype", dtype)

    assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"), rel)
    assert_close(losses(tmp_path / "two", "val_loss"), losses(tmp_path / "one", "val_loss"), rel)
    # The same consolidated files a single process writes.
    for name in ("model.safetensors", "optimizer.safetensors"):
        one = load_file(str(tmp_path / "one" / "checkpoints" / "step_00000006" / name))
        two = load_file(str(tmp_path / "two" / "checkpoints" / "step_00000006" / name))
        assert one.keys() == two.keys()
        assert all(one[k].shape == two[k].shape and one[k].dtype == two[k].dtype == torch.float32 for k in one)
        if dtype == "float32":
            assert all(torch.allclose(one[k], two[k], atol=1e-5) for k in one)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_checkpoint_resumes_in_two_processes_and_loads_in_one(tmp_path, corpus, parallel, capsys):
    straight = tmp_path / "straight"
    train_2("--data", str(corpus), "--out", str(straight), "--parallel", parallel, *MICRO)

    # Resumed in 2 processes from the step-3 checkpoint: the same losses, bit for bit.
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000006")
    train_2("--resume", str(resumed / "checkpoints" / "step_00000003"))
    assert losses(resumed) == losses(straight)
    assert losses(resumed, "val_loss") == losses(straight, "val_loss")

    # Loaded by a single process: for further training (same losses up to the order of the
    # gradient reduction) and for sampling.
    single = tmp_path / "single"
    shutil.copytree(resumed, single)
    assert main(["train", "--resume", str(single / "checkpoints" / "step_00000003"), "--quiet"]) == 0
    assert_close(losses(single), losses(straight))
    capsys.readouterr()
    assert main(["sample", "--run", str(straight), "--prompt", "def", "--max_new_tokens", "8",
                 "--backend", "reference"]) == 0
    assert capsys.readouterr().out.startswith("def")
    model = GPT(Config.from_dict(json.loads((straight / "config.json").read_text())).model)
    assert load_file(str(straight / "checkpoints" / "step_00000006" / "model.safetensors")).keys() \
        == model.state_dict().keys()


def test_checkpoint_of_one_process_resumes_in_two(tmp_path, corpus):
    """Checkpoints are consolidated, so any number of processes resumes any other's (the test above goes from
    2 to 1): the same losses up to the order of the gradient reduction."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", "--data", str(corpus), "--out", str(straight), *MICRO]) == 0
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000006")
    train_2("--resume", str(resumed / "checkpoints" / "step_00000003"))
    assert_close(losses(resumed), losses(straight))
    assert_close(losses(resumed, "val_loss"), losses(straight, "val_loss"))


def test_failure_on_one_rank_ends_the_job(tmp_path, corpus):
    """Rank 1 raises at step 2 while rank 0 waits for its gradients: the job exits non-zero with
    rank 1's error instead of hanging."""
    script = tmp_path / "fail_on_rank_1.py"
    script.write_text(textwrap.dedent("""
        import sys

        import torch.distributed as dist

        from fastlm import cli, data

        real_train_batch = data.train_batch

        def train_batch(tokens, seed, step, *args, **kwargs):
            if dist.get_rank() == 1 and step == 2:
                raise RuntimeError("injected failure on rank 1")
            return real_train_batch(tokens, seed, step, *args, **kwargs)

        data.train_batch = train_batch
        sys.exit(cli.main(sys.argv[1:]))
    """))
    started = time.monotonic()
    result = torchrun([str(script), "train", "--data", str(corpus), "--out", str(tmp_path / "run"), *MICRO],
                      timeout=60)
    assert result.returncode != 0
    assert "rank 1 of 2 failed with RuntimeError: injected failure on rank 1" in result.stderr
    assert time.monotonic() - started < 60


def test_batch_that_does_not_split_evenly_is_refused(tmp_path, corpus):
    result = torchrun(["-m", "fastlm", "train", "--data", str(corpus), "--out", str(tmp_path / "run"), *MICRO,
                       "--batch_size", "3"], timeout=60)
    assert result.returncode != 0
    assert "batch_size 3 is the global micro-batch and must divide evenly among the 2 processes" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("task, parallel", [("classify", "ddp"), ("seq2seq", "fsdp")])
def test_other_tasks_in_two_processes_match_one(tmp_path, task, parallel):
    """The classifier and the encoder-decoder through the same machinery: evaluation sums its counts (and
    gathers its decodes) over the ranks, each rank running the same number of forwards even when the
    held-out split does not divide evenly, so the metrics equal a single process's."""
    data = write_classification(tmp_path / "d.csv", rows=90) if task == "classify" \
        else write_copy_task(tmp_path / "d.jsonl", rows=90)
    # No dropout (tiny-classify has 0.1): its masks depend on how the batch is split over processes.
    args = ["--task", task, "--data", str(data), *MICRO, "--target_len", "16", "--val_fraction", "0.25",
            "--dropout", "0"]
    assert main(["train", "--out", str(tmp_path / "one"), *args]) == 0
    train_2("--out", str(tmp_path / "two"), "--parallel", parallel, *args)
    assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"))
    for key in ("val_loss", "val_accuracy", "val_macro_f1") if task == "classify" else \
            ("val_loss", "val_bleu", "val_exact_match"):
        assert_close(losses(tmp_path / "two", key), losses(tmp_path / "one", key))
    val_examples = json.loads((tmp_path / "one" / "data.json").read_text())["val_examples"]
    assert val_examples % 4 != 0  # a last, partial evaluation batch


def test_resume_with_dropout_is_exact_in_two_processes(tmp_path, corpus):
    """Each rank draws its own dropout masks, so each gets its own generator states back on resume."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_2("--data", str(corpus), "--out", str(straight), *MICRO, "--dropout", "0.1")
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000006")
    train_2("--resume", str(resumed / "checkpoints" / "step_00000003"))
    assert losses(resumed) == losses(straight)
    assert set(load_file(str(straight / "checkpoints" / "step_00000006" / "rng.safetensors"))) == \
        {"rank_0.torch_cpu", "rank_1.torch_cpu"}


def test_compiled_ddp_and_fsdp_break_the_graph_only_in_their_wrappers(tmp_path):
    """Under torchrun the trainer compiles without fullgraph: DDP's and FSDP2's wrappers break the graph
    (DDP's forward; FSDP2's hooks around each sharded block). None of fastlm's code may add a break, which
    would run our model eagerly past it without a word: no break Dynamo reports is in this repository."""
    script = tmp_path / "compiled_breaks.py"
    script.write_text(textwrap.dedent("""
        import logging
        import os
        import re

        import torch
        import torch.distributed as dist

        from fastlm import distributed, train
        from fastlm.config import ModelConfig
        from fastlm.model import GPT

        places = []

        class Breaks(logging.Handler):
            def emit(self, record):
                found = re.search(r"Graph break .*?in user code at (\\S+):\\d+", record.getMessage())
                if found:
                    places.append(os.path.realpath(found.group(1)))

        torch._logging.set_logs(graph_breaks=True)
        logging.getLogger("torch._dynamo.symbolic_convert.__graph_breaks").addHandler(Breaks())
        real_compile = torch.compile
        torch.compile = lambda model, **options: real_compile(model, **{**options, "backend": "aot_eager"})
        dist.init_process_group("gloo")
        for parallel in ("ddp", "fsdp"):
            torch.manual_seed(0)
            model = distributed.parallelize(GPT(ModelConfig(vocab_size=320, block_size=32, n_layer=2, n_head=2,
                                                            n_embd=32)), parallel, torch.device("cpu"), False)
            idx = torch.randint(0, 320, (2, 32))
            with train.model_forward(model, True) as forward:
                forward(idx, idx).backward()
            torch._dynamo.reset()
        repo = os.path.dirname(os.path.dirname(os.path.realpath(train.__file__)))
        ours = tuple(os.path.join(repo, package) + os.sep for package in ("fastlm", "kernels"))  # not a .venv there
        assert places and not [p for p in places if p.startswith(ours)], places
        print(f"rank {dist.get_rank()}: {len(places)} graph breaks, none in fastlm's code")
        dist.destroy_process_group()
    """))
    result = torchrun([str(script)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("graph breaks, none in fastlm's code") == 2
