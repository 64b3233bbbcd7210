# Per-token log-probabilities and entropy of (M, V) logit rows at a temperature T (the RL heads).
#
# One program owns one row of z = logits / T. The forward streams the row once in BLOCK-sized chunks
# with the row-softmax core's online max and two per-lane sums, s = sum e^(z-m) and
# u = sum e^(z-m) (z-m) (`online_moment_step`), and writes log p_t = (z_t - m) - log s and the entropy
# H = log s - u / s, with [m, log s, H] for the backward (z - lse = (z - m) - log s: a large lse is
# never rounded). The backward makes one more pass over the row
# for the per-row grad_outputs (g of log p_t, h of H):
#     dL/dlogits_j = [g (1[j = t] - p_j) - h p_j (z_j - lse + H)] / T
# and may write over the logits it reads (each chunk is loaded before it is stored).
# Traffic per logit: forward 1 read; backward 1 read + 1 write. Ignored rows are not read: outputs
# and gradient 0; a target out of [0, V) that is not ignore_index gives NaN outputs and gradient.
# All arithmetic is fp32; the gradient is stored in the logits' dtype.
from __future__ import annotations

import triton
import triton.language as tl

from .cross_entropy import chunk_plan
from .row_softmax import NEG_INF, online_moment_step


@triton.jit
def _row_target(target_ptr, row, V, ignore_index):
    """(t as int32, whether the row is computed, the fill value otherwise: 0 ignored, NaN out of range)."""
    t = tl.load(target_ptr + row)
    kept = t != ignore_index
    valid = kept & (t >= 0) & (t < V)
    return tl.where(valid, t, 0).to(tl.int32), valid, tl.where(kept, float("nan"), 0.0)


@triton.jit
def _log_probs_fwd_kernel(logits_ptr, logits_stride, target_ptr, out_ptr, stats_ptr, V, ignore_index, inv_t,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * logits_stride
    ts, valid, fill = _row_target(target_ptr, row, V, ignore_index)
    if valid:
        cols = tl.arange(0, BLOCK)
        m = NEG_INF
        s_acc = tl.zeros([BLOCK], tl.float32)
        u_acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            c = start + cols
            z = tl.load(x_row + c, mask=c < V, other=NEG_INF, eviction_policy="evict_first").to(tl.float32) * inv_t
            m, s_acc, u_acc = online_moment_step(m, s_acc, u_acc, z)
        s = tl.sum(s_acc, axis=0)
        log_s = tl.log(s)
        entropy = log_s - tl.sum(u_acc, axis=0) / s
        z_t = tl.load(x_row + ts).to(tl.float32) * inv_t
        tl.store(out_ptr + row * 2, (z_t - m) - log_s)  # an all -inf row: -inf - -inf = NaN, as torch
        tl.store(out_ptr + row * 2 + 1, entropy)
        tl.store(stats_ptr + row * 3, m)
        tl.store(stats_ptr + row * 3 + 1, log_s)
        tl.store(stats_ptr + row * 3 + 2, entropy)
    else:
        tl.store(out_ptr + row * 2, fill)
        tl.store(out_ptr + row * 2 + 1, fill)
        tl.store(stats_ptr + row * 3, fill)
        tl.store(stats_ptr + row * 3 + 1, fill)
        tl.store(stats_ptr + row * 3 + 2, fill)


@triton.jit
def _log_probs_bwd_kernel(grad_rows_ptr, logits_ptr, logits_stride, target_ptr, stats_ptr, grad_ptr, grad_stride, V,
                          ignore_index, inv_t, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * logits_stride
    g_row = grad_ptr + row * grad_stride
    ts, valid, fill = _row_target(target_ptr, row, V, ignore_index)
    cols = tl.arange(0, BLOCK)
    if valid:
        g = tl.load(grad_rows_ptr + row * 2)
        h = tl.load(grad_rows_ptr + row * 2 + 1)
        m = tl.load(stats_ptr + row * 3)
        log_s = tl.load(stats_ptr + row * 3 + 1)
        entropy = tl.load(stats_ptr + row * 3 + 2)
        for start in range(0, V, BLOCK):
            c = start + cols
            mask = c < V
            z = tl.load(x_row + c, mask=mask, other=NEG_INF).to(tl.float32) * inv_t
            logp = (z - m) - log_s
            p = tl.exp(logp)
            # p (log p + H) is 0 where p is 0 (a -inf logit), not 0 * -inf
            dz = -g * p - h * tl.where(p == 0.0, 0.0, p * (logp + entropy))
            dz = tl.where(c == ts, dz + g, dz)
            tl.store(g_row + c, (dz * inv_t).to(g_row.dtype.element_ty), mask=mask)
    else:
        for start in range(0, V, BLOCK):
            c = start + cols
            tl.store(g_row + c, (tl.zeros([BLOCK], tl.float32) + fill).to(g_row.dtype.element_ty), mask=c < V)


def log_probs_fwd(logits, target, out, stats, ignore_index, temperature):
    """The forward op (contract: lossforge_kernels/ops/log_probs.py, checked there)."""
    rows, classes = logits.shape
    if rows == 0:
        return
    block, num_warps = chunk_plan(classes)
    _log_probs_fwd_kernel[(rows,)](logits, logits.stride(0), target, out, stats, classes, ignore_index,
                                   1.0 / temperature, BLOCK=block, num_warps=num_warps)


def log_probs_bwd(grad_rows, logits, target, stats, grad, ignore_index, temperature):
    """The backward op (contract: lossforge_kernels/ops/log_probs.py, checked there)."""
    rows, classes = logits.shape
    if rows == 0:
        return
    block, num_warps = chunk_plan(classes)
    _log_probs_bwd_kernel[(rows,)](grad_rows, logits, logits.stride(0), target, stats, grad, grad.stride(0), classes,
                                   ignore_index, 1.0 / temperature, BLOCK=block, num_warps=num_warps)
