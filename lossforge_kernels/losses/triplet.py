"""Public triplet loss with online mining (batch_hard, semi_hard, batch_all) and its module.

Checks arguments and picks the backend; the maths lives in reference/triplet.py, the kernels in
ops/triplet.py: batch_hard on the mining kernels, semi_hard and batch_all on the chunked row
kernels. The cross-process path (process_group=) runs on the reference.
"""
from __future__ import annotations

import math

from torch import nn

import torch

from .. import _autocast as AC
from .. import _checks as C
from .._backends import BACKENDS, KERNEL_BACKENDS, BackendUnavailableError, LossKernels, register_kernels, \
    resolve_backend
from ..distributed import triplet as dist_impl
from ..ops import triplet as kernels
from ..ops._labels import class_sizes
from ..reference import triplet as ref

FAMILY = "triplet"
register_kernels(FAMILY, LossKernels(backends=("triton", "cuda")))  # Triton first: see the README (Backends)


def _check_options(margin, mining, distance, soft_margin, normalize, reduction, max_class_size):
    if max_class_size is not None:
        max_class_size = C.check_int("max_class_size", max_class_size)
        if max_class_size < 1:
            raise ValueError(f"max_class_size must be None or at least 1, got {max_class_size}")
    margin = C.check_float("margin", margin)
    if not abs(margin) < math.inf:  # a comparison: see _checks.check_float
        raise ValueError(f"margin must be a finite number, got {margin!r}")
    C.check_choice("mining", mining, ref.MININGS)
    C.check_choice("distance", distance, ref.DISTANCES)
    C.check_bool("soft_margin", soft_margin)
    C.check_bool("normalize", normalize)
    C.check_reduction(reduction)
    return margin


def triplet_loss(embeddings, labels, *, margin=0.2, mining="batch_hard", distance="euclidean", soft_margin=False,
                 normalize=False, reduction="mean", max_class_size=None, process_group=None, backend="auto"):
    """Triplet loss over a labelled batch, with the triplets mined inside the batch.

    embeddings (B, D) float, labels (B,) integer. See reference/triplet.py for the mining rules and
    what each reduction averages over. Any finite `margin` is accepted (zero or negative included);
    it is unused when `soft_margin=True`.

    max_class_size: a promise that no label occurs more than this many times in `labels` (P x K
    sampling: K). It changes no result; it lets semi_hard and batch_all mine from the product's tiles
    on Triton (classes of at most 17 rows) where reading the labels would cost a host sync. A broken
    promise raises ValueError where the labels can be read for free (CPU tensors, or
    LOSSFORGE_CHECK_INPUTS=1); elsewhere the loss and gradient are NaN if a class exceeds 17 rows.
    """
    C.check_rows_and_labels("embeddings", embeddings, labels)
    margin = _check_options(margin, mining, distance, soft_margin, normalize, reduction, max_class_size)
    _check_class_sizes(labels, max_class_size)
    C.check_process_group(process_group)
    chosen = _choose_backend(backend, mining, process_group, embeddings)
    autocast = AC.autocast_dtype(embeddings)
    kernel = chosen != "reference" and embeddings.shape[0] > 0  # the cross-process path is the reference
    with AC.off(embeddings):
        embeddings = AC.round_operand(embeddings, autocast, reference=not kernel)
        if process_group is not None:
            return dist_impl.triplet_loss(embeddings, labels, margin=margin, mining=mining, distance=distance,
                                          soft_margin=soft_margin, normalize=normalize, reduction=reduction,
                                          process_group=process_group)
        if not kernel:
            return ref.triplet_loss(embeddings, labels, margin=margin, mining=mining, distance=distance,
                                    soft_margin=soft_margin, normalize=normalize, reduction=reduction)
        x = embeddings.contiguous()
        distance_id = ref.DISTANCE_IDS[distance]  # the kernel ops take the enums' values
        tensors = (x, labels.to(torch.int64).contiguous())
        options = dict(distance=distance_id, margin=margin, soft_margin=soft_margin, normalize=normalize)
        out_dtype = AC.loss_dtype(autocast)
        if mining == "batch_hard":
            return kernels.triplet_kernels(tensors, options, reduction=reduction, backend=chosen, out_dtype=out_dtype)
        return kernels.triplet_mined_kernels(tensors, dict(options, mining=ref.MINING_IDS[mining], chunk_size=None,
                                                           max_class_size=max_class_size),
                                             reduction=reduction, backend=chosen, out_dtype=out_dtype)


def _check_class_sizes(labels, max_class_size):
    """ValueError for a broken max_class_size promise, where reading the labels is free."""
    if max_class_size is None or labels.numel() == 0 or not C.eager_value_checks(labels):
        return
    sizes = class_sizes(labels)
    largest = int(sizes.max())
    if largest > max_class_size:
        label = labels[sizes.argmax()].item()
        raise ValueError(f"max_class_size={max_class_size} was promised, but label {label} occurs {largest} times "
                         f"in labels")


def _choose_backend(backend, mining, process_group, embeddings):
    """The kernels mine within one process; the cross-process path runs on the reference, and an
    explicit kernel backend for it says so."""
    C.check_choice("backend", backend, BACKENDS)
    if process_group is None:
        return resolve_backend(backend, FAMILY, embeddings)
    if backend in KERNEL_BACKENDS:
        raise BackendUnavailableError(
            f"backend={backend!r}: triplet kernels mine within one process only; process_group (across "
            f"processes) runs on backend='reference' or 'auto'")
    try:
        resolve_backend(backend, FAMILY, embeddings)  # still rejects a bad LOSSFORGE_BACKEND value
    except BackendUnavailableError:
        pass  # a kernel preference from the environment does not apply to this call
    return "reference"


class TripletLoss(nn.Module):
    def __init__(self, margin=0.2, mining="batch_hard", distance="euclidean", soft_margin=False, normalize=False,
                 reduction="mean", max_class_size=None, process_group=None, backend="auto"):
        super().__init__()
        _check_options(margin, mining, distance, soft_margin, normalize, reduction, max_class_size)
        C.check_process_group(process_group)
        self.margin, self.mining, self.distance = margin, mining, distance
        self.soft_margin, self.normalize, self.reduction = soft_margin, normalize, reduction
        self.max_class_size = max_class_size
        self.process_group, self.backend = process_group, backend

    def forward(self, embeddings, labels):
        return triplet_loss(embeddings, labels, margin=self.margin, mining=self.mining, distance=self.distance,
                            soft_margin=self.soft_margin, normalize=self.normalize, reduction=self.reduction,
                            max_class_size=self.max_class_size, process_group=self.process_group,
                            backend=self.backend)

    def extra_repr(self) -> str:
        return (f"margin={self.margin}, mining={self.mining!r}, distance={self.distance!r}, "
                f"soft_margin={self.soft_margin}, normalize={self.normalize}, reduction={self.reduction!r}, "
                f"max_class_size={self.max_class_size}")


# The family's public API (functional.py, modules.py and the package export exactly these).
FUNCTIONS = (triplet_loss,)
MODULES = (TripletLoss,)
