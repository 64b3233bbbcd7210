"""The references of the RL and distillation heads (reference/log_probs.py, reference/distillation.py)
against float64 brute force: explicit exponentials and sums, loss and gradients, every option."""
import math

import pytest
import torch

from lossforge_kernels.reference import distillation as dist_ref
from lossforge_kernels.reference import log_probs as lp_ref

F64 = torch.float64


def brute_softmax(z):
    """softmax over the last dimension from explicit exponentials (float64, shifted by the max)."""
    e = torch.exp(z - z.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def brute_log_probs(z, target, ignore_index):
    p = brute_softmax(z)
    logp = torch.log(p)
    keep = target != ignore_index
    picked = torch.stack([logp[i, t] if k else z.new_zeros(()) for i, (t, k) in enumerate(zip(target.tolist(),
                                                                                            keep.tolist()))])
    entropy = torch.where(keep, -(p * logp).sum(-1), 0.0)
    return picked, entropy


def inputs(n=7, v=11, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * 3).to(dtype)
    target = torch.randint(0, v, (n,), generator=g)
    target[2] = -100
    return logits, target


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_log_probs_and_entropy_against_brute_force(temperature, dtype):
    logits, target = inputs(dtype=dtype)
    x = logits.clone().requires_grad_(True)
    got, got_h = lp_ref.log_probs(x, target, temperature=temperature, return_entropy=True)
    assert got.dtype == got_h.dtype == (F64 if dtype == F64 else torch.float32)
    x64 = logits.to(F64).requires_grad_(True)
    want, want_h = brute_log_probs(x64 / temperature, target, -100)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.to(F64), want, **tol)
    torch.testing.assert_close(got_h.to(F64), want_h, **tol)
    assert got[2] == 0 and got_h[2] == 0
    g = torch.Generator().manual_seed(5)
    go, go_h = torch.randn(got.shape, generator=g), torch.randn(got.shape, generator=g)
    (grad,) = torch.autograd.grad((got * go.to(got.dtype)).sum() + (got_h * go_h.to(got.dtype)).sum(), x)
    (want_grad,) = torch.autograd.grad((want * go.to(F64)).sum() + (want_h * go_h.to(F64)).sum(), x64)
    torch.testing.assert_close(grad.to(F64), want_grad, **tol)


def test_entropy_gradient_is_the_closed_form():
    # dH/dz_j = -p_j (log p_j + H): the form the kernels will use
    logits, target = inputs(dtype=F64)
    x = logits.clone().requires_grad_(True)
    _, h = lp_ref.log_probs(x, target, return_entropy=True)
    (grad,) = torch.autograd.grad(h.sum(), x)
    p = brute_softmax(logits)
    want = -p * (torch.log(p) + h.detach()[:, None])
    want[2] = 0
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-12)


def test_linear_log_probs_is_log_probs_of_the_head():
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(2, 5, 8, generator=g), torch.randn(13, 8, generator=g), torch.randn(13, generator=g)
    target = torch.randint(0, 13, (2, 5), generator=g)
    got = lp_ref.linear_log_probs(x, w, target, linear_bias=b, temperature=0.7, return_entropy=True)
    want = lp_ref.log_probs(x @ w.T + b, target, temperature=0.7, return_entropy=True)
    for a, e in zip(got, want):
        assert a.shape == (2, 5)
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_minus_inf_logits_and_nan_rows():
    # A -inf logit has p = 0 and adds nothing to the entropy (0 log 0 = 0); a NaN logit makes its row
    # NaN, as torch's log_softmax does.
    logits, target = inputs(dtype=F64)
    logits[0, :5] = float("-inf")
    target[0] = 7
    logits[1, 3] = float("nan")
    got, h = lp_ref.log_probs(logits, target, return_entropy=True)
    finite = logits[0, 5:]
    p = brute_softmax(finite)
    torch.testing.assert_close(got[0], torch.log(p)[7 - 5])
    torch.testing.assert_close(h[0], -(p * torch.log(p)).sum())
    assert torch.isnan(got[1]) and torch.isnan(h[1])


def test_distillation_keeps_nan_and_ignores_minus_inf():
    student, _ = inputs(seed=2, dtype=F64)
    teacher, _ = inputs(seed=3, dtype=F64)
    student[0, 1] = float("nan")
    teacher[1, :4] = float("-inf")  # p_t = 0 there: those classes add nothing to KL(p_t || p_s)
    for kind in dist_ref.DIVERGENCES:
        rows = dist_ref.distillation_loss(student, teacher, divergence=kind, reduction="none")
        assert torch.isnan(rows[0]) and torch.isfinite(rows[2:]).all(), kind
        # KL(p_s || p_t) is +inf where p_t = 0 and p_s > 0; the other two stay finite there
        assert rows[1] == float("inf") if kind == "reverse_kl" else torch.isfinite(rows[1]), kind
    kl = dist_ref.distillation_loss(student[1:2], teacher[1:2], divergence="kl", reduction="none")
    torch.testing.assert_close(kl[0], brute_divergence(student[1, 4:], teacher[1, 4:], "kl", 0.5)
                               + torch.logsumexp(student[1], -1) - torch.logsumexp(student[1, 4:], -1))


def brute_divergence(s, t, kind, beta):
    ps, pt = brute_softmax(s), brute_softmax(t)

    def kl(a, b):
        return torch.where(a > 0, a * (torch.log(a) - torch.log(b)), 0.0).sum(-1)

    if kind == "kl":
        return kl(pt, ps)
    if kind == "reverse_kl":
        return kl(ps, pt)
    m = beta * pt + (1 - beta) * ps
    return beta * kl(pt, m) + (1 - beta) * kl(ps, m)


@pytest.mark.parametrize("kind,beta", [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_distillation_against_brute_force(kind, beta, reduction, temperature):
    student, target = inputs(seed=2)
    teacher, _ = inputs(seed=3)
    s = student.clone().requires_grad_(True)
    t = teacher.clone().requires_grad_(True)
    got = dist_ref.distillation_loss(s, t, target, divergence=kind, beta=beta, temperature=temperature,
                                     reduction=reduction)
    s64 = student.to(F64).requires_grad_(True)
    rows = brute_divergence(s64 / temperature, teacher.to(F64) / temperature, kind, beta)
    keep = target != -100
    rows = torch.where(keep, rows, 0.0)
    want = rows if reduction == "none" else rows.sum() / (keep.sum() if reduction == "mean" else 1)
    torch.testing.assert_close(got.to(F64), want, rtol=1e-5, atol=1e-6)
    go = torch.rand(got.shape, generator=torch.Generator().manual_seed(4)) + 0.5
    (grad,) = torch.autograd.grad((got * go).sum(), s)
    (want_grad,) = torch.autograd.grad((want * go.to(F64)).sum(), s64)
    # logits up to about 20 (x3, / 0.5): fp32 rounding of O(20) terms that cancel
    torch.testing.assert_close(grad.to(F64), want_grad, rtol=1e-5, atol=1e-5)
    assert not torch.autograd.grad(got.sum(), t, allow_unused=True)[0] is not None  # no teacher gradient


def test_distillation_without_target_counts_every_position_and_linear_form_matches():
    g = torch.Generator().manual_seed(6)
    xs, ws, xt, wt = (torch.randn(2, 3, 8, generator=g), torch.randn(9, 8, generator=g),
                      torch.randn(2, 3, 6, generator=g), torch.randn(9, 6, generator=g))
    got = dist_ref.linear_distillation_loss(xs, ws, xt, wt, divergence="jsd", temperature=1.5)
    rows = brute_divergence((xs @ ws.T).to(F64) / 1.5, (xt @ wt.T).to(F64) / 1.5, "jsd", 0.5)
    torch.testing.assert_close(got.to(F64), rows.mean(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="divergence must be one of"):
        dist_ref.distillation_loss(xs, xs, divergence="js")
    assert math.isclose(float(dist_ref.distillation_loss(xs @ ws.T, xs @ ws.T)), 0.0, abs_tol=1e-6)


def test_minus_inf_logits_get_a_zero_gradient_and_leave_the_row_alone():
    # autograd through p log p at p = 0 must give 0, not 0 * -inf = NaN (which log_softmax's backward
    # spreads over the whole row)
    logits, target = inputs(dtype=F64)
    logits[0, :5] = float("-inf")
    target[0] = 7
    go = torch.randn(2, len(target), generator=torch.Generator().manual_seed(1), dtype=F64)
    full = logits.clone().requires_grad_()
    logp, h = lp_ref.log_probs(full, target, temperature=2.0, return_entropy=True)
    (logp * go[0] + h * go[1]).sum().backward()
    rest = logits[:1, 5:].clone().requires_grad_()
    logp, h = lp_ref.log_probs(rest, target[:1] - 5, temperature=2.0, return_entropy=True)
    (logp * go[0, 0] + h * go[1, 0]).sum().backward()
    assert (full.grad[0, :5] == 0).all()
    torch.testing.assert_close(full.grad[0, 5:], rest.grad[0])
    assert torch.isfinite(full.grad).all()


@pytest.mark.parametrize("kind", dist_ref.DIVERGENCES)
def test_distillation_gives_minus_inf_student_logits_a_zero_gradient(kind):
    student, _ = inputs(seed=2, dtype=F64)
    teacher, _ = inputs(seed=3, dtype=F64)
    student[0, :4] = teacher[0, :4] = float("-inf")  # classes masked in both heads
    full = student.clone().requires_grad_()
    dist_ref.distillation_loss(full, teacher, divergence=kind, beta=0.3, reduction="sum").backward()
    rest = student[:1, 4:].clone().requires_grad_()
    dist_ref.distillation_loss(rest, teacher[:1, 4:], divergence=kind, beta=0.3, reduction="sum").backward()
    assert (full.grad[0, :4] == 0).all(), kind
    torch.testing.assert_close(full.grad[0, 4:], rest.grad[0])
    assert torch.isfinite(full.grad).all(), kind
