# grad *= grad_output / applied, skipped on the device when they are equal; then applied = grad_output.
#
# One program scales BLOCK consecutive elements of one row of grad (a dense tensor, whatever its
# dimension order, is one long row: every element gets the same factor). Each program loads both
# scalars and, when they are equal, masks every lane off, so the usual grad_output == 1 case moves
# no gradient bytes; otherwise one read and one write per element.
# `applied` is then set by a second one-program launch on the same stream, which starts only after
# every program of the multiply has read the old value. Both writes go through raw pointers, so
# autograd's version counters of the saved tensors stay as they were and a retained graph can run
# its backward again.
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096
NUM_WARPS = 8


@triton.jit
def _scale_grad_kernel(grad_ptr, grad_output_ptr, applied_ptr, n_cols, row_stride, blocks_per_row,
                       BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = (pid // blocks_per_row).to(tl.int64)
    cols = (pid % blocks_per_row).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    new = tl.load(grad_output_ptr).to(tl.float32)
    old = tl.load(applied_ptr)
    mask = cols < tl.where(new != old, n_cols, 0)  # all lanes off when there is nothing to rescale
    ptr = grad_ptr + row * row_stride + cols
    g = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptr, (g * (new / old)).to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _set_applied_kernel(grad_output_ptr, applied_ptr):
    tl.store(applied_ptr, tl.load(grad_output_ptr).to(tl.float32))


def _is_dense(t) -> bool:
    """Whether the elements fill one gap-free block of memory, in any dimension order."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def scale_grad(grad, grad_output, applied):
    if grad_output.numel() != 1 or applied.numel() != 1 or applied.dtype != torch.float32:
        raise ValueError(f"grad_output and applied must be single-element tensors (applied fp32), got shapes "
                         f"{tuple(grad_output.shape)} and {tuple(applied.shape)}, applied dtype {applied.dtype}")
    if _is_dense(grad):
        rows, cols, row_stride = 1, grad.numel(), 0
    elif grad.dim() == 2 and grad.stride(1) == 1:
        rows, cols, row_stride = grad.shape[0], grad.shape[1], grad.stride(0)
    else:
        raise ValueError(f"grad must be dense or an (M, C) view with unit column stride, got shape "
                         f"{tuple(grad.shape)} and strides {grad.stride()}")
    if rows * cols > 0:
        blocks_per_row = triton.cdiv(cols, BLOCK)
        _scale_grad_kernel[(rows * blocks_per_row,)](
            grad, grad_output, applied, cols, row_stride, blocks_per_row, BLOCK=BLOCK, num_warps=NUM_WARPS)
    _set_applied_kernel[(1,)](grad_output, applied, num_warps=1)
