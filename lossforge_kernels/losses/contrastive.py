"""Public contrastive losses: info_nce (InfoNCE / CLIP), supcon_loss, siglip_loss and their modules.

Checks arguments (metadata only, nothing synchronises), picks the backend and runs it: the fused
kernels (ops/contrastive.py) for CUDA tensors, or reference/contrastive.py.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import _autocast as AC
from .. import _checks as C
from .._backends import LossKernels, register_kernels, resolve_backend
from ..distributed import contrastive as dist_impl
from ..ops.contrastive import info_nce_kernels, siglip_kernels, supcon_kernels
from ..reference import contrastive as ref

FAMILY = "contrastive"
register_kernels(FAMILY, LossKernels(backends=("triton", "cuda"),
                                     gradients_of="query, key (features), logit_scale and logit_bias"))
F32 = torch.float32


def _kernel_scalar(value, like):
    """A logit scale or bias as the kernels take it: a 0-dim fp32 tensor on like's device (a tensor
    keeps its gradient through the conversion)."""
    if isinstance(value, torch.Tensor):
        return value.to(device=like.device, dtype=F32)
    return like.new_full((), float(value), dtype=F32)


def _check_pair(query, key):
    """query (B, D) and key (M, D) with M >= B, same dtype and device."""
    C.check_tensor("query", query, ndim=2, float_only=True)
    C.check_tensor("key", key, ndim=2, float_only=True)
    if key.dtype != query.dtype:
        raise TypeError(f"key must have the query's dtype {query.dtype}, got {key.dtype}")
    if key.shape[1] != query.shape[1]:
        raise ValueError(f"key must have the query's feature size D={query.shape[1]}, got shape {tuple(key.shape)}")
    if key.shape[0] < query.shape[0]:
        raise ValueError(f"key must have at least as many rows as query (M >= B = {query.shape[0]}), "
                         f"got shape {tuple(key.shape)}")
    C.check_same_device("query", query, key=key)


def _check_scalar(name, value, ref_tensor, *, positive):
    """A Python float, or a 0-dim float tensor on ref_tensor's device (or a CPU scalar, as torch allows)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{name} must be a 0-dim tensor (a scalar), got shape {tuple(value.shape)}")
        C.check_tensor(name, value, float_only=True)
        if value.device.type != "cpu":
            C.check_same_device("query", ref_tensor, **{name: value})
        if C.eager_value_checks(value):  # the float's check, where reading the value is free
            C.check_float(name, value.item(), low=0.0 if positive else None, low_open=True)
        return value
    return C.check_float(name, value, low=0.0 if positive else None, low_open=True)


def info_nce(query, key, *, logit_scale=None, temperature=0.07, symmetric=True, normalize=True, reduction="mean",
             process_group=None, backend="auto"):
    """InfoNCE / CLIP contrastive loss between query (B, D) and key (M, D), M >= B.

    logits_ij = s * <q_i, k_j> (rows L2-normalised first when `normalize`), s = `logit_scale` (a
    0-dim tensor or float, the multiplier itself; a tensor gets a gradient) or else 1/temperature.
    Row i's positive is key i; keys B..M-1 are extra negatives. Row loss: logsumexp_j logits_ij -
    logits_ii. `symmetric` (M == B) averages it with the column loss, as CLIP does. 'mean' is over
    the B rows, 'sum' their sum, 'none' the (B,) per-row losses.
    """
    C.check_process_group(process_group)
    _check_pair(query, key)
    temperature = C.check_float("temperature", temperature, low=0.0, low_open=True)
    if logit_scale is not None:
        logit_scale = _check_scalar("logit_scale", logit_scale, query, positive=True)
    symmetric = C.check_bool("symmetric", symmetric)
    normalize = C.check_bool("normalize", normalize)
    if symmetric and key.shape[0] != query.shape[0]:
        raise ValueError(f"symmetric=True needs as many keys as queries (M == B = {query.shape[0]}), got key shape "
                         f"{tuple(key.shape)}; pass symmetric=False to use extra keys as negatives")
    reduction = C.check_reduction(reduction)
    chosen = resolve_backend(backend, FAMILY, query)
    autocast = AC.autocast_dtype(query)
    kernel = process_group is None and chosen != "reference" and query.shape[0] > 0
    with AC.off(query):
        query, key = (AC.round_operand(t, autocast, reference=not kernel) for t in (query, key))
        if process_group is not None:
            return dist_impl.info_nce(query, key, logit_scale, temperature=temperature, symmetric=symmetric,
                                      normalize=normalize, reduction=reduction, process_group=process_group,
                                      backend="auto" if backend == "auto" else "reference")
        if logit_scale is None:
            logit_scale = 1.0 / temperature
        if not kernel:
            return ref.info_nce(query, key, logit_scale, symmetric=symmetric, normalize=normalize, reduction=reduction)
        tensors = (query.contiguous(), key.contiguous(), _kernel_scalar(logit_scale, query))
        return info_nce_kernels(tensors, dict(normalize=normalize, symmetric=symmetric), reduction=reduction,
                                backend=chosen, out_dtype=AC.loss_dtype(autocast))


def supcon_loss(features, labels, *, temperature=0.07, normalize=True, reduction="mean", process_group=None,
                backend="auto"):
    """Supervised contrastive loss (Khosla et al. 2020, L_out) over features (B, D) and labels (B,).

    For anchor i the positives are all j != i with labels[j] == labels[i]; the softmax runs over all
    j != i. Anchors without a positive are left out: 'mean' averages the others (nan when none are
    left, like torch's mean over nothing), 'sum' adds them, 'none' gives (B,) with 0 for those left out.
    """
    C.check_process_group(process_group)
    C.check_rows_and_labels("features", features, labels)
    temperature = C.check_float("temperature", temperature, low=0.0, low_open=True)
    normalize = C.check_bool("normalize", normalize)
    reduction = C.check_reduction(reduction)
    chosen = resolve_backend(backend, FAMILY, features)
    autocast = AC.autocast_dtype(features)
    kernel = process_group is None and chosen != "reference" and features.shape[0] > 0
    with AC.off(features):
        features = AC.round_operand(features, autocast, reference=not kernel)
        if process_group is not None:
            return dist_impl.supcon_loss(features, labels, temperature, normalize=normalize, reduction=reduction,
                                         process_group=process_group)
        if not kernel:
            return ref.supcon_loss(features, labels, temperature, normalize=normalize, reduction=reduction)
        tensors = (features.contiguous(), labels.to(torch.int64).contiguous())
        return supcon_kernels(tensors, dict(temperature=temperature, normalize=normalize), reduction=reduction,
                              backend=chosen, out_dtype=AC.loss_dtype(autocast))


def siglip_loss(query, key, logit_scale, logit_bias, *, normalize=True, reduction="mean", process_group=None,
                backend="auto"):
    """SigLIP pairwise sigmoid loss: -(1/B) sum_ij log sigmoid(z_ij * (s * <q_i, k_j> + b)).

    z_ij = +1 on the diagonal (i == j), -1 elsewhere; keys B..M-1 are extra negatives. `logit_scale`
    (s) and `logit_bias` (b) are 0-dim tensors (which get gradients) or floats. 'mean' is the formula
    above (divided by B, not B * M), 'sum' the double sum, 'none' the (B,) per-row sums over j.
    """
    C.check_process_group(process_group)
    _check_pair(query, key)
    logit_scale = _check_scalar("logit_scale", logit_scale, query, positive=True)
    logit_bias = _check_scalar("logit_bias", logit_bias, query, positive=False)
    normalize = C.check_bool("normalize", normalize)
    reduction = C.check_reduction(reduction)
    chosen = resolve_backend(backend, FAMILY, query)
    autocast = AC.autocast_dtype(query)
    kernel = process_group is None and chosen != "reference" and query.shape[0] > 0
    with AC.off(query):
        query, key = (AC.round_operand(t, autocast, reference=not kernel) for t in (query, key))
        if process_group is not None:
            return dist_impl.siglip_loss(query, key, logit_scale, logit_bias, normalize=normalize,
                                         reduction=reduction, process_group=process_group)
        if not kernel:
            return ref.siglip_loss(query, key, logit_scale, logit_bias, normalize=normalize, reduction=reduction)
        tensors = (query.contiguous(), key.contiguous(), _kernel_scalar(logit_scale, query),
                   _kernel_scalar(logit_bias, query))
        return siglip_kernels(tensors, dict(normalize=normalize), reduction=reduction, backend=chosen,
                              out_dtype=AC.loss_dtype(autocast))


class InfoNCELoss(nn.Module):
    """info_nce as a module; with `learn_temperature` it owns the CLIP-style learnable scale.

    The Parameter `log_logit_scale` starts at log(1/temperature); the scale used is its exp,
    clamped at `max_logit_scale` so that training cannot sharpen the softmax without bound.
    """

    def __init__(self, temperature=0.07, symmetric=True, normalize=True, reduction="mean", learn_temperature=False,
                 max_logit_scale=100.0, process_group=None, backend="auto"):
        super().__init__()
        self.temperature = C.check_float("temperature", temperature, low=0.0, low_open=True)
        self.max_logit_scale = C.check_float("max_logit_scale", max_logit_scale, low=0.0, low_open=True)
        self.symmetric = C.check_bool("symmetric", symmetric)
        self.normalize = C.check_bool("normalize", normalize)
        self.learn_temperature = C.check_bool("learn_temperature", learn_temperature)
        self.reduction = C.check_reduction(reduction)
        C.check_process_group(process_group)
        self.process_group, self.backend = process_group, backend
        if learn_temperature:
            self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / self.temperature)))
        else:
            self.register_parameter("log_logit_scale", None)

    def logit_scale(self):
        """The multiplier the next forward uses: a tensor when learnt, else 1/temperature."""
        if self.log_logit_scale is None:
            return 1.0 / self.temperature
        return self.log_logit_scale.exp().clamp(max=self.max_logit_scale)

    def forward(self, query, key):
        logit_scale = self.logit_scale() if self.learn_temperature else None
        return info_nce(query, key, logit_scale=logit_scale, temperature=self.temperature, symmetric=self.symmetric,
                        normalize=self.normalize, reduction=self.reduction, process_group=self.process_group,
                        backend=self.backend)


class SupConLoss(nn.Module):
    """supcon_loss as a module."""

    def __init__(self, temperature=0.07, normalize=True, reduction="mean", process_group=None, backend="auto"):
        super().__init__()
        self.temperature = C.check_float("temperature", temperature, low=0.0, low_open=True)
        self.normalize = C.check_bool("normalize", normalize)
        self.reduction = C.check_reduction(reduction)
        C.check_process_group(process_group)
        self.process_group, self.backend = process_group, backend

    def forward(self, features, labels):
        return supcon_loss(features, labels, temperature=self.temperature, normalize=self.normalize,
                           reduction=self.reduction, process_group=self.process_group, backend=self.backend)


class SigLIPLoss(nn.Module):
    """siglip_loss as a module owning the learnable `log_logit_scale` and `logit_bias` of the SigLIP paper.

    The defaults (scale 10, bias -10) start the sigmoid far on the negative side, since all but
    one pair per row are negatives.
    """

    def __init__(self, init_logit_scale=10.0, init_logit_bias=-10.0, normalize=True, reduction="mean",
                 process_group=None, backend="auto"):
        super().__init__()
        init_logit_scale = C.check_float("init_logit_scale", init_logit_scale, low=0.0, low_open=True)
        init_logit_bias = C.check_float("init_logit_bias", init_logit_bias)
        self.normalize = C.check_bool("normalize", normalize)
        self.reduction = C.check_reduction(reduction)
        C.check_process_group(process_group)
        self.process_group, self.backend = process_group, backend
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(init_logit_bias))

    def forward(self, query, key):
        return siglip_loss(query, key, self.log_logit_scale.exp(), self.logit_bias, normalize=self.normalize,
                           reduction=self.reduction, process_group=self.process_group, backend=self.backend)


# The family's public API (functional.py, modules.py and the package export exactly these).
FUNCTIONS = (info_nce, supcon_loss, siglip_loss)
MODULES = (InfoNCELoss, SupConLoss, SigLIPLoss)
