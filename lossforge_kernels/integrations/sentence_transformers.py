"""sentence-transformers' ranking and batch triplet losses, computed by lossforge_kernels.

Same constructor arguments (`model` first) and `forward(sentence_features, labels)`: each column of
`sentence_features` goes through `model(features)["sentence_embedding"]`. `similarity_fct` and
`distance_metric` take sentence-transformers' functions (recognised by name: `cos_sim`,
`dot_score`, `euclidean_distance`, `cosine_distance`, `functools.partial(euclidean_distance,
squared=True)`) or lossforge's names ("cos_sim", "dot_score", "euclidean", "squared_euclidean",
"cosine"); any other function raises ValueError.

Differences from sentence-transformers (both compute distances in the Gram form):
- euclidean distance is `sqrt(max(squared, 0) + 1e-12)`; sentence-transformers gives exactly 0
  (and a zero gradient) where the squared distance rounds to 0 or below. Equal to within
  1e-12 / (2 d) for distinct points; for (nearly) coincident points both are the Gram form's
  rounding noise, about sqrt(2^-23) * |x|, and differ by that much.
- cosine distance is `1 - cos`, not clamped at 0 (they differ only by rounding for near-duplicates).
- BatchHardTripletLoss / BatchHardSoftMarginTripletLoss: an anchor whose label occurs once in the
  batch has no positive; sentence-transformers scores it as if its positive were at distance 0,
  `relu(margin - nearest distance)`, here it contributes 0 (the mean still divides by the batch
  size). Batches from sentence-transformers' GroupByLabelBatchSampler never hold such anchors.
- BatchSemiHardTripletLoss: a batch with a single label (no negatives at all) gives 0 here;
  sentence-transformers gives the mean of `relu(d_ap + margin)`.
- MultipleNegativesRankingLoss: only the configurations that are InfoNCE (see the class).
"""
from __future__ import annotations

import functools
import math

import torch
from torch import nn

import lossforge_kernels as lf

_SIMILARITY_NORMALIZES = {"cos_sim": True, "pytorch_cos_sim": True, "dot_score": False, "pytorch_dot_score": False}
_DISTANCES = {"euclidean": "euclidean", "squared_euclidean": "squared_euclidean", "cosine": "cosine",
              "euclidean_distance": "euclidean", "eucledian_distance": "euclidean", "cosine_distance": "cosine"}


def _name(fn) -> str | None:
    return fn if isinstance(fn, str) else getattr(fn, "__name__", None)


def _similarity_normalizes(similarity_fct) -> bool:
    normalizes = _SIMILARITY_NORMALIZES.get(_name(similarity_fct))
    if normalizes is None:
        raise ValueError(f"similarity_fct must be cos_sim or dot_score, got {similarity_fct!r}")
    return normalizes


def _distance(distance_metric) -> str:
    if isinstance(distance_metric, functools.partial) and not distance_metric.args:
        base = _DISTANCES.get(_name(distance_metric.func))
        if base == "euclidean" and distance_metric.keywords == {"squared": True}:
            return "squared_euclidean"
        if base is not None and not distance_metric.keywords:
            return base
    elif _name(distance_metric) in _DISTANCES:
        return _DISTANCES[_name(distance_metric)]
    raise ValueError(f"distance_metric must be euclidean_distance (optionally squared=True) or cosine_distance, "
                     f"got {distance_metric!r}")


def _embed(model, sentence_features) -> list[torch.Tensor]:
    return [model(features)["sentence_embedding"] for features in sentence_features]


class MultipleNegativesRankingLoss(nn.Module):
    """Cross-entropy of each anchor against its positive, the other positives and every hard negative.

    `lf.info_nce(anchor, candidates, logit_scale=scale, symmetric=False)`, candidates = the positive
    column then the negative columns. `directions=("query_to_doc", "doc_to_query")` with
    `partition_mode="per_direction"` adds the documents-to-queries term (averaged). Other directions,
    the joint softmax over several directions, hardness weighting and `gather_across_devices` raise
    NotImplementedError.
    """

    def __init__(self, model, scale=20.0, similarity_fct="cos_sim", gather_across_devices=False,
                 directions=("query_to_doc",), partition_mode="joint", hardness_mode=None, hardness_strength=0.0,
                 *, backend="auto"):
        super().__init__()
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number, got {scale!r}")
        self.normalize = _similarity_normalizes(similarity_fct)
        directions = tuple(directions)
        if partition_mode not in ("joint", "per_direction"):
            raise ValueError(f"partition_mode must be 'joint' or 'per_direction', got {partition_mode!r}")
        self.symmetric = self._symmetric(directions, partition_mode)
        if hardness_mode is not None:
            raise NotImplementedError(f"hardness_mode={hardness_mode!r} is not supported (only None)")
        if gather_across_devices:
            raise NotImplementedError("gather_across_devices=True is not supported; use lossforge_kernels.info_nce "
                                      "with process_group")
        self.model, self.scale, self.similarity_fct = model, float(scale), similarity_fct
        self.gather_across_devices = gather_across_devices
        self.directions, self.partition_mode = directions, partition_mode
        self.hardness_mode, self.hardness_strength = hardness_mode, hardness_strength
        self.backend = backend

    @staticmethod
    def _symmetric(directions, partition_mode) -> bool:
        if directions == ("query_to_doc",):
            return False
        if set(directions) == {"query_to_doc", "doc_to_query"} and len(directions) == 2:
            if partition_mode == "per_direction":
                return True
            raise NotImplementedError("directions=('query_to_doc', 'doc_to_query') needs "
                                      "partition_mode='per_direction' (one softmax per direction)")
        raise NotImplementedError(f"directions={directions!r} is not supported: use ('query_to_doc',) or "
                                  "('query_to_doc', 'doc_to_query') with partition_mode='per_direction'")

    def forward(self, sentence_features, labels=None):
        return self.compute_loss_from_embeddings(_embed(self.model, sentence_features), labels)

    def compute_loss_from_embeddings(self, embeddings, labels=None):
        if len(embeddings) < 2:
            raise ValueError(f"sentence_features must hold at least 2 columns (anchor, positive), "
                             f"got {len(embeddings)}")
        anchors, positives = embeddings[0], embeddings[1]
        options = dict(logit_scale=self.scale, normalize=self.normalize, backend=self.backend)
        if self.symmetric and len(embeddings) == 2:
            return lf.info_nce(anchors, positives, symmetric=True, **options)
        loss = lf.info_nce(anchors, torch.cat(embeddings[1:]), symmetric=False, **options)
        if self.symmetric:
            loss = (loss + lf.info_nce(positives, anchors, symmetric=False, **options)) / 2
        return loss


class _BatchTripletLoss(nn.Module):
    mining = "batch_hard"

    def __init__(self, model, distance_metric="euclidean", margin=5.0, *, max_class_size=None, backend="auto"):
        super().__init__()
        self.sentence_embedder = model
        self.distance_metric, self.distance = distance_metric, _distance(distance_metric)
        self.triplet_margin = margin
        self.max_class_size = max_class_size  # triplet_loss's promise: the K of P x K sampling
        self.backend = backend

    @property
    def model(self):
        return self.sentence_embedder

    def forward(self, sentence_features, labels):
        return self.compute_loss_from_embeddings(_embed(self.sentence_embedder, sentence_features[:1]), labels)

    def compute_loss_from_embeddings(self, embeddings, labels):
        embeddings = embeddings[0]
        if labels.numel() != embeddings.shape[0]:
            raise ValueError(f"labels must hold one label per example ({embeddings.shape[0]}), got shape "
                             f"{tuple(labels.shape)}")
        return self._loss(embeddings, labels.reshape(-1))

    def _lf(self, embeddings, labels, reduction, soft_margin=False):
        return lf.triplet_loss(embeddings, labels, margin=self.triplet_margin, mining=self.mining,
                               distance=self.distance, soft_margin=soft_margin, reduction=reduction,
                               max_class_size=self.max_class_size, backend=self.backend)


class BatchHardTripletLoss(_BatchTripletLoss):
    """Per anchor `relu(farthest positive - nearest negative + margin)`, averaged over the batch."""

    soft_margin = False

    def _loss(self, embeddings, labels):
        per_anchor = self._lf(embeddings, labels, "none", soft_margin=self.soft_margin)
        # With one label in the batch no anchor has a negative; sentence-transformers then takes the
        # farthest distance in the row as the negative, which cancels the positive: a constant.
        one_label = (labels == labels[0]).all()
        constant = math.log(2.0) if self.soft_margin else max(self.triplet_margin, 0.0)
        return torch.where(one_label, per_anchor.new_tensor(constant), per_anchor.mean())


class BatchHardSoftMarginTripletLoss(BatchHardTripletLoss):
    """Per anchor `softplus(farthest positive - nearest negative)`, averaged over the batch."""

    soft_margin = True

    def __init__(self, model, distance_metric="euclidean", *, max_class_size=None, backend="auto"):
        super().__init__(model, distance_metric, max_class_size=max_class_size, backend=backend)


class BatchSemiHardTripletLoss(_BatchTripletLoss):
    """FaceNet's semi-hard negatives (TensorFlow Addons' rule), averaged over the (anchor, positive) pairs."""

    mining = "semi_hard"

    @property
    def margin(self):
        return self.triplet_margin

    def _loss(self, embeddings, labels):
        return self._lf(embeddings, labels, "sum") / _positive_pairs(labels).clamp_min(1)


class BatchAllTripletLoss(_BatchTripletLoss):
    """Every valid triplet's hinge, averaged over the triplets whose loss is positive (0 if none)."""

    mining = "batch_all"

    def _loss(self, embeddings, labels):
        return self._lf(embeddings, labels, "mean")


def _positive_pairs(labels):
    """Number of ordered (anchor, positive) pairs, i != j with equal labels, without a B x B mask."""
    ordered = labels.sort().values
    same = torch.searchsorted(ordered, labels, right=True) - torch.searchsorted(ordered, labels)
    return (same - 1).sum()
