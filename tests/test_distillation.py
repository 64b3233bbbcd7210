"""lf.distillation_loss and lf.linear_distillation_loss on every backend that has them, against the
float64 reference on the same (rounded) inputs: every divergence and reduction, temperatures, masks,
3-D inputs, half precision, large logits, NaN rows, the teacher's refusal and bad input."""
from __future__ import annotations

import math

import pytest
import torch

import lossforge_kernels as lf
from lossforge_kernels._backends import families
from lossforge_kernels.reference.distillation import DIVERGENCES, Divergence
from tests.conftest import assert_close_rel, device_for, family_fixtures
from tests.test_linear_cross_entropy import CreatedTensors

KERNELS, kernel, backend = family_fixtures("distillation")
REDUCTIONS = ("mean", "sum", "none")
HALF_TOL = {torch.float16: 4 * 2**-11, torch.bfloat16: 4 * 2**-8}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _mask(shape, classes, g, device):
    t = torch.randint(0, classes, shape, generator=g)
    t.view(-1)[1::3] = -100
    return t.to(device)


def _compare(fn, ref_fn, student, rest, tol, grad_tol=None, seed=0):
    """fn(*student, *rest) against ref_fn on float64 copies, with a random grad_output; `student` are
    the differentiated tensors."""
    leaves = [t.clone().requires_grad_() for t in student]
    wide = [t.detach().double().requires_grad_() for t in student]
    loss = fn(*leaves, *rest)
    want = ref_fn(*wide, *[t.double() if t is not None and t.is_floating_point() else t for t in rest])
    go = torch.rand(loss.shape, generator=_gen(seed)).to(loss.device) + 0.5
    grads = torch.autograd.grad(loss, leaves, go)
    want_grads = torch.autograd.grad(want, wide, go.double())
    assert loss.dtype == torch.float32 and loss.shape == want.shape
    assert_close_rel(loss, want, tol, "loss")
    for i, (g, w) in enumerate(zip(grads, want_grads)):
        assert g.dtype == student[i].dtype
        assert_close_rel(g, w, grad_tol or tol, f"gradient of student tensor {i}")


def _plain(backend, target, **opts):
    return lambda s, t: lf.distillation_loss(s, t, target, backend=backend, **opts)


def _linear(backend, target, **opts):
    def call(sx, sw, sb, tx, tw, tb):
        return lf.linear_distillation_loss(sx, sw, tx, tw, target, student_bias=sb, teacher_bias=tb, backend=backend,
                                           **opts)
    return call


def test_kernel_constants_are_the_divergence_enum():
    from lossforge_kernels.triton_kernels import distillation as kernels

    assert DIVERGENCES == ("kl", "reverse_kl", "jsd")
    for d in Divergence:
        assert getattr(kernels, d.name).value == d.value


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("temperature", (0.5, 1.0, 2.0))
def test_distillation_matches_the_float64_reference(backend, divergence, reduction, temperature, monkeypatch):
    monkeypatch.setenv("LOSSFORGE_TRITON_CHUNK", "16")  # rows of 37 cross two block edges
    device, g = device_for(backend), _gen(int(temperature * 4))
    s = (torch.randn(3, 4, 37, generator=g) * 2).to(device)
    t = (torch.randn(3, 4, 37, generator=g) * 2).to(device)
    target = _mask((3, 4), 37, g, device) if temperature != 1.0 else None  # with and without a mask
    opts = dict(divergence=divergence, beta=0.3, temperature=temperature, reduction=reduction)
    _compare(_plain(backend, target, **opts), _plain("reference", target, **opts), [s], [t], 1e-5)


@pytest.mark.parametrize("beta", (0.1, 0.5, 0.9))
def test_jsd_beta(kernel, beta):
    device, g = device_for(kernel), _gen(2)
    s, t = (torch.randn(2, 7, 50, generator=g) * 3).to(device), (torch.randn(2, 7, 50, generator=g) * 3).to(device)
    opts = dict(divergence="jsd", beta=beta)
    _compare(_plain(kernel, None, **opts), _plain("reference", None, **opts), [s], [t], 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_distillation_in_half_precision(kernel, dtype, divergence):
    device, g = device_for(kernel), _gen(3)
    s = (torch.randn(6, 300, generator=g) * 3).to(device, dtype)
    t = (torch.randn(6, 300, generator=g) * 3).to(device, dtype)
    opts = dict(divergence=divergence, temperature=2.0, reduction="sum")
    # the reference sees the same rounded logits; the kernels round only the gradient they store
    _compare(_plain(kernel, None, **opts), _plain("reference", None, **opts), [s], [t], 1e-5, HALF_TOL[dtype])


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_large_logits_keep_their_precision(backend, divergence):
    device, g = device_for(backend), _gen(5)
    s = torch.randn(6, 40, generator=g) * 3 + 1e4 * torch.randn(6, 1, generator=g).sign()  # |logits| ~ 1e4
    t = s + torch.randn(6, 40, generator=g) * 2
    opts = dict(divergence=divergence, temperature=2.0, reduction="none")
    _compare(_plain(backend, None, **opts), _plain("reference", None, **opts), [s.to(device)], [t.to(device)], 1e-5)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_nan_rows_as_torch_gives_them(backend, divergence):
    device, g = device_for(backend), _gen(6)
    s, t = torch.randn(4, 20, generator=g), torch.randn(4, 20, generator=g)
    s[0, 3] = float("nan")
    t[1, 5] = float("nan")
    s[2, 9] = float("inf")
    opts = dict(divergence=divergence, reduction="none")
    leaves = [s.to(device).requires_grad_()]
    loss = lf.distillation_loss(leaves[0], t.to(device), backend=backend, **opts)
    want = lf.distillation_loss(s.double(), t.double(), backend="reference", **opts)
    loss.sum().backward()
    assert torch.isnan(loss[:3]).all() and not torch.isnan(loss[3])
    assert_close_rel(loss, want, 1e-5, "loss")  # the NaN pattern must match too
    assert torch.isnan(leaves[0].grad[:3]).all() and not torch.isnan(leaves[0].grad[3]).any()


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_distillation_matches_the_float64_reference(backend, divergence, reduction):
    device, g = device_for(backend), _gen(7)
    sx, tx = torch.randn(2, 9, 16, generator=g).to(device), torch.randn(2, 9, 12, generator=g).to(device)
    sw, tw = (torch.randn(45, 16, generator=g) * 0.4).to(device), (torch.randn(45, 12, generator=g) * 0.4).to(device)
    sb, tb = torch.randn(45, generator=g).to(device), torch.randn(45, generator=g).to(device)
    target = _mask((2, 9), 45, g, device)
    opts = dict(divergence=divergence, temperature=2.0, reduction=reduction)
    kernel_opts = dict(opts, chunk_size=5) if backend != "reference" else opts
    _compare(lambda sx, sw, sb, *rest: _linear(backend, target, **kernel_opts)(sx, sw, sb, *rest),
             _linear("reference", target, **opts), [sx, sw, sb], [tx, tw, tb], 1e-5)


def test_linear_distillation_without_biases_or_target(kernel):
    device, g = device_for(kernel), _gen(8)
    sx, tx = torch.randn(11, 8, generator=g).to(device), torch.randn(11, 8, generator=g).to(device)
    sw, tw = torch.randn(30, 8, generator=g).to(device), torch.randn(30, 8, generator=g).to(device)
    opts = dict(divergence="reverse_kl")
    _compare(lambda sx, sw, tx, tw: lf.linear_distillation_loss(sx, sw, tx, tw, chunk_size=4, backend=kernel, **opts),
             lambda sx, sw, tx, tw: lf.linear_distillation_loss(sx, sw, tx, tw, backend="reference", **opts),
             [sx, sw], [tx, tw], 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_distillation_in_half_precision(kernel, dtype):
    device, g = device_for(kernel), _gen(9)
    sx, tx = torch.randn(20, 24, generator=g).to(device, dtype), torch.randn(20, 24, generator=g).to(device, dtype)
    sw = (torch.randn(70, 24, generator=g) * 0.3).to(device, dtype)
    tw = (torch.randn(70, 24, generator=g) * 0.3).to(device, dtype)
    opts = dict(divergence="jsd", reduction="sum")
    # the chunks' logits are rounded to the products' dtype before the kernel reads them
    _compare(lambda sx, sw: lf.linear_distillation_loss(sx, sw, tx, tw, chunk_size=8, backend=kernel, **opts),
             lambda sx, sw: lf.linear_distillation_loss(sx, sw, tx.double(), tw.double(), backend="reference", **opts),
             [sx, sw], [], 2 * HALF_TOL[dtype], 2 * HALF_TOL[dtype])


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_distillation_never_creates_the_full_logits(kernel, reduction):
    device, g = device_for(kernel), _gen(10)
    n, d, v, chunk = 96, 12, 70, 20
    sx = torch.randn(n, d, generator=g).to(device).requires_grad_()
    sw = torch.randn(v, d, generator=g).to(device).requires_grad_()
    tx, tw = torch.randn(n, d, generator=g).to(device), torch.randn(v, d, generator=g).to(device)
    with CreatedTensors() as created:
        loss = lf.linear_distillation_loss(sx, sw, tx, tw, _mask((n,), v, g, device), divergence="jsd",
                                           reduction=reduction, chunk_size=chunk, backend=kernel)
        loss.backward(torch.rand_like(loss) + 0.5)
    biggest = max(math.prod(shape) for _, shape in created.shapes)
    assert biggest < n * v, f"a tensor of {biggest} elements (N x V = {n * v}): {created.shapes}"
    assert max(math.prod(s) for _, s in created.shapes if s[-1:] == (v,)) <= chunk * v


def test_a_teacher_that_requires_grad_is_refused_by_name(backend):
    s, t = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5, requires_grad=True)
    with pytest.raises(ValueError, match="teacher_logits requires grad"):
        lf.distillation_loss(s, t, backend=backend)
    with torch.no_grad():  # no gradient is asked for: nothing is missing
        lf.distillation_loss(s, t, backend=backend)
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    for name in ("teacher_input", "teacher_weight", "teacher_bias"):
        tensors = dict(teacher_input=x.clone(), teacher_weight=w.clone(), teacher_bias=torch.randn(5))
        tensors[name].requires_grad_()
        with pytest.raises(ValueError, match=f"{name} requires grad"):
            lf.linear_distillation_loss(x.clone().requires_grad_(), w, tensors["teacher_input"],
                                        tensors["teacher_weight"], teacher_bias=tensors["teacher_bias"],
                                        backend=backend)


def test_masks_count_for_nothing_and_mean_averages_the_rest(kernel):
    device = device_for(kernel)
    s = torch.randn(4, 9, device=device, requires_grad=True)
    t = torch.randn(4, 9, device=device)
    target = torch.tensor([0, -100, 5, -100], device=device)
    rows = lf.distillation_loss(s, t, target, reduction="none", backend=kernel)
    mean = lf.distillation_loss(s, t, target, backend=kernel)
    assert rows[1] == 0 and rows[3] == 0
    assert torch.allclose(mean, rows.sum() / 2)
    mean.backward()
    assert (s.grad[1] == 0).all() and (s.grad[3] == 0).all() and (s.grad[0] != 0).any()


def test_modules_match_the_functions(kernel):
    device, g = device_for(kernel), _gen(13)
    sx, tx = torch.randn(6, 8, generator=g).to(device), torch.randn(6, 8, generator=g).to(device)
    sw, tw = torch.randn(30, 8, generator=g).to(device), torch.randn(30, 8, generator=g).to(device)
    opts = dict(divergence="jsd", beta=0.2, temperature=2.0, reduction="none", backend=kernel)
    assert torch.equal(lf.LinearDistillationLoss(chunk_size=4, **opts)(sx, sw, tx, tw),
                       lf.linear_distillation_loss(sx, sw, tx, tw, chunk_size=4, **opts))
    assert torch.equal(lf.DistillationLoss(**opts)(sx @ sw.T, tx @ tw.T), lf.distillation_loss(sx @ sw.T, tx @ tw.T,
                                                                                                 **opts))


def test_both_kernel_backends_have_the_family():
    assert families()["distillation"].backends == ("triton", "cuda")


@pytest.mark.parametrize("divergence", list(Divergence))
def test_kernel_ops_write_the_gradient_over_the_student_logits(kernel, divergence):
    """The contract allows grad to be the student's logits: each element is read before it is written."""
    from lossforge_kernels.ops import distillation as ops

    device, g = device_for(kernel), _gen(18)
    s, t = (torch.randn(5, 45, generator=g) * 3).to(device), (torch.randn(5, 45, generator=g) * 3).to(device)
    target = _mask((5,), 45, g, device)
    options = dict(divergence=int(divergence), beta=0.3, temperature=2.0, ignore_index=-100)
    factor = torch.tensor(0.5, device=device)
    loss, stats, apart = torch.empty(5, device=device), torch.empty(5, 5, device=device), torch.empty_like(s)
    ops.FWD[kernel](s, t, target, factor, loss, stats, apart, **options)
    in_place = s.clone()
    ops.FWD[kernel](in_place, t, target, factor, torch.empty_like(loss), torch.empty_like(stats), in_place, **options)
    assert torch.equal(in_place, apart)
    grad_rows = torch.randn(5, generator=g).to(device)
    ops.BWD[kernel](grad_rows, s, t, target, stats, apart, **options)
    in_place = s.clone()
    ops.BWD[kernel](grad_rows, in_place, t, target, stats, in_place, **options)
    assert torch.equal(in_place, apart)
    assert (apart[target == -100] == 0).all() and (apart[target != -100] != 0).any()


@pytest.mark.parametrize("backend", KERNELS)
def test_the_kernel_ops_refuse_heads_of_two_dtypes_by_name(backend):
    # the contract takes one dtype for both heads (the CUDA kernels read both rows in the same
    # 16-byte packets; the public functions take one dtype anyway): the contract check refuses
    # first on every backend, and the CUDA op's own check behind it
    from lossforge_kernels.ops import distillation as ops

    device = device_for(backend)
    s, t = torch.randn(2, 5, device=device), torch.randn(2, 5, device=device, dtype=torch.bfloat16)
    args = (s, t, None, None, torch.empty(2, device=device), torch.empty(2, 5, device=device), None)
    opts = dict(divergence=0, beta=0.5, temperature=1.0, ignore_index=-100)
    with pytest.raises(TypeError, match="teacher must have student's dtype torch.float32, got torch.bfloat16"):
        ops.FWD[backend](*args, **opts)
    if backend == "cuda":
        with pytest.raises(TypeError, match="teacher must have dtype"):
            ops.FWD.overloads["cuda"](*args, **opts)


S, T = torch.randn(3, 7), torch.randn(3, 7)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: lf.distillation_loss(S, T[:, :5]), ValueError, "teacher_logits must have student_logits' shape"),
    (lambda: lf.distillation_loss(S, T.double()), TypeError, "teacher_logits must have student_logits' dtype"),
    (lambda: lf.distillation_loss(S, T, torch.zeros(2, dtype=torch.long)), ValueError, "target must have shape"),
    (lambda: lf.distillation_loss(S, T, torch.zeros(3)), TypeError, "target must be an integer tensor"),
    (lambda: lf.distillation_loss(S, T, divergence="kld"), ValueError, "divergence must be one of"),
    (lambda: lf.distillation_loss(S, T, divergence="jsd", beta=1.0), ValueError, "beta must be in"),
    (lambda: lf.distillation_loss(S, T, temperature=-1.0), ValueError, "temperature"),
    (lambda: lf.distillation_loss(S, T, reduction="avg"), ValueError, "reduction"),
    (lambda: lf.distillation_loss(S.long(), T), TypeError, "student_logits must be a floating-point"),
    (lambda: lf.linear_distillation_loss(S, torch.randn(5, 7), S, torch.randn(6, 7)), ValueError,
     "teacher_input and teacher_weight must give"),
    (lambda: lf.linear_distillation_loss(S, torch.randn(5, 6), S, torch.randn(5, 7)), ValueError,
     "student_weight must have shape"),
    (lambda: lf.linear_distillation_loss(S, torch.randn(5, 7), S, torch.randn(5, 7), teacher_bias=torch.randn(4)),
     ValueError, "teacher_bias must have shape"),
    (lambda: lf.linear_distillation_loss(S, torch.randn(5, 7), S.double(), torch.randn(5, 7).double()), TypeError,
     "teacher_input must have student_input's dtype"),
    (lambda: lf.linear_distillation_loss(S, torch.randn(5, 7), S, torch.randn(5, 7), chunk_size=-2), ValueError,
     "chunk_size"),
])
def test_bad_input_is_refused_naming_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph_gives_the_eager_loss_and_gradients(kernel, reduction):
    device, g = device_for(kernel), _gen(14)
    sx, sw = torch.randn(6, 8, generator=g).to(device), torch.randn(33, 8, generator=g).to(device)
    tx, tw = torch.randn(6, 8, generator=g).to(device), torch.randn(33, 8, generator=g).to(device)
    target = _mask((6,), 33, g, device)

    def call(sx, sw):
        return lf.linear_distillation_loss(sx, sw, tx, tw, target, divergence="jsd", reduction=reduction, chunk_size=4,
                                           backend=kernel) + lf.distillation_loss(sx @ sw.T, tx @ tw.T, target,
                                                                                  reduction=reduction, backend=kernel)

    torch._dynamo.reset()
    results = []
    for fn in (call, torch.compile(call, fullgraph=True)):
        leaves = [sx.clone().requires_grad_(), sw.clone().requires_grad_()]
        loss = fn(*leaves)
        results.append((loss, *torch.autograd.grad(loss, leaves, torch.ones_like(loss))))
    for got, want in zip(results[1], results[0]):
        assert_close_rel(got, want, 1e-6, "under torch.compile")


def test_under_autocast_the_products_run_in_its_dtype_and_the_loss_is_float32(kernel):
    device, g = device_for(kernel), _gen(15)
    sx, sw = torch.randn(6, 16, generator=g).to(device), torch.randn(40, 16, generator=g).to(device)
    tx, tw = torch.randn(6, 16, generator=g).to(device), torch.randn(40, 16, generator=g).to(device)
    results = {}
    for backend in (kernel, "reference"):
        leaves = [sx.clone().requires_grad_(), sw.clone().requires_grad_()]
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = lf.linear_distillation_loss(*leaves, tx, tw, divergence="jsd", backend=backend)
        assert loss.dtype == torch.float32
        loss.backward()
        results[backend] = (loss, leaves[0].grad, leaves[1].grad)
    for got, want in zip(results[kernel], results["reference"]):
        # the kernels read chunks of logits rounded to bf16, the reference the float32 products of the same operands
        assert_close_rel(got, want, 2 * HALF_TOL[torch.bfloat16], "under autocast")


def test_opcheck_kernel_and_builder_ops(kernel):
    from lossforge_kernels.ops import distillation as ops

    device, g = device_for(kernel), _gen(16)
    s, t = torch.randn(5, 37, generator=g).to(device), torch.randn(5, 37, generator=g).to(device)
    target = _mask((5,), 37, g, device)
    loss, stats = torch.empty(5, device=device), torch.empty(5, 5, device=device)
    options = (int(Divergence.JSD), 0.3, 2.0, -100)
    factor = torch.tensor(0.5, device=device)
    torch.library.opcheck(ops.FWD.overloads[kernel], (s, t, target, factor, loss, stats, torch.empty_like(s), *options))
    ops.FWD[kernel](s, t, target, factor, loss, stats, torch.empty_like(s), *options)  # opcheck runs on copies
    grad_rows = torch.randn(5, generator=g).to(device)
    torch.library.opcheck(ops.BWD.overloads[kernel], (grad_rows, s, t, target, stats, torch.empty_like(s), *options))
    compiled = ops.distillation_kernels.compiled
    for mean in (True, False):
        torch.library.opcheck(compiled.fused.overloads[kernel], (s.clone().requires_grad_(), t, target, *options, mean,
                                                                 [True]))
    torch.library.opcheck(compiled.rows.overloads[kernel], (s.clone().requires_grad_(), t, target, *options))
    torch.library.opcheck(compiled.rows_grad.overloads[kernel], (grad_rows, s, t, target, stats, *options, [True]))
