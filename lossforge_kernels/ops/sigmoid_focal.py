"""Kernel ops of the sigmoid focal loss (elementwise, torchvision's semantics) and their spec.

Kernel contract, the same for the Triton and the CUDA implementation (n elements, any shape):

sigmoid_focal_fwd_<b>(input, target, grad_factor, out, grad, alpha, gamma, reduce) -> ()
  input    contiguous fp32/fp16/bf16; target contiguous, the same shape and dtype
  grad_factor  0-dim fp32 multiplier of the gradient (1/n for 'mean', 1 for 'sum'), read on the device;
           given exactly when grad is
  out      reduce=True: a 0-dim fp32 tensor that receives the sum over all elements, summed in a
           fixed order (deterministic); reduce=False: the elementwise loss, contiguous, shaped and
           typed like input
  grad     buffer like input for the gradient of the (unscaled) sum, times grad_scale, or None
  alpha    < 0 disables the alpha term (finite); gamma >= 0
sigmoid_focal_bwd_<b>(grad_out, input, target, grad, alpha, gamma) -> ()
  grad_out contiguous, shaped like input (any float dtype); writes grad = grad_out * d loss / d input.
"""
from __future__ import annotations

import math

import torch

from ._contracts import F32, KERNEL_DTYPES, fail, require_grad_factor, require_like
from ._library import KernelOp
from .builder import FusedLoss, build

PARAMS = ("float alpha", "float gamma")


def _check_inputs(op, input, target, grad, alpha, gamma):
    if input.dtype not in KERNEL_DTYPES or not input.is_contiguous():
        fail(op, f"input must be a contiguous fp32/fp16/bf16 tensor, got dtype {input.dtype} and strides "
                 f"{input.stride()}")
    require_like(op, "target", target, input, input.dtype)
    if grad is not None:
        require_like(op, "grad", grad, input, input.dtype)
    if not math.isfinite(alpha) or not gamma >= 0.0 or not math.isfinite(gamma):
        fail(op, f"alpha must be finite (< 0 disables it) and gamma finite and >= 0, got alpha={alpha}, "
                 f"gamma={gamma}")


def _check_fwd(input, target, grad_factor, out, grad, alpha, gamma, reduce):
    op = "sigmoid_focal_fwd"
    _check_inputs(op, input, target, grad, alpha, gamma)
    require_grad_factor(op, grad_factor, grad, input)
    if reduce:
        if out.dim() != 0 or out.dtype != F32 or out.device != input.device:
            fail(op, f"out must be a 0-dim fp32 tensor on {input.device} when reduce=True, got shape "
                     f"{tuple(out.shape)} and dtype {out.dtype}")
    else:
        require_like(op, "out", out, input, input.dtype)


def _check_bwd(grad_out, input, target, grad, alpha, gamma):
    op = "sigmoid_focal_bwd"
    _check_inputs(op, input, target, grad, alpha, gamma)
    require_like(op, "grad_out", grad_out, input)
    if not grad_out.dtype.is_floating_point:
        fail(op, f"grad_out must be a floating-point tensor, got {grad_out.dtype}")


FWD = KernelOp(
    "sigmoid_focal_fwd",
    "(Tensor input, Tensor target, Tensor? grad_factor, Tensor(a!) out, Tensor(b!)? grad, float alpha, float gamma,"
    " bool reduce) -> ()",
    check=_check_fwd,
)
BWD = KernelOp(
    "sigmoid_focal_bwd",
    "(Tensor grad_out, Tensor input, Tensor target, Tensor(a!) grad, float alpha, float gamma) -> ()",
    check=_check_bwd,
)


def _triton():
    from ..triton_kernels import sigmoid_focal as kernels  # Triton is optional: loaded at the first Triton call

    return kernels


FWD.implement_triton(lambda *args: _triton().sigmoid_focal_fwd(*args))
BWD.implement_triton(lambda *args: _triton().sigmoid_focal_bwd(*args))


# ---- the family's spec for the op builder ------------------------------------------------------

def _forward(backend, tensors, params, grads, grad_factor, reduce):
    input, target = tensors
    out = torch.empty((), device=input.device, dtype=F32) if reduce else torch.empty_like(input)
    FWD[backend](input, target, grad_factor, out, None if grads is None else grads[0], alpha=params.alpha,
                 gamma=params.gamma, reduce=reduce)
    return out, ()


def _backward(backend, grad_rows, tensors, saved, params, grads):
    input, target = tensors
    BWD[backend](grad_rows.contiguous(), input, target, grads[0], alpha=params.alpha, gamma=params.gamma)


SPEC = FusedLoss(
    name="sigmoid_focal",
    tensors=("input", "target"),
    params=PARAMS,
    differentiable=("input",),
    n_saved=0,
    forward=_forward,
    backward=_backward,
    mean_divisor=lambda backend, tensors, params: float(tensors[0].numel()),
)
sigmoid_focal_kernels = build(SPEC)
