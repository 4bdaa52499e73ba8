"""The suite's own guard: a test that leaves something running fails, naming it, and what it
left is killed so the tests after it are not slowed or skewed."""

from __future__ import annotations

import pytest

from tests.conftest import REPO, proc_stat

pytest_plugins = ["pytester"]


def test_a_test_that_leaves_a_process_running_fails_and_names_it(pytester: pytest.Pytester) -> None:
    pytester.makeconftest((REPO / "tests" / "conftest.py").read_text())
    pytester.makepyfile(
        test_leaky="""
import subprocess

def test_leaves_a_sleeper():
    p = subprocess.Popen(["sleep", "300"])
    with open("leaked.pid", "w") as f:
        f.write(str(p.pid))

def test_cleans_up():
    p = subprocess.Popen(["sleep", "300"])
    p.kill()
    p.wait()
"""
    )
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*left running: processes {*: 'sleep'}*"])
    pid = int((pytester.path / "leaked.pid").read_text())
    st = proc_stat(pid)  # killed by the guard: gone, or a zombie its new parent has not reaped yet
    state = "gone" if st is None else st[1]
    assert state in ("gone", "Z"), f"the leaked sleeper {pid} still runs (state {state})"
