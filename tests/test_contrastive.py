"""Contrastive losses (info_nce, supcon_loss, siglip_loss): reference vs textbook formulas, modules, bad input."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import lossforge_kernels as lf
from lossforge_kernels.reference import contrastive as ref
from tests.conftest import assert_close_rel, device_for

REDUCTIONS = ["none", "mean", "sum"]


def randn(*shape, seed, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def fresh_seed():
    return torch.seed() % 2**31


# ---- independent formulas, float64 ----------------------------------------------------------------

def unit(x, normalize):
    x = x.double()
    return x / x.norm(dim=1, keepdim=True) if normalize else x


def reduce(rows, reduction, divisor):
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / divisor


def clip_formula(q, k, scale, symmetric, normalize, reduction):
    """CLIP: cross-entropy of the logits matrix against the diagonal, rows (and columns)."""
    logits = scale * unit(q, normalize) @ unit(k, normalize).T
    b = q.shape[0]
    target = torch.arange(b)
    rows = F.cross_entropy(logits, target, reduction="none")
    if symmetric:
        rows = 0.5 * (rows + F.cross_entropy(logits.T, target, reduction="none"))
    return reduce(rows, reduction, b)


def supcon_formula(f, labels, temperature, normalize, reduction):
    """A loop over anchors, straight from the L_out definition."""
    f = unit(f, normalize)
    b = f.shape[0]
    rows, kept = torch.zeros(b, dtype=torch.float64), 0
    for i in range(b):
        positives = [j for j in range(b) if j != i and labels[j] == labels[i]]
        if not positives:
            continue
        kept += 1
        denom = math.log(sum(math.exp(float(f[i] @ f[a]) / temperature) for a in range(b) if a != i))
        rows[i] = -sum(float(f[i] @ f[p]) / temperature - denom for p in positives) / len(positives)
    return reduce(rows, reduction, kept)


def siglip_formula(q, k, scale, bias, normalize, reduction):
    b, m = q.shape[0], k.shape[0]
    qn, kn = unit(q, normalize), unit(k, normalize)
    rows = torch.zeros(b, dtype=torch.float64)
    for i in range(b):
        for j in range(m):
            z = 1.0 if i == j else -1.0
            rows[i] -= F.logsigmoid(torch.tensor(z * (scale * float(qn[i] @ kn[j]) + bias), dtype=torch.float64))
    return reduce(rows, reduction, b)


def close(got, want, rtol=1e-10, atol=1e-10):
    assert got.shape == want.shape, (got.shape, want.shape)
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol, equal_nan=True)


# ---- values against the formulas ------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(b=st.integers(0, 7), extra=st.integers(0, 4), d=st.integers(1, 9), symmetric=st.booleans(),
       normalize=st.booleans(), use_scale=st.booleans(), reduction=st.sampled_from(REDUCTIONS),
       seed=st.integers(0, 2**31 - 1))
def test_info_nce_matches_clip_formula(b, extra, d, symmetric, normalize, use_scale, reduction, seed):
    m = b if symmetric else b + extra
    q, k = randn(b, d, seed=seed), randn(m, d, seed=seed + 1)
    kwargs = dict(logit_scale=torch.tensor(7.3, dtype=torch.float64)) if use_scale else dict(temperature=0.2)
    got = lf.info_nce(q, k, symmetric=symmetric, normalize=normalize, reduction=reduction, **kwargs)
    close(got, clip_formula(q, k, 7.3 if use_scale else 5.0, symmetric, normalize, reduction))


@settings(max_examples=30, deadline=None)
@given(b=st.integers(0, 8), n_classes=st.integers(1, 5), d=st.integers(1, 6), normalize=st.booleans(),
       temperature=st.sampled_from([0.05, 0.5, 1.0]), reduction=st.sampled_from(REDUCTIONS),
       seed=st.integers(0, 2**31 - 1))
def test_supcon_matches_loop(b, n_classes, d, normalize, temperature, reduction, seed):
    f = randn(b, d, seed=seed)
    labels = torch.randint(0, n_classes, (b,), generator=torch.Generator().manual_seed(seed))
    got = lf.supcon_loss(f, labels, temperature=temperature, normalize=normalize, reduction=reduction)
    close(got, supcon_formula(f, labels, temperature, normalize, reduction))


@settings(max_examples=30, deadline=None)
@given(b=st.integers(0, 6), extra=st.integers(0, 4), d=st.integers(1, 7), normalize=st.booleans(),
       as_tensor=st.booleans(), reduction=st.sampled_from(REDUCTIONS), seed=st.integers(0, 2**31 - 1))
def test_siglip_matches_double_sum(b, extra, d, normalize, as_tensor, reduction, seed):
    q, k = randn(b, d, seed=seed), randn(b + extra, d, seed=seed + 1)
    scale, bias = 4.5, -2.25
    s, t = (torch.tensor(scale, dtype=torch.float64), torch.tensor(bias, dtype=torch.float64)) if as_tensor \
        else (scale, bias)
    got = lf.siglip_loss(q, k, s, t, normalize=normalize, reduction=reduction)
    close(got, siglip_formula(q, k, scale, bias, normalize, reduction))


def test_extra_keys_change_info_nce_only_through_rows():
    # Extra negatives raise every row loss; dropping them recovers the square case exactly.
    seed = fresh_seed()
    q, k = randn(5, 4, seed=seed), randn(9, 4, seed=seed + 1)
    square = lf.info_nce(q, k[:5], symmetric=False, reduction="none")
    wide = lf.info_nce(q, k, symmetric=False, reduction="none")
    assert bool((wide > square).all())
    close(wide, clip_formula(q, k, 1 / 0.07, False, True, "none"))


def test_supcon_anchors_without_positives():
    f = randn(4, 3, seed=fresh_seed()).requires_grad_()
    labels = torch.tensor([0, 1, 1, 2])  # anchors 0 and 3 have no positive
    rows = lf.supcon_loss(f, labels, reduction="none")
    assert rows[0] == 0 and rows[3] == 0 and bool((rows[1:3] > 0).all())
    close(lf.supcon_loss(f, labels), rows[1:3].mean())
    close(lf.supcon_loss(f, labels, reduction="sum"), rows.sum())
    # no anchor at all: mean over nothing is nan, sum 0 with a zero (finite) gradient
    for labels in (torch.arange(4), torch.tensor([7])):
        g = f[: labels.shape[0]].detach().clone().requires_grad_()
        assert torch.isnan(lf.supcon_loss(g, labels))
        total = lf.supcon_loss(g, labels, reduction="sum")
        total.backward()
        assert total == 0 and torch.equal(g.grad, torch.zeros_like(g))


def test_empty_batch():
    e, k = torch.randn(0, 5), torch.randn(3, 5)
    for reduction, check in (("mean", torch.isnan), ("sum", lambda x: x == 0), ("none", lambda x: x.shape == (0,))):
        assert check(lf.info_nce(e, e, reduction=reduction))
        assert check(lf.info_nce(e, k, symmetric=False, reduction=reduction))
        assert check(lf.supcon_loss(e, torch.zeros(0, dtype=torch.long), reduction=reduction))
        assert check(lf.siglip_loss(e, k, 10.0, -10.0, reduction=reduction))


def test_large_logits_stay_finite():
    seed = fresh_seed()
    q, k = randn(6, 8, seed=seed, scale=30.0), randn(6, 8, seed=seed + 1, scale=30.0)
    for symmetric in (True, False):
        got = lf.info_nce(q.float(), k.float(), temperature=0.01, normalize=False, symmetric=symmetric)
        assert torch.isfinite(got)
        assert_close_rel(got, clip_formula(q, k, 100.0, symmetric, False, "mean"), 1e-5, "info_nce")
    got = lf.siglip_loss(q.float(), k.float(), 50.0, -10.0, normalize=False)
    assert torch.isfinite(got)
    assert_close_rel(got, siglip_formula(q, k, 50.0, -10.0, False, "mean"), 1e-5, "siglip")


# ---- float32 / bf16 inputs against the float64 formulas -----------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_low_precision_inputs(dtype, tol, reduction):
    seed = fresh_seed()
    q, k = randn(13, 17, seed=seed, dtype=dtype), randn(19, 17, seed=seed + 1, dtype=dtype)
    labels = torch.randint(0, 4, (13,), generator=torch.Generator().manual_seed(seed))
    cases = [
        (lf.info_nce(q, k[:13], reduction=reduction), clip_formula(q, k[:13], 1 / 0.07, True, True, reduction)),
        (lf.info_nce(q, k, symmetric=False, normalize=False, temperature=2.0, reduction=reduction),
         clip_formula(q, k, 0.5, False, False, reduction)),
        (lf.supcon_loss(q, labels, temperature=0.1, reduction=reduction),
         supcon_formula(q, labels, 0.1, True, reduction)),
        (lf.siglip_loss(q, k, 10.0, -10.0, reduction=reduction), siglip_formula(q, k, 10.0, -10.0, True, reduction)),
    ]
    for got, want in cases:
        assert got.dtype == dtype and got.shape == want.shape
        # the formulas see the same rounded inputs, so only the computation's error is left
        assert_close_rel(got, want, tol, f"{dtype} {reduction}")


def test_noncontiguous_inputs_and_inputs_untouched():
    seed = fresh_seed()
    q, k = randn(6, 5, seed=seed).T, randn(6, 5, seed=seed + 1).T  # (5, 6), non-contiguous
    q_copy, k_copy = q.clone(), k.clone()
    close(lf.info_nce(q, k), clip_formula(q, k, 1 / 0.07, True, True, "mean"))
    close(lf.siglip_loss(q, k, 3.0, 1.0), siglip_formula(q, k, 3.0, 1.0, True, "mean"))
    labels = torch.tensor([0, 1, 0, 1, 1])
    close(lf.supcon_loss(q, labels), supcon_formula(q, labels, 0.07, True, "mean"))
    assert torch.equal(q, q_copy) and torch.equal(k, k_copy)


def test_no_host_sync():
    # meta tensors have no data: any .item()/bool() on a value would raise
    q = torch.randn(5, 8, device="meta", requires_grad=True)
    k = torch.randn(7, 8, device="meta")
    s = torch.tensor(3.0, device="meta", requires_grad=True)
    losses = [lf.info_nce(q, k, logit_scale=s, symmetric=False), lf.info_nce(q, k[:5], logit_scale=s),
              lf.supcon_loss(q, torch.zeros(5, dtype=torch.long, device="meta")), lf.siglip_loss(q, k, s, s)]
    for loss in losses:
        loss.backward()
    assert q.grad.shape == q.shape and s.grad.shape == ()


# ---- gradients ------------------------------------------------------------------------------------

@pytest.mark.parametrize("symmetric,normalize", [(True, True), (False, True), (True, False), (False, False)])
def test_info_nce_gradcheck(symmetric, normalize):
    seed = fresh_seed()
    q = randn(3, 4, seed=seed).requires_grad_()
    k = randn(3 if symmetric else 5, 4, seed=seed + 1).requires_grad_()
    s = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(
            lambda q, k, s: ref.info_nce(q, k, s, symmetric=symmetric, normalize=normalize, reduction=reduction),
            (q, k, s))


@pytest.mark.parametrize("normalize", [True, False])
def test_supcon_gradcheck(normalize):
    f = randn(6, 3, seed=fresh_seed()).requires_grad_()
    labels = torch.tensor([0, 1, 0, 2, 1, 0])  # anchor 3 has no positive
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(
            lambda f: ref.supcon_loss(f, labels, 0.5, normalize=normalize, reduction=reduction), (f,))


@pytest.mark.parametrize("normalize", [True, False])
def test_siglip_gradcheck(normalize):
    seed = fresh_seed()
    q, k = randn(3, 4, seed=seed).requires_grad_(), randn(5, 4, seed=seed + 1).requires_grad_()
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-1.5, dtype=torch.float64, requires_grad=True)
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(
            lambda q, k, s, b: ref.siglip_loss(q, k, s, b, normalize=normalize, reduction=reduction), (q, k, s, b))


def test_scale_and_bias_gradients_match_formula():
    # d loss / d s against autograd through the float64 formula, reached from float32 inputs
    seed = fresh_seed()
    q, k = randn(6, 5, seed=seed), randn(8, 5, seed=seed + 1)
    s = torch.tensor(4.0, requires_grad=True)
    lf.info_nce(q.float(), k.float(), logit_scale=s, symmetric=False).backward()
    s64 = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    clip_formula(q, k, s64, False, True, "mean").backward()
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-5, atol=1e-6)

    s, b = torch.tensor(4.0, requires_grad=True), torch.tensor(-3.0, requires_grad=True)
    lf.siglip_loss(q.float(), k.float(), s, b).backward()
    s64, b64 = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (4.0, -3.0))
    logits = s64 * unit(q, True) @ unit(k, True).T + b64
    (-F.logsigmoid((2 * torch.eye(6, 8, dtype=torch.float64) - 1) * logits).sum() / 6).backward()
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad.double(), b64.grad, rtol=1e-5, atol=1e-6)


# ---- modules --------------------------------------------------------------------------------------

def test_info_nce_module_fixed_and_learnt_scale():
    seed = fresh_seed()
    q, k = randn(5, 6, seed=seed, dtype=torch.float32), randn(5, 6, seed=seed + 1, dtype=torch.float32)
    fixed = lf.InfoNCELoss(temperature=0.3, symmetric=False, reduction="sum")
    assert list(fixed.parameters()) == []
    close(fixed(q, k), lf.info_nce(q, k, temperature=0.3, symmetric=False, reduction="sum"), rtol=0, atol=0)

    learnt = lf.InfoNCELoss(temperature=0.25, learn_temperature=True)
    assert math.isclose(learnt.log_logit_scale.item(), math.log(4.0), rel_tol=1e-6)
    loss = learnt(q, k)
    close(loss, lf.info_nce(q, k, logit_scale=torch.tensor(4.0)), rtol=1e-6, atol=1e-6)
    loss.backward()
    assert learnt.log_logit_scale.grad is not None and learnt.log_logit_scale.grad != 0

    # a scale past max_logit_scale is clamped (and, like CLIP, stops learning there)
    clamped = lf.InfoNCELoss(temperature=0.001, learn_temperature=True, max_logit_scale=50.0)
    assert clamped.logit_scale().item() == 50.0
    loss = clamped(q, k)
    close(loss, lf.info_nce(q, k, logit_scale=torch.tensor(50.0)), rtol=1e-6, atol=1e-6)
    loss.backward()
    assert clamped.log_logit_scale.grad == 0


def test_supcon_and_siglip_modules():
    seed = fresh_seed()
    f = randn(6, 4, seed=seed, dtype=torch.float32)
    labels = torch.tensor([1, 1, 2, 2, 3, 3])
    close(lf.SupConLoss(temperature=0.2, normalize=False, reduction="none")(f, labels),
          lf.supcon_loss(f, labels, temperature=0.2, normalize=False, reduction="none"), rtol=0, atol=0)

    module = lf.SigLIPLoss()
    assert math.isclose(module.log_logit_scale.item(), math.log(10.0), rel_tol=1e-6)
    assert module.logit_bias.item() == -10.0
    q, k = f, randn(8, 4, seed=seed + 1, dtype=torch.float32)
    loss = module(q, k)
    close(loss, lf.siglip_loss(q, k, 10.0, -10.0), rtol=1e-6, atol=1e-6)
    loss.backward()
    assert module.log_logit_scale.grad != 0 and module.logit_bias.grad != 0


# ---- backend dispatch -----------------------------------------------------------------------------

def _calls():
    q, k = torch.randn(4, 3), torch.randn(4, 3)
    labels = torch.tensor([0, 0, 1, 1])
    return [lambda **kw: lf.info_nce(q, k, **kw), lambda **kw: lf.supcon_loss(q, labels, **kw),
            lambda **kw: lf.siglip_loss(q, k, 10.0, -10.0, **kw)]


@pytest.mark.parametrize("which", [0, 1, 2])
def test_backend_dispatch(which, monkeypatch):
    call = _calls()[which]
    # (the kernel backends on these calls: tests/test_contrastive_kernels.py)
    want = call(backend="reference")
    with pytest.raises(ValueError, match="backend must be one of"):
        call(backend="fast")
    monkeypatch.setenv("LOSSFORGE_BACKEND", "reference")
    assert torch.equal(call(), want)
    monkeypatch.setenv("LOSSFORGE_BACKEND", "fast")
    with pytest.raises(ValueError, match="LOSSFORGE_BACKEND must be one of"):
        call()


def test_process_group_must_be_a_process_group():
    # Global-batch losses across processes: tests/test_contrastive_distributed.py.
    for call in _calls():
        with pytest.raises(TypeError, match="process_group must be a torch.distributed ProcessGroup"):
            call(process_group=object())
    with pytest.raises(TypeError, match="process_group must be a torch.distributed ProcessGroup"):
        lf.InfoNCELoss(process_group=object())


# ---- bad input ------------------------------------------------------------------------------------

Q, K = torch.randn(4, 3), torch.randn(4, 3)
LABELS = torch.tensor([0, 1, 0, 1])
META = torch.randn(4, 3, device="meta")

BAD_INFO_NCE = [
    (dict(query=Q[0]), ValueError, r"query must have 2 dimension\(s\), got shape \(3,\)"),
    (dict(key=K[None]), ValueError, r"key must have 2 dimension\(s\), got shape \(1, 4, 3\)"),
    (dict(query=Q.long()), TypeError, "query must be a floating-point tensor, got dtype torch.int64"),
    (dict(key=K.double()), TypeError, "key must have the query's dtype torch.float32, got torch.float64"),
    (dict(key=torch.randn(4, 5)), ValueError, r"feature size D=3, got shape \(4, 5\)"),
    (dict(key=K[:3], symmetric=False), ValueError, r"M >= B = 4\), got shape \(3, 3\)"),
    (dict(key=torch.randn(6, 3)), ValueError, r"symmetric=True needs .*M == B = 4\), got key shape \(6, 3\)"),
    (dict(key=META), ValueError, "key is on meta but query is on cpu"),
    (dict(temperature=0.0), ValueError, r"temperature must be in \(0.0, inf\], got 0.0"),
    (dict(temperature=-1), ValueError, r"temperature must be in \(0.0, inf\], got -1.0"),
    (dict(temperature="0.1"), TypeError, "temperature must be a float, got str"),
    (dict(logit_scale=torch.ones(1)), ValueError, r"logit_scale must be a 0-dim tensor .*got shape \(1,\)"),
    (dict(logit_scale=torch.tensor(3)), TypeError,
     "logit_scale must be a floating-point tensor, got dtype torch.int64"),
    (dict(logit_scale=-2.0), ValueError, r"logit_scale must be in \(0.0, inf\], got -2.0"),
    (dict(logit_scale=torch.tensor(-2.0)), ValueError, r"logit_scale must be in \(0.0, inf\], got -2.0"),
    (dict(logit_scale=torch.tensor(0.0, requires_grad=True)), ValueError, r"logit_scale must be in \(0.0, inf\]"),
    (dict(logit_scale=torch.tensor(float("nan"))), ValueError, "logit_scale must be in .*got nan"),
    (dict(logit_scale=torch.tensor(2.0, device="meta")), ValueError, "logit_scale is on meta but query is on cpu"),
    (dict(symmetric=1), TypeError, "symmetric must be a bool, got int 1"),
    (dict(normalize=None), TypeError, "normalize must be a bool, got NoneType None"),
    (dict(reduction="avg"), ValueError, r"reduction must be one of \('none', 'mean', 'sum'\), got 'avg'"),
]


@pytest.mark.parametrize("override,exc,message", BAD_INFO_NCE)
def test_info_nce_bad_input(override, exc, message):
    args = dict(query=Q, key=K) | override
    with pytest.raises(exc, match=message):
        lf.info_nce(args.pop("query"), args.pop("key"), **args)


BAD_SUPCON = [
    (dict(features=Q[0]), ValueError, r"features must have 2 dimension\(s\), got shape \(3,\)"),
    (dict(features=Q.int()), TypeError, "features must be a floating-point tensor, got dtype torch.int32"),
    (dict(labels=LABELS[:3]), ValueError,
     r"labels must have shape \(4,\), one label per row of features .* got \(3,\)"),
    (dict(labels=LABELS[:, None]), ValueError, r"labels must have 1 dimension\(s\), got shape \(4, 1\)"),
    (dict(labels=LABELS.float()), TypeError, "labels must be an integer tensor, got dtype torch.float32"),
    (dict(labels=LABELS.bool()), TypeError, "labels must be an integer tensor, got dtype torch.bool"),
    (dict(labels=[0, 1, 0, 1]), TypeError, "labels must be a torch.Tensor, got list"),
    (dict(labels=LABELS.to("meta")), ValueError, "labels is on meta but features is on cpu"),
    (dict(temperature=0), ValueError, r"temperature must be in \(0.0, inf\], got 0.0"),
    (dict(reduction=None), ValueError, "reduction must be one of .* got None"),
]


@pytest.mark.parametrize("override,exc,message", BAD_SUPCON)
def test_supcon_bad_input(override, exc, message):
    args = dict(features=Q, labels=LABELS) | override
    with pytest.raises(exc, match=message):
        lf.supcon_loss(args.pop("features"), args.pop("labels"), **args)


BAD_SIGLIP = [
    (dict(query=Q[None]), ValueError, r"query must have 2 dimension\(s\), got shape \(1, 4, 3\)"),
    (dict(key=K[:2]), ValueError, r"M >= B = 4\), got shape \(2, 3\)"),
    (dict(key=torch.randn(5, 2)), ValueError, r"feature size D=3, got shape \(5, 2\)"),
    (dict(key=META), ValueError, "key is on meta but query is on cpu"),
    (dict(logit_scale=torch.ones(2)), ValueError, r"logit_scale must be a 0-dim tensor .*got shape \(2,\)"),
    (dict(logit_bias=torch.ones(1, 1)), ValueError, r"logit_bias must be a 0-dim tensor .*got shape \(1, 1\)"),
    (dict(logit_bias=torch.tensor(1)), TypeError, "logit_bias must be a floating-point tensor"),
    (dict(logit_scale=0.0), ValueError, r"logit_scale must be in \(0.0, inf\], got 0.0"),
    (dict(logit_bias=float("nan")), ValueError, "logit_bias must be in .*got nan"),
    (dict(logit_bias=torch.tensor(float("nan"))), ValueError, "logit_bias must be in .*got nan"),
    (dict(logit_scale=torch.tensor(-1.0)), ValueError, r"logit_scale must be in \(0.0, inf\], got -1.0"),
    (dict(logit_bias="x"), TypeError, "logit_bias must be a float, got str"),
    (dict(reduction="batchmean"), ValueError, "reduction must be one of .*got 'batchmean'"),
]


@pytest.mark.parametrize("override,exc,message", BAD_SIGLIP)
def test_siglip_bad_input(override, exc, message):
    args = dict(query=Q, key=torch.randn(5, 3), logit_scale=10.0, logit_bias=-10.0) | override
    with pytest.raises(exc, match=message):
        lf.siglip_loss(args.pop("query"), args.pop("key"), args.pop("logit_scale"), args.pop("logit_bias"), **args)


@pytest.mark.parametrize("make,exc,message", [
    (lambda: lf.InfoNCELoss(temperature=0), ValueError, r"temperature must be in \(0.0, inf\], got 0.0"),
    (lambda: lf.InfoNCELoss(max_logit_scale=-1.0), ValueError, r"max_logit_scale must be in \(0.0, inf\], got -1.0"),
    (lambda: lf.InfoNCELoss(learn_temperature="yes"), TypeError, "learn_temperature must be a bool, got str"),
    (lambda: lf.SupConLoss(reduction="avg"), ValueError, "reduction must be one of .*got 'avg'"),
    (lambda: lf.SigLIPLoss(init_logit_scale=0.0), ValueError, r"init_logit_scale must be in \(0.0, inf\], got 0.0"),
])
def test_module_bad_arguments(make, exc, message):
    with pytest.raises(exc, match=message):
        make()


# ---- NaN and inf: the kernels poison the same rows as the reference ----------------------------------

NONFINITE_LOSSES = [
    *[("info_nce", dict(symmetric=sym, normalize=norm)) for sym in (True, False) for norm in (True, False)],
    *[("supcon", dict(normalize=norm)) for norm in (True, False)],
    *[("siglip", dict(normalize=norm)) for norm in (True, False)],
]
# (input, row, feature): a whole row, or one feature of it; key rows only where there is a key
NONFINITE_SPOTS = [("query", 2, None), ("query", 2, 1), ("key", 4, None), ("key", 4, 1)]


def _nonfinite_call(loss, opts, q, k, backend):
    if loss == "info_nce":
        return lf.info_nce(q, k, logit_scale=torch.tensor(3.0), reduction="none", backend=backend, **opts)
    if loss == "supcon":
        labels = torch.tensor([0, 1, 0, 1, 2, 2], device=q.device)
        return lf.supcon_loss(q, labels, temperature=0.5, reduction="none", backend=backend, **opts)
    return lf.siglip_loss(q, k, torch.tensor(3.0), torch.tensor(-1.0), reduction="none", backend=backend, **opts)


def _nonfinite_run(loss, opts, spot, value, backend, device):
    name, row, feature = spot
    q, k = randn(6, 5, seed=1, dtype=torch.float32), randn(6 if opts.get("symmetric") else 9, 5, seed=2,
                                                             dtype=torch.float32)
    x = {"query": q, "key": k}
    x[name][row, slice(None) if feature is None else feature] = value
    q, k = (t.to(device).requires_grad_(True) for t in (q, k))
    out = _nonfinite_call(loss, opts, q, k, backend)
    (out * torch.linspace(0.5, 1.5, out.shape[0], device=device)).sum().backward()
    grads = [q.grad] + ([] if loss == "supcon" else [k.grad])
    return out.detach().cpu(), [g.cpu() for g in grads]


def _kind(t):
    """Per element: 0 finite, 1 NaN, 2 +inf, 3 -inf."""
    return t.isnan().long() + 2 * (t == math.inf).long() + 3 * (t == -math.inf).long()


NONFINITE_CASES = [
    pytest.param(loss, opts, spot, id="-".join([loss, *(k for k, on in opts.items() if on), spot[0],
                                                "row" if spot[2] is None else "feature"]))
    for loss, opts in NONFINITE_LOSSES for spot in NONFINITE_SPOTS if not (loss == "supcon" and spot[0] == "key")
]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("loss,opts,spot", NONFINITE_CASES)
def test_nan_and_inf_reach_the_reference_rows(kernel_backend, loss, opts, spot, value):
    """A NaN or +-inf in one query row, key row or feature: every loss row is NaN / +-inf / finite as
    in the reference (finite rows equal to it) and the gradients' non-finite rows are the same."""
    want_loss, want_grads = _nonfinite_run(loss, opts, spot, value, "reference", "cpu")
    got_loss, got_grads = _nonfinite_run(loss, opts, spot, value, kernel_backend, device_for(kernel_backend))
    assert torch.equal(_kind(got_loss), _kind(want_loss)), f"loss rows {got_loss} vs reference {want_loss}"
    finite = want_loss.isfinite()
    torch.testing.assert_close(got_loss[finite], want_loss[finite], rtol=1e-4, atol=1e-5)
    for got, want in zip(got_grads, want_grads):
        bad_rows = (~want.isfinite()).any(dim=1)
        assert torch.equal((~got.isfinite()).any(dim=1), bad_rows), f"non-finite gradient rows {got} vs {want}"
        torch.testing.assert_close(got[~bad_rows], want[~bad_rows], rtol=1e-4, atol=1e-5)
