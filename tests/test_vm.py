"""The micro-VMM on real KVM: dirty rate, pause/resume, vCPU state and cold migration."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.helpers import wait_running, wait_until
from vfmig.errors import ConfigError, HostError
from vfmig.vm import MicroVM, VMState

pytestmark = pytest.mark.usefixtures("kvm")


@pytest.mark.parametrize("vcpus", [1, 2])
def test_dirty_rate_within_15_percent(vcpus: int) -> None:
    target = 100_000
    with MicroVM(memory="128M", vcpus=vcpus, rate_pps=target) as vm:
        vm.start()
        wait_running(vm, passes=1)  # the first pass faults RAM in: not the steady rate
        rate = vm.measure_rate(2.0)  # the guest running 2 s is the measurement
        assert vm.core.failed is None
    assert abs(rate - target) / target <= 0.15, f"measured {rate:.0f} pages/s for a target of {target}"


def test_two_vcpus_both_run() -> None:
    with MicroVM(memory="128M", vcpus=2) as vm:
        vm.start()
        wait_running(vm)
        a = [s.touches for s in vm.vcpu_stats()]
        # Each vCPU's own counter must move on its own (one vCPU cannot count for the other).
        wait_until(lambda: all(s.touches > x for s, x in zip(vm.vcpu_stats(), a, strict=True)), "both counters to move")
        b = [s.touches for s in vm.vcpu_stats()]
    assert all(y > x > 0 for x, y in zip(a, b, strict=True)), (a, b)


def test_pause_stops_progress_and_resume_continues() -> None:
    with MicroVM(memory="128M", vcpus=2) as vm:
        vm.start()
        wait_running(vm)
        # The same 0.1 s window that must stay still while paused sees a running guest move.
        a = vm.touches()
        wait_until(lambda: vm.touches() != a, "the running guest's counter to move", timeout=0.1)
        latency = vm.pause()
        frozen = vm.touches()
        with pytest.raises(AssertionError, match="timed out"):
            wait_until(lambda: vm.touches() != frozen, "the paused guest's counter to move", timeout=0.1)
        assert 0 < latency < 1e9
        vm.resume()
        wait_until(lambda: vm.touches() > frozen, "the counter to move after resume")
        assert vm.stats()["exits"]["io"] > 0


def test_a_marked_pause_dates_the_stop_when_the_guest_last_ran() -> None:
    """The downtime's start is when the last vCPU left its guest, held between the request and
    the kicks: inside the caller's own bracket, and no vCPU's guest read its clock after it (the
    guest's clock is the host's CLOCK_MONOTONIC, read after every page here)."""
    with MicroVM(memory="64M", vcpus=2, clock_every=1) as vm:
        vm.start()
        wait_running(vm)
        t0 = time.monotonic_ns()
        vm.pause(checkpoint="src-downtime-start")
        t1 = time.monotonic_ns()
        stop = vm.core.pause_checkpoint_ns
        last_reads = [s.last_clock_ns for s in vm.vcpu_stats()]
    assert t0 < stop < t1, (t0, stop, t1)
    assert all(0 < t <= stop for t in last_reads), (stop, last_reads)


def test_sequential_dirtier_leaves_at_most_one_wrap_edge() -> None:
    with MicroVM(memory="64M", vcpus=2) as vm:
        vm.start()
        wait_running(vm, passes=1)
        vm.pause()
        edges = vm.wrap_edges()
    assert all(e <= 1 for e in edges), edges


def test_idle_guest_touches_once_then_halts() -> None:
    with MicroVM(memory="64M", guest="idle") as vm:
        vm.start()
        wait_until(lambda: vm.vcpu_stats()[0].state == 2, "the idle guest to halt")
        st = vm.vcpu_stats()[0]
        assert st.state == 2 and st.passes == 1
        assert st.touches == (64 << 20) // 4096 - 1024  # RAM above the 4 MiB data start
        # The guest marks itself idle, then prints (one port exit per byte): wait for the line.
        wait_until(lambda: "halting\n" in vm.core.console(), "the idle guest's last console line")


_RESTORE = r"""
import sys
from tests.helpers import wait_until
from vfmig.vm import MicroVM, VMState
state = VMState.from_bytes(open(sys.argv[1], "rb").read())
with MicroVM.from_config(state.config) as vm:
    vm.load_ram(sys.argv[2])
    vm.load_state(state)
    before = vm.touches()
    vm.start_loaded()
    wait_until(lambda: vm.touches() > before + 1000, "the restored guest to count on")
    vm.pause()
    print(before, vm.touches(), vm.core.failed)
"""


def test_cold_migration_to_a_new_process(tmp_path: Path) -> None:
    with MicroVM(memory="64M", vcpus=2, rate_pps=50_000) as vm:
        vm.start()
        wait_running(vm)
        vm.pause()
        counter = vm.touches()
        state = vm.save_state()
        vm.save_ram(str(tmp_path / "ram.img"))
    assert counter > 0
    assert set(state.devices) == {"clock", "clock-mmio", "platform"}
    (tmp_path / "state.bin").write_bytes(state.to_bytes())
    out = subprocess.run(
        [sys.executable, "-c", _RESTORE, str(tmp_path / "state.bin"), str(tmp_path / "ram.img")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=REPO,  # the script imports tests.helpers
    ).stdout.split()
    before, after, failed = int(out[0]), int(out[1]), out[2]
    assert before == counter, "the counter must arrive as it was at pause"
    assert after > counter, "the guest must carry on counting in the new process"
    assert failed == "None"


def test_state_roundtrip_rejects_garbage() -> None:
    with MicroVM(memory="64M") as vm:
        vm.start()
        wait_running(vm)
        vm.pause()
        state = vm.save_state()
    blob = bytearray(state.vcpus[0])
    blob[0] ^= 0xFF
    with MicroVM.from_config(state.config) as dst, pytest.raises(Exception, match="magic"):
        dst.load_state(VMState(state.config, [bytes(blob)], state.devices))
    with pytest.raises(ConfigError):
        VMState.from_bytes(state.to_bytes()[:-3])


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"memory": (64 << 20) + 100}, ConfigError, "multiple of the page size"),
        ({"memory": "100T"}, HostError, "too large for this host"),
        ({"guest": "nope"}, ConfigError, "unknown guest"),
        ({"vcpus": 0}, ConfigError, "vcpus"),
        ({"pattern": "zigzag"}, ConfigError, "unknown pattern"),
    ],
)
def test_bad_config_is_rejected_before_kvm(kwargs: dict, exc: type, match: str) -> None:
    args = {"memory": "64M", **kwargs}
    with pytest.raises(exc, match=match):
        MicroVM(**args)


def test_large_memory_is_sparse() -> None:
    # 16 GiB of memfd RAM, two memslots (below 3 GiB and from 4 GiB); only touched pages cost.
    with MicroVM(memory="16G", wss_bytes=16 << 20) as vm:
        vm.start()
        wait_running(vm, passes=1)  # its whole 16 MiB working set written once
        assert vm.core.ram_bytes == 16 << 30
        # Sparse: the memfd holds the touched pages (and the guest's own), not 16 GiB.
        assert os.fstat(vm.core.mem_fd).st_blocks * 512 < 64 << 20


def test_mmio_exits_reach_their_device() -> None:
    # The same clock through MMIO: the throttle only holds the rate if the reads are right.
    with MicroVM(memory="64M", rate_pps=50_000, clock_mmio=True) as vm:
        vm.start()
        wait_running(vm, passes=1)
        rate = vm.measure_rate(1.0)  # the guest running 1 s is the measurement
        exits = vm.core.exits()
    assert exits["mmio"] > 1000, exits
    assert abs(rate - 50_000) / 50_000 <= 0.15, rate


@pytest.mark.parametrize("pct", [20, 60, 80])
def test_throttle_takes_its_share_of_the_guests_time(pct: int) -> None:
    """A throttled guest dirties at (100 - pct)% of its unthrottled rate, within [0.5x, +0.25]:
    not less (over-throttling stalls the guest) and not much more (auto-converge would not
    converge). Unthrottled before and after, averaged, because the rate drifts (2 shared cores)."""
    with MicroVM(memory="64M", rate_pps=0) as vm:
        vm.start()
        wait_running(vm, passes=1)
        before = vm.measure_rate(0.5)  # the guest running is the measurement
        vm.core.set_throttle(pct)
        throttled = vm.measure_rate(1.0)
        vm.core.set_throttle(0)
        after = vm.measure_rate(0.5)
    ratio, expected = throttled / ((before + after) / 2), (100 - pct) / 100
    assert 0.5 * expected <= ratio <= expected + 0.25, f"{ratio:.3f} of the unthrottled rate at {pct}%"
