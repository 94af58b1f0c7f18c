"""The corpus, its tokenization cache, and deterministic batches.

- Text comes from a file, a folder (every text file under it, recursively), or by
  default the Python standard library's own source (~9 MB of .py files without
  its tests and data tables), which every Python ships.
- A document is a file (a single-file corpus is cut into line-aligned pieces so
  it can still be split); documents, not tokens, are split into train and
  validation, by a hash of their name.
- The tokenizer and the token files are cached under ``$FASTLM_CACHE`` (default
  ``~/.cache/fastlm``), keyed by a hash of the corpus (and of the tokenizer), so
  a second run skips both. Token files are flat uint16/uint32 arrays read
  through ``numpy.memmap``.
- Batch ``(step, micro_step)`` is drawn from a generator seeded with
  ``(seed, step, micro_step)``: a resumed run sees exactly the batches an
  uninterrupted one would have seen, with nothing to save but the step.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from tokenizers import Tokenizer

from .files import atomic_write
from .tokenizer import encode_documents, train_tokenizer

CACHE_FORMAT = 1  # bump when the cached files' layout or the tokenizer recipe changes
SINGLE_FILE_PIECES = 20
# Not code to learn from: tests, installed third-party packages, and two packages that are mostly data
# (encodings' character tables, pydoc_data's help text).
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "encodings",
                "pydoc_data"}
_TRAIN, _VAL = 0, 1


class DataError(ValueError):
    """The data path cannot be used; the message says why."""


@dataclass
class Document:
    name: str  # path relative to the corpus root (plus a piece number for a split single file)
    text: str


@dataclass
class TokenData:
    train: np.ndarray  # flat token ids, documents separated by <|endoftext|>
    val: np.ndarray
    corpus_hash: str
    num_documents: int


# ----------------------------------------------------------------------------- corpus


def cache_dir() -> Path:
    return Path(os.environ.get("FASTLM_CACHE") or Path.home() / ".cache" / "fastlm")


def _is_text(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" not in f.read(8192)


def corpus_files(data: str | None) -> tuple[Path, list[Path]]:
    """The corpus root and its files, in a deterministic (sorted) order."""
    if data is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP)
            files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
        if not files:
            raise DataError(f"found no .py files in the standard library at {root}; pass --data PATH")
        return root, files
    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    if path.is_file():
        return path.parent, [path]
    files = sorted(p for p in path.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
                   and _is_text(p))
    if not files:
        raise DataError(f"data folder {path} holds no text files")
    return path, files


def load_documents(data: str | None) -> list[Document]:
    root, files = corpus_files(data)
    docs = [Document(str(f.relative_to(root)), f.read_text(encoding="utf-8", errors="replace")) for f in files]
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise DataError(f"data path {data} is empty (no non-blank text)")
    if len(docs) == 1:
        docs = _split_lines(docs[0], SINGLE_FILE_PIECES)
    if len(docs) < 2:
        raise DataError(f"data path {data} holds a single line of text; need at least two documents "
                        "to split off a validation set")
    return docs


def _split_lines(doc: Document, pieces: int) -> list[Document]:
    lines = doc.text.splitlines(keepends=True)
    size = -(-len(lines) // pieces)
    return [Document(f"{doc.name}#{i // size}", "".join(lines[i:i + size])) for i in range(0, len(lines), size)]


def _name_hash(name: str) -> float:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Validation gets the documents whose name hashes below ``val_fraction``; at least one each side."""
    val = [d for d in docs if _name_hash(d.name) < val_fraction]
    if not val:
        val = [min(docs, key=lambda d: _name_hash(d.name))]
    if len(val) == len(docs):
        val = val[:-1]
    val_names = {d.name for d in val}
    return [d for d in docs if d.name not in val_names], val


def corpus_hash(docs: list[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        for part in (d.name, d.text):
            data = part.encode("utf-8", errors="surrogatepass")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


# ----------------------------------------------------------------------------- cache


def cached_tokenizer(docs: list[Document], chash: str, val_fraction: float, vocab_size: int) -> Tokenizer:
    """The tokenizer for this corpus (of hash ``chash``) and vocabulary size: from the cache,
    or trained on the train split."""
    return tokenizer_from_cache(f"{CACHE_FORMAT}:{chash}:{val_fraction}:{vocab_size}",
                                lambda: (d.text for d in split_documents(docs, val_fraction)[0]), vocab_size)


def tokenizer_from_cache(key: str, texts: Callable[[], Iterable[str]], vocab_size: int) -> Tokenizer:
    """The tokenizer cached under ``key``, or one trained on ``texts()`` (training text only) and cached."""
    path = cache_dir() / "tokenizers" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    tokenizer = train_tokenizer(texts(), vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, tokenizer.to_str())
    return tokenizer


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def tokenize_corpus(docs: list[Document], chash: str, tokenizer: Tokenizer, val_fraction: float) -> TokenData:
    """Token files for the train and validation splits, memory-mapped; built once per corpus + tokenizer."""
    tok_hash = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
    key = hashlib.sha256(f"{CACHE_FORMAT}:{chash}:{tok_hash}:{val_fraction}".encode()).hexdigest()[:32]
    folder = cache_dir() / "tokens" / key
    dtype = token_dtype(tokenizer.get_vocab_size())
    if not (folder / "meta.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{key}."))
        splits = split_documents(docs, val_fraction)
        counts = {}
        for name, split in zip(("train", "val"), splits):
            with open(tmp / f"{name}.bin", "wb") as f:
                counts[name] = 0
                for ids in encode_documents(tokenizer, (d.text for d in split)):
                    f.write(np.asarray(ids, dtype=dtype).tobytes())
                    counts[name] += len(ids)
        meta = {"dtype": dtype.name, "tokens": counts, "documents": {"train": len(splits[0]), "val": len(splits[1])}}
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished the same cache entry first
            for p in tmp.iterdir():
                p.unlink()
            tmp.rmdir()
    meta = json.loads((folder / "meta.json").read_text())
    arrays = [np.memmap(folder / f"{name}.bin", dtype=meta["dtype"], mode="r") for name in ("train", "val")]
    return TokenData(arrays[0], arrays[1], chash, len(docs))


# ----------------------------------------------------------------------------- batches


def shard_rows(rows: np.ndarray, shard: tuple[int, int]) -> np.ndarray:
    """Rank ``shard[0]``'s part of a global batch's rows (of ``shard[1]`` ranks): W processes together
    see exactly the batch one process would."""
    rank, world = shard
    return rows[rank * len(rows) // world:(rank + 1) * len(rows) // world]


def train_rng(seed: int, step: int, micro_step: int) -> np.random.Generator:
    """The generator that draws micro-batch (step, micro_step): a resumed run needs nothing but the step."""
    return np.random.default_rng([seed, _TRAIN, step, micro_step])


def _batch(tokens: np.ndarray, rng: np.random.Generator, batch_size: int, seq_len: int, shard: tuple[int, int]):
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)  # the whole batch's, so any part is the same
    starts = shard_rows(starts, shard)
    window = np.stack([np.asarray(tokens[s:s + seq_len + 1], dtype=np.int64) for s in starts])
    window = torch.from_numpy(window)
    return window[:, :-1], window[:, 1:]  # inputs, next-token targets: (B, T) each


def check_lengths(data: TokenData, seq_len: int) -> None:
    for name, tokens in (("training", data.train), ("validation", data.val)):
        if len(tokens) <= seq_len:
            raise DataError(f"the {name} split has {len(tokens)} tokens, too few for seq_len {seq_len}; "
                            "use more text, a smaller seq_len or a different val_fraction")


def train_batch(data: TokenData, seed: int, step: int, micro_step: int, batch_size: int, seq_len: int,
                shard: tuple[int, int] = (0, 1)):
    """The micro-batch for (step, micro_step): a pure function of its arguments. ``shard=(rank, world)``
    picks that rank's rows of it, so W processes together read exactly the batch one process would."""
    return _batch(data.train, train_rng(seed, step, micro_step), batch_size, seq_len, shard)


def val_batch(data: TokenData, seed: int, index: int, batch_size: int, seq_len: int,
              shard: tuple[int, int] = (0, 1)):
    """The ``index``-th validation batch (its ``shard``); the same at every evaluation, so val losses compare."""
    rng = np.random.default_rng([seed, _VAL, index])
    return _batch(data.val, rng, batch_size, seq_len, shard)
