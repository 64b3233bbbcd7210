"""Every GPU check in one call: `python -m tests.gpu [--out DIR] [--parts build,tests,sanitizer,bench,examples]`.

On a machine with one NVIDIA GPU and a CUDA build of torch: installs the optional yardsticks' wheels
(the folder named by LOSSFORGE_WHEELS, without their dependencies) and this package with its CUDA
extension, runs the test suite on the GPU, compute-sanitizer's memcheck and racecheck on one small
call of every kernel family on both kernel backends (tests/kernel_calls.py), the quick benchmark of
every suite, and each example for a few steps. Every part runs even when an earlier one failed; one
summary (DIR/summary.md: versions, each part passed or failed with its time and log, the benchmark
tables) says what happened, and the exit status is 0 only when every part passed.

Each step but the build has a time limit (LIMITS, or --limit PART=SECONDS): a step past it is
interrupted (pytest then reports the failures so far), marked timed out, and the later parts still
run, so that a call's length is bounded and it always ends with a summary (rewritten after every
step). Where the machine is lent for about fifteen minutes, two calls fit: --parts
build,tests,sanitizer, then --parts bench,examples. The test suite runs in pytest-xdist workers (the
GPU is shared; each test's memory and launch checks are per process).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import importlib.util
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
PARTS = ("build", "tests", "sanitizer", "bench", "examples")
# seconds per step of each part (None: no limit); the whole stays within about ten minutes
LIMITS = {"build": None, "tests": 270.0, "sanitizer": 60.0, "bench": 240.0, "examples": 20.0}
TIMED_OUT = 124  # a step's exit code when its limit stopped it
GRACE_S = 20.0   # after SIGINT at the limit (pytest then prints its failures so far), before SIGKILL


@dataclasses.dataclass
class Step:
    part: str
    name: str
    argv: list[str]
    limit: float | None = None  # seconds


@dataclasses.dataclass
class Outcome:
    step: Step
    code: int
    seconds: float
    log: pathlib.Path
    last_line: str


def _test_workers() -> list[str]:
    """pytest-xdist's arguments for the GPU suite: a worker per two cores, at most 8 (none without xdist)."""
    if importlib.util.find_spec("xdist") is None:
        return []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return ["-n", str(max(1, min(8, cores // 2))), "--dist", "worksteal"]


def plan(parts, out: pathlib.Path, python: str = sys.executable, wheels: str | None = None,
         sanitizer: str = "compute-sanitizer", limits: dict | None = None) -> list[Step]:
    """The commands of each part, in order, each with its part's time limit."""
    limits = dict(LIMITS, **(limits or {}))
    steps = []
    if "build" in parts:
        if wheels:
            found = sorted(glob.glob(os.path.join(wheels, "*.whl")))
            steps.append(Step("build", "yardstick wheels", [python, "-m", "pip", "install", "-q", "--no-deps",
                                                            "--no-index", *found]))
        steps.append(Step("build", "extension", [python, "-m", "pip", "install", "-q", "-e", str(ROOT),
                                                 "--no-build-isolation"]))
    if "tests" in parts:
        steps.append(Step("tests", "test suite", [python, "-m", "tests", "-q", *_test_workers(), "--durations=25"]))
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
    for s in steps:
        s.limit = limits[s.part]
    return steps


def run_step(step: Step, out: pathlib.Path) -> Outcome:
    log = out / "logs" / f"{step.part}-{step.name.replace(' ', '-')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "w") as f:
        f.write("$ " + " ".join(step.argv) + "\n")
        f.flush()
        try:  # a session of its own, so that a step past its limit is stopped with all its children
            proc = subprocess.Popen(step.argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:  # e.g. compute-sanitizer not on the PATH
            f.write(f"cannot run: {exc}\n")
            code = 127
        else:
            try:
                code = proc.wait(timeout=step.limit)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=GRACE_S)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                f.flush()
                f.write(f"timed out: stopped at its limit of {step.limit:.0f} s\n")
                code = TIMED_OUT
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
        if o.code == 0:
            result = "passed"
        elif o.code == TIMED_OUT and o.step.limit:
            result = f"**TIMED OUT** at {o.step.limit:.0f} s (the log has what ran)"
        else:
            result = f"**FAILED** (exit {o.code}): {o.last_line[:120]}"
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
    parser.add_argument("--limit", action="append", default=[], metavar="PART=SECONDS",
                        help="time limit of each step of PART (0: none); defaults: "
                             + ", ".join(f"{k}={v or 0:.0f}" for k, v in LIMITS.items()))
    parser.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {','.join(PARTS)}")
    limits = {}
    for item in args.limit:
        part, _, seconds = item.partition("=")
        try:
            value = float(seconds)
        except ValueError:
            value = -1.0
        if part not in PARTS or value < 0:
            parser.error(f"--limit: expected PART=SECONDS with PART one of {','.join(PARTS)}, got {item!r}")
        limits[part] = value or None
    out = pathlib.Path(args.out).resolve()
    steps = plan(parts, out, wheels=os.environ.get("LOSSFORGE_WHEELS"), limits=limits)
    if args.dry_run:
        for s in steps:
            limit = f" (limit {s.limit:.0f} s)" if s.limit else ""
            print(f"[{s.part}] {s.name}{limit}: {' '.join(s.argv)}")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("python -m tests.gpu needs a CUDA GPU visible to a CUDA build of torch; on CPU run python -m tests",
              file=sys.stderr)
        return 2
    if "sanitizer" in parts and shutil.which("compute-sanitizer") is None:
        print("warning: compute-sanitizer is not on the PATH: the sanitizer steps will fail", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    stack, outcomes, text = versions(), [], ""
    for s in steps:  # the summary after every step: a call stopped from outside still leaves one
        outcomes.append(run_step(s, out))
        text = summary(outcomes, out, stack, date)
        (out / "summary.md").write_text(text)
    print(text)
    return 0 if all(o.code == 0 for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
