"""Vocabulary-parallel distillation: each rank holds the same slice of the classes of both heads (the
logits' last dimension, or the rows of both heads' weights).

The forward makes two collectives of a few numbers per row, never logits. Each rank reduces its
slice of each head's row of z = logits / T to the row-softmax core's (max, sum of exp); one
all_gather gives every rank the unsharded rows' max and log-sum, hence the exact log-probabilities
ls and lt of its own classes. Each rank then sums its classes' divergence terms and the student's
weighted terms Gbar (the per-element formulas of triton_kernels/distillation.py); one all_reduce
adds them over the ranks. The backward needs no collective for the logits: each rank writes the
gradient of its student slice (kl: ps - pt; reverse_kl and jsd: ps (G - Gbar)) / T; the linear form
sums the student's input gradient over the ranks unless `reduce_input_grad=False`. Work of the
linear form: 8 N D V_r in the forward (both heads' logits, twice), 8 N D V_r in the backward.
"""
from __future__ import annotations

import math

import torch

from ..ops._chunks import Chunks, Gradients, chunk_rows
from ..reference import row_softmax as core
from ..reference.cross_entropy import compute_dtype
from .._once_differentiable import keep_anchor
from . import _group as G
from .cross_entropy import vocab_slices


def _scaled(logits, temperature, dtype):
    z = logits.to(dtype)
    return z if temperature == 1.0 else z / temperature


def _row_stats(z):
    """(rows, 2): the max and sum of exp(z - max) of this slice of each row."""
    if z.shape[1] == 0:
        zero = z.new_zeros(z.shape[0])
        return torch.stack([zero - float("inf"), zero], 1)
    m = z.max(1).values
    return torch.stack([m, core.exp_diff(z, core.safe_max(m)[:, None]).sum(1)], 1)


def _merge(parts):
    """(W, N, 2) statistics of the ranks' slices as the unsharded rows' (max, log sum of exp)."""
    m_r, s_r = parts.unbind(-1)
    m = m_r.max(0).values
    return m, torch.log((s_r * core.exp_diff(m_r, core.safe_max(m))).sum(0))


def _p_log_ratio(p, log_a, log_b):
    return torch.where(p == 0, 0.0, p * (log_a - log_b))


class _Heads:
    """The merged statistics and options: the per-element terms of a block of rows."""

    def __init__(self, student_stats, teacher_stats, divergence, beta, temperature):
        self.student, self.teacher = student_stats, teacher_stats
        self.divergence, self.beta, self.temperature = divergence, beta, temperature

    def log_probs(self, zs, zt, rows):
        (ms, log_ss), (mt, log_st) = self.student, self.teacher
        return (zs - ms[rows, None]) - log_ss[rows, None], (zt - mt[rows, None]) - log_st[rows, None]

    def log_mix(self, ls, lt):
        return torch.logaddexp(lt + math.log(self.beta), ls + math.log1p(-self.beta))

    def terms(self, zs, zt, rows):
        """(rows, 2): this slice's sums of the divergence's terms and of ps G."""
        ls, lt = self.log_probs(zs, zt, rows)
        ps = ls.exp()
        if self.divergence == "kl":
            d = _p_log_ratio(lt.exp(), lt, ls)
            w = torch.zeros_like(d)
        elif self.divergence == "reverse_kl":
            d = w = _p_log_ratio(ps, ls, lt)
        else:
            lm = self.log_mix(ls, lt)
            w = (1.0 - self.beta) * _p_log_ratio(ps, ls, lm)
            d = self.beta * _p_log_ratio(lt.exp(), lt, lm) + w
        return torch.stack([d.sum(1), w.sum(1)], 1)

    def grad(self, zs, zt, rows, gbar, scale):
        """scale * d(divergence)/d(student logits) of this slice (scale per row, 1/T included here)."""
        ls, lt = self.log_probs(zs, zt, rows)
        ps = ls.exp()
        if self.divergence == "kl":
            g = ps - lt.exp()
        else:
            G_ = ls - lt if self.divergence == "reverse_kl" else (1.0 - self.beta) * (ls - self.log_mix(ls, lt))
            g = torch.where(ps == 0, 0.0, ps * (G_ - gbar[rows, None]))
        return g * (scale[rows, None] / self.temperature)


def _blocks(student, teacher, dtype, temperature):
    """(rows, zs, zt) over blocks of rows of the two (N, V_r) slices."""
    n = student.shape[0]
    step = chunk_rows(n, student.shape[1] * 16, input_bytes=2 * student.numel() * student.element_size())
    for start in range(0, n, step):
        rows = slice(start, start + step)
        yield rows, _scaled(student[rows], temperature, dtype), _scaled(teacher[rows], temperature, dtype)


def _linear_blocks(tensors, chunk_size, dtype, temperature):
    """(rows, zs, zt, student chunks, student logits buffer) over chunks of rows of both heads."""
    student = Chunks(*tensors[:3], chunk_size, buffers=2)
    teacher = Chunks(*tensors[3:6], student.step)
    for (start, stop, s_logits), (_, _, t_logits) in zip(student, teacher):
        yield (slice(start, stop), _scaled(s_logits, temperature, dtype), _scaled(t_logits, temperature, dtype),
               student, s_logits)


def _forward(ctx, blocks, n, counted, opts, reduction, group, dtype):
    """The loss from two passes of `blocks()` (a callable giving (rows, zs, zt, ...) tuples)."""
    divergence, beta, temperature = opts
    stats = [torch.cat(parts) for parts in zip(*[(_row_stats(b[1]), _row_stats(b[2])) for b in blocks()])]
    heads = _Heads(_merge(G.all_gather_values(stats[0], group)), _merge(G.all_gather_values(stats[1], group)),
                   divergence, beta, temperature)
    sums = G.all_reduce_value(torch.cat([heads.terms(b[1], b[2], b[0]) for b in blocks()]), group)
    rows = torch.where(counted, sums[:, 0], 0.0)
    divisor = counted.sum().to(dtype)
    ctx.heads, ctx.gbar, ctx.divisor = heads, sums[:, 1], divisor
    loss = rows if reduction == "none" else rows.sum()
    return loss / divisor if reduction == "mean" else loss


def _row_scale(grad, reduction, divisor, counted, dtype):
    g = grad.to(dtype)
    scale = g.reshape(-1) if reduction == "none" else (g / divisor if reduction == "mean" else g).expand(
        counted.shape[0])
    return torch.where(counted, scale, 0.0)


class _VocabParallelDistillation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, counted, opts, reduction, group):
        keep_anchor(ctx, student)
        dtype = compute_dtype(student.dtype)
        loss = _forward(ctx, lambda: _blocks(student, teacher, dtype, opts[2]), student.shape[0], counted, opts,
                        reduction, group, dtype)
        ctx.save_for_backward(student, teacher, counted)
        ctx.reduction = reduction
        return loss

    @staticmethod
    @G.once_differentiable
    def backward(ctx, grad):
        student, teacher, counted = ctx.saved_tensors
        dtype = compute_dtype(student.dtype)
        scale = _row_scale(grad, ctx.reduction, ctx.divisor, counted, dtype)
        out = torch.empty_like(student)
        for rows, zs, zt in _blocks(student, teacher, dtype, ctx.heads.temperature):
            out[rows] = ctx.heads.grad(zs, zt, rows, ctx.gbar, scale)
        return out, None, None, None, None, None


class _VocabParallelLinearDistillation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sx, sw, sb, tx, tw, tb, counted, opts, reduction, chunk_size, reduce_input_grad, group):
        keep_anchor(ctx, sx, sw, sb)
        dtype = compute_dtype(sx.dtype)
        tensors = (sx, sw, sb, tx, tw, tb)
        loss = _forward(ctx, lambda: _linear_blocks(tensors, chunk_size, dtype, opts[2]), sx.shape[0], counted, opts,
                        reduction, group, dtype)
        ctx.save_for_backward(*tensors, counted)
        ctx.args = (reduction, chunk_size, reduce_input_grad, group)
        return loss

    @staticmethod
    @G.once_differentiable
    def backward(ctx, grad):
        *tensors, counted = ctx.saved_tensors
        reduction, chunk_size, reduce_input_grad, group = ctx.args
        sx, sw, sb = tensors[:3]
        dtype = compute_dtype(sx.dtype)
        scale = _row_scale(grad, reduction, ctx.divisor, counted, dtype)
        grads = [torch.empty_like(t) if w and t is not None else None
                 for t, w in zip((sx, sw, sb), ctx.needs_input_grad[:3])]
        sink = Gradients(grads, sw, True)
        for rows, zs, zt, chunks, logits in _linear_blocks(tensors, chunk_size, dtype, ctx.heads.temperature):
            sink.add(chunks, rows.start, rows.stop, ctx.heads.grad(zs, zt, rows, ctx.gbar, scale).to(logits.dtype))
        sink.finish()
        if grads[0] is not None and reduce_input_grad:
            grads[0] = G.all_reduce_value(grads[0], group)
        return (*grads, None, None, None, None, None, None, None, None, None)


def _counted(target, n, ignore_index, device):
    return torch.ones(n, dtype=torch.bool, device=device) if target is None else target != ignore_index


def vocab_parallel_distillation(student, teacher, target, *, divergence, beta, temperature, ignore_index, reduction,
                                process_group, vocab_start):
    """The distillation loss of student and teacher logits (N, V_r), this rank's slice of the classes,
    target (N,) or None (only masks); the options are checked by the public function."""
    group = G.resolve_group(process_group, student.device)
    vocab_slices(group, "distillation_loss(process_group=...)", student.shape[1], vocab_start, dict(
        loss="distillation_loss", divergence=divergence, beta=beta, temperature=temperature, ignore_index=ignore_index,
        reduction=reduction, target=target, rows=student.shape[0], dtype=student.dtype))
    counted = _counted(target, student.shape[0], ignore_index, student.device)
    return _VocabParallelDistillation.apply(student, teacher, counted, (divergence, beta, temperature), reduction,
                                            group)


def vocab_parallel_linear_distillation(sx, sw, sb, tx, tw, tb, target, *, divergence, beta, temperature, ignore_index,
                                       reduction, chunk_size, reduce_input_grad, process_group, vocab_start):
    """The distillation loss of two linear heads whose weights (V_r, D) and biases are this rank's rows,
    inputs replicated. chunk_size shapes only this rank's own work: ranks may differ in it."""
    group = G.resolve_group(process_group, sx.device)
    if tw.shape[0] != sw.shape[0]:
        raise ValueError(f"linear_distillation_loss(process_group=...): teacher_weight must hold the student's "
                         f"{sw.shape[0]} classes of this rank, got {tw.shape[0]}")
    vocab_slices(group, "linear_distillation_loss(process_group=...)", sw.shape[0], vocab_start, dict(
        loss="linear_distillation_loss", divergence=divergence, beta=beta, temperature=temperature,
        ignore_index=ignore_index, reduction=reduction, target=target, student_bias=sb, teacher_bias=tb,
        reduce_input_grad=reduce_input_grad, rows=sx.shape[0], features=sx.shape[1], dtype=sx.dtype))
    counted = _counted(target, sx.shape[0], ignore_index, sx.device)
    return _VocabParallelLinearDistillation.apply(sx, sw, sb, tx, tw, tb, counted, (divergence, beta, temperature),
                                                  reduction, chunk_size, reduce_input_grad, group)
