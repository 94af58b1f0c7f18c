"""Labelled examples for fine-tuning tasks: classification and sequence-to-sequence.

- An ``Example`` is a (source, target) pair plus the ``group`` the train/validation
  split is keyed on: examples of one group always land on the same side, so windows
  of one file never leak from training into validation.
- With no data file, both tasks are built offline from the running Python's standard
  library source (the same files as the LM corpus in ``fastlm.data``):
  classification labels windows of code with the package they come from;
  seq2seq maps a function's code (docstring removed) to its docstring's first line.
- User files are ``.csv`` (header row required) or ``.jsonl`` (one object per line):
  ``text``/``label`` for classification, ``source``/``target`` for seq2seq. Each data
  row is its own group.
- Everything is deterministic: the same Python and the same file give the same
  examples in the same order, and ``examples_hash`` names them for caches.
"""

from __future__ import annotations

import ast
import csv
import json
import sys
import textwrap
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .data import (_ESCAPED_BYTE, DataError, Document, _is_text, _name_hash, corpus_files, split_documents,
                   strings_sha256, unreadable)

# Stdlib packages big enough to give hundreds of windows each and distinct enough to tell apart.
CLASSIFY_PACKAGES: tuple[str, ...] = ("asyncio", "email", "http", "importlib", "json", "logging",
                                      "multiprocessing", "unittest", "urllib", "xml")
MIN_WINDOW_LINES = 3  # fewer non-blank lines than this is too little code to classify


@dataclass
class Example:
    group: str   # what the train/val split is keyed on: a source file (built-in tasks) or "row N" (user files)
    source: str  # the input text (classification: the text to classify; seq2seq: the source)
    target: str  # classification: the label; seq2seq: the target text


# ----------------------------------------------------------------------------- built-in classification


def stdlib_classification(window_chars: int = 400, per_label: int = 400) -> list[Example]:
    """Windows of stdlib source labelled with their package (one of ``CLASSIFY_PACKAGES``).

    A window is a run of whole consecutive lines of one file, at most ``window_chars``
    characters long, holding at least ``MIN_WINDOW_LINES`` non-blank lines. Each package
    keeps at most ``per_label`` of its windows, spread evenly over all of them (files in
    sorted order), so big packages do not swamp small ones. A package this Python lacks is
    left out with a warning.
    """
    if window_chars < 1 or per_label < 1:
        raise ValueError(f"window_chars and per_label must be positive, got {window_chars} and {per_label}")
    root, files = corpus_files(None)
    relative = [f.relative_to(root) for f in files]
    examples, found = [], []
    for package in CLASSIFY_PACKAGES:
        if not (root / package).is_dir():
            warnings.warn(f"the standard library at {root} has no package {package!r}; "
                          "the classification task leaves that label out")
            continue
        found.append(package)
        windows = [Example(rel.as_posix(), window, package)
                   for file, rel in zip(files, relative) if len(rel.parts) > 1 and rel.parts[0] == package
                   for window in _windows(file.read_text(encoding="utf-8", errors="replace"), window_chars)]
        examples += _spread(windows, per_label)
    if len(found) < 2:
        raise DataError(f"the standard library at {root} holds {len(found)} of the packages {list(CLASSIFY_PACKAGES)}; "
                        "the built-in classification task needs at least two: pass a data file")
    return examples


def _windows(text: str, window_chars: int) -> list[str]:
    """Runs of whole lines of at most ``window_chars`` characters (newlines included) with at least
    ``MIN_WINDOW_LINES`` non-blank lines. A line longer than a window ends the run and is dropped:
    alone it would be a one-line window, too short to keep."""
    runs, run, size = [], [], 0
    for line in text.splitlines(keepends=True):
        if run and size + len(line) > window_chars:
            runs.append(run)
            run, size = [], 0
        if len(line) <= window_chars:
            run.append(line)
            size += len(line)
    runs.append(run)
    return ["".join(run) for run in runs if sum(1 for line in run if line.strip()) >= MIN_WINDOW_LINES]


def _spread(items: list, n: int) -> list:
    """At most ``n`` of ``items``, evenly spaced over the whole list, in order."""
    if len(items) <= n:
        return items
    return [items[i * len(items) // n] for i in range(n)]


# ----------------------------------------------------------------------------- built-in seq2seq


def stdlib_seq2seq(max_source_chars: int = 2000) -> list[Example]:
    """Every documented function (methods too) of the stdlib: its code without the docstring,
    dedented, as the source; the docstring's first line as the target. Files that do not
    decode as UTF-8 or parse are skipped. See ``_docstring_examples`` for which functions count."""
    root, files = corpus_files(None)
    examples = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        examples += _docstring_examples(text, path.relative_to(root).as_posix(), max_source_chars)
    return examples


def _docstring_examples(text: str, group: str, max_source_chars: int) -> list[Example]:
    """The seq2seq examples of one Python file, in source order. A function is left out when its
    docstring is blank or shares a line with other code (it could not be cut out cleanly), when
    nothing but ``pass``/``...`` is left without it, or when the rest is over ``max_source_chars``."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):  # ValueError: null bytes in the source
        return []
    lines = text.split("\n")  # as ast counts lines (read_text has already turned \r\n into \n)
    functions = sorted((node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))),
                       key=lambda node: node.lineno)
    examples = []
    for node in functions:
        docstring = ast.get_docstring(node)
        doc, rest = node.body[0], node.body[1:]
        if not docstring or not docstring.strip() or all(_is_placeholder(s) for s in rest):
            continue
        if not _on_own_lines(doc, lines):
            continue
        # node.lineno is the `def` line (decorators are left out); drop exactly the docstring's lines.
        kept = lines[node.lineno - 1:doc.lineno - 1] + lines[doc.end_lineno:node.end_lineno]
        source = textwrap.dedent("\n".join(kept))
        if len(source) <= max_source_chars:
            target = next(line.strip() for line in docstring.splitlines() if line.strip())
            examples.append(Example(group, source, target))
    return examples


def _is_placeholder(statement: ast.stmt) -> bool:
    return isinstance(statement, ast.Pass) or (isinstance(statement, ast.Expr)
                                               and isinstance(statement.value, ast.Constant)
                                               and statement.value.value is Ellipsis)


def _on_own_lines(statement: ast.stmt, lines: list[str]) -> bool:
    """Whether nothing but blanks (or a trailing comment) shares the statement's lines.
    ast's column offsets count UTF-8 bytes, hence the encoding."""
    before = lines[statement.lineno - 1].encode()[:statement.col_offset]
    after = lines[statement.end_lineno - 1].encode()[statement.end_col_offset:].strip()
    return not before.strip() and (not after or after.startswith(b"#"))


# ----------------------------------------------------------------------------- user files


def read_classification(path: str | Path) -> list[Example]:
    """Examples from a ``.csv`` or ``.jsonl`` file with ``text`` and ``label`` columns/keys.
    Labels are strings with surrounding whitespace stripped (a JSON number or boolean label
    becomes its Python ``str()``: ``1``, ``True``); there must be at least two distinct ones."""
    records = _read_records(path, ("text", "label"))
    examples = [Example(f"row {i}", text, label.strip()) for i, (text, label) in enumerate(records)]
    labels = label_names(examples)
    if len(labels) < 2:
        raise DataError(f"data file {path}: a classifier needs at least two classes, found {len(labels)}: {labels}")
    return examples


def read_seq2seq(path: str | Path) -> list[Example]:
    """Examples from a ``.jsonl`` or ``.csv`` file with ``source`` and ``target`` columns/keys."""
    return [Example(f"row {i}", source, target)
            for i, (source, target) in enumerate(_read_records(path, ("source", "target")))]


def load_classification(data: str | None) -> list[Example]:
    """The built-in stdlib task when ``data`` is None, else the examples of the file ``data``."""
    return stdlib_classification() if data is None else read_classification(data)


def load_seq2seq(data: str | None) -> list[Example]:
    """The built-in stdlib task when ``data`` is None, else the examples of the file ``data``."""
    return stdlib_seq2seq() if data is None else read_seq2seq(data)


def _read_records(path: str | Path, columns: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The values of ``columns`` for every data row of a ``.csv`` or ``.jsonl`` file, none of them blank."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise DataError(f"data path {path} is a folder; this task reads one .csv or .jsonl file with columns "
                        f"{', '.join(columns)} (a folder of text files is a corpus for task lm)")
    if not path.is_file():
        raise DataError(f"data file {path} does not exist (or is not a file)")
    if not _is_text(path):
        raise DataError(f"data file {path} is a binary file (it has NUL bytes); expected a .csv or .jsonl text file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = _csv_rows(path, columns)
    elif suffix == ".jsonl":
        rows = _jsonl_rows(path, columns)
    else:
        raise DataError(f"data file {path}: expected a .csv or .jsonl file, got suffix {suffix or '(none)'!r}")
    records = []
    try:
        for line, values in rows:
            for column, value in zip(columns, values):
                if not value.strip():
                    raise DataError(f"data file {path}, line {line}: empty {column!r}")
            records.append(values)
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    except OSError as e:
        raise unreadable(path, e) from None
    except csv.Error as e:
        raise DataError(f"data file {path}: not a valid CSV file ({e})") from None
    if not records:
        raise DataError(f"data file {path} holds no rows; expected one example per row with {', '.join(columns)}")
    return records


def _not_utf8(path: Path) -> DataError:
    """The error for a file that is not UTF-8: where its first bad byte is and how many there are. (The
    decoder's own offset counts from the start of the chunk it was decoding, not of the file.)"""
    data = path.read_bytes()
    text = data.decode("utf-8", errors="surrogateescape")
    bad = _ESCAPED_BYTE.findall(text)
    offset = len(text[:_ESCAPED_BYTE.search(text).start()].encode("utf-8", errors="surrogateescape"))
    return DataError(f"data file {path} is not UTF-8 text: byte {data[offset]:#04x} at offset {offset} cannot be "
                     f"decoded ({len(bad):,} undecodable byte{'s' if len(bad) > 1 else ''} in all); "
                     "convert the file to UTF-8")


def _csv_rows(path: Path, columns: tuple[str, ...]):
    """(line number, values) for each non-blank row; a cell missing from a short row reads as empty. A row with
    more non-blank cells than the header has columns is refused: a comma in an unquoted text shifted its cells,
    so a piece of the text would be read as the label (empty cells past the header, as spreadsheets write, are
    allowed)."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # a long document is one cell; the default is 128 KiB
    with path.open(encoding="utf-8-sig", newline="") as f:  # -sig: drop a byte-order mark
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DataError(f"data file {path} is empty; expected a header row with columns {', '.join(columns)}")
        found = [name.strip() for name in header]
        missing = [c for c in columns if c not in found]
        if missing:
            raise DataError(f"data file {path}: the header has no {' or '.join(map(repr, missing))} column; "
                            f"found columns {found}")
        where = [found.index(c) for c in columns]
        for row in reader:
            if any(cell.strip() for cell in row[len(header):]):
                raise DataError(f"data file {path}, line {reader.line_num}: {len(row)} cells, but the header names "
                                f"{len(header)} columns (a comma inside an unquoted cell? quote it)")
            if any(cell.strip() for cell in row):
                yield reader.line_num, tuple(row[i] if i < len(row) else "" for i in where)


def _jsonl_rows(path: Path, columns: tuple[str, ...]):
    """(line number, values) for each non-blank line, which must be a JSON object with ``columns`` as keys
    and strings, numbers or booleans as their values."""
    with path.open(encoding="utf-8-sig") as f:  # -sig: drop a byte-order mark, as for CSV
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"data file {path}, line {number}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"data file {path}, line {number}: expected a JSON object with keys "
                                f"{', '.join(columns)}, got {type(row).__name__}")
            missing = [c for c in columns if c not in row]
            if missing:
                raise DataError(f"data file {path}, line {number}: no {' or '.join(map(repr, missing))} key; "
                                f"found keys {list(row)}")
            for c in columns:
                if row[c] is None or isinstance(row[c], (dict, list)):
                    raise DataError(f"data file {path}, line {number}: {c!r} must be a string, number or boolean, "
                                    f"got {json.dumps(row[c])}")
            yield number, tuple(str(row[c]) for c in columns)


# ----------------------------------------------------------------------------- split, hash, labels


def split_examples(examples: list[Example], val_fraction: float, *,
                   stratify: bool) -> tuple[list[Example], list[Example]]:
    """Train and validation examples (each in the original order), split by group: all examples of a
    group land on the same side.

    Without ``stratify`` the LM corpus's rule applies (``fastlm.data.split_documents``): validation
    gets the groups whose name hashes below ``val_fraction``, at least one group each side.

    With ``stratify`` (classification) each label is split on its own (a group's label is its
    first example's): its groups are taken in name-hash order until they hold ``val_fraction`` of
    the label's examples, at least one group and never all of them, so every label has about the
    same share held out however unevenly its examples spread over groups (files). A label with a
    single group stays in training.
    """
    groups = list(dict.fromkeys(e.group for e in examples))
    if len(groups) < 2:
        raise DataError(f"cannot hold out a validation set from {len(groups)} group(s) of examples; need at least two")
    if stratify:
        label_of, by_label, sizes = {}, {}, Counter(e.group for e in examples)
        for e in examples:
            label_of.setdefault(e.group, e.target)
        for g in groups:
            by_label.setdefault(label_of[g], []).append(g)
        val_groups = set()
        for stratum in by_label.values():
            val_groups.update(_held_out(stratum, sizes, val_fraction))
        if not val_groups:
            raise DataError(f"cannot hold out a validation set: each of the {len(by_label)} labels has a single group")
    else:
        _, held_out = split_documents([Document(g, "") for g in groups], val_fraction)
        val_groups = {d.name for d in held_out}
    return [e for e in examples if e.group not in val_groups], [e for e in examples if e.group in val_groups]


def _held_out(groups: list[str], sizes: Counter, val_fraction: float) -> list[str]:
    """Groups in name-hash order until they hold ``val_fraction`` of these groups' examples: at least one,
    never all (none of a single group)."""
    target = val_fraction * sum(sizes[g] for g in groups)
    chosen, held = [], 0
    for g in sorted(groups, key=_name_hash)[:-1]:
        if chosen and held >= target:
            break
        chosen.append(g)
        held += sizes[g]
    return chosen


def examples_hash(examples: list[Example]) -> str:
    """A sha256 hex digest of every example's group, source and target (see :func:`fastlm.data.strings_sha256`)."""
    return strings_sha256(part for e in examples for part in (e.group, e.source, e.target))


def label_names(examples: list[Example]) -> list[str]:
    """The distinct labels (classification targets), sorted."""
    return sorted({e.target for e in examples})
