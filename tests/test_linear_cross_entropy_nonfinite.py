"""Linear cross-entropy with NaN or inf in the input, the weight or the bias: the kernel backends
give, row by row, the NaN and inf of the float64 reference (itself torch's, see
test_reference_nonfinite_is_torchs) for the loss and for the input, weight and bias gradients,
whatever a NaN does to the device's max (tests/test_row_softmax.py's max_mode)."""
import pytest
import torch
import torch.nn.functional as F

import lossforge_kernels as lf
from tests.conftest import device_for
from tests.test_row_softmax import max_mode  # noqa: F401 (a fixture)

NAN, INF = float("nan"), float("inf")
REDUCTIONS = ["none", "mean", "sum"]
N, D, V = 6, 8, 37
IGNORED_ROW = 5


def base_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) / 2
    b = torch.randn(V, generator=g, dtype=torch.float64)
    t = torch.randint(0, V, (N,), generator=g)
    t[IGNORED_ROW] = -100
    return x, w, b, t


def poisoned(where):
    """Inputs with one NaN or inf: in a hidden row, in the ignored row, in a weight row or in the bias."""
    x, w, b, t = base_inputs(seed=len(where))
    if where == "nan hidden row":
        x[1, 3] = NAN
    elif where == "inf hidden row":
        x[2, 0] = INF  # logits of both signs of inf in that row: NaN, as torch
    elif where == "nan ignored row":
        x[IGNORED_ROW, 2] = NAN
    elif where == "nan weight row":
        w[4, 1] = NAN  # class 4's logit is NaN in every row
    elif where == "inf bias":
        b[7] = INF     # every row has a +inf logit
    elif where == "-inf bias":
        b[7] = -INF    # legal: class 7 has no mass
        t[0] = 7       # row 0's target: loss inf
    return x, w, b, t


CASES = ("nan hidden row", "inf hidden row", "nan ignored row", "nan weight row", "inf bias", "-inf bias")
OPTIONS = (dict(), dict(label_smoothing=0.1), dict(z_loss=1e-3, softcap=5.0), dict(focal_gamma=2.0),
           dict(chunk_size=2, label_smoothing=0.1, z_loss=1e-3))


def run(backend, x, w, b, t, reduction, opts, device, dtype):
    xs = [v.detach().to(device=device, dtype=dtype, copy=True).requires_grad_(True) for v in (x, w, b)]
    loss = lf.linear_cross_entropy(xs[0], xs[1], t.to(device), linear_bias=xs[2], reduction=reduction,
                                   backend=backend, **opts)
    loss.sum().backward()
    return [loss] + [v.grad for v in xs]


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
@pytest.mark.parametrize("where", CASES)
def test_kernel_nonfinite_matches_the_reference(kernel_backend, max_mode, where, opts):
    x, w, b, t = poisoned(where)
    device = device_for(kernel_backend)
    ref_opts = {k: v for k, v in opts.items() if k != "chunk_size"}
    for reduction in REDUCTIONS:
        got = run(kernel_backend, x, w, b, t, reduction, opts, device, torch.float32)
        want = run("reference", x, w, b, t, reduction, ref_opts, "cpu", torch.float64)
        for name, a, e in zip(("loss", "input grad", "weight grad", "bias grad"), got, want):
            torch.testing.assert_close(a.cpu().double(), e, rtol=1e-4, atol=1e-5, equal_nan=True,
                                       msg=f"{name} {reduction}")
    rows = run(kernel_backend, x, w, b, t, "none", opts, device, torch.float32)[0].cpu()
    nan_rows = {"nan hidden row": [1], "inf hidden row": [2], "nan weight row": [0, 1, 2, 3, 4],
                "inf bias": [0, 1, 2, 3, 4]}.get(where, [])
    if "softcap" in opts and where in ("inf hidden row", "inf bias"):
        nan_rows = []  # softcap(+-inf) is finite
    assert torch.equal(rows.isnan().nonzero().flatten(), torch.tensor(nan_rows, dtype=torch.long)), rows


@pytest.mark.parametrize("where", CASES)
def test_reference_nonfinite_is_torchs(where):
    # torch.nn.functional.linear_cross_entropy's loss, and autograd through torch's own
    # cross_entropy for the gradients, but where an ignored row holds a NaN: torch's logit gradient
    # of that row is NaN (its softmax times a zero gradient), so its input, weight and bias gradients
    # are NaN everywhere; the library's is 0 (ignored rows are never read), so that row's input
    # gradient is 0, the bias gradient is finite and the weight gradient is NaN only in the columns
    # of the row's NaN features (0 times NaN in the product with the input).
    x, w, b, t = poisoned(where)
    for reduction in REDUCTIONS:
        for smoothing in (0.0, 0.1):
            got = run("reference", x, w, b, t, reduction, dict(label_smoothing=smoothing), "cpu", torch.float64)
            xs = [v.clone().requires_grad_(True) for v in (x, w, b)]
            want = F.cross_entropy(F.linear(*xs), t, reduction=reduction, label_smoothing=smoothing)
            want.sum().backward()
            torch.testing.assert_close(got[0], want, equal_nan=True)
            torch.testing.assert_close(got[0], F.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction,
                                                                      label_smoothing=smoothing), equal_nan=True)
            counted = torch.arange(N) != IGNORED_ROW
            torch.testing.assert_close(got[1][counted], xs[0].grad[counted], equal_nan=True)
            if where == "nan ignored row":
                assert torch.equal(got[1][IGNORED_ROW], torch.zeros(D, dtype=x.dtype)) and got[3].isfinite().all()
                assert torch.equal(got[2].isnan(), x[IGNORED_ROW].isnan().expand(V, D))
                assert xs[1].grad.isnan().all() and xs[2].grad.isnan().all()
                continue
            torch.testing.assert_close(got[2], xs[1].grad, equal_nan=True)
            torch.testing.assert_close(got[3], xs[2].grad, equal_nan=True)
