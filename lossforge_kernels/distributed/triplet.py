"""Global-batch triplet loss: each rank's anchors are mined against the whole batch (every rank's
embeddings, gathered with gradients), with the reference's rules (reference/triplet.py) on the
rank's (B_r x B) block of distances; the counts 'mean' divides by are summed over the ranks."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference import triplet as ref
from ..reference.cross_entropy import compute_dtype
from . import _group as G
from .contrastive import finish_rows


def triplet_loss(embeddings, labels, *, margin, mining, distance, soft_margin, normalize, reduction, process_group):
    group = G.resolve_group(process_group, embeddings.device)
    what = "triplet_loss(process_group=...)"
    got = G.agree(group, what, dict(loss="triplet_loss", margin=margin, mining=mining, distance=distance,
                                    soft_margin=soft_margin, normalize=normalize, reduction=reduction,
                                    features=embeddings.shape[1], dtype=embeddings.dtype),
                  {"anchors": embeddings.shape[0]})
    sizes = got["anchors"]
    ct = compute_dtype(embeddings.dtype)
    x = embeddings.to(ct)
    if normalize:
        x = F.normalize(x, dim=1, eps=ref.NORM_EPS)
    everyone = G.gather_rows(x, group, sizes)
    all_labels = G.gather_rows(labels.to(torch.int64), group, sizes)
    if x.shape[0] == 0:
        per_anchor, count = x.sum(1), torch.zeros((), dtype=torch.long, device=x.device)
    else:
        dist = ref.pairwise_distances(x, distance, everyone)                      # (B_r, B)
        me = G.offsets(sizes)[group.rank] + torch.arange(x.shape[0], device=x.device)
        is_self = torch.arange(everyone.shape[0], device=x.device)[None, :] == me[:, None]
        same = labels.to(torch.int64)[:, None] == all_labels[None, :]
        per_anchor, count = ref.anchor_losses(dist, same & ~is_self, ~same, mining=mining, margin=margin,
                                              soft_margin=soft_margin)
    total = G.all_reduce_value(count.to(ct), group)
    if reduction == "mean" and mining == "batch_all":
        total = total.clamp_min(1)
    return finish_rows(per_anchor, reduction, total, group, embeddings.dtype)
