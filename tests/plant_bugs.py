"""Shows that the emulated CUDA tests catch typical kernel bugs: `python -m tests.plant_bugs`.

Each bug is planted, one at a time, into a copy of csrc/; the emulated extension is built from the
copy (LOSSFORGE_CUDA_EMULATE_CSRC) and the kernel tests of the family run on it. The table printed
at the end (kept in bench/NOTES.md, "CUDA emulation") says which test caught each bug. Takes about
a minute per bug on two cores (a build and a test run); a bug that no test catches exits 1.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent

# (name, file, original text, planted text, tests that run it)
BUGS = [
    ("off-by-one tail mask (sigmoid focal)", "sigmoid_focal.cu",
     "for (int64_t j = tail + first; j < a.n; j += step) scalar(j);",
     "for (int64_t j = tail + first; j <= a.n; j += step) scalar(j);", "tests/test_sigmoid_focal.py"),
    ("missing __syncthreads in the block sum (256-thread blocks)", "common.cuh",
     "  if (lane == 0) scratch[warp] = v;\n  __syncthreads();",
     "  if (lane == 0) scratch[warp] = v;", "tests/test_sigmoid_focal.py"),
    ("wrong shuffle offset in the row-softmax warp merge", "row_softmax.cuh",
     "const float s = __shfl_xor_sync(0xffffffffu, a.s, off);",
     "const float s = __shfl_xor_sync(0xffffffffu, a.s, off / 2 + 1);",
     "tests/test_cross_entropy_kernels.py tests/test_cross_entropy_gpu.py"),
    ("wrong row stride (logits rows taken as contiguous)", "cross_entropy.cu",
     "a.sx = logits.stride(0);", "a.sx = logits.size(1);",
     "tests/test_cross_entropy_kernels.py tests/test_cross_entropy_gpu.py"),
    ("kept flag from the positive alone (triplet mining)", "triplet.cuh",
     "a.kept[g] = kept ? 1.f : 0.f;", "a.kept[g] = p.found() ? 1.f : 0.f;", "tests/test_triplet_kernels.py"),
    ("radial part added, not taken off (triplet finish)", "triplet.cuh",
     "p[k] - along * (load_elem(xr + k) * r)", "p[k] + along * (load_elem(xr + k) * r)",
     "tests/test_triplet_kernels.py"),
]


def _run(csrc: pathlib.Path, tests: str) -> tuple[int, str]:
    env = dict(os.environ, LOSSFORGE_CUDA_EMULATE="1", LOSSFORGE_CUDA_EMULATE_CSRC=str(csrc))
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-m", "pytest", *tests.split(), "-q", "-x", "-p", "no:cacheprovider",
                           "-k", "cuda", "-W", "ignore"], cwd=ROOT, env=env, capture_output=True, text=True)
    failed = [ln for ln in done.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    crashed = [ln for ln in done.stderr.splitlines() if "Fatal Python error" in ln]
    if failed or crashed:
        return done.returncode, (failed or crashed)[0][:160]
    lines = (done.stdout + done.stderr).strip().splitlines()
    return done.returncode, (lines[-1] if lines else f"exit code {done.returncode}")[:160]


def main() -> int:
    rows, missed = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, file, old, new, tests in [("none (the sources as they are)", None, None, None,
                                             "tests/test_sigmoid_focal.py")] + BUGS:
            csrc = pathlib.Path(tmp) / f"csrc{len(rows)}"
            shutil.copytree(ROOT / "csrc", csrc)
            if file is not None:
                text = (csrc / file).read_text()
                assert text.count(old) >= 1, f"{file}: the text to mutate is gone: {old!r}"
                (csrc / file).write_text(text.replace(old, new))
            start = time.monotonic()
            code, what = _run(csrc, tests)
            caught = code != 0
            if (file is None) == caught:
                missed += 1
            rows.append((name, "fails" if caught else "passes", what, time.monotonic() - start))
            print(f"{name}: {'caught' if caught else 'passes'}: {what}", flush=True)
    print("\n| planted bug | emulated tests | first failure | seconds |\n| --- | --- | --- | --- |")
    for name, result, what, seconds in rows:
        print(f"| {name} | {result} | {what} | {seconds:.0f} |")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
