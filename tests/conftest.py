"""Shared fixtures: which backends and device the tests run on here.

Kernel backends are tested where they run: on a GPU ("cuda", "triton"), or on CPU tensors for
"triton" when TRITON_INTERPRET=1 was set before the first import, and for "cuda" when
LOSSFORGE_CUDA_EMULATE=1 was.
"""
import os

import pytest
import torch

import lossforge_kernels as lf
from lossforge_kernels._backends import families
from lossforge_kernels._backends import interpreter_numpy_problem  # noqa: F401 (tests import it from here)

HAS_GPU = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
EMULATE = os.environ.get("LOSSFORGE_CUDA_EMULATE", "0") not in ("", "0")


def pytest_configure(config):
    problem = interpreter_numpy_problem() if INTERPRET else None
    if problem:
        raise pytest.UsageError(problem)
    if EMULATE and not lf.available_backends()["cuda"].available:  # never a silent skip of the CUDA kernels
        raise pytest.UsageError(lf.available_backends()["cuda"].reason)


def kernel_backends():
    found = [name for name in ("cuda", "triton") if lf.available_backends()[name].available]
    return found


def device_for(backend):
    if backend == "reference":
        return "cuda" if HAS_GPU else "cpu"
    if backend == "cuda":
        return "cpu" if EMULATE else "cuda"
    return "cpu" if (backend == "triton" and INTERPRET and not HAS_GPU) else "cuda"


@pytest.fixture(params=kernel_backends() or [pytest.param("none", marks=pytest.mark.skip(
    reason="no kernel backend here: needs a CUDA GPU, or TRITON_INTERPRET=1 for the Triton kernels on CPU"))])
def kernel_backend(request):
    return request.param


@pytest.fixture(params=["reference"] + kernel_backends())
def any_backend(request):
    return request.param


@pytest.fixture
def gpu_launch_choices(monkeypatch):
    """The Triton launchers make their GPU choices (block sizes, feature blocks, dot modes) while the
    kernels still run in the interpreter, as tests/test_triton_compile.py's recorder does: fp32 inputs,
    whose dots the interpreter takes, then run the blocks a GPU would, which the interpreter's own
    smaller blocks leave out."""
    if "triton" not in kernel_backends() or not INTERPRET or HAS_GPU:
        pytest.skip("runs the GPU launch choices under the Triton interpreter")
    from tests.test_triton_compile import choose_as_on_a_gpu

    choose_as_on_a_gpu(monkeypatch.setattr, monkeypatch.setenv)


def family_fixtures(family: str):
    """(kernels, kernel, backend) for a test module of one family: the family's kernel backends here, a
    fixture over them (skipped where there are none) and one over them and the reference. A module
    binds the fixtures to those names: `KERNELS, kernel, backend = family_fixtures("log_probs")`."""
    kernels = [b for b in kernel_backends() if b in families()[family].backends]

    @pytest.fixture(params=kernels or [pytest.param("none", marks=pytest.mark.skip(reason=f"no {family} kernel here"))])
    def kernel(request):
        return request.param

    @pytest.fixture(params=["reference"] + kernels)
    def backend(request):
        return request.param

    return kernels, kernel, backend


def rel_err(actual, expected):
    """||a - e|| / ||e|| in float64; NaN anywhere fails (returns inf)."""
    a, e = actual.double(), expected.double()
    if torch.isnan(a).any() or torch.isnan(e).any():
        return float("inf") if not torch.equal(torch.isnan(a), torch.isnan(e)) else \
            rel_err(torch.nan_to_num(a), torch.nan_to_num(e))
    denom = e.norm()
    return ((a - e).norm() / denom).item() if denom > 0 else (a - e).norm().item()


def assert_close_rel(actual, expected, tol, what=""):
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


# aten ops that allocate or re-view memory without launching a kernel
_NO_LAUNCH = {"empty", "empty_like", "empty_strided", "new_empty", "detach", "view", "_unsafe_view", "reshape",
              "_reshape_alias", "as_strided", "alias", "expand", "t", "transpose", "permute", "unsqueeze",
              "squeeze", "select", "slice", "lift_fresh"}
# aten ops that copy a device value to the host (a synchronisation on a GPU)
HOST_SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero"}


class LaunchLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the aten ops (and lossforge kernel ops) a region runs that would launch GPU work."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in _NO_LAUNCH:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def run_without_host_sync(step):
    """step() once to compile kernels and warm the allocator, then again with torch raising on any
    device-to-host copy or synchronisation (CUDA only)."""
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.fixture
def dot_work(monkeypatch):
    """Multiply-adds of every tl.dot the interpreter runs (a list: the running total is its sum)."""
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    if not hasattr(interpreter, "InterpreterBuilder") or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("counts the Triton interpreter's dots")
    work = []
    create_dot = interpreter.InterpreterBuilder.create_dot

    def counted(self, a, b, *args, **kwargs):
        work.append(a.data.shape[-2] * a.data.shape[-1] * b.data.shape[-1])
        return create_dot(self, a, b, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", counted)
    return work
