"""Build: pure Python everywhere; the CUDA extension lossforge_kernels._C where CUDA can build it.

LOSSFORGE_SKIP_CUDA_BUILD=1 never builds it, LOSSFORGE_FORCE_CUDA=1 always tries (for a machine
with nvcc and a CUDA torch but no GPU), LOSSFORGE_CUDA_ARCHS="80;90" picks the architectures
(default: sm_80 and sm_90, plus PTX), DEBUG=1 builds with -O0 -g.
"""
import glob
import os
import pathlib
import re
import sys

from setuptools import setup

PACKAGES = ["lossforge_kernels", "lossforge_kernels.reference", "lossforge_kernels.losses",
            "lossforge_kernels.ops", "lossforge_kernels.distributed", "lossforge_kernels.integrations",
            "lossforge_kernels.triton_kernels"]
# Our Triton kernels live in ./triton_kernels but install as lossforge_kernels.triton_kernels: the
# top-level name `triton_kernels` belongs to another distribution and must not be clobbered.
PACKAGE_DIR = {"lossforge_kernels.triton_kernels": "triton_kernels"}


def _flag(name):
    return os.environ.get(name, "0") not in ("", "0")


def _notice(msg):
    print(f"lossforge_kernels: {msg}", file=sys.stderr)


def _minor_version(text):
    """(major, minor) of a version string, or None."""
    found = re.match(r"(\d+)\.(\d+)", text)
    return tuple(map(int, found.groups())) if found else None


def _min_torch():
    """The torch minimum of pyproject.toml's dependencies (the CUDA sources need what it names)."""
    pyproject = (pathlib.Path(__file__).resolve().parent / "pyproject.toml").read_text()
    return _minor_version(re.search(r'"torch>=([^"]+)"', pyproject).group(1))


def cuda_extensions():
    if _flag("LOSSFORGE_SKIP_CUDA_BUILD"):
        _notice("LOSSFORGE_SKIP_CUDA_BUILD is set: CUDA extension skipped (Triton and reference backends only)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as exc:  # no torch at build time: a pure Python install
        _notice(f"torch is not importable at build time ({exc}): CUDA extension skipped")
        return [], {}
    found, need = _minor_version(torch.__version__), _min_torch()
    if found and found < need:
        message = (f"torch {torch.__version__} is older than {need[0]}.{need[1]}, the first with the aten out_dtype "
                   "products (mm / addmm .dtype_out) that the CUDA sources call: CUDA extension not built")
        if _flag("LOSSFORGE_FORCE_CUDA"):
            raise SystemExit(f"lossforge_kernels: LOSSFORGE_FORCE_CUDA is set but {message}")
        _notice(message + " (and lossforge_kernels will not import on this torch)")
        return [], {}
    if not _flag("LOSSFORGE_FORCE_CUDA"):
        if torch.version.cuda is None or CUDA_HOME is None:
            _notice("no CUDA build of torch or no CUDA toolkit found: CUDA extension skipped "
                    "(Triton and reference backends only)")
            return [], {}
    archs = os.environ.get("LOSSFORGE_CUDA_ARCHS", "80;90").split(";")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    opt = ["-O0", "-g"] if _flag("DEBUG") else ["-O3"]
    nvcc = opt + ["-lineinfo", "--expt-relaxed-constexpr"] + gencode  # the C++ standard: torch's default
    sources = sorted(glob.glob("csrc/*.cu")) + sorted(glob.glob("csrc/*.cpp"))
    headers = sorted(glob.glob("csrc/*.h")) + sorted(glob.glob("csrc/*.cuh"))
    ext = CUDAExtension(
        "lossforge_kernels._C", sources,
        depends=headers,  # rebuilt when they change, and shipped in a source distribution
        extra_compile_args={"cxx": opt, "nvcc": nvcc},
        py_limited_api=False,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extensions()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
