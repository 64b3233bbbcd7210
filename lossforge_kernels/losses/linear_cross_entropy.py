"""Public linear cross-entropy (a projection to class logits followed by cross_entropy) and its module.

Checks arguments and picks the backend. The reference materialises the logits in float32; the
kernel backends never hold more than a chunk of them (ops/linear_cross_entropy.py).
"""
from __future__ import annotations

import torch

from .. import _autocast as AC
from .. import _checks as C
from .._backends import LossKernels, register_kernels, resolve_backend
from ..distributed.linear_cross_entropy import vocab_parallel_linear_cross_entropy
from ..ops.linear_cross_entropy import linear_cross_entropy_kernels
from ..reference import linear_cross_entropy as ref
from .cross_entropy import (CrossEntropyOptions, check_class_vectors, check_options, check_sharding,
                            kernel_gap, kernel_options)

FAMILY = "linear_cross_entropy"
register_kernels(FAMILY, LossKernels(backends=("cuda", "triton"), gradients_of="input, linear_weight and "
                                                                                "linear_bias"))


def _check_shapes(input, linear_weight, target, linear_bias):
    C.check_tensor("input", input, min_ndim=1, float_only=True)
    C.check_tensor("linear_weight", linear_weight, ndim=2, float_only=True)
    C.check_same_device("input", input, linear_weight=linear_weight, target=target, linear_bias=linear_bias)
    if linear_weight.shape[1] != input.shape[-1]:
        raise ValueError(f"linear_weight must have shape (C, {input.shape[-1]}) to match input's last dimension, "
                         f"got {tuple(linear_weight.shape)}")
    if linear_bias is not None:
        C.check_tensor("linear_bias", linear_bias, ndim=1, float_only=True)
        if linear_bias.shape[0] != linear_weight.shape[0]:
            raise ValueError(f"linear_bias must have shape ({linear_weight.shape[0]},), got {tuple(linear_bias.shape)}")
    if AC.autocast_dtype(input) is None:  # autocast casts the three to one dtype itself
        for name, t in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
            if t is not None and t.dtype != input.dtype:
                raise TypeError(f"{name} must have input's dtype {input.dtype} (outside torch.autocast), got "
                                f"{t.dtype}")
    C.check_tensor("target", target, integer_only=True)
    if target.shape != input.shape[:-1]:
        raise ValueError(f"target must have shape {tuple(input.shape[:-1])} (input's leading dimensions), "
                         f"got {tuple(target.shape)}")


def check_chunk_size(chunk_size):
    """None (rows per chunk from the shared budget rule) or a positive number of rows."""
    if chunk_size is not None and C.check_int("chunk_size", chunk_size) <= 0:
        raise ValueError(f"chunk_size must be a positive number of rows or None, got {chunk_size!r}")
    return chunk_size


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None, reduction="mean",
                         ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None, focal_gamma=0.0,
                         focal_alpha=None, chunk_size=None, fp32_weight_grad=True, process_group=None,
                         vocab_start=None, reduce_input_grad=True, backend="auto"):
    """cross_entropy(input @ linear_weight.T + linear_bias, target, ...) without the (N, V) logits.

    input (..., D) with target (...) of class indices (the language-model layout), linear_weight
    (V, D), linear_bias (V,). Every option of cross_entropy except probability targets and
    inplace_backward; `ignore_index=None` means -100, as in torch.nn.functional.linear_cross_entropy.
    The kernel backends compute the logits `chunk_size` rows at a time (None: as many rows as fit
    256 MiB of logits, ops/_chunks.py's chunk_rows) and accumulate the weight and bias gradients over
    the chunks in float32 (`fp32_weight_grad=False`: in the weight's dtype, which saves the V x D fp32
    accumulator of a half-precision weight). Under torch.autocast the products run in the autocast dtype and the
    loss is float32.
    `process_group`: vocabulary-parallel (see distributed/linear_cross_entropy.py): linear_weight
    (V_r, D) and linear_bias are this rank's rows of the head, from `vocab_start` (default: in rank
    order), input is the same on every rank; every rank returns the unsharded loss, the gradients of
    its own rows and the full input gradient (`reduce_input_grad=False`: this rank's part of it).
    """
    _check_shapes(input, linear_weight, target, linear_bias)
    num_classes = linear_weight.shape[0]
    opts = check_options(ignore_index=-100 if ignore_index is None else ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, focal_gamma=focal_gamma,
                         focal_alpha=focal_alpha, backend=backend)
    chunk_size = check_chunk_size(chunk_size)
    C.check_bool("fp32_weight_grad", fp32_weight_grad)
    reduction = opts.pop("reduction")
    sharded = check_sharding(process_group, vocab_start)
    check_class_vectors(weight, opts["focal_alpha"], None if sharded else num_classes, input)
    C.check_bool("reduce_input_grad", reduce_input_grad)
    flat_input, flat_target = input.reshape(-1, input.shape[-1]), target.reshape(-1).to(torch.int64)
    if not sharded:
        C.check_target_range(flat_target, num_classes, opts["ignore_index"])
    autocast = AC.autocast_dtype(input)
    with AC.off(input):
        if sharded:
            loss = _sharded_loss(flat_input, linear_weight, linear_bias, flat_target, weight, reduction, chunk_size,
                                 fp32_weight_grad, process_group, vocab_start, reduce_input_grad, autocast, opts)
        else:
            loss = _loss(flat_input, linear_weight, linear_bias, flat_target, weight, reduction, backend, chunk_size,
                         fp32_weight_grad, autocast, opts)
    return loss.reshape(target.shape) if reduction == "none" else loss


def _loss(x, linear_weight, linear_bias, target, weight, reduction, backend, chunk_size, fp32_weight_grad,
          autocast, opts):
    """Under autocast (`autocast` its dtype) the products' operands are rounded to it and the loss is float32:
    the kernels take the rounded input and cast the weight once inside (its gradient stays fp32); the
    reference computes from the same rounded values in float32."""
    chosen = resolve_backend(backend, FAMILY, x, gap=kernel_gap(False, target, weight, opts["focal_alpha"]))
    if chosen == "reference" or x.shape[0] == 0 or linear_weight.shape[0] == 0:
        x, linear_weight, linear_bias = (AC.round_operand(t, autocast, reference=True)
                                         for t in (x, linear_weight, linear_bias))
        return ref.linear_cross_entropy(x, linear_weight, target, linear_bias, weight, reduction=reduction, **opts)
    x = AC.round_operand(x, autocast, reference=False)
    weight, weight_sum, alpha, named = kernel_options(False, weight, **opts)
    tensors = (x.contiguous(), linear_weight.contiguous(), linear_bias, target.contiguous(), weight, weight_sum,
               alpha)
    return linear_cross_entropy_kernels(tensors, dict(named, chunk_size=chunk_size, fp32_weight_grad=fp32_weight_grad),
                                        reduction=reduction, backend=chosen, out_dtype=AC.loss_dtype(autocast))


def _sharded_loss(x, linear_weight, linear_bias, target, weight, reduction, chunk_size, fp32_weight_grad, process_group,
                  vocab_start, reduce_input_grad, autocast, opts):
    x = AC.round_operand(x, autocast, reference=False)
    return vocab_parallel_linear_cross_entropy(
        x.contiguous(), linear_weight.contiguous(), linear_bias, target.contiguous(), weight, reduction=reduction,
        process_group=process_group, vocab_start=vocab_start, chunk_size=chunk_size, fp32_weight_grad=fp32_weight_grad,
        reduce_input_grad=reduce_input_grad, loss_dtype=AC.loss_dtype(autocast) or x.dtype, **opts)


class LinearCrossEntropyLoss(CrossEntropyOptions):
    """Module form of linear_cross_entropy: forward(input, linear_weight, target, linear_bias=None)."""

    def __init__(self, weight=None, *, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                 softcap=None, focal_gamma=0.0, focal_alpha=None, chunk_size=None, fp32_weight_grad=True,
                 process_group=None, vocab_start=None, reduce_input_grad=True, backend="auto"):
        super().__init__(weight, focal_alpha, ignore_index=-100 if ignore_index is None else ignore_index,
                         reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                         focal_gamma=focal_gamma, backend=backend)
        self.chunk_size = check_chunk_size(chunk_size)
        self.fp32_weight_grad = C.check_bool("fp32_weight_grad", fp32_weight_grad)
        C.check_process_group(process_group)
        self.sharding = dict(process_group=process_group, vocab_start=vocab_start,
                             reduce_input_grad=C.check_bool("reduce_input_grad", reduce_input_grad))

    def forward(self, input, linear_weight, target, linear_bias=None):
        return linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, chunk_size=self.chunk_size,
                                    fp32_weight_grad=self.fp32_weight_grad, **self.sharding, **self._keywords())


# The family's public API (functional.py, modules.py and the package export exactly these).
FUNCTIONS = (linear_cross_entropy,)
MODULES = (LinearCrossEntropyLoss,)
