"""The training step without host syncs: a step that does not log reads no tensor value on the host
(counted with a ``TorchDispatchMode``), yet a non-finite loss is still caught at the next logging or
checkpoint step. On CPU a sync costs nothing, but the ops counted here are the ones that would make
the host wait for a GPU."""

import math
import threading

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from fastlm import tasks
from fastlm import train as train_module
from fastlm.cli import main
from fastlm.train import make_optimizer, train
from helpers import (MICRO, losses, micro_config, task_config, write_classification, write_copy_task,
                     write_short_documents)

aten = torch.ops.aten
# What reads a tensor's value on the host (Tensor.item/bool/int/float/==, torch.equal) reaches one of these.
HOST_READS = {aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.equal}
# What copies a tensor to the host without an aten op when it is already there, as every tensor is in these
# tests (on a GPU each waits for the device): seen as the Tensor method called. Tensor.to counts too when it
# names the host, "cpu", and waits (not non_blocking=True). A torch.device("cpu") target is not counted: on
# the CPU it cannot be told from the run's own device (x.to(y.device), the batches' to_device), on a GPU a
# device-side move.
HOST_COPIES = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__array__, torch.Tensor.cpu}


class HostReads(TorchDispatchMode):
    """Counts the host reads of tensor values made while active, per op name: the aten ops of
    ``HOST_READS`` and, through a function mode (:class:`HostCopies`), the copies to the host."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.copies = HostCopies(self)

    def __enter__(self):
        self.copies.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.copies.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in HOST_READS:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class HostCopies(TorchFunctionMode):
    """The copies to the host (``HOST_COPIES``, a waiting ``Tensor.to`` the CPU), recorded in ``reads.ops``."""

    def __init__(self, reads: HostReads):
        super().__init__()
        self.reads = reads

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_COPIES or (func is torch.Tensor.to and self.waits_for_a_copy_to_the_host(args, kwargs)):
            self.reads.ops.append(func.__name__)
        return func(*args, **kwargs)

    @staticmethod
    def waits_for_a_copy_to_the_host(args, kwargs) -> bool:
        named = [a for a in (*args[1:], kwargs.get("device")) if isinstance(a, str)]
        _, _, non_blocking, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
        return any(torch.device(name).type == "cpu" for name in named) and not non_blocking


def fused_optimizer(model, cfg, device):
    """The trainer's AdamW as a GPU run has it: fused, with its step counters on the device. (The unfused
    one, the CPU's, keeps them on the host by design and reads one per step: no device sync.)"""
    groups = [{**group, "fused": True} for group in make_optimizer(model, cfg, device).param_groups]
    return torch.optim.AdamW(groups, fused=True)


def host_reads_per_step(monkeypatch, cfg, run_dir) -> list[list[str]]:
    """Train ``cfg`` into ``run_dir`` with every host read counted: those made from the start of each step to
    the start of the next (the step, its logging, evaluation and checkpoint), per step."""
    counter = HostReads()
    per_step: list[list[str]] = []
    real_step = train_module.train_step

    def counted_step(step, *args, **kwargs):
        per_step.append(counter.ops)
        counter.ops = []  # what came before this step belongs to the one before (or to the set-up)
        return real_step(step, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", counted_step)
    monkeypatch.setattr(train_module, "make_optimizer", fused_optimizer)
    with counter:
        train(cfg, run_dir, progress=False)
    per_step.append(counter.ops)
    return per_step[1:]  # without the set-up's


def task_configs(tmp_path, corpus, **overrides) -> dict:
    logged = {"log_interval": 4, "eval_interval": 4, "save_interval": 4, "max_steps": 5, **overrides}
    return {"lm": micro_config(corpus, **logged, grad_accum=2),
            # Rows of several documents, attention confined to each: their spans come with the batch.
            "lm-packed": micro_config(write_short_documents(tmp_path / "docs"), **logged, grad_accum=2,
                                      document_mask=True),
            "classify": task_config("classify", write_classification(tmp_path / "labels.csv"), **logged),
            "seq2seq": task_config("seq2seq", write_copy_task(tmp_path / "copy.jsonl"), **logged)}


def test_host_reads_sees_the_copies_to_the_host_that_reach_no_aten_op_on_the_cpu():
    # On the CPU, tolist(), numpy() and cpu() of a tensor read it in place (no aten op runs), but on a GPU each
    # copies the tensor to the host and waits for the device: the counter sees them at the Python level. A
    # batch's own copy to the device (to_device), one that does not wait, and casts that stay on the device
    # are not reads.
    x = torch.ones(3)
    with HostReads() as counter:
        x.tolist(), x.numpy(), x.cpu(), x.to("cpu"), x.to(device="cpu", dtype=torch.float64), np.asarray(x)
        int(x[0])
        x.to(torch.float64), x.to(x), x.double(), x.to("cpu", non_blocking=True), x.to(x.device)
        train_module.to_device(x, torch.device("cpu"))
    assert counter.ops == ["tolist", "numpy", "cpu", "to", "to", "__array__", "aten._local_scalar_dense.default"]


@pytest.mark.parametrize("task", ["lm", "lm-packed", "classify", "seq2seq"])
def test_steps_that_do_not_log_read_nothing_on_the_host(tmp_path, corpus, monkeypatch, task):
    per_step = host_reads_per_step(monkeypatch, task_configs(tmp_path, corpus)[task], tmp_path / "run")
    assert len(per_step) == 5
    # Steps 1-3 neither log, evaluate nor save; step 4 does all three, step 5 ends the run.
    assert per_step[:3] == [[], [], []], per_step[:3]
    assert per_step[3], "the logging step reads the loss"


@pytest.mark.slow
@pytest.mark.parametrize("task", ["lm", "lm-packed", "classify"])
def test_steps_on_the_triton_kernels_read_nothing_on_the_host(tmp_path, corpus, monkeypatch, task):
    # The kernels through Triton's interpreter (slow on CPU: two steps, one evaluation batch). Between them
    # the two tasks run every kernel a training step calls (seq2seq adds none, and its evaluation's greedy
    # decoding takes minutes in the interpreter).
    cfg = task_configs(tmp_path, corpus, max_steps=2, eval_batches=1)[task]
    cfg.train.backend = "triton"
    per_step = host_reads_per_step(monkeypatch, cfg, tmp_path / "run")
    assert per_step[0] == [] and per_step[1], per_step


def test_non_finite_step_is_named_at_the_next_logging_step(tmp_path, corpus, monkeypatch):
    # Step 2's update blows up, so step 3's loss is the first non-finite one; the run logs every 4 steps
    # and saves every 2, so it stops at step 4 (a checkpoint step: no checkpoint after the bad step is
    # written), naming step 3 and the checkpoint of step 2.
    monkeypatch.setattr(train_module, "learning_rate", lambda step, cfg: 1e30 if step == 1 else 1e-3)
    cfg = micro_config(corpus, warmup_steps=0, min_lr=0.0, save_interval=2, log_interval=4, eval_interval=8,
                       grad_clip=0.0)
    with pytest.raises(train_module.TrainingError, match=r"non-finite loss .* step 3\b.*step_00000002"):
        train(cfg, tmp_path / "run", progress=False)
    from fastlm.checkpoint import list_checkpoints
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000002"]


def test_non_finite_gradient_without_clipping_is_named(tmp_path, corpus, monkeypatch):
    # With grad_clip=0 no gradient norm is needed for clipping, yet a non-finite gradient under a finite loss is
    # still caught: step 3's gradient is NaN (its loss is fine), which corrupts the weights, so step 4's loss is
    # NaN too. The run logs every 4 steps and saves every 2: it stops at step 4 naming step 3 (not 4) and keeps
    # step 2's checkpoint, the last written before the bad gradient. No step but the logging one reads a value.
    backward_calls = []
    real_build = tasks.LanguageModeling.build_model

    def build_with_a_bad_gradient(self):
        model = real_build(self)
        backward_calls.clear()  # one backward per step (grad_accum=1)
        model.transformer.ln_f.weight.register_hook(
            lambda grad: backward_calls.append(grad) or (grad * math.nan if len(backward_calls) == 3 else grad))
        return model

    monkeypatch.setattr(tasks.LanguageModeling, "build_model", build_with_a_bad_gradient)
    cfg = micro_config(corpus, max_steps=5, save_interval=2, log_interval=4, eval_interval=8, grad_clip=0.0)
    with pytest.raises(train_module.TrainingError,
                       match=r"non-finite gradient at step 3\b \(its loss [\d.]+\).*step_00000002"):
        host_reads_per_step(monkeypatch, cfg, tmp_path / "run")
    from fastlm.checkpoint import list_checkpoints
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000002"]


def test_steps_without_clipping_read_nothing_on_the_host(tmp_path, corpus, monkeypatch):
    per_step = host_reads_per_step(monkeypatch, micro_config(corpus, max_steps=3, log_interval=3, eval_interval=3,
                                                             save_interval=3, grad_clip=0.0), tmp_path / "run")
    assert per_step[:2] == [[], []] and per_step[2], per_step


# ----------------------------------------------------------------------------- compile


LLAMA = {"norm": "rmsnorm", "mlp": "swiglu", "position": "rope", "bias": False, "tie_embeddings": False,
         "n_kv_head": 1}


def family_config(family, tmp_path, corpus):
    """3 steps of a micro model of each preset family, evaluated once at the end."""
    steps = {"max_steps": 3, "log_interval": 1, "eval_interval": 3, "save_interval": 3, "eval_batches": 1}
    if family in ("gpt2", "llama"):
        cfg = micro_config(corpus, **steps)
    elif family == "llama-packed":  # documents masked, sliding windows in every other layer
        cfg = micro_config(write_short_documents(tmp_path / "docs"), **steps, document_mask=True)
        for name, value in {**LLAMA, "window": 8, "global_every": 2}.items():
            cfg.set(name, value)
    else:
        cfg = task_configs(tmp_path, corpus, **steps)[family]
    for name, value in (LLAMA if family == "llama" else {}).items():
        cfg.set(name, value)
    return cfg.validate()


@pytest.mark.parametrize("family", ["gpt2", "llama", "llama-packed", pytest.param("classify", marks=pytest.mark.slow),
                                    pytest.param("seq2seq", marks=pytest.mark.slow)])  # padded: recompiles
def test_compiled_training_matches_eager(tmp_path, corpus, monkeypatch, family):
    # `--set compile=true` end to end: the trainer compiles the model as one graph (fullgraph: a graph
    # break fails instead of slowing down), and its losses are eager's. Inductor's CPU code generation
    # takes about 20 s a model on this machine, so the test compiles with "aot_eager" (Dynamo's graph and
    # AOTAutograd's forward and backward, run by eager kernels); test_compiled_cli_run_with_inductor runs
    # Inductor once.
    compiled = []
    real_compile = torch.compile

    def compile_aot_eager(model, **options):
        compiled.append(options)
        return real_compile(model, **{**options, "backend": "aot_eager"})

    eager_cfg = family_config(family, tmp_path, corpus)
    train(eager_cfg, tmp_path / "eager", progress=False)
    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    compiled_cfg = family_config(family, tmp_path, corpus)
    compiled_cfg.train.compile = True
    train(compiled_cfg, tmp_path / "compiled", progress=False)
    assert compiled == [{"fullgraph": True}]
    for key in ("loss", "val_loss"):
        eager, compiled_losses = losses(tmp_path / "eager", key), losses(tmp_path / "compiled", key)
        assert eager.keys() == compiled_losses.keys() and eager
        torch.testing.assert_close(compiled_losses, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_back_to_back_compiled_trainings_in_one_process(tmp_path, corpus, monkeypatch):
    # A sweep (a notebook, a hyper-parameter loop over the Python API) trains model after model compiled in one
    # process, with no Dynamo reset between them (the suite's fresh_dynamo runs only between tests). Each shape
    # has its own training and evaluation graphs of the same forward code: in one cache shared by every model
    # (and by the user's), the fourth shape here passed Dynamo's recompile limit (8 a code object) and the
    # fullgraph compile failed. Five models of different shapes train, and a GPT the user compiled before them
    # keeps its compiled code.
    from torch._dynamo.testing import CompileCounter

    from fastlm.model import GPT

    mine, counter = GPT(micro_config(corpus).model), CompileCounter()
    users_model = torch.compile(mine, backend=counter, fullgraph=True)
    idx = torch.randint(0, 320, (2, 8))
    users_model(idx, idx)
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile",
                        lambda model, **options: real_compile(model, **{**options, "backend": "aot_eager"}))
    shapes = [{"n_layer": 1, "n_head": heads} for heads in (1, 2, 4, 8)] + [{"n_layer": 2, "n_head": 1}]
    for run, shape in enumerate(shapes):
        cfg = micro_config(corpus, max_steps=1, eval_batches=1, compile=True)
        for name, value in shape.items():
            cfg.set(name, value)
        train(cfg.validate(), tmp_path / f"run{run}", progress=False)
    users_model(idx, idx)
    assert counter.frame_count == 1, "the user's compiled model was compiled again"


@pytest.mark.slow
def test_compiled_cli_run_with_inductor(tmp_path, corpus):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert main(["train", "--data", str(corpus), "--out", str(eager), *MICRO]) == 0
    assert main(["train", "--data", str(corpus), "--out", str(compiled), *MICRO, "--set", "compile=true"]) == 0
    torch.testing.assert_close(losses(compiled), losses(eager), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- input pipeline


def test_next_steps_batches_are_made_while_a_step_trains(tmp_path, corpus, monkeypatch):
    # Every step's batches but the first's are made on the background thread (started as the step
    # before began), and they are that step's: the losses equal those of batches made in line.
    cfg = micro_config(corpus, max_steps=4, grad_accum=2, log_interval=1)
    made = []
    real_batch = tasks.LanguageModeling.train_batch

    def recorded_batch(self, step, micro, shard):
        made.append((step, threading.current_thread().name))
        return real_batch(self, step, micro, shard)

    with monkeypatch.context() as patch:
        patch.setattr(tasks.LanguageModeling, "train_batch", recorded_batch)
        train(cfg, tmp_path / "prefetched", progress=False)
    assert [step for step, _ in made] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert {thread for step, thread in made if step} == {"fastlm-batches_0"}

    monkeypatch.setattr(train_module.BatchPrefetcher, "batches", train_module.BatchPrefetcher.make)  # in line
    train(cfg, tmp_path / "in_line", progress=False)
    assert losses(tmp_path / "prefetched") == losses(tmp_path / "in_line")
