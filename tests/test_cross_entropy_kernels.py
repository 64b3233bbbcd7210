"""Cross-entropy kernels against the float64 reference: the shared harness (tests/harness.py) over
this family's spec, then what is particular to it (long rows, confident rows, edge values,
inplace_backward, the op contract)."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import lossforge_kernels as lf
from lossforge_kernels.ops import cross_entropy as ce_ops
from lossforge_kernels.ops._library import SCALE_GRAD
from tests import harness
from tests.conftest import assert_close_rel, device_for
from tests.test_row_softmax import max_mode  # noqa: F401 (a fixture)
from tests.test_cross_entropy import make_inputs

REDUCTIONS = ["none", "mean", "sum"]
PARAMS = (-100, 0.1, 1e-3, 3.0, 2.0, 1.0)  # ignore_index, smoothing, z-loss, softcap, gamma, alpha

LOSS_OPTIONS = ("label_smoothing", "z_loss", "softcap", "focal_gamma", "focal_alpha", "inplace_backward",
                "ignore_index")


def make(shape, opts, dtype, device, generator):
    """cross_entropy's inputs for `shape` (N, C, d1, ...); opts: the loss's options plus `soft`,
    `weighted` and focal_alpha="tensor"."""
    n, c, *extra = shape
    x, t, w = make_inputs(n, c, dtype=dtype, device=device, soft=opts.pop("soft", False),
                          seed=int(torch.randint(0, 2**31, (1,), generator=generator)), extra=tuple(extra))
    tensors = {"input": x, "target": t, "weight": w if opts.pop("weighted", False) else None,
               "focal_alpha": opts.pop("focal_alpha", None)}
    if isinstance(tensors["focal_alpha"], str):
        tensors["focal_alpha"] = torch.rand(c, generator=generator).to(device)
    unknown = set(opts) - set(LOSS_OPTIONS)
    assert not unknown, unknown

    def call(ts, backend, reduction):
        return lf.cross_entropy(ts["input"], ts["target"], ts["weight"], focal_alpha=ts["focal_alpha"],
                                reduction=reduction, backend=backend, **opts)

    return harness.Sample(tensors, ("input",), call)


def op_inputs(device):
    x, t, w = make_inputs(4, 10, device=device)
    return (x, t, w, w.sum(), torch.rand(10, device=device)), PARAMS


def kernel_op_samples(device):
    x, t, w = make_inputs(4, 10, device=device)
    alpha = torch.rand(10, device=device)
    scale = torch.full((), 0.25, device=device)

    def outs():
        return torch.empty(4, device=device), torch.empty(4, 4, device=device)

    stats = torch.rand(4, 4, device=device)
    samples = [(ce_ops.FWD, (x, t, w, w.sum(), alpha, scale, *outs(), torch.empty_like(x), *PARAMS)),
               (ce_ops.FWD, (x, t, None, None, None, None, *outs(), None, -100, 0.0, 0.0, 0.0, 2.0, 0.5)),
               (SCALE_GRAD, (torch.randn(4, 10, device=device), torch.tensor(0.5, device=device))),
               (SCALE_GRAD, (torch.randn(4, 10, device=device)[:, :7], torch.tensor(1.0, device=device)))]
    return samples + [(ce_ops.BWD, (torch.rand(4, device=device), x, t, w, w.sum(), alpha, stats,
                                    torch.empty_like(x), *PARAMS))]


KERNEL_CASES = (
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
)

SPEC = harness.KernelSpec(
    family="cross_entropy",
    make=make,
    cases=KERNEL_CASES,
    shapes=((5, 37), (3, 1), (2, 2), (33, 130)),
    # One class of probability targets: the gradient p*S - w*q' is pure cancellation (0 but for the
    # z-loss/softcap terms), so fp32 rounding of O(1) terms dominates the small result.
    tol=lambda opts, shape: 1e-4 if opts.get("soft") and shape[1] == 1 else 1e-5,
    half_cases=(KERNEL_CASES[0], KERNEL_CASES[9], KERNEL_CASES[11]),
    half_shape=(7, 300),
    fwd_kernel=ce_ops.FWD,
    fwd_budget=6,  # the divisor (ne, sum), its reciprocal, the kernel, the rows' sum, the divide-and-cast
    bwd_budget=2,  # autograd's ones_like and the rescale
    launch_shape=(8, 50),
    compile_cases=(dict(label_smoothing=0.1, z_loss=1e-3), dict(label_smoothing=0.1, z_loss=1e-3,
                                                                  inplace_backward=True)),
    op_inputs=op_inputs,
    kernel_op_samples=kernel_op_samples,
    kernels=ce_ops.cross_entropy_kernels,
    gaps=(("weight", dict(weighted=True, label_smoothing=0.1)),
          ("focal_alpha", dict(focal_alpha="tensor", focal_gamma=1.5)),
          ("target", dict(soft=True, label_smoothing=0.1)),
          ("target", dict(soft=True, only=True))),
)

test_kernel_matches_reference_fp32 = harness.matches_reference(SPEC)
test_kernel_matches_reference_half = harness.matches_reference_half(SPEC)
test_kernel_path_launches_few_ops_and_never_syncs = harness.launches(SPEC)
test_opcheck_kernel_ops = harness.opcheck(SPEC)
test_compile_fullgraph = harness.compile_fullgraph(SPEC)
test_retained_graph_backward_is_right_and_never_changes_a_returned_gradient = harness.retained_graph(SPEC)
test_double_backward_is_refused_loudly = harness.double_backward(SPEC)
test_gradients_the_kernels_do_not_compute = harness.gradient_gaps(SPEC)


def run_both(backend, opts, n, c, reduction, dtype=torch.float32, seed=None, extra=()):
    """The kernel on `dtype` inputs and the float64 reference on the same values: (loss, reference,
    input gradient, reference input gradient)."""
    loss, want, grads, want_grads = harness.run_both(SPEC, backend, opts, (n, c, *extra), reduction, dtype, seed)
    return loss, want, grads["input"], want_grads["input"]


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


def test_kernel_op_rejects_a_bad_grad_factor(kernel_backend):
    # The contract: a 0-dim float32 tensor given exactly with grad, on both backends alike, through the
    # library's call path.
    device = device_for(kernel_backend)
    fwd = ce_ops.FWD[kernel_backend]
    x, t, _ = make_inputs(3, 9, device=device)
    loss, stats, grad = torch.empty(3, device=device), torch.empty(3, 4, device=device), torch.empty_like(x)
    options = dict(ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=0.0, focal_gamma=0.0, focal_alpha=1.0)
    with pytest.raises(TypeError, match="grad_factor must have dtype"):
        fwd(x, t, None, None, None, torch.ones((), device=device, dtype=torch.float64), loss, stats, grad, **options)
    with pytest.raises(ValueError, match="grad_factor must be a 0-dim tensor"):
        fwd(x, t, None, None, None, torch.ones(1, device=device), loss, stats, grad, **options)
    with pytest.raises(ValueError, match="grad_factor must be given exactly when grad is"):
        fwd(x, t, None, None, None, None, loss, stats, grad, **options)
    with pytest.raises(ValueError, match="grad_factor must be given exactly when grad is"):
        fwd(x, t, None, None, None, torch.ones((), device=device), loss, stats, None, **options)


BAD_CONTRACT = [
    (lambda x, t, w: dict(logits=x.t()), "logits must have unit column stride"),
    (lambda x, t, w: dict(target=t.to(torch.int32)), "class target must be a contiguous int64"),
    (lambda x, t, w: dict(weight=w.double()), "weight must be a contiguous fp32"),
    (lambda x, t, w: dict(weight=w, weight_sum=None, label_smoothing=0.1), "weight_sum must be given exactly"),
    (lambda x, t, w: dict(weight_sum=w.sum()), "weight_sum must be given exactly"),
    (lambda x, t, w: dict(loss=torch.empty(2, device=x.device)),
     r"loss must be a contiguous fp32 tensor of shape \(3,\)"),
    (lambda x, t, w: dict(stats=torch.empty(3, 3, device=x.device)), "stats must be a contiguous fp32"),
    (lambda x, t, w: dict(grad=torch.empty(3, 8, device=x.device)), "grad must match logits"),
    (lambda x, t, w: dict(label_smoothing=1.5), r"label_smoothing must be in \[0, 1\]"),
    (lambda x, t, w: dict(softcap=float("inf")), "softcap finite"),
    (lambda x, t, w: dict(target=torch.softmax(x, 1), focal_gamma=2.0), "focal options need class-index targets"),
]


@pytest.mark.parametrize("bad,message", BAD_CONTRACT)
def test_kernel_op_contract_is_checked_on_every_backend(kernel_backend, bad, message):
    device = device_for(kernel_backend)
    x, t, w = make_inputs(3, 9, device=device)
    args = dict(logits=x, target=t, weight=None, weight_sum=None, alpha=None,
                grad_factor=torch.ones((), device=device), loss=torch.empty(3, device=device),
                stats=torch.empty(3, 4, device=device), grad=torch.empty_like(x), ignore_index=-100,
                label_smoothing=0.0, z_loss=0.0, softcap=0.0, focal_gamma=0.0, focal_alpha=1.0)
    args.update(bad(x, t, w))
    with pytest.raises(ValueError, match=message):
        ce_ops.FWD[kernel_backend](**args)


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


def test_ignored_row_with_masked_class_has_zero_gradient(any_backend):
    device = device_for(any_backend)
    x = torch.randn(3, 8, device=device)
    x[1, 0] = float("-inf")  # the ignored row: nothing in it may leak into the gradient
    x.requires_grad_(True)
    t = torch.tensor([2, -100, 5], device=device)
    lf.cross_entropy(x, t, focal_gamma=0.5, label_smoothing=0.1, backend=any_backend).backward()
    assert torch.isfinite(x.grad).all() and torch.equal(x.grad[1], torch.zeros_like(x.grad[1]))


# ---- NaN and inf logits -------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
NONFINITE_CASES = (
    dict(),
    dict(weighted=True),
    dict(label_smoothing=0.1),
    dict(label_smoothing=0.2, weighted=True),
    dict(z_loss=1e-3),
    dict(softcap=3.0),
    dict(focal_gamma=2.0),
    dict(focal_gamma=0.5, focal_alpha="tensor"),
    dict(focal_gamma=2.0, label_smoothing=0.1, z_loss=1e-3, softcap=8.0, weighted=True),
    dict(soft=True),
    dict(soft=True, weighted=True, label_smoothing=0.1, z_loss=1e-3, softcap=6.0),
)
IGNORED_ROW = 8  # holds NaN and +inf; every row after it is finite


def nonfinite_rows(c, soft, seed):
    """(logits, target, class weights, focal alphas): one row per case, then finite rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, c, generator=g) * 3
    t = torch.randint(0, c, (12,), generator=g)
    t[:8] = torch.tensor([1, 2, 3, 4, 5, 6, c - 1, 1])
    x[0, 0] = NAN                   # off the target
    x[1, 2] = NAN                   # on the target
    x[2, c - 1] = INF               # off the target (the last lane of a chunk or row)
    x[3, 4] = INF                   # on the target
    x[4, 0] = -INF                  # legal: finite loss
    x[5, 6] = -INF                  # legal: the target has no mass, loss inf
    x[6, :] = -INF                  # NaN beside nothing but -inf: a max that drops NaN sees -inf
    x[6, 3] = NAN
    x[7, 8:24] = -INF               # NaN beside -inf in its 16-byte packets, finite logits elsewhere
    x[7, 13] = NAN
    x[IGNORED_ROW, 0], x[IGNORED_ROW, 1] = NAN, INF
    t[IGNORED_ROW] = -100
    if soft:
        t = torch.softmax(torch.randn(12, c, generator=g), dim=1)
    return x, t, torch.rand(c, generator=g) + 0.5, torch.rand(c, generator=g)


@pytest.mark.parametrize("chunked", [False, True], ids=["row", "chunks"])
@pytest.mark.parametrize("opts", NONFINITE_CASES, ids=str)
def test_nonfinite_logits_match_the_reference(kernel_backend, max_mode, monkeypatch, opts, chunked):
    # Loss and gradient per row, for every reduction: NaN where the float64 reference (and torch)
    # give NaN, inf where they give inf, the same values elsewhere; an ignored row's NaN and inf stay
    # out of 'mean' and 'sum' and out of every gradient. The chunked walk (small chunks) carries the
    # NaN across chunks; a NaN-dropping max (a GPU's) must not lose it.
    if chunked:
        if kernel_backend != "triton":
            pytest.skip("the chunk size knob is the Triton kernel's")
        monkeypatch.setenv("LOSSFORGE_TRITON_CHUNK", "16")
        monkeypatch.setenv("LOSSFORGE_TRITON_CHUNK_WARPS", "1")
    opts = dict(opts)
    soft, weighted = opts.pop("soft", False), opts.pop("weighted", False)
    device = device_for(kernel_backend)
    x, t, w, alpha = nonfinite_rows(40, soft, seed=len(str(opts)))
    w = w if weighted else None
    if opts.get("focal_alpha") == "tensor":
        opts["focal_alpha"] = alpha
    for rows in (slice(None), slice(IGNORED_ROW, None)):  # every case; only the ignored row's NaN
        for reduction in REDUCTIONS:
            xk = x[rows].to(device).requires_grad_(True)
            on = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in opts.items()}
            loss = lf.cross_entropy(xk, t[rows].to(device), None if w is None else w.to(device), reduction=reduction,
                                    backend=kernel_backend, **on)
            loss.sum().backward()
            x64 = x[rows].double().requires_grad_(True)
            want = lf.cross_entropy(x64, t[rows].double() if soft else t[rows], w, reduction=reduction,
                                    backend="reference", **opts)
            want.sum().backward()
            what = f"{reduction} rows {rows}"
            torch.testing.assert_close(loss.cpu().double(), want, rtol=1e-5, atol=1e-6, equal_nan=True, msg=what)
            torch.testing.assert_close(xk.grad.cpu().double(), x64.grad, rtol=1e-5, atol=1e-6, equal_nan=True,
                                       msg=what)
            if rows == slice(None) and reduction == "none":  # the inputs are what the test is about
                nan_rows = [0, 1, 6, 7] if "softcap" in opts else [0, 1, 2, 3, 6, 7]  # softcap(+inf) is finite
                assert loss[nan_rows].isnan().all() and xk.grad[nan_rows].isnan().all()


@pytest.mark.parametrize("opts", [dict(), dict(weighted=True), dict(label_smoothing=0.1), dict(soft=True),
                                  dict(soft=True, weighted=True, label_smoothing=0.2)], ids=str)
def test_reference_nonfinite_rows_are_torchs(opts):
    # The reference the kernels are held to gives torch's NaN, inf and values per row, loss and
    # gradient, but for an ignored row's gradient: torch's is NaN when the row holds a NaN or +inf
    # (its softmax times a zero gradient), the library's is 0 (ignored rows are never read).
    soft, weighted = opts.get("soft", False), opts.get("weighted", False)
    eps = opts.get("label_smoothing", 0.0)
    x, t, w, _ = nonfinite_rows(40, soft, seed=5)
    x, w = x.double(), (w.double() if weighted else None)
    t = t.double() if soft else t
    for reduction in REDUCTIONS:
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        got = lf.cross_entropy(x1, t, w, reduction=reduction, label_smoothing=eps, backend="reference")
        want = F.cross_entropy(x2, t, w, reduction=reduction, label_smoothing=eps)
        got.sum().backward()
        want.sum().backward()
        torch.testing.assert_close(got, want, equal_nan=True, msg=reduction)
        counted = torch.arange(12) != IGNORED_ROW if not soft else torch.ones(12, dtype=torch.bool)
        torch.testing.assert_close(x1.grad[counted], x2.grad[counted], equal_nan=True, msg=reduction)
        assert soft or torch.equal(x1.grad[IGNORED_ROW], torch.zeros(40, dtype=x.dtype))


def _mixed_rows():
    x = torch.randn(3, 6, dtype=torch.float64)
    x[0, 2], x[1, 0], x[2, 4] = INF, NAN, -INF
    return x, torch.tensor([1, -100, 4])


def test_reference_z_loss_row_with_inf_logit_is_nan():
    # as its cross-entropy is (torch.logsumexp's +inf would make it inf)
    x, t = _mixed_rows()
    rows = lf.cross_entropy(x, t, reduction="none", z_loss=1e-3, backend="reference")
    assert rows[0].isnan() and rows[1] == 0 and rows[2] == INF


def test_reference_softcap_keeps_an_ignored_rows_nan_out_of_the_gradient():
    x, t = _mixed_rows()
    x.requires_grad_(True)
    lf.cross_entropy(x, t, reduction="sum", softcap=3.0, backend="reference").backward()
    assert torch.equal(x.grad[1], torch.zeros(6, dtype=x.dtype)) and x.grad[2].isfinite().all()


def test_reference_focal_minus_inf_target_has_the_limit_gradient():
    # an infinite loss and the finite gradient of its limit, F (p - onehot), not 0 * inf = NaN
    x, t = _mixed_rows()
    xg = x[2:].clone().requires_grad_(True)
    loss = lf.cross_entropy(xg, t[2:], reduction="sum", focal_gamma=2.0, focal_alpha=0.25, backend="reference")
    loss.backward()
    assert loss == INF
    torch.testing.assert_close(xg.grad, 0.25 * (torch.softmax(x[2:], 1) - F.one_hot(t[2:], 6)))
