"""The CUDA backend on CPU tensors: LOSSFORGE_CUDA_EMULATE=1 (set before import) compiles the
kernels of csrc/ for the host, with csrc/emulate/ standing in for the CUDA toolkit, and registers
them for CPU tensors under the same op names (`lossforge::<name>_cuda`), the way TRITON_INTERPRET=1
runs the Triton kernels on CPU tensors. What the emulation models, and what it does not, is written
in csrc/emulate/lossforge_emulate.h.

The build needs a source checkout (csrc/ beside the package) and a C++ compiler; it runs once per
source state through torch.utils.cpp_extension (cached under TORCH_EXTENSIONS_DIR).
LOSSFORGE_CUDA_EMULATE_SANITIZE=address builds it with AddressSanitizer instead (the process must
then be started with libasan preloaded; tests/test_cuda_emulation.py does so);
LOSSFORGE_CUDA_EMULATE_VERBOSE=1 shows the build's commands.
"""
from __future__ import annotations

import hashlib
import os
import pathlib

ENV = "LOSSFORGE_CUDA_EMULATE"
ENV_SANITIZE = "LOSSFORGE_CUDA_EMULATE_SANITIZE"
# Another copy of the sources may be named (tests/plant_bugs.py builds mutated copies).
CSRC = pathlib.Path(os.environ.get("LOSSFORGE_CUDA_EMULATE_CSRC") or
                    pathlib.Path(__file__).resolve().parent.parent / "csrc").resolve()


def enabled() -> bool:
    return os.environ.get(ENV, "0") not in ("", "0")


def sanitizer() -> str | None:
    value = os.environ.get(ENV_SANITIZE, "").strip()
    if value not in ("", "address"):
        raise ValueError(f"environment variable {ENV_SANITIZE} must be 'address' or unset, got {value!r}")
    return value or None


def sources() -> list[pathlib.Path]:
    """The kernels and host code, as the CUDA build compiles them, and the emulation's runtime. Not
    module.cpp: the library is loaded as a plain shared object (its ops register themselves), so no
    Python module's thread-locals share the TLS block that holds the emulated shared memory."""
    return sorted(CSRC.glob("*.cu")) + [CSRC / "emulate" / "runtime.cpp"]


def compile_flags(sanitize: str | None = None) -> list[str]:
    """The host compiler's flags; a sanitized build trades speed for line tables in its reports, and
    is unoptimised: it runs one small call per family, and -O0 builds in two thirds of -O1's time."""
    flags = ["-Wno-unknown-pragmas", f"-I{CSRC / 'emulate'}", f"-I{CSRC}", "-include", "lossforge_emulate.h"]
    if sanitize is None:
        return ["-O2", "-g0", *flags]
    return ["-O0", "-g1", *flags, f"-fsanitize={sanitize}", "-fno-omit-frame-pointer"]


def _wrappers(build_dir: pathlib.Path) -> list[str]:
    """One .cpp per source that includes it, so that the C++ compiler (not nvcc) builds the .cu files."""
    build_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for src in sources():
        wrapper = build_dir / f"{src.stem}_{src.suffix[1:]}.cpp"
        text = f'#include "{src}"\n'
        if not wrapper.exists() or wrapper.read_text() != text:
            wrapper.write_text(text)
        out.append(str(wrapper))
    return out


def load() -> str:
    """Build (once per source state) and load the emulated extension, whose ops register for CPU;
    returns the library's path."""
    if not (CSRC / "emulate" / "lossforge_emulate.h").exists():
        raise RuntimeError(f"{ENV}=1 needs the csrc/ sources of a source checkout, not found at {CSRC}")
    from torch.utils import cpp_extension

    sanitize = sanitizer()
    name = "lossforge_emulated" + (f"_{sanitize}" if sanitize else "")
    # One build directory per checkout, so that two checkouts never share objects.
    tag = hashlib.sha1(str(CSRC).encode()).hexdigest()[:10]
    build_dir = pathlib.Path(cpp_extension._get_build_directory(f"{name}_{tag}", verbose=False))
    flags = compile_flags(sanitize)
    verbose = os.environ.get("LOSSFORGE_CUDA_EMULATE_VERBOSE", "0") not in ("", "0")
    return cpp_extension.load(
        name=name, sources=_wrappers(build_dir / "src"), extra_cflags=flags,
        extra_ldflags=[f"-fsanitize={sanitize}"] if sanitize else [], build_directory=str(build_dir),
        with_cuda=False, is_python_module=False, verbose=verbose)
