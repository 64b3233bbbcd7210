"""Kernel ops and autograd for the sigmoid focal loss (elementwise, torchvision's semantics).

Kernel contract, the same for the Triton and the CUDA implementation (n elements, any shape):

sigmoid_focal_fwd_<b>(input, target, grad_scale, grad, alpha, gamma, reduce) -> loss
  input    contiguous fp32/fp16/bf16; target contiguous, the same shape and dtype
  grad_scale  0-dim fp32 multiplier of the gradient (1/n for 'mean', 1 for 'sum'), read on device
  grad     buffer like input for the gradient of the (unscaled) sum, times grad_scale, or None
  alpha    < 0 disables the alpha term; gamma >= 0
  reduce   True: loss is a 0-dim fp32 sum over all elements, summed in a fixed order
           (deterministic); False: loss is elementwise, shaped and typed like input.
sigmoid_focal_bwd_<b>(grad_out, input, target, grad, alpha, gamma) -> ()
  grad_out contiguous, shaped like input (any float dtype); writes grad = grad_out * d loss / d input.
"""
from __future__ import annotations

import torch

from ._library import define_kernel_op, kernel_op, register_triton_impl


def _fwd_fake(input, target, grad_scale, grad, alpha, gamma, reduce):
    if reduce:
        return input.new_empty((), dtype=torch.float32)
    return torch.empty_like(input)


define_kernel_op(
    "sigmoid_focal_fwd",
    "(Tensor input, Tensor target, Tensor grad_scale, Tensor(a!)? grad, float alpha, float gamma, bool reduce)"
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


class SigmoidFocalFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, target, alpha, gamma, reduction, want_grad, backend):
        fused = want_grad and reduction != "none"
        scale = 1.0 / input.numel() if reduction == "mean" and input.numel() > 0 else 1.0
        grad_scale = torch.full((), scale, device=input.device, dtype=torch.float32)
        grad = torch.empty_like(input) if fused else None
        loss = kernel_op("sigmoid_focal_fwd", backend)(
            input, target, grad_scale, grad, alpha, gamma, reduction != "none")
        if reduction == "mean":
            loss = loss / input.numel()  # 0 elements: 0/0 = nan, as torch's mean
        ctx.reduction, ctx.backend, ctx.alpha, ctx.gamma = reduction, backend, alpha, gamma
        if fused:
            ctx.save_for_backward(grad, torch.ones((), device=input.device, dtype=torch.float32))
        elif want_grad:
            ctx.save_for_backward(input, target)
        return loss.to(input.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.reduction != "none":
            grad, applied = ctx.saved_tensors
            kernel_op("scale_grad", ctx.backend)(grad, grad_loss, applied)
        else:
            input, target = ctx.saved_tensors
            grad = torch.empty_like(input)
            kernel_op("sigmoid_focal_bwd", ctx.backend)(
                grad_loss.contiguous(), input, target, grad, ctx.alpha, ctx.gamma)
        return grad, None, None, None, None, None, None


def sigmoid_focal(input, target, *, alpha, gamma, reduction, backend):
    want_grad = torch.is_grad_enabled() and input.requires_grad
    return SigmoidFocalFunction.apply(input, target, alpha, gamma, reduction, want_grad, backend)
