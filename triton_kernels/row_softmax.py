# The row-softmax core in Triton: what every softmax-over-a-row kernel shares. Names and formulas
# are documented once, in lossforge_kernels/reference/row_softmax.py; csrc/row_softmax.cuh is the
# same core in CUDA. The cross-entropy kernels use it today; fused linear cross-entropy (rows from
# matrix-product tiles) and InfoNCE (rows and columns of scaled similarities) are meant to.
# All arithmetic is fp32. Functions are inlined into the kernels that call them.
import triton
import triton.language as tl

from .math import log1p, tanh_and_slope

NEG_INF = tl.constexpr(float("-inf"))  # jit code may read only constexpr globals
POS_INF = tl.constexpr(float("inf"))


@triton.jit
def cap_logit(x, mask, softcap, inv_softcap, SOFTCAP: tl.constexpr):
    """Loaded logits -> fp32 y after the optional softcap (lanes past the row stay -inf), and dy/dx."""
    x = x.to(tl.float32)
    if SOFTCAP:
        th, slope = tanh_and_slope(x * inv_softcap)
        return tl.where(mask, softcap * th, NEG_INF), slope
    else:
        return x, 1.0


@triton.jit
def safe_max(m):
    """m, or 0 where m is -inf (a row or part with nothing in it), so that y - m is never -inf - -inf."""
    return tl.where(m == NEG_INF, 0.0, m)


@triton.jit
def online_step(m, s_lanes, y, keep):
    """Adds one chunk y to the online log-sum-exp of a row: a scalar max m and per-lane sums s_lanes
    of exp(y - m) over the lanes where `keep` (the target is left out of s for class rows).
    Returns (m, s_lanes) after the chunk."""
    m_new = tl.maximum(m, tl.max(y, axis=0))
    m_safe = safe_max(m_new)
    return m_new, s_lanes * tl.exp(m - m_safe) + tl.where(keep, tl.exp(y - m_safe), 0.0)


@triton.jit
def merge(m_a, s_a, m_b, s_b):
    """Two partial (max, sum of exp(y - max)) results of the same row(s) as one."""
    m = tl.maximum(m_a, m_b)
    m_safe = safe_max(m)
    return m, s_a * tl.exp(m_a - m_safe) + s_b * tl.exp(m_b - m_safe)


@triton.jit
def online_moment_step(m, s_lanes, u_lanes, y):
    """online_step over every lane, plus per-lane sums u_lanes of exp(y - m) (y - m): the softmax's
    first moment E[y] - m = u / s (the entropy is log s - u / s, a sum of non-negative terms, with
    no cancellation at large logits). When m grows by d, each old (y - m) term loses d:
    u <- (u - d s) exp(-d). A -inf lane adds 0 to u, a NaN lane NaN."""
    m_new = tl.maximum(m, tl.max(y, axis=0))
    m_safe = safe_max(m_new)
    rescale = tl.exp(m - m_safe)
    shift = tl.where(m == NEG_INF, 0.0, m_safe - m)  # old sums of an empty part are 0: no 0 * inf
    e = tl.exp(y - m_safe)
    u_lanes = (u_lanes - shift * s_lanes) * rescale + tl.where(e == 0.0, 0.0, e * (y - m_safe))
    return m_new, s_lanes * rescale + e, u_lanes


# torch.logsumexp's rule, for losses whose rows are log-sum-exps of scores (InfoNCE, SupCon): a +inf
# score makes the lse +inf, not inf - inf = NaN as in a log-softmax (merge above, cross-entropy's rule).
@triton.jit
def lse_shift(m):
    """The shift of a log-sum-exp with max m: m, or 0 where m is +-inf, as torch.logsumexp does: a
    +inf logit makes the lse +inf (not inf - inf = NaN) and the other logits' probabilities 0."""
    return tl.where((m == NEG_INF) | (m == POS_INF), 0.0, m)


@triton.jit
def fold_tile_lse(m, s, y):
    """Folds a tile's rows y (-inf where left out) into the running (max, sum of exp(y - shift(max))).
    A NaN logit reaches the sum (the maximum may skip NaN on a GPU; the exponential does not)."""
    tile_max = tl.max(y, axis=1)
    tile_sum = tl.sum(tl.exp(y - lse_shift(tile_max)[:, None]), axis=1)
    return merge_lse(m, s, tile_max, tile_sum)


@triton.jit
def merge_lse(m_a, s_a, m_b, s_b):
    """Two partial (max, sum of exp(y - shift(max))) of fold_tile_lse as one."""
    m = tl.maximum(m_a, m_b)
    shift = lse_shift(m)
    return m, s_a * lse_rebase(m_a, shift) + s_b * lse_rebase(m_b, shift)


@triton.jit
def lse_rebase(m, shift):
    """exp(shift(m) - shift): moves a sum relative to shift(m) onto the new shift of a max >= m; 0 where
    m is -inf (that sum is 0 or NaN: never 0 * inf from a very negative shift), 1 where m is +inf."""
    return tl.exp(tl.where(m == POS_INF, shift, m) - shift)


@triton.jit
def finish_lse(m, s):
    """The log-sum-exp of a (max, sum) that fold_tile_lse made."""
    return lse_shift(m) + tl.log(s)


@triton.jit
def softplus(v):
    """log(1 + e^v) for any v; inf and NaN pass through (no clamp: a GPU's min drops NaN)."""
    return tl.where(v > 0.0, v + log1p(tl.exp(-v)), log1p(tl.exp(v)))


@triton.jit
def class_row_lse(m, s_excl, y_t):
    """lse of a class row from its max m, the sum s_excl of exp(y_j - m) over j != t and the
    target's y_t (an all -inf row has lse -inf; a NaN y_t gives NaN even when the max skipped it)."""
    return m + tl.log(s_excl + tl.exp(y_t - safe_max(m)))


@triton.jit
def target_log_probs(m, s_excl, y_t):
    """(logp_t, log1mp) of a class row from the same three quantities, through the log-odds
    lr = log(s_excl) - (y_t - m): no cancellation as p_t -> 1, and an all -inf row gives NaN, as
    torch does."""
    lr = tl.log(s_excl) - (y_t - m)
    return -softplus(lr), -softplus(-lr)


@triton.jit
def class_row_grad(lse, ce, log1mp, logp_t, w_t, a_t, W, C, eps, z, gamma, scale, dt,
                   FOCAL: tl.constexpr, Z_LOSS: tl.constexpr):
    """The RowGrad (off, coef, cq0, gt) of a class row: dL/dx_j = (coef exp(y_j - off) - w_j cq0)
    dy_j/dx_j off the target and gt on it (cq1 is 0 for class rows), scale included."""
    eps1 = 1.0 - eps
    epsC = eps / C
    pt = tl.exp(logp_t)
    omp = tl.exp(log1mp)  # 1 - p_t, without cancellation
    q = 1.0
    if FOCAL:
        q = tl.exp(gamma * log1mp)
    f = a_t * q
    zg = 0.0
    if Z_LOSS:
        zg = 2.0 * z * lse
    cp = f * (eps1 * w_t + epsC * W) + zg  # the coefficient of p_j
    ce_dF = 0.0
    off = lse
    coef = scale * cp
    if FOCAL:
        dF = a_t * gamma * q * pt
        ce_dF = tl.where(dF != 0.0, ce * dF, 0.0)  # no 0 * inf when the target logit is -inf
        via_r = log1mp > NEG_INF  # exp(y_j - off) is then r_j = p_j / (1 - p_t)
        off = tl.where(via_r, lse + log1mp, lse)
        coef = tl.where(via_r, scale * (cp * omp + ce_dF), coef)
    gt = scale * dt * (f * (-eps1 * w_t * omp + epsC * (W * pt - w_t)) - ce_dF + zg * pt)
    return off, coef, scale * f * epsC, gt


@triton.jit
def soft_row_grad(lse, S, C, eps, z, scale, Z_LOSS: tl.constexpr):
    """The RowGrad (off, coef, cq0, cq1) of a probability-target row, scale included (no target term)."""
    coef = S
    if Z_LOSS:
        coef += 2.0 * z * lse
    return lse, scale * coef, scale * (eps / C), scale * (1.0 - eps)


@triton.jit
def row_grad(v, slope, w_cq, SMOOTH: tl.constexpr):
    """dL/dx of one chunk off the target from v = coef exp(y - off): (v - w_cq) dy/dx, where w_cq
    is w_j (cq1 q_j + cq0), the smoothing/target term (left out when there is none)."""
    if SMOOTH:
        v -= w_cq
    return v * slope
