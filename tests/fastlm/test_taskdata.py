"""Fine-tuning task data: the built-in stdlib tasks, the CSV/JSONL readers and their errors,
the group-keyed (optionally stratified) split and the examples hash."""

import collections
import json
import sysconfig
from pathlib import Path

import pytest

from fastlm import taskdata
from fastlm.data import _STDLIB_SKIP, DataError
from fastlm.taskdata import (CLASSIFY_PACKAGES, Example, examples_hash, label_names, load_classification,
                             load_seq2seq, read_classification, read_seq2seq, split_examples, stdlib_classification,
                             stdlib_seq2seq)

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def classification():
    return stdlib_classification()


@pytest.fixture(scope="module")
def seq2seq():
    return stdlib_seq2seq()


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_text(text, encoding=encoding)
    return path


# ----------------------------------------------------------------------------- built-in classification


def test_builtin_classification_labels_groups_and_windows(classification):
    present = [p for p in CLASSIFY_PACKAGES if (STDLIB / p).is_dir()]
    assert label_names(classification) == sorted(present) and len(present) >= 2
    counts = collections.Counter(e.target for e in classification)
    assert max(counts.values()) == 400  # the default per_label cap binds for the big packages ...
    assert all(n >= 20 for n in counts.values())  # ... and even the smallest gives a usable class
    for e in classification:
        assert e.group.startswith(e.target + "/") and e.group.endswith(".py")
        assert not set(Path(e.group).parts) & _STDLIB_SKIP
        assert len(e.source) <= 400
        assert sum(1 for line in e.source.splitlines() if line.strip()) >= taskdata.MIN_WINDOW_LINES
        assert e.source in (STDLIB / e.group).read_text(encoding="utf-8")  # whole consecutive lines of the file


def test_per_label_cap_spreads_over_files():
    examples = stdlib_classification(window_chars=200, per_label=7)
    counts = collections.Counter(e.target for e in examples)
    assert set(counts.values()) == {7}
    asyncio_files = {e.group for e in examples if e.target == "asyncio"}
    assert len(asyncio_files) >= 5  # every k-th window, not the first 7 of one file
    assert all(len(e.source) <= 200 for e in examples)
    assert examples == stdlib_classification(window_chars=200, per_label=7)  # deterministic


def test_windows_are_whole_lines_within_the_limit():
    lines = [f"x{i} = {i}\n" for i in range(10)]  # 7 characters each
    text = "".join(lines[:4]) + "y" * 50 + "\n" + "".join(lines[4:]) + "\n\n\n"
    windows = taskdata._windows(text, 21)
    # 3 lines fill 21 characters; the long line ends a run and is dropped; the short run (1 line) is dropped.
    assert windows == ["".join(lines[0:3]), "".join(lines[4:7]), "".join(lines[7:10])]
    assert taskdata._windows("\n".join(["a"] * 10), 3) == []  # "a\na\n" holds two lines: too few


def test_missing_package_warns_and_too_few_packages_raise(monkeypatch):
    monkeypatch.setattr(taskdata, "CLASSIFY_PACKAGES", ("json", "no_such_package", "http"))
    with pytest.warns(UserWarning, match="no_such_package"):
        examples = stdlib_classification(per_label=3)
    assert label_names(examples) == ["http", "json"]
    monkeypatch.setattr(taskdata, "CLASSIFY_PACKAGES", ("json", "no_such_package"))
    with pytest.warns(UserWarning), pytest.raises(DataError, match="at least two"):
        stdlib_classification()


def test_load_classification_dispatches(classification, tmp_path):
    assert examples_hash(load_classification(None)) == examples_hash(classification)
    path = _write(tmp_path / "d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    assert load_classification(str(path)) == read_classification(path)


def test_stratified_split_of_builtin_task(classification):
    train, val = split_examples(classification, 0.2, stratify=True)
    train_groups, val_groups = {e.group for e in train}, {e.group for e in val}
    assert not train_groups & val_groups
    assert len(train) + len(val) == len(classification)
    files_per_label = collections.defaultdict(set)
    for e in classification:
        files_per_label[e.target].add(e.group)
    for label, files in files_per_label.items():
        if len(files) >= 2:
            assert any(e.target == label for e in val), label
            assert any(e.target == label for e in train), label
    assert [e for e in classification if e.group in train_groups] == train  # original order kept
    # Every label holds out about the same share of its windows, however they spread over files.
    for label in files_per_label:
        share = sum(e.target == label for e in val) / sum(e.target == label for e in classification)
        assert 0.15 <= share <= 0.45, (label, share)


def test_stratified_split_of_rows_holds_out_the_fraction_of_each_label():
    examples = [Example(f"row {i}", f"text {i}", "rare" if i % 10 == 0 else "common") for i in range(200)]
    train, val = split_examples(examples, 0.25, stratify=True)
    assert sum(e.target == "rare" for e in val) == 5 and sum(e.target == "common" for e in val) == 45


# ----------------------------------------------------------------------------- built-in seq2seq


def test_seq2seq_json_dumps(seq2seq):
    import json as json_module

    [dumps] = [e for e in seq2seq if e.group == "json/__init__.py" and e.source.startswith("def dumps(")]
    first_line = next(line.strip() for line in json_module.dumps.__doc__.splitlines() if line.strip())
    assert dumps.target == first_line
    assert '"""' not in dumps.source and first_line not in dumps.source
    assert "return _default_encoder.encode(obj)" in dumps.source  # the body is kept ...
    assert dumps.source.rstrip().endswith("**kw).encode(obj)")  # ... to its last line


def test_seq2seq_builtin_examples(seq2seq):
    assert len(seq2seq) > 2000
    for e in seq2seq[::10]:
        assert e.source.startswith(("def ", "async def ")), e.source[:80]
        assert len(e.source) <= 2000
        assert e.target and e.target == e.target.strip() and "\n" not in e.target
        assert not set(Path(e.group).parts) & _STDLIB_SKIP
    methods = [e for e in seq2seq if e.source.startswith("def ") and "(self" in e.source.split("\n")[0]]
    assert methods  # methods are dedented to column 0 and included
    assert any(e.source.startswith("async def ") for e in seq2seq)


def test_docstring_examples_rules():
    code = '''
class A:
    @property
    def method(self):
        """Return one.

        More detail that is not the target.
        """
        # a comment that stays
        return 1

    def placeholder(self):
        """Only a placeholder."""
        ...

    async def run(self):
        """Run it."""  # trailing comment
        await self.go()


def undocumented():
    return 2


def one_line(): "Shares the def line."; return 3


def shares_line():
    "Shares a line with code."; return 4


def abstract():
    """Nothing but pass."""
    pass


def long():
    """Too long."""
    x = "{}"
'''.format("y" * 200)
    examples = taskdata._docstring_examples(code, "m.py", max_source_chars=100)
    assert examples == [
        Example("m.py", "def method(self):\n    # a comment that stays\n    return 1", "Return one."),
        Example("m.py", "async def run(self):\n    await self.go()", "Run it."),
    ]
    assert taskdata._docstring_examples("def broken(:\n", "x.py", 100) == []


# ----------------------------------------------------------------------------- readers


def test_read_classification_csv(tmp_path):
    path = _write(tmp_path / "d.csv", 'id,label,text\n1, spam ,"buy now, cheap"\n2,ham,"see you\nat noon"\n\n'
                  '3,spam,"say ""hi"""\n', encoding="utf-8-sig")  # BOM, extra column, quoted comma/newline/quote
    examples = read_classification(path)
    assert examples == [Example("row 0", "buy now, cheap", "spam"), Example("row 1", "see you\nat noon", "ham"),
                        Example("row 2", 'say "hi"', "spam")]
    assert label_names(examples) == ["ham", "spam"]


def test_blank_cells_past_the_header_are_allowed(tmp_path):
    """A spreadsheet's export may end rows in empty cells: those are no sign of a shifted row."""
    path = _write(tmp_path / "d.csv", "text,label\nbuy now,spam,\nsee you, ham , ,\n")
    assert [(e.source, e.target) for e in read_classification(path)] == [("buy now", "spam"), ("see you", "ham")]


def test_read_classification_jsonl(tmp_path):
    rows = [{"text": "a b", "label": 1, "extra": [1]}, {"text": "c", "label": 0}, {"text": "d", "label": True}]
    path = _write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_classification(path) == [Example("row 0", "a b", "1"), Example("row 1", "c", "0"),
                                         Example("row 2", "d", "True")]


def test_read_seq2seq_jsonl_and_csv(tmp_path):
    jsonl = _write(tmp_path / "d.jsonl", '{"source": "2+2", "target": "4"}\n\n{"target": "x", "source": " y "}\n')
    assert read_seq2seq(jsonl) == [Example("row 0", "2+2", "4"), Example("row 1", " y ", "x")]
    csv_path = _write(tmp_path / "d.csv", "source,target\n2+2,4\n")
    assert load_seq2seq(str(csv_path)) == [Example("row 0", "2+2", "4")]


def test_load_seq2seq_without_data_is_the_builtin_task(monkeypatch):
    builtin = [Example("m.py", "def f(): return 1", "One.")]
    monkeypatch.setattr(taskdata, "stdlib_seq2seq", lambda: builtin)
    assert load_seq2seq(None) is builtin


@pytest.mark.parametrize("name, content, match", [
    ("missing.csv", None, "does not exist"),
    ("d.txt", "text,label\n", r"expected a \.csv or \.jsonl file, got suffix '\.txt'"),
    ("d.csv", "", "is empty; expected a header row with columns text, label"),
    ("d.csv", "text,label\n", "holds no rows"),
    ("d.jsonl", "\n\n", "holds no rows"),
    ("d.csv", "text,category\na,b\n", r"the header has no 'label' column; found columns \['text', 'category'\]"),
    ("d.csv", "body,category\na,b\n", r"no 'text' or 'label' column; found columns \['body', 'category'\]"),
    ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": \n', "line 2: not valid JSON"),
    ("d.jsonl", '["a", "x"]\n', "line 1: expected a JSON object with keys text, label, got list"),
    ("d.jsonl", '{"text": "a", "label": "x"}\n\n{"text": "b"}\n', r"line 3: no 'label' key; found keys \['text'\]"),
    ("d.jsonl", '{"text": "a", "label": null}\n', "line 1: 'label' must be a string, number or boolean, got null"),
    ("d.csv", "text,label\na,x\n  ,y\n", "line 3: empty 'text'"),
    ("d.csv", "text,label\na,x\nb\n", "line 3: empty 'label'"),
    ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": " "}\n', "line 2: empty 'label'"),
    ("d.csv", "text,label\na,x\nb, x\n", r"a classifier needs at least two classes, found 1: \['x'\]"),
    # A comma in an unquoted text shifts its row's cells: the label read would be a piece of the text.
    ("d.csv", "text,label\nbuy now,x\nsee you, at noon,y\n",
     r"line 3: 3 cells, but the header names 2 columns \(a comma inside an unquoted cell\? quote it\)"),
])
def test_read_classification_errors(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=match) as error:
        read_classification(path)
    assert str(path) in str(error.value)
    assert isinstance(error.value, ValueError)


@pytest.mark.parametrize("content, match", [
    ('{"source": "a"}\n', r"line 1: no 'target' key"),
    ('{"source": "a", "target": "b"}\n{"source": "", "target": "b"}\n', "line 2: empty 'source'"),
    ("", "holds no rows"),
])
def test_read_seq2seq_errors(tmp_path, content, match):
    with pytest.raises(DataError, match=match):
        read_seq2seq(_write(tmp_path / "d.jsonl", content))


# ----------------------------------------------------------------------------- split and hash


def _rows(labels: str) -> list[Example]:
    return [Example(f"row {i}", f"text {i}", label) for i, label in enumerate(labels)]


def test_split_keeps_groups_whole_and_is_deterministic():
    examples = [Example(f"file{i % 13}", f"window {i}", "ab"[i % 13 % 2]) for i in range(200)]
    for stratify in (False, True):
        train, val = split_examples(examples, 0.3, stratify=stratify)
        assert train and val and not {e.group for e in train} & {e.group for e in val}
        assert sorted(train + val, key=examples.index) == examples
        assert split_examples(list(examples), 0.3, stratify=stratify) == (train, val)
    train, val = split_examples(examples, 0.3, stratify=True)
    assert {e.target for e in val} == {"a", "b"}


def test_split_holds_out_at_least_one_group_each_side():
    examples = _rows("ab" * 10)
    for fraction in (0.0, 1.0):
        train, val = split_examples(examples, fraction, stratify=True)
        assert {e.target for e in train} == {e.target for e in val} == {"a", "b"}
        train, val = split_examples(examples, fraction, stratify=False)
        assert train and val


def test_split_stratified_single_group_label_stays_in_train():
    examples = _rows("aaaaab")
    train, val = split_examples(examples, 0.5, stratify=True)
    assert [e.target for e in val] and set(e.target for e in val) == {"a"}
    assert any(e.target == "b" for e in train)


def test_split_errors():
    with pytest.raises(DataError, match="from 1 group"):
        split_examples([Example("f", "a", "x"), Example("f", "b", "y")], 0.1, stratify=False)
    with pytest.raises(DataError, match="each of the 2 labels has a single group"):
        split_examples(_rows("ab"), 0.1, stratify=True)


def test_examples_hash():
    examples = _rows("abab")
    assert examples_hash(examples) == examples_hash(_rows("abab"))
    assert examples_hash(examples) != examples_hash(examples[::-1])
    changed = [Example(e.group, e.source, e.target) for e in examples]
    changed[2].target = "c"
    assert examples_hash(changed) != examples_hash(examples)
    # length prefixes: moving a character across a field boundary changes the hash
    assert examples_hash([Example("g", "ab", "c")]) != examples_hash([Example("g", "a", "bc")])


def test_files_with_long_cells_a_bom_or_another_encoding(tmp_path):
    long_text = "word " * 60_000  # 300 KB in one cell: past the csv module's default field limit
    path = tmp_path / "long.csv"
    path.write_text(f"text,label\n\"{long_text}\",a\nshort,b\n")
    assert read_classification(path)[0].source == long_text
    bom = tmp_path / "bom.jsonl"
    bom.write_text('\ufeff{"text": "x", "label": "a"}\n{"text": "y", "label": "b"}\n', encoding="utf-8")
    assert [e.target for e in read_classification(bom)] == ["a", "b"]
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ncaf\u00e9,a\nthe,b\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.csv is not UTF-8 text: byte 0xe9"):
        read_classification(latin)


def test_a_folder_a_binary_or_an_unreadable_data_file_is_named(tmp_path, lock_file):
    folder = tmp_path / "texts"
    folder.mkdir()
    with pytest.raises(DataError, match=rf"data path {folder} is a folder; this task reads one \.csv or \.jsonl "
                                        r"file with columns text, label"):
        read_classification(folder)
    with pytest.raises(DataError, match=r"columns source, target"):
        read_seq2seq(folder)
    binary = tmp_path / "b.csv"
    binary.write_bytes(b"text,label\nab\x00cd,x\nef,y\n")
    with pytest.raises(DataError, match=rf"data file {binary} is a binary file \(it has NUL bytes\)"):
        read_classification(binary)
    locked = _write(tmp_path / "locked.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    lock_file(locked)
    with pytest.raises(DataError, match=rf"cannot read {locked}: Permission denied"):
        read_classification(locked)


def test_undecodable_data_file_error_counts_the_bytes(tmp_path):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"text": "caf\u00e9 \u00e0 la cr\u00e8me", "label": "a"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.jsonl is not UTF-8 text: byte 0xe9 at offset 13 cannot be decoded "
                                        r"\(3 undecodable bytes in all\)"):
        read_classification(latin)
    # Past the decoder's first read (8 KiB), the offset still counts from the start of the file.
    big = tmp_path / "big.csv"
    head = b"text,label\n" + b"a,b\n" * 5000 + b"caf"
    big.write_bytes(head + b"\xe9,c\n")
    with pytest.raises(DataError, match=rf"byte 0xe9 at offset {len(head)} cannot be decoded \(1 undecodable byte"):
        read_classification(big)
