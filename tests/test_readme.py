"""The README is true: its kernel figures are the code's (register-row limits, the numeric rule, what
gpu_check.sh runs); every command it gives parses with the real parsers (subcommands, flags, config fields,
modules, make targets); every file, flag and dotted name it mentions exists; every figure names its command."""

import argparse
import contextlib
import importlib
import importlib.util
import io
import os
import re
import shlex

import pytest

from helpers import ROOT
from kernels import numerics

norm = importlib.import_module("kernels.norm")
cross_entropy = importlib.import_module("kernels.cross_entropy")


@pytest.fixture(scope="module")
def readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def _flat(text):
    return " ".join(text.split())  # one line: a figure may sit across a line break


def _numbers(pattern, text):
    match = re.search(pattern, _flat(text))
    assert match, f"README no longer says {pattern!r}"
    return [int(g.replace(",", "")) for g in match.groups()]


def test_norm_register_rows(readme):
    fwd, bwd, bwd_fp32 = _numbers(r"up to ([\d,]+) features stays in registers in the forward, "
                                  r"up to ([\d,]+) in the backward, ([\d,]+) in fp32", readme)
    assert (fwd, bwd, bwd_fp32) == (norm._FWD["one_pass_max"], norm._BWD["one_pass_max"],
                                    norm._BWD_FP32["one_pass_max"])


def test_cross_entropy_one_pass_limit(readme):
    (one_pass,) = _numbers(r"rows of up to ([\d,]+) classes are read once", readme)
    (block,) = _numbers(r"swept in blocks of ([\d,]+) classes", readme)
    assert (one_pass, block) == (cross_entropy._ONE_PASS_MAX, cross_entropy._LOOP_BLOCK_C)


def test_numeric_rule(readme):
    plain, attention_grads = _numbers(r"at most (\d+)x the error of the same-dtype PyTorch computation, "
                                      r"(\d+)x for attention's gradients", readme)
    assert numerics.factor("attention", gradient=True) == attention_grads
    assert {f for op, fs in numerics.FACTORS.items() for f in (fs if op != "attention" else fs[:1])} == {plain}


def test_gpu_check_steps(readme):
    """Every step of bench/gpu_check.sh is named in the README's row, and the time it quotes bounds their limits."""
    with open(os.path.join(ROOT, "bench", "gpu_check.sh"), encoding="utf-8") as f:
        steps = [line.split()[2:] for line in f if line.startswith("step ")]
    assert steps
    row = next(line for line in readme.splitlines() if line.startswith("| `bash bench/gpu_check.sh"))
    (minutes,) = _numbers(r"within (\d+) minutes", row)
    assert sum(int(limit) for limit, *_ in steps) <= minutes * 60
    quiet = {"-q", "-x", "--no-header", "-p", "no:cacheprovider"}
    for _, python, dash_m, *args in steps:
        assert (python, dash_m) == ("python", "-m")
        command = " ".join(a for a in args if a not in quiet)
        assert f"`{command}`" in row, f"gpu_check.sh runs {command!r}; the README's row does not say so"


# ---------------------------------------------------------------- every command, flag and file the README names

def _code(readme):
    """The README's code, as (text, inline): each line of a shell block or an indented block (continuation lines
    joined), and each inline code span of the prose. Python blocks are code to read, not commands to run."""
    pieces, prose, fence, block = [], [], None, []
    for line in readme.splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
            continue
        if fence is not None:
            if fence != "python":
                block.append(line)
        elif line.startswith("    ") and (not prose or not prose[-1].strip() or prose[-1].startswith("    ")):
            block.append(line)  # an indented code block: after a blank line or another code line
            prose.append(line)
        else:
            prose.append(line)
    for line in "\n".join(block).replace("\\\n", " ").splitlines():
        pieces.append((line, False))
    prose_text = "\n".join(line for line in prose if not line.startswith("    "))
    pieces += [(span, True) for span in re.findall(r"`([^`]+)`", " ".join(prose_text.split()))]
    return pieces


def _commands(readme):
    """Every command line the README gives: (program, arguments), program one of fastlm, a ``python -m`` module,
    make, bash, pytest; ``...`` (an elision) dropped, a ``#`` comment cut off."""
    found = []
    for text, _ in _code(readme):
        try:
            words = [w for w in shlex.split(text, comments=True) if w != "..."]
        except ValueError:  # an unbalanced quote: prose, not a command
            continue
        if words[:1] == ["torchrun"] and "-m" in words:
            words = ["python", *words[words.index("-m"):]]
        if words[:1] in (["python"], ["python3"], [".venv/bin/python"]) and words[1:2] == ["-m"] and len(words) > 2:
            found.append((words[2], words[3:]))
        elif words[:1] in (["fastlm"], [".venv/bin/fastlm"]) and len(words) > 1:
            found.append(("fastlm", words[1:]))
        elif words[:1] in (["make"], ["bash"], ["pytest"]):
            found.append((words[0], words[1:]))
    return found


def _subparsers():
    from fastlm.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return parser, sub.choices


def _check_fastlm(argv):
    """``fastlm ARGV`` parses: a subcommand that exists, only its flags (a train command's other ``--NAME``
    flags and ``--set NAME=VALUE`` are config fields, with values of the field's type)."""
    from fastlm.cli import _parse_overrides
    from fastlm.config import preset

    parser, commands = _subparsers()
    assert argv[0] in commands, f"README: `fastlm {' '.join(argv)}`: no subcommand {argv[0]!r}"
    options = {s for a in commands[argv[0]]._actions for s in a.option_strings}
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args, rest = parser.parse_known_args(argv)
    except SystemExit:  # a required flag left out (`fastlm sample`) is fine in prose; anything else is not
        assert "are required" in err.getvalue(), f"README: `fastlm {' '.join(argv)}`: {err.getvalue()}"
        return
    if argv[0] in ("train", "train-classifier"):
        _parse_overrides(preset("tiny"), args.set, rest)  # an unknown field or a mistyped value raises
    else:
        assert not rest, f"README: `fastlm {' '.join(argv)}`: unknown arguments {rest}"
    for word in argv:
        name = word.split("=")[0]
        if name.startswith("--") and name not in options:
            assert argv[0] in ("train", "train-classifier"), f"README: `fastlm {' '.join(argv)}`: no flag {name}"


def _module_flags(module):
    """The ``--flags`` a ``python -m`` module of this repository defines (its argparse option strings)."""
    source = (ROOT / (module.replace(".", "/") + ".py")).read_text()
    return set(re.findall(r"""["'](--[\w-]+)["']""", source))


def _is_module(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent that is a module, not a package: fastlm.model.GPT
        return False


def _makefile_targets():
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))


def test_readme_commands_run_as_written(readme):
    """Every command the README gives names a subcommand, flags, config fields, modules, make targets and
    files that exist; flags of the repository's own modules are flags they define."""
    commands = _commands(readme)
    programs = {program for program, _ in commands}
    assert {"fastlm", "make", "bench.compile", "kernels.selfcheck"} <= programs, programs  # the extraction works
    for program, args in commands:
        shown = f"README: `{program} {' '.join(args)}`"
        if program == "fastlm":
            if args:  # `python -m fastlm ...`: the elision
                _check_fastlm(args)
        elif program == "make":
            assert set(args) <= _makefile_targets(), f"{shown}: no such Makefile target"
        elif program == "bash":
            assert (ROOT / args[0]).is_file(), f"{shown}: no file {args[0]}"
        elif program == "pytest":
            for path in (a for a in args if a.split("/")[0] in ("tests", "bench")):
                assert (ROOT / path).exists(), f"{shown}: no file {path}"
            if "-m" in args:
                marker = args[args.index("-m") + 1]
                assert f'"{marker}:' in (ROOT / "pyproject.toml").read_text(), f"{shown}: no marker {marker}"
        else:
            assert importlib.util.find_spec(program) is not None, f"{shown}: no module {program}"
            if program.split(".")[0] in ("bench", "kernels"):
                flags = {a.split("=")[0] for a in args if a.startswith("--")}
                assert flags <= _module_flags(program), f"{shown}: no flag {flags - _module_flags(program)}"


def test_readme_names_files_flags_and_objects_that_exist(readme):
    """Each repository path in backticks or in the layout exists; each lone ``--flag`` is a flag of fastlm, a
    config field or a flag of one of the repository's modules; each dotted ``fastlm.``/``kernels.`` name resolves;
    each ``bench.X``/``kernels.selfcheck`` span with flags names flags the module defines."""
    from fastlm.config import ConfigError, preset

    _, commands = _subparsers()
    options = {s for parser in commands.values() for a in parser._actions for s in a.option_strings}
    module_flags = set().union(*(_module_flags(m) for m in ("bench.attention", "bench.compile", "bench.cross_entropy",
                                                            "bench.norm", "bench.train")))
    cfg = preset("tiny")
    top = {p.name for p in ROOT.iterdir() if p.is_dir()} - {".git", ".venv", "runs"}
    layout = re.search(r"## Layout\s*```(.*?)```", readme, flags=re.S).group(1)
    spans = [span for span, inline in _code(readme) if inline] + [line.split()[0] for line in layout.splitlines()
                                                                  if line.strip() and not line.startswith(" ")]
    checked = set()
    for span in spans:
        word = span.split()[0].rstrip(",.:;")
        if "/" in word and word.split("/")[0] in top and not any(c in word for c in "*<>{}"):
            assert (ROOT / word).exists(), f"README names {word}, which does not exist"
            checked.add("path")
        elif re.fullmatch(r"--[\w-]+( \S+)?", span):  # a flag, perhaps with a value
            flag, *value = span.split()
            if flag == "--set":
                cfg.set(*value[0].split("=", 1))  # a config field, and a value of its type
            elif flag not in options and flag not in module_flags:
                try:
                    cfg.section_of(flag[2:].replace("-", "_"))
                except ConfigError:
                    raise AssertionError(f"README names the flag {flag}, which nothing defines") from None
            checked.add("flag")
        elif re.fullmatch(r"(fastlm|kernels)(\.\w+)+(\(.*\))?", span):
            parts = span.split("(")[0].split(".")
            for n in range(len(parts), 0, -1):  # the longest importable module, then attributes
                if _is_module(".".join(parts[:n])):
                    obj = importlib.import_module(".".join(parts[:n]))
                    for attr in parts[n:]:
                        assert hasattr(obj, attr), f"README names {span}: {obj.__name__} has no {attr}"
                        obj = getattr(obj, attr)
                    break
            checked.add("name")
        elif re.fullmatch(r"(bench\.\w+|kernels\.selfcheck) .*", span):
            module, *args = span.split()
            flags = {a for a in args if a.startswith("--")}
            assert flags <= _module_flags(module), f"README: `{span}`: no flag {flags - _module_flags(module)}"
            checked.add("module")
    assert checked == {"path", "flag", "name", "module"}, checked  # the extraction works


def test_readme_figures_state_their_command(readme):
    """Every paragraph or bullet that quotes a figure (seconds, minutes, tokens/s, memory, a ratio, accuracy, BLEU,
    a loss) names the command that measures it: in backticks a ``fastlm``, ``python -m``, ``make`` or ``pytest``
    command or a test file, or, for a paragraph ending in a colon, in the indented command block after it."""
    figure = re.compile(r"\d[\d,.]*\s*(s|min|minutes|tokens/s|MiB|GiB|x)\b|\b(accuracy|BLEU|loss|perplexity) \**\d")
    command = re.compile(r"`(fastlm |python -m |make |pytest |tests/)[^`]*`|^    (torchrun|fastlm|python) ", re.M)
    prose = re.sub(r"```.*?```", "", readme, flags=re.S)
    blocks = re.split(r"\n\s*\n|\n(?=- )", prose)  # paragraphs, and each bullet on its own
    quoting = 0
    for block, following in zip(blocks, blocks[1:] + [""]):
        if figure.search(block):
            quoting += 1
            measured_by = block + ("\n" + following if block.rstrip().endswith(":") else "")
            assert command.search(measured_by), f"README quotes a figure without its command:\n{block.strip()}"
    assert quoting >= 6  # the extraction works
