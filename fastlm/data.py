"""The corpus, its tokenization cache, and deterministic batches.

- Text comes from a file, a folder (every text file under it, recursively, links to
  folders followed, hidden names skipped), or by
  default the Python standard library's own source (~9 MB of .py files without
  its tests and data tables), which every Python ships. Binary files (a NUL byte
  in their first 8 KiB) in a folder are skipped, with a warning naming them;
  bytes that are not UTF-8 are read as U+FFFD, with a warning that counts them.
- A document is a file (a single-file corpus is cut into line-aligned pieces so
  it can still be split); documents, not tokens, are split into train and
  validation, by a hash of their name.
- The tokenizer and the token files are cached under ``$FASTLM_CACHE`` (default
  ``~/.cache/fastlm``), keyed by a hash of the corpus (and of the tokenizer), so
  a second run skips both; a damaged cached tokenizer is trained again. Token
  files are flat uint16/uint32 arrays read through ``numpy.memmap``, checked when
  opened against the lengths and sha256s their ``meta.json`` records and against
  the vocabulary, and rebuilt if damaged.
- Batch ``(step, micro_step)`` is drawn from a generator seeded with
  ``(seed, step, micro_step)``: a resumed run sees exactly the batches an
  uninterrupted one would have seen, with nothing to save but the step.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import sysconfig
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from .files import atomic_write, remove_dir
from .jsonfile import read_json_object, require
from .tokenizer import encode_documents, load_tokenizer, train_tokenizer

# Bump when the cached files' layout or the tokenizer recipe changes (2: long pre-tokens cut; 3: digits split).
CACHE_FORMAT = 3
SINGLE_FILE_PIECES = 20
# Not code to learn from: tests, installed third-party packages, and two packages that are mostly data
# (encodings' character tables, pydoc_data's help text).
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "encodings",
                "pydoc_data"}
_TRAIN, _VAL = 0, 1
PROGRESS_CHARS = 16 * 2**20  # text that takes about ten seconds or more to train a tokenizer on or to tokenize
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # how errors="surrogateescape" reads a byte that is not UTF-8


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
    sha256: dict[str, str] = field(default_factory=dict)  # of the train and val token files' bytes


# ----------------------------------------------------------------------------- corpus


def cache_dir() -> Path:
    return Path(os.environ.get("FASTLM_CACHE") or Path.home() / ".cache" / "fastlm")


def show_progress(chars: int) -> bool:
    """Progress bars for preparing ``chars`` characters of text: only when that takes a while, on a terminal."""
    return chars >= PROGRESS_CHARS and sys.stderr.isatty()


def unreadable(path: Path, error: OSError) -> DataError:
    return DataError(f"cannot read {path}: {error.strerror or error}")


def _is_text(path: Path) -> bool:
    """No NUL byte in the first 8 KiB (as git and grep tell text from binary)."""
    try:
        with path.open("rb") as f:
            return b"\0" not in f.read(8192)
    except OSError as e:
        raise unreadable(path, e) from None


def read_text(path: Path) -> tuple[str, int]:
    """The file's text as UTF-8 (universal newlines, as ``Path.read_text``) and how many of its bytes
    were not UTF-8: each of those reads as U+FFFD."""
    try:
        with path.open(encoding="utf-8") as f:
            return f.read(), 0
    except UnicodeDecodeError:
        with path.open(encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
        return _ESCAPED_BYTE.subn("\ufffd", text)
    except OSError as e:
        raise unreadable(path, e) from None


def name_list(names: list[str], most: int = 10) -> str:
    """``a, b, c``; past ``most`` names, the first ``most`` and how many more."""
    more = f", ... ({len(names) - most:,} more)" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def _count(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'s' if count != 1 else ''}"


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
        if not _is_text(path):
            raise DataError(f"data file {path} is a binary file (it has NUL bytes), not text")
        return path.parent, [path]
    if not path.is_dir():
        raise DataError(f"data path {path} is neither a file nor a folder")
    files, binary = [], []
    for p in _folder_files(path):
        (files if _is_text(p) else binary).append(p)
    skipped = [str(p.relative_to(path)) for p in binary]
    if not files:
        raise DataError(f"data folder {path} holds no text files"
                        + (f" (skipped {_count(len(skipped), 'binary file')}: {name_list(skipped)})" if skipped else ""))
    if skipped:
        warnings.warn(f"data folder {path}: skipped {_count(len(skipped), 'binary file')} "
                      f"({'they have' if len(skipped) > 1 else 'it has'} NUL bytes): {name_list(skipped)}",
                      stacklevel=3)
    return path, files


def _folder_files(root: Path) -> list[Path]:
    """Every file under ``root`` but hidden ones (a name with a leading dot, or inside such a folder), sorted by
    path. Links to folders are followed, as a data set assembled from links expects (``rglob`` skipped them, and
    their files, without a word), each real folder once: a link to an enclosing folder does not loop."""
    files, seen = [], set()

    def visit(folder: Path) -> None:
        real = folder.resolve()
        if real in seen:
            return
        seen.add(real)
        try:
            entries = sorted(folder.iterdir())
        except OSError as e:
            raise unreadable(folder, e) from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                visit(entry)
            elif entry.is_file():
                files.append(entry)

    visit(root)
    return files  # depth first over sorted entries: the order of sorting the paths themselves


def load_documents(data: str | None) -> list[Document]:
    root, files = corpus_files(data)
    docs, undecodable = [], {}
    for f in files:
        text, bad_bytes = read_text(f)
        docs.append(Document(str(f.relative_to(root)), text))
        if bad_bytes:
            undecodable[docs[-1].name] = bad_bytes
    if undecodable:
        warnings.warn(f"{_count(len(undecodable), 'file')} {'are' if len(undecodable) > 1 else 'is'} not valid UTF-8 "
                      f"({sum(undecodable.values()):,} bytes replaced by U+FFFD): {name_list(list(undecodable))}; "
                      "convert them to UTF-8 to train on their text", stacklevel=2)
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


def strings_sha256(strings: Iterable[str]) -> str:
    """A sha256 hex digest of ``strings`` in order, each length-prefixed, so that no two different sequences
    share a byte stream (``("ab", "c")`` and ``("a", "bc")`` differ)."""
    h = hashlib.sha256()
    for string in strings:
        data = string.encode("utf-8", errors="surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def corpus_hash(docs: list[Document]) -> str:
    """A hash of every document's name and text."""
    return strings_sha256(part for d in docs for part in (d.name, d.text))


# ----------------------------------------------------------------------------- cache


def cached_tokenizer(docs: list[Document], chash: str, val_fraction: float, vocab_size: int) -> Tokenizer:
    """The tokenizer for this corpus (of hash ``chash``) and vocabulary size: from the cache,
    or trained on the train split."""
    return tokenizer_from_cache(f"{CACHE_FORMAT}:{chash}:{val_fraction}:{vocab_size}",
                                lambda: (d.text for d in split_documents(docs, val_fraction)[0]), vocab_size,
                                progress=show_progress(sum(len(d.text) for d in docs)))


def tokenizer_from_cache(key: str, texts: Callable[[], Iterable[str]], vocab_size: int,
                         progress: bool = False) -> Tokenizer:
    """The tokenizer cached under ``key``, or one trained on ``texts()`` (training text only) and cached.
    A cache entry that does not load (a damaged file) is trained again and replaced."""
    path = cache_dir() / "tokenizers" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"
    if path.is_file():
        try:
            return load_tokenizer(path)
        except ValueError as e:
            warnings.warn(f"cached tokenizer {e}; training it again", stacklevel=2)
    tokenizer = train_tokenizer(texts(), vocab_size, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, tokenizer.to_str())
    return tokenizer


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def tokenize_corpus(docs: list[Document], chash: str, tokenizer: Tokenizer, val_fraction: float) -> TokenData:
    """Token files for the train and validation splits, memory-mapped; built once per corpus + tokenizer,
    and built again when the cached entry is damaged (see :func:`_open_token_cache`)."""
    tok_hash = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
    key = hashlib.sha256(f"{CACHE_FORMAT}:{chash}:{tok_hash}:{val_fraction}".encode()).hexdigest()[:32]
    folder = cache_dir() / "tokens" / key
    vocab = tokenizer.get_vocab_size()
    opened = _open_token_cache(folder, vocab) if (folder / "meta.json").is_file() else None
    if opened is None:
        _build_token_cache(folder, docs, tokenizer, val_fraction)
        opened = _open_token_cache(folder, vocab)
        if opened is None:
            raise DataError(f"the token cache {folder} was damaged again as it was rebuilt; is something else "
                            f"writing under {cache_dir()}?")
    arrays, digests = opened
    return TokenData(arrays["train"], arrays["val"], chash, len(docs), digests)


def _build_token_cache(folder: Path, docs: list[Document], tokenizer: Tokenizer, val_fraction: float) -> None:
    """Write the cache entry ``folder`` under a temporary name and rename it into place (replacing a damaged one)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    splits = split_documents(docs, val_fraction)
    dtype = token_dtype(tokenizer.get_vocab_size())
    progress = show_progress(sum(len(d.text) for d in docs))
    counts, digests = {}, {}
    for name, what, split in zip(("train", "val"), ("training", "validation"), splits):
        digest = hashlib.sha256()
        with open(tmp / f"{name}.bin", "wb") as f:
            counts[name] = 0
            encoded = encode_documents(tokenizer, (d.text for d in split))
            for ids in tqdm(encoded, desc=f"tokenizing the {what} split", total=len(split), unit="doc",
                            disable=not progress):
                raw = np.asarray(ids, dtype=dtype).tobytes()
                f.write(raw)
                digest.update(raw)
                counts[name] += len(ids)
        digests[name] = digest.hexdigest()
    meta = {"dtype": dtype.name, "tokens": counts, "documents": {"train": len(splits[0]), "val": len(splits[1])},
            "sha256": digests}
    (tmp / "meta.json").write_text(json.dumps(meta))
    if folder.exists():  # damaged: set aside (a process still reading it keeps its open files) and replaced
        remove_dir(folder)
    try:
        os.rename(tmp, folder)
    except OSError:  # another process finished the same cache entry first
        shutil.rmtree(tmp)


def _open_token_cache(folder: Path, vocab_size: int) -> tuple[dict[str, np.ndarray], dict[str, str]] | None:
    """The train and validation arrays of a token cache entry and their sha256s, checked against its meta.json
    (lengths, and sha256 where recorded) and the vocabulary (one pass over each array); None, with a warning
    that names the damaged file, when they do not match."""
    meta_json = folder / "meta.json"
    try:
        meta = read_json_object(meta_json, DataError)
        require(meta, meta_json, {"dtype": str, "tokens": dict}, DataError)
        arrays, digests = {}, {}
        for name in ("train", "val"):
            path = folder / f"{name}.bin"
            tokens = np.memmap(path, dtype=meta["dtype"], mode="r")
            if len(tokens) != meta["tokens"].get(name):
                raise DataError(f"{path} holds {len(tokens)} tokens, {meta_json} records {meta['tokens'].get(name)}")
            digest, top = _digest_and_max(tokens)
            if digest != meta.get("sha256", {}).get(name, digest):
                raise DataError(f"{path} does not match the sha256 {meta_json} records")
            if top >= vocab_size:
                raise DataError(f"{path} holds token id {top}, past the tokenizer's {vocab_size} ids")
            arrays[name], digests[name] = tokens, digest
    except (DataError, OSError, ValueError, TypeError, AttributeError) as e:
        warnings.warn(f"the token cache {folder} is damaged ({e}); rebuilding it", stacklevel=3)
        return None
    return arrays, digests


def _digest_and_max(tokens: np.ndarray, chunk: int = 1 << 24) -> tuple[str, int]:
    """sha256 of an array's bytes and its largest value, reading it once in chunks."""
    digest, top = hashlib.sha256(), -1
    for start in range(0, len(tokens), chunk):
        part = np.ascontiguousarray(tokens[start:start + chunk])
        digest.update(memoryview(part).cast("B"))
        top = max(top, int(part.max()))
    return digest.hexdigest(), top


# ----------------------------------------------------------------------------- batches


def shard_rows(rows: np.ndarray, shard: tuple[int, int]) -> np.ndarray:
    """Rank ``shard[0]``'s part of a global batch's rows (of ``shard[1]`` ranks): W processes together
    see exactly the batch one process would."""
    rank, world = shard
    return rows[rank * len(rows) // world:(rank + 1) * len(rows) // world]


def train_rng(seed: int, step: int, micro_step: int) -> np.random.Generator:
    """The generator that draws micro-batch (step, micro_step): a resumed run needs nothing but the step."""
    return np.random.default_rng([seed, _TRAIN, step, micro_step])


def _batch(tokens: np.ndarray, rng: np.random.Generator, batch_size: int, seq_len: int, shard: tuple[int, int],
           eot: int | None) -> tuple[torch.Tensor, ...]:
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)  # the whole batch's, so any part is the same
    starts = shard_rows(starts, shard)
    window = np.stack([np.asarray(tokens[s:s + seq_len + 1], dtype=np.int64) for s in starts])
    inputs = window[:, :-1]
    documents = () if eot is None else document_spans(inputs, eot)
    window = torch.from_numpy(window)
    return window[:, :-1], window[:, 1:], *documents  # inputs, next-token targets: (B, T) each


def document_spans(rows: np.ndarray, eot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the documents of token rows ``rows`` (B, T) lie, for attention confined to each: ``cu_seqlens``,
    int32 (documents + 1,), the prefix sums of their lengths over the flattened rows (flash-attention's
    convention), and ``positions`` (B, T) int64, each token's place in its document. A document starts at
    its row's first token and at each ``<|endoftext|>``, which opens the document after it as a start token
    does (so the model predicts a document's first token from it alone, as sampling from an empty prompt
    does). Computed on the host from the batch's ids, so the device is never asked for them."""
    B, T = rows.shape
    starts = rows.reshape(-1) == eot
    starts[::T] = True  # no document crosses a row
    first = np.flatnonzero(starts)
    cu_seqlens = np.append(first, B * T).astype(np.int32)
    positions = np.arange(B * T) - first[np.cumsum(starts) - 1]
    return torch.from_numpy(cu_seqlens), torch.from_numpy(positions.reshape(B, T))


def check_lengths(data: TokenData, seq_len: int) -> None:
    for name, tokens in (("training", data.train), ("validation", data.val)):
        if len(tokens) <= seq_len:
            raise DataError(f"the {name} split has {len(tokens)} tokens, too few for seq_len {seq_len}; "
                            "use more text, a smaller seq_len or a different val_fraction")


def train_batch(data: TokenData, seed: int, step: int, micro_step: int, batch_size: int, seq_len: int,
                shard: tuple[int, int] = (0, 1), eot: int | None = None) -> tuple[torch.Tensor, ...]:
    """The micro-batch for (step, micro_step): a pure function of its arguments, (inputs, targets), and with
    ``eot`` (the ``<|endoftext|>`` id, for attention within documents) the inputs' :func:`document_spans`
    too. ``shard=(rank, world)`` picks that rank's rows of it, so W processes together read exactly the
    batch one process would."""
    return _batch(data.train, train_rng(seed, step, micro_step), batch_size, seq_len, shard, eot)


def val_batch(data: TokenData, seed: int, index: int, batch_size: int, seq_len: int,
              shard: tuple[int, int] = (0, 1), eot: int | None = None) -> tuple[torch.Tensor, ...]:
    """The ``index``-th validation batch (its ``shard``; ``eot`` as in :func:`train_batch`); the same at every
    evaluation, so val losses compare."""
    rng = np.random.default_rng([seed, _VAL, index])
    return _batch(data.val, rng, batch_size, seq_len, shard, eot)
