"""Vocabulary-parallel linear cross-entropy: each rank holds rows [V_r, D] of the weight (and its bias
slice), the input is replicated, and no rank ever holds more than a chunk of its own logits.

The forward walks the rows in chunks, as the fused linear cross-entropy does
(ops/linear_cross_entropy.py): each chunk's logits of this rank's classes are reduced to the
statistics of distributed/cross_entropy.py; one all_gather carries them and every rank merges the
loss. The backward walks the chunks again, recomputes their logits and turns the merged statistics
into the gradient of this rank's logits, then into the weight and bias gradients of its slice and
its part of the input gradient, summed over the ranks unless `reduce_input_grad=False` (for layers
that reduce it themselves). Work: 2 N D V_r in the forward, 6 N D V_r in the backward.
"""
from __future__ import annotations

import torch

from ..ops._chunks import Chunks, Gradients
from ..reference.cross_entropy import compute_dtype
from .. import _checks as C
from .._once_differentiable import keep_anchor
from . import _group as G
from .cross_entropy import (capped, class_block_grad, class_block_stats, merge_class_stats, options, owned_targets,
                            slice_of, vocab_slices)

class _VocabParallelLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, target, class_weight, alpha, vs, opts, reduction, chunk_size, fp32_weight_grad,
                reduce_input_grad, group, loss_dtype):
        keep_anchor(ctx, x, weight, bias, target, class_weight, alpha)
        col, owned, counted = owned_targets(target, vs, opts)
        parts = []
        for start, stop, logits in Chunks(x, weight, bias, chunk_size):
            y, _ = capped(logits, opts.softcap)
            parts.append(class_block_stats(y, col[start:stop], owned[start:stop], class_weight, alpha,
                                           opts.label_smoothing > 0))
        st = merge_class_stats(G.all_gather_values(torch.cat(parts), group), counted, target, vs, opts,
                               alpha is not None)
        kept = target != opts.ignore_index
        divisor = torch.where(kept, st.w_t, 0.0).sum() if class_weight is not None else \
            kept.sum().to(compute_dtype(x.dtype))
        ctx.save_for_backward(x, weight, bias, class_weight)
        ctx.stats, ctx.masks = st, (col, owned, counted)
        ctx.args = (vs, opts, reduction, chunk_size, fp32_weight_grad, reduce_input_grad, group, divisor)
        loss = st.loss if reduction == "none" else st.loss.sum()
        return (loss / divisor if reduction == "mean" else loss).to(loss_dtype)

    @staticmethod
    @G.once_differentiable
    def backward(ctx, grad):
        x, weight, bias, class_weight = ctx.saved_tensors
        vs, opts, reduction, chunk_size, fp32_weight_grad, reduce_input_grad, group, divisor = ctx.args
        col, owned, counted = ctx.masks
        g = grad.to(compute_dtype(x.dtype))
        scale = g.reshape(-1) if reduction == "none" else (g / divisor if reduction == "mean" else g).expand(
            x.shape[0])
        wants = ctx.needs_input_grad[:3]
        grads = [torch.empty_like(t) if w and t is not None else None for t, w in zip((x, weight, bias), wants)]
        chunks = Chunks(x, weight, bias, chunk_size)
        sink = Gradients(grads, weight, fp32_weight_grad)
        for start, stop, logits in chunks:
            y, slope = capped(logits, opts.softcap)
            dlogits = class_block_grad(y, slope, col, owned, counted, ctx.stats, class_weight, scale, vs, opts,
                                       slice(start, stop))
            sink.add(chunks, start, stop, dlogits.to(logits.dtype))
        sink.finish()
        if grads[0] is not None and reduce_input_grad:
            grads[0] = G.all_reduce_value(grads[0], group)
        return (*grads, None, None, None, None, None, None, None, None, None, None, None)


def vocab_parallel_linear_cross_entropy(x, weight, bias, target, class_weight, *, reduction, process_group,
                                        vocab_start, chunk_size, fp32_weight_grad, reduce_input_grad, loss_dtype,
                                        **named):
    """x (N, D) replicated, weight (V_r, D) and bias (V_r,) this rank's rows, target (N,) global
    class indices; `named`: the scalar options of cross_entropy, checked by the public function.
    chunk_size and fp32_weight_grad shape only this rank's own work: ranks may differ in them."""
    group = G.resolve_group(process_group, x.device)
    what = "linear_cross_entropy(process_group=...)"
    opts, alpha = options(what, class_weight, **named)
    vs = vocab_slices(group, what, weight.shape[0], vocab_start, dict(
        loss="linear_cross_entropy", reduction=reduction, **named, weight=class_weight, linear_bias=bias,
        reduce_input_grad=reduce_input_grad, rows=x.shape[0], features=x.shape[1], dtype=x.dtype))
    class_weight, alpha = slice_of("weight", class_weight, vs), slice_of("focal_alpha", alpha, vs)
    C.check_target_range(target, vs.total, named["ignore_index"])
    return _VocabParallelLinearCE.apply(x, weight, bias, target, class_weight, alpha, vs, opts, reduction, chunk_size,
                                        fp32_weight_grad, reduce_input_grad, group, loss_dtype)
