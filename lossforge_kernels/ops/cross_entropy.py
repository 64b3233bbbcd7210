"""Kernel ops and autograd for the softmax cross-entropy family (CE, smoothing, focal, z-loss, softcap).

Kernel contract, the same for the Triton and the CUDA implementation (M rows of C classes):

cross_entropy_fwd_<b>(logits, target, weight, alpha, grad_scale, grad, ignore_index, label_smoothing,
                      z_loss, softcap, focal_gamma, focal_alpha) -> (loss_rows, stats)
  logits   (M, C) fp32/fp16/bf16, stride(1) == 1, any stride(0)
  target   (M,) int64 contiguous class indices, or (M, C) class probabilities in logits' dtype,
           stride(1) == 1 (any stride(0))
  weight   (C,) fp32 contiguous class weights, or None
  alpha    (C,) fp32 contiguous focal alpha per class, or None (then the float focal_alpha is used)
  grad_scale  0-dim fp32: the gradient's multiplier (1/divisor for 'mean', 1 for 'sum'), read on device
  grad     (M, C) buffer in logits' dtype, stride(1) == 1, or None for no gradient. It may be the
           logits themselves (inplace_backward): every element is read before it is overwritten.
  softcap  0 means off; focal_gamma 0 and focal_alpha 1 mean no focal term.
  returns  loss_rows (M,) fp32, the unreduced loss; stats (M, 4) fp32, what the backward needs:
           class targets: [lse, smoothed weighted CE before the focal factor, log(1 - p_t), log p_t]
           probabilities: [lse, sum_c w_c q_c (q the smoothed target), 0, 0]
  Ignored rows: loss 0, gradient 0, stats 0. A target outside [0, C) that is not ignore_index: loss,
  gradient and stats NaN, and nothing outside the row is read or written. A row whose logits are
  all -inf gives a NaN loss and gradient, as torch does.

cross_entropy_bwd_<b>(grad_rows, logits, target, weight, alpha, stats, grad, ignore_index, ...) -> ()
  grad_rows (M,) fp32 contiguous: d(total)/d(loss_rows); writes grad = sum_i grad_rows[i] * d loss_i / d logits.
"""
from __future__ import annotations

import torch

from ..reference.cross_entropy import mean_divisor
from ._library import (define_composite_op, define_kernel_op, finish_loss, fused_grad_backward, kernel_op,
                       register_triton_impl, rescale_fused_grad, save_fused_grad)

_PARAMS = "int ignore_index, float label_smoothing, float z_loss, float softcap, float focal_gamma, float focal_alpha"


def _fwd_fake(logits, target, weight, alpha, grad_scale, grad, *params):
    rows = logits.shape[0]
    return logits.new_empty(rows, dtype=torch.float32), logits.new_empty(rows, 4, dtype=torch.float32)


define_kernel_op(
    "cross_entropy_fwd",
    f"(Tensor logits, Tensor target, Tensor? weight, Tensor? alpha, Tensor grad_scale, Tensor(a!)? grad, {_PARAMS})"
    " -> (Tensor, Tensor)",
    _fwd_fake,
)
define_kernel_op(
    "cross_entropy_bwd",
    f"(Tensor grad_rows, Tensor logits, Tensor target, Tensor? weight, Tensor? alpha, Tensor stats, Tensor(a!) grad,"
    f" {_PARAMS}) -> ()",
    lambda *args: None,
)
register_triton_impl("cross_entropy_fwd", "cross_entropy", "cross_entropy_fwd")
register_triton_impl("cross_entropy_bwd", "cross_entropy", "cross_entropy_bwd")

# ---- the same kernels as functional ops with their own autograd, for torch.compile ----------------
# cross_entropy_fused: 'mean'/'sum' loss (rows summed, divided by `divisor`) and the gradient from
# the same pass; its backward scales that gradient. cross_entropy_rows: per-row losses and stats;
# its backward runs the backward kernel. Eager calls use CrossEntropyFunction below instead, whose
# in-place tricks (free backward at grad_output 1, inplace_backward) a traced graph cannot hold.


def _fused_impl(backend):
    def impl(logits, target, weight, alpha, divisor, *params):
        grad = torch.empty_like(logits)
        rows, _ = kernel_op("cross_entropy_fwd", backend)(
            logits, target, weight, alpha, torch.reciprocal(divisor), grad, *params)
        return rows.sum() / divisor, grad
    return impl


def _rows_impl(backend):
    def impl(logits, target, weight, alpha, *params):
        one = torch.ones((), device=logits.device, dtype=torch.float32)
        return kernel_op("cross_entropy_fwd", backend)(logits, target, weight, alpha, one, None, *params)
    return impl


def _rows_setup(ctx, inputs, output):
    logits, target, weight, alpha, *params = inputs
    ctx.params = params
    ctx.save_for_backward(logits, target, weight, alpha, output[1])


def _rows_backward(backend):
    def backward(ctx, grad_rows, _grad_stats):
        logits, target, weight, alpha, stats = ctx.saved_tensors
        grad = kernel_op("cross_entropy_bwd_grad", backend)(
            grad_rows.to(torch.float32).contiguous(), logits, target, weight, alpha, stats, *ctx.params)
        return (grad,) + (None,) * (4 + len(ctx.params))
    return backward


def _bwd_grad_impl(backend):
    def impl(grad_rows, logits, target, weight, alpha, stats, *params):
        grad = torch.empty_like(logits)
        kernel_op("cross_entropy_bwd", backend)(grad_rows, logits, target, weight, alpha, stats, grad, *params)
        return grad
    return impl


define_composite_op(
    "cross_entropy_fused",
    f"(Tensor logits, Tensor target, Tensor? weight, Tensor? alpha, Tensor divisor, {_PARAMS}) -> (Tensor, Tensor)",
    lambda logits, *args: (logits.new_empty((), dtype=torch.float32), torch.empty_like(logits)),
    _fused_impl, fused_grad_backward, save_fused_grad,
)
define_composite_op(
    "cross_entropy_rows",
    f"(Tensor logits, Tensor target, Tensor? weight, Tensor? alpha, {_PARAMS}) -> (Tensor, Tensor)",
    lambda logits, target, weight, alpha, *params: _fwd_fake(logits, target, weight, alpha, None, None),
    _rows_impl, _rows_backward, _rows_setup,
)
define_composite_op(
    "cross_entropy_bwd_grad",
    f"(Tensor grad_rows, Tensor logits, Tensor target, Tensor? weight, Tensor? alpha, Tensor stats, {_PARAMS})"
    " -> Tensor",
    lambda grad_rows, logits, *args: torch.empty_like(logits),
    _bwd_grad_impl,
)


def _compiled_loss(logits, target, weight, alpha, reduction, want_grad, backend, params):
    if want_grad and reduction != "none":
        divisor = (mean_divisor(target, weight, params[0], logits.shape[0]) if reduction == "mean"
                   else torch.ones((), device=logits.device, dtype=torch.float32))
        loss, _ = kernel_op("cross_entropy_fused", backend)(logits, target, weight, alpha, divisor, *params)
    else:
        rows, _ = kernel_op("cross_entropy_rows", backend)(logits, target, weight, alpha, *params)
        loss = rows if reduction == "none" else rows.sum() if reduction == "sum" else \
            rows.sum() / mean_divisor(target, weight, params[0], logits.shape[0])
    return loss.to(logits.dtype)


def _kernel_mean_divisor(target, weight, ignore_index, rows):
    """torch's 'mean' divisor as a device tensor in few launches: for class indices without
    weights, the int64 count of kept rows (exact at any size)."""
    if weight is None and not target.dtype.is_floating_point:
        return (target != ignore_index).sum()
    return mean_divisor(target, weight, ignore_index, rows)


class CrossEntropyFunction(torch.autograd.Function):
    """Rows (M, C) -> loss. 'mean'/'sum': gradient computed in the forward, scaled in the backward.

    A Function rather than a custom op with registered autograd because with inplace_backward the
    gradient is the logits' own buffer, which a functional op could not hand back.
    """

    @staticmethod
    def forward(ctx, logits, target, weight, alpha, reduction, want_grad, inplace, backend,
                ignore_index, label_smoothing, z_loss, softcap, focal_gamma, focal_alpha):
        params = (ignore_index, label_smoothing, z_loss, softcap, focal_gamma, focal_alpha)
        fused = want_grad and reduction != "none"
        divisor = _kernel_mean_divisor(target, weight, ignore_index, logits.shape[0]) if reduction == "mean" else None
        # The kernel reads grad_scale only when it writes a gradient.
        grad_scale = torch.empty((), device=logits.device, dtype=torch.float32)
        grad = None
        if fused:
            grad = logits.detach() if inplace else torch.empty_like(logits)
            if reduction == "mean":
                torch.reciprocal(divisor, out=grad_scale)  # float32 whatever the default dtype
            else:
                grad_scale.fill_(1.0)
        rows, stats = kernel_op("cross_entropy_fwd", backend)(
            logits, target, weight, alpha, grad_scale, grad, *params)
        loss = rows.to(logits.dtype) if reduction == "none" else finish_loss(rows.sum(), reduction, divisor,
                                                                              logits.dtype)
        ctx.reduction, ctx.backend, ctx.params = reduction, backend, params
        if fused:  # `applied` is written by the first backward (scale_grad's `first`)
            ctx.save_for_backward(grad, torch.empty((), device=logits.device, dtype=torch.float32))
        elif want_grad:
            ctx.save_for_backward(logits, target, weight, alpha, stats)
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)  # no zeros for the stats' (unused) gradient: one launch less
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        if ctx.reduction != "none":
            grad = rescale_fused_grad(ctx, grad_loss)
        else:
            logits, target, weight, alpha, stats = ctx.saved_tensors
            grad = torch.empty_like(logits)
            grad_rows = grad_loss.reshape(-1).to(torch.float32).contiguous()
            kernel_op("cross_entropy_bwd", ctx.backend)(
                grad_rows, logits, target, weight, alpha, stats, grad, *ctx.params)
        return (grad,) + (None,) * 13


def cross_entropy_rows(logits, target, weight, alpha, *, reduction, inplace, backend, ignore_index,
                       label_smoothing, z_loss, softcap, focal_gamma, focal_alpha):
    """Kernel-backed loss over prepared rows (see the module docstring for the layout)."""
    want_grad = torch.is_grad_enabled() and logits.requires_grad
    if torch.compiler.is_compiling():  # inplace_backward does not apply to a traced graph
        return _compiled_loss(logits, target, weight, alpha, reduction, want_grad, backend,
                              (ignore_index, label_smoothing, z_loss, softcap, focal_gamma, focal_alpha))
    loss, _ = CrossEntropyFunction.apply(
        logits, target, weight, alpha, reduction, want_grad, inplace, backend,
        ignore_index, label_smoothing, z_loss, softcap, focal_gamma, focal_alpha)
    return loss
