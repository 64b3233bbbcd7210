"""Gradients that are not differentiable again, and say so whichever way they are differentiated.

torch's `once_differentiable` (and a DelayedError on detached gradients) raises only when a second
backward runs through its node. `torch.autograd.grad(penalty, x)` runs only the nodes that lead to
x, and a detached gradient leads nowhere: with another term tying the penalty to x (an L2 term,
say), the gradient's own term was silently left out.

Here a custom Function's forward keeps an anchor (`keep_anchor`): a 0-element tensor whose graph
leads to the inputs that want a gradient without holding their memory. Its backward, decorated
with `differentiable_once`, hangs the gradients it returns from that anchor in a create_graph
backward, so that any differentiation of them that reaches the inputs, or anything upstream of
them, passes through `_Refused` and raises.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch


class _Anchor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *tensors):
        return tensors[0].new_empty(0)

    @staticmethod
    def backward(ctx, _):  # reached only through _Refused, which raises first
        return (None,) * len(ctx.needs_input_grad)


class _Refused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, message, n_grad_outputs, anchor, *rest):
        ctx.message = message
        return tuple(g.view_as(g) for g in rest[n_grad_outputs:])

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(ctx.message)


def keep_anchor(ctx, *inputs) -> None:
    """In a custom Function's forward: ctx.anchor on the tensor inputs that require grad (None if none)."""
    wanting = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    with torch.enable_grad():  # forward runs without grad; the anchor's graph is the point
        ctx.anchor = _Anchor.apply(*wanting) if wanting else None


def differentiable_once(message: Callable) -> Callable:
    """Decorates a custom Function's backward, in place of torch's once_differentiable: the backward
    runs without grad, and in a create_graph backward its gradients raise `message(ctx)` when they
    are differentiated again (the forward must have called keep_anchor)."""
    def wrap(backward):
        @functools.wraps(backward)
        def run(ctx, *grad_outputs):
            with torch.no_grad():
                grads = backward(ctx, *grad_outputs)
            single = not isinstance(grads, tuple)
            grads = (grads,) if single else grads
            live = [i for i, g in enumerate(grads) if g is not None]
            if not torch.is_grad_enabled() or ctx.anchor is None or not live:
                return grads[0] if single else grads
            given = [g for g in grad_outputs if isinstance(g, torch.Tensor)]
            marked = _Refused.apply(message(ctx), len(given), ctx.anchor, *given, *[grads[i] for i in live])
            out = list(grads)
            for i, g in zip(live, marked):
                out[i] = g
            return out[0] if single else tuple(out)
        return run
    return wrap
