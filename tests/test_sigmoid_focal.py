"""Sigmoid focal loss: reference vs torchvision's formula, kernels vs reference, bad input."""
import pytest
import torch
import torch.nn.functional as F

import lossforge_kernels as lf
from lossforge_kernels.ops import sigmoid_focal as sf_ops
from tests import harness
from tests.conftest import assert_close_rel, device_for
from tests.test_row_softmax import max_mode  # noqa: F401 (a fixture)

REDUCTIONS = ["none", "mean", "sum"]


def torchvision_formula(inputs, targets, alpha=0.25, gamma=2.0, reduction="none"):
    """torchvision.ops.sigmoid_focal_loss as documented (torchvision has no CPU wheel to test against here)."""
    p = torch.sigmoid(inputs)
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return {"none": loss, "mean": loss.mean() if loss.numel() else loss.sum() / 0, "sum": loss.sum()}[reduction]


def make(shape, dtype=torch.float64, device="cpu", soft=False):
    x = (torch.randn(shape) * 3).to(dtype).to(device)
    t = torch.rand(shape) if soft else (torch.rand(shape) < 0.3).double()
    return x, t.to(dtype).to(device)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 2.0), (0.5, 0.0), (0.25, 0.5), (0.9, 1.0)])
@pytest.mark.parametrize("soft", [False, True])
def test_reference_matches_torchvision_formula(reduction, alpha, gamma, soft):
    x, t = make((7, 13), soft=soft)
    got = lf.sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma, reduction=reduction, backend="reference")
    torch.testing.assert_close(got, torchvision_formula(x, t, alpha, gamma, reduction), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_reference_gradcheck_and_finite_extremes(gamma):
    x, t = make((4, 5), soft=True)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x_: lf.sigmoid_focal_loss(x_, t, gamma=gamma, reduction="sum"), (x,))
    big = torch.tensor([1000.0, -1000.0, 30.0, -30.0], requires_grad=True)
    lf.sigmoid_focal_loss(big, torch.tensor([1.0, 0.0, 1.0, 0.0]), gamma=gamma, reduction="sum").backward()
    assert torch.isfinite(big.grad).all()


def test_empty_and_dtype():
    e = torch.randn(0, 3)
    assert torch.isnan(lf.sigmoid_focal_loss(e, e, reduction="mean"))
    assert lf.sigmoid_focal_loss(e, e, reduction="sum") == 0
    x, t = make((3, 4), dtype=torch.bfloat16)
    assert lf.sigmoid_focal_loss(x, t).dtype == torch.bfloat16


def _ill_conditioned(x, t, gamma):
    """Elements whose gradient fp32 cannot give to 1e-6 of its size: soft targets make d loss / dx a
    difference, p - t + gamma ce r (r = p (1 - p)(1 - 2t) / (1 - p_t)), that cancels near the loss's
    minimum, so one fp32 ulp of p becomes a large relative error (8.7e-5 at p - t = 6.6e-5)."""
    x, t = x.double(), t.double()
    p = torch.sigmoid(x)
    m = p * (1 - t) + (1 - p) * t
    ce = torch.nn.functional.binary_cross_entropy_with_logits(x, t, reduction="none")
    curve = gamma * ce * p * (1 - p) * (1 - 2 * t) / m.clamp_min(1e-300)
    return (p + t + curve.abs()) > 30 * (p - t + curve).abs()


def test_ill_conditioned_flags_a_gradient_that_cancels():
    x = torch.tensor([2.2265, 0.0, -8.0])
    t = torch.sigmoid(x) + torch.tensor([6.6e-5, 0.4, 0.3])  # p - t: -6.6e-5, -0.4, -0.3
    assert _ill_conditioned(x, t, 0.0).tolist() == [True, False, False]


def make_sample(shape, opts, dtype, device, generator):
    """sigmoid_focal_loss's inputs; opts: alpha, gamma and `soft` (targets in [0, 1] rather than {0, 1}).
    Soft targets are redrawn where the gradient is ill-conditioned (_ill_conditioned)."""
    x = (torch.randn(shape, generator=generator) * 3).to(dtype)
    t = torch.rand(shape, generator=generator)
    if opts.pop("soft", False):
        t = t.to(dtype)
        for _ in range(50):
            bad = _ill_conditioned(x, t, opts.get("gamma", 2.0))
            if not bad.any():
                break
            x = torch.where(bad, (torch.randn(shape, generator=generator) * 3).to(dtype), x)
            t = torch.where(bad, torch.rand(shape, generator=generator).to(dtype), t)
        else:
            raise AssertionError("no well-conditioned soft sample in 50 draws")
    else:
        t = (t < 0.3).to(dtype)
    x, t = x.to(device), t.to(device)

    def call(ts, backend, reduction):
        return lf.sigmoid_focal_loss(ts["input"], ts["target"], reduction=reduction, backend=backend, **opts)

    return harness.Sample({"input": x, "target": t}, ("input",), call)


def _kernel_op_samples(device):
    x, t = make((6, 7), dtype=torch.float32, device=device)
    total, rows = torch.empty((), device=device), torch.empty_like(x)
    factor = torch.full((), 0.5, device=device)
    return [(sf_ops.FWD, (x, t, factor, total, torch.empty_like(x), 0.25, 2.0, True)),
            (sf_ops.FWD, (x, t, factor, rows, torch.empty_like(x), 0.25, 2.0, False)),
            (sf_ops.FWD, (x, t, None, rows, None, -1.0, 0.5, False)),
            (sf_ops.BWD, (torch.rand_like(x), x, t, torch.empty_like(x), 0.25, 2.0))]


def _op_inputs(device):
    x, t = make((6, 7), dtype=torch.float32, device=device)
    return (x, t), (0.25, 2.0)


SPEC = harness.KernelSpec(
    family="sigmoid_focal",
    make=make_sample,
    cases=tuple(dict(alpha=a, gamma=g, soft=soft) for a, g in [(0.25, 2.0), (-1.0, 0.0), (0.6, 0.5)]
                for soft in (False, True)),
    shapes=((1,), (37, 5), (3, 1000), (2, 3, 7)),
    fwd_kernel=sf_ops.FWD,
    fwd_exact=("full", sf_ops.FWD, "div"),  # the gradient factor, the kernel with its partial sums, a divide-and-cast
    launch_shape=(64, 80),
    op_inputs=_op_inputs,
    kernel_op_samples=_kernel_op_samples,
    kernels=sf_ops.sigmoid_focal_kernels,
    gaps=(("target", dict(soft=True)), ("target", dict(soft=True, only=True))),
)

test_kernel_matches_reference = harness.matches_reference(SPEC)
test_kernel_path_launches_few_ops_and_never_syncs = harness.launches(SPEC)
test_opcheck_kernel_ops = harness.opcheck(SPEC)
test_compile_fullgraph = harness.compile_fullgraph(SPEC)
test_retained_graph_backward_is_right_and_never_changes_a_returned_gradient = harness.retained_graph(SPEC)
test_double_backward_is_refused_loudly = harness.double_backward(SPEC)
test_gradients_the_kernels_do_not_compute = harness.gradient_gaps(SPEC)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_half_and_extremes(kernel_backend, dtype):
    device = device_for(kernel_backend)
    x, t = make((64, 80), dtype=dtype, device=device)
    x[0, :4] = torch.tensor([1000.0, -1000.0, 60.0, -60.0], dtype=dtype)
    for gamma in (0.0, 0.5, 2.0):
        xr = x.clone().requires_grad_(True)
        loss = lf.sigmoid_focal_loss(xr, t, gamma=gamma, reduction="mean", backend=kernel_backend)
        loss.backward()
        x64 = x.double().requires_grad_(True)
        want = lf.sigmoid_focal_loss(x64, t.double(), gamma=gamma, reduction="mean", backend="reference")
        want.backward()
        assert torch.isfinite(xr.grad).all()
        assert_close_rel(loss, want, 1e-2, "loss")
        assert_close_rel(xr.grad, x64.grad, 1e-2, "grad")


def test_kernel_deterministic_sum(kernel_backend):
    device = device_for(kernel_backend)
    x, t = make((300, 77), dtype=torch.float32, device=device)
    a = lf.sigmoid_focal_loss(x, t, reduction="sum", backend=kernel_backend)
    b = lf.sigmoid_focal_loss(x, t, reduction="sum", backend=kernel_backend)
    assert torch.equal(a, b)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_gradient_rescales_on_repeated_backward(kernel_backend, reduction):
    # The gradient is written in the forward and rescaled in place by each backward.
    device = device_for(kernel_backend)
    x, t = make((5, 33), dtype=torch.bfloat16, device=device)
    x.requires_grad_(True)
    loss = lf.sigmoid_focal_loss(x, t, reduction=reduction, backend=kernel_backend)
    assert loss.dtype == torch.bfloat16
    loss.backward(retain_graph=True)
    g1 = x.grad.float().clone()
    for go in (0.5, 3.0):
        x.grad = None
        loss.backward(torch.tensor(go, device=device, dtype=torch.bfloat16), retain_graph=True)
        torch.testing.assert_close(x.grad.float(), go * g1, rtol=1e-2, atol=0)


def test_module_and_bad_input():
    x, t = make((5, 3))
    torch.testing.assert_close(lf.SigmoidFocalLoss(alpha=0.3, gamma=1.0, reduction="sum")(x, t),
                               lf.sigmoid_focal_loss(x, t, alpha=0.3, gamma=1.0, reduction="sum"))
    with pytest.raises(ValueError, match="target must have the input's shape"):
        lf.sigmoid_focal_loss(x, t[:2])
    with pytest.raises(TypeError, match="target must be a floating-point"):
        lf.sigmoid_focal_loss(x, t.long())
    with pytest.raises(ValueError, match="gamma must be in"):
        lf.sigmoid_focal_loss(x, t, gamma=-0.5)
    with pytest.raises(ValueError, match="reduction must be one of"):
        lf.sigmoid_focal_loss(x, t, reduction="batchmean")
    with pytest.raises(TypeError, match="alpha must be a float"):
        lf.sigmoid_focal_loss(x, t, alpha=None)


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(gamma=-1.0), ValueError, "gamma must be in"),
    (dict(alpha=None), TypeError, "alpha must be a float"),
    (dict(alpha=float("inf")), ValueError, "alpha must be in .* and finite"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
])
def test_module_checks_its_arguments_at_construction(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        lf.SigmoidFocalLoss(**kwargs)


@pytest.mark.parametrize("alpha,gamma", [(-1.0, 0.0), (0.25, 2.0), (0.25, 0.5), (-1.0, 1.5), (0.5, 1.0)])
def test_kernel_nonfinite_inputs_give_torchs_nan_and_inf(kernel_backend, max_mode, alpha, gamma):
    # NaN, +inf and -inf logits against hard and soft targets: the loss of torch's
    # binary_cross_entropy_with_logits in torchvision's formula (inf for +inf below a target of 1,
    # NaN for -inf, as torch gives), the reference's gradient, for every reduction.
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([nan, inf, -inf] * 3 + [1.5, -2.0, 40.0, -40.0], dtype=torch.float64)
    t = torch.tensor([0.0] * 3 + [1.0] * 3 + [0.3] * 3 + [1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    rows = torchvision_formula(x, t, alpha, gamma)
    assert rows[:9].isnan().sum() == 7 and rows[[1, 7]].eq(inf).all()  # the inputs are what the test is about
    device = device_for(kernel_backend)
    for reduction in REDUCTIONS:
        xk = x.float().to(device).requires_grad_(True)
        loss = lf.sigmoid_focal_loss(xk, t.float().to(device), alpha=alpha, gamma=gamma, reduction=reduction,
                                     backend=kernel_backend)
        loss.sum().backward()
        x64 = x.clone().requires_grad_(True)
        want = lf.sigmoid_focal_loss(x64, t, alpha=alpha, gamma=gamma, reduction=reduction, backend="reference")
        want.sum().backward()
        torch.testing.assert_close(want, torchvision_formula(x, t, alpha, gamma, reduction), equal_nan=True)
        torch.testing.assert_close(loss.cpu().double(), want, rtol=1e-5, atol=1e-6, equal_nan=True, msg=reduction)
        torch.testing.assert_close(xk.grad.cpu().double(), x64.grad, rtol=1e-5, atol=1e-6, equal_nan=True,
                                   msg=reduction)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_cross_entropy_term_without_cancellation(kernel_backend, gamma):
    # x = -8, t = 0.002: torch's form (1 - t) x + max(-x, 0) subtracts 8.04 from 8.06 in fp32 (1e-5
    # relative error in the loss); -t x has no such step
    x = torch.tensor([-8.055130004882812, -30.0, 6.0, -3.0])
    t = torch.tensor([0.0020813345909118652, 1e-4, 0.999, 0.01])
    device = device_for(kernel_backend)
    got = lf.sigmoid_focal_loss(x.to(device), t.to(device), alpha=0.6, gamma=gamma, reduction="none",
                                backend=kernel_backend)
    want = lf.sigmoid_focal_loss(x.double(), t.double(), alpha=0.6, gamma=gamma, reduction="none", backend="reference")
    assert ((got.cpu().double() - want).abs() / want).max() < 1e-6, (got, want)
