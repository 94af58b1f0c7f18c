"""Shipped Triton kernel configurations compile for sm_90 and sm_80 without spills.

Runs ``python -m bench.compile --quick`` in a subprocess (the kernels must be
decorated without the interpreter that conftest.py turns on for the other
tests): every bf16 configuration, attention at head dims 64 and 128. The full
sweep, every dtype and head dim, is ``python -m bench.compile`` (about 15 CPU
minutes).
"""

import importlib
import itertools
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from bench import compile as compile_check
from helpers import ROOT


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
            "_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dq_tma_kernel",
            "_rope_kernel", "_glu_fwd_kernel",
            "_glu_bwd_kernel"} <= kernels_seen
    assert {r["target"] for r in rows} == {"sm_90", "sm_80"}
    # Hopper attention must use warpgroup MMA at the head dims models use.
    hopper_attn = [r for r in rows if r["kernel"] == "_attn_fwd_kernel" and r["target"] == "sm_90"]
    assert hopper_attn and all(r["tensor_cores"] == "HGMMA" for r in hopper_attn)


def _compile_rows(tmp_path, targets: str, only: str) -> list[dict]:
    out = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.compile", "--quiet", "--targets", targets, "--json", str(out), "--only", only],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]  # no failure, no hot spill
    return json.loads(out.read_text())["rows"]


def test_ampere_attention_forward_at_head_dim_32_does_not_spill(tmp_path):
    # Its 4-warp, 3-stage tile hit sm_80's 128-register cap and spilled 8 bytes (causal).
    rows = _compile_rows(tmp_path, "80", "fwd D=32 causal torch.bfloat16[")
    assert rows and all(r["spill_bytes"] == 0 for r in rows)


@pytest.mark.slow
def test_attention_features_compile_without_spills(tmp_path):
    # Packed, window, softcap and sinks all on (the most registers any call takes), head dim 128:
    # the candidates gpu_configs(features=True) gives, for both families.
    rows = _compile_rows(tmp_path, "90,80", "D=128 causal torch.bfloat16 +features")
    assert {r["kernel"] for r in rows} >= {"_attn_fwd_kernel", "_attn_fwd_tma_kernel", "_attn_bwd_dkdv_kernel",
                                          "_attn_bwd_dq_kernel", "_attn_bwd_dq_tma_kernel"}


def test_hopper_attention_feeds_the_tensor_cores(tmp_path):
    # Only the configurations asserted on: the bf16 TMA forward and TMA dQ at head dims 64/128
    # and dK/dV at 128, for sm_90 (a few dozen compiles; Triton's cache makes reruns quick).
    out = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.compile", "--quick", "--quiet", "--targets", "90", "--json", str(out),
         "--only", "_attn_fwd_tma_kernel|_attn_bwd_dq_tma_kernel|dkdv D=128 "],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]  # no failure, no hot spill
    rows = json.loads(out.read_text())["rows"]
    fwd = [r for r in rows if r["kernel"] == "_attn_fwd_tma_kernel"]
    dq = [r for r in rows if r["kernel"] == "_attn_bwd_dq_tma_kernel"]
    dkdv = [r for r in rows if r["kernel"] == "_attn_bwd_dkdv_kernel"]
    for tma in (fwd, dq):
        assert {"D=64 ", "D=128 "} <= {d for r in tma for d in ("D=64 ", "D=128 ") if d in r["config"]}
    assert dkdv and any("BLOCK_M=128" in r["config"] for r in dq)
    for r in fwd + dq:  # q, k, v (and dO) in by TMA, o (dQ) out by TMA, onto warpgroup MMA, no spill
        assert r["sass"]["utmaldg"] > 0 and r["sass"]["utmastg"] > 0 and r["sass"]["ldgsts"] == 0, r["config"]
        assert r["sass"]["hgmma"] and r["spill_bytes"] == 0, r["config"]
    if importlib.import_module("kernels.attention").HAS_WARP_SPECIALIZE:
        for d in ("D=64 ", "D=128 "):
            # 128 query rows, 4 warps: a TMA producer warpgroup that gives up registers and two
            # consumer warpgroups (64 rows each) that raise theirs.
            specialized = [r for r in fwd if d in r["config"] and "BLOCK_M=128," in r["config"]
                           and "WARP_SPECIALIZE=True] w4 " in r["config"]]
            assert specialized, d
            for r in specialized:
                regs = r["sass"]["setmaxnreg"]
                assert r["sass"]["warp_specialized"] and min(regs) < 128 < max(regs), r
    for r in dkdv:  # no 64x16 (or narrower) wgmma: bound by shared-memory bandwidth
        assert r["sass"]["hgmma"] and not any(s.startswith(("64x8x", "64x16x")) for s in r["sass"]["hgmma"]), r


@pytest.mark.slow
def test_hopper_attention_dkdv_at_head_dim_256_runs_wgmma(tmp_path):
    # Head dim 256 dK/dV compiled to mma.sync (HMMA) while its wgmma tile spilled; plain and
    # every-feature candidates alike must now issue HGMMA, spill-free (_compile_rows checks).
    rows = _compile_rows(tmp_path, "90", "dkdv D=256 full torch.bfloat16|dkdv D=256 causal torch.bfloat16")
    assert all(any(w in r["config"] for r in rows) for w in (" full ", " causal ", "+features"))
    attention = importlib.import_module("kernels.attention")
    if ("sm90", "dkdv", 256, False) in attention._RELEASE_CONFIGS_16BIT.get(attention.TRITON_RELEASE, {}):
        # Triton 3.9 spills every wgmma tile there: its own table keeps mma.sync, spill-free.
        assert all(r["tensor_cores"] == "HMMA" for r in rows), [r["config"] for r in rows]
        return
    for r in rows:
        assert r["tensor_cores"] == "HGMMA" and r["sass"]["hmma"] == 0, r["config"]
    # 32 queries per step (64x16 wgmma for the score tiles) is among the plain candidates.
    assert any("64x16x16ss" in r["sass"]["hgmma"] for r in rows if "+features" not in r["config"])


def test_sass_facts_reads_tma_wgmma_and_the_main_loop():
    sass = """
        /*0100*/                   UTMALDG.4D [UR8], [UR4] ;
        /*0110*/                   USETMAXREG.DEALLOC.CTAPOOL.sync.aligned 0x28 ;
        /*0200*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR12], RZ, !UPT ;
        /*0210*/                   HGMMA.64x128x16.F32.BF16 R88, R152, gdesc[UR8], R88, gsb0 ;
        /*0220*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0230*/                   MUFU.EX2 R1, R1 ;
        /*0240*/              @!P2 BRA 0x200 ;
        /*0250*/                   MUFU.EX2 R2, R2 ;
        /*0260*/                   UTMASTG.4D [UR4], [UR8] ;
        /*0270*/                   EXIT ;
    """
    f = compile_check.sass_facts(sass, "ttg.warp_specialize")
    assert (f["utmaldg"], f["utmastg"], f["ldgsts"]) == (1, 1, 0)
    assert f["hgmma"] == {"64x64x16ss": 1, "64x128x16rs": 1} and f["wgmma_waits"] == [1]
    assert f["warp_specialized"] and f["setmaxnreg"] == [0x28]
    assert (f["main_loop_instructions"], f["main_loop_hgmma"], f["main_loop_ex2"]) == (5, 2, 1)


def test_sass_facts_reads_setmaxnreg_both_ways():
    # Warp-specialized kernels lower the producer's registers (DEALLOC) and raise the
    # consumers' (TRY_ALLOC, with a predicate operand): both counts are the rebalancing.
    sass = """
        /*0080*/                   USETMAXREG.TRY_ALLOC.CTAPOOL UP0, 0xe8 ;
        /*0fb0*/                   USETMAXREG.DEALLOC.CTAPOOL 0x28 ;
    """
    assert compile_check.sass_facts(sass)["setmaxnreg"] == [0x28, 0xe8]


def test_sass_facts_main_loop_is_innermost():
    # A warp-specialized kernel has one key loop per consumer warpgroup, both inside branches
    # back to the kernel's start: the main loop is a consumer's loop, not what encloses both.
    sass = """
        /*0100*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR12], RZ, !UPT ;
        /*0110*/                   MUFU.EX2 R1, R1 ;
        /*0120*/              @!P2 BRA 0x100 ;
        /*0130*/                   NOP ;
        /*0140*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR12], RZ, !UPT ;
        /*0150*/                   MUFU.EX2 R1, R1 ;
        /*0160*/                   FADD R2, R2, R2 ;
        /*0170*/              @!P2 BRA 0x140 ;
        /*0180*/              @!P3 BRA 0x100 ;
    """
    f = compile_check.sass_facts(sass)
    assert (f["main_loop_instructions"], f["main_loop_hgmma"], f["main_loop_ex2"]) == (3, 1, 1)


def test_failures_flags_errors_and_hot_spills_only():
    rows = [
        {"kernel": "a", "config": "c", "target": "sm_90", "hot": True, "regs": 40, "spill_bytes": 0},
        {"kernel": "b", "config": "c", "target": "sm_90", "hot": True, "regs": 255, "spill_bytes": 16},
        {"kernel": "c", "config": "c", "target": "sm_90", "hot": False, "regs": 255, "spill_bytes": 16},
        {"kernel": "d", "config": "c", "target": "sm_80", "hot": True, "error": "CompilationError: x"},
    ]
    bad = compile_check.failures(rows)
    assert len(bad) == 2 and "b c sm_90: spills 16" in bad[0] and "does not compile" in bad[1]


def test_failures_flags_shared_memory_over_the_targets_limit():
    # Triton's launcher raises OutOfResources for a block over the device's opt-in shared memory
    # (the autotuner then drops the candidate): 227 KB on sm_90, 163 KB on sm_80.
    rows = [
        {"kernel": "a", "config": "c", "target": "sm_90", "hot": True, "spill_bytes": 0, "shared_bytes": 232448},
        {"kernel": "b", "config": "c", "target": "sm_90", "hot": True, "spill_bytes": 0, "shared_bytes": 232449},
        {"kernel": "c", "config": "c", "target": "sm_80", "hot": True, "spill_bytes": 0, "shared_bytes": 166912},
        {"kernel": "d", "config": "c", "target": "sm_80", "hot": False, "spill_bytes": 0, "shared_bytes": 180000},
    ]
    bad = compile_check.failures(rows)
    assert len(bad) == 2, bad
    assert "b c sm_90: needs 232449 bytes of shared memory, over sm_90's 232448" in bad[0]
    assert "d c sm_80: needs 180000 bytes of shared memory, over sm_80's 166912" in bad[1]


def test_sass_facts_skips_the_tma_wait_retry_blocks():
    # Two key loops; each waits on an mbarrier whose retry block sits past EXIT and branches
    # back into the loop: those branches are no loop (else one "loop" spans both). The second
    # loop's mask block is branched over (interior tiles skip it): not counted as every tile's.
    sass = """
        /*0100*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR5+0x1c0e0], R4 ;
        /*0110*/              @!P0 BRA 0x400 ;
        /*0120*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR12], RZ, !UPT, gsb0 ;
        /*0130*/                   MUFU.EX2 R1, R1 ;
        /*0140*/              @!P2 BRA 0x100 ;
        /*0150*/                   ISETP.GE.AND P1, PT, R2, R3, PT ;
        /*0200*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR5+0x1c0e8], R4 ;
        /*0210*/              @!P0 BRA 0x430 ;
        /*0220*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR12], RZ, !UPT, gsb0 ;
        /*0230*/              @!P1 BRA 0x260 ;
        /*0240*/                   ISETP.GE.AND P1, PT, R2, R3, PT ;
        /*0250*/                   FSEL R1, R1, -INF , P1 ;
        /*0260*/                   FMNMX R1, R1, R5, !PT ;
        /*0270*/                   MUFU.EX2 R1, R1 ;
        /*0280*/              @!P2 BRA 0x200 ;
        /*0290*/                   EXIT ;
        /*0400*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR5+0x1c0e0], R4 ;
        /*0410*/              @!P0 BRA 0x400 ;
        /*0420*/                   BRA 0x120 ;
        /*0430*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR5+0x1c0e8], R4 ;
        /*0440*/              @!P0 BRA 0x430 ;
        /*0450*/                   BRA 0x220 ;
        /*0460*/                   BRA 0x460 ;
    """
    f = compile_check.sass_facts(sass)
    assert [(n["start"], n["instructions"], n["branched"], n["hgmma"], n["ex2"]) for n in f["loops"]] == [
        ("0x100", 5, 0, 1, 1), ("0x200", 9, 2, 1, 1)]
    assert (f["loops"][1]["isetp"], f["loops"][1]["sel"], f["loops"][1]["fmnmx"]) == (0, 0, 1)
    assert (f["main_loop_instructions"], f["main_loop_hgmma"], f["main_loop_ex2"]) == (5, 1, 1)


def test_warp_specialized_tma_forward_reports_each_key_loop(tmp_path):
    # The TMA forward at head dim 64, causal: each key loop the report finds issues one key
    # tile's wgmma (Q K^T: D/16, P V: BLOCK_N/16, per warpgroup), never the span of two loops
    # (a warp-specialized config runs one per consumer partition).
    rows = _compile_rows(tmp_path, "90", "fwd_tma D=64 causal torch.bfloat16[")
    assert rows
    for r in rows:
        block_n = int(re.search(r"BLOCK_N=(\d+)", r["config"]).group(1))
        loops = r["sass"]["loops"]
        assert loops and all(n["hgmma"] == (64 + block_n) // 16 for n in loops), (r["config"], loops)
        assert r["sass"]["main_loop_hgmma"] == (64 + block_n) // 16
        if "WARP_SPECIALIZE=True" in r["config"]:
            # Every tile is masked there: one select per score (a 64-row tile over one consumer
            # warpgroup of 128 threads) and a few for the softmax, not one per condition.
            scores = 64 * block_n // 128
            assert all(n["sel"] <= scores + 4 and n["isetp"] <= scores + 4 for n in loops), (r["config"], loops)


def test_feature_sweep_covers_the_two_key_loop_path():
    # Without a window the pointer forward and dQ run an unmasked and a masked key loop: the
    # sweep builds every feature candidate there too, with the heaviest such call (packed,
    # softcap, sinks), not only the window's single loop.
    attention = importlib.import_module("kernels.attention")
    specs = compile_check.collect_specs("+features")
    for kind in ("fwd", "dq"):
        kernel = attention._KERNELS[kind]
        for head_dim, causal, family in itertools.product((64, 128, 256), (False, True), ("sm90", "sm80")):
            built = {(s.constexprs["BLOCK_M"], s.constexprs["BLOCK_N"], s.num_warps, s.num_stages)
                     for s in specs if s.kernel is kernel and s.constexprs["HEAD_DIM"] == head_dim
                     and s.constexprs["CAUSAL"] == causal and "bfloat16" in s.label
                     and s.constexprs["WINDOW"] is False and s.constexprs["SOFTCAP"] and s.constexprs["HAS_SINKS"]
                     and s.constexprs["VARLEN"] and attention.GPU_FAMILIES[family] in s.extra["targets"]}
            candidates = attention.gpu_configs(kind, head_dim, torch.bfloat16, family, features=True)
            assert {(c.block_m, c.block_n, c.num_warps, c.num_stages) for c in candidates} <= built, (kind, head_dim)


def test_attention_forward_features_without_a_window_do_not_spill_at_head_dim_256(tmp_path):
    # Packed, softcap and sinks, causal, no window: the pointer forward's two key loops. Its
    # (64, 64, 8w, 2s) feature candidate spilled 8 bytes there on sm_90.
    rows = _compile_rows(tmp_path, "90", "fwd D=256 causal torch.bfloat16 +features no-window[")
    assert rows and all(r["spill_bytes"] == 0 for r in rows)


def test_gluon_attention_forward_overlaps_the_softmax_with_async_wgmma(tmp_path):
    # The experimental Gluon forward (kernels._attention_gluon) as designed, for sm_90: Q, K and V in
    # and O out by TMA, no cp.async; per key tile Q K^T from shared memory (D/16 wgmma) and P V with
    # P from registers (BLOCK_N/16); the wait that leaves one wgmma group in flight (the softmax
    # overlaps P V) beside the full waits; no spill. Unspecialized: 8 warps, two warpgroups of 64
    # rows in one key loop. Warp-specialized: a TMA producer that gives up registers, two consumer
    # partitions (a key loop each, one O store each) that raise theirs.
    gluon = importlib.import_module("kernels._attention_gluon")
    if not gluon.AVAILABLE:
        pytest.skip(gluon.UNAVAILABLE_REASON)
    rows = _compile_rows(tmp_path, "90", "fwd_gluon D=64 causal torch.bfloat16|fwd_gluon D=128 causal torch.bfloat16")
    assert len(rows) == len(gluon.CONFIGS[64]) + len(gluon.CONFIGS[128])
    assert {"WARP_SPECIALIZE=True" in r["config"] for r in rows} == {True, False}
    for r in rows:
        head_dim = int(re.search(r"BLOCK_D=(\d+)", r["config"]).group(1))
        block_n = int(re.search(r"BLOCK_N=(\d+)", r["config"]).group(1))
        specialized = "WARP_SPECIALIZE=True" in r["config"]
        f = r["sass"]
        assert f["utmaldg"] > 0 and f["utmastg"] == (2 if specialized else 1) and f["ldgsts"] == 0, r["config"]
        assert r["spill_bytes"] == 0 and r["tensor_cores"] == "HGMMA" and f["hmma"] == 0, r["config"]
        assert {f"64x{block_n}x16ss", f"64x{head_dim}x16rs"} == set(f["hgmma"]), (r["config"], f["hgmma"])
        assert f["wgmma_waits"] == [0, 1], r["config"]
        assert "BLOCK_M=128," in r["config"]
        loops = f["loops"]
        assert len(loops) == (2 if specialized else 1), (r["config"], loops)
        assert all(n["hgmma"] == (head_dim + block_n) // 16 for n in loops), (r["config"], loops)
        if specialized:
            assert " w4 " in r["config"] and f["warp_specialized"], r["config"]
            assert min(f["setmaxnreg"]) <= 40 and max(f["setmaxnreg"]) >= 240, f["setmaxnreg"]
        else:
            assert " w8 " in r["config"] and not f["warp_specialized"] and not f["setmaxnreg"], r["config"]


_PTXAS_REPORT = """
import os, subprocess, sys, tempfile
import triton
import triton.backends.nvidia as nvidia
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from bench import compile as compile_check

ptxas = os.path.join(os.path.dirname(nvidia.__file__), "bin", "ptxas")
for spec in compile_check.collect_specs(sys.argv[1]):
    k = triton.compile(GluonASTSource(spec.kernel, spec.signature, spec.constexprs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": spec.num_warps})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(k.asm["ptx"])
        f.flush()
        out = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
    print(spec.describe(), "|", " ".join((out.stdout + out.stderr).split()))
"""


def test_gluon_attention_forward_keeps_its_wgmma_async_in_ptxas():
    # ptxas serializes wgmma it cannot prove safe to overlap ("(C7511)/(C7515) ... wgmma.mma_async
    # instructions are serialized", or "(C7519) warpgroup.arrive is injected" to protect registers a
    # wgmma uses: both print for a hand-written PTX with a register write between two wgmma), which
    # would undo the overlap of the softmax with P V the kernel is written for.
    gluon = importlib.import_module("kernels._attention_gluon")
    if not gluon.AVAILABLE:
        pytest.skip(gluon.UNAVAILABLE_REASON)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _PTXAS_REPORT, "fwd_gluon D=128 causal torch.bfloat16"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(gluon.CONFIGS[128]), lines
    for line in lines:
        assert "Used" in line and "0 bytes spill stores" in line, line
        assert "serialized" not in line and "injected" not in line, line
