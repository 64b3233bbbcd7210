"""The row-softmax core in plain PyTorch: the per-row quantities of every softmax-over-a-row loss.

Names and formulas are documented here, once. The Triton core (triton_kernels/row_softmax.py) and
the CUDA core (csrc/row_softmax.cuh) compute the same quantities under the same names while
streaming a row; the cross-entropy kernels use them, and so will fused linear cross-entropy (rows
from matrix-product tiles) and InfoNCE (rows and columns of scaled similarities). The functions
below work on whole rows at once, in the input's dtype, and tests check them against autograd.

A row holds C logits x_j; y_j = x_j, or y_j = softcap * tanh(x_j / softcap) with slope dy_j/dx_j.

- Online log-sum-exp: `m` is the running max of the y seen and `s` the sum of exp(y_j - m) over
  them; when m grows, s is rescaled by exp(m_old - m_new). Two partial results merge as
  M = max(m_a, m_b), s = s_a exp(m_a - M) + s_b exp(m_b - M) (`merge`; `online_step` folds in one
  more block of a row, `online_lse` a whole row chunk by chunk). An all -inf part has
  m = -inf and s = 0 and must not produce -inf - -inf. `exp_diff(y, m)` = exp(y - m) with the
  subtraction first (the kernels use exp2((y - m) * log2 e)), exact when y and m are large and close.
  NaN and +inf: a GPU's max skips NaN, so a NaN reaches the row through exp(y - m) into s, and
  nothing after the sums may clamp or select it away. A +inf logit gives a log-softmax's NaN
  (`merge`, cross-entropy's rule, as torch's); rows that are log-sum-exps of scores (InfoNCE, SupCon)
  follow torch.logsumexp instead, shifting by 0 where the max is +-inf so a +inf score gives +inf
  (`lse_shift`, `fold_tile_lse`, `finish_lse` in the Triton core).
- Entropy rows (the RL heads, reference/log_probs.py) keep one more running sum beside s,
  u = sum_j exp(y_j - m) (y_j - m), rescaled when m grows by d as u <- (u - d s) exp(-d)
  (`online_moment_step` in the Triton core). Then lse = m + log s, log p_t = (y_t - m) - log s and
  the entropy H = log s - u / s, two non-negative terms (no cancellation at large logits). The
  gradient for grad_outputs g (log p_t) and h (H) is dL/dy_j = g (1[j = t] - p_j) - h p_j (y_j - lse + H).
- Class-index rows keep the target t out of s (`s_excl`), so that 1 - p_t = s_excl / s_all keeps
  its relative precision when p_t -> 1. lse = m + log(s_excl + exp(y_t - m)) (`class_row_lse`);
  from the log-odds against the target, lr = log(s_excl) - (y_t - m): logp_t = log p_t =
  -softplus(lr), log1mp = log(1 - p_t) = -softplus(-lr) (`target_log_probs`).
- `ce`, the smoothed weighted cross-entropy of a class row, with smoothing eps, class weights w
  (1 without) and W = sum_j w_j: ce = (1 - eps) w_t (-logp_t) + eps/C (W lse - sum_j w_j y_j).
- The focal factor F = a_t (1 - p_t)^gamma = a_t exp(gamma log1mp) (`focal_q` is the power); the
  row loss is F ce + z lse^2 (z the z-loss weight).
- Probability-target rows, q'_j = (1 - eps) q_j + eps/C: S = sum_j w_j q'_j and the row loss is
  S lse - sum_j w_j q'_j y_j + z lse^2.
- The row gradient, `RowGrad` (off, coef, cq0, cq1, gt): for j != t
      dL/dx_j = (coef exp(y_j - off) - w_j (cq1 q_j + cq0)) dy_j/dx_j
  and dL/dx_t = gt (which carries dy_t/dx_t); every coefficient already includes the gradient's
  scale (1/divisor for 'mean'). Class rows (`class_row_grad`): off = lse, coef = cp with
  cp = F ((1 - eps) w_t + eps/C W) + 2 z lse the coefficient of p_j, cq0 = F eps/C, cq1 = 0. With
  focal (gamma > 0) the same single exponential carries both terms: off = lse + log1mp makes
  exp(y_j - off) = r_j = p_j / (1 - p_t), and coef = cp (1 - p_t) + ce dF with
  dF = a_t gamma (1 - p_t)^gamma p_t (F's derivative through r_j); r_j stays finite when 1 - p_t
  underflows, and no (1 - p_t)^(gamma - 1) is ever formed. gt = dt (F (-(1 - eps) w_t (1 - p_t)
  + eps/C (W p_t - w_t)) - ce dF + 2 z lse p_t). Probability rows (`soft_row_grad`): off = lse,
  coef = S + 2 z lse, cq1 = 1 - eps, cq0 = eps/C, no target term.
- NaN and inf. A NaN or +inf logit makes its row's loss and gradient NaN, as torch's log_softmax
  does (a +inf max gives inf - inf); -inf logits are legal (masked lanes are -inf too). The max
  cannot be trusted with a NaN: a GPU's max drops it (max(NaN, x) = x). The sums carry it instead:
  exp(y - m) of a NaN y is NaN whatever m is, and a NaN s stays NaN through every rescale and merge
  (NaN * 0 is NaN); a NaN target logit, kept out of s_excl, reaches lse and lr through y_t. What
  comes after the sums must pass NaN on: no min/max clamp of a value that may be NaN (softplus has
  none) and no select that replaces one (class_row_lse subtracts safe_max(m) rather than selecting 0
  for an all -inf row, so a NaN y_t beside only -inf logits stays NaN).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class RowGrad(NamedTuple):
    off: torch.Tensor
    coef: torch.Tensor
    cq0: torch.Tensor
    cq1: torch.Tensor
    gt: torch.Tensor


def exp_diff(y, m):
    return torch.exp(y - m)


def safe_max(m):
    """m, or 0 where m is -inf (rows or parts with nothing in them), so that y - m is never -inf - -inf."""
    return torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)


def merge(m_a, s_a, m_b, s_b):
    """Two partial (max, sum of exp) results of the same rows as one."""
    m = torch.maximum(m_a, m_b)
    safe = safe_max(m)
    return m, s_a * exp_diff(m_a, safe) + s_b * exp_diff(m_b, safe)


def online_step(m, s, block):
    """The rows' running (max, sum of exp) after one more block of their values (rows, k), k >= 1: the
    block's own max and sum, merged (the Triton core's `online_step` on whole blocks)."""
    block_m = block.max(dim=1).values
    return merge(m, s, block_m, exp_diff(block, safe_max(block_m)[:, None]).sum(dim=1))


def online_lse(y, chunk):
    """(m, s) of each row of y, accumulated chunk by chunk as a streaming kernel does."""
    m = torch.full(y.shape[:1], float("-inf"), dtype=y.dtype, device=y.device)
    s = torch.zeros(y.shape[:1], dtype=y.dtype, device=y.device)
    for start in range(0, y.shape[1], chunk):
        m, s = online_step(m, s, y[:, start:start + chunk])
    return m, s


def softplus(v):
    return F.softplus(v)


def class_row_lse(m, s_excl, y_t):
    """lse of class rows from the max m, the sum s_excl of exp(y_j - m) over j != t and y_t."""
    return m + torch.log(s_excl + exp_diff(y_t, m))


def target_log_probs(m, s_excl, y_t):
    """(logp_t, log1mp) of class rows from the same three quantities, through the log-odds."""
    lr = torch.log(s_excl) - (y_t - m)
    return -softplus(lr), -softplus(-lr)


def focal_q(log1mp, gamma: float):
    return torch.ones_like(log1mp) if gamma == 0.0 else torch.exp(gamma * log1mp)


def class_row_grad(lse, ce, log1mp, logp_t, *, w_t, a_t, W, C, eps, z, gamma, scale, dt):
    """The RowGrad of class-index rows (see the module docstring)."""
    eps1, epsC = 1.0 - eps, eps / C
    q = focal_q(log1mp, gamma)
    f = a_t * q
    pt, omp = torch.exp(logp_t), torch.exp(log1mp)
    cp = f * (eps1 * w_t + epsC * W) + 2.0 * z * lse
    dF = a_t * gamma * q * pt if gamma > 0.0 else torch.zeros_like(lse)
    ce_dF = torch.where(dF != 0, ce * dF, torch.zeros_like(dF))
    via_r = (gamma > 0.0) & (log1mp > float("-inf"))
    off = torch.where(via_r, lse + log1mp, lse)
    coef = scale * torch.where(via_r, cp * omp + ce_dF, cp)
    gt = scale * dt * (f * (-eps1 * w_t * omp + epsC * (W * pt - w_t)) - ce_dF + 2.0 * z * lse * pt)
    return RowGrad(off, coef, scale * f * epsC, torch.zeros_like(lse), gt)


def soft_row_grad(lse, S, *, C, eps, z, scale):
    """The RowGrad of probability-target rows."""
    one = torch.ones_like(lse)
    return RowGrad(lse, scale * (S + 2.0 * z * lse), scale * eps / C * one, scale * (1.0 - eps) * one,
                   torch.zeros_like(lse))


def row_gradient(rg: RowGrad, y, slope, w, q=None, target=None):
    """dL/dx for rows (M, C) from their RowGrad; w (C,) class weights or 1, q the probability targets."""
    q = torch.zeros_like(y) if q is None else q
    g = (rg.coef[:, None] * exp_diff(y, rg.off[:, None]) - w * (rg.cq1[:, None] * q + rg.cq0[:, None])) * slope
    if target is not None:
        g = g.scatter(1, target[:, None], rg.gt[:, None])
    return g
