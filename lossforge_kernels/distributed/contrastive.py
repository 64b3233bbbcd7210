"""Global-batch contrastive losses: each rank passes its local batch; negatives and positives come
from the whole batch, the concatenation of every rank's rows in rank order.

Every rank gathers the (normalised) embeddings with gradients, computes the rows it owns against the
whole batch (its queries against all keys and, for the symmetric InfoNCE, its keys against all
queries), and returns the global loss with the gradient convention of distributed/_group.py. Memory
per rank: the gathered embeddings and its (B_r x M) block of logits; the row losses go through the
cross-entropy ops (ops/cross_entropy.py), so their kernels do the local work where they apply.
InfoNCE and SigLIP run on a ring instead in groups of RING_MIN_WORLD ranks or more
(LOSSFORGE_RING_MIN_WORLD): query and key blocks pass from rank to rank while the previous block is
reduced (InfoNCE into online row and column log-sum-exps, the row-softmax core's online_step), and
memory per rank is O((B_r + M_r) D + B_r M_r), whatever the group's size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference import row_softmax as core
from ..reference.contrastive import compute_scalar, embed
from ..reference.cross_entropy import compute_dtype
from .._once_differentiable import keep_anchor
from ..ops.cross_entropy import class_rows_loss
from . import _group as G


def finish_rows(rows, reduction, divisor, group, dtype):
    """'none': this rank's rows (their gradient W times theirs); 'sum'/'mean': the global loss."""
    if reduction == "none":
        scaled = rows * group.world
        return (scaled + (rows - scaled).detach()).to(dtype)
    share = rows.sum() if reduction == "sum" else rows.sum() / divisor
    return G.global_loss(share, group).to(dtype)


def info_nce(query, key, logit_scale, *, temperature=None, symmetric, normalize, reduction, process_group, backend):
    """`logit_scale` the multiplier, or None for 1 / `temperature`; `backend` that of the local rows'
    cross-entropy ("auto" or "reference")."""
    group = G.resolve_group(process_group, query.device)
    what = "info_nce(process_group=...)"
    got = G.agree(group, what, dict(loss="info_nce", temperature=temperature, logit_scale=logit_scale,
                                    symmetric=symmetric, normalize=normalize, reduction=reduction,
                                    features=query.shape[1], dtype=query.dtype),
                  {"queries": query.shape[0], "keys": key.shape[0]})
    b_sizes, m_sizes = got["queries"], got["keys"]
    if symmetric and b_sizes != m_sizes:
        raise ValueError(f"{what}: symmetric=True needs as many keys as queries on every rank, got queries "
                         f"{b_sizes} and keys {m_sizes}")
    ct = compute_dtype(query.dtype)
    q, k = embed(query, normalize, ct), embed(key, normalize, ct)
    s = compute_scalar(1.0 / temperature if logit_scale is None else logit_scale, ct)
    if group.world >= ring_min_world():
        rows = _InfoNCERing.apply(q, k, s, group, b_sizes, m_sizes, symmetric)
        return finish_rows(rows, reduction, sum(b_sizes), group, query.dtype)
    keys = G.gather_rows(k, group, m_sizes)
    local = torch.arange(q.shape[0], device=q.device)
    rows = class_rows_loss(s * (q @ keys.T), G.offsets(m_sizes)[group.rank] + local, backend=backend)
    if symmetric:
        queries = G.gather_rows(q, group, b_sizes)
        cols = class_rows_loss(s * (k @ queries.T), G.offsets(b_sizes)[group.rank] + local, backend=backend)
        rows = 0.5 * (rows + cols)
    return finish_rows(rows, reduction, sum(b_sizes), group, query.dtype)


def supcon_loss(features, labels, temperature, *, normalize, reduction, process_group):
    group = G.resolve_group(process_group, features.device)
    what = "supcon_loss(process_group=...)"
    got = G.agree(group, what, dict(loss="supcon_loss", temperature=temperature, normalize=normalize,
                                    reduction=reduction, features=features.shape[1], dtype=features.dtype),
                  {"anchors": features.shape[0]})
    sizes = got["anchors"]
    ct = compute_dtype(features.dtype)
    f = embed(features, normalize, ct)
    everyone = G.gather_rows(f, group, sizes)
    all_labels = G.gather_rows(labels.to(torch.int64), group, sizes)
    z = (f @ everyone.T) / temperature                                      # (B_r, B)
    me = G.offsets(sizes)[group.rank] + torch.arange(f.shape[0], device=f.device)
    is_self = torch.arange(everyone.shape[0], device=f.device)[None, :] == me[:, None]
    positive = (labels.to(torch.int64)[:, None] == all_labels[None, :]) & ~is_self
    n_pos = positive.sum(1)
    has_pos = n_pos > 0
    others = z.masked_fill(is_self, float("-inf"))
    others = torch.where(has_pos[:, None], others, torch.zeros_like(others))  # see reference.supcon_rows
    log_prob = z - torch.logsumexp(others, dim=1, keepdim=True)
    rows = -torch.where(positive, log_prob, 0.0).sum(1) / n_pos.clamp_min(1).to(ct)
    rows = torch.where(has_pos, rows, 0.0)
    kept = G.all_reduce_value(has_pos.sum().to(ct), group)
    return finish_rows(rows, reduction, kept, group, features.dtype)


def siglip_loss(query, key, logit_scale, logit_bias, *, normalize, reduction, process_group):
    group = G.resolve_group(process_group, query.device)
    what = "siglip_loss(process_group=...)"
    got = G.agree(group, what, dict(loss="siglip_loss", logit_scale=logit_scale, logit_bias=logit_bias,
                                    normalize=normalize, reduction=reduction, features=query.shape[1],
                                    dtype=query.dtype),
                  {"queries": query.shape[0], "keys": key.shape[0]})
    b_sizes, m_sizes = got["queries"], got["keys"]
    ct = compute_dtype(query.dtype)
    q, k = embed(query, normalize, ct), embed(key, normalize, ct)
    scale, bias = compute_scalar(logit_scale, ct), compute_scalar(logit_bias, ct)
    if group.world >= ring_min_world():
        rows = siglip_rows_on_a_ring(q, k, scale, bias, group, m_sizes)
    else:
        keys = G.gather_rows(k, group, m_sizes)
        logits = scale * (q @ keys.T) + bias  # (B_r, M)
        positive = G.offsets(m_sizes)[group.rank] + torch.arange(q.shape[0], device=q.device)
        sign = torch.where(torch.arange(keys.shape[0], device=q.device)[None, :] == positive[:, None], 1.0, -1.0)
        rows = -F.logsigmoid(sign.to(ct) * logits).sum(1)
    return finish_rows(rows, reduction, sum(b_sizes), group, query.dtype)


# ---- SigLIP on a ring: memory per rank independent of the group's size --------------------------------

RING_MIN_WORLD = 8  # groups of at least this many ranks pass key blocks around a ring instead of gathering
ENV_RING = "LOSSFORGE_RING_MIN_WORLD"


def ring_min_world() -> int:
    import os

    value = os.environ.get(ENV_RING, "")
    return int(value) if value else RING_MIN_WORLD


def _pad(t, rows):
    out = t.new_zeros((rows, *t.shape[1:]))
    out[:t.shape[0]] = t
    return out


class _SigLIPRing(torch.autograd.Function):
    """This rank's rows of the SigLIP loss against every rank's keys, the key blocks passed around a
    ring (W steps, each a (B_r x M_max) block of logits); the backward passes each block again with
    its gradient, which collects every rank's part on the way and is home after W steps."""

    @staticmethod
    def forward(ctx, q, k, scale, bias, group, m_sizes):
        keep_anchor(ctx, q, k, scale, bias)
        ring, rows = G.Ring(group), max(m_sizes)
        mine = _pad(k, rows)
        block, owner = mine, group.rank
        losses = q.new_zeros(q.shape[0])
        for step in range(group.world):
            pending = ring.start(block) if step < group.world - 1 else None
            losses += -F.logsigmoid(_signs(q, rows, owner == group.rank) * _logits(q, block, scale, bias)
                                    )[:, :m_sizes[owner]].sum(1)
            if pending is not None:
                (block,) = ring.finish(*pending, q.device)
                owner = (owner - 1) % group.world
        ctx.save_for_backward(q, mine, *(t for t in (scale, bias) if isinstance(t, torch.Tensor)))
        ctx.group, ctx.m_sizes, ctx.scalars = group, m_sizes, (scale, bias)
        return losses

    @staticmethod
    @G.once_differentiable
    def backward(ctx, grad_rows):
        q, mine = ctx.saved_tensors[:2]
        scale, bias = ctx.scalars
        group, m_sizes = ctx.group, ctx.m_sizes
        ring, rows = G.Ring(group), max(m_sizes)
        block, block_grad, owner = mine, torch.zeros_like(mine), group.rank
        dq = torch.zeros_like(q)
        dscale = dbias = q.new_zeros(())
        s = scale if isinstance(scale, torch.Tensor) else torch.tensor(scale, dtype=q.dtype)
        for step in range(group.world):
            signs = _signs(q, rows, owner == group.rank)
            dots = q @ block.T
            logits = s * dots + bias
            # d/dl of -log sigmoid(z l) is -z sigmoid(-z l); columns past the block's keys are padding
            dl = grad_rows[:, None] * -signs * torch.sigmoid(-signs * logits)
            dl[:, m_sizes[owner]:] = 0
            dq += s * (dl @ block)
            block_grad = block_grad + s * (dl.T @ q)
            dscale = dscale + (dl * dots).sum()
            dbias = dbias + dl.sum()
            # the block and its gradient move on; after the last step only the gradient goes home
            pending = ring.start(block, block_grad) if step < group.world - 1 else ring.start(block_grad)
            received = ring.finish(*pending, q.device)
            if step < group.world - 1:
                block, block_grad = received
                owner = (owner - 1) % group.world
            else:
                (block_grad,) = received
        dk = block_grad[:m_sizes[group.rank]]
        return (dq, dk, dscale.reshape(scale.shape) if isinstance(scale, torch.Tensor) else None,
                dbias.reshape(bias.shape) if isinstance(bias, torch.Tensor) else None, None, None)


def _logits(q, block, scale, bias):
    return scale * (q @ block.T) + bias


def _signs(q, rows, own_block):
    """+1 for a query's own positive (the same row of its own rank's block), -1 elsewhere."""
    signs = -torch.ones(q.shape[0], rows, dtype=q.dtype, device=q.device)
    if own_block:
        signs[torch.arange(q.shape[0]), torch.arange(q.shape[0])] = 1.0
    return signs


def siglip_rows_on_a_ring(q, k, scale, bias, group, m_sizes):
    if isinstance(scale, torch.Tensor) and scale.dim() == 0:
        scale = scale.reshape(())
    return _SigLIPRing.apply(q, k, scale, bias, group, m_sizes)


# ---- InfoNCE on a ring ------------------------------------------------------------------------------

def _masked(logits, valid_cols):
    logits[:, valid_cols:] = float("-inf")
    return logits


class _InfoNCERing(torch.autograd.Function):
    """This rank's InfoNCE rows against every rank's keys (and, symmetric, its keys' columns against
    every rank's queries), the query and key blocks passed around a ring: each step reduces a
    (B_r x M_max) block into online row (and column) log-sum-exps. The backward passes the blocks
    again with their gradients, which collect every rank's part and are home after W steps."""

    @staticmethod
    def forward(ctx, q, k, scale, group, b_sizes, m_sizes, symmetric):
        keep_anchor(ctx, q, k, scale)
        ring, n = G.Ring(group), q.shape[0]
        mine = (_pad(q, max(b_sizes)), _pad(k, max(m_sizes)))
        blocks, owner = mine, group.rank
        row_m = col_m = q.new_full((n,), float("-inf"))
        row_s, col_s = q.new_zeros(n), q.new_zeros(n)
        for step in range(group.world):
            pending = ring.start(*blocks) if step < group.world - 1 else None
            qo, ko = blocks
            row_m, row_s = core.online_step(row_m, row_s, _masked(scale * (q @ ko.T), m_sizes[owner]))
            if symmetric:
                col_m, col_s = core.online_step(col_m, col_s, _masked(scale * (k @ qo.T), b_sizes[owner]))
            if pending is not None:
                blocks = ring.finish(*pending, q.device)
                owner = (owner - 1) % group.world
        positive = scale * (q * k[:n]).sum(1)
        rows = row_m + torch.log(row_s) - positive
        lse_col = col_m + torch.log(col_s) if symmetric else None
        if symmetric:
            rows = 0.5 * (rows + lse_col - positive)
        ctx.save_for_backward(q, k, row_m + torch.log(row_s), *(() if lse_col is None else (lse_col,)))
        ctx.args = (scale, group, b_sizes, m_sizes, symmetric)
        return rows

    @staticmethod
    @G.once_differentiable
    def backward(ctx, grad_rows):
        q, k, lse_row = ctx.saved_tensors[:3]
        scale, group, b_sizes, m_sizes, symmetric = ctx.args
        lse_col = ctx.saved_tensors[3] if symmetric else None
        ring, n, rank = G.Ring(group), q.shape[0], group.rank
        s = scale if isinstance(scale, torch.Tensor) else torch.tensor(scale, dtype=q.dtype)
        g_row = grad_rows * (0.5 if symmetric else 1.0)
        blocks, owner = (_pad(q, max(b_sizes)), _pad(k, max(m_sizes))), rank
        travel = [torch.zeros_like(blocks[0]), torch.zeros_like(blocks[1])]  # d/d(the block's queries, keys)
        dq, dk, dscale = torch.zeros_like(q), torch.zeros_like(k), q.new_zeros(())
        eye = torch.eye(n, dtype=q.dtype, device=q.device)
        for step in range(group.world):
            data = ring.start(*blocks) if step < group.world - 1 else None
            qo, ko = blocks
            dots = q @ ko.T
            ds = g_row[:, None] * torch.exp(_masked(s * dots, m_sizes[owner]) - lse_row[:, None])
            if owner == rank:
                ds[:, :n] -= g_row[:, None] * eye
            dq += s * (ds @ ko)
            travel[1] = travel[1] + s * (ds.T @ q)
            dscale = dscale + (ds * dots).sum()
            if symmetric:
                dots_c = k @ qo.T
                dc = (0.5 * grad_rows)[:, None] * torch.exp(_masked(s * dots_c, b_sizes[owner]) - lse_col[:, None])
                if owner == rank:
                    dc[:, :n] -= (0.5 * grad_rows)[:, None] * eye
                dk += s * (dc @ qo)
                travel[0] = travel[0] + s * (dc.T @ k)
                dscale = dscale + (dc * dots_c).sum()
            grads = ring.start(*travel)
            if data is not None:
                blocks = ring.finish(*data, q.device)
                owner = (owner - 1) % group.world
            travel = ring.finish(*grads, q.device)
        dq += travel[0][:n]
        dk += travel[1][:k.shape[0]]
        return dq, dk, dscale.reshape(scale.shape) if isinstance(scale, torch.Tensor) else None, None, None, None, None
