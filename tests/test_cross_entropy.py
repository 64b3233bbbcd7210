"""Cross-entropy family: reference vs torch, extras vs textbook formulas, kernels vs reference, bad input."""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import lossforge_kernels as lf
from lossforge_kernels.reference import cross_entropy as ref
from tests.conftest import HAS_GPU, assert_close_rel, device_for

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


# ---- kernels against the reference -----------------------------------------------------------------

KERNEL_CASES = [
    dict(),
    dict(weighted=True),
    dict(label_smoothing=0.1),
    dict(label_smoothing=0.3, weighted=True),
    dict(z_loss=1e-3),
    dict(softcap=5.0),
    dict(focal_gamma=2.0),
    dict(focal_gamma=0.5, focal_alpha=0.25),
    dict(focal_gamma=1.0, focal_alpha="tensor", weighted=True),
    dict(focal_gamma=2.0, focal_alpha="tensor", label_smoothing=0.1, z_loss=1e-3, softcap=8.0, weighted=True),
    dict(soft=True),
    dict(soft=True, weighted=True, label_smoothing=0.2, z_loss=1e-3, softcap=6.0),
]
SHAPES = [(5, 37), (3, 1), (2, 2), (33, 130)]


def run_both(backend, opts, n, c, reduction, dtype=torch.float32, seed=None, extra=()):
    """The kernel on `dtype` inputs and the float64 reference on the same (rounded) values."""
    opts = dict(opts)
    soft = opts.pop("soft", False)
    device = device_for(backend)
    x, t, w = make_inputs(n, c, dtype=dtype, device=device, soft=soft, seed=seed, extra=extra)
    w = w if opts.pop("weighted", False) else None
    if opts.get("focal_alpha") == "tensor":
        opts["focal_alpha"] = torch.rand(c, device=device)
    x_ref = x.detach().double().requires_grad_(True)
    x = x.requires_grad_(True)
    t_ref = t.double() if soft else t
    ref_opts = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in opts.items()}
    loss = lf.cross_entropy(x, t, w, reduction=reduction, backend=backend, **opts)
    want = lf.cross_entropy(x_ref, t_ref, None if w is None else w.double(), reduction=reduction,
                            backend="reference", **ref_opts)
    # non-uniform grad_output for 'none', a random scalar otherwise; both sides get the same values
    g = (torch.rand_like(want) + 0.5).to(loss.dtype)
    loss.backward(g)
    want.backward(g.to(want.dtype))
    return loss, want, x.grad, x_ref.grad


@pytest.mark.parametrize("opts", KERNEL_CASES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kernel_matches_reference_fp32(kernel_backend, opts, reduction):
    for n, c in SHAPES:
        loss, want, grad, want_grad = run_both(kernel_backend, opts, n, c, reduction)
        assert loss.dtype == torch.float32 and loss.shape == want.shape
        assert_close_rel(loss, want, 1e-5, f"loss n={n} c={c}")
        # One class of probability targets: the gradient p*S - w*q' is pure cancellation (0 but for
        # the z-loss/softcap terms), so fp32 rounding of O(1) terms dominates the small result.
        tol = 1e-4 if opts.get("soft") and c == 1 else 1e-5
        assert_close_rel(grad, want_grad, tol, f"grad n={n} c={c}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("opts", [KERNEL_CASES[0], KERNEL_CASES[9], KERNEL_CASES[11]])
def test_kernel_matches_reference_half(kernel_backend, dtype, opts):
    # The reference sees the same rounded inputs, so what is left is output rounding: the loss once,
    # the fused gradient twice (stored in the forward, rescaled by grad_output != 1 in the backward).
    # With few rows the norm is dominated by the target entries, so the bound is per element:
    # 2 x 2**-8 for bf16 (0.8%), 2 x 2**-11 for fp16, with a factor 2 of headroom.
    tol = 2 * 2 * (2**-8 if dtype == torch.bfloat16 else 2**-11)
    for reduction in REDUCTIONS:
        loss, want, grad, want_grad = run_both(kernel_backend, opts, 7, 300, reduction, dtype=dtype)
        assert loss.dtype == dtype and grad.dtype == dtype
        assert_close_rel(loss, want, tol, "loss")
        assert_close_rel(grad, want_grad, tol, "grad")


def test_kernel_k_dimensional_and_large_row(kernel_backend):
    loss, want, grad, want_grad = run_both(kernel_backend, dict(label_smoothing=0.1), 3, 11, "none", extra=(4, 2))
    assert loss.shape == (3, 4, 2)
    assert_close_rel(loss, want, 1e-5, "loss")
    assert_close_rel(grad, want_grad, 1e-5, "grad")
    c = 20000 if kernel_backend == "triton" and device_for("triton") == "cpu" else 300_000  # several chunks
    # the fused forward, and the backward from saved stats ('none'), over rows streamed in chunks
    for reduction, opts in (("mean", dict(focal_gamma=2.0, z_loss=1e-4)),
                            ("none", dict(focal_gamma=0.5, focal_alpha=0.25, label_smoothing=0.1))):
        loss, want, grad, want_grad = run_both(kernel_backend, opts, 2, c, reduction)
        assert_close_rel(loss, want, 1e-5, f"loss {reduction}")
        assert_close_rel(grad, want_grad, 1e-5, f"grad {reduction}")


@pytest.mark.parametrize("opts", KERNEL_CASES)
def test_triton_chunked_rows_match_the_reference(monkeypatch, opts):
    # Small chunks (the LOSSFORGE_TRITON_CHUNK knob) put short rows through the streamed path, the
    # one long vocabularies take: every option, the fused forward and the backward from stats.
    from tests.conftest import kernel_backends
    if "triton" not in kernel_backends():
        pytest.skip("the Triton backend is not available here")
    monkeypatch.setenv("LOSSFORGE_TRITON_CHUNK", "64")
    monkeypatch.setenv("LOSSFORGE_TRITON_CHUNK_WARPS", "2")
    from lossforge_kernels.triton_kernels.cross_entropy import _launch_config
    assert _launch_config(301) == (64, False, 2)  # BLOCK, whole row in one block, warps
    for reduction in ("mean", "none"):
        loss, want, grad, want_grad = run_both("triton", opts, 5, 301, reduction)
        assert_close_rel(loss, want, 1e-5, f"loss {reduction}")
        assert_close_rel(grad, want_grad, 1e-5, f"grad {reduction}")


@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_kernel_confident_rows_keep_relative_precision(kernel_backend, gamma):
    # p_t -> 1: the CE is ~1e-5..1e-9 and must not come out of log(1 + s) rounded at 1 (or out of
    # lse - y_t, which cancels); the target is the max in some rows and not in others.
    device = device_for(kernel_backend)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 50, generator=g)
    t = torch.arange(6) * 7
    x[torch.arange(6), t] = torch.tensor([12.0, 16.0, 20.0, 9.0, 25.0, 14.0])
    x[3, 1] = 9.5  # row 3: another class above the target
    x = x.to(device).requires_grad_(True)
    t = t.to(device)
    rows = lf.cross_entropy(x, t, reduction="none", focal_gamma=gamma, backend=kernel_backend)
    want = lf.cross_entropy(x.detach().double(), t, reduction="none", focal_gamma=gamma, backend="reference")
    assert (want[[0, 1, 2, 4, 5]] < 1e-3).all()  # the inputs are what the test is about
    assert torch.allclose(rows.double(), want, rtol=1e-5, atol=0), (rows, want)
    rows.sum().backward()
    x64 = x.detach().double().requires_grad_(True)
    lf.cross_entropy(x64, t, reduction="sum", focal_gamma=gamma, backend="reference").backward()
    assert_close_rel(x.grad, x64.grad, 1e-5, "grad")


def test_kernel_edge_values(kernel_backend):
    device = device_for(kernel_backend)
    # -inf masked classes, extreme logits with gamma < 1, non-contiguous rows, an ignored row
    base = torch.randn(4, 24, device=device) * 2
    base[:, 0] = 1000.0
    base[1, 5:9] = float("-inf")
    base[2, 3] = -1000.0
    x = base[:, :20].requires_grad_(True)  # rows of stride 24, 20 classes
    t = torch.tensor([0, 1, -100, 19], device=device)
    for gamma in (0.0, 0.5, 2.0):
        x.grad = None
        loss = lf.cross_entropy(x, t, focal_gamma=gamma, backend=kernel_backend)
        loss.backward()
        x64 = x.detach().double().requires_grad_(True)
        want = lf.cross_entropy(x64, t, focal_gamma=gamma, backend="reference")
        want.backward()
        assert torch.isfinite(x.grad).all(), gamma
        assert_close_rel(loss, want, 1e-5, f"loss gamma={gamma}")
        assert_close_rel(x.grad, x64.grad, 1e-5, f"grad gamma={gamma}")


def test_kernel_all_ignored_and_no_grad(kernel_backend):
    device = device_for(kernel_backend)
    x = torch.randn(5, 17, device=device, requires_grad=True)
    t = torch.full((5,), -100, device=device)
    loss = lf.cross_entropy(x, t, reduction="sum", backend=kernel_backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))
    assert math.isnan(lf.cross_entropy(x, t, backend=kernel_backend).item())
    with torch.no_grad():
        x2, t2, _ = make_inputs(6, 40, device=device)
        torch.testing.assert_close(lf.cross_entropy(x2, t2, label_smoothing=0.1, backend=kernel_backend),
                                   lf.cross_entropy(x2, t2, label_smoothing=0.1, backend="reference"))


def test_kernel_out_of_range_target_gives_nan_row(kernel_backend, monkeypatch):
    device = device_for(kernel_backend)
    x = torch.randn(3, 6, device=device)
    t = torch.tensor([1, 6, 2], device=device)
    if device == "cpu":  # CPU inputs are always checked eagerly; emulate the unchecked GPU path
        monkeypatch.setattr("lossforge_kernels._checks.eager_value_checks", lambda t: False)
    rows = lf.cross_entropy(x, t, reduction="none", backend=kernel_backend)
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()


def test_inplace_backward_overwrites_logits_only_when_asked(kernel_backend):
    device = device_for(kernel_backend)
    x, t, _ = make_inputs(6, 50, device=device)
    x_copy = x.clone()
    leaf = x.clone().requires_grad_(True)
    lf.cross_entropy(leaf, t, label_smoothing=0.1, backend=kernel_backend).backward()
    assert torch.equal(leaf.detach(), x_copy)  # default: untouched
    want = leaf.grad
    leaf2 = x.clone().requires_grad_(True)
    lf.cross_entropy(leaf2, t, label_smoothing=0.1, inplace_backward=True, backend=kernel_backend).backward()
    torch.testing.assert_close(leaf2.grad, want)
    torch.testing.assert_close(leaf2.detach(), want)  # the logits' buffer now holds the gradient


def test_fused_gradient_rescales_on_repeated_backward(kernel_backend):
    device = device_for(kernel_backend)
    x, t, _ = make_inputs(4, 30, device=device)
    x.requires_grad_(True)
    loss = lf.cross_entropy(x, t, backend=kernel_backend)
    loss.backward(torch.tensor(1.0, device=device), retain_graph=True)
    g1 = x.grad.clone()
    x.grad = None
    loss.backward(torch.tensor(0.5, device=device), retain_graph=True)
    torch.testing.assert_close(x.grad, 0.5 * g1)
    x.grad = None
    loss.backward(torch.tensor(3.0, device=device))
    torch.testing.assert_close(x.grad, 3.0 * g1)


@pytest.mark.parametrize("opts", [dict(), dict(weighted=True, label_smoothing=0.1), dict(soft=True)])
def test_kernel_under_a_float64_default_dtype(kernel_backend, opts):
    # Divisors and gradient scales are made in float32 explicitly, not in the default dtype.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for reduction in ("mean", "sum"):
            loss, want, grad, want_grad = run_both(kernel_backend, opts, 6, 40, reduction)
            assert loss.dtype == torch.float32
            assert_close_rel(loss, want, 1e-5, f"loss {reduction}")
            assert_close_rel(grad, want_grad, 1e-5, f"grad {reduction}")
    finally:
        torch.set_default_dtype(previous)


def test_kernel_path_launches_few_ops_and_never_syncs(kernel_backend, monkeypatch):
    # What one eager fwd+bwd of a 'mean' loss runs around the kernel, with the eager value checks
    # off as they are on a GPU: no op that reads a value back to the host, and few small launches
    # (the divisor, its reciprocal, the loss; autograd's grad_output and the scale check).
    from tests.conftest import HOST_SYNC_OPS, LaunchLog
    monkeypatch.setattr("lossforge_kernels._checks.eager_value_checks", lambda t: False)
    device = device_for(kernel_backend)
    x, t, _ = make_inputs(8, 50, device=device, dtype=torch.bfloat16)
    x.requires_grad_(True)
    with LaunchLog() as fwd:
        loss = lf.cross_entropy(x, t, backend=kernel_backend)
    with LaunchLog() as bwd:
        loss.backward()
    assert not HOST_SYNC_OPS & set(fwd.ops + bwd.ops), (fwd.ops, bwd.ops)
    assert fwd.ops.count(f"cross_entropy_fwd_{kernel_backend}") == 1 and len(fwd.ops) <= 6, fwd.ops
    assert bwd.ops.count(f"scale_grad_{kernel_backend}") == 1 and len(bwd.ops) <= 2, bwd.ops


def test_kernel_op_rejects_a_bad_grad_scale(kernel_backend):
    # The contract: a 0-dim float32 tensor, on both backends alike.
    device = device_for(kernel_backend)
    fwd = getattr(torch.ops.lossforge, f"cross_entropy_fwd_{kernel_backend}").default
    x, t, _ = make_inputs(3, 9, device=device)
    params = (-100, 0.0, 0.0, 0.0, 0.0, 1.0)
    with pytest.raises(TypeError, match="grad_scale must have dtype"):
        fwd(x, t, None, None, torch.ones((), device=device, dtype=torch.float64), torch.empty_like(x), *params)
    with pytest.raises(ValueError, match="grad_scale must be a 0-dim tensor"):
        fwd(x, t, None, None, torch.ones(1, device=device), torch.empty_like(x), *params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_grad_contract(kernel_backend, dtype):
    # grad *= grad_output / applied (old value 1 when `first`, whatever `applied` holds), then
    # applied = grad_output; equal values leave grad bit for bit. A dense tensor of several blocks
    # and a strided (M, C) view (rows walked by a grid of fewer programs than pieces).
    device = device_for(kernel_backend)
    op = getattr(torch.ops.lossforge, f"scale_grad_{kernel_backend}").default
    base = torch.randn(6, 9001, device=device).to(dtype)
    for make in (lambda b: b.clone(), lambda b: b.clone()[:, 1:8000]):
        g = make(base)
        want = g.float().clone()
        applied = torch.full((), float("nan"), device=device)
        op(g, torch.tensor(2.0, device=device), applied, True)
        torch.testing.assert_close(g.float(), (want * 2.0).to(dtype).float())
        assert applied.item() == 2.0
        before = g.clone()
        op(g, torch.tensor(2.0, device=device, dtype=torch.bfloat16), applied, False)
        assert torch.equal(g, before) and applied.item() == 2.0
        op(g, torch.tensor(3.0, device=device), applied, False)
        tol = dict(rtol=2**-7, atol=0) if dtype == torch.bfloat16 else {}  # one rounding of the product
        torch.testing.assert_close(g.float(), before.float() * 1.5, **tol)
        assert applied.item() == 3.0
        g = make(base)
        applied.fill_(float("nan"))
        op(g, torch.tensor(1.0, device=device), applied, True)
        assert torch.equal(g, make(base)) and applied.item() == 1.0


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 9), c=st.integers(1, 70), reduction=st.sampled_from(REDUCTIONS),
       smoothing=st.sampled_from([0.0, 0.15]), gamma=st.sampled_from([0.0, 0.7, 2.0]),
       z_loss=st.sampled_from([0.0, 1e-2]), weighted=st.booleans(), seed=st.integers(0, 2**30))
def test_kernel_hypothesis(n, c, reduction, smoothing, gamma, z_loss, weighted, seed):
    from tests.conftest import kernel_backends
    if not kernel_backends():
        pytest.skip("no kernel backend here")
    for backend in kernel_backends():
        opts = dict(label_smoothing=smoothing, focal_gamma=gamma, z_loss=z_loss, weighted=weighted)
        loss, want, grad, want_grad = run_both(backend, opts, n, c, reduction, seed=seed)
        assert_close_rel(loss, want, 1e-5, "loss")
        assert_close_rel(grad, want_grad, 1e-5, "grad")


@pytest.mark.parametrize("reduction,inplace", [("mean", False), ("sum", False), ("none", False), ("mean", True)])
def test_compile_fullgraph(any_backend, reduction, inplace):
    device = device_for(any_backend)
    torch._dynamo.reset()  # each case compiles the same code object: stay clear of the recompile limit
    x, t, _ = make_inputs(4, 20, device=device)
    go = torch.rand(4, device=device) + 0.5 if reduction == "none" else torch.tensor(3.0, device=device)

    def step(x_, t_):
        return lf.cross_entropy(x_, t_, label_smoothing=0.1, z_loss=1e-3, reduction=reduction,
                                inplace_backward=inplace, backend=any_backend) * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    # A non-leaf input, so that inplace_backward may write over it; fresh copies for each side.
    x1 = x.clone().requires_grad_(True)
    loss = compiled(x1 * 1.0, t)
    loss.backward(go)
    x2 = x.clone().requires_grad_(True)
    want = step(x2 * 1.0, t)
    want.backward(go)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize("case", ["weights+focal alpha tensor", "probabilities+smoothing", "no grad"])
def test_compile_fullgraph_other_inputs(any_backend, case):
    # The compiled path's own ops with class weights and per-class alpha, probability targets, and
    # a forward under no_grad, against the eager call.
    device = device_for(any_backend)
    torch._dynamo.reset()
    soft = case.startswith("probabilities")
    x, t, w = make_inputs(5, 12, device=device, soft=soft, seed=7)
    alpha = torch.rand(12, device=device)
    opts = {"probabilities+smoothing": dict(label_smoothing=0.2, reduction="sum"),
            "weights+focal alpha tensor": dict(weight=w, focal_gamma=2.0, focal_alpha=alpha),
            "no grad": dict(z_loss=1e-3)}[case]

    def step(x_, t_):
        return lf.cross_entropy(x_, t_, backend=any_backend, **opts)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    if case == "no grad":
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, t), step(x, t))
        return
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    loss, want = compiled(x1, t), step(x2, t)
    loss.backward()
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(x1.grad, x2.grad)


# ---- linear cross-entropy ------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_cross_entropy_matches_materialised(reduction):
    g = torch.Generator().manual_seed(0)
    inp = torch.randn(2, 5, 8, dtype=torch.float64, generator=g)
    wt = torch.randn(11, 8, dtype=torch.float64, generator=g)
    b = torch.randn(11, dtype=torch.float64, generator=g)
    t = torch.randint(0, 11, (2, 5), generator=g)
    t[0, 0] = -100
    got = lf.linear_cross_entropy(inp, wt, t, linear_bias=b, reduction=reduction, label_smoothing=0.1)
    want = F.cross_entropy((inp @ wt.T + b).reshape(-1, 11), t.reshape(-1), reduction=reduction,
                           label_smoothing=0.1)
    torch.testing.assert_close(got, want.reshape(t.shape) if reduction == "none" else want)
    if hasattr(F, "linear_cross_entropy"):
        torch.testing.assert_close(
            lf.linear_cross_entropy(inp[0], wt, t[0], linear_bias=b, reduction=reduction),
            F.linear_cross_entropy(inp[0], wt, t[0], linear_bias=b, reduction=reduction))


def test_linear_cross_entropy_gradcheck():
    inp = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    wt = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1, 5, -100])
    assert torch.autograd.gradcheck(
        lambda i, w, b_: lf.linear_cross_entropy(i, w, t, linear_bias=b_, focal_gamma=1.5, z_loss=0.1), (inp, wt, b))


def test_linear_cross_entropy_kernel_path(kernel_backend):
    device = device_for(kernel_backend)
    inp = torch.randn(5, 16, device=device, requires_grad=True)
    wt = torch.randn(40, 16, device=device, requires_grad=True)
    t = torch.randint(0, 40, (5,), device=device)
    loss = lf.linear_cross_entropy(inp, wt, t, label_smoothing=0.1, backend=kernel_backend)
    loss.backward()
    i64, w64 = inp.detach().double().requires_grad_(True), wt.detach().double().requires_grad_(True)
    want = lf.linear_cross_entropy(i64, w64, t, label_smoothing=0.1, backend="reference")
    want.backward()
    assert_close_rel(loss, want, 1e-5, "loss")
    assert_close_rel(inp.grad, i64.grad, 1e-4, "input grad")
    assert_close_rel(wt.grad, w64.grad, 1e-4, "weight grad")


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
    inp, wt = torch.randn(6, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    torch.testing.assert_close(lf.LinearCrossEntropyLoss(reduction="sum")(inp, wt, t),
                               lf.linear_cross_entropy(inp, wt, t, reduction="sum"))


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
    with pytest.raises(ValueError, match="linear_weight must have shape"):
        lf.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 3), t)
    with pytest.raises(ValueError, match="linear_bias must have shape"):
        lf.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), t, linear_bias=torch.randn(4))
    with pytest.raises(ValueError, match="target must have shape"):
        lf.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), t[:1])


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_device_mismatch_and_gpu_check_env(monkeypatch):
    x = torch.randn(3, 5, device="cuda")
    with pytest.raises(ValueError, match="target is on cpu but input is on cuda"):
        lf.cross_entropy(x, torch.tensor([0, 1, 2]))
    monkeypatch.setenv("LOSSFORGE_CHECK_INPUTS", "1")
    with pytest.raises(IndexError, match="class index 7"):
        lf.cross_entropy(x, torch.tensor([0, 7, 2], device="cuda"))


# ---- GPU-only scale tests ---------------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_no_host_sync(backend):
    # torch raises on any device-to-host copy or synchronisation inside the region.
    if not lf.available_backends()[backend].available:
        pytest.skip(lf.available_backends()[backend].reason)
    x, t, w = make_inputs(64, 1000, device="cuda", dtype=torch.bfloat16)
    x.requires_grad_(True)
    xs = torch.randn(64, 80, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ts = (torch.rand(64, 80, device="cuda") < 0.3).to(torch.bfloat16)
    def step():
        for reduction in REDUCTIONS:
            lf.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.1, focal_gamma=2.0,
                             backend=backend).sum().backward()
            lf.sigmoid_focal_loss(xs, ts, reduction=reduction, backend=backend).sum().backward()

    step()  # compiles the kernels and warms the allocator outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_huge_vocab_and_64bit_offsets(backend):
    if not lf.available_backends()[backend].available:
        pytest.skip(lf.available_backends()[backend].reason)
    for n, c in ((3, 1_048_576), (2049, 1_048_577)):  # the second has more than 2**31 elements
        if n * c * 2 * 2 > torch.cuda.mem_get_info()[0] * 0.8:
            pytest.skip("not enough free GPU memory")
        x = torch.randn(n, c, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
        t = torch.randint(0, c, (n,), device="cuda")
        loss = lf.cross_entropy(x, t, backend=backend)
        loss.backward()
        rows = torch.arange(n, device="cuda")
        want = torch.logsumexp(x.detach().float(), 1) - x.detach().float()[rows, t]
        torch.testing.assert_close(loss.float(), want.mean(), rtol=2e-2, atol=0)
        # spot-check the last row's gradient, which lies beyond 2**31 elements in the second case
        last = x.detach()[-1].float()
        g = torch.softmax(last, 0)
        g[t[-1]] -= 1
        assert_close_rel(x.grad[-1].float(), g / n, 1e-2, "last row grad")
        del x, loss
        torch.cuda.empty_cache()


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("knobs", [{"LOSSFORGE_ROW_THREADS": "1024"}, {"LOSSFORGE_ROW_THREADS": "64"},
                                   {"LOSSFORGE_ROW_CACHE": "0"}, {"LOSSFORGE_ROW_L2_SHARE": "0"},
                                   {"LOSSFORGE_ROW_PREFETCH_KB": "16"},
                                   {"LOSSFORGE_ROW_PREFETCH_KB": "1024", "LOSSFORGE_ROW_THREADS": "1024"}])
def test_gpu_cuda_row_plans_all_agree_with_the_reference(monkeypatch, knobs):
    # The tuning knobs pick other launch plans (block size, shared-memory head, L2 re-read, a
    # persistent grid with a prefetch of the next row); each must compute the same thing. Odd C so
    # rows are misaligned; one long row that cannot be cached; more rows than resident blocks, so
    # that a persistent block walks several rows (ignored ones among them).
    if not lf.available_backends()["cuda"].available:
        pytest.skip(lf.available_backends()["cuda"].reason)
    for k, v in knobs.items():
        monkeypatch.setenv(k, v)
    for n, c, opts in ((37, 5001, {"label_smoothing": 0.1}), (5, 70001, {"focal_gamma": 0.5, "z_loss": 1e-3}),
                       (3001, 2053, {"weighted": True})):
        for reduction in ("mean", "none"):
            loss, want, grad, want_grad = run_both("cuda", opts, n, c, reduction)
            assert_close_rel(loss, want, 1e-5, f"{knobs} loss c={c} {reduction}")
            assert_close_rel(grad, want_grad, 1e-5, f"{knobs} grad c={c} {reduction}")


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_peak_memory_beyond_logits_and_gradient(backend):
    # At most 1% of the logits' size beyond the logits and their gradient; with inplace_backward
    # the gradient itself costs nothing either (only per-row buffers remain).
    if not lf.available_backends()[backend].available:
        pytest.skip(lf.available_backends()[backend].reason)
    n, c = 2048, 32000
    logits_bytes = n * c * 2
    for inplace in (False, True):
        x = torch.randn(n, c, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
        t = torch.randint(0, c, (n,), device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        lf.cross_entropy(x, t, inplace_backward=inplace, backend=backend).backward()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        if not inplace:
            extra -= logits_bytes  # the returned gradient
        limit = 64 * n * 4 + 2**20 if inplace else logits_bytes // 100
        assert extra <= limit, f"inplace={inplace}: {extra} extra bytes > {limit}"
        del x, t
        torch.cuda.empty_cache()


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_gpu_cuda_graph_capture():
    backend = "cuda" if lf.available_backends()["cuda"].available else "triton"
    x = torch.randn(64, 1000, device="cuda", requires_grad=True)
    t = torch.randint(0, 1000, (64,), device="cuda")
    for _ in range(2):  # warm up (compilation, allocator) outside the capture
        lf.cross_entropy(x, t, backend=backend).backward()
    x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = lf.cross_entropy(x, t, backend=backend)
        loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    want = F.cross_entropy(x.detach(), t)
    torch.testing.assert_close(loss, want)


def test_opcheck_kernel_ops(kernel_backend):
    """Schema, fake tensor and functionalization of the raw kernel ops (not the maths: see above)."""
    device = device_for(kernel_backend)
    ops = torch.ops.lossforge
    x, t, w = make_inputs(4, 10, device=device)
    alpha = torch.rand(10, device=device)
    scale = torch.full((), 0.25, device=device)
    params = (-100, 0.1, 1e-3, 3.0, 2.0, 1.0)
    fwd = getattr(ops, f"cross_entropy_fwd_{kernel_backend}").default
    torch.library.opcheck(fwd, (x, t, w, alpha, scale, torch.empty_like(x), *params))
    torch.library.opcheck(fwd, (x, t, None, None, scale, None, *params))
    _, stats = fwd(x, t, w, alpha, scale, None, *params)
    bwd = getattr(ops, f"cross_entropy_bwd_{kernel_backend}").default
    torch.library.opcheck(bwd, (torch.rand(4, device=device), x, t, w, alpha, stats, torch.empty_like(x), *params))
    # the functional ops torch.compile sees, with their registered autograd
    xg = x.clone().requires_grad_(True)
    fused = getattr(ops, f"cross_entropy_fused_{kernel_backend}").default
    torch.library.opcheck(fused, (xg, t, w, alpha, torch.tensor(3.0, device=device), *params))
    rows = getattr(ops, f"cross_entropy_rows_{kernel_backend}").default
    torch.library.opcheck(rows, (xg, t, w, alpha, *params))
    bwd_grad = getattr(ops, f"cross_entropy_bwd_grad_{kernel_backend}").default
    torch.library.opcheck(bwd_grad, (torch.rand(4, device=device), x, t, w, alpha, stats, *params))
    scale_grad = getattr(ops, f"scale_grad_{kernel_backend}").default
    for first in (True, False):
        torch.library.opcheck(scale_grad, (torch.randn(4, 10, device=device), torch.tensor(0.5, device=device),
                                           torch.ones((), device=device), first))


def test_ignored_row_with_masked_class_has_zero_gradient(any_backend):
    device = device_for(any_backend)
    x = torch.randn(3, 8, device=device)
    x[1, 0] = float("-inf")  # the ignored row: nothing in it may leak into the gradient
    x.requires_grad_(True)
    t = torch.tensor([2, -100, 5], device=device)
    lf.cross_entropy(x, t, focal_gamma=0.5, label_smoothing=0.1, backend=any_backend).backward()
    assert torch.isfinite(x.grad).all() and torch.equal(x.grad[1], torch.zeros_like(x.grad[1]))
