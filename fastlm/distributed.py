"""Data-parallel training on torch.distributed: the one place that knows about ranks.

``torchrun --nproc_per_node=N -m fastlm train ...`` starts N processes with
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set; :func:`process_group` turns
them into a process group (NCCL on GPUs, gloo on CPU) and :func:`parallelize`
wraps the model from outside, with DistributedDataParallel (``parallel=ddp``,
the default) or FSDP2's ``fully_shard`` (``parallel=fsdp``; on GPU, or wherever
the run computes in bf16, with a mixed-precision policy: bf16 weights in compute,
fp32 gradient reduction). Without torchrun every helper here is the
single-process identity, so the training loop reads the same either way.

``batch_size`` is the global micro-batch: rank r of W reads rows
``[r*B/W, (r+1)*B/W)`` of each micro-batch, so a run computes the same losses
whatever the number of processes.

Checkpoints are consolidated: :func:`full_state_dicts` gathers the full model
and optimizer state onto rank 0's CPU (which writes them), and
:func:`load_full_state_dicts` loads full state dicts, read by every rank, onto
its local shards, so a checkpoint from any world size loads in any other.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from .config import Config, ConfigError

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def launched() -> bool:
    """Started by torchrun (or anything else that sets its variables) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    """This process's rank; torchrun's ``RANK`` before the group is joined or after it is left."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Only the main process logs, plots, prints and writes files."""
    return rank() == 0


@contextlib.contextmanager
def process_group(cfg: Config):
    """Join the job's process group for the duration of the block, when launched by torchrun.

    An exception on one rank is printed with its rank and ends that process with it; the
    group is then left alone (tearing it down would wait on the other ranks), and torchrun,
    seeing a worker exit non-zero, stops the others, so the job fails instead of hanging.
    """
    if not launched() or dist.is_initialized():
        yield
        return
    if cfg.train.batch_size % int(os.environ["WORLD_SIZE"]):
        raise ConfigError(f"batch_size {cfg.train.batch_size} is the global micro-batch and must divide evenly "
                          f"among the {os.environ['WORLD_SIZE']} processes")
    use_cuda = cfg.train.device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30))
    try:
        yield
    except BaseException as e:
        print(f"fastlm: rank {rank()} of {world_size()} failed with {type(e).__name__}: {e}",
              file=sys.stderr, flush=True)
        raise
    dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """This rank's GPU (``cuda:LOCAL_RANK``) when training on CUDA."""
    if device.type == "cuda" and dist.is_initialized():
        return torch.device("cuda", torch.cuda.current_device())
    return device


@contextlib.contextmanager
def main_first():
    """Run the block on rank 0 first, then on each other node's first process, then on the rest:
    the caches (tokenizer, token files) are built once per machine, and by one process at a time."""
    if not dist.is_initialized():
        yield
        return
    turn = 0 if is_main() else 1 if int(os.environ.get("LOCAL_RANK", "0")) == 0 else 2
    for phase in range(3):
        if phase == turn:
            yield
        dist.barrier()


# ----------------------------------------------------------------------------- the model


def parallelize(model: nn.Module, parallel: str, device: torch.device, bf16: bool) -> nn.Module:
    """``model`` made data-parallel across the process group (unchanged in a single process).

    DDP returns a wrapper; FSDP2 shards each transformer block and then the root (the
    embeddings, final norm and head) in place, and returns the same module. With ``bf16``
    (a run under bf16 autocast, as on GPU) FSDP2 gathers and computes with bf16 weights
    and reduces gradients in fp32; the sharded master weights and optimizer stay fp32.
    """
    if not dist.is_initialized():
        return model
    if parallel == "fsdp":
        # Blocks return the split outputs of fused kernels (views) that the model never changes in place.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(\w+\) returned a view tensor")
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
        for block in model.blocks():
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    # The model's only buffers are constant RoPE tables: nothing to broadcast before each forward.
    # torch 2.13 renamed the switch (the old name now warns); older versions only know the old one.
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(
        DistributedDataParallel.__init__).parameters else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Reduce gradients across ranks in this block's backward only when ``enabled``: gradient
    accumulation synchronises on its last micro-step alone."""
    if isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


@contextlib.contextmanager
def unsharded(model: nn.Module):
    """Gather FSDP2's root parameters (embeddings, final norms, head) for the block, for code that calls
    the model's methods rather than its forward (decoding); the blocks gather their own as they run."""
    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of a (scalar) tensor over the ranks."""
    if not dist.is_initialized():
        return value
    total = value.clone()
    dist.all_reduce(total)  # a sum: gloo has no average
    return total / dist.get_world_size()


def total(value: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor over the ranks (losses, counts, confusion matrices), on the tensor's device."""
    if not dist.is_initialized():
        return value
    out = value.to(_collective_device(), copy=True)
    dist.all_reduce(out)
    return out.to(value.device)


def gather_objects(items: list) -> list:
    """Every rank's list, concatenated in rank order (picklable items: decoded ids, texts)."""
    if not dist.is_initialized():
        return list(items)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a possibly sharded one (FSDP2's gradient norm is a DTensor)."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


# ----------------------------------------------------------------------------- checkpoints


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The whole model's weights and optimizer state on CPU, keyed by parameter name
    (``transformer.h.0.attn.c_attn.weight``, no ``module.`` prefix). A collective: every rank
    calls it; under FSDP2 only rank 0's are filled in."""
    return (get_model_state_dict(model, options=_FULL),
            get_optimizer_state_dict(model, optimizer, options=_FULL))


def load_full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None, weights: dict,
                          optimizer_state: dict | None = None) -> None:
    """Load full (unsharded) state dicts as :func:`full_state_dicts` returns them onto this rank."""
    options = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(model, weights, options=options)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)

