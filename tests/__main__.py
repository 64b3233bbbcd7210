"""`python -m tests [pytest args]`: the project's whole test command.

Without a CUDA GPU the kernels are tested on CPU tensors: the Triton kernels through the Triton
interpreter (TRITON_INTERPRET=1, set here before anything imports Triton) and the CUDA kernels through
the CUDA emulation (LOSSFORGE_CUDA_EMULATE=1, built on first use); with a GPU they run natively.
pytest's "no tests collected" counts as a failure.
"""
import importlib
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


def main() -> int:
    env = dict(os.environ)
    try:
        import torch
        has_gpu = torch.cuda.is_available()
    except Exception:
        has_gpu = False
    if not has_gpu:
        env.setdefault("TRITON_INTERPRET", "1")
        env.setdefault("LOSSFORGE_CUDA_EMULATE", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    mode = "native GPU" if has_gpu else \
        f"CPU, TRITON_INTERPRET={env['TRITON_INTERPRET']}, LOSSFORGE_CUDA_EMULATE={env['LOSSFORGE_CUDA_EMULATE']}"
    print(f"lossforge_kernels tests ({mode}; {_versions()})", flush=True)
    code = subprocess.call([sys.executable, "-m", "pytest", "tests", *sys.argv[1:]], cwd=root, env=env)
    if code == 5:
        print("pytest collected no tests: treated as a failure", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
