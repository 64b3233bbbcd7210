# grad *= grad_output / applied, skipped on the device when they are equal; then applied = grad_output
# (contract: ops/_library.py; `first` means the old value is 1 and `applied` is not read).
#
# A grid of at most a few programs per SM walks BLOCK-wide pieces of the rows of grad (a dense
# tensor, whatever its dimension order, is one long row: every element gets the same factor). Each
# program loads both scalars first and, when they are equal, does nothing more, so the usual
# grad_output == 1 case moves no gradient bytes and costs one short launch; otherwise one read and
# one write per element.
# On a first backward no program reads `applied`, so program 0 writes it in the same launch; later
# ones set it by a second one-program launch on the same stream, which starts only after every
# program of the multiply has read the old value. Writes go through raw pointers, so autograd's
# version counters of the saved tensors stay as they were and a retained graph can run its
# backward again.
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096
NUM_WARPS = 8
PROGRAMS_PER_SM = 4


@triton.jit
def _scale_grad_kernel(grad_ptr, grad_output_ptr, applied_ptr, n_cols, row_stride, blocks_per_row, n_blocks,
                       FIRST: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    new = tl.load(grad_output_ptr).to(tl.float32)
    if FIRST:
        old = 1.0
        if pid == 0:
            tl.store(applied_ptr, new)
    else:
        old = tl.load(applied_ptr)
    if new != old:  # NaN != NaN: a NaN grad_output still propagates
        ratio = new / old
        for b in range(pid, n_blocks, tl.num_programs(0)):
            row = (b // blocks_per_row).to(tl.int64)
            cols = (b % blocks_per_row).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            ptr = grad_ptr + row * row_stride + cols
            mask = cols < n_cols
            g = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
            tl.store(ptr, (g * ratio).to(grad_ptr.dtype.element_ty), mask=mask)


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


def _max_programs(device) -> int:
    if device.type == "cuda":
        return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter on CPU: enough to walk several blocks per program in tests


def scale_grad(grad, grad_output, applied, first):
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
    n_blocks = rows * triton.cdiv(cols, BLOCK)
    if n_blocks > 0 or first:
        programs = max(1, min(n_blocks, _max_programs(grad.device)))
        _scale_grad_kernel[(programs,)](
            grad, grad_output, applied, cols, row_stride, max(1, triton.cdiv(cols, BLOCK)), n_blocks,
            FIRST=bool(first), BLOCK=BLOCK, num_warps=NUM_WARPS)
    if not first:
        _set_applied_kernel[(1,)](grad_output, applied, num_warps=1)
