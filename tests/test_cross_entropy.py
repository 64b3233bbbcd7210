"""Cross-entropy family: the reference against torch and textbook formulas, the API, bad input.

Kernels against the reference: tests/test_cross_entropy_kernels.py; GPU-only scale tests:
tests/test_cross_entropy_gpu.py.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lossforge_kernels as lf
from tests.conftest import HAS_GPU, device_for

REDUCTIONS = ["none", "mean", "sum"]


def make_inputs(n, c, *, dtype=torch.float32, device="cpu", soft=False, ignore_frac=0.2, seed=None, extra=()):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    x = (torch.randn(n, c, *extra, generator=g) * 3).to(dtype)
    if soft:
        t = torch.softmax(torch.randn(n, c, *extra, generator=g), dim=1).to(dtype)
    else:
        t = torch.randint(0, c, (n, *extra), generator=g)
        drop = torch.rand(t.shape, generator=g) < ignore_frac
        drop.view(-1)[0] = False  # one counted row at least ('mean' over none is 0/0; tests ask for that explicitly)
        t[drop] = -100
    w = torch.rand(c, generator=g) + 0.5
    return x.to(device), t.to(device), w.to(device)


# ---- the reference against torch, for every option torch has -------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.25])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("extra", [(), (3, 2)])
def test_reference_matches_torch(reduction, smoothing, weighted, soft, extra):
    x, t, w = make_inputs(6, 5, dtype=torch.float64, soft=soft, extra=extra)
    w = w.double() if weighted else None
    got = lf.cross_entropy(x, t, w, reduction=reduction, label_smoothing=smoothing, backend="reference")
    want = F.cross_entropy(x, t, w, reduction=reduction, label_smoothing=smoothing)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_reference_matches_torch_unbatched_and_custom_ignore_index():
    x = torch.randn(7, dtype=torch.float64)
    for target in (torch.tensor(3), torch.tensor(5)):
        torch.testing.assert_close(lf.cross_entropy(x, target, ignore_index=5, reduction="none"),
                                   F.cross_entropy(x, target, ignore_index=5, reduction="none"))
    x, t, _ = make_inputs(8, 4, dtype=torch.float64, ignore_frac=0.0)
    t[::3] = 2
    torch.testing.assert_close(lf.cross_entropy(x, t, ignore_index=2), F.cross_entropy(x, t, ignore_index=2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_loss_dtype_follows_input(dtype):
    x, t, _ = make_inputs(4, 9, dtype=dtype)
    for reduction in REDUCTIONS:
        assert lf.cross_entropy(x, t, reduction=reduction).dtype == dtype


def test_edge_cases_match_torch():
    # all rows ignored: 'mean' over nothing is nan, 'sum' 0; empty batch likewise
    x = torch.randn(3, 4, dtype=torch.float64)
    t = torch.full((3,), -100)
    for reduction in REDUCTIONS:
        torch.testing.assert_close(lf.cross_entropy(x, t, reduction=reduction),
                                   F.cross_entropy(x, t, reduction=reduction), equal_nan=True)
    e = torch.randn(0, 4, dtype=torch.float64)
    for reduction in REDUCTIONS:
        torch.testing.assert_close(lf.cross_entropy(e, t[:0], reduction=reduction),
                                   F.cross_entropy(e, t[:0], reduction=reduction), equal_nan=True)
    # -inf masked classes and a non-contiguous input
    x = torch.randn(5, 12, dtype=torch.float64)[:, ::2]
    x[:, 1] = float("-inf")
    t = torch.tensor([0, 2, 3, 4, 5])
    torch.testing.assert_close(lf.cross_entropy(x, t, reduction="none"), F.cross_entropy(x, t, reduction="none"))


# ---- the extras against textbook formulas (float64) ---------------------------------------------

def textbook(x, t, w=None, *, smoothing=0.0, z_loss=0.0, softcap=None, gamma=0.0, alpha=None, reduction="mean",
             ignore_index=-100):
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    keep = t != ignore_index
    ce = F.cross_entropy(x, t, w, reduction="none", label_smoothing=smoothing, ignore_index=ignore_index)
    p_t = torch.softmax(x, 1).gather(1, t.clamp(0)[:, None]).squeeze(1)
    a_t = 1.0 if alpha is None else (alpha[t.clamp(0)] if isinstance(alpha, torch.Tensor) else alpha)
    rows = a_t * (1 - p_t) ** gamma * ce + z_loss * torch.logsumexp(x, 1) ** 2
    rows = torch.where(keep, rows, 0.0)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    divisor = keep.sum() if w is None else w[t.clamp(0)][keep].sum()
    return rows.sum() / divisor


EXTRAS = [
    dict(z_loss=1e-2),
    dict(softcap=3.0),
    dict(gamma=2.0),
    dict(gamma=0.5, alpha=0.25),
    dict(gamma=1.5, alpha="tensor", smoothing=0.1),
    dict(gamma=2.0, alpha="tensor", smoothing=0.2, z_loss=1e-3, softcap=4.0, weighted=True),
]


@pytest.mark.parametrize("opts", EXTRAS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_extras_match_textbook(opts, reduction):
    opts = dict(opts)
    x, t, w = make_inputs(10, 7, dtype=torch.float64)
    w = w.double() if opts.pop("weighted", False) else None
    if opts.get("alpha") == "tensor":
        opts["alpha"] = torch.rand(7, dtype=torch.float64)
    want = textbook(x, t, w, reduction=reduction, **opts)
    got = lf.cross_entropy(x, t, w, reduction=reduction, label_smoothing=opts.get("smoothing", 0.0),
                           z_loss=opts.get("z_loss", 0.0), softcap=opts.get("softcap"),
                           focal_gamma=opts.get("gamma", 0.0), focal_alpha=opts.get("alpha"), backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_focal_loss_is_cross_entropy_with_focal_terms():
    x, t, _ = make_inputs(9, 6, dtype=torch.float64)
    alpha = torch.rand(6, dtype=torch.float64)
    torch.testing.assert_close(lf.focal_loss(x, t, gamma=1.5, alpha=alpha, label_smoothing=0.1),
                               lf.cross_entropy(x, t, focal_gamma=1.5, focal_alpha=alpha, label_smoothing=0.1))
    torch.testing.assert_close(lf.focal_loss(x, t, gamma=2.0), textbook(x, t, gamma=2.0))


def test_soft_targets_with_z_loss_and_softcap():
    x, q, w = make_inputs(6, 5, dtype=torch.float64, soft=True)
    xc = 2.0 * torch.tanh(x / 2.0)
    want = F.cross_entropy(xc, q, w.double(), reduction="none", label_smoothing=0.1) \
        + 1e-2 * torch.logsumexp(xc, 1) ** 2
    got = lf.cross_entropy(x, q, w.double(), reduction="none", label_smoothing=0.1, z_loss=1e-2, softcap=2.0)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("opts", [
    dict(), dict(label_smoothing=0.2, weighted=True), dict(z_loss=0.1, softcap=2.0),
    dict(focal_gamma=2.0, focal_alpha=0.3), dict(focal_gamma=0.5, focal_alpha="tensor", weighted=True),
    dict(soft=True, label_smoothing=0.1, weighted=True, z_loss=0.05),
])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_gradcheck(opts, reduction):
    opts = dict(opts)
    soft = opts.pop("soft", False)
    x, t, w = make_inputs(4, 5, dtype=torch.float64, soft=soft, ignore_frac=0.3)
    w = w.double() if opts.pop("weighted", False) else None
    if opts.get("focal_alpha") == "tensor":
        opts["focal_alpha"] = torch.rand(5, dtype=torch.float64)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x_: lf.cross_entropy(x_, t, w, reduction=reduction, backend="reference", **opts), (x,))


def test_reference_focal_gradient_finite_at_extreme_logits():
    x = torch.tensor([[1000.0, -1000.0, 0.0], [-1000.0, 1000.0, 3.0]], requires_grad=True)
    t = torch.tensor([0, 0])
    for gamma in (0.0, 0.3, 0.5, 1.0, 2.0):
        x.grad = None
        lf.cross_entropy(x, t, focal_gamma=gamma, backend="reference").backward()
        assert torch.isfinite(x.grad).all(), gamma


# ---- modules ----------------------------------------------------------------------------------------

def test_modules_match_functions():
    x, t, w = make_inputs(6, 9, dtype=torch.float64)
    w = w.double()
    alpha = torch.rand(9, dtype=torch.float64)
    m = lf.CrossEntropyLoss(w, label_smoothing=0.1, z_loss=1e-3, focal_gamma=1.0, focal_alpha=alpha)
    torch.testing.assert_close(m(x, t), lf.cross_entropy(x, t, w, label_smoothing=0.1, z_loss=1e-3, focal_gamma=1.0,
                                                         focal_alpha=alpha))
    assert set(dict(m.named_buffers())) == {"weight", "focal_alpha"}
    torch.testing.assert_close(lf.FocalLoss(gamma=2.0, alpha=0.5)(x, t), lf.focal_loss(x, t, gamma=2.0, alpha=0.5))


# ---- bad input ----------------------------------------------------------------------------------------

BAD = [
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing must be in"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing must be in"),
    (dict(z_loss=-1.0), ValueError, "z_loss must be in"),
    (dict(softcap=0.0), ValueError, "softcap must be in"),
    (dict(focal_gamma=-1.0), ValueError, "focal_gamma must be in"),
    (dict(focal_alpha="x"), TypeError, "focal_alpha must be a float"),
    (dict(focal_alpha=torch.ones(3)), ValueError, "focal_alpha must have one entry per class"),
    (dict(weight=torch.ones(4)), ValueError, "weight must have one entry per class"),
    (dict(weight=torch.ones(5, dtype=torch.long)), TypeError, "weight must be a floating-point"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
    (dict(inplace_backward=1), TypeError, "inplace_backward must be a bool"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("kwargs,exc,msg", BAD)
def test_bad_options_raise(kwargs, exc, msg):
    x, t, _ = make_inputs(3, 5)
    with pytest.raises(exc, match=msg):
        lf.cross_entropy(x, t, **kwargs)


def test_bad_tensors_raise():
    x, t, _ = make_inputs(3, 5)
    with pytest.raises(ValueError, match=r"target with class indices must have shape \(3,\)"):
        lf.cross_entropy(x, t[:2])
    with pytest.raises(ValueError, match="class probabilities must have the input's shape"):
        lf.cross_entropy(x, torch.rand(3, 4))
    with pytest.raises(TypeError, match="input must be a floating-point"):
        lf.cross_entropy(t, t)
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        lf.cross_entropy([1.0], t)
    with pytest.raises(IndexError, match="class index 5, out of range"):
        lf.cross_entropy(x, torch.tensor([0, 5, 1]))
    with pytest.raises(IndexError, match="class index -3"):
        lf.cross_entropy(x, torch.tensor([0, -3, 1]))
    with pytest.raises(ValueError, match="focal_gamma/focal_alpha need class-index targets"):
        lf.cross_entropy(x, torch.softmax(x, 1), focal_gamma=2.0)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_device_mismatch_and_gpu_check_env(monkeypatch):
    x = torch.randn(3, 5, device="cuda")
    with pytest.raises(ValueError, match="target is on cpu but input is on cuda"):
        lf.cross_entropy(x, torch.tensor([0, 1, 2]))
    monkeypatch.setenv("LOSSFORGE_CHECK_INPUTS", "1")
    with pytest.raises(IndexError, match="class index 7"):
        lf.cross_entropy(x, torch.tensor([0, 7, 2], device="cuda"))




# ---- defects found trying the API as a new user would -------------------------------------------

@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_any_integer_dtype_of_class_indices(any_backend, dtype):
    from tests.conftest import device_for

    device = device_for(any_backend)
    x, t, _ = make_inputs(6, 9, device=device, ignore_frac=0.0)
    x.requires_grad_(True)
    loss = lf.cross_entropy(x, t.to(dtype), label_smoothing=0.1, backend=any_backend)
    want = F.cross_entropy(x.detach().double(), t, label_smoothing=0.1)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_ignore_index_never_wraps_in_a_small_integer_dtype():
    # uint8 156 compared with -100 in uint8 arithmetic would match it; class indices are int64 first.
    x = torch.randn(2, 200, dtype=torch.float64)
    t = torch.tensor([156, 3], dtype=torch.uint8)
    torch.testing.assert_close(lf.cross_entropy(x, t, reduction="none"),
                               F.cross_entropy(x, t.long(), reduction="none"))


def test_numpy_scalars_are_numbers():
    x, t, _ = make_inputs(5, 7, dtype=torch.float64, ignore_frac=0.0)
    t[0] = 3
    got = lf.cross_entropy(x, t, ignore_index=np.int64(3), label_smoothing=np.float32(0.25), z_loss=np.float64(0.0))
    torch.testing.assert_close(got, F.cross_entropy(x, t, ignore_index=3, label_smoothing=float(np.float32(0.25))))
    lf.CrossEntropyLoss(ignore_index=np.int32(3), label_smoothing=np.float64(0.1))(x, t)


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(softcap=float("inf")), ValueError, "softcap must be in .* and finite"),
    (dict(softcap=float("nan")), ValueError, "softcap must be in"),
    (dict(z_loss=float("inf")), ValueError, "z_loss must be in .* and finite"),
    (dict(focal_gamma=float("inf")), ValueError, "focal_gamma must be in .* and finite"),
    (dict(focal_alpha=float("nan")), ValueError, "focal_alpha must be in"),
    (dict(ignore_index=2**63), ValueError, "ignore_index must fit in int64"),
    (dict(ignore_index=-2**63 - 1), ValueError, "ignore_index must fit in int64"),
    (dict(ignore_index=True), TypeError, "ignore_index must be an int"),
    (dict(label_smoothing=np.bool_(True)), TypeError, "label_smoothing must be a float"),
])
def test_more_bad_options_raise(kwargs, exc, msg):
    x, t, _ = make_inputs(3, 5)
    with pytest.raises(exc, match=msg):
        lf.cross_entropy(x, t, **kwargs)


def test_focal_loss_names_its_own_arguments():
    x, t, _ = make_inputs(3, 5)
    with pytest.raises(ValueError, match=r"^gamma must be in"):
        lf.focal_loss(x, t, gamma=-1.0)
    with pytest.raises(TypeError, match=r"^alpha must be a float"):
        lf.focal_loss(x, t, alpha="x")
    with pytest.raises(ValueError, match=r"^alpha must have one entry per class"):
        lf.focal_loss(x, t, alpha=torch.ones(3))
    with pytest.raises(ValueError, match=r"^gamma must be in"):
        lf.FocalLoss(gamma=-1.0)


@pytest.mark.parametrize("make_module,exc,msg", [
    (lambda: lf.CrossEntropyLoss(reduction="avg"), ValueError, "reduction must be one of"),
    (lambda: lf.CrossEntropyLoss(label_smoothing=2.0), ValueError, "label_smoothing must be in"),
    (lambda: lf.CrossEntropyLoss(softcap=0.0), ValueError, "softcap must be in"),
    (lambda: lf.CrossEntropyLoss(ignore_index=1.5), TypeError, "ignore_index must be an int"),
    (lambda: lf.CrossEntropyLoss(weight=torch.ones(2, 2)), ValueError, "weight must have 1 dimension"),
    (lambda: lf.CrossEntropyLoss(focal_alpha=torch.ones(3, dtype=torch.long)), TypeError,
     "focal_alpha must be a float"),
    (lambda: lf.CrossEntropyLoss(inplace_backward="yes"), TypeError, "inplace_backward must be a bool"),
    (lambda: lf.CrossEntropyLoss(backend="gpu"), ValueError, "backend must be one of"),
    (lambda: lf.FocalLoss(alpha="x"), TypeError, "alpha must be a float"),
    (lambda: lf.FocalLoss(reduction="avg"), ValueError, "reduction must be one of"),
])
def test_modules_check_their_arguments_at_construction(make_module, exc, msg):
    with pytest.raises(exc, match=msg):
        make_module()


def test_focal_loss_module_keeps_its_alpha_buffer_name():
    alpha = torch.rand(6, dtype=torch.float64)
    m = lf.FocalLoss(gamma=1.5, alpha=alpha)
    assert set(dict(m.named_buffers())) == {"focal_alpha"}
    x, t, _ = make_inputs(4, 6, dtype=torch.float64)
    torch.testing.assert_close(m(x, t), lf.focal_loss(x, t, gamma=1.5, alpha=alpha))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_classes_with_every_row_ignored_gives_torch_results(any_backend, reduction):
    # (N, 0) logits can only be ignored rows: torch's nan for 'mean' (0/0), zeros otherwise.
    x = torch.randn(4, 0, device=device_for(any_backend), requires_grad=True)
    t = torch.full((4,), -100, device=x.device)
    loss = lf.cross_entropy(x, t, reduction=reduction, backend=any_backend)
    torch.testing.assert_close(loss, F.cross_entropy(x, t, reduction=reduction), equal_nan=True)
