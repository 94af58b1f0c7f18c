"""The training loop end to end on a micro model and a small corpus: learning, exact resume,
checkpoints, faults. Everything runs on the PyTorch references (fast on CPU); the fused
path is compared against them in test_model.py."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastlm import data as data_lib
from fastlm.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint
from fastlm.model import GPT
from fastlm import train as train_module
from fastlm.train import TrainingError, make_optimizer, train
from helpers import losses, micro_config, stop_after_checkpoint


def test_loss_decreases_and_run_dir_is_complete(tmp_path, corpus):
    cfg = micro_config(corpus, max_steps=30, eval_interval=10, save_interval=10, keep_last=2)
    result = train(cfg, tmp_path / "run", progress=False)
    train_losses = losses(tmp_path / "run")
    assert math.isclose(train_losses[1], math.log(320), rel_tol=0.05)  # starts near uniform
    assert result.val_loss < 0.6 * math.log(320)
    assert train_losses[30] < train_losses[1] - 2.0

    run = tmp_path / "run"
    for name in ("config.json", "tokenizer.json", "data.json", "metrics.jsonl", "loss.png"):
        assert (run / name).is_file(), name
    assert [p.name for p in list_checkpoints(run)] == ["step_00000020", "step_00000030"]  # keep_last=2
    # Nothing a loader would unpickle: only JSON, safetensors, the plot.
    suffixes = {p.suffix for p in run.rglob("*") if p.is_file()}
    assert suffixes <= {".json", ".jsonl", ".safetensors", ".png"}, suffixes
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert {"step", "loss", "lr", "tokens_per_sec", "mfu", "peak_mem_bytes"} <= set(record)
    assert record["mfu"] is None  # no GPU peak on CPU
    # The loss per byte of text: the loss per token over the bytes a token stands for (~2.5 here), in bits.
    bpb = losses(run, "val_bpb")
    assert bpb.keys() == losses(run, "val_loss").keys()
    assert 0.2 < bpb[30] * math.log(2) / losses(run, "val_loss")[30] < 0.6


def test_resume_is_bit_exact(tmp_path, corpus):
    cfg = micro_config(corpus)
    straight = tmp_path / "straight"
    train(cfg, straight, progress=False)

    resumed = tmp_path / "resumed"
    stop_after_checkpoint(straight, resumed, "step_00000008", 7)
    train(cfg, resumed, resume_from=resumed / "checkpoints" / "step_00000004", progress=False)

    assert losses(resumed) == losses(straight)  # every step's loss, bit for bit
    assert losses(resumed, "val_loss") == losses(straight, "val_loss")
    a = load_file(str(straight / "checkpoints" / "step_00000008" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "step_00000008" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_run_with_an_older_tokenizer_resumes_exactly_with_it(tmp_path, corpus, monkeypatch):
    """A run keeps the tokenizer.json it started with: one made before digits were split (BPE merged them)
    resumes, bit for bit, with that tokenizer, not with a new one."""
    import functools

    from fastlm.tokenizer import load_tokenizer, train_tokenizer

    cfg = micro_config(corpus)
    straight = tmp_path / "straight"
    with monkeypatch.context() as patched:
        patched.setattr(data_lib, "train_tokenizer", functools.partial(train_tokenizer, split_digits=False))
        train(cfg, straight, progress=False)
    old = load_tokenizer(straight / "tokenizer.json")
    assert "Digits" not in old.to_str() and any(sum(c.isdigit() for c in t) > 1 for t in old.get_vocab())

    resumed = tmp_path / "resumed"
    stop_after_checkpoint(straight, resumed, "step_00000008", 7)
    train(cfg, resumed, resume_from=resumed / "checkpoints" / "step_00000004", progress=False)
    assert losses(resumed) == losses(straight) and losses(resumed, "val_loss") == losses(straight, "val_loss")
    assert load_tokenizer(resumed / "tokenizer.json").to_str() == old.to_str()


def test_checkpoint_round_trip(tmp_path):
    cfg = micro_config(tmp_path)
    model = GPT(cfg.model)
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    model(torch.randint(0, 320, (2, 16)), torch.randint(0, 320, (2, 16))).backward()
    optimizer.step()
    rng_before = torch.get_rng_state()
    path = save_checkpoint(tmp_path, 1, model, optimizer, {"caller": {"step": 1}}, keep_last=1)

    torch.manual_seed(123)
    fresh = GPT(cfg.model)
    fresh_opt = make_optimizer(fresh, cfg, torch.device("cpu"))
    state = load_checkpoint(path, fresh, fresh_opt)
    assert state["step"] == 1 and state["caller"] == {"step": 1}
    for (name, p), q in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(p, q), name
    for group_a, group_b in zip(optimizer.param_groups, fresh_opt.param_groups):
        for p, q in zip(group_a["params"], group_b["params"]):
            for key, value in optimizer.state[p].items():
                assert torch.equal(value, fresh_opt.state[q][key]), key
        assert {k: v for k, v in group_a.items() if k != "params"} == \
            {k: v for k, v in group_b.items() if k != "params"}
    assert torch.equal(torch.get_rng_state(), rng_before)


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing"])
def test_damaged_checkpoint_is_refused(tmp_path, damage):
    cfg = micro_config(tmp_path)
    model = GPT(cfg.model)
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    path = save_checkpoint(tmp_path, 1, model, optimizer, {}, keep_last=1)
    weights = path / "model.safetensors"
    raw = weights.read_bytes()
    if damage == "flip":
        weights.write_bytes(raw[:-10] + bytes([raw[-10] ^ 0xFF]) + raw[-9:])
    elif damage == "truncate":
        weights.write_bytes(raw[: len(raw) // 2])
    else:
        weights.unlink()
    with pytest.raises(CheckpointError, match={"flip": "corrupted", "truncate": "truncated",
                                               "missing": "missing"}[damage]):
        load_checkpoint(path, GPT(cfg.model), make_optimizer(GPT(cfg.model), cfg, torch.device("cpu")))


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, corpus, monkeypatch):
    # An absurd learning rate blows the weights up after the first update (the schedule's: the config refuses
    # an lr past config.MAX_LR).
    monkeypatch.setattr(train_module, "learning_rate", lambda step, cfg: 1e30)
    cfg = micro_config(corpus, min_lr=0.0, warmup_steps=0, save_interval=1, grad_clip=0.0)
    with pytest.raises(TrainingError, match="non-finite loss .* step 2.*step_00000001"):
        train(cfg, tmp_path / "run", progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000001"]
    assert all(math.isfinite(v) for v in losses(tmp_path / "run").values())


def test_warmup_longer_than_the_run_is_warned_about(tmp_path, corpus):
    """warmup_steps past max_steps (a preset's warmup on a short run) trains as asked, the learning rate still
    rising at the end and never decaying: said at the start."""
    cfg = micro_config(corpus, max_steps=1, warmup_steps=30)
    with pytest.warns(UserWarning, match=r"warmup_steps \(30\) is more than max_steps \(1\)"):
        train(cfg, tmp_path / "run", progress=False)


def test_existing_run_dir_is_not_overwritten(tmp_path, corpus):
    cfg = micro_config(corpus, max_steps=1)
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(TrainingError, match="already exists.*--resume.*--overwrite"):
        train(cfg, run, progress=False)
    assert (run / "metrics.jsonl").read_text() == before
    train(cfg, run, overwrite=True, progress=False)  # the explicit flag does replace it

    stranger = tmp_path / "not_a_run"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(TrainingError, match="not a fastlm run directory"):
        train(cfg, stranger, overwrite=True, progress=False)
    assert (stranger / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- data


def test_documents_split_and_batches_are_deterministic(tmp_path, corpus):
    docs = data_lib.load_documents(str(corpus))
    assert [d.name for d in docs] == sorted(d.name for d in docs)
    train_docs, val_docs = data_lib.split_documents(docs, 0.1)
    assert train_docs and val_docs and not {d.name for d in train_docs} & {d.name for d in val_docs}

    tokenizer = data_lib.cached_tokenizer(docs, data_lib.corpus_hash(docs), 0.1, 320)
    tokens = data_lib.tokenize_corpus(docs, data_lib.corpus_hash(docs), tokenizer, 0.1)
    assert tokens.train.dtype == "uint16" and len(tokens.train) > len(tokens.val) > 0
    assert tokenizer.decode(tokens.train[:40].tolist()).startswith("# module")
    x1, y1 = data_lib.train_batch(tokens, 7, step=3, micro_step=1, batch_size=4, seq_len=16)
    x2, y2 = data_lib.train_batch(tokens, 7, step=3, micro_step=1, batch_size=4, seq_len=16)
    x3, _ = data_lib.train_batch(tokens, 7, step=4, micro_step=1, batch_size=4, seq_len=16)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the inputs shifted by one

    # The second preparation comes from the cache: same files, no retraining.
    again = data_lib.tokenize_corpus(docs, data_lib.corpus_hash(docs),
                                     data_lib.cached_tokenizer(docs, data_lib.corpus_hash(docs), 0.1, 320), 0.1)
    assert again.train.filename == tokens.train.filename


def test_single_file_corpus_is_split_into_documents(tmp_path):
    text = "".join(f"line {i}: x = {i}\n" for i in range(200))
    (tmp_path / "one.txt").write_text(text)
    docs = data_lib.load_documents(str(tmp_path / "one.txt"))
    assert len(docs) == data_lib.SINGLE_FILE_PIECES and "".join(d.text for d in docs) == text


@pytest.mark.parametrize("case", ["missing", "empty_folder", "blank_file"])
def test_bad_data_paths(tmp_path, case):
    path = tmp_path / "data"
    if case == "empty_folder":
        path.mkdir()
    elif case == "blank_file":
        path.write_text("  \n\n")
    message = {"missing": "does not exist", "empty_folder": "no text files", "blank_file": "is empty"}[case]
    with pytest.raises(data_lib.DataError, match=message):
        data_lib.load_documents(str(path))


def test_a_corpus_folder_follows_its_links_to_folders(tmp_path):
    """A data set assembled from links (a subfolder linked in from another disk) is read whole, in the same
    order as the folders themselves (sorted by path); a link to an enclosing folder is read once, not forever."""
    shared = tmp_path / "shared" / "part"
    shared.mkdir(parents=True)
    (shared / "b.txt").write_text("from the linked folder\n")
    corpus = tmp_path / "corpus"
    (corpus / "a").mkdir(parents=True)
    (corpus / "a" / "a.txt").write_text("a\n")
    (corpus / "c.txt").write_text("c\n")
    (corpus / "b").symlink_to(shared)
    (corpus / "a" / "loop").symlink_to(corpus)
    root, files = data_lib.corpus_files(str(corpus))
    assert [str(f.relative_to(root)) for f in files] == ["a/a.txt", "b/b.txt", "c.txt"]


def test_stdlib_corpus_is_found():
    root, files = data_lib.corpus_files(None)
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert files == data_lib.corpus_files(None)[1]  # a fixed order, so the cache key is stable
    assert not any("site-packages" in f.parts or "test" in f.parts for f in files)


def test_long_runs_without_whitespace_train_in_linear_time():
    """One pre-token per run of letters made BPE training quadratic in its length (a 3 MB line: over an
    hour); runs are cut into pieces of at most MAX_PRETOKEN_BYTES, so 1.2 MB trains in about a second."""
    import random
    import string
    import time

    from tokenizers import pre_tokenizers

    from fastlm.tokenizer import MAX_PRETOKEN_BYTES, train_tokenizer

    rng = random.Random(0)
    letters = "".join(rng.choice(string.ascii_letters) for _ in range(1_000_000))
    texts = [letters, "7" * 100_000 + " " * 100_000, "def f(x):\n    return x + 1\n"]
    started = time.perf_counter()
    tokenizer = train_tokenizer(texts, 512)
    assert time.perf_counter() - started < 10  # quadratic, as before: minutes
    pieces = tokenizer.pre_tokenizer.pre_tokenize_str(letters[:10_000])
    assert max(len(p) for p, _ in pieces) == MAX_PRETOKEN_BYTES and "".join(p for p, _ in pieces) == letters[:10_000]
    assert tokenizer.decode(tokenizer.encode(letters[:5000]).ids) == letters[:5000]
    # Ordinary text (lines under MAX_PRETOKEN_BYTES) pre-tokenizes exactly as GPT-2's byte-level rule does
    # once every digit is split off.
    normal = (Path(__file__).read_text() + "naïve café, 中文 — ok\n\n\t  x")
    assert tokenizer.pre_tokenizer.pre_tokenize_str(normal) == pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)]).pre_tokenize_str(normal)


def test_digits_are_single_tokens_and_other_characters_stay_whole(corpus):
    """No token holds two digits, however often a number occurs; the split happens on the text, so the bytes
    of 'β' (CE B2, the second mapped to the digit-like '²') and of '½' stay one pre-token each."""
    from fastlm.tokenizer import train_tokenizer

    texts = [p.read_text() for p in corpus.iterdir()] + ["year = 2026 + 1999 # αβγ ½\n" * 50]
    tokenizer = train_tokenizer(texts, 400)
    assert not [t for t in tokenizer.get_vocab() if sum(c in "0123456789" for c in t) > 1]
    ids = tokenizer.encode("year = 2026").ids
    assert [tokenizer.decode([i]) for i in ids[-5:]] == [" ", "2", "0", "2", "6"]
    pieces = [p for p, _ in tokenizer.pre_tokenizer.pre_tokenize_str("x = αβγ ½ 12")]
    assert pieces == ["x", "Ġ=", "ĠÎ±Î²Î³", "Ġ", "Â½", "Ġ", "1", "2"]
    merged = train_tokenizer(texts, 400, split_digits=False)  # the older recipe: "2026" learnt as a token
    assert [merged.decode([i]) for i in merged.encode("year = 2026").ids][-1] == " 2026"


def test_token_byte_lengths_add_up_to_the_text(corpus):
    """Bytes per token id: a text's tokens stand for exactly its UTF-8 bytes; <|endoftext|> for none."""
    from fastlm.tokenizer import EOT, eot_id, token_byte_lengths, train_tokenizer

    tokenizer = train_tokenizer([p.read_text() for p in corpus.iterdir()] + ["naïve café, 中文 — ok ½ 3.14"], 320)
    lengths = token_byte_lengths(tokenizer)
    for text in ("def func_3(x, y):\n    return x * 2 + y\n", "naïve café, 中文 — ok ½ 3.14 \U0001f600"):
        assert lengths[tokenizer.encode(text).ids].sum() == len(text.encode())
    assert lengths[eot_id(tokenizer)] == 0 and len(lengths) == tokenizer.get_vocab_size()
    assert lengths[tokenizer.encode(EOT).ids].sum() == 0


def test_long_preparation_shows_progress(tmp_path, corpus, capsys, monkeypatch):
    docs = data_lib.load_documents(str(corpus))
    chash = data_lib.corpus_hash(docs)
    tokenizer = data_lib.cached_tokenizer(docs, chash, 0.1, 320)
    data_lib.tokenize_corpus(docs, chash, tokenizer, 0.1)
    assert capsys.readouterr().err == ""  # a small corpus (and no terminal): quiet
    monkeypatch.setenv("FASTLM_CACHE", str(tmp_path / "other-cache"))
    monkeypatch.setattr(data_lib, "show_progress", lambda chars: True)  # as for a big corpus on a terminal
    data_lib.tokenize_corpus(docs, chash, tokenizer, 0.1)
    assert "tokenizing the training split" in capsys.readouterr().err


def test_undecodable_and_binary_corpus_files_are_reported(tmp_path, corpus):
    (corpus / "latin.py").write_bytes("# caf\u00e9 na\u00efve \u00e0\n".encode("latin-1") + b"x = 1\n")
    (corpus / "blob.dat").write_bytes(b"PK\x03\x04\x00\x00binary")
    with pytest.warns(UserWarning) as caught:
        docs = data_lib.load_documents(str(corpus))
    messages = [str(w.message) for w in caught]
    assert any("1 file is not valid UTF-8 (3 bytes replaced by U+FFFD): latin.py" in m for m in messages), messages
    assert any("skipped 1 binary file (it has NUL bytes): blob.dat" in m for m in messages), messages
    names = [d.name for d in docs]
    assert "latin.py" in names and "blob.dat" not in names
    assert next(d.text for d in docs if d.name == "latin.py").count("\ufffd") == 3

    with pytest.raises(data_lib.DataError, match=r"blob.dat is a binary file \(it has NUL bytes\)"):
        data_lib.load_documents(str(corpus / "blob.dat"))
    only_binary = tmp_path / "binaries"
    only_binary.mkdir()
    (only_binary / "a.bin").write_bytes(b"\x00\x01")
    with pytest.raises(data_lib.DataError, match=r"holds no text files \(skipped 1 binary file: a.bin\)"):
        data_lib.load_documents(str(only_binary))


def test_unreadable_corpus_file_is_named(corpus, lock_file):
    locked = corpus / "mod_03.py"
    lock_file(locked)
    with pytest.raises(data_lib.DataError, match=rf"cannot read {locked}: Permission denied"):
        data_lib.load_documents(str(corpus))


def test_corrupted_cached_tokenizer_is_rebuilt(corpus):
    docs = data_lib.load_documents(str(corpus))
    chash = data_lib.corpus_hash(docs)
    tokenizer = data_lib.cached_tokenizer(docs, chash, 0.1, 320)
    [cached] = (data_lib.cache_dir() / "tokenizers").glob("*.json")
    cached.write_text('{"version": "1.0", "trunc')  # a half-written or damaged cache entry
    with pytest.warns(UserWarning, match=rf"cached tokenizer {cached} is not a valid tokenizer.json: .*; training it again"):
        again = data_lib.cached_tokenizer(docs, chash, 0.1, 320)
    assert again.to_str() == tokenizer.to_str()
    assert data_lib.cached_tokenizer(docs, chash, 0.1, 320).to_str() == tokenizer.to_str()  # repaired
