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
#             count and sum (self excluded), SigLIP softplus sums. Symmetric InfoNCE adds column
#             programs to the same launch (grid = row blocks + column blocks) for the column lse;
#             a tiny second kernel averages the two directions into `loss` (no atomics anywhere).
#   backward  row programs accumulate grad_query rows (dZ @ k) and the grad_coef partials; column
#             programs accumulate grad_key rows (dZ^T @ q). A second grid axis splits the gradient's
#             feature width into BLOCK_DG blocks when D is wide (the tile is then recomputed per block).
#             SupCon row programs weigh key rows by dZ_ij + dZ_ji (both roles of a row).
# Inverse row norms come from a pre-pass into a (2, rows) fp32 buffer: [r, r where |x| >= 1e-12 else 0].
# FLOPs (in B x M x D products, 2 FLOPs each): forward 1 (symmetric 2); backward per role (row or
# column programs) one recomputed tile per feature block plus one accumulation: 2 when D fits one
# block (4 with grad_query and grad_key, SupCon 2), cdiv(D, BLOCK_DG) + 1 when it is split.
# Traffic per role: each program reads its own rows once and the whole other operand once, so
# (rows / BLOCK_M) x (other rows) x D elements in all, re-reads served by L2 when the other operand fits
# it; the outputs are written once. All arithmetic is fp32: dots take fp16/bf16 operands natively with
# fp32 accumulation on a GPU (the gradient dot's dZ operand is rounded to bf16 for bf16 inputs).
# NaN and inf as in the reference: the log-sum-exps are torch.logsumexp's (a +inf logit gives +inf and
# probability 0 to the finite logits; a NaN reaches the sum of exponentials, so it survives a maximum
# that skips NaN, as a GPU's does), and softplus keeps NaN.
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from . import interpreting
from .row_softmax import NEG_INF as _NEG_INF_VALUE, finish_lse, fold_tile_lse, softplus

NEG_INF = tl.constexpr(_NEG_INF_VALUE)  # jit code may only read constexpr globals
# The `kind` values of the contract (reference/contrastive.py: Kind; tests/test_enums.py checks them).
INFO_NCE = tl.constexpr(0)
SUPCON = tl.constexpr(1)
SIGLIP = tl.constexpr(2)
NORM_EPS = tl.constexpr(1e-12)


@dataclasses.dataclass(frozen=True)
class Tiles:
    m: int  # own rows per program
    n: int  # other rows per swept tile
    k: int  # feature chunk of the similarity dot (== d_full: one dot, own tile kept in registers)
    dg: int  # feature block of the gradient accumulator (one grid column per block)
    d_full: int  # next power of two of D (at least 16, the smallest tl.dot width)
    warps: int  # forward
    bwd_warps: int
    stages: int

    @property
    def single_k(self) -> bool:
        return self.k == self.d_full


def tiles_for(d: int, interpret: bool | None = None) -> Tiles:
    """Tile sizes from the feature width only. On a GPU, 64 x 64 tiles; the own tile stays in registers
    up to D = 256, wider rows are reduced in 128-wide chunks; the backward's fp32 accumulator is at
    most 64 x 128 (more feature blocks recompute the similarity tile once each). The interpreter gets
    tiny tiles, so small tests cross row, chunk and feature-block edges (k = 64 > dg = 32)."""
    d_full = max(16, triton.next_power_of_2(max(d, 1)))
    if interpreting() if interpret is None else interpret:
        return Tiles(16, 16, min(d_full, 64), min(d_full, 32), d_full, 1, 1, 1)
    if d_full <= 128:
        return Tiles(64, 64, d_full, d_full, d_full, 4, 8, 2)
    if d_full <= 256:
        return Tiles(64, 64, d_full, 128, d_full, 8, 8, 2)
    return Tiles(64, 64, 128, 128, d_full, 8, 8, 2)


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
def _inv_norm_kernel(x_ptr, out_ptr, N, D, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[0] = 1 / max(|x_i|, 1e-12), out[1] = the same where |x_i| >= 1e-12, else 0."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    sq = tl.zeros([BLOCK_R], tl.float32)
    for d0 in range(0, D, BLOCK_C):
        x = _load_tile(x_ptr, rows, N, d0 + tl.arange(0, BLOCK_C), D, True)
        sq += tl.sum(x * x, axis=1)
    norm = tl.sqrt_rn(sq)
    r = 1.0 / tl.maximum(norm, NORM_EPS)
    mask = rows < N
    tl.store(out_ptr + rows, r, mask=mask)
    tl.store(out_ptr + N + rows, tl.where(norm >= NORM_EPS, r, 0.0), mask=mask)


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
        q_ptr, k_ptr, labels_ptr, logit_scale_ptr, logit_bias_ptr, rq_ptr, rk_ptr, loss_ptr, stats_ptr, col_loss_ptr,
        B, M, D, n_row_blocks,
        KIND: tl.constexpr, NORMALIZE: tl.constexpr, SYMMETRIC: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE_K: tl.constexpr, TO_F32: tl.constexpr,
        PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    logit_scale = tl.load(logit_scale_ptr)
    logit_bias = 0.0
    if KIND == SIGLIP:
        logit_bias = tl.load(logit_bias_ptr)
    if pid < n_row_blocks:
        start = pid * BLOCK_M
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
    else:
        if SYMMETRIC:  # column programs: the keys' lse over the B queries (M == B)
            start = (pid - n_row_blocks) * BLOCK_M
            cols = start + tl.arange(0, BLOCK_M)
            mask = cols < B
            lse, a, n = _fwd_sweep(k_ptr, rk_ptr, B, q_ptr, rq_ptr, B, labels_ptr, logit_scale, logit_bias, start, D,
                                   KIND, NORMALIZE, BLOCK_M, BLOCK_N, BLOCK_K, SINGLE_K, TO_F32, PRECISION)
            tl.store(col_loss_ptr + cols, lse - a, mask=mask)
            tl.store(stats_ptr + B + cols, lse, mask=mask)


@triton.jit
def _mean_of_directions_kernel(loss_ptr, col_loss_ptr, B, BLOCK: tl.constexpr):
    """loss = (row loss + column loss) / 2 for symmetric InfoNCE, once both sweeps are done."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < B
    rows = tl.load(loss_ptr + i, mask=mask)
    cols = tl.load(col_loss_ptr + i, mask=mask)
    tl.store(loss_ptr + i, 0.5 * (rows + cols), mask=mask)


@triton.jit
def _bwd_block(grad_rows_ptr, own_ptr, r_own_ptr, n_own, other_ptr, r_other_ptr, n_other, labels_ptr, logit_scale,
               logit_bias, stats_ptr, out_ptr, gcoef_ptr, start, dblock, B, D,
               IS_ROW: tl.constexpr, HAS_OUT: tl.constexpr, HAS_COEF: tl.constexpr, KIND: tl.constexpr,
               NORMALIZE: tl.constexpr, SYMMETRIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, BLOCK_DG: tl.constexpr, SINGLE_K: tl.constexpr, TO_F32: tl.constexpr,
               PRECISION: tl.constexpr, GRAD_F32: tl.constexpr, GRAD_PRECISION: tl.constexpr):
    """The gradient of one block of own rows (query rows when IS_ROW, else key rows), one feature
    block of it, and for query rows the grad_coef partials: a sweep over every other row."""
    own = start + tl.arange(0, BLOCK_M)
    dg = dblock * BLOCK_DG + tl.arange(0, BLOCK_DG)
    r_own, r_own_kept = _inv_norms(r_own_ptr, own, n_own, NORMALIZE)
    own_tile = 0.0
    if SINGLE_K:
        own_tile = _load_tile(own_ptr, own, n_own, tl.arange(0, BLOCK_K), D, TO_F32)
    # Statistics of the own indices: rows i for the row role, columns j for the column role.
    g_own, s0_own, s1_own, lab_own = _index_stats(own, B, grad_rows_ptr, stats_ptr, labels_ptr, KIND, True)
    acc = tl.zeros([BLOCK_M, BLOCK_DG], tl.float32)
    coef_c = tl.zeros([BLOCK_M], tl.float32)  # sum_j dZ c
    coef_1 = tl.zeros([BLOCK_M], tl.float32)  # sum_j dZ
    norm_c = tl.zeros([BLOCK_M], tl.float32)  # sum_j W c, for the normalisation's radial term
    for o0 in range(0, n_other, BLOCK_N):
        other = o0 + tl.arange(0, BLOCK_N)
        r_other, unused = _inv_norms(r_other_ptr, other, n_other, NORMALIZE)
        gram = _gram_tile(own_ptr, own, n_own, own_tile, other_ptr, other, n_other, D, BLOCK_M, BLOCK_N, BLOCK_K,
                          SINGLE_K, TO_F32, PRECISION)
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
        if NORMALIZE:
            norm_c += tl.sum(w * c, axis=1)
        if HAS_OUT:
            b = _load_tile(other_ptr, other, n_other, dg, D, GRAD_F32)
            wb = w * (logit_scale * r_other)[None, :]
            if not GRAD_F32:
                wb = wb.to(other_ptr.dtype.element_ty)
            acc = tl.dot(wb, b, acc, input_precision=GRAD_PRECISION)
    mask = own < n_own
    if HAS_OUT:
        if NORMALIZE:  # r (sum_j W s r' k_j - (sum_j W s c) r q_i), the radial part only where |q_i| >= 1e-12
            own_dg = _load_tile(own_ptr, own, n_own, dg, D, True)
            acc = r_own[:, None] * acc - (r_own * r_own_kept * logit_scale * norm_c)[:, None] * own_dg
        out_mask = mask[:, None] & (dg[None, :] < D)
        tl.store(out_ptr + own[:, None].to(tl.int64) * D + dg[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=out_mask)
    if HAS_COEF:
        if dblock == 0:  # one writer per element
            tl.store(gcoef_ptr + own, coef_c, mask=mask)
            tl.store(gcoef_ptr + B + own, coef_1, mask=mask)


@triton.jit
def _contrastive_bwd_kernel(
        grad_rows_ptr, q_ptr, k_ptr, labels_ptr, logit_scale_ptr, logit_bias_ptr, stats_ptr, rq_ptr, rk_ptr, gq_ptr,
        gk_ptr, gcoef_ptr, B, M, D, n_row_blocks,
        KIND: tl.constexpr, NORMALIZE: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_GQ: tl.constexpr,
        HAS_COEF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_DG: tl.constexpr, SINGLE_K: tl.constexpr, TO_F32: tl.constexpr, PRECISION: tl.constexpr,
        GRAD_F32: tl.constexpr, GRAD_PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    dblock = tl.program_id(1)
    logit_scale = tl.load(logit_scale_ptr)
    logit_bias = 0.0
    if KIND == SIGLIP:
        logit_bias = tl.load(logit_bias_ptr)
    if pid < n_row_blocks:
        # Without grad_query only the grad_coef partials are wanted: one feature block computes them.
        row_block_works = dblock == 0
        if HAS_GQ:
            row_block_works = dblock >= 0
        if row_block_works:
            _bwd_block(grad_rows_ptr, q_ptr, rq_ptr, B, k_ptr, rk_ptr, M, labels_ptr, logit_scale, logit_bias,
                       stats_ptr, gq_ptr, gcoef_ptr, pid * BLOCK_M, dblock, B, D, True, HAS_GQ, HAS_COEF, KIND,
                       NORMALIZE, SYMMETRIC, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_DG, SINGLE_K, TO_F32, PRECISION,
                       GRAD_F32, GRAD_PRECISION)
    else:
        _bwd_block(grad_rows_ptr, k_ptr, rk_ptr, M, q_ptr, rq_ptr, B, labels_ptr, logit_scale, logit_bias, stats_ptr,
                   gk_ptr, gcoef_ptr, (pid - n_row_blocks) * BLOCK_M, dblock, B, D, False, True, False, KIND, NORMALIZE,
                   SYMMETRIC, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_DG, SINGLE_K, TO_F32, PRECISION, GRAD_F32,
                   GRAD_PRECISION)


# ---- launchers (contract: lossforge_kernels/ops/contrastive.py, checked there) --------------------

def _inverse_norms(x: torch.Tensor, normalize: bool, dummy: torch.Tensor) -> torch.Tensor:
    """The (2, rows) inverse-norm buffer of x, or a placeholder that is never read."""
    if not normalize or x.shape[0] == 0:
        return dummy
    n, d = x.shape
    out = torch.empty(2, n, dtype=torch.float32, device=x.device)
    block_r = 16 if interpreting() else 32
    block_c = min(triton.next_power_of_2(max(d, 1)), 128 if interpreting() else 256)
    _inv_norm_kernel[(triton.cdiv(n, block_r),)](x, out, n, d, BLOCK_R=block_r, BLOCK_C=max(block_c, 16))
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


def contrastive_fwd(query, key, labels, logit_scale, logit_bias, loss, stats, kind, normalize, symmetric):
    b, d = query.shape
    m = key.shape[0]
    if b == 0:
        return
    t = tiles_for(d)
    to_f32, precision, _, _ = _dot_modes(query.dtype, interpreting())
    rq = _inverse_norms(query, normalize, loss)
    rk = rq if kind == SUPCON.value else _inverse_norms(key, normalize, loss)
    n_row_blocks = triton.cdiv(b, t.m)
    n_col_blocks = n_row_blocks if symmetric else 0
    col_loss = torch.empty(b, dtype=torch.float32, device=query.device) if symmetric else loss
    _contrastive_fwd_kernel[(n_row_blocks + n_col_blocks,)](
        query, key, loss if labels is None else labels, logit_scale, logit_bias, rq, rk, loss, stats, col_loss, b, m, d,
        n_row_blocks, KIND=kind, NORMALIZE=bool(normalize), SYMMETRIC=bool(symmetric), BLOCK_M=t.m, BLOCK_N=t.n,
        BLOCK_K=t.k, SINGLE_K=t.single_k, TO_F32=to_f32, PRECISION=precision, num_warps=t.warps,
        num_stages=t.stages)
    if symmetric:
        block = 1024
        _mean_of_directions_kernel[(triton.cdiv(b, block),)](loss, col_loss, b, BLOCK=block)


def contrastive_bwd(grad_rows, query, key, labels, logit_scale, logit_bias, stats, grad_query, grad_key, grad_coef,
                    kind, normalize, symmetric):
    b, d = query.shape
    m = key.shape[0]
    has_gq, has_gk, has_coef = grad_query is not None, grad_key is not None, grad_coef is not None
    if not (has_gq or has_gk or has_coef):
        return
    if b == 0:
        if has_gk:
            grad_key.zero_()  # no query: every key gradient is 0
        return
    t = tiles_for(d)
    to_f32, precision, grad_f32, grad_precision = _dot_modes(query.dtype, interpreting())
    rq = _inverse_norms(query, normalize, grad_rows)
    rk = rq if kind == SUPCON.value else _inverse_norms(key, normalize, grad_rows)
    n_row_blocks = triton.cdiv(b, t.m) if (has_gq or has_coef) else 0
    n_col_blocks = triton.cdiv(m, t.m) if has_gk else 0
    n_dblocks = triton.cdiv(d, t.dg) if (has_gq or has_gk) else 1
    placeholder = grad_rows
    _contrastive_bwd_kernel[(n_row_blocks + n_col_blocks, max(n_dblocks, 1))](
        grad_rows, query, key, placeholder if labels is None else labels, logit_scale, logit_bias, stats, rq, rk,
        grad_query if has_gq else query, grad_key if has_gk else key, grad_coef if has_coef else placeholder,
        b, m, d, n_row_blocks, KIND=kind, NORMALIZE=bool(normalize), SYMMETRIC=bool(symmetric), HAS_GQ=has_gq,
        HAS_COEF=has_coef, BLOCK_M=t.m, BLOCK_N=t.n, BLOCK_K=t.k, BLOCK_DG=t.dg, SINGLE_K=t.single_k,
        TO_F32=to_f32, PRECISION=precision, GRAD_F32=grad_f32, GRAD_PRECISION=grad_precision,
        num_warps=t.bwd_warps, num_stages=t.stages)
