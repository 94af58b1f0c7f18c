"""SwiGLU / GeGLU, the gated MLP activation: fastlm against what a user would otherwise run.

    python -m bench.glu [--tokens 16384] [--hidden 11008,14336] [--ops swiglu,geglu,swiglu_packed] [--dtype bf16]

Providers: fastlm's Triton kernels (``kernels.swiglu``, ``geglu`` with the tanh
GELU, ``swiglu_packed`` on one (tokens, 2 * hidden) gate+up projection), our
pure-PyTorch reference (fp32 math on upcast copies; skipped in fp32, where it is
the eager formula), torch eager (``F.silu(gate) * up``; packed: ``chunk`` first),
``torch.compile`` of the same, and Liger-Kernel's ``LigerSiLUMulFunction`` /
``LigerGELUMulFunction`` when installed (not packed); on CPU, the reference
against eager. Forward, backward and forward+backward separately; each row:
median time, GB/s over the bytes the op must move (forward: gate, up in, y out;
backward: dy, gate, up in, dgate, dup out), its fraction of the device-to-device
copy bandwidth measured in the same run, and peak memory. Results go to
bench/results/<device>/glu.*.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import kernels
from bench import common

OPS = ("swiglu", "geglu", "swiglu_packed")


def _eager(op: str):
    if op == "swiglu":
        return lambda gate, up: F.silu(gate) * up
    if op == "geglu":
        return lambda gate, up: F.gelu(gate, approximate="tanh") * up
    return lambda gate_up: (lambda gate, up: F.silu(gate) * up)(*gate_up.chunk(2, dim=-1))


def _liger(op: str):
    """Liger-Kernel's function for ``op``, or None (not installed, no packed form, or it does not import)."""
    if op == "swiglu_packed" or not common.installed("liger_kernel"):
        return None
    try:
        from liger_kernel.ops.geglu import LigerGELUMulFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except Exception as e:  # an installed Liger that does not import here (version skew) is skipped
        print(f"liger_kernel installed but does not import: {type(e).__name__}: {e}")
        return None
    return LigerSiLUMulFunction.apply if op == "swiglu" else LigerGELUMulFunction.apply


def _providers(op: str, device: str, dtype: torch.dtype) -> dict:
    ours = {"swiglu": kernels.swiglu, "geglu": kernels.geglu, "swiglu_packed": kernels.swiglu_packed}[op]
    ref = {"swiglu": kernels.reference.swiglu, "geglu": kernels.reference.geglu,
           "swiglu_packed": kernels.reference.swiglu_packed}[op]
    eager = _eager(op)
    if device != "cuda":
        return {"fastlm-reference": ref, "torch": eager}
    providers = {"fastlm": ours}
    if dtype != torch.float32:
        providers["reference"] = ref
    providers.update({"torch": eager, "torch.compile": torch.compile(eager, dynamic=False)})
    liger = _liger(op)
    if liger is not None:
        providers["liger"] = liger
    return providers


def bench_op(op: str, tokens: int, hidden: int, dtype: torch.dtype, device: str, copy_gbps: float) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(0)
    if op == "swiglu_packed":
        leaves = [torch.randn(tokens, 2 * hidden, device=device, dtype=dtype, generator=g).requires_grad_()]
    else:
        leaves = [torch.randn(tokens, hidden, device=device, dtype=dtype, generator=g).requires_grad_()
                  for _ in range(2)]
    size = tokens * hidden * leaves[0].element_size()
    per_mode = {"fwd": 3 * size, "bwd": 5 * size, "fwd+bwd": 8 * size}
    rows = []
    for name, fn in _providers(op, device, dtype).items():
        row = {"op": op, "provider": name, "tokens": tokens, "hidden": hidden, "dtype": str(dtype).replace("torch.", "")}
        rows += common.bench_modes(fn, tuple(leaves), leaves, row, per_mode.__getitem__, device, copy_gbps)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.glu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=None, help="rows (default 16384 on GPU, 2048 on CPU)")
    parser.add_argument("--hidden", default=None, help="comma-separated MLP widths (default 11008,14336 on GPU)")
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--dtype", default=None, choices=list(common.DTYPES), help="default bf16 on GPU, fp32 on CPU")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokens = args.tokens or (16384 if device == "cuda" else 2048)
    hidden = [int(h) for h in (args.hidden or ("11008,14336" if device == "cuda" else "1024")).split(",")]
    dtype = common.DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    ops = args.ops.split(",")
    for op in ops:
        if op not in OPS:
            parser.error(f"--ops: unknown op {op!r}; choose from {', '.join(OPS)}")
    return common.sweep_bandwidth("glu", bench_op, [(op, tokens, n, dtype, device) for op in ops for n in hidden],
                                  device, x="hidden")


if __name__ == "__main__":
    sys.exit(main())
