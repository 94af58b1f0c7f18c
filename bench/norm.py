"""LayerNorm / RMSNorm / add+RMSNorm: fastlm against what a user would otherwise run.

    python -m bench.norm [--rows 16384] [--hidden 1024,2048,4096,8192,16384] [--dtype bf16]

Providers: fastlm's Triton kernels, our pure-PyTorch reference (``kernels.reference``:
statistics on fp32 copies of the inputs; skipped in fp32, where it is the same call as
torch eager), torch eager (``F.layer_norm``/``F.rms_norm``), ``torch.compile`` of the
same, and Liger-Kernel when installed; on CPU, our PyTorch reference against torch
eager. Forward, backward and forward+backward separately. Each row: median time,
achieved GB/s over the bytes the op must move, that as a fraction of the
device-to-device copy bandwidth measured in the same run, and peak memory. Results
go to bench/results/<device>/norm.*.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import kernels
from bench import common


def _providers(op: str, device: str, dtype: torch.dtype) -> dict:
    if op == "layer_norm":
        torch_fn = lambda x, r, w, b: F.layer_norm(x, x.shape[-1:], w, b)  # noqa: E731
        ours = lambda x, r, w, b: kernels.layer_norm(x, x.shape[-1:], w, b)  # noqa: E731
        ref = lambda x, r, w, b: kernels.reference.layer_norm(x, x.shape[-1:], w, b)  # noqa: E731
    elif op == "rms_norm":
        torch_fn = lambda x, r, w, b: F.rms_norm(x, x.shape[-1:], w, 1e-6)  # noqa: E731
        ours = lambda x, r, w, b: kernels.rms_norm(x, x.shape[-1:], w, 1e-6)  # noqa: E731
        ref = lambda x, r, w, b: kernels.reference.rms_norm(x, x.shape[-1:], w, 1e-6)  # noqa: E731
    else:  # add_rms_norm: the pre-norm block's residual add + norm
        def torch_fn(x, r, w, b):
            s = x + r
            return F.rms_norm(s, s.shape[-1:], w, 1e-6), s

        ours = lambda x, r, w, b: kernels.add_rms_norm(x, r, x.shape[-1:], w, 1e-6)  # noqa: E731
        ref = lambda x, r, w, b: kernels.reference.add_rms_norm(x, r, x.shape[-1:], w, 1e-6)  # noqa: E731
    if device != "cuda":
        return {"fastlm-reference": ref, "torch": torch_fn}
    providers = {"fastlm": ours}
    if dtype != torch.float32:  # in fp32 the reference's upcasts are no-ops: it is the "torch" call itself
        providers["reference"] = ref
    providers.update({"torch": torch_fn, "torch.compile": torch.compile(torch_fn, dynamic=False)})
    liger = _liger(op)
    if liger is not None:
        providers["liger"] = liger
    return providers


def _liger(op: str):
    """Liger-Kernel's function for ``op`` (liger-kernel 0.8's functional API), or None when it is not importable."""
    if not common.installed("liger_kernel"):
        return None
    try:
        from liger_kernel.transformers import functional as liger
    except Exception as e:  # an installed Liger that does not import here (version skew) is skipped
        print(f"liger_kernel installed but does not import: {type(e).__name__}: {e}")
        return None
    if op == "layer_norm":
        return lambda x, r, w, b: liger.liger_layer_norm(x, w, b, 1e-5)
    # Liger's RMSNorms default to in_place=True: the backward overwrites the upstream gradient
    # with dx. bench_op's upstream gradients belong to each provider, so only Liger's own change.
    if op == "rms_norm":
        return lambda x, r, w, b: liger.liger_rms_norm(x, w, 1e-6)
    if hasattr(liger, "liger_fused_add_rms_norm"):  # (normed, x + r), like kernels.add_rms_norm
        return lambda x, r, w, b: liger.liger_fused_add_rms_norm(x, r, w, 1e-6)
    return None


def _bytes_moved(op: str, mode: str, m: int, n: int, elem: int) -> int:
    """Bytes the op must read and write (inputs, outputs, gradients; weights are negligible)."""
    tensors = {  # (forward, backward) row-sized tensors touched
        "layer_norm": (2, 3),  # x -> y ; x, dy -> dx
        "rms_norm": (2, 3),
        "add_rms_norm": (4, 4),  # x, r -> y, s ; s, dy, ds -> dx
    }[op]
    count = {"fwd": tensors[0], "bwd": tensors[1], "fwd+bwd": tensors[0] + tensors[1]}[mode]
    return count * m * n * elem


def bench_op(op: str, m: int, n: int, dtype: torch.dtype, device: str, copy_gbps: float) -> list[dict]:
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, n, device=device, dtype=dtype, generator=g).requires_grad_()
    r = torch.randn(m, n, device=device, dtype=dtype, generator=g).requires_grad_()
    w = torch.randn(n, device=device, dtype=dtype, generator=g).requires_grad_()
    b = torch.randn(n, device=device, dtype=dtype, generator=g).requires_grad_() if op == "layer_norm" else None
    leaves = [t for t in (x, r, w, b) if t is not None]
    elem = x.element_size()
    rows = []
    for name, fn in _providers(op, device, dtype).items():
        row = {"op": op, "provider": name, "rows": m, "hidden": n, "dtype": str(dtype).replace("torch.", "")}
        rows += common.bench_modes(fn, (x, r, w, b), leaves, row, lambda mode: _bytes_moved(op, mode, m, n, elem),
                                   device, copy_gbps)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.norm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=None, help="rows (default 16384 on GPU, 2048 on CPU)")
    parser.add_argument("--hidden", default=None, help="comma-separated hidden sizes")
    parser.add_argument("--dtype", default=None, choices=list(common.DTYPES), help="default bf16 on GPU, fp32 on CPU")
    parser.add_argument("--ops", default="layer_norm,rms_norm,add_rms_norm")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m = args.rows or (16384 if device == "cuda" else 2048)
    hidden = [int(h) for h in (args.hidden or ("1024,2048,4096,8192,16384" if device == "cuda" else "1024,4096")).split(",")]
    dtype = common.DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    return common.sweep_bandwidth("norm", bench_op, [(op, m, n, dtype, device) for op in args.ops.split(",")
                                                     for n in hidden], device, x="hidden")


if __name__ == "__main__":
    sys.exit(main())
