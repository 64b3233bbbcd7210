"""Kernel ops and autograd for the sigmoid focal loss (elementwise, torchvision's semantics).

Kernel contract, the same for the Triton and the CUDA implementation (n elements, any shape):

sigmoid_focal_fwd_<b>(input, target, grad_scale, grad, alpha, gamma, reduce) -> loss
  input    contiguous fp32/fp16/bf16; target contiguous, the same shape and dtype
  grad_scale  float multiplier of the gradient (1/n for 'mean', 1 for 'sum')
  grad     buffer like input for the gradient of the (unscaled) sum, times grad_scale, or None
  alpha    < 0 disables the alpha term; gamma >= 0
  reduce   True: loss is a 0-dim fp32 sum over all elements, summed in a fixed order
           (deterministic); False: loss is elementwise, shaped and typed like input.
sigmoid_focal_bwd_<b>(grad_out, input, target, grad, alpha, gamma) -> ()
  grad_out contiguous, shaped like input (any float dtype); writes grad = grad_out * d loss / d input.
"""
from __future__ import annotations

import torch

from ._library import (define_composite_op, define_kernel_op, finish_loss, fused_grad_backward, kernel_op,
                       register_triton_impl, rescale_fused_grad, save_fused_grad)


def _fwd_fake(input, target, grad_scale, grad, alpha, gamma, reduce):
    if reduce:
        return input.new_empty((), dtype=torch.float32)
    return torch.empty_like(input)


define_kernel_op(
    "sigmoid_focal_fwd",
    "(Tensor input, Tensor target, float grad_scale, Tensor(a!)? grad, float alpha, float gamma, bool reduce)"
    " -> Tensor",
    _fwd_fake,
)
define_kernel_op(
    "sigmoid_focal_bwd",
    "(Tensor grad_out, Tensor input, Tensor target, Tensor(a!) grad, float alpha, float gamma) -> ()",
    lambda *args: None,
)
register_triton_impl("sigmoid_focal_fwd", "sigmoid_focal", "sigmoid_focal_fwd")
register_triton_impl("sigmoid_focal_bwd", "sigmoid_focal", "sigmoid_focal_bwd")

# ---- functional ops with their own autograd, for torch.compile (see ops/cross_entropy.py) ---------


def _grad_scale(input, mean):
    """The kernels' grad_scale: 1/n for 'mean' (1 for no elements, where the loss is 0/0 = NaN), else 1."""
    n = input.numel()
    return 1.0 / n if mean and n > 0 else 1.0


def _fused_impl(backend):
    def impl(input, target, alpha, gamma, mean):
        grad = torch.empty_like(input)
        total = kernel_op("sigmoid_focal_fwd", backend)(input, target, _grad_scale(input, mean), grad, alpha, gamma,
                                                        True)
        return (total / input.numel() if mean else total), grad
    return impl


def _elementwise_impl(backend):
    def impl(input, target, alpha, gamma):
        return kernel_op("sigmoid_focal_fwd", backend)(input, target, 1.0, None, alpha, gamma, False)
    return impl


def _elementwise_setup(ctx, inputs, output):
    input, target, ctx.alpha, ctx.gamma = inputs
    ctx.save_for_backward(input, target)


def _elementwise_backward(backend):
    def backward(ctx, grad_out):
        input, target = ctx.saved_tensors
        grad = kernel_op("sigmoid_focal_bwd_grad", backend)(grad_out.contiguous(), input, target, ctx.alpha, ctx.gamma)
        return grad, None, None, None
    return backward


def _bwd_grad_impl(backend):
    def impl(grad_out, input, target, alpha, gamma):
        grad = torch.empty_like(input)
        kernel_op("sigmoid_focal_bwd", backend)(grad_out, input, target, grad, alpha, gamma)
        return grad
    return impl


define_composite_op(
    "sigmoid_focal_fused",
    "(Tensor input, Tensor target, float alpha, float gamma, bool mean) -> (Tensor, Tensor)",
    lambda input, *args: (input.new_empty((), dtype=torch.float32), torch.empty_like(input)),
    _fused_impl, fused_grad_backward, save_fused_grad,
)
define_composite_op(
    "sigmoid_focal_elementwise",
    "(Tensor input, Tensor target, float alpha, float gamma) -> Tensor",
    lambda input, *args: torch.empty_like(input),
    _elementwise_impl, _elementwise_backward, _elementwise_setup,
)
define_composite_op(
    "sigmoid_focal_bwd_grad",
    "(Tensor grad_out, Tensor input, Tensor target, float alpha, float gamma) -> Tensor",
    lambda grad_out, input, *args: torch.empty_like(input),
    _bwd_grad_impl,
)


def _compiled_loss(input, target, alpha, gamma, reduction, want_grad, backend):
    if want_grad and reduction != "none":
        loss, _ = kernel_op("sigmoid_focal_fused", backend)(input, target, alpha, gamma, reduction == "mean")
    else:
        loss = kernel_op("sigmoid_focal_elementwise", backend)(input, target, alpha, gamma)
        if reduction != "none":
            loss = loss.to(torch.float32).sum() / (input.numel() if reduction == "mean" else 1)
    return loss.to(input.dtype)


class SigmoidFocalFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, target, alpha, gamma, reduction, want_grad, backend):
        fused = want_grad and reduction != "none"
        grad_scale = _grad_scale(input, reduction == "mean")
        grad = torch.empty_like(input) if fused else None
        loss = kernel_op("sigmoid_focal_fwd", backend)(
            input, target, grad_scale, grad, alpha, gamma, reduction != "none")
        if reduction != "none":  # 'mean' of 0 elements: 0/0 = nan, as torch's mean
            loss = finish_loss(loss, reduction, input.numel(), input.dtype)
        ctx.reduction, ctx.backend, ctx.alpha, ctx.gamma = reduction, backend, alpha, gamma
        if fused:  # `applied` is written by the first backward (scale_grad's `first`)
            ctx.save_for_backward(grad, torch.empty((), device=input.device, dtype=torch.float32))
        elif want_grad:
            ctx.save_for_backward(input, target)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.reduction != "none":
            grad = rescale_fused_grad(ctx, grad_loss)
        else:
            input, target = ctx.saved_tensors
            grad = torch.empty_like(input)
            kernel_op("sigmoid_focal_bwd", ctx.backend)(
                grad_loss.contiguous(), input, target, grad, ctx.alpha, ctx.gamma)
        return grad, None, None, None, None, None, None


def sigmoid_focal(input, target, *, alpha, gamma, reduction, backend):
    want_grad = torch.is_grad_enabled() and input.requires_grad
    if torch.compiler.is_compiling():
        return _compiled_loss(input, target, alpha, gamma, reduction, want_grad, backend)
    return SigmoidFocalFunction.apply(input, target, alpha, gamma, reduction, want_grad, backend)
