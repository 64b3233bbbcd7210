"""Public per-token log-probabilities and entropy (the RL heads): log_probs, linear_log_probs and
their modules.

Checks arguments, flattens the leading dimensions into rows, picks the backend and splits the two
results. The maths lives in reference/log_probs.py and in the kernels behind ops/log_probs.py; the
linear form's kernel path never holds more than a chunk of the logits.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import _autocast as AC
from .. import _checks as C
from .._backends import BACKENDS, LossKernels, register_kernels, resolve_backend
from ..distributed.log_probs import vocab_parallel_linear_log_probs, vocab_parallel_log_probs
from ..ops.log_probs import linear_log_probs_kernels, log_probs_kernels
from ..reference import log_probs as ref
from .cross_entropy import check_sharding
from .linear_cross_entropy import check_chunk_size

FAMILY = "log_probs"
# auto's order: Triton first until the bench has measured both on a GPU; the CUDA kernels
# (csrc/log_probs.cuh) are designed for the same traffic (forward 1 read per logit, backward 1 read
# + 1 write), so nothing yet says which is faster.
register_kernels(FAMILY, LossKernels(backends=("triton", "cuda"), gradients_of="the logits (the linear form: input, "
                                                                        "linear_weight and linear_bias)"))


def check_temperature(temperature) -> float:
    return C.check_float("temperature", temperature, low=0.0, low_open=True, finite=True)


def check_head(input_name, input, weight_name, weight, bias_name, bias):
    """A linear head: input (..., D), weight (V, D) and bias (V,) or None, one float dtype (outside autocast)."""
    C.check_tensor(input_name, input, min_ndim=1, float_only=True)
    C.check_tensor(weight_name, weight, ndim=2, float_only=True)
    C.check_same_device(input_name, input, **{weight_name: weight, bias_name: bias})
    if weight.shape[1] != input.shape[-1]:
        raise ValueError(f"{weight_name} must have shape (V, {input.shape[-1]}) to match {input_name}'s last "
                         f"dimension, got {tuple(weight.shape)}")
    if bias is not None:
        C.check_tensor(bias_name, bias, ndim=1, float_only=True)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{bias_name} must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if AC.autocast_dtype(input) is None:  # autocast casts the three to one dtype itself
        for name, t in ((weight_name, weight), (bias_name, bias)):
            if t is not None and t.dtype != input.dtype:
                raise TypeError(f"{name} must have {input_name}'s dtype {input.dtype} (outside torch.autocast), got "
                                f"{t.dtype}")


def check_token_target(target, leading, input_name, *, name="target"):
    """Class indices (any integer dtype) shaped like `leading`, the input's leading dimensions."""
    C.check_tensor(name, target, integer_only=True)
    if target.shape != leading:
        raise ValueError(f"{name} must have shape {tuple(leading)} ({input_name}'s leading dimensions), got "
                         f"{tuple(target.shape)}")


def _options(temperature, return_entropy, ignore_index, backend):
    C.check_choice("backend", backend, BACKENDS)
    C.check_bool("return_entropy", return_entropy)
    return check_temperature(temperature), C.check_int("ignore_index", ignore_index)


def _split(out, shape, return_entropy):
    """The kernels' (M, 2) rows as (log_probs, entropy) of the target's shape."""
    log_p = out[:, 0].reshape(shape)
    return (log_p, out[:, 1].reshape(shape)) if return_entropy else log_p


def log_probs(logits, target, *, temperature=1.0, return_entropy=False, ignore_index=-100, process_group=None,
              vocab_start=None, backend="auto"):
    """log_softmax(logits / temperature)[target] per token, and with `return_entropy` the entropy of
    softmax(logits / temperature): float32 tensors of the target's shape (float64 for float64 logits),
    0 where the target is ignore_index. logits (..., V), target (...) of class indices. Differentiable
    with respect to the logits for any grad_outputs of both results at once.
    `process_group`: vocabulary-parallel (see distributed/log_probs.py): logits hold this rank's slice of
    the classes, from `vocab_start` (default: the slices in rank order), target the global class
    indices; every rank returns the results of the unsharded call and its slice's gradient."""
    C.check_tensor("logits", logits, min_ndim=1, float_only=True)
    check_token_target(target, logits.shape[:-1], "logits")
    C.check_same_device("logits", logits, target=target)
    temperature, ignore_index = _options(temperature, return_entropy, ignore_index, backend)
    num_classes = logits.shape[-1]
    rows, flat_target = logits.reshape(-1, num_classes), target.reshape(-1).to(torch.int64)
    if check_sharding(process_group, vocab_start):
        out = vocab_parallel_log_probs(rows, flat_target, temperature=temperature, ignore_index=ignore_index,
                                       process_group=process_group, vocab_start=vocab_start)
        return _split(out, target.shape, return_entropy)
    C.check_target_range(flat_target, num_classes, ignore_index)
    chosen = resolve_backend(backend, FAMILY, logits)
    autocast = AC.autocast_dtype(logits)
    with AC.off(logits):
        if chosen == "reference" or rows.numel() == 0:
            return ref.log_probs(AC.widen(logits, autocast), target.to(torch.int64), temperature=temperature,
                                 return_entropy=return_entropy, ignore_index=ignore_index)
        rows = rows if num_classes <= 1 or rows.stride(1) == 1 else rows.contiguous()
        out = log_probs_kernels((rows, flat_target.contiguous()), dict(ignore_index=ignore_index, temperature=temperature),
                                reduction="none", backend=chosen)
    return _split(out, target.shape, return_entropy)


def linear_log_probs(input, linear_weight, target, *, linear_bias=None, temperature=1.0, return_entropy=False,
                     ignore_index=-100, chunk_size=None, process_group=None, vocab_start=None, reduce_input_grad=True,
                     backend="auto"):
    """log_probs(input @ linear_weight.T + linear_bias, target, ...) without the (N, V) logits.

    input (..., D), linear_weight (V, D), linear_bias (V,), target (...). The kernel backends compute
    the logits `chunk_size` rows at a time (None: the shared budget rule of ops/_chunks.py), in the
    forward and again in the backward, and accumulate the weight and bias gradients in float32. Under
    torch.autocast the products run in the autocast dtype.
    `process_group`: vocabulary-parallel (see distributed/log_probs.py): linear_weight (V_r, D) and
    linear_bias are this rank's rows of the head, from `vocab_start` (default: in rank order), input is
    the same on every rank; every rank returns the unsharded results, the gradients of its own rows and
    the full input gradient (`reduce_input_grad=False`: this rank's part of it)."""
    check_head("input", input, "linear_weight", linear_weight, "linear_bias", linear_bias)
    check_token_target(target, input.shape[:-1], "input")
    C.check_same_device("input", input, target=target)
    temperature, ignore_index = _options(temperature, return_entropy, ignore_index, backend)
    chunk_size = check_chunk_size(chunk_size)
    C.check_bool("reduce_input_grad", reduce_input_grad)
    num_classes = linear_weight.shape[0]
    x, flat_target = input.reshape(-1, input.shape[-1]), target.reshape(-1).to(torch.int64)
    if check_sharding(process_group, vocab_start):
        out = vocab_parallel_linear_log_probs(
            x.contiguous(), linear_weight.contiguous(), linear_bias, flat_target, temperature=temperature,
            ignore_index=ignore_index, process_group=process_group, vocab_start=vocab_start, chunk_size=chunk_size,
            reduce_input_grad=reduce_input_grad)
        return _split(out, target.shape, return_entropy)
    C.check_target_range(flat_target, num_classes, ignore_index)
    chosen = resolve_backend(backend, FAMILY, input)
    autocast = AC.autocast_dtype(input)
    with AC.off(input):
        if chosen == "reference" or x.shape[0] == 0 or num_classes == 0:
            x, w, b = (AC.round_operand(t, autocast, reference=True) for t in (x, linear_weight, linear_bias))
            out = ref.linear_log_probs(x, w, flat_target, linear_bias=b, temperature=temperature,
                                       return_entropy=return_entropy, ignore_index=ignore_index)
            if not return_entropy:
                return out.reshape(target.shape)
            return tuple(o.reshape(target.shape) for o in out)
        x = AC.round_operand(x, autocast, reference=False)
        tensors = (x.contiguous(), linear_weight.contiguous(), linear_bias, flat_target.contiguous())
        out = linear_log_probs_kernels(tensors, dict(ignore_index=ignore_index, temperature=temperature,
                                                     chunk_size=chunk_size, fp32_weight_grad=True),
                                       reduction="none", backend=chosen)
    return _split(out, target.shape, return_entropy)


class LogProbs(nn.Module):
    """Module form of log_probs: forward(logits, target)."""

    def __init__(self, *, temperature=1.0, return_entropy=False, ignore_index=-100, process_group=None,
                 vocab_start=None, backend="auto"):
        super().__init__()
        _options(temperature, return_entropy, ignore_index, backend)
        C.check_process_group(process_group)
        self.options = dict(temperature=temperature, return_entropy=return_entropy, ignore_index=ignore_index,
                            process_group=process_group, vocab_start=vocab_start, backend=backend)

    def forward(self, logits, target):
        return log_probs(logits, target, **self.options)


class LinearLogProbs(nn.Module):
    """Module form of linear_log_probs: forward(input, linear_weight, target, linear_bias=None)."""

    def __init__(self, *, temperature=1.0, return_entropy=False, ignore_index=-100, chunk_size=None,
                 process_group=None, vocab_start=None, reduce_input_grad=True, backend="auto"):
        super().__init__()
        _options(temperature, return_entropy, ignore_index, backend)
        C.check_process_group(process_group)
        self.options = dict(temperature=temperature, return_entropy=return_entropy, ignore_index=ignore_index,
                            chunk_size=check_chunk_size(chunk_size), process_group=process_group,
                            vocab_start=vocab_start, reduce_input_grad=C.check_bool("reduce_input_grad",
                                                                                    reduce_input_grad),
                            backend=backend)

    def forward(self, input, linear_weight, target, linear_bias=None):
        return linear_log_probs(input, linear_weight, target, linear_bias=linear_bias, **self.options)


# The family's public API (functional.py, modules.py and the package export exactly these).
FUNCTIONS = (log_probs, linear_log_probs)
MODULES = (LogProbs, LinearLogProbs)
