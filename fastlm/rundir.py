"""Run and export directories: what is fastlm's in them, who is using them, what may be deleted.

A run directory is marked as one before anything else is written into it: its
first file is ``.fastlm-run.json`` (``{"kind": "run", "version": 1}``), and a
Hugging Face export's is ``.fastlm-export.json``. Every other file is then
written atomically (:func:`fastlm.files.atomic_write`), ``config.json`` last,
so a run that has a ``config.json`` was fully set up, and one with the marker
but no ``config.json`` was interrupted while being set up.

``--overwrite`` deletes only what fastlm created: the directory must carry the
marker and hold nothing but the names in :data:`RUN_ENTRIES` (and their
temporary files); anything else is listed and the directory left alone. Runs
made before the marker existed still resume (which marks them), but are not
overwritten.

A process using a directory (training in it, resuming it, exporting into it)
holds an exclusive ``flock`` on its ``.fastlm.lock``, which names the process;
a second one fails at once. The lock is released when the process ends,
however it ends (a killed process leaves the file, unlocked, behind).

What a run holds (:data:`RUN_ENTRIES`): ``config.json``, ``tokenizer.json``,
``data.json`` (the data's hash, split sizes and, for a classifier, its labels),
``metrics.jsonl``, ``loss.png``, ``confusion.json`` (a classifier with many
labels) and ``checkpoints/`` (see :mod:`fastlm.checkpoint`). Nothing in it is
pickled. This module writes the set-up files (:func:`write_run_files`), finds a
checkpoint to resume (:func:`find_checkpoint`) and checks that a resume may
continue the run exactly (:func:`verify_resume`), and loads a trained run's
model for inference (:func:`load_run`).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn

from .checkpoint import (CheckpointError, checkpoint_step, list_checkpoints, load_weights, read_state,
                         set_aside_newer, verify_checkpoint)
from .config import Config, ConfigError
from .data import cache_dir
from .files import atomic_write, remove_dir
from .jsonfile import content_sha256, read_json_object, require
from .model import build_model
from .tokenizer import load_tokenizer

MARKER = ".fastlm-run.json"
EXPORT_MARKER = ".fastlm-export.json"
LOCK = ".fastlm.lock"
MARKER_VERSION = 1
# Everything fastlm writes at the top of a run directory; config.json is deleted first and written last.
CONFUSION_FILE = "confusion.json"  # a classifier's latest confusion matrix, when too big for metrics.jsonl
RUN_ENTRIES = ("config.json", "tokenizer.json", "data.json", "metrics.jsonl", "loss.png", CONFUSION_FILE,
               "checkpoints")
EXPORT_ENTRIES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_LEGACY_ENTRIES = ("metrics.jsonl.tmp",)  # an older fastlm's temporary file
_CHECKPOINT_ENTRY = re.compile(r"^(step_\d+|abandoned|\..*)$")  # checkpoints, set-aside ones, leftovers


class TrainingError(RuntimeError):
    """Training cannot start or cannot go on; the message says why and what was kept."""


class DirectoryInUseError(TrainingError):
    """Another process holds the lock of a run (or export) directory."""


# ----------------------------------------------------------------------------- what a directory is


def marker_kind(path: Path) -> str | None:
    """``"run"`` or ``"export"`` for a directory fastlm marked as one, else None."""
    for name in (MARKER, EXPORT_MARKER):
        try:
            return json.loads((Path(path) / name).read_text())["kind"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def mark(path: Path, kind: str) -> None:
    atomic_write(Path(path) / (MARKER if kind == "run" else EXPORT_MARKER),
                 json.dumps({"kind": kind, "version": MARKER_VERSION}) + "\n")


def _config(path: Path) -> dict:
    try:
        found = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def is_run(path: Path) -> bool:
    """Whether ``path`` is (or was made as) a training run, marked or made by an older fastlm."""
    path = Path(path)
    config = _config(path)
    return (marker_kind(path) == "run" or {"model", "train"} <= set(config)
            or (path / "checkpoints").is_dir() or (path / "metrics.jsonl").is_file())


def _entries(path: Path) -> list[str]:
    """The names in ``path`` apart from its lock file (a lock alone leaves a directory empty)."""
    return sorted(p.name for p in Path(path).iterdir() if p.name != LOCK)


def _is_own(name: str, own: tuple[str, ...]) -> bool:
    """``name`` is one of ``own``, a marker, or one of their temporary files (``.NAME.tmp-*``, ``.NAME.del-*``)."""
    return (name in own or name in (MARKER, EXPORT_MARKER, LOCK) or name in _LEGACY_ENTRIES
            or any(name.startswith(f".{entry}.") for entry in (*own, MARKER, EXPORT_MARKER)))


def foreign_entries(path: Path, own: tuple[str, ...] = RUN_ENTRIES) -> list[str]:
    """Entries of ``path`` that fastlm did not create (for a run, inside ``checkpoints/`` too). fastlm makes no
    symbolic links: one with any name (``checkpoints`` linked to another disk, say) is the user's, and would
    be followed into what it points to, or broken, by a deletion."""
    path = Path(path)
    foreign = [_named(path, name) for name in _entries(path) if not _is_own(name, own) or (path / name).is_symlink()]
    if own is RUN_ENTRIES and (path / "checkpoints").is_dir():
        foreign += [_named(path, f"checkpoints/{p.name}") for p in sorted((path / "checkpoints").iterdir())
                    if not _CHECKPOINT_ENTRY.match(p.name) or p.is_symlink()]
    return foreign


def _named(path: Path, name: str) -> str:
    return f"{name} (a symbolic link)" if (path / name).is_symlink() else name


def _holds_something(path: Path, error: type[Exception], choose: str) -> bool:
    """Whether ``path`` exists and has entries (its lock file alone does not count); ``error`` if it is
    not a directory."""
    if not path.exists():
        return False
    if not path.is_dir():
        raise error(f"{path} exists and is not a directory; choose another {choose}")
    return bool(_entries(path))


def _listing(names: list[str], most: int = 8) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def overwrite_problem(run_dir: Path) -> str | None:
    """Why ``--overwrite`` may not empty ``run_dir`` (None when it may)."""
    entries = _entries(run_dir)
    if marker_kind(run_dir) != "run":
        return (f"it is not a fastlm run directory made by this version of fastlm (it has no {MARKER}), so "
                f"fastlm cannot tell its files from yours; --overwrite would have deleted {_listing(entries)}. "
                f"If nothing in it is needed, delete it yourself; otherwise choose another --out")
    foreign = foreign_entries(run_dir)
    if foreign:
        return (f"it holds files fastlm did not create: {_listing(foreign)}. Move them out of {run_dir} "
                f"(--overwrite deletes only fastlm's own {', '.join(RUN_ENTRIES)}) or choose another --out")
    return None


# ----------------------------------------------------------------------------- the lock


class DirectoryLock:
    """An exclusive ``flock`` on ``DIR/.fastlm.lock``, which holds the owner's PID, for as long as a process
    uses ``DIR``. Taken with :meth:`acquire` (where the process first touches the directory), released
    (and the file removed) on leaving the ``with`` block, or by the system when the process dies."""

    def __init__(self, path: str | Path, what: str = "run"):
        self.path, self.what = Path(path), what
        self._fd: int | None = None

    def acquire(self, create: bool) -> None:
        """Lock the directory, creating it first if ``create``; a directory that does not exist (and is not
        to be created) has nothing to protect. Fails at once if another process holds it."""
        if self._fd is not None:
            return
        if create:
            self.path.mkdir(parents=True, exist_ok=True)
        elif not self.path.is_dir():
            return
        lock_file = self.path / LOCK
        while True:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                try:
                    holder = int(lock_file.read_text())
                except (OSError, ValueError):  # it has not written its PID yet
                    holder = "unknown"
                raise DirectoryInUseError(f"{self.what} {self.path} is in use by PID {holder}; wait for it to "
                                          "finish or stop it (two processes writing one directory would "
                                          "overwrite each other's files)") from None
            try:
                if os.fstat(fd).st_ino == os.stat(lock_file).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # the file we locked was removed by its last owner on release: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            (self.path / LOCK).unlink(missing_ok=True)  # while still held, so no one locks a removed file
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DirectoryLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# ----------------------------------------------------------------------------- runs


def check_placement(run_dir: Path, data: str | None) -> None:
    """Refuse a run directory inside its own data (the run's files would become training data, and
    resuming would find the data changed) and data inside its run directory (--overwrite would delete it)."""
    if not data:
        return
    run, source = Path(run_dir).resolve(), Path(data).resolve()
    if run == source or source in run.parents:
        raise TrainingError(f"run directory {run_dir} is inside the data {data}: the run's own files would "
                            "become training data; choose an --out outside it")
    if run in source.parents:
        raise TrainingError(f"the data {data} is inside the run directory {run_dir}, where fastlm writes and "
                            "deletes its files; move the data or choose another --out")


def check_new_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse an existing run directory unless asked to overwrite it, and never one that fastlm did not
    make or that holds anything fastlm did not write."""
    run_dir = Path(run_dir)
    if not _holds_something(run_dir, TrainingError, "--out"):
        return
    problem = overwrite_problem(run_dir)
    if overwrite:
        if problem:
            raise TrainingError(f"refusing to overwrite {run_dir}: {problem}")
        return
    if marker_kind(run_dir) == "run" and not (run_dir / "config.json").is_file():
        raise TrainingError(f"run directory {run_dir} already exists but was interrupted while being set up "
                            "(it has no config.json), so there is nothing in it to resume; start it again "
                            "with --overwrite")
    if not is_run(run_dir):
        raise TrainingError(f"{run_dir} already exists and is not a fastlm run directory; choose another --out "
                            "(a run starts in a new or empty directory)")
    raise TrainingError(f"run directory {run_dir} already exists; continue it with --resume {run_dir}"
                        + (" or start over with --overwrite" if problem is None
                           else f" (--overwrite would refuse: {problem})"))


def default_run_dir(preset: str) -> Path:
    """Where a run goes without ``--out``: ``runs/PRESET-YYYYMMDD-HHMMSS``, the time it was started, with
    ``-2``, ``-3``, ... added when another run started in the same second took that name."""
    first = Path(f"runs/{preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    path, n = first, 2
    while path.exists() or path.is_symlink():
        path, n = first.with_name(f"{first.name}-{n}"), n + 1
    return path


def start_run(run_dir: Path, overwrite: bool) -> None:
    """Make ``run_dir`` a new run's directory: checked again (its lock is held now, so nothing changes it
    behind our back), emptied of fastlm's own files if ``overwrite``, and marked."""
    check_new_run_dir(run_dir, overwrite)
    if overwrite:
        for name in sorted(_entries(run_dir), key=lambda n: n != "config.json"):  # no longer a started run
            if name in (MARKER, EXPORT_MARKER):
                continue
            path = run_dir / name
            remove_dir(path) if path.is_dir() else path.unlink()
    mark(run_dir, "run")


def write_run_files(run_dir: Path, tokenizer: Tokenizer, data_info: dict, cfg: Config) -> None:
    """A new run's ``tokenizer.json``, ``data.json`` and, last, ``config.json`` (after :func:`start_run`)."""
    atomic_write(run_dir / "tokenizer.json", tokenizer.to_str())
    _write_json(run_dir / "data.json", data_info)
    write_config(run_dir, cfg)


def write_config(run_dir: Path, cfg: Config) -> None:
    _write_json(run_dir / "config.json", cfg.to_dict())


def _write_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2) + "\n")


def continue_run(run_dir: Path, step: int) -> list[tuple[Path, Path]]:
    """Before a resumed run writes anything: mark a run an older fastlm made, and set aside its checkpoints
    newer than ``step`` (see :func:`fastlm.checkpoint.set_aside_newer`); returns (was, now) for each."""
    if marker_kind(run_dir) != "run":
        mark(run_dir, "run")
    return set_aside_newer(run_dir, step)


def find_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(run directory, checkpoint) for ``--resume PATH``: a run directory (its latest checkpoint)
    or one of its checkpoint directories."""
    path = Path(path)
    folder = path.absolute().parent  # of a relative path too: --resume step_00000500 inside checkpoints/
    if folder.name == "checkpoints" and path.name.startswith("step_"):
        if not path.is_dir():
            raise CheckpointError(f"checkpoint {path} does not exist")
        return folder.parent, path
    if folder.name == "abandoned" and folder.parent.name == "checkpoints" and path.name.startswith("step_"):
        name = path.name.split("-")[0]  # step_00000500-YYYYMMDD-HHMMSS[-N]
        raise TrainingError(f"{path} is a checkpoint set aside when its run resumed from an older one; to resume "
                            f"from it, move it back to {folder.parent / name} (where no checkpoint of that name may "
                            "be) and pass that")
    if path.name == "checkpoints" and (path.parent / "config.json").is_file():
        raise TrainingError(f"{path} is the checkpoints folder of a run: pass the run ({path.parent}) to resume "
                            "from its latest checkpoint, or one checkpoint in it")
    again = f"fastlm train --out {path} --overwrite (with the options it was started with)"
    if not (path / "config.json").is_file():
        if marker_kind(path) == "run":
            raise TrainingError(f"run {path} never started: it was interrupted while being set up, before its "
                                f"config.json was written, so there is nothing to resume; start it again with {again}")
        raise TrainingError(f"{path} is not a fastlm run directory (no config.json)")
    config = _config(path)
    if not {"model", "train"} <= set(config):
        if "model_type" not in config and is_run(path):
            Config.from_file(path / "config.json")  # a run's, damaged: the error names the file and the field
        hf = ("; it is a Hugging Face checkpoint: start a new run from its weights with "
              f"fastlm train --init-from {path} --out NEW_RUN_DIR") if "model_type" in config else ""
        raise TrainingError(f"{path} is not a fastlm run directory (its config.json is not a run's){hf}")
    found = list_checkpoints(path)
    if not found:
        problem = overwrite_problem(path)
        raise TrainingError(f"run {path} has no checkpoint to resume from (it stopped before its first save); "
                            + (f"start it over with {again}" if problem is None
                               else f"it cannot be started over with --overwrite either: {problem}"))
    return path, found[-1]


# ----------------------------------------------------------------------------- resume integrity
#
# A checkpoint records in its state.json what decided the computation that led to it: the config
# (all but RESUMABLE_CHANGES) and the content hashes of tokenizer.json and data.json (see run_record).
# Resuming compares them with the files as they are now, and the token cache with data.json.

# Fields a resumed run may change: none of them alters what is computed at a step. The data's path is one
# (a run moved to another machine, or its data set moved): its content must still hash as data.json recorded.
RESUMABLE_CHANGES = {"eval_interval", "eval_batches", "log_interval", "save_interval", "keep_last",
                     "device", "backend", "compile", "parallel", "data"}


def check_resumable(saved: Config, requested: Config) -> None:
    saved_d, req_d = saved.to_dict(), requested.to_dict()
    changed = [f"{name}: {saved_d[s][name]!r} in the run, {req_d[s][name]!r} requested"
               for s in ("model", "train") for name in saved_d[s]
               if saved_d[s][name] != req_d[s][name] and name not in RESUMABLE_CHANGES
               and not (name == "num_classes" and req_d[s][name] == 0)]  # 0: "from the data", as in the run
    if changed:
        raise ConfigError("cannot resume with a different configuration:\n  " + "\n  ".join(changed)
                          + f"\nonly these may change on resume: {', '.join(sorted(RESUMABLE_CHANGES))}")


def computed_config(cfg: Config) -> dict:
    """The part of a config that decides what is computed: everything but RESUMABLE_CHANGES."""
    return {section: {name: value for name, value in fields.items() if name not in RESUMABLE_CHANGES}
            for section, fields in cfg.to_dict().items()}


def run_record(run_dir: Path, cfg: Config) -> dict:
    """What a checkpoint of the run in ``run_dir`` (trained with ``cfg``) records about its run."""
    return {"config": computed_config(cfg),
            "files": {name: content_sha256(read_json_object(run_dir / name, TrainingError))
                      for name in ("tokenizer.json", "data.json")}}


def verify_resume(run_dir: Path, checkpoint: Path, cfg: Config) -> dict:
    """Check that ``cfg`` may continue the run in ``run_dir`` from ``checkpoint``, before anything is written:
    config.json, tokenizer.json and data.json are as they were when the checkpoint was saved (when it recorded
    them: older checkpoints did not), and ``cfg`` changes only RESUMABLE_CHANGES. Returns data.json's content."""
    saved = Config.from_file(run_dir / "config.json")
    saved_data = read_json_object(run_dir / "data.json", TrainingError)
    require(saved_data, run_dir / "data.json", {"corpus_hash": str}, TrainingError)
    record = read_state(checkpoint).get("run")
    if record is not None:
        state_json = checkpoint / "state.json"
        require(record, state_json, {"config": dict, "files": dict}, CheckpointError)
        since = f"of run {run_dir} was changed since checkpoint {checkpoint.name} was written"
        changed = []
        defaults = computed_config(Config())
        for section, now in computed_config(saved).items():
            # A field the checkpoint did not record did not exist yet: config.json, written at the same time,
            # lacked it too and reads it as its default, which computes what fastlm computed before it.
            then = {name: value for name, value in {**defaults[section], **record["config"].get(section, {})}.items()
                    if name not in RESUMABLE_CHANGES}  # older checkpoints recorded a few of these
            changed += [f"{name} {then.get(name)!r} -> {now.get(name)!r}" for name in sorted(set(now) | set(then))
                        if then.get(name) != now.get(name)]
        if changed:
            raise ConfigError(f"config.json {since}: {', '.join(changed)}; restore it to resume from this checkpoint")
        changed_file = _changed_run_file(run_dir, record, TrainingError)
        if changed_file:
            raise TrainingError(f"{changed_file} {since} (its content no longer has the sha256 recorded then); "
                                "restore it to resume from this checkpoint")
    check_resumable(saved, cfg)
    return saved_data


def _changed_run_file(run_dir: Path, record: dict, error: type[Exception]) -> str | None:
    """The first of the run files a checkpoint's record vouches for (tokenizer.json, data.json) whose content
    in ``run_dir`` differs from what the checkpoint recorded; None when all are the same."""
    for name, digest in record["files"].items():
        if content_sha256(read_json_object(run_dir / name, error)) != digest:
            return name
    return None


def check_same_data(run_dir: Path, saved: dict, now: dict) -> None:
    """The data as prepared now (the token cache included) describes itself as data.json recorded it, but for
    its ``source``: where the data was when the run started (a resume may read it elsewhere; its content, by
    ``corpus_hash``, is the same)."""
    differ = [f"{key} {saved[key]!r} recorded, {now[key]!r} now" for key in sorted(saved.keys() & now.keys())
              if saved[key] != now[key] and key != "source"]
    if differ:
        raise TrainingError(f"the prepared data does not match {run_dir / 'data.json'}: {'; '.join(differ)}. "
                            f"The data or the token cache under {cache_dir()} changed since the run started, "
                            "so it cannot continue exactly")


# ----------------------------------------------------------------------------- loading a trained run


COMMAND_FOR = {"lm": "fastlm sample", "classify": "fastlm classify", "seq2seq": "fastlm translate"}


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None, device: torch.device | str = "cpu",
             task: str | None = None) -> tuple[nn.Module, Tokenizer, Config]:
    """The model of a run (its latest checkpoint unless one is named), its tokenizer and config;
    with ``task``, an error unless the run trained that task."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise CheckpointError(f"{run_dir} is not a fastlm run directory (no config.json)")
    cfg = Config.from_file(run_dir / "config.json")
    if task is not None and cfg.train.task != task:
        raise CheckpointError(f"run {run_dir} trained task {cfg.train.task!r}, not {task!r}; use "
                              f"{COMMAND_FOR[cfg.train.task]} with it")
    if checkpoint is None:
        found = list_checkpoints(run_dir)
        if not found:
            raise CheckpointError(f"run {run_dir} has no checkpoint yet")
        checkpoint = found[-1]
    checkpoint = Path(checkpoint)
    record = verify_checkpoint(checkpoint).get("run")
    if record is not None:  # checkpoints written before these records cannot be checked
        require(record, checkpoint / "state.json", {"config": dict, "files": dict}, CheckpointError)
        changed_file = _changed_run_file(run_dir, record, CheckpointError)
        if changed_file:  # its token ids (a classifier's labels) would be read with another run's meaning
            raise CheckpointError(f"checkpoint {checkpoint} was not trained with the {changed_file} of run {run_dir} "
                                  f"(it recorded another sha256): it is another run's checkpoint, or {changed_file} "
                                  "was replaced since; use it with the run that wrote it")
    model = build_model(cfg.model, cfg.train.task)
    load_weights(checkpoint, model)
    return model.to(device).eval(), load_tokenizer(run_dir / "tokenizer.json"), cfg


def checkpoint_at(run_dir: Path, checkpoint: str | None) -> Path | None:
    """``--checkpoint``: a checkpoint directory, a step number of the run's checkpoints, or the name of one
    (``step_00000500``)."""
    if checkpoint is None:
        return None
    path = Path(checkpoint).expanduser()
    if not checkpoint.isdigit() and (path.exists() or len(path.parts) > 1 or not path.name.startswith("step_")):
        return path
    found = list_checkpoints(run_dir)
    matches = [p for p in found if (checkpoint_step(p) == int(checkpoint) if checkpoint.isdigit()
                                    else p.name == checkpoint)]
    if not matches:
        wanted = f"for step {checkpoint}" if checkpoint.isdigit() else checkpoint
        raise CheckpointError(f"run {run_dir} has no checkpoint {wanted}; it has: "
                              f"{', '.join(p.name for p in found) or 'none'}")
    return matches[0]


def read_labels(run_dir: Path) -> list:
    """The label names a classifier run recorded in its data.json."""
    data_json = Path(run_dir) / "data.json"
    info = read_json_object(data_json, CheckpointError)
    require(info, data_json, {"labels": list}, CheckpointError)
    return info["labels"]


# ----------------------------------------------------------------------------- exports


def check_export_target(out_dir: Path, overwrite: bool, source_run: Path | None = None) -> None:
    """Refuse to export into a training run (or inside one, or around the run being exported), into a
    non-empty directory without ``overwrite``, and over anything but an earlier export."""
    out_dir = Path(out_dir)
    target = out_dir.resolve()
    if source_run is not None:
        source = Path(source_run).resolve()
        if target == source or target in source.parents or source in target.parents:
            raise CheckpointError(f"refusing to export into {out_dir}: it is, holds or is inside the run being "
                                  f"exported ({source_run}); choose a directory outside it")
    for folder in (target, *target.parents):
        if folder.is_dir() and (marker_kind(folder) == "run" or (folder == target and is_run(folder))):
            raise CheckpointError(f"refusing to export into {out_dir}: {folder} is a fastlm training run, "
                                  "which an export must not touch; choose a directory outside it")
    if not _holds_something(out_dir, CheckpointError, "directory"):
        return
    if not overwrite:
        raise CheckpointError(f"{out_dir} exists and is not empty; pass --overwrite to replace it")
    if marker_kind(out_dir) != "export":
        raise CheckpointError(f"refusing to overwrite {out_dir}: it is not a model checkpoint fastlm exported (it "
                              f"has no {EXPORT_MARKER}; a checkpoint from elsewhere, or exported by an older fastlm, "
                              "is not replaced): delete it yourself if nothing in it is needed, or choose another "
                              "directory")
    foreign = foreign_entries(out_dir, EXPORT_ENTRIES)
    if foreign:
        raise CheckpointError(f"refusing to overwrite {out_dir}: it holds files an export does not write: "
                              f"{_listing(foreign)}; move them out or choose another directory")
