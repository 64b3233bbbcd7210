"""Kernel ops of the softmax cross-entropy family (CE, smoothing, focal, z-loss, softcap) and their spec.

Kernel contract, the same for the Triton and the CUDA implementation (M rows of C classes); the
per-row quantities and the gradient formula are those of reference/row_softmax.py:

cross_entropy_fwd_<b>(logits, target, weight, weight_sum, alpha, grad_factor, loss, stats, grad,
                      ignore_index, label_smoothing, z_loss, softcap, focal_gamma, focal_alpha) -> ()
  logits   (M, C) fp32/fp16/bf16, stride(1) == 1, any stride(0)
  target   (M,) int64 contiguous class indices, or (M, C) class probabilities in logits' dtype,
           stride(1) == 1 (any stride(0))
  weight   (C,) fp32 contiguous class weights, or None
  weight_sum  0-dim fp32, the sum of weight: given exactly when there are weights, class-index
           targets and label smoothing (the smoothing term needs it); else None
  alpha    (C,) fp32 contiguous focal alpha per class, or None (then the float focal_alpha is used)
  grad_factor  0-dim fp32: the gradient's multiplier (1/divisor for 'mean', 1 for 'sum'), read on
           the device; given exactly when grad is
  loss     out (M,) fp32 contiguous: the unreduced loss
  stats    out (M, 4) fp32 contiguous, what the backward needs:
           class targets: [lse, smoothed weighted CE before the focal factor, log(1 - p_t), log p_t]
           probabilities: [lse, sum_c w_c q_c (q the smoothed target), 0, 0]
  grad     out (M, C) in logits' dtype, stride(1) == 1, rows not overlapping, or None for no
           gradient. It may be the logits themselves (inplace_backward): every element is read
           before it is overwritten.
  softcap  0 means off; focal_gamma 0 and focal_alpha 1 mean no focal term.
  Ignored rows: loss 0, gradient 0, stats 0. A target outside [0, C) that is not ignore_index: loss,
  gradient and stats NaN, and nothing outside the row is read or written. A row whose logits are
  all -inf gives a NaN loss and gradient, as torch does.

cross_entropy_bwd_<b>(grad_rows, logits, target, weight, weight_sum, alpha, stats, grad, ignore_index, ...) -> ()
  grad_rows (M,) fp32 contiguous: d(total)/d(loss_rows); writes grad = sum_i grad_rows[i] * d loss_i / d logits.
"""
from __future__ import annotations

import torch

from .._backends import resolve_backend
from ..reference import cross_entropy as ref
from ..reference.cross_entropy import mean_divisor
from ._contracts import F32, KERNEL_DTYPES, fail, require_grad_factor
from ._library import KernelOp
from .builder import FusedLoss, build

PARAMS = ("int ignore_index", "float label_smoothing", "float z_loss", "float softcap", "float focal_gamma",
          "float focal_alpha")
_PARAMS = ", ".join(PARAMS)


def _unit_inner(t):
    return t.shape[1] <= 1 or t.stride(1) == 1


def check_rows(op, logits, target, weight, weight_sum, alpha, grad, ignore_index, label_smoothing, z_loss, softcap,
               focal_gamma, focal_alpha):
    """The contract shared by the forward and the backward op (see the module docstring)."""
    if logits.dim() != 2 or logits.dtype not in KERNEL_DTYPES:
        fail(op, f"logits must be a 2-D fp32/fp16/bf16 tensor, got shape {tuple(logits.shape)} and dtype "
                 f"{logits.dtype}")
    rows, classes = logits.shape
    if not _unit_inner(logits):
        fail(op, f"logits must have unit column stride, got strides {logits.stride()}")
    if classes == 0 and rows > 0:
        fail(op, f"logits must have at least one class, got shape {tuple(logits.shape)}")
    soft = target.dtype.is_floating_point
    if soft:
        if target.shape != logits.shape or target.dtype != logits.dtype or not _unit_inner(target):
            fail(op, f"probability target must have logits' shape {tuple(logits.shape)} and dtype {logits.dtype} "
                     f"and unit column stride, got shape {tuple(target.shape)}, dtype {target.dtype} and strides "
                     f"{target.stride()}")
    elif target.shape != (rows,) or target.dtype != torch.int64 or not target.is_contiguous():
        fail(op, f"class target must be a contiguous int64 tensor of shape ({rows},), got shape "
                 f"{tuple(target.shape)} and dtype {target.dtype}")
    for name, vec in (("weight", weight), ("alpha", alpha)):
        if vec is not None and (vec.shape != (classes,) or vec.dtype != F32 or not vec.is_contiguous()):
            fail(op, f"{name} must be a contiguous fp32 tensor of shape ({classes},), got shape "
                     f"{tuple(vec.shape)} and dtype {vec.dtype}")
    needs_sum = weight is not None and not soft and label_smoothing > 0.0
    if needs_sum != (weight_sum is not None):
        fail(op, "weight_sum must be given exactly when there are class weights, class-index targets and label "
                 f"smoothing (here: {'needed' if needs_sum else 'not needed'})")
    if weight_sum is not None and (weight_sum.dim() != 0 or weight_sum.dtype != F32):
        fail(op, f"weight_sum must be a 0-dim fp32 tensor, got shape {tuple(weight_sum.shape)} and dtype "
                 f"{weight_sum.dtype}")
    if grad is not None and (grad.shape != logits.shape or grad.dtype != logits.dtype or not _unit_inner(grad)
                             or (rows > 1 and grad.stride(0) < classes)):
        fail(op, f"grad must match logits (shape {tuple(logits.shape)}, dtype {logits.dtype}, unit column "
                 f"stride, rows not overlapping), got shape {tuple(grad.shape)}, dtype {grad.dtype}, strides "
                 f"{grad.stride()}")
    for name, t in (("target", target), ("weight", weight), ("weight_sum", weight_sum), ("alpha", alpha),
                    ("grad", grad)):
        if t is not None and t.device != logits.device:
            fail(op, f"{name} is on {t.device} but logits are on {logits.device}")
    if not 0.0 <= label_smoothing <= 1.0:
        fail(op, f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not z_loss >= 0.0 or not softcap >= 0.0 or not focal_gamma >= 0.0 or softcap == float("inf"):
        fail(op, f"z_loss, focal_gamma must be >= 0 and softcap finite and >= 0 (0 = off), got z_loss={z_loss}, "
                 f"softcap={softcap}, focal_gamma={focal_gamma}")
    if not abs(focal_alpha) < float("inf"):
        fail(op, f"focal_alpha must be finite, got {focal_alpha}")
    if soft and (focal_gamma != 0.0 or focal_alpha != 1.0 or alpha is not None):
        fail(op, f"focal options need class-index targets; got probability targets with focal_gamma={focal_gamma}, "
                 f"focal_alpha={focal_alpha}, alpha tensor={alpha is not None}")


def _check_fwd(logits, target, weight, weight_sum, alpha, grad_factor, loss, stats, grad, **options):
    op = "cross_entropy_fwd"
    check_rows(op, logits, target, weight, weight_sum, alpha, grad, **options)
    require_grad_factor(op, grad_factor, grad, logits)
    rows = logits.shape[0]
    for name, t, shape in (("loss", loss, (rows,)), ("stats", stats, (rows, 4))):
        if t.shape != shape or t.dtype != F32 or not t.is_contiguous() or t.device != logits.device:
            fail(op, f"{name} must be a contiguous fp32 tensor of shape {shape} on logits' device, got shape "
                     f"{tuple(t.shape)}, dtype {t.dtype} on {t.device}")


def _check_bwd(grad_rows, logits, target, weight, weight_sum, alpha, stats, grad, **options):
    op = "cross_entropy_bwd"
    check_rows(op, logits, target, weight, weight_sum, alpha, grad, **options)
    rows = logits.shape[0]
    for name, t, shape in (("grad_rows", grad_rows, (rows,)), ("stats", stats, (rows, 4))):
        if t.shape != shape or t.dtype != F32 or not t.is_contiguous() or t.device != logits.device:
            fail(op, f"{name} must be a contiguous fp32 tensor of shape {shape} on logits' device, got shape "
                     f"{tuple(t.shape)}, dtype {t.dtype} on {t.device}")


FWD = KernelOp(
    "cross_entropy_fwd",
    "(Tensor logits, Tensor target, Tensor? weight, Tensor? weight_sum, Tensor? alpha, Tensor? grad_factor,"
    f" Tensor(a!) loss, Tensor(b!) stats, Tensor(c!)? grad, {_PARAMS}) -> ()",
    check=_check_fwd,
)
BWD = KernelOp(
    "cross_entropy_bwd",
    "(Tensor grad_rows, Tensor logits, Tensor target, Tensor? weight, Tensor? weight_sum, Tensor? alpha,"
    f" Tensor stats, Tensor(a!) grad, {_PARAMS}) -> ()",
    check=_check_bwd,
)


def _triton():
    from ..triton_kernels import cross_entropy as kernels  # Triton is optional: loaded at the first Triton call

    return kernels


FWD.implement_triton(lambda *args: _triton().cross_entropy_fwd(*args))
BWD.implement_triton(lambda *args: _triton().cross_entropy_bwd(*args))


# ---- the family's spec for the op builder ------------------------------------------------------

def scalar_options(p) -> dict:
    """The kernels' scalar options by name, from cross-entropy's named options (or linear
    cross-entropy's, which include them)."""
    return dict(ignore_index=p.ignore_index, label_smoothing=p.label_smoothing, z_loss=p.z_loss, softcap=p.softcap,
                focal_gamma=p.focal_gamma, focal_alpha=p.focal_alpha)


def _forward(backend, tensors, params, grads, grad_factor, reduce):
    logits, target, weight, weight_sum, alpha = tensors
    rows = logits.shape[0]
    loss = torch.empty(rows, device=logits.device, dtype=F32)
    stats = torch.empty(rows, 4, device=logits.device, dtype=F32)
    FWD[backend](logits, target, weight, weight_sum, alpha, grad_factor, loss, stats,
                 None if grads is None else grads[0], **scalar_options(params))
    return (loss.sum() if reduce else loss), (stats,)


def _backward(backend, grad_rows, tensors, saved, params, grads):
    logits, target, weight, weight_sum, alpha = tensors
    BWD[backend](grad_rows.reshape(-1).to(F32).contiguous(), logits, target, weight, weight_sum, alpha, saved[0],
                 grads[0], **scalar_options(params))


def mean_divisor_of(backend, tensors, params):
    """torch's 'mean' divisor as a device tensor in few launches: for class indices without
    weights, the int64 count of kept rows (exact at any size)."""
    logits, target, weight = tensors[:3]
    ignore_index = params.ignore_index
    if weight is None and not target.dtype.is_floating_point:
        return (target != ignore_index).sum()
    return mean_divisor(target, weight, ignore_index, logits.shape[0])


SPEC = FusedLoss(
    name="cross_entropy",
    tensors=("logits", "target", "weight?", "weight_sum?", "alpha?"),
    params=PARAMS,
    differentiable=("logits",),
    n_saved=1,
    forward=_forward,
    backward=_backward,
    mean_divisor=mean_divisor_of,
)
cross_entropy_kernels = build(SPEC)


def class_rows_loss(logits, target, *, backend, ignore_index=-100):
    """Per-row cross-entropy (reduction 'none') of (M, C) logits and (M,) int64 class indices with no
    option but ignore_index, on the backend that `backend` resolves to for the family: its kernels, or
    the reference where it resolves to "reference" (or there is nothing to reduce)."""
    chosen = resolve_backend(backend, "cross_entropy", logits)
    if chosen == "reference" or logits.numel() == 0:
        return ref.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    options = dict(ignore_index=ignore_index, label_smoothing=0.0, z_loss=0.0, softcap=0.0, focal_gamma=0.0,
                   focal_alpha=1.0)
    return cross_entropy_kernels((logits.contiguous(), target.contiguous(), None, None, None), options,
                                 reduction="none", backend=chosen)
