"""Run and export directories: only fastlm's own files are ever deleted, one process at a time uses a
directory, a kill or a full disk at any write leaves a run that can be continued."""

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastlm import files
from fastlm.checkpoint import list_checkpoints, save_checkpoint, verify_checkpoint
from fastlm.cli import main
from fastlm.config import Config
from fastlm.metrics import MetricsError, MetricsLog
from fastlm.model import GPT
from fastlm.rundir import MARKER, DirectoryLock, find_checkpoint
from fastlm.train import TrainingError, make_optimizer, train
from helpers import MICRO, ROOT, losses, micro_config, write_corpus


def copy_run(trained_run: tuple[Path, Path], tmp_path: Path) -> Path:
    """A copy of the shared run, to change."""
    shutil.copytree(trained_run[0], tmp_path / "run")
    return tmp_path / "run"


def tiny_model():
    cfg = micro_config(Path("."))
    model = GPT(cfg.model)
    return model, make_optimizer(model, cfg, torch.device("cpu"))


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- overwrite


def test_overwrite_deletes_only_what_fastlm_created(tmp_path, corpus, capsys):
    # A folder that merely looks like a run (a config.json) is not one: nothing in it is deleted.
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "config.json").write_text("{}")
    (proj / "notes.txt").write_text("mine")
    assert main(["train", "--data", str(corpus), "--out", str(proj), *MICRO, "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "not a fastlm run directory" in err and "config.json, notes.txt" in err and "delete it yourself" in err
    assert tree(proj) == {"config.json": b"{}", "notes.txt": b"mine"}

    # A real run, with a file of the user's added: refused, naming that file, nothing deleted.
    cfg = micro_config(corpus, max_steps=1)
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    assert json.loads((run / MARKER).read_text()) == {"kind": "run", "version": 1}
    (run / "checkpoints" / "my_best").mkdir()
    before = tree(run)
    with pytest.raises(TrainingError, match="files fastlm did not create: checkpoints/my_best"):
        train(cfg, run, overwrite=True, progress=False)
    assert tree(run) == before

    # Without it the run is replaced, and only fastlm's files were there to delete.
    (run / "checkpoints" / "my_best").rmdir()
    (run / "metrics.jsonl").write_text('{"step": 99, "loss": 0.0}\n')
    train(cfg, run, overwrite=True, progress=False)
    assert list(losses(run)) == [1]
    assert sorted(p.name for p in run.iterdir()) == [MARKER, "checkpoints", "config.json", "data.json", "loss.png",
                                                     "metrics.jsonl", "tokenizer.json"]  # the lock is gone too


def test_overwrite_never_deletes_through_a_symbolic_link(trained_run, tmp_path, capsys):
    """A run whose checkpoints/ (or one checkpoint) is the user's link to another disk is not overwritten: the
    link is named as in the way, and it and what it points to are left as they were."""
    run = copy_run(trained_run, tmp_path)
    elsewhere = tmp_path / "big_disk"
    shutil.move(run / "checkpoints", elsewhere)
    (run / "checkpoints").symlink_to(elsewhere)
    before = tree(elsewhere)
    with pytest.raises(TrainingError, match=r"files fastlm did not create: checkpoints \(a symbolic link\)"):
        train(Config.from_file(run / "config.json"), run, overwrite=True, progress=False)
    assert (run / "checkpoints").is_symlink() and (run / "config.json").is_file() and tree(elsewhere) == before

    (run / "checkpoints").unlink()
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "step_00000004").symlink_to(elsewhere / "step_00000004")
    with pytest.raises(TrainingError, match=r"checkpoints/step_00000004 \(a symbolic link\)"):
        train(Config.from_file(run / "config.json"), run, overwrite=True, progress=False)
    assert tree(elsewhere) == before


def test_a_checkpoint_is_used_only_with_its_own_run(trained_run, tmp_path, capsys):
    """A checkpoint loaded with a run whose tokenizer it was not trained with (another run's checkpoint of the
    same shape, or a run whose tokenizer.json was replaced) would decode its tokens into the wrong text: refused."""
    run = copy_run(trained_run, tmp_path)
    tokenizer = json.loads((run / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[-2:]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (run / "tokenizer.json").write_text(json.dumps(tokenizer))
    for argv in (["sample", "--run", str(run)],
                 ["sample", "--run", str(run), "--checkpoint", str(trained_run[0] / "checkpoints" / "step_00000002")],
                 ["export", "--run", str(run), "--to", str(tmp_path / "export")]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert f"was not trained with the tokenizer.json of run {run}" in err, err
    assert not (tmp_path / "export").exists()


def test_default_run_directories_never_share_a_name(tmp_path, monkeypatch):
    """Two runs started in the same second without --out get directories of their own."""
    from fastlm import rundir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rundir.time, "strftime", lambda fmt: "20260102-030405")
    first = rundir.default_run_dir("tiny")
    assert first == Path("runs/tiny-20260102-030405")
    first.mkdir(parents=True)
    assert rundir.default_run_dir("tiny") == Path("runs/tiny-20260102-030405-2")


def test_an_old_run_without_marker_resumes_but_is_not_overwritten(trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path)
    (run / MARKER).unlink()
    assert main(["train", "--data", str(trained_run[1]), "--out", str(run), *MICRO, "--overwrite"]) == 1
    assert "has no .fastlm-run.json" in capsys.readouterr().err and (run / "config.json").is_file()
    assert main(["train", "--resume", str(run / "checkpoints" / "step_00000002")]) == 0
    assert (run / MARKER).is_file()  # marked by the resume: --overwrite may replace it now
    assert losses(run) == losses(trained_run[0])


def test_resume_of_an_export_does_not_point_at_overwrite(tmp_path, capsys):
    export = tmp_path / "hf"
    export.mkdir()
    (export / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert main(["train", "--resume", str(export)]) == 1
    err = capsys.readouterr().err
    assert "is not a fastlm run directory" in err and f"--init-from {export}" in err and "--overwrite" not in err


# ----------------------------------------------------------------------------- export


def test_export_never_touches_a_run(trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path)
    other = tmp_path / "other"
    shutil.copytree(run, other)
    before = tree(tmp_path)
    for target, message in [(run, "the run being exported"), (tmp_path, "the run being exported"),
                            (run / "hf", "the run being exported"), (other, "is a fastlm training run"),
                            (other / "hf", "is a fastlm training run")]:
        assert main(["export", "--run", str(run), "--to", str(target), "--overwrite"]) == 1, target
        assert message in capsys.readouterr().err, target
    assert tree(tmp_path) == before

    # An export may replace an earlier export, but not a transformers checkpoint fastlm did not write.
    assert main(["export", "--run", str(run), "--to", str(tmp_path / "hf")]) == 0
    assert main(["export", "--run", str(run), "--to", str(tmp_path / "hf"), "--overwrite"]) == 0
    foreign = tmp_path / "downloaded"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert main(["export", "--run", str(run), "--to", str(foreign), "--overwrite"]) == 1
    assert "not a model checkpoint fastlm exported" in capsys.readouterr().err
    (tmp_path / "hf" / "README.md").write_text("my model card")
    assert main(["export", "--run", str(run), "--to", str(tmp_path / "hf"), "--overwrite"]) == 1
    assert "files an export does not write: README.md" in capsys.readouterr().err


# ----------------------------------------------------------------------------- one process at a time


HOLD_LOCK = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
             "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'%d' % os.getpid()); print('held', flush=True); "
             "time.sleep(60)")


def test_a_run_in_use_by_another_process_is_refused(trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path)
    export = tmp_path / "hf"
    export.mkdir()
    holders = [subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(d / ".fastlm.lock")], stdout=subprocess.PIPE,
                                text=True) for d in (run, export)]
    try:
        assert [h.stdout.readline() for h in holders] == ["held\n", "held\n"]
        before = tree(run)
        assert main(["train", "--resume", str(run)]) == 1
        assert f"run {run} is in use by PID {holders[0].pid}" in capsys.readouterr().err
        assert main(["train", "--data", str(trained_run[1]), "--out", str(run), *MICRO, "--overwrite"]) == 1
        assert f"is in use by PID {holders[0].pid}" in capsys.readouterr().err
        assert tree(run) == before  # the lock is taken before anything is deleted
        assert main(["export", "--run", str(run), "--to", str(export)]) == 1
        assert f"export directory {export} is in use by PID {holders[1].pid}" in capsys.readouterr().err
    finally:
        for h in holders:
            h.kill()
            h.wait()


def test_the_lock_is_held_for_the_run_and_released_however_it_ends(trained_run, tmp_path, monkeypatch):
    run = copy_run(trained_run, tmp_path)
    seen = []

    def interrupted(*args, **kwargs):  # a Ctrl-C at the first save, after checking a second user is refused
        with pytest.raises(TrainingError, match=f"is in use by PID {os.getpid()}"):
            DirectoryLock(run).acquire(create=False)  # a fresh open file description conflicts in-process too
        seen.append(True)
        raise KeyboardInterrupt

    monkeypatch.setattr("fastlm.train.save_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(Config.from_dict(json.loads((run / "config.json").read_text())), run,
              resume_from=run / "checkpoints" / "step_00000002", progress=False)
    assert seen and not (run / ".fastlm.lock").exists()
    with DirectoryLock(run) as lock:
        lock.acquire(create=False)


# ----------------------------------------------------------------------------- checkpoints


def test_retention_keeps_the_checkpoint_just_written(tmp_path):
    model, optimizer = tiny_model()
    for step in (2, 4, 8):
        save_checkpoint(tmp_path, step, model, optimizer, {}, keep_last=5)
    save_checkpoint(tmp_path, 6, model, optimizer, {}, keep_last=1)  # as a run resumed from step 4 would
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000006", "step_00000008"]


def test_resume_from_an_older_checkpoint_sets_newer_ones_aside(trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path)
    newer = tree(run / "checkpoints" / "step_00000004")
    assert main(["train", "--resume", str(run / "checkpoints" / "step_00000002"), "--keep_last", "1"]) == 0
    assert f"set aside step_00000004 (newer than the checkpoint resumed from) as {run}/checkpoints/abandoned/" \
        in capsys.readouterr().out
    [aside] = (run / "checkpoints" / "abandoned").iterdir()
    assert aside.name.startswith("step_00000004-") and tree(aside) == newer  # moved, not deleted
    assert [p.name for p in list_checkpoints(run)] == ["step_00000004"]  # the redone step, written by this run
    assert losses(run) == losses(trained_run[0])


def test_resume_takes_a_checkpoint_relative_to_where_it_runs(trained_run, tmp_path, monkeypatch, capsys):
    """--resume step_00000002 inside checkpoints/ is that checkpoint; the checkpoints folder itself and a checkpoint
    set aside are not resumed from, and the error says what to pass instead."""
    run = copy_run(trained_run, tmp_path)
    monkeypatch.chdir(run / "checkpoints")
    assert main(["train", "--resume", "step_00000002", "--quiet"]) == 0
    assert losses(run) == losses(trained_run[0])
    (aside,) = (run / "checkpoints" / "abandoned").iterdir()
    assert main(["train", "--resume", str(aside)]) == 1
    assert f"set aside when its run resumed from an older one; to resume from it, move it back to " \
           f"{run / 'checkpoints' / 'step_00000004'}" in capsys.readouterr().err
    assert main(["train", "--resume", str(run / "checkpoints")]) == 1
    assert f"is the checkpoints folder of a run: pass the run ({run})" in capsys.readouterr().err


def test_partial_checkpoints_are_not_listed_and_are_cleaned_up(tmp_path, monkeypatch):
    model, optimizer = tiny_model()
    for step in (1, 2):
        save_checkpoint(tmp_path, step, model, optimizer, {}, keep_last=5)
    folder = tmp_path / "checkpoints"
    # What an older fastlm left when killed while deleting step 1: a step folder without its state.json.
    (folder / "step_00000001" / "state.json").unlink()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002"]
    assert find_checkpoint(tmp_path / "checkpoints" / "step_00000002")[1].name == "step_00000002"

    # A deletion killed midway now leaves only a hidden folder, which the next save removes.
    killed = SimpleNamespace(rmtree=lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    monkeypatch.setattr(files, "shutil", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 3, model, optimizer, {}, keep_last=1)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003"]
    save_checkpoint(tmp_path, 4, model, optimizer, {}, keep_last=1)
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000004"]


def test_saves_clean_up_only_their_own_leftovers(tmp_path):
    """A save removes what a killed save or deletion of fastlm's left (``.tmp-step_*-PID``, ``.old-step_*-PID``,
    ``.step_*.del-PID``), never a user's own hidden files in ``checkpoints/`` (a ``.gitignore``, notes, a
    ``.git`` folder)."""
    model, optimizer = tiny_model()
    save_checkpoint(tmp_path, 1, model, optimizer, {}, keep_last=5)
    folder = tmp_path / "checkpoints"
    (folder / ".gitignore").write_text("*.safetensors\n")
    (folder / ".notes").mkdir()
    (folder / ".notes" / "run.md").write_text("lr sweep, second try")
    (folder / ".tmp-step_00000007-unrelated").mkdir()  # not fastlm's pattern: ends in no process id
    for leftover in (".tmp-step_00000002-4242", ".old-step_00000001-4242", ".step_00000001.del-4242"):
        (folder / leftover).mkdir()
        (folder / leftover / "model.safetensors").write_bytes(b"partial")
    save_checkpoint(tmp_path, 2, model, optimizer, {}, keep_last=5)
    assert sorted(p.name for p in folder.iterdir()) == [
        ".gitignore", ".notes", ".tmp-step_00000007-unrelated", "step_00000001", "step_00000002"]
    assert (folder / ".notes" / "run.md").read_text() == "lr sweep, second try"


def test_retention_never_deletes_through_a_linked_checkpoint(tmp_path):
    """A checkpoint folder that is a link (to another disk, say) is the user's: retention leaves the link and
    what it points at, and the save goes on (it used to rename the link, then fail on rmtree after saving)."""
    model, optimizer = tiny_model()
    save_checkpoint(tmp_path, 1, model, optimizer, {}, keep_last=1)
    folder = tmp_path / "checkpoints"
    elsewhere = tmp_path / "other_disk" / "step_00000001"
    elsewhere.parent.mkdir()
    shutil.move(folder / "step_00000001", elsewhere)
    (folder / "step_00000001").symlink_to(elsewhere, target_is_directory=True)
    save_checkpoint(tmp_path, 2, model, optimizer, {}, keep_last=1)
    assert (folder / "step_00000001").is_symlink() and (elsewhere / "state.json").is_file()
    assert (folder / "step_00000002" / "state.json").is_file()


# ----------------------------------------------------------------------------- full disks, torn files


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_names_the_file_and_leaves_no_half_written_one(tmp_path, monkeypatch):
    target = tmp_path / "config.json"
    target.write_text("old")
    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(OSError, match=f"cannot write {target}: the disk is full"):
        files.atomic_write(target, "new")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"] and target.read_text() == "old"

    log = MetricsLog(tmp_path / "metrics.jsonl")
    monkeypatch.setattr("builtins.open", disk_full)
    with pytest.raises(OSError, match="cannot write .*metrics.jsonl: the disk is full"):
        log.log({"step": 1, "loss": 1.0})
    monkeypatch.undo()

    model, optimizer = tiny_model()
    monkeypatch.setattr("fastlm.checkpoint.save_file", disk_full)
    with pytest.raises(OSError, match=r"cannot write .*\.tmp-step_00000001-\d+/model.safetensors: the disk is full"):
        save_checkpoint(tmp_path, 1, model, optimizer, {}, keep_last=1)
    assert list((tmp_path / "checkpoints").iterdir()) == []  # the temporary folder is gone


def test_metrics_log_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    with pytest.warns(UserWarning, match=f"{path}, line 3: dropped a torn last line"):
        log = MetricsLog(path, resume_step=2)
    assert [r["step"] for r in log.records] == [1, 2]
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'

    for damage in ("{}", "[1, 2]", '{"step": "2"}', "not json"):  # in the middle: not a crash's doing
        path.write_text(f'{{"step": 1, "loss": 2.0}}\n{damage}\n{{"step": 2, "loss": 1.5}}\n')
        with pytest.raises(MetricsError, match=f"{path}, line 2 is not a metrics record"):
            MetricsLog(path, resume_step=2)


def test_resume_after_a_torn_metrics_line(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.')
    with pytest.warns(UserWarning, match="torn last line"):
        assert main(["train", "--resume", str(run / "checkpoints" / "step_00000002")]) == 0
    assert losses(run) == losses(trained_run[0])


# ----------------------------------------------------------------------------- set-up, placement


def test_a_run_killed_while_being_set_up_can_be_started_again(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / MARKER).write_text('{"kind": "run", "version": 1}\n')
    (run / "tokenizer.json").write_text("{}")  # killed before config.json
    assert main(["train", "--resume", str(run)]) == 1
    err = capsys.readouterr().err
    assert f"run {run} never started" in err and f"--out {run} --overwrite" in err
    with pytest.raises(TrainingError, match="interrupted while being set up .* start it again with --overwrite"):
        train(micro_config(corpus, max_steps=1), run, progress=False)
    train(micro_config(corpus, max_steps=1), run, overwrite=True, progress=False)
    assert list(losses(run)) == [1]


def test_run_and_data_may_not_hold_each_other(tmp_path, corpus):
    with pytest.raises(TrainingError, match="is inside the data .* would become training data"):
        train(micro_config(corpus, max_steps=1), corpus / "run", progress=False)
    assert not (corpus / "run").exists()
    run = tmp_path / "run"
    inner = write_corpus(run / "corpus")
    with pytest.raises(TrainingError, match="the data .* is inside the run directory"):
        train(micro_config(inner, max_steps=1), run, overwrite=True, progress=False)


# ----------------------------------------------------------------------------- a kill at every write


# Run in one subprocess: torch is imported once, and each attempt is a forked child (killed at its N-th
# write point, or recovering the run as a user would), so every write point is tried in under a minute.
DRIVER = textwrap.dedent("""
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    import matplotlib.pyplot  # noqa: F401 (imported once, before the children fork)
    from fastlm import files
    from fastlm.checkpoint import list_checkpoints, verify_checkpoint
    from fastlm.cli import main

    assert files._FAULT_AT == 10**9  # read from FASTLM_FAULT_AT at import
    tmp, micro = sys.argv[1], json.loads(sys.argv[2])
    new_run = ["train", "--data", f"{tmp}/corpus", *micro]

    def child(fault_at, argv):
        pid = os.fork()
        if pid == 0:
            sys.stdout = sys.stderr = open(os.devnull, "w")
            files._FAULT_AT, files._fault_count = fault_at, 0
            code = main(argv)
            sys.stdout.flush()
            os._exit(code)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    assert child(None, [*new_run, "--out", f"{tmp}/straight"]) == 0
    n = 0
    while True:
        n += 1
        run = f"{tmp}/run{n}"
        code = child(n, [*new_run, "--out", run])
        if code == 0:  # no write point left to kill at
            print(json.dumps({"points": n - 1, "last": run}))
            break
        assert code == 137, (n, code)
        found = list_checkpoints(run)
        if found:
            verify_checkpoint(found[-1])
            assert child(None, ["train", "--resume", run]) == 0, n
        else:
            assert child(None, [*new_run, "--out", run, "--overwrite"]) == 0, n
""")


@pytest.mark.slow
def test_a_kill_at_any_write_leaves_a_run_that_continues_exactly(tmp_path):
    write_corpus(tmp_path / "corpus")
    micro = [*MICRO, "--max_steps", "4", "--save_interval", "2", "--keep_last", "1", "--log_interval", "2",
             "--eval_interval", "4"]
    env = {**os.environ, "FASTLM_FAULT_AT": str(10**9), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "FASTLM_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path), json.dumps(micro)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["points"] >= 20  # set-up files, metrics lines, checkpoint files, renames, deletions
    straight = tmp_path / "straight"
    for n in range(1, result["points"] + 2):
        run = tmp_path / f"run{n}"
        assert losses(run) == losses(straight), n  # every step's loss, bit for bit
        assert losses(run, "val_loss") == losses(straight, "val_loss"), n
        assert list_checkpoints(run)[-1].name == "step_00000004", n
        verify_checkpoint(list_checkpoints(run)[-1])
