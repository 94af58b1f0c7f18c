"""Activation memory of one Llama-style block, forward + backward, with and without the fused RoPE and SwiGLU.

    python -m bench.activation_memory [--batch 8] [--seq 512] [--hidden 512] [--heads 8,2] [--mlp 1408]

The block: RMSNorm, one q/k/v projection, RoPE, causal GQA attention, output
projection and residual, RMSNorm, one gate+up projection, SwiGLU, down projection
and residual. Four variants differ only in RoPE and the MLP activation: torch
eager as HF writes them (``q * cos + rotate_half(q) * sin``; ``F.silu(gate) * up``
on the halves of the projection) or fastlm's ``kernels.rope`` /
``kernels.swiglu_packed``. Every other op is the same PyTorch call in all four
(``kernels.reference``'s norms and attention), so the differences are the two ops'.

Two measurements per variant, both of tensors, not of an allocator:

- saved: the bytes autograd holds for the backward at the end of the forward
  (``torch.autograd.graph.saved_tensors_hooks``, each storage counted once;
  parameters and the cos/sin tables not counted);
- peak: the most bytes of tensor storage alive at once during forward +
  backward beyond what existed before (every op's outputs, tracked by a
  ``TorchDispatchMode`` until their storage is freed); on a GPU also
  ``torch.cuda.max_memory_allocated`` over the baseline.

Without a GPU the fused kernels run through Triton's interpreter on CPU (this
module restarts itself with ``TRITON_INTERPRET=1``): the same launches, outputs
and saved tensors as on a GPU. Results go to bench/results/<device>/activation_memory.*.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import weakref

import torch

if __name__ == "__main__" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    os.execve(sys.executable, [sys.executable, "-m", "bench.activation_memory", *sys.argv[1:]],
              dict(os.environ, TRITON_INTERPRET="1"))

import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

import kernels  # noqa: E402
from bench import common  # noqa: E402
from bench.rope import eager_rope  # noqa: E402

VARIANTS = {"eager": (False, False), "fused RoPE": (True, False), "fused SwiGLU": (False, True),
            "fused RoPE + SwiGLU": (True, True)}


class LiveBytes(TorchDispatchMode):
    """The peak of tensor-storage bytes alive at once among the storages ops create inside the block.

    Cyclic garbage is collected after every ``fastlm::`` op: Triton's interpreter keeps each
    launch's arguments in a reference cycle until the next collection (compiled launches do not).
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.tracked: set[int] = set()

    def _freed(self, ptr: int, nbytes: int) -> None:
        self.live -= nbytes
        self.tracked.discard(ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace == "fastlm":
            gc.collect()
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                ptr, nbytes = storage.data_ptr(), storage.nbytes()
                if ptr and ptr not in self.tracked:  # a new storage (a view shares its base's)
                    self.tracked.add(ptr)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._freed, ptr, nbytes)
        return out


def make_block(batch: int, seq: int, hidden: int, heads: int, kv_heads: int, mlp: int, device: str):
    """(params, cos, sin, x, upstream gradient) of a random block, fp32."""
    g = torch.Generator(device=device).manual_seed(0)
    head_dim = hidden // heads

    def w(*shape):
        return (torch.randn(*shape, device=device, generator=g) * 0.02).requires_grad_()

    params = {"ln_1": torch.ones(hidden, device=device, requires_grad=True),
              "qkv": w((heads + 2 * kv_heads) * head_dim, hidden), "o": w(hidden, heads * head_dim),
              "ln_2": torch.ones(hidden, device=device, requires_grad=True),
              "gate_up": w(2 * mlp, hidden), "down": w(hidden, mlp)}
    cos, sin = kernels.rope_tables(seq, head_dim, theta=500000.0, device=device)
    x = torch.randn(batch, seq, hidden, device=device, generator=g).requires_grad_()
    return params, cos, sin, x, torch.randn(batch, seq, hidden, device=device, generator=g)


def block(x, p, cos, sin, heads: int, kv_heads: int, fused_rope: bool, fused_mlp: bool) -> torch.Tensor:
    B, T, C = x.shape
    D = C // heads
    ref = kernels.reference
    h = ref.rms_norm(x, (C,), p["ln_1"], 1e-5)
    q, k, v = F.linear(h, p["qkv"]).split([heads * D, kv_heads * D, kv_heads * D], dim=-1)
    q = q.view(B, T, heads, D).transpose(1, 2)  # (B, H, T, D)
    k = k.view(B, T, kv_heads, D).transpose(1, 2)
    v = v.view(B, T, kv_heads, D).transpose(1, 2)
    if fused_rope:
        q, k = kernels.rope(q, k, cos, sin)
    else:
        q, k = eager_rope(q, k, cos[None], sin[None])
    o = ref.attention(q, k, v, causal=True)
    x = x + F.linear(o.transpose(1, 2).reshape(B, T, C), p["o"])
    h = ref.rms_norm(x, (C,), p["ln_2"], 1e-5)
    gate_up = F.linear(h, p["gate_up"])
    if fused_mlp:
        a = kernels.swiglu_packed(gate_up)
    else:
        gate, up = gate_up.chunk(2, dim=-1)
        a = F.silu(gate) * up
    return x + F.linear(a, p["down"])


def measure(variant: str, args, device: str) -> dict:
    fused_rope, fused_mlp = VARIANTS[variant]
    heads, kv_heads = args.heads
    params, cos, sin, x, grad = make_block(args.batch, args.seq, args.hidden, heads, kv_heads, args.mlp, device)
    constants = {t.untyped_storage().data_ptr() for t in (*params.values(), cos, sin)}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in constants:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with LiveBytes() as tracker:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = block(x, params, cos, sin, heads, kv_heads, fused_rope, fused_mlp)
        y.backward(grad)
        del y
    row = {"variant": variant, "tokens": args.batch * args.seq, "hidden": args.hidden, "mlp": args.mlp,
           "saved_MB": sum(saved.values()) / 2**20, "peak_MB": tracker.peak / 2**20}
    if device == "cuda":
        torch.cuda.synchronize()
        row["cuda_peak_MB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.activation_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", default="8,2", help="q heads,kv heads")
    parser.add_argument("--mlp", type=int, default=1408, help="the MLP width (Llama: about 8/3 x hidden)")
    args = parser.parse_args(argv)
    args.heads = tuple(int(h) for h in args.heads.split(","))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = [measure(variant, args, device) for variant in VARIANTS]
    eager = rows[0]
    for r in rows:
        r["saved_vs_eager"] = r["saved_MB"] / eager["saved_MB"]
        r["peak_vs_eager"] = r["peak_MB"] / eager["peak_MB"]
    meta = {"device": common.device_name(device), "torch": torch.__version__, "batch": args.batch, "seq": args.seq,
            "heads": "%d/%d" % args.heads, "dtype": "float32"}
    out = common.write_report("activation_memory", rows, device, meta=meta, x="variant", y="peak_MB", series="hidden")
    print(common.markdown_table(rows, list(rows[0]), meta))
    print(f"written to {out}/activation_memory.*")
    return 0


if __name__ == "__main__":
    sys.exit(main())
