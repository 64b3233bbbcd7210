# Batch-hard triplet mining, its kept-anchor count and its pair gradient (contract:
# lossforge_kernels/ops/triplet.py).
#
# Mining: one program owns BLOCK_M anchors and walks every BLOCK_N-column tile of the Gram matrix
# x x^T (tl.dot over BLOCK_K slices, fp32 accumulation), turns the tile into distances in
# registers and folds it into a running farthest positive and nearest negative per anchor, ties
# to the smallest column. Nothing B x B is stored; the work is 2 B^2 D FLOPs on the tensor cores
# (each program re-reads all of x: B^2 D / BLOCK_M elements, from L2). A small pre-pass writes the
# rows' squared norms and whether a row holds a NaN or inf (fp32, 2B values). The epilogue reads
# each anchor's two partner rows once more (the exact difference-form distances: 3 D elements and
# 6 D FLOPs per anchor) and writes the anchor's loss and slope.
# Kept count ('mean''s divisor): labels only, B^2 integer compares, a block of anchors stops once
# each has a positive and a negative.
# Pair gradient: a program owns BLOCK_R rows x BLOCK_D features. It adds the rows' own two pairs,
# then scans every anchor's two partner indices for those inside its rows (a range test: 16 B bytes
# per program from L2) and adds each hit's pair in anchor order (one read of the anchor's slice).
# Deterministic (no atomics, a fixed order), nothing built or sorted beforehand.
# The normalisation around every mining: the row norms (inv_norm and radial per row) and the
# finishing pass (the gradient's radial part off, rounded once to x's dtype; two passes per row).
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting
from .math import as_operand, operand_rounding
from .norms import row_norms
from .row_softmax import softplus

# The `distance` and `mining` values of the contract (reference/triplet.py: Distance, Mining;
# tests/test_enums.py checks them).
EUCLIDEAN = tl.constexpr(0)
SQUARED_EUCLIDEAN = tl.constexpr(1)
COSINE = tl.constexpr(2)
BATCH_HARD = tl.constexpr(0)
SEMI_HARD = tl.constexpr(1)
BATCH_ALL = tl.constexpr(2)
NO_INDEX = tl.constexpr(2147483647)  # jit code may read only constexpr globals
# A Euclidean distance at most this had its Gram clamp active: no gradient (ops/triplet.py's CLAMPED_EUCLIDEAN).
CLAMPED_EUCLIDEAN = tl.constexpr(1.000001e-6)
EUCLIDEAN_EPS = tl.constexpr(1e-12)


@triton.jit
def _row_sq_norm_kernel(x_ptr, out_ptr, B, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[i] = |x_i|^2 and out[B + i] = 1 if x_i holds a NaN or inf, else 0."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < B
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    bad = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k in range(0, D, BLOCK_D):
        ks = k + tl.arange(0, BLOCK_D)
        v = tl.load(x_ptr + rows.to(tl.int64)[:, None] * D + ks[None, :], mask=rmask[:, None] & (ks < D)[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(v * v, axis=1)
        bad = tl.maximum(bad, tl.max(tl.where(tl.abs(v) < float("inf"), 0.0, 1.0), axis=1))
    tl.store(out_ptr + rows, acc, mask=rmask)
    tl.store(out_ptr + B + rows, bad, mask=rmask)


@triton.jit
def _clamp_keep_nan(v):
    """max(v, 0) that keeps a NaN: a GPU's maximum returns the other operand for a NaN."""
    return tl.where(v < 0.0, 0.0, v)


@triton.jit
def _fold_best(best_v, best_i, d, cand, cols, LARGEST: tl.constexpr):
    """Folds (rows, cols) candidates into a running best (value, column) per row: the largest (else
    the smallest) value, ties to the smallest column, and any NaN over every number (the first NaN
    column), as torch's argmax/argmin choose. A GPU's max/min and every comparison pass over a NaN, so
    NaNs are found by d != d and kept apart. best_i is NO_INDEX while nothing was taken."""
    is_nan = cand & (d != d)
    nan_i = tl.min(tl.where(is_nan, cols[None, :], NO_INDEX), axis=1)
    num = cand & (d == d)
    if LARGEST:
        top = tl.max(tl.where(num, d, float("-inf")), axis=1)
        better = top > best_v
    else:
        top = tl.min(tl.where(num, d, float("inf")), axis=1)
        better = top < best_v
    top_i = tl.min(tl.where(num & (d == top[:, None]), cols[None, :], NO_INDEX), axis=1)
    # (top == best_v: a candidate at +-inf against the initial value)
    better = (better | ((top == best_v) & (top_i < best_i))) & (top_i != NO_INDEX) & (best_v == best_v)
    best_v = tl.where(better, top, best_v)
    best_i = tl.where(better, top_i, best_i)
    take_nan = (nan_i != NO_INDEX) & ((best_v == best_v) | (nan_i < best_i))
    best_v = tl.where(take_nan, float("nan"), best_v)
    best_i = tl.where(take_nan, nan_i, best_i)
    return best_v, best_i


@triton.jit
def _tile_distances(dot, inv_r, e_r, inv_c, e_c, DISTANCE: tl.constexpr, HAS_INV_NORM: tl.constexpr):
    """Distances from the tile's dot products; e_* are the rows' squared norms (times inv_*^2)."""
    # one factor at a time: inv_r inv_c overflows for two zero rows (cosine of normalised rows: 1e24 each)
    if HAS_INV_NORM:
        dot = dot * inv_r[:, None] * inv_c[None, :]
    if DISTANCE == COSINE:
        return 1.0 - dot
    sq = _clamp_keep_nan(e_r[:, None] + e_c[None, :] - 2.0 * dot)
    if DISTANCE == SQUARED_EUCLIDEAN:
        return sq
    return tl.sqrt_rn(sq + 1e-12)


@triton.jit
def _gram_tile(x_ptr, rows64, rmask, cols64, cmask, D, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The Gram tile x[rows] x[cols]^T over all D features, fp32 (masked rows and columns give 0)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, D, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        kmask = ks < D
        a = tl.load(x_ptr + rows64[:, None] * D + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(x_ptr + cols64[:, None] * D + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        if DOT_F32:  # the interpreter has no half-precision dot
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _scaled_rows(x_ptr, inv_ptr, idx, rmask, ks, kmask, D, HAS_INV_NORM: tl.constexpr):
    """The rows v_idx = inv_norm[idx] * x[idx] at features ks, in fp32 (idx int64)."""
    v = tl.load(x_ptr + idx[:, None] * D + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
    v = v.to(tl.float32)
    if HAS_INV_NORM:
        v = v * tl.load(inv_ptr + idx, mask=rmask, other=0.0)[:, None]
    return v


@triton.jit
def _exact_distance(d, sq, has, DISTANCE: tl.constexpr):
    """A mined distance taken again from the difference's square sq where it is finite (cosine: as is)."""
    if DISTANCE == COSINE:
        return d
    again = sq if DISTANCE == SQUARED_EUCLIDEAN else tl.sqrt_rn(sq + EUCLIDEAN_EPS)
    return tl.where(has & (tl.abs(d) < float("inf")), again, d)


@triton.jit
def _mine_kernel(x_ptr, lab_ptr, sq_ptr, inv_ptr, pi_ptr, pd_ptr, ni_ptr, nd_ptr, loss_ptr, slope_ptr, kept_ptr, B, D,
                 margin, DISTANCE: tl.constexpr, HAS_INV_NORM: tl.constexpr, SOFT: tl.constexpr,
                 HAS_KEPT: tl.constexpr, DOT_F32: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 D_IN_EIGHTS: tl.constexpr):
    if D_IN_EIGHTS:  # D came as features / 8, so the compiler knows the multiple: aligned rows and whole
        D = D * 8    # vectors in the K tail give the pipelined (cp.async) loads of D % 16 == 0
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    lab_r = tl.load(lab_ptr + rows, mask=rmask, other=0)
    inv_r = tl.load(inv_ptr + rows, mask=rmask, other=0.0) if HAS_INV_NORM else tl.full([BLOCK_M], 1.0, tl.float32)
    e_r = tl.load(sq_ptr + rows, mask=rmask, other=0.0) * inv_r * inv_r
    best_p = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best_n = tl.full([BLOCK_M], float("inf"), tl.float32)
    arg_p = tl.full([BLOCK_M], NO_INDEX, tl.int32)
    arg_n = tl.full([BLOCK_M], NO_INDEX, tl.int32)
    poison = tl.zeros([BLOCK_N], dtype=tl.float32)  # 1 where a row of x seen holds a NaN or inf
    for start in range(0, B, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < B
        cols64 = cols.to(tl.int64)
        acc = _gram_tile(x_ptr, rows64, rmask, cols64, cmask, D, DOT_F32, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        inv_c = tl.load(inv_ptr + cols, mask=cmask, other=0.0) if HAS_INV_NORM else tl.full([BLOCK_N], 1.0, tl.float32)
        e_c = tl.load(sq_ptr + cols, mask=cmask, other=0.0) * inv_c * inv_c
        poison = tl.maximum(poison, tl.load(sq_ptr + B + cols, mask=cmask, other=0.0))
        dist = _tile_distances(acc, inv_r, e_r, inv_c, e_c, DISTANCE, HAS_INV_NORM)
        lab_c = tl.load(lab_ptr + cols, mask=cmask, other=0)
        same = lab_r[:, None] == lab_c[None, :]
        valid = rmask[:, None] & cmask[None, :]
        pos = same & (rows[:, None] != cols[None, :]) & valid
        neg = (lab_r[:, None] != lab_c[None, :]) & valid
        best_p, arg_p = _fold_best(best_p, arg_p, dist, pos, cols, True)    # farthest positive
        best_n, arg_n = _fold_best(best_n, arg_n, dist, neg, cols, False)   # nearest negative
    has_p = arg_p != NO_INDEX
    has_n = arg_n != NO_INDEX
    # epilogue: the two mined distances again from the rows' differences (no cancellation)
    p64 = tl.where(has_p, arg_p, rows).to(tl.int64)
    n64 = tl.where(has_n, arg_n, rows).to(tl.int64)
    sq_p = tl.zeros([BLOCK_M], dtype=tl.float32)
    sq_n = tl.zeros([BLOCK_M], dtype=tl.float32)
    if DISTANCE != COSINE:
        for k in range(0, D, BLOCK_K):
            ks = k + tl.arange(0, BLOCK_K)
            kmask = ks < D
            v_a = _scaled_rows(x_ptr, inv_ptr, rows64, rmask, ks, kmask, D, HAS_INV_NORM)
            diff = v_a - _scaled_rows(x_ptr, inv_ptr, p64, rmask, ks, kmask, D, HAS_INV_NORM)
            sq_p += tl.sum(diff * diff, axis=1)
            diff = v_a - _scaled_rows(x_ptr, inv_ptr, n64, rmask, ks, kmask, D, HAS_INV_NORM)
            sq_n += tl.sum(diff * diff, axis=1)
    d_p = tl.where(has_p, _exact_distance(best_p, sq_p, has_p, DISTANCE), 0.0)
    d_n = tl.where(has_n, _exact_distance(best_n, sq_n, has_n, DISTANCE), 0.0)
    kept = has_p & has_n
    term, slope = _term_and_slope(d_p - d_n, margin, SOFT)
    slope = tl.where(tl.max(poison, axis=0) > 0.0, float("nan"), tl.where(kept, slope, 0.0))
    tl.store(pi_ptr + rows, tl.where(has_p, arg_p, -1).to(tl.int64), mask=rmask)
    tl.store(pd_ptr + rows, d_p, mask=rmask)
    tl.store(ni_ptr + rows, tl.where(has_n, arg_n, -1).to(tl.int64), mask=rmask)
    tl.store(nd_ptr + rows, d_n, mask=rmask)
    tl.store(loss_ptr + rows, tl.where(kept, term, 0.0), mask=rmask)
    tl.store(slope_ptr + rows, slope, mask=rmask)
    if HAS_KEPT:
        tl.store(kept_ptr + rows, tl.where(kept, 1.0, 0.0), mask=rmask)


@triton.jit
def _kept_kernel(lab_ptr, kept_ptr, B, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    lab_r = tl.load(lab_ptr + rows, mask=rmask, other=0)
    has_p = rows < 0
    has_n = rows < 0
    start = tl.program_id(0) * 0
    todo = tl.sum(rmask.to(tl.int32), axis=0)
    while todo > 0:  # until each anchor has both, or every column was seen
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < B
        lab_c = tl.load(lab_ptr + cols, mask=cmask, other=0)
        same = (lab_r[:, None] == lab_c[None, :]) & (rows[:, None] != cols[None, :]) & cmask[None, :]
        other = (lab_r[:, None] != lab_c[None, :]) & cmask[None, :]
        has_p = has_p | (tl.max(same.to(tl.int32), axis=1) > 0)
        has_n = has_n | (tl.max(other.to(tl.int32), axis=1) > 0)
        start += BLOCK_N
        todo = tl.sum((rmask & ~(has_p & has_n)).to(tl.int32), axis=0) * (start < B).to(tl.int32)
    tl.store(kept_ptr + rows, tl.where(has_p & has_n, 1.0, 0.0), mask=rmask)


@triton.jit
def _anchor_coefs(d_p, d_n, slope, weight, kept, DISTANCE: tl.constexpr):
    """The coefficients of an anchor's two pairs (ops/triplet.py's contract; NaN with a NaN slope)."""
    w = tl.where(kept, slope * weight, 0.0)
    poison = tl.where(slope != slope, float("nan"), 0.0)
    return _grad_factor(d_p, DISTANCE) * w + poison, poison - _grad_factor(d_n, DISTANCE) * w


@triton.jit
def _pair_term(c, v_r, v_o, CENTERED: tl.constexpr):
    if CENTERED:
        return c[:, None] * (v_r - v_o)
    return -(c[:, None] * v_o)


@triton.jit
def _pair_grad_kernel(x_ptr, inv_ptr, pi_ptr, pd_ptr, ni_ptr, nd_ptr, slope_ptr, w_ptr, w_step, gx_ptr, B, D,
                      DISTANCE: tl.constexpr, HAS_INV_NORM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_A: tl.constexpr):
    CENTERED: tl.constexpr = DISTANCE != COSINE
    r0 = tl.program_id(0) * BLOCK_R
    rows = r0 + tl.arange(0, BLOCK_R)
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    ks = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    kmask = ks < D
    tile = rmask[:, None] & kmask[None, :]
    inv_r = tl.load(inv_ptr + rows, mask=rmask, other=0.0) if HAS_INV_NORM else tl.full([BLOCK_R], 1.0, tl.float32)
    x_r = tl.load(x_ptr + rows64[:, None] * D + ks[None, :], mask=tile, other=0.0).to(tl.float32)
    v_r = x_r * inv_r[:, None]
    # the rows' own pairs (a left-out anchor's partner is itself, its coefficient 0 or NaN)
    p = tl.load(pi_ptr + rows, mask=rmask, other=-1)
    n = tl.load(ni_ptr + rows, mask=rmask, other=-1)
    c_p, c_n = _anchor_coefs(tl.load(pd_ptr + rows, mask=rmask, other=0.0), tl.load(nd_ptr + rows, mask=rmask, other=0.0),
                             tl.load(slope_ptr + rows, mask=rmask, other=0.0),
                             tl.load(w_ptr + rows * w_step, mask=rmask, other=0.0), (p >= 0) & (n >= 0), DISTANCE)
    v_p = _scaled_rows(x_ptr, inv_ptr, tl.where(p >= 0, p, rows64), rmask, ks, kmask, D, HAS_INV_NORM)
    g = _pair_term(c_p, v_r, v_p, CENTERED)
    v_n = _scaled_rows(x_ptr, inv_ptr, tl.where(n >= 0, n, rows64), rmask, ks, kmask, D, HAS_INV_NORM)
    g += _pair_term(c_n, v_r, v_n, CENTERED)
    # the pairs of the anchors that chose one of the rows, in anchor order
    lanes = tl.arange(0, BLOCK_A)
    for a0 in range(0, B, BLOCK_A):
        anchors = a0 + lanes
        amask = anchors < B
        ap = tl.load(pi_ptr + anchors, mask=amask, other=-1)
        an = tl.load(ni_ptr + anchors, mask=amask, other=-1)
        hit = ((ap >= r0) & (ap < r0 + BLOCK_R)) | ((an >= r0) & (an < r0 + BLOCK_R))
        left = tl.sum(hit.to(tl.int32), axis=0)
        while left > 0:
            a = tl.min(tl.where(hit, anchors, B), axis=0)
            hit = hit & (anchors != a)
            left -= 1
            pa = tl.load(pi_ptr + a)
            na = tl.load(ni_ptr + a)
            ca_p, ca_n = _anchor_coefs(tl.load(pd_ptr + a), tl.load(nd_ptr + a), tl.load(slope_ptr + a),
                                       tl.load(w_ptr + a * w_step), (pa >= 0) & (na >= 0), DISTANCE)
            v_a = tl.load(x_ptr + a.to(tl.int64) * D + ks, mask=kmask, other=0.0).to(tl.float32)
            if HAS_INV_NORM:
                v_a = v_a * tl.load(inv_ptr + a)
            chosen = (rows == pa) | (rows == na)
            c = tl.where(rows == pa, ca_p, 0.0) + tl.where(rows == na, ca_n, 0.0)
            g = tl.where(chosen[:, None], g + _pair_term(c, v_r, v_a[None, :], CENTERED), g)
    tl.store(gx_ptr + rows64[:, None] * D + ks[None, :], (g * inv_r[:, None]).to(gx_ptr.dtype.element_ty), mask=tile)


def _mine_config(dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, upcast, dot precision)."""
    if interpreting():
        return 32, 32, 32, 4, 1, True, "ieee"
    if dtype == torch.float32:  # exact fp32 products: tf32 would move distances by ~1e-3
        return 64, 64, 32, 4, 2, False, "ieee"
    return 128, 128, 64, 8, 3, False, "tf32"


def triplet_kept(labels, kept):
    """The kept-anchor op (contract: lossforge_kernels/ops/triplet.py, checked there)."""
    n = labels.shape[0]
    if n == 0:
        return
    block = 32 if interpreting() else 64
    _kept_kernel[(triton.cdiv(n, block),)](labels, kept, n, BLOCK_M=block, BLOCK_N=32, num_warps=4)


def _row_sq_norms(x):
    """(2 B,) fp32: the rows' squared norms, then each row's non-finite flag (_row_sq_norm_kernel)."""
    n, d = x.shape
    sq = torch.empty(2 * n, device=x.device, dtype=torch.float32)
    _row_sq_norm_kernel[(triton.cdiv(n, 16),)](x, sq, n, d, BLOCK_R=16, BLOCK_D=min(triton.next_power_of_2(max(d, 1)),
                                                                                   256), num_warps=4)
    return sq


def _width_arg(d):
    """(the D a mining kernel is passed, D_IN_EIGHTS): d / 8 where d % 16 == 8, so that the kernel, which
    multiplies it back, knows the multiple of 8 (a multiple of 16 is specialised by Triton itself)."""
    in_eights = d % 16 == 8
    return (d // 8 if in_eights else d), in_eights


def triplet_mine(x, labels, inv_norm, distance, margin, soft_margin, pos_index, pos_dist, neg_index, neg_dist, loss,
                 slope, kept=None):
    """The mining op (contract: lossforge_kernels/ops/triplet.py, checked there)."""
    n, d = x.shape
    if n == 0:
        return
    sq = _row_sq_norms(x)
    bm, bn, bk, warps, stages, upcast, precision = _mine_config(x.dtype)
    has_inv_norm = inv_norm is not None
    d_arg, in_eights = _width_arg(d)
    _mine_kernel[(triton.cdiv(n, bm),)](
        x, labels, sq, inv_norm if has_inv_norm else sq, pos_index, pos_dist, neg_index, neg_dist, loss, slope,
        loss if kept is None else kept, n, d_arg, float(margin), DISTANCE=distance, HAS_INV_NORM=has_inv_norm,
        SOFT=bool(soft_margin), HAS_KEPT=kept is not None, DOT_F32=upcast, PRECISION=precision, BLOCK_M=bm,
        BLOCK_N=bn, BLOCK_K=bk, D_IN_EIGHTS=in_eights, num_warps=warps, num_stages=stages)


def triplet_pair_grad(x, inv_norm, pos_index, pos_dist, neg_index, neg_dist, slope, weight, distance, grad_x):
    """The pair-gradient op (contract: lossforge_kernels/ops/triplet.py, checked there)."""
    n, d = x.shape
    if n == 0 or d == 0:
        return
    has_inv_norm = inv_norm is not None
    block_r = 32 if interpreting() or has_inv_norm else 64  # (inv_norm's 64 x 64 tiles: 255 registers and spills)
    block_d = min(triton.next_power_of_2(d), 64)
    _pair_grad_kernel[(triton.cdiv(n, block_r), triton.cdiv(d, block_d))](
        x, inv_norm if has_inv_norm else slope, pos_index, pos_dist, neg_index, neg_dist, slope, weight,
        0 if weight.dim() == 0 else 1, grad_x, n, d, DISTANCE=distance, HAS_INV_NORM=has_inv_norm, BLOCK_R=block_r,
        BLOCK_D=block_d, BLOCK_A=32 if interpreting() else 256, num_warps=4)


triplet_row_norms = row_norms  # the row-norm op (contract: ops/triplet.py, checked there), shared with contrastive


@triton.jit
def _finish_normalised_kernel(partial_ptr, x_ptr, radial_ptr, out_ptr, B, D, BLOCK_R: tl.constexpr,
                              BLOCK_D: tl.constexpr):
    """Two passes over the program's rows: u . partial (u = radial x), then partial - (u . partial) u."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    radial = tl.load(radial_ptr + rows, mask=rmask, other=0.0)
    along = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k in range(0, D, BLOCK_D):
        ks = k + tl.arange(0, BLOCK_D)
        tile = rmask[:, None] & (ks < D)[None, :]
        at = rows64[:, None] * D + ks[None, :]
        u = tl.load(x_ptr + at, mask=tile, other=0.0).to(tl.float32) * radial[:, None]
        along += tl.sum(u * tl.load(partial_ptr + at, mask=tile, other=0.0), axis=1)
    for k in range(0, D, BLOCK_D):
        ks = k + tl.arange(0, BLOCK_D)
        tile = rmask[:, None] & (ks < D)[None, :]
        at = rows64[:, None] * D + ks[None, :]
        u = tl.load(x_ptr + at, mask=tile, other=0.0).to(tl.float32) * radial[:, None]
        g = tl.load(partial_ptr + at, mask=tile, other=0.0) - along[:, None] * u
        tl.store(out_ptr + at, g.to(out_ptr.dtype.element_ty), mask=tile)


def triplet_finish_normalised(partial, x, radial, grad_x):
    """The normalisation's finishing op (contract: lossforge_kernels/ops/triplet.py, checked there)."""
    n, d = x.shape
    if n == 0 or d == 0:
        return
    _finish_normalised_kernel[(triton.cdiv(n, 16),)](partial, x, radial, grad_x, n, d, BLOCK_R=16,
                                                     BLOCK_D=min(triton.next_power_of_2(d), 128), num_warps=4)


# ---- semi_hard and batch_all: per anchor row of a C x B Gram block ----------------------------
# A program takes BLOCK_R rows (1 on a GPU: the work then is O(P_a B) per row; the interpreter takes
# many, as its cost is per operation) and turns them into distances on the fly (the Gram form
# above, recomputed on every visit instead of stored). Pass 1 counts each row's negatives, finds the
# farthest one (semi_hard's fallback) and zeroes the coefficient rows. Pass 2 walks the columns in
# blocks of BLOCK_P; a block holding a positive of a row is a group, mined against every negative
# in BLOCK_N-column steps. Nothing is allocated per row. Coefficients of negatives accumulate over
# groups (read-modify-write, a barrier between groups); those of positives are written once.


@triton.jit
def _block_distances(gram_ptr, sq_ptr, inv_ptr, rows64, rmask, cols, cmask, inv_r, e_r, B,
                     DISTANCE: tl.constexpr, HAS_INV_NORM: tl.constexpr):
    """(BLOCK_R, cols) distances of the rows to the columns, from the Gram block."""
    tile = rmask[:, None] & cmask[None, :]
    dot = tl.load(gram_ptr + rows64[:, None] * B + cols[None, :], mask=tile, other=0.0)
    e_c = tl.load(sq_ptr + cols, mask=cmask, other=0.0)
    inv_c = 1.0
    if HAS_INV_NORM:
        inv_c = tl.load(inv_ptr + cols, mask=cmask, other=0.0)
        e_c = e_c * inv_c * inv_c
    return _tile_distances(dot, inv_r, e_r, inv_c, e_c, DISTANCE, HAS_INV_NORM)


@triton.jit
def _grad_factor(d, DISTANCE: tl.constexpr):
    """d(distance)/d(its Gram quantity) as the torch products apply it (see ops/triplet.py)."""
    if DISTANCE == EUCLIDEAN:
        return tl.where(d > CLAMPED_EUCLIDEAN, 1.0 / d, 0.0)
    if DISTANCE == SQUARED_EUCLIDEAN:
        return tl.where(d > 0.0, 2.0, 0.0)
    return tl.where(d == d, 1.0, 1.0)


@triton.jit
def _term_and_slope(gap, margin, SOFT: tl.constexpr):
    """A triplet's loss for gap = d_ap - d_an, and its derivative (relu's is 0 at 0, as autograd's);
    a NaN gap gives a NaN loss."""
    if SOFT:
        term = softplus(gap)  # the core's: keeps NaN
        slope = 1.0 / (1.0 + tl.exp(-gap))
    else:
        term = _clamp_keep_nan(gap + margin)
        slope = tl.where(gap + margin > 0.0, 1.0, 0.0)
    return term, slope


@triton.jit
def _row_loss_kernel(gram_ptr, sq_ptr, inv_ptr, lab_ptr, w_ptr, loss_ptr, count_ptr, coef_ptr, C, B, row0, margin,
                     SEMI: tl.constexpr, SOFT: tl.constexpr, DISTANCE: tl.constexpr, HAS_INV_NORM: tl.constexpr,
                     HAS_GRAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    local = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = local < C
    rows64 = local.to(tl.int64)
    anchor = row0 + local
    lab_r = tl.load(lab_ptr + anchor, mask=rmask, other=0)
    inv_r = tl.load(inv_ptr + anchor, mask=rmask, other=0.0) if HAS_INV_NORM else tl.full([BLOCK_R], 1.0, tl.float32)
    e_r = tl.load(sq_ptr + anchor, mask=rmask, other=0.0) * inv_r * inv_r
    rw = tl.load(w_ptr + local, mask=rmask, other=0.0) if HAS_GRAD else tl.zeros([BLOCK_R], dtype=tl.float32)
    lanes = tl.arange(0, BLOCK_N)
    slots = tl.arange(0, BLOCK_P)
    # pass 1: the negatives' count and the farthest one (smallest column on ties); zeroed coef rows
    n_neg = tl.zeros([BLOCK_R], dtype=tl.int32)
    far_v = tl.full([BLOCK_R], float("-inf"), tl.float32)
    far_i = tl.full([BLOCK_R], NO_INDEX, tl.int32)
    for start in range(0, B, BLOCK_N):
        cols = start + lanes
        cmask = cols < B
        lab_c = tl.load(lab_ptr + cols, mask=cmask, other=0)
        neg = (lab_c[None, :] != lab_r[:, None]) & cmask[None, :] & rmask[:, None]
        n_neg += tl.sum(neg.to(tl.int32), axis=1)
        if SEMI:  # a NaN negative is the farthest (NaN over every number), and every pair's choice below
            d = _block_distances(gram_ptr, sq_ptr, inv_ptr, rows64, rmask, cols, cmask, inv_r, e_r, B, DISTANCE,
                                 HAS_INV_NORM)
            far_v, far_i = _fold_best(far_v, far_i, d, neg, cols, True)
        if HAS_GRAD:
            tl.store(coef_ptr + rows64[:, None] * B + cols[None, :], tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32),
                     mask=rmask[:, None] & cmask[None, :])
    if HAS_GRAD:
        tl.debug_barrier()
    # pass 2: groups of positives against every negative; a row without a negative has no pair
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    count = tl.zeros([BLOCK_R], dtype=tl.int64)
    for p_start in range(0, B, BLOCK_P):
        p_cols = p_start + slots
        p_mask = p_cols < B
        lab_p = tl.load(lab_ptr + p_cols, mask=p_mask, other=0)
        pos = (lab_p[None, :] == lab_r[:, None]) & (p_cols[None, :] != anchor[:, None]) & p_mask[None, :] \
            & (n_neg > 0)[:, None]
        n_pos = tl.sum(pos.to(tl.int32), axis=1)
        if tl.max(n_pos, axis=0) > 0:
            d_ap = _block_distances(gram_ptr, sq_ptr, inv_ptr, rows64, rmask, p_cols, p_mask, inv_r, e_r, B, DISTANCE,
                                    HAS_INV_NORM)
            best_v = tl.full([BLOCK_R, BLOCK_P], float("inf"), tl.float32)  # semi_hard: nearest beyond d_ap
            best_i = tl.full([BLOCK_R, BLOCK_P], NO_INDEX, tl.int32)
            w_pos = tl.zeros([BLOCK_R, BLOCK_P], dtype=tl.float32)          # batch_all: d loss / d d_ap
            for start in range(0, B, BLOCK_N):
                cols = start + lanes
                cmask = cols < B
                lab_c = tl.load(lab_ptr + cols, mask=cmask, other=0)
                neg = (lab_c[None, :] != lab_r[:, None]) & cmask[None, :] & rmask[:, None]
                d = _block_distances(gram_ptr, sq_ptr, inv_ptr, rows64, rmask, cols, cmask, inv_r, e_r, B, DISTANCE,
                                     HAS_INV_NORM)
                if SEMI:
                    beyond = neg[:, None, :] & (d[:, None, :] > d_ap[:, :, None])
                    d_b = tl.where(beyond, d[:, None, :], float("inf"))
                    low = tl.min(d_b, axis=2)
                    low_i = tl.min(tl.where(beyond & (d_b == low[:, :, None]), cols[None, None, :], NO_INDEX), axis=2)
                    nearer = (low < best_v) | ((best_i == NO_INDEX) & (low_i != NO_INDEX))  # (low = +inf)
                    best_v = tl.where(nearer, low, best_v)
                    best_i = tl.where(nearer, low_i, best_i)
                else:
                    valid = pos[:, :, None] & neg[:, None, :]
                    term, slope = _term_and_slope(d_ap[:, :, None] - d[:, None, :], margin, SOFT)
                    total += tl.sum(tl.sum(tl.where(valid, term, 0.0), axis=2), axis=1)
                    slope = tl.where(valid, slope, 0.0)
                    if not SOFT:
                        count += tl.sum(tl.sum(slope, axis=2), axis=1).to(tl.int64)
                    if HAS_GRAD:
                        w_pos += tl.sum(slope, axis=2)
                        at = coef_ptr + rows64[:, None] * B + cols[None, :]
                        old = tl.load(at, mask=neg, other=0.0)
                        w_neg = tl.sum(slope, axis=1) * rw[:, None]
                        tl.store(at, old - w_neg * _grad_factor(d, DISTANCE), mask=neg)
            p_at = coef_ptr + rows64[:, None] * B + p_cols[None, :]
            if SEMI:
                found = (best_i != NO_INDEX) & (far_v == far_v)[:, None]
                chosen = tl.where(found, best_i, far_i[:, None])
                d_an = tl.where(found, best_v, far_v[:, None])
                term, slope = _term_and_slope(d_ap - d_an, margin, SOFT)
                total += tl.sum(tl.where(pos, term, 0.0), axis=1)
                count += n_pos.to(tl.int64)
                if HAS_GRAD:
                    w = tl.where(pos, slope * rw[:, None], 0.0)
                    tl.store(p_at, w * _grad_factor(d_ap, DISTANCE), mask=pos)
                    # a row's positives sharing a chosen negative add up first: one store per distinct column
                    shared = (chosen[:, :, None] == chosen[:, None, :]) & pos[:, None, :]
                    w_sum = tl.sum(tl.where(shared, w[:, None, :], 0.0), axis=2)
                    earlier = tl.sum((shared & (slots[None, None, :] < slots[None, :, None])).to(tl.int32), axis=2)
                    first = pos & (earlier == 0)
                    n_at = coef_ptr + rows64[:, None] * B + chosen
                    old = tl.load(n_at, mask=first, other=0.0)
                    tl.store(n_at, old - w_sum * _grad_factor(d_an, DISTANCE), mask=first)
            else:
                if SOFT:
                    count += n_pos.to(tl.int64) * n_neg.to(tl.int64)
                if HAS_GRAD:
                    tl.store(p_at, w_pos * rw[:, None] * _grad_factor(d_ap, DISTANCE), mask=pos)
            if HAS_GRAD:
                tl.debug_barrier()  # the next group reads back the negatives' coefficients
    tl.store(loss_ptr + local, total, mask=rmask)
    tl.store(count_ptr + local, count, mask=rmask)


def _row_config():
    """(BLOCK_R, BLOCK_P, BLOCK_N, warps). On a GPU one row per program keeps the work O(P_a B) per
    row; the interpreter takes many rows and wide blocks, as its cost is per operation."""
    if interpreting():
        return 32, 32, 128, 1
    return 1, 16, 256, 4


def triplet_row_loss(gram, sq, inv_norm, labels, row0, mining, distance, margin, soft_margin, row_weight, loss, count,
                     coef):
    """The row kernel op (contract: lossforge_kernels/ops/triplet.py, checked there)."""
    rows, n = gram.shape
    if rows == 0:
        return
    block_r, block_p, block_n, warps = _row_config()
    has_grad = coef is not None
    _row_loss_kernel[(triton.cdiv(rows, block_r),)](
        gram, sq, inv_norm if inv_norm is not None else sq, labels, row_weight if has_grad else sq, loss, count,
        coef if has_grad else gram, rows, n, row0, float(margin), SEMI=mining == SEMI_HARD.value,
        SOFT=bool(soft_margin), DISTANCE=distance, HAS_INV_NORM=inv_norm is not None, HAS_GRAD=has_grad,
        BLOCK_R=block_r, BLOCK_P=block_p, BLOCK_N=block_n, num_warps=warps)


# ---- semi_hard and batch_all from MMA tiles, for anchors with at most SLOTS positives ----------
# (contract: lossforge_kernels/ops/triplet.py, "register path"). Each anchor's positives sit in a
# [B, SLOTS] table (ops: from the labels sorted once); their distances are in registers while a block
# of BLOCK_M anchors walks every BLOCK_N-column tile of x x^T, as the batch-hard mining does.
# semi_hard: per (anchor, slot) the running nearest negative beyond d_ap (smallest column on ties)
# and the anchor's farthest negative: 1 product, then O(B SLOTS D) gradient work (the list-gradient kernel).
# batch_all: per tile, the coefficient of every negative pair seen from both its rows (the column's
# positives' distances come from the table), and their product with the columns' rows over the full
# feature width: 2 products, each row's gradient summed in one program (deterministic).


@triton.jit
def _pair_distances_kernel(x_ptr, sq_ptr, inv_ptr, a_ptr, b_ptr, gram_ptr, exact_ptr, E, D,
                           DISTANCE: tl.constexpr, HAS_INV_NORM: tl.constexpr, BLOCK_E: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    """Per pair e with b[e] >= 0: its distance in the Gram form (what the tiles compare) and again
    from the rows' difference (the exact one, which the loss takes; cosine: the Gram form); 0 for
    b[e] < 0."""
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    live = e < E
    a = tl.load(a_ptr + e, mask=live, other=0)
    b = tl.load(b_ptr + e, mask=live, other=-1)
    live = live & (b >= 0)
    b = tl.where(live, b, 0)
    inv_a = tl.load(inv_ptr + a, mask=live, other=0.0) if HAS_INV_NORM else tl.full([BLOCK_E], 1.0, tl.float32)
    inv_b = tl.load(inv_ptr + b, mask=live, other=0.0) if HAS_INV_NORM else tl.full([BLOCK_E], 1.0, tl.float32)
    dot = tl.zeros([BLOCK_E], dtype=tl.float32)
    diff = tl.zeros([BLOCK_E], dtype=tl.float32)
    for k in range(0, D, BLOCK_D):
        ks = k + tl.arange(0, BLOCK_D)
        tile = live[:, None] & (ks < D)[None, :]
        x_a = tl.load(x_ptr + a.to(tl.int64)[:, None] * D + ks[None, :], mask=tile, other=0.0).to(tl.float32)
        x_b = tl.load(x_ptr + b.to(tl.int64)[:, None] * D + ks[None, :], mask=tile, other=0.0).to(tl.float32)
        dot += tl.sum(x_a * x_b, axis=1)
        step = x_a * inv_a[:, None] - x_b * inv_b[:, None]
        diff += tl.sum(step * step, axis=1)
    e_a = tl.load(sq_ptr + a, mask=live, other=0.0) * inv_a * inv_a
    e_b = tl.load(sq_ptr + b, mask=live, other=0.0) * inv_b * inv_b
    if HAS_INV_NORM:
        dot = dot * inv_a * inv_b
    if DISTANCE == COSINE:
        gram = 1.0 - dot
        exact = gram
    else:
        gram = _clamp_keep_nan(e_a + e_b - 2.0 * dot)
        exact = diff
        if DISTANCE == EUCLIDEAN:
            gram = tl.sqrt_rn(gram + 1e-12)
            exact = tl.sqrt_rn(diff + 1e-12)
        # a non-finite row keeps the Gram form's NaN or inf, as the reference has it
        exact = tl.where(tl.abs(gram) < float("inf"), exact, gram)
    inside = e < E
    tl.store(gram_ptr + e, tl.where(live, gram, 0.0), mask=inside)
    tl.store(exact_ptr + e, tl.where(live, exact, 0.0), mask=inside)


@triton.jit
def _slot(table, slots, p):
    """Column p of a [rows, SLOTS] table, as a [rows] vector."""
    return tl.sum(tl.where(slots[None, :] == p, table, 0), axis=1)


@triton.jit
def _semi_hard_kernel(x_ptr, lab_ptr, sq_ptr, inv_ptr, npos_ptr, dap_ptr, ci_ptr, cd_ptr, B, D,
                      DISTANCE: tl.constexpr, HAS_INV_NORM: tl.constexpr, DOT_F32: tl.constexpr,
                      PRECISION: tl.constexpr, SLOTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, D_IN_EIGHTS: tl.constexpr):
    if D_IN_EIGHTS:  # as in _mine_kernel
        D = D * 8
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    slots = tl.arange(0, SLOTS)
    lab_r = tl.load(lab_ptr + rows, mask=rmask, other=0)
    inv_r = tl.load(inv_ptr + rows, mask=rmask, other=0.0) if HAS_INV_NORM else tl.full([BLOCK_M], 1.0, tl.float32)
    e_r = tl.load(sq_ptr + rows, mask=rmask, other=0.0) * inv_r * inv_r
    n_pos = tl.load(npos_ptr + rows, mask=rmask, other=0)
    used = tl.max(n_pos, axis=0)  # slots any anchor of the block fills
    at = rows64[:, None] * SLOTS + slots[None, :]
    filled = rmask[:, None] & (slots[None, :] < n_pos[:, None])
    d_ap = tl.load(dap_ptr + at, mask=filled, other=0.0)
    best_v = tl.full([BLOCK_M, SLOTS], float("inf"), tl.float32)  # nearest negative beyond d_ap
    best_i = tl.full([BLOCK_M, SLOTS], NO_INDEX, tl.int32)
    far_v = tl.full([BLOCK_M], float("-inf"), tl.float32)         # the fallback: the farthest negative
    far_i = tl.full([BLOCK_M], NO_INDEX, tl.int32)
    for start in range(0, B, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < B
        cols64 = cols.to(tl.int64)
        acc = _gram_tile(x_ptr, rows64, rmask, cols64, cmask, D, DOT_F32, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        inv_c = tl.load(inv_ptr + cols, mask=cmask, other=0.0) if HAS_INV_NORM else tl.full([BLOCK_N], 1.0, tl.float32)
        e_c = tl.load(sq_ptr + cols, mask=cmask, other=0.0) * inv_c * inv_c
        dist = _tile_distances(acc, inv_r, e_r, inv_c, e_c, DISTANCE, HAS_INV_NORM)
        lab_c = tl.load(lab_ptr + cols, mask=cmask, other=0)
        neg = (lab_r[:, None] != lab_c[None, :]) & rmask[:, None] & cmask[None, :]
        far_v, far_i = _fold_best(far_v, far_i, dist, neg, cols, True)
        for p in range(0, used):  # a loop, not unrolled: SLOTS copies of the body would spill
            beyond = neg & (dist > _slot(d_ap, slots, p)[:, None])  # never a NaN: taken apart below
            d_b = tl.where(beyond, dist, float("inf"))
            low = tl.min(d_b, axis=1)
            low_i = tl.min(tl.where(beyond & (d_b == low[:, None]), cols[None, :], NO_INDEX), axis=1)
            # strictly nearer: an equal distance in a later tile has a larger column; a first
            # candidate at +inf is taken over nothing
            nearer = (low < _slot(best_v, slots, p)) | ((_slot(best_i, slots, p) == NO_INDEX) & (low_i != NO_INDEX))
            take = (slots[None, :] == p) & nearer[:, None]
            best_v = tl.where(take, low[:, None], best_v)
            best_i = tl.where(take, low_i[:, None], best_i)
    # no negative beyond d_ap, or a NaN negative (the farthest, every pair's choice): the farthest one
    found = (best_i != NO_INDEX) & (far_v == far_v)[:, None]
    chosen = tl.where(found, best_i, far_i[:, None])
    d_an = tl.where(found, best_v, far_v[:, None])
    kept = filled & (far_i != NO_INDEX)[:, None]
    tl.store(ci_ptr + at, tl.where(kept, chosen, -1).to(tl.int64), mask=rmask[:, None])
    tl.store(cd_ptr + at, tl.where(kept, d_an, 0.0), mask=rmask[:, None])


def _pair_block_d(d):
    return min(triton.next_power_of_2(max(d, 1)), 64)


def triplet_pair_distances(x, inv_norm, a, b, distance, gram, exact):
    """The pair-distance op (contract: lossforge_kernels/ops/triplet.py, checked there)."""
    n, d = x.shape
    e = a.numel()
    if e == 0:
        return
    sq = _row_sq_norms(x)
    block_e = 64 if interpreting() else 32
    _pair_distances_kernel[(triton.cdiv(e, block_e),)](
        x, sq, inv_norm if inv_norm is not None else sq, a, b, gram, exact, e, d, DISTANCE=distance,
        HAS_INV_NORM=inv_norm is not None, BLOCK_E=block_e, BLOCK_D=_pair_block_d(d), num_warps=4)


def triplet_semi_hard_mine(x, labels, inv_norm, distance, n_pos, pos_dist, chosen, chosen_dist):
    """semi_hard's choices for the anchors' positive slots (contract: ops/triplet.py, checked there)."""
    n, d = x.shape
    slots = pos_dist.shape[1]
    if n == 0:
        return
    sq = _row_sq_norms(x)
    bm, bn, bk, warps, stages, upcast, precision = _mine_config(x.dtype)
    has_inv_norm = inv_norm is not None
    d_arg, in_eights = _width_arg(d)
    _semi_hard_kernel[(triton.cdiv(n, bm),)](
        x, labels, sq, inv_norm if has_inv_norm else sq, n_pos, pos_dist, chosen, chosen_dist, n, d_arg,
        DISTANCE=distance, HAS_INV_NORM=has_inv_norm, DOT_F32=upcast, PRECISION=precision, SLOTS=slots,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, D_IN_EIGHTS=in_eights, num_warps=warps, num_stages=stages)


@triton.jit
def _batch_all_kernel(x_ptr, lab_ptr, sq_ptr, inv_ptr, npos_ptr, dap_ptr, w_ptr, loss_ptr, count_ptr, wpos_ptr,
                      g_ptr, B, D, margin, SOFT: tl.constexpr, DISTANCE: tl.constexpr, HAS_INV_NORM: tl.constexpr,
                      HAS_GRAD: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr, GRAD_F32: tl.constexpr,
                      GRAD_PRECISION: tl.constexpr, COEF_ROUND: tl.constexpr, SLOTS: tl.constexpr,
                      BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DG: tl.constexpr, WHOLE: tl.constexpr,
                      D_IN_EIGHTS: tl.constexpr):
    # grid (row blocks, feature blocks of BLOCK_DG): every program mines its rows' tiles over the full
    # width; the first feature block writes the losses, counts and positive slopes, each its share of g.
    # WHOLE (one feature block covers D): the rows are loaded once and each column tile once, whole,
    # for both products; else the Gram tile takes BLOCK_K slices and the gradient product its block.
    if D_IN_EIGHTS:  # as in _mine_kernel
        D = D * 8
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dblock = tl.program_id(1)
    first = dblock == 0
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    slots = tl.arange(0, SLOTS)
    dg = dblock * BLOCK_DG + tl.arange(0, BLOCK_DG)
    dgmask = dg < D
    lab_r = tl.load(lab_ptr + rows, mask=rmask, other=0)
    inv_r = tl.load(inv_ptr + rows, mask=rmask, other=0.0) if HAS_INV_NORM else tl.full([BLOCK_M], 1.0, tl.float32)
    e_r = tl.load(sq_ptr + rows, mask=rmask, other=0.0) * inv_r * inv_r
    n_pos_r = tl.load(npos_ptr + rows, mask=rmask, other=0)
    used_r = tl.max(n_pos_r, axis=0)
    at_r = rows64[:, None] * SLOTS + slots[None, :]
    d_ap = tl.load(dap_ptr + at_r, mask=rmask[:, None] & (slots[None, :] < n_pos_r[:, None]), other=0.0)
    w_r = tl.load(w_ptr + rows, mask=rmask, other=0.0) if HAS_GRAD else tl.zeros([BLOCK_M], dtype=tl.float32)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    count = tl.zeros([BLOCK_M], dtype=tl.int64)
    w_pos = tl.zeros([BLOCK_M, SLOTS], dtype=tl.float32)  # per positive slot: its slopes' sum over negatives
    g = tl.zeros([BLOCK_M, BLOCK_DG], dtype=tl.float32)   # sum_n coef * v_n over the tiles
    g_sum = tl.zeros([BLOCK_M], dtype=tl.float32)         # sum_n coef
    if WHOLE:
        x_rows = tl.load(x_ptr + rows64[:, None] * D + dg[None, :], mask=rmask[:, None] & dgmask[None, :], other=0.0)
        if DOT_F32:
            x_rows = x_rows.to(tl.float32)
    for start in range(0, B, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < B
        cols64 = cols.to(tl.int64)
        if WHOLE:
            x_c = tl.load(x_ptr + cols64[:, None] * D + dg[None, :], mask=cmask[:, None] & dgmask[None, :], other=0.0)
            acc = tl.dot(x_rows, tl.trans(x_c.to(tl.float32) if DOT_F32 else x_c), input_precision=PRECISION)
        else:
            acc = _gram_tile(x_ptr, rows64, rmask, cols64, cmask, D, DOT_F32, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        inv_c = tl.load(inv_ptr + cols, mask=cmask, other=0.0) if HAS_INV_NORM else tl.full([BLOCK_N], 1.0, tl.float32)
        e_c = tl.load(sq_ptr + cols, mask=cmask, other=0.0) * inv_c * inv_c
        dist = _tile_distances(acc, inv_r, e_r, inv_c, e_c, DISTANCE, HAS_INV_NORM)
        lab_c = tl.load(lab_ptr + cols, mask=cmask, other=0)
        neg = (lab_r[:, None] != lab_c[None, :]) & rmask[:, None] & cmask[None, :]
        # the rows as anchors: every (slot, negative column) triplet
        from_rows = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for p in range(0, used_r):
            valid = neg & (p < n_pos_r)[:, None]
            term, slope = _term_and_slope(_slot(d_ap, slots, p)[:, None] - dist, margin, SOFT)
            total += tl.sum(tl.where(valid, term, 0.0), axis=1)
            slope = tl.where(valid, slope, 0.0)
            if not SOFT:
                count += tl.sum((slope > 0.0).to(tl.int64), axis=1)
            w_pos += tl.where(slots[None, :] == p, tl.sum(slope, axis=1)[:, None], 0.0)
            from_rows += slope
        if HAS_GRAD:
            # the columns as anchors, each row one of their negatives: the columns' positives from the table
            n_pos_c = tl.load(npos_ptr + cols, mask=cmask, other=0)
            used_c = tl.max(n_pos_c, axis=0)
            d_cp = tl.load(dap_ptr + cols64[:, None] * SLOTS + slots[None, :],
                           mask=cmask[:, None] & (slots[None, :] < n_pos_c[:, None]), other=0.0)
            from_cols = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for q in range(0, used_c):
                valid = neg & (q < n_pos_c)[None, :]
                _, slope = _term_and_slope(_slot(d_cp, slots, q)[None, :] - dist, margin, SOFT)
                from_cols += tl.where(valid, slope, 0.0)
            w_c = tl.load(w_ptr + cols, mask=cmask, other=0.0)
            coef = -(from_rows * w_r[:, None] + from_cols * w_c[None, :]) * _grad_factor(dist, DISTANCE)
            coef = tl.where(neg, coef, 0.0)
            if HAS_INV_NORM:
                coef = coef * inv_c[None, :]
            # the rows' own term takes each coefficient as the product does, so that sum_n c_n (v_r - v_n)
            # comes from one value of c_n (a close negative's large c_n, unrounded there, left its rounding
            # times v_n in the row)
            coef = as_operand(coef, COEF_ROUND)
            if DISTANCE != COSINE:
                g_sum += tl.sum(tl.where(neg, coef / inv_c[None, :], 0.0) if HAS_INV_NORM else coef, axis=1)
            if not WHOLE:
                x_c = tl.load(x_ptr + cols64[:, None] * D + dg[None, :], mask=cmask[:, None] & dgmask[None, :],
                              other=0.0)
            if GRAD_F32:  # fp16 rows: fp32 operands keep the small coefficients ('mean' at a large B)
                x_c = x_c.to(tl.float32)
            else:
                coef = coef.to(x_c.dtype)
            g = tl.dot(coef, x_c, g, input_precision=GRAD_PRECISION)
    if HAS_GRAD:
        # g_r = sum_n coef (v_r - v_n): the rows' own term is added after -g is stored, a feature slice at a
        # time (with g and the rows' fp32 values live together the euclidean kernels spilled)
        tl.store(g_ptr + rows64[:, None] * D + dg[None, :], -g, mask=rmask[:, None] & dgmask[None, :])
        if DISTANCE != COSINE:
            tl.debug_barrier()  # every thread's share of g is in memory before any thread reads it back
            for k in range(0, BLOCK_DG, BLOCK_K):
                ks = dblock * BLOCK_DG + k + tl.arange(0, BLOCK_K)
                tile = rmask[:, None] & (ks < D)[None, :]
                at = rows64[:, None] * D + ks[None, :]
                v_r = _scaled_rows(x_ptr, inv_ptr, rows64, rmask, ks, ks < D, D, HAS_INV_NORM)
                tl.store(g_ptr + at, tl.load(g_ptr + at, mask=tile, other=0.0) + g_sum[:, None] * v_r, mask=tile)
    if first:
        tl.store(loss_ptr + rows, total, mask=rmask)
        tl.store(count_ptr + rows, count, mask=rmask)
        tl.store(wpos_ptr + at_r, w_pos, mask=rmask[:, None])


@triton.jit
def _list_grad_kernel(x_ptr, inv_ptr, g_ptr, off_ptr, other_ptr, coef_ptr, gx_ptr, B, D, HAS_G: tl.constexpr,
                      HAS_INV_NORM: tl.constexpr, CENTERED: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """g_r (fp32, w.r.t. v_r; 0 without HAS_G) plus each of row r's list entries, in order,
    coef * (v_r - v_other) (cosine: - coef * v_other; other < 0: skipped); writes inv_norm_r * g_r in
    x's dtype (fp32 with inv_norm). BLOCK_R rows side by side: step j adds each row's j-th entry."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    start = tl.load(off_ptr + rows, mask=rmask, other=0)
    count = tl.load(off_ptr + rows + 1, mask=rmask, other=0) - start
    longest = tl.max(count, axis=0)
    inv_r = tl.load(inv_ptr + rows, mask=rmask, other=0.0) if HAS_INV_NORM else tl.full([BLOCK_R], 1.0, tl.float32)
    for k in range(0, D, BLOCK_D):
        ks = k + tl.arange(0, BLOCK_D)
        kmask = ks < D
        tile = rmask[:, None] & kmask[None, :]
        x_r = tl.load(x_ptr + rows64[:, None] * D + ks[None, :], mask=tile, other=0.0).to(tl.float32)
        v_r = x_r * inv_r[:, None]
        if HAS_G:
            g = tl.load(g_ptr + rows64[:, None] * D + ks[None, :], mask=tile, other=0.0)
        else:
            g = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        for j in range(0, longest):
            o = tl.load(other_ptr + start + j, mask=rmask & (j < count), other=-1)
            live = o >= 0  # false outside rmask (other=-1): masks the gather alone
            c = tl.load(coef_ptr + start + j, mask=live, other=0.0)
            v_o = _scaled_rows(x_ptr, inv_ptr, tl.where(live, o, 0), live, ks, kmask, D, HAS_INV_NORM)
            # a skipped entry (and a row's padding up to the block's longest list) adds nothing, not 0 * v_r
            # (NaN for a non-finite row)
            g += tl.where(live[:, None], _pair_term(c, v_r, v_o, CENTERED), 0.0)
        tl.store(gx_ptr + rows64[:, None] * D + ks[None, :], (g * inv_r[:, None]).to(gx_ptr.dtype.element_ty),
                 mask=tile)


def _batch_all_config(dtype, d):
    """(BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_DG, warps, stages, upcast, precision, grad in fp32, grad precision,
    the coefficients' rounding)."""
    width = max(16, triton.next_power_of_2(max(d, 1)))
    coef = operand_rounding(dtype)
    if interpreting():  # 32-wide feature blocks: the tests' widths reach both WHOLE and the feature blocks;
        # fp32 dots on the coefficients rounded as a GPU's product holds them
        return 32, 32, 32, min(width, 32), 4, 1, True, "ieee", True, "ieee", coef
    if dtype == torch.float32:  # as bf16, with exact fp32 products (CUDA cores)
        return 32, 16, 32, min(width, 512), 8, 2, False, "ieee", True, "ieee", coef
    if dtype == torch.float16:  # fp32 operands for the gradient product (tf32), as bf16 otherwise
        return 32, 16, 64, min(width, 512), 8, 2, False, "tf32", True, "tf32", coef
    return 32, 16, 64, min(width, 512), 8, 2, False, "tf32", False, "tf32", coef


def _register_cap(dtype):
    """Launch options: fp32 rows may take every register (ptxas otherwise held the fp32 pass at 128 at
    D = 256 and spilled up to 56 B)."""
    return {"maxnreg": 255} if dtype == torch.float32 else {}


def triplet_batch_all_rows(x, labels, inv_norm, distance, margin, soft_margin, n_pos, pos_dist, row_weight, loss,
                           count, pos_slope, grad_rows):
    """batch_all's losses and the negative pairs' gradient (contract: ops/triplet.py, checked there)."""
    n, d = x.shape
    if n == 0:
        return
    slots = pos_dist.shape[1]
    sq = _row_sq_norms(x)
    bm, bn, bk, bdg, warps, stages, upcast, precision, grad_f32, grad_precision, coef = _batch_all_config(x.dtype, d)
    has_grad = grad_rows is not None
    blocks = max(1, triton.cdiv(d, bdg)) if has_grad else 1  # one at a width of 0: the losses are still written
    d_arg, in_eights = _width_arg(d)
    _batch_all_kernel[(triton.cdiv(n, bm), blocks)](
        x, labels, sq, inv_norm if inv_norm is not None else sq, n_pos, pos_dist, row_weight if has_grad else sq,
        loss, count, pos_slope, grad_rows if has_grad else sq, n, d_arg, float(margin), SOFT=bool(soft_margin),
        DISTANCE=distance, HAS_INV_NORM=inv_norm is not None, HAS_GRAD=has_grad, DOT_F32=upcast, PRECISION=precision,
        GRAD_F32=grad_f32 or upcast, GRAD_PRECISION=grad_precision, COEF_ROUND=coef, SLOTS=slots, BLOCK_M=bm,
        BLOCK_N=bn, BLOCK_K=bk, BLOCK_DG=bdg, WHOLE=bdg >= d, D_IN_EIGHTS=in_eights, num_warps=warps,
        num_stages=stages, **_register_cap(x.dtype))


def triplet_list_grad(x, inv_norm, grad_rows, offsets, others, coef, centered, grad_x):
    """Each row's list of pairs added to its gradient (contract: ops/triplet.py, checked there)."""
    n, d = x.shape
    if n == 0 or d == 0:
        return
    has_inv_norm = inv_norm is not None
    block_r = 32 if interpreting() else 8
    _list_grad_kernel[(triton.cdiv(n, block_r),)](
        x, inv_norm if has_inv_norm else coef, coef if grad_rows is None else grad_rows, offsets, others, coef,
        grad_x, n, d, HAS_G=grad_rows is not None, HAS_INV_NORM=has_inv_norm, CENTERED=bool(centered),
        BLOCK_R=block_r, BLOCK_D=min(triton.next_power_of_2(d), 256), num_warps=4)
