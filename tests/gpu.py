"""Every GPU check in one call: `python -m tests.gpu [--out DIR] [--parts build,tests,sanitizer,bench,examples]`.

On a machine with one NVIDIA GPU and a CUDA build of torch: installs the optional yardsticks' wheels
(the folder named by LOSSFORGE_WHEELS, without their dependencies) and this package with its CUDA
extension, runs the test suite on the GPU, compute-sanitizer's memcheck and racecheck on one small
call of every kernel family on both kernel backends (tests/kernel_calls.py), the quick benchmark of
every suite, and each example for a few steps. Every part runs even when an earlier one failed; one
summary (DIR/summary.md: versions, each part passed or failed with its time and log, the benchmark
tables) says what happened, and the exit status is 0 only when every part passed.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import os
import pathlib
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
PARTS = ("build", "tests", "sanitizer", "bench", "examples")


@dataclasses.dataclass
class Step:
    part: str
    name: str
    argv: list[str]


@dataclasses.dataclass
class Outcome:
    step: Step
    code: int
    seconds: float
    log: pathlib.Path
    last_line: str


def plan(parts, out: pathlib.Path, python: str = sys.executable, wheels: str | None = None,
         sanitizer: str = "compute-sanitizer") -> list[Step]:
    """The commands of each part, in order."""
    steps = []
    if "build" in parts:
        if wheels:
            found = sorted(glob.glob(os.path.join(wheels, "*.whl")))
            steps.append(Step("build", "yardstick wheels", [python, "-m", "pip", "install", "-q", "--no-deps",
                                                            "--no-index", *found]))
        steps.append(Step("build", "extension", [python, "-m", "pip", "install", "-q", "-e", str(ROOT),
                                                 "--no-build-isolation"]))
    if "tests" in parts:
        steps.append(Step("tests", "test suite", [python, "-m", "tests", "-q"]))
    if "sanitizer" in parts:
        for tool in ("memcheck", "racecheck"):
            for backend in ("cuda", "triton"):
                steps.append(Step("sanitizer", f"{tool} {backend}", [
                    sanitizer, f"--tool={tool}", "--error-exitcode=1", "--target-processes=all",
                    python, "-m", "tests.kernel_calls", backend, "cuda"]))
    if "bench" in parts:
        steps.append(Step("bench", "quick benchmark", [python, "-m", "bench", "--quick", "--out", str(out / "bench")]))
    if "examples" in parts:
        for example in sorted((ROOT / "examples").glob("[!_]*.py")):
            steps.append(Step("examples", example.stem, [python, str(example), "--steps", "20", "--out",
                                                         str(out / "examples")]))
    return steps


def run_step(step: Step, out: pathlib.Path) -> Outcome:
    log = out / "logs" / f"{step.part}-{step.name.replace(' ', '-')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "w") as f:
        f.write("$ " + " ".join(step.argv) + "\n")
        f.flush()
        try:
            code = subprocess.call(step.argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        except OSError as exc:  # e.g. compute-sanitizer not on the PATH
            f.write(f"cannot run: {exc}\n")
            code = 127
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    print(f"[{step.part}] {step.name}: {'passed' if code == 0 else f'FAILED ({code})'}", flush=True)
    return Outcome(step, code, time.monotonic() - start, log, lines[-1] if lines else "")


def versions(python: str = sys.executable) -> str:
    probe = ("import torch, platform\n"
             "try:\n import triton; tv = triton.__version__\nexcept Exception: tv = 'none'\n"
             "gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA GPU'\n"
             "print(f'{gpu}; torch {torch.__version__} (CUDA {torch.version.cuda}); Triton {tv}; "
             "Python {platform.python_version()}')")
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    return done.stdout.strip() or done.stderr.strip().splitlines()[-1]


def summary(outcomes: list[Outcome], out: pathlib.Path, stack: str, date: str) -> str:
    lines = [f"# GPU check, {date}", "", f"Stack: {stack}", "", "| part | step | result | time | log |",
             "| --- | --- | --- | --- | --- |"]
    for o in outcomes:
        result = "passed" if o.code == 0 else f"**FAILED** (exit {o.code}): {o.last_line[:120]}"
        lines.append(f"| {o.step.part} | {o.step.name} | {result} | {o.seconds:.0f} s | "
                     f"{o.log.relative_to(out)} |")
    failed = [o for o in outcomes if o.code != 0]
    lines += ["", f"{len(outcomes) - len(failed)} of {len(outcomes)} steps passed."]
    tables = sorted((out / "bench").glob("*.md")) if (out / "bench").is_dir() else []
    for table in tables:
        lines += ["", f"## Benchmark: {table.stem}", "", table.read_text().strip()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu-out", help="folder for the logs, benchmark files and summary.md")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {','.join(PARTS)}")
    out = pathlib.Path(args.out).resolve()
    steps = plan(parts, out, wheels=os.environ.get("LOSSFORGE_WHEELS"))
    if args.dry_run:
        for s in steps:
            print(f"[{s.part}] {s.name}: {' '.join(s.argv)}")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("python -m tests.gpu needs a CUDA GPU visible to a CUDA build of torch; on CPU run python -m tests",
              file=sys.stderr)
        return 2
    if "sanitizer" in parts and shutil.which("compute-sanitizer") is None:
        print("warning: compute-sanitizer is not on the PATH: the sanitizer steps will fail", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    outcomes = [run_step(s, out) for s in steps]
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = summary(outcomes, out, versions(), date)
    (out / "summary.md").write_text(text)
    print(text)
    return 0 if all(o.code == 0 for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
