"""Linear cross-entropy: the reference against torch's formula, the kernel path, bad input, the module."""
import pytest
import torch
import torch.nn.functional as F

import lossforge_kernels as lf
from tests.conftest import assert_close_rel, device_for

REDUCTIONS = ["none", "mean", "sum"]


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




def test_linear_cross_entropy_bad_tensors_raise():
    t = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="linear_weight must have shape"):
        lf.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 3), t)
    with pytest.raises(ValueError, match="linear_bias must have shape"):
        lf.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), t, linear_bias=torch.randn(4))
    with pytest.raises(ValueError, match="target must have shape"):
        lf.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), t[:1])
    with pytest.raises(TypeError, match="target must be an integer tensor"):
        lf.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), t.float())
    with pytest.raises(ValueError, match="weight must have one entry per class"):
        lf.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), t, weight=torch.ones(4))
    with pytest.raises(IndexError, match="class index 5, out of range"):
        lf.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        lf.LinearCrossEntropyLoss(label_smoothing=-1.0)


def test_linear_cross_entropy_module_matches_function():
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, 9, (6,), generator=g)
    inp, wt = torch.randn(6, 4, dtype=torch.float64, generator=g), torch.randn(9, 4, dtype=torch.float64, generator=g)
    torch.testing.assert_close(lf.LinearCrossEntropyLoss(reduction="sum")(inp, wt, t),
                               lf.linear_cross_entropy(inp, wt, t, reduction="sum"))


def test_linear_cross_entropy_kernel_path_routes_weight_gradients(kernel_backend, monkeypatch):
    # Class weights that require grad: the kernels do not compute that gradient, so an explicit
    # kernel backend refuses and a preference for it takes the reference.
    device = device_for(kernel_backend)
    inp = torch.randn(5, 8, device=device, requires_grad=True)
    wt = torch.randn(12, 8, device=device, requires_grad=True)
    cw = (torch.rand(12, device=device) + 0.5).requires_grad_(True)
    t = torch.randint(0, 12, (5,), device=device)
    with pytest.raises(lf.BackendUnavailableError, match="weight requires grad"):
        lf.linear_cross_entropy(inp, wt, t, weight=cw, label_smoothing=0.1, backend=kernel_backend)
    monkeypatch.setenv("LOSSFORGE_BACKEND", kernel_backend)
    loss = lf.linear_cross_entropy(inp, wt, t, weight=cw, label_smoothing=0.1)
    grads = torch.autograd.grad(loss, (inp, wt, cw))
    want = lf.linear_cross_entropy(inp, wt, t, weight=cw, label_smoothing=0.1, backend="reference")
    for g, w in zip(grads, torch.autograd.grad(want, (inp, wt, cw))):
        assert_close_rel(g, w, 1e-6, "gradient")
