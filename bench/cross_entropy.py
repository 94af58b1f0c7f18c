"""Cross-entropy and fused linear cross-entropy: memory and time against what a user would write.

    python -m bench.cross_entropy [--cpu] [--gpu] [--repeat 3] [--n 4096 --h 1024 --c 50257]

CPU (always, unless --gpu only): ``kernels.linear_cross_entropy`` against the naive
``F.linear`` + ``F.cross_entropy``, forward + backward in fp32 at N x H -> C.
Each variant runs in a fresh subprocess, so its peak resident memory (``ru_maxrss``)
is its own: the figure is that peak minus the process's resident memory once the
inputs exist, i.e. the memory the loss and its gradients cost. The variants
alternate ``--repeat`` times (load on a shared machine hits both alike); time is
each one's fastest run, memory its largest peak.

GPU (when CUDA is available): cross-entropy forward, backward and forward+backward
over vocabularies 32000, 50257, 128256 and 262144 (``--vocabs``) at 16384 rows bf16
(8192 rows above 131072), timed with ``triton.testing.do_bench``, in GB/s (logits
read once + gradient written once) against a device-to-device copy measured in the
same run, with each provider's peak memory for a forward+backward: ``kernels.cross_entropy``,
our pure-PyTorch reference (``kernels.reference.cross_entropy``: fp32 logits, torch's
per-token loss, an fp64 sum), ``F.cross_entropy``, ``torch.compile(F.cross_entropy)`` and
Liger-Kernel's when installed. Then ``linear_cross_entropy`` at N=8192, H=4096, C=128256
bf16 against the reference backend (the same chunk loop with the pure-PyTorch
per-chunk loss; the spec, ``kernels.reference.linear_cross_entropy``, holds the
logits as the naive version does), the naive ``F.linear`` +
``F.cross_entropy``, its ``torch.compile`` and Liger's fused linear cross-entropy when
installed: peak memory above the inputs and time. A provider that fails is recorded in
the report, not fatal.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from bench import common

CPU_SHAPE = (4096, 1024, 50257)  # N, H, C
GPU_CE_VOCABS = (32000, 50257, 128256, 262144)
GPU_CE_ROWS = 16384
GPU_CE_ROWS_LARGE = 8192  # for vocabularies above 131072: the logits and each copy stay at 4 GiB


def _ce_rows(c: int) -> int:
    return GPU_CE_ROWS if c <= 131072 else GPU_CE_ROWS_LARGE
GPU_LINEAR_SHAPE = (8192, 4096, 128256)


def _linear_inputs(n, h, c, dtype, device, seed=0):
    # Filled in place: no input-sized temporary raises the peak before the measurement starts.
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.empty(n, h, dtype=dtype, device=device).normal_(generator=g).requires_grad_()
    w = torch.empty(c, h, dtype=dtype, device=device).normal_(std=h**-0.5, generator=g).requires_grad_()
    t = torch.randint(0, c, (n,), generator=g, device=device)
    return x, w, t


def _naive(x, w, t, chunk_size=None):
    return F.cross_entropy(F.linear(x, w), t)


def _fused(x, w, t, chunk_size=None):
    import kernels

    return kernels.linear_cross_entropy(x, w, t, chunk_size=chunk_size)


def _reference_backend(x, w, t, chunk_size=None):
    import kernels

    with kernels.use_backend("reference"):
        return kernels.linear_cross_entropy(x, w, t, chunk_size=chunk_size)


VARIANTS = {"naive": _naive, "fused": _fused}


# ----------------------------------------------------------------------------- CPU


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _measure_cpu(variant: str, n: int, h: int, c: int, chunk_size: int | None) -> dict:
    """Runs in a fresh process: one forward+backward, its peak memory above the inputs and its time."""
    fn = VARIANTS[variant]
    small = _linear_inputs(8, 16, 32, torch.float32, "cpu")
    fn(*small).backward()  # load the code paths and thread pools before the baseline
    x, w, t = _linear_inputs(n, h, c, torch.float32, "cpu")
    baseline = _rss_mib()
    start, cpu_start = time.perf_counter(), time.process_time()
    fn(x, w, t, chunk_size).backward()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {"variant": variant, "peak_mib": _rss_mib() - baseline, "seconds": seconds, "cpu_seconds": cpu_seconds}


def run_cpu(n: int, h: int, c: int, repeat: int, chunk_size: int | None) -> list[dict]:
    """Alternates the variants ``repeat`` times (a shared machine's load hits both alike); keeps each one's best."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # CPU tensors: the default backend
    best: dict[str, dict] = {}
    for _ in range(repeat):
        for variant in VARIANTS:
            cmd = [sys.executable, "-m", "bench.cross_entropy", "--_measure", variant, "--n", str(n), "--h", str(h),
                   "--c", str(c)]
            if chunk_size:
                cmd += ["--chunk-size", str(chunk_size)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            if variant in best:  # the memory figure is the worst seen, the time the best
                r = {**r, "peak_mib": max(r["peak_mib"], best[variant]["peak_mib"]),
                     "seconds": min(r["seconds"], best[variant]["seconds"]),
                     "cpu_seconds": min(r["cpu_seconds"], best[variant]["cpu_seconds"])}
            best[variant] = r
    rows = list(best.values())
    naive = best["naive"]
    print(f"\nCPU, fp32, N={n} H={h} C={c}: forward + backward, {torch.get_num_threads()} threads, "
          f"{repeat} alternating runs each in a fresh process; time = best, memory = worst peak RSS above the inputs")
    print("(wall seconds is the figure; CPU seconds, the process's own, is less disturbed by other load)")
    print(f"{'variant':<36} {'peak MiB':>10} {'vs naive':>9} {'wall s':>8} {'vs naive':>9} {'CPU s':>8} {'vs naive':>9}")
    names = {"naive": "F.linear + F.cross_entropy", "fused": "kernels.linear_cross_entropy"}
    for r in rows:
        print(f"{names[r['variant']]:<36} {r['peak_mib']:>10.0f} {r['peak_mib'] / naive['peak_mib']:>8.1%} "
              f"{r['seconds']:>8.2f} {r['seconds'] / naive['seconds']:>8.2f}x "
              f"{r['cpu_seconds']:>8.2f} {r['cpu_seconds'] / naive['cpu_seconds']:>8.2f}x")
    return rows


# ----------------------------------------------------------------------------- GPU


def _short(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def _first(out):
    """The loss of a call that may also return extras (Liger's z-loss)."""
    return out[0] if isinstance(out, tuple) else out


def _ce_providers() -> list[tuple[str, object, bool]]:
    """(name, fn(logits, target), computes its gradient in the forward) for the GPU cross-entropy sweep.

    A provider that computes its gradient in the forward cannot backpropagate twice through
    one graph: its backward time is forward+backward minus forward (``bwd_derived`` in the
    report), as for any whose backward refuses ``retain_graph=True`` (torch.compile's,
    whose compiled backward donates its saved buffers).
    """
    import kernels

    providers = [
        ("kernels.cross_entropy", kernels.cross_entropy, True),
        ("reference", kernels.reference.cross_entropy, False),
        ("F.cross_entropy", F.cross_entropy, False),
        ("torch.compile(F.cross_entropy)", torch.compile(F.cross_entropy, dynamic=False), False),
    ]
    if common.installed("liger_kernel"):
        try:
            from liger_kernel.transformers import LigerCrossEntropyLoss

            liger = LigerCrossEntropyLoss()
            providers.append(("liger", lambda x, t: _first(liger(x, t)), True))
        except Exception as e:  # an installed Liger that does not import here (version skew) is skipped
            print(f"liger_kernel installed but its cross-entropy did not import: {_short(e)}")
    return providers


def _linear_providers() -> dict[str, object]:
    """name -> fn(x, w, t) for the GPU linear cross-entropy comparison; the first is the baseline."""
    providers = {
        "F.linear + F.cross_entropy": _naive,
        "kernels.linear_cross_entropy": _fused,
        "reference": _reference_backend,
        "torch.compile(F.linear + F.cross_entropy)": torch.compile(_naive, dynamic=False),
    }
    if common.installed("liger_kernel"):
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            flce = LigerFusedLinearCrossEntropyLoss()
            providers["liger fused linear CE"] = lambda x, w, t: _first(flce(w, x, t))  # (weight, input, target)
        except Exception as e:  # an installed Liger that does not import here (version skew) is skipped
            print(f"liger_kernel installed but its fused linear cross-entropy did not import: {_short(e)}")
    return providers


def _bench_ce(n: int, c: int, copy_gbs: float) -> list[dict]:
    """Every cross-entropy provider at n x c bf16: fwd, bwd, fwd+bwd time, GB/s, peak memory."""
    import triton.testing

    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    # Filled in place: no fp32 logits-sized temporary (8 GiB at 16384 x 131072).
    base = torch.empty(n, c, device=dev, dtype=torch.bfloat16).normal_(generator=g)
    t = torch.randint(0, c, (n,), device=dev, generator=g)
    bytes_moved = 2 * base.numel() * base.element_size()  # read the logits, write their gradient
    print(f"\ncross_entropy {n} x {c} bf16 (GB/s counts one read of the logits and one write of the gradient)")
    print(f"{'variant':<32} {'fwd ms':>8} {'bwd ms':>8} {'fwd+bwd ms':>11} {'GB/s':>7} {'of copy':>8} {'peak MiB':>9}")
    rows = []
    for name, fn, grad_in_forward in _ce_providers():
        row = {"op": "cross_entropy", "provider": name, "shape": f"{n}x{c}", "rows": n, "vocab": c}
        # Each provider gets its own copy: some (Liger) overwrite the logits with their gradient.
        logits = base.clone().requires_grad_()
        loss = None
        try:
            fwd = triton.testing.do_bench(lambda: fn(logits, t), grad_to_none=[logits])
            both = triton.testing.do_bench(lambda: fn(logits, t).backward(), grad_to_none=[logits])
            bwd = None
            if not grad_in_forward:
                try:
                    loss = fn(logits, t)
                    bwd = triton.testing.do_bench(lambda: loss.backward(retain_graph=True), grad_to_none=[logits])
                except RuntimeError:  # e.g. torch.compile's donated buffers refuse retain_graph=True
                    pass
                loss = None
            row["bwd_derived"] = bwd is None
            if bwd is None:  # the gradient is handed over once; the backward is what fwd+bwd adds
                bwd = max(both - fwd, 0.0)
            logits.grad = None
            peak = common.peak_memory_bytes(lambda: fn(logits, t).backward(), dev)
        except Exception as e:  # a provider that cannot run this case is reported, not fatal
            row["error"] = _short(e)
            print(f"{name:<32} n/a ({row['error']})")
            rows.append(row)
            del logits, loss
            torch.cuda.empty_cache()
            continue
        gbs = bytes_moved / both / 1e6
        peak_mib = None if peak is None else peak / 2**20
        print(f"{name:<32} {fwd:>8.3f} {bwd:>8.3f} {both:>11.3f} {gbs:>7.0f} {gbs / copy_gbs:>7.0%} "
              + (f"{peak_mib:>9.0f}" if peak_mib is not None else f"{'n/a':>9}"))
        row.update({"fwd_ms": fwd, "bwd_ms": bwd, "fwd+bwd_ms": both, "GB/s": gbs, "frac_of_copy": gbs / copy_gbs,
                    "peak_mem_MB": peak_mib})
        rows.append(row)
        del logits
        torch.cuda.empty_cache()
    del base, t
    torch.cuda.empty_cache()
    return rows


def _bench_linear(n: int, h: int, c: int) -> list[dict]:
    """Every linear cross-entropy provider at N x H -> C bf16: fwd+bwd peak memory above the inputs and time."""
    import triton.testing

    dev = "cuda"
    print(f"\nlinear_cross_entropy N={n} H={h} C={c} bf16, forward + backward; memory = peak above the inputs")
    print(f"{'variant':<44} {'peak GiB':>9} {'vs naive':>9} {'ms':>9} {'vs naive':>9}")
    rows, results = [], {}
    for name, fn in _linear_providers().items():
        x, w, t = _linear_inputs(n, h, c, torch.bfloat16, dev)
        row = {"op": "linear_cross_entropy", "provider": name, "shape": f"{n}x{h}->{c}", "rows": n, "vocab": c}
        try:
            fn(x, w, t).backward()  # warm-up (torch.compile compiles here), outside the memory figure
            x.grad = w.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn(x, w, t).backward()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
            ms = triton.testing.do_bench(lambda: fn(x, w, t).backward(), grad_to_none=[x, w])
        except Exception as e:  # a provider that cannot run this case is reported, not fatal
            row["error"] = _short(e)
            print(f"{name:<44} n/a ({row['error']})")
            rows.append(row)
        else:
            results[name] = (peak, ms)
            row.update({"fwd+bwd_ms": ms, "peak_GiB": peak})
            rows.append(row)
        del x, w, t
        torch.cuda.empty_cache()
    naive = results.get("F.linear + F.cross_entropy")
    for row in rows:
        if row["provider"] not in results:
            continue
        peak, ms = results[row["provider"]]
        if naive:
            row.update({"peak_vs_naive": peak / naive[0], "time_vs_naive": ms / naive[1]})
        print(f"{row['provider']:<44} {peak:>9.2f} "
              + (f"{peak / naive[0]:>8.1%} {ms:>9.2f} {ms / naive[1]:>8.2f}x" if naive else f"{'':>9} {ms:>9.2f}"))
    return rows


def run_gpu(vocabs: tuple[int, ...] | list[int] = GPU_CE_VOCABS) -> None:
    import triton
    import triton.testing

    dev = "cuda"
    print(f"\nGPU: {torch.cuda.get_device_name()}, triton {triton.__version__}, torch {torch.__version__}, "
          f"liger_kernel {'installed' if common.installed('liger_kernel') else 'not installed'}")

    big = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(big)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(big))
    copy_gbs = 2 * big.numel() / copy_ms / 1e6
    del big, dst
    print(f"device copy: {copy_gbs:.0f} GB/s (read + write)")
    meta = {"device": common.device_name(dev), "copy_GB/s": copy_gbs, "torch": torch.__version__}

    def write(report):  # after each section, so a run cut short still leaves what it measured
        return common.write_report("cross_entropy", report, dev, meta=meta, x="vocab", y="GB/s", series="provider")

    report = []
    for c in vocabs:
        report += _bench_ce(_ce_rows(c), c, copy_gbs)
        write(report)
    report += _bench_linear(*GPU_LINEAR_SHAPE)
    out = write(report)
    print(f"written to {out}/cross_entropy.*")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cross_entropy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="only the CPU figure")
    parser.add_argument("--gpu", action="store_true", help="only the GPU figures")
    parser.add_argument("--repeat", type=int, default=3, help="CPU runs per variant (alternating, fresh processes)")
    parser.add_argument("--n", type=int, default=CPU_SHAPE[0])
    parser.add_argument("--h", type=int, default=CPU_SHAPE[1])
    parser.add_argument("--c", type=int, default=CPU_SHAPE[2])
    parser.add_argument("--chunk-size", type=int, default=None, help="linear_cross_entropy's chunk_size")
    parser.add_argument("--vocabs", default=",".join(map(str, GPU_CE_VOCABS)),
                        help="GPU cross_entropy vocabularies (16384 rows; 8192 above 131072)")
    parser.add_argument("--_measure", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._measure:
        print(json.dumps(_measure_cpu(args._measure, args.n, args.h, args.c, args.chunk_size)))
        return 0
    if not args.gpu:
        run_cpu(args.n, args.h, args.c, args.repeat, args.chunk_size)
    if not args.cpu:
        if torch.cuda.is_available():
            run_gpu([int(v) for v in args.vocabs.split(",")])
        else:
            print("\nGPU figures: no CUDA device here, not measured.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
