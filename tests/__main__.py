"""`python -m tests [pytest args]`: the project's whole test command.

Without a CUDA GPU the Triton kernels are tested on CPU tensors through the Triton interpreter
(TRITON_INTERPRET=1, set here before anything imports Triton); with a GPU they run natively.
pytest's "no tests collected" counts as a failure.
"""
import os
import subprocess
import sys


def main() -> int:
    env = dict(os.environ)
    try:
        import torch
        has_gpu = torch.cuda.is_available()
    except Exception:
        has_gpu = False
    if not has_gpu:
        env.setdefault("TRITON_INTERPRET", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    mode = "native GPU" if has_gpu else f"CPU, TRITON_INTERPRET={env['TRITON_INTERPRET']}"
    print(f"lossforge_kernels tests ({mode})", flush=True)
    code = subprocess.call([sys.executable, "-m", "pytest", "tests", *sys.argv[1:]], cwd=root, env=env)
    if code == 5:
        print("pytest collected no tests: treated as a failure", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
