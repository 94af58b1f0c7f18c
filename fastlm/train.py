"""The training loop, top to bottom: run directory, data, model, optimizer, steps, evals, checkpoints.

The same loop trains every task (:mod:`fastlm.tasks`: the language model, the
encoder classifier, the encoder-decoder); the task supplies data, model,
batches and evaluation. :func:`train` sets the run up and then repeats
:func:`train_step` (one optimizer step), with logging, evaluation and
checkpoints around it. The run directory (what it holds, how it is marked,
locked, overwritten and checked on resume) is :mod:`fastlm.rundir`'s. A step's
batches depend only on (seed, step), the learning rate only on the step, and a
checkpoint restores weights, optimizer and RNG states, so resuming on CPU
reproduces an uninterrupted run bit for bit. A resume first checks, with what
the checkpoint recorded, that nothing else that decides the computation changed
(:func:`fastlm.rundir.verify_resume`), and refuses naming the file that did.
A step that does not log, evaluate or save reads nothing back from the device
(:func:`train_step`, :class:`FiniteWatch`), and its batches are made while the
step before it trains (:class:`BatchPrefetcher`).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import types
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

import kernels

from . import distributed, rundir
from .batching import Batch
from .checkpoint import load_checkpoint, save_checkpoint
from .config import Config, ConfigError
from .hf import check_fits, check_has_tokenizer, load_hf_weights
from .metrics import MetricsLog, eval_record, mfu, peak_flops, peak_memory_bytes
from .precision import autocast_context, compute_dtype
from .rundir import TrainingError, check_new_run_dir
from .tasks import make_task


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    loss: float
    val_loss: float | None
    tokens_per_sec: float
    seconds: float
    evals: dict = field(default_factory=dict)  # the last evaluation's metrics (the task's own)


# ----------------------------------------------------------------------------- set-up helpers


def resolve_device(cfg: Config) -> torch.device:
    name = cfg.train.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but CUDA is not available")
    return distributed.local_device(torch.device(name))


def device_memory(device: torch.device) -> int:
    """Bytes of memory ``device`` has in all: the GPU's, or the machine's RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def learning_rate(step: int, cfg: Config) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``min_lr`` at ``max_steps``; ``step`` counts from 0."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (t.lr - t.min_lr)


def make_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (linear and embedding weights) only, not on biases or norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.train.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2),
                             fused=device.type == "cuda")


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` (a batch tensor on the host, pinned for a GPU by :class:`BatchPrefetcher`) on ``device``; the
    copy from pinned memory does not make the host wait for the device."""
    return x.to(device, non_blocking=True)


class BatchPrefetcher:
    """Each step's micro-batches, the next step's made on a background thread while the current one
    trains; for a GPU in page-locked (pinned) memory, so that :func:`to_device` copies asynchronously.
    A step's batches are a pure function of (seed, step) and the data, so which thread makes them, and
    when, changes nothing: resuming stays exact. Use as a context manager (the thread stops at exit)."""

    def __init__(self, task, cfg: Config, device: torch.device):
        self.task, self.micro_steps, self.max_steps = task, cfg.train.grad_accum, cfg.train.max_steps
        self.shard = (distributed.rank(), distributed.world_size())
        self.pin = device.type == "cuda"
        self.pending: tuple[int, Future] | None = None  # (step, its batches being made)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastlm-batches")

    def make(self, step: int) -> list[Batch]:
        batches = [self.task.train_batch(step, micro, self.shard) for micro in range(self.micro_steps)]
        if self.pin:
            batches = [replace(b, tensors=tuple(x.pin_memory() for x in b.tensors)) for b in batches]
        return batches

    def batches(self, step: int) -> list[Batch]:
        """Step ``step``'s micro-batches; starts making step ``step + 1``'s."""
        if self.pending is not None and self.pending[0] == step:
            batches = self.pending[1].result()
        else:  # the first step of a run (or of a resumed one)
            batches = self.make(step)
        self.pending = (step + 1, self.pool.submit(self.make, step + 1)) if step + 1 < self.max_steps else None
        return batches

    def __enter__(self) -> "BatchPrefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def model_forward(model: torch.nn.Module, compiled: bool) -> Iterator[Callable[..., torch.Tensor]]:
    """What runs ``model`` in the loop: the model itself, or if ``compiled``, ``torch.compile(model)``
    with its compiled code private to this run and freed when the run ends.

    Dynamo keeps compiled code per code object (here ``type(model).forward``), shared by every instance,
    and fails a fullgraph compile past ``recompile_limit`` entries (8); each model shape adds its training
    and evaluation graphs, so in one process (a notebook sweep, a hyper-parameter loop) the fifth shape would
    fail. The compiled model runs a copy of that code object instead (same bytecode, its own cache), emptied
    at exit: a run counts only its own compilations, and a model the user compiled elsewhere, even of the
    same class, is neither counted nor recompiled. One graph per model (fullgraph): a graph break is an
    error here, not a silent slowdown. Under DDP/FSDP the model is compiled as it is, without fullgraph
    (past the limit Dynamo runs it eager instead of failing), for their wrappers break the graph, none of
    our code: DDP's forward three times (its ``Logger``, and ``_inside_ddp_forward``, which Dynamo skips on
    purpose), after which the model's forward is one graph (Dynamo splits it at gradient buckets); FSDP2's
    hooks around each sharded block are ``torch._dynamo.disable``-d (``skip_fsdp_hooks``), so the loop over
    the blocks runs eagerly and each block's forward compiles on its own (2 layers: 5 graphs)."""
    if not compiled:
        yield model
        return
    if distributed.world_size() > 1:
        yield torch.compile(model)
        return
    shared = type(model).forward
    code = shared.__code__.replace()  # a new code object, the same function
    own = types.FunctionType(code, shared.__globals__, shared.__name__, shared.__defaults__, shared.__closure__)
    own.__kwdefaults__, own.__qualname__ = shared.__kwdefaults__, shared.__qualname__
    model.forward = types.MethodType(own, model)  # what nn.Module calls
    try:
        yield torch.compile(model, fullgraph=True)
    finally:
        del model.forward
        torch._dynamo.reset_code(code)  # the run's graphs (Dynamo's own tables keep the small code object)


# ----------------------------------------------------------------------------- the loop


def train(cfg: Config, run_dir: str | Path, *, resume_from: str | Path | None = None,
          overwrite: bool = False, progress: bool = True, init_from: str | Path | None = None) -> TrainResult:
    """Train ``cfg`` into ``run_dir``; with ``resume_from`` (a checkpoint directory of that run),
    continue from it; with ``init_from`` (a Hugging Face checkpoint directory, see :mod:`fastlm.hf`),
    start a new run from its weights and its tokenizer (it must have a ``tokenizer.json``). Rank 0 holds the run
    directory's lock from its first use of it to the end (see :mod:`fastlm.rundir`)."""
    with rundir.DirectoryLock(run_dir) as lock:
        return _train(cfg, Path(run_dir), lock, resume_from=resume_from, overwrite=overwrite, progress=progress,
                      init_from=init_from)


@dataclass
class StepResult:
    lr: float
    loss: torch.Tensor  # the step's mean loss over every rank's terms, on the device (read on logging steps only)
    grad_norm: torch.Tensor  # before clipping, on the device (read on logging steps only)
    tokens: int  # this rank's tokens in the step's batches
    flops: float  # this rank's training FLOPs for them


def train_step(step: int, cfg: Config, task, model: torch.nn.Module, forward, optimizer: torch.optim.Optimizer,
               device: torch.device, batches: list[Batch]) -> StepResult:
    """Step ``step`` (counted from 0) of training: set the learning rate, run the step's micro-batches
    ``batches`` forward and backward (gradients synchronised across ranks on the last), clip, and take the
    optimizer step. It reads no tensor value on the host (no sync): the kernels' value checks are skipped
    (:func:`kernels.unchecked`; the tasks' batches are valid by construction, checked where the data is
    made), and the loss and gradient norm stay on the device for the caller's :class:`FiniteWatch`."""
    t = cfg.train
    lr = learning_rate(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    # Every loss term (target token, example) of the step weighs the same, however the step's
    # batch is split into micro-batches and ranks: each micro-batch's mean loss is scaled by its
    # share of the step's terms (times the ranks, as gradients are averaged over them).
    step_terms = task.step_loss_terms(step)
    loss_sum = torch.zeros((), device=device)
    tokens, flops = 0, 0.0
    with kernels.unchecked():
        for micro, batch in enumerate(batches):
            share = batch.loss_terms / step_terms
            with distributed.gradient_sync(model, micro == t.grad_accum - 1):
                with autocast_context(cfg, device):
                    loss = forward(*(to_device(x, device) for x in batch.tensors))
                (loss * (share * distributed.world_size())).backward()
            loss_sum += loss.detach().float() * share
            tokens += batch.tokens
            flops += batch.flops
    grad_norm = distributed.full_tensor(clip_gradients(model, t.grad_clip))
    # A non-finite gradient corrupts the weights in this update; FiniteWatch stops the run at the next
    # logging or checkpoint step, before anything is saved, naming the last good checkpoint.
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(lr, distributed.total(loss_sum), grad_norm, tokens, flops)


def clip_gradients(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """The global norm of ``model``'s gradients, on the device (a DTensor under FSDP2), having scaled them
    down to norm ``max_norm`` if it was larger; ``max_norm=0`` measures without clipping: the norm is
    non-finite where any gradient is, which :class:`FiniteWatch` needs whether or not the step clips."""
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch 2.6+: one fused pass over the gradients, no write
        return torch.nn.utils.get_total_norm(grads)
    return torch.nn.utils.clip_grad_norm_(grads, math.inf)  # scales by 1: a second pass, the same norm


class FiniteWatch:
    """Whether every step so far had a finite loss and gradient norm, kept on the device so that a
    step reads nothing on the host: :meth:`check` reads it (one sync), at logging steps and before
    each checkpoint is saved, and fails naming the first non-finite step and ``last_good``."""

    def __init__(self, device: torch.device):
        self.first_bad = torch.zeros((), dtype=torch.int64, device=device)  # 0: none yet; else its step from 1
        self.bad_loss = torch.zeros((), device=device)  # the loss of that step

    def update(self, step: int, done: StepResult) -> None:
        """Record step ``step`` (counted from 0)."""
        bad = ~torch.isfinite(done.loss) | ~torch.isfinite(done.grad_norm)
        first = bad & (self.first_bad == 0)
        self.first_bad = torch.where(first, step + 1, self.first_bad)
        self.bad_loss = torch.where(first, done.loss, self.bad_loss)

    def check(self, last_good: str | Path | None) -> None:
        first_bad = int(self.first_bad)
        if first_bad:
            loss = float(self.bad_loss)
            what = (f"non-finite gradient at step {first_bad} (its loss {loss:.4f})" if math.isfinite(loss)
                    else f"non-finite loss ({loss}) at step {first_bad}")
            kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was saved yet"
            raise TrainingError(f"{what}; training stopped, {kept}. Try a lower lr or a smaller (non-zero) "
                                "grad_clip.")


def _train(cfg: Config, run_dir: Path, lock: rundir.DirectoryLock, *, resume_from: str | Path | None,
           overwrite: bool, progress: bool, init_from: str | Path | None) -> TrainResult:
    started = time.perf_counter()
    progress = progress and distributed.is_main()  # only rank 0 prints, logs and plots
    say = print if progress else (lambda *_: None)
    cfg.validate()
    run_dir = Path(run_dir)
    t = cfg.train
    device = resolve_device(cfg)
    if t.warmup_steps > t.max_steps and distributed.is_main():  # as asked (a preset's warmup on a short run, say)
        warnings.warn(f"warmup_steps ({t.warmup_steps}) is more than max_steps ({t.max_steps}): the learning rate "
                      f"rises for the whole run, to {learning_rate(t.max_steps - 1, cfg):.3g} of lr {t.lr:g}, and "
                      "never decays; lower warmup_steps to warm up and decay within the run", stacklevel=3)

    # 1. Where the run goes (or what it resumes), checked before anything is written.
    saved_data = None
    cfg.check_memory(device_memory(device), str(device), distributed.world_size())
    if device.type != "cuda":  # a GPU runs every backend; a CPU runs triton only through Triton's interpreter
        with kernels.use_backend(t.backend):
            kernels.rms_norm(torch.ones(1, 8, device=device), (8,))  # raises, naming the fix, where it cannot
    rundir.check_placement(run_dir, t.data)
    if resume_from is None:
        check_new_run_dir(run_dir, overwrite)
        if init_from is not None:
            check_has_tokenizer(init_from)
            check_fits(init_from, cfg.model)  # an override of its shape (--n_layer) fails here, not after set-up
    else:
        if distributed.is_main():
            lock.acquire(create=False)  # before reading what another process might be rewriting
        saved_data = rundir.verify_resume(run_dir, Path(resume_from), cfg)

    # 2. Data and tokenizer, as the task defines them (the run's own tokenizer when resuming).
    task = make_task(cfg)
    data_hash = task.load()
    if saved_data is not None and saved_data["corpus_hash"] != data_hash:
        raise TrainingError(f"the data at {t.data or 'the built-in data set'} changed since {run_dir} started "
                            "(its hash differs), so the run cannot continue exactly")
    prepared = task.prepare(run_dir, saved_data, init_from)
    if saved_data is not None:
        rundir.check_same_data(run_dir, saved_data, prepared.info)
    tokenizer = prepared.tokenizer
    say(f"data: {prepared.summary}, vocabulary {tokenizer.get_vocab_size()} "
        f"({time.perf_counter() - started:.1f} s)")

    # 3. The run directory: config, tokenizer and data description next to the checkpoints.
    if resume_from is None and distributed.is_main():  # the others checked it in step 1, before this
        lock.acquire(create=True)  # before anything is deleted or written
        rundir.start_run(run_dir, overwrite)  # checked again under the lock, emptied if asked, marked
        rundir.write_run_files(run_dir, tokenizer, prepared.info, cfg)

    # 4. Model and optimizer, restored from the checkpoint when resuming.
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    model = task.build_model()
    num_params, model_name = sum(p.numel() for p in model.parameters()), type(model).__name__
    if distributed.rank():  # but each rank its own dropout masks (rank 0's stream is a single process's)
        torch.manual_seed(t.seed * 1_000_003 + distributed.rank())
    if init_from is not None and resume_from is None:
        load_hf_weights(init_from, model)
    model = distributed.parallelize(model.to(device), t.parallel, device,
                                    bf16=compute_dtype(cfg, device) == torch.bfloat16)
    optimizer = make_optimizer(model, cfg, device)
    step = 0
    if resume_from is not None:
        state = load_checkpoint(Path(resume_from), model, optimizer)
        step = state["step"]
        if distributed.is_main():
            for was, now in rundir.continue_run(run_dir, step):  # said even when quiet: files moved
                print(f"set aside {was.name} (newer than the checkpoint resumed from) as {now}")
            rundir.write_config(run_dir, cfg)  # only RESUMABLE_CHANGES can differ
    recorded_run = rundir.run_record(run_dir, cfg) if distributed.is_main() else None  # what checkpoints vouch for
    if distributed.is_main():
        metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=step if resume_from is not None else None)
    say(f"model: {model_name}, {num_params / 1e6:.1f}M parameters on {device}, kernels backend "
        f"{t.backend}; {t.max_steps} steps of {t.batch_size * t.grad_accum} "
        + ("sequences" if t.task != "lm" else f"x {t.seq_len} tokens") + (f", from step {step}" if step else "")
        + (f"; {t.parallel} over {distributed.world_size()} processes" if distributed.world_size() > 1 else ""))

    # 5. Steps, with logging, evaluation and checkpoints around them.
    peak = peak_flops(device)
    peak = peak * distributed.world_size() if peak else None  # tokens/s and MFU are the whole job's
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    last_good = resume_from
    loss_value, evals, tokens_per_sec = float("nan"), None, 0.0
    window_start, window_tokens, window_flops = time.perf_counter(), 0, 0.0
    bar = tqdm(total=t.max_steps, initial=step, disable=not progress, unit="step", dynamic_ncols=True)
    watch = FiniteWatch(device)
    with (kernels.use_backend(t.backend), bar, BatchPrefetcher(task, cfg, device) as prefetcher,
          model_forward(model, t.compile) as forward):
        while step < t.max_steps:
            done = train_step(step, cfg, task, model, forward, optimizer, device, prefetcher.batches(step))
            watch.update(step, done)
            window_tokens += done.tokens
            window_flops += done.flops
            step += 1

            # Only these steps read values on the host: a step that does none of it makes no sync.
            logging = step % t.log_interval == 0 or step == t.max_steps
            evaluating = step % t.eval_interval == 0 or step == t.max_steps
            saving = step % t.save_interval == 0 or step == t.max_steps
            if logging or evaluating or saving:
                watch.check(last_good)  # nothing is logged or saved after a non-finite step
                loss_value = done.loss.item()
            if logging:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                elapsed = time.perf_counter() - window_start
                # The whole job's: padded batches hold different numbers of tokens on each rank.
                job_tokens, job_flops = distributed.total(torch.tensor([window_tokens, window_flops],
                                                                       dtype=torch.float64)).tolist()
                tokens_per_sec = job_tokens / elapsed
                if distributed.is_main():
                    record = {"step": step, "loss": loss_value, "lr": done.lr,
                              "grad_norm": done.grad_norm.item(),
                              "tokens_per_sec": tokens_per_sec, "mfu": mfu(job_flops / elapsed, peak),
                              "peak_mem_bytes": peak_memory_bytes(device)}
                    if t.task == "lm":
                        record["tokens"] = step * t.tokens_per_step  # tokens trained on so far
                    metrics.log(record)
                bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens_per_sec:,.0f}", refresh=False)
                window_start, window_tokens, window_flops = time.perf_counter(), 0, 0.0
            bar.update(1)

            paused = time.perf_counter()  # evals and saves do not count against tokens/s
            if evaluating:
                model.eval()
                evals = task.evaluate(forward, device, lambda: autocast_context(cfg, device))
                model.train()
                if distributed.is_main():
                    metrics.log(eval_record(step, evals, run_dir))
                    metrics.plot(run_dir / "loss.png")
                    bar.write(f"step {step}: train loss {loss_value:.4f}, {task.describe(evals)}")
            if saving:
                last_good = save_checkpoint(run_dir, step, model, optimizer, {"run": recorded_run}, t.keep_last)
            window_start += time.perf_counter() - paused

    return TrainResult(run_dir, step, loss_value, None if evals is None else evals["val_loss"], tokens_per_sec,
                       time.perf_counter() - started, evals or {})
