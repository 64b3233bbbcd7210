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
semi_hard and batch_all (hinge) work from each anchor's sorted negative distances: the first negative
beyond d_ap by binary search, and the count and sum of the negatives within d_ap + margin from prefix
sums, O(B^2 log B) time and B x B memory, backward included. batch_all with soft_margin (no such
shortcut) visits anchors in chunks so that at most chunk x B x B values live at once, also in
backward (it recomputes each chunk there rather than keeping B^3 values).
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
# Elements of one chunk x P x B block of soft-margin batch_all: 2M float32 values are 8 MB.
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


def _batch_hard(dist, pos, neg, margin, soft_margin):
    # Selection by index then gather, so the gradient goes to exactly one positive and one negative.
    hardest_pos = dist.masked_fill(~pos, float("-inf")).argmax(1, keepdim=True)
    hardest_neg = dist.masked_fill(~neg, float("inf")).argmin(1, keepdim=True)
    d_ap = dist.gather(1, hardest_pos).squeeze(1)
    d_an = dist.gather(1, hardest_neg).squeeze(1)
    kept = pos.any(1) & neg.any(1)
    per_anchor = torch.where(kept, _triplet_term(d_ap - d_an, margin, soft_margin), 0)
    return per_anchor, kept.sum()


def _sorted_negatives(dist, neg):
    """Each anchor's negative distances in ascending order (non-negatives last, as +inf) with their
    columns; the sort is stable, so equal distances keep the smallest column first."""
    return torch.sort(dist.masked_fill(~neg, float("inf")), dim=1, stable=True)


def _semi_hard(dist, pos, neg, margin, soft_margin, chunk_size):
    with torch.no_grad():  # only the choice is made here; the gradient comes through the gather below
        d = dist.detach()
        farthest_neg = d.masked_fill(~neg, float("-inf")).argmax(1)
        sorted_d, columns = _sorted_negatives(d, neg)
        # for every column j, the first negative strictly farther than j: a binary search per pair
        first = torch.searchsorted(sorted_d, d.contiguous(), right=True)
        beyond = first < neg.sum(1, keepdim=True)
        nearest = columns.gather(1, first.clamp(max=d.shape[1] - 1))
        chosen = torch.where(beyond, nearest, farthest_neg[:, None])  # [anchor, positive] -> negative
    d_an = dist.gather(1, chosen)
    pairs = pos & neg.any(1, keepdim=True)
    per_pair = torch.where(pairs, _triplet_term(dist - d_an, margin, soft_margin), 0)
    return per_pair.sum(1), pairs.sum()


def _batch_all_hinge(dist, pos, neg, margin):
    """batch_all with relu(d_ap - d_an + margin): per (anchor, positive), the k negatives with d_an <
    d_ap + margin give k (d_ap + margin) - (their distances' sum), read off the sorted negatives'
    prefix sums after a binary search; O(B^2 log B) time and B x B memory, backward included."""
    sorted_d, _ = _sorted_negatives(dist, neg)  # the values carry the gradient back to their columns
    finite = torch.isfinite(sorted_d)
    prefix = torch.cumsum(torch.where(finite, sorted_d, 0.0), dim=1)
    threshold = dist + margin
    k = torch.searchsorted(sorted_d.detach(), threshold.detach().contiguous())  # how many d_an < threshold
    closer = torch.where(k > 0, prefix.gather(1, (k - 1).clamp(min=0)), 0.0)
    per_pair = torch.where(pos, k.to(dist.dtype) * threshold - closer, 0.0)
    return per_pair.sum(1), torch.where(pos, k, 0).sum()


def _soft_chunk(d_ap, pos_slots, rows, neg_rows):
    """Per-anchor sums of softplus(d_ap - d_an) over (positive, negative) pairs, for one chunk of anchors:
    d_ap (c, P) the distances of each anchor's positive slots, rows (c, B) its distances to the batch."""
    valid = pos_slots[:, :, None] & neg_rows[:, None, :]                           # (c, P, B): [a, p, n]
    return torch.where(valid, F.softplus(d_ap[:, :, None] - rows[:, None, :]), 0).sum((1, 2))


def _batch_all(dist, pos, neg, margin, soft_margin, chunk_size):
    if not soft_margin:
        return _batch_all_hinge(dist, pos, neg, margin)
    # Every (positive, negative) pair counts, so no sort helps; only each anchor's positives are visited.
    # On CPU their largest count is read (free) and the blocks are (chunk x P x B); on a GPU, where that
    # read would wait for the device, P is B.
    slots = int(pos.sum(1).max()) if dist.device.type == "cpu" and pos.numel() else dist.shape[1]
    columns = torch.sort(pos.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :max(slots, 1)]
    pos_slots = pos.gather(1, columns)
    d_ap = dist.gather(1, columns)
    width = max(1, pos_slots.shape[1] * dist.shape[1])
    step = chunk_size or max(1, CHUNK_ELEMENTS // width)
    recompute = torch.is_grad_enabled() and dist.requires_grad
    sums = []
    for start in range(0, dist.shape[0], step):
        args = (d_ap[start:start + step], pos_slots[start:start + step], dist[start:start + step],
                neg[start:start + step])
        if recompute:  # keep only the inputs for backward and rebuild the chunk's values there
            sums.append(checkpoint(_soft_chunk, *args, use_reentrant=False, preserve_rng_state=False))
        else:
            sums.append(_soft_chunk(*args))
    count = (pos.sum(1) * neg.sum(1)).sum()  # every valid triplet counts with soft_margin
    return torch.cat(sums) if sums else dist.new_zeros(0), count


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

    chunk_size: anchors per chunk of batch_all with soft_margin (default: as many as fit CHUNK_ELEMENTS).
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
