"""VFMIG_STRICT=1: a host-probe skip becomes a failure naming what is missing (CI sets it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

# A tiny suite that loads the real tests/conftest.py as a plugin, with the KVM probe pointed
# at a path that does not exist: the kvm fixture's probe fails exactly as on a host without KVM.
_PROBE = """
import pytest
import tests.conftest as c
c.KVM_PATH = "/nonexistent/kvm-for-strict-test"

def test_needs_kvm(kvm):
    pass

def test_bare_skip():
    pytest.skip("needs a frobnicator")

@pytest.mark.xfail(reason="a known bug is not a missing host feature")
def test_xfail():
    assert False

def test_passes():
    pass
"""


def _run(tmp_path: Path, strict: bool) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_probe.py").write_text(_PROBE)
    env = {k: v for k, v in os.environ.items() if k not in ("VFMIG_STRICT", "PYTEST_ADDOPTS")}
    if strict:
        env["VFMIG_STRICT"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "tests.conftest", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=REPO,  # so that `tests.conftest` imports
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_without_the_switch_missing_hosts_features_skip(tmp_path: Path) -> None:
    r = _run(tmp_path, strict=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed, 2 skipped, 1 xfailed" in r.stdout, r.stdout
    assert "no /nonexistent/kvm-for-strict-test on this host" in r.stdout


def test_strict_fails_and_names_what_is_missing(tmp_path: Path) -> None:
    r = _run(tmp_path, strict=True)
    assert r.returncode == 1, r.stdout + r.stderr
    # The fixture fails in setup (an error), the bare skip in the call (a failure); xfail stays.
    assert "1 failed, 1 passed, 1 xfailed, 1 error" in r.stdout, r.stdout
    assert "VFMIG_STRICT=1 and this host lacks it: no /nonexistent/kvm-for-strict-test on this host" in r.stdout
    assert "VFMIG_STRICT=1 turns this skip into a failure: Skipped: needs a frobnicator" in r.stdout
    assert "skipped" not in r.stdout.splitlines()[-1]
