"""The row-softmax core's documented formulas (reference/row_softmax.py) against autograd, in float64.

Both kernel backends implement these formulas under the same names; here they are checked on
their own: the per-row loss terms against the reference cross-entropy and the RowGrad gradient
against autograd of it, for every option, plus the online log-sum-exp and its merge.
"""
import contextlib

import pytest
import torch

from lossforge_kernels.reference import cross_entropy as ce_ref
from lossforge_kernels.reference import row_softmax as core

OPTIONS = [
    dict(),
    dict(eps=0.2),
    dict(eps=0.1, weighted=True),
    dict(z=1e-2),
    dict(softcap=3.0),
    dict(gamma=2.0),
    dict(gamma=0.5, alpha=0.3),
    dict(gamma=1.5, alpha="tensor", eps=0.1, z=1e-3, softcap=4.0, weighted=True),
]


def _rows(seed, n=7, c=11):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g, dtype=torch.float64) * 3
    t = torch.randint(0, c, (n,), generator=g)
    x[0, t[0]] = 30.0  # a confident row: p_t -> 1
    return x, t, torch.rand(c, generator=g, dtype=torch.float64) + 0.5, torch.rand(c, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("opts", OPTIONS)
def test_class_rows_loss_and_gradient_match_autograd(opts):
    x, t, w_vec, alpha_vec = _rows(len(str(opts)))
    n, c = x.shape
    eps, z, gamma, cap = opts.get("eps", 0.0), opts.get("z", 0.0), opts.get("gamma", 0.0), opts.get("softcap")
    alpha = alpha_vec if opts.get("alpha") == "tensor" else opts.get("alpha")
    w = w_vec if opts.get("weighted") else None
    scale = 0.37

    xg = x.clone().requires_grad_(True)
    want = ce_ref.cross_entropy_rows(xg, t, w, label_smoothing=eps, z_loss=z, softcap=cap, focal_gamma=gamma,
                                     focal_alpha=alpha)
    (want.sum() * scale).backward()

    y = x if cap is None else cap * torch.tanh(x / cap)
    slope = torch.ones_like(x) if cap is None else 1 - torch.tanh(x / cap) ** 2
    rows = torch.arange(n)
    y_t = y[rows, t]
    excl = y.scatter(1, t[:, None], float("-inf"))
    m, s_excl = core.online_lse(excl, chunk=4)
    m = torch.maximum(m, y_t)  # the kernels' max runs over the target too
    s_excl = torch.exp(excl - m[:, None]).sum(1)
    lse = core.class_row_lse(m, s_excl, y_t)
    logp_t, log1mp = core.target_log_probs(m, s_excl, y_t)
    w_full = torch.ones(c, dtype=x.dtype) if w is None else w
    W, w_t = w_full.sum(), w_full[t]
    ce = (1 - eps) * w_t * -logp_t + eps / c * (W * lse - (w_full * y).sum(1))
    a_t = torch.ones(n, dtype=x.dtype) if alpha is None else alpha[t] if isinstance(alpha, torch.Tensor) \
        else torch.full((n,), alpha, dtype=x.dtype)
    loss = a_t * core.focal_q(log1mp, gamma) * ce + z * lse**2
    torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=1e-12)

    rg = core.class_row_grad(lse, ce, log1mp, logp_t, w_t=w_t, a_t=a_t, W=W, C=c, eps=eps, z=z, gamma=gamma,
                             scale=scale, dt=slope[rows, t])
    grad = core.row_gradient(rg, y, slope, w_full if eps > 0 else torch.ones(c, dtype=x.dtype), target=t)
    torch.testing.assert_close(grad, xg.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("opts", [dict(), dict(eps=0.2, weighted=True, z=1e-2, softcap=3.0)])
def test_probability_rows_gradient_matches_autograd(opts):
    x, _, w_vec, _ = _rows(5)
    n, c = x.shape
    q = torch.softmax(torch.randn(n, c, dtype=x.dtype), 1)
    eps, z, cap = opts.get("eps", 0.0), opts.get("z", 0.0), opts.get("softcap")
    w = w_vec if opts.get("weighted") else None
    xg = x.clone().requires_grad_(True)
    ce_ref.cross_entropy_rows(xg, q, w, label_smoothing=eps, z_loss=z, softcap=cap).sum().backward()
    y = x if cap is None else cap * torch.tanh(x / cap)
    slope = torch.ones_like(x) if cap is None else 1 - torch.tanh(x / cap) ** 2
    w_full = torch.ones(c, dtype=x.dtype) if w is None else w
    S = (w_full * ((1 - eps) * q + eps / c)).sum(1)
    rg = core.soft_row_grad(torch.logsumexp(y, 1), S, C=c, eps=eps, z=z, scale=1.0)
    torch.testing.assert_close(core.row_gradient(rg, y, slope, w_full, q=q), xg.grad, rtol=1e-10, atol=1e-12)


def test_online_lse_and_merge_match_logsumexp_with_masked_chunks():
    y = torch.randn(4, 13, dtype=torch.float64) * 5
    y[1, :6] = float("-inf")  # a whole chunk of -inf, then finite values
    y[2] = float("-inf")      # a row with nothing
    m, s = core.online_lse(y, chunk=3)
    want = torch.logsumexp(y, 1)
    torch.testing.assert_close(m + torch.log(s), want)
    a, b = core.online_lse(y[:, :5], chunk=2), core.online_lse(y[:, 5:], chunk=4)
    mm, ss = core.merge(*a, *b)
    torch.testing.assert_close(mm + torch.log(ss), want)
    assert not torch.isnan(ss).any()



def test_online_step_matches_logsumexp_with_inf_rows_and_nan():
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(6, 11, generator=gen, dtype=torch.float64) * 6
    y[1, :4] = float("-inf")   # the first block holds nothing, the next ones do
    y[2] = float("-inf")       # a row with nothing: lse -inf, and no NaN on the way
    y[3, 7] = float("nan")     # NaN in a later block: the row's lse is NaN
    y[4, 0] = float("nan")     # ... and in the first block
    y[5, 5:] = float("-inf")   # the last blocks hold nothing
    m, s = torch.full((6,), float("-inf"), dtype=y.dtype), torch.zeros(6, dtype=y.dtype)
    for start in range(0, 11, 4):
        m, s = core.online_step(m, s, y[:, start:start + 4])
    torch.testing.assert_close(m + torch.log(s), torch.logsumexp(y, 1), equal_nan=True)
    assert torch.isnan(s[3]) and torch.isnan(s[4]) and s[2] == 0 and not torch.isnan(s[[0, 1, 2, 5]]).any()
    # a +inf value follows cross-entropy's rule (module docstring): NaN, not torch.logsumexp's +inf
    inf_row = torch.tensor([[1.0, float("inf"), 2.0]], dtype=torch.float64)
    m, s = core.online_step(torch.tensor([float("-inf")], dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                            inf_row)
    assert torch.isnan(m + torch.log(s)).all()


try:
    import triton
    import triton.language as tl

    from lossforge_kernels.triton_kernels.row_softmax import merge, online_step

    @triton.jit
    def _lse_in_halves(y_ptr, out_ptr, C, HALF: tl.constexpr, BLOCK: tl.constexpr):
        """Each row's lse from two halves reduced apart and merged, as tiles of a similarity
        matrix will be combined."""
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        m_a, s_a = float("-inf"), tl.zeros([BLOCK], tl.float32)
        for start in range(0, HALF, BLOCK):
            c = start + cols
            m_a, s_a = online_step(m_a, s_a, tl.load(y_ptr + row * C + c, mask=c < HALF, other=float("-inf")), True)
        m_b, s_b = float("-inf"), tl.zeros([BLOCK], tl.float32)
        for start in range(HALF, C, BLOCK):
            c = start + cols
            m_b, s_b = online_step(m_b, s_b, tl.load(y_ptr + row * C + c, mask=c < C, other=float("-inf")), True)
        m, s = merge(m_a, tl.sum(s_a, axis=0), m_b, tl.sum(s_b, axis=0))
        tl.store(out_ptr + row, m + tl.log(s))
except ImportError:
    _lse_in_halves = None


def test_triton_core_online_step_and_merge_match_logsumexp():
    from tests.conftest import device_for, kernel_backends
    if "triton" not in kernel_backends():
        pytest.skip("the Triton backend is not available here")
    device = device_for("triton")
    y = torch.randn(5, 37) * 4
    y[1, :16] = float("-inf")  # the first half holds nothing
    y[3, 16:] = float("-inf")  # the second half holds nothing
    y[4] = float("-inf")
    out = torch.empty(5, device=device)
    _lse_in_halves[(5,)](y.to(device), out, 37, HALF=16, BLOCK=8)
    torch.testing.assert_close(out.cpu(), torch.logsumexp(y, 1))


# A GPU's max and min drop NaN (fmax: max(NaN, x) = x), so no kernel may rely on the maximum to carry
# a NaN; the interpreters differ (Triton 3.9 drops NaN like a GPU in tl.maximum and tl.minimum, 3.6
# propagates it; both reduce tl.max with nanmax). `interpreter_max` makes the interpreter do either,
# so that both behaviours are tested wherever the kernels run interpreted.
MAX_MODES = ("drops_nan", "propagates_nan")


@contextlib.contextmanager
def interpreter_max(mode):
    import numpy as np
    from triton.runtime import interpreter
    builder, reduce_ops = interpreter.InterpreterBuilder, interpreter.ReduceOps
    saved = builder.create_maxnumf, builder.create_minnumf, reduce_ops.min_max
    drops = mode == "drops_nan"
    mx, mn = (np.fmax, np.fmin) if drops else (np.maximum, np.minimum)
    swap = {np.max: np.nanmax, np.min: np.nanmin} if drops else {np.nanmax: np.max, np.nanmin: np.min}
    min_max = saved[2]

    def reduce_min_max(self, input, val_reduce_op, idx_reduce_op=None):
        return min_max(self, input, swap.get(val_reduce_op, val_reduce_op), idx_reduce_op)

    builder.create_maxnumf = lambda self, a, b: self.binary_op(a, b, mx)
    builder.create_minnumf = lambda self, a, b: self.binary_op(a, b, mn)
    reduce_ops.min_max = reduce_min_max
    try:
        yield
    finally:
        builder.create_maxnumf, builder.create_minnumf, reduce_ops.min_max = saved


@pytest.fixture(params=MAX_MODES)
def max_mode(request):
    """Runs the test with the interpreter's max dropping NaN (as a GPU's does) and propagating it; on
    a GPU, once, as the hardware does."""
    from tests.conftest import HAS_GPU, INTERPRET
    if not INTERPRET or HAS_GPU:
        if request.param != "drops_nan":
            pytest.skip("the hardware's own max (it drops NaN)")
        yield request.param
        return
    with interpreter_max(request.param):
        yield request.param


try:
    from lossforge_kernels.triton_kernels.row_softmax import class_row_lse, target_log_probs

    @triton.jit
    def _class_row_quantities(y_ptr, t_ptr, out_ptr, C, HALF: tl.constexpr, BLOCK: tl.constexpr):
        """lse, log p_t and log(1 - p_t) of each row, its halves reduced apart and merged, the target
        kept out of the sum, as the cross-entropy kernels do."""
        row = tl.program_id(0)
        t = tl.load(t_ptr + row)
        cols = tl.arange(0, BLOCK)
        m_a, s_a = float("-inf"), tl.zeros([BLOCK], tl.float32)
        for start in range(0, HALF, BLOCK):
            c = start + cols
            y = tl.load(y_ptr + row * C + c, mask=c < HALF, other=float("-inf"))
            m_a, s_a = online_step(m_a, s_a, y, c != t)
        m_b, s_b = float("-inf"), tl.zeros([BLOCK], tl.float32)
        for start in range(HALF, C, BLOCK):
            c = start + cols
            y = tl.load(y_ptr + row * C + c, mask=c < C, other=float("-inf"))
            m_b, s_b = online_step(m_b, s_b, y, c != t)
        m, s = merge(m_a, tl.sum(s_a, axis=0), m_b, tl.sum(s_b, axis=0))
        y_t = tl.load(y_ptr + row * C + t)
        logp_t, log1mp = target_log_probs(m, s, y_t)
        tl.store(out_ptr + row * 3, class_row_lse(m, s, y_t))
        tl.store(out_ptr + row * 3 + 1, logp_t)
        tl.store(out_ptr + row * 3 + 2, log1mp)
except ImportError:
    _class_row_quantities = None


def test_triton_core_carries_nan_and_inf_whatever_the_max_does(max_mode):
    # Each row has one NaN or +inf somewhere (first or second half, on the target, beside -inf):
    # lse, log p_t and log(1 - p_t) are NaN, as torch's log_softmax gives; -inf logits are legal.
    from tests.conftest import device_for, kernel_backends
    if "triton" not in kernel_backends():
        pytest.skip("the Triton backend is not available here")
    nan, inf = float("nan"), float("inf")
    y = torch.randn(9, 37) * 4
    t = torch.tensor([3, 20, 5, 30, 7, 0, 2, 36, 9])
    y[0, 10] = nan           # first half
    y[1, 33] = nan           # second half
    y[2, 5] = nan            # the target
    y[3, :] = -inf           # only -inf beside it: a max that drops NaN sees -inf
    y[3, 30] = nan
    y[4, 0] = inf
    y[5, 0] = inf            # on the target
    y[6, 1] = -inf           # legal
    y[7, :36] = -inf         # legal: only the target has mass
    y[8] = -inf              # legal: nothing anywhere (lse -inf, log p_t NaN, as torch)
    device = device_for("triton")
    out = torch.empty(9, 3, device=device)
    _class_row_quantities[(9,)](y.to(device), t.to(device), out, 37, HALF=16, BLOCK=8)
    out = out.cpu()
    logp_t = torch.log_softmax(y.double(), 1)[torch.arange(9), t]  # NaN where torch gives NaN
    assert out[:6].isnan().all(), out
    torch.testing.assert_close(out[6:8, 1], logp_t[6:8].float())
    torch.testing.assert_close(out[6:8, 0], torch.logsumexp(y[6:8], 1))
    assert out[7, 2] == -inf and out[8, 0] == -inf and out[8, 1:].isnan().all(), out[7:]


try:
    from lossforge_kernels.triton_kernels.row_softmax import softplus

    @triton.jit
    def _softplus_kernel(v_ptr, out_ptr, n, BLOCK: tl.constexpr):
        c = tl.arange(0, BLOCK)
        tl.store(out_ptr + c, softplus(tl.load(v_ptr + c, mask=c < n)), mask=c < n)
except ImportError:
    _softplus_kernel = None


def test_triton_softplus_passes_nan_and_inf(max_mode):
    from tests.conftest import device_for, kernel_backends
    if "triton" not in kernel_backends():
        pytest.skip("the Triton backend is not available here")
    device = device_for("triton")
    v = torch.tensor([float("nan"), float("inf"), float("-inf"), -3.0, 0.0, 2.5, 100.0, -100.0, 1e30, -1e30])
    out = torch.empty_like(v, device=device)
    _softplus_kernel[(1,)](v.to(device), out, v.numel(), BLOCK=16)
    torch.testing.assert_close(out.cpu(), torch.nn.functional.softplus(v.double()).float(), equal_nan=True)
