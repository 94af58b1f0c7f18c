"""Rotary embeddings of q and k: fastlm against what a user would otherwise run.

    python -m bench.rope [--batch 4] [--seqlens 1024,4096] [--heads 32,8] [--head-dim 128] [--dtype bf16]

Providers: fastlm's Triton kernel (``kernels.rope``), our pure-PyTorch reference
(``kernels.reference.rope``: fp32 math on upcast copies; skipped in fp32, where it
is the eager formula), torch eager as HF writes it (``q * cos + rotate_half(q) *
sin`` in the input dtype, ``apply_rotary_pos_emb``), ``torch.compile`` of the same,
and Liger-Kernel's ``liger_rotary_pos_emb`` when installed; on CPU, the reference
against eager. q (batch, heads, seq, head_dim) and k with fewer heads (GQA), HF's
(batch, seq, head_dim) cos/sin. Forward, backward and forward+backward separately;
each row: median time, GB/s over the bytes the op must move (q and k in, out, and
the cos/sin rows once), its fraction of the device-to-device copy bandwidth
measured in the same run, and peak memory. Results go to bench/results/<device>/rope.*.
"""

from __future__ import annotations

import argparse
import sys

import torch

import kernels
from bench import common


def eager_rope(q, k, cos, sin):
    """HF's ``apply_rotary_pos_emb`` (cos/sin (batch, seq, head_dim) in q's dtype)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _providers(device: str, dtype: torch.dtype) -> dict:
    ref = kernels.reference.rope
    if device != "cuda":
        return {"fastlm-reference": ref, "torch": eager_rope}
    providers = {"fastlm": kernels.rope}
    if dtype != torch.float32:
        providers["reference"] = ref
    providers.update({"torch": eager_rope, "torch.compile": torch.compile(eager_rope, dynamic=False)})
    if common.installed("liger_kernel"):
        try:
            from liger_kernel.transformers.rope import liger_rotary_pos_emb

            providers["liger"] = liger_rotary_pos_emb
        except Exception as e:  # an installed Liger that does not import here (version skew) is skipped
            print(f"liger_kernel installed but does not import: {type(e).__name__}: {e}")
    return providers


def bench_case(batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: str,
               copy_gbps: float) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype, generator=g).requires_grad_()
    k = torch.randn(batch, kv_heads, seq, head_dim, device=device, dtype=dtype, generator=g).requires_grad_()
    cos, sin = kernels.rope_tables(seq, head_dim, theta=500000.0, device=device, dtype=dtype)
    cos, sin = cos[None].expand(batch, -1, -1), sin[None].expand(batch, -1, -1)  # HF's (batch, seq, head_dim)
    elem = q.element_size()
    qk = (q.numel() + k.numel()) * elem
    tables = 2 * seq * head_dim * elem  # the rows are shared by the batch: read once
    per_mode = {"fwd": 2 * qk + tables, "bwd": 2 * qk + tables, "fwd+bwd": 4 * qk + 2 * tables}
    rows = []
    for name, fn in _providers(device, dtype).items():
        row = {"op": "rope", "provider": name, "batch": batch, "seq": seq, "heads": f"{heads}/{kv_heads}",
               "head_dim": head_dim, "dtype": str(dtype).replace("torch.", "")}
        rows += common.bench_modes(fn, (q, k, cos, sin), [q, k], row, per_mode.__getitem__, device, copy_gbps)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rope", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=None, help="default 4 on GPU, 1 on CPU")
    parser.add_argument("--seqlens", default=None, help="comma-separated (default 1024,4096 on GPU, 512 on CPU)")
    parser.add_argument("--heads", default=None, help="q heads,kv heads (default 32,8 on GPU, 8,2 on CPU)")
    parser.add_argument("--head-dim", type=int, default=None, help="default 128 on GPU, 64 on CPU")
    parser.add_argument("--dtype", default=None, choices=list(common.DTYPES), help="default bf16 on GPU, fp32 on CPU")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = device == "cuda"
    batch = args.batch or (4 if gpu else 1)
    seqlens = [int(s) for s in (args.seqlens or ("1024,4096" if gpu else "512")).split(",")]
    heads, kv_heads = (int(h) for h in (args.heads or ("32,8" if gpu else "8,2")).split(","))
    head_dim = args.head_dim or (128 if gpu else 64)
    dtype = common.DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    return common.sweep_bandwidth("rope", bench_case,
                                  [(batch, seq, heads, kv_heads, head_dim, dtype, device) for seq in seqlens],
                                  device, x="seq")


if __name__ == "__main__":
    sys.exit(main())
