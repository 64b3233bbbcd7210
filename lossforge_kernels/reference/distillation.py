"""Divergences between a student's and a teacher's softmax over the vocabulary, in plain PyTorch: the
ground truth for the fused distillation heads (the kernels are to come; the public functions are not
published yet).

With p_s = softmax(student_logits / temperature) and p_t = softmax(teacher_logits / temperature), per
position: "kl" KL(p_t || p_s); "reverse_kl" KL(p_s || p_t); "jsd" beta KL(p_t || m) + (1 - beta)
KL(p_s || m) with m = beta p_t + (1 - beta) p_s, 0 < beta < 1. No temperature-squared factor.
`target` only masks (positions equal to ignore_index count for nothing); 'mean' averages over the
counted positions, 'sum' adds, 'none' gives each position's divergence (0 where masked). Computed in
float32 (float64 for float64 input); gradients reach the student's tensors only (the teacher's are
detached here; the public layer refuses a teacher tensor that requires grad).
"""
from __future__ import annotations

import enum

import torch

from .cross_entropy import compute_dtype


class Divergence(enum.IntEnum):
    """The per-position divergence; the public API takes the lower-case names, the kernel ops the
    values (triton_kernels/distillation.py holds the same constants, checked by tests/test_distillation.py)."""
    KL = 0
    REVERSE_KL = 1
    JSD = 2


DIVERGENCES = tuple(d.name.lower() for d in Divergence)  # ("kl", "reverse_kl", "jsd")


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """sum_j a_j (log a_j - log b_j) over the last dimension, with 0 log 0 = 0 (a NaN stays NaN); the
    select is inside the product, so that autograd also gives a_j = 0 the gradient 0, not NaN."""
    a = log_a.exp()
    return (a * torch.where(a == 0, 0.0, log_a - log_b)).sum(-1)


def _log_mix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(e^a + e^b), exact where either is tiny; -inf where both are, with the gradient 0 there
    (logaddexp's own backward gives e^(-inf - -inf) = NaN)."""
    both = (a == float("-inf")) & (b == float("-inf"))
    return torch.where(both, float("-inf"), torch.logaddexp(torch.where(both, 0.0, a), torch.where(both, 0.0, b)))


def per_position(student: torch.Tensor, teacher: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """Per-position divergence of two (..., V) logit tensors already divided by the temperature."""
    log_s = torch.log_softmax(student, dim=-1)
    log_t = torch.log_softmax(teacher.detach(), dim=-1)
    if kind == "kl":
        return _kl(log_t, log_s)
    if kind == "reverse_kl":
        return _kl(log_s, log_t)
    if kind != "jsd":
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {kind!r}")
    log_m = _log_mix(log_t + torch.log(torch.tensor(beta, dtype=log_t.dtype)),
                     log_s + torch.log(torch.tensor(1.0 - beta, dtype=log_s.dtype)))
    return beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)


def _reduce(rows: torch.Tensor, keep: torch.Tensor, reduction: str) -> torch.Tensor:
    rows = torch.where(keep, rows, 0.0)
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if reduction == "sum" else total / keep.sum()


def distillation_loss(student_logits, teacher_logits, target=None, *, divergence="kl", beta=0.5, temperature=1.0,
                      ignore_index=-100, reduction="mean"):
    dtype = compute_dtype(student_logits.dtype)
    s = student_logits.to(dtype) / temperature
    t = teacher_logits.to(dtype) / temperature
    rows = per_position(s, t, divergence, beta)
    keep = torch.ones_like(rows, dtype=torch.bool) if target is None else target != ignore_index
    return _reduce(rows, keep, reduction)


def linear_distillation_loss(student_input, student_weight, teacher_input, teacher_weight, target=None, *,
                             student_bias=None, teacher_bias=None, divergence="kl", beta=0.5, temperature=1.0,
                             ignore_index=-100, reduction="mean"):
    dtype = compute_dtype(student_input.dtype)

    def head(x, w, b):
        z = x.to(dtype) @ w.to(dtype).T
        return z if b is None else z + b.to(dtype)

    return distillation_loss(head(student_input, student_weight, student_bias),
                             head(teacher_input, teacher_weight, teacher_bias), target, divergence=divergence,
                             beta=beta, temperature=temperature, ignore_index=ignore_index, reduction=reduction)
