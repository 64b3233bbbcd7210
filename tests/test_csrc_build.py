"""The CUDA sources in csrc/: every `_cuda` op is registered there, the sources compile for sm_80
and sm_90 against the installed torch headers without register spills, and the registrations
match the schemas defined in Python.

Compile-only: runs wherever nvcc (and a host C++ compiler) is on PATH, GPU or not. The
registration check links the compiled objects into a library as setup.py links the extension
(against the CPU wheel's libraries, the toolkit's static CUDA runtime, and stand-ins for the
c10_cuda symbols the CPU wheel lacks), loads it in a child process after the Python schemas (a
registration whose C++ signature differs from its schema aborts that process) and asks the
dispatcher. The per-row launch plan (csrc/row_plan.h, plain C++) is built into a small program and
checked against the plans worked out by hand for an H200's limits.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch
from torch.utils import cpp_extension

import lossforge_kernels.ops  # noqa: F401  (defines the lossforge op schemas)
from tests.once import once_per_run, shared_dir

ROOT = pathlib.Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
# sm_80 and sm_90; LOSSFORGE_TEST_ARCHS="90" compiles one (CI: the GPU machines' arch, for its time budget)
ARCHS = tuple(a for a in os.environ.get("LOSSFORGE_TEST_ARCHS", "80,90").split(",") if a.strip())
NVCC = shutil.which("nvcc")
CXX = shutil.which(os.environ.get("CXX", "g++"))
NM = shutil.which("nm")

needs_nvcc = pytest.mark.skipif(NVCC is None or CXX is None, reason="nvcc and a host C++ compiler are needed")


def cuda_ops() -> list[str]:
    """The `_cuda` kernel ops that csrc/ must implement (the allocating wrappers are Python)."""
    names = torch._C._dispatch_get_all_op_names()
    return sorted(n.split("::", 1)[1] for n in names if n.startswith("lossforge::") and n.endswith("_cuda")
                  and not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CompositeExplicitAutograd"))


def test_every_cuda_op_is_registered_in_csrc():
    ops = cuda_ops()
    assert ops, "no lossforge::*_cuda ops are defined"
    per_file = {p.name: re.findall(r'm\.impl\(\s*"(\w+)"', p.read_text()) for p in sorted(CSRC.glob("*.c*"))}
    registered = [op for found in per_file.values() for op in found]
    missing = [op for op in ops if op not in registered]
    assert not missing, f"ops defined in Python without an m.impl(...) registration in csrc/: {missing}"
    twice = sorted({op for op in registered if registered.count(op) > 1})
    assert not twice, f"ops registered more than once in csrc/: {twice}"
    # Each family registers its own ops beside its kernels, for the CUDA key (host_utils.h's
    # LOSSFORGE_DISPATCH_KEY, which the CUDA emulation makes CPU).
    for name, found in per_file.items():
        if found:
            assert name.endswith(".cu"), f"{name} registers {found}: registrations belong in the family's .cu"
            assert "TORCH_LIBRARY_IMPL(lossforge, LOSSFORGE_DISPATCH_KEY, m)" in (CSRC / name).read_text(), name


# ---- compiling ----

def _defines() -> list[str]:
    flags = ["-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    include = pathlib.Path(cpp_extension.include_paths()[0])
    if not (include / "c10/cuda/impl/cuda_cmake_macros.h").exists():
        # CPU wheels ship c10/cuda without this generated header; off Windows it only names the build.
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return flags


def _includes(csrc: pathlib.Path = CSRC) -> list[str]:
    return [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}", f"-I{csrc}"]


def _run(cmd: list[str]) -> tuple[list[str], int, str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    return cmd, proc.returncode, proc.stdout + proc.stderr


def nvcc_command(source: pathlib.Path, out: pathlib.Path, csrc: pathlib.Path = CSRC) -> list[str]:
    """How every .cu is compiled here (tests.sass_diff compiles other revisions the same way)."""
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    return [NVCC, "-c", str(source), "-o", str(out), "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xptxas", "-v",
            *cpp_extension.COMMON_NVCC_FLAGS, *gencode, *_defines(), *_includes(csrc)]


def _nvcc(source: pathlib.Path, out: pathlib.Path):
    return _run(nvcc_command(source, out))


def _cudart_static() -> pathlib.Path | None:
    """The toolkit's static CUDA runtime, from the library folders nvcc links with."""
    text = subprocess.run([NVCC, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull], capture_output=True,
                          text=True).stderr
    folders = re.findall(r'-L"?([^"\s]+)', "".join(line for line in text.splitlines() if "LIBRARIES=" in line))
    for folder in folders:
        lib = pathlib.Path(folder) / "libcudart_static.a"
        if lib.exists():
            return lib.resolve()
    return None


# c10_cuda's symbols (namespace c10::cuda: functions, variables, vtables, type info), which the CPU
# wheel does not ship.
_C10_CUDA_SYMBOL = re.compile(r"_Z(?:N|NK|TVN|TIN|TSN)3c104cuda")


def _standin_source(objects: list[pathlib.Path]) -> str:
    """Definitions of every c10_cuda symbol the objects use: functions that abort when called, and
    zeroed variables. Nothing here calls them: loading the objects only registers kernels and ops."""
    wanted = set()
    for obj in objects:
        out = subprocess.run([NM, "--undefined-only", str(obj)], capture_output=True, text=True, check=True).stdout
        wanted |= {line.split()[-1] for line in out.splitlines() if _C10_CUDA_SYMBOL.match(line.split()[-1])}
    names = sorted(wanted)
    shown = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines() \
        if shutil.which("c++filt") else names
    lines = ["#include <cstdio>", "#include <cstdlib>",
             '[[noreturn]] static void called(const char* name) {',
             '  std::fprintf(stderr, "c10_cuda stand-in called: %s\\n", name);',
             "  std::abort();", "}"]
    for i, (name, pretty) in enumerate(zip(names, shown)):
        if "(" in pretty:
            lines.append(f'extern "C" void standin_{i}() __asm__("{name}");')
            lines.append(f'extern "C" void standin_{i}() {{ called("{name}"); }}')
        else:
            lines.append(f'extern "C" {{ alignas(16) char standin_{i}[64] __asm__("{name}"); }}')
    return "\n".join(lines) + "\n"


def _module_object(tmp: pathlib.Path):
    cmd = [CXX, "-std=c++17", "-O0", "-fPIC", "-w", *_defines(), *_includes(), "-c", str(CSRC / "module.cpp"), "-o",
           str(tmp / "module.o")]
    return _run(cmd)


def _link_registrations(tmp: pathlib.Path, objects: list[pathlib.Path]):
    """lossforge_kernels._C as setup.py would link it, against the CPU wheel's libraries, the static
    CUDA runtime and stand-ins for the c10_cuda symbols: every other symbol must resolve at load."""
    cudart = _cudart_static()
    if cudart is None:
        return ["nvcc --dryrun"], 1, "libcudart_static.a not found in nvcc's library folders"
    standins = tmp / "c10_cuda_standins.cpp"
    standins.write_text(_standin_source(objects))
    lib_dir = pathlib.Path(torch.__file__).parent / "lib"
    steps = [[CXX, "-std=c++17", "-shared", "-fPIC", str(standins), "-o", str(tmp / "libc10_cuda_standins.so")],
             [CXX, "-shared", *map(str, objects), str(tmp / "module.o"), f"-L{lib_dir}", "-lc10", "-ltorch",
              "-ltorch_cpu", "-ltorch_python", str(cudart), "-ldl", "-lpthread", "-lrt", f"-L{tmp}",
              "-lc10_cuda_standins", f"-Wl,-rpath,{lib_dir}", f"-Wl,-rpath,{tmp}", "-o", str(tmp / "_C.so")]]
    out = []
    for cmd in steps:
        cmd, code, text = _run(cmd)
        out.append(text)
        if code:
            return cmd, code, "\n".join(out)
    return steps[-1], 0, "\n".join(out)


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """Compiles csrc/ once per run, two jobs at a time (CI has 2 cores), then links the objects into one
    library: {name: (cmd, returncode, output)}, with "module.cpp" and "_C.so" beside the .cu files."""
    # once per run: the pytest-xdist workers share the objects
    tmp = shared_dir("csrc_build") or tmp_path_factory.mktemp("csrc_build")
    sources = sorted(CSRC.glob("*.cu"), key=lambda p: -p.stat().st_size)  # longest compile first
    assert sources, "no .cu files in csrc/"

    def compile_all():
        jobs = {}
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
            for src in sources:
                jobs[src.name] = pool.submit(_nvcc, src, tmp / f"{src.stem}.o")
            jobs["module.cpp"] = pool.submit(_module_object, tmp)
            results = {name: job.result() for name, job in jobs.items()}
        if all(r[1] == 0 for r in results.values()):
            results["_C.so"] = _link_registrations(tmp, [tmp / f"{src.stem}.o" for src in sources])
        return results

    return tmp, once_per_run("csrc_build", compile_all)


def _fail_output(name, result):
    cmd, code, text = result
    return f"{name}: exit {code}\n$ {' '.join(cmd)}\n{text[-12000:]}"


@needs_nvcc
def test_cuda_sources_compile(build):
    _, results = build
    failed = [_fail_output(n, r) for n, r in results.items() if n.endswith(".cu") and r[1] != 0]
    assert not failed, "\n\n".join(failed)


def _ptxas_entries(text: str):
    """(kernel, arch, stack bytes, spill store bytes, spill load bytes, registers) per compiled kernel."""
    entries, current = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
        if m:
            current = [m.group(1), m.group(2)]
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current is not None and len(current) == 2:
            current += [int(g) for g in m.groups()]
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and current is not None and len(current) == 5:
            entries.append((*current, int(m.group(1))))
            current = None
    return entries


@needs_nvcc
def test_kernels_do_not_spill(build):
    _, results = build
    entries = []
    for name, (_, code, text) in results.items():
        if name.endswith(".cu") and code == 0:
            entries += _ptxas_entries(text)
    assert entries, "ptxas reported no kernels (did the compile fail?)"
    assert {e[1] for e in entries} == {f"sm_{a}" for a in ARCHS}
    spilling = [e for e in entries if e[2] or e[3] or e[4]]
    assert not spilling, "kernels with a stack frame or spills (kernel, arch, stack, stores, loads, regs):\n" + \
        "\n".join(map(str, spilling))


_LOAD_SCRIPT = r"""
import json, re, sys
import torch
import lossforge_kernels.ops  # the schemas first: a registration whose signature differs aborts the load
torch.ops.load_library(sys.argv[1])  # RTLD_NOW: any symbol left undefined fails here
ops = json.loads(sys.argv[2])
where = {}
for op in ops:
    name = "lossforge::" + op
    if torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"):
        m = re.search(r"^CUDA: registered at (\S+?):\d+", torch._C._dispatch_dump(name), re.M)
        where[op] = m.group(1) if m else "?"
print(json.dumps(where))
"""


@needs_nvcc
@pytest.mark.skipif(NM is None, reason="nm is needed to list the symbols of the objects")
def test_host_module_compiles_and_registrations_match_the_schemas(build):
    """The compiled objects and module.cpp, linked as the extension is, load beside the Python
    schemas and register every `_cuda` op for the CUDA key from its own family's .cu file.

    A C++ signature that drifts from its schema aborts the load (the dispatcher checks the inferred
    schema when the registration runs); an op left unregistered, or a kernel table that no per-dtype
    file instantiates (an undefined symbol), fails it too."""
    tmp, results = build
    assert results["module.cpp"][1] == 0, _fail_output("module.cpp", results["module.cpp"])
    if any(r[1] for n, r in results.items() if n.endswith(".cu")):
        pytest.skip("a compile failed (reported by test_cuda_sources_compile)")
    assert results["_C.so"][1] == 0, _fail_output("_C.so", results["_C.so"])
    ops = cuda_ops()
    proc = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, str(tmp / "_C.so"), json.dumps(ops)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, f"loading the registrations failed (exit {proc.returncode}):\n{proc.stdout}\n" \
                                 f"{proc.stderr[:6000]}"
    where = json.loads(proc.stdout.strip().splitlines()[-1])
    missing = [op for op in ops if op not in where]
    assert not missing, f"no CUDA kernel registered for {missing}"
    # cross_entropy_fwd_cuda -> cross_entropy.cu, scale_grad_cuda -> scale_grad.cu
    astray = {op: f for op, f in where.items() if not op.startswith(pathlib.Path(f).stem)}
    assert not astray, f"ops registered outside their family's .cu file: {astray}"


@needs_nvcc
@pytest.mark.skipif(NM is None, reason="nm is needed to list the symbols of the objects")
def test_objects_define_the_lossforge_symbols_they_use(build):
    """What one object takes from another (the host code of a family from its per-dtype kernel
    files) is defined by one of them: a dispatch to an instantiation no file makes would compile,
    but the extension would not load."""
    tmp, results = build
    if any(r[1] for n, r in results.items() if n.endswith(".cu")):
        pytest.skip("a compile failed (reported by test_cuda_sources_compile)")

    def symbols(obj, which):
        out = subprocess.run([NM, which, str(obj)], capture_output=True, text=True, check=True).stdout
        return {line.split()[-1] for line in out.splitlines() if "9lossforge" in line}

    objects = [tmp / f"{src.stem}.o" for src in CSRC.glob("*.cu")]
    wanted = set().union(*(symbols(obj, "--undefined-only") for obj in objects))
    have = set().union(*(symbols(obj, "--defined-only") for obj in objects))
    assert wanted, "no object takes a lossforge symbol from another (the per-dtype kernel tables)"
    assert wanted <= have, f"used by csrc/*.cu but defined by none of them: {sorted(wanted - have)}"


# ---- the per-row launch plan (csrc/row_plan.h) ----

# An H200 as the CUDA runtime reports it: shared memory per SM, per-block opt-in, reserved per
# block, SMs, L2 bytes.
H200 = (233472, 232448, 1024, 132, 62914560)
_PLAN_MAIN = r"""
#include <cstdio>
#include <cstdlib>
#include "row_plan.h"
int main(int argc, char** argv) {
  if (argc != 10) return 2;
  const lossforge::DeviceLimits d{std::atoll(argv[5]), std::atoll(argv[6]), std::atoll(argv[7]),
                                  std::atoll(argv[8]), std::atoll(argv[9])};
  const lossforge::RowPlan p = lossforge::plan_rows(std::atoll(argv[1]), std::atoi(argv[2]), argv[3][0] == '1', d);
  std::printf("%d %lld %lld %zu %lld %u\n", p.threads, static_cast<long long>(p.resident),
              static_cast<long long>(p.cache_packets), p.smem, static_cast<long long>(p.prefetch_bytes),
              lossforge::grid_for_rows(p, std::atoll(argv[4]), d));
  return 0;
}
"""


def host_program(tmp_path_factory, name: str, source: str) -> pathlib.Path:
    """`source` (a main() over csrc/ headers) compiled for the host: the plain C++ tests of host logic."""
    if CXX is None:
        pytest.skip("a host C++ compiler is needed")
    tmp = tmp_path_factory.mktemp(name)
    (tmp / f"{name}.cpp").write_text(source)
    cmd, code, text = _run([CXX, "-std=c++17", "-O1", "-Wall", "-Werror", f"-I{CSRC}", str(tmp / f"{name}.cpp"),
                            "-o", str(tmp / name)])
    assert code == 0, f"$ {' '.join(cmd)}\n{text}"
    return tmp / name


@pytest.fixture(scope="module")
def plan_program(tmp_path_factory):
    return host_program(tmp_path_factory, "row_plan", _PLAN_MAIN)


def _plan(program, packets, unroll, keep_in_smem, rows, **knobs):
    """(threads, resident blocks per SM, cached packets, smem bytes, prefetch bytes, grid) on an H200."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOSSFORGE_ROW_")}
    env.update({f"LOSSFORGE_ROW_{k.upper()}": str(v) for k, v in knobs.items()})
    args = [str(a) for a in (packets, unroll, int(keep_in_smem), rows, *H200)]
    out = subprocess.run([str(program), *args], capture_output=True, text=True, env=env, check=True).stdout
    return tuple(int(v) for v in out.split())


def test_row_plans_for_an_h200(plan_program):
    lm, v32k = 128256 // 8, 32000 // 8  # bf16 rows in 16-byte packets
    # LM rows: 512-thread blocks would leave 2 x 132 x 139 KB of tails for L2 (over half of it), so
    # one 1024-thread block per SM keeps 231 KB of its row in shared memory.
    assert _plan(plan_program, lm, 4, True, 8192) == (1024, 1, 14464, 231424, 0, 8192)
    assert _plan(plan_program, lm, 2, True, 8192) == (1024, 1, 14464, 231424, 0, 8192)  # softcap's unroll
    # V=32000: four 256-thread blocks per SM, 55 KB of each row cached, 7.5 KB re-read from L2
    assert _plan(plan_program, v32k, 4, True, 8192) == (256, 4, 3520, 56320, 0, 8192)
    # no gradient (or the backward pass): nothing cached, 256-thread blocks
    assert _plan(plan_program, lm, 4, False, 8192) == (256, 4, 0, 0, 0, 8192)
    # a short row: the smallest block, all of the row cached
    assert _plan(plan_program, 12, 4, True, 5) == (32, 32, 12, 192, 0, 5)


def test_row_plan_knobs(plan_program):
    lm, v32k = 128256 // 8, 32000 // 8
    # a prefetch makes the grid persistent: resident blocks x 132 SMs, or fewer rows
    assert _plan(plan_program, lm, 4, True, 8192, prefetch_kb=128) == (1024, 1, 14464, 231424, 131072, 132)
    assert _plan(plan_program, v32k, 4, True, 8192, prefetch_kb=64) == (256, 4, 3520, 56320, 65536, 528)
    assert _plan(plan_program, v32k, 4, True, 10, prefetch_kb=64)[5] == 10
    # a pinned block size is kept even where the L2 rule would switch
    assert _plan(plan_program, lm, 4, True, 8192, threads=256) == (256, 4, 3520, 56320, 0, 8192)
    assert _plan(plan_program, lm, 4, True, 8192, cache=0) == (512, 2, 0, 0, 0, 8192)
    assert _plan(plan_program, lm, 4, True, 8192, l2_share=1.0) == (512, 2, 7168, 114688, 0, 8192)
