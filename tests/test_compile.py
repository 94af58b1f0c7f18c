"""Shipped Triton kernel configurations compile for sm_90 and sm_80 without spills.

Runs ``python -m bench.compile --quick`` in a subprocess (the kernels must be
decorated without the interpreter that conftest.py turns on for the other
tests): every bf16 configuration, attention at head dims 64 and 128. The full
sweep, every dtype and head dim, is ``python -m bench.compile`` (about 15 CPU
minutes).
"""

import json
import os
import subprocess
import sys

import pytest

from bench import compile as compile_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_every_kernel_config_compiles_without_spills(tmp_path):
    out = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.compile", "--quick", "--quiet", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    kernels_seen = {r["kernel"] for r in rows}
    assert {"_norm_fwd_kernel", "_norm_bwd_kernel", "_column_sum_kernel", "_ce_fwd_kernel",
            "_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"} <= kernels_seen
    assert {r["target"] for r in rows} == {"sm_90", "sm_80"}
    # Hopper attention must use warpgroup MMA at the head dims models use.
    hopper_attn = [r for r in rows if r["kernel"] == "_attn_fwd_kernel" and r["target"] == "sm_90"]
    assert hopper_attn and all(r["tensor_cores"] == "HGMMA" for r in hopper_attn)


def test_failures_flags_errors_and_hot_spills_only():
    rows = [
        {"kernel": "a", "config": "c", "target": "sm_90", "hot": True, "regs": 40, "spill_bytes": 0},
        {"kernel": "b", "config": "c", "target": "sm_90", "hot": True, "regs": 255, "spill_bytes": 16},
        {"kernel": "c", "config": "c", "target": "sm_90", "hot": False, "regs": 255, "spill_bytes": 16},
        {"kernel": "d", "config": "c", "target": "sm_80", "hot": True, "error": "CompilationError: x"},
    ]
    bad = compile_check.failures(rows)
    assert len(bad) == 2 and "b c sm_90: spills 16" in bad[0] and "does not compile" in bad[1]
