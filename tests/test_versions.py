"""The versions the package needs: torch's minimum (package metadata, import, build), a torch
without aten's out_dtype products answered by the probe rather than an exception, and the NumPy
bound of the Triton interpreter before 3.7."""
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import lossforge_kernels as lf
from lossforge_kernels.ops._chunks import fp32_out_products
from tests.conftest import interpreter_numpy_problem

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(code, **env):
    """A child Python on this checkout; returns (exit code, stderr)."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    return proc.returncode, proc.stderr


def test_metadata_states_the_minimum_the_import_checks():
    stated = re.search(r'"torch>=(\d+)\.(\d+)"', (ROOT / "pyproject.toml").read_text())
    assert stated and tuple(map(int, stated.groups())) == lf._MIN_TORCH == (2, 8)


@pytest.mark.parametrize("version", ["2.8.0", "2.8.0a0+5228986", "2.11.0+cu128", "3.0.0"])
def test_recent_torch_imports(version):
    lf._require_torch(version)


@pytest.mark.parametrize("version", ["2.4.1", "2.7.1+cu126", "1.13.0"])
def test_older_torch_is_refused_by_name(version):
    with pytest.raises(ImportError, match=rf"needs torch >= 2\.8, found torch {re.escape(version)}"):
        lf._require_torch(version)


def test_import_on_an_older_torch_is_a_clear_import_error():
    code, err = _run("import torch; torch.__version__ = '2.7.1'; import lossforge_kernels")
    assert code != 0 and "ImportError: lossforge_kernels needs torch >= 2.8, found torch 2.7.1" in err, err


@pytest.mark.parametrize("force", ["0", "1"])
def test_setup_does_not_build_the_extension_on_an_older_torch(force):
    code, err = _run("import runpy, sys, torch; torch.__version__ = '2.7.1'; sys.argv = ['setup.py', '--name']; "
                     "runpy.run_path('setup.py', run_name='__main__')", LOSSFORGE_FORCE_CUDA=force)
    assert "torch 2.7.1 is older than 2.8" in err and "CUDA extension not built" in err, err
    assert (code != 0) == (force == "1"), err  # asked to force it: a build error, not a silent skip


@pytest.mark.parametrize("op", ["addmm", "mm"])
def test_probe_on_a_torch_without_the_overloads_says_no(monkeypatch, op):
    def older_torch(name, key):
        raise RuntimeError(f"operator {name} does not exist")

    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", older_torch)
    assert fp32_out_products(torch.device("cuda"), op) is False
    monkeypatch.delattr(torch._C, "_dispatch_has_kernel_for_dispatch_key")
    assert fp32_out_products(torch.device("cuda"), op) is False


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_probe_answers_for_every_device_type(device):
    assert isinstance(fp32_out_products(torch.device(device)), bool)


@pytest.mark.parametrize("triton_version, numpy_version, refused", [
    ("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.0", False), ("3.9.0", "2.4.6", False)])
def test_the_interpreter_numpy_bound(triton_version, numpy_version, refused):
    problem = interpreter_numpy_problem(triton_version, numpy_version)
    assert (problem is not None) == refused
    if refused:
        assert "needs numpy < 2.4" in problem and triton_version in problem and numpy_version in problem


def test_interpreted_tests_stop_at_once_on_a_refused_pair():
    code, err = _run("import sys, numpy, pytest, triton; triton.__version__ = '3.6.0'; numpy.__version__ = '2.4.6'; "
                     "sys.exit(pytest.main(['tests/test_versions.py', '-q', '-p', 'no:cacheprovider', "
                     "'-k', 'metadata']))",
                     TRITON_INTERPRET="1")
    assert code == pytest.ExitCode.USAGE_ERROR and "Triton 3.6.0 interpreter (TRITON_INTERPRET=1) needs numpy < 2.4" \
        in err, err


def test_the_triton_backend_says_why_on_a_refused_pair(monkeypatch):
    # Outside the test suite too: the backend is unavailable, with the bound as its reason, rather
    # than failing with NumPy's own TypeError inside the first kernel.
    import numpy
    import triton

    from lossforge_kernels import _backends

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    _backends._triton_problem.cache_clear()
    try:
        info = _backends.available_backends()["triton"]
        assert not info.available and "needs numpy < 2.4" in info.reason
    finally:
        monkeypatch.undo()
        _backends._triton_problem.cache_clear()
