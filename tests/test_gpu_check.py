"""The one-call GPU check (python -m tests.gpu): its plan, its summary and its refusal without a GPU
are tested here; its GPU parts run where a GPU is."""
import pathlib
import subprocess
import sys

import pytest
import torch

from lossforge_kernels import _cuda_emulation
from tests import gpu, kernel_calls

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_plan_covers_every_part(tmp_path):
    steps = gpu.plan(gpu.PARTS, tmp_path, python="py", wheels=None)
    names = [(s.part, s.name) for s in steps]
    assert names[:3] == [("build", "extension"), ("tests", "test suite"), ("sanitizer", "memcheck cuda")]
    sanitized = [s for s in steps if s.part == "sanitizer"]
    assert {s.name for s in sanitized} == {"memcheck cuda", "memcheck triton", "racecheck cuda", "racecheck triton"}
    for s in sanitized:  # every family, on the GPU, with the error exit code that fails the step
        assert s.argv[0] == "compute-sanitizer" and "--error-exitcode=1" in s.argv
        assert s.argv[-3:] == ["tests.kernel_calls", s.name.split()[1], "cuda"]
    bench = [s for s in steps if s.part == "bench"]
    assert bench[0].argv[-4:] == ["bench", "--quick", "--out", str(tmp_path / "bench")]
    examples = {s.name for s in steps if s.part == "examples"}
    assert examples == {p.stem for p in (ROOT / "examples").glob("[!_]*.py")}
    assert [s.part for s in gpu.plan(["bench"], tmp_path)] == ["bench"]


def test_plan_bounds_every_step_but_the_build(tmp_path):
    steps = gpu.plan(gpu.PARTS, tmp_path, python="py", wheels=None, limits={"bench": 90.0})
    assert all((s.limit is None) == (s.part == "build") for s in steps)
    assert {s.part: s.limit for s in steps}["bench"] == 90.0
    suite = next(s for s in steps if s.part == "tests")
    assert suite.limit == gpu.LIMITS["tests"] and suite.argv[3:5] == ["-q", "-n"]  # xdist workers on the GPU


def test_a_step_past_its_limit_is_stopped_and_later_steps_run(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu, "GRACE_S", 0.5)
    sleep = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    # a child that ignores the interrupt is killed after the grace period
    deaf = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                                  "print('started', flush=True); time.sleep(60)"]
    for argv in (sleep, deaf):
        outcome = gpu.run_step(gpu.Step("tests", "sleeper", argv, limit=1.0), tmp_path)
        assert outcome.code == gpu.TIMED_OUT and outcome.seconds < 15, outcome
        assert "started" in outcome.log.read_text() and outcome.last_line.startswith("timed out")
    after = gpu.run_step(gpu.Step("bench", "quick", [sys.executable, "-c", "print('ok')"], limit=30.0), tmp_path)
    assert after.code == 0 and after.last_line == "ok"
    text = gpu.summary([outcome, after], tmp_path, "stack", "date")
    assert "**TIMED OUT** at 1 s" in text and "1 of 2 steps passed." in text


def test_plan_installs_wheels_first(tmp_path):
    (tmp_path / "a-1.0-py3-none-any.whl").write_text("")
    steps = gpu.plan(["build"], tmp_path, python="py", wheels=str(tmp_path))
    assert steps[0].name == "yardstick wheels" and steps[0].argv[-1].endswith("a-1.0-py3-none-any.whl")
    assert "--no-deps" in steps[0].argv


def test_summary_says_what_passed_and_failed(tmp_path):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "cross_entropy.md").write_text("| shape | ms |\n| --- | --- |\n| 8x8 | 1.0 |")
    log = tmp_path / "logs" / "x.log"
    log.parent.mkdir()
    log.write_text("")
    ok = gpu.Outcome(gpu.Step("tests", "test suite", []), 0, 61.0, log, "10 passed")
    bad = gpu.Outcome(gpu.Step("sanitizer", "memcheck cuda", []), 1, 9.0, log, "========= ERROR SUMMARY: 2 errors")
    text = gpu.summary([ok, bad], tmp_path, "NVIDIA H200; torch 2.11", "2026-12-06 10:00 UTC")
    assert "| tests | test suite | passed | 61 s | logs/x.log |" in text
    assert "**FAILED** (exit 1): ========= ERROR SUMMARY: 2 errors" in text
    assert "1 of 2 steps passed." in text and "## Benchmark: cross_entropy" in text and "| 8x8 | 1.0 |" in text
    assert "Stack: NVIDIA H200; torch 2.11" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refuses_without_a_gpu(tmp_path):
    done = subprocess.run([sys.executable, "-m", "tests.gpu", "--parts", "tests", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr


def test_unknown_part_is_refused(tmp_path):
    done = subprocess.run([sys.executable, "-m", "tests.gpu", "--parts", "tests,benches", "--dry-run"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and "unknown ['benches']" in done.stderr


@pytest.mark.skipif(not _cuda_emulation.enabled(), reason="runs with the CUDA emulation (LOSSFORGE_CUDA_EMULATE=1)")
def test_the_sanitized_calls_run_on_the_emulated_cuda_backend():
    kernel_calls.every_family("cuda", "cpu")
