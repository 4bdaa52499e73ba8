"""Operator-facing guarantees: the pause deadline, the `vm run --control` commands (status,
resume, stop) served while a migration runs, Ctrl-C cancelling a migration, honest messages."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from tests.helpers import destination
from vfmig.destination import Incoming
from vfmig.errors import ConfigError, MigrationError
from vfmig.migration import MigrationOptions, migrate
from vfmig.vm import MicroVM, PauseTimeoutError

pytestmark = pytest.mark.usefixtures("kvm")


def _wait_moving(vm: MicroVM, vcpu: int | None = None, timeout: float = 10.0) -> None:
    """Wait until the guest's counter moves (one vCPU's, or any): the vCPUs run."""

    def count() -> int:
        stats = vm.vcpu_stats()
        return stats[vcpu].touches if vcpu is not None else sum(s.touches for s in stats)

    start, deadline = count(), time.monotonic() + timeout
    while count() == start:
        assert time.monotonic() < deadline, "the guest does not run"
        time.sleep(0.005)


def _pause_expecting_timeout(vm: MicroVM, device: str, timeout_ms: int) -> str:
    """vm.pause(timeout_ms) while a vCPU is held: the PauseTimeoutError message. A pause that
    ignores its deadline fails the test instead of hanging it (the hold is released)."""
    out: list[BaseException | int] = []
    th = threading.Thread(target=lambda: out.append(_call(vm.pause, timeout_ms)), daemon=True)
    th.start()
    th.join(30)
    if th.is_alive():
        vm.core.hold_clock(device, 0)
        th.join(30)
        pytest.fail("pause ignored its deadline: it returned only once the stuck vCPU was released")
    assert isinstance(out[0], PauseTimeoutError), out
    return str(out[0])


def _call(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - the caller inspects it
        return e


# 1. pause deadline --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("device", "where"), [("clock", "a read of port 0x5f0"), ("clock-mmio", "a read of MMIO 0xfeb00000")]
)
def test_pause_deadline_names_the_stuck_vcpu_and_lets_the_others_run(device: str, where: str) -> None:
    with MicroVM(memory="64M", vcpus=2, rate_pps=20_000, clock_mmio=device == "clock-mmio") as vm:
        vm.start()
        vm.core.hold_clock(device, 1)  # one vCPU blocks in its next clock read; the other parks
        assert vm.core.wait_clock_held(device, 1)
        msg = _pause_expecting_timeout(vm, device, 50)
        stuck = 0 if msg.startswith("pause timed out after 50 ms: vCPU 0 ") else 1
        assert msg == f"pause timed out after 50 ms: vCPU {stuck} (in {where}) did not stop; the VM keeps running"
        assert not vm.paused
        _wait_moving(vm, vcpu=1 - stuck)  # the vCPU that had parked was let go at the deadline
        vm.core.hold_clock(device, 0)
        _wait_moving(vm, vcpu=stuck)
        vm.pause(50)  # nothing stuck: the same deadline is plenty
        vm.resume()


def test_pause_timeout_out_of_range_is_rejected_before_pausing() -> None:
    with MicroVM(memory="64M", rate_pps=20_000) as vm:
        vm.start()
        for bad in (0, 60_001):
            with pytest.raises(ConfigError, match="pause timeout must be 1..60000 ms"):
                vm.pause(bad)
            with pytest.raises(ConfigError, match="pause timeout"):
                migrate(vm, "tcp://127.0.0.1:9", MigrationOptions(pause_timeout_ms=bad))
        _wait_moving(vm)


def test_migration_fails_at_the_pause_deadline_then_the_same_vm_migrates() -> None:
    with MicroVM(memory="128M", rate_pps=20_000) as vm:
        vm.start()

        def stick_at_first_iteration(event: str, data: dict[str, Any]) -> None:
            if event == "iteration" and data["index"] == 1:
                vm.core.hold_clock("clock", 1)
                assert vm.core.wait_clock_held("clock", 1)

        with destination() as dst:
            with pytest.raises(MigrationError) as ei:
                migrate(vm, dst.address, MigrationOptions(pause_timeout_ms=100), progress=stick_at_first_iteration)
            assert isinstance(dst.wait(), BaseException)  # it discarded the unstarted VM
        assert str(ei.value) == (
            "pause timed out after 100 ms: vCPU 0 (in a read of port 0x5f0) did not stop; the VM keeps running"
        )
        assert not vm.paused
        vm.core.hold_clock("clock", 0)
        _wait_moving(vm)  # the source guest runs on after the release
        with destination() as dst:
            r = migrate(vm, dst.address, MigrationOptions(verify=True))
            assert isinstance(dst.wait(), Incoming)
        assert r.status == "completed" and r.verification.memory_match is True
