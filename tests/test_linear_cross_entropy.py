"""Linear cross-entropy: the reference against torch's formula, the fused kernel op against the
reference (the shared harness and what is particular to it: chunks, no full logits, autocast, tied
weights), bad input, the module."""
import math

import pytest
import torch
import torch.nn.functional as F

import lossforge_kernels as lf
from lossforge_kernels.ops import cross_entropy as ce_ops
from lossforge_kernels.ops.linear_cross_entropy import linear_cross_entropy_kernels
from tests import harness
from tests.conftest import HAS_GPU, assert_close_rel, device_for, run_without_host_sync

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


@pytest.mark.parametrize("weight_dtype,bias_dtype,name", [
    (torch.float16, None, "linear_weight"), (torch.float64, None, "linear_weight"),
    (torch.float32, torch.float16, "linear_bias"), (torch.float32, torch.float64, "linear_bias")])
def test_linear_cross_entropy_mixed_dtypes_raise_on_every_backend(any_backend, weight_dtype, bias_dtype, name):
    # torch's F.linear_cross_entropy refuses operands of different dtypes (outside autocast); so does
    # every backend here, naming the argument, before any product runs.
    device = device_for(any_backend)
    x, t = torch.randn(3, 4, device=device), torch.tensor([0, 1, 2], device=device)
    w = torch.randn(5, 4, device=device, dtype=weight_dtype)
    bias = None if bias_dtype is None else torch.randn(5, device=device, dtype=bias_dtype)
    with pytest.raises(TypeError, match=f"{name} must have input's dtype torch.float32"):
        lf.linear_cross_entropy(x, w, t, linear_bias=bias, backend=any_backend)


@pytest.mark.parametrize("reduction,want", [("mean", float("nan")), ("sum", 0.0), ("none", [0.0] * 4)])
def test_linear_cross_entropy_without_classes_gives_torch_results(any_backend, reduction, want):
    # An empty head (V = 0) with every row ignored: torch's nan for 'mean' (0/0), zeros otherwise, and a
    # zero input gradient; never an error from inside the reference.
    device = device_for(any_backend)
    x = torch.randn(4, 6, device=device, requires_grad=True)
    w = torch.empty(0, 6, device=device, requires_grad=True)
    t = torch.full((4,), -100, device=device)
    loss = lf.linear_cross_entropy(x, w, t, reduction=reduction, backend=any_backend)
    torch.testing.assert_close(loss.cpu(), torch.tensor(want), equal_nan=True)
    if hasattr(F, "linear_cross_entropy"):  # torch's own, where this torch has it
        torch.testing.assert_close(loss.cpu(), F.linear_cross_entropy(x.detach().cpu(), w.detach().cpu(), t.cpu(),
                                                                      reduction=reduction), equal_nan=True)
    if reduction != "mean":
        loss.sum().backward()
        assert torch.equal(x.grad, torch.zeros_like(x)) and w.grad.shape == w.shape


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


# ---- the fused op against the reference (tests/harness.py) ---------------------------------------

LOSS_OPTIONS = ("label_smoothing", "z_loss", "softcap", "focal_gamma", "focal_alpha", "ignore_index", "chunk_size",
                "fp32_weight_grad")


def make(shape, opts, dtype, device, generator):
    """linear_cross_entropy's inputs for shape (N, D, V) (or (B, T, D, V)); opts: the loss's options
    plus `bias`, `weighted` and focal_alpha="tensor"."""
    *lead, d, v = shape
    x = torch.randn(*lead, d, generator=generator).to(dtype).to(device)
    w = (torch.randn(v, d, generator=generator) / d**0.5 * 3).to(dtype).to(device)
    b = (torch.randn(v, generator=generator) * 0.5).to(dtype).to(device) if opts.pop("bias", False) else None
    t = torch.randint(0, v, tuple(lead), generator=generator)
    t.view(-1)[1::5] = -100  # some ignored rows, never the first
    cw = (torch.rand(v, generator=generator) + 0.5).to(device) if opts.pop("weighted", False) else None
    alpha = opts.pop("focal_alpha", None)
    if alpha == "tensor":
        alpha = torch.rand(v, generator=generator).to(device)
    unknown = set(opts) - set(LOSS_OPTIONS)
    assert not unknown, unknown

    def call(ts, backend, reduction):
        return lf.linear_cross_entropy(ts["input"], ts["linear_weight"], ts["target"], linear_bias=ts["linear_bias"],
                                       weight=ts["weight"], focal_alpha=ts["focal_alpha"], reduction=reduction,
                                       backend=backend, **opts)

    tensors = {"input": x, "linear_weight": w, "linear_bias": b, "target": t.to(device), "weight": cw,
               "focal_alpha": alpha}
    return harness.Sample(tensors, ("input", "linear_weight") + (("linear_bias",) if b is not None else ()), call)


def op_inputs(device):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(6, 8, generator=g), torch.randn(11, 8, generator=g), torch.randn(11, generator=g)
    t = torch.randint(0, 11, (6,), generator=g)
    cw = torch.rand(11, generator=g) + 0.5
    tensors = tuple(a.to(device) for a in (x, w, b, t, cw, cw.sum(), torch.rand(11, generator=g)))
    return tensors, (-100, 0.1, 1e-3, 3.0, 2.0, 1.0, 4, True)


LINEAR_CASES = (
    dict(chunk_size=7),
    dict(bias=True, chunk_size=16),
    dict(bias=True, label_smoothing=0.1, weighted=True, chunk_size=5),
    dict(z_loss=1e-3, softcap=6.0, chunk_size=40),
    dict(focal_gamma=2.0, focal_alpha="tensor", bias=True),
    dict(focal_gamma=0.5, focal_alpha=0.25, label_smoothing=0.2, z_loss=1e-4, softcap=9.0, weighted=True, bias=True,
         chunk_size=9),
    dict(fp32_weight_grad=False, bias=True, chunk_size=11),
)

SPEC = harness.KernelSpec(
    family="linear_cross_entropy",
    make=make,
    cases=LINEAR_CASES,
    shapes=((37, 16, 53), (5, 1, 3), (2, 9, 24, 31)),  # partial last chunks, D=1, a (B, T, D) input
    half_cases=(LINEAR_CASES[2], LINEAR_CASES[5]),
    half_shape=(40, 32, 301),
    # three products per chunk round to the half dtype, on top of the loss's output rounding
    half_tol=lambda dtype: 8 * (2**-8 if dtype == torch.bfloat16 else 2**-11),
    fwd_kernel=ce_ops.FWD,
    fwd_budget=16,  # one chunk: divisor, its reciprocal, zeroed accumulators, 3 products, the kernel, sums
    bwd_budget=3,   # autograd's ones_like and one rescale per gradient (input and weight: no bias here)
    bwd_rescales=2,
    launch_shape=(24, 16, 40),
    compile_cases=(dict(bias=True, label_smoothing=0.1, chunk_size=10),),
    op_inputs=op_inputs,
    kernel_op_samples=lambda device: [],
    kernels=linear_cross_entropy_kernels,
    gaps=(("weight", dict(weighted=True, label_smoothing=0.1)),
          ("focal_alpha", dict(focal_alpha="tensor", focal_gamma=1.5))),
)

test_fused_matches_reference_fp32 = harness.matches_reference(SPEC)
test_fused_matches_reference_half = harness.matches_reference_half(SPEC)
test_fused_launches_and_never_syncs = harness.launches(SPEC)
test_opcheck_builder_ops = harness.opcheck(SPEC)
test_compile_fullgraph = harness.compile_fullgraph(SPEC)
test_retained_graph_backward_is_right_and_never_changes_a_returned_gradient = harness.retained_graph(SPEC)
test_double_backward_is_refused_loudly = harness.double_backward(SPEC)
test_gradients_the_kernels_do_not_compute = harness.gradient_gaps(SPEC)


class CreatedTensors(torch.utils._python_dispatch.TorchDispatchMode):
    """The shapes of every tensor an op creates inside the region (outputs, out= buffers included)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.shapes.append((func.overloadpacket.__name__, tuple(t.shape)))
        return out


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fused_op_never_creates_the_full_logits(kernel_backend, reduction):
    device = device_for(kernel_backend)
    n, d, v, chunk = 96, 12, 70, 20
    x = torch.randn(n, d, device=device, requires_grad=True)
    w = torch.randn(v, d, device=device, requires_grad=True)
    b = torch.randn(v, device=device, requires_grad=True)
    t = torch.randint(0, v, (n,), device=device)
    with CreatedTensors() as created:
        loss = lf.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, label_smoothing=0.1,
                                       chunk_size=chunk, backend=kernel_backend)
        loss.backward(torch.rand_like(loss) + 0.5)
    biggest = max(math.prod(shape) for _, shape in created.shapes)
    assert biggest < n * v, f"a tensor of {biggest} elements (N x V = {n * v}): {created.shapes}"
    # the largest ones are the chunks of logits (and the weight-sized gradients)
    assert max(math.prod(s) for op, s in created.shapes if s[-1:] == (v,)) <= chunk * v
    want = lf.linear_cross_entropy(x.detach().double(), w.detach().double(), t, linear_bias=b.detach().double(),
                                   reduction=reduction, label_smoothing=0.1, backend="reference")
    assert_close_rel(loss, want, 1e-5, "loss")


def test_fused_op_without_input_or_weight_gradients(kernel_backend):
    device = device_for(kernel_backend)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(30, 8, generator=g).to(device)
    w = torch.randn(21, 8, generator=g).to(device)
    t = torch.randint(0, 21, (30,), generator=g).to(device)
    for grads in (("input",), ("linear_weight",), ()):
        xs = x.clone().requires_grad_("input" in grads)
        ws = w.clone().requires_grad_("linear_weight" in grads)
        loss = lf.linear_cross_entropy(xs, ws, t, chunk_size=8, z_loss=1e-3, backend=kernel_backend)
        want = lf.linear_cross_entropy(x.double(), w.double(), t, z_loss=1e-3, backend="reference")
        assert_close_rel(loss, want, 1e-5, f"loss {grads}")
        if grads:
            leaf = xs if grads == ("input",) else ws
            (got,) = torch.autograd.grad(loss, leaf)
            ref_leaf = (x if grads == ("input",) else w).double().requires_grad_(True)
            args = (ref_leaf, w.double()) if grads == ("input",) else (x.double(), ref_leaf)
            (expected,) = torch.autograd.grad(lf.linear_cross_entropy(*args, t, z_loss=1e-3, backend="reference"),
                                              ref_leaf)
            assert_close_rel(got, expected, 1e-5, f"grad {grads}")


def test_fused_op_with_a_weight_tied_to_an_embedding(kernel_backend):
    # The head's weight is also the embedding table: both uses' gradients add up in one .grad.
    device = device_for(kernel_backend)
    g = torch.Generator().manual_seed(6)
    table = torch.randn(25, 8, generator=g).to(device)
    tokens = torch.randint(0, 25, (4, 9), generator=g).to(device)
    results = []
    for backend in (kernel_backend, "reference"):
        emb = torch.nn.Embedding.from_pretrained(table.clone(), freeze=False)
        hidden = torch.tanh(emb(tokens[:, :-1]))
        loss = lf.linear_cross_entropy(hidden, emb.weight, tokens[:, 1:], chunk_size=6, backend=backend)
        loss.backward()
        results.append((loss, emb.weight.grad))
    assert_close_rel(results[0][0], results[1][0], 1e-5, "loss")
    assert_close_rel(results[0][1], results[1][1], 1e-5, "tied weight grad")


def test_fused_op_under_autocast(kernel_backend):
    # fp32 weights and input under autocast: the products in bf16, the loss in fp32, the weight's
    # gradient in fp32 (accumulated in fp32 across chunks), like torch's own autocast of the formula.
    device = device_for(kernel_backend)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(24, 16, generator=g).to(device).requires_grad_(True)
    w = torch.randn(40, 16, generator=g).to(device).requires_grad_(True)
    t = torch.randint(0, 40, (24,), generator=g).to(device)
    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
        loss = lf.linear_cross_entropy(x, w, t, chunk_size=10, backend=kernel_backend)
    assert loss.dtype == torch.float32
    loss.backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    xb, wb = x.detach().bfloat16().double().requires_grad_(True), w.detach().bfloat16().double().requires_grad_(True)
    want = lf.linear_cross_entropy(xb, wb, t, backend="reference")
    want.backward()
    assert_close_rel(loss, want, 2e-2, "loss")
    assert_close_rel(w.grad, wb.grad, 2e-2, "weight grad")
    assert_close_rel(x.grad, xb.grad, 2e-2, "input grad")


def test_automatic_chunk_keeps_the_logits_buffer_bounded():
    from lossforge_kernels.ops._chunks import MAX_CHUNK_BYTES, Chunks

    def step(n, v, dtype, buffers=1):
        return Chunks(torch.empty(n, 1, dtype=dtype, device="meta"), torch.empty(v, 1, dtype=dtype, device="meta"),
                      None, 0, buffers).step

    assert step(8192, 128256, torch.bfloat16) == 1024  # the language-model shape
    assert step(8192, 128256, torch.bfloat16, buffers=2) == 512
    assert step(16384, 256000, torch.bfloat16) == 512
    assert step(4096, 32000, torch.bfloat16) == 4096  # the whole batch fits
    assert step(10, 10**9, torch.float32) == 1  # a vocabulary too big for the budget still runs a row at a time
    for n, v, dtype in ((8192, 128256, torch.bfloat16), (16384, 262144, torch.bfloat16), (4096, 32000, torch.float32),
                        (100, 10**6, torch.bfloat16)):
        size = dtype.itemsize
        assert step(n, v, dtype) * v * size <= max(MAX_CHUNK_BYTES, v * size)


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(chunk_size=0), ValueError, "chunk_size must be a positive number of rows or None"),
    (dict(chunk_size=-3), ValueError, "chunk_size must be a positive number of rows or None"),
    (dict(chunk_size=2.5), TypeError, "chunk_size must be an int"),
    (dict(fp32_weight_grad=1), TypeError, "fp32_weight_grad must be a bool"),
])
def test_fused_op_bad_knobs(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        lf.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]), **kwargs)


def test_ignore_index_none_means_torch_default():
    g = torch.Generator().manual_seed(8)
    x, w = torch.randn(6, 4, dtype=torch.float64, generator=g), torch.randn(9, 4, dtype=torch.float64, generator=g)
    t = torch.randint(0, 9, (6,), generator=g)
    t[2] = -100
    torch.testing.assert_close(lf.linear_cross_entropy(x, w, t, ignore_index=None),
                               F.cross_entropy(x @ w.T, t))


# ---- GPU-only: large shapes, more than 2**31 logits, memory, no host sync --------------------------

gpu_backends = pytest.mark.parametrize("backend", ["cuda", "triton"])
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")


def _skip_unless(backend):
    if not lf.available_backends()[backend].available:
        pytest.skip(lf.available_backends()[backend].reason)


@needs_gpu
@gpu_backends
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.1, z_loss=1e-4, softcap=30.0, focal_gamma=2.0),
                                  dict(reduction="none")])
def test_gpu_bf16_language_model_head_against_the_reference(backend, opts):
    _skip_unless(backend)
    g = torch.Generator(device="cuda").manual_seed(11)
    n, d, v = 2048, 1024, 128256
    x = torch.randn(n, d, device="cuda", generator=g).bfloat16().requires_grad_(True)
    w = (torch.randn(v, d, device="cuda", generator=g) / d**0.5 * 2).bfloat16().requires_grad_(True)
    t = torch.randint(0, v, (n,), device="cuda", generator=g)
    t[::7] = -100
    loss = lf.linear_cross_entropy(x, w, t, backend=backend, **opts)
    go = torch.rand(loss.shape, device="cuda", generator=g) + 0.5
    gx, gw = torch.autograd.grad(loss, (x, w), go.to(loss.dtype))
    x64, w64 = x.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    want = lf.linear_cross_entropy(x64, w64, t, backend="reference", **opts)
    rx, rw = torch.autograd.grad(want, (x64, w64), go)
    assert_close_rel(loss, want, 1e-2, "loss")
    assert_close_rel(gx, rx, 2e-2, "input grad")
    assert_close_rel(gw, rw, 2e-2, "weight grad")


@needs_gpu
@gpu_backends
def test_gpu_more_than_2_31_logits(backend):
    _skip_unless(backend)
    n, d, v = 16896, 32, 131072  # 2.2e9 logits
    g = torch.Generator(device="cuda").manual_seed(12)
    x = torch.randn(n, d, device="cuda", generator=g).bfloat16().requires_grad_(True)
    w = torch.randn(v, d, device="cuda", generator=g).bfloat16().requires_grad_(True)
    t = torch.randint(0, v, (n,), device="cuda", generator=g)
    rows = lf.linear_cross_entropy(x, w, t, reduction="none", backend=backend)
    rows.sum().backward()
    want = torch.empty(n, device="cuda")
    for start in range(0, n, 2048):  # the exact rows, a chunk at a time
        logits = x.detach()[start:start + 2048].float() @ w.detach().float().T
        want[start:start + 2048] = torch.logsumexp(logits, 1) - logits.gather(1, t[start:start + 2048, None])[:, 0]
    assert_close_rel(rows.float(), want, 1e-2, "rows")
    last = x.detach()[-1].float() @ w.detach().float().T  # the last row's input gradient, past 2**31 logits
    p = torch.softmax(last, 0)
    p[t[-1]] -= 1
    assert_close_rel(x.grad[-1].float(), p @ w.detach().float(), 2e-2, "last row's input gradient")


@needs_gpu
@gpu_backends
def test_gpu_peak_memory_is_one_chunk_beyond_inputs_gradients_and_accumulator(backend):
    _skip_unless(backend)
    n, d, v, chunk = 8192, 1024, 32000, 1024
    x = torch.randn(n, d, device="cuda").bfloat16().requires_grad_(True)
    w = (torch.randn(v, d, device="cuda") / 32).bfloat16().requires_grad_(True)
    t = torch.randint(0, v, (n,), device="cuda")
    lf.linear_cross_entropy(x, w, t, chunk_size=chunk, backend=backend).backward()  # warm-up
    x.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    lf.linear_cross_entropy(x, w, t, chunk_size=chunk, backend=backend).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - x.grad.nbytes - w.grad.nbytes - v * d * 4
    limit = chunk * v * 2 + 8 * 2**20  # one chunk of bf16 logits, plus per-row buffers and slack
    assert extra <= limit, f"{extra / 2**20:.1f} MiB beyond inputs, gradients and accumulator > {limit / 2**20:.1f}"


@needs_gpu
@gpu_backends
def test_gpu_fused_op_never_syncs(backend):
    _skip_unless(backend)
    x = torch.randn(512, 256, device="cuda").bfloat16().requires_grad_(True)
    w = torch.randn(5000, 256, device="cuda").bfloat16().requires_grad_(True)
    t = torch.randint(0, 5000, (512,), device="cuda")

    def step():
        for reduction in REDUCTIONS:
            lf.linear_cross_entropy(x, w, t, reduction=reduction, label_smoothing=0.1, chunk_size=128,
                                    backend=backend).sum().backward()

    run_without_host_sync(step)
