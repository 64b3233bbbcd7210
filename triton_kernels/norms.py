# The normalisation's per-row factors, shared by the contrastive and triplet families (contracts:
# lossforge_kernels/ops/contrastive.py's inverse norms, ops/triplet.py's triplet_row_norms): one
# program per BLOCK_R rows sums the squares in fp32 over BLOCK_C-wide slices and writes inv_norm and
# radial (norm_factors). 2 e D bytes read and 8 written per row.
from __future__ import annotations

import triton
import triton.language as tl

from . import interpreting

NORM_EPS = tl.constexpr(1e-12)  # the normalisation's floor on |x| (F.normalize's eps in the references)


def row_multiple(d: int) -> int:
    """The largest of 16, 8, 4, 2, 1 dividing the row length D. Kernels take D as D_UNITS * D_MULTIPLE:
    Triton proves aligned rows (vector and asynchronous copies) only for integer arguments it sees as
    multiples of 16, though 8 suffices for 16-byte half rows (D = 520, 600)."""
    return next(m for m in (16, 8, 4, 2, 1) if d % m == 0)


@triton.jit
def _at_least_norm_eps(v):
    return tl.where(v < NORM_EPS, NORM_EPS, v)  # max(v, eps) that keeps a NaN, as torch's clamp_min


@triton.jit
def norm_factors(n, TWICE: tl.constexpr):
    """(inv, radial) of rows of norm n: inv = 1 / max(n, eps), and radial = inv where the clamp is off,
    else 0 (inv is then constant: no radial gradient). TWICE, rows normalised twice (triplet cosine
    with normalize): with u = n inv the once-normalised row's norm, inv = (1 / max(n, eps)) / max(u, eps),
    radial = 1 / n where u >= eps, else 0. NaN n: NaN in both."""
    inv = tl.div_rn(1.0, _at_least_norm_eps(n))
    radial = tl.where(n < NORM_EPS, 0.0, inv)
    if TWICE:
        u = n * inv
        inv = tl.div_rn(inv, _at_least_norm_eps(u))
        radial = tl.where(u < NORM_EPS, 0.0, tl.div_rn(1.0, tl.where(n == 0.0, 1.0, n)))  # (no 1 / 0 computed)
    return inv, radial


@triton.jit
def _row_norms_kernel(x_ptr, inv_ptr, radial_ptr, N, D_UNITS, TWICE: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_C: tl.constexpr, D_MULTIPLE: tl.constexpr):
    D = D_UNITS * D_MULTIPLE  # vector loads at widths of 8 mod 16 too (row_multiple)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask = rows < N
    sq = tl.zeros([BLOCK_R], tl.float32)
    for d0 in range(0, D, BLOCK_C):
        d = d0 + tl.arange(0, BLOCK_C)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * D + d[None, :], mask=mask[:, None] & (d[None, :] < D),
                    other=0.0).to(tl.float32)
        sq += tl.sum(x * x, axis=1)
    inv, radial = norm_factors(tl.sqrt_rn(sq), TWICE)
    tl.store(inv_ptr + rows, inv, mask=mask)
    tl.store(radial_ptr + rows, radial, mask=mask)


def row_norms(x, twice, inv_norm, radial):
    """inv_norm and radial (fp32, (rows,) each) of the contiguous rows of x (norm_factors)."""
    n, d = x.shape
    if n == 0:
        return
    block_r = 16 if interpreting() else 32
    block_c = min(triton.next_power_of_2(max(d, 1)), 128 if interpreting() else 256)
    multiple = row_multiple(d)
    _row_norms_kernel[(triton.cdiv(n, block_r),)](x, inv_norm, radial, n, d // multiple, TWICE=bool(twice),
                                                  BLOCK_R=block_r, BLOCK_C=max(block_c, 16), D_MULTIPLE=multiple)
