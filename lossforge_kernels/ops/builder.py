"""The fused-loss op builder: a family's eager autograd path and its torch.compile path, from a short spec.

A family (ops/<family>.py) defines its kernel ops and describes them with a `FusedLoss` spec:
which tensors and scalar options the loss takes, which tensors the kernels differentiate, how to
call its forward kernel (per-row losses, or their sum with the gradient written in the same pass)
and its backward kernel (from per-row grad_outputs and what the forward saved). `build(spec)`
returns the callable the public layer uses; it owns, for every family alike:

- Reductions: 'none' returns the rows; 'sum' their sum; 'mean' divides by the family's divisor.
- The gradient convention: with 'mean'/'sum' and a gradient wanted, the forward kernel writes
  d(loss)/d(input) for each differentiable input times `grad_factor` (1/divisor for 'mean', 1 for
  'sum'), so the backward only multiplies by grad_output on the device (free when it is 1).
  With 'none' (or no gradient wanted in the forward) the backward kernel runs from saved rows.
- Retained graphs: the saved gradient is handed out (and scaled in place) only by the backward
  that frees the graph; a backward that keeps it (retain_graph=True) gets its own copy, so a
  gradient once returned never changes and every later backward is right.
- Double backward: the kernels' gradients are not differentiable again; any way of
  differentiating them (backward(), autograd.grad with or without allow_unused) raises, naming
  backend='reference', rather than dropping the term (see _once_differentiable.py); torch.func
  transforms are refused by name.
- The loss's dtype: the spec's, or the caller's `out_dtype` (float32 under torch.autocast).
- torch.compile: the same kernels behind functional custom ops with registered autograd
  (`KernelLoss.compiled`: lossforge::<name>_fused_<b>, <name>_rows_<b>, <name>_rows_grad_<b>), so
  fullgraph=True traces them with no graph break and no in-place write for the compiler to
  functionalize. Their fakes come from the spec's forward run on fake tensors (the kernel ops'
  fakes), unless the spec gives `rows_fake`.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Mapping, Sequence

import torch

from .._backends import KERNEL_BACKENDS
from .._once_differentiable import differentiable_once, keep_anchor
from ._library import KernelOp, scale_grad

F32 = torch.float32

_keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)


@dataclasses.dataclass(frozen=True)
class FusedLoss:
    """A loss family's kernels as the builder composes them.

    `params` below is the family's options as a named tuple made from its schema entries
    (`p.label_smoothing`); callers pass them by name.
    forward(backend, tensors, params, grads, grad_factor, reduce) -> (loss, saved): runs the forward
      kernel. `grads` is None (no gradient) or a list aligned with `differentiable`, each a buffer
      for d(loss)/d(that input) * grad_factor, or None where not wanted. `grad_factor` is None when
      no gradient is written, else a 0-dim float32 tensor on the inputs' device holding 1/divisor
      ('mean') or 1 ('sum'). `reduce`: return the rows' float32 sum (0-dim) instead of the rows.
      `saved`: the `n_saved` tensors the rows backward needs besides the inputs.
    backward(backend, grad_rows, tensors, saved, params, grads): writes into `grads` (aligned with
      `differentiable`, None where not wanted) the gradient of sum(grad_rows * rows).
    rows_fake(tensors, params) -> (rows, *saved): empty tensors shaped like forward(reduce=False)'s;
      by default the forward itself on fake tensors. A forward that loops over chunks gives its own:
      the loop would fix the sizes of a dynamic shape.
    mean_divisor(backend, tensors, params) -> float or 0-dim device tensor: what 'mean' divides the sum
      by (on the call's backend, where kernels count it).
    counted_mean(backend, tensors, params, grads) -> (total, divisor) or None: for a 'mean' whose divisor
      the loss's own pass counts (instead of a pass of its own before it), the rows' float32 sum, the
      divisor and the gradients of total / divisor written into `grads`; None where it does not apply
      (mean_divisor and forward then run). Optional.
    grad_buffer(tensor) -> the buffer a gradient of `tensor` is written into (default: empty_like).
    out_dtype(tensors, params) -> the loss's dtype (default: the first tensor's).
    """
    name: str
    tensors: tuple[str, ...]  # input names; a trailing "?" marks an optional one
    params: tuple[str, ...]   # schema entries of the scalar options, e.g. "float label_smoothing"
    differentiable: tuple[str, ...]
    n_saved: int
    forward: Callable
    backward: Callable
    mean_divisor: Callable
    rows_fake: Callable | None = None
    counted_mean: Callable | None = None
    grad_buffer: Callable = torch.empty_like
    out_dtype: Callable = lambda tensors, params: tensors[0].dtype
    # The named tuple of the options, one field per schema entry ("float label_smoothing"). Made here,
    # not on first use: a first use inside torch.compile's trace could not take a cache's lock.
    Params: type = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        fields = [entry.split()[-1] for entry in self.params]
        object.__setattr__(self, "Params", collections.namedtuple(f"{self.name}_params", fields))

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return tuple(t.rstrip("?") for t in self.tensors)

    @property
    def diff_positions(self) -> tuple[int, ...]:
        return tuple(self.tensor_names.index(n) for n in self.differentiable)

    def named(self, options: Mapping):
        """The options as Params, from a mapping of every schema name (no more, no fewer)."""
        fields = self.Params._fields
        if set(options) != set(fields):
            raise TypeError(f"lossforge {self.name}: the kernels take the options {list(fields)}, got "
                            f"{sorted(options)}")
        return self.Params(**options)


def gradient_gap(**named) -> str | None:
    """'<name> requires grad' for the first given tensor that would need a gradient, else None."""
    if not torch.is_grad_enabled():
        return None
    for name, t in named.items():
        if isinstance(t, torch.Tensor) and t.requires_grad:
            return f"{name} requires grad"
    return None


def finish_loss(total, reduction, divisor, dtype):
    """A summed float32 loss as returned to the caller: divided by `divisor` for 'mean' (a tensor
    or a number), in `dtype`; the division and the cast are one launch."""
    if reduction == "sum":
        return total.to(dtype)
    return torch.div(total, divisor, out=torch.empty((), device=total.device, dtype=dtype))


def grad_factor(divisor, like: torch.Tensor) -> torch.Tensor:
    """What the forward kernels multiply a fused gradient by, as they all take it: a 0-dim float32
    tensor on `like`'s device, 1 for 'sum' (divisor None), else 1/divisor (a number or a device tensor)."""
    if isinstance(divisor, torch.Tensor):
        return torch.reciprocal(divisor, out=torch.empty((), device=divisor.device, dtype=F32))
    value = 1.0 / divisor if divisor else 1.0  # 'sum', or no elements: the loss is 0/0, the gradient empty
    return torch.full((), value, device=like.device, dtype=F32)


def grad_factor_rows(grad_factor: torch.Tensor, rows: int) -> torch.Tensor:
    """The gradient factor as per-row grad_outputs, for families whose fused forward runs their rows
    backward: (rows,) float32, contiguous."""
    return grad_factor.reshape(1).expand(rows).contiguous()


def _graph_kept() -> bool:
    """Whether the running backward keeps the graph for another one (True when unknown)."""
    return True if _keep_graph is None else bool(_keep_graph())


def _message(ctx) -> str:
    return (f"lossforge {ctx.spec.name}: the {ctx.backend} kernels' gradient is not differentiable again "
            f"(double backward after create_graph=True); use backend='reference' for higher-order gradients")


@dataclasses.dataclass(frozen=True)
class _Call:
    """What an eager call passes its autograd.Function besides the tensors."""
    spec: FusedLoss
    backend: str
    reduction: str
    wants: tuple[bool, ...]
    inplace: bool
    params: tuple
    out_dtype: torch.dtype | None


class _EagerLoss(torch.autograd.Function):
    """Eager calls: the fused gradient is scaled in place, or handed to inplace_backward's buffer."""

    @staticmethod
    def forward(ctx, call, *tensors):
        spec, backend, reduction, wants, params = call.spec, call.backend, call.reduction, call.wants, call.params
        fused = any(wants) and reduction != "none"
        grads = None
        if fused:
            grads = [(t.detach() if call.inplace else spec.grad_buffer(t)) if w else None
                     for t, w in zip(_pick(tensors, spec), wants)]
        loss, divisor, saved = _forward(spec, backend, tensors, params, grads, reduction)
        dtype = call.out_dtype or spec.out_dtype(tensors, params)
        out = loss.to(dtype) if reduction == "none" else finish_loss(loss, reduction, divisor, dtype)
        ctx.spec, ctx.backend, ctx.params, ctx.wants, ctx.fused = spec, backend, params, wants, fused
        keep_anchor(ctx, *[t for t, w in zip(_pick(tensors, spec), wants) if w])
        if fused:
            ctx.save_for_backward(*[g for g in grads if g is not None])
        elif any(wants):
            ctx.save_for_backward(*tensors, *saved)
        return out

    @staticmethod
    @differentiable_once(_message)
    def backward(ctx, grad_loss):
        spec, backend = ctx.spec, ctx.backend
        if ctx.fused:
            saved = list(ctx.saved_tensors)
            given = [g.clone() for g in saved] if _graph_kept() else saved  # the saved copy serves later ones
            for g in given:
                scale_grad(g, grad_loss, backend)
            it = iter(given)
            grads = [next(it) if w else None for w in ctx.wants]
        else:
            everything = ctx.saved_tensors
            n = len(spec.tensors)
            tensors, saved = everything[:n], everything[n:]
            grads = [torch.empty_like(t) if w else None for t, w in zip(_pick(tensors, spec), ctx.wants)]
            spec.backward(backend, grad_loss, tensors, saved, ctx.params, grads)
        out = [None] * len(spec.tensors)
        for pos, g in zip(spec.diff_positions, grads):
            out[pos] = g
        return (None, *out)  # nothing for the call record


def _forward(spec, backend, tensors, params, grads, reduction):
    """(loss: the rows, or their sum when reduced, divisor for 'mean' else None, saved); with `grads`
    (a fused call) each wanted gradient is written there, already divided for 'mean'."""
    if grads is not None and reduction == "mean" and spec.counted_mean is not None:
        counted = spec.counted_mean(backend, tensors, params, grads)
        if counted is not None:
            return (*counted, ())
    divisor = spec.mean_divisor(backend, tensors, params) if reduction == "mean" else None
    factor = None if grads is None else grad_factor(divisor, tensors[0])
    loss, saved = spec.forward(backend, tensors, params, grads, factor, reduction != "none")
    return loss, divisor, saved


def _pick(tensors, spec):
    return [tensors[i] for i in spec.diff_positions]


def _empty(like):
    return like.new_empty(0)


class KernelLoss:
    """A family's kernel-backed loss, for every kernel backend: `loss(tensors, options_by_name, ...)`."""

    def __init__(self, spec: FusedLoss):
        self.spec = spec
        self.compiled = _CompiledOps.define(spec)

    def __call__(self, tensors: Sequence, options: Mapping, *, reduction: str, backend: str, inplace=False,
                 out_dtype: torch.dtype | None = None):
        """`options` by their schema names; `out_dtype`: the loss's dtype when not the spec's (float32
        under torch.autocast)."""
        spec = self.spec
        tensors, params = tuple(tensors), spec.named(options)
        grad_on = torch.is_grad_enabled()
        for name, t in zip(spec.tensor_names, tensors):
            if grad_on and name not in spec.differentiable and isinstance(t, torch.Tensor) and t.requires_grad:
                raise RuntimeError(f"lossforge {spec.name}: {name} requires grad, which the kernels do not compute; "
                                   f"this call should have gone to the reference")
        wants = tuple(grad_on and t is not None and t.requires_grad for t in _pick(tensors, spec))
        if torch.compiler.is_compiling():  # inplace does not apply to a traced graph
            return _compiled_loss(self.compiled, backend, tensors, params, reduction, wants, out_dtype)
        if torch._C._are_functorch_transforms_active():
            raise RuntimeError(f"lossforge {spec.name}: the {backend} kernels do not run under torch.func "
                               f"transforms (grad, vjp, jacrev, vmap...); use backend='reference'")
        return _EagerLoss.apply(_Call(spec, backend, reduction, wants, inplace, params, out_dtype), *tensors)


def build(spec: FusedLoss) -> KernelLoss:
    return KernelLoss(spec)


# ---- the torch.compile path -------------------------------------------------------------------


def _compiled_loss(ops, backend, tensors, params, reduction, wants, out_dtype):
    spec = ops.spec
    dtype = out_dtype or spec.out_dtype(tensors, params)
    if any(wants) and reduction != "none":
        out = ops.fused[backend](*tensors, **params._asdict(), mean=reduction == "mean", wants=list(wants))
        return out[0].to(dtype)
    out = ops.rows[backend](*tensors, **params._asdict())
    rows = out[0] if spec.n_saved else out
    if reduction == "none":
        return rows.to(dtype)
    total = rows.sum(dtype=F32)
    if reduction == "mean":
        total = total / spec.mean_divisor(backend, tensors, params)
    return total.to(dtype)


def _schema_tensors(spec):
    return ", ".join(f"Tensor{'?' if t.endswith('?') else ''} {t.rstrip('?')}" for t in spec.tensors)


def _returns(n):
    return "Tensor" if n == 1 else "(" + ", ".join(["Tensor"] * n) + ")"


@dataclasses.dataclass(frozen=True)
class _CompiledOps:
    """A spec's functional ops for torch.compile. Their schemas take the options by the spec's schema
    entries; callers pass them by name, and the implementations get them back as the spec's named tuple."""
    spec: FusedLoss
    fused: KernelOp      # (tensors, options, mean, wants) -> (summed or mean loss, *gradients)
    rows: KernelOp       # (tensors, options) -> rows, *saved
    rows_grad: KernelOp  # (grad_rows, tensors, saved, options, wants) -> gradients

    @classmethod
    def define(cls, spec: FusedLoss) -> "_CompiledOps":
        n_t, n_d, n_s = len(spec.tensors), len(spec.differentiable), spec.n_saved
        tensors_schema = _schema_tensors(spec)
        params_schema = "".join(f", {p}" for p in spec.params)
        saved_schema = "".join(f", Tensor saved{i}" for i in range(n_s))

        def fused_fake(*args):
            tensors, wants = args[:n_t], args[-1]
            return (tensors[0].new_empty((), dtype=F32),
                    *[spec.grad_buffer(t) if w else _empty(tensors[0]) for t, w in zip(_pick(tensors, spec), wants)])

        def rows_fake(*args):
            tensors, params = args[:n_t], spec.Params(*args[n_t:])
            if spec.rows_fake is not None:
                out = spec.rows_fake(tensors, params)
            else:  # the forward on fake tensors: the kernel ops' fakes give its outputs' shapes
                rows, saved = spec.forward(KERNEL_BACKENDS[0], tensors, params, None, None, False)
                out = (rows, *saved)
            return out if n_s else out[0]

        def rows_grad_fake(grad_rows, *args):
            tensors, wants = args[:n_t], args[-1]
            out = [torch.empty_like(t) if w else _empty(tensors[0]) for t, w in zip(_pick(tensors, spec), wants)]
            return tuple(out) if n_d > 1 else out[0]

        ops = cls(
            spec,
            fused=KernelOp(f"{spec.name}_fused", f"({tensors_schema}{params_schema}, bool mean, bool[] wants) -> "
                                                 f"{_returns(1 + n_d)}", fused_fake),
            rows=KernelOp(f"{spec.name}_rows", f"({tensors_schema}{params_schema}) -> {_returns(1 + n_s)}",
                          rows_fake),
            rows_grad=KernelOp(f"{spec.name}_rows_grad", f"(Tensor grad_rows, {tensors_schema}{saved_schema}"
                                                         f"{params_schema}, bool[] wants) -> {_returns(n_d)}",
                               rows_grad_fake))
        for backend in KERNEL_BACKENDS:
            ops._implement(backend)
        return ops

    def _implement(self, backend: str) -> None:
        spec = self.spec
        n_t, n_p, n_d, n_s = len(spec.tensors), len(spec.params), len(spec.differentiable), spec.n_saved
        rows_grad_op = self.rows_grad[backend]

        # fused: the summed (and for 'mean' divided) loss and its gradients from one forward pass.
        def fused_impl(*args):
            tensors, params, mean, wants = args[:n_t], spec.Params(*args[n_t:n_t + n_p]), args[-2], args[-1]
            grads = [spec.grad_buffer(t) if w else None for t, w in zip(_pick(tensors, spec), wants)]
            total, divisor, _ = _forward(spec, backend, tensors, params, grads, "mean" if mean else "sum")
            loss = total / divisor if mean else total
            return (loss, *[g if g is not None else _empty(tensors[0]) for g in grads])

        def fused_setup(ctx, inputs, output):
            ctx.wants = inputs[-1]
            ctx.save_for_backward(*output[1:])

        def fused_backward(ctx, grad_loss, *_):
            out = [None] * (n_t + n_p + 2)
            for pos, g, w in zip(spec.diff_positions, ctx.saved_tensors, ctx.wants):
                if w:  # one elementwise pass for the compiler to fuse
                    out[pos] = (g.to(F32) * grad_loss.to(F32)).to(g.dtype)
            return tuple(out)

        # rows: the per-row losses and what their backward needs.
        def rows_impl(*args):
            loss, saved = spec.forward(backend, args[:n_t], spec.Params(*args[n_t:]), None, None, False)
            return (loss, *saved) if n_s else loss

        def rows_setup(ctx, inputs, output):
            ctx.params = spec.Params(*inputs[n_t:])
            ctx.save_for_backward(*inputs[:n_t], *(output[1:] if n_s else ()))

        def rows_backward(ctx, grad_rows, *_):
            everything = ctx.saved_tensors
            tensors, saved = everything[:n_t], everything[n_t:]
            wants = [bool(ctx.needs_input_grad[i]) for i in spec.diff_positions]
            grads = rows_grad_op(grad_rows, *tensors, *saved, **ctx.params._asdict(), wants=wants)
            grads = grads if n_d > 1 else (grads,)
            out = [None] * (n_t + n_p)
            for pos, g, w in zip(spec.diff_positions, grads, wants):
                if w:
                    out[pos] = g
            return tuple(out)

        # rows_grad: the rows backward as a functional op (the gradients get their own buffers).
        def rows_grad_impl(grad_rows, *args):
            tensors, saved = args[:n_t], args[n_t:n_t + n_s]
            params, wants = spec.Params(*args[n_t + n_s:-1]), args[-1]
            grads = [torch.empty_like(t) if w else None for t, w in zip(_pick(tensors, spec), wants)]
            spec.backward(backend, grad_rows, tensors, saved, params, grads)
            out = [g if g is not None else _empty(tensors[0]) for g in grads]
            return tuple(out) if n_d > 1 else out[0]

        self.fused.implement_composite(backend, fused_impl, fused_backward, fused_setup)
        self.rows.implement_composite(backend, rows_impl, rows_backward, rows_setup)
        self.rows_grad.implement_composite(backend, rows_grad_impl)
