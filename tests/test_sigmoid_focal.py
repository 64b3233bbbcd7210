"""Sigmoid focal loss: reference vs torchvision's formula, kernels vs reference, bad input."""
import pytest
import torch
import torch.nn.functional as F

import lossforge_kernels as lf
from tests.conftest import assert_close_rel, device_for

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


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 0.0), (0.6, 0.5)])
@pytest.mark.parametrize("soft", [False, True])
def test_kernel_matches_reference(kernel_backend, reduction, alpha, gamma, soft):
    device = device_for(kernel_backend)
    for shape in [(1,), (37, 5), (3, 1000), (2, 3, 7)]:
        x, t = make(shape, dtype=torch.float32, device=device, soft=soft)
        x.requires_grad_(True)
        x64 = x.detach().double().requires_grad_(True)
        loss = lf.sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma, reduction=reduction, backend=kernel_backend)
        want = lf.sigmoid_focal_loss(x64, t.double(), alpha=alpha, gamma=gamma, reduction=reduction,
                                     backend="reference")
        g = torch.rand_like(want) + 0.5
        loss.backward(g.float())
        want.backward(g)
        assert loss.shape == want.shape and loss.dtype == torch.float32
        assert_close_rel(loss, want, 1e-5, f"loss {shape}")
        assert_close_rel(x.grad, x64.grad, 1e-5, f"grad {shape}")


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


def test_kernel_path_launches_few_ops_and_never_syncs(kernel_backend):
    # One eager fwd+bwd of the 'mean' loss: the kernel and one op for the loss's division and cast;
    # autograd's grad_output and the scale check. Nothing reads a value back to the host.
    from tests.conftest import HOST_SYNC_OPS, LaunchLog
    device = device_for(kernel_backend)
    x, t = make((64, 80), dtype=torch.bfloat16, device=device)
    x.requires_grad_(True)
    with LaunchLog() as fwd:
        loss = lf.sigmoid_focal_loss(x, t, reduction="mean", backend=kernel_backend)
    with LaunchLog() as bwd:
        loss.backward()
    assert not HOST_SYNC_OPS & set(fwd.ops + bwd.ops), (fwd.ops, bwd.ops)
    assert fwd.ops == [f"sigmoid_focal_fwd_{kernel_backend}", "div"], fwd.ops
    assert bwd.ops.count(f"scale_grad_{kernel_backend}") == 1 and len(bwd.ops) <= 2, bwd.ops


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


def test_opcheck_kernel_ops(kernel_backend):
    device = device_for(kernel_backend)
    ops = torch.ops.lossforge
    x, t = make((6, 7), dtype=torch.float32, device=device)
    scale = 0.5
    fwd = getattr(ops, f"sigmoid_focal_fwd_{kernel_backend}").default
    for reduce in (True, False):
        torch.library.opcheck(fwd, (x, t, scale, torch.empty_like(x), 0.25, 2.0, reduce))
    torch.library.opcheck(fwd, (x, t, scale, None, -1.0, 0.5, False))
    bwd = getattr(ops, f"sigmoid_focal_bwd_{kernel_backend}").default
    torch.library.opcheck(bwd, (torch.rand_like(x), x, t, torch.empty_like(x), 0.25, 2.0))
    # the functional ops torch.compile sees, with their registered autograd
    xg = x.clone().requires_grad_(True)
    for mean in (True, False):
        torch.library.opcheck(getattr(ops, f"sigmoid_focal_fused_{kernel_backend}").default,
                              (xg, t, 0.25, 2.0, mean))
    torch.library.opcheck(getattr(ops, f"sigmoid_focal_elementwise_{kernel_backend}").default,
                          (xg, t, 0.25, 2.0))
    torch.library.opcheck(getattr(ops, f"sigmoid_focal_bwd_grad_{kernel_backend}").default,
                          (torch.rand_like(x), x, t, 0.25, 2.0))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph(any_backend, reduction):
    device = device_for(any_backend)
    torch._dynamo.reset()  # each case compiles the same code object: stay clear of the recompile limit
    x, t = make((6, 7), dtype=torch.float32, device=device)
    x.requires_grad_(True)
    go = torch.rand(6, 7, device=device) + 0.5 if reduction == "none" else torch.tensor(3.0, device=device)

    def step(x_, t_):
        return lf.sigmoid_focal_loss(x_, t_, reduction=reduction, backend=any_backend) * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    loss = compiled(x, t)
    loss.backward(go)
    g = x.grad.clone()
    x.grad = None
    want = step(x, t)
    want.backward(go)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(g, x.grad)
