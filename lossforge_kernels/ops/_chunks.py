"""The row chunks of the chunked paths: `chunk_rows`, the one rule for their height; and the
linear cross-entropy's chunk loop (local and vocabulary-parallel): logits of a chunk of rows into one
reused buffer, and the products that turn a chunk's logit gradient into input, weight and bias
gradients; also whether a device multiplies half factors into fp32 directly."""
from __future__ import annotations

import torch

F32 = torch.float32
HALF = (torch.float16, torch.bfloat16)  # weights whose gradient is accumulated in fp32 by default
# The budget rule of every chunked path (linear cross-entropy, local and vocabulary-parallel; triplet's
# row chunks; the vocabulary-parallel cross-entropy's row blocks; the CUDA contrastive and triplet host
# loops through csrc/chunks.h, which a test holds to these numbers): a chunk's buffers take at most a
# quarter of the bytes the call's inputs already occupy, never less than MIN_CHUNK_BYTES (small inputs
# still get tall enough chunks) nor more than MAX_CHUNK_BYTES; a path whose every chunk pays a fixed
# cost asks for `min_rows` rows, which it gets while they fit MAX_CHUNK_BYTES.
MIN_CHUNK_BYTES = 32 << 20
MAX_CHUNK_BYTES = 256 << 20
TILE_ROWS = 128  # rows per chunk are a multiple of this once that many fit (whole tiles for the products)


def chunk_rows(total: int, row_bytes: int, chunk_size: int | None = None, *, input_bytes: int = 0,
               buffers: int = 1, min_rows: int = 1) -> int:
    """Rows per chunk of `total` rows whose chunk buffers take `row_bytes` per row each (`buffers` of
    them): `chunk_size` when given (> 0), else (None, or 0 as the C++ side passes) the budget rule
    above. Always in [1, max(total, 1)]."""
    if chunk_size:
        return max(1, min(total, chunk_size))
    per_row = max(1, buffers) * max(1, row_bytes)
    budget = min(MAX_CHUNK_BYTES, max(MIN_CHUNK_BYTES, input_bytes // 4))
    rows = max(budget // per_row, min(min_rows, MAX_CHUNK_BYTES // per_row))
    if rows >= TILE_ROWS:
        rows -= rows % TILE_ROWS
    return max(1, min(total, rows))


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
        # every chunk reads and writes the V x D weight-gradient accumulator: as many rows as fit
        self.step = chunk_rows(x.shape[0], weight.shape[0] * x.element_size(), chunk_size, buffers=buffers,
                               min_rows=x.shape[0])
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
