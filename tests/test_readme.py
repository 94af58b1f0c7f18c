"""The README's kernel figures are the code's: register-row limits, the numeric rule, what gpu_check.sh runs."""

import importlib
import os
import re

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
