"""What every kernel benchmark shares: timing, memory, the device's ceilings, and the report files.

Timing on a GPU is ``triton.testing.do_bench`` (median with 0.2/0.8 quantiles);
on CPU a warmed-up median of wall-clock repeats. Inputs are created outside the
timed closures. Each report row carries the fraction of the device's measured
ceiling (a large device copy for memory-bound ops, a large bf16 matmul for
attention), measured in the same run.
"""

from __future__ import annotations

import csv
import gc
import importlib.util
import json
import os
import platform
import statistics
import time
from typing import Callable, Iterable

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # the benches' --dtype choices


def device_name(device: str) -> str:
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"cpu-{platform.machine()}-{os.cpu_count()}cores"
    return name.replace(" ", "-").replace("/", "-")


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def time_ms(fn: Callable[[], object], device: str, *, reps: int = 5) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) milliseconds of ``fn()``."""
    if device == "cuda":
        import triton.testing

        q = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
        return tuple(q)
    fn()  # warm-up
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    return statistics.median(samples), samples[len(samples) // 5], samples[(4 * len(samples)) // 5]


def peak_memory_bytes(fn: Callable[[], object], device: str) -> int | None:
    """Extra device memory at the peak of ``fn()`` over what was allocated before (CUDA only)."""
    if device != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def copy_bandwidth_gbps(device: str, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s (read + write), the memory-bound ceiling."""
    if device != "cuda":
        nbytes = 256 << 20
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)[0]
    return 2 * nbytes / ms / 1e6


def matmul_tflops(dtype: torch.dtype, n: int = 8192) -> float:
    """TFLOP/s of an ``n x n`` matmul in ``dtype`` on the GPU: the compute-bound ceiling, measured in this run."""
    from triton.testing import do_bench

    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = do_bench(lambda: a @ b, warmup=50, rep=300)
    return 2 * n**3 / ms / 1e9


def write_report(op: str, rows: list[dict], device: str, *, meta: dict, x: str, y: str, series: str) -> str:
    """Write rows as JSON, CSV, a markdown table and a PNG plot under bench/results/<device>/."""
    out_dir = os.environ.get("FASTLM_BENCH_OUT") or os.path.join(RESULTS_DIR, device_name(device))
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, op)
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(base + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    with open(base + ".md", "w") as f:
        f.write(markdown_table(rows, columns, meta))
    _plot(base + ".png", op, rows, x=x, y=y, series=series)
    return out_dir


def report_bandwidth(op: str, rows: list[dict], device: str, copy_gbps: float, *, x: str) -> None:
    """Write and print a memory-bound op's rows (:func:`bench_modes`): GB/s against ``x``, one line per provider."""
    meta = {"device": device_name(device), "copy_GB/s": copy_gbps, "torch": torch.__version__}
    out = write_report(op, rows, device, meta=meta, x=x, y="GB/s", series="provider")
    print(markdown_table(rows, [c for c in rows[0] if c not in ("ms_p20", "ms_p80")], meta))
    print(f"written to {out}/{op}.*")


def sweep_bandwidth(op: str, bench: Callable[..., list[dict]], cases: Iterable[tuple], device: str, *, x: str) -> int:
    """A memory-bound op's sweep, the end of its ``main``: the device's copy bandwidth, then
    ``bench(*case, copy_gbps)``'s rows for each case, reported by :func:`report_bandwidth`; the exit status."""
    copy_gbps = copy_bandwidth_gbps(device)
    rows = [row for case in cases for row in bench(*case, copy_gbps)]
    report_bandwidth(op, rows, device, copy_gbps, x=x)
    return 0


def markdown_table(rows: list[dict], columns: list[str], meta: dict) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return "" if v is None else str(v)

    lines = [" ".join(f"{k}={fmt(v)}" for k, v in meta.items()), ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _plot(path: str, title: str, rows: list[dict], *, x: str, y: str, series: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[tuple]] = {}
    for r in rows:
        if r.get(y) is not None:
            groups.setdefault(str(r[series]), []).append((r[x], r[y]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in groups.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bench_modes(fn: Callable, inputs: tuple, leaves: list[torch.Tensor], row: dict, bytes_moved: Callable[[str], int],
                device: str, copy_gbps: float) -> list[dict]:
    """Rows for ``fn(*inputs)`` forward, forward+backward and backward: time, GB/s, fraction of copy, peak memory.

    ``bytes_moved(mode)`` is what the op must read and write in that mode; ``row`` the
    case's identifying columns. Gradients flow to ``leaves``; upstream gradients are
    made once, outside the timed closures. A provider that fails is one ``error`` row.
    """
    rows = []
    try:
        outs = fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        grads = [torch.randn_like(o) for o in outs]

        def fwd():
            return fn(*inputs)

        def bwd():
            torch.autograd.backward(outs, grads, retain_graph=True, inputs=leaves)

        def fwd_bwd():
            o = fn(*inputs)
            torch.autograd.backward(o if isinstance(o, tuple) else (o,), grads, inputs=leaves)

        timed = {}
        for mode, call in (("fwd", fwd), ("fwd+bwd", fwd_bwd), ("bwd", bwd)):
            r = dict(row, mode=mode)
            try:
                ms, lo, hi = time_ms(call, device)
                peak = peak_memory_bytes(call, device)
            except RuntimeError as e:
                if mode != "bwd" or len(timed) < 2:
                    raise
                # torch.compile's backward refuses retain_graph (donated buffers): derive it.
                ms, lo, hi, peak = timed["fwd+bwd"] - timed["fwd"], None, None, None
                r["bwd_derived"] = f"fwd+bwd - fwd ({type(e).__name__})"
            timed[mode] = ms
            gbps = bytes_moved(mode) / ms / 1e6
            r.update({"ms": ms, "ms_p20": lo, "ms_p80": hi, "GB/s": gbps, "frac_of_copy": gbps / copy_gbps,
                      "peak_mem_MB": None if peak is None else peak / 2**20})
            rows.append(r)
    except Exception as e:  # a provider that cannot run this case is reported, not fatal
        rows.append(dict(row, mode="error", error=repr(e)[:200]))
    finally:
        for t in leaves:
            t.grad = None
    return rows
