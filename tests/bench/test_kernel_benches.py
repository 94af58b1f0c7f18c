"""bench.rope, bench.glu and bench.activation_memory run end to end on micro shapes (CPU figures are not checked)."""

import json
from types import SimpleNamespace

import pytest

from bench import activation_memory, glu, rope


@pytest.fixture
def bench_out(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLM_BENCH_OUT", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("module,name,argv", [
    (rope, "rope", ["--batch", "1", "--seqlens", "16", "--heads", "2,1", "--head-dim", "16"]),
    (glu, "glu", ["--tokens", "8", "--hidden", "48"]),
])
def test_kernel_bench_smoke(bench_out, module, name, argv, capsys):
    assert module.main(argv) == 0
    rows = json.loads((bench_out / f"{name}.json").read_text())["rows"]
    assert not [r for r in rows if r["mode"] == "error"]
    # On CPU: our reference against eager, each op forward, backward and both.
    ops = {r["op"] for r in rows}
    assert {(op, r["provider"], r["mode"]) for op in ops for r in rows if r["op"] == op} == {
        (op, p, m) for op in ops for p in ("fastlm-reference", "torch") for m in ("fwd", "bwd", "fwd+bwd")}
    assert all(r["GB/s"] > 0 and r["frac_of_copy"] > 0 for r in rows)
    assert "GB/s" in capsys.readouterr().out


def test_fused_swiglu_saves_one_activation_less_for_the_backward():
    # Eager SwiGLU also keeps silu(gate), one (tokens, mlp) fp32 tensor; the fused op keeps gate and up only.
    # Fused RoPE keeps nothing extra either (its backward needs only cos/sin). Under the interpreter here.
    args = SimpleNamespace(batch=1, seq=16, hidden=32, heads=(2, 1), mlp=48)
    rows = {v: activation_memory.measure(v, args, "cpu") for v in activation_memory.VARIANTS}
    one = 16 * 48 * 4 / 2**20
    assert rows["eager"]["saved_MB"] - rows["fused SwiGLU"]["saved_MB"] == pytest.approx(one)
    assert rows["fused RoPE"]["saved_MB"] == pytest.approx(rows["eager"]["saved_MB"])
    assert rows["fused RoPE + SwiGLU"]["saved_MB"] == pytest.approx(rows["fused SwiGLU"]["saved_MB"])
    assert all(r["peak_MB"] > r["saved_MB"] > 0 for r in rows.values())
