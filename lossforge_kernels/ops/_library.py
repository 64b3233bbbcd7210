"""The `lossforge` torch.library namespace: kernel op schemas, fakes and contract checks, defined once.

Every kernel op exists twice with one schema, `<name>_triton` and `<name>_cuda`. Schemas and fake
(meta) implementations live here in Python, so the ops exist where nothing was compiled; each
csrc/<family>.cu registers its `_cuda` implementations for the CUDA key, and the Triton modules
are registered lazily (for CPU too, so the Triton interpreter can run them).

A kernel op's contract check (shapes, dtypes, strides, option ranges) is written once, in Python,
beside its schema. It runs before every call made through `kernel_op` on either backend, and
inside the Triton implementation, which has no other guard; the CUDA implementation keeps only
the C++ checks that guard memory (devices, dtypes, shapes, strides).
"""
from __future__ import annotations

import functools
import importlib
from typing import Callable

import torch

from .._backends import KERNEL_BACKENDS, triton_interpreter

lib = torch.library.Library("lossforge", "FRAGMENT")

_CHECKS: dict[str, Callable] = {}


def define_kernel_op(name: str, schema: str, fake, check: Callable | None = None) -> None:
    """Define `lossforge::<name>_<backend>` for each kernel backend with the same schema, fake and check."""
    for backend in KERNEL_BACKENDS:
        lib.define(f"{name}_{backend}{schema}")
        torch.library.register_fake(f"lossforge::{name}_{backend}", fake, lib=lib)
    if check is not None:
        _CHECKS[name] = check


def register_triton_impl(name: str, module: str, function: str) -> None:
    """Route `lossforge::<name>_triton` to lossforge_kernels.triton_kernels.<module>.<function>,
    behind the op's contract check.

    The Triton module is imported at the first call, so `import lossforge_kernels` never needs Triton.
    """
    check = _CHECKS.get(name)

    def impl(*args):
        if check is not None:
            check(*args)
        kernels = importlib.import_module(f"lossforge_kernels.triton_kernels.{module}")
        return getattr(kernels, function)(*args)

    lib.impl(f"{name}_triton", impl, "CUDA")
    if triton_interpreter():
        lib.impl(f"{name}_triton", impl, "CPU")


def raw_kernel_op(name: str, backend: str):
    return getattr(torch.ops.lossforge, f"{name}_{backend}").default


@functools.cache  # resolved once per op: it is on every call's path
def kernel_op(name: str, backend: str):
    """The kernel op `<name>_<backend>` behind its contract check (the Triton op checks itself)."""
    op = raw_kernel_op(name, backend)
    check = _CHECKS.get(name)
    if check is None or backend == "triton":
        return op

    def checked(*args):
        check(*args)
        return op(*args)

    return checked


def scale_grad(grad: torch.Tensor, grad_output: torch.Tensor, backend: str) -> None:
    """grad *= grad_output on the device; when grad_output == 1 no gradient byte moves."""
    kernel_op("scale_grad", backend)(grad, grad_output)


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
define_kernel_op(
    "scale_grad",
    "(Tensor(a!) grad, Tensor grad_output) -> ()",
    lambda grad, grad_output: None,
    _check_scale_grad,
)
register_triton_impl("scale_grad", "scale_grad", "scale_grad")
