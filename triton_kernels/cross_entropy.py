# Softmax cross-entropy family (CE, label smoothing, focal, z-loss, softcap) over (M, C) rows.
#
# One program owns one row. The forward streams the row once in BLOCK-sized chunks with an online
# max/rescaled sum (one max reduction per chunk, sums kept per lane and reduced once at the end),
# then, when a gradient is wanted, walks the same row again in reverse chunk order and writes the
# gradient: the chunks read last are re-read first, and the first read asks L2 to keep its lines
# (evict_last) while the re-read and the gradient stores do not (evict_first), so the second read
# is meant to come from L2. Each loop loads the next chunk before working on the current one, so
# a program keeps two chunks of loads in flight; 32 warps at more than 32 registers per thread make
# one program fill an SM, which bounds the rows in flight (the data waiting for its re-read) to one
# per SM.
# Memory traffic per logit: forward-only 1 read (2 bytes for bf16); fused forward+gradient 1 read
# from DRAM + 1 re-read from L2 + 1 write (4 bytes of DRAM traffic for bf16). When the row fits one
# block it is loaded once and kept in registers for both phases. The backward op
# (reduction='none') reads the saved per-row stats, then makes one read and one write of the row.
# Ignored rows and rows with an out-of-range target are not read at all.
# All arithmetic is fp32; the gradient is stored in the logits' dtype.
from __future__ import annotations

import os

import triton
import triton.language as tl

from .row_softmax import NEG_INF, cap_logit, class_row_grad, class_row_lse, online_step, row_grad, safe_max, \
    soft_row_grad, target_log_probs

# Logits per chunk for rows longer than that: 8 per thread at 32 warps (16-byte loads for bf16).
# Tuning knobs (bench/NOTES.md): LOSSFORGE_TRITON_CHUNK and LOSSFORGE_TRITON_CHUNK_WARPS.
CHUNK = 8192
CHUNK_WARPS = 32


def _knob(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value else default


@triton.jit
def _load_chunk(x_row, c, C, POLICY: tl.constexpr):
    return tl.load(x_row + c, mask=(c >= 0) & (c < C), other=NEG_INF, eviction_policy=POLICY)


@triton.jit
def _class_weights(weight_ptr, c, mask, SMOOTH: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """The class weights of one chunk where the smoothing term needs them, else 1."""
    w = 1.0
    if SMOOTH and HAS_WEIGHT:
        w = tl.load(weight_ptr + c, mask=mask, other=0.0)
    return w


@triton.jit
def _class_grad_pass(x_row, g_row, weight_ptr, C, ts, off, coef, cq0, gt, softcap, inv_softcap,
                     BLOCK: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, SOFTCAP: tl.constexpr):
    """Writes the row's gradient from its RowGrad, last chunk first (the last read is the warmest in L2)."""
    cols = tl.arange(0, BLOCK)
    n_chunks = tl.cdiv(C, BLOCK)
    x_next = _load_chunk(x_row, (n_chunks - 1) * BLOCK + cols, C, "evict_first")
    for i in range(0, n_chunks):
        c = (n_chunks - 1 - i) * BLOCK + cols
        mask = c < C
        x = x_next
        x_next = _load_chunk(x_row, c - BLOCK, C, "evict_first")  # fully masked on the last iteration
        y, slope = cap_logit(x, mask, softcap, inv_softcap, SOFTCAP)
        w = _class_weights(weight_ptr, c, mask, SMOOTH, HAS_WEIGHT)
        g = tl.where(c == ts, gt, row_grad(coef * tl.exp(y - off), slope, w * cq0, SMOOTH))
        tl.store(g_row + c, g.to(g_row.dtype.element_ty), mask=mask, eviction_policy="evict_first")


@triton.jit
def _fill_row(g_row, C, value, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    for start in range(0, C, BLOCK):
        c = start + cols
        tl.store(g_row + c, (tl.zeros([BLOCK], tl.float32) + value).to(g_row.dtype.element_ty), mask=c < C)


@triton.jit
def _class_target(target_ptr, row, C, ignore_index):
    """(t as int32, whether the row is computed, the fill value otherwise: 0 ignored, NaN out of range)."""
    t = tl.load(target_ptr + row)
    kept = t != ignore_index
    valid = kept & (t >= 0) & (t < C)
    fill = tl.where(kept, float("nan"), 0.0)
    return tl.where(valid, t, 0).to(tl.int32), valid, fill


@triton.jit
def _target_coefs(weight_ptr, alpha_ptr, wsum_ptr, ts, C, focal_alpha, HAS_WEIGHT: tl.constexpr,
                  HAS_ALPHA: tl.constexpr, SMOOTH: tl.constexpr):
    """The row's class weight w_t, focal alpha a_t, and the weight sum W used by smoothing."""
    w_t = 1.0
    if HAS_WEIGHT:
        w_t = tl.load(weight_ptr + ts)
    a_t = focal_alpha
    if HAS_ALPHA:
        a_t = tl.load(alpha_ptr + ts)
    wsum = C * 1.0
    if SMOOTH and HAS_WEIGHT:
        wsum = tl.load(wsum_ptr)
    return w_t, a_t, wsum


@triton.jit
def _ce_class_fwd_kernel(
        logits_ptr, logits_stride, target_ptr, weight_ptr, wsum_ptr, alpha_ptr, grad_factor_ptr, grad_ptr,
        grad_stride, loss_ptr, stats_ptr, C, ignore_index, label_smoothing, z_loss, softcap, inv_softcap, gamma,
        focal_alpha,
        BLOCK: tl.constexpr, SINGLE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_ALPHA: tl.constexpr,
        HAS_GRAD: tl.constexpr, SMOOTH: tl.constexpr, FOCAL: tl.constexpr, SOFTCAP: tl.constexpr,
        Z_LOSS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * logits_stride
    g_row = grad_ptr + row * grad_stride
    ts, valid, fill = _class_target(target_ptr, row, C, ignore_index)
    if valid:
        y_t, slope_t = cap_logit(tl.load(x_row + ts), True, softcap, inv_softcap, SOFTCAP)
        cols = tl.arange(0, BLOCK)
        # Pass 1: m = running max; sx = per-lane sums of exp(y_j - m) over j != t (so 1 - p_t keeps
        # its relative precision when p_t ~ 1); swy = per-lane sums of w_j y_j for smoothing.
        if SINGLE:
            mask = cols < C
            y, slope = cap_logit(_load_chunk(x_row, cols, C, "evict_first"), mask, softcap, inv_softcap, SOFTCAP)
            m = tl.max(y, axis=0)
            e = tl.exp(y - safe_max(m))
            sx = tl.sum(tl.where(cols == ts, 0.0, e), axis=0)
            if SMOOTH:
                swy = tl.sum(tl.where(mask, _class_weights(weight_ptr, cols, mask, SMOOTH, HAS_WEIGHT) * y, 0.0),
                             axis=0)
        else:
            POLICY: tl.constexpr = "evict_last" if HAS_GRAD else "evict_first"
            m = NEG_INF
            sx_acc = tl.zeros([BLOCK], tl.float32)
            swy_acc = tl.zeros([BLOCK], tl.float32)
            x_next = _load_chunk(x_row, cols, C, POLICY)
            for start in range(0, C, BLOCK):
                c = start + cols
                mask = c < C
                x = x_next
                x_next = _load_chunk(x_row, c + BLOCK, C, POLICY)  # in flight while this chunk is reduced
                y, unused_slope = cap_logit(x, mask, softcap, inv_softcap, SOFTCAP)
                m, sx_acc = online_step(m, sx_acc, y, c != ts)
                if SMOOTH:
                    swy_acc += tl.where(mask, _class_weights(weight_ptr, c, mask, SMOOTH, HAS_WEIGHT) * y, 0.0)
            sx = tl.sum(sx_acc, axis=0)
            swy = tl.sum(swy_acc, axis=0)
        lse = class_row_lse(m, sx, y_t)
        logp_t, log1mp = target_log_probs(m, sx, y_t)
        w_t, a_t, wsum = _target_coefs(weight_ptr, alpha_ptr, wsum_ptr, ts, C, focal_alpha, HAS_WEIGHT, HAS_ALPHA,
                                       SMOOTH)
        ce = (1.0 - label_smoothing) * w_t * -logp_t
        if SMOOTH:
            ce += (label_smoothing / C) * (wsum * lse - swy)
        loss = a_t * ce
        if FOCAL:
            loss *= tl.exp(gamma * log1mp)
        if Z_LOSS:
            loss += z_loss * lse * lse
        tl.store(loss_ptr + row, loss)
        tl.store(stats_ptr + row * 4, lse)
        tl.store(stats_ptr + row * 4 + 1, ce)
        tl.store(stats_ptr + row * 4 + 2, log1mp)
        tl.store(stats_ptr + row * 4 + 3, logp_t)
        if HAS_GRAD:
            off, coef, cq0, gt = class_row_grad(lse, ce, log1mp, logp_t, w_t, a_t, wsum, C, label_smoothing, z_loss,
                                                gamma, tl.load(grad_factor_ptr), slope_t, FOCAL, Z_LOSS)
            if SINGLE:
                # The row is still in registers: exp(y_j - off) = e_j / s_all, or e_j / sx when off
                # carries log(1 - p_t) (focal), which saves the second exponential.
                inv = 1.0 / (sx + tl.exp(y_t - safe_max(m)))
                if FOCAL:
                    inv = tl.where(log1mp > NEG_INF, 1.0 / sx, inv)  # as class_row_grad chooses off
                w = _class_weights(weight_ptr, cols, mask, SMOOTH, HAS_WEIGHT)
                g = tl.where(cols == ts, gt, row_grad(coef * (e * inv), slope, w * cq0, SMOOTH))
                tl.store(g_row + cols, g.to(g_row.dtype.element_ty), mask=mask)
            else:
                _class_grad_pass(x_row, g_row, weight_ptr, C, ts, off, coef, cq0, gt, softcap, inv_softcap,
                                 BLOCK, HAS_WEIGHT, SMOOTH, SOFTCAP)
    else:
        tl.store(loss_ptr + row, fill)
        tl.store(stats_ptr + row * 4, fill)
        tl.store(stats_ptr + row * 4 + 1, fill)
        tl.store(stats_ptr + row * 4 + 2, fill)
        tl.store(stats_ptr + row * 4 + 3, fill)
        if HAS_GRAD:
            _fill_row(g_row, C, fill, BLOCK)


@triton.jit
def _ce_class_bwd_kernel(
        grad_rows_ptr, logits_ptr, logits_stride, target_ptr, weight_ptr, wsum_ptr, alpha_ptr, stats_ptr,
        grad_ptr, grad_stride, C, ignore_index, label_smoothing, z_loss, softcap, inv_softcap, gamma, focal_alpha,
        BLOCK: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_ALPHA: tl.constexpr, SMOOTH: tl.constexpr,
        FOCAL: tl.constexpr, SOFTCAP: tl.constexpr, Z_LOSS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * logits_stride
    g_row = grad_ptr + row * grad_stride
    ts, valid, fill = _class_target(target_ptr, row, C, ignore_index)
    if valid:
        lse = tl.load(stats_ptr + row * 4)
        ce = tl.load(stats_ptr + row * 4 + 1)
        log1mp = tl.load(stats_ptr + row * 4 + 2)
        logp_t = tl.load(stats_ptr + row * 4 + 3)
        y_t, slope_t = cap_logit(tl.load(x_row + ts), True, softcap, inv_softcap, SOFTCAP)
        w_t, a_t, wsum = _target_coefs(weight_ptr, alpha_ptr, wsum_ptr, ts, C, focal_alpha, HAS_WEIGHT, HAS_ALPHA,
                                       SMOOTH)
        off, coef, cq0, gt = class_row_grad(lse, ce, log1mp, logp_t, w_t, a_t, wsum, C, label_smoothing, z_loss,
                                            gamma, tl.load(grad_rows_ptr + row), slope_t, FOCAL, Z_LOSS)
        _class_grad_pass(x_row, g_row, weight_ptr, C, ts, off, coef, cq0, gt, softcap, inv_softcap, BLOCK,
                         HAS_WEIGHT, SMOOTH, SOFTCAP)
    else:
        _fill_row(g_row, C, fill, BLOCK)


@triton.jit
def _weighted_target(q_row, c, mask, weight_ptr, a, b, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr):
    """w_j (a q_j + b) for one chunk (0 past the row); b only with smoothing. With a = 1 - label_smoothing
    and b = label_smoothing / C it is w_j q'_j; with a RowGrad's (cq1, cq0) the gradient's target term."""
    q = a * tl.load(q_row + c, mask=mask, other=0.0).to(tl.float32)
    if SMOOTH:
        q += b
    if HAS_WEIGHT:
        q *= tl.load(weight_ptr + c, mask=mask, other=0.0)
    return tl.where(mask, q, 0.0)


@triton.jit
def _ce_soft_fwd_kernel(
        logits_ptr, logits_stride, target_ptr, target_stride, weight_ptr, grad_factor_ptr, grad_ptr, grad_stride,
        loss_ptr, stats_ptr, C, label_smoothing, z_loss, softcap, inv_softcap,
        BLOCK: tl.constexpr, SINGLE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_GRAD: tl.constexpr,
        SMOOTH: tl.constexpr, SOFTCAP: tl.constexpr, Z_LOSS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * logits_stride
    q_row = target_ptr + row * target_stride
    g_row = grad_ptr + row * grad_stride
    cols = tl.arange(0, BLOCK)
    eps1 = 1.0 - label_smoothing
    epsC = label_smoothing / C
    # L = S lse - sum_j wq_j y_j is accumulated as S (lse - m) + sum_j wq_j (m - y_j): every term is
    # >= 0, so large logits do not cancel. S = sum_j wq_j.
    if SINGLE:
        mask = cols < C
        y, slope = cap_logit(_load_chunk(x_row, cols, C, "evict_first"), mask, softcap, inv_softcap, SOFTCAP)
        wq = _weighted_target(q_row, cols, mask, weight_ptr, eps1, epsC, HAS_WEIGHT, SMOOTH)
        m = tl.max(y, axis=0)
        m_safe = safe_max(m)
        e = tl.exp(y - m_safe)
        s = tl.sum(e, axis=0)
        S = tl.sum(wq, axis=0)
        gap = tl.sum(tl.where(mask, wq * (m_safe - y), 0.0), axis=0)
    else:
        POLICY: tl.constexpr = "evict_last" if HAS_GRAD else "evict_first"
        m = NEG_INF
        s_acc = tl.zeros([BLOCK], tl.float32)
        S_acc = tl.zeros([BLOCK], tl.float32)
        gap_acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, C, BLOCK):
            c = start + cols
            mask = c < C
            y, unused_slope = cap_logit(_load_chunk(x_row, c, C, POLICY), mask, softcap, inv_softcap, SOFTCAP)
            wq = _weighted_target(q_row, c, mask, weight_ptr, eps1, epsC, HAS_WEIGHT, SMOOTH)
            m_old = m
            m, s_acc = online_step(m, s_acc, y, True)
            m_safe = safe_max(m)
            m_old = tl.where(m_old == NEG_INF, m_safe, m_old)
            gap_acc += S_acc * (m_safe - m_old) + tl.where(mask, wq * (m_safe - y), 0.0)
            S_acc += wq
        s = tl.sum(s_acc, axis=0)
        S = tl.sum(S_acc, axis=0)
        gap = tl.sum(gap_acc, axis=0)
    log_s = tl.log(s)
    lse = m + log_s
    loss = S * log_s + gap
    if Z_LOSS:
        loss += z_loss * lse * lse
    tl.store(loss_ptr + row, loss)
    tl.store(stats_ptr + row * 4, lse)
    tl.store(stats_ptr + row * 4 + 1, S)
    tl.store(stats_ptr + row * 4 + 2, 0.0)
    tl.store(stats_ptr + row * 4 + 3, 0.0)
    if HAS_GRAD:
        off, coef, cq0, cq1 = soft_row_grad(lse, S, C, label_smoothing, z_loss, tl.load(grad_factor_ptr), Z_LOSS)
        if SINGLE:
            w_cq = _weighted_target(q_row, cols, mask, weight_ptr, cq1, cq0, HAS_WEIGHT, SMOOTH)
            g = row_grad(coef * (e * (1.0 / s)), slope, w_cq, True)
            tl.store(g_row + cols, g.to(g_row.dtype.element_ty), mask=mask)
        else:
            _soft_grad_pass(x_row, q_row, g_row, weight_ptr, C, off, coef, cq0, cq1, softcap, inv_softcap,
                            BLOCK, HAS_WEIGHT, SMOOTH, SOFTCAP)


@triton.jit
def _soft_grad_pass(x_row, q_row, g_row, weight_ptr, C, off, coef, cq0, cq1, softcap, inv_softcap,
                    BLOCK: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, SOFTCAP: tl.constexpr):
    """Writes the row's gradient from its RowGrad, last chunk first."""
    cols = tl.arange(0, BLOCK)
    n_chunks = tl.cdiv(C, BLOCK)
    for i in range(0, n_chunks):
        c = (n_chunks - 1 - i) * BLOCK + cols
        mask = c < C
        y, slope = cap_logit(_load_chunk(x_row, c, C, "evict_first"), mask, softcap, inv_softcap, SOFTCAP)
        w_cq = _weighted_target(q_row, c, mask, weight_ptr, cq1, cq0, HAS_WEIGHT, SMOOTH)
        g = row_grad(coef * tl.exp(y - off), slope, w_cq, True)
        tl.store(g_row + c, g.to(g_row.dtype.element_ty), mask=mask, eviction_policy="evict_first")


@triton.jit
def _ce_soft_bwd_kernel(
        grad_rows_ptr, logits_ptr, logits_stride, target_ptr, target_stride, weight_ptr, stats_ptr,
        grad_ptr, grad_stride, C, label_smoothing, z_loss, softcap, inv_softcap,
        BLOCK: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, SOFTCAP: tl.constexpr,
        Z_LOSS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    lse = tl.load(stats_ptr + row * 4)
    S = tl.load(stats_ptr + row * 4 + 1)
    off, coef, cq0, cq1 = soft_row_grad(lse, S, C, label_smoothing, z_loss, tl.load(grad_rows_ptr + row), Z_LOSS)
    _soft_grad_pass(logits_ptr + row * logits_stride, target_ptr + row * target_stride,
                    grad_ptr + row * grad_stride, weight_ptr, C, off, coef, cq0, cq1, softcap, inv_softcap,
                    BLOCK, HAS_WEIGHT, SMOOTH, SOFTCAP)


def _launch_config(num_classes: int):
    """(BLOCK, SINGLE, num_warps): the whole row in registers when it fits a chunk, else chunks."""
    chunk = triton.next_power_of_2(max(16, _knob("LOSSFORGE_TRITON_CHUNK", CHUNK)))
    warps = _knob("LOSSFORGE_TRITON_CHUNK_WARPS", CHUNK_WARPS)
    if num_classes > chunk:
        return chunk, False, warps
    block = max(16, triton.next_power_of_2(num_classes))
    return block, True, max(1, min(warps, block // 256))  # about 8 logits per thread


def chunk_plan(num_classes: int):
    """(BLOCK, num_warps) of a kernel that streams rows of `num_classes` in chunks (the RL heads'),
    by the same rule and knobs as cross-entropy's."""
    block, _, num_warps = _launch_config(num_classes)
    return block, num_warps


def _softcap_args(softcap):
    return (float(softcap), 1.0 / softcap) if softcap > 0.0 else (0.0, 0.0)


def cross_entropy_fwd(logits, target, weight, weight_sum, alpha, grad_factor, loss, stats, grad, ignore_index,
                      label_smoothing, z_loss, softcap, focal_gamma, focal_alpha):
    """The forward op (contract: lossforge_kernels/ops/cross_entropy.py, checked there)."""
    rows, classes = logits.shape
    if rows == 0:
        return
    block, single, num_warps = _launch_config(classes)
    cap, inv_cap = _softcap_args(softcap)
    has_grad = grad is not None
    grad_arg, grad_stride = (grad, grad.stride(0)) if has_grad else (logits, 0)
    common = dict(BLOCK=block, SINGLE=single, HAS_WEIGHT=weight is not None, HAS_GRAD=has_grad,
                  SMOOTH=label_smoothing > 0.0, SOFTCAP=softcap > 0.0, Z_LOSS=z_loss > 0.0, num_warps=num_warps)
    weight_arg = loss if weight is None else weight
    grad_factor = loss if grad_factor is None else grad_factor  # read only with a gradient
    if target.dtype.is_floating_point:
        _ce_soft_fwd_kernel[(rows,)](
            logits, logits.stride(0), target, target.stride(0), weight_arg, grad_factor, grad_arg, grad_stride,
            loss, stats, classes, label_smoothing, z_loss, cap, inv_cap, **common)
    else:
        _ce_class_fwd_kernel[(rows,)](
            logits, logits.stride(0), target, weight_arg, loss if weight_sum is None else weight_sum,
            loss if alpha is None else alpha, grad_factor, grad_arg, grad_stride, loss, stats, classes, ignore_index,
            label_smoothing, z_loss, cap, inv_cap, focal_gamma, focal_alpha,
            HAS_ALPHA=alpha is not None, FOCAL=focal_gamma > 0.0, **common)


def cross_entropy_bwd(grad_rows, logits, target, weight, weight_sum, alpha, stats, grad, ignore_index,
                      label_smoothing, z_loss, softcap, focal_gamma, focal_alpha):
    """The backward op (contract: lossforge_kernels/ops/cross_entropy.py, checked there)."""
    rows, classes = logits.shape
    if rows == 0:
        return
    block, _, num_warps = _launch_config(classes)
    cap, inv_cap = _softcap_args(softcap)
    common = dict(BLOCK=block, HAS_WEIGHT=weight is not None, SMOOTH=label_smoothing > 0.0, SOFTCAP=softcap > 0.0,
                  Z_LOSS=z_loss > 0.0, num_warps=num_warps)
    weight_arg = stats if weight is None else weight
    if target.dtype.is_floating_point:
        _ce_soft_bwd_kernel[(rows,)](
            grad_rows, logits, logits.stride(0), target, target.stride(0), weight_arg, stats, grad, grad.stride(0),
            classes, label_smoothing, z_loss, cap, inv_cap, **common)
    else:
        _ce_class_bwd_kernel[(rows,)](
            grad_rows, logits, logits.stride(0), target, weight_arg, stats if weight_sum is None else weight_sum,
            stats if alpha is None else alpha, stats, grad, grad.stride(0), classes, ignore_index, label_smoothing,
            z_loss, cap, inv_cap, focal_gamma, focal_alpha, HAS_ALPHA=alpha is not None, FOCAL=focal_gamma > 0.0,
            **common)
