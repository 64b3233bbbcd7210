"""Linear layer + softmax cross-entropy in plain PyTorch: the ground truth for fused linear CE.

The logits input @ linear_weight.T + linear_bias are materialised in float32 (float64 for float64
input), then reference/cross_entropy.py computes the loss; the result is in the input's dtype.
"""
from __future__ import annotations

import torch.nn.functional as F

from .cross_entropy import compute_dtype, cross_entropy


def linear_cross_entropy(input, linear_weight, target, linear_bias=None, weight=None, **options):
    """Loss of (N, D) rows against (V, D) class vectors and (N,) class indices; `options` as cross_entropy's."""
    ct = compute_dtype(input.dtype)
    bias = None if linear_bias is None else linear_bias.to(ct)
    logits = F.linear(input.to(ct), linear_weight.to(ct), bias)
    return cross_entropy(logits, target, weight, **options).to(input.dtype)
