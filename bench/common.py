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
from typing import Callable

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


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
