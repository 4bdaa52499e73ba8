"""The CLI as a user runs it: JSON output, and one-line errors for bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import run_cli


@pytest.mark.usefixtures("kvm")
def test_vm_run_json() -> None:
    r = run_cli("vm", "run", "--memory", "64M", "--seconds", "1", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["dirty_rate_pps"] > 10_000
    assert doc["exits"]["io"] > 0
    assert doc["moved_while_paused"] == 0
    assert doc["pause_latency_us"]["max"] > 0


def test_doctor_json_reports_kvm() -> None:
    r = run_cli("doctor", "--json")
    doc = json.loads(r.stdout)
    assert "kvm" in doc and "dirty_ring" in doc
    assert r.returncode == (0 if doc["kvm"]["ok"] else 1)


def _assert_one_line_error(r, needle: str) -> None:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("vfmig: error:") and needle in lines[0], lines[0]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--memory", "100000000"], "multiple of the page size"),
        (["--memory", "64T"], "too large for this host"),
        (["--memory", "lots"], "cannot parse size"),
        (["--guest", "doom"], "unknown guest"),
        (["--seconds", "-1"], "--seconds"),
    ],
)
def test_vm_run_bad_input(args: list[str], needle: str) -> None:
    _assert_one_line_error(run_cli("vm", "run", *args), needle)


def test_unknown_option_is_one_line() -> None:
    _assert_one_line_error(run_cli("vm", "run", "--bogus"), "unrecognized arguments")


@pytest.mark.usefixtures("root")
def test_missing_dev_kvm() -> None:
    if not shutil.which("unshare"):
        pytest.skip("needs unshare(1)")
    # A private mount namespace with an empty /dev: exactly a host without KVM.
    script = f"mount -t tmpfs none /dev && exec {sys.executable} -m vfmig vm run --seconds 1"
    r = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    _assert_one_line_error(r, "/dev/kvm is missing")
