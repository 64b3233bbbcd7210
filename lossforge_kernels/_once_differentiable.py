"""Gradients that are not differentiable again, and say so whichever way they are differentiated.

torch's `once_differentiable` (and a DelayedError on detached gradients) raises only when the
second backward runs through its node. `torch.autograd.grad(penalty, x)` runs only the nodes that
lead to x, and a detached gradient leads nowhere: with another term tying the penalty to x (an L2
term, say), the gradient's own term was silently left out.

Here the gradients of a create_graph backward hang from an anchor: a 0-element tensor made in the
forward from the inputs that want a gradient, whose graph leads to them without holding their
memory. Any differentiation of those gradients that reaches the inputs, or anything upstream of
them, passes through `_Refused` and raises.
"""
from __future__ import annotations

from typing import Iterable

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
    def forward(ctx, message, anchor, grad_output, *grads):
        ctx.message = message
        return tuple(g.view_as(g) for g in grads)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(ctx.message)


def input_anchor(wanting: Iterable[torch.Tensor]) -> torch.Tensor | None:
    """The anchor of the inputs that want a gradient (None when none does); call it with grad mode
    on, outside the autograd.Function, and hand it to the Function inside a tuple (not as an input)."""
    wanting = [t for t in wanting if t is not None]
    return _Anchor.apply(*wanting) if wanting and torch.is_grad_enabled() else None


def refuse_again(grads, anchor: torch.Tensor | None, grad_output: torch.Tensor, message: str) -> list:
    """In a backward: `grads` (None where not computed) made to raise `message` when differentiated
    again; as they are outside create_graph (grad mode off) or without an anchor."""
    live = [i for i, g in enumerate(grads) if g is not None]
    if not torch.is_grad_enabled() or anchor is None or not live:
        return list(grads)
    out = list(grads)
    for i, g in zip(live, _Refused.apply(message, anchor, grad_output, *[grads[i] for i in live])):
        out[i] = g
    return out
