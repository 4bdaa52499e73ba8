"""`vfmig trace`: a real three-process migration recorded system-wide with trace-cmd and with perf,
holding both processes' phase markers and the KVM events; and its one-line errors."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import host_skip
from tests.helpers import wait_until
from vfmig.demo import start_destination


def _cli_has_trace() -> bool:
    from vfmig.cli import build_parser

    return any(isinstance(a, argparse._SubParsersAction) and "trace" in a.choices for a in build_parser()._actions)


def _trace(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`vfmig trace ARGS` as a user runs it; through the module's own entry point until the CLI
    has the subcommand (the same add_parser and cmd_trace)."""
    entry = ["vfmig", "trace"] if _cli_has_trace() else ["vfmig.observe.trace"]
    cmd = [sys.executable, "-m", *entry, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _one_line_error(r: subprocess.CompletedProcess[str], needle: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vfmig: error:") and needle in lines[0], r.stderr


def test_an_unknown_tool_is_a_one_line_error() -> None:
    _one_line_error(_trace("--with", "nosuchtool", "--", "migrate"), "unknown tracer 'nosuchtool'")


def test_nothing_after_the_separator_is_a_one_line_error() -> None:
    _one_line_error(_trace("--with", "trace-cmd", "--"), "nothing to record")
    _one_line_error(_trace("--", "vm", "run"), "records `vfmig migrate` or `vfmig demo`")


# ---- real recordings ----------------------------------------------------------------------------


def _host_reason(tool: str) -> str | None:
    if os.geteuid() != 0:
        return "vfmig trace needs root"
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm on this host"
    if shutil.which(tool) is None:
        return f"{tool} is not installed"
    return None


def _perf_reason() -> str | None:
    """perf can record tracepoints system-wide here (a container may forbid perf_event_open)."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "probe.data")
        r = subprocess.run(
            ["perf", "record", "-q", "-a", "-e", "sched:sched_switch", "-o", out, "--", "true"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if r.returncode != 0 or not os.path.exists(out):
            return f"perf cannot record here: {(r.stderr.strip().splitlines() or ['?'])[-1]}"
    return None


@pytest.fixture
def vm_and_destination(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[str], str, subprocess.Popen[str]]]:
    """A `vm run --control` process and a `vfmig receive` process (as tests/test_cli.py does)."""
    sock = str(tmp_path / "vm.sock")
    cmd = [sys.executable, "-m", "vfmig", "vm", "run", "--memory", "64M", "--control", sock, "--seconds", "0"]
    vm = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    dst = None
    try:
        assert vm.stdout is not None and "control socket" in vm.stdout.readline()
        dst, addr = start_destination(run_seconds=0.3)
        yield sock, vm, addr, dst
        assert vm.wait(60) == 0 and dst.wait(60) == 0
    finally:
        for p in (vm, dst):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)


def _markers(text: str, pattern: str) -> dict[str, list[tuple[int, float]]]:
    """Marker name -> [(tid, seconds)] from a trace's text, with `pattern` naming groups tid, ts, name."""
    out: dict[str, list[tuple[int, float]]] = {}
    for m in re.finditer(pattern, text, re.M):
        out.setdefault(m.group("name"), []).append((int(m.group("tid")), float(m.group("ts"))))
    return out


def _check_both_sides(marks: dict[str, list[tuple[int, float]]], dst_pid: int) -> None:
    """The source's markers and the destination's (from the other process) are both there, in
    order. dst-vm-started is not a marker: the engine takes it from the destination's first
    vCPU's vcpu-first-run checkpoint, which is one."""
    (src_tid, t_down), *_ = marks["src-downtime-start"]
    (dst_tid, t_loaded), *_ = marks["dst-ram-loaded"]
    assert dst_tid == dst_pid and src_tid != dst_pid, marks  # receive's main thread loads the RAM
    started = [t for tid, t in marks.get("vcpu-first-run", []) if t > t_down]
    assert started and t_down < t_loaded < min(started), marks


@pytest.mark.parametrize("tool", ["trace-cmd", "perf"])
def test_trace_records_a_real_migration(
    tool: str, tmp_path: Path, vm_and_destination: tuple[str, subprocess.Popen[str], str, subprocess.Popen[str]]
) -> None:
    reason = _host_reason(tool) or (_perf_reason() if tool == "perf" else None)
    if reason:
        host_skip(reason)
    sock, _vm, addr, dst = vm_and_destination
    wait_until(lambda: os.path.exists(sock), "the VM's control socket")
    out = tmp_path / ("trace.dat" if tool == "trace-cmd" else "trace.perf.data")
    tracing_on = Path("/sys/kernel/tracing/tracing_on")
    was_on = tracing_on.read_text()
    r = _trace("--with", tool, "-o", str(out), "--", "migrate", "--control", sock, "--to", addr)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "migration completed" in r.stdout and out.is_file() and out.stat().st_size > 0
    said = re.search(r"markers: (\d+) vfmig checkpoint markers", r.stdout)
    assert said and f"trace:   {out}" in r.stdout, r.stdout
    if tool == "trace-cmd":
        text = subprocess.run(["trace-cmd", "report", str(out)], capture_output=True, text=True, timeout=300).stdout
        assert "vfmig: src-downtime-start" in text and "kvm_userspace_exit:" in text
        pattern = r"-(?P<tid>\d+)\s+\[\d+\]\s+(?P<ts>[\d.]+): print: +tracing_mark_write: vfmig: (?P<name>\S+)"
        assert f"trace-cmd report {out}" in r.stdout and f"kernelshark {out}" in r.stdout
        assert tracing_on.read_text() == was_on  # trace-cmd left it off here: vfmig trace restores it
    else:
        text = subprocess.run(["perf", "script", "-i", str(out)], capture_output=True, text=True, timeout=300).stdout
        assert 'name="src-downtime-start"' in text and "kvm:kvm_userspace_exit:" in text
        pattern = r"\s(?P<tid>\d+)\s+\[\d+\]\s+(?P<ts>[\d.]+):\s+vfmig:checkpoint: \(\w+\) name=\"(?P<name>[^\"]+)\""
        assert f"perf script -i {out}" in r.stdout
        with open("/sys/kernel/tracing/uprobe_events") as f:
            left = f.read()
        assert "vfmig/checkpoint" not in left and "sdt_vfmig/" not in left, left  # its uprobes are gone
    marks = _markers(text, pattern)
    _check_both_sides(marks, dst.pid)
    assert int(said.group(1)) == sum(len(v) for v in marks.values()), (said.group(0), marks)
