"""The Triton contrastive kernel ops (lossforge::contrastive_fwd_triton / contrastive_bwd_triton) against
a dense float64 implementation of their contract (lossforge_kernels/ops/contrastive.py): loss rows,
stats, and the gradients by autograd of sum(grad_rows * rows). Runs on CPU tensors under
TRITON_INTERPRET=1 (tiny tiles, so small shapes cross tile and feature-chunk edges) or on a GPU."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import lossforge_kernels.ops.contrastive  # noqa: F401  (defines the ops)
from lossforge_kernels.ops.contrastive import INFO_NCE, SIGLIP, SUPCON
from lossforge_kernels.reference import contrastive as ref
from tests.conftest import assert_close_rel, device_for, kernel_backends

pytestmark = pytest.mark.skipif("triton" not in kernel_backends(),
                                reason="needs a CUDA GPU, or TRITON_INTERPRET=1 for the Triton kernels on CPU")

SENTINEL = 7.25  # stats rows the forward must leave untouched keep this value


@dataclasses.dataclass(frozen=True)
class Case:
    kind: int
    b: int
    m: int
    d: int
    normalize: bool = True
    symmetric: bool = False
    dtype: torch.dtype = torch.float32
    labels: str = "few"  # SupCon: "few" classes, "singletons", "one" class
    duplicates: bool = False  # repeated rows (and, with normalize, a query row below the norm floor)
    seed: int = 0

    def __str__(self):
        name = {INFO_NCE: "infonce", SUPCON: "supcon", SIGLIP: "siglip"}[self.kind]
        flags = ("n" if self.normalize else "") + ("s" if self.symmetric else "") + ("d" if self.duplicates else "")
        return f"{name}-{self.b}x{self.m}x{self.d}-{flags}-{str(self.dtype)[6:]}-{self.labels}"


CASES = [
    Case(INFO_NCE, 5, 5, 3, symmetric=True),
    Case(INFO_NCE, 37, 70, 33),  # M > B, several tiles each way, two feature chunks
    Case(INFO_NCE, 37, 37, 33, normalize=False, symmetric=True),
    Case(INFO_NCE, 1, 1, 3, symmetric=True),
    Case(INFO_NCE, 1, 7, 100),  # the gradient split in two feature blocks
    Case(INFO_NCE, 20, 20, 100, symmetric=True),
    Case(INFO_NCE, 20, 20, 80, symmetric=True),  # the gradient's width in two segments (64 + 32)
    Case(INFO_NCE, 6, 9, 3, normalize=False),
    Case(INFO_NCE, 17, 23, 16, duplicates=True),
    Case(INFO_NCE, 17, 17, 16, symmetric=True, duplicates=True),
    Case(SUPCON, 37, 37, 33),
    Case(SUPCON, 5, 5, 3, normalize=False, labels="singletons"),
    Case(SUPCON, 1, 1, 3),
    Case(SUPCON, 20, 20, 16, labels="one"),
    Case(SUPCON, 18, 18, 100, normalize=False),
    Case(SUPCON, 18, 18, 80),
    Case(SUPCON, 17, 17, 16, duplicates=True),
    Case(SIGLIP, 37, 70, 33),
    Case(SIGLIP, 5, 5, 3, normalize=False),
    Case(SIGLIP, 1, 3, 100),
    Case(SIGLIP, 9, 20, 80, normalize=False),
    Case(SIGLIP, 17, 23, 16, duplicates=True),
]
LOW_PRECISION_CASES = [
    Case(INFO_NCE, 19, 25, 33, symmetric=False, dtype=torch.float16),
    Case(INFO_NCE, 19, 19, 33, symmetric=True, dtype=torch.bfloat16),
    Case(SUPCON, 19, 19, 33, dtype=torch.float16),
    Case(SIGLIP, 19, 25, 33, dtype=torch.bfloat16),
]


def make_inputs(case: Case, device):
    gen = torch.Generator().manual_seed(1000 + case.seed)
    q = torch.randn(case.b, case.d, generator=gen, dtype=torch.float64)
    k = torch.randn(case.m, case.d, generator=gen, dtype=torch.float64)
    if case.duplicates:
        q[1::3] = q[0]
        k[2::4] = k[1]
        if case.b > 4:
            k[: case.b // 2] = q[: case.b // 2]  # positives identical to their queries
        if case.normalize:
            q[-1] *= 1e-14  # |q| < 1e-12: divided by 1e-12, and the radial gradient term is dropped
    labels = None
    if case.kind == SUPCON:
        k = q
        if case.labels == "singletons":
            labels = torch.randperm(case.b, generator=gen)
        elif case.labels == "one":
            labels = torch.zeros(case.b, dtype=torch.int64)
        else:
            labels = torch.randint(0, max(1, case.b // 4), (case.b,), generator=gen)
            if case.b > 2:
                labels[0] = case.b + 5  # a class of its own
    s = 3.0 if case.normalize else 0.4
    logit_scale = torch.tensor(s, dtype=torch.float32)
    logit_bias = torch.tensor(-1.3, dtype=torch.float32)
    grad_rows = torch.randn(case.b, generator=gen, dtype=torch.float64).to(torch.float32)
    q = q.to(case.dtype)
    k = q if case.kind == SUPCON else k.to(case.dtype)
    return dict(query=q.to(device), key=k.to(device) if case.kind != SUPCON else q.to(device),
                labels=None if labels is None else labels.to(device), logit_scale=logit_scale.to(device),
                logit_bias=logit_bias.to(device), grad_rows=grad_rows.to(device))


def run_ops(case: Case, x, want=("grad_query", "grad_key", "grad_coef")):
    """The forward and backward kernel ops on x; outputs not in `want` are passed as None."""
    q, k = x["query"], x["key"]
    if case.kind == SUPCON:
        k = q
    loss = torch.empty(case.b, dtype=torch.float32, device=q.device)
    stats = torch.full((2, case.b), SENTINEL, dtype=torch.float32, device=q.device)
    torch.ops.lossforge.contrastive_fwd_triton(q, k, x["labels"], x["logit_scale"], x["logit_bias"], loss, stats,
                                               case.kind, case.normalize, case.symmetric)
    grad_query = torch.empty_like(q) if "grad_query" in want else None
    grad_key = torch.empty_like(k) if "grad_key" in want and case.kind != SUPCON else None
    grad_coef = torch.empty(2, case.b, dtype=torch.float32, device=q.device) if "grad_coef" in want else None
    torch.ops.lossforge.contrastive_bwd_triton(x["grad_rows"], q, k, x["labels"], x["logit_scale"], x["logit_bias"],
                                               stats, grad_query, grad_key, grad_coef, case.kind, case.normalize,
                                               case.symmetric)
    return dict(loss=loss, stats=stats, grad_query=grad_query, grad_key=grad_key, grad_coef=grad_coef)


# ---- the contract, densely, in float64 --------------------------------------------------------------

def inverse_norms(x, normalize):
    return 1.0 / x.norm(dim=1).clamp_min(1e-12) if normalize else torch.ones(x.shape[0], dtype=x.dtype)


def dense_loss(q, k, labels, s, b, case: Case):
    """(rows, stats rows that are defined, z, c) with z the pair logits."""
    c = (q * inverse_norms(q, case.normalize)[:, None]) @ (k * inverse_norms(k, case.normalize)[:, None]).T
    z = s * c
    nb = q.shape[0]
    eye = torch.eye(nb, z.shape[1], dtype=torch.bool)
    stats = {}
    if case.kind == INFO_NCE:
        lse = torch.logsumexp(z, dim=1)
        diag = z[:, :nb].diagonal()
        rows = lse - diag
        stats[0] = lse
        if case.symmetric:
            col_lse = torch.logsumexp(z, dim=0)
            rows = 0.5 * (rows + col_lse - diag)
            stats[1] = col_lse
    elif case.kind == SUPCON:
        positive = (labels[:, None] == labels[None, :]) & ~eye
        n = positive.sum(dim=1).to(z.dtype)
        has = n > 0
        others = z.masked_fill(eye, float("-inf"))
        others = torch.where(has[:, None], others, torch.zeros_like(others))  # no -inf-only row (B == 1)
        lse = torch.logsumexp(others, dim=1)
        pos_mean = torch.where(positive, z, torch.zeros_like(z)).sum(dim=1) / n.clamp_min(1)
        rows = torch.where(has, lse - pos_mean, torch.zeros_like(lse))
        stats[0] = torch.where(has, lse, torch.zeros_like(lse))
        stats[1] = n
    else:
        z = z + b
        y = 2.0 * eye.to(z.dtype) - 1.0
        rows = F.softplus(-y * z).sum(dim=1)
    return rows, stats, z, c


def dense_expected(case: Case, x):
    q = x["query"].cpu().double().requires_grad_(True)
    k = q if case.kind == SUPCON else x["key"].cpu().double().requires_grad_(True)
    s = x["logit_scale"].cpu().double().requires_grad_(True)
    b = x["logit_bias"].cpu().double().requires_grad_(True)
    labels = None if x["labels"] is None else x["labels"].cpu()
    rows, stats, z, c = dense_loss(q, k, labels, s, b, case)
    z.retain_grad()
    (x["grad_rows"].cpu().double() * rows).sum().backward()
    dz = z.grad
    return dict(loss=rows.detach(), stats=stats, grad_query=q.grad, grad_key=None if case.kind == SUPCON else k.grad,
                grad_logit_scale=s.grad, grad_logit_bias=b.grad if case.kind == SIGLIP else None,
                grad_coef=torch.stack([(dz * c.detach()).sum(dim=1), dz.sum(dim=1)]))


def check_against_dense(case: Case, got, want, tol):
    what = str(case)
    assert_close_rel(got["loss"].cpu(), want["loss"], tol, f"{what} loss")
    for row in (0, 1):
        if row in want["stats"]:
            assert_close_rel(got["stats"][row].cpu(), want["stats"][row], tol, f"{what} stats[{row}]")
        else:  # left untouched
            assert torch.all(got["stats"][row].cpu() == SENTINEL), f"{what}: stats[{row}] was written"
    for name in ("grad_query", "grad_key"):
        if got[name] is not None:
            assert got[name].dtype == case.dtype
            assert_close_rel(got[name].cpu(), want[name], tol, f"{what} {name}")
    coef = got["grad_coef"].cpu()
    assert_close_rel(coef, want["grad_coef"], tol, f"{what} grad_coef")
    assert_close_rel(coef[0].double().sum(), want["grad_logit_scale"], tol, f"{what} logit_scale gradient")
    if want["grad_logit_bias"] is not None:
        assert_close_rel(coef[1].double().sum(), want["grad_logit_bias"], tol, f"{what} logit_bias gradient")


DEVICE = device_for("triton")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_ops_match_dense_contract(case):
    x = make_inputs(case, DEVICE)
    check_against_dense(case, run_ops(case, x), dense_expected(case, x), 2e-5)


@pytest.mark.parametrize("case", LOW_PRECISION_CASES, ids=str)
def test_low_precision_inputs(case):
    x = make_inputs(case, DEVICE)
    got = run_ops(case, x)
    assert all(got[n].dtype == torch.float32 for n in ("loss", "stats", "grad_coef"))
    check_against_dense(case, got, dense_expected(case, x), 1.5e-2)  # the inputs are exact; outputs rounded


@pytest.mark.parametrize("case", [Case(INFO_NCE, 21, 21, 33, symmetric=True), Case(SUPCON, 21, 21, 33),
                                  Case(SIGLIP, 9, 40, 33)], ids=str)
def test_two_runs_are_bitwise_equal(case):
    x = make_inputs(case, DEVICE)
    first, second = run_ops(case, x), run_ops(case, x)
    for name, value in first.items():
        if value is not None:
            assert torch.equal(value, second[name]), f"{case} {name} differs between runs"


@pytest.mark.parametrize("case", [Case(INFO_NCE, 17, 20, 100), Case(INFO_NCE, 17, 17, 33, symmetric=True),
                                  Case(SUPCON, 9, 9, 33)], ids=str)
def test_optional_outputs(case):
    """Each output alone, or some of them, equal the same outputs of the full call."""
    x = make_inputs(case, DEVICE)
    full = run_ops(case, x)
    for want in (("grad_key",), ("grad_coef",), ("grad_query",), ("grad_query", "grad_key")):
        part = run_ops(case, x, want)
        for name in ("grad_query", "grad_key", "grad_coef"):
            if name not in want:
                assert part[name] is None
            elif full[name] is not None:
                assert torch.equal(part[name], full[name]), f"{case} {name} alone differs"


@pytest.mark.parametrize("kind", [INFO_NCE, SUPCON, SIGLIP])
def test_loss_rows_match_reference(kind):
    case = {INFO_NCE: Case(INFO_NCE, 13, 13, 33, symmetric=True), SUPCON: Case(SUPCON, 13, 13, 33),
            SIGLIP: Case(SIGLIP, 13, 21, 33)}[kind]
    x = make_inputs(case, DEVICE)
    got = run_ops(case, x, want=())["loss"].cpu().double()
    q, k, s = x["query"].cpu().double(), x["key"].cpu().double(), x["logit_scale"].cpu().double()
    if kind == INFO_NCE:
        want = ref.info_nce_rows(q, k, s, symmetric=True, normalize=True)
    elif kind == SUPCON:
        want, _ = ref.supcon_rows(q, x["labels"].cpu(), 1.0 / s, normalize=True)
    else:
        want = ref.siglip_rows(q, k, s, x["logit_bias"].cpu().double(), normalize=True)
    assert_close_rel(got, want, 2e-5, f"{case} loss vs reference")


def test_fp16_gradient_weights_keep_fp32_range_on_gpu():
    """The gradient dot's weights s dZ r'_j (about s / B^2 under 'mean') are not rounded to fp16 on a
    GPU: fp16 inputs take that dot on fp32 operands (tf32, fp32's range), bf16 has fp32's range."""
    from lossforge_kernels.triton_kernels.contrastive import _dot_modes
    assert _dot_modes(torch.float16, interpret=False)[2:] == (True, "tf32")
    assert _dot_modes(torch.bfloat16, interpret=False)[2] is False


def test_fp16_gradients_at_large_batch_magnitudes():
    """grad_rows = 2^10 / 262144 (a 262144-row 'mean' under a 2^10 loss scale) with trained-like rows
    (a close positive each, negatives' probabilities ~1e-6): the pair weights are far below fp16's
    subnormals; each gradient row is within fp16 rounding of the float64 contract's."""
    case = Case(INFO_NCE, 32, 512, 64, dtype=torch.float16)
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(case.b, case.d, generator=gen)
    k = torch.randn(case.m, case.d, generator=gen)
    k[:case.b] = q + 0.3 * torch.randn(case.b, case.d, generator=gen)
    x = dict(query=q.to(torch.float16).to(DEVICE), key=k.to(torch.float16).to(DEVICE), labels=None,
             logit_scale=torch.tensor(1 / 0.07, device=DEVICE), logit_bias=torch.tensor(0.0, device=DEVICE),
             grad_rows=torch.full((case.b,), 2.0**10 / 262144, device=DEVICE))
    got, want = run_ops(case, x), dense_expected(case, x)
    for name in ("grad_query", "grad_key"):
        exact = want[name]
        row_error = ((got[name].cpu().double() - exact).norm(dim=1) / exact.norm(dim=1))
        rounding = ((exact.to(torch.float16).double() - exact).norm(dim=1) / exact.norm(dim=1))
        assert (row_error - rounding).max() < 3e-3, name


@pytest.mark.parametrize("d", [64, 768, 1024])
@pytest.mark.parametrize("case", [Case(INFO_NCE, 48, 48, 0, symmetric=True), Case(INFO_NCE, 32, 48, 0),
                                  Case(SUPCON, 48, 48, 0), Case(SIGLIP, 32, 48, 0)], ids=str)
def test_forward_and_backward_take_at_most_five_products(case, d, dot_work):
    """Every gradient and the learnt scale's in at most 5 B x M x D products (SupCon: 3), counted over
    the dots the kernels run (tile sizes divide the shapes: no padding in the count)."""
    case = dataclasses.replace(case, d=d)
    x = make_inputs(case, DEVICE)
    run_ops(case, x)
    products = sum(dot_work) / (case.b * case.m * d)
    assert products == (3 if case.kind == SUPCON else 5), products
