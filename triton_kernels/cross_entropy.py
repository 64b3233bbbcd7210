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

import torch
import triton
import triton.language as tl

from .math import log1p, tanh_and_slope

# Logits per chunk for rows longer than that: 8 per thread at 32 warps (16-byte loads for bf16).
# Tuning knobs (bench/NOTES.md): LOSSFORGE_TRITON_CHUNK and LOSSFORGE_TRITON_CHUNK_WARPS.
CHUNK = 8192
CHUNK_WARPS = 32


def _knob(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value else default


@triton.jit
def _as_y(x, mask, softcap, inv_softcap, SOFTCAP: tl.constexpr):
    """Loaded logits -> fp32 y after the optional softcap (lanes past the row stay -inf), and dy/dx."""
    x = x.to(tl.float32)
    if SOFTCAP:
        th, slope = tanh_and_slope(x * inv_softcap)
        return tl.where(mask, softcap * th, float("-inf")), slope
    else:
        return x, 1.0


@triton.jit
def _load_chunk(x_row, c, C, POLICY: tl.constexpr):
    return tl.load(x_row + c, mask=(c >= 0) & (c < C), other=float("-inf"), eviction_policy=POLICY)


@triton.jit
def _class_grad_block(v, is_t, w, K, Fe, G_t, SMOOTH: tl.constexpr):
    """dL/dy for one chunk of a class-target row: K v_j - Fe w_j off the target, G_t on it, where
    v_j = exp(y_j - off) with the per-row K, off (see _class_coefs)."""
    g = K * v
    if SMOOTH:
        g -= Fe * w
    return tl.where(is_t, G_t, g)


@triton.jit
def _class_coefs(lse, ce, log1mp, logp_t, w_t, a_t, wsum, C, eps, z_loss, gamma,
                 SMOOTH: tl.constexpr, FOCAL: tl.constexpr, Z_LOSS: tl.constexpr):
    """Per-row scalars such that dL/dy_j = A p_j - Fe w_j + B r_j (j != t) and dL/dy_t = G_t, with
    r_j = p_j / (1 - p_t), returned as (K, off, Fe, G_t) with dL/dy_j = K exp(y_j - off) - Fe w_j:
    off = lse and K = A without focal; with focal p_j = (1 - p_t) r_j, so one exponential gives
    both terms: off = lse + log(1 - p_t) and K = A (1 - p_t) + B. r_j lies in [0, 1] and is formed
    in log space, so it stays finite when 1 - p_t underflows; off = +inf (r = 0) when no other
    class has p > 0."""
    p_t = tl.exp(logp_t)
    one_minus_pt = tl.exp(log1mp)  # s_excl / s: keeps its precision when p_t rounds to 1
    F = a_t
    if FOCAL:
        F = a_t * tl.exp(gamma * log1mp)  # (1 - p_t)^gamma; log1mp = -inf gives 0
        # With K = gamma F p_t: dF/dy_t = -K, dF/dy_j = K r_j; never (1 - p_t)^(gamma - 1), inf at p_t = 1.
        B = ce * (gamma * F * p_t)
    else:
        B = 0.0
    zg = 0.0
    if Z_LOSS:
        zg = 2.0 * z_loss * lse
    if SMOOTH:
        Fe = F * eps / C
        A = F * (1.0 - eps) * w_t + Fe * wsum + zg
        G_t = -F * (1.0 - eps) * w_t * one_minus_pt + (Fe * wsum + zg) * p_t - Fe * w_t
    else:
        Fe = 0.0
        A = F * w_t + zg
        G_t = -F * w_t * one_minus_pt + zg * p_t
    if FOCAL:
        G_t -= B
        return A * one_minus_pt + B, tl.where(log1mp == float("-inf"), float("inf"), lse + log1mp), Fe, G_t
    return A, lse, Fe, G_t


@triton.jit
def _class_grad_pass(x_row, g_row, weight_ptr, C, ts, scale, K, off, Fe, G_t, softcap, inv_softcap,
                     BLOCK: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, SOFTCAP: tl.constexpr):
    """Writes scale * dL/dx over the whole row, last chunk first (the last read is the warmest in L2)."""
    cols = tl.arange(0, BLOCK)
    n_chunks = tl.cdiv(C, BLOCK)
    x_next = _load_chunk(x_row, (n_chunks - 1) * BLOCK + cols, C, "evict_first")
    for i in range(0, n_chunks):
        c = (n_chunks - 1 - i) * BLOCK + cols
        mask = c < C
        x = x_next
        x_next = _load_chunk(x_row, c - BLOCK, C, "evict_first")  # fully masked on the last iteration
        y, slope = _as_y(x, mask, softcap, inv_softcap, SOFTCAP)
        w = 1.0
        if SMOOTH and HAS_WEIGHT:
            w = tl.load(weight_ptr + c, mask=mask, other=0.0)
        g = _class_grad_block(tl.exp(y - off), c == ts, w, K, Fe, G_t, SMOOTH)
        tl.store(g_row + c, (g * (slope * scale)).to(g_row.dtype.element_ty), mask=mask,
                 eviction_policy="evict_first")


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
        logits_ptr, logits_stride, target_ptr, weight_ptr, wsum_ptr, alpha_ptr, scale_ptr, grad_ptr, grad_stride,
        loss_ptr, stats_ptr, C, ignore_index, eps, z_loss, softcap, inv_softcap, gamma, focal_alpha,
        BLOCK: tl.constexpr, SINGLE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_ALPHA: tl.constexpr,
        HAS_GRAD: tl.constexpr, SMOOTH: tl.constexpr, FOCAL: tl.constexpr, SOFTCAP: tl.constexpr,
        Z_LOSS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * logits_stride
    g_row = grad_ptr + row * grad_stride
    ts, valid, fill = _class_target(target_ptr, row, C, ignore_index)
    if valid:
        y_t, slope_t = _as_y(tl.load(x_row + ts), True, softcap, inv_softcap, SOFTCAP)
        cols = tl.arange(0, BLOCK)
        # Pass 1: m = running max; sx = per-lane sums of exp(y_j - m) over j != t (so 1 - p_t keeps
        # its relative precision when p_t ~ 1); swy = per-lane sums of w_j y_j for smoothing.
        if SINGLE:
            mask = cols < C
            y, slope = _as_y(_load_chunk(x_row, cols, C, "evict_first"), mask, softcap, inv_softcap, SOFTCAP)
            m = tl.max(y, axis=0)
            m_safe = tl.where(m == float("-inf"), 0.0, m)  # an all -inf row: avoid -inf - -inf
            e = tl.exp(y - m_safe)
            sx = tl.sum(tl.where(cols == ts, 0.0, e), axis=0)
            if SMOOTH:
                w = 1.0
                if HAS_WEIGHT:
                    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
                swy = tl.sum(tl.where(mask, w * y, 0.0), axis=0)
        else:
            POLICY: tl.constexpr = "evict_last" if HAS_GRAD else "evict_first"
            m = float("-inf")
            sx_acc = tl.zeros([BLOCK], tl.float32)
            swy_acc = tl.zeros([BLOCK], tl.float32)
            x_next = _load_chunk(x_row, cols, C, POLICY)
            for start in range(0, C, BLOCK):
                c = start + cols
                mask = c < C
                x = x_next
                x_next = _load_chunk(x_row, c + BLOCK, C, POLICY)  # in flight while this chunk is reduced
                y, unused_slope = _as_y(x, mask, softcap, inv_softcap, SOFTCAP)
                m_new = tl.maximum(m, tl.max(y, axis=0))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                sx_acc = sx_acc * tl.exp(m - m_safe) + tl.where(c == ts, 0.0, tl.exp(y - m_safe))
                m = m_new
                if SMOOTH:
                    w = 1.0
                    if HAS_WEIGHT:
                        w = tl.load(weight_ptr + c, mask=mask, other=0.0)
                    swy_acc += tl.where(mask, w * y, 0.0)
            sx = tl.sum(sx_acc, axis=0)
            swy = tl.sum(swy_acc, axis=0)
            m_safe = tl.where(m == float("-inf"), 0.0, m)
        s = sx + tl.exp(y_t - m_safe)
        log_s = tl.log(s)
        lse = m + log_s
        # -log p_t; when t is the max, s = 1 + sx and log1p keeps the tiny CE of confident rows. An
        # all -inf row takes the second form and gives NaN, as torch does.
        nll = tl.where((y_t == m) & (m > float("-inf")), log1p(sx), (m - y_t) + log_s)
        log1mp = tl.log(sx) - log_s
        w_t, a_t, wsum = _target_coefs(weight_ptr, alpha_ptr, wsum_ptr, ts, C, focal_alpha, HAS_WEIGHT, HAS_ALPHA,
                                       SMOOTH)
        if SMOOTH:
            ce = (1.0 - eps) * w_t * nll + (eps / C) * (wsum * lse - swy)
        else:
            ce = w_t * nll
        if FOCAL:
            loss = a_t * tl.exp(gamma * log1mp) * ce
        else:
            loss = a_t * ce
        if Z_LOSS:
            loss += z_loss * lse * lse
        tl.store(loss_ptr + row, loss)
        tl.store(stats_ptr + row * 4, lse)
        tl.store(stats_ptr + row * 4 + 1, ce)
        tl.store(stats_ptr + row * 4 + 2, log1mp)
        tl.store(stats_ptr + row * 4 + 3, -nll)
        if HAS_GRAD:
            scale = tl.load(scale_ptr)
            K, off, Fe, G_t = _class_coefs(lse, ce, log1mp, -nll, w_t, a_t, wsum, C, eps, z_loss, gamma,
                                           SMOOTH, FOCAL, Z_LOSS)
            if SINGLE:
                # The row is still in registers: exp(y_j - off) = e_j / s, or e_j / sx for focal
                # (r_j = p_j / (1 - p_t)), saves the second exponential. sx = 0 means every e_j
                # off the target is 0, and so is r_j.
                if FOCAL:
                    inv = tl.where(sx > 0.0, 1.0 / sx, 0.0)
                else:
                    inv = 1.0 / s
                w = 1.0
                if SMOOTH and HAS_WEIGHT:
                    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
                g = _class_grad_block(e * inv, cols == ts, w, K, Fe, G_t, SMOOTH)
                tl.store(g_row + cols, (g * (slope * scale)).to(g_row.dtype.element_ty), mask=mask)
            else:
                _class_grad_pass(x_row, g_row, weight_ptr, C, ts, scale, K, off, Fe, G_t, softcap, inv_softcap,
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
        grad_ptr, grad_stride, C, ignore_index, eps, z_loss, softcap, inv_softcap, gamma, focal_alpha,
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
        w_t, a_t, wsum = _target_coefs(weight_ptr, alpha_ptr, wsum_ptr, ts, C, focal_alpha, HAS_WEIGHT, HAS_ALPHA,
                                       SMOOTH)
        K, off, Fe, G_t = _class_coefs(lse, ce, log1mp, logp_t, w_t, a_t, wsum, C, eps, z_loss, gamma,
                                       SMOOTH, FOCAL, Z_LOSS)
        _class_grad_pass(x_row, g_row, weight_ptr, C, ts, tl.load(grad_rows_ptr + row), K, off, Fe, G_t,
                         softcap, inv_softcap, BLOCK, HAS_WEIGHT, SMOOTH, SOFTCAP)
    else:
        _fill_row(g_row, C, fill, BLOCK)


@triton.jit
def _soft_weighted_target(q_row, c, mask, weight_ptr, eps, C, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr):
    """w_j q'_j for one chunk (0 past the row), q' = (1 - eps) q + eps / C."""
    q = tl.load(q_row + c, mask=mask, other=0.0).to(tl.float32)
    if SMOOTH:
        q = (1.0 - eps) * q + eps / C
    if HAS_WEIGHT:
        q *= tl.load(weight_ptr + c, mask=mask, other=0.0)
    return tl.where(mask, q, 0.0)


@triton.jit
def _ce_soft_fwd_kernel(
        logits_ptr, logits_stride, target_ptr, target_stride, weight_ptr, scale_ptr, grad_ptr, grad_stride,
        loss_ptr, stats_ptr, C, eps, z_loss, softcap, inv_softcap,
        BLOCK: tl.constexpr, SINGLE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_GRAD: tl.constexpr,
        SMOOTH: tl.constexpr, SOFTCAP: tl.constexpr, Z_LOSS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * logits_stride
    q_row = target_ptr + row * target_stride
    g_row = grad_ptr + row * grad_stride
    cols = tl.arange(0, BLOCK)
    # L = S lse - sum_j wq_j y_j is accumulated as S (lse - m) + sum_j wq_j (m - y_j): every term is
    # >= 0, so large logits do not cancel. S = sum_j wq_j.
    if SINGLE:
        mask = cols < C
        y, slope = _as_y(_load_chunk(x_row, cols, C, "evict_first"), mask, softcap, inv_softcap, SOFTCAP)
        wq = _soft_weighted_target(q_row, cols, mask, weight_ptr, eps, C, HAS_WEIGHT, SMOOTH)
        m = tl.max(y, axis=0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        e = tl.exp(y - m_safe)
        s = tl.sum(e, axis=0)
        S = tl.sum(wq, axis=0)
        gap = tl.sum(tl.where(mask, wq * (m_safe - y), 0.0), axis=0)
    else:
        POLICY: tl.constexpr = "evict_last" if HAS_GRAD else "evict_first"
        m = float("-inf")
        s_acc = tl.zeros([BLOCK], tl.float32)
        S_acc = tl.zeros([BLOCK], tl.float32)
        gap_acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, C, BLOCK):
            c = start + cols
            mask = c < C
            y, unused_slope = _as_y(_load_chunk(x_row, c, C, POLICY), mask, softcap, inv_softcap, SOFTCAP)
            wq = _soft_weighted_target(q_row, c, mask, weight_ptr, eps, C, HAS_WEIGHT, SMOOTH)
            m_new = tl.maximum(m, tl.max(y, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            m_old = tl.where(m == float("-inf"), m_safe, m)
            s_acc = s_acc * tl.exp(m - m_safe) + tl.exp(y - m_safe)
            gap_acc += S_acc * (m_safe - m_old) + tl.where(mask, wq * (m_safe - y), 0.0)
            S_acc += wq
            m = m_new
        s = tl.sum(s_acc, axis=0)
        S = tl.sum(S_acc, axis=0)
        gap = tl.sum(gap_acc, axis=0)
    log_s = tl.log(s)
    lse = m + log_s
    loss = S * log_s + gap
    zg = 0.0
    if Z_LOSS:
        loss += z_loss * lse * lse
        zg = 2.0 * z_loss * lse
    tl.store(loss_ptr + row, loss)
    tl.store(stats_ptr + row * 4, lse)
    tl.store(stats_ptr + row * 4 + 1, S)
    tl.store(stats_ptr + row * 4 + 2, 0.0)
    tl.store(stats_ptr + row * 4 + 3, 0.0)
    if HAS_GRAD:
        scale = tl.load(scale_ptr)
        if SINGLE:
            g = (e * (1.0 / s)) * (S + zg) - wq
            tl.store(g_row + cols, (g * (slope * scale)).to(g_row.dtype.element_ty), mask=mask)
        else:
            _soft_grad_pass(x_row, q_row, g_row, weight_ptr, C, eps, scale, lse, S + zg, softcap, inv_softcap,
                            BLOCK, HAS_WEIGHT, SMOOTH, SOFTCAP)


@triton.jit
def _soft_grad_pass(x_row, q_row, g_row, weight_ptr, C, eps, scale, lse, coef, softcap, inv_softcap,
                    BLOCK: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, SOFTCAP: tl.constexpr):
    """Writes scale * (p_j (S + 2 z lse) - w_j q'_j) * dy/dx over the row, last chunk first."""
    cols = tl.arange(0, BLOCK)
    n_chunks = tl.cdiv(C, BLOCK)
    for i in range(0, n_chunks):
        c = (n_chunks - 1 - i) * BLOCK + cols
        mask = c < C
        y, slope = _as_y(_load_chunk(x_row, c, C, "evict_first"), mask, softcap, inv_softcap, SOFTCAP)
        wq = _soft_weighted_target(q_row, c, mask, weight_ptr, eps, C, HAS_WEIGHT, SMOOTH)
        g = tl.exp(y - lse) * coef - wq
        tl.store(g_row + c, (g * (slope * scale)).to(g_row.dtype.element_ty), mask=mask,
                 eviction_policy="evict_first")


@triton.jit
def _ce_soft_bwd_kernel(
        grad_rows_ptr, logits_ptr, logits_stride, target_ptr, target_stride, weight_ptr, stats_ptr,
        grad_ptr, grad_stride, C, eps, z_loss, softcap, inv_softcap,
        BLOCK: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, SOFTCAP: tl.constexpr,
        Z_LOSS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    lse = tl.load(stats_ptr + row * 4)
    coef = tl.load(stats_ptr + row * 4 + 1)
    if Z_LOSS:
        coef += 2.0 * z_loss * lse
    _soft_grad_pass(logits_ptr + row * logits_stride, target_ptr + row * target_stride,
                    grad_ptr + row * grad_stride, weight_ptr, C, eps, tl.load(grad_rows_ptr + row), lse, coef,
                    softcap, inv_softcap, BLOCK, HAS_WEIGHT, SMOOTH, SOFTCAP)


def _launch_config(num_classes: int):
    """(BLOCK, SINGLE, num_warps): the whole row in registers when it fits a chunk, else chunks."""
    chunk = triton.next_power_of_2(max(16, _knob("LOSSFORGE_TRITON_CHUNK", CHUNK)))
    warps = _knob("LOSSFORGE_TRITON_CHUNK_WARPS", CHUNK_WARPS)
    if num_classes > chunk:
        return chunk, False, warps
    block = max(16, triton.next_power_of_2(num_classes))
    return block, True, max(1, min(warps, block // 256))  # about 8 logits per thread


def _check_rows(logits, target, weight, alpha, stats, grad):
    if logits.dim() != 2 or logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"logits must be a 2-D fp32/fp16/bf16 tensor, got shape {tuple(logits.shape)} "
                         f"and dtype {logits.dtype}")
    rows, classes = logits.shape
    if logits.stride(1) != 1 and classes > 1:
        raise ValueError(f"logits must have unit column stride, got strides {logits.stride()}")
    if target.dtype.is_floating_point:
        if target.shape != logits.shape or (target.stride(1) != 1 and classes > 1):
            raise ValueError(f"probability target must have shape {tuple(logits.shape)} and unit column stride, "
                             f"got shape {tuple(target.shape)} and strides {target.stride()}")
    elif target.shape != (rows,) or target.dtype != torch.int64 or not target.is_contiguous():
        raise ValueError(f"class target must be a contiguous int64 tensor of shape ({rows},), got shape "
                         f"{tuple(target.shape)} and dtype {target.dtype}")
    for name, vec in (("weight", weight), ("alpha", alpha)):
        if vec is not None and (vec.shape != (classes,) or vec.dtype != torch.float32 or not vec.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous fp32 tensor of shape ({classes},), got shape "
                             f"{tuple(vec.shape)} and dtype {vec.dtype}")
    if stats is not None and (stats.shape != (rows, 4) or stats.dtype != torch.float32 or not stats.is_contiguous()):
        raise ValueError(f"stats must be a contiguous fp32 tensor of shape ({rows}, 4), got shape "
                         f"{tuple(stats.shape)} and dtype {stats.dtype}")
    if grad is not None and (grad.shape != logits.shape or grad.dtype != logits.dtype
                             or (grad.stride(1) != 1 and classes > 1)):
        raise ValueError(f"grad must match logits (shape {tuple(logits.shape)}, dtype {logits.dtype}, unit column "
                         f"stride), got shape {tuple(grad.shape)}, dtype {grad.dtype}, strides {grad.stride()}")


def _check_soft_options(target, focal_gamma, focal_alpha, alpha):
    if target.dtype.is_floating_point and (focal_gamma != 0.0 or focal_alpha != 1.0 or alpha is not None):
        raise ValueError(f"focal options need class-index targets; got probability targets with "
                         f"focal_gamma={focal_gamma}, focal_alpha={focal_alpha}, alpha tensor={alpha is not None}")


def _softcap_args(softcap):
    return (float(softcap), 1.0 / softcap) if softcap > 0.0 else (0.0, 0.0)


def cross_entropy_fwd(logits, target, weight, alpha, grad_scale, grad, ignore_index, label_smoothing, z_loss,
                      softcap, focal_gamma, focal_alpha):
    _check_rows(logits, target, weight, alpha, None, grad)
    _check_soft_options(target, focal_gamma, focal_alpha, alpha)
    if grad_scale.dtype != torch.float32:
        raise TypeError(f"grad_scale must have dtype torch.float32, got {grad_scale.dtype}")
    if grad_scale.dim() != 0:
        raise ValueError(f"grad_scale must be a 0-dim tensor, got shape {tuple(grad_scale.shape)}")
    rows, classes = logits.shape
    loss = torch.empty(rows, device=logits.device, dtype=torch.float32)
    stats = torch.empty(rows, 4, device=logits.device, dtype=torch.float32)
    if rows == 0:
        return loss, stats
    block, single, num_warps = _launch_config(classes)
    smooth = label_smoothing > 0.0
    cap, inv_cap = _softcap_args(softcap)
    has_grad = grad is not None
    grad_arg, grad_stride = (grad, grad.stride(0)) if has_grad else (logits, 0)
    scale = grad_scale.reshape(1)
    common = dict(BLOCK=block, SINGLE=single, HAS_WEIGHT=weight is not None, HAS_GRAD=has_grad, SMOOTH=smooth,
                  SOFTCAP=softcap > 0.0, Z_LOSS=z_loss > 0.0, num_warps=num_warps)
    if target.dtype.is_floating_point:
        _ce_soft_fwd_kernel[(rows,)](
            logits, logits.stride(0), target, target.stride(0), loss if weight is None else weight, scale,
            grad_arg, grad_stride, loss, stats, classes, label_smoothing, z_loss, cap, inv_cap, **common)
    else:
        wsum = weight.sum(dtype=torch.float32).reshape(1) if weight is not None and smooth else loss
        _ce_class_fwd_kernel[(rows,)](
            logits, logits.stride(0), target, loss if weight is None else weight, wsum,
            loss if alpha is None else alpha, scale, grad_arg, grad_stride, loss, stats, classes, ignore_index,
            label_smoothing, z_loss, cap, inv_cap, focal_gamma, focal_alpha,
            HAS_ALPHA=alpha is not None, FOCAL=focal_gamma > 0.0, **common)
    return loss, stats


def cross_entropy_bwd(grad_rows, logits, target, weight, alpha, stats, grad, ignore_index, label_smoothing, z_loss,
                      softcap, focal_gamma, focal_alpha):
    _check_rows(logits, target, weight, alpha, stats, grad)
    _check_soft_options(target, focal_gamma, focal_alpha, alpha)
    rows, classes = logits.shape
    if grad_rows.shape != (rows,) or grad_rows.dtype != torch.float32 or not grad_rows.is_contiguous():
        raise ValueError(f"grad_rows must be a contiguous fp32 tensor of shape ({rows},), got shape "
                         f"{tuple(grad_rows.shape)} and dtype {grad_rows.dtype}")
    if rows == 0:
        return
    block, _, num_warps = _launch_config(classes)
    smooth = label_smoothing > 0.0
    cap, inv_cap = _softcap_args(softcap)
    common = dict(BLOCK=block, HAS_WEIGHT=weight is not None, SMOOTH=smooth, SOFTCAP=softcap > 0.0,
                  Z_LOSS=z_loss > 0.0, num_warps=num_warps)
    weight_arg = stats if weight is None else weight
    if target.dtype.is_floating_point:
        _ce_soft_bwd_kernel[(rows,)](
            grad_rows, logits, logits.stride(0), target, target.stride(0), weight_arg, stats, grad, grad.stride(0),
            classes, label_smoothing, z_loss, cap, inv_cap, **common)
    else:
        wsum = weight.sum(dtype=torch.float32).reshape(1) if weight is not None and smooth else stats
        _ce_class_bwd_kernel[(rows,)](
            grad_rows, logits, logits.stride(0), target, weight_arg, wsum, stats if alpha is None else alpha, stats,
            grad, grad.stride(0), classes, ignore_index, label_smoothing, z_loss, cap, inv_cap, focal_gamma,
            focal_alpha, HAS_ALPHA=alpha is not None, FOCAL=focal_gamma > 0.0, **common)
