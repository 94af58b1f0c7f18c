"""The chunk loop of ``linear_cross_entropy``: ``cross_entropy(input @ weight.T + bias, target)`` without the logits.

It walks the tokens in chunks; for each chunk it computes the logits into one
reused buffer (``torch.mm``: cuBLAS on a GPU; fp32 for fp16/bf16 inputs, straight
from the GEMM's fp32 accumulator), has a per-chunk
function overwrite them with the loss's gradient, and folds that into the
gradients of input, weight and bias (accumulated in fp32 over the chunks).
The per-chunk loss and gradient is a parameter (``rows_fn``): the Triton
kernel :func:`kernels.cross_entropy._cross_entropy_rows`, or its pure-PyTorch
twin :func:`kernels.reference.cross_entropy.cross_entropy_rows`, which is what
the reference backend runs (so it never holds the ``(N, C)`` logits either).
The ``fastlm::linear_cross_entropy`` op (:mod:`kernels.cross_entropy`) runs this
loop and picks one through the backend switch.

This is implementation, not spec: the spec is
:func:`kernels.reference.linear_cross_entropy`, which holds the whole logits.
The reduction rule (``mean_scale``, ``reduce_loss``) is the spec's own.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.utils._python_dispatch import _disable_current_modes

RowsFn = Callable[..., torch.Tensor]

# Default chunk: the logits of one chunk take at most about this many bytes (as
# fp32). On CPU, 512 rows of a 50k vocabulary keep the GEMMs as fast as one big
# one (bench/cross_entropy.py) at under a fifth of the naive peak memory; a GPU
# wants longer GEMMs, since every chunk also reads and writes the whole fp32
# weight gradient.
_CHUNK_BYTES = {"cpu": 128 << 20, "cuda": 512 << 20}


def default_chunk_size(n_rows: int, n_classes: int, device: torch.device) -> int:
    budget = _CHUNK_BYTES.get(device.type, _CHUNK_BYTES["cpu"])
    rows = max(1, budget // (4 * max(n_classes, 1)))
    rows = 1 << (rows.bit_length() - 1)  # a power of two, for tidy GEMM shapes
    return max(1, min(n_rows, rows))


@functools.lru_cache(maxsize=None)
def _has_addmm_out_dtype(device: torch.device) -> bool:
    """Whether this torch has ``addmm``/``mm(..., out_dtype=float32)`` (cuBLAS low-precision GEMM, fp32 output) here."""
    # Probed on real tensors even while an op's implementation is traced (fake tensors
    # cannot be read back); cached, so a run pays this one host sync once per device.
    with unset_fake_temporarily(), _disable_current_modes():
        acc = torch.zeros(1, 1, device=device)
        one = torch.ones(1, 1, dtype=torch.bfloat16, device=device)
        try:
            torch.addmm(acc, one, one, out_dtype=torch.float32, out=acc)
            product = torch.mm(one, one, out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):
            return False
        return acc.item() == 1.0 and product.dtype == torch.float32


def _add_mm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, block_bytes: int = 64 << 20) -> None:
    """``acc += a @ b`` into the fp32 ``acc`` for low-precision ``a``, ``b``: no low-precision partial sums.

    On CUDA, one GEMM accumulating into ``acc`` in fp32 when torch has it. Otherwise
    in row blocks of ``acc`` (no full-size temporary): on CPU in fp32 (upcast
    operands), on a GPU from low-precision products, each rounded once and summed in fp32.
    """
    if acc.is_cuda and _has_addmm_out_dtype(acc.device):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        return
    rows = max(1, block_bytes // (6 * acc.shape[1]))
    b32 = b.float() if not acc.is_cuda else None
    for r in range(0, acc.shape[0], rows):
        if b32 is not None:
            acc[r : r + rows].addmm_(a[r : r + rows].float(), b32)
        else:
            acc[r : r + rows] += torch.mm(a[r : r + rows], b).float()


def linear_cross_entropy_chunks(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    rows_fn: RowsFn,
    chunk_size: int,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    grad_scale: torch.Tensor | None,
    need_input: bool,
    need_weight: bool,
    need_bias: bool,
    *,
    class_weight: torch.Tensor | None = None,
    softcap: float = 0.0,
    z_rows: torch.Tensor | None = None,
):
    """The chunk loop: ``(loss_rows, grad_input, grad_weight, grad_bias)`` of ``(N, H)`` input.

    ``grad_scale`` (fp32, 1 element or ``N``) multiplies every gradient; ``None``
    computes the losses only. Gradients are ``None`` where not asked for.
    ``z_rows`` (fp32, ``N``), when given, receives each row's z-loss term.
    ``grad_weight``/``grad_bias`` are accumulated over chunks in fp32 and returned
    in the dtype of ``weight``.
    """
    N, H = x.shape
    C = weight.shape[0]
    with_grad = grad_scale is not None
    need_input, need_weight, need_bias = (with_grad and f for f in (need_input, need_weight, need_bias))
    loss_rows = torch.empty((N,), dtype=torch.float32, device=x.device)
    # fp16/bf16 logits stay fp32 from the GEMM's accumulator on (torch's chunked loss does
    # the same): rounding them to the inputs' dtype would cost the loss that precision.
    logits_dtype = torch.promote_types(x.dtype, torch.float32)
    low_precision = logits_dtype != x.dtype
    # cuBLAS writes a low-precision GEMM's fp32 accumulator out directly; elsewhere the
    # operands are upcast: the weight once per call (an fp32 copy, 4*C*H bytes), each
    # chunk of input as it comes (4*chunk*H bytes).
    out_dtype_gemm = low_precision and x.is_cuda and _has_addmm_out_dtype(x.device)
    weight32 = weight.float() if low_precision and not out_dtype_gemm else None
    chunk_rows = min(chunk_size, N)
    chunk_buffer = torch.empty((chunk_rows, C), dtype=logits_dtype, device=x.device)  # reused by every chunk
    # The backward GEMMs with the low-precision weight on cuBLAS take the chunk's gradient rounded to it.
    lowp_buffer = torch.empty((chunk_rows, C), dtype=x.dtype, device=x.device) if out_dtype_gemm and (
        need_input or need_weight) else None
    grad_input = torch.empty((N, H), dtype=x.dtype, device=x.device) if need_input else None
    grad_weight = torch.zeros((C, H), dtype=torch.float32, device=x.device) if need_weight else None
    grad_bias = torch.zeros((C,), dtype=torch.float32, device=x.device) if need_bias else None
    per_row = with_grad and grad_scale.numel() > 1
    for start in range(0, N, chunk_size):
        end = min(start + chunk_size, N)
        xc = x[start:end]
        logits = chunk_buffer[: end - start]  # (n, C)
        if not low_precision and bias is not None:
            torch.addmm(bias, xc, weight.t(), out=logits)
        elif not low_precision:
            torch.mm(xc, weight.t(), out=logits)
        else:
            if out_dtype_gemm:
                torch.mm(xc, weight.t(), out_dtype=torch.float32, out=logits)
            else:
                xc = xc.float()
                torch.mm(xc, weight32.t(), out=logits)
            if bias is not None:
                logits.add_(bias)
        scale = (grad_scale[start:end] if per_row else grad_scale) if with_grad else None
        loss_rows[start:end] = rows_fn(
            logits, target[start:end], class_weight, ignore_index, label_smoothing, z_loss, scale,
            logits if with_grad else None, softcap=softcap, z_rows=z_rows[start:end] if z_rows is not None else None,
        )
        if not with_grad:
            continue
        dlogits = logits  # now holds the gradient of this chunk's logits
        if need_bias:
            grad_bias += dlogits.sum(dim=0, dtype=torch.float32)
        if lowp_buffer is not None:
            dlogits = lowp_buffer[: end - start].copy_(dlogits)
        if need_input:
            if weight32 is not None:
                grad_input[start:end] = torch.mm(dlogits, weight32)
            else:
                torch.mm(dlogits, weight, out=grad_input[start:end])
        if need_weight:
            if dlogits.dtype == grad_weight.dtype and xc.dtype == grad_weight.dtype:
                grad_weight.addmm_(dlogits.t(), xc)
            else:
                _add_mm_fp32(grad_weight, dlogits.t(), xc)
    if grad_weight is not None and grad_weight.dtype != weight.dtype:
        grad_weight = grad_weight.to(weight.dtype)
    if grad_bias is not None and grad_bias.dtype != bias.dtype:
        grad_bias = grad_bias.to(bias.dtype)
    return loss_rows, grad_input, grad_weight, grad_bias
