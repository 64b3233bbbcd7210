"""Kernel ops of the contrastive family (InfoNCE / CLIP, SupCon, SigLIP) and their specs.

One pair of kernel ops serves the three losses; `kind` (reference/contrastive.py: Kind) picks the
per-pair term. The (B, M) similarity matrix never exists in device memory: the kernels rebuild tiles
of it on chip, in the forward and again in the backward (CUDA: bounded chunks in the backward of rows
too wide for its shared accumulator).

Kernel contract, the same for the Triton and the CUDA implementation:

contrastive_fwd_<b>(query, key, labels, logit_scale, logit_bias, loss, stats, kind, normalize, symmetric) -> ()
  query    (B, D) fp32/fp16/bf16 contiguous; key (M, D) the same dtype and device, contiguous.
           kind SUPCON: key holds query's rows (the spec passes query itself; M == B).
  labels   (B,) int64 contiguous for SUPCON, else None.
  logit_scale  0-dim fp32 on the device: the logit multiplier s (read on the device, never on the host).
  logit_bias   0-dim fp32 on the device: SigLIP's b (read for SIGLIP only).
  kind     a Kind value (INFO_NCE 0, SUPCON 1, SIGLIP 2); any other int is refused.
  normalize  rows are divided by max(|row|, 1e-12) in fp32 inside the kernel (no normalised copy):
           r_i = 1 / max(|q_i|, 1e-12) (and likewise r'_j for key rows), else r = r' = 1.
  Pair terms, with c_ij = <q_i, k_j> r_i r'_j accumulated in fp32 and z_ij = s c_ij (+ b for SIGLIP):
  loss     out (B,) fp32 contiguous, the per-row loss:
           INFO_NCE  lse_j z_ij - z_ii over all M keys; with `symmetric` (M == B) the mean of that
                     and the column loss lse_i' z_i'i - z_ii.
           SUPCON    with n_i = #{j != i : labels_j == labels_i}: lse_{j != i} z_ij - sum_{positives j}
                     z_ij / n_i where n_i > 0, else 0.
           SIGLIP    sum_j softplus(-y_ij z_ij), y_ij = +1 where i == j, else -1.
           NaN and inf as torch and the reference give them: lse is torch.logsumexp's (+inf where a
           logit is +inf, NaN where one is NaN, whatever a maximum that skips NaN saw), softplus
           keeps NaN, so a non-finite input reaches exactly the rows (and gradients) it reaches there.
  stats    out (2, B) fp32 contiguous, what the backward needs:
           INFO_NCE  [row lse, column lse (symmetric only; else left untouched)]
           SUPCON    [lse over j != i (0 where n_i == 0), n_i as a float]
           SIGLIP    left untouched.
  symmetric  INFO_NCE only; requires M == B.

contrastive_bwd_<b>(grad_rows, query, key, labels, logit_scale, logit_bias, stats, grad_query, grad_key,
                    grad_coef, kind, normalize, symmetric) -> ()
  grad_rows (B,) fp32 contiguous: g_i = d(total)/d(loss_i). With P_ij = exp(z_ij - stats[0, i]),
           the gradient of the total with respect to z_ij is
           INFO_NCE  g_i (P_ij - [i == j]); symmetric: half of it plus half of
                     g_j (exp(z_ij - stats[1, j]) - [i == j])
           SUPCON    g_i (P_ij [j != i] - [j positive for i] / n_i) where n_i > 0, else 0
           SIGLIP    -y_ij g_i sigmoid(-y_ij z_ij)
  grad_query out (B, D) in query's dtype, or None: d(total)/d(query), through the normalisation
           when `normalize` (d r_i/d q_i = -r_i^3 q_i where |q_i| >= 1e-12, else 0). SUPCON counts
           both roles of a row (as query and as key) here, but only the anchor role in grad_coef.
  grad_key out (M, D) in key's dtype, or None (always None for SUPCON).
  grad_coef out (2, B) fp32 contiguous, or None: per-row partial sums [sum_j dZ_ij c_ij,
           sum_j dZ_ij]; logit_scale's gradient is the sum of row 0, logit_bias's of row 1.
  Every output is overwritten, not accumulated, and reduced in a fixed order: no floating-point
  atomics, so a call's result does not change from run to run.
  Half-precision gradients: the pair weights s dZ_ij r'_j are about s / B^2 under 'mean' (below fp16's
  subnormals at large B); an implementation that rounds them to the inputs' dtype scales each row by
  an exact power of two first and undoes it after the fp32-accumulated product (CUDA), or keeps them
  in fp32 (Triton's fp16 gradient dot runs on fp32 operands), so gradients stay within fp16 rounding.
"""
from __future__ import annotations

import torch

from ..reference.contrastive import Kind
from ._labels import class_sizes
from ._contracts import F32, KERNEL_DTYPES, fail, require_choice, require_tensor
from ._library import KernelOp
from .builder import FusedLoss, build, grad_factor_rows

INFO_NCE, SUPCON, SIGLIP = Kind  # the kernel ops' `kind` values


def _check_matrix(op, name, t, like=None):
    if t.dim() != 2 or t.dtype not in KERNEL_DTYPES or not t.is_contiguous():
        fail(op, f"{name} must be a contiguous 2-D fp32/fp16/bf16 tensor, got shape {tuple(t.shape)}, dtype "
                 f"{t.dtype}, strides {t.stride()}")
    if like is not None and (t.dtype != like.dtype or t.device != like.device or t.shape[1] != like.shape[1]):
        fail(op, f"{name} must match query's dtype {like.dtype}, device {like.device} and width {like.shape[1]}, "
                 f"got {t.dtype}, {t.device}, shape {tuple(t.shape)}")


def check_inputs(op, query, key, labels, logit_scale, logit_bias, kind, symmetric):
    """The contract both ops share (see the module docstring)."""
    require_choice(op, "kind", kind, tuple(Kind))
    _check_matrix(op, "query", query)
    _check_matrix(op, "key", key, like=query)
    b, m = query.shape[0], key.shape[0]
    if m < b:
        fail(op, f"key needs at least as many rows as query ({b}), got {m}")
    if kind == SUPCON:
        if m != b:
            fail(op, f"kind SUPCON takes key = query, got {m} key rows for {b} query rows")
        if labels is None:
            fail(op, "kind SUPCON needs labels")
        require_tensor(op, "labels", labels, (b,), query, torch.int64)
    elif labels is not None:
        fail(op, "labels are for kind SUPCON only")
    if symmetric and (kind != INFO_NCE or m != b):
        fail(op, f"symmetric needs kind INFO_NCE and as many keys as queries, got kind {Kind(kind).name}, B={b}, "
                 f"M={m}")
    require_tensor(op, "logit_scale", logit_scale, (), query)
    require_tensor(op, "logit_bias", logit_bias, (), query)


def _check_fwd(query, key, labels, logit_scale, logit_bias, loss, stats, kind, normalize, symmetric):
    op = "contrastive_fwd"
    check_inputs(op, query, key, labels, logit_scale, logit_bias, kind, symmetric)
    require_tensor(op, "loss", loss, (query.shape[0],), query)
    require_tensor(op, "stats", stats, (2, query.shape[0]), query)


def _check_bwd(grad_rows, query, key, labels, logit_scale, logit_bias, stats, grad_query, grad_key, grad_coef, kind,
               normalize, symmetric):
    op = "contrastive_bwd"
    check_inputs(op, query, key, labels, logit_scale, logit_bias, kind, symmetric)
    b = query.shape[0]
    require_tensor(op, "grad_rows", grad_rows, (b,), query)
    require_tensor(op, "stats", stats, (2, b), query)
    for name, grad, like in (("grad_query", grad_query, query), ("grad_key", grad_key, key)):
        if grad is not None:
            require_tensor(op, name, grad, tuple(like.shape), like, like.dtype)
    if kind == SUPCON and grad_key is not None:
        fail(op, "kind SUPCON writes both roles of a row into grad_query; grad_key must be None")
    if grad_coef is not None:
        require_tensor(op, "grad_coef", grad_coef, (2, b), query)


FWD = KernelOp(
    "contrastive_fwd",
    "(Tensor query, Tensor key, Tensor? labels, Tensor logit_scale, Tensor logit_bias, Tensor(a!) loss,"
    " Tensor(b!) stats, int kind, bool normalize, bool symmetric) -> ()",
    check=_check_fwd,
)
BWD = KernelOp(
    "contrastive_bwd",
    "(Tensor grad_rows, Tensor query, Tensor key, Tensor? labels, Tensor logit_scale, Tensor logit_bias,"
    " Tensor stats, Tensor(a!)? grad_query, Tensor(b!)? grad_key, Tensor(c!)? grad_coef, int kind,"
    " bool normalize, bool symmetric) -> ()",
    check=_check_bwd,
)


def _triton():
    from ..triton_kernels import contrastive as kernels  # Triton is optional: loaded at the first Triton call

    return kernels


FWD.implement_triton(lambda *args: _triton().contrastive_fwd(*args))
BWD.implement_triton(lambda *args: _triton().contrastive_bwd(*args))


# ---- the three losses' specs for the op builder -------------------------------------------------
# Each spec only maps its tensors onto the shared kernel ops: logit_scale and logit_bias are 0-dim fp32
# device tensors (the public layer turns floats into them), so no value is ever read on the host.

def _run_forward(backend, query, key, labels, logit_scale, logit_bias, kind, normalize, symmetric):
    b = query.shape[0]
    loss = query.new_empty(b, dtype=F32)
    # Rows of stats the kernel leaves untouched are zeros: the rows op returns them (as saved tensors).
    writes_all = kind == SUPCON or (kind == INFO_NCE and symmetric)
    stats = query.new_empty(2, b, dtype=F32) if writes_all else query.new_zeros(2, b, dtype=F32)
    FWD[backend](query, key, labels, logit_scale, logit_bias, loss, stats, kind=kind, normalize=normalize,
                 symmetric=symmetric)
    return loss, stats


def _run_backward(backend, grad_rows, query, key, labels, logit_scale, logit_bias, stats, grads, kind, normalize,
                  symmetric):
    """grads: [query, key, logit_scale, logit_bias] buffers (None where not wanted); the gradients of
    logit_scale and logit_bias are sums of the kernel's per-row partials."""
    grad_q, grad_k, grad_logit_scale, grad_logit_bias = grads
    wants_coef = grad_logit_scale is not None or grad_logit_bias is not None
    coef = query.new_empty(2, query.shape[0], dtype=F32) if wants_coef else None
    BWD[backend](grad_rows.to(F32).contiguous(), query, key, labels, logit_scale, logit_bias, stats, grad_q, grad_k,
                 coef, kind=kind, normalize=normalize, symmetric=symmetric)
    for row, grad in enumerate((grad_logit_scale, grad_logit_bias)):
        if grad is not None:
            torch.sum(coef[row], dim=0, out=grad)


def _zero(like):
    return like.new_zeros((), dtype=F32)


def _finish(loss, stats, reduce):
    return (loss.sum() if reduce else loss), (stats,)


# InfoNCE / CLIP: tensors (query, key, logit_scale), logit_scale a 0-dim fp32 tensor.

def _info_nce_forward(backend, tensors, params, grads, grad_factor, reduce):
    query, key, logit_scale = tensors
    logit_bias = _zero(query)
    loss, stats = _run_forward(backend, query, key, None, logit_scale, logit_bias, INFO_NCE, params.normalize,
                               params.symmetric)
    if grads is not None:
        _run_backward(backend, grad_factor_rows(grad_factor, query.shape[0]), query, key, None, logit_scale, logit_bias,
                      stats, [*grads, None], INFO_NCE, params.normalize, params.symmetric)
    return _finish(loss, stats, reduce)


def _info_nce_backward(backend, grad_rows, tensors, saved, params, grads):
    query, key, logit_scale = tensors
    _run_backward(backend, grad_rows, query, key, None, logit_scale, _zero(query), saved[0], [*grads, None],
                  INFO_NCE, params.normalize, params.symmetric)


def _row_count(backend, tensors, params):
    return float(tensors[0].shape[0])


INFO_NCE_SPEC = FusedLoss(
    name="info_nce",
    tensors=("query", "key", "logit_scale"),
    params=("bool normalize", "bool symmetric"),
    differentiable=("query", "key", "logit_scale"),
    n_saved=1,
    forward=_info_nce_forward,
    backward=_info_nce_backward,
    mean_divisor=_row_count,
)


# SupCon: tensors (features, labels), temperature a float; anchors without a positive count 0.

def _anchor_count(backend, tensors, params):
    """Anchors with a positive: rows whose label another row shares."""
    return (class_sizes(tensors[1]) > 1).sum(dtype=F32)


def _supcon_rows_grad(grad_rows, stats):
    """Rows left out (no positive: stats[1] == 0) get no gradient, even when 'mean' has nothing to
    average (1/0 times 0 is 0 here)."""
    return torch.where(stats[1] > 0, grad_rows.to(F32), 0.0)


def _supcon_logit_scale(features, params):
    return features.new_full((), 1.0 / params.temperature, dtype=F32)


def _supcon_forward(backend, tensors, params, grads, grad_factor, reduce):
    features, labels = tensors
    logit_scale, logit_bias = _supcon_logit_scale(features, params), _zero(features)
    loss, stats = _run_forward(backend, features, features, labels, logit_scale, logit_bias, SUPCON,
                               params.normalize, False)
    if grads is not None:
        rows = _supcon_rows_grad(grad_factor_rows(grad_factor, features.shape[0]), stats)
        _run_backward(backend, rows, features, features, labels, logit_scale, logit_bias, stats,
                      [grads[0], None, None, None], SUPCON, params.normalize, False)
    return _finish(loss, stats, reduce)


def _supcon_backward(backend, grad_rows, tensors, saved, params, grads):
    features, labels = tensors
    _run_backward(backend, _supcon_rows_grad(grad_rows, saved[0]), features, features, labels,
                  _supcon_logit_scale(features, params), _zero(features), saved[0], [grads[0], None, None, None],
                  SUPCON, params.normalize, False)


SUPCON_SPEC = FusedLoss(
    name="supcon",
    tensors=("features", "labels"),
    params=("float temperature", "bool normalize"),
    differentiable=("features",),
    n_saved=1,
    forward=_supcon_forward,
    backward=_supcon_backward,
    mean_divisor=_anchor_count,
)


# SigLIP: tensors (query, key, logit_scale, logit_bias), both scalars 0-dim fp32 tensors.

def _siglip_forward(backend, tensors, params, grads, grad_factor, reduce):
    query, key, logit_scale, logit_bias = tensors
    loss, stats = _run_forward(backend, query, key, None, logit_scale, logit_bias, SIGLIP, params.normalize, False)
    if grads is not None:
        _run_backward(backend, grad_factor_rows(grad_factor, query.shape[0]), query, key, None, logit_scale,
                      logit_bias, stats, list(grads), SIGLIP, params.normalize, False)
    return _finish(loss, stats, reduce)


def _siglip_backward(backend, grad_rows, tensors, saved, params, grads):
    query, key, logit_scale, logit_bias = tensors
    _run_backward(backend, grad_rows, query, key, None, logit_scale, logit_bias, saved[0], list(grads), SIGLIP,
                  params.normalize, False)


SIGLIP_SPEC = FusedLoss(
    name="siglip",
    tensors=("query", "key", "logit_scale", "logit_bias"),
    params=("bool normalize",),
    differentiable=("query", "key", "logit_scale", "logit_bias"),
    n_saved=1,
    forward=_siglip_forward,
    backward=_siglip_backward,
    mean_divisor=_row_count,
)

info_nce_kernels = build(INFO_NCE_SPEC)
supcon_kernels = build(SUPCON_SPEC)
siglip_kernels = build(SIGLIP_SPEC)
