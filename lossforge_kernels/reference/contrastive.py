"""Contrastive losses in plain PyTorch: InfoNCE/CLIP, supervised contrastive (SupCon), SigLIP.

query (B, D) and key (M, D), M >= B: row i's positive is key i, keys B..M-1 are extra negatives.
Everything is computed in float32 (float64 for float64 input) and differentiated by autograd;
the loss comes back in the input dtype. The largest intermediate is the (B, M) logits matrix.
"""
from __future__ import annotations

import enum

import torch
import torch.nn.functional as F

from .cross_entropy import compute_dtype


class Kind(enum.IntEnum):
    """The per-pair term of the contrastive kernel ops, which serve the three losses. The values are
    the kernels' too: csrc/enums.h and triton_kernels/contrastive.py, checked by tests/test_enums.py."""
    INFO_NCE = 0
    SUPCON = 1
    SIGLIP = 2


def embed(x: torch.Tensor, normalize: bool, dtype: torch.dtype) -> torch.Tensor:
    x = x.to(dtype)
    return F.normalize(x, dim=1) if normalize else x


def compute_scalar(value, dtype: torch.dtype):
    """A Python float as is; a 0-dim tensor cast to the compute dtype (keeping its gradient)."""
    return value.to(dtype) if isinstance(value, torch.Tensor) else float(value)


def _reduce(rows: torch.Tensor, reduction: str, divisor) -> torch.Tensor:
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / divisor


def info_nce_rows(query, key, logit_scale, *, symmetric=True, normalize=True) -> torch.Tensor:
    """Per-row loss (B,) in the compute dtype; symmetric rows are 0.5 * (row_i + column_i)."""
    ct = compute_dtype(query.dtype)
    q, k = embed(query, normalize, ct), embed(key, normalize, ct)
    logits = compute_scalar(logit_scale, ct) * (q @ k.T)  # (B, M)
    b = q.shape[0]
    positive = logits[:, :b].diagonal()
    rows = torch.logsumexp(logits, dim=1) - positive
    if symmetric:
        cols = torch.logsumexp(logits[:, :b], dim=0) - positive
        rows = 0.5 * (rows + cols)
    return rows


def info_nce(query, key, logit_scale, *, symmetric=True, normalize=True, reduction="mean") -> torch.Tensor:
    """InfoNCE / CLIP loss with logits s * <q_i, k_j>; 'mean' is over the B rows."""
    rows = info_nce_rows(query, key, logit_scale, symmetric=symmetric, normalize=normalize)
    return _reduce(rows, reduction, query.shape[0]).to(query.dtype)


def supcon_rows(features, labels, temperature, *, normalize=True):
    """Per-anchor loss (B,) in the compute dtype and the mask of anchors that have a positive."""
    ct = compute_dtype(features.dtype)
    f = embed(features, normalize, ct)
    z = (f @ f.T) / temperature  # (B, B)
    b = f.shape[0]
    is_self = torch.eye(b, dtype=torch.bool, device=f.device)
    positive = (labels[:, None] == labels[None, :]) & ~is_self
    n_pos = positive.sum(dim=1)
    has_pos = n_pos > 0
    # Rows without a positive are dropped; giving them a finite logsumexp input keeps a B == 1
    # batch (nothing but self to exclude) from producing a NaN gradient through the unused branch.
    others = z.masked_fill(is_self, float("-inf"))
    others = torch.where(has_pos[:, None], others, torch.zeros_like(others))
    log_prob = z - torch.logsumexp(others, dim=1, keepdim=True)
    pos_sum = torch.where(positive, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    rows = -pos_sum / n_pos.clamp_min(1).to(ct)
    return torch.where(has_pos, rows, torch.zeros_like(rows)), has_pos


def supcon_loss(features, labels, temperature, *, normalize=True, reduction="mean") -> torch.Tensor:
    """Supervised contrastive loss (L_out); 'mean' is over anchors with at least one positive."""
    rows, has_pos = supcon_rows(features, labels, temperature, normalize=normalize)
    return _reduce(rows, reduction, has_pos.sum().to(rows.dtype)).to(features.dtype)


def siglip_rows(query, key, logit_scale, logit_bias, *, normalize=True) -> torch.Tensor:
    """Per-row sums (B,) of -log sigmoid(z_ij * (s * <q_i, k_j> + b)) in the compute dtype."""
    ct = compute_dtype(query.dtype)
    q, k = embed(query, normalize, ct), embed(key, normalize, ct)
    logits = compute_scalar(logit_scale, ct) * (q @ k.T) + compute_scalar(logit_bias, ct)  # (B, M)
    sign = 2.0 * torch.eye(*logits.shape, dtype=ct, device=logits.device) - 1.0
    return -F.logsigmoid(sign * logits).sum(dim=1)


def siglip_loss(query, key, logit_scale, logit_bias, *, normalize=True, reduction="mean") -> torch.Tensor:
    """SigLIP pairwise sigmoid loss; 'mean' divides the double sum by B (not B * M), as the paper does."""
    rows = siglip_rows(query, key, logit_scale, logit_bias, normalize=normalize)
    return _reduce(rows, reduction, query.shape[0]).to(query.dtype)
