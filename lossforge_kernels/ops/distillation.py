"""Kernel ops of the distillation family (a divergence between a student's and a teacher's softmax
over the vocabulary) and their specs.

Kernel contract, the same for every kernel backend (M rows of V classes of each head; the maths of
reference/distillation.py, the per-element formulas in triton_kernels/distillation.py):

distillation_fwd_<b>(student, teacher, target, grad_factor, loss, stats, grad, divergence, beta,
                     temperature, ignore_index) -> ()
  student, teacher  (M, V) fp32/fp16/bf16, one dtype for both (the kernels read the two rows in the
           same 16-byte packets), stride(1) == 1, any stride(0)
  target   (M,) int64 contiguous, or None: rows equal to ignore_index count for nothing
  grad_factor  0-dim fp32, the gradient's multiplier (1/divisor for 'mean', 1 for 'sum'), given
           exactly when grad is
  loss     out (M,) fp32 contiguous: each row's divergence (0 on masked rows)
  stats    out (M, 5) fp32 contiguous, what the backward needs: [max and log sum-exp-minus-max of the
           student's z, the same of the teacher's, the row's Gbar]
  grad     out (M, V) in student's dtype, stride(1) == 1, rows not overlapping, or None: d(loss)/d(student)
           times grad_factor; it may be the student's logits themselves (read before overwritten)
  divergence  a Divergence value (0 kl, 1 reverse_kl, 2 jsd); beta in (0, 1) for jsd
  NaN or +inf logits, or a row of only -inf, give NaN, as torch does.

distillation_bwd_<b>(grad_rows, student, teacher, target, stats, grad, divergence, ...) -> ()
  grad_rows (M,) fp32 contiguous: writes grad = grad_rows[i] * d loss_i / d student (0 on masked rows).

The linear form walks the rows in chunks (ops/_chunks.py): per chunk one product for each head's
logits and the forward kernel, which writes the student's logit gradient over its logits when
reduction is 'mean'/'sum'; two products turn that into the student's input and weight gradients.
8 N D V FLOPs with gradients ('none': 12, the backward recomputes both heads' logits); two chunks
of logits of extra memory. No teacher gradient: the public layer refuses a teacher that requires one.
"""
from __future__ import annotations

import torch

from ..reference.distillation import Divergence
from ._chunks import F32, Chunks, Gradients
from ._contracts import KERNEL_DTYPES, fail, require_choice, require_grad_factor, require_tensor
from ._library import KernelOp
from .builder import FusedLoss, build

PARAMS = ("int divergence", "float beta", "float temperature", "int ignore_index")
LINEAR_PARAMS = PARAMS + ("int? chunk_size", "bool fp32_weight_grad")
_PARAMS = ", ".join(PARAMS)


def _check_rows(op, student, teacher, target, grad, divergence, beta, temperature):
    for name, t in (("student", student), ("teacher", teacher)):
        if t.dim() != 2 or t.dtype not in KERNEL_DTYPES or (t.shape[1] > 1 and t.stride(1) != 1):
            fail(op, f"{name} must be a 2-D fp32/fp16/bf16 tensor with unit column stride, got shape "
                     f"{tuple(t.shape)}, dtype {t.dtype}, strides {t.stride()}")
    rows, classes = student.shape
    if teacher.shape != student.shape or teacher.device != student.device:
        fail(op, f"teacher must have student's shape {tuple(student.shape)} on {student.device}, got shape "
                 f"{tuple(teacher.shape)} on {teacher.device}")
    if teacher.dtype != student.dtype:
        fail(op, f"teacher must have student's dtype {student.dtype}, got {teacher.dtype}", TypeError)
    if classes == 0 and rows > 0:
        fail(op, f"student must have at least one class, got shape {tuple(student.shape)}")
    if target is not None:
        require_tensor(op, "target", target, (rows,), student, torch.int64)
    if grad is not None and (grad.shape != student.shape or grad.dtype != student.dtype or grad.device != student.device
                             or (classes > 1 and grad.stride(1) != 1) or (rows > 1 and grad.stride(0) < classes)):
        fail(op, f"grad must match student (shape {tuple(student.shape)}, dtype {student.dtype}, unit column "
                 f"stride, rows not overlapping), got shape {tuple(grad.shape)}, dtype {grad.dtype}, strides "
                 f"{grad.stride()}")
    require_choice(op, "divergence", divergence, Divergence)
    if divergence == Divergence.JSD and not 0.0 < beta < 1.0:
        fail(op, f"beta must be in (0, 1) for jsd, got {beta}")
    if not temperature > 0.0 or temperature == float("inf"):
        fail(op, f"temperature must be finite and > 0, got {temperature}")


def _check_fwd(student, teacher, target, grad_factor, loss, stats, grad, divergence, beta, temperature, ignore_index):
    op = "distillation_fwd"
    _check_rows(op, student, teacher, target, grad, divergence, beta, temperature)
    require_grad_factor(op, grad_factor, grad, student)
    require_tensor(op, "loss", loss, (student.shape[0],), student)
    require_tensor(op, "stats", stats, (student.shape[0], 5), student)


def _check_bwd(grad_rows, student, teacher, target, stats, grad, divergence, beta, temperature, ignore_index):
    op = "distillation_bwd"
    _check_rows(op, student, teacher, target, grad, divergence, beta, temperature)
    require_tensor(op, "grad_rows", grad_rows, (student.shape[0],), student)
    require_tensor(op, "stats", stats, (student.shape[0], 5), student)


FWD = KernelOp("distillation_fwd", "(Tensor student, Tensor teacher, Tensor? target, Tensor? grad_factor, "
                                   f"Tensor(a!) loss, Tensor(b!) stats, Tensor(c!)? grad, {_PARAMS}) -> ()",
               check=_check_fwd)
BWD = KernelOp("distillation_bwd", "(Tensor grad_rows, Tensor student, Tensor teacher, Tensor? target, Tensor stats, "
                                   f"Tensor(a!) grad, {_PARAMS}) -> ()", check=_check_bwd)


def _triton():
    from ..triton_kernels import distillation as kernels  # Triton is optional: loaded at the first Triton call

    return kernels


FWD.implement_triton(lambda *args: _triton().distillation_fwd(*args))
BWD.implement_triton(lambda *args: _triton().distillation_bwd(*args))


# ---- the specs for the op builder ---------------------------------------------------------------

def _options(p) -> dict:
    return dict(divergence=p.divergence, beta=p.beta, temperature=p.temperature, ignore_index=p.ignore_index)


def _rows(n, like):
    return like.new_empty(n, dtype=F32), like.new_empty(n, 5, dtype=F32)


def _forward(backend, tensors, params, grads, grad_factor, reduce):
    student, teacher, target = tensors
    loss, stats = _rows(student.shape[0], student)
    FWD[backend](student, teacher, target, grad_factor, loss, stats, None if grads is None else grads[0],
                 **_options(params))
    return (loss.sum() if reduce else loss), (stats,)


def _backward(backend, grad_rows, tensors, saved, params, grads):
    student, teacher, target = tensors
    BWD[backend](grad_rows.reshape(-1).to(F32).contiguous(), student, teacher, target, saved[0], grads[0],
                 **_options(params))


def _counted_rows(backend, tensors, params):
    """'mean''s divisor: the positions the target does not mask (all of them without a target)."""
    target = tensors[-1]
    return tensors[0].shape[0] if target is None else (target != params.ignore_index).sum()


SPEC = FusedLoss(name="distillation", tensors=("student_logits", "teacher_logits", "target?"), params=PARAMS,
                 differentiable=("student_logits",), n_saved=1, forward=_forward, backward=_backward,
                 mean_divisor=_counted_rows, out_dtype=lambda tensors, params: F32)
distillation_kernels = build(SPEC)


def _head_chunks(tensors, chunk_size):
    """The student's and the teacher's chunks of logits, of the same rows (two buffers in the budget)."""
    student = Chunks(*tensors[:3], chunk_size, buffers=2)
    return student, Chunks(*tensors[3:6], student.step)


def _linear_forward(backend, tensors, params, grads, grad_factor, reduce):
    target = tensors[6]
    n = tensors[0].shape[0]
    loss, stats = _rows(n, tensors[0])
    student, teacher = _head_chunks(tensors, params.chunk_size)
    sink = None if grads is None else Gradients(grads, tensors[1], params.fp32_weight_grad)
    fwd = FWD[backend]
    for (start, stop, s_logits), (_, _, t_logits) in zip(student, teacher):
        # with a gradient, the kernel writes d(loss)/d(student logits) over the student's logits
        fwd(s_logits, t_logits, None if target is None else target[start:stop], grad_factor, loss[start:stop],
            stats[start:stop], None if sink is None else s_logits, **_options(params))
        if sink is not None:
            sink.add(student, start, stop, s_logits)
    if sink is not None:
        sink.finish()
    return (loss.sum() if reduce else loss), (stats,)


def _linear_backward(backend, grad_rows, tensors, saved, params, grads):
    target = tensors[6]
    grad_rows = grad_rows.reshape(-1).to(F32).contiguous()
    student, teacher = _head_chunks(tensors, params.chunk_size)
    sink = Gradients(grads, tensors[1], params.fp32_weight_grad)
    bwd = BWD[backend]
    for (start, stop, s_logits), (_, _, t_logits) in zip(student, teacher):
        bwd(grad_rows[start:stop], s_logits, t_logits, None if target is None else target[start:stop],
            saved[0][start:stop], s_logits, **_options(params))
        sink.add(student, start, stop, s_logits)
    sink.finish()


def _linear_rows_fake(tensors, params):
    """Written out: the forward's chunk loop would fix the row count of a dynamic shape."""
    return _rows(tensors[0].shape[0], tensors[0])


LINEAR_SPEC = FusedLoss(
    name="linear_distillation",
    tensors=("student_input", "student_weight", "student_bias?", "teacher_input", "teacher_weight", "teacher_bias?",
             "target?"),
    params=LINEAR_PARAMS, differentiable=("student_input", "student_weight", "student_bias"), n_saved=1,
    forward=_linear_forward, backward=_linear_backward, mean_divisor=_counted_rows, rows_fake=_linear_rows_fake,
    out_dtype=lambda tensors, params: F32)
linear_distillation_kernels = build(LINEAR_SPEC)
