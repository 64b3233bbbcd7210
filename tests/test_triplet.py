"""Triplet loss with mining: the reference against a brute-force loop version, ties, dtypes, chunking,
gradients, the module, backend dispatch and argument checks."""
import itertools
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import lossforge_kernels as lf
from lossforge_kernels.reference import triplet as ref

from tests.conftest import HAS_GPU, assert_close_rel

MININGS = ("batch_hard", "semi_hard", "batch_all")
DISTANCES = ("euclidean", "squared_euclidean", "cosine")
REDUCTIONS = ("none", "sum", "mean")


# ---------------------------------------------------------------- brute force: explicit loops, one triplet at a time

def _distance(a, b, distance):
    if distance == "cosine":
        return 1 - (a * b).sum() / (a.norm().clamp_min(1e-12) * b.norm().clamp_min(1e-12))
    squared = ((a - b) ** 2).sum()
    return squared if distance == "squared_euclidean" else torch.sqrt(squared + 1e-12)


def _term(d_ap, d_an, margin, soft_margin):
    if soft_margin:
        return torch.log1p(torch.exp(d_ap - d_an))
    value = d_ap - d_an + margin
    return value if value > 0 else 0 * value


def brute_force(x, labels, *, margin=0.2, mining="batch_hard", distance="euclidean", soft_margin=False,
                normalize=False, reduction="mean"):
    n = x.shape[0]
    labels = labels.tolist()
    rows = [x[i] / x[i].norm().clamp_min(1e-12) if normalize else x[i] for i in range(n)]
    d = [[_distance(rows[i], rows[j], distance) for j in range(n)] for i in range(n)]
    zero = x.sum() * 0
    per_anchor, count = [], 0
    for a in range(n):
        positives = [j for j in range(n) if j != a and labels[j] == labels[a]]
        negatives = [k for k in range(n) if labels[k] != labels[a]]
        total = zero
        if mining == "batch_hard":
            if positives and negatives:
                p = positives[0]
                for j in positives:  # strict comparisons keep the first of equal candidates
                    if d[a][j] > d[a][p]:
                        p = j
                q = negatives[0]
                for k in negatives:
                    if d[a][k] < d[a][q]:
                        q = k
                total = _term(d[a][p], d[a][q], margin, soft_margin)
                count += 1
        elif mining == "semi_hard":
            for j in positives if negatives else []:
                farther = [k for k in negatives if d[a][k] > d[a][j]]
                q = (farther or negatives)[0]
                for k in farther:
                    if d[a][k] < d[a][q]:
                        q = k
                if not farther:
                    for k in negatives:
                        if d[a][k] > d[a][q]:
                            q = k
                total = total + _term(d[a][j], d[a][q], margin, soft_margin)
                count += 1
        else:
            for j in positives:
                for k in negatives:
                    term = _term(d[a][j], d[a][k], margin, soft_margin)
                    total = total + term
                    count += 1 if soft_margin or term > 0 else 0
        per_anchor.append(total)
    out = torch.stack(per_anchor) if n else x.sum(1)  # (0,), still part of the graph
    if reduction == "none":
        return out
    if reduction == "sum":
        return out.sum()
    if count == 0:
        return out.sum() * 0 if mining == "batch_all" else out.sum() + float("nan")
    return out.sum() / count


# ---------------------------------------------------------------- helpers

def _labels(n, classes, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, classes, (n,), generator=g)


def _embeddings(n, dim, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=torch.float64).to(dtype)


def _value_and_grad(fn, x, labels, seed=0, **kw):
    """The loss and the gradient of a random weighting of it (so 'none' checks every entry)."""
    x = x.detach().clone().requires_grad_(True)
    out = fn(x, labels, **kw)
    if torch.isnan(out).any():
        return out.detach(), None
    weights = torch.rand(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    (out * weights.to(out.dtype)).sum().backward()
    return out.detach(), x.grad


def _assert_matches(x, labels, tol=1e-9, **kw):
    got, got_grad = _value_and_grad(lf.triplet_loss, x, labels, **kw)
    want, want_grad = _value_and_grad(brute_force, x, labels, **kw)
    assert got.shape == want.shape and got.dtype == x.dtype
    # Absolute and relative tolerance: a gradient that is zero in exact arithmetic comes out as rounding noise.
    torch.testing.assert_close(got, want, rtol=tol, atol=tol, equal_nan=True, msg=lambda m: f"value {kw}: {m}")
    assert (got_grad is None) == (want_grad is None)
    if want_grad is not None:
        torch.testing.assert_close(got_grad, want_grad, rtol=tol, atol=tol, msg=lambda m: f"gradient {kw}: {m}")


# ---------------------------------------------------------------- against brute force

# Label 3 appears once, so that anchor has no positive and is left out or contributes nothing.
LABELS_7 = torch.tensor([0, 1, 0, 2, 1, 0, 3])


@pytest.mark.parametrize("mining,distance,soft_margin,normalize,reduction",
                         list(itertools.product(MININGS, DISTANCES, (False, True), (False, True), REDUCTIONS)))
def test_matches_brute_force(mining, distance, soft_margin, normalize, reduction):
    seed = 100 * MININGS.index(mining) + 10 * DISTANCES.index(distance) + 2 * soft_margin + normalize
    x = _embeddings(7, 5, seed=seed)
    _assert_matches(x, LABELS_7, margin=0.3, mining=mining, distance=distance, soft_margin=soft_margin,
                    normalize=normalize, reduction=reduction)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 9), dim=st.integers(1, 4), classes=st.integers(1, 4), seed=st.integers(0, 2**16),
       margin=st.sampled_from([0.0, 0.2, 1.5, -0.1]), mining=st.sampled_from(MININGS),
       distance=st.sampled_from(DISTANCES), soft_margin=st.booleans(), normalize=st.booleans(),
       reduction=st.sampled_from(REDUCTIONS))
def test_matches_brute_force_random_batches(n, dim, classes, seed, margin, mining, distance, soft_margin, normalize,
                                            reduction):
    # Batches where some or all anchors lack positives or negatives, empty and one-row batches included.
    _assert_matches(_embeddings(n, dim, seed), _labels(n, classes, seed), margin=margin, mining=mining,
                    distance=distance, soft_margin=soft_margin, normalize=normalize, reduction=reduction)


# ---------------------------------------------------------------- ties go to the smallest index

# Integer coordinates make every distance exact, so duplicated rows tie exactly.
TIE_POINTS = torch.tensor([
    [0., 0.],   # 0 anchor, label 0
    [3., 0.],   # 1 positive
    [3., 0.],   # 2 positive, duplicate of 1
    [1., 0.],   # 3 negative, label 1
    [1., 0.],   # 4 negative, duplicate of 3
    [4., 0.],   # 5 negative beyond the positives
    [4., 0.],   # 6 duplicate of 5
    [9., 0.],   # 7 far negative
    [-3., 0.],  # 8 negative exactly as far as the positives: not "farther" for semi_hard
], dtype=torch.float64)
TIE_LABELS = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1])


@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean"])
def test_ties_pick_smallest_index(distance):
    def anchor0_grad(mining, points, labels):
        x = points.clone().requires_grad_(True)
        lf.triplet_loss(x, labels, margin=10.0, mining=mining, distance=distance, reduction="none")[0].backward()
        return x.grad.abs().sum(1)

    # batch_hard: farthest positive is 1 or 2 (tie -> 1), nearest negative 3 or 4 (tie -> 3).
    used = anchor0_grad("batch_hard", TIE_POINTS, TIE_LABELS) != 0
    assert used.tolist() == [True, True, False, True, False, False, False, False, False]
    # semi_hard: negatives farther than the positives are 5, 6 (tie -> 5) and 7; the nearest is 5.
    used = anchor0_grad("semi_hard", TIE_POINTS, TIE_LABELS) != 0
    assert used.tolist() == [True, True, True, False, False, True, False, False, False]
    # semi_hard fallback: with only negatives 3, 4 (closer than the positives) the farthest ties -> 3.
    used = anchor0_grad("semi_hard", TIE_POINTS[:5], TIE_LABELS[:5]) != 0
    assert used.tolist() == [True, True, True, True, False]


@pytest.mark.parametrize("mining", MININGS)
@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean"])
def test_ties_match_brute_force(mining, distance):
    # Every anchor sees ties here; the brute force keeps the first of equal candidates too.
    for reduction in REDUCTIONS:
        _assert_matches(TIE_POINTS, TIE_LABELS, margin=2.0, mining=mining, distance=distance, reduction=reduction)


# ---------------------------------------------------------------- dtypes

@pytest.mark.parametrize("mining", MININGS)
@pytest.mark.parametrize("distance", DISTANCES)
def test_float32_matches_float64(mining, distance):
    x, labels = _embeddings(13, 6, seed=3), _labels(13, 4, seed=3)
    for reduction in REDUCTIONS:
        got = lf.triplet_loss(x.float(), labels, mining=mining, distance=distance, reduction=reduction)
        want = lf.triplet_loss(x, labels, mining=mining, distance=distance, reduction=reduction)
        assert got.dtype == torch.float32
        assert_close_rel(got, want, 1e-5, f"{mining} {distance} {reduction}")


@pytest.mark.parametrize("mining", MININGS)
def test_bfloat16_input(mining):
    x = _embeddings(10, 8, seed=5).bfloat16().requires_grad_(True)
    labels = _labels(10, 3, seed=5)
    out = lf.triplet_loss(x, labels, mining=mining, reduction="none")
    out.sum().backward()
    assert out.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    # Same bf16 values in float64: only the output rounding (8 mantissa bits) and float32 compute differ.
    want = brute_force(x.detach().double(), labels, mining=mining, reduction="none")
    assert_close_rel(out, want, 1e-2, mining)


# ---------------------------------------------------------------- gradients and chunking

@pytest.mark.parametrize("mining", MININGS)
@pytest.mark.parametrize("soft_margin", [False, True])
def test_gradcheck(mining, soft_margin):
    x = _embeddings(7, 4, seed=11).requires_grad_(True)
    for distance in DISTANCES:
        def fn(inp):
            return ref.triplet_loss(inp, LABELS_7, margin=0.5, mining=mining, distance=distance,
                                    soft_margin=soft_margin, normalize=distance == "euclidean", reduction="none",
                                    chunk_size=3)
        assert torch.autograd.gradcheck(fn, (x,)), distance


@pytest.mark.parametrize("mining", ["semi_hard", "batch_all"])
@pytest.mark.parametrize("chunk_size", [1, 2, 5])
def test_chunks_match_one_block(mining, chunk_size):
    x, labels = _embeddings(11, 3, seed=7), _labels(11, 3, seed=7)
    for soft_margin, reduction in itertools.product((False, True), REDUCTIONS):
        kw = dict(mining=mining, soft_margin=soft_margin, reduction=reduction)
        got, got_grad = _value_and_grad(ref.triplet_loss, x, labels, chunk_size=chunk_size, **kw)
        want, want_grad = _value_and_grad(ref.triplet_loss, x, labels, chunk_size=11, **kw)
        assert_close_rel(got, want, 1e-12, f"value {kw}")
        assert_close_rel(got_grad, want_grad, 1e-12, f"gradient {kw}")


@pytest.mark.parametrize("mining", MININGS)
def test_backward_keeps_no_cubic_tensors(mining, monkeypatch):
    # Default chunking with a small budget: 4 anchors per chunk at B=40. Whatever autograd keeps must be
    # at most B x B (a chunk x B x B block would be 6400 values).
    monkeypatch.setattr(ref, "CHUNK_ELEMENTS", 4 * 40 * 40)
    x, labels = _embeddings(40, 5, seed=1, dtype=torch.float32).requires_grad_(True), _labels(40, 5, seed=1)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = lf.triplet_loss(x, labels, mining=mining)
    out.backward()
    assert saved and max(saved) <= 40 * 40
    want = ref.triplet_loss(x.detach(), labels, mining=mining, chunk_size=40)
    assert_close_rel(out.detach(), want, 1e-6, mining)


# ---------------------------------------------------------------- edge cases and conventions

@pytest.mark.parametrize("mining", MININGS)
def test_empty_and_unmatched_batches(mining):
    nan_mean = mining != "batch_all"
    cases = [(torch.randn(0, 4), torch.zeros(0, dtype=torch.long)),   # nothing at all
             (torch.randn(5, 4), torch.arange(5)),                     # no positives
             (torch.randn(5, 4), torch.zeros(5, dtype=torch.long))]    # no negatives
    for x, labels in cases:
        x.requires_grad_(True)
        none = lf.triplet_loss(x, labels, mining=mining, reduction="none")
        assert none.shape == (x.shape[0],) and torch.equal(none, torch.zeros_like(none))
        total = lf.triplet_loss(x, labels, mining=mining, reduction="sum")
        assert total.item() == 0
        total.backward()
        assert torch.equal(x.grad, torch.zeros_like(x))
        mean = lf.triplet_loss(x, labels, mining=mining, reduction="mean")
        assert math.isnan(mean.item()) if nan_mean else mean.item() == 0


def test_batch_all_mean_counts_only_nonzero_triplets():
    # 1-D points: anchor 0 at 0, positive 1 at 1, negatives at 1.1 (active) and 5 (inactive with margin 0.5).
    x = torch.tensor([[0.0], [1.0], [1.1], [5.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    out = lf.triplet_loss(x, labels, margin=0.5, mining="batch_all", distance="squared_euclidean")
    want = brute_force(x, labels, margin=0.5, mining="batch_all", distance="squared_euclidean")
    total = lf.triplet_loss(x, labels, margin=0.5, mining="batch_all", distance="squared_euclidean", reduction="sum")
    assert out.item() < total.item()  # some triplets are zero, so the mean divides by fewer than all
    assert_close_rel(out, want, 1e-12)
    # Every triplet inactive (classes far apart): the mean is 0 rather than 0/0.
    apart = torch.tensor([[0.0], [0.1], [9.0], [9.1]])
    for reduction in ("mean", "sum"):
        assert lf.triplet_loss(apart, labels, mining="batch_all", reduction=reduction).item() == 0


@pytest.mark.parametrize("mining", MININGS)
def test_sum_is_sum_of_none_and_inputs_untouched(mining):
    x, labels = _embeddings(9, 4, seed=2, dtype=torch.float32), _labels(9, 3, seed=2)
    x_before, labels_before = x.clone(), labels.clone()
    none = lf.triplet_loss(x.T.contiguous().T, labels, mining=mining, reduction="none")  # non-contiguous input
    total = lf.triplet_loss(x, labels, mining=mining, reduction="sum")
    assert_close_rel(none.sum(), total, 1e-6, mining)
    assert torch.equal(x, x_before) and torch.equal(labels, labels_before)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("mining", MININGS)
def test_no_host_sync_on_gpu(mining):
    x = torch.randn(64, 16, device="cuda", requires_grad=True)
    labels = torch.randint(0, 8, (64,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for reduction in REDUCTIONS:
            lf.triplet_loss(x, labels, mining=mining, reduction=reduction).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = lf.triplet_loss(x.detach().cpu().double(), labels.cpu(), mining=mining)
    assert_close_rel(lf.triplet_loss(x, labels, mining=mining).cpu(), want, 1e-5, mining)


# ---------------------------------------------------------------- module and dispatch

def test_module_matches_function():
    x, labels = _embeddings(8, 3, seed=4), _labels(8, 3, seed=4)
    kw = dict(margin=0.4, mining="semi_hard", distance="cosine", soft_margin=True, normalize=True, reduction="none")
    module = lf.TripletLoss(**kw)
    assert torch.equal(module(x, labels), lf.triplet_loss(x, labels, **kw))
    assert "semi_hard" in repr(module)
    with pytest.raises(ValueError, match="mining"):
        lf.TripletLoss(mining="hardest")
    with pytest.raises(TypeError, match="process_group must be a torch.distributed ProcessGroup"):
        lf.TripletLoss(process_group=object())


def test_backend_dispatch(monkeypatch):
    x, labels = _embeddings(6, 3, seed=8), _labels(6, 2, seed=8)
    monkeypatch.delenv("LOSSFORGE_BACKEND", raising=False)
    want = lf.triplet_loss(x, labels, backend="reference")
    assert torch.equal(lf.triplet_loss(x, labels), want)
    # Every mining has kernels (tests/test_triplet_kernels.py): an explicit kernel backend runs each
    # of them, or refuses them all with the same words where it cannot run this input here.
    for name in ("cuda", "triton"):
        refusals = set()
        for mining in MININGS:
            want = lf.triplet_loss(x, labels, mining=mining, backend="reference")
            try:
                got = lf.triplet_loss(x, labels, mining=mining, backend=name)
            except lf.BackendUnavailableError as e:
                refusals.add(str(e))
            else:
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        assert len(refusals) <= 1 and not any("mining" in r for r in refusals), refusals
    with pytest.raises(ValueError, match="backend must be one of"):
        lf.triplet_loss(x, labels, backend="gpu")
    monkeypatch.setenv("LOSSFORGE_BACKEND", "fastest")
    with pytest.raises(ValueError, match="LOSSFORGE_BACKEND"):
        lf.triplet_loss(x, labels)


# ---------------------------------------------------------------- bad input

X = torch.randn(4, 3)
Y = torch.tensor([0, 1, 0, 1])


@pytest.mark.parametrize("args,kwargs,exc,fragment", [
    ((X[0], Y), {}, ValueError, r"embeddings must have 2 dimension\(s\), got shape \(3,\)"),
    ((X.long(), Y), {}, TypeError, "embeddings must be a floating-point tensor, got dtype torch.int64"),
    ((X.numpy(), Y), {}, TypeError, "embeddings must be a torch.Tensor, got ndarray"),
    ((X, Y[None]), {}, ValueError, r"labels must have 1 dimension\(s\), got shape \(1, 4\)"),
    ((X, Y.float()), {}, TypeError, "labels must be an integer tensor, got dtype torch.float32"),
    ((X, Y.bool()), {}, TypeError, "labels must be an integer tensor, got dtype torch.bool"),
    ((X, Y[:3]), {}, ValueError, r"labels must have shape \(4,\).*got \(3,\)"),
    ((X, Y.to("meta")), {}, ValueError, "labels is on meta but embeddings is on cpu"),
    ((X, Y), {"mining": "hard"}, ValueError, "mining must be one of .*got 'hard'"),
    ((X, Y), {"distance": "l1"}, ValueError, "distance must be one of .*got 'l1'"),
    ((X, Y), {"reduction": "avg"}, ValueError, "reduction must be one of .*got 'avg'"),
    ((X, Y), {"margin": float("inf")}, ValueError, "margin must be a finite number, got inf"),
    ((X, Y), {"margin": float("nan")}, ValueError, "margin must be in .*got nan"),
    ((X, Y), {"margin": "0.2"}, TypeError, "margin must be a float, got str '0.2'"),
    ((X, Y), {"margin": True}, TypeError, "margin must be a float, got bool"),
    ((X, Y), {"soft_margin": 1}, TypeError, "soft_margin must be a bool, got int 1"),
    ((X, Y), {"normalize": "yes"}, TypeError, "normalize must be a bool, got str 'yes'"),
    ((X, Y), {"process_group": object()}, TypeError, "process_group must be a torch.distributed ProcessGroup"),
    ((X, Y), {"backend": "gpu"}, ValueError, "backend must be one of .*got 'gpu'"),
])
def test_bad_input(args, kwargs, exc, fragment):
    with pytest.raises(exc, match=fragment):
        lf.triplet_loss(*args, **kwargs)


@pytest.mark.parametrize("mining,soft_margin", [("semi_hard", False), ("semi_hard", True), ("batch_all", False),
                                                ("batch_all", True)])
def test_reference_runs_at_real_batch_sizes(mining, soft_margin):
    # B=2048, 4 per class: from sorted negatives, prefix sums and binary search (semi-hard and hinge
    # batch-all), or only each anchor's positives (soft batch-all): no tensor beyond B x B elements
    # (or one chunk), fwd+bwd in seconds on a CPU.
    import time

    from tests.test_linear_cross_entropy import CreatedTensors

    b = 2048
    g = torch.Generator().manual_seed(9)
    x = torch.randn(b, 64, generator=g, requires_grad=True)
    labels = torch.arange(b) // 4
    start = time.perf_counter()
    with CreatedTensors() as created:
        lf.triplet_loss(x, labels, mining=mining, soft_margin=soft_margin).backward()
    elapsed = time.perf_counter() - start
    biggest = max(math.prod(shape) for _, shape in created.shapes)
    assert biggest <= max(b * b, ref.CHUNK_ELEMENTS), \
        (biggest, [s for s in created.shapes if math.prod(s[1]) == biggest])
    assert elapsed < 60, f"{mining} soft_margin={soft_margin}: {elapsed:.1f} s"
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ---------------------------------------------------------------- NaN and inf

def textbook(dist, labels, *, margin, mining, soft_margin):
    """Per-anchor losses from a distance matrix by dense torch formulas: max/min (amax/amin) take a NaN
    candidate over any number, and a selection that no comparison can settle (semi_hard's search past
    a NaN negative) is NaN, as no comparison holds for NaN."""
    n = dist.shape[0]
    same = labels[:, None] == labels[None, :]
    pos, neg = same & ~torch.eye(n, dtype=torch.bool), ~same
    kept = pos.any(1) & neg.any(1)

    def term(gap):
        return torch.nn.functional.softplus(gap) if soft_margin else torch.relu(gap + margin)

    if mining == "batch_hard":
        d_ap = torch.where(pos, dist, -math.inf).amax(1)
        d_an = torch.where(neg, dist, math.inf).amin(1)
        return torch.where(kept, term(d_ap - d_an), 0.0)
    d_ap, d_n = dist[:, :, None], dist[:, None, :]  # [anchor, positive, negative]
    if mining == "batch_all":
        return torch.where(pos[:, :, None] & neg[:, None, :], term(d_ap - d_n), 0.0).sum((1, 2))
    beyond = neg[:, None, :] & (d_n > d_ap)
    nearest = torch.where(beyond, d_n, math.inf).amin(2)
    farthest = torch.where(neg, dist, -math.inf).amax(1, keepdim=True)
    d_an = torch.where(beyond.any(2), nearest, farthest)
    d_an = torch.where((neg & dist.isnan()).any(1, keepdim=True), math.nan, d_an)
    return torch.where(pos & neg.any(1, keepdim=True), term(dist - d_an), 0.0).sum(1)


LABELS_10 = torch.tensor([0, 1, 0, 2, 1, 0, 2, 1, 3, 0])  # label 3 alone: that anchor is left out


def non_finite_embeddings(kind, dtype=torch.float64, seed=0):
    """(10, 4) embeddings with row 2 made non-finite: all NaN, all +inf, one NaN or one -inf feature, or
    'huge' (finite, but its squared norm overflows: +inf distances to every other row, NaN to itself)."""
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    huge = 1e20 if dtype == torch.float32 else 1e200
    if kind == "nan_row":
        x[2] = math.nan
    elif kind == "inf_row":
        x[2] = math.inf
    elif kind == "nan_feature":
        x[2, 1] = math.nan
    elif kind == "inf_feature":
        x[2, 1] = -math.inf
    else:
        x[2] = huge
    return x


NON_FINITE = ("nan_row", "inf_row", "nan_feature", "inf_feature", "huge")


@pytest.mark.parametrize("kind", NON_FINITE)
@pytest.mark.parametrize("mining", MININGS)
@pytest.mark.parametrize("distance", DISTANCES)
def test_non_finite_rows_follow_the_textbook_formulas(kind, mining, distance):
    x = non_finite_embeddings(kind)
    dist = ref.pairwise_distances(x, distance)
    for soft_margin, margin in ((False, 0.2), (False, -0.1), (True, 0.2)):
        kw = dict(mining=mining, distance=distance, soft_margin=soft_margin, margin=margin)
        want = textbook(dist, LABELS_10, margin=margin, mining=mining, soft_margin=soft_margin)
        xg = x.clone().requires_grad_(True)
        got = lf.triplet_loss(xg, LABELS_10, reduction="none", **kw)
        torch.testing.assert_close(got, want, equal_nan=True, msg=lambda m: f"{kind} {kw}: {m}")
        if kind != "huge" or distance != "cosine":  # (cosine distances of a huge row are finite)
            assert not torch.isfinite(got[[0, 2]]).any(), kw  # the row, and an anchor that has it as a positive
        assert torch.equal(got[8], torch.zeros((), dtype=x.dtype))  # the left-out anchor stays 0
        torch.testing.assert_close(lf.triplet_loss(x, LABELS_10, reduction="sum", **kw), want.sum(), equal_nan=True)
        mean = lf.triplet_loss(x, LABELS_10, reduction="mean", **kw)
        assert bool(torch.isfinite(mean)) == bool(torch.isfinite(want.sum())), kw
        if kind != "huge":  # the Gram form's backward multiplies every row by the non-finite one
            got.backward(torch.rand(10, dtype=x.dtype, generator=torch.Generator().manual_seed(1)))
            assert not torch.isfinite(xg.grad).all(1).any(), kw


@pytest.mark.parametrize("mining", ("semi_hard", "batch_all"))
def test_nan_negative_is_not_skipped(mining):
    """Every anchor of another class than the NaN row has it as a negative: none may stay finite."""
    x = non_finite_embeddings("nan_row")
    out = lf.triplet_loss(x, LABELS_10, mining=mining, reduction="none")
    kept = torch.ones(10, dtype=torch.bool)
    kept[8] = False
    assert torch.isnan(out[kept]).all() and out[8] == 0


def test_inf_negative_is_not_replaced_by_a_non_negative():
    """A negative at +inf sorts before the padding of the non-negatives (which are +inf too)."""
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [1e200, 0.0], [0.0, 0.3]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 0])
    for mining in MININGS:
        out = lf.triplet_loss(x, labels, mining=mining, margin=0.2, reduction="none")
        dist = ref.pairwise_distances(x, "euclidean")
        want = textbook(dist, labels, margin=0.2, mining=mining, soft_margin=False)
        torch.testing.assert_close(out, want, equal_nan=True, msg=mining)
        assert out[0] == 0 and out[1] == 0, mining  # d_an = inf: every hinge is 0


# ---------------------------------------------------------------- torch.compile

@pytest.mark.parametrize("mining", MININGS)
@pytest.mark.parametrize("soft_margin", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_compiles_fullgraph(mining, soft_margin, reduction):
    torch._dynamo.reset()  # each case compiles the same code object: stay clear of the recompile limit
    x, labels = _embeddings(9, 5, seed=4).float(), _labels(9, 3, seed=4)

    def step(inp):
        return lf.triplet_loss(inp, labels, mining=mining, soft_margin=soft_margin, reduction=reduction,
                               backend="reference") * 2.0

    results = []
    for fn in (torch.compile(step, fullgraph=True, backend="aot_eager"), step):
        leaf = x.clone().requires_grad_(True)
        loss = fn(leaf * 1.0)
        grad, = torch.autograd.grad(loss, leaf, torch.rand(loss.shape, generator=torch.Generator().manual_seed(2)))
        results.append((loss, grad))
    torch.testing.assert_close(results[0], results[1])
