"""The test command itself (`python -m tests`): what it hands pytest."""
import pathlib

from tests import __main__ as command

ROOT = str(pathlib.Path(__file__).resolve().parent.parent)


def test_the_whole_suite_unless_files_are_named():
    assert command._selection([], ROOT) == ["tests"]
    assert command._selection(["-q", "-k", "triplet", "-x"], ROOT) == ["tests"]  # an expression, not a path
    # a file, a test id or a directory of the suite: only those (the suite was run beside them)
    assert command._selection(["tests/test_chunks.py", "-q"], ROOT) == []
    assert command._selection(["-q", "tests/test_chunks.py::test_chunk_rows_matches_csrc"], ROOT) == []
    assert command._selection(["tests"], ROOT) == []
