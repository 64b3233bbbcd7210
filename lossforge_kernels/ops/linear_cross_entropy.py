"""Fused linear cross-entropy on the cross-entropy kernels: the (N, V) logits never exist at once.

The rows are walked in chunks. For each chunk one matrix product makes its logits (n_c, V) in a
buffer reused by every chunk; the cross-entropy kernel of the chosen backend (`cross_entropy_fwd`
or `cross_entropy_bwd`, see ops/cross_entropy.py) reduces them and, when a gradient is wanted,
writes d(loss)/d(logits) over them in place; two more products turn that into the chunk's input
gradient and its share of the weight gradient (accumulated in fp32 by default). Both backends
share this orchestration; only the kernel op differs. With 'mean'/'sum' all three gradients come
out of the forward (the backward rescales them); with 'none' the forward keeps per-row statistics
and the backward recomputes each chunk's logits.

Work: 6 N D V FLOPs with gradients (three products), 2 N D V without, and with 'none' 8 N D V
(the backward recomputes the logits). Extra memory: one chunk of logits (`chunk_size` rows x V in
the products' dtype; two in the 'none' backward, whose kernel writes a buffer of its own, and the
automatic chunk halves there), plus the V x D fp32 weight-gradient accumulator when the weight is
not fp32 and `fp32_weight_grad`, plus a copy of the weight in the input's dtype when the two
differ (autocast with fp32 weights).
"""
from __future__ import annotations

import torch

from . import cross_entropy as ce
from ._chunks import F32, Chunks, Gradients
from .builder import FusedLoss, build

PARAMS = ce.PARAMS + ("int? chunk_size", "bool fp32_weight_grad")  # cross-entropy's options, then its own


def _ce_tensors(tensors, start, stop):
    target, weight, weight_sum, alpha = tensors[3:]
    return target[start:stop], weight, weight_sum, alpha


def _forward(backend, tensors, params, grads, grad_factor, reduce):
    x, weight, bias = tensors[:3]
    n = x.shape[0]
    rows = torch.empty(n, device=x.device, dtype=F32)
    stats = torch.empty(n, 4, device=x.device, dtype=F32)
    chunks = Chunks(x, weight, bias, params.chunk_size)
    sink = None if grads is None else Gradients(grads, weight, params.fp32_weight_grad)
    fwd, options = ce.FWD[backend], ce.scalar_options(params)
    for start, stop, logits in chunks:
        # with a gradient, the kernel writes d(loss)/d(logits) over the logits it has read
        fwd(logits, *_ce_tensors(tensors, start, stop), grad_factor, rows[start:stop], stats[start:stop],
            None if sink is None else logits, **options)
        if sink is not None:
            sink.add(chunks, start, stop, logits)
    if sink is not None:
        sink.finish()
    return (rows.sum() if reduce else rows), (stats,)


def _backward(backend, grad_rows, tensors, saved, params, grads):
    x, weight, bias = tensors[:3]
    grad_rows = grad_rows.reshape(-1).to(F32).contiguous()
    chunks = Chunks(x, weight, bias, params.chunk_size, buffers=2)  # the backward kernel writes a buffer of its own
    dlogits = torch.empty_like(chunks.buffer)
    sink = Gradients(grads, weight, params.fp32_weight_grad)
    bwd, options = ce.BWD[backend], ce.scalar_options(params)
    for start, stop, logits in chunks:
        grad = dlogits[:stop - start]
        bwd(grad_rows[start:stop], logits, *_ce_tensors(tensors, start, stop), saved[0][start:stop], grad, **options)
        sink.add(chunks, start, stop, grad)
    sink.finish()


def _rows_fake(tensors, params):
    """The rows op's fake, written out: the forward's chunk loop would fix the row count of a dynamic shape."""
    x = tensors[0]
    return x.new_empty(x.shape[0], dtype=F32), x.new_empty(x.shape[0], 4, dtype=F32)


def _mean_divisor(backend, tensors, params):
    x, _, _, target, weight = tensors[:5]
    return ce.mean_divisor_of(backend, (x, target, weight), params)


SPEC = FusedLoss(
    name="linear_cross_entropy",
    tensors=("input", "linear_weight", "linear_bias?", "target", "weight?", "weight_sum?", "alpha?"),
    params=PARAMS,
    differentiable=("input", "linear_weight", "linear_bias"),
    n_saved=1,
    forward=_forward,
    backward=_backward,
    mean_divisor=_mean_divisor,
    rows_fake=_rows_fake,
)
linear_cross_entropy_kernels = build(SPEC)
