"""Expensive setup done once per test run, not once per pytest-xdist worker.

Each worker collects every test, and a module-scoped fixture runs in every worker that takes one of
the module's tests (worksteal moves them between workers at will), so a slow step (compiling csrc/,
recording and compiling the Triton kernels) could run twice. Here the first worker to arrive
computes the result and the others wait for it and read it back. Results are JSON; a run is the
workers of one `pytest -n` invocation (PYTEST_XDIST_TESTRUNUID), and without xdist nothing is shared.
"""
import json
import os
import pathlib
import tempfile

from filelock import FileLock


def shared_dir(name: str) -> pathlib.Path | None:
    """A directory the workers of this run share (created), or None outside xdist."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if not run:
        return None
    path = pathlib.Path(tempfile.gettempdir()) / f"lossforge-tests-{run}" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def once_per_run(name: str, produce):
    """produce() (JSON-serialisable), computed by one worker of the run and read by the others."""
    where = shared_dir(name)
    if where is None:
        return produce()
    result = where / "result.json"
    with FileLock(str(where / "lock")):
        if result.exists():
            return json.loads(result.read_text())
        value = json.loads(json.dumps(produce()))  # what the other workers will read
        result.write_text(json.dumps(value))
        return value
