"""Softmax cross-entropy family in plain PyTorch: the ground truth for every CE kernel.

Rows are (M, C) logits; the public layer moves the class dimension last and flattens first.
Everything is computed in float32 (float64 for float64 input) and differentiated by autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_lse(x: torch.Tensor) -> torch.Tensor:
    """Each row's log-sum-exp as torch's log_softmax forms it, m + log(sum exp(x - m)) with m the row's
    max: a +inf logit makes the row NaN (inf - inf), as in F.cross_entropy, where torch.logsumexp
    would give +inf; NaN propagates; an all -inf row gives -inf."""
    m = x.detach().amax(dim=1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    return (m + torch.log(torch.exp(x - m).sum(dim=1, keepdim=True))).squeeze(1)


def softcapped(x: torch.Tensor, softcap) -> torch.Tensor:
    return x if softcap is None else softcap * torch.tanh(x / softcap)


def focal_modulation(logits: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    """(1 - p_t) ** gamma per row, with log(1 - p_t) = logsumexp over the other classes - lse.

    The log-space form keeps the gradient finite for 0 < gamma < 1 when p_t rounds to 1, where
    the textbook pow(1 - p_t, gamma) would give inf * 0.
    """
    if gamma == 0.0:
        return torch.ones(logits.shape[0], dtype=logits.dtype, device=logits.device)
    is_target = F.one_hot(target, logits.shape[1]).bool()
    others = logits.masked_fill(is_target, float("-inf"))
    has_other = torch.isfinite(others).any(dim=1, keepdim=True)
    # Rows where every other class is -inf have p_t = 1: give them a finite stand-in so that the
    # (unused) branch does not poison the gradient with NaN.
    others = torch.where(has_other, others, torch.zeros_like(others))
    log_one_minus_pt = torch.logsumexp(others, dim=1) - torch.logsumexp(logits, dim=1)
    return torch.where(has_other.squeeze(1), torch.exp(gamma * log_one_minus_pt), torch.zeros_like(log_one_minus_pt))


def cross_entropy_rows(logits, target, weight=None, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                       softcap=None, focal_gamma=0.0, focal_alpha=None):
    """Per-row loss (M,) in the compute dtype; ignored rows are 0, out-of-range targets give NaN."""
    x = logits.to(compute_dtype(logits.dtype))
    num_classes = x.shape[1]
    w = None if weight is None else weight.to(x.dtype)
    eps = label_smoothing

    if target.dtype.is_floating_point:  # class probabilities
        x = softcapped(x, softcap)
        lse = row_lse(x)
        q = target.to(x.dtype) * (1.0 - eps) + eps / num_classes
        if w is not None:
            q = q * w
        row = -(q * (x - lse[:, None])).sum(dim=1)
        return row + z_loss * lse.square()

    ignored = target == ignore_index
    if num_classes == 0:  # nothing to gather from: every row is ignored (0) or out of range (NaN)
        zero = x.sum(dim=1)  # zeros on the logits' graph
        return torch.where(ignored, zero, torch.full_like(zero, float("nan")))
    in_range = (target >= 0) & (target < num_classes)
    counted = in_range & ~ignored
    t = torch.where(counted, target, torch.zeros_like(target))
    # Rows that are not counted get stand-in logits, so that an inf in their (discarded) loss cannot
    # turn the zero gradient of the final where() into inf * 0 = NaN (the softcap comes after, for
    # the same reason: tanh's gradient at a NaN is NaN).
    x = softcapped(torch.where(counted[:, None], x, torch.zeros_like(x)), softcap)
    lse = row_lse(x)
    logp = x - lse[:, None]
    nll = -logp.gather(1, t[:, None]).squeeze(1)
    w_t = torch.ones_like(nll) if w is None else w[t]
    row = (1.0 - eps) * w_t * nll
    if eps > 0.0:
        smooth = -(logp if w is None else logp * w).sum(dim=1)
        row = row + (eps / num_classes) * smooth
    if focal_gamma != 0.0 or focal_alpha is not None:
        factor = focal_modulation(x, t, focal_gamma)
        # Where p_t = 0 (target logit -inf) the factor's gradient is 0 and meets an infinite CE:
        # dropped, as the kernels do, rather than 0 * inf = NaN.
        factor = torch.where(torch.isposinf(nll), factor.detach(), factor)
        if isinstance(focal_alpha, torch.Tensor):
            factor = factor * focal_alpha.to(x.dtype)[t]
        elif focal_alpha is not None:
            factor = factor * focal_alpha
        row = row * factor
    row = row + z_loss * lse.square()
    row = torch.where(ignored, torch.zeros_like(row), row)
    return torch.where(in_range | ignored, row, torch.full_like(row, float("nan")))


def mean_divisor(target, weight, ignore_index, num_rows):
    """torch's 'mean' divisor: the class weights of non-ignored rows summed, or their count."""
    if target.dtype.is_floating_point:
        return torch.full((), float(num_rows), device=target.device, dtype=torch.float32)
    kept = target != ignore_index
    if weight is None or weight.numel() == 0:  # no classes: every kept row is out of range anyway
        return kept.sum().to(torch.float32)
    safe = torch.where(kept, target, torch.zeros_like(target)).clamp(0, weight.shape[0] - 1)
    w = weight.to(compute_dtype(weight.dtype))
    return torch.where(kept, w[safe], torch.zeros((), dtype=w.dtype, device=w.device)).sum()


def reduce_rows(rows, reduction, divisor_fn):
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / divisor_fn().to(rows.dtype)


def cross_entropy(logits, target, weight=None, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                  z_loss=0.0, softcap=None, focal_gamma=0.0, focal_alpha=None):
    """Loss over (M, C) logits and (M,) class indices or (M, C) probabilities, in the input dtype."""
    rows = cross_entropy_rows(logits, target, weight, ignore_index=ignore_index, label_smoothing=label_smoothing,
                              z_loss=z_loss, softcap=softcap, focal_gamma=focal_gamma, focal_alpha=focal_alpha)
    out = reduce_rows(rows, reduction, lambda: mean_divisor(target, weight, ignore_index, logits.shape[0]))
    return out.to(logits.dtype)

