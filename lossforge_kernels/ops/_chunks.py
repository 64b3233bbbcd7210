"""The row-chunk machinery of the linear cross-entropy ops (local and vocabulary-parallel): logits of
a chunk of rows into one reused buffer, and the products that turn a chunk's logit gradient into
input, weight and bias gradients; also whether a device multiplies half factors into fp32 directly."""
from __future__ import annotations

import torch

F32 = torch.float32
HALF = (torch.float16, torch.bfloat16)  # weights whose gradient is accumulated in fp32 by default
# rows per chunk when chunk_size is 0: as many as keep the chunk buffers of logits under this many
# bytes (1024 rows at V=128256 in bf16, where smaller chunks make the weight gradient's fp32
# accumulator traffic, 2 x 4 x V x D bytes per chunk, outweigh its product)
AUTO_CHUNK_BYTES = 252 << 20


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


class Chunks:
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


class Gradients:
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
