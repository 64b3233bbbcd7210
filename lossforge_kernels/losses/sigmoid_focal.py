"""Public sigmoid focal loss (torchvision.ops.sigmoid_focal_loss semantics) and its module."""
from __future__ import annotations

import torch
from torch import nn

from .. import _checks as C
from .._backends import LossKernels, register_kernels, resolve_backend
from ..reference import sigmoid_focal as ref

FAMILY = "sigmoid_focal"
register_kernels(FAMILY, LossKernels(backends=("cuda", "triton")))  # order: see cross_entropy.py


def sigmoid_focal_loss(input, target, *, alpha=0.25, gamma=2.0, reduction="none", backend="auto"):
    """Per-element binary focal loss; `alpha < 0` disables the alpha term; 'mean' is over all elements."""
    C.check_tensor("input", input, float_only=True)
    C.check_tensor("target", target, float_only=True)
    if target.shape != input.shape:
        raise ValueError(f"target must have the input's shape {tuple(input.shape)}, got {tuple(target.shape)}")
    C.check_same_device("input", input, target=target)
    alpha = C.check_float("alpha", alpha)
    gamma = C.check_float("gamma", gamma, low=0.0)
    reduction = C.check_reduction(reduction)
    chosen = resolve_backend(backend, FAMILY, input)
    if chosen == "reference" or input.numel() == 0:
        return ref.sigmoid_focal_loss(input, target, alpha=alpha, gamma=gamma, reduction=reduction)
    from ..ops.sigmoid_focal import sigmoid_focal

    return sigmoid_focal(input.contiguous(), target.to(input.dtype).contiguous(), alpha=alpha, gamma=gamma,
                         reduction=reduction, backend=chosen)


class SigmoidFocalLoss(nn.Module):
    def __init__(self, alpha=0.25, gamma=2.0, *, reduction="none", backend="auto"):
        super().__init__()
        self.alpha, self.gamma, self.reduction, self.backend = alpha, gamma, reduction, backend

    def forward(self, input, target):
        return sigmoid_focal_loss(input, target, alpha=self.alpha, gamma=self.gamma, reduction=self.reduction,
                                  backend=self.backend)
