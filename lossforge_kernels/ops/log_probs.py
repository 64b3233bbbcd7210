"""Kernel ops of the per-token log-probs and entropy family (the RL heads) and their specs.

Kernel contract, the same for every kernel backend (M rows of V classes, z = logits / temperature;
the quantities and the gradient formula are those of reference/row_softmax.py, "Entropy rows"):

log_probs_fwd_<b>(logits, target, out, stats, ignore_index, temperature) -> ()
  logits   (M, V) fp32/fp16/bf16, stride(1) == 1, any stride(0)
  target   (M,) int64 contiguous class indices
  out      out (M, 2) fp32 contiguous: [log_softmax(z)[target], entropy of softmax(z)]
  stats    out (M, 3) fp32 contiguous, what the backward needs: [max of z, log sum e^(z - max), entropy]
  Ignored rows: out and stats 0. A target outside [0, V) that is not ignore_index: NaN, and nothing
  outside the row is read. NaN or +inf logits, or a row of only -inf, give NaN, as torch does.

log_probs_bwd_<b>(grad_rows, logits, target, stats, grad, ignore_index, temperature) -> ()
  grad_rows (M, 2) fp32 contiguous: the grad_outputs of out's two columns; stats as the forward wrote them
  grad     out (M, V) in logits' dtype, stride(1) == 1, rows not overlapping; it may be the logits
           themselves (every element is read before it is overwritten). 0 on ignored rows.

The public layer gets both results as one (M, 2) float32 'none' output of the op builder, so
autograd hands the backward both grad_outputs at once (0 for a result not used). The linear form
walks the rows in chunks (ops/_chunks.py): forward one product per chunk and the forward kernel;
backward the product again, the backward kernel over the chunk's logits in place and the two
products of the input and weight gradients: 8 N D V FLOPs with gradients (the forward cannot write
the gradient: its grad_outputs are not known yet), one chunk of logits of extra memory.
"""
from __future__ import annotations

import torch

from ._chunks import F32, Chunks, Gradients
from ._contracts import KERNEL_DTYPES, fail, require_tensor
from ._library import KernelOp
from .builder import FusedLoss, build

PARAMS = ("int ignore_index", "float temperature")
LINEAR_PARAMS = PARAMS + ("int? chunk_size", "bool fp32_weight_grad")


def _check_rows(op, logits, target, temperature):
    if logits.dim() != 2 or logits.dtype not in KERNEL_DTYPES:
        fail(op, f"logits must be a 2-D fp32/fp16/bf16 tensor, got shape {tuple(logits.shape)} and dtype "
                 f"{logits.dtype}")
    rows, classes = logits.shape
    if classes > 1 and logits.stride(1) != 1:
        fail(op, f"logits must have unit column stride, got strides {logits.stride()}")
    if classes == 0 and rows > 0:
        fail(op, f"logits must have at least one class, got shape {tuple(logits.shape)}")
    if target.shape != (rows,) or target.dtype != torch.int64 or not target.is_contiguous() \
            or target.device != logits.device:
        fail(op, f"target must be a contiguous int64 tensor of shape ({rows},) on {logits.device}, got shape "
                 f"{tuple(target.shape)}, dtype {target.dtype} on {target.device}")
    if not temperature > 0.0 or temperature == float("inf"):
        fail(op, f"temperature must be finite and > 0, got {temperature}")


def _check_fwd(logits, target, out, stats, ignore_index, temperature):
    op = "log_probs_fwd"
    _check_rows(op, logits, target, temperature)
    for name, t, cols in (("out", out, 2), ("stats", stats, 3)):
        require_tensor(op, name, t, (logits.shape[0], cols), logits)


def _check_bwd(grad_rows, logits, target, stats, grad, ignore_index, temperature):
    op = "log_probs_bwd"
    _check_rows(op, logits, target, temperature)
    rows, classes = logits.shape
    for name, t, cols in (("grad_rows", grad_rows, 2), ("stats", stats, 3)):
        require_tensor(op, name, t, (rows, cols), logits)
    if grad.shape != logits.shape or grad.dtype != logits.dtype or grad.device != logits.device or \
            (classes > 1 and grad.stride(1) != 1) or (rows > 1 and grad.stride(0) < classes):
        fail(op, f"grad must match logits (shape {tuple(logits.shape)}, dtype {logits.dtype}, unit column stride, "
                 f"rows not overlapping), got shape {tuple(grad.shape)}, dtype {grad.dtype}, strides {grad.stride()}")


FWD = KernelOp("log_probs_fwd", "(Tensor logits, Tensor target, Tensor(a!) out, Tensor(b!) stats, int ignore_index, "
                                "float temperature) -> ()", check=_check_fwd)
BWD = KernelOp("log_probs_bwd", "(Tensor grad_rows, Tensor logits, Tensor target, Tensor stats, Tensor(a!) grad, "
                                "int ignore_index, float temperature) -> ()", check=_check_bwd)


def _triton():
    from ..triton_kernels import log_probs as kernels  # Triton is optional: loaded at the first Triton call

    return kernels


FWD.implement_triton(lambda *args: _triton().log_probs_fwd(*args))
BWD.implement_triton(lambda *args: _triton().log_probs_bwd(*args))


# ---- the specs for the op builder ---------------------------------------------------------------

def _options(p) -> dict:
    return dict(ignore_index=p.ignore_index, temperature=p.temperature)


def _outputs(rows, like):
    return like.new_empty(rows, 2, dtype=F32), like.new_empty(rows, 3, dtype=F32)


def _grad_rows(grad_rows):
    return grad_rows.to(F32).contiguous()


def _forward(backend, tensors, params, grads, grad_factor, reduce):
    logits, target = tensors
    out, stats = _outputs(logits.shape[0], logits)
    FWD[backend](logits, target, out, stats, **_options(params))
    return out, (stats,)


def _backward(backend, grad_rows, tensors, saved, params, grads):
    logits, target = tensors
    BWD[backend](_grad_rows(grad_rows), logits, target, saved[0], grads[0], **_options(params))


def _kept_rows(backend, tensors, params):
    return (tensors[-1] != params.ignore_index).sum()


SPEC = FusedLoss(name="log_probs", tensors=("logits", "target"), params=PARAMS, differentiable=("logits",),
                 n_saved=1, forward=_forward, backward=_backward, mean_divisor=_kept_rows,
                 out_dtype=lambda tensors, params: F32)
log_probs_kernels = build(SPEC)


def _linear_forward(backend, tensors, params, grads, grad_factor, reduce):
    x, weight, bias, target = tensors
    out, stats = _outputs(x.shape[0], x)
    fwd = FWD[backend]
    for start, stop, logits in Chunks(x, weight, bias, params.chunk_size):
        fwd(logits, target[start:stop], out[start:stop], stats[start:stop], **_options(params))
    return out, (stats,)


def _linear_backward(backend, grad_rows, tensors, saved, params, grads):
    x, weight, bias, target = tensors
    grad_rows = _grad_rows(grad_rows)
    chunks = Chunks(x, weight, bias, params.chunk_size)
    sink = Gradients(grads, weight, params.fp32_weight_grad)
    bwd = BWD[backend]
    for start, stop, logits in chunks:
        # the kernel writes d(out)/d(logits) over the logits it has read
        bwd(grad_rows[start:stop], logits, target[start:stop], saved[0][start:stop], logits, **_options(params))
        sink.add(chunks, start, stop, logits)
    sink.finish()


def _linear_rows_fake(tensors, params):
    """Written out: the forward's chunk loop would fix the row count of a dynamic shape."""
    return _outputs(tensors[0].shape[0], tensors[0])


LINEAR_SPEC = FusedLoss(name="linear_log_probs", tensors=("input", "linear_weight", "linear_bias?", "target"),
                        params=LINEAR_PARAMS, differentiable=("input", "linear_weight", "linear_bias"), n_saved=1,
                        forward=_linear_forward, backward=_linear_backward, mean_divisor=_kept_rows,
                        rows_fake=_linear_rows_fake, out_dtype=lambda tensors, params: F32)
linear_log_probs_kernels = build(LINEAR_SPEC)
