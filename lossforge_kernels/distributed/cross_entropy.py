"""Vocabulary-parallel softmax cross-entropy: each rank holds a slice of the classes for the same rows.

Each rank reduces its slice of every row to a few statistics (the row-softmax core's quantities:
its max m_r, the sum s_r of exp(y_j - m_r) over its classes but the target, the target's logit and
weight where it owns the target class, the smoothing sums); one all_gather carries those rows of
statistics, never logits, and every rank merges them in rank order into the unsharded row's lse,
log p_t, log(1 - p_t) and loss. The backward needs no collective: each rank writes the gradient of
its own slice from the merged statistics with the RowGrad formula (reference/row_softmax.py). The
local work runs as PyTorch ops in blocks of rows, so it works on any device and backend.
"""
from __future__ import annotations

import dataclasses

import torch

from ..reference import row_softmax as core
from ..reference.cross_entropy import compute_dtype
from .. import _checks as C
from .._once_differentiable import keep_anchor
from ..ops._chunks import chunk_rows
from . import _group as G


@dataclasses.dataclass(frozen=True)
class VocabSlice:
    start: int  # this rank's first class
    size: int   # its classes
    total: int  # every rank's together


@dataclasses.dataclass(frozen=True)
class Options:
    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float | None
    focal_gamma: float
    focal_alpha: float | None  # the float form; a tensor alpha is passed apart


def options(what, weight, *, focal_alpha, ignore_index, label_smoothing, z_loss, softcap, focal_gamma):
    """(Options, the tensor focal_alpha or None); class vectors that require grad are refused."""
    alpha = focal_alpha if isinstance(focal_alpha, torch.Tensor) else None
    for name, t in (("weight", weight), ("focal_alpha", alpha)):
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise NotImplementedError(f"{what}: {name} that requires grad is not supported across processes")
    return Options(ignore_index, label_smoothing, z_loss, softcap, focal_gamma,
                   None if alpha is not None else focal_alpha), alpha


def vocab_slices(group: G.Group, what: str, local_size: int, vocab_start, same: dict) -> VocabSlice:
    """This rank's slice, after checking that the ranks agree on the options `same` and that their
    slices tile [0, V) (collective)."""
    explicit = vocab_start is not None
    got = G.agree(group, what, {**same, "vocab_start given": explicit},
                  {"classes": local_size, "vocab_start": vocab_start if explicit else -1})
    sizes = got["classes"]
    starts = got["vocab_start"] if explicit else G.offsets(sizes)
    total = sum(sizes)
    position = 0
    for start, size in sorted(zip(starts, sizes)):
        if start != position:
            pairs = ", ".join(f"rank {r}: [{a}, {a + n})" for r, (a, n) in enumerate(zip(starts, sizes)))
            raise ValueError(f"{what}: the ranks' vocabulary slices do not tile [0, {total}) ({pairs})")
        position += size
    return VocabSlice(starts[group.rank], sizes[group.rank], total)


def slice_of(name: str, vec, vs: VocabSlice):
    """A per-class vector given as this rank's slice or as the full vector, as this rank's slice."""
    if vec is None:
        return None
    if vec.shape[0] == vs.size:
        return vec
    if vec.shape[0] == vs.total:
        return vec[vs.start:vs.start + vs.size]
    raise ValueError(f"{name} must have one entry per class of this rank's slice ({vs.size}) or of the whole "
                     f"vocabulary ({vs.total}), got shape {tuple(vec.shape)}")


# ---- per-row statistics of a block of rows (shared with the linear cross-entropy) ------------------

def capped(x, softcap):
    """y and dy/dx of a block of logits, in the compute dtype (float32; float64 for float64)."""
    x = x.to(compute_dtype(x.dtype))
    if softcap is None:
        return x, None
    th = torch.tanh(x / softcap)
    return softcap * th, 1.0 - th * th


def owned_targets(target, vs: VocabSlice, opts: Options):
    """(column of the target in this slice, clamped; whether this rank owns it; whether the row counts)."""
    counted = (target != opts.ignore_index) & (target >= 0) & (target < vs.total)
    local = target - vs.start
    owned = counted & (local >= 0) & (local < vs.size)
    return local.clamp(0, max(vs.size - 1, 0)), owned, counted


def class_block_stats(y, col, owned, weight, alpha, smooth: bool):
    """(rows, 7) statistics of a block of class-index rows: m_r, s_r (target left out), y_t, w_t,
    a_t (where owned, else 0), sum_j w_j y_j, sum_j w_j."""
    rows = y.shape[0]
    if y.shape[1] == 0:
        zero = y.new_zeros(rows)
        return torch.stack([zero - float("inf"), zero, zero, zero, zero, zero, zero], 1)
    m = y.max(1).values
    safe = core.safe_max(m)
    hit = owned[:, None] & (torch.arange(y.shape[1], device=y.device) == col[:, None])
    s = torch.exp(y - safe[:, None]).masked_fill(hit, 0.0).sum(1)  # the target's term never enters the sum
    y_t = torch.where(owned, y.gather(1, col[:, None]).squeeze(1), 0)
    w = _weights(weight, y)
    w_t = torch.where(owned, w[col], 0)
    a_t = torch.where(owned, alpha.to(y.dtype)[col], 0) if alpha is not None else torch.zeros_like(m)
    wy = (y * w).sum(1) if smooth else torch.zeros_like(m)
    return torch.stack([m, s, y_t, w_t, a_t, wy, w.sum().expand(rows)], 1)


def soft_block_stats(y, q, weight, eps: float, total: int):
    """(rows, 4) statistics of a block of probability-target rows: m_r, s_r, S_r = sum w q', and
    gap_r = sum w q' (m_r - y) (>= 0, so that the loss never cancels)."""
    if y.shape[1] == 0:
        zero = y.new_zeros(y.shape[0])
        return torch.stack([zero - float("inf"), zero, zero, zero], 1)
    m = y.max(1).values
    safe = core.safe_max(m)
    wq = ((1.0 - eps) * q.to(y.dtype) + eps / total) * _weights(weight, y)
    return torch.stack([m, torch.exp(y - safe[:, None]).sum(1), wq.sum(1), (wq * (safe[:, None] - y)).sum(1)], 1)


def _weights(weight, y):
    """Class weights of a block's classes in y's dtype (ones without weights)."""
    return torch.ones(y.shape[1], dtype=y.dtype, device=y.device) if weight is None else weight.to(y.dtype)


def merge_max_sum(m_parts, s_parts):
    """(W, rows) partial maxima and sums of exp(y - m_r) -> the row's max and sum of exp(y - m)."""
    m = m_parts.max(0).values
    return m, (s_parts * core.exp_diff(m_parts, core.safe_max(m))).sum(0)


@dataclasses.dataclass
class RowStats:
    """The merged statistics of class rows, identical on every rank."""
    lse: torch.Tensor
    ce: torch.Tensor
    log1mp: torch.Tensor
    logp_t: torch.Tensor
    w_t: torch.Tensor
    a_t: torch.Tensor
    W: torch.Tensor
    y_t: torch.Tensor
    loss: torch.Tensor   # per row; 0 ignored, NaN out of range


def merge_class_stats(parts, counted, target, vs: VocabSlice, opts: Options, alpha_tensor: bool) -> RowStats:
    """(W, rows, 7) gathered statistics -> the unsharded rows' quantities and loss."""
    m, s_excl = merge_max_sum(parts[..., 0], parts[..., 1])
    y_t, w_t, a_t, wy, W = (parts[..., k].sum(0) for k in range(2, 7))
    if not alpha_tensor:
        a_t = torch.full_like(w_t, 1.0 if opts.focal_alpha is None else opts.focal_alpha)
    lse = core.class_row_lse(m, s_excl, y_t)
    logp_t, log1mp = core.target_log_probs(m, s_excl, y_t)
    eps = opts.label_smoothing
    ce = (1.0 - eps) * w_t * -logp_t
    if eps > 0.0:
        ce = ce + eps / vs.total * (W * lse - wy)
    loss = a_t * core.focal_q(log1mp, opts.focal_gamma) * ce + opts.z_loss * lse * lse
    ignored = target == opts.ignore_index
    loss = torch.where(counted, loss, torch.where(ignored, 0.0, float("nan")))
    return RowStats(lse, ce, log1mp, logp_t, w_t, a_t, W, y_t, loss)


def class_block_grad(y, slope, col, owned, counted, st: RowStats, weight, scale, vs: VocabSlice, opts: Options,
                     rows: slice):
    """d(loss)/d(logits) of a block of this rank's slice from the merged statistics."""
    dt = torch.ones_like(st.lse[rows]) if opts.softcap is None else 1.0 - (st.y_t[rows] / opts.softcap) ** 2
    live = counted[rows]
    sc = torch.where(live, scale[rows], 0.0)
    rg = core.class_row_grad(*(torch.where(live, v[rows], 0.0) for v in (st.lse, st.ce, st.log1mp, st.logp_t)),
                             w_t=st.w_t[rows], a_t=st.a_t[rows], W=st.W[rows], C=vs.total, eps=opts.label_smoothing,
                             z=opts.z_loss, gamma=opts.focal_gamma, scale=sc, dt=dt)
    g = core.row_gradient(rg, y, 1.0 if slope is None else slope, _weights(weight, y))
    g = torch.where(owned[rows, None] & (torch.arange(y.shape[1], device=y.device) == col[rows, None]),
                    rg.gt[:, None], g)
    return torch.where(live[:, None], g, 0.0)


def row_blocks(rows: int, cols: int):
    """Slices of `rows` rows of `cols` logits whose block-sized fp32 temporaries each take chunk_rows'
    smallest budget: elementwise passes, with no per-block cost that taller blocks would amortise."""
    step = chunk_rows(rows, 4 * cols)
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


# ---- the op ------------------------------------------------------------------------------------------

def _reduce(loss_rows, reduction, divisor):
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    return total if reduction == "sum" else total / divisor


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, weight, alpha, vs, opts, reduction, group):
        keep_anchor(ctx, logits, target, weight, alpha)
        soft = target.dtype.is_floating_point
        parts = []
        if soft:
            for rows in row_blocks(*logits.shape):
                y, _ = capped(logits[rows], opts.softcap)
                parts.append(soft_block_stats(y, target[rows], weight, opts.label_smoothing, vs.total))
        else:
            col, owned, counted = owned_targets(target, vs, opts)
            for rows in row_blocks(*logits.shape):
                y, _ = capped(logits[rows], opts.softcap)
                parts.append(class_block_stats(y, col[rows], owned[rows], weight, alpha, opts.label_smoothing > 0))
        ct = compute_dtype(logits.dtype)
        gathered = G.all_gather_values(torch.cat(parts) if parts else logits.new_zeros(0, 4 if soft else 7, dtype=ct),
                                       group)
        if soft:
            m, s = merge_max_sum(gathered[..., 0], gathered[..., 1])
            S = gathered[..., 2].sum(0)
            gap = (gathered[..., 3] + gathered[..., 2] * (m - torch.where(torch.isinf(gathered[..., 0]),
                                                                         m, gathered[..., 0]))).sum(0)
            lse = m + torch.log(s)
            loss_rows = S * (lse - m) + gap + opts.z_loss * lse * lse
            divisor = float(logits.shape[0])
            ctx.save_for_backward(logits, target, weight, lse, S)
        else:
            st = merge_class_stats(gathered, counted, target, vs, opts, alpha is not None)
            loss_rows = st.loss
            kept = target != opts.ignore_index
            divisor = torch.where(kept, st.w_t, 0.0).sum() if weight is not None else kept.sum().to(ct)
            ctx.save_for_backward(logits, target, weight)
            ctx.stats, ctx.masks = st, (col, owned, counted)
        ctx.vs, ctx.opts, ctx.reduction, ctx.soft, ctx.divisor = vs, opts, reduction, soft, divisor
        return _reduce(loss_rows, reduction, divisor).to(logits.dtype)

    @staticmethod
    @G.once_differentiable
    def backward(ctx, grad):
        logits = ctx.saved_tensors[0]
        rows_n = logits.shape[0]
        g = grad.to(compute_dtype(logits.dtype))
        if ctx.reduction == "none":
            scale = g.reshape(-1)
        else:
            scale = (g / ctx.divisor if ctx.reduction == "mean" else g).expand(rows_n)
        out = torch.empty_like(logits)
        vs, opts = ctx.vs, ctx.opts
        if ctx.soft:
            _, target, weight, lse, S = ctx.saved_tensors
            for rows in row_blocks(*logits.shape):
                y, slope = capped(logits[rows], opts.softcap)
                rg = core.soft_row_grad(lse[rows], S[rows], C=vs.total, eps=opts.label_smoothing, z=opts.z_loss,
                                        scale=scale[rows])
                out[rows] = core.row_gradient(rg, y, 1.0 if slope is None else slope, _weights(weight, y),
                                              q=target[rows].to(y.dtype))
        else:
            _, target, weight = ctx.saved_tensors
            col, owned, counted = ctx.masks
            for rows in row_blocks(*logits.shape):
                y, slope = capped(logits[rows], opts.softcap)
                out[rows] = class_block_grad(y, slope, col, owned, counted, ctx.stats, weight, scale, vs, opts, rows)
        return out, None, None, None, None, None, None, None


def vocab_parallel_cross_entropy(logits, target, weight, *, reduction, process_group, vocab_start, **named):
    """(M, V_r) rows of this rank's classes; target (M,) global class indices or (M, V_r) this slice of
    class probabilities; `named`: the scalar options of cross_entropy (ignore_index, label_smoothing,
    z_loss, softcap, focal_gamma, focal_alpha), checked by the public function."""
    group = G.resolve_group(process_group, logits.device)
    what = "cross_entropy(process_group=...)"
    soft = target.dtype.is_floating_point
    opts, alpha = options(what, weight, **named)
    vs = vocab_slices(group, what, logits.shape[1], vocab_start, dict(
        loss="cross_entropy", reduction=reduction, **named, weight=weight,
        target="probabilities" if soft else "class indices", rows=logits.shape[0], dtype=logits.dtype))
    weight, alpha = slice_of("weight", weight, vs), slice_of("focal_alpha", alpha, vs)
    if not soft:
        C.check_target_range(target, vs.total, named["ignore_index"])
    return _VocabParallelCE.apply(logits, target, weight, alpha, vs, opts, reduction, group)
