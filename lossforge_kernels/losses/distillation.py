"""Public distillation losses (a divergence between a student's and a teacher's softmax over the
vocabulary): distillation_loss, linear_distillation_loss and their modules.

Checks arguments, refuses a teacher tensor that requires grad (its gradient is never computed),
flattens the leading dimensions into rows and picks the backend. The maths lives in
reference/distillation.py and in the kernels behind ops/distillation.py; the linear form's kernel
path never holds more than a chunk of either head's logits.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import _autocast as AC
from .. import _checks as C
from .._backends import BACKENDS, LossKernels, register_kernels, resolve_backend
from ..distributed.distillation import vocab_parallel_distillation, vocab_parallel_linear_distillation
from ..ops.distillation import distillation_kernels, linear_distillation_kernels
from ..reference import distillation as ref
from ..reference.distillation import DIVERGENCES, Divergence
from .cross_entropy import check_sharding
from .linear_cross_entropy import check_chunk_size
from .log_probs import check_head, check_temperature, check_token_target

FAMILY = "distillation"
# auto's order: Triton first until the bench has measured both on a GPU; the CUDA kernels
# (csrc/distillation.cuh) are designed for the same traffic (per logit of each head: forward 2 reads,
# 3 reads with the gradient, which adds 1 write), so nothing yet says which is faster.
register_kernels(FAMILY, LossKernels(backends=("triton", "cuda"), gradients_of="the student's tensors"))


def _options(divergence, beta, temperature, ignore_index, reduction, backend):
    """The options, checked: (divergence, beta, temperature, ignore_index, reduction)."""
    C.check_choice("divergence", divergence, DIVERGENCES)
    beta = C.check_float("beta", beta, finite=True)
    if divergence == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1) for divergence='jsd', got {beta}")
    C.check_choice("backend", backend, BACKENDS)
    return (divergence, beta, check_temperature(temperature), C.check_int("ignore_index", ignore_index),
            C.check_reduction(reduction))


def refuse_teacher_gradients(**teacher):
    """The teacher's tensors get no gradient: one that requires grad is refused by name rather than
    left silently without one (detach it, or compute the teacher under torch.no_grad())."""
    if not torch.is_grad_enabled():
        return
    for name, t in teacher.items():
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise ValueError(f"{name} requires grad, but distillation computes gradients for the student only; "
                             f"pass {name}.detach() or compute the teacher under torch.no_grad()")


def _check_target(target, leading, input_name, device_of):
    if target is not None:
        check_token_target(target, leading, input_name)
        C.check_same_device(input_name, device_of, target=target)
        return target.reshape(-1).to(torch.int64).contiguous()
    return None


def _finish(loss, reduction, shape):
    return loss.reshape(shape) if reduction == "none" else loss


def distillation_loss(student_logits, teacher_logits, target=None, *, divergence="kl", beta=0.5, temperature=1.0,
                      ignore_index=-100, reduction="mean", process_group=None, vocab_start=None, backend="auto"):
    """The divergence between softmax(teacher_logits / T) and softmax(student_logits / T) per position:
    "kl" KL(p_t || p_s), "reverse_kl" KL(p_s || p_t), "jsd" beta KL(p_t || m) + (1 - beta) KL(p_s || m)
    with m = beta p_t + (1 - beta) p_s. No T**2 factor (multiply by it yourself for Hinton's
    scaling). student_logits and teacher_logits (..., V), one dtype; `target` (...) only masks:
    positions equal to ignore_index count for nothing ('mean' averages over the others). Float32
    result (float64 for float64 logits); gradients reach student_logits only, and a teacher_logits that
    requires grad is refused.
    `process_group`: vocabulary-parallel (see distributed/distillation.py): both logits hold this rank's
    slice of the classes, from `vocab_start` (default: the slices in rank order); every rank returns the
    loss of the unsharded call and the gradient of its student slice."""
    C.check_tensor("student_logits", student_logits, min_ndim=1, float_only=True)
    C.check_tensor("teacher_logits", teacher_logits, float_only=True)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits must have student_logits' shape {tuple(student_logits.shape)}, got "
                         f"{tuple(teacher_logits.shape)}")
    if teacher_logits.dtype != student_logits.dtype:
        raise TypeError(f"teacher_logits must have student_logits' dtype {student_logits.dtype}, got "
                        f"{teacher_logits.dtype}")
    C.check_same_device("student_logits", student_logits, teacher_logits=teacher_logits)
    divergence, beta, temperature, ignore_index, reduction = _options(divergence, beta, temperature, ignore_index,
                                                                      reduction, backend)
    refuse_teacher_gradients(teacher_logits=teacher_logits)
    flat_target = _check_target(target, student_logits.shape[:-1], "student_logits", student_logits)
    num_classes = student_logits.shape[-1]
    if check_sharding(process_group, vocab_start):
        loss = vocab_parallel_distillation(
            student_logits.reshape(-1, num_classes), teacher_logits.reshape(-1, num_classes), flat_target,
            divergence=divergence, beta=beta, temperature=temperature, ignore_index=ignore_index,
            reduction=reduction, process_group=process_group, vocab_start=vocab_start)
        return _finish(loss, reduction, student_logits.shape[:-1])
    chosen = resolve_backend(backend, FAMILY, student_logits)
    autocast = AC.autocast_dtype(student_logits)
    with AC.off(student_logits):
        if chosen == "reference" or student_logits.numel() == 0:
            return ref.distillation_loss(AC.widen(student_logits, autocast), AC.widen(teacher_logits, autocast),
                                         target, divergence=divergence, beta=beta, temperature=temperature,
                                         ignore_index=ignore_index, reduction=reduction)
        rows = [t.reshape(-1, num_classes) for t in (student_logits, teacher_logits)]
        rows = [r if num_classes <= 1 or r.stride(1) == 1 else r.contiguous() for r in rows]
        loss = distillation_kernels((*rows, flat_target), _kernel_options(divergence, beta, temperature, ignore_index),
                                    reduction=reduction, backend=chosen)
    return _finish(loss, reduction, student_logits.shape[:-1])


def _kernel_options(divergence, beta, temperature, ignore_index):
    return dict(divergence=int(Divergence[divergence.upper()]), beta=beta, temperature=temperature,
                ignore_index=ignore_index)


def linear_distillation_loss(student_input, student_weight, teacher_input, teacher_weight, target=None, *,
                             student_bias=None, teacher_bias=None, divergence="kl", beta=0.5, temperature=1.0,
                             ignore_index=-100, reduction="mean", chunk_size=None, process_group=None, vocab_start=None,
                             reduce_input_grad=True, backend="auto"):
    """distillation_loss(student_input @ student_weight.T + student_bias, teacher_input @ teacher_weight.T
    + teacher_bias, target, ...) without either head's (N, V) logits.

    student_input (..., Ds), student_weight (V, Ds); teacher_input (..., Dt), teacher_weight (V, Dt); one
    dtype (outside torch.autocast). The kernel backends compute both heads' logits `chunk_size` rows at a
    time (None: the shared budget rule of ops/_chunks.py, for two buffers) and accumulate the student's
    weight and bias gradients in float32. The teacher's tensors must not require grad.
    `process_group`: vocabulary-parallel (see distributed/distillation.py): both weights (V_r, D) and
    biases are this rank's rows of the heads, from `vocab_start` (default: in rank order), the inputs are
    the same on every rank; every rank returns the unsharded loss, the gradients of its student rows
    and the full student input gradient (`reduce_input_grad=False`: this rank's part of it)."""
    check_head("student_input", student_input, "student_weight", student_weight, "student_bias", student_bias)
    check_head("teacher_input", teacher_input, "teacher_weight", teacher_weight, "teacher_bias", teacher_bias)
    if teacher_input.shape[:-1] != student_input.shape[:-1] or teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(f"teacher_input and teacher_weight must give student's positions and classes "
                         f"{tuple(student_input.shape[:-1])} x {student_weight.shape[0]}, got "
                         f"{tuple(teacher_input.shape[:-1])} x {teacher_weight.shape[0]}")
    if AC.autocast_dtype(student_input) is None and teacher_input.dtype != student_input.dtype:
        raise TypeError(f"teacher_input must have student_input's dtype {student_input.dtype} (outside "
                        f"torch.autocast), got {teacher_input.dtype}")
    C.check_same_device("student_input", student_input, teacher_input=teacher_input)
    divergence, beta, temperature, ignore_index, reduction = _options(divergence, beta, temperature, ignore_index,
                                                                      reduction, backend)
    chunk_size = check_chunk_size(chunk_size)
    C.check_bool("reduce_input_grad", reduce_input_grad)
    refuse_teacher_gradients(teacher_input=teacher_input, teacher_weight=teacher_weight, teacher_bias=teacher_bias)
    flat_target = _check_target(target, student_input.shape[:-1], "student_input", student_input)
    heads = [student_input.reshape(-1, student_input.shape[-1]), student_weight, student_bias,
             teacher_input.reshape(-1, teacher_input.shape[-1]), teacher_weight, teacher_bias]
    if check_sharding(process_group, vocab_start):
        loss = vocab_parallel_linear_distillation(
            *[t if t is None else t.contiguous() for t in heads], flat_target, divergence=divergence, beta=beta,
            temperature=temperature, ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size,
            reduce_input_grad=reduce_input_grad, process_group=process_group, vocab_start=vocab_start)
        return _finish(loss, reduction, student_input.shape[:-1])
    chosen = resolve_backend(backend, FAMILY, student_input)
    autocast = AC.autocast_dtype(student_input)
    with AC.off(student_input):
        if chosen == "reference" or heads[0].shape[0] == 0 or student_weight.shape[0] == 0:
            sx, sw, sb, tx, tw, tb = (AC.round_operand(t, autocast, reference=True) for t in heads)
            loss = ref.linear_distillation_loss(sx, sw, tx, tw, flat_target, student_bias=sb, teacher_bias=tb,
                                                divergence=divergence, beta=beta, temperature=temperature,
                                                ignore_index=ignore_index, reduction=reduction)
        else:
            sx, sw, sb, tx, tw, tb = heads
            sx, tx = (AC.round_operand(t, autocast, reference=False).contiguous() for t in (sx, tx))
            tensors = (sx, sw.contiguous(), sb, tx, tw.contiguous(), tb, flat_target)
            options = dict(_kernel_options(divergence, beta, temperature, ignore_index), chunk_size=chunk_size,
                           fp32_weight_grad=True)
            loss = linear_distillation_kernels(tensors, options, reduction=reduction, backend=chosen)
    return _finish(loss, reduction, student_input.shape[:-1])


class DistillationLoss(nn.Module):
    """Module form of distillation_loss: forward(student_logits, teacher_logits, target=None)."""

    def __init__(self, *, divergence="kl", beta=0.5, temperature=1.0, ignore_index=-100, reduction="mean",
                 process_group=None, vocab_start=None, backend="auto"):
        super().__init__()
        _options(divergence, beta, temperature, ignore_index, reduction, backend)
        C.check_process_group(process_group)
        self.options = dict(divergence=divergence, beta=beta, temperature=temperature, ignore_index=ignore_index,
                            reduction=reduction, process_group=process_group, vocab_start=vocab_start,
                            backend=backend)

    def forward(self, student_logits, teacher_logits, target=None):
        return distillation_loss(student_logits, teacher_logits, target, **self.options)


class LinearDistillationLoss(DistillationLoss):
    """Module form of linear_distillation_loss: forward(student_input, student_weight, teacher_input,
    teacher_weight, target=None, student_bias=None, teacher_bias=None)."""

    def __init__(self, *, chunk_size=None, reduce_input_grad=True, **options):
        super().__init__(**options)
        self.options.update(chunk_size=check_chunk_size(chunk_size),
                            reduce_input_grad=C.check_bool("reduce_input_grad", reduce_input_grad))

    def forward(self, student_input, student_weight, teacher_input, teacher_weight, target=None, student_bias=None,
                teacher_bias=None):
        return linear_distillation_loss(student_input, student_weight, teacher_input, teacher_weight, target,
                                        student_bias=student_bias, teacher_bias=teacher_bias, **self.options)


# The family's public API (functional.py, modules.py and the package export exactly these).
FUNCTIONS = (distillation_loss, linear_distillation_loss)
MODULES = (DistillationLoss, LinearDistillationLoss)
