"""Resume trusts nothing it did not check: every file that decides what a resumed run computes
(config.json, tokenizer.json, data.json, the token cache, the checkpoint's own state.json) is
compared with what the checkpoint recorded, and a damaged or changed one is named in the error."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fastlm import data as data_lib
from fastlm.cli import main
from fastlm.jsonfile import content_sha256
from helpers import losses

STEP_2 = Path("checkpoints") / "step_00000002"


@pytest.fixture
def run(trained_run, tmp_path):
    """A copy of the shared 4-step run and of its token cache (this test's FASTLM_CACHE), to damage."""
    shutil.copytree(trained_run[0], tmp_path / "run")
    shutil.copytree(trained_run[0].parent / "cache", tmp_path / "cache")
    return tmp_path / "run"


def resume(run: Path, capsys) -> tuple[int, str]:
    """Resume ``run`` from its step-2 checkpoint through the command line: (exit status, stderr)."""
    code = main(["train", "--resume", str(run / STEP_2), "--quiet"])
    return code, capsys.readouterr().err


def edit_json(path: Path, change) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj, indent=1))


def token_cache(run: Path) -> Path:
    (folder,) = (run.parent / "cache" / "tokens").iterdir()
    return folder


def test_untampered_copy_resumes_exactly(run, trained_run, capsys):
    assert resume(run, capsys)[0] == 0
    assert losses(run) == losses(trained_run[0])


def test_state_json_holds_no_data_position_and_old_ones_still_resume(run, trained_run, capsys):
    """A step's batches depend on (seed, step) alone, so the data_position older checkpoints recorded was never
    read: it is no longer written, and a checkpoint that has it still resumes exactly."""
    assert "data_position" not in json.loads((run / STEP_2 / "state.json").read_text())

    def add_data_position(state):  # as an older fastlm wrote it, under state.json's own hash
        state.pop("state_sha256")
        state["data_position"] = {"seed": 0, "step": 2, "micro_step": 0}
        state["state_sha256"] = content_sha256(state)
    edit_json(run / STEP_2 / "state.json", add_data_position)
    assert resume(run, capsys)[0] == 0
    assert losses(run) == losses(trained_run[0])


def test_a_run_from_before_newer_config_fields_resumes_exactly(run, trained_run, capsys):
    """config.json and the checkpoint's record of a run made before a field existed lack it: it reads as its
    default, which computes what fastlm computed before the field (window, global_every, document_mask)."""
    new_fields = {"model": ("window", "global_every"), "train": ("document_mask",)}

    def drop_new_fields(config):
        for section, names in new_fields.items():
            for name in names:
                del config[section][name]

    def drop_from_record(state):
        state.pop("state_sha256")
        drop_new_fields(state["run"]["config"])
        state["state_sha256"] = content_sha256(state)
    edit_json(run / "config.json", drop_new_fields)
    edit_json(run / STEP_2 / "state.json", drop_from_record)
    assert resume(run, capsys)[0] == 0
    assert losses(run) == losses(trained_run[0])


def test_changed_step_in_state_json(run, capsys):
    edit_json(run / STEP_2 / "state.json", lambda s: s.update(step=3))  # one bit: "2" -> "3"
    code, err = resume(run, capsys)
    assert code == 1 and f"{run / STEP_2 / 'state.json'}" in err and "changed" in err


def test_step_as_a_string_in_an_old_state_json(run, capsys):
    """A checkpoint written before state.json protected itself: its step is still checked."""
    edit_json(run / STEP_2 / "state.json", lambda s: (s.pop("state_sha256", None), s.pop("run", None),
                                                     s.update(step="2")))
    code, err = resume(run, capsys)
    assert code == 1 and "state.json" in err and "step must be an integer, got '2'" in err


def test_damaged_hash_in_state_json_blames_state_json(run, capsys):
    def flip(state):
        digest = state["files"]["model.safetensors"]["sha256"]
        state["files"]["model.safetensors"]["sha256"] = ("1" if digest[0] == "0" else "0") + digest[1:]

    edit_json(run / STEP_2 / "state.json", flip)
    code, err = resume(run, capsys)
    assert code == 1 and "state.json" in err and "model.safetensors does not match" not in err


def test_edited_config_json(run, capsys):
    edit_json(run / "config.json", lambda c: c["train"].update(lr=0.01))
    code, err = resume(run, capsys)
    assert code == 2
    assert (f"config.json of run {run} was changed since checkpoint step_00000002 was written: "
            "lr 0.003 -> 0.01") in err


def test_resumable_fields_of_config_json_may_change(run, trained_run, capsys):
    edit_json(run / "config.json", lambda c: c["train"].update(log_interval=2))
    assert resume(run, capsys)[0] == 0
    assert losses(run)[4] == losses(trained_run[0])[4]


def test_swapped_id_in_tokenizer_json(run, capsys):
    def swap(tokenizer):
        vocab = tokenizer["model"]["vocab"]
        a, b = sorted(vocab, key=vocab.get)[-2:]  # two tokens BPE learnt (the corpus gives it fewer than 320)
        vocab[a], vocab[b] = vocab[b], vocab[a]

    edit_json(run / "tokenizer.json", swap)
    code, err = resume(run, capsys)
    assert code == 1
    assert f"tokenizer.json of run {run} was changed since checkpoint step_00000002 was written" in err


def test_truncated_token_cache_is_rebuilt_and_resume_stays_exact(run, trained_run, capsys):
    train_bin = token_cache(run) / "train.bin"
    train_bin.write_bytes(train_bin.read_bytes()[:-200])
    with pytest.warns(UserWarning, match="train.bin.*rebuilding"):
        assert resume(run, capsys)[0] == 0
    assert losses(run) == losses(trained_run[0])


def test_consistently_truncated_token_cache_is_refused(run, capsys):
    """A cache that agrees with its own meta.json (one written before it recorded hashes) but not with
    what the run trained on."""
    folder = token_cache(run)
    train_bin = folder / "train.bin"
    train_bin.write_bytes(train_bin.read_bytes()[:-200])
    edit_json(folder / "meta.json", lambda m: (m.pop("sha256", None),
                                               m["tokens"].update(train=m["tokens"]["train"] - 100)))
    code, err = resume(run, capsys)
    assert code == 1 and "data.json" in err and "train_tokens" in err


@pytest.mark.parametrize("damage, message", [
    ("list", "must hold a JSON object, got a list"),
    ("model_string", "model must be a JSON object of fields, got 'gpt2'"),
    ("truncated", "is not valid JSON"),
])
def test_damaged_config_json(run, capsys, damage, message):
    path = run / "config.json"
    text = path.read_text()
    if damage == "list":
        path.write_text("[1, 2]")
    elif damage == "model_string":
        edit_json(path, lambda c: c.update(model="gpt2"))
    else:
        path.write_text(text[: len(text) // 2])
    for argv in (["train", "--resume", str(run)], ["sample", "--run", str(run), "--max_new_tokens", "1"]):
        assert main(argv) in (1, 2)
        err = capsys.readouterr().err
        assert str(path) in err and message in err, err


@pytest.mark.parametrize("damage, message", [
    ("truncated", "is not valid JSON"),
    ("no_hash", "lacks corpus_hash"),
])
def test_damaged_data_json(run, capsys, damage, message):
    path = run / "data.json"
    if damage == "truncated":
        path.write_text(path.read_text()[:30])
    else:
        edit_json(path, lambda d: d.pop("corpus_hash"))
    code, err = resume(run, capsys)
    assert code == 1 and str(path) in err and message in err, err


# ----------------------------------------------------------------------------- the token cache


def cached_tokens(corpus: Path):
    docs = data_lib.load_documents(str(corpus))
    chash = data_lib.corpus_hash(docs)
    tokenizer = data_lib.cached_tokenizer(docs, chash, 0.1, 320)
    return data_lib.tokenize_corpus(docs, chash, tokenizer, 0.1), (docs, chash, tokenizer)


@pytest.mark.parametrize("damage", ["truncated_meta", "id_past_vocab", "id_past_vocab_old_meta"])
def test_damaged_token_cache_is_rebuilt(corpus, damage):
    tokens, args = cached_tokens(corpus)
    expected = np.array(tokens.train)
    folder = Path(tokens.train.filename).parent
    del tokens
    if damage == "truncated_meta":
        (folder / "meta.json").write_text((folder / "meta.json").read_text()[:10])
        culprit = "meta.json"
    else:
        ids = np.fromfile(folder / "train.bin", dtype=np.uint16)
        ids[5] = 60000  # past the 320-token vocabulary
        ids.tofile(folder / "train.bin")
        culprit = "train.bin"
        if damage == "id_past_vocab_old_meta":  # no recorded hash: the range check alone finds it
            edit_json(folder / "meta.json", lambda m: m.pop("sha256", None))
    with pytest.warns(UserWarning, match=f"{culprit}.*rebuilding"):
        rebuilt = data_lib.tokenize_corpus(*args[:2], args[2], 0.1)
    assert np.array_equal(np.array(rebuilt.train), expected)
    assert data_lib.tokenize_corpus(*args[:2], args[2], 0.1).train.filename == rebuilt.train.filename


def test_a_moved_data_set_resumes_exactly(run, trained_run, capsys):
    """A run moved to another machine, or whose data moved, resumes with --data at the new place: what decides
    the computation is the data's content, which must hash as data.json recorded (a changed one is refused)."""
    moved = shutil.copytree(trained_run[1], run.parent / "moved")

    def record_data(state):  # as a checkpoint written while data could not change recorded it
        state.pop("state_sha256")
        state["run"]["config"]["train"]["data"] = str(trained_run[1])
        state["state_sha256"] = content_sha256(state)
    edit_json(run / STEP_2 / "state.json", record_data)
    assert main(["train", "--resume", str(run / STEP_2), "--data", str(moved), "--quiet"]) == 0
    assert losses(run) == losses(trained_run[0])
    assert json.loads((run / "config.json").read_text())["train"]["data"] == str(moved)

    (moved / "mod_00.py").write_text("# another text\n")
    code, err = resume(run, capsys)
    assert code == 1 and f"the data at {moved} changed since {run} started" in err
