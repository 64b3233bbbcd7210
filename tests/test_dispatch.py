"""Backend registry and dispatch: availability, explicit requests, the environment override, packaging."""
import os
import subprocess
import sys

import pytest
import torch

import lossforge_kernels as lf
from lossforge_kernels import _backends
from lossforge_kernels import _cuda_emulation
from tests.conftest import EMULATE, HAS_GPU, INTERPRET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code, **env):
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("TRITON_INTERPRET", "LOSSFORGE_BACKEND", _cuda_emulation.ENV)}
    full_env.update(env)
    out = subprocess.run([sys.executable, "-c", code], cwd="/tmp" if os.path.isdir("/tmp") else None,
                         env=full_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture
def no_emulation(monkeypatch):
    """The CUDA backend as a CPU machine without the emulation sees it."""
    monkeypatch.setenv(_cuda_emulation.ENV, "0")
    _backends._cuda_extension_problem.cache_clear()
    yield
    monkeypatch.undo()
    _backends._cuda_extension_problem.cache_clear()


def test_available_backends_reports_every_backend_with_a_reason():
    info = lf.available_backends()
    assert set(info) == {"reference", "triton", "cuda"}
    assert info["reference"].available
    for item in info.values():
        assert isinstance(item, lf.BackendInfo) and item.reason
    if EMULATE:
        assert info["cuda"].available and "CPU tensors through the CUDA emulation" in info["cuda"].reason
    elif not HAS_GPU:
        assert not info["cuda"].available and "GPU" in info["cuda"].reason


@pytest.mark.skipif(HAS_GPU, reason="checks the behaviour without a GPU")
def test_without_a_gpu_or_emulation_cuda_is_unavailable(no_emulation):
    info = lf.available_backends()["cuda"]
    assert not info.available and "no CUDA GPU" in info.reason


@pytest.mark.skipif(not EMULATE, reason="runs with the CUDA emulation (LOSSFORGE_CUDA_EMULATE=1)")
def test_emulated_cuda_takes_cpu_tensors_only():
    x, t = torch.randn(2, 3), torch.tensor([0, 1])
    torch.testing.assert_close(lf.cross_entropy(x, t, backend="cuda"), torch.nn.functional.cross_entropy(x, t))
    assert _backends.resolve_backend("auto", "cross_entropy", x) == "reference"  # auto keeps CPU on the reference
    with pytest.raises(lf.BackendUnavailableError, match=r"needs CPU tensors \(CUDA emulation\), got a tensor on meta"):
        _backends.resolve_backend("cuda", "cross_entropy", torch.empty(2, 3, device="meta"))


def test_emulation_build_failure_is_the_reason(monkeypatch):
    def broken():
        raise RuntimeError("c++: command not found")

    monkeypatch.setenv(_cuda_emulation.ENV, "1")
    monkeypatch.setattr(_cuda_emulation, "load", broken)
    _backends._cuda_extension_problem.cache_clear()
    try:
        problem = _backends._cuda_extension_problem()
    finally:
        monkeypatch.undo()
        _backends._cuda_extension_problem.cache_clear()
    assert "LOSSFORGE_CUDA_EMULATE=1 is set but the emulated CUDA kernels could not be built" in problem
    assert "c++: command not found" in problem


@pytest.mark.skipif(HAS_GPU, reason="checks the behaviour without a GPU")
def test_explicit_unavailable_backend_raises_with_reason(no_emulation):
    x, t = torch.randn(2, 3), torch.tensor([0, 1])
    with pytest.raises(lf.BackendUnavailableError, match="backend='cuda' is unavailable: no CUDA GPU"):
        lf.cross_entropy(x, t, backend="cuda")
    if not INTERPRET:
        with pytest.raises(lf.BackendUnavailableError, match="backend='triton' is unavailable"):
            lf.sigmoid_focal_loss(x, t.float()[:, None].expand(2, 3).contiguous(), backend="triton")


def test_auto_on_cpu_is_reference_and_env_override(monkeypatch, no_emulation):
    x, t = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    assert _backends.resolve_backend("auto", "cross_entropy", x) == "reference"
    monkeypatch.setenv("LOSSFORGE_BACKEND", "reference")
    assert _backends.resolve_backend("auto", "cross_entropy", x) == "reference"
    torch.testing.assert_close(lf.cross_entropy(x, t), torch.nn.functional.cross_entropy(x, t))
    monkeypatch.setenv("LOSSFORGE_BACKEND", "tpu")
    with pytest.raises(ValueError, match="LOSSFORGE_BACKEND must be one of"):
        lf.cross_entropy(x, t)
    if not HAS_GPU:
        monkeypatch.setenv("LOSSFORGE_BACKEND", "cuda")
        with pytest.raises(lf.BackendUnavailableError, match="LOSSFORGE_BACKEND='cuda' is unavailable"):
            lf.cross_entropy(x, t)
    # an explicit argument wins over the environment
    torch.testing.assert_close(lf.cross_entropy(x, t, backend="reference"), torch.nn.functional.cross_entropy(x, t))


def test_family_without_kernel(monkeypatch):
    # Every shipped family has kernels now; a registered one without any stands in.
    monkeypatch.setitem(_backends._FAMILIES, "plain", _backends.LossKernels(backends=()))
    x = torch.randn(4, 3)
    with pytest.raises(lf.BackendUnavailableError, match="plain has no triton kernel"):
        _backends.resolve_backend("triton", "plain", x)
    if lf.available_backends()["triton"].available:  # the environment is a preference, not a demand
        monkeypatch.setenv("LOSSFORGE_BACKEND", "triton")
        assert _backends.resolve_backend("auto", "plain", x) == "reference"


def test_float64_and_unknown_backend():
    x = torch.randn(3, 4, dtype=torch.float64)
    assert _backends.resolve_backend("auto", "cross_entropy", x) == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        _backends.resolve_backend("fast", "cross_entropy", x)


def test_missing_extension_warns_once_and_leaves_other_backends(monkeypatch, caplog, no_emulation):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "lossforge_kernels._C", None)  # import fails as if never built
    _backends._cuda_extension_problem.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="lossforge_kernels"):
            first = _backends._cuda_extension_problem()
            second = _backends._cuda_extension_problem()
        assert first == second and "not built or failed to load" in first
        assert sum("CUDA extension could not be loaded" in r.message for r in caplog.records) == 1
    finally:
        _backends._cuda_extension_problem.cache_clear()


def test_import_without_triton_and_namespaced_triton_kernels():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import lossforge_kernels as lf\n"
            "print(lf.available_backends()['triton'].available, lf.available_backends()['triton'].reason)")
    out = run_python(code)
    assert out.startswith("False Triton is not importable")
    # ours is importable only inside the namespace; the top-level name is left to its owner
    code = ("import importlib.util, lossforge_kernels.triton_kernels as ours\n"
            "spec = importlib.util.find_spec('triton_kernels')\n"
            f"print(ours.__file__.startswith({ROOT!r}), spec is None or not spec.origin.startswith({ROOT!r}))")
    assert run_python(code) == "True True"


def test_interpreter_makes_triton_available_on_cpu():
    pytest.importorskip("triton")
    out = run_python("import lossforge_kernels as lf; print(lf.available_backends()['triton'].available)",
                     TRITON_INTERPRET="1")
    assert out == "True"
