"""The CLI as a user runs it: JSON output, and one-line errors for bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import host_skip, run_cli
from tests.helpers import vm_process
from vfmig import control
from vfmig.demo import start_destination


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
        host_skip("needs unshare(1)")
    # A private mount namespace with an empty /dev: exactly a host without KVM.
    script = f"mount -t tmpfs none /dev && exec {sys.executable} -m vfmig vm run --seconds 1"
    r = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    _assert_one_line_error(r, "/dev/kvm is missing")


@pytest.mark.usefixtures("kvm")
def test_migrate_a_vm_run_by_another_process(tmp_path) -> None:
    """vm run --control in one process, receive in a second, migrate from a third."""
    with vm_process(tmp_path, "--memory", "128M", "--rate", "50000") as (vm, sock):
        dst, addr = start_destination(run_seconds=0.3)
        try:
            out = tmp_path / "report.json"
            r = run_cli("migrate", "--control", sock, "--to", addr, "--verify", "--channels", "2", "--json", str(out))
            assert r.returncode == 0, r.stderr
            assert "migration completed" in r.stdout
            assert "iteration 1:" in r.stderr and "guest resumed" in r.stderr  # progress, streamed
            doc = json.loads(out.read_text())
            assert doc["status"] == "completed" and doc["verification"]["memory_match"] is True
            assert vm.wait(30) == 0 and "VM migrated" in vm.communicate()[0]
            assert dst.wait(30) == 0
        finally:
            if dst.poll() is None:
                dst.kill()


@pytest.mark.usefixtures("kvm")
def test_migrate_to_nowhere_keeps_the_vm(tmp_path) -> None:
    with vm_process(tmp_path, "--memory", "64M") as (_, sock):
        r = run_cli("migrate", "--control", sock, "--to", "tcp://127.0.0.1:9")
        _assert_one_line_error(r, "the source VM keeps running")
        stats = control.request(sock, {"cmd": "stats"})
        assert stats["ok"] and stats["stats"]["touches"] > 0


def test_migrate_without_a_vm() -> None:
    _assert_one_line_error(
        run_cli("migrate", "--control", "/nonexistent.sock", "--to", "tcp://127.0.0.1:1"), "no VM control socket"
    )


def test_receive_bad_address() -> None:
    _assert_one_line_error(run_cli("receive", "--listen", "http://x"), "tcp://HOST:PORT")


@pytest.mark.usefixtures("kvm")
def test_demo_runs_a_real_migration(tmp_path) -> None:
    out = tmp_path / "demo.json"
    r = run_cli(
        "demo", "--memory", "128M", "--verify", "--channels", "2", "--tracker", "ring", "--json", str(out), timeout=180
    )
    assert r.returncode == 0, r.stderr
    assert "migration completed" in r.stdout and "downtime" in r.stdout
    doc = json.loads(out.read_text())
    assert doc["verification"]["memory_match"] is True
    assert doc["tracker_stats"]["harvested"] > 0, "--tracker ring: the dirty ring must have been harvested"
    assert doc["destination"]["touches_after"] > doc["destination"]["touches_at_resume"]
    # The handshake (the guest still runs) comes first, then the downtime.
    names = [c["name"] for c in doc["checkpoints"]]
    assert names[:3] == ["src-handshake-start", "src-handshake-end", "src-downtime-start"], names
    # The demo's VF driver enabled the capability, so the guest was asked (whether it made the
    # deadline on a loaded host is tests/test_handshake.py's business).
    assert doc["handshake"]["outcome"] in ("acked", "timeout", "late"), doc["handshake"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--channels", "0"], "channels"),
        (["--max-downtime", "-5"], "max downtime"),
        (["--bandwidth", "fast"], "cannot parse size"),
        (["--memory", "1000"], "multiple of the page size"),
    ],
)
def test_demo_bad_options(args: list[str], needle: str) -> None:
    _assert_one_line_error(run_cli("demo", *args), needle)
