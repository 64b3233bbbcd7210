"""Triplet loss with in-batch mining, in plain PyTorch.

Distances (B x B), computed in float32 (float64 for float64 input):
  euclidean          sqrt(max(|a|^2 + |b|^2 - 2 a.b, 0) + 1e-12)   (the eps keeps the gradient finite at 0)
  squared_euclidean  max(|a|^2 + |b|^2 - 2 a.b, 0)
  cosine             1 - a.b / (max(|a|, 1e-12) max(|b|, 1e-12))
`normalize=True` L2-normalises the rows first. d_ap is an anchor-positive distance (same label,
other row), d_an an anchor-negative one (other label); a triplet's loss is relu(d_ap - d_an + margin),
or softplus(d_ap - d_an) with soft_margin (margin unused).

Mining:
  batch_hard  per anchor, the farthest positive and the nearest negative; anchors with no positive
              or no negative are left out.
  semi_hard   per (anchor, positive) pair, the nearest negative with d_an > d_ap, or, if there is
              none, the farthest negative (TensorFlow Addons' triplet_semihard_loss rule).
  batch_all   every (anchor, positive, negative) triplet.
Ties go to the smallest index (argmax/argmin return the first occurrence), so the chosen triplets and
hence the gradients are deterministic.

Reductions ('sum' always equals 'none'.sum()):
  'none'  (B,) per anchor: batch_hard its loss (0 if left out); semi_hard / batch_all the sum over
          its pairs / triplets.
  'mean'  batch_hard: over the anchors kept; semi_hard: over the (anchor, positive) pairs whose anchor
          has a negative; both are nan when there is nothing to average, as torch's mean of nothing.
          batch_all: over the triplets with a non-zero loss (every triplet with soft_margin), and 0,
          not nan, when there is none.
semi_hard and batch_all visit anchors in chunks so that at most chunk x B x B values live at once,
also in backward (batch_all recomputes each chunk there rather than keeping B^3 values).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .cross_entropy import compute_dtype

MININGS = ("batch_hard", "semi_hard", "batch_all")
DISTANCES = ("euclidean", "squared_euclidean", "cosine")
EUCLIDEAN_EPS = 1e-12
NORM_EPS = 1e-12
# Elements of one chunk x B x B block: 2M float32 values are 8 MB, a few such temporaries per chunk.
CHUNK_ELEMENTS = 1 << 21


def pairwise_distances(x: torch.Tensor, distance: str, other: torch.Tensor | None = None) -> torch.Tensor:
    """(B, D) [, (B', D)] -> (B, B') distances between the rows of x and those of `other` (default: x)."""
    y = x if other is None else other
    if distance == "cosine":
        unit = F.normalize(x, dim=1, eps=NORM_EPS)
        return 1 - unit @ (unit if other is None else F.normalize(y, dim=1, eps=NORM_EPS)).T
    sq_x, sq_y = (x * x).sum(1), (y * y).sum(1)
    # Gram form: one matmul instead of a B x B x D difference tensor; rounding can make it slightly negative.
    squared = (sq_x[:, None] + sq_y[None, :] - 2 * (x @ y.T)).clamp_min(0)
    if distance == "squared_euclidean":
        return squared
    return torch.sqrt(squared + EUCLIDEAN_EPS)


def _triplet_term(gap: torch.Tensor, margin: float, soft_margin: bool) -> torch.Tensor:
    """Loss of triplets with gap = d_ap - d_an."""
    return F.softplus(gap) if soft_margin else F.relu(gap + margin)


def _chunks(batch: int, chunk_size: int | None, width: int | None = None):
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ELEMENTS // max(1, (width or batch) ** 2))
    for start in range(0, batch, chunk_size):
        yield start, min(start + chunk_size, batch)


def _batch_hard(dist, pos, neg, margin, soft_margin):
    # Selection by index then gather, so the gradient goes to exactly one positive and one negative.
    hardest_pos = dist.masked_fill(~pos, float("-inf")).argmax(1, keepdim=True)
    hardest_neg = dist.masked_fill(~neg, float("inf")).argmin(1, keepdim=True)
    d_ap = dist.gather(1, hardest_pos).squeeze(1)
    d_an = dist.gather(1, hardest_neg).squeeze(1)
    kept = pos.any(1) & neg.any(1)
    per_anchor = torch.where(kept, _triplet_term(d_ap - d_an, margin, soft_margin), 0)
    return per_anchor, kept.sum()


def _semi_hard(dist, pos, neg, margin, soft_margin, chunk_size):
    batch = dist.shape[0]
    chosen = torch.empty(dist.shape, dtype=torch.long, device=dist.device)  # [anchor, positive] -> negative
    with torch.no_grad():  # only the choice is made here; the gradient comes through the gather below
        d = dist.detach()
        farthest_neg = d.masked_fill(~neg, float("-inf")).argmax(1)
        for start, stop in _chunks(batch, chunk_size, dist.shape[1]):
            rows = d[start:stop]                                                   # (c, B)
            # outside[a, j, k]: negative k is farther from anchor a than positive j is.
            outside = neg[start:stop, None, :] & (rows[:, None, :] > rows[:, :, None])
            nearest_outside = rows[:, None, :].masked_fill(~outside, float("inf")).argmin(2)
            chosen[start:stop] = torch.where(outside.any(2), nearest_outside, farthest_neg[start:stop, None])
    d_an = dist.gather(1, chosen)
    pairs = pos & neg.any(1, keepdim=True)
    per_pair = torch.where(pairs, _triplet_term(dist - d_an, margin, soft_margin), 0)
    return per_pair.sum(1), pairs.sum()


def _batch_all_chunk(rows, pos_rows, neg_rows, margin: float, soft_margin: bool):
    """Per-anchor loss sums and the count of triplets 'mean' averages over, for one chunk of anchors."""
    valid = pos_rows[:, :, None] & neg_rows[:, None, :]                            # (c, B, B): [a, p, n]
    loss = _triplet_term(rows[:, :, None] - rows[:, None, :], margin, soft_margin)
    loss = torch.where(valid, loss, 0)
    counted = valid if soft_margin else loss > 0
    return loss.sum((1, 2)), counted.sum()


def _batch_all(dist, pos, neg, margin, soft_margin, chunk_size):
    sums, count = [], dist.new_zeros((), dtype=torch.long)
    recompute = torch.is_grad_enabled() and dist.requires_grad
    for start, stop in _chunks(dist.shape[0], chunk_size, dist.shape[1]):
        args = (dist[start:stop], pos[start:stop], neg[start:stop], margin, soft_margin)
        if recompute:  # keep only `dist` for backward and rebuild the chunk's c x B x B values there
            chunk_sums, chunk_count = checkpoint(_batch_all_chunk, *args, use_reentrant=False,
                                                 preserve_rng_state=False)
        else:
            chunk_sums, chunk_count = _batch_all_chunk(*args)
        sums.append(chunk_sums)
        count = count + chunk_count
    return torch.cat(sums), count


def anchor_losses(dist, pos, neg, *, mining, margin, soft_margin, chunk_size=None):
    """(per-anchor loss, count 'mean' divides by) for anchors' rows of distances to a batch (A, B),
    with the masks of their positives and negatives in it."""
    if mining == "batch_hard":
        return _batch_hard(dist, pos, neg, margin, soft_margin)
    if mining == "semi_hard":
        return _semi_hard(dist, pos, neg, margin, soft_margin, chunk_size)
    if mining == "batch_all":
        return _batch_all(dist, pos, neg, margin, soft_margin, chunk_size)
    raise ValueError(f"mining must be one of {MININGS}, got {mining!r}")


def reduce_anchors(per_anchor, count, reduction, mining):
    if reduction == "none":
        return per_anchor
    if reduction == "sum":
        return per_anchor.sum()
    if mining == "batch_all":
        # No non-zero triplet means every loss is 0, so the sum is 0 and the mean is 0 rather than 0/0.
        return per_anchor.sum() / count.clamp_min(1)
    return per_anchor.sum() / count


def triplet_loss(embeddings, labels, *, margin=0.2, mining="batch_hard", distance="euclidean", soft_margin=False,
                 normalize=False, reduction="mean", chunk_size=None):
    """Triplet loss of (B, D) embeddings with (B,) integer labels; arguments are assumed checked.

    chunk_size: anchors per chunk for semi_hard / batch_all (default: as many as fit CHUNK_ELEMENTS).
    """
    ct = compute_dtype(embeddings.dtype)
    x = embeddings.to(ct)
    batch = x.shape[0]
    if batch == 0:  # argmax/argmin reject empty rows; the results are those of an empty sum/mean
        per_anchor = x.sum(1)  # (0,), still connected to the input for autograd
        count = torch.zeros((), dtype=torch.long, device=x.device)
    else:
        if normalize:
            x = F.normalize(x, dim=1, eps=NORM_EPS)
        dist = pairwise_distances(x, distance)
        same = labels[:, None] == labels[None, :]
        pos = same & ~torch.eye(batch, dtype=torch.bool, device=x.device)
        per_anchor, count = anchor_losses(dist, pos, ~same, mining=mining, margin=margin, soft_margin=soft_margin,
                                          chunk_size=chunk_size)
    return reduce_anchors(per_anchor, count, reduction, mining).to(embeddings.dtype)
