"""The `lossforge` torch.library namespace: kernel op schemas and fakes, defined once per backend.

Every kernel op exists twice with one schema, `<name>_triton` and `<name>_cuda`. Schemas and fake
(meta) implementations live here in Python, so the ops exist where nothing was compiled; the CUDA
extension (csrc/) registers the `_cuda` implementations for the CUDA key, and the Triton module
registers the `_triton` ones lazily (for CPU too, so the Triton interpreter can run them).
"""
from __future__ import annotations

import importlib

import torch

from .._backends import KERNEL_BACKENDS, triton_interpreter

lib = torch.library.Library("lossforge", "FRAGMENT")


def define_kernel_op(name: str, schema: str, fake) -> None:
    """Define `lossforge::<name>_<backend>` for each kernel backend with the same schema and fake."""
    for backend in KERNEL_BACKENDS:
        lib.define(f"{name}_{backend}{schema}")
        torch.library.register_fake(f"lossforge::{name}_{backend}", fake, lib=lib)


def register_triton_impl(name: str, module: str, function: str) -> None:
    """Route `lossforge::<name>_triton` to lossforge_kernels.triton_kernels.<module>.<function>.

    The Triton module is imported at the first call, so `import lossforge_kernels` never needs Triton.
    """
    def impl(*args):
        kernels = importlib.import_module(f"lossforge_kernels.triton_kernels.{module}")
        return getattr(kernels, function)(*args)

    lib.impl(f"{name}_triton", impl, "CUDA")
    if triton_interpreter():
        lib.impl(f"{name}_triton", impl, "CPU")


def define_composite_op(name: str, schema: str, fake, make_impl, make_backward=None, setup_context=None) -> None:
    """`lossforge::<name>_<backend>`: a functional op built from kernel ops (`make_impl(backend)`
    returns its implementation, which runs on any device the kernel ops do), optionally with the
    autograd formula `make_backward(backend)`. These are what torch.compile sees: no buffer the
    caller made is written, so nothing needs functionalizing, and autograd is the op's own.
    """
    define_kernel_op(name, schema, fake)
    for backend in KERNEL_BACKENDS:
        lib.impl(f"{name}_{backend}", make_impl(backend), "CompositeExplicitAutograd")
        if make_backward is not None:
            torch.library.register_autograd(f"lossforge::{name}_{backend}", make_backward(backend),
                                            setup_context=setup_context, lib=lib)


def finish_loss(total, reduction, divisor, dtype):
    """A summed float32 loss as returned to the caller: divided by `divisor` for 'mean' (a tensor
    or a number), in `dtype`; the division and the cast are one launch."""
    if reduction == "sum":
        return total.to(dtype)
    return torch.div(total, divisor, out=torch.empty((), device=total.device, dtype=dtype))


def rescale_fused_grad(ctx, grad_loss):
    """Backward of a loss Function that saved (gradient, applied) in its forward: the gradient,
    rescaled on the device to grad_loss (see scale_grad below)."""
    grad, applied = ctx.saved_tensors
    first = not getattr(ctx, "rescaled", False)
    kernel_op("scale_grad", ctx.backend)(grad, grad_loss, applied, first)
    ctx.rescaled = True
    return grad


def save_fused_grad(ctx, inputs, output):
    """setup_context of an op returning (loss, gradient of the loss): keep the gradient."""
    ctx.n_inputs = len(inputs)
    ctx.save_for_backward(output[1])


def fused_grad_backward(backend):
    """Backward of such an op: the saved gradient times grad_output (the first input's gradient)."""
    def backward(ctx, grad_loss, _grad_grad):
        (grad,) = ctx.saved_tensors
        scaled = (grad.to(torch.float32) * grad_loss.to(torch.float32)).to(grad.dtype)
        return (scaled,) + (None,) * (ctx.n_inputs - 1)
    return backward


def kernel_op(name: str, backend: str):
    return getattr(torch.ops.lossforge, f"{name}_{backend}").default


# grad *= grad_output / applied, skipped on the device when they are equal; then applied = grad_output.
# `first`: nothing has been applied yet, so the old value is 1 and `applied` is only written (it
# may hold anything before). Losses whose gradient is computed in the forward hand this the saved
# gradient in the backward: a first backward with grad_output 1 (the usual case) costs one launch
# and no pass over the gradient, and a second backward through a retained graph rescales correctly
# instead of compounding.
define_kernel_op(
    "scale_grad",
    "(Tensor(a!) grad, Tensor grad_output, Tensor(b!) applied, bool first) -> ()",
    lambda grad, grad_output, applied, first: None,
)
register_triton_impl("scale_grad", "scale_grad", "scale_grad")
