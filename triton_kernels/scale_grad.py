# grad *= grad_output on the device (contract: lossforge_kernels/ops/_library.py), skipped when
# grad_output == 1.
#
# A grid of at most a few programs per SM walks BLOCK-wide pieces of the rows of grad (a dense
# tensor, whatever its dimension order, is one long row: every element gets the same factor). Each
# program loads the factor first and, when it is 1, does nothing more, so the usual grad_output of
# 1 moves no gradient bytes and costs one short launch; otherwise one read and one write per
# element, in fp32 arithmetic.
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096
NUM_WARPS = 8
PROGRAMS_PER_SM = 4


@triton.jit
def _scale_grad_kernel(grad_ptr, grad_output_ptr, n_cols, row_stride, blocks_per_row, n_blocks, BLOCK: tl.constexpr):
    factor = tl.load(grad_output_ptr).to(tl.float32)
    if factor != 1.0:  # a NaN factor still propagates
        for b in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
            row = (b // blocks_per_row).to(tl.int64)
            cols = (b % blocks_per_row).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            ptr = grad_ptr + row * row_stride + cols
            mask = cols < n_cols
            g = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
            tl.store(ptr, (g * factor).to(grad_ptr.dtype.element_ty), mask=mask)


def _is_dense(t) -> bool:
    """Whether the elements fill one gap-free block of memory, in any dimension order."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _max_programs(device) -> int:
    if device.type == "cuda":
        return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter on CPU: enough to walk several blocks per program in tests


def scale_grad(grad, grad_output):
    if _is_dense(grad):
        rows, cols, row_stride = 1, grad.numel(), 0
    elif grad.dim() == 2 and grad.stride(1) == 1:
        rows, cols, row_stride = grad.shape[0], grad.shape[1], grad.stride(0)
    else:  # any other layout: the same arithmetic with torch ops
        grad.copy_((grad.to(torch.float32) * grad_output.to(torch.float32)).to(grad.dtype))
        return
    n_blocks = rows * triton.cdiv(cols, BLOCK)
    if n_blocks > 0:
        _scale_grad_kernel[(min(n_blocks, _max_programs(grad.device)),)](
            grad, grad_output, cols, row_stride, triton.cdiv(cols, BLOCK), n_blocks, BLOCK=BLOCK, num_warps=NUM_WARPS)
