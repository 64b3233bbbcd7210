"""Public softmax cross-entropy family: cross_entropy, focal_loss and their modules.

Checks arguments, moves the class dimension last so every backend sees (M, C) rows, picks the
backend and restores the output shape. The maths lives in reference/cross_entropy.py and in the
kernels behind ops/cross_entropy.py.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import _autocast as AC
from .. import _checks as C
from .._backends import BACKENDS, LossKernels, register_kernels, resolve_backend
from ..distributed.cross_entropy import vocab_parallel_cross_entropy
from ..ops.builder import gradient_gap
from ..ops.cross_entropy import cross_entropy_kernels
from ..reference import cross_entropy as ref

FAMILY = "cross_entropy"

# auto's order, from `python -m bench` on an NVIDIA H200 (bench/results/): the CUDA kernels were
# faster than the Triton ones at every measured shape, dtype and option; Triton is the fallback
# where the extension is not built.
register_kernels(FAMILY, LossKernels(backends=("cuda", "triton"), gradients_of="the input (logits)"))


def check_options(*, ignore_index, reduction, label_smoothing, z_loss, softcap, focal_gamma, focal_alpha,
                  backend, names=None):
    """The scalar options, normalised (Python numbers); `names` renames arguments in messages
    (focal_loss calls focal_gamma `gamma`). A tensor focal_alpha is checked against the classes later."""
    names = names or {}
    name = lambda key: names.get(key, key)  # noqa: E731
    out = dict(ignore_index=C.check_int(name("ignore_index"), ignore_index),
               reduction=C.check_reduction(reduction),
               label_smoothing=C.check_float(name("label_smoothing"), label_smoothing, low=0.0, high=1.0),
               z_loss=C.check_float(name("z_loss"), z_loss, low=0.0, finite=True),
               softcap=C.check_float(name("softcap"), softcap, low=0.0, low_open=True, allow_none=True, finite=True),
               focal_gamma=C.check_float(name("focal_gamma"), focal_gamma, low=0.0, finite=True))
    if isinstance(focal_alpha, torch.Tensor):
        C.check_tensor(name("focal_alpha"), focal_alpha, ndim=1, float_only=True)
        out["focal_alpha"] = focal_alpha
    else:
        out["focal_alpha"] = C.check_float(name("focal_alpha"), focal_alpha, allow_none=True, finite=True)
    C.check_choice("backend", backend, BACKENDS)
    return out


def _check_target(input, target):
    """Returns True for class-probability targets, False for class indices; raises on bad shapes."""
    C.check_tensor("target", target)
    if target.dtype.is_floating_point:
        if target.shape != input.shape:
            raise ValueError(f"target with class probabilities must have the input's shape {tuple(input.shape)}, "
                             f"got {tuple(target.shape)}")
        return True
    C.check_tensor("target", target, integer_only=True)
    expected = input.shape[:1] + input.shape[2:] if input.dim() >= 2 else torch.Size([])
    if target.shape != expected:
        raise ValueError(f"target with class indices must have shape {tuple(expected)} for input of shape "
                         f"{tuple(input.shape)}, got {tuple(target.shape)}")
    return False


def check_class_vector(name, t, num_classes, input):
    """A (C,) float vector on input's device; num_classes None leaves its length to the caller."""
    C.check_tensor(name, t, ndim=1, float_only=True)
    if num_classes is not None and t.shape[0] != num_classes:
        raise ValueError(f"{name} must have one entry per class ({num_classes}), got shape {tuple(t.shape)}")
    C.check_same_device("input", input, **{name: t})


def check_class_vectors(weight, focal_alpha, num_classes, input, names=None):
    """weight and a tensor focal_alpha: (C,) float vectors on input's device (any length when None)."""
    if weight is not None:
        check_class_vector("weight", weight, num_classes, input)
    if isinstance(focal_alpha, torch.Tensor):
        check_class_vector((names or {}).get("focal_alpha", "focal_alpha"), focal_alpha, num_classes, input)


def check_sharding(process_group, vocab_start) -> bool:
    """Whether the call is vocabulary-parallel; vocab_start must come with a process group."""
    C.check_process_group(process_group)
    if vocab_start is not None:
        if process_group is None:
            raise ValueError("vocab_start is only meaningful with a process_group")
        C.check_int("vocab_start", vocab_start)
    return process_group is not None


def _as_rows(input, target, soft):
    """(N, C, d1, ...) -> (M, C) rows with the class dimension last, plus the 'none' output shape.
    Class indices of any integer dtype become int64 (comparisons with ignore_index stay exact)."""
    num_classes = input.shape[1] if input.dim() >= 2 else input.shape[0]
    if not soft and target.dtype != torch.int64:
        target = target.to(torch.int64)
    if input.dim() == 1:
        logits = input.unsqueeze(0)
        rows_target = target.unsqueeze(0) if soft else target.reshape(1)
        out_shape = torch.Size([])
    elif input.dim() == 2:
        logits, rows_target, out_shape = input, target, input.shape[:1]
    else:
        logits = input.movedim(1, -1).reshape(-1, num_classes)
        rows_target = target.movedim(1, -1).reshape(-1, num_classes) if soft else target.reshape(-1)
        out_shape = input.shape[:1] + input.shape[2:]
    return logits, rows_target, out_shape


def kernel_gap(soft, target, weight, focal_alpha):
    """What a call needs that the kernels do not compute (gradients of anything but the logits)."""
    return gradient_gap(target=target if soft else None, weight=weight,
                        focal_alpha=focal_alpha if isinstance(focal_alpha, torch.Tensor) else None)


def cross_entropy(input, target, weight=None, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                  z_loss=0.0, softcap=None, focal_gamma=0.0, focal_alpha=None, inplace_backward=False,
                  process_group=None, vocab_start=None, backend="auto", _names=None):
    """Drop-in for torch.nn.functional.cross_entropy, with z-loss, softcap and focal modulation fused.

    input (N, C) or (N, C, d1, ...) or (C,); target class indices (N, d1, ...) of any integer dtype
    or class probabilities shaped like input. Extras: `z_loss` adds z_loss * lse**2 per
    non-ignored row; `softcap` maps logits x to softcap * tanh(x / softcap) first; `focal_gamma`/
    `focal_alpha` multiply each row's (smoothed) cross-entropy by alpha_t * (1 - p_t)**gamma.
    `inplace_backward=True` lets kernel backends write the gradient into the logits' buffer (the
    logits are overwritten; ignored inside torch.compile, where the gradient gets its own buffer).
    `process_group`: vocabulary-parallel (see distributed/cross_entropy.py): input holds this rank's
    slice of the classes, from `vocab_start` (default: the slices in rank order), target the global
    class indices (or this slice of class probabilities); weight and a tensor focal_alpha may be
    this slice or the full vector. Every rank returns the loss of the unsharded op.
    """
    C.check_tensor("input", input, min_ndim=1, float_only=True)
    soft = _check_target(input, target)
    C.check_same_device("input", input, target=target)
    num_classes = input.shape[1] if input.dim() >= 2 else input.shape[0]
    opts = check_options(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                         z_loss=z_loss, softcap=softcap, focal_gamma=focal_gamma, focal_alpha=focal_alpha,
                         backend=backend, names=_names)
    reduction = opts.pop("reduction")
    sharded = check_sharding(process_group, vocab_start)
    check_class_vectors(weight, opts["focal_alpha"], None if sharded else num_classes, input, _names)
    if soft and (opts["focal_gamma"] != 0.0 or opts["focal_alpha"] is not None):
        raise ValueError("focal_gamma/focal_alpha need class-index targets; got class probabilities "
                         f"(target dtype {target.dtype})")
    C.check_bool("inplace_backward", inplace_backward)

    logits, rows_target, out_shape = _as_rows(input, target, soft)
    autocast = AC.autocast_dtype(input)
    with AC.off(input):
        loss = _rows_loss(logits, rows_target, weight, soft, num_classes, reduction, inplace_backward, sharded,
                          process_group, vocab_start, backend, autocast, opts)
    return loss.reshape(out_shape) if reduction == "none" else loss


def _rows_loss(logits, target, weight, soft, num_classes, reduction, inplace, sharded, process_group, vocab_start,
               backend, autocast, opts):
    """The loss of (M, C) rows on the chosen backend; `autocast`: the autocast dtype or None (the
    logits are used as given, the loss is float32, as torch's cross_entropy under autocast)."""
    if sharded:
        return vocab_parallel_cross_entropy(AC.widen(logits, autocast), target, weight, reduction=reduction,
                                            process_group=process_group, vocab_start=vocab_start, **opts)
    if not soft:
        C.check_target_range(target, num_classes, opts["ignore_index"])
    chosen = resolve_backend(backend, FAMILY, logits, gap=kernel_gap(soft, target, weight, opts["focal_alpha"]))
    if chosen == "reference" or logits.numel() == 0:
        return ref.cross_entropy(AC.widen(logits, autocast), target, weight, reduction=reduction, **opts)
    return kernel_cross_entropy(logits, target, weight, reduction, inplace, chosen,
                                out_dtype=AC.loss_dtype(autocast), **opts)


def kernel_options(soft, weight, *, ignore_index, label_smoothing, z_loss, softcap, focal_gamma, focal_alpha):
    """The class vectors and scalar options as the kernel contract takes them: (weight, weight_sum,
    alpha, options by name), see ops/cross_entropy.py."""
    weight = None if weight is None else weight.to(torch.float32).contiguous()
    weight_sum = weight.sum() if weight is not None and not soft and label_smoothing > 0.0 else None  # on device
    alpha_vec = focal_alpha.to(torch.float32).contiguous() if isinstance(focal_alpha, torch.Tensor) else None
    alpha_scalar = 1.0 if focal_alpha is None or alpha_vec is not None else focal_alpha
    options = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
                   softcap=0.0 if softcap is None else softcap, focal_gamma=focal_gamma, focal_alpha=alpha_scalar)
    return weight, weight_sum, alpha_vec, options


def kernel_cross_entropy(logits, target, weight, reduction, inplace, backend, out_dtype=None, **options):
    """(M, C) rows on a kernel backend: the tensors laid out as the kernel contract asks."""
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    soft = target.dtype.is_floating_point
    if soft:
        target = target.to(logits.dtype)
        if target.stride(1) != 1:
            target = target.contiguous()
    else:
        target = target.contiguous()
    weight, weight_sum, alpha, named = kernel_options(soft, weight, **options)
    return cross_entropy_kernels((logits, target, weight, weight_sum, alpha), named, reduction=reduction,
                                 backend=backend, inplace=inplace, out_dtype=out_dtype)


def focal_loss(input, target, *, gamma=2.0, alpha=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
               backend="auto"):
    """Softmax multi-class focal loss: cross_entropy(focal_gamma=gamma, focal_alpha=alpha)."""
    return cross_entropy(input, target, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing, focal_gamma=gamma, focal_alpha=alpha, backend=backend,
                         _names=_FOCAL_NAMES)


_FOCAL_NAMES = {"focal_gamma": "gamma", "focal_alpha": "alpha"}


class CrossEntropyOptions(nn.Module):
    """The cross-entropy keywords a module holds, checked at construction; `weight` and a tensor
    `focal_alpha` are buffers, as in torch. `names` renames arguments in error messages."""

    def __init__(self, weight, focal_alpha, *, names=None, **options):
        super().__init__()
        checked = {k: v for k, v in options.items() if k != "inplace_backward"}
        check_options(focal_alpha=focal_alpha, names=names, **checked)
        if "inplace_backward" in options:
            C.check_bool("inplace_backward", options["inplace_backward"])
        if weight is not None:
            C.check_tensor("weight", weight, ndim=1, float_only=True)
        self.register_buffer("weight", weight)
        if isinstance(focal_alpha, torch.Tensor):
            self.register_buffer("focal_alpha", focal_alpha)
        else:
            self.focal_alpha = focal_alpha
        self.options = options
        self.names = names

    def _keywords(self):
        return dict(weight=self.weight, focal_alpha=self.focal_alpha, **self.options)


class CrossEntropyLoss(CrossEntropyOptions):
    """Module form of cross_entropy."""

    def __init__(self, weight=None, *, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                 softcap=None, focal_gamma=0.0, focal_alpha=None, inplace_backward=False, process_group=None,
                 vocab_start=None, backend="auto"):
        super().__init__(weight, focal_alpha, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, focal_gamma=focal_gamma,
                         inplace_backward=inplace_backward, backend=backend)
        C.check_process_group(process_group)
        if process_group is not None:
            self.options.update(process_group=process_group, vocab_start=vocab_start)

    def forward(self, input, target):
        return cross_entropy(input, target, **self._keywords(), _names=self.names)


class FocalLoss(CrossEntropyLoss):
    """Softmax multi-class focal loss module (its alpha is the buffer `focal_alpha`)."""

    def __init__(self, gamma=2.0, alpha=None, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                 backend="auto"):
        CrossEntropyOptions.__init__(self, None, alpha, names=_FOCAL_NAMES, ignore_index=ignore_index,
                                     reduction=reduction, label_smoothing=label_smoothing, z_loss=0.0, softcap=None,
                                     focal_gamma=gamma, backend=backend)


# The family's public API (functional.py, modules.py and the package export exactly these).
FUNCTIONS = (cross_entropy, focal_loss)
MODULES = (CrossEntropyLoss, FocalLoss)
