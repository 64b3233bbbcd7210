"""`python -m tests [pytest args]`: the project's whole test command (or the test files it is given).

Without a CUDA GPU the kernels are tested on CPU tensors: the Triton kernels through the Triton
interpreter (TRITON_INTERPRET=1, set here before anything imports Triton) and the CUDA kernels through
the CUDA emulation (LOSSFORGE_CUDA_EMULATE=1, built on first use), shared among one pytest-xdist
worker per core (at most 8; `-n 0` or `-p no:xdist` keeps one process), each worker's OpenMP threads
limited so that together they fill the cores; with a GPU they run natively, in one process.
pytest's "no tests collected" counts as a failure.
"""
import importlib
import importlib.util
import os
import subprocess
import sys


def _versions() -> str:
    """The stack under test, e.g. "torch 2.13.0, Triton 3.9.0, numpy 2.4.6"."""
    found = []
    for name, label in (("torch", "torch"), ("triton", "Triton"), ("numpy", "numpy")):
        try:
            found.append(f"{label} {importlib.import_module(name).__version__}")
        except Exception:
            found.append(f"no {label}")
    return ", ".join(found)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _workers(args: list[str]) -> list[str]:
    """pytest-xdist arguments for a CPU run: a worker per core, unless the caller chose otherwise."""
    if any(a.startswith(("-n", "--numprocesses")) or a == "no:xdist" for a in args):
        return []
    if importlib.util.find_spec("xdist") is None:
        return []
    n = min(_cores(), 8)
    # worksteal: the slow interpreter tests are uneven, so idle workers take from busy ones
    return ["-n", str(n), "--dist", "worksteal"] if n > 1 else []


def _selection(args: list[str], root: str) -> list[str]:
    """The whole of tests/, unless the arguments name test files or directories themselves (a
    `path::test` id counts): then only those run."""
    named = any(not a.startswith("-") and os.path.exists(os.path.join(root, a.split("::")[0])) for a in args)
    return [] if named else ["tests"]


def main() -> int:
    env = dict(os.environ)
    try:
        import torch
        has_gpu = torch.cuda.is_available()
    except Exception:
        has_gpu = False
    args = sys.argv[1:]
    if not has_gpu:
        env.setdefault("TRITON_INTERPRET", "1")
        env.setdefault("LOSSFORGE_CUDA_EMULATE", "1")
        workers = _workers(args)
        if workers:
            env.setdefault("OMP_NUM_THREADS", str(max(1, _cores() // int(workers[1]))))
        args = workers + args
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    mode = "native GPU" if has_gpu else \
        f"CPU, TRITON_INTERPRET={env['TRITON_INTERPRET']}, LOSSFORGE_CUDA_EMULATE={env['LOSSFORGE_CUDA_EMULATE']}"
    print(f"lossforge_kernels tests ({mode}; {_versions()})", flush=True)
    code = subprocess.call([sys.executable, "-m", "pytest", *_selection(args, root), *args], cwd=root, env=env)
    if code == 5:
        print("pytest collected no tests: treated as a failure", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
