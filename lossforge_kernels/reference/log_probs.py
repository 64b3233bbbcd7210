"""Per-token log-probabilities and entropy of a softmax head, in plain PyTorch: the ground truth for
the fused RL heads (the kernels are to come; the public functions are not published yet).

With z = logits / temperature (for the linear form, z = (input @ weight.T + bias) / temperature):
log_probs = log_softmax(z)[target], entropy = -sum_j p_j log p_j with p = softmax(z), both float32
(float64 for float64 input) and 0 where the target is ignore_index. Differentiable with respect to
the logits (or input, weight and bias) for any grad_outputs of both results at once.
"""
from __future__ import annotations

import torch

from .cross_entropy import compute_dtype


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    z = logits.to(compute_dtype(logits.dtype))
    return z if temperature == 1.0 else z / temperature


def token_log_probs(z: torch.Tensor, target: torch.Tensor, ignore_index: int, return_entropy: bool):
    """log_softmax(z)[target] (and the entropy) over z's last dimension, 0 at ignored positions."""
    logp = torch.log_softmax(z, dim=-1)
    keep = target != ignore_index
    picked = logp.gather(-1, torch.where(keep, target, 0).unsqueeze(-1)).squeeze(-1)
    out = torch.where(keep, picked, 0.0)
    if not return_entropy:
        return out
    p = logp.exp()
    # p log p is 0 where p is 0 (a -inf logit), not 0 * -inf; a NaN p stays NaN. The select is inside
    # the product so that autograd too sees 0 there (d(p log p)/dp = log p = -inf would spread NaN).
    entropy = -(p * torch.where(p == 0, 0.0, logp)).sum(-1)
    return out, torch.where(keep, entropy, 0.0)


def log_probs(logits, target, *, temperature=1.0, return_entropy=False, ignore_index=-100):
    return token_log_probs(_scaled(logits, temperature), target, ignore_index, return_entropy)


def linear_log_probs(input, linear_weight, target, *, linear_bias=None, temperature=1.0, return_entropy=False,
                     ignore_index=-100):
    dtype = compute_dtype(input.dtype)
    logits = input.to(dtype) @ linear_weight.to(dtype).T
    if linear_bias is not None:
        logits = logits + linear_bias.to(dtype)
    return token_log_probs(_scaled(logits, temperature), target, ignore_index, return_entropy)
