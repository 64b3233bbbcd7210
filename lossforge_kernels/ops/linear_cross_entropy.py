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
from ._library import kernel_op
from .builder import FusedLoss, build

F32 = torch.float32
HALF = (torch.float16, torch.bfloat16)  # weights whose gradient is accumulated in fp32 by default
# rows per chunk when chunk_size is 0: as many as keep the chunk buffers of logits under this many
# bytes (1024 rows at V=128256 in bf16, where smaller chunks make the weight gradient's fp32
# accumulator traffic, 2 x 4 x V x D bytes per chunk, outweigh its product)
AUTO_CHUNK_BYTES = 252 << 20
PARAMS = ce.PARAMS + ("int chunk_size", "bool fp32_weight_grad")


def chunk_rows(n: int, v: int, itemsize: int, chunk_size: int, buffers: int = 1) -> int:
    """Rows per chunk: `chunk_size`, or for 0 the most rows whose `buffers` chunk buffers of logits fit
    AUTO_CHUNK_BYTES, rounded down to a multiple of 128 once that many fit (the products' tiles)."""
    if chunk_size > 0:
        return max(1, min(n, chunk_size))
    rows = max(1, AUTO_CHUNK_BYTES // (buffers * max(1, v * itemsize)))
    if rows >= 128:
        rows -= rows % 128
    return max(1, min(n, rows))


def fp32_out_products(device: torch.device, op: str = "addmm") -> bool:
    """Whether this device's `op` (addmm or mm) multiplies half-precision factors into an fp32 tensor
    (torch's out_dtype overload, which CUDA builds have from torch 2.8 on). False where torch lacks the
    overload or the dispatch key of the device type (e.g. "meta")."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}.dtype_out", device.type.upper())
    except (AttributeError, RuntimeError):
        return False


def _accumulate_product(acc, a, b):
    """acc += a @ b; an fp32 `acc` of half-precision factors accumulates without rounding each chunk's
    product where the device can (elsewhere the product is rounded once, then added in fp32)."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif fp32_out_products(acc.device):
        torch.ops.aten.addmm.dtype_out(acc, a, b, acc.dtype, out=acc)
    else:
        acc.add_(a @ b)


class _Chunks:
    """The chunk loop both directions share: logits of rows [start, stop) into a reused buffer."""

    def __init__(self, x, weight, bias, chunk_size, buffers=1):
        self.x = x
        self.weight = weight if weight.dtype == x.dtype else weight.to(x.dtype)
        self.bias = None if bias is None else bias.to(x.dtype)
        self.step = chunk_rows(x.shape[0], weight.shape[0], x.element_size(), chunk_size, buffers)
        self.buffer = x.new_empty(self.step, weight.shape[0])

    def __iter__(self):
        for start in range(0, self.x.shape[0], self.step):
            stop = min(self.x.shape[0], start + self.step)
            logits = self.buffer[:stop - start]
            if self.bias is None:
                torch.mm(self.x[start:stop], self.weight.t(), out=logits)
            else:
                torch.addmm(self.bias, self.x[start:stop], self.weight.t(), out=logits)
            yield start, stop, logits


class _Gradients:
    """Where the chunks' logit gradients go: the input's rows, the weight's and bias' accumulators."""

    def __init__(self, grads, weight, fp32_weight_grad):
        self.input, self.weight, self.bias = grads
        self.acc_w = self.acc_b = None
        if self.weight is not None:
            wide = fp32_weight_grad and weight.dtype in HALF
            self.acc_w = torch.zeros(weight.shape, device=weight.device, dtype=F32) if wide else \
                self.weight.zero_()
        if self.bias is not None:
            self.acc_b = torch.zeros(self.bias.shape, device=self.bias.device,
                                     dtype=F32 if self.bias.dtype in HALF else self.bias.dtype)

    def add(self, chunks, start, stop, dlogits):
        if self.input is not None:
            torch.mm(dlogits, chunks.weight, out=self.input[start:stop])
        if self.acc_w is not None:
            _accumulate_product(self.acc_w, dlogits.t(), chunks.x[start:stop])
        if self.acc_b is not None:
            self.acc_b += dlogits.sum(dim=0, dtype=self.acc_b.dtype)

    def finish(self):
        if self.acc_w is not None and self.acc_w is not self.weight:
            self.weight.copy_(self.acc_w)
        if self.acc_b is not None:
            self.bias.copy_(self.acc_b)


def _ce_tensors(tensors, start, stop):
    target, weight, weight_sum, alpha = tensors[3:]
    return target[start:stop], weight, weight_sum, alpha


def _forward(backend, tensors, params, grads, scale, reduce):
    x, weight, bias = tensors[:3]
    n = x.shape[0]
    rows = torch.empty(n, device=x.device, dtype=F32)
    stats = torch.empty(n, 4, device=x.device, dtype=F32)
    chunks = _Chunks(x, weight, bias, params[6])
    sink = None if grads is None else _Gradients(grads, weight, params[7])
    grad_scale = ce._grad_scale(scale, x)
    fwd = kernel_op("cross_entropy_fwd", backend)
    for start, stop, logits in chunks:
        # with a gradient, the kernel writes d(loss)/d(logits) over the logits it has read
        fwd(logits, *_ce_tensors(tensors, start, stop), grad_scale, rows[start:stop], stats[start:stop],
            None if sink is None else logits, *params[:6])
        if sink is not None:
            sink.add(chunks, start, stop, logits)
    if sink is not None:
        sink.finish()
    return (rows.sum() if reduce else rows), (stats,)


def _backward(backend, grad_rows, tensors, saved, params, grads):
    x, weight, bias = tensors[:3]
    grad_rows = grad_rows.reshape(-1).to(F32).contiguous()
    chunks = _Chunks(x, weight, bias, params[6], buffers=2)  # the backward kernel writes a buffer of its own
    dlogits = torch.empty_like(chunks.buffer)
    sink = _Gradients(grads, weight, params[7])
    bwd = kernel_op("cross_entropy_bwd", backend)
    for start, stop, logits in chunks:
        grad = dlogits[:stop - start]
        bwd(grad_rows[start:stop], logits, *_ce_tensors(tensors, start, stop), saved[0][start:stop], grad,
            *params[:6])
        sink.add(chunks, start, stop, grad)
    sink.finish()


def _rows_fake(tensors, params):
    x = tensors[0]
    return x.new_empty(x.shape[0], dtype=F32), x.new_empty(x.shape[0], 4, dtype=F32)


def _mean_divisor(tensors, params):
    x, _, _, target, weight = tensors[:5]
    return ce._mean_divisor((x, target, weight), params)


SPEC = FusedLoss(
    name="linear_cross_entropy",
    tensors=("input", "linear_weight", "linear_bias?", "target", "weight?", "weight_sum?", "alpha?"),
    params=PARAMS,
    differentiable=("input", "linear_weight", "linear_bias"),
    n_saved=1,
    forward=_forward,
    backward=_backward,
    rows_fake=_rows_fake,
    mean_divisor=_mean_divisor,
)
linear_cross_entropy_kernels = build(SPEC)
