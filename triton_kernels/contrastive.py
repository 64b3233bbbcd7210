# Contrastive family (InfoNCE / CLIP, SupCon, SigLIP) over query (B, D) and key (M, D), flash-attention
# style: the (B, M) similarity matrix only ever exists as on-chip tiles, rebuilt in the backward.
# s and b are the logit scale and bias (logit_scale, logit_bias).
#
# A program owns BLOCK_M rows of one operand ("own": query rows, or key rows for the column role) and
# sweeps the other operand in BLOCK_N tiles. Each step builds the tile c = <own, other> r r' with one
# tl.dot over the full (masked, power-of-two) feature width, or over BLOCK_K chunks of it when D is
# wide, then z = s c (+ b for SigLIP). Tiles are always oriented (own, other), so the per-pair terms
# are written once and serve both roles through broadcasting of the per-index statistics.
#   forward   row programs: online row lse (merge of per-tile max/sum), diagonal, SupCon positive
#             count and sum (self excluded), SigLIP softplus sums. Symmetric InfoNCE instead runs
#             the joint kernel: a 2-D grid of (row range, column range) programs, each folding every
#             tile into its rows' and its columns' partial (max, sum) in its own slots, merged in a
#             fixed order by a small kernel (row and column lse from one product, no atomics).
#   backward  one launch: row programs accumulate grad_query rows (dZ @ k) and the grad_coef
#             partials, column programs grad_key rows (dZ^T @ q), each over the full feature width
#             (the similarity tile is built once per step). SupCon row programs weigh key rows by
#             dZ_ij + dZ_ji (both roles of a row).
# Products of B x M x D (2 FLOPs per multiply-add): forward 1, backward 2 per role: 5 for a
# symmetric InfoNCE or SigLIP fwd+bwd with both gradients, 3 for SupCon, at every width.
# Inverse row norms come from a pre-pass into a (2, rows) fp32 buffer: [r, r where |x| >= 1e-12 else 0].
# Traffic per role: each program reads its own rows once and the whole other operand once, so
# (rows / BLOCK_M) x (other rows) x D elements in all, re-reads served by L2 when the other operand fits
# it; the outputs are written once. All arithmetic is fp32: dots take fp16/bf16 operands natively with
# fp32 accumulation on a GPU (the gradient dot takes its weights in bf16 for bf16 inputs, tf32 for fp16,
# and the normalisation's radial sum takes them as rounded: see _grad_block).
# NaN and inf as in the reference: the log-sum-exps are torch.logsumexp's (a +inf logit gives +inf and
# probability 0 to the finite logits; a NaN reaches the sum of exponentials, so it survives a maximum
# that skips NaN, as a GPU's does), and softplus keeps NaN.
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from . import interpreting
from .math import as_operand, operand_rounding
from .norms import row_multiple, row_norms
from .row_softmax import NEG_INF as _NEG_INF_VALUE, finish_lse, fold_tile_lse, merge_lse, softplus

NEG_INF = tl.constexpr(_NEG_INF_VALUE)  # jit code may only read constexpr globals
# The `kind` values of the contract (reference/contrastive.py: Kind; tests/test_enums.py checks them).
INFO_NCE = tl.constexpr(0)
SUPCON = tl.constexpr(1)
SIGLIP = tl.constexpr(2)


@dataclasses.dataclass(frozen=True)
class Tiles:
    m: int  # statistics sweep: own rows per program
    n: int  # other rows per swept tile
    k: int  # feature chunk of the similarity dot (== d_full: one dot, own tile kept in registers)
    d_full: int  # next power of two of D (at least 16, the smallest tl.dot width)
    d_lo: int  # the gradient's feature segments (_segments): [0, d_lo) and [d_lo, d_lo + d_hi), d_hi 0 for
    d_hi: int  # one segment
    warps: int
    stages: int
    grad_m: int  # gradient sweep: own rows per program (fp32 accumulators over the full feature width)
    grad_n: int
    grad_warps: int

    @property
    def single_k(self) -> bool:
        return self.k == self.d_full


# Gradient tiles (own rows, other rows per step) by the feature width rounded up to a power of two: the
# fp32 accumulator spans the whole width, so own rows shrink as it grows. Chosen from the offline sm_90
# compile (Triton 3.6 and the newest) at D = 64..1024: no local memory for half inputs, at most 16 B for
# fp32 (the compile test's budget is 256 B). Wider rows take 16 x 16 tiles: no local memory up to 1536
# (bf16), 32 B at 2048, more beyond (correct, slower: a feature-block split would serve them better).
GRAD_TILES = {
    "half": {16: (64, 64), 32: (64, 64), 64: (64, 64), 128: (64, 64), 256: (32, 64), 512: (16, 64), 1024: (16, 16)},
    "fp32": {16: (32, 64), 32: (32, 64), 64: (32, 64), 128: (16, 64), 256: (16, 32), 512: (16, 16), 1024: (16, 16)},
}


def tiles_for(d: int, dtype: torch.dtype = torch.bfloat16, interpret: bool | None = None) -> Tiles:
    """Tile sizes from the feature width and dtype. Statistics: 64 x 64 tiles, the own tile in registers
    up to D = 256 (32 for fp32), wider rows reduced in 128-wide chunks (32 for fp32). Gradients:
    GRAD_TILES, one similarity tile per step over the full width in one or two power-of-two segments
    (_segments); widths above 1024 take 16 x 16 tiles. The interpreter gets tiny tiles, so small tests
    cross row, column and feature-chunk edges."""
    d_full = max(16, triton.next_power_of_2(max(d, 1)))
    if interpreting() if interpret is None else interpret:
        return Tiles(16, 16, min(d_full, 64), d_full, *_segments(d), 1, 1, 16, 16, 1)
    grad_m, grad_n = GRAD_TILES["fp32" if dtype == torch.float32 else "half"].get(d_full, (16, 16))
    k = d_full if d_full <= (32 if dtype == torch.float32 else 256) else (32 if dtype == torch.float32 else 128)
    warps = 4 if d_full <= 128 and dtype != torch.float32 else 8
    return Tiles(64, 64, k, d_full, *_segments(d), warps, 2, grad_m, grad_n, 8)


def _segments(d: int) -> tuple[int, int]:
    """(d_lo, d_hi): two power-of-two segments where they cover D in less than its next power of two (a
    second segment is at least 32 wide: 16-wide dots spilled badly in the offline compile)."""
    full = max(16, triton.next_power_of_2(max(d, 1)))
    lo = max(16, 1 << (max(d, 1).bit_length() - 1))
    if d <= lo:
        return full, 0
    hi = max(32, triton.next_power_of_2(d - lo))
    return (lo, hi) if lo + hi < full else (full, 0)


# ---- shared device helpers -----------------------------------------------------------------------

@triton.jit
def _load_tile(ptr, rows, n_rows, d, D, TO_F32: tl.constexpr):
    """(len(rows), len(d)) tile of a row-major (n_rows, D) matrix, zeros outside it."""
    mask = (rows[:, None] < n_rows) & (d[None, :] < D)
    x = tl.load(ptr + rows[:, None].to(tl.int64) * D + d[None, :], mask=mask, other=0.0)
    if TO_F32:  # the interpreter's tl.dot takes fp32 only
        x = x.to(tl.float32)
    return x


@triton.jit
def _gram_tile(own_ptr, own, n_own, own_tile, other_ptr, other, n_other, D, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE_K: tl.constexpr, TO_F32: tl.constexpr,
               PRECISION: tl.constexpr):
    """<own_a, other_b> in fp32 for one tile; with SINGLE_K the own rows come preloaded (own_tile)."""
    if SINGLE_K:
        b = _load_tile(other_ptr, other, n_other, tl.arange(0, BLOCK_K), D, TO_F32)
        acc = tl.dot(own_tile, tl.trans(b), input_precision=PRECISION)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for d0 in range(0, D, BLOCK_K):
            d = d0 + tl.arange(0, BLOCK_K)
            a = _load_tile(own_ptr, own, n_own, d, D, TO_F32)
            b = _load_tile(other_ptr, other, n_other, d, D, TO_F32)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _inv_norms(r_ptr, rows, n_rows, NORMALIZE: tl.constexpr):
    """(r, r where the norm is at least 1e-12 else 0) of some rows; 1 and 1 without normalisation."""
    if NORMALIZE:
        mask = rows < n_rows
        return tl.load(r_ptr + rows, mask=mask, other=1.0), tl.load(r_ptr + n_rows + rows, mask=mask, other=0.0)
    else:
        return tl.full(rows.shape, 1.0, tl.float32), tl.full(rows.shape, 1.0, tl.float32)


@triton.jit
def _cosines(gram, r_own, r_other, NORMALIZE: tl.constexpr):
    if NORMALIZE:
        gram = gram * r_own[:, None] * r_other[None, :]
    return gram


@triton.jit
def _as_axis(v, AS_ROWS: tl.constexpr):
    """A per-index vector broadcast along the tile's rows (own indices) or columns (other indices)."""
    if AS_ROWS:
        return v[:, None]
    else:
        return v[None, :]


@triton.jit
def _index_stats(idx, B, grad_rows_ptr, stats_ptr, labels_ptr, KIND: tl.constexpr, AS_ROWS: tl.constexpr):
    """(g, stats[0], stats[1], label) of sample indices idx (zeros past B), shaped for the tile."""
    mask = idx < B
    g = tl.load(grad_rows_ptr + idx, mask=mask, other=0.0)
    s0 = tl.load(stats_ptr + idx, mask=mask, other=0.0)
    s1 = tl.load(stats_ptr + B + idx, mask=mask, other=0.0)
    if KIND == SUPCON:
        lab = tl.load(labels_ptr + idx, mask=mask, other=0)
    else:
        lab = idx
    return _as_axis(g, AS_ROWS), _as_axis(s0, AS_ROWS), _as_axis(s1, AS_ROWS), _as_axis(lab, AS_ROWS)


@triton.jit
def _softmax_dz(z, same, valid, g, lse):
    """g (exp(z - lse) - [i == j]): one direction of InfoNCE."""
    return tl.where(valid, g * (tl.exp(z - lse) - tl.where(same, 1.0, 0.0)), 0.0)


@triton.jit
def _supcon_dz(z, same, valid, positive, g, lse, n):
    """g (exp(z - lse) [j != i] - [positive] / n) for an anchor with n > 0 positives, else 0."""
    keep = valid & (n > 0.0) & (same == 0)
    p = tl.where(keep, tl.exp(z - lse), 0.0)
    return tl.where(keep, g * (p - tl.where(positive, 1.0, 0.0) / tl.maximum(n, 1.0)), 0.0)


@triton.jit
def _pair_grad(z, same, valid, positive, g_i, lse_i, aux_i, g_j, lse_j, aux_j, KIND: tl.constexpr,
               SYMMETRIC: tl.constexpr):
    """(dZ, W) of a tile: dL/dz_ij, and the weight of the own row's gradient (dZ_ij + dZ_ji for SupCon,
    whose z is symmetric). aux is stats[1]: the column lse (symmetric InfoNCE) or n (SupCon)."""
    if KIND == INFO_NCE:
        dz = _softmax_dz(z, same, valid, g_i, lse_i)
        if SYMMETRIC:
            dz = 0.5 * dz + 0.5 * _softmax_dz(z, same, valid, g_j, aux_j)
        w = dz
    elif KIND == SUPCON:
        dz = _supcon_dz(z, same, valid, positive, g_i, lse_i, aux_i)
        w = dz + _supcon_dz(z, same, valid, positive, g_j, lse_j, aux_j)
    else:  # SigLIP: -y g sigmoid(-y z) with y = +1 on the diagonal, -1 elsewhere
        dz = tl.where(valid, tl.where(same, -g_i * tl.sigmoid(-z), g_i * tl.sigmoid(z)), 0.0)
        w = dz
    return dz, w


# ---- kernels ---------------------------------------------------------------------------------------

@triton.jit
def _fwd_sweep(own_ptr, r_own_ptr, n_own, other_ptr, r_other_ptr, n_other, labels_ptr, logit_scale, logit_bias,
               start, D, KIND: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, SINGLE_K: tl.constexpr, TO_F32: tl.constexpr, PRECISION: tl.constexpr):
    """One block of own rows against every other row: (lse, a, n) with a the diagonal z (InfoNCE), the
    positives' z sum (SupCon) or the softplus sum (SigLIP), and n the positive count (SupCon)."""
    own = start + tl.arange(0, BLOCK_M)
    r_own, unused = _inv_norms(r_own_ptr, own, n_own, NORMALIZE)
    own_tile = 0.0
    if SINGLE_K:
        own_tile = _load_tile(own_ptr, own, n_own, tl.arange(0, BLOCK_K), D, TO_F32)
    lab_own = own
    if KIND == SUPCON:
        lab_own = tl.load(labels_ptr + own, mask=own < n_own, other=0)
    m = tl.full([BLOCK_M], NEG_INF, tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    a = tl.zeros([BLOCK_M], tl.float32)
    n = tl.zeros([BLOCK_M], tl.float32)
    for o0 in range(0, n_other, BLOCK_N):
        other = o0 + tl.arange(0, BLOCK_N)
        r_other, unused = _inv_norms(r_other_ptr, other, n_other, NORMALIZE)
        gram = _gram_tile(own_ptr, own, n_own, own_tile, other_ptr, other, n_other, D, BLOCK_M, BLOCK_N, BLOCK_K,
                          SINGLE_K, TO_F32, PRECISION)
        z = logit_scale * _cosines(gram, r_own, r_other, NORMALIZE) + logit_bias
        valid = (other < n_other)[None, :] & (own < n_own)[:, None]
        same = own[:, None] == other[None, :]
        if KIND == INFO_NCE:
            m, s = fold_tile_lse(m, s, tl.where(valid, z, NEG_INF))
            a += tl.sum(tl.where(same & valid, z, 0.0), axis=1)
        elif KIND == SUPCON:
            keep = valid & (same == 0)
            lab_other = tl.load(labels_ptr + other, mask=other < n_other, other=0)
            positive = keep & (lab_own[:, None] == lab_other[None, :])
            m, s = fold_tile_lse(m, s, tl.where(keep, z, NEG_INF))
            a += tl.sum(tl.where(positive, z, 0.0), axis=1)
            n += tl.sum(tl.where(positive, 1.0, 0.0), axis=1)
        else:
            a += tl.sum(tl.where(valid, softplus(tl.where(same, -z, z)), 0.0), axis=1)
    return finish_lse(m, s), a, n


@triton.jit
def _contrastive_fwd_kernel(
        q_ptr, k_ptr, labels_ptr, logit_scale_ptr, logit_bias_ptr, rq_ptr, rk_ptr, loss_ptr, stats_ptr, B, M, D_UNITS,
        KIND: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, SINGLE_K: tl.constexpr, TO_F32: tl.constexpr, PRECISION: tl.constexpr,
        D_MULTIPLE: tl.constexpr):
    """Row statistics and loss rows (every kind but symmetric InfoNCE, which takes the joint kernel)."""
    D = D_UNITS * D_MULTIPLE  # a product: Triton then knows the rows' alignment
    logit_scale = tl.load(logit_scale_ptr)
    logit_bias = 0.0
    if KIND == SIGLIP:
        logit_bias = tl.load(logit_bias_ptr)
    start = tl.program_id(0) * BLOCK_M
    rows = start + tl.arange(0, BLOCK_M)
    mask = rows < B
    lse, a, n = _fwd_sweep(q_ptr, rq_ptr, B, k_ptr, rk_ptr, M, labels_ptr, logit_scale, logit_bias, start, D, KIND,
                           NORMALIZE, BLOCK_M, BLOCK_N, BLOCK_K, SINGLE_K, TO_F32, PRECISION)
    if KIND == INFO_NCE:
        tl.store(loss_ptr + rows, lse - a, mask=mask)
        tl.store(stats_ptr + rows, lse, mask=mask)
    elif KIND == SUPCON:
        has = n > 0.0
        tl.store(loss_ptr + rows, tl.where(has, lse - a / tl.maximum(n, 1.0), 0.0), mask=mask)
        tl.store(stats_ptr + rows, tl.where(has, lse, 0.0), mask=mask)
        tl.store(stats_ptr + B + rows, n, mask=mask)
    else:
        tl.store(loss_ptr + rows, a, mask=mask)


@triton.jit
def _joint_stats_kernel(q_ptr, k_ptr, logit_scale_ptr, rq_ptr, rk_ptr, row_part_ptr, col_part_ptr, B, D_UNITS,
                        rows_per_program, cols_per_program, NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE_K: tl.constexpr, TO_F32: tl.constexpr,
                        PRECISION: tl.constexpr, D_MULTIPLE: tl.constexpr):
    """Symmetric InfoNCE's row and column statistics from one product: program (p, c) sweeps rows
    [p R, p R + R) against columns [c C, c C + C) and writes partial (max, sum, diagonal) of each row
    to row_part[:, c] and partial (max, sum) of each column to col_part[:, p] (its own slots, read
    back by the same program as its row blocks advance: no atomics). R = rows_per_program."""
    D = D_UNITS * D_MULTIPLE  # a product: Triton then knows the rows' alignment
    pr = tl.program_id(0)
    pc = tl.program_id(1)
    n_row_parts = tl.num_programs(0)
    n_col_parts = tl.num_programs(1)
    logit_scale = tl.load(logit_scale_ptr)
    r0 = pr * rows_per_program
    r1 = tl.minimum(r0 + rows_per_program, B)
    c0 = pc * cols_per_program
    c1 = tl.minimum(c0 + cols_per_program, B)
    for rb in range(r0, r1, BLOCK_M):
        own = rb + tl.arange(0, BLOCK_M)
        r_own, unused = _inv_norms(rq_ptr, own, B, NORMALIZE)
        own_tile = 0.0
        if SINGLE_K:
            own_tile = _load_tile(q_ptr, own, r1, tl.arange(0, BLOCK_K), D, TO_F32)
        m = tl.full([BLOCK_M], NEG_INF, tl.float32)
        s = tl.zeros([BLOCK_M], tl.float32)
        a = tl.zeros([BLOCK_M], tl.float32)
        for cb in range(c0, c1, BLOCK_N):
            other = cb + tl.arange(0, BLOCK_N)
            r_other, unused = _inv_norms(rk_ptr, other, B, NORMALIZE)
            gram = _gram_tile(q_ptr, own, r1, own_tile, k_ptr, other, c1, D, BLOCK_M, BLOCK_N, BLOCK_K, SINGLE_K,
                              TO_F32, PRECISION)
            z = logit_scale * _cosines(gram, r_own, r_other, NORMALIZE)
            valid = (own < r1)[:, None] & (other < c1)[None, :]
            y = tl.where(valid, z, NEG_INF)
            m, s = fold_tile_lse(m, s, y)
            a += tl.sum(tl.where(valid & (own[:, None] == other[None, :]), z, 0.0), axis=1)
            cols = other < c1
            earlier = cols & (other * 0 + rb > r0)  # the first row block starts the columns' partials
            cm_ptr = col_part_ptr + pr * B + other
            cs_ptr = col_part_ptr + (n_row_parts + pr) * B + other
            cm, cs = fold_tile_lse(tl.load(cm_ptr, mask=earlier, other=NEG_INF),
                                   tl.load(cs_ptr, mask=earlier, other=0.0), tl.trans(y))
            tl.store(cm_ptr, cm, mask=cols)
            tl.store(cs_ptr, cs, mask=cols)
        rows = own < r1
        tl.store(row_part_ptr + pc * B + own, m, mask=rows)
        tl.store(row_part_ptr + (n_col_parts + pc) * B + own, s, mask=rows)
        tl.store(row_part_ptr + (2 * n_col_parts + pc) * B + own, a, mask=rows)
        tl.debug_barrier()  # this block's column partials, visible to every thread before the next block


@triton.jit
def _joint_stats_merge_kernel(row_part_ptr, col_part_ptr, loss_ptr, stats_ptr, B, n_row_parts, n_col_parts,
                              BLOCK: tl.constexpr):
    """Merges the partials in a fixed order: stats = [row lse, column lse], loss = the mean of the
    two directions' losses."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < B
    m = tl.full([BLOCK], NEG_INF, tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    a = tl.zeros([BLOCK], tl.float32)
    for c in range(0, n_col_parts):
        m, s = merge_lse(m, s, tl.load(row_part_ptr + c * B + i, mask=mask, other=NEG_INF),
                         tl.load(row_part_ptr + (n_col_parts + c) * B + i, mask=mask, other=0.0))
        a += tl.load(row_part_ptr + (2 * n_col_parts + c) * B + i, mask=mask, other=0.0)
    cm = tl.full([BLOCK], NEG_INF, tl.float32)
    cs = tl.zeros([BLOCK], tl.float32)
    for p in range(0, n_row_parts):
        cm, cs = merge_lse(cm, cs, tl.load(col_part_ptr + p * B + i, mask=mask, other=NEG_INF),
                           tl.load(col_part_ptr + (n_row_parts + p) * B + i, mask=mask, other=0.0))
    lse, col_lse = finish_lse(m, s), finish_lse(cm, cs)
    tl.store(stats_ptr + i, lse, mask=mask)
    tl.store(stats_ptr + B + i, col_lse, mask=mask)
    tl.store(loss_ptr + i, 0.5 * ((lse - a) + (col_lse - a)), mask=mask)


@triton.jit
def _grad_block(grad_rows_ptr, own_ptr, r_own_ptr, n_own, other_ptr, r_other_ptr, n_other, labels_ptr, logit_scale,
                logit_bias, stats_ptr, out_ptr, gcoef_ptr, start, B, D,
                IS_ROW: tl.constexpr, HAS_OUT: tl.constexpr, HAS_COEF: tl.constexpr, KIND: tl.constexpr,
                NORMALIZE: tl.constexpr, SYMMETRIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                D_LO: tl.constexpr, D_HI: tl.constexpr, HAS_HI: tl.constexpr, TO_F32: tl.constexpr,
                PRECISION: tl.constexpr, GRAD_F32: tl.constexpr, GRAD_PRECISION: tl.constexpr,
                W_ROUND: tl.constexpr):
    """The gradient of one block of own rows (query rows when IS_ROW, else key rows) over the full
    feature width, and for query rows the grad_coef partials: one sweep over every other row, two
    products (the similarity tile and the gradient's accumulation). The width is held as two
    power-of-two segments, [0, D_LO) and (HAS_HI) [D_LO, D_LO + D_HI), so that D = 768 costs 768 and
    D = 520 costs 544 rather than 1024."""
    own = start + tl.arange(0, BLOCK_M)
    d_lo = tl.arange(0, D_LO)
    d_hi = D_LO + tl.arange(0, D_HI)
    r_own, r_own_kept = _inv_norms(r_own_ptr, own, n_own, NORMALIZE)
    own_lo = _load_tile(own_ptr, own, n_own, d_lo, D, TO_F32)
    own_hi = 0.0
    if HAS_HI:
        own_hi = _load_tile(own_ptr, own, n_own, d_hi, D, TO_F32)
    # Statistics of the own indices: rows i for the row role, columns j for the column role.
    g_own, s0_own, s1_own, lab_own = _index_stats(own, B, grad_rows_ptr, stats_ptr, labels_ptr, KIND, True)
    acc_lo = tl.zeros([BLOCK_M, D_LO], tl.float32)
    acc_hi = tl.zeros([BLOCK_M, D_HI], tl.float32)
    coef_c = tl.zeros([BLOCK_M], tl.float32)  # sum_j dZ c
    coef_1 = tl.zeros([BLOCK_M], tl.float32)  # sum_j dZ
    for o0 in range(0, n_other, BLOCK_N):
        other = o0 + tl.arange(0, BLOCK_N)
        r_other, unused = _inv_norms(r_other_ptr, other, n_other, NORMALIZE)
        b_lo = _load_tile(other_ptr, other, n_other, d_lo, D, TO_F32)
        gram = tl.dot(own_lo, tl.trans(b_lo), input_precision=PRECISION)
        b_hi = 0.0
        if HAS_HI:
            b_hi = _load_tile(other_ptr, other, n_other, d_hi, D, TO_F32)
            gram = tl.dot(own_hi, tl.trans(b_hi), gram, input_precision=PRECISION)
        c = _cosines(gram, r_own, r_other, NORMALIZE)
        z = logit_scale * c + logit_bias
        valid = (other < n_other)[None, :] & (own < n_own)[:, None]
        same = own[:, None] == other[None, :]
        g_oth, s0_oth, s1_oth, lab_oth = _index_stats(other, B, grad_rows_ptr, stats_ptr, labels_ptr, KIND, False)
        positive = lab_own == lab_oth
        if IS_ROW:
            dz, w = _pair_grad(z, same, valid, positive, g_own, s0_own, s1_own, g_oth, s0_oth, s1_oth, KIND,
                               SYMMETRIC)
            coef_c += tl.sum(dz * c, axis=1)
            coef_1 += tl.sum(dz, axis=1)
        else:  # own indices are columns j: the tile is dZ^T
            dz, w = _pair_grad(z, same, valid, positive, g_oth, s0_oth, s1_oth, g_own, s0_own, s1_own, KIND,
                               SYMMETRIC)
        if HAS_OUT:
            wb = as_operand(w * (logit_scale * r_other)[None, :], W_ROUND)
            if not GRAD_F32:
                wb = wb.to(other_ptr.dtype.element_ty)
            acc_lo = tl.dot(wb, _as_grad_operand(b_lo, GRAD_F32), acc_lo, input_precision=GRAD_PRECISION)
            if HAS_HI:
                acc_hi = tl.dot(wb, _as_grad_operand(b_hi, GRAD_F32), acc_hi, input_precision=GRAD_PRECISION)
    mask = own < n_own
    if HAS_OUT:
        # The normalisation's radial term from the product itself, acc . own = sum_j W~ s r' <own, other_j>
        # with each weight as the dot held it: for nearly identical rows it nearly cancels the
        # product, so a sum of the fp32 weights left their rounding as the gradient (28 % of a bf16 row).
        radial = 0.0
        if NORMALIZE:
            along = tl.sum(acc_lo * own_lo.to(tl.float32), axis=1)
            if HAS_HI:
                along += tl.sum(acc_hi * own_hi.to(tl.float32), axis=1)
            radial = r_own * r_own * r_own_kept * along
        _store_grad(out_ptr, own_ptr, own, n_own, d_lo, D, acc_lo, r_own, radial, NORMALIZE)
        if HAS_HI:
            _store_grad(out_ptr, own_ptr, own, n_own, d_hi, D, acc_hi, r_own, radial, NORMALIZE)
    if HAS_COEF:
        tl.store(gcoef_ptr + own, coef_c, mask=mask)
        tl.store(gcoef_ptr + B + own, coef_1, mask=mask)


@triton.jit
def _store_grad(out_ptr, own_ptr, own, n_own, d, D, acc, r_own, radial, NORMALIZE: tl.constexpr):
    """One feature segment of the own rows' gradient: with the normalisation, r (sum_j W s r' k_j -
    (sum_j W s c) r q_i), the radial part only where |q_i| >= 1e-12 (radial is 0 there)."""
    if NORMALIZE:
        acc = r_own[:, None] * acc - radial[:, None] * _load_tile(own_ptr, own, n_own, d, D, True)
    mask = (own < n_own)[:, None] & (d[None, :] < D)
    tl.store(out_ptr + own[:, None].to(tl.int64) * D + d[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _as_grad_operand(b, GRAD_F32: tl.constexpr):
    """The other rows as the gradient dot's operand: fp32 where that dot runs on fp32 (fp16 inputs,
    whose pair weights need fp32's range), else as loaded."""
    if GRAD_F32:
        b = b.to(tl.float32)
    return b


@triton.jit
def _contrastive_grad_kernel(
        grad_rows_ptr, q_ptr, k_ptr, labels_ptr, logit_scale_ptr, logit_bias_ptr, stats_ptr, rq_ptr, rk_ptr, gq_ptr,
        gk_ptr, gcoef_ptr, B, M, D_UNITS, n_row_blocks,
        KIND: tl.constexpr, NORMALIZE: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_GQ: tl.constexpr,
        HAS_COEF: tl.constexpr, HAS_GK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        D_LO: tl.constexpr, D_HI: tl.constexpr, HAS_HI: tl.constexpr, TO_F32: tl.constexpr,
        PRECISION: tl.constexpr, GRAD_F32: tl.constexpr, GRAD_PRECISION: tl.constexpr, W_ROUND: tl.constexpr,
        D_MULTIPLE: tl.constexpr):
    """Row programs (grad_query, grad_coef) then column programs (grad_key) in one grid; either set may
    be empty."""
    D = D_UNITS * D_MULTIPLE  # a product: Triton then knows the rows' alignment
    pid = tl.program_id(0)
    logit_scale = tl.load(logit_scale_ptr)
    logit_bias = 0.0
    if KIND == SIGLIP:
        logit_bias = tl.load(logit_bias_ptr)
    if pid < n_row_blocks:
        _grad_block(grad_rows_ptr, q_ptr, rq_ptr, B, k_ptr, rk_ptr, M, labels_ptr, logit_scale, logit_bias,
                    stats_ptr, gq_ptr, gcoef_ptr, pid * BLOCK_M, B, D, True, HAS_GQ, HAS_COEF, KIND, NORMALIZE,
                    SYMMETRIC, BLOCK_M, BLOCK_N, D_LO, D_HI, HAS_HI, TO_F32, PRECISION, GRAD_F32,
                    GRAD_PRECISION, W_ROUND)
    else:
        _grad_block(grad_rows_ptr, k_ptr, rk_ptr, M, q_ptr, rq_ptr, B, labels_ptr, logit_scale, logit_bias, stats_ptr,
                    gk_ptr, gcoef_ptr, (pid - n_row_blocks) * BLOCK_M, B, D, False, HAS_GK, False, KIND, NORMALIZE,
                    SYMMETRIC, BLOCK_M, BLOCK_N, D_LO, D_HI, HAS_HI, TO_F32, PRECISION, GRAD_F32,
                    GRAD_PRECISION, W_ROUND)


# ---- launchers (contract: lossforge_kernels/ops/contrastive.py, checked there) --------------------

def _inverse_norms(x: torch.Tensor, normalize: bool, dummy: torch.Tensor) -> torch.Tensor:
    """The (2, rows) inverse-norm buffer of x, or a placeholder that is never read."""
    if not normalize or x.shape[0] == 0:
        return dummy
    out = torch.empty(2, x.shape[0], dtype=torch.float32, device=x.device)
    row_norms(x, False, out[0], out[1])
    return out


def _dot_modes(dtype: torch.dtype, interpret: bool):
    """(TO_F32, PRECISION, GRAD_F32, GRAD_PRECISION). The similarity dot takes the inputs natively
    (fp32 at full precision). The gradient dot takes dZ in bf16 for bf16 inputs (fp32's range); for
    fp16 inputs dZ could underflow fp16, so that dot runs in tf32 on fp32 operands."""
    if interpret:
        return True, "ieee", True, "ieee"
    if dtype == torch.float32:
        return False, "ieee", True, "ieee"
    if dtype == torch.float16:
        return False, "ieee", True, "tf32"
    return False, "ieee", False, "ieee"


# Partial statistics per program of the joint kernel: at most this many row ranges and column ranges
# (16 x 16 programs, 8 x 16 x (B + M) bytes of partials: 16 MiB at B = M = 65536).
JOINT_PARTS = 16


def _ranges(n, block, parts):
    """(rows per range, a multiple of block; number of ranges, none empty)."""
    per = triton.cdiv(triton.cdiv(n, parts), block) * block
    return per, triton.cdiv(n, per)


def _joint_stats(query, key, logit_scale, loss, stats, rq, rk, normalize, t, modes, width):
    b = query.shape[0]
    to_f32, precision = modes[:2]
    parts = 2 if interpreting() else JOINT_PARTS
    rows_per, n_row_parts = _ranges(b, t.m, parts)
    cols_per, n_col_parts = _ranges(b, t.n, parts)
    row_part = torch.empty(3, n_col_parts, b, dtype=torch.float32, device=query.device)
    col_part = torch.empty(2, n_row_parts, b, dtype=torch.float32, device=query.device)
    _joint_stats_kernel[(n_row_parts, n_col_parts)](
        query, key, logit_scale, rq, rk, row_part, col_part, b, width[0], rows_per, cols_per,
        NORMALIZE=bool(normalize), BLOCK_M=t.m, BLOCK_N=t.n, BLOCK_K=t.k, SINGLE_K=t.single_k, TO_F32=to_f32,
        PRECISION=precision, D_MULTIPLE=width[1], num_warps=t.warps, num_stages=t.stages)
    block = 1024
    _joint_stats_merge_kernel[(triton.cdiv(b, block),)](row_part, col_part, loss, stats, b, n_row_parts, n_col_parts,
                                                        BLOCK=block)


def _setup(query, key, kind, normalize, placeholder):
    """Tiles, dot modes, inverse norms and the width as (D_UNITS, D_MULTIPLE)."""
    d = query.shape[1]
    t = tiles_for(d, query.dtype)
    modes = _dot_modes(query.dtype, interpreting())
    rq = _inverse_norms(query, normalize, placeholder)
    rk = rq if kind == SUPCON.value else _inverse_norms(key, normalize, placeholder)
    return t, modes, rq, rk, (d // row_multiple(d), row_multiple(d))


def contrastive_fwd(query, key, labels, logit_scale, logit_bias, loss, stats, kind, normalize, symmetric):
    """One product: the row statistics, or for symmetric InfoNCE the row and column statistics together."""
    b = query.shape[0]
    if b == 0:
        return
    t, modes, rq, rk, width = _setup(query, key, kind, normalize, loss)
    if symmetric:
        _joint_stats(query, key, logit_scale, loss, stats, rq, rk, normalize, t, modes, width)
        return
    _contrastive_fwd_kernel[(triton.cdiv(b, t.m),)](
        query, key, loss if labels is None else labels, logit_scale, logit_bias, rq, rk, loss, stats, b, key.shape[0],
        width[0], KIND=kind, NORMALIZE=bool(normalize), BLOCK_M=t.m, BLOCK_N=t.n, BLOCK_K=t.k,
        SINGLE_K=t.single_k, TO_F32=modes[0], PRECISION=modes[1], D_MULTIPLE=width[1], num_warps=t.warps,
        num_stages=t.stages)


def contrastive_bwd(grad_rows, query, key, labels, logit_scale, logit_bias, stats, grad_query, grad_key, grad_coef,
                    kind, normalize, symmetric):
    """Two products per role: row programs (grad_query, grad_coef) and column programs (grad_key) in one
    launch, each building the similarity tiles once and accumulating over the full feature width."""
    has_gq, has_gk, has_coef = grad_query is not None, grad_key is not None, grad_coef is not None
    if not (has_gq or has_gk or has_coef):
        return
    b, m = query.shape[0], key.shape[0]
    if b == 0:
        if has_gk:
            grad_key.zero_()  # no query: every key gradient is 0
        return
    t, (to_f32, precision, grad_f32, grad_precision), rq, rk, width = _setup(query, key, kind, normalize, grad_rows)
    n_row_blocks = triton.cdiv(b, t.grad_m) if (has_gq or has_coef) else 0
    n_col_blocks = triton.cdiv(m, t.grad_m) if has_gk else 0
    placeholder = grad_rows
    _contrastive_grad_kernel[(n_row_blocks + n_col_blocks,)](
        grad_rows, query, key, placeholder if labels is None else labels, logit_scale, logit_bias, stats, rq, rk,
        grad_query if has_gq else query, grad_key if has_gk else key, grad_coef if has_coef else placeholder,
        b, m, width[0], n_row_blocks, KIND=kind, NORMALIZE=bool(normalize), SYMMETRIC=bool(symmetric),
        HAS_GQ=has_gq, HAS_COEF=has_coef, HAS_GK=has_gk, BLOCK_M=t.grad_m, BLOCK_N=t.grad_n, D_LO=t.d_lo,
        D_HI=max(t.d_hi, 16), HAS_HI=t.d_hi > 0, TO_F32=to_f32, PRECISION=precision, GRAD_F32=grad_f32,
        GRAD_PRECISION=grad_precision, W_ROUND=operand_rounding(query.dtype), D_MULTIPLE=width[1],
        num_warps=t.grad_warps, num_stages=t.stages)
