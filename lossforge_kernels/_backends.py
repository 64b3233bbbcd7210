"""Backend registry: which implementations exist, which are usable here, which one a call gets.

Backends: "reference" (plain PyTorch, any device), "triton" and "cuda" (fused kernels, CUDA
tensors; Triton also runs CPU tensors under TRITON_INTERPRET=1, and the CUDA kernels under
LOSSFORGE_CUDA_EMULATE=1). Availability is probed once.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import os
import re

import torch

from . import _cuda_emulation

BACKENDS = ("auto", "cuda", "triton", "reference")
KERNEL_BACKENDS = ("cuda", "triton")
ENV_BACKEND = "LOSSFORGE_BACKEND"

_log = logging.getLogger("lossforge_kernels")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call; the message says why."""


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    name: str
    available: bool
    reason: str  # why not, or what it runs on

    def __repr__(self) -> str:
        state = "available" if self.available else "unavailable"
        return f"<backend {self.name}: {state} ({self.reason})>"


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def major_minor(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as '2.8.0a0+git' or '3.6.0'."""
    return tuple(map(int, re.match(r"(\d+)\.(\d+)", version).groups()))


def interpreter_numpy_problem(triton_version=None, numpy_version=None):
    """Why the Triton interpreter cannot run the kernels with these versions, or None: before Triton 3.7
    it turns a runtime scalar (a one-element array) into a loop bound with int(), which NumPy 2.4 refuses."""
    if triton_version is None:
        try:
            import triton
        except ImportError:
            return None
        triton_version = triton.__version__
    if numpy_version is None:
        import numpy

        numpy_version = numpy.__version__
    if major_minor(triton_version) < (3, 7) and major_minor(numpy_version) >= (2, 4):
        return (f"the Triton {triton_version} interpreter (TRITON_INTERPRET=1) needs numpy < 2.4, found numpy "
                f"{numpy_version}: pip install 'numpy<2.4', or Triton >= 3.7")
    return None


@functools.cache
def _triton_problem() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"Triton is not importable ({type(exc).__name__}: {exc})"
    if triton_interpreter():
        return interpreter_numpy_problem()
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch (set TRITON_INTERPRET=1 to run Triton kernels on CPU tensors)"
    return None


@functools.cache
def _cuda_extension_problem() -> str | None:
    if _cuda_emulation.enabled():
        try:
            _cuda_emulation.load()
        except Exception as exc:
            return (f"{_cuda_emulation.ENV}=1 is set but the emulated CUDA kernels could not be built or loaded "
                    f"({type(exc).__name__}: {exc})")
        return None
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    try:
        importlib.import_module("lossforge_kernels._C")
    except Exception as exc:
        _log.warning(
            "lossforge_kernels: the CUDA extension could not be loaded (%s: %s); "
            "the 'cuda' backend is off, the others carry on.", type(exc).__name__, exc)
        return f"the CUDA extension lossforge_kernels._C is not built or failed to load ({type(exc).__name__}: {exc})"
    return None


@torch.compiler.assume_constant_result  # probed once, eagerly: nothing for the compiler to trace
def _problem(name: str) -> str | None:
    if name == "reference":
        return None
    if name == "triton":
        return _triton_problem()
    if name == "cuda":
        return _cuda_extension_problem()
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def usable(name: str) -> bool:
    """Whether backend `name` can run here (probed once, as available_backends reports it)."""
    return _problem(name) is None


def available_backends() -> dict[str, BackendInfo]:
    """Every backend with whether it can run here and, if not, why not."""
    out = {"reference": BackendInfo("reference", True, "plain PyTorch, any device and dtype")}
    for name, what in (("triton", "Triton kernels"), ("cuda", "CUDA C++ kernels")):
        problem = _problem(name)
        if problem is None:
            where = "CUDA tensors"
            if name == "triton" and triton_interpreter():
                where = "CPU tensors through the Triton interpreter"
            elif name == "cuda" and _cuda_emulation.enabled():
                where = "CPU tensors through the CUDA emulation"
            out[name] = BackendInfo(name, True, f"{what} on {where}")
        else:
            out[name] = BackendInfo(name, False, problem)
    return out


@dataclasses.dataclass(frozen=True)
class LossKernels:
    """What one loss family (the registry key is its file stem) offers beyond the reference: its
    kernel backends in auto's order, the dtypes they take and the inputs they differentiate."""
    backends: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    gradients_of: str = "the input"


_FAMILIES: dict[str, LossKernels] = {}


def register_kernels(family: str, kernels: LossKernels) -> None:
    _FAMILIES[family] = kernels


def families() -> dict[str, LossKernels]:
    """Every registered loss family by its file stem."""
    return dict(_FAMILIES)


def runs_on(name: str, device: torch.device) -> bool:
    """Whether kernel backend `name` takes tensors on `device` (CPU: under the interpreter or emulation)."""
    if name == "cuda" and _cuda_emulation.enabled():
        return device.type == "cpu"
    if device.type == "cuda":
        return True
    return name == "triton" and triton_interpreter() and device.type == "cpu"


def _automatic(kernels: LossKernels | None, sample: torch.Tensor, gap: str | None) -> str:
    """auto's choice: the first available kernel backend for CUDA tensors it takes, else the reference."""
    if kernels is None or sample.dtype not in kernels.dtypes or gap is not None or sample.device.type != "cuda":
        return "reference"
    for name in kernels.backends:
        if _problem(name) is None:
            return name
    return "reference"


def resolve_backend(backend: str, family: str, sample: torch.Tensor, gap: str | None = None) -> str:
    """Pick the backend for one call on `sample` (the tensor whose device, dtype and shape decide).

    `gap` names what this call needs that the family's kernels do not compute (e.g. "weight
    requires grad"): auto then takes the reference, and an explicit kernel backend raises.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    from_env = False
    if backend == "auto":
        env = os.environ.get(ENV_BACKEND, "").strip()
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"environment variable {ENV_BACKEND} must be one of {BACKENDS}, got {env!r}")
            backend, from_env = env, True
    if backend == "reference":
        return backend
    kernels = _FAMILIES.get(family)
    if backend == "auto":
        return _automatic(kernels, sample, gap)
    # An explicit request (argument or environment): run it or say why not.
    source = f"{ENV_BACKEND}={backend!r}" if from_env else f"backend={backend!r}"
    if kernels is None or backend not in kernels.backends or (from_env and gap is not None):
        if from_env:  # a global preference: calls its kernels cannot take keep their automatic choice
            return _automatic(kernels, sample, gap)
        have = ", ".join(kernels.backends) if kernels and kernels.backends else "none"
        raise BackendUnavailableError(
            f"{source}: {family} has no {backend} kernel (kernel backends for it: {have}); "
            f"use backend='reference' or 'auto'")
    if gap is not None:
        raise BackendUnavailableError(
            f"{source}: the {family} kernels compute gradients for {kernels.gradients_of} only, but {gap}; "
            f"use backend='reference', or 'auto' (which takes the reference for such calls)")
    problem = _problem(backend)
    if problem is not None:
        raise BackendUnavailableError(f"{source} is unavailable: {problem}")
    if not runs_on(backend, sample.device):
        raise BackendUnavailableError(
            f"{source} needs {'CPU tensors (CUDA emulation)' if backend == 'cuda' and _cuda_emulation.enabled() else 'CUDA tensors'}, "
            f"got a tensor on {sample.device}")
    if sample.dtype not in kernels.dtypes:
        raise BackendUnavailableError(
            f"{source}: {family} kernels take {[str(d) for d in kernels.dtypes]}, got {sample.dtype}")
    return backend
