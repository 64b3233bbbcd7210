"""Sigmoid (binary, per-element) focal loss in plain PyTorch, with torchvision's semantics.

torchvision.ops.sigmoid_focal_loss: ce = BCE-with-logits, p_t = p*t + (1-p)*(1-t),
loss = ce * (1 - p_t)**gamma, times alpha*t + (1-alpha)*(1-t) when alpha >= 0.
Computed in float32 (float64 for float64 input); 1 - p_t is formed from sigmoid(x) and
sigmoid(-x) so that it does not cancel to 0 for large |x|.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .cross_entropy import compute_dtype


def sigmoid_focal_elements(input, target, alpha=0.25, gamma=2.0):
    ct = compute_dtype(input.dtype)
    x, t = input.to(ct), target.to(ct)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p, one_minus_p = torch.sigmoid(x), torch.sigmoid(-x)
    one_minus_pt = p * (1 - t) + one_minus_p * t
    if gamma == 0.0:
        loss = ce
    else:
        # pow has an infinite slope at 0 for gamma < 1; clamping the base keeps autograd finite and
        # changes the value by less than tiny**gamma.
        loss = ce * one_minus_pt.clamp_min(torch.finfo(ct).tiny) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss


def sigmoid_focal_loss(input, target, *, alpha=0.25, gamma=2.0, reduction="none"):
    loss = sigmoid_focal_elements(input, target, alpha, gamma)
    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    return loss.to(input.dtype)
