"""Public linear cross-entropy (a projection to class logits followed by cross_entropy) and its module.

Checks arguments and picks the backend. The reference materialises the logits in float32; the
kernel backends materialise them in the input's dtype and run the fused cross-entropy kernels on
them (a fused op that never holds all of them is future work).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _checks as C
from .._backends import LossKernels, register_kernels, resolve_backend
from ..reference import linear_cross_entropy as ref
from .cross_entropy import (CrossEntropyOptions, check_class_vector, check_options, check_target_range,
                            kernel_cross_entropy, kernel_gap)

FAMILY = "linear_cross_entropy"
register_kernels(FAMILY, LossKernels(backends=("cuda", "triton"), gradients_of="input, linear_weight and "
                                                                                "linear_bias"))


def _check_shapes(input, linear_weight, target, linear_bias):
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
    C.check_tensor("target", target, integer_only=True)
    if target.shape != input.shape[:-1]:
        raise ValueError(f"target must have shape {tuple(input.shape[:-1])} (input's leading dimensions), "
                         f"got {tuple(target.shape)}")


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None, reduction="mean",
                         ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None, focal_gamma=0.0,
                         focal_alpha=None, backend="auto"):
    """cross_entropy(input @ linear_weight.T + linear_bias, target, ...) for input (N, D) and target (N,).

    Leading dimensions of input (..., D) are flattened with target (...), the language-model layout.
    Every option of cross_entropy except probability targets and inplace_backward;
    `ignore_index=None` means -100, as in torch.nn.functional.linear_cross_entropy.
    """
    _check_shapes(input, linear_weight, target, linear_bias)
    num_classes = linear_weight.shape[0]
    opts = check_options(ignore_index=-100 if ignore_index is None else ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, focal_gamma=focal_gamma,
                         focal_alpha=focal_alpha, backend=backend)
    reduction = opts.pop("reduction")
    if weight is not None:
        check_class_vector("weight", weight, num_classes, input)
    if isinstance(opts["focal_alpha"], torch.Tensor):
        check_class_vector("focal_alpha", opts["focal_alpha"], num_classes, input)
    flat_input, flat_target = input.reshape(-1, input.shape[-1]), target.reshape(-1).to(torch.int64)
    check_target_range(flat_target, num_classes, opts["ignore_index"])
    chosen = resolve_backend(backend, FAMILY, flat_input, gap=kernel_gap(False, target, weight, opts["focal_alpha"]))
    if chosen == "reference" or flat_input.shape[0] == 0 or num_classes == 0:
        loss = ref.linear_cross_entropy(flat_input, linear_weight, flat_target, linear_bias, weight,
                                        reduction=reduction, **opts)
    else:
        logits = F.linear(flat_input, linear_weight, linear_bias)
        loss = kernel_cross_entropy(logits, flat_target, weight, reduction, False, chosen, **opts)
    return loss.reshape(target.shape) if reduction == "none" else loss


class LinearCrossEntropyLoss(CrossEntropyOptions):
    """Module form of linear_cross_entropy: forward(input, linear_weight, target, linear_bias=None)."""

    def __init__(self, weight=None, *, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                 softcap=None, focal_gamma=0.0, focal_alpha=None, backend="auto"):
        super().__init__(weight, focal_alpha, ignore_index=-100 if ignore_index is None else ignore_index,
                         reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                         focal_gamma=focal_gamma, backend=backend)

    def forward(self, input, linear_weight, target, linear_bias=None):
        return linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, **self._keywords())
