"""Vocabulary-parallel per-token log-probs and entropy: each rank holds a slice of the classes of the
same rows (the logits' last dimension, or the rows of a linear head's weight).

Each rank reduces its slice of every row of z = logits / T to four numbers (the row-softmax core's
entropy rows, reference/row_softmax.py): its max m_r, s_r = sum e^(z - m_r), u_r = sum e^(z - m_r)
(z - m_r) and the target's z where it owns the target class. One all_gather carries those rows,
never logits, and every rank merges them into the unsharded row's max M, log s and entropy H, and
log p_t. The backward needs no collective for the logits: each rank writes the gradient of its own
slice, [g (1[j = t] - p_j) - h p_j (log p_j + H)] / T; the linear form then sums the input gradient
over the ranks unless `reduce_input_grad=False`. The local work runs as PyTorch ops in chunks of
rows (ops/_chunks.py), so it works on any device and backend. Work of the linear form: 2 N D V_r
in the forward, 6 N D V_r in the backward (the logits recomputed).
"""
from __future__ import annotations

import torch

from ..ops._chunks import Chunks, Gradients, chunk_rows
from ..reference import row_softmax as core
from ..reference.cross_entropy import compute_dtype
from .._once_differentiable import keep_anchor
from . import _group as G
from .. import _checks as C
from .cross_entropy import Options, VocabSlice, owned_targets, vocab_slices


def owned_columns(target, vs: VocabSlice, ignore_index):
    """(the target's column in this slice, clamped; whether this rank owns it; whether the row counts)."""
    return owned_targets(target, vs, Options(ignore_index, 0.0, 0.0, None, 0.0, None))


def _block_stats(z, col, owned):
    """(rows, 4): m_r, s_r, u_r of a block of rows of this slice, and z_t where owned (else 0)."""
    if z.shape[1] == 0:
        zero = z.new_zeros(z.shape[0])
        return torch.stack([zero - float("inf"), zero, zero, zero], 1)
    m = z.max(1).values
    shifted = z - core.safe_max(m)[:, None]
    e = torch.exp(shifted)
    u = torch.where(e == 0, 0.0, e * shifted).sum(1)  # a -inf logit adds 0, not 0 * -inf
    z_t = torch.where(owned, z.gather(1, col[:, None]).squeeze(1), 0.0)
    return torch.stack([m, e.sum(1), u, z_t], 1)


def _merge(parts):
    """The ranks' (W, N, 4) statistics as the unsharded rows' (M, log s, H, log p_t)."""
    m_r, s_r, u_r, z_t = parts.unbind(-1)
    m = m_r.max(0).values
    safe = core.safe_max(m)
    scale = core.exp_diff(m_r, safe)
    empty = m_r == float("-inf")  # a slice of only -inf logits: s_r = u_r = 0
    s = (s_r * scale).sum(0)
    u = torch.where(empty, 0.0, (u_r + (m_r - safe) * s_r) * scale).sum(0)
    log_s = torch.log(s)
    return m, log_s, log_s - u / s, (z_t.sum(0) - m) - log_s


def _scaled(logits, temperature):
    z = logits.to(compute_dtype(logits.dtype))
    return z if temperature == 1.0 else z / temperature


def _slice_grad(z, rows, stats, grad_out, col, owned, counted, temperature):
    """d(sum g log p_t + h H)/d(this slice's logits) of a block of rows."""
    m, log_s, entropy, _ = (t[rows] for t in stats)
    g, h = grad_out[rows, 0], grad_out[rows, 1]
    logp = (z - m[:, None]) - log_s[:, None]
    p = torch.exp(logp)
    dz = -g[:, None] * p - h[:, None] * torch.where(p == 0, 0.0, p * (logp + entropy[:, None]))
    dz = dz.scatter_add(1, col[rows, None], torch.where(owned[rows], g, 0.0)[:, None])
    return torch.where(counted[rows, None], dz, 0.0) / temperature


def _outputs(stats, counted):
    _, _, entropy, log_p = stats
    """(N, 2) [log p_t, entropy], 0 on rows that do not count; float32 (float64 for float64 logits)."""
    return torch.stack([torch.where(counted, log_p, 0.0), torch.where(counted, entropy, 0.0)], 1)


def _row_blocks(logits):
    step = chunk_rows(logits.shape[0], logits.shape[1] * 8, input_bytes=logits.numel() * logits.element_size())
    return [slice(start, start + step) for start in range(0, logits.shape[0], step)]


class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vs, temperature, ignore_index, group):
        keep_anchor(ctx, logits)
        col, owned, counted = owned_columns(target, vs, ignore_index)
        parts = [_block_stats(_scaled(logits[rows], temperature), col[rows], owned[rows])
                 for rows in _row_blocks(logits)]
        stats = _merge(G.all_gather_values(torch.cat(parts), group))
        ctx.save_for_backward(logits)
        ctx.stats, ctx.masks, ctx.temperature = stats, (col, owned, counted), temperature
        return _outputs(stats, counted)

    @staticmethod
    @G.once_differentiable
    def backward(ctx, grad_out):
        (logits,) = ctx.saved_tensors
        grad_out = grad_out.to(compute_dtype(logits.dtype))
        grad = torch.empty_like(logits)
        for rows in _row_blocks(logits):
            grad[rows] = _slice_grad(_scaled(logits[rows], ctx.temperature), rows, ctx.stats, grad_out, *ctx.masks,
                                     ctx.temperature)
        return grad, None, None, None, None, None


class _VocabParallelLinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, target, vs, temperature, ignore_index, chunk_size, reduce_input_grad, group):
        keep_anchor(ctx, x, weight, bias)
        col, owned, counted = owned_columns(target, vs, ignore_index)
        parts = [_block_stats(_scaled(logits, temperature), col[start:stop], owned[start:stop])
                 for start, stop, logits in Chunks(x, weight, bias, chunk_size)]
        stats = _merge(G.all_gather_values(torch.cat(parts), group))
        ctx.save_for_backward(x, weight, bias)
        ctx.stats, ctx.masks = stats, (col, owned, counted)
        ctx.args = (temperature, chunk_size, reduce_input_grad, group)
        return _outputs(stats, counted)

    @staticmethod
    @G.once_differentiable
    def backward(ctx, grad_out):
        x, weight, bias = ctx.saved_tensors
        temperature, chunk_size, reduce_input_grad, group = ctx.args
        grad_out = grad_out.to(compute_dtype(x.dtype))
        grads = [torch.empty_like(t) if w and t is not None else None
                 for t, w in zip((x, weight, bias), ctx.needs_input_grad[:3])]
        chunks = Chunks(x, weight, bias, chunk_size)
        sink = Gradients(grads, weight, True)
        for start, stop, logits in chunks:
            dz = _slice_grad(_scaled(logits, temperature), slice(start, stop), ctx.stats, grad_out, *ctx.masks,
                             temperature)
            sink.add(chunks, start, stop, dz.to(logits.dtype))
        sink.finish()
        if grads[0] is not None and reduce_input_grad:
            grads[0] = G.all_reduce_value(grads[0], group)
        return (*grads, None, None, None, None, None, None, None)


def vocab_parallel_log_probs(logits, target, *, temperature, ignore_index, process_group, vocab_start):
    """(N, 2) [log p_t, entropy] of logits (N, V_r), this rank's slice of the classes, and
    target (N,) global class indices; the options are checked by the public function."""
    group = G.resolve_group(process_group, logits.device)
    what = "log_probs(process_group=...)"
    vs = vocab_slices(group, what, logits.shape[1], vocab_start, dict(
        loss="log_probs", temperature=temperature, ignore_index=ignore_index, rows=logits.shape[0],
        dtype=logits.dtype))
    C.check_target_range(target, vs.total, ignore_index)
    return _VocabParallelLogProbs.apply(logits, target, vs, temperature, ignore_index, group)


def vocab_parallel_linear_log_probs(x, weight, bias, target, *, temperature, ignore_index, process_group,
                                    vocab_start, chunk_size, reduce_input_grad):
    """(N, 2) [log p_t, entropy] of x (N, D) replicated and weight (V_r, D), bias (V_r,) this
    rank's rows of the head. chunk_size shapes only this rank's own work: ranks may differ in it."""
    group = G.resolve_group(process_group, x.device)
    what = "linear_log_probs(process_group=...)"
    vs = vocab_slices(group, what, weight.shape[0], vocab_start, dict(
        loss="linear_log_probs", temperature=temperature, ignore_index=ignore_index, linear_bias=bias,
        reduce_input_grad=reduce_input_grad, rows=x.shape[0], features=x.shape[1], dtype=x.dtype))
    C.check_target_range(target, vs.total, ignore_index)
    return _VocabParallelLinearLogProbs.apply(x, weight, bias, target, vs, temperature, ignore_index, chunk_size,
                                              reduce_input_grad, group)
