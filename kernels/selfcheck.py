"""Self-check: every op's Triton kernel against its reference, forward and backward.

    python -m kernels.selfcheck

On a GPU the compiled kernels run on CUDA tensors; without one, the same
kernels run on CPU through Triton's interpreter (this module restarts itself
with ``TRITON_INTERPRET=1``, which must be set before kernels are decorated).
Judges every output and every gradient by the rule of :mod:`kernels.numerics`
(the tests' rule): its max absolute error against an fp32 (fp64 for fp32 inputs)
evaluation of the reference may be at most 2x the same-dtype reference's own
error (3x for attention's gradients) plus about one ulp. Prints one row per case,
for its tensor nearest its bound, and exits 1 if any tensor is over its bound.
"""

from __future__ import annotations

import os
import sys
import time

import torch

if __name__ == "__main__" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    os.execve(sys.executable, [sys.executable, "-m", "kernels.selfcheck", *sys.argv[1:]], dict(os.environ, TRITON_INTERPRET="1"))

import kernels  # noqa: E402
from kernels import reference  # noqa: E402
from kernels.numerics import compare, factor, golden_dtype, loss_atol  # noqa: E402

LOSSES = ("cross_entropy", "linear_cross_entropy")  # their output is a reduced loss: loss_atol's slack


def _randn(shapes, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(device, dtype) for s in shapes]


def _cases(device: str):
    """(name, dtype, kernel fn, reference fn, input factory); each fn maps inputs to a tuple of outputs.

    A name starts with the op's name in :data:`kernels.numerics.FACTORS`.
    """
    cases = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for m, n in ((64, 1000), (8, 4096)):
            make = lambda m=m, n=n, dtype=dtype: _randn(((m, n), (m, n), (n,), (n,)), device, dtype)  # noqa: E731
            cases.append((f"layer_norm {m}x{n}", dtype, lambda x, r, w, b: (kernels.layer_norm(x, x.shape[-1:], w, b),),
                          lambda x, r, w, b: (reference.layer_norm(x, x.shape[-1:], w, b),), make))
            cases.append((f"rms_norm {m}x{n}", dtype, lambda x, r, w, b: (kernels.rms_norm(x, x.shape[-1:], w, 1e-6),),
                          lambda x, r, w, b: (reference.rms_norm(x, x.shape[-1:], w, 1e-6),), make))
            cases.append((f"add_rms_norm {m}x{n}", dtype, lambda x, r, w, b: kernels.add_rms_norm(x, r, x.shape[-1:], w, 1e-6),
                          lambda x, r, w, b: reference.add_rms_norm(x, r, x.shape[-1:], w, 1e-6), make))

        # Cross-entropy with a third of the targets ignored, and label smoothing.
        n_tok, vocab, hidden = 48, 1000, 72
        target = torch.randint(0, vocab, (n_tok,), generator=torch.Generator().manual_seed(2))
        target[::3] = -100
        target = target.to(device)
        cases.append((f"cross_entropy {n_tok}x{vocab}", dtype,
                      lambda x: (kernels.cross_entropy(x, target, label_smoothing=0.1),),
                      lambda x: (reference.cross_entropy(x, target, label_smoothing=0.1),),
                      lambda dtype=dtype: _randn(((n_tok, vocab),), device, dtype)))
        cases.append((f"linear_cross_entropy {n_tok}x{hidden}->{vocab}", dtype,
                      lambda x, w: (kernels.linear_cross_entropy(x, w, target, chunk_size=16),),
                      lambda x, w: (reference.linear_cross_entropy(x, w, target, chunk_size=16),),
                      lambda dtype=dtype: _randn(((n_tok, hidden), (vocab, hidden)), device, dtype)))

        # Causal grouped-query attention with ragged lengths. The interpreter cannot
        # multiply bf16 (tests/kernels/test_attention.py checks bf16 on GPUs only).
        if dtype != torch.bfloat16 or device == "cuda":
            shapes = ((2, 4, 113, 64), (2, 2, 203, 64), (2, 2, 203, 64))
            cases.append(("attention causal GQA 113x203", dtype,
                          lambda q, k, v: (kernels.attention(q, k, v, causal=True),),
                          lambda q, k, v: (reference.attention(q, k, v, causal=True),),
                          lambda dtype=dtype: _randn(shapes, device, dtype)))
            # Packed sequences (lengths 0, 1 and across a block), sliding window, softcap, sinks.
            lens = [0, 1, 129, 70]
            cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
            packed = ((sum(lens), 4, 64), (sum(lens), 2, 64), (sum(lens), 2, 64), (4,))
            features = dict(causal=True, window_size=(48, 0), softcap=20.0)
            cases.append(("attention varlen window softcap sinks", dtype,
                          lambda q, k, v, s: (kernels.varlen_attention(q, k, v, cu, cu, 129, 129, **features, sinks=s),),
                          lambda q, k, v, s: (reference.varlen_attention(q, k, v, cu, cu, **features, sinks=s),),
                          lambda dtype=dtype: _randn(packed, device, dtype)))

        # RoPE with GQA, partial rotary and packed positions that restart; SwiGLU and the packed
        # exact GeGLU. Inputs at scale 0.5 keep outputs O(1), the magnitude the slack is one ulp of.
        cos, sin = kernels.rope_tables(64, 48, theta=10000.0, device=device)
        positions = torch.cat([torch.arange(40), torch.arange(37)]).to(device)
        half = lambda shapes, dtype=dtype: [t * 0.5 for t in _randn(shapes, device, dtype)]  # noqa: E731
        cases.append(("rope GQA 77 tokens, rotary 48 of 64", dtype,
                      lambda q, k: kernels.rope(q, k, cos, sin, position_ids=positions),
                      lambda q, k: reference.rope(q, k, cos, sin, position_ids=positions),
                      lambda half=half: half(((2, 4, 77, 64), (2, 2, 77, 64)))))
        cases.append(("swiglu 96x1500", dtype, lambda g, u: (kernels.swiglu(g, u),),
                      lambda g, u: (reference.swiglu(g, u),), lambda half=half: half(((96, 1500), (96, 1500)))))
        cases.append(("geglu packed exact 96x2x700", dtype, lambda gu: (kernels.geglu_packed(gu, "none"),),
                      lambda gu: (reference.geglu_packed(gu, "none"),), lambda half=half: half(((96, 1400),))))
    return cases


def _outputs_and_grads(fn, inputs):
    """(outputs, gradients of the inputs) for a random upstream gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in outs]
    torch.autograd.backward(outs, grads)
    return [o.detach() for o in outs], [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]


def _judge(op, dtype, got, want, same):
    """(err, torch_err, bound) of the case's tensor nearest its bound, under the rule of kernels.numerics."""
    results = []
    for gradient, tensors in enumerate(zip(got, want, same)):
        for out, ref32, ref_lowp in zip(*tensors):
            atol = loss_atol(ref32, dtype) if op in LOSSES and not gradient else None
            results.append(compare(out, ref32, ref_lowp, factor=factor(op, gradient=bool(gradient)), atol=atol))
    return max(results, key=lambda r: r[0] / r[2])


def main() -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mode = "compiled Triton on " + torch.cuda.get_device_name() if device == "cuda" else "Triton interpreter on CPU"
    print(f"fastlm kernels self-check ({mode})\n")
    print(f"{'op':<36} {'dtype':<9} {'max err':>10} {'torch err':>10} {'bound':>10}  {'time':>6}  result")
    failed = 0
    for name, dtype, fn, ref, make in _cases(device):
        inputs = make()
        start = time.perf_counter()
        with kernels.use_backend("triton"):
            got = _outputs_and_grads(fn, inputs)
        elapsed = time.perf_counter() - start
        want = _outputs_and_grads(ref, [t.to(golden_dtype(dtype)) for t in inputs])
        same = _outputs_and_grads(ref, inputs)
        err, torch_err, bound = _judge(name.split()[0], dtype, got, want, same)
        ok = err <= bound
        failed += not ok
        print(f"{name:<36} {str(dtype).replace('torch.', ''):<9} {err:>10.2e} {torch_err:>10.2e} {bound:>10.2e}  {elapsed:>5.2f}s  {'ok' if ok else 'FAIL'}")
    print(f"\n{'all ops match their references' if not failed else f'{failed} case(s) failed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
