"""Kernel ops of the triplet loss and their specs (semantics: reference/triplet.py): batch_hard here,
semi_hard and batch_all in the second half of this file.

The B x B distances never reach device memory: a mining kernel keeps, per anchor, a running
farthest positive and nearest negative over tiles of the Gram matrix and, in its epilogue, takes
the two mined distances again from the rows' differences and writes the anchor's loss and slope;
a pair-gradient kernel turns the 2B mined (anchor, other) pairs into the embeddings' gradient.
Nothing per anchor runs in torch between them: a 'mean' 'fwd+bwd' is 9 launches (the kept-anchor
count and its sum, the builder's reciprocal, the mining, the pair gradient, the loss's sum and
division; autograd's ones_like and the rescale).

Normalisation (normalize=True, and always for cosine) enters as a per-row fp32 inverse norm
inv_norm (the rows are v = inv_norm * x, inv_norm = 1 / max(|x|, 1e-12), computed by torch with
autograd): the kernels see x in its own dtype and inv_norm, and differentiate both, so torch's
autograd carries inv_norm's share back to x.

The options travel as the values of reference/triplet.py's enums: `distance` a Distance (EUCLIDEAN 0,
SQUARED_EUCLIDEAN 1, COSINE 2), `mining` a Mining (BATCH_HARD 0, SEMI_HARD 1, BATCH_ALL 2); the public
layer turns the public names ('cosine', 'semi_hard') into them once, and any other int is refused.

Kernel contract, the same for the Triton and the CUDA implementation (B rows, D features):

triplet_kept_<b>(labels, kept) -> ()
  labels (B,) contiguous int64; writes kept (B,) fp32: 1 where the anchor has a positive and a
  negative (its class has 2 to B - 1 members), else 0. Integer work only: exact and deterministic.
triplet_mine_<b>(x, labels, inv_norm, distance, margin, soft_margin, pos_index, pos_dist, neg_index,
                 neg_dist, loss, slope) -> ()
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
triplet_pair_grad_<b>(x, inv_norm, pos_index, pos_dist, neg_index, neg_dist, slope, weight, distance,
                      grad_x, grad_inv_norm) -> ()
  x, inv_norm, distance as above; pos_index .. slope as the mining wrote them; weight fp32, () (every
  anchor's) or (B,) (per anchor). The gradient of sum over kept anchors a of w_a (d_ap - d_an), with
  w_a = slope[a] * weight[a]: each pair (a, o) of coefficient c (d distance / d its squared form times
  +-w_a: euclidean w / d, 0 at d <= 1.000001e-6 (the clamp); squared 2 w, 0 at 0; cosine w; plus NaN
  when slope[a] is NaN) adds c (v_r - v_other) (cosine: -c v_other) to g_r of both its rows. Row r
  sums, in fp32 and in this order, its own two pairs, then the pairs of the anchors that chose it,
  by anchor (deterministic, no atomics). Writes grad_x[r] = inv_norm[r] * g_r (g_r without inv_norm)
  in x's dtype and grad_inv_norm[r] = x_r . g_r (fp32, (B,)); either output may be None.
"""
from __future__ import annotations

import torch

from ..reference import triplet as ref
from ..reference.triplet import Distance, Mining
from ._chunks import chunk_rows, fp32_out_products
from ._labels import class_sizes
from .._backends import runs_on, usable
from ._contracts import F32, KERNEL_DTYPES, fail, require_choice, require_tensor
from ._library import KernelOp
from .builder import FusedLoss, build, grad_factor_rows

I64 = torch.int64
PARAMS = ("int distance", "float margin", "bool soft_margin")
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
                slope):
    op = "triplet_mine"
    _check_rows(op, x, inv_norm)
    _check_distance(op, distance, inv_norm)
    n = x.shape[0]
    require_tensor(op, "labels", labels, (n,), x, I64)
    _check_mined(op, x, (pos_index, pos_dist, neg_index, neg_dist))
    require_tensor(op, "loss", loss, (n,), x, F32)
    require_tensor(op, "slope", slope, (n,), x, F32)


def _check_pair_grad(x, inv_norm, pos_index, pos_dist, neg_index, neg_dist, slope, weight, distance, grad_x,
                     grad_inv_norm):
    op = "triplet_pair_grad"
    _check_rows(op, x, inv_norm)
    _check_distance(op, distance, inv_norm)
    n = x.shape[0]
    _check_mined(op, x, (pos_index, pos_dist, neg_index, neg_dist))
    require_tensor(op, "slope", slope, (n,), x, F32)
    require_tensor(op, "weight", weight, () if weight.dim() == 0 else (n,), x, F32)
    if grad_x is not None and (grad_x.shape != x.shape or grad_x.dtype != x.dtype or not grad_x.is_contiguous()
                               or grad_x.device != x.device):
        fail(op, f"grad_x must be contiguous like x {tuple(x.shape)} {x.dtype} on {x.device}, got shape "
                 f"{tuple(grad_x.shape)}, dtype {grad_x.dtype} on {grad_x.device}")
    if grad_inv_norm is not None:
        if inv_norm is None:
            fail(op, "grad_inv_norm needs inv_norm")
        require_tensor(op, "grad_inv_norm", grad_inv_norm, (n,), x, F32)


KEPT = KernelOp("triplet_kept", "(Tensor labels, Tensor(a!) kept) -> ()", check=_check_kept)
MINE = KernelOp(
    "triplet_mine",
    "(Tensor x, Tensor labels, Tensor? inv_norm, int distance, float margin, bool soft_margin, Tensor(a!) pos_index,"
    " Tensor(b!) pos_dist, Tensor(c!) neg_index, Tensor(d!) neg_dist, Tensor(e!) loss, Tensor(f!) slope) -> ()",
    check=_check_mine,
)
PAIR_GRAD = KernelOp(
    "triplet_pair_grad",
    "(Tensor x, Tensor? inv_norm, Tensor pos_index, Tensor pos_dist, Tensor neg_index, Tensor neg_dist,"
    " Tensor slope, Tensor weight, int distance, Tensor(a!)? grad_x, Tensor(b!)? grad_inv_norm) -> ()",
    check=_check_pair_grad,
)


def _triton():
    from ..triton_kernels import triplet as kernels  # Triton is optional: loaded at the first Triton call

    return kernels


KEPT.implement_triton(lambda *args: _triton().triplet_kept(*args))
MINE.implement_triton(lambda *args: _triton().triplet_mine(*args))
PAIR_GRAD.implement_triton(lambda *args: _triton().triplet_pair_grad(*args))


# ---- torch around the kernels: no per-anchor work, no host sync ------------------------------

def row_inv_norm(x: torch.Tensor, distance: int, normalize: bool) -> torch.Tensor | None:
    """The fp32 per-row inverse norm the kernels apply (None: rows as they are), differentiable in x."""
    cosine = distance == Distance.COSINE
    if not cosine and not normalize:
        return None
    norm = torch.linalg.vector_norm(x, dim=1, dtype=F32)
    inv_norm = 1.0 / norm.clamp_min(ref.NORM_EPS)
    if cosine and normalize:  # the reference normalises the normalised rows again
        inv_norm = inv_norm / (norm * inv_norm).clamp_min(ref.NORM_EPS)
    return inv_norm


def _kept_count(backend, labels):
    """'mean''s divisor: the anchors with a positive and a negative (fp32, 0-dim; two launches, no sort)."""
    kept = labels.new_empty(labels.shape, dtype=F32)
    KEPT[backend](labels, kept)
    return kept.sum()


def _mine(backend, x, labels, inv_norm, distance, margin=0.0, soft_margin=False):
    """(pos_index, pos_dist, neg_index, neg_dist, loss, slope) of the mining op's contract."""
    n = x.shape[0]
    out = tuple(torch.empty(n, device=x.device, dtype=dtype) for dtype in (I64, F32, I64, F32, F32, F32))
    MINE[backend](x, labels, inv_norm, distance=distance, margin=margin, soft_margin=soft_margin, pos_index=out[0],
                  pos_dist=out[1], neg_index=out[2], neg_dist=out[3], loss=out[4], slope=out[5])
    return out


def _pair_gradient(backend, x, inv_norm, saved, weight, distance, grads):
    """grads (x's, inv_norm's) of sum(weight * slope * (d_ap - d_an)) over the kept anchors."""
    grad_x, grad_inv_norm = grads
    PAIR_GRAD[backend](x, inv_norm, *saved, weight=weight, distance=distance, grad_x=grad_x,
                       grad_inv_norm=grad_inv_norm)


def _forward(backend, tensors, params, grads, grad_factor, reduce):
    x, labels, inv_norm = tensors
    *mined, loss, slope = _mine(backend, x, labels, inv_norm, params.distance, params.margin, params.soft_margin)
    saved = (*mined, slope)
    if grads is not None:  # 'mean' of nothing: the factor is inf, every weight 0 (no anchor is kept)
        _pair_gradient(backend, x, inv_norm, saved, grad_factor, params.distance, grads)
    return (loss.sum() if reduce else loss), saved


def _backward(backend, grad_rows, tensors, saved, params, grads):
    x, _, inv_norm = tensors
    _pair_gradient(backend, x, inv_norm, saved, grad_rows.to(F32).contiguous(), params.distance, grads)


SPEC = FusedLoss(
    name="triplet",
    tensors=("embeddings", "labels", "inv_norm?"),
    params=PARAMS,
    differentiable=("embeddings", "inv_norm"),
    n_saved=5,
    forward=_forward,
    backward=_backward,
    mean_divisor=lambda tensors, params: _kept_count(counting_backend(tensors[1].device), tensors[1]),
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
ROW_PARAMS = ("int mining", "int distance", "float margin", "bool soft_margin", "int? chunk_size")


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


def _subtract_product(acc, coef, rows):
    """acc -= coef @ rows for fp32 acc and coef (C rows), where the device has fp32-output products
    (elsewhere, as in the interpreter tests, fp32 copies of the rows): bf16 (fp32's range) takes the
    coefficients rounded as they are; fp16 scaled coefficient rows, an fp32 product (C x D) and the rows
    scaled back."""
    if rows.dtype == F32:
        acc.addmm_(coef, rows, alpha=-1)
    elif rows.dtype == torch.bfloat16 and fp32_out_products(acc.device):
        torch.ops.aten.addmm.dtype_out(acc, coef.to(rows.dtype), rows, F32, alpha=-1, out=acc)
    elif fp32_out_products(acc.device, "mm"):
        power = _row_powers(coef)
        rounded = torch.mul(coef, power, out=coef.new_empty(coef.shape, dtype=rows.dtype))  # (fp32 math)
        product = torch.ops.aten.mm.dtype_out(rounded, rows, F32, out=acc.new_empty(acc.shape))
        acc.addcdiv_(product, power, value=-1)
    else:
        acc.addmm_(coef, rows.to(F32), alpha=-1)


def _subtract_transposed_product(acc, coef, rows):
    """acc -= coef^T @ rows for fp32 acc (B rows) and coef (C x B), rows (C x D). bf16 has fp32's range:
    its coefficients are rounded as they are. fp16 takes fp32 operands (a cost of fp32 arithmetic,
    see bench/NOTES.md), as scaling the C x B block's columns would need a B x D product buffer per
    chunk to undo it."""
    if rows.dtype == torch.bfloat16 and fp32_out_products(acc.device):
        torch.ops.aten.addmm.dtype_out(acc, coef.t().to(rows.dtype), rows, F32, alpha=-1, out=acc)
    else:
        acc.addmm_(coef.t(), rows if rows.dtype == F32 else rows.to(F32), alpha=-1)


def _squared_norms(x):
    """|x_j|^2 in fp32 as the reference sums them (a squared vector_norm is off by its square root's
    rounding, which breaks exact ties); half rows go through one fp32 copy (B x D, not B x B)."""
    wide = x if x.dtype == F32 else x.to(F32)
    return torch.linalg.vecdot(wide, wide)


class _RowChunks:
    """The chunk loop: Gram blocks of anchors [start, stop) into a reused buffer, and the row kernel."""

    def __init__(self, backend, tensors, params):
        self.x, self.labels, self.inv_norm = tensors
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
        if self.centered:
            rows, cols = coef.sum(1), coef.sum(0)
            if inv is not None:
                rows, cols = rows * inv[start:stop], cols * inv
            g_c.addcmul_(x_c, rows[:, None])
            self.g.addcmul_(x, cols[:, None])
        if inv is None:
            _subtract_product(g_c, coef, x)
            _subtract_transposed_product(self.g, coef, x_c)
            return
        scaled = self.chunks.gram[:stop - start]  # the Gram block is free once the kernel has read it
        torch.mul(coef, inv[None, :], out=scaled)
        _subtract_product(g_c, scaled, x)
        coef.mul_(inv[start:stop, None])
        _subtract_transposed_product(self.g, coef, x_c)

    def write(self, grads):
        grad_x, grad_inv_norm = grads
        inv = self.chunks.inv_norm
        if grad_x is not None:
            grad_x.copy_(self.g if inv is None else self.g * inv[:, None])
        if grad_inv_norm is not None:
            torch.sum(self.chunks.x * self.g, dim=1, out=grad_inv_norm)


def _rows_pass(backend, tensors, params, row_weight, grads):
    """Every anchor's loss and count; with row_weight, the gradient of sum(row_weight * loss) into grads."""
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
    sink.write(grads)
    return loss, count


def _rows_forward(backend, tensors, params, grads, grad_factor, reduce):
    weight = None if grads is None else grad_factor_rows(grad_factor, tensors[0].shape[0])
    loss, _ = _rows_pass(backend, tensors, params, weight, grads)
    return (loss.sum() if reduce else loss), ()


def _rows_backward(backend, grad_rows, tensors, saved, params, grads):
    weight = grad_rows.reshape(-1).to(F32).contiguous()
    _rows_pass(backend, tensors, params, weight, grads)


def counting_backend(device: torch.device) -> str:
    """The backend whose kernel counts hinge batch_all's non-zero triplets: a count is the same on both."""
    return "cuda" if usable("cuda") and runs_on("cuda", device) else "triton"


def _rows_mean_divisor(tensors, params):
    """semi_hard: the (anchor, positive) pairs whose anchor has a negative; batch_all soft: every triplet,
    both from the class sizes; batch_all hinge: the non-zero triplets, which need a counting pass over
    the chunks (one more Gram product) since the gradient's factor is needed before the loss pass."""
    labels = tensors[1]
    n = labels.shape[0]
    mining, soft_margin = params.mining, params.soft_margin
    if mining == Mining.BATCH_ALL and not soft_margin:
        with torch.no_grad():
            _, count = _rows_pass(counting_backend(labels.device), tensors, params, None, None)
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
    tensors=("embeddings", "labels", "inv_norm?"),
    params=ROW_PARAMS,
    differentiable=("embeddings", "inv_norm"),
    n_saved=0,
    forward=_rows_forward,
    backward=_rows_backward,
    mean_divisor=_rows_mean_divisor,
    rows_fake=_rows_fake,
)
triplet_mined_kernels = build(ROWS_SPEC)
