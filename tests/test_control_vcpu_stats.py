"""`vm status` (the control socket's status) carries the guest's own counters per vCPU, so a
client in another process can wait for the workload to settle (bench/converge_bench.py does)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import wait_running
from vfmig import control
from vfmig.vm import MicroVM

pytestmark = pytest.mark.usefixtures("kvm")


def test_status_has_each_vcpus_touches_and_passes(tmp_path: Path) -> None:
    with MicroVM(memory="64M", vcpus=2, wss_bytes=8 << 20) as vm:
        server = control.ControlServer(vm, str(tmp_path / "vm.sock"))
        assert [s["passes"] for s in server.status()["vcpu_stats"]] == [0, 0]  # not started yet
        vm.start()
        wait_running(vm, passes=1)
        vm.pause()
        stats = server.status()["vcpu_stats"]
        truth = vm.vcpu_stats()
    assert stats == [{"touches": s.touches, "passes": s.passes} for s in truth]
    assert all(s["passes"] >= 1 and s["touches"] > 0 for s in stats)
