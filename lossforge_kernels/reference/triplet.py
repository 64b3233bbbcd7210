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

NaN and inf (a non-finite embedding, or a squared norm that overflows) follow the dense formulas:
a distance involving a NaN is NaN, and a NaN candidate is never skipped: the farthest positive and
the nearest negative of batch_hard are NaN if any candidate is (the first NaN column is the choice,
as torch's argmax/argmin make it), every semi_hard pair of an anchor with a NaN negative takes that
negative, and every triplet with a NaN distance is NaN. So an anchor that has a positive and a
negative gets a NaN loss as soon as one of its distances is NaN (a NaN row: every such anchor, as
the row is each one's positive or negative); anchors left out stay 0. +inf distances are ordinary
values (d_ap = +inf gives an infinite loss, d_an = +inf a zero hinge, and inf - inf is NaN). The
gradient of a loss with a non-finite embedding has a NaN in every row (the Gram form's backward
multiplies every row by the non-finite one).

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

import enum

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .cross_entropy import compute_dtype



class _Choice(enum.IntEnum):
    """A closed option: the public API names a member by its lower-case name ('semi_hard'), the kernel
    ops take its value (the kernels' values too: csrc/enums.h, checked by tests/test_enums.py)."""

    @property
    def label(self) -> str:
        return self.name.lower()


class Distance(_Choice):
    EUCLIDEAN = 0
    SQUARED_EUCLIDEAN = 1
    COSINE = 2


class Mining(_Choice):
    BATCH_HARD = 0
    SEMI_HARD = 1
    BATCH_ALL = 2


DISTANCES = tuple(d.label for d in Distance)
MININGS = tuple(m.label for m in Mining)
# The public names as the kernel ops take them (plain ints: a dict lookup that torch.compile traces).
DISTANCE_IDS = {d.label: int(d) for d in Distance}
MINING_IDS = {m.label: int(m) for m in Mining}
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


def _first(mask):
    """(A, 1) the first True column of each row (0 where none)."""
    return mask.to(torch.int8).argmax(1, keepdim=True)


def _batch_hard(dist, pos, neg, margin, soft_margin):
    # Selection by index then gather, so the gradient goes to exactly one positive and one negative.
    # argmax/argmin take a NaN candidate (the first) over any number, as torch's max/min do.
    hardest_pos = dist.masked_fill(~pos, float("-inf")).argmax(1, keepdim=True)
    masked_neg = dist.masked_fill(~neg, float("inf"))
    hardest_neg = masked_neg.argmin(1, keepdim=True)
    # a nearest negative at +inf ties with the fill: take the first real one
    at_inf = neg & torch.isposinf(dist)
    hardest_neg = torch.where(torch.isposinf(masked_neg.gather(1, hardest_neg)) & at_inf.any(1, keepdim=True),
                              _first(at_inf), hardest_neg)
    d_ap = dist.gather(1, hardest_pos).squeeze(1)
    d_an = dist.gather(1, hardest_neg).squeeze(1)
    kept = pos.any(1) & neg.any(1)
    per_anchor = torch.where(kept, _triplet_term(d_ap - d_an, margin, soft_margin), 0)
    return per_anchor, kept.sum()


def _sorted_negatives(dist, neg):
    """Sort keys of each anchor's negatives in ascending order, with their columns: the first
    neg.sum(1) slots are the negatives (stable: equal distances keep the smallest column first),
    the rest +inf. A negative at +inf sorts as the largest float so that it stays before the
    non-negatives, and a NaN one as +inf (the callers take NaN candidates apart)."""
    top = torch.finfo(dist.dtype).max
    keys = torch.where(dist.isnan(), float("inf"), dist.clamp_max(top))
    return torch.sort(keys.masked_fill(~neg, float("inf")), dim=1, stable=True)


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
        # a NaN negative is never skipped (no comparison holds for it): the first one is every pair's choice
        nan_neg = neg & d.isnan()
        chosen = torch.where(nan_neg.any(1, keepdim=True), _first(nan_neg), chosen)
    d_an = dist.gather(1, chosen)
    pairs = pos & neg.any(1, keepdim=True)
    per_pair = torch.where(pairs, _triplet_term(dist - d_an, margin, soft_margin), 0)
    return per_pair.sum(1), pairs.sum()


def _batch_all_hinge(dist, pos, neg, margin):
    """batch_all with relu(d_ap - d_an + margin): per (anchor, positive), the k negatives with d_an <
    d_ap + margin give k (d_ap + margin) - (their distances' sum), read off the sorted negatives'
    prefix sums after a binary search; O(B^2 log B) time and B x B memory, backward included."""
    keys, columns = _sorted_negatives(dist.detach(), neg)
    values = dist.gather(1, columns)  # carries the gradient back to the columns
    finite = torch.isfinite(values) & (torch.arange(dist.shape[1], device=dist.device) < neg.sum(1, keepdim=True))
    prefix = torch.cumsum(torch.where(finite, values, 0.0), dim=1)
    threshold = dist + margin
    k = torch.searchsorted(keys, threshold.detach().contiguous())  # how many d_an < threshold
    closer = torch.where(k > 0, prefix.gather(1, (k - 1).clamp(min=0)), 0.0)
    per_pair = k.to(dist.dtype) * threshold - closer + _undefined_triplets(dist, neg, threshold)
    return torch.where(pos, per_pair, 0.0).sum(1), torch.where(pos, k, 0).sum()


def _undefined_triplets(dist, neg, threshold):
    """NaN (through dist, for the gradient) where a pair has a triplet the sums above cannot express:
    a NaN negative distance, or d_ap + margin = +inf against a negative at +inf (inf - inf); else 0."""
    nan_neg = torch.where(neg & dist.isnan(), dist, 0.0).sum(1, keepdim=True)
    inf_neg = torch.where(neg & torch.isposinf(dist), dist, 0.0).amax(1, keepdim=True)
    clash = torch.isposinf(threshold) & torch.isposinf(inf_neg)
    return nan_neg + torch.where(clash, threshold - inf_neg, 0.0)


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
    # read would wait for the device, and under torch.compile, which cannot make a Python int of a
    # tensor's value, P is B.
    eager_cpu = dist.device.type == "cpu" and pos.numel() and not torch.compiler.is_compiling()
    slots = int(pos.sum(1).max()) if eager_cpu else dist.shape[1]
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
