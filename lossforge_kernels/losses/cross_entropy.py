"""Public softmax cross-entropy family: cross_entropy, focal_loss, linear_cross_entropy and modules.

Checks arguments, moves the class dimension last so every backend sees (M, C) rows, picks the
backend and restores the output shape. The maths lives in reference/cross_entropy.py and in the
kernels behind ops/cross_entropy.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks as C
from .._backends import LossKernels, register_kernels, resolve_backend
from ..reference import cross_entropy as ref

FAMILY = "cross_entropy"


# auto's order, from `python -m bench` on an NVIDIA H200 (bench/results/): the CUDA kernels were
# faster than the Triton ones at every measured shape, dtype and option; Triton is the fallback
# where the extension is not built.
register_kernels(FAMILY, LossKernels(backends=("cuda", "triton")))


def _check_target(input, target):
    """Returns True for class-probability targets, False for class indices; raises on bad shapes."""
    C.check_tensor("target", target)
    if target.dtype.is_floating_point:
        if target.shape != input.shape:
            raise ValueError(f"target with class probabilities must have the input's shape {tuple(input.shape)}, "
                             f"got {tuple(target.shape)}")
        return True
    C.check_tensor("target", target, integer_only=True)
    expected = input.shape[:1] + input.shape[2:] if input.dim() >= 2 else torch.Size([])
    if target.shape != expected:
        raise ValueError(f"target with class indices must have shape {tuple(expected)} for input of shape "
                         f"{tuple(input.shape)}, got {tuple(target.shape)}")
    return False


def _check_target_range(target, num_classes, ignore_index):
    if target.numel() == 0 or not C.eager_value_checks(target):
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        value = int(target[bad].flatten()[0])
        raise IndexError(f"target contains class index {value}, out of range [0, {num_classes}) "
                         f"and not ignore_index={ignore_index}")


def _check_class_vector(name, t, num_classes, input):
    C.check_tensor(name, t, ndim=1, float_only=True)
    if t.shape[0] != num_classes:
        raise ValueError(f"{name} must have one entry per class ({num_classes}), got shape {tuple(t.shape)}")
    C.check_same_device("input", input, **{name: t})


def _as_rows(input, target, soft):
    """(N, C, d1, ...) -> (M, C) rows with the class dimension last, plus the 'none' output shape."""
    num_classes = input.shape[1] if input.dim() >= 2 else input.shape[0]
    if input.dim() == 1:
        logits = input.unsqueeze(0)
        rows_target = target.unsqueeze(0) if soft else target.reshape(1)
        out_shape = torch.Size([])
    elif input.dim() == 2:
        logits, rows_target, out_shape = input, target, input.shape[:1]
    else:
        logits = input.movedim(1, -1).reshape(-1, num_classes)
        rows_target = target.movedim(1, -1).reshape(-1, num_classes) if soft else target.reshape(-1)
        out_shape = input.shape[:1] + input.shape[2:]
    return logits, rows_target, out_shape


def cross_entropy(input, target, weight=None, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                  z_loss=0.0, softcap=None, focal_gamma=0.0, focal_alpha=None, inplace_backward=False,
                  backend="auto"):
    """Drop-in for torch.nn.functional.cross_entropy, with z-loss, softcap and focal modulation fused.

    input (N, C) or (N, C, d1, ...) or (C,); target class indices (N, d1, ...) or class probabilities
    shaped like input. Extras: `z_loss` adds z_loss * lse**2 per non-ignored row; `softcap` maps
    logits x to softcap * tanh(x / softcap) first; `focal_gamma`/`focal_alpha` multiply each row's
    (smoothed) cross-entropy by alpha_t * (1 - p_t)**gamma. `inplace_backward=True` lets kernel
    backends write the gradient into the logits' buffer (the logits are overwritten; ignored inside
    torch.compile, where the gradient gets its own buffer).
    """
    C.check_tensor("input", input, min_ndim=1, float_only=True)
    soft = _check_target(input, target)
    C.check_same_device("input", input, target=target)
    num_classes = input.shape[1] if input.dim() >= 2 else input.shape[0]
    reduction = C.check_reduction(reduction)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__} {ignore_index!r}")
    label_smoothing = C.check_float("label_smoothing", label_smoothing, low=0.0, high=1.0)
    z_loss = C.check_float("z_loss", z_loss, low=0.0)
    softcap = C.check_float("softcap", softcap, low=0.0, low_open=True, allow_none=True)
    focal_gamma = C.check_float("focal_gamma", focal_gamma, low=0.0)
    if weight is not None:
        _check_class_vector("weight", weight, num_classes, input)
    if isinstance(focal_alpha, torch.Tensor):
        _check_class_vector("focal_alpha", focal_alpha, num_classes, input)
    else:
        focal_alpha = C.check_float("focal_alpha", focal_alpha, allow_none=True)
    if soft and (focal_gamma != 0.0 or focal_alpha is not None):
        raise ValueError("focal_gamma/focal_alpha need class-index targets; got class probabilities "
                         f"(target dtype {target.dtype})")
    C.check_bool("inplace_backward", inplace_backward)
    if not soft:
        _check_target_range(target, num_classes, ignore_index)

    logits, rows_target, out_shape = _as_rows(input, target, soft)
    options = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                   focal_gamma=focal_gamma, focal_alpha=focal_alpha)
    chosen = resolve_backend(backend, FAMILY, logits)
    if chosen == "reference" or logits.numel() == 0:
        loss = ref.cross_entropy(logits, rows_target, weight, reduction=reduction, **options)
    else:
        loss = _kernel_cross_entropy(logits, rows_target, weight, soft, reduction, inplace_backward, chosen,
                                     **options)
    return loss.reshape(out_shape) if reduction == "none" else loss


def _kernel_cross_entropy(logits, target, weight, soft, reduction, inplace, backend, *, ignore_index,
                          label_smoothing, z_loss, softcap, focal_gamma, focal_alpha):
    from ..ops.cross_entropy import cross_entropy_rows

    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if soft:
        target = target.to(logits.dtype)
        if target.stride(1) != 1:
            target = target.contiguous()
    else:
        target = target.to(torch.int64).contiguous()
    weight = None if weight is None else weight.to(torch.float32).contiguous()
    alpha_vec = focal_alpha.to(torch.float32).contiguous() if isinstance(focal_alpha, torch.Tensor) else None
    alpha_scalar = 1.0 if focal_alpha is None or alpha_vec is not None else focal_alpha
    return cross_entropy_rows(
        logits, target, weight, alpha_vec, reduction=reduction, inplace=inplace, backend=backend,
        ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
        softcap=0.0 if softcap is None else softcap, focal_gamma=focal_gamma, focal_alpha=alpha_scalar)


def focal_loss(input, target, *, gamma=2.0, alpha=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
               backend="auto"):
    """Softmax multi-class focal loss: cross_entropy(focal_gamma=gamma, focal_alpha=alpha)."""
    return cross_entropy(input, target, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing, focal_gamma=gamma, focal_alpha=alpha, backend=backend)


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None, reduction="mean",
                         ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None, focal_gamma=0.0,
                         focal_alpha=None, backend="auto"):
    """cross_entropy(input @ linear_weight.T + linear_bias, target, ...) for input (N, D) and target (N,).

    Leading dimensions of input (..., D) are flattened with target (...), the language-model layout.
    The logits are materialised (a fused kernel that never writes them is future work); kernel
    backends run the fused cross-entropy on them.
    """
    C.check_tensor("input", input, min_ndim=1, float_only=True)
    C.check_tensor("linear_weight", linear_weight, ndim=2, float_only=True)
    C.check_same_device("input", input, linear_weight=linear_weight, target=target, linear_bias=linear_bias)
    if linear_weight.shape[1] != input.shape[-1]:
        raise ValueError(f"linear_weight must have shape (C, {input.shape[-1]}) to match input's last dimension, "
                         f"got {tuple(linear_weight.shape)}")
    if linear_bias is not None:
        C.check_tensor("linear_bias", linear_bias, ndim=1, float_only=True)
        if linear_bias.shape[0] != linear_weight.shape[0]:
            raise ValueError(f"linear_bias must have shape ({linear_weight.shape[0]},), got {tuple(linear_bias.shape)}")
    C.check_tensor("target", target)
    if target.shape != input.shape[:-1]:
        raise ValueError(f"target must have shape {tuple(input.shape[:-1])} (input's leading dimensions), "
                         f"got {tuple(target.shape)}")
    flat_input, flat_target = input.reshape(-1, input.shape[-1]), target.reshape(-1)
    options = dict(weight=weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                   z_loss=z_loss, softcap=softcap, focal_gamma=focal_gamma, focal_alpha=focal_alpha)
    chosen = resolve_backend(backend, FAMILY, flat_input)
    if chosen == "reference":  # the matmul in float32 (float64) too, like the rest of the reference
        ct = ref.compute_dtype(input.dtype)
        bias = None if linear_bias is None else linear_bias.to(ct)
        logits = F.linear(flat_input.to(ct), linear_weight.to(ct), bias)
        loss = cross_entropy(logits, flat_target, backend="reference", **options).to(input.dtype)
    else:
        logits = F.linear(flat_input, linear_weight, linear_bias)
        loss = cross_entropy(logits, flat_target, backend=chosen, **options)
    return loss.reshape(target.shape) if reduction == "none" else loss


class _CrossEntropyOptions(nn.Module):
    """The cross-entropy keywords a module holds; `weight` and a tensor `focal_alpha` are buffers, as in torch."""

    def __init__(self, weight, focal_alpha, **options):
        super().__init__()
        self.register_buffer("weight", weight)
        if isinstance(focal_alpha, torch.Tensor):
            self.register_buffer("focal_alpha", focal_alpha)
        else:
            self.focal_alpha = focal_alpha
        self.options = options

    def _keywords(self):
        return dict(weight=self.weight, focal_alpha=self.focal_alpha, **self.options)


class CrossEntropyLoss(_CrossEntropyOptions):
    """Module form of cross_entropy."""

    def __init__(self, weight=None, *, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                 softcap=None, focal_gamma=0.0, focal_alpha=None, inplace_backward=False, backend="auto"):
        super().__init__(weight, focal_alpha, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, focal_gamma=focal_gamma,
                         inplace_backward=inplace_backward, backend=backend)

    def forward(self, input, target):
        return cross_entropy(input, target, **self._keywords())


class FocalLoss(CrossEntropyLoss):
    """Softmax multi-class focal loss module."""

    def __init__(self, gamma=2.0, alpha=None, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                 backend="auto"):
        super().__init__(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                         focal_gamma=gamma, focal_alpha=alpha, backend=backend)


class LinearCrossEntropyLoss(_CrossEntropyOptions):
    """Module form of linear_cross_entropy: forward(input, linear_weight, target, linear_bias=None)."""

    def __init__(self, weight=None, *, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                 softcap=None, focal_gamma=0.0, focal_alpha=None, backend="auto"):
        super().__init__(weight, focal_alpha, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, focal_gamma=focal_gamma,
                         backend=backend)

    def forward(self, input, linear_weight, target, linear_bias=None):
        return linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, **self._keywords())
