"""The commit point and verification: after GO the guest lives on at the destination whatever
happens to the source; --verify compares the destination's real RAM with the source's before the
commit, so a wrong page fails the migration while the source can still resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.helpers import keeps_running, vm_process, wait_until
from vfmig import _core
from vfmig.demo import start_destination
from vfmig.errors import MigrationError
from vfmig.migration import CommitError, Migration, MigrationOptions, migrate
from vfmig.migration.destination import Incoming, Listener
from vfmig.testing import DOWN, Fault, FaultProxy, serve_destination
from vfmig.vm import MicroVM

pytestmark = pytest.mark.usefixtures("kvm")


def idle_vm(**kw: object) -> MicroVM:
    """An idle guest that has touched its memory and halted: its RAM no longer changes."""
    vm = MicroVM(memory="128M", guest="idle", **kw)  # type: ignore[arg-type]
    vm.start()
    wait_until(lambda: vm.vcpu_stats()[0].state == 2, "the idle guest to halt")
    return vm


# after GO ----------------------------------------------------------------------------------------
def test_source_lost_right_after_go_keeps_the_guest_at_the_destination() -> None:
    with MicroVM(memory="128M", rate_pps=20_000) as vm, serve_destination() as dst:
        vm.start()
        wait_until(lambda: vm.touches() > 0, "the guest to run")
        go_lost = Fault(record="GO", action="cut_after")
        with FaultProxy(("127.0.0.1", dst.port), go_lost) as proxy, pytest.raises(CommitError, match="stays paused"):
            migrate(vm, proxy.address)
        assert proxy.hit["record"] == "GO"
        inc = dst.wait()
        assert isinstance(inc, Incoming), f"the destination lost the guest: {inc!r}"
        assert inc.vm.core.first_run_ns > 0
        assert keeps_running(inc.vm), "the migrated guest must keep running at the destination"
        assert vm.paused, "after GO the source must never resume"
        # Whether RESUMED's send fails here depends on TCP timing (the proxy may still drain
        # it); the deterministic check of that report is the next test.


def test_a_report_that_cannot_be_sent_after_go_is_noted_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    from vfmig.migration import wire as transport

    real = transport.ControlChannel.send_json

    def send_json(self: transport.ControlChannel, rtype: str, doc: dict) -> None:
        if rtype == "RESUMED" and self.peer.startswith("source"):
            raise transport.PeerError(f"{self.peer} went away: Broken pipe")
        real(self, rtype, doc)

    monkeypatch.setattr(transport.ControlChannel, "send_json", send_json)
    with MicroVM(memory="64M", rate_pps=20_000) as vm, serve_destination() as dst:
        vm.start()
        wait_until(lambda: vm.touches() > 0, "the guest to run")
        with pytest.raises(CommitError, match="stays paused"):
            migrate(vm, dst.address, MigrationOptions(resume_timeout_s=5))
        inc = dst.wait()
        assert isinstance(inc, Incoming), f"the destination lost the guest: {inc!r}"
        assert inc.source_lost is not None
        assert inc.source_lost.startswith("the guest runs here, but the source could not be told: ")
        assert inc.source_lost.endswith("went away: Broken pipe")
        assert keeps_running(inc.vm)
        assert vm.paused


def test_cli_receive_keeps_the_guest_when_the_source_goes_away_after_go() -> None:
    with MicroVM(memory="128M", rate_pps=20_000) as vm:
        vm.start()
        wait_until(lambda: vm.touches() > 0, "the guest to run")
        proc, addr = start_destination(run_seconds=0.5)
        port = int(addr.rsplit(":", 1)[1])
        try:
            go_lost = Fault(record="GO", action="cut_after")
            with FaultProxy(("127.0.0.1", port), go_lost) as proxy, pytest.raises(CommitError):
                migrate(vm, proxy.address)
            out, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        assert proxy.fired.is_set()
        assert proc.returncode == 0, err
        assert "vfmig: guest running here" in out, out + err  # it observed its guest running
        assert vm.paused


# verification ------------------------------------------------------------------------------------
def _flip_byte(gpa: int) -> object:
    def hook(vm: MicroVM) -> None:
        b = vm.core.read(gpa, 1)[0]
        vm.core.write(gpa, bytes([b ^ 0xFF]))

    return hook


def _zero_page(gpa: int) -> object:
    def hook(vm: MicroVM) -> None:
        assert vm.core.read(gpa, 4096) != bytes(4096), "the test needs a page with data"
        vm.core.write(gpa, bytes(4096))

    return hook


@pytest.mark.parametrize(
    ("case", "gpa"),
    [
        ("changed after it landed", 0x2000000),  # a page the guest wrote
        ("never sent, expected zero", 0x7F00000),  # above the idle guest's working set: a hole
        ("cleared wrongly", 0x1000000),
    ],
)
def test_verify_reads_destination_ram_and_fails_before_the_commit(case: str, gpa: int) -> None:
    with idle_vm(wss_bytes=64 << 20) as vm:
        vm.core.add_dma_engine("dma0")
        before = vm.core.page_crcs()
        listener = Listener("tcp://127.0.0.1:0")
        hook = _zero_page(gpa) if case == "cleared wrongly" else _flip_byte(gpa)
        loaded: list[MicroVM] = []
        listener.after_load = lambda v: (loaded.append(v), hook(v))  # type: ignore[func-returns-value]
        expected = rf"verification failed: 1 page\(s\) differ .*first at GPA {gpa:#x}"
        with serve_destination(listener) as dst:
            with pytest.raises(MigrationError, match=expected):
                migrate(vm, dst.address, MigrationOptions(verify=True))
            assert isinstance(dst.wait(), MigrationError), "the destination must discard a copy that differs"
        assert loaded and not loaded[0].started, "the destination's vCPUs must never run"
        assert not vm.paused
        assert vm.core.page_crcs() == before, "the source's memory must be unchanged"


def test_verify_that_cannot_run_fails_the_migration() -> None:
    # The destination's hashes never arrive (dropped in transit): the source can't verify, so it
    # must not commit.
    with idle_vm() as vm, serve_destination() as dst:
        before = vm.core.page_crcs()
        fault = Fault(direction=DOWN, record="PAGE_HASHES", action="drop")
        with (
            FaultProxy(("127.0.0.1", dst.port), fault) as proxy,
            pytest.raises(MigrationError, match="expected PAGE_HASHES .* got READY") as ei,
        ):
            migrate(vm, proxy.address, MigrationOptions(verify=True))
        assert proxy.hit["record"] == "PAGE_HASHES"
        assert "paused" not in str(ei.value)
        assert isinstance(dst.wait(), MigrationError)
        assert not vm.paused and vm.core.page_crcs() == before


def test_verify_passes_on_an_honest_migration_and_counts_every_page() -> None:
    with idle_vm() as vm, serve_destination() as dst:
        r = migrate(vm, dst.address, MigrationOptions(verify=True))
        inc = dst.wait()
        assert isinstance(inc, Incoming)
        # Independent of the engine's comparison: the destination's RAM, hashed here, equals the
        # source's at stop (the idle guest has halted, so the destination's RAM is still as loaded).
        assert inc.vm.core.page_crcs() == vm.core.page_crcs()
    assert r.status == "completed" and r.verification.memory_match is True
    assert r.verification.mismatched_pages == 0


def test_cli_migrate_exits_non_zero_when_verification_fails(tmp_path: Path) -> None:
    with vm_process(tmp_path, "--guest", "idle", "--memory", "128M") as (_, sock):
        listener = Listener("tcp://127.0.0.1:0")
        listener.after_load = _flip_byte(0x1000000)  # type: ignore[assignment]
        with serve_destination(listener) as dst:
            res = run_cli("migrate", "--control", sock, "--to", dst.address, "--verify")
            assert isinstance(dst.wait(), MigrationError)
        assert res.returncode != 0
        assert "verification failed: 1 page(s) differ" in res.stderr, res.stderr
        status = run_cli("vm", "status", "--control", sock, "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["state"] == "running", "the source must keep running"


def test_zero_page_crc_is_what_a_hole_hashes_to() -> None:
    # The verification digest treats a memfd hole as a zero page without reading it: check that
    # shortcut against a real read of a zero page.
    with MicroVM(memory="64M", guest="idle") as vm:
        crcs = vm.core.page_crcs()
        assert crcs[:4] == _core.crc32c(bytes(4096)).to_bytes(4, "little")


def test_a_malformed_resumed_after_go_is_in_doubt_not_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    # Whatever breaks after GO, the source must not call it a plain failure (whose advice is to
    # resume the source): the destination may run the guest.
    from vfmig.migration import wire as transport

    real = transport.ControlChannel.expect

    def expect(self: transport.ControlChannel, rtype: str, *a: object, **kw: object) -> bytes:
        payload = real(self, rtype, *a, **kw)  # type: ignore[arg-type]
        return b"{not json" if rtype == "RESUMED" else payload

    monkeypatch.setattr(transport.ControlChannel, "expect", expect)
    with MicroVM(memory="64M", rate_pps=20_000) as vm, serve_destination() as dst:
        vm.start()
        wait_until(lambda: vm.touches() > 0, "the guest to run")
        m = Migration(vm, dst.address)
        with pytest.raises(CommitError, match="malformed RESUMED record .*stays paused"):
            m.run()
        assert m.report.status == "in_doubt"
        assert vm.paused
        inc = dst.wait()
        assert isinstance(inc, Incoming) and keeps_running(inc.vm)


@pytest.mark.parametrize(
    ("fault", "match"),
    [
        # GO arrives corrupted: the destination gives up with an ERROR after the source sent GO.
        (Fault(record="GO", action="flip", at_byte=12), "GO record: CRC mismatch.*; the destination never started"),
        # A duplicated control EOS is seen only while the destination waits for GO; depending on
        # timing the source reads the ERROR just before or just after it sends GO.
        (Fault(record="EOS", action="duplicate"), "expected GO .* got EOS"),
    ],
)
def test_an_error_instead_of_resumed_gives_the_guest_back_to_the_source(fault: Fault, match: str) -> None:
    # The destination sends ERROR only before it starts a guest, so the source, even after its
    # GO, must take its guest back rather than leave it running nowhere.
    with idle_vm() as vm, serve_destination() as dst:
        before = vm.core.page_crcs()
        with FaultProxy(("127.0.0.1", dst.port), fault) as proxy, pytest.raises(MigrationError, match=match) as ei:
            migrate(vm, proxy.address)
        assert proxy.hit["record"] == fault.record
        assert not isinstance(ei.value, CommitError)
        assert isinstance(dst.wait(), MigrationError)
        assert not vm.paused and vm.core.page_crcs() == before
