"""Kernel ops of the triplet loss and their specs (semantics: reference/triplet.py): batch_hard here,
semi_hard and batch_all in the second half of this file.

The B x B distances never reach device memory: a mining kernel keeps, per anchor, a running
farthest positive and nearest negative over tiles of the Gram matrix and, in its epilogue, takes
the two mined distances again from the rows' differences and writes the anchor's loss and slope;
a pair-gradient kernel turns the 2B mined (anchor, other) pairs into the embeddings' gradient.
Nothing per anchor runs in torch between them: a fused 'mean' 'fwd+bwd' is 7 ops (the mining, which
also flags the kept anchors; one sum of the losses and the flags; the factor's reciprocal; the pair
gradient; the loss's division; autograd's ones_like and the rescale), 9 through the normalisation
(its row-norm op and its finishing op).

Normalisation (normalize=True, and always for cosine) enters as a per-row fp32 inverse norm
inv_norm (the rows are v = inv_norm * x, inv_norm = 1 / max(|x|, 1e-12); the row-norm op): the
kernels see x in its own dtype and inv_norm. The gradient goes through the normalisation inside the
op, in fp32: the gradient kernels write inv_norm * g (fp32), and the finishing op takes off the
radial part and rounds once to x's dtype. Rounded apart (autograd through inv_norm), the two
nearly cancelling terms of a nearly collapsed batch lost most of its gradient on half rows.

The options travel as the values of reference/triplet.py's enums: `distance` a Distance (EUCLIDEAN 0,
SQUARED_EUCLIDEAN 1, COSINE 2), `mining` a Mining (BATCH_HARD 0, SEMI_HARD 1, BATCH_ALL 2); the public
layer turns the public names ('cosine', 'semi_hard') into them once, and any other int is refused.

Kernel contract, the same for the Triton and the CUDA implementation (B rows, D features):

triplet_kept_<b>(labels, kept) -> ()
  labels (B,) contiguous int64; writes kept (B,) fp32: 1 where the anchor has a positive and a
  negative (its class has 2 to B - 1 members), else 0. Integer work only: exact and deterministic.
triplet_row_norms_<b>(x, twice, inv_norm, radial) -> ()
  x (B, D) contiguous fp32/fp16/bf16; with n = |x_i| (fp32) writes inv_norm (B,) fp32 = 1 / max(n, 1e-12)
  and radial (B,) fp32 = inv_norm where n >= 1e-12, else 0 (where the clamp holds inv_norm constant).
  twice (cosine of normalize=True rows, which the reference normalises again): with u = n inv_norm, the
  norm of the normalised row, inv_norm = (1 / max(n, 1e-12)) / max(u, 1e-12) and radial = 1 / n where
  u >= 1e-12, else 0. A NaN n gives NaN in both (as torch's clamp_min and comparisons would).
triplet_finish_normalised_<b>(partial, x, radial, grad_x) -> ()
  partial (B, D) fp32 = inv_norm * g, as the gradient kernels write it with inv_norm (g the gradient
  w.r.t. the rows v = inv_norm * x); radial as the row-norm op wrote it. With u = radial * x (the unit
  row where inv_norm varies, else 0) writes grad_x (x's shape and dtype; partial itself may be given
  for fp32 x) = partial - (u . partial) u, the gradient w.r.t. x less the normalisation's radial part,
  in fp32 and rounded once ((u . partial) u = (x . g) radial^2 inv_norm x: no dot product to carry
  between the ops, and no overflow for rows near the norm floor).
triplet_mine_<b>(x, labels, inv_norm, distance, margin, soft_margin, pos_index, pos_dist, neg_index,
                 neg_dist, loss, slope, kept) -> ()
  x        (B, D) contiguous fp32/fp16/bf16; labels (B,) contiguous int64 on x's device
  inv_norm None, or (B,) contiguous fp32: the rows are v_i = inv_norm[i] * x[i] (required for COSINE)
  distance a Distance: EUCLIDEAN, SQUARED_EUCLIDEAN or COSINE. The mining compares the Gram form in
           fp32 (squared: max(|a|^2 + |b|^2 - 2 a.b, 0); euclidean: sqrt(squared + 1e-12); cosine: 1 - a.b)
  writes per anchor (all (B,)) the index (int64, -1 when there is none) and fp32 distance (0 when none)
           of its farthest positive (same label, other row) and nearest negative (other label); ties go
           to the smallest index, and a NaN distance is chosen over any number (the first NaN
           column), as torch's argmax/argmin choose; a candidate at +inf counts. A chosen euclidean or
           squared distance that is finite is then taken again from the difference, sum over D of
           (v_a - v_o)^2 in fp32 (the Gram form loses digits to cancellation for close rows); cosine
           keeps the Gram form.
           loss (fp32): soft_margin ? softplus(gap) : relu(gap + margin), gap = pos_dist - neg_dist,
           for an anchor with both partners, else 0 (NaN kept). slope (fp32): d loss / d gap
           (sigmoid(gap), or 1 where the hinge's loss > 0, else 0) for an anchor with both, else 0;
           NaN for every anchor when x holds a NaN or inf (then every row's gradient is NaN, as in the
           reference, whose Gram-form backward multiplies every row by every other).
           kept None or (B,) fp32: 1 for an anchor with both partners, else 0 ('mean''s divisor).
triplet_pair_grad_<b>(x, inv_norm, pos_index, pos_dist, neg_index, neg_dist, slope, weight, distance,
                      grad_x) -> ()
  x, inv_norm, distance as above; pos_index .. slope as the mining wrote them; weight fp32, () (every
  anchor's) or (B,) (per anchor). The gradient of sum over kept anchors a of w_a (d_ap - d_an), with
  w_a = slope[a] * weight[a]: each pair (a, o) of coefficient c (d distance / d its squared form times
  +-w_a: euclidean w / d, 0 at d <= 1.000001e-6 (the clamp); squared 2 w, 0 at 0; cosine w; plus NaN
  when slope[a] is NaN) adds c (v_r - v_other) (cosine: -c v_other) to g_r of both its rows. Row r
  sums, in fp32 and in this order, its own two pairs, then the pairs of the anchors that chose it,
  by anchor (deterministic, no atomics). Writes grad_x[r] = inv_norm[r] * g_r (g_r without inv_norm),
  in x's dtype, or fp32 with inv_norm (a partial gradient: the finishing op completes it).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..reference.triplet import Distance, Mining
from ._chunks import chunk_rows, fp32_out_products
from ._labels import class_sizes
from .. import _checks
from ._contracts import F32, KERNEL_DTYPES, fail, require_choice, require_tensor
from ._library import KernelOp
from .builder import FusedLoss, build, grad_factor_rows

I64 = torch.int64
PARAMS = ("int distance", "float margin", "bool soft_margin", "bool normalize")
# A Euclidean distance at most this is sqrt(0 + 1e-12): the clamp was active, so no gradient flows
# (one fp32 ulp of slack for an approximate square root).
CLAMPED_EUCLIDEAN = 1.000001e-6
MINED_NAMES = ("pos_index", "pos_dist", "neg_index", "neg_dist")


def _check_distance(op, distance, inv_norm):
    require_choice(op, "distance", distance, tuple(Distance))
    if distance == Distance.COSINE and inv_norm is None:
        fail(op, "cosine distances need inv_norm (the rows' 1 / max(|x|, eps))")


def _check_rows(op, x, inv_norm):
    if x.dim() != 2 or x.dtype not in KERNEL_DTYPES or not x.is_contiguous():
        fail(op, f"x must be a contiguous 2-D fp32/fp16/bf16 tensor, got shape {tuple(x.shape)}, dtype {x.dtype} "
                 f"and strides {x.stride()}")
    if inv_norm is not None:
        require_tensor(op, "inv_norm", inv_norm, (x.shape[0],), x, F32)


def _check_mined(op, x, mined):
    """The per-anchor tensors of the mining: pos_index, pos_dist, neg_index, neg_dist, then those in `mined`'s tail."""
    n = x.shape[0]
    for name, t, dtype in zip(MINED_NAMES, mined, (I64, F32, I64, F32)):
        require_tensor(op, name, t, (n,), x, dtype)


def _check_kept(labels, kept):
    op = "triplet_kept"
    if labels.dim() != 1:
        fail(op, f"labels must be a contiguous torch.int64 tensor of shape (B,), got shape {tuple(labels.shape)}")
    require_tensor(op, "labels", labels, (labels.shape[0],), labels, I64)
    require_tensor(op, "kept", kept, (labels.shape[0],), labels, F32)


def _check_mine(x, labels, inv_norm, distance, margin, soft_margin, pos_index, pos_dist, neg_index, neg_dist, loss,
                slope, kept=None):
    op = "triplet_mine"
    _check_rows(op, x, inv_norm)
    _check_distance(op, distance, inv_norm)
    n = x.shape[0]
    require_tensor(op, "labels", labels, (n,), x, I64)
    _check_mined(op, x, (pos_index, pos_dist, neg_index, neg_dist))
    require_tensor(op, "loss", loss, (n,), x, F32)
    require_tensor(op, "slope", slope, (n,), x, F32)
    if kept is not None:
        require_tensor(op, "kept", kept, (n,), x, F32)


def _check_pair_grad(x, inv_norm, pos_index, pos_dist, neg_index, neg_dist, slope, weight, distance, grad_x):
    op = "triplet_pair_grad"
    _check_rows(op, x, inv_norm)
    _check_distance(op, distance, inv_norm)
    n = x.shape[0]
    _check_mined(op, x, (pos_index, pos_dist, neg_index, neg_dist))
    require_tensor(op, "slope", slope, (n,), x, F32)
    require_tensor(op, "weight", weight, () if weight.dim() == 0 else (n,), x, F32)
    _check_grad_x(op, x, inv_norm, grad_x)


def _check_grad_x(op, x, inv_norm, grad_x):
    dtype = x.dtype if inv_norm is None else F32  # with inv_norm, a partial gradient kept in fp32
    if grad_x.shape != x.shape or grad_x.dtype != dtype or not grad_x.is_contiguous() or grad_x.device != x.device:
        fail(op, f"grad_x must be contiguous, shaped like x {tuple(x.shape)}, {dtype} on {x.device}"
                 f"{'' if inv_norm is None else ' (with inv_norm)'}, got shape {tuple(grad_x.shape)}, dtype "
                 f"{grad_x.dtype} on {grad_x.device}")


def _check_row_norms(x, twice, inv_norm, radial):
    op = "triplet_row_norms"
    _check_rows(op, x, None)
    require_tensor(op, "inv_norm", inv_norm, (x.shape[0],), x, F32)
    require_tensor(op, "radial", radial, (x.shape[0],), x, F32)


def _check_finish(partial, x, radial, grad_x):
    op = "triplet_finish_normalised"
    _check_rows(op, x, None)
    require_tensor(op, "partial", partial, tuple(x.shape), x, F32)
    require_tensor(op, "radial", radial, (x.shape[0],), x, F32)
    require_tensor(op, "grad_x", grad_x, tuple(x.shape), x, x.dtype)


KEPT = KernelOp("triplet_kept", "(Tensor labels, Tensor(a!) kept) -> ()", check=_check_kept)
ROW_NORMS = KernelOp("triplet_row_norms", "(Tensor x, bool twice, Tensor(a!) inv_norm, Tensor(b!) radial) -> ()",
                     check=_check_row_norms)
FINISH = KernelOp(
    "triplet_finish_normalised",
    "(Tensor partial, Tensor x, Tensor radial, Tensor(a!) grad_x) -> ()",
    check=_check_finish,
)
MINE = KernelOp(
    "triplet_mine",
    "(Tensor x, Tensor labels, Tensor? inv_norm, int distance, float margin, bool soft_margin, Tensor(a!) pos_index,"
    " Tensor(b!) pos_dist, Tensor(c!) neg_index, Tensor(d!) neg_dist, Tensor(e!) loss, Tensor(f!) slope,"
    " Tensor(g!)? kept=None) -> ()",
    check=_check_mine,
)
PAIR_GRAD = KernelOp(
    "triplet_pair_grad",
    "(Tensor x, Tensor? inv_norm, Tensor pos_index, Tensor pos_dist, Tensor neg_index, Tensor neg_dist,"
    " Tensor slope, Tensor weight, int distance, Tensor(a!) grad_x) -> ()",
    check=_check_pair_grad,
)


def _triton():
    from ..triton_kernels import triplet as kernels  # Triton is optional: loaded at the first Triton call

    return kernels


KEPT.implement_triton(lambda *args: _triton().triplet_kept(*args))
ROW_NORMS.implement_triton(lambda *args: _triton().triplet_row_norms(*args))
FINISH.implement_triton(lambda *args: _triton().triplet_finish_normalised(*args))
MINE.implement_triton(lambda *args: _triton().triplet_mine(*args))
PAIR_GRAD.implement_triton(lambda *args: _triton().triplet_pair_grad(*args))


# ---- torch around the kernels: no per-anchor work, no host sync ------------------------------

def row_norm_factors(backend, x: torch.Tensor, distance: int, normalize: bool):
    """(inv_norm, radial) of the row-norm op, fp32 (B,) each, for the rows the kernels see, v = inv_norm * x
    (cosine with normalize: the normalised rows normalised again, as the reference does); (None, None): the
    rows as they are. Not differentiated: the ops take the gradient through the normalisation themselves."""
    cosine = distance == Distance.COSINE
    if not cosine and not normalize:
        return None, None
    out = torch.empty((2, x.shape[0]), device=x.device, dtype=F32)
    ROW_NORMS[backend](x, cosine and normalize, out[0], out[1])
    return out[0], out[1]


def finish_normalised(backend, partial, x, norm, grad_x):
    """grad_x (x's dtype) = the gradient w.r.t. x of a loss of the rows v = inv_norm * x, from the
    kernels' fp32 partial = inv_norm * g (the finishing op); grad_x may be partial itself."""
    FINISH[backend](partial, x, norm[1], grad_x)


def _normalised_gradient(backend, x, norm, grad_x, write):
    """write(inv_norm, grad_x) runs a gradient kernel; through the normalisation where there is one
    (finish_normalised)."""
    if norm[0] is None:
        write(None, grad_x)
        return
    partial = grad_x if grad_x.dtype == F32 else torch.empty(x.shape, device=x.device, dtype=F32)
    write(norm[0], partial)
    finish_normalised(backend, partial, x, norm, grad_x)


def _kept_count(backend, labels):
    """'mean''s divisor without a mining: the anchors with a positive and a negative (fp32, 0-dim; two
    launches, no sort)."""
    kept = labels.new_empty(labels.shape, dtype=F32)
    KEPT[backend](labels, kept)
    return kept.sum()


def _mine(backend, x, labels, inv_norm, distance, margin=0.0, soft_margin=False, rows=None):
    """(pos_index, pos_dist, neg_index, neg_dist, loss, slope) of the mining op's contract; with rows, a
    (2, B) fp32 buffer, the losses go to rows[0] and the kept flags to rows[1] (one sum for both)."""
    n = x.shape[0]
    loss = torch.empty(n, device=x.device, dtype=F32) if rows is None else rows[0]
    out = tuple(torch.empty(n, device=x.device, dtype=dtype) for dtype in (I64, F32, I64, F32)) + \
        (loss, torch.empty(n, device=x.device, dtype=F32))
    MINE[backend](x, labels, inv_norm, distance=distance, margin=margin, soft_margin=soft_margin, pos_index=out[0],
                  pos_dist=out[1], neg_index=out[2], neg_dist=out[3], loss=out[4], slope=out[5],
                  kept=None if rows is None else rows[1])
    return out


def _pair_gradient(backend, x, norm, saved, weight, distance, grad_x):
    """grad_x: the gradient of sum(weight * slope * (d_ap - d_an)) over the kept anchors."""
    def write(inv_norm, out):
        PAIR_GRAD[backend](x, inv_norm, *saved, weight=weight, distance=distance, grad_x=out)

    _normalised_gradient(backend, x, norm, grad_x, write)


def _forward(backend, tensors, params, grads, grad_factor, reduce):
    x, labels = tensors
    norm = row_norm_factors(backend, x, params.distance, params.normalize)
    *mined, loss, slope = _mine(backend, x, labels, norm[0], params.distance, params.margin, params.soft_margin)
    saved = (*mined, slope)
    if grads is not None:  # 'mean' of nothing: the factor is inf, every weight 0 (no anchor is kept)
        _pair_gradient(backend, x, norm, saved, grad_factor, params.distance, grads[0])
    return (loss.sum() if reduce else loss), saved


def _counted_mean(backend, tensors, params, grads):
    """A fused 'mean': the mining flags the kept anchors beside their losses, one sum gives the loss's
    total and the divisor, and no separate kept-anchor pass runs."""
    x, labels = tensors
    norm = row_norm_factors(backend, x, params.distance, params.normalize)
    rows = torch.empty((2, x.shape[0]), device=x.device, dtype=F32)  # the losses, the kept flags
    *mined, _, slope = _mine(backend, x, labels, norm[0], params.distance, params.margin, params.soft_margin,
                             rows=rows)
    sums = rows.sum(dim=1)
    total, divisor = sums[0], sums[1]
    # 'mean' of nothing: the factor is inf, every weight 0 (no anchor is kept)
    _pair_gradient(backend, x, norm, (*mined, slope), torch.reciprocal(divisor), params.distance, grads[0])
    return total, divisor


def _backward(backend, grad_rows, tensors, saved, params, grads):
    x = tensors[0]
    _pair_gradient(backend, x, row_norm_factors(backend, x, params.distance, params.normalize), saved,
                   grad_rows.to(F32).contiguous(), params.distance, grads[0])


SPEC = FusedLoss(
    name="triplet",
    tensors=("embeddings", "labels"),
    params=PARAMS,
    differentiable=("embeddings",),
    n_saved=5,
    forward=_forward,
    backward=_backward,
    mean_divisor=lambda backend, tensors, params: _kept_count(backend, tensors[1]),
    counted_mean=_counted_mean,
)
triplet_kernels = build(SPEC)


# ---- semi_hard and batch_all: chunks of anchors, a per-row kernel between two matrix products ----
#
# The anchors are walked in chunks of C rows. Per chunk, torch makes the C x B Gram block
# x_c @ x^T in fp32; the row kernel `triplet_row_loss_<b>` turns each row into distances (the
# reference's Gram form, as the mining kernel does), mines it and writes the row's loss and count
# and, when a gradient is wanted, a C x B block of coefficients: coef[a, j] = row_weight[a] *
# d(loss_a)/d(d_aj) * d(d_aj)/d(its Gram quantity) (euclidean: 1 / d, 0 where the clamp is active;
# squared: 2, 0 at 0; cosine: 1, applied to -dot). Two more products turn the block into the
# embeddings' gradient, accumulated over the chunks in a fixed order in fp32.
#
# triplet_row_loss_<b>(gram, sq, inv_norm, labels, row0, mining, distance, margin, soft_margin,
#                      row_weight, loss, count, coef) -> ()
#   gram (C, B) contiguous fp32: gram[i, j] = x[row0 + i] . x[j] (the unscaled rows);
#   sq (B,) fp32 |x_j|^2; inv_norm None or (B,) fp32 (required for COSINE); labels (B,) int64;
#   0 <= row0, row0 + C <= B; mining Mining.SEMI_HARD or BATCH_ALL; distance a Distance.
#   writes loss (C,) fp32 (the row's sum over its pairs or triplets) and count (C,) int64 (what
#   'mean' divides by: semi_hard the row's positives if it has a negative; batch_all hinge the
#   triplets with a loss > 0, soft every triplet). row_weight (C,) fp32 and coef (C, B) fp32 come
#   together or not at all; coef is overwritten entirely. NaN as in reference/triplet.py: a NaN
#   negative is the farthest and every semi_hard pair's choice, a triplet with a NaN distance has a
#   NaN loss (no maximum or comparison may drop it).
# Per row the work is O(P_a B) (P_a its positives), visited in groups of column blocks that hold a
# positive; nothing is allocated per row and nothing waits for the host.

ROW_MININGS = (Mining.SEMI_HARD, Mining.BATCH_ALL)
ROW_PARAMS = ("int mining", "int distance", "float margin", "bool soft_margin", "bool normalize",
              "int? chunk_size", "int? max_class_size")


def _check_row_loss(gram, sq, inv_norm, labels, row0, mining, distance, margin, soft_margin, row_weight, loss, count,
                    coef):
    op = "triplet_row_loss"
    if gram.dim() != 2 or gram.dtype != F32 or not gram.is_contiguous():
        fail(op, f"gram must be a contiguous 2-D float32 tensor, got shape {tuple(gram.shape)}, dtype "
                 f"{gram.dtype} and strides {gram.stride()}")
    c, n = gram.shape
    require_tensor(op, "sq", sq, (n,), gram, F32)
    if inv_norm is not None:
        require_tensor(op, "inv_norm", inv_norm, (n,), gram, F32)
    require_tensor(op, "labels", labels, (n,), gram, I64)
    if not 0 <= row0 <= n - c:
        fail(op, f"row0 must be in [0, {n - c}] for {c} rows of {n}, got {row0}")
    require_choice(op, "mining", mining, ROW_MININGS)
    _check_distance(op, distance, inv_norm)
    require_tensor(op, "loss", loss, (c,), gram, F32)
    require_tensor(op, "count", count, (c,), gram, I64)
    if (row_weight is None) != (coef is None):
        fail(op, "row_weight and coef come together")
    if coef is not None:
        require_tensor(op, "row_weight", row_weight, (c,), gram, F32)
        if coef.shape != gram.shape or coef.dtype != F32 or not coef.is_contiguous() or coef.device != gram.device:
            fail(op, f"coef must be a contiguous float32 tensor shaped like gram {tuple(gram.shape)}, got shape "
                     f"{tuple(coef.shape)}, dtype {coef.dtype} on {coef.device}")


ROW_LOSS = KernelOp(
    "triplet_row_loss",
    "(Tensor gram, Tensor sq, Tensor? inv_norm, Tensor labels, int row0, int mining, int distance, float margin,"
    " bool soft_margin, Tensor? row_weight, Tensor(a!) loss, Tensor(b!) count, Tensor(c!)? coef) -> ()",
    check=_check_row_loss,
)
ROW_LOSS.implement_triton(lambda *args: _triton().triplet_row_loss(*args))


def _gram_into(out, a, b):
    """out = a @ b^T in fp32 for rows a, b of one dtype; half factors keep fp32 products where the device can."""
    if a.dtype == F32:
        torch.mm(a, b.t(), out=out)
    elif fp32_out_products(a.device, "mm"):
        torch.ops.aten.mm.dtype_out(a, b.t(), F32, out=out)
    else:  # e.g. the CPU: fp32 copies, which only the interpreter tests take
        torch.mm(a.to(F32), b.to(F32).t(), out=out)


# Half-precision rows meet their fp32 coefficients on the tensor cores, so the coefficients are rounded
# to the rows' dtype. 'mean' at a large batch makes them tiny (1 / count: about 1e-6 for semi_hard and
# 1e-11 for batch_all at B = 262144), below fp16's normal range (6e-5), where rounding loses their
# digits or flushes them to 0: a bias, as they are the many small ones. So each fp16 coefficient row is
# scaled by a power of two that puts its largest entry in [2^14, 2^15) first, and its fp32 product
# row is scaled back; both steps are exact. bf16 has fp32's range and needs neither.
HALF_TOP_EXPONENT = 15


def _row_powers(coef):
    """(C, 1) fp32 powers of two 2^k such that each row's largest |coefficient| times 2^k is in
    [2^14, 2^15) (2^15 for a zero row; k kept within fp32's range)."""
    _, exponent = torch.frexp(coef.abs().amax(1, keepdim=True))
    return torch.exp2((HALF_TOP_EXPONENT - exponent).clamp(-120, 120).to(F32))


def _operand(coef, rows):
    """(operand, power): the C x B coefficients as the product with half `rows` takes them, where the
    device multiplies half operands into fp32: bf16 rounded as they are (power None), fp16 each row times
    `power` (_row_powers) and rounded; elsewhere (fp32 rows, or no such product) coef itself, exact."""
    if rows.dtype == torch.bfloat16 and fp32_out_products(coef.device):
        return coef.to(rows.dtype), None
    if rows.dtype != F32 and fp32_out_products(coef.device, "mm"):
        power = _row_powers(coef)
        return torch.mul(coef, power, out=coef.new_empty(coef.shape, dtype=rows.dtype)), power  # (fp32 math)
    return coef, None


def _rounds_transposed(rows):
    """Whether the transposed product (onto all B rows) rounds its coefficients: bf16 rows, as they are;
    fp16 keeps fp32 operands (a cost of fp32 arithmetic, see bench/NOTES.md), as scaling the block's
    columns would need a B x D product buffer per chunk to undo it."""
    return rows.dtype == torch.bfloat16 and fp32_out_products(rows.device)


def _transposed_operand(coef, rows):
    """coef as the transposed product takes it (_rounds_transposed)."""
    return coef.to(rows.dtype) if _rounds_transposed(rows) else coef


def _held(operand, power, out):
    """The fp32 values a product operand stands for, into out (C x B fp32)."""
    return torch.div(operand, power, out=out) if power is not None else out.copy_(operand)


def _subtract_product(acc, operand, power, rows):
    """acc -= (operand / power) @ rows for fp32 acc, with (operand, power) from _operand."""
    if operand.dtype == F32:
        acc.addmm_(operand, rows if rows.dtype == F32 else rows.to(F32), alpha=-1)
    elif power is None:
        torch.ops.aten.addmm.dtype_out(acc, operand, rows, F32, alpha=-1, out=acc)
    else:
        product = torch.ops.aten.mm.dtype_out(operand, rows, F32, out=acc.new_empty(acc.shape))
        acc.addcdiv_(product, power, value=-1)


def _subtract_transposed_product(acc, operand, rows):
    """acc -= operand^T @ rows for fp32 acc (B rows), operand from _transposed_operand, rows (C x D)."""
    if operand.dtype == F32:
        acc.addmm_(operand.t(), rows if rows.dtype == F32 else rows.to(F32), alpha=-1)
    else:
        torch.ops.aten.addmm.dtype_out(acc, operand.t(), rows, F32, alpha=-1, out=acc)


def _squared_norms(x):
    """|x_j|^2 in fp32 as the reference sums them (a squared vector_norm is off by its square root's
    rounding, which breaks exact ties); half rows go through one fp32 copy (B x D, not B x B)."""
    wide = x if x.dtype == F32 else x.to(F32)
    return torch.linalg.vecdot(wide, wide)


class _RowChunks:
    """The chunk loop: Gram blocks of anchors [start, stop) into a reused buffer, and the row kernel."""

    def __init__(self, backend, tensors, params):
        self.x, self.labels, self.norm = tensors
        self.inv_norm = self.norm[0]
        self.backend = backend
        self.params = params
        n = self.x.shape[0]
        # one C x B fp32 block within the budget
        self.step = chunk_rows(n, 4 * n, params.chunk_size, input_bytes=self.x.nbytes)
        self.gram = self.x.new_empty((self.step, n), dtype=F32)
        self.sq = _squared_norms(self.x)
        self.kernel = ROW_LOSS[backend]

    def run(self, loss, count, row_weight=None, coef=None, on_chunk=None):
        """Each chunk's loss and count into loss, count; with row_weight (B,), its coef block to on_chunk."""
        n = self.x.shape[0]
        for start in range(0, n, self.step):
            stop = min(n, start + self.step)
            gram = self.gram[:stop - start]
            _gram_into(gram, self.x[start:stop], self.x)
            block = None if coef is None else coef[:stop - start]
            p = self.params
            self.kernel(gram, self.sq, self.inv_norm, self.labels, start, mining=p.mining, distance=p.distance,
                        margin=p.margin, soft_margin=p.soft_margin,
                        row_weight=None if row_weight is None else row_weight[start:stop], loss=loss[start:stop],
                        count=count[start:stop], coef=block)
            if on_chunk is not None:
                on_chunk(start, stop, block)


class _RowGradient:
    """Accumulates the gradient w.r.t. the rows v = inv_norm * x (fp32, B x D) from coef blocks:
    g[a] += sum_j coef[a, j] (v_a - v_j), g[j] += sum_a coef[a, j] (v_j - v_a) (euclidean forms), and
    the non-centered g[a] -= sum_j coef[a, j] v_j, g[j] -= sum_a coef[a, j] v_a for cosine."""

    def __init__(self, chunks):
        self.chunks = chunks
        self.centered = chunks.params.distance != Distance.COSINE
        self.g = torch.zeros(chunks.x.shape, device=chunks.x.device, dtype=F32)

    def add(self, start, stop, coef):
        x, inv = self.chunks.x, self.chunks.inv_norm
        x_c, g_c = x[start:stop], self.g[start:stop]
        inv_c = None if inv is None else inv[start:stop]
        buf = self.chunks.gram[:stop - start]  # the Gram block is free once the kernel has read it
        # Each side's centered term sum_j c_j (v_r - v_j) = (sum_j c_j) v_r - sum_j c_j v_j takes every c_j
        # as its product holds it (rounded to the rows' dtype): a close pair's large c_j, unrounded in the
        # sum, left its rounding times v_j in the row.
        # The anchors' side: (c_aj r_j) x_j in the product, (sum_j c_aj) r_a x_a beside it.
        own = coef if inv is None else torch.mul(coef, inv[None, :], out=buf)
        operand, power = _operand(own, x)
        rounded_cols = _rounds_transposed(x)
        if self.centered:
            if operand is own:  # exact products
                rows = coef.sum(1)
            else:
                held = _held(operand, power, buf)
                rows = held.sum(1) if inv is None else (held / inv[None, :]).sum(1)
            cols = None if rounded_cols else coef.sum(0)
            g_c.addcmul_(x_c, (rows if inv is None else rows * inv_c)[:, None])
        _subtract_product(g_c, operand, power, x)
        # The columns' side: (c_aj r_a) x_a in the product, (sum_a c_aj) r_j x_j beside it.
        if inv is not None:
            coef.mul_(inv_c[:, None])
        operand = _transposed_operand(coef, x)
        if self.centered:
            if rounded_cols:
                held = buf.copy_(operand)
                cols = held.sum(0) if inv is None else (held / inv_c[:, None]).sum(0)
            self.g.addcmul_(x, (cols if inv is None else cols * inv)[:, None])
        _subtract_transposed_product(self.g, operand, x_c)

    def write(self, grad_x):
        x, inv = self.chunks.x, self.chunks.inv_norm
        if inv is None:
            grad_x.copy_(self.g)
            return
        finish_normalised(self.chunks.backend, self.g.mul_(inv[:, None]), x, self.chunks.norm, grad_x)


def _rows_pass(backend, tensors, params, row_weight, grad_x):
    """Every anchor's loss and count; with row_weight, the gradient of sum(row_weight * loss) into grad_x."""
    chunks = _RowChunks(backend, tensors, params)
    n = chunks.x.shape[0]
    loss = torch.empty(n, device=chunks.x.device, dtype=F32)
    count = torch.empty(n, device=chunks.x.device, dtype=I64)
    if row_weight is None:
        chunks.run(loss, count)
        return loss, count
    sink = _RowGradient(chunks)
    coef = torch.empty_like(chunks.gram)
    chunks.run(loss, count, row_weight, coef, sink.add)
    sink.write(grad_x)
    return loss, count


# ---- semi_hard and batch_all from MMA tiles: anchors with at most POS_SLOTS positives -------------
#
# With small classes (the common P x K sampling) each anchor's positives fit a [B, POS_SLOTS] table
# (from the labels sorted once on the device), and the mining works as batch_hard's: a block of
# anchors walks every tile of x x^T, with its positives' distances in registers.
#
# triplet_pair_distances_<b>(x, inv_norm, first, second, distance, gram, exact) -> ()
#   x, inv_norm as triplet_mine's; first, second contiguous int64 of one shape (second -1: no pair,
#   both outputs 0); writes for each pair fp32 `gram`, the distance in the Gram form (as the mining
#   compares them), and `exact`, the distance from the rows' difference (as triplet_mine's epilogue; cosine
#   and non-finite: the Gram form).
# triplet_semi_hard_mine_<b>(x, labels, inv_norm, distance, n_pos, pos_dist, chosen, chosen_dist) -> ()
#   n_pos (B,) int64 each anchor's positives (at most S), pos_dist (B, S) fp32 their Gram-form
#   distances in slots 0 .. n_pos - 1; writes chosen (B, S) int64 per filled slot semi_hard's negative
#   (reference/triplet.py: the nearest farther than d_ap, ties to the smallest index, else the
#   farthest; a NaN negative is every slot's choice), -1 for an empty slot or an anchor without a
#   negative, and chosen_dist (B, S) fp32 its Gram-form distance (0 where -1). CUDA: x of at most
#   cuda_tile_width(device, x.dtype) features only (S = POS_SLOTS), else ValueError naming x.
# triplet_batch_all_rows_<b>(x, labels, inv_norm, distance, margin, soft_margin, n_pos, pos_dist, row_weight,
#                           loss, count, pos_slope, grad_rows) -> ()
#   n_pos, pos_dist as above (pos_dist: the exact distances); writes loss (B,) fp32 each anchor's sum
#   over its (positive, negative) triplets (d_an in the Gram form), count (B,) int64 its triplets with a
#   loss > 0 (hinge; 0 with soft_margin), pos_slope (B, S) fp32 per slot the sum over the anchor's
#   negatives of d loss / d d_ap (0 in empty slots). row_weight (B,) fp32 and grad_rows (B, D) fp32 come
#   together or not at all: grad_rows is then the gradient w.r.t. the rows v = inv_norm * x of
#   sum(row_weight * loss) through the negative pairs' distances, each pair seen from both its anchors
#   (the column's positives from pos_dist), summed per row in one program. CUDA: x of at most
#   cuda_batch_all_width(device, x.dtype) features only (S = POS_SLOTS), else ValueError naming x.
# triplet_list_grad_<b>(x, inv_norm, grad_rows, offsets, others, coef, centered, grad_x) -> ()
#   grad_rows None or (B, D) fp32; offsets (B + 1,) int64, non-decreasing, offsets[B] <= len(others): row
#   r's list is entries offsets[r] .. offsets[r + 1] - 1 of others (int64, a row index; -1: skipped) and
#   coef (fp32, of others' length). With g_r = grad_rows[r] (0 without) + the sum over r's list, in order,
#   of coef * (centered * v_r - v_other) in fp32, writes grad_x[r] = inv_norm[r] * g_r (g_r without
#   inv_norm) in x's dtype, fp32 with inv_norm (as triplet_pair_grad's). Deterministic.
#
# Both backends take this path for both minings, CUDA for rows as wide as its tiles take
# (_takes_register_path).
POS_SLOTS = 16  # positives per anchor (class size - 1) the register path takes


def _check_pair_distances(x, inv_norm, first, second, distance, gram, exact):
    op = "triplet_pair_distances"
    _check_rows(op, x, inv_norm)
    _check_distance(op, distance, inv_norm)
    for name, t, dtype in (("first", first, I64), ("second", second, I64), ("gram", gram, F32), ("exact", exact, F32)):
        require_tensor(op, name, t, tuple(first.shape), x, dtype)


def _check_slot_inputs(op, x, labels, inv_norm, distance, n_pos, pos_dist):
    """The register-path mining ops' shared inputs; (B, slots)."""
    _check_rows(op, x, inv_norm)
    _check_distance(op, distance, inv_norm)
    n = x.shape[0]
    require_tensor(op, "labels", labels, (n,), x, I64)
    require_tensor(op, "n_pos", n_pos, (n,), x, I64)
    slots = pos_dist.shape[-1] if pos_dist.dim() == 2 else -1
    require_tensor(op, "pos_dist", pos_dist, (n, slots), x, F32)
    return n, slots


def _check_semi_hard_mine(x, labels, inv_norm, distance, n_pos, pos_dist, chosen, chosen_dist):
    op = "triplet_semi_hard_mine"
    n, slots = _check_slot_inputs(op, x, labels, inv_norm, distance, n_pos, pos_dist)
    for name, t, dtype in (("chosen", chosen, I64), ("chosen_dist", chosen_dist, F32)):
        require_tensor(op, name, t, (n, slots), x, dtype)


PAIR_DISTANCES = KernelOp(
    "triplet_pair_distances",
    "(Tensor x, Tensor? inv_norm, Tensor first, Tensor second, int distance, Tensor(a!) gram, Tensor(b!) exact) -> ()",
    check=_check_pair_distances,
)
SEMI_HARD_MINE = KernelOp(
    "triplet_semi_hard_mine",
    "(Tensor x, Tensor labels, Tensor? inv_norm, int distance, Tensor n_pos, Tensor pos_dist, Tensor(a!) chosen,"
    " Tensor(b!) chosen_dist) -> ()",
    check=_check_semi_hard_mine,
)


def _check_batch_all_rows(x, labels, inv_norm, distance, margin, soft_margin, n_pos, pos_dist, row_weight, loss,
                          count, pos_slope, grad_rows):
    op = "triplet_batch_all_rows"
    n, slots = _check_slot_inputs(op, x, labels, inv_norm, distance, n_pos, pos_dist)
    require_tensor(op, "loss", loss, (n,), x, F32)
    require_tensor(op, "count", count, (n,), x, I64)
    require_tensor(op, "pos_slope", pos_slope, (n, slots), x, F32)
    if (row_weight is None) != (grad_rows is None):
        fail(op, "row_weight and grad_rows come together")
    if row_weight is not None:
        require_tensor(op, "row_weight", row_weight, (n,), x, F32)
        require_tensor(op, "grad_rows", grad_rows, tuple(x.shape), x, F32)


def _check_list_grad(x, inv_norm, grad_rows, offsets, others, coef, centered, grad_x):
    op = "triplet_list_grad"
    _check_rows(op, x, inv_norm)
    if grad_rows is not None:
        require_tensor(op, "grad_rows", grad_rows, tuple(x.shape), x, F32)
    require_tensor(op, "offsets", offsets, (x.shape[0] + 1,), x, I64)
    entries = others.shape[0] if others.dim() == 1 else -1
    require_tensor(op, "others", others, (entries,), x, I64)
    require_tensor(op, "coef", coef, (entries,), x, F32)
    _check_grad_x(op, x, inv_norm, grad_x)
    if _checks.eager_value_checks(offsets) and offsets.numel() > 1:  # they index others: where reading is free
        if bool((offsets[1:] < offsets[:-1]).any()) or int(offsets[0]) < 0 or int(offsets[-1]) > entries:
            fail(op, f"offsets must be non-decreasing within [0, {entries}]")


BATCH_ALL_ROWS = KernelOp(
    "triplet_batch_all_rows",
    "(Tensor x, Tensor labels, Tensor? inv_norm, int distance, float margin, bool soft_margin, Tensor n_pos,"
    " Tensor pos_dist, Tensor? row_weight, Tensor(a!) loss, Tensor(b!) count, Tensor(c!) pos_slope,"
    " Tensor(d!)? grad_rows) -> ()",
    check=_check_batch_all_rows,
)
LIST_GRAD = KernelOp(
    "triplet_list_grad",
    "(Tensor x, Tensor? inv_norm, Tensor? grad_rows, Tensor offsets, Tensor others, Tensor coef, bool centered,"
    " Tensor(a!) grad_x) -> ()",
    check=_check_list_grad,
)
PAIR_DISTANCES.implement_triton(lambda *args: _triton().triplet_pair_distances(*args))
BATCH_ALL_ROWS.implement_triton(lambda *args: _triton().triplet_batch_all_rows(*args))
LIST_GRAD.implement_triton(lambda *args: _triton().triplet_list_grad(*args))
SEMI_HARD_MINE.implement_triton(lambda *args: _triton().triplet_semi_hard_mine(*args))


def _largest_class_fits(labels: torch.Tensor, promised: int | None) -> bool:
    """Whether every class has at most POS_SLOTS + 1 rows: promised by the caller (max_class_size),
    or known without a host sync (a batch that small, or labels whose values may be read:
    _checks.eager_value_checks). Elsewhere the chunked path runs."""
    if promised is not None and promised <= POS_SLOTS + 1:
        return True
    n = labels.shape[0]
    if n <= POS_SLOTS + 1:
        return True
    if not _checks.eager_value_checks(labels):
        return False
    return int(class_sizes(labels).max()) <= POS_SLOTS + 1


def positive_slots(labels: torch.Tensor, slots: int):
    """(B, slots) int64: each row's positives in increasing row order, -1 after the last; (B,) int64
    how many (its class size - 1, clamped to `slots`); (B,) int64 each row's rank in its class (so row
    r sits in slot rank_r - (rank_r > rank_q) of its positive q); and a 0-dim fp32 that is NaN when a
    class has more than slots + 1 rows (a broken max_class_size promise: the losses and gradients it
    is added to are NaN, never silently wrong), else 0. One stable sort, no host sync."""
    n = labels.shape[0]
    sorted_labels, members = torch.sort(labels, stable=True)  # a class's rows are contiguous, in row order
    start = torch.searchsorted(sorted_labels, labels)
    n_pos = torch.searchsorted(sorted_labels, labels, right=True) - start - 1
    place = torch.empty_like(members).scatter_(0, members, torch.arange(n, device=labels.device))
    k = torch.arange(slots, device=labels.device)
    after_self = (k[None, :] >= (place - start)[:, None]).to(I64)  # skip the row itself in its class
    member = (start[:, None] + k[None, :] + after_self).clamp(max=max(n - 1, 0))
    too_large = torch.where((n_pos > slots).any(), math.nan, 0.0).to(F32)
    return torch.where(k[None, :] < n_pos[:, None], members[member], -1), n_pos.clamp(max=slots), place - start, \
        too_large


def _anchor_terms(mined, margin, soft_margin):
    """Per triplet: loss (0 when left out), d loss / d d_ap (= -d loss / d d_an) and which count."""
    pos_index, pos_dist, neg_index, neg_dist = mined
    kept = (pos_index >= 0) & (neg_index >= 0)
    gap = pos_dist - neg_dist
    if soft_margin:
        loss, slope = F.softplus(gap), torch.sigmoid(gap)
    else:
        loss = F.relu(gap + margin)
        slope = (loss > 0).to(F32)  # relu's derivative at 0 is 0, as autograd has it
    return torch.where(kept, loss, 0.0), slope, kept


def _distance_coef(dist, weight, distance):
    """coef of a pair's entries: the distance's derivative w.r.t. its squared form (cosine: 1), times weight."""
    if distance == Distance.EUCLIDEAN:
        return torch.where(dist > CLAMPED_EUCLIDEAN, weight / dist, 0.0)
    if distance == Distance.SQUARED_EUCLIDEAN:
        return torch.where(dist > 0, 2.0 * weight, 0.0)
    return weight


def _nan_if_non_finite(x):
    """0, or NaN if x holds a NaN or inf: then, as in the reference (whose Gram-form backward multiplies
    every row by every other), every row's gradient is NaN, not only the rows of the mined pairs."""
    if x.numel() == 0:  # (the inf-norm has no identity)
        return torch.zeros((), device=x.device, dtype=F32)
    return torch.linalg.vector_norm(x, float("inf"), dtype=F32) * 0.0  # (inf * 0 and NaN * 0 are NaN)


def _pair_distances(backend, x, inv_norm, first, second, distance):
    gram = torch.empty(second.shape, device=x.device, dtype=F32)
    exact = torch.empty_like(gram)
    PAIR_DISTANCES[backend](x, inv_norm, first, second, distance, gram, exact)
    return gram, exact


def _semi_hard_triplets(backend, x, labels, inv_norm, distance):
    """Per (anchor, slot): (positive, its exact distance, chosen negative, its exact distance), -1 where
    none; and positive_slots' NaN flag."""
    pos, n_pos, _, too_large = positive_slots(labels, POS_SLOTS)
    anchors = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(pos).contiguous()
    pos_gram, pos_exact = _pair_distances(backend, x, inv_norm, anchors, pos, distance)
    chosen = torch.empty_like(pos)
    chosen_gram = torch.empty_like(pos_gram)
    SEMI_HARD_MINE[backend](x, labels, inv_norm, distance, n_pos, pos_gram, chosen, chosen_gram)
    _, neg_exact = _pair_distances(backend, x, inv_norm, anchors, chosen, distance)
    return anchors, (pos, pos_exact, chosen, neg_exact), too_large


def _slot_gradient(backend, x, norm, anchors, mined, weight, distance, grad_x, poison):
    """grad_x: the gradient of sum(weight * (d_ap - d_an)) over the (anchor, slot) triplets: each pair
    listed under both its rows (and every row once with coefficient 0 + poison, which carries the NaN of
    a non-finite input to every row, as the reference has it), stably sorted by row."""
    pos, pos_dist, neg, neg_dist = mined
    n = x.shape[0]
    kept = (pos >= 0) & (neg >= 0)
    c_pos = _distance_coef(pos_dist, weight, distance)
    c_neg = _distance_coef(neg_dist, -weight, distance)
    own = torch.arange(n, device=x.device)

    def listed(rows):  # pairs of a left-out triplet sort last, past offsets[n]
        return torch.where(kept, rows, n).reshape(-1)

    keys = torch.cat([listed(anchors), listed(pos), listed(anchors), listed(neg), own])
    rows, order = torch.sort(keys, stable=True)
    others = torch.cat([pos.reshape(-1), anchors.reshape(-1), neg.reshape(-1), anchors.reshape(-1), own])
    coef = torch.cat([c_pos.reshape(-1), c_pos.reshape(-1), c_neg.reshape(-1), c_neg.reshape(-1),
                      torch.zeros(n, device=x.device, dtype=F32)])
    others = others.clamp_min(0)[order]
    coef = coef[order] + poison
    offsets = torch.searchsorted(rows, torch.arange(n + 1, device=x.device))

    def write(inv_norm, out):
        LIST_GRAD[backend](x, inv_norm, None, offsets, others, coef, centered=distance != Distance.COSINE,
                           grad_x=out)

    _normalised_gradient(backend, x, norm, grad_x, write)


def _semi_hard_register_pass(backend, tensors, params, row_weight, grad_x):
    x, labels, norm = tensors
    anchors, mined, too_large = _semi_hard_triplets(backend, x, labels, norm[0], params.distance)
    loss, slope, kept = _anchor_terms(mined, params.margin, params.soft_margin)
    if row_weight is not None:
        weight = torch.where(kept, slope * row_weight[:, None], 0.0)
        _slot_gradient(backend, x, norm, anchors, mined, weight, params.distance, grad_x,
                       _nan_if_non_finite(x) + too_large)
    return loss.sum(1) + too_large


def _batch_all_rows(backend, tensors, params, row_weight):
    """batch_all's per-anchor losses (NaN where positive_slots flags too large a class) and counts, the
    positive slots and their slopes, and with row_weight the negative pairs' share of the gradient
    (w.r.t. the rows v, fp32)."""
    x, labels, (inv_norm, _) = tensors
    n = x.shape[0]
    pos, n_pos, rank, too_large = positive_slots(labels, POS_SLOTS)
    anchors = torch.arange(n, device=x.device)[:, None].expand_as(pos).contiguous()
    _, pos_dist = _pair_distances(backend, x, inv_norm, anchors, pos, params.distance)
    loss = torch.empty(n, device=x.device, dtype=F32)
    count = torch.empty(n, device=x.device, dtype=I64)
    slope = torch.empty_like(pos_dist)
    grad_rows = None if row_weight is None else torch.empty(x.shape, device=x.device, dtype=F32)
    BATCH_ALL_ROWS[backend](x, labels, inv_norm, params.distance, params.margin, params.soft_margin, n_pos, pos_dist,
                            row_weight, loss, count, slope, grad_rows)
    return loss + too_large, count, (pos, rank, pos_dist, slope, too_large), grad_rows


def _batch_all_slot_gradient(backend, tensors, params, slots, row_weight, grad_rows, grad_x):
    """grad_x: grad_rows (the negative pairs' share) plus the positive pairs', each pair's coefficient
    from both its anchors (r's slot s holds q, r sits in q's slot `mirror`), through the list kernel."""
    pos, rank, pos_dist, slope, too_large = slots
    x, distance = tensors[0], params.distance
    own = _distance_coef(pos_dist, slope * row_weight[:, None], distance)
    q = pos.clamp_min(0)
    mirror = rank[:, None] - (rank[:, None] > rank[q]).to(I64)
    coef = torch.where(pos >= 0, own + own[q, mirror.clamp(0, pos.shape[1] - 1)], 0.0)
    coef = coef + (_nan_if_non_finite(x) + too_large)
    offsets = torch.arange(0, pos.numel() + 1, pos.shape[1], device=x.device)  # the slots as lists

    def write(inv_norm, out):
        LIST_GRAD[backend](x, inv_norm, grad_rows, offsets, pos.reshape(-1), coef.reshape(-1),
                           centered=distance != Distance.COSINE, grad_x=out)

    _normalised_gradient(backend, x, tensors[2], grad_x, write)


def _batch_all_register_pass(backend, tensors, params, row_weight, grad_x):
    loss, _, slots, grad_rows = _batch_all_rows(backend, tensors, params, row_weight)
    if row_weight is not None:
        _batch_all_slot_gradient(backend, tensors, params, slots, row_weight, grad_rows, grad_x)
    return loss


def _rows_counted_mean(backend, tensors, params, grads):
    """Hinge batch_all 'mean' on the register path: its divisor (the triplets with a loss > 0) counted by
    the pass that computes the loss and gradient, run at unit weights, instead of a counting pass (one
    product fewer). The gradient's fp32 rows and the slot coefficients are divided before the list
    kernel rounds them to x's dtype, as the weighted pass would give them. None elsewhere."""
    if params.mining != Mining.BATCH_ALL or params.soft_margin or not _takes_register_path(backend, tensors, params):
        return None
    tensors = _with_norm(backend, tensors, params)
    n = tensors[0].shape[0]
    loss, count, slots, grad_rows = _batch_all_rows(backend, tensors, params,
                                                    torch.ones(n, device=tensors[0].device, dtype=F32))
    divisor = count.sum(dtype=F32).clamp_min(1.0)
    factor = torch.reciprocal(divisor)
    grad_rows.mul_(factor)
    _batch_all_slot_gradient(backend, tensors, params, slots, factor.expand(n), grad_rows, grads[0])
    return loss.sum(), divisor


def _register_pass(backend, tensors, params, row_weight, grad_x):
    """Every anchor's loss; with row_weight, the gradient of sum(row_weight * loss) into grad_x."""
    if params.mining == Mining.SEMI_HARD:
        return _semi_hard_register_pass(backend, tensors, params, row_weight, grad_x)
    return _batch_all_register_pass(backend, tensors, params, row_weight, grad_x)


# CUDA's tiled mining keeps a block's 64 anchors in shared memory (csrc/triplet.cu max_tile_width): a
# 4-byte word per pair of bf16/fp16 features (per fp32 feature) per anchor in 32-word slabs, plus 4
# words of padding per row, beside static shared memory (11 KiB, and 4 KiB more for fp32: semi_hard's
# slot thresholds; triplet.cuh mine_tiles_static_smem) and the 1 KiB the system reserves per block.
_TILE_ANCHORS, _TILE_STATIC_SMEM, _RESERVED_SMEM = 64, {2: 11264, 1: 15360}, 1024  # by elements per word
_EMULATED_SMEM_OPTIN = 232448  # the CUDA emulation's device: an H100


def _smem_optin(device: torch.device) -> int:
    return (torch.cuda.get_device_properties(device).shared_memory_per_block_optin if device.type == "cuda"
            else _EMULATED_SMEM_OPTIN)


def cuda_tile_width(device: torch.device, dtype: torch.dtype) -> int:
    """The widest rows of `dtype` CUDA's tiled mining takes on `device` (on an H100: 1664 bf16/fp16,
    832 fp32)."""
    per_word = 4 // dtype.itemsize
    words = (_smem_optin(device) - _RESERVED_SMEM - _TILE_STATIC_SMEM[per_word]) // (_TILE_ANCHORS * 4) - 4
    return max(0, words // 32 * 32 * per_word)


# CUDA's batch_all tiles (csrc/triplet.cuh batch_all_tiles_smem, triplet.cu max_batch_all_width): 32
# anchors and a 64-row tile staged as the mining's anchors are, and a 32 x D fp32 accumulator whose rows
# are padded to 16 features + 8, beside static shared memory: 11.6 KiB, and 4 KiB more for fp32 (the
# coefficients' words, one per element).
_ALL_ANCHORS, _ALL_STATIC_SMEM = 32, {2: 11904, 1: 16000}  # by elements per 32-bit word


def cuda_batch_all_width(device: torch.device, dtype: torch.dtype) -> int:
    """The widest rows of `dtype` CUDA's batch_all tiles take on `device` (a multiple of 16; on an H100
    640 bf16/fp16, 400 fp32)."""
    per_word = 4 // dtype.itemsize

    def smem(d):
        slab = 32 * per_word
        staged = (_ALL_ANCHORS + 64) * (max(1, -(-d // slab)) * 32 + 4)
        return 4 * (staged + _ALL_ANCHORS * (-(-d // 16) * 16 + 8))

    room, d = _smem_optin(device) - _RESERVED_SMEM - _ALL_STATIC_SMEM[per_word], 0
    while smem(d + 16) <= room:
        d += 16
    return d


def _takes_register_path(backend, tensors, params):
    """Triton: every minings' register path. CUDA: rows of the widths its tiles take."""
    x = tensors[0]
    if backend == "cuda":
        if params.mining == Mining.SEMI_HARD:
            width = cuda_tile_width(x.device, x.dtype)
        else:
            width = cuda_batch_all_width(x.device, x.dtype)
        if x.shape[1] > width:
            return False
    return _largest_class_fits(tensors[1], params.max_class_size)


def _with_norm(backend, tensors, params):
    """The spec's (embeddings, labels) as the passes take them: (x, labels, row_norm_factors)."""
    x, labels = tensors
    return x, labels, row_norm_factors(backend, x, params.distance, params.normalize)


def _rows_forward(backend, tensors, params, grads, grad_factor, reduce):
    tensors = _with_norm(backend, tensors, params)
    weight, grad_x = (None, None) if grads is None else (grad_factor_rows(grad_factor, tensors[0].shape[0]), grads[0])
    if _takes_register_path(backend, tensors, params):
        loss = _register_pass(backend, tensors, params, weight, grad_x)
    else:
        loss, _ = _rows_pass(backend, tensors, params, weight, grad_x)
    return (loss.sum() if reduce else loss), ()


def _rows_backward(backend, grad_rows, tensors, saved, params, grads):
    tensors = _with_norm(backend, tensors, params)
    weight = grad_rows.reshape(-1).to(F32).contiguous()
    if _takes_register_path(backend, tensors, params):
        _register_pass(backend, tensors, params, weight, grads[0])
    else:
        _rows_pass(backend, tensors, params, weight, grads[0])


def _rows_mean_divisor(backend, tensors, params):
    """semi_hard: the (anchor, positive) pairs whose anchor has a negative; batch_all soft: every triplet,
    both from the class sizes; batch_all hinge: the non-zero triplets, which need a counting pass (one
    more Gram product) since the gradient's factor is needed before the loss pass (on the register
    path a fused gradient is counted in its own pass instead: _rows_counted_mean)."""
    labels = tensors[1]
    n = labels.shape[0]
    mining, soft_margin = params.mining, params.soft_margin
    if mining == Mining.BATCH_ALL and not soft_margin:
        tensors = _with_norm(backend, tensors, params)
        with torch.no_grad():
            if _takes_register_path(backend, tensors, params):
                _, count, _, _ = _batch_all_rows(backend, tensors, params, None)
            else:
                _, count = _rows_pass(backend, tensors, params, None, None)
        return count.sum(dtype=F32).clamp_min(1.0)
    pairs = class_sizes(labels) - 1
    if mining == Mining.SEMI_HARD:
        return torch.where(pairs + 1 < n, pairs, 0).sum(dtype=F32)
    return (pairs * (n - 1 - pairs)).sum(dtype=F32).clamp_min(1.0)


def _rows_fake(tensors, params):
    """The rows op's fake, written out: the forward's chunk loop would fix the sizes of a dynamic shape."""
    return (tensors[0].new_empty(tensors[0].shape[0], dtype=F32),)


ROWS_SPEC = FusedLoss(
    name="triplet_mined",
    tensors=("embeddings", "labels"),
    params=ROW_PARAMS,
    differentiable=("embeddings",),
    n_saved=0,
    forward=_rows_forward,
    backward=_rows_backward,
    mean_divisor=_rows_mean_divisor,
    counted_mean=_rows_counted_mean,
    rows_fake=_rows_fake,
)
triplet_mined_kernels = build(ROWS_SPEC)
