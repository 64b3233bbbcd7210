"""The `lossforge` torch.library namespace: kernel ops defined once, held by handle.

A `KernelOp` is one kernel contract: the ops `lossforge::<name>_cuda` and `lossforge::<name>_triton`
with one schema and one fake (meta) implementation, defined here in Python so they exist where
nothing was compiled. Callers hold the handle and pick a backend with `op[backend]`; csrc/<family>.cu
registers the `_cuda` implementation for the CUDA key under the same name, and `op.implement_triton`
routes the `_triton` op to a callable (for CPU tensors too under the Triton interpreter).

A kernel op's contract check (shapes, dtypes, strides, option ranges) is written once, in Python,
beside its schema, with the schema's argument names. It runs before every call on either backend
(inside the Triton implementation, which has no other guard); the CUDA implementation keeps only
the C++ checks that guard memory (devices, dtypes, shapes, strides).
"""
from __future__ import annotations

from typing import Callable

import torch

from .._backends import KERNEL_BACKENDS, triton_interpreter

lib = torch.library.Library("lossforge", "FRAGMENT")


def _writes_only(*args, **kwargs):
    return None


class KernelOp:
    """One kernel contract on every kernel backend: `op["cuda"](...)`, `op["triton"](...)`."""

    def __init__(self, name: str, schema: str, fake: Callable | None = None, check: Callable | None = None,
                 backends: tuple[str, ...] = KERNEL_BACKENDS):
        """`fake` may be left out for an op that only writes into its arguments (returns ()). An op of a
        path that only some backends take names them in `backends`: no op is defined for the others."""
        self.name, self.check = name, check
        fake = fake or _writes_only
        self.overloads = {}  # backend -> the op itself, unchecked (for opcheck and tests)
        for backend in backends:
            qualified = f"{name}_{backend}"  # the one place a backend's op name is written
            lib.define(qualified + schema)
            torch.library.register_fake(f"lossforge::{qualified}", fake, lib=lib)
            self.overloads[backend] = getattr(torch.ops.lossforge, qualified).default
        self.arg_names = tuple(a.name for a in next(iter(self.overloads.values()))._schema.arguments)
        self._checked = {backend: self._checked_call(op) for backend, op in self.overloads.items()}
        if "triton" in self._checked:
            self._checked["triton"] = self.overloads["triton"]  # its implementation checks itself

    def _checked_call(self, op):
        check = self.check
        if check is None:
            return op

        def checked(*args, **kwargs):
            check(**self._by_name(args, kwargs))
            return op(*args, **kwargs)

        return checked

    def _by_name(self, args, kwargs) -> dict:
        """A call's arguments by their schema names (the contract checks take them so)."""
        named = dict(zip(self.arg_names, args))
        named.update(kwargs)
        return named

    def __getitem__(self, backend: str) -> Callable:
        """The op of `backend` behind the contract check."""
        return self._checked[backend]

    def implement_triton(self, function: Callable) -> None:
        """Route the `_triton` op to `function` (arguments in schema order), behind the contract check."""
        check = self.check

        def impl(*args):
            if check is not None:
                check(**self._by_name(args, {}))
            return function(*args)

        name = self.overloads["triton"]._schema.name.split("::")[1]
        lib.impl(name, impl, "CUDA")
        if triton_interpreter():
            lib.impl(name, impl, "CPU")

    def implement_composite(self, backend: str, function: Callable, backward: Callable | None = None,
                            setup_context: Callable | None = None) -> None:
        """Give the op of `backend` one implementation for every device (it calls other ops), and an
        autograd formula when `backward` is given."""
        qualified = self.overloads[backend]._schema.name
        lib.impl(qualified.split("::")[1], function, "CompositeExplicitAutograd")
        if backward is not None:
            torch.library.register_autograd(qualified, backward, setup_context=setup_context, lib=lib)


def _check_scale_grad(grad, grad_output):
    if grad.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"scale_grad: grad must be float32, float16 or bfloat16, got {grad.dtype}")
    if grad_output.numel() != 1 or not grad_output.dtype.is_floating_point:
        raise ValueError(f"scale_grad: grad_output must be a single floating-point value, got shape "
                         f"{tuple(grad_output.shape)} and dtype {grad_output.dtype}")
    if grad_output.device != grad.device:
        raise ValueError(f"scale_grad: grad_output is on {grad_output.device} but grad is on {grad.device}")
    if grad.dim() == 2 and grad.shape[0] > 1 and grad.shape[1] > 1 and 0 <= grad.stride(0) < grad.shape[1] \
            and grad.stride(1) == 1:
        raise ValueError(f"scale_grad: the rows of grad overlap (strides {grad.stride()}, shape {tuple(grad.shape)})")


# grad *= grad_output (fp32 arithmetic), in place, skipped on the device when grad_output == 1.
# Losses whose gradient is computed in the forward hand this their saved gradient in the last
# backward: the usual grad_output of 1 costs one short launch and no pass over the gradient.
SCALE_GRAD = KernelOp("scale_grad", "(Tensor(a!) grad, Tensor grad_output) -> ()", check=_check_scale_grad)


def _scale_grad_triton(grad, grad_output):
    from ..triton_kernels import scale_grad as kernels  # Triton is optional: loaded at the first Triton call

    kernels.scale_grad(grad, grad_output)


SCALE_GRAD.implement_triton(_scale_grad_triton)


def scale_grad(grad: torch.Tensor, grad_output: torch.Tensor, backend: str) -> None:
    """grad *= grad_output on the device; when grad_output == 1 no gradient byte moves."""
    SCALE_GRAD[backend](grad, grad_output)
