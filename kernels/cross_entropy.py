"""Cross-entropy and fused linear cross-entropy: Triton kernels, forward and backward.

Layout of this module: the kernels, their launchers, the ``fastlm::`` ops
(``cross_entropy``, ``linear_cross_entropy`` and their backwards; design in
:mod:`kernels._library`), the public functions. The math (per token, in fp32; see :mod:`kernels.reference.cross_entropy`
for the full statement with class weights ``w``, label smoothing ``eps`` and z-loss ``z``)::

    lse  = logsumexp(x)
    loss = (1 - eps) * w[y] * (lse - x[y]) + eps / C * sum_c w[c] * (lse - x[c]) + w[y] * z * lse^2
    dx   = p * ((1 - eps) * w[y] + eps / C * sum(w) + 2 z w[y] lse) - eps / C * w - (1 - eps) * w[y] * onehot(y)

With a softcap ``s``, ``x`` is ``s * tanh(logits / s)`` (computed as loaded, from
one exponential) and ``dx`` is multiplied by ``1 - (x / s)^2``. The kernel can
also store each row's ``z * lse^2`` (``return_z_loss``).

The gradient of the loss is known as soon as ``lse`` is, so the forward kernel
writes it: one program per row, a first sweep over the vocabulary for ``lse``
(an online log-sum-exp kept per lane, one exponential per element, reduced across
lanes once at the end), a second sweep that writes the gradient. Rows of up to
``_ONE_PASS_MAX`` classes are held in registers and read once. The gradient goes
to a separate buffer unless ``inplace_backward=True``, which overwrites the
logits. Eagerly, the backward scales that buffer by the upstream gradient in
place, where a kernel skips every row whose upstream gradient is exactly 1 (the
usual ``loss.backward()``), so forward+backward moves the logits about three
times and never holds a second gradient-sized buffer. Under torch.compile the
``fastlm::cross_entropy`` op runs instead: an op's output may not change after it
returns, so its backward multiplies out of place and the compiler fuses the
multiply and reuses the buffer.

``linear_cross_entropy`` computes ``input @ weight.T + bias`` a chunk of tokens at
a time with cuBLAS and runs the kernel above on each chunk's logits in place: the
chunk loop is :mod:`kernels._chunked_linear_cross_entropy` (pure PyTorch apart
from the per-chunk loss), which the reference backend runs too, with the
pure-PyTorch per-chunk loss.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._autograd import first_order_only, triton_only_first_order
from ._backend import use_triton
from ._launch import KernelSpec, TRITON_DTYPE, as_rows, next_power_of_2, unique_specs
from ._validate import as_int64, check_float, check_same_device, check_same_dtype
from . import reference
from ._chunked_linear_cross_entropy import default_chunk_size, linear_cross_entropy_chunks
from ._library import autocast_dtype, autocast_inputs, check_values, define_op, launch, no_tensor, present
from ._triton_math import tanh
from .reference.cross_entropy import REDUCTIONS, cross_entropy_rows, mean_scale, reduce_loss

# ----------------------------------------------------------------------------- kernels


@triton.jit
def _softcap(x, softcap):
    """``softcap * tanh(x / softcap)``; -inf (padding) maps to -softcap, as torch's tanh does."""
    return softcap * tanh(x / softcap)


@triton.jit
def _ce_fwd_kernel(
    LOGITS, GRAD, TARGET, WEIGHT, WEIGHT_SUM, GRAD_SCALE, LOSS, Z_ROWS,
    C, stride_logits, stride_grad, stride_scale,
    ignore_index, label_smoothing, z_loss, softcap,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    STORE_Z: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_C: tl.constexpr, ONE_PASS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = LOGITS + row * stride_logits
    g_row = GRAD + row * stride_grad
    cols = tl.arange(0, BLOCK_C)
    y = tl.load(TARGET + row)
    if y == ignore_index:
        tl.store(LOSS + row, 0.0)
        if STORE_Z:
            tl.store(Z_ROWS + row, 0.0)
        if COMPUTE_GRAD:
            zero = tl.zeros([BLOCK_C], dtype=tl.float32).to(GRAD.dtype.element_ty)
            for off in range(0, C, BLOCK_C):
                tl.store(g_row + off + cols, zero, mask=off + cols < C)
    else:
        # Targets were checked on the host (unless the caller opted out); clamping keeps
        # an unchecked bad target from reading out of bounds.
        y = tl.minimum(tl.maximum(y, 0), C - 1)
        x_y = tl.load(x_row + y).to(tl.float32)
        if HAS_SOFTCAP:
            x_y = _softcap(x_y, softcap)
        if HAS_WEIGHT:
            w_y = tl.load(WEIGHT + y)
            w_sum = tl.load(WEIGHT_SUM)
        else:
            w_y = 1.0
            w_sum = C * 1.0

        if ONE_PASS:
            mask = cols < C
            x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            if HAS_SOFTCAP:  # the capped logits from here on; padding stays -inf
                x = tl.where(mask, _softcap(x, softcap), float("-inf"))
            m = tl.max(x, axis=0)
            e = tl.exp(x - m)
            s = tl.sum(e, axis=0)
            lse = m + tl.log(s)
            if HAS_SMOOTHING:
                wx = tl.where(mask, x, 0.0)
                if HAS_WEIGHT:
                    wx *= tl.load(WEIGHT + cols, mask=mask, other=0.0)
                sum_wx = tl.sum(wx, axis=0)
        else:
            # Online log-sum-exp per lane: lane j keeps its running max m_j and
            # s_j = sum exp(x - m_j). One exponential per element: exp(-|x - m_j|) is
            # either the new term (x <= m_j) or the rescale of the old sum (x > m_j).
            m_vec = tl.full([BLOCK_C], float("-inf"), dtype=tl.float32)
            s_vec = tl.zeros([BLOCK_C], dtype=tl.float32)
            wx_vec = tl.zeros([BLOCK_C], dtype=tl.float32)
            for off in range(0, C, BLOCK_C):
                c = off + cols
                mask = c < C
                x = tl.load(x_row + c, mask=mask, other=float("-inf")).to(tl.float32)
                if HAS_SOFTCAP:
                    x = tl.where(mask, _softcap(x, softcap), float("-inf"))
                bigger = x > m_vec
                e = tl.exp(-tl.abs(x - m_vec))
                e = tl.where(x == float("-inf"), 0.0, e)  # -inf - -inf is NaN; a -inf logit adds 0
                s_vec = tl.where(bigger, s_vec * e + 1.0, s_vec + e)
                m_vec = tl.where(bigger, x, m_vec)
                if HAS_SMOOTHING:
                    wx = tl.where(mask, x, 0.0)
                    if HAS_WEIGHT:
                        wx *= tl.load(WEIGHT + c, mask=mask, other=0.0)
                    wx_vec += wx
            m = tl.max(m_vec, axis=0)
            s = tl.sum(s_vec * tl.exp(m_vec - m), axis=0)
            lse = m + tl.log(s)
            if HAS_SMOOTHING:
                sum_wx = tl.sum(wx_vec, axis=0)

        loss = (1.0 - label_smoothing) * w_y * (lse - x_y)
        coef_p = (1.0 - label_smoothing) * w_y
        if HAS_SMOOTHING:
            loss += label_smoothing / C * (w_sum * lse - sum_wx)
            coef_p += label_smoothing / C * w_sum
        if HAS_Z_LOSS:  # weighted by the class weight as the rest of the token's loss
            loss += z_loss * w_y * lse * lse
            coef_p += 2.0 * z_loss * w_y * lse
        tl.store(LOSS + row, loss)
        if STORE_Z:  # the z-loss term of this row's loss, for logging
            tl.store(Z_ROWS + row, z_loss * w_y * lse * lse)

        if COMPUTE_GRAD:
            scale = tl.load(GRAD_SCALE + row * stride_scale)
            coef_p *= scale
            coef_y = (1.0 - label_smoothing) * w_y * scale
            coef_s = label_smoothing / C * scale
            if ONE_PASS:
                g = e * (coef_p / s)  # p = e / s: no second exponential
                if HAS_SMOOTHING:
                    if HAS_WEIGHT:
                        g -= coef_s * tl.load(WEIGHT + cols, mask=mask, other=0.0)
                    else:
                        g -= coef_s
                g = tl.where(cols == y, g - coef_y, g)
                if HAS_SOFTCAP:  # d(softcap * tanh(v / softcap))/dv = 1 - tanh^2 (padding's -inf kept out)
                    t = tl.where(mask, x / softcap, 0.0)
                    g *= 1.0 - t * t
                tl.store(g_row + cols, g.to(GRAD.dtype.element_ty), mask=mask)
            else:
                for off in range(0, C, BLOCK_C):
                    c = off + cols
                    mask = c < C
                    x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
                    if HAS_SOFTCAP:
                        x = _softcap(x, softcap)
                    g = tl.exp(x - lse) * coef_p
                    if HAS_SMOOTHING:
                        if HAS_WEIGHT:
                            g -= coef_s * tl.load(WEIGHT + c, mask=mask, other=0.0)
                        else:
                            g -= coef_s
                    g = tl.where(c == y, g - coef_y, g)
                    if HAS_SOFTCAP:
                        t = x / softcap
                        g *= 1.0 - t * t
                    tl.store(g_row + c, g.to(GRAD.dtype.element_ty), mask=mask)


@triton.jit
def _ce_scale_kernel(GRAD, GRAD_LOSS, C, stride_grad, stride_gl, BLOCK_C: tl.constexpr):
    # GRAD[row] *= GRAD_LOSS[row]; a row whose factor is exactly 1 is neither read nor written.
    row = tl.program_id(0).to(tl.int64)
    g = tl.load(GRAD_LOSS + row * stride_gl).to(tl.float32)
    if g != 1.0:
        cols = tl.arange(0, BLOCK_C)
        g_row = GRAD + row * stride_grad
        for off in range(0, C, BLOCK_C):
            c = off + cols
            mask = c < C
            d = tl.load(g_row + c, mask=mask, other=0.0).to(tl.float32)
            tl.store(g_row + c, (d * g).to(GRAD.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers

_ONE_PASS_MAX = 8192  # widest row held in registers (8 values a thread at 32 warps)
_LOOP_BLOCK_C = 2048  # vocabulary chunk per loop step on wider rows (8 values a thread at 8 warps)
_SCALE_BLOCK_C = 4096


def _fwd_config(c: int) -> tuple[int, bool, int, int]:
    """(BLOCK_C, ONE_PASS, num_warps, num_stages) of the forward for rows of ``c`` classes.

    Chosen by compiling every feature combination for sm_90 and sm_80, with and
    without the launcher's 16-alignment hints (triton 3.8): at 16 values a thread
    the loop kernel (8192 x 16 warps, 4096 x 16 warps without alignment) and the
    8192-wide one-pass kernel spill a few bytes in some combinations; these do not.
    num_stages is 1: these loops hold no dot for the pipeliner to overlap.
    """
    block = max(16, next_power_of_2(c))
    if block <= _ONE_PASS_MAX:
        return block, True, 4 if block <= 2048 else 8 if block <= 4096 else 32, 1
    return _LOOP_BLOCK_C, False, 8, 1


def _scale_config(c: int) -> tuple[int, int]:
    """(BLOCK_C, num_warps) of the backward's in-place scaling."""
    block = min(max(16, next_power_of_2(c)), _SCALE_BLOCK_C)
    return block, 4 if block <= 2048 else 8


def _cross_entropy_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    grad_scale: torch.Tensor | None = None,
    grad_out: torch.Tensor | None = None,
    *,
    softcap: float = 0.0,
    z_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row fp32 loss of ``(n, C)`` logits (unit stride along C), optionally writing the gradient.

    Same contract as :func:`kernels.reference.cross_entropy.cross_entropy_rows`:
    ``grad_out`` (may be ``logits``) receives ``dloss_i/dlogits_i * grad_scale_i``;
    ``grad_scale`` is fp32 with 1 element or one per row.
    """
    n, C = logits.shape
    loss = torch.empty((n,), dtype=torch.float32, device=logits.device)
    if n == 0:
        return loss
    target = target.long().contiguous()  # the kernel reads row i's at TARGET + i: a strided column would misread
    if weight is not None:
        weight = weight.detach().float().contiguous()
        weight_sum = weight.sum().reshape(1)
    compute_grad = grad_out is not None
    if compute_grad:
        grad_scale = grad_scale.float()
        stride_scale = grad_scale.stride(0) if grad_scale.numel() > 1 else 0
    block, one_pass, num_warps, num_stages = _fwd_config(C)
    launch(_ce_fwd_kernel)[(n,)](
        logits, grad_out if compute_grad else logits, target,
        weight if weight is not None else loss, weight_sum if weight is not None else loss,
        grad_scale if compute_grad else loss, loss, z_rows if z_rows is not None else loss,
        C, logits.stride(0), grad_out.stride(0) if compute_grad else 0, stride_scale if compute_grad else 0,
        ignore_index, float(label_smoothing), float(z_loss), float(softcap),
        HAS_WEIGHT=weight is not None, HAS_SMOOTHING=label_smoothing > 0, HAS_Z_LOSS=z_loss > 0,
        HAS_SOFTCAP=softcap > 0,
        STORE_Z=z_rows is not None, COMPUTE_GRAD=compute_grad, BLOCK_C=block, ONE_PASS=one_pass,
        num_warps=num_warps, num_stages=num_stages,
    )
    return loss


def _scale_rows_(grad: torch.Tensor, grad_loss: torch.Tensor) -> None:
    """``grad[i] *= grad_loss[i]`` in place; ``grad_loss`` has 1 element (every row) or one per row."""
    n, C = grad.shape
    if n == 0:
        return
    grad_loss = grad_loss.float().reshape(-1)
    block, num_warps = _scale_config(C)
    launch(_ce_scale_kernel)[(n,)](
        grad, grad_loss, C, grad.stride(0), grad_loss.stride(0) if grad_loss.numel() > 1 else 0,
        BLOCK_C=block, num_warps=num_warps,
    )


def _aligned(sig: dict[str, str]) -> dict:
    """The usual launch: pointers, the vocabulary (e.g. 32000, 128256) and row strides are multiples of 16."""
    return {"divisible_by_16": tuple(k for k in sig if sig[k].startswith("*") or k in ("C", "stride_logits",
                                                                                      "stride_grad"))}


def compile_specs() -> list[KernelSpec]:
    """Every configuration the launchers above can pick, for the static compile check."""
    specs = []
    # One vocabulary per configuration _fwd_config/_scale_config can return.
    vocabs = [1 << k for k in range(4, 14)] + [32000]
    feature_sets = [
        dict(HAS_WEIGHT=False, HAS_SMOOTHING=False, HAS_Z_LOSS=False, HAS_SOFTCAP=False, STORE_Z=False),  # usual
        dict(HAS_WEIGHT=False, HAS_SMOOTHING=False, HAS_Z_LOSS=False, HAS_SOFTCAP=True, STORE_Z=False),  # Gemma 2
        dict(HAS_WEIGHT=True, HAS_SMOOTHING=True, HAS_Z_LOSS=True, HAS_SOFTCAP=True, STORE_Z=True),  # every branch
    ]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        t = "*" + TRITON_DTYPE[dtype]
        fwd_sig = {"LOGITS": t, "GRAD": t, "TARGET": "*i64"}
        fwd_sig |= {k: "*fp32" for k in ("WEIGHT", "WEIGHT_SUM", "GRAD_SCALE", "LOSS", "Z_ROWS")}
        # Python ints reach the kernel as i32 below 2^31; the kernels widen row offsets to int64 themselves.
        fwd_sig |= {"C": "i32", "stride_logits": "i32", "stride_grad": "i32", "stride_scale": "i32"}
        fwd_sig |= {"ignore_index": "i32", "label_smoothing": "fp32", "z_loss": "fp32", "softcap": "fp32"}
        scale_sig = {"GRAD": t, "GRAD_LOSS": "*fp32", "C": "i32", "stride_grad": "i32", "stride_gl": "i32"}
        for c in vocabs:
            block, one_pass, num_warps, num_stages = _fwd_config(c)
            for features in feature_sets:
                for compute_grad in (False, True):
                    k = features | {"COMPUTE_GRAD": compute_grad, "BLOCK_C": block, "ONE_PASS": one_pass}
                    specs.append(KernelSpec(_ce_fwd_kernel, fwd_sig | {n: "constexpr" for n in k}, k, num_warps,
                                            num_stages, label=f"C={c} {dtype}", extra=_aligned(fwd_sig)))
            block, num_warps = _scale_config(c)
            k = {"BLOCK_C": block}
            specs.append(KernelSpec(_ce_scale_kernel, scale_sig | {"BLOCK_C": "constexpr"}, k, num_warps,
                                    label=f"C={c} {dtype}", extra=_aligned(scale_sig)))
    return unique_specs(specs)


# ----------------------------------------------------------------------------- ops

# Design in kernels._library. fastlm::cross_entropy returns the loss and, when asked, the
# gradient of the logits (computed in the same sweep); its backward op scales that
# gradient in place by the upstream gradient. fastlm::linear_cross_entropy returns the
# loss and the gradients of input, weight and bias for 'mean'/'sum' (scaled in place by
# the backward), or the per-token losses for 'none', whose backward op sweeps again.
# Off the Triton backend both run the same code with the PyTorch per-chunk loss.


def _loss_scale(t: torch.Tensor, weight: torch.Tensor | None, ignore_index: int, reduction: str) -> torch.Tensor:
    """What each token's loss (and gradient) is multiplied by: 1 / (sum of counted weights) for 'mean', else 1."""
    return mean_scale(t, weight, ignore_index) if reduction == "mean" else torch.ones(1, device=t.device)


def _rows_fn(device: torch.device):
    return _cross_entropy_rows if use_triton(device) else cross_entropy_rows


def _z_rows(t: torch.Tensor, return_z_loss: bool) -> torch.Tensor | None:
    """The buffer the per-row z-loss terms go to when they are to be returned."""
    return torch.empty(t.shape, dtype=torch.float32, device=t.device) if return_z_loss else None


def _reduced(rows: torch.Tensor | None, target: torch.Tensor, reduction: str, scale: torch.Tensor) -> torch.Tensor:
    """Per-row fp32 values reduced as the loss is (``rows`` None: the op's stand-in for no output)."""
    if rows is None:
        return no_tensor(scale)
    return rows.view(target.shape) if reduction == "none" else reduce_loss(rows, reduction, scale)


def _cross_entropy_op(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, compute_grad,
                      return_z_loss):
    C = logits.shape[-1]
    x = as_rows(logits, C)
    t = target.reshape(-1)
    scale = _loss_scale(t, weight, ignore_index, reduction)
    grad = torch.empty(x.shape, dtype=x.dtype, device=x.device) if compute_grad else None
    z_rows = _z_rows(t, return_z_loss)
    loss_rows = _rows_fn(x.device)(x, t, weight, ignore_index, label_smoothing, z_loss, scale, grad, softcap=softcap,
                                   z_rows=z_rows)
    grad = grad.view(logits.shape) if grad is not None else no_tensor(logits)
    return _reduced(loss_rows, target, reduction, scale), grad, _reduced(z_rows, target, reduction, scale)


cross_entropy_op = define_op(
    "cross_entropy", _cross_entropy_op,
    "(Tensor logits, Tensor target, Tensor? weight, int ignore_index, str reduction, float label_smoothing, "
    "float z_loss, float softcap, bool compute_grad, bool return_z_loss) -> (Tensor, Tensor, Tensor)",
)

_SECOND_BACKWARD = (
    "{op} computes its gradients in the forward and hands them over in the first backward; "
    "backpropagating through it a second time is not supported (run it again)"
)


def _scaled(grad: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """``grad`` times the upstream gradient (a scalar, or one per row of ``grad``), out of place.

    Out of place because ``grad`` is an output of the forward op, which nothing may
    change afterwards (torch.compile relies on it); under torch.compile the compiler
    fuses this multiply and reuses the buffer.
    """
    if grad_loss.dim() and grad_loss.dim() < grad.dim():
        grad_loss = grad_loss.reshape(grad_loss.shape + (1,) * (grad.dim() - grad_loss.dim()))
    return grad * grad_loss


def _setup_cross_entropy(ctx, inputs, output):
    ctx.grad = present(output[1])  # handed over, scaled, by the one backward
    ctx.mark_non_differentiable(output[2])  # the z-loss, for logging: its part of the loss is in output[0]
    ctx.set_materialize_grads(False)  # the gradient output gets no gradient: no logits-sized zeros


@first_order_only(triton_only_first_order("cross_entropy"))
def _cross_entropy_grads(ctx, grad_loss, *_):
    if ctx.grad is None:
        raise RuntimeError(_SECOND_BACKWARD.format(op="cross_entropy"))
    grad, ctx.grad = ctx.grad, None  # freed as soon as the caller is done with the scaled copy
    return (_scaled(grad, grad_loss),) + (None,) * 9


cross_entropy_op.register_autograd(_cross_entropy_grads, setup_context=_setup_cross_entropy)
# No register_autocast: the kernel reads any float dtype and computes in fp32, so it gives what
# torch's cross-entropy gives under autocast (fp32 math, fp32 loss, gradient in the logits'
# dtype) without the fp32 copy of the logits that autocast's cast would make.


def _linear_cross_entropy_op(input, weight, bias, target, class_weight, need_input, need_weight, need_bias,
                             chunk_size, ignore_index, reduction, label_smoothing, z_loss, softcap, return_z_loss):
    x = input.reshape(-1, input.shape[-1])
    t = target.reshape(-1)
    scale = _loss_scale(t, class_weight, ignore_index, reduction)
    # 'none' defers the gradients to the backward, where the per-token upstream gradient is known.
    grad_scale = scale if (need_input or need_weight or need_bias) and reduction != "none" else None
    z_rows = _z_rows(t, return_z_loss)
    loss_rows, *grads = linear_cross_entropy_chunks(
        x, weight, bias, t, _rows_fn(x.device), chunk_size, ignore_index, label_smoothing, z_loss, grad_scale,
        need_input, need_weight, need_bias, class_weight=class_weight, softcap=softcap, z_rows=z_rows,
    )
    return (_reduced(loss_rows, target, reduction, scale), *_grads_out(grads, input, x),
            _reduced(z_rows, target, reduction, scale))


def _grads_out(grads, input, x):
    grad_input, grad_weight, grad_bias = (g if g is not None else no_tensor(x) for g in grads)
    return grad_input.view(input.shape) if grad_input.numel() else grad_input, grad_weight, grad_bias


def _linear_cross_entropy_backward_op(grad_loss, input, weight, bias, target, class_weight, need_input, need_weight,
                                      need_bias, chunk_size, ignore_index, label_smoothing, z_loss, softcap):
    x = input.reshape(-1, input.shape[-1])
    _, *grads = linear_cross_entropy_chunks(
        x, weight, bias, target.reshape(-1), _rows_fn(x.device), chunk_size, ignore_index, label_smoothing, z_loss,
        grad_loss.reshape(-1).float(), need_input, need_weight, need_bias, class_weight=class_weight, softcap=softcap,
    )
    return _grads_out(grads, input, x)


_LCE_ARGS = "bool need_input, bool need_weight, bool need_bias, SymInt chunk_size, int ignore_index"
linear_cross_entropy_op = define_op(
    "linear_cross_entropy", _linear_cross_entropy_op,
    f"(Tensor input, Tensor weight, Tensor? bias, Tensor target, Tensor? class_weight, {_LCE_ARGS}, str reduction, "
    "float label_smoothing, "
    "float z_loss, float softcap, bool return_z_loss) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
linear_cross_entropy_backward_op = define_op(
    "linear_cross_entropy_backward", _linear_cross_entropy_backward_op,
    f"(Tensor grad_loss, Tensor input, Tensor weight, Tensor? bias, Tensor target, Tensor? class_weight, {_LCE_ARGS}, "
    "float label_smoothing, float z_loss, float softcap) -> (Tensor, Tensor, Tensor)",
)


def _setup_linear_cross_entropy(ctx, inputs, output):
    input, weight, bias, target, class_weight, *needs_and_options = inputs
    chunk_size, ignore_index, ctx.reduction, label_smoothing, z_loss, softcap, _ = needs_and_options[3:]
    ctx.needs, ctx.options = needs_and_options[:3], (chunk_size, ignore_index, label_smoothing, z_loss, softcap)
    if ctx.reduction == "none":
        ctx.save_for_backward(input, weight, bias, target, class_weight)
    else:
        ctx.grads = [present(g) for g in output[1:4]]
    ctx.mark_non_differentiable(output[4])  # the z-loss, for logging
    ctx.set_materialize_grads(False)


_LCE_FIRST_ORDER = (
    "linear_cross_entropy does not support double backward (create_graph=True): its gradients are computed "
    "chunk by chunk outside autograd, on every backend; for higher-order gradients use "
    "cross_entropy(F.linear(input, weight, bias), target) with the reference backend"
)


@first_order_only(_LCE_FIRST_ORDER)
def _linear_cross_entropy_grads(ctx, grad_loss, *_):
    if ctx.reduction == "none":
        input, weight, bias, target, class_weight = ctx.saved_tensors
        grads = linear_cross_entropy_backward_op(grad_loss, input, weight, bias, target, class_weight, *ctx.needs,
                                                 *ctx.options)
        grads = [present(g) for g in grads]
    else:
        if ctx.grads is None:
            raise RuntimeError(_SECOND_BACKWARD.format(op="linear_cross_entropy"))
        grads, ctx.grads = ctx.grads, None
        grads = [_scaled(g, grad_loss) if g is not None else None for g in grads]
    return (*[g if need else None for g, need in zip(grads, ctx.needs)],) + (None,) * 12


linear_cross_entropy_op.register_autograd(_linear_cross_entropy_grads, setup_context=_setup_linear_cross_entropy)


# Eager only: the gradient buffer is scaled in place in the backward (no second logits-sized
# buffer), and inplace_backward writes it over the logits; an op can express neither (its outputs
# may not alias its inputs nor change after it returns). Under torch.compile the op runs.
class _CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, inplace,
                return_z_loss):
        C = logits.shape[-1]
        x = as_rows(logits, C)
        t = target.reshape(-1)
        scale = _loss_scale(t, weight, ignore_index, reduction)
        # Rows that share memory (expanded, stride 0) would read back another row's
        # gradient as their logits: those get a separate buffer, as the docstring says.
        rows_overlap = x.shape[0] > 1 and x.stride(0) < x.shape[1]
        grad = x if inplace and not rows_overlap else torch.empty(x.shape, dtype=x.dtype, device=x.device)
        if grad is x and x.data_ptr() == logits.data_ptr():
            # The logits are about to hold their gradient: autograd must refuse any
            # other backward that saved them.
            torch.autograd.graph.increment_version(logits)
        z_rows = _z_rows(t, return_z_loss)
        loss_rows = _cross_entropy_rows(x, t, weight, ignore_index, label_smoothing, z_loss, scale, grad,
                                        softcap=softcap, z_rows=z_rows)
        ctx.grad, ctx.shape = grad, logits.shape
        z = _reduced(z_rows, target, reduction, scale)
        ctx.mark_non_differentiable(z)  # the z-loss, for logging: its part of the loss is in the loss
        return _reduced(loss_rows, target, reduction, scale), z

    @staticmethod
    @first_order_only(triton_only_first_order("cross_entropy"))
    def backward(ctx, grad_loss, _):
        if ctx.grad is None:
            raise RuntimeError(_SECOND_BACKWARD.format(op="cross_entropy"))
        grad, ctx.grad = ctx.grad, None
        _scale_rows_(grad, grad_loss)
        return (grad.reshape(ctx.shape),) + (None,) * 9


class _LinearCrossEntropyFunction(torch.autograd.Function):
    """Eager only, for 'mean' and 'sum': the gradients the forward computed are scaled in place by
    the backward, so it never holds a second weight-sized (or input-sized) buffer, which the op
    (whose outputs may not change after it returns) cannot do. Under torch.compile the op runs."""

    @staticmethod
    def forward(ctx, input, weight, bias, target, class_weight, need_input, need_weight, need_bias, *options):
        loss, *grads, z = _linear_cross_entropy_op(input, weight, bias, target, class_weight, need_input, need_weight,
                                                   need_bias, *options)
        ctx.grads, ctx.needs = [present(g) for g in grads], (need_input, need_weight, need_bias)
        ctx.mark_non_differentiable(z)  # the z-loss, for logging
        return loss, z

    @staticmethod
    @first_order_only(_LCE_FIRST_ORDER)
    def backward(ctx, grad_loss, _):
        if ctx.grads is None:
            raise RuntimeError(_SECOND_BACKWARD.format(op="linear_cross_entropy"))
        grads, ctx.grads = ctx.grads, None  # a scalar upstream gradient: 'mean' and 'sum' only
        grads = [g.mul_(grad_loss) if g is not None and need else None for g, need in zip(grads, ctx.needs)]
        return (*grads,) + (None,) * 12


# ----------------------------------------------------------------------------- public API


def _check_options(reduction, label_smoothing, z_loss, ignore_index, softcap, return_z_loss):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) or not (
        0.0 <= label_smoothing <= 1.0
    ):
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    if isinstance(z_loss, bool) or not isinstance(z_loss, (int, float)) or not (0.0 <= z_loss < math.inf):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not 0.0 <= softcap < math.inf):
        raise ValueError(f"softcap must be None (off), 0 (off) or a finite number > 0, got {softcap!r}")
    if not isinstance(return_z_loss, bool):
        raise TypeError(f"return_z_loss must be a bool, got {return_z_loss!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not -(2**63) <= ignore_index < 2**63:  # targets are compared with it in int64
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")


def _check_target(target: torch.Tensor, batch_shape: torch.Size, input_name: str) -> torch.Tensor:
    """The checked target as int64: every accepted integer dtype compares with ``ignore_index`` exactly."""
    target = as_int64("target", target)
    if target.shape != batch_shape:
        raise ValueError(
            f"target must have the shape of {input_name} without its last dimension, {tuple(batch_shape)}; "
            f"got {tuple(target.shape)}"
        )
    return target


def _check_class_weight(name: str, weight: torch.Tensor | None, n_classes: int) -> None:
    if weight is not None:
        check_float(name, weight)
        if weight.shape != (n_classes,):
            raise ValueError(f"{name} must have shape ({n_classes},), one weight per class; got {tuple(weight.shape)}")


def _check_target_range(target: torch.Tensor, n_classes: int, ignore_index: int) -> None:
    """Raise if a target that is not ``ignore_index`` lies outside [0, n_classes). Synchronises with the device."""
    bad = (target != ignore_index) & ((target < 0) | (target >= n_classes))
    if bool(bad.any()):
        first = target[bad][0].item()
        raise ValueError(
            f"target holds class index {first}, outside [0, {n_classes}) and not ignore_index={ignore_index}"
        )


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average=None,
    ignore_index: int = -100,
    reduce=None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_z_loss: bool = False,
    inplace_backward: bool = False,
    check_targets: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for :func:`torch.nn.functional.cross_entropy` with class-index targets.

    ``input`` is ``(..., C)`` logits (classes in the *last* dimension, the language
    model layout; torch puts them in dimension 1 for inputs of more than two
    dimensions), ``target`` the ``(...)`` class indices. ``weight``,
    ``ignore_index``, ``reduction`` and ``label_smoothing`` mean what they mean in
    torch and combine the same way; ``size_average``/``reduce`` are torch's
    deprecated spellings of ``reduction``.

    Beyond torch:

    - ``z_loss``: adds ``z_loss * logsumexp(logits)^2`` to each non-ignored token's
      loss before the reduction, times the token's class weight ``weight[target]``
      like the rest of its loss: ``'mean'`` is the weighted mean of the per-token
      losses, z-loss included (PaLM's mean z-loss when unweighted), unchanged when
      every weight is scaled alike. (Liger-Kernel leaves the z-loss unweighted and
      divides it by the token count instead.)
    - ``softcap``: Gemma 2's final-logit softcapping, the loss (z-loss included) of
      ``softcap * tanh(logits / softcap)``, with its exact gradient; ``None`` or 0
      is off.
    - ``return_z_loss=True`` returns ``(loss, z_loss)``: ``z_loss`` is the z-loss
      term that ``loss`` already includes, reduced the same way (``'mean'``: divided
      by the same denominator; ``'none'``: per token), returned detached, for
      logging (0 when ``z_loss`` is 0). Computed in the same pass, no extra sync.
    - ``inplace_backward=True`` writes the gradient into ``input``'s memory during
      the forward, saving one logits-sized buffer. **This destroys the logits**: do
      not read them after the call. (If ``input`` is not stride-1 along classes, a
      copy is used and ``input`` is left intact. If rows of ``input`` share memory,
      e.g. ``expand``-ed logits, the gradient goes to a separate buffer and ``input``
      is left intact: written in place, one row's gradient would overwrite another
      row's logits; a separate buffer keeps the result right, where an error would
      reject an input the default path handles.) By default a separate buffer is
      used and ``input`` is never written.
    - ``check_targets=False`` skips the check (a device synchronisation) that every
      target is ``ignore_index`` or in ``[0, C)``; an unchecked bad target gives
      an undefined loss (never an out-of-bounds read).

    Deviations from torch: the loss is fp32 whatever the logits dtype (the gradient
    has the logits dtype); when every target is ignored, ``'mean'`` returns 0 with
    zero gradients instead of NaN (otherwise it divides by the sum of the selected
    class weights whatever its sign, as torch); class weights get no gradient.
    Under autocast it computes in fp32 and returns an fp32 loss, as torch's does
    (without copying the logits to fp32). The gradient is computed in the forward and scaled in
    place by the backward, so a second backward through the same graph
    (``retain_graph=True``) raises, and so does a double backward (``create_graph=True``;
    the reference backend supports it).
    """
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    check_float("input", input)
    if input.dim() == 0:
        raise ValueError("input must have a class dimension, got a 0-d tensor")
    C = input.shape[-1]
    if C == 0:
        raise ValueError("input must have at least one class (last dimension of size 0)")
    target = _check_target(target, input.shape[:-1], "input")
    _check_class_weight("weight", weight, C)
    check_same_device(input=input, target=target, weight=weight)
    _check_options(reduction, label_smoothing, z_loss, ignore_index, softcap, return_z_loss)
    if check_targets and check_values():
        _check_target_range(target, C, ignore_index)
    if not use_triton(input.device):
        return reference.cross_entropy(
            input, target, weight, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, return_z_loss=return_z_loss,
        )
    compute_grad = torch.is_grad_enabled() and input.requires_grad
    weight = weight.detach() if weight is not None else None  # a constant, as in torch
    options = (float(label_smoothing), float(z_loss), float(softcap or 0.0))
    if compute_grad and not torch.compiler.is_compiling():
        loss, z = _CrossEntropyFunction.apply(input, target, weight, ignore_index, reduction, *options,
                                              inplace_backward, return_z_loss)
    else:
        loss, _, z = cross_entropy_op(input, target, weight, ignore_index, reduction, *options, compute_grad,
                                      return_z_loss)
    return (loss, z) if return_z_loss else loss


def linear_cross_entropy(
    input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    class_weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_z_loss: bool = False,
    chunk_size: int | None = None,
    check_targets: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``cross_entropy(F.linear(input, weight, bias), target, ...)`` without materialising the logits.

    ``input`` is ``(..., H)``, ``weight`` ``(C, H)``, ``bias`` ``(C,)``, ``target``
    ``(...)``. Tokens are processed ``chunk_size`` at a time (default: a power of
    two such that a chunk's logits take at most 128 MiB as fp32 on CPU, 512 MiB on
    a GPU): their logits are computed into one reused buffer, overwritten with their
    gradient by the cross-entropy kernel, and folded into the gradients of
    ``input``, ``weight`` and ``bias`` (accumulated in fp32 over chunks), so the
    extra memory is ``O(chunk_size * C)`` plus an fp32 copy of the weight gradient
    for fp16/bf16 weights. For fp16/bf16 inputs a chunk's logits are fp32, straight
    from the GEMM's fp32 accumulator (as torch's chunked loss keeps them; rounded
    logits would cost the loss that precision): on CUDA cuBLAS writes them so
    (``out_dtype``) and the backward GEMMs take the chunk's gradient rounded to the
    inputs' dtype (one more half-size chunk buffer); elsewhere the operands are
    upcast, the weight once per call (an fp32 copy of it). The loss is summed in
    fp32 (the total in fp64).

    Semantics as :func:`cross_entropy`, ``softcap`` and ``return_z_loss`` included. ``class_weight`` ``(C,)``
    is :func:`cross_entropy`'s ``weight`` (torch's class weights; here ``weight`` is
    the head's): 'mean' divides by the sum of the selected targets' class weights
    (the number of non-ignored targets without them) in the whole call. For 'mean' and 'sum' the
    gradients are computed in the forward and scaled by the upstream gradient in
    the backward, so scaling the loss (gradient accumulation: ``(loss / k).backward()``)
    scales them exactly; a second backward through the same graph raises. For
    'none' the backward recomputes the logits with the per-token upstream gradient.
    First-order only, on both backends: ``create_graph=True`` raises.
    Targets are range-checked as in :func:`cross_entropy` (one device synchronisation;
    ``check_targets=False``, :func:`kernels.unchecked` or ``torch.compile`` skip it).
    Under autocast the GEMM runs in the autocast dtype, as ``F.linear`` does; the loss is fp32.
    """
    check_float("input", input)
    check_float("weight", weight)
    # Under autocast, as F.linear: the GEMM in the autocast dtype (the loss stays fp32).
    input, weight, bias = autocast_inputs(autocast_dtype(input.device), input, weight, bias)
    if input.dim() == 0:
        raise ValueError("input must have a feature dimension, got a 0-d tensor")
    H = input.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != H or weight.shape[0] == 0:
        raise ValueError(
            f"weight must have shape (num_classes, {H}) to match input's last dimension; got {tuple(weight.shape)}"
        )
    C = weight.shape[0]
    if bias is not None:
        check_float("bias", bias)
        if bias.shape != (C,):
            raise ValueError(f"bias must have shape ({C},), one per row of weight; got {tuple(bias.shape)}")
    check_same_dtype(input=input, weight=weight, bias=bias)
    target = _check_target(target, input.shape[:-1], "input")
    _check_class_weight("class_weight", class_weight, C)
    check_same_device(input=input, weight=weight, target=target, bias=bias, class_weight=class_weight)
    _check_options(reduction, label_smoothing, z_loss, ignore_index, softcap, return_z_loss)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if check_targets and check_values():
        _check_target_range(target, C, ignore_index)
    # Both backends run the op's chunk loop, so neither holds the (N, C) logits; the reference
    # backend with the pure-PyTorch per-chunk loss (kernels.reference.linear_cross_entropy,
    # the spec, materialises them and is not what training on the references should cost).
    chunk = chunk_size or default_chunk_size(target.numel(), C, input.device)
    grad_on = torch.is_grad_enabled()
    needs = [grad_on and p is not None and p.requires_grad for p in (input, weight, bias)]
    class_weight = class_weight.detach() if class_weight is not None else None  # a constant, as in torch
    args = (input, weight, bias, target, class_weight, *needs, chunk, ignore_index, reduction, float(label_smoothing),
            float(z_loss), float(softcap or 0.0), return_z_loss)
    if any(needs) and reduction != "none" and not torch.compiler.is_compiling():
        loss, z = _LinearCrossEntropyFunction.apply(*args)
    else:
        loss, *_, z = linear_cross_entropy_op(*args)
    return (loss, z) if return_z_loss else loss
