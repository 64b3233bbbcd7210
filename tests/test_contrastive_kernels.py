"""Fused contrastive kernels (InfoNCE / CLIP, SupCon, SigLIP) through the public API, against the references.

The kernel ops' own contract (stats, per-row partials, odd tiles) is tested in
tests/test_contrastive_triton_ops.py; here the three losses as users call them: every option and
reduction against the float64 reference, half precision, launches, opcheck, torch.compile, retained
graphs, double backward, bad input, and that no (B, M) tensor is ever created.
"""
import dataclasses
import math

import pytest
import torch

import lossforge_kernels as lf
from lossforge_kernels.ops import contrastive as cops
from lossforge_kernels.reference import contrastive as reference
from lossforge_kernels.reference.contrastive import Kind
from tests import harness
from tests.conftest import assert_close_rel, device_for, kernel_backends
from tests.test_contrastive_triton_ops import SENTINEL, Case, dense_expected, dense_loss, make_inputs
from tests.test_linear_cross_entropy import CreatedTensors

REDUCTIONS = ("none", "mean", "sum")


def _rows(shape, generator, scale=1.0):
    return torch.randn(shape, generator=generator, dtype=torch.float64) * scale


def _scalar(value, learn, device):
    return torch.tensor(value, dtype=torch.float32, device=device) if learn else value


def _tol(opts, shape):
    # The learnable scalars' gradients are judged against their terms' magnitudes (Sample.terms). With
    # one row every gradient is a difference of nearly equal numbers (symmetric: P = 1, so all are 0 and
    # the error is absolute): fp32's P - 1 leaves them a few 1e-5 off.
    return 1e-4 if shape[0] == 1 else 2e-5


def _per_pair(ts, names):
    """The named 0-dim tensors of ts as (B, M) leaves, one per logit (Sample.terms)."""
    shape = (ts["query"].shape[0], ts["key"].shape[0])
    return {k: (ts[k].expand(shape).clone().requires_grad_(True) if k in names else ts[k])
            for k in ("logit_scale", "logit_bias") if k in ts}


# ---- InfoNCE / CLIP ---------------------------------------------------------------------------------

def make_info_nce(shape, opts, dtype, device, generator):
    b, d = shape
    symmetric = opts.pop("symmetric", True)
    m = b if symmetric else b + opts.pop("extra", 0)
    learn = opts.pop("learn", True)
    normalize = opts.pop("normalize", True)
    # Without normalisation the rows are short enough that the logits stay in softmax's useful range.
    spread = 1.0 if normalize else 0.4 / math.sqrt(d)
    q, k = _rows((b, d), generator, spread), _rows((m, d), generator, spread)
    if opts.pop("duplicates", False):  # equal rows: tied logits in every row and column
        q[1::2], k[1::2] = q[0::2][:b // 2], k[0::2][:m // 2]
    q, k = q.to(dtype).to(device), k.to(dtype).to(device)
    logit_scale = _scalar(opts.pop("logit_scale", 7.0), learn, device)
    names = ("query", "key") + (("logit_scale",) if learn else ())

    def call(ts, backend, reduction):
        return lf.info_nce(ts["query"], ts["key"], logit_scale=ts["logit_scale"], symmetric=symmetric,
                           normalize=normalize, reduction=reduction, backend=backend)

    def terms(ts, reduction):
        leaves = _per_pair(ts, names)
        return reference.info_nce(ts["query"], ts["key"], leaves["logit_scale"], symmetric=symmetric,
                                  normalize=normalize, reduction=reduction), leaves

    return harness.Sample({"query": q, "key": k, "logit_scale": logit_scale}, names, call, terms)


def _contract_inputs(device, b=6, m=6, d=5, labels=False):
    g = torch.Generator().manual_seed(11)
    q = torch.randn(b, d, generator=g).to(device)
    k = q if labels else torch.randn(m, d, generator=g).to(device)
    lab = torch.tensor([i % 3 for i in range(b)], device=device) if labels else None
    return q, k, lab, torch.tensor(3.0, device=device), torch.tensor(-1.0, device=device)


def _kernel_op_samples(device):
    out = []
    for kind, symmetric in ((Kind.INFO_NCE, True), (Kind.INFO_NCE, False), (Kind.SUPCON, False),
                            (Kind.SIGLIP, False)):
        supcon = kind == Kind.SUPCON
        q, k, lab, s, bias = _contract_inputs(device, m=6 if symmetric or supcon else 9, labels=supcon)
        b = q.shape[0]
        loss, stats = torch.empty(b, device=device), torch.empty(2, b, device=device)
        out.append((cops.FWD, (q, k, lab, s, bias, loss, stats, kind, True, symmetric)))
        stats = torch.full((2, b), 2.0, device=device)  # finite statistics for the backward
        grad_k = None if supcon else torch.empty_like(k)
        out.append((cops.BWD, (torch.rand(b, device=device), q, k, lab, s, bias, stats, torch.empty_like(q),
                                        grad_k, torch.empty(2, b, device=device), kind, True, symmetric)))
    return out


def test_kernel_ops_refuse_bad_options_by_name(kernel_backend):
    device = device_for(kernel_backend)
    q, k, lab, logit_scale, logit_bias = _contract_inputs(device)
    b = q.shape[0]
    loss, stats = torch.empty(b, device=device), torch.empty(2, b, device=device)
    fwd, bwd = cops.FWD[kernel_backend], cops.BWD[kernel_backend]
    with pytest.raises(ValueError, match=r"contrastive_fwd: kind must be one of 0 \(INFO_NCE\), 1 \(SUPCON\), "
                                         r"2 \(SIGLIP\), got 3"):
        fwd(q, k, lab, logit_scale, logit_bias, loss, stats, kind=3, normalize=True, symmetric=False)
    with pytest.raises(ValueError, match="contrastive_bwd: kind must be one of .*, got -1"):
        bwd(torch.rand(b, device=device), q, k, lab, logit_scale, logit_bias, stats, torch.empty_like(q), None, None,
            kind=-1, normalize=True, symmetric=False)
    with pytest.raises(ValueError, match=r"contrastive_fwd: logit_scale must be a contiguous torch.float32 tensor "
                                         r"of shape \(\)"):
        fwd(q, k, lab, logit_scale.reshape(1), logit_bias, loss, stats, kind=Kind.INFO_NCE, normalize=True,
            symmetric=False)
    with pytest.raises(ValueError, match="contrastive_fwd: logit_bias must be a contiguous torch.float32"):
        fwd(q, k, lab, logit_scale, logit_bias.double(), loss, stats, kind=Kind.SIGLIP, normalize=True,
            symmetric=False)


def _info_nce_op_inputs(device):
    q, k, _, s, _ = _contract_inputs(device)
    return (q, k, s), (True, True)


INFO_NCE = harness.KernelSpec(
    family="contrastive",
    kernels=cops.info_nce_kernels,
    make=make_info_nce,
    cases=(dict(symmetric=True, normalize=True), dict(symmetric=True, normalize=False, learn=False),
           dict(symmetric=False, normalize=True, extra=13), dict(symmetric=False, normalize=False, learn=False),
           dict(symmetric=True, duplicates=True, logit_scale=30.0)),
    shapes=((1, 4), (37, 33)),  # odd tiles and extreme sizes: tests/test_contrastive_triton_ops.py
    tol=_tol,
    half_cases=(dict(symmetric=True, learn=False), dict(symmetric=False, extra=5, normalize=False, learn=False)),
    half_shape=(40, 24),
    half_tol=lambda dtype: 2e-2 if dtype == torch.bfloat16 else 4e-3,
    fwd_kernel=cops.FWD,
    fwd_budget=8,  # the gradient factor, the zero bias, the kernels, grad_rows, two sums, the mean
    bwd_budget=4,
    bwd_rescales=3,
    launch_shape=(48, 16),
    compile_cases=(dict(symmetric=True), dict(symmetric=False, extra=3, learn=False)),
    op_inputs=_info_nce_op_inputs,
    kernel_op_samples=_kernel_op_samples,
)

test_info_nce_matches_reference = harness.matches_reference(INFO_NCE)
test_info_nce_half_precision = harness.matches_reference_half(INFO_NCE)
test_info_nce_launches_few_ops_and_never_syncs = harness.launches(INFO_NCE)
test_info_nce_opcheck = harness.opcheck(INFO_NCE)
test_info_nce_compile_fullgraph = harness.compile_fullgraph(INFO_NCE)
test_info_nce_retained_graph = harness.retained_graph(INFO_NCE)
test_info_nce_double_backward_is_refused = harness.double_backward(INFO_NCE)


# ---- SupCon ------------------------------------------------------------------------------------------

def make_supcon(shape, opts, dtype, device, generator):
    b, d = shape
    normalize = opts.pop("normalize", True)
    classes = opts.pop("classes", max(1, b // 3))
    spread = 1.0 if normalize else 0.4 / math.sqrt(d)
    f = _rows((b, d), generator, spread).to(dtype).to(device)
    labels = torch.randint(0, classes, (b,), generator=generator)
    labels = (labels * opts.pop("label_step", 1) + opts.pop("label_offset", 0)).to(opts.pop("label_dtype",
                                                                                          torch.int64)).to(device)
    temperature = opts.pop("temperature", 0.1)

    def call(ts, backend, reduction):
        return lf.supcon_loss(ts["features"], ts["labels"], temperature=temperature, normalize=normalize,
                              reduction=reduction, backend=backend)

    return harness.Sample({"features": f, "labels": labels}, ("features",), call)


def _supcon_op_inputs(device):
    f, _, labels, _, _ = _contract_inputs(device, labels=True)
    return (f, labels), (0.2, True)


SUPCON = harness.KernelSpec(
    family="contrastive",
    kernels=cops.supcon_kernels,
    make=make_supcon,
    cases=(dict(), dict(normalize=False, temperature=0.5), dict(classes=30, label_step=-7919, label_offset=2**40),
           dict(classes=1), dict(label_dtype=torch.int8, classes=5)),
    shapes=((1, 4), (37, 33)),  # odd tiles and extreme sizes: tests/test_contrastive_triton_ops.py
    tol=_tol,
    half_cases=(dict(), dict(normalize=False, temperature=1.0)),
    half_shape=(40, 24),
    half_tol=lambda dtype: 2e-2 if dtype == torch.bfloat16 else 4e-3,
    fwd_kernel=cops.FWD,
    fwd_budget=18,  # with the anchor count from the sorted labels
    bwd_budget=2,
    launch_shape=(48, 16),
    compile_cases=(dict(), dict(normalize=False)),
    op_inputs=_supcon_op_inputs,
    kernel_op_samples=lambda device: [],
)

test_supcon_matches_reference = harness.matches_reference(SUPCON)
test_supcon_half_precision = harness.matches_reference_half(SUPCON)
test_supcon_launches_few_ops_and_never_syncs = harness.launches(SUPCON)
test_supcon_opcheck = harness.opcheck(SUPCON)
test_supcon_compile_fullgraph = harness.compile_fullgraph(SUPCON)
test_supcon_double_backward_is_refused = harness.double_backward(SUPCON)
test_supcon_retained_graph = harness.retained_graph(SUPCON)


# ---- SigLIP ------------------------------------------------------------------------------------------

def make_siglip(shape, opts, dtype, device, generator):
    b, d = shape
    m = b + opts.pop("extra", 0)
    learn = opts.pop("learn", True)
    normalize = opts.pop("normalize", True)
    spread = 1.0 if normalize else 0.4 / math.sqrt(d)
    q = _rows((b, d), generator, spread).to(dtype).to(device)
    k = _rows((m, d), generator, spread).to(dtype).to(device)
    logit_scale = _scalar(opts.pop("logit_scale", 10.0), learn, device)
    logit_bias = _scalar(opts.pop("logit_bias", -10.0), learn, device)
    names = ("query", "key") + (("logit_scale", "logit_bias") if learn else ())

    def call(ts, backend, reduction):
        return lf.siglip_loss(ts["query"], ts["key"], ts["logit_scale"], ts["logit_bias"], normalize=normalize,
                              reduction=reduction, backend=backend)

    def terms(ts, reduction):
        leaves = _per_pair(ts, names)
        return reference.siglip_loss(ts["query"], ts["key"], leaves["logit_scale"], leaves["logit_bias"],
                                     normalize=normalize, reduction=reduction), leaves

    return harness.Sample({"query": q, "key": k, "logit_scale": logit_scale, "logit_bias": logit_bias}, names, call,
                          terms)


def _siglip_op_inputs(device):
    q, k, _, s, bias = _contract_inputs(device, m=9)
    return (q, k, s, bias), (True,)


SIGLIP = harness.KernelSpec(
    family="contrastive",
    kernels=cops.siglip_kernels,
    make=make_siglip,
    cases=(dict(), dict(normalize=False, learn=False, logit_scale=3.0, logit_bias=0.5),
           dict(extra=11, logit_bias=2.0)),
    shapes=((1, 4), (37, 33)),  # odd tiles and extreme sizes: tests/test_contrastive_triton_ops.py
    tol=_tol,
    half_cases=(dict(learn=False), dict(extra=5, normalize=False, learn=False)),
    half_shape=(40, 24),
    half_tol=lambda dtype: 2e-2 if dtype == torch.bfloat16 else 4e-3,
    fwd_kernel=cops.FWD,
    fwd_budget=9,  # as InfoNCE's, with the bias as an input
    bwd_budget=5,
    bwd_rescales=4,
    launch_shape=(48, 16),
    compile_cases=(dict(), dict(extra=3, learn=False)),
    op_inputs=_siglip_op_inputs,
    kernel_op_samples=lambda device: [],
)

test_siglip_matches_reference = harness.matches_reference(SIGLIP)
test_siglip_half_precision = harness.matches_reference_half(SIGLIP)
test_siglip_launches_few_ops_and_never_syncs = harness.launches(SIGLIP)
test_siglip_opcheck = harness.opcheck(SIGLIP)
test_siglip_compile_fullgraph = harness.compile_fullgraph(SIGLIP)
test_siglip_double_backward_is_refused = harness.double_backward(SIGLIP)


def test_scalar_gradients_are_judged_against_their_terms(kernel_backend):
    # This seed's scale gradient, -9.9e-5, is a sum of B x M terms whose magnitudes add to 0.108: fp32
    # on CUDA's three-tf32 tiles (csrc/mma.cuh) was 2.9e-5 of the sum off, 2.7e-8 of the magnitudes.
    result = harness.run_both(SIGLIP, kernel_backend, {}, (37, 33), "mean", seed=257152771)
    assert set(result.magnitudes) == {"logit_scale", "logit_bias"}
    harness.assert_matches(result, _tol({}, (37, 33)))
    # an error of 1e-4 of the magnitudes in either scalar still fails
    for name in result.magnitudes:
        wrong = dict(result[2], **{name: result[2][name] + 1e-4 * result.magnitudes[name].to(result[2][name])})
        planted = harness.RunResult(result[0], result[1], wrong, result[3], result.seed, result.magnitudes)
        with pytest.raises(AssertionError, match=f"grad of {name}: error"):
            harness.assert_matches(planted, _tol({}, (37, 33)))
test_siglip_retained_graph = harness.retained_graph(SIGLIP)


# ---- what the fusion is for: no (B, M) tensor --------------------------------------------------------

TILE_DTYPES = [torch.bfloat16, torch.float16, torch.float32]  # what CUDA's tensor-core tiles take

CALLS = {
    "info_nce": lambda q, k, labels, s, b, r, backend: lf.info_nce(q, k, logit_scale=s, reduction=r, backend=backend),
    "info_nce_extra": lambda q, k, labels, s, b, r, backend: lf.info_nce(q, k, logit_scale=s, symmetric=False,
                                                                         reduction=r, backend=backend),
    "supcon": lambda q, k, labels, s, b, r, backend: lf.supcon_loss(q, labels, reduction=r, backend=backend),
    "siglip": lambda q, k, labels, s, b, r, backend: lf.siglip_loss(q, k, s, b, reduction=r, backend=backend),
}


@pytest.mark.parametrize("loss", list(CALLS))
@pytest.mark.parametrize("d", [100, 520, 768])
def test_fp32_gpu_tiles_give_the_reference(gpu_launch_choices, loss, d):
    """fp32 rows through the Triton launchers' GPU choices (the joint forward's row and column ranges,
    the gradient tiles of GRAD_TILES and their two width segments, the norm pre-pass's blocks; the
    interpreter's own are smaller), run by the interpreter, against the float64 reference: more rows
    than one tile, a width that is not a power of two, one in eighths (520 = 512 + 8) and two
    segments (768 = 512 + 256)."""
    from lossforge_kernels.triton_kernels import contrastive as kernels

    assert not kernels.interpreting()  # the launchers read the GPU choice
    g = torch.Generator().manual_seed(d)
    b = 70
    m = b + 17 if loss == "info_nce_extra" else b
    q = torch.randn(b, d, generator=g).requires_grad_(True)
    k = torch.randn(m, d, generator=g).requires_grad_(True)
    labels = torch.randint(0, 20, (b,), generator=g)
    s = torch.tensor(5.0, requires_grad=True)
    bias = torch.tensor(-2.0, requires_grad=True)
    out = CALLS[loss](q, k, labels, s, bias, "mean", "triton")
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, s, bias)]
    want = CALLS[loss](leaves[0], leaves[1], labels, leaves[2], leaves[3], "mean", "reference")
    got_grads = torch.autograd.grad(out, (q, k, s, bias), allow_unused=True)
    want_grads = torch.autograd.grad(want, leaves, allow_unused=True)
    assert_close_rel(out, want, 2e-5, "loss")
    for name, got, expected in zip("qksb", got_grads, want_grads):
        if expected is not None:
            assert_close_rel(got, expected, 2e-5, f"{loss} d={d} grad {name}")


@pytest.mark.parametrize("reduction", ("none", "mean"))  # 'sum' takes the fused path as 'mean' does
@pytest.mark.parametrize("loss", list(CALLS))
def test_no_tensor_of_b_by_m_elements(kernel_backend, loss, reduction):
    device = device_for(kernel_backend)
    b, d = 80, 8  # more rows than one tile
    m = b + 17 if loss == "info_nce_extra" else b
    g = torch.Generator().manual_seed(3)
    q = torch.randn(b, d, generator=g).to(device).requires_grad_(True)
    k = torch.randn(m, d, generator=g).to(device).requires_grad_(True)
    labels = torch.randint(0, 20, (b,), generator=g).to(device)
    s = torch.tensor(5.0, device=device, requires_grad=True)
    bias = torch.tensor(-2.0, device=device, requires_grad=True)
    with CreatedTensors() as created:
        out = CALLS[loss](q, k, labels, s, bias, reduction, kernel_backend)
        out.backward(torch.rand_like(out) + 0.5)
    biggest = max(math.prod(shape) for _, shape in created.shapes)
    assert biggest < b * m // 4, f"a tensor of {biggest} elements (B x M = {b * m}): {created.shapes}"
    want = CALLS[loss](q.detach().double(), k.detach().double(), labels, s.detach().double(), bias.detach().double(),
                       reduction, "reference")
    assert_close_rel(out, want, 2e-5, "loss")


@pytest.mark.parametrize("dtype", TILE_DTYPES)
@pytest.mark.parametrize("width", [24, 1700])
def test_cuda_ops_allocate_no_similarity_chunk(dtype, width):
    """Inside the CUDA ops nothing of B x M is allocated: the similarities stay on chip at every dtype,
    fp32 too. Rows wider than the backward's shared accumulator (1700 on the emulation's H100) take the
    chunked pass, whose fp32 similarity chunk the record must see: the control that shows it can fail."""
    _need_cuda_backend()
    from torch.profiler import ProfilerActivity, profile

    device = device_for("cuda")
    b = 150
    gen = torch.Generator().manual_seed(5)
    q, k = (torch.randn(b, width, generator=gen).to(dtype).to(device).requires_grad_(True) for _ in range(2))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        lf.info_nce(q, k, backend="cuda").backward()
    inside = {"lossforge::contrastive_fwd_cuda": 0, "lossforge::contrastive_bwd_cuda": 0}  # largest allocation
    for e in prof.events():
        op = e.cpu_parent
        while op is not None and op.name not in inside:
            op = op.cpu_parent
        if op is not None:
            inside[op.name] = max(inside[op.name], e.self_cpu_memory_usage)
    chunk = b * b * 4 // 4  # a quarter of the fp32 similarities
    assert inside["lossforge::contrastive_fwd_cuda"] < chunk, inside
    assert (inside["lossforge::contrastive_bwd_cuda"] >= chunk) == (width > 1664), inside


# ---- determinism, edge cases, dispatch ---------------------------------------------------------------

@pytest.mark.parametrize("loss", list(CALLS))
def test_two_runs_are_bitwise_equal(kernel_backend, loss):
    device = device_for(kernel_backend)
    g = torch.Generator().manual_seed(8)
    q = torch.randn(45, 12, generator=g).to(device)
    k = torch.randn(45 + (9 if loss == "info_nce_extra" else 0), 12, generator=g).to(device)
    labels = torch.randint(0, 9, (45,), generator=g).to(device)
    results = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_(True) for t in (q, k)]
        s = torch.tensor(4.0, device=device, requires_grad=True)
        bias = torch.tensor(-1.0, device=device, requires_grad=True)
        out = CALLS[loss](*leaves, labels, s, bias, "mean", kernel_backend)
        out.backward()
        results.append([out] + [t.grad for t in leaves + [s, bias] if t.grad is not None])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_supcon_without_any_positive(kernel_backend):
    # Every label distinct: nothing to average ('mean' is nan, as the reference) and a zero gradient.
    device = device_for(kernel_backend)
    f = torch.randn(9, 5, device=device, requires_grad=True)
    labels = torch.arange(9, device=device)
    for reduction in REDUCTIONS:
        got = lf.supcon_loss(f, labels, reduction=reduction, backend=kernel_backend)
        want = lf.supcon_loss(f.detach().double(), labels, reduction=reduction, backend="reference")
        torch.testing.assert_close(got.double(), want, equal_nan=True)
        (grad,) = torch.autograd.grad(got.sum(), f)
        assert torch.equal(grad, torch.zeros_like(grad))


def test_float_and_tensor_scales_agree(kernel_backend):
    device = device_for(kernel_backend)
    q, k = torch.randn(20, 6, device=device), torch.randn(20, 6, device=device)
    by_float = lf.info_nce(q, k, temperature=0.25, backend=kernel_backend)
    by_tensor = lf.info_nce(q, k, logit_scale=torch.tensor(4.0, device=device), backend=kernel_backend)
    torch.testing.assert_close(by_float, by_tensor)


def test_inputs_are_not_modified(kernel_backend):
    device = device_for(kernel_backend)
    q = torch.randn(20, 6, device=device, requires_grad=True)
    k = torch.randn(20, 6, device=device, requires_grad=True)
    before = (q.detach().clone(), k.detach().clone())
    lf.info_nce(q, k, backend=kernel_backend).backward()
    lf.siglip_loss(q, k, 10.0, -10.0, backend=kernel_backend).backward()
    assert torch.equal(q.detach(), before[0]) and torch.equal(k.detach(), before[1])


def test_explicit_kernel_backends_run_or_say_why(monkeypatch):
    q, k = torch.randn(4, 3), torch.randn(4, 3)
    labels = torch.tensor([0, 0, 1, 1])
    calls = [lambda **kw: lf.info_nce(q, k, **kw), lambda **kw: lf.supcon_loss(q, labels, **kw),
             lambda **kw: lf.siglip_loss(q, k, 10.0, -10.0, **kw)]
    for call in calls:
        want = call(backend="reference")
        assert torch.equal(call(), want)  # auto on CPU tensors: the reference
        if lf.available_backends()["cuda"].available and not torch.cuda.is_available():  # the CUDA emulation
            torch.testing.assert_close(call(backend="cuda"), want, rtol=1e-5, atol=1e-6)
        elif not torch.cuda.is_available():
            with pytest.raises(lf.BackendUnavailableError, match="backend='cuda' is unavailable"):
                call(backend="cuda")
        monkeypatch.setenv("LOSSFORGE_BACKEND", "reference")
        assert torch.equal(call(), want)
        monkeypatch.delenv("LOSSFORGE_BACKEND")


# ---- fp16 gradient weights at large-batch magnitudes: a model of the CUDA backward's arithmetic ----
# csrc/contrastive.cuh stores each chunk's gradient weights G = s dZ r'_j in the inputs' dtype and
# takes G @ y on cuBLAS with fp32 accumulation. This model repeats those steps in PyTorch, with the
# same roundings (fp32 weights, one rounding to fp16, fp32 product, fp16 output), for InfoNCE's and
# SupCon's passes: it checks the design of the row scaling (2^e_i before the rounding, 2^-e_i
# after the product), not the compiled kernel, which needs a GPU (tests/test_contrastive_gpu.py).

WEIGHT_TOP_EXP = 14  # csrc/contrastive.cuh: kWeightTopExp


def _weight_exponents(bound):
    """weight_exponent of csrc/contrastive.cuh per row: e with bound 2^e in [2^13, 2^14); 0 where the
    bound is 0 or not finite."""
    _, x = torch.frexp(bound)
    e = (WEIGHT_TOP_EXP - x).clamp(-126, 126)
    return torch.where((bound > 0) & torch.isfinite(bound), e, torch.zeros_like(e))


def _model_pass(own, other, r_own, r_other, dz, s, bound, scaled):
    """One gradient pass as the CUDA kernels compute it: (rows, D) fp16 gradient of the own rows."""
    e = _weight_exponents(bound) if scaled else torch.zeros_like(bound, dtype=torch.int32)
    up = torch.ldexp(torch.ones_like(bound), e.to(torch.float32))
    g = (s * dz * r_other[None, :] * up[:, None]).to(torch.float16)  # the one rounding of the weights
    acc = g.float() @ other.float()  # cuBLAS: fp16 operands, fp32 accumulation
    cos = (own.float() @ other.float().T) * r_own[:, None] * r_other[None, :]
    along = s * (dz * cos).sum(dim=1) * r_own * r_own
    return (r_own[:, None] * (acc * (1.0 / up)[:, None]) - along[:, None] * own.float()).to(torch.float16)


def _model_info_nce_grads(q, k, s, grad_rows, scaled):
    """grad_query and grad_key of non-symmetric InfoNCE with normalize, as the CUDA backward's steps."""
    rq = 1.0 / q.float().norm(dim=1).clamp_min(1e-12)
    rk = 1.0 / k.float().norm(dim=1).clamp_min(1e-12)
    z = s * (q.float() @ k.float().T) * rq[:, None] * rk[None, :]
    lse = torch.logsumexp(z, dim=1)  # the forward's stats[0]
    eye = torch.eye(*z.shape, dtype=torch.float32)
    dz = grad_rows[:, None] * (torch.exp(z - lse[:, None]) - eye)
    query_bound = abs(s) * grad_rows.abs() * rk.max()  # own role only
    key_bound = abs(s) * (grad_rows.abs() * rq).max().expand(k.shape[0])  # other role only
    return (_model_pass(q, k, rq, rk, dz, s, query_bound, scaled),
            _model_pass(k, q, rk, rq, dz.T.contiguous(), s, key_bound, scaled))


def _exact_info_nce_grads(q, k, s, grad_rows):
    q64, k64 = q.double().requires_grad_(True), k.double().requires_grad_(True)
    rows = lf.reference.contrastive.info_nce_rows(q64, k64, s, symmetric=False, normalize=True)
    (grad_rows.double() * rows).sum().backward()
    return q64.grad, k64.grad


def _excess_row_error(got, want):
    """max over rows of (error of got) - (error of the exact gradient rounded to fp16), errors per row
    relative to the exact row: what the kernel's arithmetic adds to the output's own rounding (which
    alone is large where an exact gradient is below fp16's normal range)."""
    def row_error(x):
        return (x.double() - want).norm(dim=1) / want.norm(dim=1)
    return (row_error(got) - row_error(want.to(torch.float16))).nan_to_num(nan=float("inf")).max().item()


def _large_batch_inputs(seed, b=64, m=2048, d=64):
    """fp16 rows with a close positive each (k_i = q_i + noise), as in training: every negative's
    probability is small, ~3e-6 at s = 1/0.07."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, d, generator=gen).to(torch.float16)
    k = torch.randn(m, d, generator=gen)
    k[:b] = q.float() + 0.3 * torch.randn(b, d, generator=gen)
    return q, k.to(torch.float16)


@pytest.mark.parametrize("batch,loss_scale", [(4096, 2.0**10), (65536, 2.0**10), (262144, 2.0**10),
                                              (262144, 2.0**16)])
def test_fp16_weight_scaling_model_at_large_batch(batch, loss_scale):
    """'mean' over `batch` rows with a loss scale as torch.amp's GradScaler applies: grad_rows =
    loss_scale / batch. The negatives' weights, s g_i P_ij r'_j, are then far below fp16's smallest
    subnormal; with the row scaling each row is within fp16 rounding of the exact gradient, where
    the same steps without it (the unscaled model) are several % off."""
    q, k = _large_batch_inputs(5)
    s = 1.0 / 0.07
    grad_rows = torch.full((q.shape[0],), loss_scale / batch, dtype=torch.float32)
    want_q, want_k = _exact_info_nce_grads(q, k, s, grad_rows)
    got_q, got_k = _model_info_nce_grads(q, k, s, grad_rows, scaled=True)
    assert _excess_row_error(got_q, want_q) < 3e-3  # a few fp16 ulps
    assert _excess_row_error(got_k, want_k) < 3e-3
    if batch >= 65536:  # the magnitudes are reached: unscaled, the small weights vanish
        old_q, old_k = _model_info_nce_grads(q, k, s, grad_rows, scaled=False)
        assert max(_excess_row_error(old_q, want_q), _excess_row_error(old_k, want_k)) > 5e-3


def test_fp16_weight_scaling_model_scales_large_weights_down():
    """Weights above fp16's range (short keys, long queries, a large gradient): scaled below 2^14
    rather than overflowed; the query gradient stays within fp16 rounding."""
    gen = torch.Generator().manual_seed(6)
    q = (100 * torch.randn(16, 32, generator=gen)).to(torch.float16)
    k = (0.01 * torch.randn(40, 32, generator=gen)).to(torch.float16)
    grad_rows = torch.full((16,), 1000.0)
    want_q, _ = _exact_info_nce_grads(q, k, 10.0, grad_rows)
    assert _excess_row_error(_model_info_nce_grads(q, k, 10.0, grad_rows, scaled=True)[0], want_q) < 3e-3
    assert not _model_info_nce_grads(q, k, 10.0, grad_rows, scaled=False)[0].isfinite().all()


def _largest_scaled_weight(weights, s, r_other, bound):
    up = torch.ldexp(torch.ones_like(bound), _weight_exponents(bound).float())
    return (s * weights * r_other[None, :] * up[:, None]).abs().max().item()


def _model_two_role_grads(case, q, k, labels, s, grad_rows):
    """grad_query (and grad_key) of symmetric InfoNCE or SupCon through the CUDA steps, with dZ from
    the float32 contract (tests/test_contrastive_triton_ops.py) and each pass's bound as the kernel
    forms it; also the largest scaled weight, which the bound must keep below 2^14."""
    from tests.test_contrastive_triton_ops import dense_loss
    q32 = q.float().requires_grad_(True)
    k32 = q32 if case.kind == Kind.SUPCON else k.float()
    rows, _, z, _ = dense_loss(q32, k32, labels, torch.tensor(s), None, case)
    z.retain_grad()
    (grad_rows * rows).sum().backward()
    dz = z.grad
    rq = 1.0 / q.float().norm(dim=1).clamp_min(1e-12)
    rk = rq if case.kind == Kind.SUPCON else 1.0 / k.float().norm(dim=1).clamp_min(1e-12)
    w_own, w_other = (1.0, 1.0) if case.kind == Kind.SUPCON else (0.5, 0.5)  # both roles on every row

    def bound(r_other):
        return abs(s) * (w_own * grad_rows.abs() * r_other.max() + w_other * (grad_rows.abs() * r_other).max())
    row_w = dz + dz.T if case.kind == Kind.SUPCON else dz
    top = _largest_scaled_weight(row_w, s, rk, bound(rk))
    grad_q = _model_pass(q, k, rq, rk, row_w, s, bound(rk), True)
    grad_k = None
    if case.kind != Kind.SUPCON:
        top = max(top, _largest_scaled_weight(dz.T, s, rq, bound(rq)))
        grad_k = _model_pass(k, q, rk, rq, dz.T.contiguous(), s, bound(rq), True)
    return grad_q, grad_k, top


@pytest.mark.parametrize("kind", ["info_nce_symmetric", "supcon"])
def test_fp16_weight_scaling_model_two_roles(kind):
    """Rows that carry two roles of the pair term (symmetric InfoNCE's halves, SupCon's anchor and key
    roles) at the magnitudes of a 262144-row 'mean' under a 2^10 loss scale, with per-row gradients
    that differ: the bound keeps every scaled weight below 2^14 and each row within fp16 rounding."""
    from tests.test_contrastive_triton_ops import Case, dense_expected
    q, k = _large_batch_inputs(7, b=256, m=256)
    s = 1.0 / 0.07
    case = Case(Kind.SUPCON if kind == "supcon" else Kind.INFO_NCE, 256, 256, 64, symmetric=kind != "supcon")
    labels = torch.arange(256) // 4 if kind == "supcon" else None
    if kind == "supcon":  # classes of 4 around their centres: small negative probabilities
        gen = torch.Generator().manual_seed(8)
        centres = torch.randn(64, 64, generator=gen)
        q = k = (centres[labels] + 0.3 * torch.randn(256, 64, generator=gen)).to(torch.float16)
    grad_rows = (2.0**10 / 262144) * torch.linspace(0.5, 2.0, 256)
    want = dense_expected(case, dict(query=q, key=k, labels=labels, logit_scale=torch.tensor(s),
                                     logit_bias=torch.tensor(0.0), grad_rows=grad_rows))
    got_q, got_k, top = _model_two_role_grads(case, q, k, labels, s, grad_rows)
    assert top < 2.0**14
    assert _excess_row_error(got_q, want["grad_query"]) < 3e-3
    if got_k is not None:
        assert _excess_row_error(got_k, want["grad_key"]) < 3e-3


@pytest.mark.parametrize("symmetric", [False, True])
def test_fp16_gradients_at_large_batch_magnitudes(kernel_backend, symmetric):
    """The kernels' fp16 gradients where each pair's weight is as small as in a 262144-row 'mean'
    under a 2^10 loss scale (trained-like rows: negatives' probabilities ~1e-6): every row within
    fp16 rounding of the float64 reference's (on a GPU this runs the CUDA kernel's row scaling)."""
    device = device_for(kernel_backend)
    q, k = _large_batch_inputs(11, b=32, m=32 if symmetric else 256)
    q, k = q.to(device).requires_grad_(True), k.to(device).requires_grad_(True)
    rows = lf.info_nce(q, k, temperature=0.07, symmetric=symmetric, reduction="none", backend=kernel_backend)
    rows.backward(torch.full_like(rows, 2.0**10 / 262144))
    q64, k64 = q.detach().cpu().double().requires_grad_(True), k.detach().cpu().double().requires_grad_(True)
    want = lf.info_nce(q64, k64, temperature=0.07, symmetric=symmetric, reduction="none", backend="reference")
    want.backward(torch.full_like(want, 2.0**10 / 262144))
    assert _excess_row_error(q.grad.cpu(), q64.grad) < 3e-3
    assert _excess_row_error(k.grad.cpu(), k64.grad) < 3e-3


# ---- the CUDA forward: similarity tiles from tensor-core products -------------------------------
# (csrc/contrastive.cuh tile_stats_kernel: blocks of 64 rows, tiles of 64 columns, 64 bf16/fp16 or 32
# fp32 features staged at a time; fp32 as three tf32 products). The kernel op against the dense float64
# contract on the same rounded inputs: only fp32 accumulation (and, for fp32 inputs, the tf32 split's
# 2^-21) separates them, so the tolerance is fp32's. 70 rows and 83 columns cross the 64-row blocks and
# tiles; D = 33 has a tail of 1 past two 16-wide k steps (fp32: five 8-wide), D = 520 runs 9 staging
# steps with a tail of 8 (element loads; fp32 17), D = 24 the 16-byte loads.


_TILE_CASES = [
    Case(Kind.INFO_NCE, 70, 70, 33, symmetric=True),
    Case(Kind.INFO_NCE, 70, 83, 520),
    Case(Kind.INFO_NCE, 70, 70, 24, normalize=False, symmetric=True),
    Case(Kind.INFO_NCE, 70, 83, 33, normalize=False),
    Case(Kind.INFO_NCE, 17, 17, 16, symmetric=True, duplicates=True),
    Case(Kind.SUPCON, 70, 70, 33),
    Case(Kind.SUPCON, 70, 70, 520, normalize=False, labels="singletons"),
    Case(Kind.SUPCON, 20, 20, 24, labels="one"),
    Case(Kind.SUPCON, 1, 1, 3),
    Case(Kind.SIGLIP, 70, 83, 33),
    Case(Kind.SIGLIP, 70, 83, 520, normalize=False),
    Case(Kind.SIGLIP, 5, 5, 24, duplicates=True),
]


def _cuda_forward_op(case, x):
    loss = torch.empty(case.b, dtype=torch.float32, device=x["query"].device)
    stats = torch.full((2, case.b), SENTINEL, dtype=torch.float32, device=x["query"].device)
    torch.ops.lossforge.contrastive_fwd_cuda(x["query"], x["key"], x["labels"], x["logit_scale"], x["logit_bias"],
                                             loss, stats, case.kind, case.normalize, case.symmetric)
    return loss, stats


def _dense_forward(case, x):
    q, k = x["query"].cpu().double(), x["key"].cpu().double()
    labels = None if x["labels"] is None else x["labels"].cpu()
    rows, stats, _, _ = dense_loss(q, k, labels, x["logit_scale"].cpu().double(), x["logit_bias"].cpu().double(),
                                   case)
    return rows, stats


def _need_cuda_backend():
    if "cuda" not in kernel_backends():
        pytest.skip("needs the CUDA backend (a GPU, or LOSSFORGE_CUDA_EMULATE=1)")


@pytest.mark.parametrize("dtype", TILE_DTYPES)
@pytest.mark.parametrize("base", _TILE_CASES, ids=str)
def test_cuda_forward_on_tensor_core_tiles(base, dtype):
    _need_cuda_backend()
    case = dataclasses.replace(base, dtype=dtype)
    x = make_inputs(case, device_for("cuda"))
    loss, stats = _cuda_forward_op(case, x)
    rows, want_stats = _dense_forward(case, x)
    assert_close_rel(loss.cpu(), rows, 2e-5, f"{case} loss")
    for row in (0, 1):
        if row in want_stats:
            assert_close_rel(stats[row].cpu(), want_stats[row], 2e-5, f"{case} stats[{row}]")
        else:
            assert torch.all(stats[row].cpu() == SENTINEL), f"{case}: stats[{row}] was written"


def _non_finite_case(kind, dtype):
    """70 x 70 x 33 with +inf in query row 3 and NaN in row 66 (SupCon: key = query)."""
    case = Case(kind, 70, 70, 33, normalize=False, symmetric=kind == Kind.INFO_NCE, dtype=dtype)
    x = make_inputs(case, device_for("cuda"))
    x["query"][3, 5] = float("inf")
    x["query"][66, 0] = float("nan")
    if kind == Kind.SUPCON:
        x["key"] = x["query"]
    return case, x


@pytest.mark.parametrize("dtype", TILE_DTYPES)
@pytest.mark.parametrize("kind", list(Kind))
def test_cuda_forward_non_finite_inputs(kind, dtype):
    # +inf in one query row and NaN in another row reach the rows (and columns) torch gives them.
    _need_cuda_backend()
    case, x = _non_finite_case(kind, dtype)
    loss, stats = _cuda_forward_op(case, x)
    rows, want_stats = _dense_forward(case, x)
    torch.testing.assert_close(loss.cpu().double(), rows, rtol=2e-5, atol=1e-5, equal_nan=True)
    for row, want in want_stats.items():
        torch.testing.assert_close(stats[row].cpu().double(), want.double(), rtol=2e-5, atol=1e-5, equal_nan=True)


# ---- the CUDA backward: similarity tiles from tensor-core products -------------------------------
# (csrc/contrastive.cuh tile_grad_kernel: blocks of 32 own rows, tiles of 64 other rows, 64 features
# staged at a time, the gradient accumulated in shared memory). The kernel op against the dense
# float64 contract on the same rounded inputs: the pair weights W are rounded to the inputs' dtype
# before the second product and the gradients are stored in it, so the tolerance is the dtype's (fp32:
# its own, W kept whole and both products split into tf32 parts).
# 70 and 83 rows cross the 32-row blocks and the 64-row tiles; D = 33 is a tail of 1 past two k steps
# (element loads), D = 520 nine staging steps with a tail of 8, D = 24 the 16-byte loads.

_GRAD_CASES = _TILE_CASES + [
    Case(Kind.INFO_NCE, 70, 83, 33, symmetric=False),
    Case(Kind.INFO_NCE, 33, 33, 520, symmetric=True),
    Case(Kind.INFO_NCE, 17, 23, 16, duplicates=True),
    Case(Kind.SUPCON, 17, 17, 16, duplicates=True),
    Case(Kind.SIGLIP, 17, 23, 16, duplicates=True),
    # Wider than the shared accumulator fits (the emulation's limits are an H100's): the chunked pass.
    Case(Kind.INFO_NCE, 20, 20, 1700, symmetric=True, duplicates=True),
    Case(Kind.SUPCON, 20, 20, 1700),
]
_GRAD_TOL = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3, torch.float32: 2e-5}


def _cuda_ops(case, x, want=("grad_query", "grad_key", "grad_coef")):
    """The CUDA forward and backward kernel ops (tests/test_contrastive_triton_ops.py's run_ops for the
    CUDA key); outputs not in `want` are passed as None."""
    q, k = x["query"], x["key"]
    loss, stats = _cuda_forward_op(case, x)
    grad_query = torch.empty_like(q) if "grad_query" in want else None
    grad_key = torch.empty_like(k) if "grad_key" in want and case.kind != Kind.SUPCON else None
    grad_coef = torch.empty(2, case.b, dtype=torch.float32, device=q.device) if "grad_coef" in want else None
    torch.ops.lossforge.contrastive_bwd_cuda(x["grad_rows"], q, k, x["labels"], x["logit_scale"], x["logit_bias"],
                                             stats, grad_query, grad_key, grad_coef, case.kind, case.normalize,
                                             case.symmetric)
    return dict(loss=loss, stats=stats, grad_query=grad_query, grad_key=grad_key, grad_coef=grad_coef)


def _check_tile_grads(case, got, want):
    tol = _GRAD_TOL[case.dtype]
    for name in ("grad_query", "grad_key"):
        if got[name] is not None:
            g, w = got[name].cpu(), want[name]
            assert g.dtype == case.dtype
            # A row below the norm floor (duplicates) has a gradient of ~1e12 (r = 1e12): past fp16's
            # range, it must overflow there too; the other rows are compared.
            fits = w.to(case.dtype).isfinite().all(dim=1)
            assert not g[~fits].isfinite().all(dim=1).any(), f"{case} {name}: an out-of-range row came out finite"
            assert_close_rel(g[fits], w[fits], tol, f"{case} {name}")
    if got["grad_coef"] is not None:
        coef = got["grad_coef"].cpu()
        assert_close_rel(coef, want["grad_coef"], 2e-5, f"{case} grad_coef")  # fp32 sums of fp32 terms
        assert_close_rel(coef[0].double().sum(), want["grad_logit_scale"], 2e-5, f"{case} logit_scale gradient")


@pytest.mark.parametrize("dtype", TILE_DTYPES)
@pytest.mark.parametrize("base", _GRAD_CASES, ids=str)
def test_cuda_backward_on_tensor_core_tiles(base, dtype):
    _need_cuda_backend()
    case = dataclasses.replace(base, dtype=dtype)
    x = make_inputs(case, device_for("cuda"))
    _check_tile_grads(case, _cuda_ops(case, x), dense_expected(case, x))


_NEARLY_IDENTICAL_TOL = [(torch.bfloat16, 1.5e-2), (torch.float16, 3e-3), (torch.float32, 1e-3)]


def _check_nearly_identical_rows(backend, dtype, tol, b, d):
    """Rows a common centre plus noise 0.01 (cos ~1): each row's gradient is the small tangential part
    of sum_j W_ij k^_j, and the normalisation's radial sum has to take the same rounded W as the
    product, or the difference of two nearly equal terms is mostly rounding."""
    gen = torch.Generator().manual_seed(3)
    center = torch.randn(1, d, generator=gen)
    q, k = ((center + 0.01 * torch.randn(b, d, generator=gen)).to(dtype) for _ in range(2))
    grads = {}
    for name, cast in ((backend, lambda t: t.to(device_for(backend))), ("reference", lambda t: t.double())):
        leaves = [cast(t).clone().requires_grad_(True) for t in (q, k)]
        lf.info_nce(*leaves, backend=name).backward()
        grads[name] = [t.grad.cpu().double() for t in leaves]
    for got, want, name in zip(grads[backend], grads["reference"], ("query", "key")):
        err = ((got - want).norm(dim=1) / want.norm(dim=1)).max()
        assert err < tol, f"grad_{name}: largest row error {float(err):.2e}"


@pytest.mark.parametrize("dtype,tol", _NEARLY_IDENTICAL_TOL)
def test_half_gradients_of_nearly_identical_rows(kernel_backend, dtype, tol):
    """With the fp32 W in the radial sum, the CUDA tiles were 29 % off per bf16 row and 2.6 % per fp16
    row, Triton (its interpreter rounding W as a GPU's dot does) 28 % and 3.8 %."""
    # CUDA: two tiles of 64 other rows, between which the rows' scales change (fp16)
    _check_nearly_identical_rows(kernel_backend, dtype, tol, 100 if kernel_backend == "cuda" else 40, 64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_half_gradients_of_nearly_identical_rows(dtype):
    """The same on CUDA's chunked pass (wider than the shared accumulator), which took the radial sum
    from the fp32 weights (bf16 39 %, fp16 2.3 %; the tiles too are ~5e-3 at this width: the fp32
    cosines' own rounding, relative to 1 - cos ~1e-4, grows with D)."""
    _need_cuda_backend()
    _check_nearly_identical_rows("cuda", dtype, 1e-2, 24, 1700)


@pytest.mark.parametrize("case", [Case(Kind.INFO_NCE, 70, 83, 33, symmetric=False, dtype=torch.bfloat16),
                                  Case(Kind.INFO_NCE, 70, 70, 24, symmetric=True, dtype=torch.float16),
                                  Case(Kind.SUPCON, 70, 70, 33, dtype=torch.float16),
                                  Case(Kind.SIGLIP, 40, 70, 24, dtype=torch.bfloat16)], ids=str)
def test_cuda_half_backward_optional_outputs(case):
    """Each output alone, and some together, equal the same outputs of the full call, bit for bit
    (a pass without its gradient still writes grad_coef), and two runs are equal."""
    _need_cuda_backend()
    x = make_inputs(case, device_for("cuda"))
    full = _cuda_ops(case, x)
    assert all(torch.equal(v, _cuda_ops(case, x)[n]) for n, v in full.items() if v is not None), "runs differ"
    for want in (("grad_key",), ("grad_coef",), ("grad_query",), ("grad_query", "grad_key")):
        part = _cuda_ops(case, x, want)
        for name in ("grad_query", "grad_key", "grad_coef"):
            if name not in want:
                assert part[name] is None
            elif full[name] is not None:
                assert torch.equal(part[name], full[name]), f"{case} {name} alone differs"


@pytest.mark.parametrize("dtype", TILE_DTYPES)
@pytest.mark.parametrize("kind", list(Kind))
def test_cuda_backward_non_finite_inputs(kind, dtype):
    # +inf in one query row and NaN in another: the gradients are NaN exactly where the dense float64
    # contract's are, and within the dtype's tolerance elsewhere.
    _need_cuda_backend()
    case, x = _non_finite_case(kind, dtype)
    got, want = _cuda_ops(case, x), dense_expected(case, x)
    for name in ("grad_query", "grad_key"):
        if got[name] is None:
            continue
        g, w = got[name].cpu().double(), want[name]
        assert torch.equal(g.isnan(), w.isnan()), f"{case} {name}: NaN where the contract has none, or none"
        assert torch.equal(g.isinf(), w.isinf()), f"{case} {name}: inf differs"
        finite = w.isfinite().all(dim=1)
        if finite.any():
            assert_close_rel(g[finite], w[finite], _GRAD_TOL[dtype], f"{case} {name} finite rows")
