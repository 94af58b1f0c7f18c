"""Attention throughput on a GPU: the fused kernel against its reference, SDPA's backends, torch.compile, flash-attn.

    python -m bench.attention [--dtype bf16] [--heads 16] [--head-dim 128] [--tokens 16384]
                              [--seqlens 4096,8192,16384] [--causal both|yes|no] [--json FILE]
                              [--providers fastlm,fastlm-gluon,sdpa-flash,sdpa-cudnn]
    python -m bench.attention --suite varlen [--tokens 32768]     # packed vs padded, lengths 64..4096
    python -m bench.attention --suite window [--window 4096 --window-seq 32768]  # window vs full causal

The issue's figure: bf16, 16 heads of dim 128, batch x seq = 16k tokens, seq 4k..16k,
causal forward, backward and forward+backward, each timed separately (the backward on a
precomputed output, ``out.backward(do, retain_graph=True)``; for torch.compile, whose
backward refuses a retained graph, forward+backward minus forward). TFLOP/s counts
4*B*H*Nq*Nk*D for the forward (halved when causal), 1.5x that for the backward and 2.5x
for forward+backward: the project's convention (shared/docs/testing-kernels.md), the
backward's four gradient matmuls without the recomputed scores. Times are the median of
``triton.testing.do_bench``, inputs created outside the timed closure; each provider's
peak memory for a forward+backward is recorded too. The same run measures a large bf16
matmul as the device's ceiling. Without a GPU it says so and exits.

The reference (``kernels.reference.attention``) materialises the fp32 scores: in bf16 or
fp16 it is the math the kernel is tested against, at its cost: B*H*seq^2*4 bytes of
scores (16 GiB at seq 16k), several times over in a forward+backward, so on a smaller
GPU that case may run out of memory, recorded as the row's error. In fp32 it is a call
to torch's SDPA, which the SDPA rows already time, so it is left out.

On a Hopper GPU whose Triton has the Gluon API, ``fastlm-gluon`` is ``fastlm`` with the
experimental Gluon forward opted in (``FASTLM_ATTENTION=gluon``, :mod:`kernels._attention_gluon`):
its forward beside our Triton forward, SDPA's flash and cuDNN; its backward is the same
Triton backward. Elsewhere its row records why it did not run.

Two more providers materialise the scores: ``sdpa-math`` (SDPA's MATH backend, which
upcasts bf16/fp16 inputs to fp32 throughout) and ``torch.compile`` of :func:`eager_attention`
(plain torch ops, fp32 softmax), built once per causal setting with ``dynamic=False``, so
compiled once per shape. A forward+backward peaks at about 13 bytes per score: for the
math path, fp32 scores, fp32 softmax, a bool mask of -inf scores and the fp32 safe-softmax
output in the forward, then the saved P with fp32 dP and dS in the backward; the compiled
graph holds less (bf16 scores, fp32 P, bf16 P, dP and dS at most). The rule: they run
where ``MATERIALISED_BYTES_PER_SCORE`` (16: the 13 with headroom) x B*H*seq^2 is at most
80% of the GPU's memory, and are recorded as skipped elsewhere. At 16k tokens of 16 heads
that is 16 GiB at seq 4k, 32 GiB at 8k and 64 GiB at 16k: all run on an H200 (~139 GiB),
16k is skipped on an 80 GB GPU. Their time at seq 8k (a full, unmasked N^2 either way):
the math path's fp32 matmuls (no TF32), 1.1 TFLOP forward and twice that backward at
~60 TFLOP/s, plus tens of GiB of score traffic: ~30 ms forward, ~80 ms forward+backward;
the compiled one, bf16 matmuls: ~7 ms and ~25 ms. torch.compile's first compile costs
~10-15 s, each further (causal, shape) a few seconds.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import torch

from bench import common

MODES = ("fwd", "bwd", "fwd+bwd")
# FLOPs of each mode as a multiple of the forward's: the project's convention
# (shared/docs/testing-kernels.md: x2.5 for forward+backward), which the issue's
# targets use. It counts the backward's four gradient matmuls, not the recomputation of S.
FLOP_MULTIPLIER = {"fwd": 1.0, "bwd": 1.5, "fwd+bwd": 2.5}
# Providers that hold (B, H, seq, seq) scores, and their peak bytes per score (see the docstring).
MATERIALISED = ("sdpa-math", "torch.compile")
MATERIALISED_BYTES_PER_SCORE = 16


def attention_flops(batch: int, heads: int, nq: int, nk: int, head_dim: int, causal: bool, mode: str) -> float:
    flops = 4.0 * batch * heads * nq * nk * head_dim
    if causal:
        flops /= 2
    return flops * FLOP_MULTIPLIER[mode]


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """softmax(q k^T * scale + causal mask) v in plain torch ops, (B, H, N, D) in and out.

    The matmuls run in the input dtype, the softmax in fp32 (as torch's math path keeps
    it); the scores are materialised. What a user would write, and torch.compile's input.
    """
    scores = (q @ k.transpose(-2, -1)).float() * q.shape[-1] ** -0.5  # (B, H, Nq, Nk) fp32
    if causal:
        nq, nk = scores.shape[-2:]
        future = torch.ones(nq, nk, dtype=torch.bool, device=q.device).triu(1)  # key j > query i
        scores = scores.masked_fill(future, float("-inf"))
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v


def materialised_bytes(batch: int, heads: int, seq: int) -> int:
    """The estimated forward+backward peak of a provider in MATERIALISED (see the docstring)."""
    return MATERIALISED_BYTES_PER_SCORE * batch * heads * seq * seq


def gluon_forward_runs(dtype: torch.dtype, head_dim: int = 128) -> bool:
    """Whether the experimental Gluon forward (``FASTLM_ATTENTION=gluon``) runs here: a Hopper GPU and a Triton
    with its Gluon API. Its row, ``fastlm-gluon``, is our Triton backward after that forward."""
    from kernels import _attention_gluon

    probe = torch.empty(1, 1, 1, head_dim, device="cuda", dtype=dtype)
    return _attention_gluon.qualifies(probe, probe, probe)


def _providers(causal: bool, dtype: torch.dtype, head_dim: int = 128):
    """name -> (wants (batch, seq, heads, head_dim) inputs, call). Only those importable here."""
    import kernels
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend):
        def call(q, k, v):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return call

    providers = {"fastlm": (False, lambda q, k, v: kernels.attention(q, k, v, causal=causal))}
    gluon_runs = gluon_forward_runs(dtype, head_dim)

    def gluon(q, k, v):
        if not gluon_runs:  # a row that says why, not our Triton forward under the Gluon name
            raise RuntimeError("the Gluon forward does not run here (needs sm_90, bf16/fp16, head dim 64/128 and "
                               "a Triton with Gluon's Hopper API)")
        with kernels.use_attention_forward("gluon"):
            return kernels.attention(q, k, v, causal=causal)
    providers["fastlm-gluon"] = (False, gluon)
    if dtype != torch.float32:
        providers["reference"] = (False, lambda q, k, v: kernels.reference.attention(q, k, v, causal=causal))
    providers |= {
        "sdpa-flash": (False, sdpa(SDPBackend.FLASH_ATTENTION)),
        "sdpa-cudnn": (False, sdpa(SDPBackend.CUDNN_ATTENTION)),
        "sdpa-efficient": (False, sdpa(SDPBackend.EFFICIENT_ATTENTION)),
        "sdpa-math": (False, sdpa(SDPBackend.MATH)),
        "torch.compile": (False, torch.compile(functools.partial(eager_attention, causal=causal), dynamic=False)),
    }
    # flash-attn wants (batch, seq, heads, head_dim); its inputs are made in that layout.
    try:
        from flash_attn import flash_attn_func

        providers["flash-attn-2"] = (True, lambda q, k, v: flash_attn_func(q, k, v, causal=causal))
    except ImportError:
        pass
    try:
        from flash_attn_interface import flash_attn_func as fa3

        def call_fa3(q, k, v):
            out = fa3(q, k, v, causal=causal)
            return out[0] if isinstance(out, tuple) else out
        providers["flash-attn-3"] = (True, call_fa3)
    except ImportError:
        pass
    return providers


def _short(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def bench_case(providers, batch, heads, seq, head_dim, dtype, causal) -> list[dict]:
    from triton.testing import do_bench

    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (batch, heads, seq, head_dim)
    base = [torch.randn(shape, device="cuda", dtype=dtype, generator=g) for _ in range(4)]
    rows, outputs = [], {}
    device_memory = torch.cuda.get_device_properties(0).total_memory
    for name, (bshd, call) in providers.items():
        q, k, v, do = (t.transpose(1, 2).contiguous() if bshd else t for t in base)
        for t in (q, k, v):
            t.requires_grad_(True)
        row = {"provider": name, "batch": batch, "heads": heads, "seq": seq, "head_dim": head_dim,
               "dtype": str(dtype).removeprefix("torch."), "causal": causal}
        if name in MATERIALISED and materialised_bytes(batch, heads, seq) > 0.8 * device_memory:
            gib = materialised_bytes(batch, heads, seq) / 2**30
            rows.append(row | {"error": f"skipped: needs ~{gib:.1f} GiB, over 80% of the GPU's memory"})
            continue
        try:
            out = call(q, k, v)
            outputs[name] = out.detach().transpose(1, 2) if bshd else out.detach()
            del out
            fwd = do_bench(lambda: call(q, k, v), warmup=25, rep=200)
            fwd_bwd = do_bench(lambda: call(q, k, v).backward(do), warmup=25, rep=200, grad_to_none=[q, k, v])
        except Exception as e:  # a backend that does not support this case
            row["error"] = _short(e)
            rows.append(row)
            continue
        times = {"fwd": fwd, "fwd+bwd": fwd_bwd}
        try:  # the backward alone, through one precomputed forward's graph kept alive
            for t in (q, k, v):
                t.grad = None
            out = call(q, k, v)
            times["bwd"] = do_bench(lambda: out.backward(do, retain_graph=True), warmup=25, rep=200,
                                    grad_to_none=[q, k, v])
        except Exception as e:  # torch.compile's backward refuses retain_graph (donated buffers): derive it
            times["bwd"] = fwd_bwd - fwd
            row["bwd_derived"] = f"fwd+bwd - fwd ({_short(e)})"
        out = None
        for mode in MODES:
            if mode in times:
                row[f"{mode}_ms"] = times[mode]
                flops = attention_flops(batch, heads, seq, seq, head_dim, causal, mode)
                row[f"{mode}_tflops"] = flops / times[mode] / 1e9
        try:  # memory above the inputs at the peak of one forward+backward (the gradients included)
            for t in (q, k, v):
                t.grad = None
            peak = common.peak_memory_bytes(lambda: call(q, k, v).backward(do), "cuda")
            row["fwd+bwd_peak_mem_MB"] = None if peak is None else peak / 2**20
        except Exception as e:
            row["peak_mem_error"] = _short(e)
        rows.append(row)
        del q, k, v, do, out
        torch.cuda.empty_cache()
    for ours in ("fastlm", "fastlm-gluon"):  # a sanity check on the numbers being timed
        if ours in outputs and "sdpa-flash" in outputs:
            err = (outputs[ours].float() - outputs["sdpa-flash"].float()).abs().max().item()
            for row in rows:
                row[f"{ours}_vs_sdpa_flash_max_err"] = err
    return rows


def mixed_lengths(tokens: int, low: int = 64, high: int = 4096, seed: int = 0) -> list[int]:
    """Sequence lengths drawn log-uniformly from [low, high] (a packed pretraining batch), about ``tokens`` in all."""
    g = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < tokens:
        u = torch.rand((), generator=g).item()
        lengths.append(int(low * (high / low) ** u))
    return lengths


def _timed(call, q, k, v, do) -> dict:
    """fwd and fwd+bwd milliseconds of ``call(q, k, v)`` (leaves q, k, v with requires_grad)."""
    from triton.testing import do_bench

    for t in (q, k, v):
        t.requires_grad_(True)
    fwd = do_bench(lambda: call(q, k, v), warmup=25, rep=200)
    fwd_bwd = do_bench(lambda: call(q, k, v).backward(do), warmup=25, rep=200, grad_to_none=[q, k, v])
    return {"fwd_ms": fwd, "fwd+bwd_ms": fwd_bwd}


def bench_varlen(heads: int, head_dim: int, tokens: int, dtype: torch.dtype) -> list[dict]:
    """Causal attention over mixed lengths (64..4096): packed (varlen) against the same batch padded to dense.

    The padded batch is what a trainer without varlen runs: every sequence right-padded
    to the longest, ``kv_lens`` masking the padding, every padded query computed anyway.
    TFLOP/s counts only the real work (each sequence's causal N^2), for both rows.
    """
    import kernels

    lengths = mixed_lengths(tokens)
    batch, longest, total = len(lengths), max(lengths), sum(lengths)
    g = torch.Generator(device="cuda").manual_seed(0)
    packed = [torch.randn(total, heads, head_dim, device="cuda", dtype=dtype, generator=g) for _ in range(4)]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    padded = [torch.zeros(batch, heads, longest, head_dim, device="cuda", dtype=dtype) for _ in range(4)]
    for b, (start, n) in enumerate(zip(cu[:-1].tolist(), lengths)):
        for dense, flat in zip(padded, packed):
            dense[b, :, :n] = flat[start:start + n].transpose(0, 1)
    kv_lens = torch.tensor(lengths, device="cuda")
    flops = sum(attention_flops(1, heads, n, n, head_dim, True, "fwd") for n in lengths)
    cases = {
        "fastlm-varlen": (packed, lambda q, k, v: kernels.varlen_attention(q, k, v, cu, cu, longest, longest,
                                                                           causal=True)),
        "fastlm-padded": (padded, lambda q, k, v: kernels.attention(q, k, v, causal=True, kv_lens=kv_lens)),
    }
    rows = []
    with kernels.unchecked():
        for name, (tensors, call) in cases.items():
            row = {"provider": name, "sequences": batch, "tokens": total, "longest": longest, "heads": heads,
                   "head_dim": head_dim, "dtype": str(dtype).removeprefix("torch.")}
            try:
                row |= _timed(call, *tensors)
                row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
                row["fwd+bwd_tflops"] = flops * FLOP_MULTIPLIER["fwd+bwd"] / row["fwd+bwd_ms"] / 1e9
            except Exception as e:
                row["error"] = _short(e)
            rows.append(row)
    return rows


def bench_window(heads: int, head_dim: int, seq: int, window: int, dtype: torch.dtype) -> list[dict]:
    """A ``window``-key sliding window over one ``seq``-token sequence against full causal attention.

    Key blocks outside the window are never visited, so the window should cost about
    its share of the visible scores: ``expected_fraction`` (window keys per query over
    causal's (i + 1), summed over the queries).
    """
    import kernels

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(1, heads, seq, head_dim, device="cuda", dtype=dtype, generator=g) for _ in range(4))
    visible_causal = seq * (seq + 1) / 2
    visible_window = sum(min(i, window) + 1 for i in range(seq))
    rows = []
    for name, size in (("fastlm-causal", (-1, 0)), (f"fastlm-window-{window}", (window, 0))):
        row = {"provider": name, "seq": seq, "window": size[0], "heads": heads, "head_dim": head_dim,
               "dtype": str(dtype).removeprefix("torch."), "expected_fraction": visible_window / visible_causal
               if size[0] >= 0 else 1.0}
        try:
            row |= _timed(lambda q, k, v: kernels.attention(q, k, v, causal=True, window_size=size), q, k, v, do)
        except Exception as e:
            row["error"] = _short(e)
        rows.append(row)
    if all("error" not in r for r in rows):
        for mode in ("fwd_ms", "fwd+bwd_ms"):
            rows[1][f"{mode.removesuffix('_ms')}_fraction_of_causal"] = rows[1][mode] / rows[0][mode]
    return rows


def print_feature_rows(title: str, rows: list[dict]) -> None:
    print(title)
    for r in rows:
        print("  " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))


def print_rows(rows: list[dict], ceiling: float) -> None:
    def cell(r, mode):
        ms, tf = r.get(f"{mode}_ms"), r.get(f"{mode}_tflops")
        return f"{ms:8.3f} {tf:8.1f}" if ms is not None else f"{'n/a':>8} {'':>8}"

    print(f"{'provider':<16} {'seq':>6} {'batch':>5} {'causal':>6} | {'fwd ms':>8} {'TFLOP/s':>8} | "
          f"{'bwd ms':>8} {'TFLOP/s':>8} | {'f+b ms':>8} {'TFLOP/s':>8} | {'fwd %peak':>9} | {'f+b MiB':>8}")
    for r in rows:
        head = f"{r['provider']:<16} {r['seq']:>6} {r['batch']:>5} {str(r['causal']):>6} | "
        if "error" in r:
            print(head + f"n/a ({r['error']})")
            continue
        mem = r.get("fwd+bwd_peak_mem_MB")
        print(head + f"{cell(r, 'fwd')} | {cell(r, 'bwd')} | {cell(r, 'fwd+bwd')} | "
              f"{100 * r['fwd_tflops'] / ceiling:8.1f}% | " + (f"{mem:8.0f}" if mem is not None else f"{'n/a':>8}")
              + ("  (bwd = f+b - fwd)" if "bwd_derived" in r else ""))
    # fastlm against the best SDPA backend, per case
    cases = {(r["seq"], r["causal"]) for r in rows}
    for seq, causal in sorted(cases):
        group = [r for r in rows if r["seq"] == seq and r["causal"] == causal and "error" not in r]
        ours = next((r for r in group if r["provider"] == "fastlm"), None)
        sdpa = [r for r in group if r["provider"].startswith("sdpa")]
        if ours and sdpa:
            best_f = max(r["fwd_tflops"] for r in sdpa)
            best_fb = max(r["fwd+bwd_tflops"] for r in sdpa)
            bwd_sdpa = [r["bwd_tflops"] for r in sdpa if "bwd_tflops" in r]
            bwd = (f"{ours['bwd_tflops'] / max(bwd_sdpa):.2f}x bwd, "
                   if "bwd_tflops" in ours and bwd_sdpa else "")
            print(f"seq {seq} causal={causal}: fastlm / best SDPA = {ours['fwd_tflops'] / best_f:.2f}x fwd, {bwd}"
                  f"{ours['fwd+bwd_tflops'] / best_fb:.2f}x fwd+bwd"
                  + (f"; max |fastlm - sdpa-flash| = {ours['fastlm_vs_sdpa_flash_max_err']:.2e}"
                     if "fastlm_vs_sdpa_flash_max_err" in ours else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.attention", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bf16", choices=sorted(common.DTYPES))
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=16384, help="batch x sequence")
    parser.add_argument("--seqlens", default="4096,8192,16384")
    parser.add_argument("--causal", default="both", choices=["both", "yes", "no"])
    parser.add_argument("--json", default=None)
    parser.add_argument("--providers", default=None,
                        help="comma-separated subset of the providers (default: every one importable here)")
    parser.add_argument("--suite", default="providers", choices=["providers", "varlen", "window"],
                        help="providers: the kernel against every provider (default); varlen: mixed lengths "
                             "64..4096 packed against padded to dense (--tokens in all); window: a --window "
                             "sliding window over one --window-seq sequence against full causal")
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--window-seq", type=int, default=32768)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.attention: no GPU: nothing measured (the figures need a CUDA device)")
        return 0
    dtype = common.DTYPES[args.dtype]
    if args.suite != "providers":
        if args.suite == "varlen":
            rows = bench_varlen(args.heads, args.head_dim, args.tokens, dtype)
        else:
            rows = bench_window(args.heads, args.head_dim, args.window_seq, args.window, dtype)
        print_feature_rows(f"{torch.cuda.get_device_name()}: attention {args.suite}", rows)
        out = common.write_report(f"attention_{args.suite}", rows, "cuda", meta={"device": common.device_name("cuda")},
                                  x="provider", y="fwd+bwd_ms", series="provider")
        print(f"written to {out}/attention_{args.suite}.*")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
        return 0
    causals = {"both": [True, False], "yes": [True], "no": [False]}[args.causal]
    ceiling = common.matmul_tflops(dtype if dtype != torch.float32 else torch.bfloat16)
    print(f"{torch.cuda.get_device_name()}: {args.dtype} matmul ceiling {ceiling:.0f} TFLOP/s; "
          f"{args.heads} heads x dim {args.head_dim}, {args.tokens} tokens per batch")
    rows = []
    for causal in causals:
        providers = _providers(causal, dtype, args.head_dim)
        if args.providers:
            wanted = args.providers.split(",")
            unknown = sorted(set(wanted) - set(providers))
            if unknown:
                parser.error(f"--providers: unknown or not importable here: {', '.join(unknown)} "
                             f"(available: {', '.join(providers)})")
            providers = {name: providers[name] for name in wanted}
        for seq in (int(s) for s in args.seqlens.split(",")):
            batch = max(1, args.tokens // seq)
            rows += bench_case(providers, batch, args.heads, seq, args.head_dim, dtype, causal)
    print_rows(rows, ceiling)
    for r in rows:
        for mode in MODES:
            if f"{mode}_tflops" in r:
                r[f"{mode}_frac_of_matmul"] = r[f"{mode}_tflops"] / ceiling
    meta = {"device": common.device_name("cuda"), "matmul_TFLOP/s": ceiling, "torch": torch.__version__}
    out = common.write_report("attention", rows, "cuda", meta=meta, x="seq", y="fwd+bwd_tflops", series="provider")
    print(f"written to {out}/attention.*")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "ceiling_tflops": ceiling, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
