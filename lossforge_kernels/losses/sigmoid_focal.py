"""Public sigmoid focal loss (torchvision.ops.sigmoid_focal_loss semantics) and its module."""
from __future__ import annotations

from torch import nn

from .. import _autocast as AC
from .. import _checks as C
from .._backends import BACKENDS, LossKernels, register_kernels, resolve_backend
from ..ops.builder import gradient_gap
from ..ops.sigmoid_focal import sigmoid_focal_kernels
from ..reference import sigmoid_focal as ref

FAMILY = "sigmoid_focal"
register_kernels(FAMILY, LossKernels(backends=("cuda", "triton")))  # order: see cross_entropy.py


def check_options(alpha, gamma, reduction, backend):
    C.check_choice("backend", backend, BACKENDS)
    return (C.check_float("alpha", alpha, finite=True), C.check_float("gamma", gamma, low=0.0, finite=True),
            C.check_reduction(reduction))


def sigmoid_focal_loss(input, target, *, alpha=0.25, gamma=2.0, reduction="none", backend="auto"):
    """Per-element binary focal loss; `alpha < 0` disables the alpha term; 'mean' is over all elements."""
    C.check_tensor("input", input, float_only=True)
    C.check_tensor("target", target, float_only=True)
    if target.shape != input.shape:
        raise ValueError(f"target must have the input's shape {tuple(input.shape)}, got {tuple(target.shape)}")
    C.check_same_device("input", input, target=target)
    alpha, gamma, reduction = check_options(alpha, gamma, reduction, backend)
    chosen = resolve_backend(backend, FAMILY, input, gap=gradient_gap(target=target))
    autocast = AC.autocast_dtype(input)  # as torch's losses under autocast: float32 arithmetic and result
    with AC.off(input):
        if chosen == "reference" or input.numel() == 0:
            return ref.sigmoid_focal_loss(AC.widen(input, autocast), target, alpha=alpha, gamma=gamma,
                                          reduction=reduction)
        tensors = (input.contiguous(), target.to(input.dtype).contiguous())
        return sigmoid_focal_kernels(tensors, dict(alpha=alpha, gamma=gamma), reduction=reduction, backend=chosen,
                                     out_dtype=AC.loss_dtype(autocast))


class SigmoidFocalLoss(nn.Module):
    def __init__(self, alpha=0.25, gamma=2.0, *, reduction="none", backend="auto"):
        super().__init__()
        check_options(alpha, gamma, reduction, backend)
        self.alpha, self.gamma, self.reduction, self.backend = alpha, gamma, reduction, backend

    def forward(self, input, target):
        return sigmoid_focal_loss(input, target, alpha=self.alpha, gamma=self.gamma, reduction=self.reduction,
                                  backend=self.backend)


# The family's public API (functional.py, modules.py and the package export exactly these).
FUNCTIONS = (sigmoid_focal_loss,)
MODULES = (SigmoidFocalLoss,)
