"""Checkpoints without pickle: tensors in safetensors, everything else in JSON.

One directory per saved step, ``checkpoints/step_00000100/``:

    model.safetensors      the weights (state_dict keys of :class:`fastlm.model.GPT`)
    optimizer.safetensors  the optimizer's per-parameter tensors, keyed ``<param name>.<state key>``
    optimizer.json         its param groups (hyper-parameters, parameter names)
    rng.safetensors        torch's CPU and CUDA generator states of every rank (``rank_R.torch_cpu``, ...)
    state.json             step, what the run's files were (see fastlm.rundir.run_record),
                           the sha256 and size of each file above, and a sha256 of its own content

A checkpoint is written under a temporary name and renamed into place, so a
directory named ``step_*`` is complete when it appears; ``state.json``'s hashes
catch a file damaged afterwards, ``state.json`` itself included (it records a
hash of its own content), and its step must be the one in the directory's name
and in ``model.safetensors``. A failed write (a full disk) removes the
temporary folder and names the file it was writing. Only the last
``keep_last`` up to the step just written are kept; an old one is deleted by
renaming it to a hidden name first, so a kill mid-deletion never leaves a
partial ``step_*`` folder. :func:`list_checkpoints` lists only folders with a
``state.json``, and hidden or partial leftovers are removed at the next save.

A run resumed from an older checkpoint abandons the newer ones (they hold the
steps about to be redone): :func:`set_aside_newer` moves them, never deleting
them, to ``checkpoints/abandoned/step_N-TIMESTAMP/``, where retention does not
look; delete them yourself once they are not needed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from . import distributed
from .files import atomic_write, fault_point, remove_dir
from .jsonfile import content_sha256, read_json_object, require

_STEP_DIR = re.compile(r"^step_(\d+)$")
# What a save or deletion killed midway leaves in checkpoints/: save_checkpoint's ".tmp-step_N-PID" and
# ".old-step_N-PID", remove_dir's ".step_N.del-PID". Only these hidden names are fastlm's to clean up.
_LEFTOVER = re.compile(r"^\.(?:(?:tmp|old)-step_\d+-\d+|step_\d+\.del-\d+)$")
_TENSOR_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged or does not fit the model; the message says which."""


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def checkpoint_step(path: Path) -> int:
    return int(_STEP_DIR.match(Path(path).name).group(1))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run (``step_*`` folders with a ``state.json``), oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=checkpoint_step)


def set_aside_newer(run_dir: Path, step: int) -> list[tuple[Path, Path]]:
    """Move the checkpoints newer than ``step`` (abandoned by a run resumed from ``step``) to
    ``checkpoints/abandoned/step_N-TIMESTAMP``; (was, now) for each. Nothing is deleted."""
    moved = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for path in list_checkpoints(run_dir):
        if checkpoint_step(path) > step:
            target = path.parent / "abandoned" / f"{path.name}-{stamp}"
            target.parent.mkdir(exist_ok=True)
            n = 1
            while target.exists():  # set aside twice within a second
                target, n = target.with_name(f"{path.name}-{stamp}-{n}"), n + 1
            fault_point(f"set aside {path}")
            os.rename(path, target)
            moved.append((path, target))
    return moved


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- optimizer state


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's own order (without a DDP wrapper's ``module.``)."""
    names = {id(p): n.removeprefix("module.") for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _optimizer_to_files(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a full optimizer state dict keyed by parameter name into tensors and JSON."""
    tensors, scalars = {}, {}
    for name, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{name}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_files(model, optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    """The full optimizer state dict (keyed by parameter name) the files hold, checked against ``optimizer``."""
    saved = [n for g in meta["param_groups"] for n in g["params"]]
    if saved != _param_names(model, optimizer):
        raise CheckpointError("the optimizer state does not match the model's parameters")
    state: dict[str, dict[str, Any]] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        name, key = flat.rsplit(".", 1)
        state.setdefault(name, {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


# ----------------------------------------------------------------------------- RNG


def _rng_tensors() -> dict[str, torch.Tensor]:
    """This process's generator states: CPU, and its current GPU's."""
    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["torch_cuda"] = torch.cuda.get_rng_state()
    return states


def _all_ranks_rng() -> dict[str, torch.Tensor]:
    """Every rank's generator states, keyed ``rank_R.NAME`` (a collective; rank 0's result is the full one).
    Each rank draws its own dropout masks, so each must get its own states back on resume."""
    per_rank = distributed.gather_objects([_rng_tensors()])
    return {f"rank_{r}.{name}": t for r, states in enumerate(per_rank) for name, t in states.items()}


def _restore_rng(states: dict[str, torch.Tensor]) -> None:
    """This rank's generator states (rank 0's when the checkpoint was written by fewer processes)."""
    if "torch_cpu" in states:  # written before per-rank states: one process's
        states = {"rank_0.torch_cpu": states["torch_cpu"],
                  **({"rank_0.torch_cuda": states["torch_cuda_0"]} if "torch_cuda_0" in states else {})}
    prefix = f"rank_{distributed.rank()}."
    if prefix + "torch_cpu" not in states:
        prefix = "rank_0."
    torch.set_rng_state(states[prefix + "torch_cpu"])
    if prefix + "torch_cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states[prefix + "torch_cuda"])


# ----------------------------------------------------------------------------- save / load


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep_last: int) -> Path:
    """Write the checkpoint for ``step`` atomically, then drop all but the last ``keep_last``.

    In a distributed run every rank calls this (the full state is gathered from all of
    them) and rank 0 alone writes the same files a single process would.
    """
    final = checkpoint_dir(run_dir, step)
    weights, optimizer_state = distributed.full_state_dicts(model, optimizer)
    rng = _all_ranks_rng()
    if not distributed.is_main():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_files(tmp, step, weights, optimizer_state, rng, state)
    except BaseException:  # a full disk, say: the error names the file; the half-written folder goes
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    fault_point(f"rename {tmp}")
    if final.exists():  # resumed from an older checkpoint without setting newer ones aside: a step redone
        stale = final.parent / f".old-{final.name}-{os.getpid()}"
        os.rename(final, stale)
        os.rename(tmp, final)
        remove_dir(stale)
    else:
        os.rename(tmp, final)

    # Retention looks only at this step and older ones: never at a newer checkpoint a resumed run
    # abandoned, which would otherwise count as "last" and push out the one just written.
    # A checkpoint folder that is a link (to another disk, say) is the user's: never deleted through.
    older = [p for p in list_checkpoints(run_dir) if checkpoint_step(p) < step and not p.is_symlink()]
    for old in older[:max(0, len(older) - (keep_last - 1))]:
        remove_dir(old)
    for leftover in final.parent.iterdir():  # from a crashed save or deletion: its hidden names, or no state.json
        if _LEFTOVER.match(leftover.name) or (_STEP_DIR.match(leftover.name)
                                              and not (leftover / "state.json").is_file()):
            shutil.rmtree(leftover, ignore_errors=True)
    return final


def _write_files(folder: Path, step: int, weights: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
                 rng: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """A checkpoint's files, each flushed to disk, into ``folder``."""
    weights = {k: v.detach().contiguous() for k, v in weights.items()}
    atomic_write(folder / "model.safetensors",
                 lambda p: save_file(weights, str(p), metadata={"format": "pt", "step": str(step)}))
    opt_tensors, opt_meta = _optimizer_to_files(optimizer_state)
    atomic_write(folder / "optimizer.safetensors", lambda p: save_file(opt_tensors, str(p)))
    atomic_write(folder / "optimizer.json", json.dumps(opt_meta, indent=1))
    atomic_write(folder / "rng.safetensors", lambda p: save_file(rng, str(p)))
    files = {name: {"sha256": _sha256(folder / name), "bytes": (folder / name).stat().st_size}
             for name in (*_TENSOR_FILES, "optimizer.json")}
    state = {**state, "step": step, "files": files}
    atomic_write(folder / "state.json", json.dumps({**state, "state_sha256": content_sha256(state)}, indent=1))


def read_state(path: Path) -> dict[str, Any]:
    """``state.json`` of the checkpoint at ``path``, checked without reading the other files: well formed,
    unchanged since it was written (when it records its own hash: older ones did not), and its step the
    one in the directory's name and in ``model.safetensors``. Errors name state.json."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    state_json = path / "state.json"
    try:
        state = read_json_object(state_json, CheckpointError)
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {path} is incomplete or corrupted: {e}") from None
    recorded = state.pop("state_sha256", None)
    if recorded is not None and recorded != content_sha256(state):
        raise CheckpointError(f"{state_json} was changed after the checkpoint was written (its content no longer "
                              "matches the sha256 recorded in it); resume from another checkpoint")
    require(state, state_json, {"step": int, "files": dict}, CheckpointError)
    for name, entry in state["files"].items():
        if not isinstance(entry, dict):
            raise CheckpointError(f"{state_json}: files.{name} must be an object, got {entry!r:.60}")
        require(entry, state_json, {"sha256": str, "bytes": int}, CheckpointError)
    step = state["step"]
    named = _STEP_DIR.match(path.name)
    if named and int(named.group(1)) != step:
        raise CheckpointError(f"{state_json} says step {step}, but the checkpoint's directory is {path.name}")
    try:
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            weights_step = (f.metadata() or {}).get("step")
    except (SafetensorError, OSError):
        weights_step = None  # missing or damaged: verify_checkpoint names it
    if weights_step is not None and weights_step != str(step):
        raise CheckpointError(f"{state_json} says step {step}, but model.safetensors was written at step "
                              f"{weights_step}")
    return state


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """``state.json`` of a checkpoint whose files are all present and match their recorded hashes."""
    path = Path(path)
    state = read_state(path)
    files = state["files"]
    for name in (*_TENSOR_FILES, "optimizer.json"):
        f = path / name
        if name not in files or not f.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        if f.stat().st_size != files[name]["bytes"]:
            raise CheckpointError(f"checkpoint {path} is truncated or corrupted: {name} has "
                                  f"{f.stat().st_size} bytes, expected {files[name]['bytes']}")
        if _sha256(f) != files[name]["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupted: {name} does not match its recorded sha256")
    return state


def _read_weights(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.safetensors`` of a checkpoint, checked to fit ``model`` (same names and shapes)."""
    try:
        weights = load_file(str(Path(path) / "model.safetensors"))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {Path(path) / 'model.safetensors'}: {e}") from None
    expected = {k.removeprefix("module."): v for k, v in model.state_dict().items()}  # full shapes, sharded or not
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    if missing or unexpected or wrong:
        raise CheckpointError(f"checkpoint {path} does not fit this model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}")
    return weights


def load_weights(path: Path, model: nn.Module) -> None:
    """Load ``model.safetensors`` of a checkpoint into ``model`` (strict: same names and shapes)."""
    model.load_state_dict(_read_weights(path, model))


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Verify a checkpoint, restore weights, optimizer and RNG states; return its ``state.json``."""
    state = verify_checkpoint(path)
    weights = _read_weights(path, model)
    try:
        opt_tensors = load_file(str(Path(path) / "optimizer.safetensors"))
        opt_meta = json.loads((Path(path) / "optimizer.json").read_text())
        optimizer_state = _optimizer_from_files(model, optimizer, opt_tensors, opt_meta)
        distributed.load_full_state_dicts(model, optimizer, weights, optimizer_state)
        for group in optimizer.param_groups:  # torch.distributed's loader turns tuples into lists
            if isinstance(group.get("betas"), list):
                group["betas"] = tuple(group["betas"])
        _restore_rng(load_file(str(Path(path) / "rng.safetensors")))
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint {path} cannot be restored: {e}") from None
    return state
