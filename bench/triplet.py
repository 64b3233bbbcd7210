"""Triplet loss suite: batch-hard, semi-hard and batch-all mining over a batch of embeddings (D=512,
bf16; fp16 for one batch_all case and fp32 for each mining at B=32768; 4 rows per class, promised to the
kernels by max_class_size=4),
Euclidean distances, fwd+bwd.

FLOPs model: the mining's Gram matrix, 2 B^2 D (the kernels never store it; torch and the
reference hold B x B fp32 distances). Bytes model: what our kernels must move at least: the
embeddings read by the mining and by the pair gradient, the gradient written (3 * B * D * elem).
B=262144 runs only our kernels: its B x B distances would take 275 GB.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .harness import STANDARD_PROVIDERS, Case, Provider, Suite, Unsupported, imported, standard_providers

D = 512
PER_CLASS = 4
MININGS = ("batch_hard", "semi_hard", "batch_all")
ONLY_OURS = 1 << 16  # from this batch size on, only the kernels run (and the chunked reference checks them)


def _opts(mining, distance="euclidean"):
    return {"margin": 0.2, "mining": mining, "distance": distance, "reduction": "mean",
            "max_class_size": PER_CLASS}


def cases(profile: str) -> list[Case]:
    if profile == "tiny":
        return [Case(m, (31, 7), torch.float32, "fwd+bwd", _opts(m)) for m in MININGS]
    if profile.startswith("cpu"):
        return [Case(m, (1024, 64), torch.float32, "fwd+bwd", _opts(m)) for m in MININGS]
    sizes = (8192,) if profile.endswith("quick") else (8192, 32768)
    out = [Case(m, (b, D), torch.bfloat16, "fwd+bwd", _opts(m)) for b in sizes for m in MININGS]
    # the normalisation's two ops around the mining (10 launches per fwd+bwd) at the small-batch target
    out.append(Case("batch_hard cosine", (8192, D), torch.bfloat16, "fwd+bwd", _opts("batch_hard", "cosine")))
    if not profile.endswith("quick"):
        # fp16 batch_all: CUDA's tiles scale each row's coefficients (bf16 needs no scaling)
        out.append(Case("batch_all fp16", (32768, D), torch.float16, "fwd+bwd", _opts("batch_all")))
        # fp32 rows: CUDA's tiles as three tf32 products, Triton's exact fp32 products
        out += [Case(f"{m} fp32", (32768, D), torch.float32, "fwd+bwd", _opts(m)) for m in MININGS]
        # batch-hard only: the chunked reference below checks it
        out.append(Case("batch_hard", (262144, D), torch.bfloat16, "fwd+bwd", _opts("batch_hard")))
    return out


def make_inputs(case: Case, device, gen) -> dict:
    b, d = case.shape
    x = torch.randn(case.shape, generator=gen, device=device, dtype=torch.float32).to(case.dtype)
    labels = torch.randperm(b, generator=gen, device=device) // PER_CLASS
    return {"input": x.requires_grad_(case.mode == "fwd+bwd"), "target": labels}


def bytes_model(case: Case) -> tuple[int, str]:
    b, d = case.shape
    size = torch.finfo(case.dtype).bits // 8
    return 3 * b * d * size, "triplet fwd+bwd: embeddings read twice (mining, pair gradient), gradient written"


def flops_model(case: Case) -> tuple[int, str]:
    b, d = case.shape
    return 2 * b * b * d, "2*B^2*D (the mining's Gram matrix; the pair gradient's O(B*D) is left out)"


def _options(case):
    """The reference's options (max_class_size is a promise to the kernels only)."""
    if case.shape[0] >= ONLY_OURS:
        raise Unsupported("B x B distances do not fit")
    return {k: v for k, v in case.options.items() if k != "max_class_size"}


def _bind_eager(case):
    from lossforge_kernels.reference import triplet as ref

    opts = _options(case)
    return lambda inputs: ref.triplet_loss(inputs["input"], inputs["target"], **opts)


def _lf_call(lf, case, inputs, backend):
    if backend == "reference":
        _options(case)
    return lf.triplet_loss(inputs["input"], inputs["target"], backend=backend, **case.options)


def _pair_distance(a, b, distance):
    """The reference's distance of rows a[i] and b[i] (its Gram form, one pair at a time)."""
    if distance == "cosine":
        return 1 - (F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(1)
    squared = ((a * a).sum(1) + (b * b).sum(1) - 2 * (a * b).sum(1)).clamp_min(0)
    return squared if distance == "squared_euclidean" else torch.sqrt(squared + 1e-12)


def chunked_reference(x, labels, *, margin, mining, distance, reduction, max_class_size=None, rows=2048):
    """The reference's batch-hard loss with its mining done a block of anchors at a time (fp32), for
    batches whose B x B distances do not fit; the loss is differentiated through the chosen pairs."""
    from lossforge_kernels.reference import triplet as ref

    xf = x.float()
    pos, neg = [], []
    with torch.no_grad():
        for start in range(0, x.shape[0], rows):
            dist = ref.pairwise_distances(xf[start:start + rows], distance, xf)
            same = labels[start:start + rows, None] == labels[None, :]
            me = torch.arange(start, start + dist.shape[0], device=x.device)
            same_other = same.clone()
            same_other[torch.arange(dist.shape[0], device=x.device), me] = False
            pos.append(dist.masked_fill(~same_other, float("-inf")).argmax(1))
            neg.append(dist.masked_fill(same, float("inf")).argmin(1))
    pos, neg = torch.cat(pos), torch.cat(neg)
    gap = _pair_distance(xf, xf[pos], distance) - _pair_distance(xf, xf[neg], distance)
    per_anchor = F.relu(gap + margin)  # 4 rows per class: every anchor has a positive and a negative
    out = per_anchor if reduction == "none" else per_anchor.sum() if reduction == "sum" else per_anchor.mean()
    return out.to(x.dtype)


def reference(case, inputs):
    import lossforge_kernels as lf

    if case.shape[0] >= ONLY_OURS:
        return chunked_reference(inputs["input"], inputs["target"], **case.options)
    return lf.triplet_loss(inputs["input"], inputs["target"], backend="reference", **_options(case))


def _metric_learning(settings) -> Provider | str:
    miners = imported("pytorch_metric_learning.miners", "BatchHardMiner", settings)
    losses = imported("pytorch_metric_learning.losses", "TripletMarginLoss", settings)
    cosine = imported("pytorch_metric_learning.distances", "CosineSimilarity", settings)
    lp = imported("pytorch_metric_learning.distances", "LpDistance", settings)
    for found in (miners, losses, cosine, lp):
        if isinstance(found, str):
            return found

    def bind(case):
        _options(case)
        if case.options["mining"] != "batch_hard":
            raise Unsupported("its semi-hard and all-triplet miners follow other rules")
        distance = case.options["distance"]
        if distance == "squared_euclidean":
            raise Unsupported("no squared Euclidean distance")
        # ours, as its distances: its default normalises the rows first (the Euclidean distance of unit
        # rows); with cosine similarities its margin works on 1 - cos, as ours does
        picked = {"distance": cosine() if distance == "cosine" else lp(normalize_embeddings=False)}
        miner, loss = miners(**picked), losses(margin=case.options["margin"], **picked)
        return lambda inputs: loss(inputs["input"].float(), inputs["target"],
                                   miner(inputs["input"].float(), inputs["target"]))

    return Provider("metric_learning", bind)


def providers(settings):
    return standard_providers(settings, _bind_eager, _lf_call, ("metric_learning", _metric_learning))


ORDER = 50  # where `python -m bench` runs this suite among the others (lowest first)
SUITE = Suite("triplet", cases, make_inputs, providers, reference, bytes_model,
              STANDARD_PROVIDERS + ("metric_learning",), flops_model=flops_model)
