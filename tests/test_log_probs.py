"""lf.log_probs and lf.linear_log_probs (per-token log-probabilities and entropy) on every backend
that has them, against the float64 reference on the same (rounded) inputs, with random grad_outputs
on both results at once."""
from __future__ import annotations

import math

import pytest
import torch

import lossforge_kernels as lf
from lossforge_kernels._backends import families
from tests.conftest import assert_close_rel, device_for, kernel_backends
from tests.test_linear_cross_entropy import CreatedTensors

KERNELS = [b for b in kernel_backends() if b in families()["log_probs"].backends]
BACKENDS = ["reference"] + KERNELS
TEMPERATURES = (0.5, 1.0, 2.0)
HALF_TOL = {torch.float16: 4 * 2**-11, torch.bfloat16: 4 * 2**-8}


@pytest.fixture(params=KERNELS or [pytest.param("none", marks=pytest.mark.skip(reason="no log_probs kernel here"))])
def kernel(request):
    return request.param


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _targets(shape, classes, g, device, ignored=True):
    t = torch.randint(0, classes, shape, generator=g)
    if ignored:
        t.view(-1)[::4] = -100
    return t.to(device)


def _grad_outputs(shape, g, device):
    return torch.randn(shape, generator=g).to(device), torch.randn(shape, generator=g).to(device)


def _pair(out, return_entropy):
    return out if return_entropy else (out, None)


def _run(fn, leaves, go, return_entropy):
    """Both results and the gradients of sum(go_logp * logp + go_ent * entropy) w.r.t. the leaves."""
    logp, ent = _pair(fn(*leaves), return_entropy)
    total = (logp * go[0]).sum() + (0.0 if ent is None else (ent * go[1]).sum())
    return logp, ent, torch.autograd.grad(total, leaves)


def _compare(fn, ref_fn, tensors, go, return_entropy, tol, grad_tol=None):
    """fn on the tensors against ref_fn on float64 copies of them."""
    leaves = [t.clone().requires_grad_() for t in tensors]
    wide = [t.detach().double().requires_grad_() for t in tensors]
    logp, ent, grads = _run(fn, leaves, go, return_entropy)
    want_logp, want_ent, want_grads = _run(ref_fn, wide, tuple(g.double() for g in go), return_entropy)
    assert logp.dtype == torch.float32 and logp.shape == go[0].shape
    assert_close_rel(logp, want_logp, tol, "log_probs")
    if return_entropy:
        assert ent.dtype == torch.float32 and ent.shape == go[0].shape
        assert_close_rel(ent, want_ent, tol, "entropy")
    for i, (g, w) in enumerate(zip(grads, want_grads)):
        assert g.dtype == tensors[i].dtype
        assert_close_rel(g, w, grad_tol or tol, f"gradient of tensor {i}")


def _log_probs(backend, target, **options):
    return lambda logits: lf.log_probs(logits, target, backend=backend, **options)


def _linear(backend, target, **options):
    return lambda x, w, *b: lf.linear_log_probs(x, w, target, linear_bias=b[0] if b else None, backend=backend,
                                                **options)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("return_entropy", [True, False])
@pytest.mark.parametrize("shape", [(3, 4, 37), (9, 5)], ids=["3d", "2d"])
def test_log_probs_match_the_float64_reference(backend, temperature, return_entropy, shape, monkeypatch):
    monkeypatch.setenv("LOSSFORGE_TRITON_CHUNK", "16")  # rows of 37 cross two block edges
    device, g = device_for(backend), _gen(len(shape) * 10 + int(temperature * 4))
    logits = (torch.randn(shape, generator=g) * 3).to(device)
    target = _targets(shape[:-1], shape[-1], g, device)
    go = _grad_outputs(shape[:-1], g, device)
    opts = dict(temperature=temperature, return_entropy=return_entropy)
    _compare(_log_probs(backend, target, **opts), _log_probs("reference", target, **opts), [logits], go,
             return_entropy, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_log_probs_in_half_precision(kernel, dtype):
    device, g = device_for(kernel), _gen(3)
    logits = (torch.randn(6, 300, generator=g) * 4).to(device, dtype)
    target = _targets((6,), 300, g, device)
    go = _grad_outputs((6,), g, device)
    opts = dict(temperature=0.5, return_entropy=True)
    # the reference sees the same rounded logits; the kernels round only the gradient they store
    _compare(_log_probs(kernel, target, **opts), _log_probs("reference", target, **opts), [logits], go, True,
             1e-5, HALF_TOL[dtype])


def test_large_logits_keep_their_precision(backend):
    device, g = device_for(backend), _gen(5)
    logits = (torch.randn(8, 50, generator=g) * 1e4).to(device)
    logits[:, 3] = logits.max(dim=1).values - 1.0  # rows with two near-equal leaders: entropy ~ 0.3, not 0
    target = _targets((8,), 50, g, device)
    go = _grad_outputs((8,), g, device)
    opts = dict(temperature=2.0, return_entropy=True)
    _compare(_log_probs(backend, target, **opts), _log_probs("reference", target, **opts), [logits], go, True, 1e-5)


def test_nan_rows_as_torch_gives_them(backend):
    device, g = device_for(backend), _gen(6)
    logits = torch.randn(5, 20, generator=g)
    logits[0, 4] = float("nan")
    logits[1, 7] = float("inf")
    logits[2] = float("-inf")
    logits[3, :10] = float("-inf")  # legal: masked classes (the target is not one of them)
    logits = logits.to(device)
    target = torch.tensor([1, 2, 3, 15, 8], device=device)
    go = _grad_outputs((5,), g, device)
    opts = dict(return_entropy=True)
    leaves = [logits.clone().requires_grad_()]
    logp, ent, (grad,) = _run(_log_probs(backend, target, **opts), leaves, go, True)
    want_logp, want_ent, (want_grad,) = _run(_log_probs("reference", target, **opts),
                                             [logits.double().requires_grad_()], tuple(x.double() for x in go), True)
    assert torch.isnan(logp[:3]).all() and torch.isnan(ent[:3]).all() and torch.isnan(grad[:3]).all()
    assert_close_rel(logp, want_logp, 1e-5, "log_probs")  # the NaN pattern must match too
    assert_close_rel(ent, want_ent, 1e-5, "entropy")
    assert_close_rel(grad[[0, 1, 2, 4]], want_grad[[0, 1, 2, 4]], 1e-5, "gradient")
    # -inf logits get a 0 gradient, and the others that of the row without them
    assert (grad[3, :10] == 0).all()
    rest = logits[3:4, 10:].double().requires_grad_()
    rest_logp, rest_ent = lf.log_probs(rest, target[3:4] - 10, return_entropy=True, backend="reference")
    (rest_logp * go[0][3].double() + rest_ent * go[1][3].double()).sum().backward()
    assert_close_rel(grad[3, 10:], rest.grad[0], 1e-5, "gradient beside -inf logits")


def test_gradient_of_one_result_only(kernel):
    device, g = device_for(kernel), _gen(8)
    logits = torch.randn(4, 3, 29, generator=g).to(device)
    target = _targets((4, 3), 29, g, device)
    for pick in (0, 1):
        leaves = [logits.clone().requires_grad_() for _ in range(2)]
        got = lf.log_probs(leaves[0], target, return_entropy=True, backend=kernel)[pick]
        want = lf.log_probs(leaves[1].double(), target, return_entropy=True, backend="reference")[pick]
        got.sum().backward()
        want.sum().backward()
        assert_close_rel(leaves[0].grad, leaves[1].grad, 1e-5, f"gradient of result {pick} alone")


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_log_probs_match_the_float64_reference(backend, temperature, bias):
    device, g = device_for(backend), _gen(int(temperature * 4) + bias)
    x = torch.randn(2, 9, 16, generator=g).to(device)
    tensors = [x, (torch.randn(45, 16, generator=g) * 0.4).to(device)]
    if bias:
        tensors.append(torch.randn(45, generator=g).to(device))
    target = _targets((2, 9), 45, g, device)
    go = _grad_outputs((2, 9), g, device)
    opts = dict(temperature=temperature, return_entropy=True)
    _compare(_linear(backend, target, chunk_size=5, **opts), _linear("reference", target, **opts), tensors, go,
             True, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_log_probs_in_half_precision(kernel, dtype):
    device, g = device_for(kernel), _gen(11)
    tensors = [torch.randn(20, 24, generator=g).to(device, dtype),
               (torch.randn(70, 24, generator=g) * 0.3).to(device, dtype), torch.randn(70, generator=g).to(device, dtype)]
    target = _targets((20,), 70, g, device)
    go = _grad_outputs((20,), g, device)
    opts = dict(temperature=1.0, return_entropy=True)
    # the logits of a chunk are rounded to the products' dtype before the kernel reads them
    _compare(_linear(kernel, target, chunk_size=8, **opts), _linear("reference", target, **opts), tensors, go, True,
             HALF_TOL[dtype], 2 * HALF_TOL[dtype])


def test_linear_log_probs_never_create_the_full_logits(kernel):
    device, g = device_for(kernel), _gen(12)
    n, d, v, chunk = 96, 12, 70, 20
    x = torch.randn(n, d, generator=g).to(device).requires_grad_()
    w = torch.randn(v, d, generator=g).to(device).requires_grad_()
    b = torch.randn(v, generator=g).to(device).requires_grad_()
    t = _targets((n,), v, g, device)
    with CreatedTensors() as created:
        logp, ent = lf.linear_log_probs(x, w, t, linear_bias=b, return_entropy=True, chunk_size=chunk, backend=kernel)
        (logp * torch.rand_like(logp) + ent * torch.rand_like(ent)).sum().backward()
    biggest = max(math.prod(shape) for _, shape in created.shapes)
    assert biggest < n * v, f"a tensor of {biggest} elements (N x V = {n * v}): {created.shapes}"
    assert max(math.prod(s) for _, s in created.shapes if s[-1:] == (v,)) <= chunk * v


def test_modules_match_the_functions(kernel):
    device, g = device_for(kernel), _gen(13)
    x, w = torch.randn(6, 8, generator=g).to(device), torch.randn(30, 8, generator=g).to(device)
    t = _targets((6,), 30, g, device)
    opts = dict(temperature=2.0, return_entropy=True, ignore_index=-100, backend=kernel)
    # the same chunks on both sides: another row blocking may move the products by an ulp
    for got, want in zip(lf.LinearLogProbs(chunk_size=4, **opts)(x, w, t),
                         lf.linear_log_probs(x, w, t, chunk_size=4, **opts)):
        assert torch.equal(got, want)
    logits = x @ w.T
    for got, want in zip(lf.LogProbs(**opts)(logits, t), lf.log_probs(logits, t, **opts)):
        assert torch.equal(got, want)


def test_ignore_index_gives_zero_results_and_gradient(kernel):
    device = device_for(kernel)
    logits = torch.randn(4, 11, device=device, requires_grad=True)
    target = torch.tensor([3, 7, 3, 0], device=device)
    logp, ent = lf.log_probs(logits, target, ignore_index=3, return_entropy=True, backend=kernel)
    (logp.sum() + ent.sum()).backward()
    assert logp[0] == 0 and ent[0] == 0 and logp[2] == 0 and ent[2] == 0
    assert (logits.grad[0] == 0).all() and (logits.grad[2] == 0).all() and (logits.grad[1] != 0).any()


def test_both_kernel_backends_have_the_family():
    assert families()["log_probs"].backends == ("triton", "cuda")


def test_kernel_ops_keep_the_row_contract(kernel):
    """Out-of-range targets give NaN rows, ignored rows 0, and the backward may write over the logits."""
    from lossforge_kernels.ops import log_probs as ops

    device, g = device_for(kernel), _gen(17)
    logits = (torch.randn(6, 45, generator=g) * 3).to(device)
    target = torch.tensor([3, -100, 45, -1, 44, 0], device=device)
    out, stats = torch.empty(6, 2, device=device), torch.empty(6, 3, device=device)
    ops.FWD[kernel](logits, target, out, stats, ignore_index=-100, temperature=0.5)
    assert (out[1] == 0).all() and (stats[1] == 0).all()
    assert torch.isnan(out[2:4]).all() and torch.isnan(stats[2:4]).all()
    kept = [0, 4, 5]
    want_logp, want_ent = lf.log_probs(logits[kept].double(), target[kept], temperature=0.5, return_entropy=True,
                                       backend="reference")
    assert_close_rel(out[kept, 0], want_logp, 1e-5, "log_probs")
    assert_close_rel(out[kept, 1], want_ent, 1e-5, "entropy")
    grad_rows = torch.randn(6, 2, generator=g).to(device)
    apart = torch.empty_like(logits)
    ops.BWD[kernel](grad_rows, logits, target, stats, apart, ignore_index=-100, temperature=0.5)
    in_place = logits.clone()
    ops.BWD[kernel](grad_rows, in_place, target, stats, in_place, ignore_index=-100, temperature=0.5)
    torch.testing.assert_close(in_place, apart, rtol=0, atol=0, equal_nan=True)
    assert (apart[1] == 0).all() and torch.isnan(apart[2:4]).all() and torch.isfinite(apart[kept]).all()


@pytest.mark.parametrize("call, exc, match", [
    (lambda l, t: lf.log_probs(l, t.float()), TypeError, "target must be an integer tensor"),
    (lambda l, t: lf.log_probs(l, t[:1]), ValueError, "target must have shape"),
    (lambda l, t: lf.log_probs(l, t, temperature=0.0), ValueError, "temperature"),
    (lambda l, t: lf.log_probs(l, t, temperature=float("inf")), ValueError, "temperature"),
    (lambda l, t: lf.log_probs(l, t, return_entropy=1), TypeError, "return_entropy"),
    (lambda l, t: lf.log_probs(l, t, ignore_index=1.5), TypeError, "ignore_index"),
    (lambda l, t: lf.log_probs(l, t, backend="gpu"), ValueError, "backend"),
    (lambda l, t: lf.log_probs(l.long(), t), TypeError, "logits must be a floating-point"),
    (lambda l, t: lf.log_probs(l, t + 100), IndexError, "out of range"),
    (lambda l, t: lf.linear_log_probs(l, torch.randn(5, 4), t), ValueError, "linear_weight must have shape"),
    (lambda l, t: lf.linear_log_probs(l, torch.randn(5, 7), t, linear_bias=torch.randn(4)), ValueError,
     "linear_bias must have shape"),
    (lambda l, t: lf.linear_log_probs(l, torch.randn(5, 7).double(), t), TypeError, "linear_weight must have"),
    (lambda l, t: lf.linear_log_probs(l, torch.randn(5, 7), t, chunk_size=0), ValueError, "chunk_size"),
])
def test_bad_input_is_refused_naming_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call(torch.randn(3, 7), torch.tensor([0, 1, 2]))


def test_compile_fullgraph_gives_the_eager_results_and_gradients(kernel):
    device, g = device_for(kernel), _gen(14)
    x, w = torch.randn(6, 8, generator=g).to(device), torch.randn(33, 8, generator=g).to(device)
    t = _targets((6,), 33, g, device)
    go = _grad_outputs((6,), g, device)
    calls = {"log_probs": (lambda x, w: lf.log_probs(x @ w.T, t, return_entropy=True, temperature=2.0, backend=kernel)),
             "linear_log_probs": (lambda x, w: lf.linear_log_probs(x, w, t, return_entropy=True, chunk_size=4,
                                                                   backend=kernel))}
    for name, call in calls.items():
        torch._dynamo.reset()
        eager = _run(call, [x.clone().requires_grad_(), w.clone().requires_grad_()], go, True)
        compiled = _run(torch.compile(call, fullgraph=True), [x.clone().requires_grad_(), w.clone().requires_grad_()],
                        go, True)
        for got, want in zip((compiled[0], compiled[1], *compiled[2]), (eager[0], eager[1], *eager[2])):
            assert_close_rel(got, want, 1e-6, f"{name} under torch.compile")


def test_under_autocast_the_products_run_in_its_dtype_and_the_results_are_float32(kernel):
    device, g = device_for(kernel), _gen(15)
    x, w = torch.randn(6, 16, generator=g).to(device), torch.randn(40, 16, generator=g).to(device)
    t = _targets((6,), 40, g, device)
    results = {}
    for backend in (kernel, "reference"):
        leaves = [x.clone().requires_grad_(), w.clone().requires_grad_()]
        with torch.autocast(device, dtype=torch.bfloat16):
            logp, ent = lf.linear_log_probs(*leaves, t, return_entropy=True, backend=backend)
        assert logp.dtype == ent.dtype == torch.float32
        (logp.sum() + ent.sum()).backward()
        results[backend] = (logp, ent, leaves[0].grad, leaves[1].grad)
    for got, want in zip(results[kernel], results["reference"]):
        # the kernels read a chunk of logits rounded to bf16, the reference the float32 product of the same operands
        assert_close_rel(got, want, 2 * HALF_TOL[torch.bfloat16], "under autocast")


def test_opcheck_kernel_and_builder_ops(kernel):
    from lossforge_kernels.ops import log_probs as ops

    device, g = device_for(kernel), _gen(16)
    logits = torch.randn(5, 37, generator=g).to(device)
    target = _targets((5,), 37, g, device)
    out, stats = torch.empty(5, 2, device=device), torch.empty(5, 3, device=device)
    options = (-100, 0.5)
    torch.library.opcheck(ops.FWD.overloads[kernel], (logits, target, out, stats, *options))
    ops.FWD[kernel](logits, target, out, stats, *options)  # opcheck runs on copies: the stats the backward reads
    grad_rows = torch.randn(5, 2, generator=g).to(device)
    torch.library.opcheck(ops.BWD.overloads[kernel], (grad_rows, logits, target, stats, torch.empty_like(logits),
                                                      *options))
    compiled = ops.log_probs_kernels.compiled
    torch.library.opcheck(compiled.rows.overloads[kernel], (logits.clone().requires_grad_(), target, *options))
    torch.library.opcheck(compiled.rows_grad.overloads[kernel], (grad_rows, logits, target, stats, *options, [True]))
