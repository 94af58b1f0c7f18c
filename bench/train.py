"""Training throughput, MFU and peak memory: fastlm (fused kernels, references) against Hugging Face GPT-2.

    python -m bench.train                       # CPU: gpt2 shape, batch 4 x 128; GPU: batch 16 x 1024, bf16
    python -m bench.train --preset tiny --batch_size 32 --seq_len 128 --steps 10

Every variant trains the same architecture (a fastlm preset, GPT-2 family) on
the same random batches with the same optimizer (AdamW), one full step at a
time: forward, backward, optimizer step. Each variant runs in its own process,
so its peak memory is its own (CUDA ``max_memory_allocated``, or peak RSS on
CPU). Variants:

- ``fastlm-fused``: the Triton kernels (GPU only: on CPU they run through the
  interpreter, which measures nothing useful);
- ``fastlm-reference``: the same model on the PyTorch references;
- ``hf-gpt2``: ``transformers.GPT2LMHeadModel`` with the same shape (dropout
  off, its default attention implementation), eager PyTorch (no torch.compile).

Tokens/s is the median over the timed steps (the best of ``--rounds`` runs); MFU uses the model's FLOPs per
token (:meth:`fastlm.config.ModelConfig.flops_per_token`) and the device's
peak from :data:`fastlm.metrics.PEAK_BF16_FLOPS` (none on CPU).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

import torch

VARIANTS = ("fastlm-fused", "fastlm-reference", "hf-gpt2")


def _build(variant: str, cfg, device: torch.device) -> tuple[torch.nn.Module, callable]:
    """The model and a function (x, y) -> loss for one variant."""
    if variant.startswith("fastlm"):
        from fastlm.model import GPT

        model = GPT(cfg.model).to(device)
        return model, lambda x, y: model(x, y)
    from transformers import GPT2Config, GPT2LMHeadModel

    m = cfg.model
    hf_config = GPT2Config(vocab_size=m.vocab_size, n_positions=m.block_size, n_embd=m.n_embd, n_layer=m.n_layer,
                           n_head=m.n_head, n_inner=m.hidden, activation_function="gelu_new",
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=m.norm_eps,
                           bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    model = GPT2LMHeadModel(hf_config).to(device)
    model.config.use_cache = False

    def loss_fn(x, y):
        # HF shifts labels itself; pass the inputs' next tokens so both models see the same targets.
        logits = model(input_ids=x).logits
        return torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))

    return model, loss_fn


def run_variant(variant: str, preset_name: str, batch_size: int, seq_len: int, steps: int, warmup: int,
                device_name: str) -> dict:
    import kernels
    from fastlm.config import preset
    from fastlm.metrics import mfu, peak_flops, peak_memory_bytes
    from fastlm.precision import autocast_context

    device = torch.device(device_name)
    cfg = preset(preset_name)
    cfg.model.block_size = max(cfg.model.block_size, seq_len)
    torch.manual_seed(0)
    model, loss_fn = _build(variant, cfg, device)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    batches = [torch.randint(0, cfg.model.vocab_size, (batch_size, seq_len + 1), device=device)
               for _ in range(4)]
    autocast = autocast_context(cfg, device)  # the preset's dtype, as fastlm train would run it
    backend = "reference" if variant == "fastlm-reference" else "auto"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    with kernels.use_backend(backend):
        for i in range(warmup + steps):
            batch = batches[i % len(batches)]
            start = time.perf_counter()
            with autocast:
                loss = loss_fn(batch[:, :-1], batch[:, 1:])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    tokens_per_sec = batch_size * seq_len / step_s
    peak = peak_flops(device)
    flops = cfg.model.flops_per_token(seq_len)
    return {"variant": variant, "params": params, "step_ms": step_s * 1e3, "tokens_per_sec": tokens_per_sec,
            "mfu": mfu(flops * tokens_per_sec, peak),
            "peak_mem_bytes": peak_memory_bytes(device), "loss": loss.item()}


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--batch_size", type=int, default=16 if cuda else 4)
    parser.add_argument("--seq_len", type=int, default=1024 if cuda else 128)
    parser.add_argument("--steps", type=int, default=20 if cuda else 5, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5 if cuda else 2)
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--rounds", type=int, default=1, help="run every variant this many times; keep the best")
    parser.add_argument("--variants", nargs="+", default=None, choices=VARIANTS,
                        help="default: all three on GPU, the reference path and HF on CPU")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # run one variant in this process
    args = parser.parse_args(argv)

    if args.child:
        result = run_variant(args.child, args.preset, args.batch_size, args.seq_len, args.steps, args.warmup,
                             args.device)
        print(json.dumps(result))
        return 0

    variants = args.variants or (list(VARIANTS) if args.device == "cuda" else ["fastlm-reference", "hf-gpt2"])
    if "hf-gpt2" in variants and importlib.util.find_spec("transformers") is None:
        print("hf-gpt2 skipped: transformers is not installed (pip install transformers)", file=sys.stderr)
        variants.remove("hf-gpt2")
    print(f"preset {args.preset}, batch {args.batch_size} x {args.seq_len} tokens, {args.device} "
          f"({torch.cuda.get_device_name() if args.device == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"{'bf16 autocast' if args.device == 'cuda' else 'fp32'}, median of {args.steps} steps, best of {args.rounds} rounds")
    best: dict[str, dict] = {}
    for _ in range(args.rounds):  # variants alternate, so a change in machine load hits them alike
        for variant in variants:
            cmd = [sys.executable, "-m", "bench.train", "--child", variant, "--preset", args.preset,
                   "--batch_size", str(args.batch_size), "--seq_len", str(args.seq_len), "--steps",
                   str(args.steps), "--warmup", str(args.warmup), "--device", args.device]
            # Every variant under the same OpenMP policy: threads that sleep rather than spin
            # keep a shared CPU's numbers meaningful (see fastlm/__init__.py).
            env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                print(f"{variant}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            result = json.loads(out.stdout.strip().splitlines()[-1])
            if variant not in best or result["tokens_per_sec"] > best[variant]["tokens_per_sec"]:
                best[variant] = result
    results = [best[v] for v in variants if v in best]

    print(f"{'variant':<18} {'params':>9} {'step ms':>9} {'tokens/s':>10} {'MFU':>6} {'peak mem':>10}")
    for r in results:
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        mem = "-" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**30:.2f} GiB"
        print(f"{r['variant']:<18} {r['params'] / 1e6:8.1f}M {r['step_ms']:9.1f} {r['tokens_per_sec']:10,.0f} "
              f"{mfu:>6} {mem:>10}")
    by_name = {r["variant"]: r for r in results}
    if "hf-gpt2" in by_name:
        for name in ("fastlm-fused", "fastlm-reference"):
            if name in by_name:
                ratio = by_name[name]["tokens_per_sec"] / by_name["hf-gpt2"]["tokens_per_sec"]
                print(f"{name} / hf-gpt2 tokens/s: {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    return 0 if len(results) == len(variants) else 1


if __name__ == "__main__":
    sys.exit(main())
