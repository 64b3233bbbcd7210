# Divergences between a student's and a teacher's softmax over (M, V) logit rows at a temperature T.
#
# One program owns one row of both heads (zs = student / T, zt = teacher / T). The forward streams
# each row once for its online max m and log s (the row-softmax core's `online_step`), then once
# more, both rows side by side, for the per-element terms from the exact log-probabilities
# ls = (zs - ms) - log ss and lt = (zt - mt) - log st (no cancellation of large lse's):
#   kl          pt (lt - ls)                       d/dzs: ps - pt
#   reverse_kl  ps (ls - lt)                       d/dzs: ps (G - Gbar), G = ls - lt
#   jsd         beta pt (lt - lm) + (1 - beta) ps (ls - lm), lm = log(beta pt + (1 - beta) ps)
#                                                  d/dzs: ps (G - Gbar), G = (1 - beta)(ls - lm)
# with Gbar = sum_j ps_j G_j, the row's reverse KL (jsd: (1 - beta) KL(ps || m)); p log p terms are 0
# where p is 0. With a gradient wanted (reduction 'mean'/'sum'), a third pass writes it times the
# gradient factor / T; the backward op (reduction 'none') makes that pass alone from the saved
# [ms, log ss, mt, log st, Gbar]. Masked rows (target == ignore_index) are not read: loss and
# gradient 0. The gradient may be written over the student's logits (each chunk is loaded before it
# is stored). Traffic per logit of each head: forward 2 reads, 3 with the gradient (+1 write).
# All arithmetic is fp32; the gradient is stored in the student logits' dtype.
from __future__ import annotations

import math

import triton
import triton.language as tl

from .cross_entropy import chunk_plan
from .math import log1p
from .row_softmax import NEG_INF, online_step

KL = tl.constexpr(0)  # the values of reference/distillation.py's Divergence
REVERSE_KL = tl.constexpr(1)
JSD = tl.constexpr(2)


@triton.jit
def _scaled(x_row, c, V, inv_t):
    return tl.load(x_row + c, mask=c < V, other=NEG_INF).to(tl.float32) * inv_t


@triton.jit
def _row_lse_parts(x_row, V, inv_t, BLOCK: tl.constexpr):
    """(m, log s) of one row of z: lse = m + log s."""
    cols = tl.arange(0, BLOCK)
    m = NEG_INF
    s_acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        m, s_acc = online_step(m, s_acc, _scaled(x_row, start + cols, V, inv_t), True)
    return m, tl.log(tl.sum(s_acc, axis=0))


@triton.jit
def _p_log_ratio(p, log_a, log_b):
    """p (log_a - log_b), 0 where p is 0 (not 0 * inf)."""
    return tl.where(p == 0.0, 0.0, p * (log_a - log_b))


@triton.jit
def _log_mix(ls, lt, log_beta, log_1mb):
    """lm = log(beta pt + (1 - beta) ps) from the log-probabilities, exact where either is tiny. The
    smaller one is (a + b) - max, not a min: a GPU's max and min drop a NaN, the sum keeps it."""
    a = lt + log_beta
    b = ls + log_1mb
    hi = tl.maximum(a, b)
    return tl.where(hi == NEG_INF, NEG_INF, hi + log1p(tl.exp((a + b) - hi - hi)))


@triton.jit
def _log_probs(s_row, t_row, c, V, inv_t, ms, log_ss, mt, log_st):
    ls = (_scaled(s_row, c, V, inv_t) - ms) - log_ss
    lt = (_scaled(t_row, c, V, inv_t) - mt) - log_st
    return ls, lt


@triton.jit
def _divergence_terms(ls, lt, beta, log_beta, log_1mb, KIND: tl.constexpr):
    """(the divergence's terms, ps G) of one chunk (both 0 past the row, where ls = lt = -inf)."""
    ps = tl.exp(ls)
    if KIND == KL:
        d = _p_log_ratio(tl.exp(lt), lt, ls)
        w = tl.zeros_like(d)
    elif KIND == REVERSE_KL:
        d = _p_log_ratio(ps, ls, lt)
        w = d
    else:
        lm = _log_mix(ls, lt, log_beta, log_1mb)
        w = (1.0 - beta) * _p_log_ratio(ps, ls, lm)
        d = beta * _p_log_ratio(tl.exp(lt), lt, lm) + w
    return d, w


@triton.jit
def _grad_pass(s_row, t_row, g_row, V, inv_t, ms, log_ss, mt, log_st, gbar, scale, beta, log_beta, log_1mb,
               BLOCK: tl.constexpr, KIND: tl.constexpr):
    """Writes scale * d(divergence)/d(zs) over the row (scale includes 1/T)."""
    cols = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        c = start + cols
        ls, lt = _log_probs(s_row, t_row, c, V, inv_t, ms, log_ss, mt, log_st)
        ps = tl.exp(ls)
        if KIND == KL:
            g = ps - tl.exp(lt)
        else:
            if KIND == REVERSE_KL:
                G = ls - lt
            else:
                G = (1.0 - beta) * (ls - _log_mix(ls, lt, log_beta, log_1mb))
            g = tl.where(ps == 0.0, 0.0, ps * (G - gbar))
        tl.store(g_row + c, (g * scale).to(g_row.dtype.element_ty), mask=c < V)


@triton.jit
def _fill_zero(g_row, V, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        c = start + cols
        tl.store(g_row + c, tl.zeros([BLOCK], tl.float32).to(g_row.dtype.element_ty), mask=c < V)


@triton.jit
def _counted(target_ptr, row, ignore_index, HAS_TARGET: tl.constexpr):
    kept = True
    if HAS_TARGET:
        kept = tl.load(target_ptr + row) != ignore_index
    return kept


@triton.jit
def _distillation_fwd_kernel(s_ptr, s_stride, t_ptr, t_stride, target_ptr, grad_factor_ptr, grad_ptr, grad_stride,
                             loss_ptr, stats_ptr, V, ignore_index, inv_t, beta, log_beta, log_1mb,
                             BLOCK: tl.constexpr, KIND: tl.constexpr, HAS_TARGET: tl.constexpr,
                             HAS_GRAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    g_row = grad_ptr + row * grad_stride
    if _counted(target_ptr, row, ignore_index, HAS_TARGET):
        ms, log_ss = _row_lse_parts(s_row, V, inv_t, BLOCK)
        mt, log_st = _row_lse_parts(t_row, V, inv_t, BLOCK)
        cols = tl.arange(0, BLOCK)
        d_acc = tl.zeros([BLOCK], tl.float32)
        w_acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            ls, lt = _log_probs(s_row, t_row, start + cols, V, inv_t, ms, log_ss, mt, log_st)
            d, w = _divergence_terms(ls, lt, beta, log_beta, log_1mb, KIND)
            d_acc += d
            w_acc += w
        gbar = tl.sum(w_acc, axis=0)
        tl.store(loss_ptr + row, tl.sum(d_acc, axis=0))
        tl.store(stats_ptr + row * 5, ms)
        tl.store(stats_ptr + row * 5 + 1, log_ss)
        tl.store(stats_ptr + row * 5 + 2, mt)
        tl.store(stats_ptr + row * 5 + 3, log_st)
        tl.store(stats_ptr + row * 5 + 4, gbar)
        if HAS_GRAD:
            _grad_pass(s_row, t_row, g_row, V, inv_t, ms, log_ss, mt, log_st, gbar,
                       tl.load(grad_factor_ptr) * inv_t, beta, log_beta, log_1mb, BLOCK, KIND)
    else:
        tl.store(loss_ptr + row, 0.0)
        for k in tl.static_range(5):
            tl.store(stats_ptr + row * 5 + k, 0.0)
        if HAS_GRAD:
            _fill_zero(g_row, V, BLOCK)


@triton.jit
def _distillation_bwd_kernel(grad_rows_ptr, s_ptr, s_stride, t_ptr, t_stride, target_ptr, stats_ptr, grad_ptr,
                             grad_stride, V, ignore_index, inv_t, beta, log_beta, log_1mb,
                             BLOCK: tl.constexpr, KIND: tl.constexpr, HAS_TARGET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    g_row = grad_ptr + row * grad_stride
    if _counted(target_ptr, row, ignore_index, HAS_TARGET):
        _grad_pass(s_ptr + row * s_stride, t_ptr + row * t_stride, g_row, V, inv_t, tl.load(stats_ptr + row * 5),
                   tl.load(stats_ptr + row * 5 + 1), tl.load(stats_ptr + row * 5 + 2),
                   tl.load(stats_ptr + row * 5 + 3), tl.load(stats_ptr + row * 5 + 4),
                   tl.load(grad_rows_ptr + row) * inv_t, beta, log_beta, log_1mb, BLOCK, KIND)
    else:
        _fill_zero(g_row, V, BLOCK)


def _mix_args(beta):
    """beta, log beta, log(1 - beta) (only jsd reads them; 0 < beta < 1 there)."""
    inside = 0.0 < beta < 1.0
    return float(beta), math.log(beta) if inside else 0.0, math.log1p(-beta) if inside else 0.0


def distillation_fwd(student, teacher, target, grad_factor, loss, stats, grad, divergence, beta, temperature,
                     ignore_index):
    """The forward op (contract: lossforge_kernels/ops/distillation.py, checked there)."""
    rows, classes = student.shape
    if rows == 0:
        return
    block, num_warps = chunk_plan(classes)
    has_grad = grad is not None
    _distillation_fwd_kernel[(rows,)](
        student, student.stride(0), teacher, teacher.stride(0), loss if target is None else target,
        loss if grad_factor is None else grad_factor, grad if has_grad else student, grad.stride(0) if has_grad else 0,
        loss, stats, classes, ignore_index, 1.0 / temperature, *_mix_args(beta), BLOCK=block, KIND=divergence,
        HAS_TARGET=target is not None, HAS_GRAD=has_grad, num_warps=num_warps)


def distillation_bwd(grad_rows, student, teacher, target, stats, grad, divergence, beta, temperature, ignore_index):
    """The backward op (contract: lossforge_kernels/ops/distillation.py, checked there)."""
    rows, classes = student.shape
    if rows == 0:
        return
    block, num_warps = chunk_plan(classes)
    _distillation_bwd_kernel[(rows,)](
        grad_rows, student, student.stride(0), teacher, teacher.stride(0), stats if target is None else target, stats,
        grad, grad.stride(0), classes, ignore_index, 1.0 / temperature, *_mix_args(beta), BLOCK=block,
        KIND=divergence, HAS_TARGET=target is not None, num_warps=num_warps)
