"""Devices with a migration state machine (simvf, the emulated NIC VF): the DEVICE_DATA record,
the device configuration, and live migration of a VM whose VF keeps delivering packets, with
the faults a device stream can have. The KVM tests run an in-process destination."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import struct
from collections.abc import Callable
from typing import Any

import pytest

from tests.helpers import keeps_running, wait_running, wait_until
from vfmig import _core
from vfmig.cli import build_parser
from vfmig.errors import ConfigError, MigrationError, VfmigError
from vfmig.migration import Migration, MigrationOptions, migrate, source
from vfmig.migration.destination import Incoming, Limits, Listener
from vfmig.migration.policy import STOP_OVERHEAD_MS, Policy
from vfmig.migration.wire import (
    PHASE_PRECOPY,
    PHASE_STOPCOPY,
    DeviceData,
    DeviceDataOrder,
    decode_device_data,
    device_data_room,
    encode_device_data,
)
from vfmig.report.model import DeviceReport, GuestReport, Report
from vfmig.testing import serve_destination
from vfmig.vm import DeviceSpec, MicroVM, VMConfig, VMState, parse_device

# The DEVICE_DATA record -------------------------------------------------------------------------


def test_device_data_round_trip_and_room() -> None:
    raw = encode_device_data("vf0", PHASE_STOPCOPY, True, 7, b"state")
    assert raw[:8] == struct.pack("<HBBI", 3, 2, 1, 7) and raw[8:11] == b"vf0"
    assert decode_device_data(raw) == DeviceData("vf0", PHASE_STOPCOPY, True, 7, b"state")
    # The largest chunk fills a control record exactly.
    room = device_data_room("vf0")
    assert len(encode_device_data("vf0", PHASE_PRECOPY, False, 0, bytes(room))) == _core.CTRL_MAX
    with pytest.raises(ValueError, match="do not fit"):
        encode_device_data("vf0", PHASE_PRECOPY, False, 0, bytes(room + 1))
    assert decode_device_data(encode_device_data("vf0", PHASE_STOPCOPY, True, 0, b"")).data == b""


def _dd(name_len: int, phase: int, flags: int, seq: int, rest: bytes) -> bytes:
    return struct.pack("<HBBI", name_len, phase, flags, seq) + rest


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x03\x00\x01", "DEVICE_DATA record of 3 bytes is too short"),
        (_dd(3, 0, 0, 0, b"vf0data"), "DEVICE_DATA record has a bad phase 0 (1 precopy, 2 stop-copy)"),
        (_dd(3, 3, 0, 0, b"vf0data"), "DEVICE_DATA record has a bad phase 3"),
        (_dd(3, 2, 0x02, 0, b"vf0data"), "DEVICE_DATA record has unknown flags 0x02"),
        (_dd(3, 2, 0x81, 0, b"vf0data"), "DEVICE_DATA record has unknown flags 0x81"),
        (_dd(0, 1, 0, 0, b"data"), "DEVICE_DATA record has an empty device name"),
        (_dd(9, 1, 0, 0, b"vf0"), "DEVICE_DATA record has a bad name length 9"),
        (_dd(2, 1, 0, 0, b"\xff\xfedata"), "DEVICE_DATA record has a device name that is not UTF-8"),
        (_dd(3, 1, 1, 0, b"vf0data"), "DEVICE_DATA for 'vf0': a precopy chunk flagged as the last"),
        (_dd(3, 1, 0, 4, b"vf0"), "DEVICE_DATA for 'vf0': chunk 4 carries no data"),
    ],
)
def test_device_data_rejects(raw: bytes, message: str) -> None:
    with pytest.raises(MigrationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        decode_device_data(raw)


def _chunk(name: str, phase: int, seq: int, last: bool = False, data: bytes = b"x") -> DeviceData:
    return decode_device_data(encode_device_data(name, phase, last, seq, data))


def test_device_data_order_accepts_a_whole_stream() -> None:
    order = DeviceDataOrder(["vf0", "vf1"])
    for c in [
        _chunk("vf0", PHASE_PRECOPY, 0, data=b"ab"),
        _chunk("vf1", PHASE_STOPCOPY, 0),  # a device without precopy starts at stop-copy
        _chunk("vf0", PHASE_PRECOPY, 1),
        _chunk("vf0", PHASE_STOPCOPY, 2, data=b"cde"),  # seq runs on across the phases
        _chunk("vf1", PHASE_STOPCOPY, 1, last=True, data=b""),
    ]:
        order.accept(c)
    with pytest.raises(MigrationError, match=r"stream ended before the last DEVICE_DATA chunk of device\(s\) vf0$"):
        order.check_complete()
    order.accept(_chunk("vf0", PHASE_STOPCOPY, 3, last=True))
    order.check_complete()
    assert order.bytes == {"vf0": [3, 4], "vf1": [0, 1]}


@pytest.mark.parametrize(
    ("chunks", "message"),
    [
        ([_chunk("vf0", 1, 0), _chunk("vf0", 1, 2)], "DEVICE_DATA for 'vf0': chunk 2 out of sequence (expected 1)"),
        ([_chunk("vf0", 1, 1)], "DEVICE_DATA for 'vf0': chunk 1 out of sequence (expected 0)"),
        ([_chunk("vf0", 1, 0), _chunk("vf0", 1, 0)], "DEVICE_DATA for 'vf0': chunk 0 out of sequence (expected 1)"),
        ([_chunk("nic9", 1, 0)], "DEVICE_DATA for unknown device 'nic9' (this VM migrates: vf0)"),
        (
            [_chunk("vf0", 2, 0), _chunk("vf0", 1, 1)],
            "DEVICE_DATA for 'vf0': a precopy chunk after the stop-copy stream began",
        ),
        ([_chunk("vf0", 2, 0, last=True), _chunk("vf0", 2, 1)], "DEVICE_DATA for 'vf0' after its last chunk"),
    ],
)
def test_device_data_order_rejects(chunks: list[DeviceData], message: str) -> None:
    order = DeviceDataOrder(["vf0"])
    with pytest.raises(MigrationError) as ei:
        for c in chunks:
            order.accept(c)
    assert str(ei.value) == message


# Configuration ----------------------------------------------------------------------------------


def test_device_spec_parses_and_travels_in_the_config() -> None:
    spec = parse_device("simvf,state=16M,dma_rate=20000,precopy=off,name=nic1")
    assert spec == DeviceSpec("simvf", "nic1", 16 << 20, 20_000, precopy=False, migration=True)
    assert parse_device("simvf") == DeviceSpec()
    assert parse_device("simvf,dma_rate=0").dma_rate == 0  # a VF whose wire sends nothing
    cfg = VMConfig(256 << 20, devices=(spec, DeviceSpec()))
    back = VMConfig.from_dict(cfg.to_dict())
    assert back == cfg and back.devices[0] is not spec
    assert VMConfig.from_dict({"memory": 256 << 20}).devices == ()  # a config from before devices


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nic", "unknown device kind 'nic' in 'nic': choose one of simvf"),
        ("simvf,state=abc", "bad device option 'state=abc' in 'simvf,state=abc': not a size"),
        ("simvf,stat=1M", "bad device option 'stat=1M' in 'simvf,stat=1M': use name=..."),
        ("simvf,precopy=yes", "bad device option 'precopy=yes' in 'simvf,precopy=yes': use on or off"),
        ("simvf,dma_rate=fast", "bad device option 'dma_rate=fast' in 'simvf,dma_rate=fast': not a whole number"),
        ("simvf,state=1M,state=2M", "device option 'state' given twice"),
        ("simvf,state=6K", "device vf0: state size 6144 must be 4 KiB..256 MiB, a multiple of 4 KiB"),
        ("simvf,state=512M", "device vf0: state size 536870912 must be 4 KiB..256 MiB"),
        ("simvf,dma_rate=1000001", "device vf0: DMA rate 1000001 must be 0..1000000 packets/s"),
        ("simvf,name=a b", "bad device name 'a b'"),
    ],
)
def test_bad_device_strings(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_device(text)
    assert message in str(ei.value)
    assert "\n" not in str(ei.value)


def test_config_rejects_two_devices_with_one_name_and_malformed_devices() -> None:
    with pytest.raises(ConfigError, match="two devices are named 'vf0'"):
        VMConfig(256 << 20, devices=(DeviceSpec(), DeviceSpec(dma_rate=5))).validate()
    with pytest.raises(ConfigError, match="malformed device in the VM config"):
        VMConfig.from_dict({"memory": 256 << 20, "devices": [{"kind": "simvf", "colour": "red"}]})
    with pytest.raises(ConfigError, match="devices must be a list"):
        VMConfig.from_dict({"memory": 256 << 20, "devices": "simvf"})
    with pytest.raises(ConfigError, match="state size"):  # a hostile peer's JSON is checked too
        VMConfig.from_dict({"memory": 256 << 20, "devices": [{"state_bytes": "16M"}]}).validate()


def test_cli_device_option() -> None:
    p = build_parser()
    args = p.parse_args(["vm", "run", "--device", "simvf,state=16M", "--device", "simvf,name=vf1"])
    assert [d.name for d in args.device] == ["vf0", "vf1"] and args.device[0].state_bytes == 16 << 20
    from vfmig.cli import devices_of, guest_of

    assert guest_of(args, devices_of(args)) == "vfdrv"  # a simvf and no --guest: its driver
    assert guest_of(p.parse_args(["vm", "run"]), ()) == "dirtier"
    demo = p.parse_args(["demo", "--device", "none"])
    assert devices_of(demo, default=[DeviceSpec()]) == ()


def test_report_guest_and_devices_round_trip() -> None:
    r = Report(status="completed", guest=GuestReport("vfdrv", 10, 2, 0, 5))
    r.devices = [DeviceReport("vf0", 16 << 20, True, 17 << 20, 1 << 20, 3.5, 4.25, 100)]
    back = Report.from_dict(r.to_dict())
    assert back.guest == r.guest and back.devices == r.devices
    assert Report.from_dict({"status": "failed", "guest": "dirtier"}).guest.program == "dirtier"  # old reports


# Live migration with a VF (KVM) -----------------------------------------------------------------
needs_kvm = pytest.mark.usefixtures("kvm")
VF = "vf0"


def _driver(vm: MicroVM) -> dict[str, Any]:
    st = vm.vf_driver()
    assert st is not None, "the VF driver has not started"
    return st


def _driver_running(vm: MicroVM, packets: int = 100) -> None:
    """The guest's VF driver found the device and took `packets` good packets from it."""

    def up() -> bool:
        st = vm.vf_driver()
        return st is not None and st["state_name"] == "running" and st["received"] >= packets

    wait_until(up, f"the VF driver to receive {packets} packets")


def _packets_flow(vm: MicroVM) -> None:
    """The guest keeps receiving, without a packet error."""
    before = _driver(vm)["received"]
    wait_until(lambda: _driver(vm)["received"] > before + 50, "more packets to reach the guest")
    assert _driver(vm)["errors"] == 0, _driver(vm)


def _wire_drained(vm: MicroVM) -> None:
    """Stop the VF's wire and wait until the guest has accounted for every packet it offered.
    Packets dropped at the very end (no RX buffer free in the last tick) are a gap the guest
    sees only in the next packet, so after the stop a slow trickle, which finds buffers free,
    reveals that gap before the wire stops for good."""
    vm.core.simvf_set_rate(VF, 0)
    wait_until(lambda: _driver(vm)["received"] == vm.core.simvf_counters(VF)["delivered"], "the guest to catch up")
    delivered = vm.core.simvf_counters(VF)["delivered"]
    vm.core.simvf_set_rate(VF, 200)
    wait_until(lambda: vm.core.simvf_counters(VF)["delivered"] >= delivered + 2, "a packet after the stop")
    vm.core.simvf_set_rate(VF, 0)
    wait_until(
        lambda: _driver(vm)["next_seq"] == vm.core.simvf_counters(VF)["sent"],
        "the guest's next sequence number to reach the device's sent count",
    )


def _fails_cleanly(vm: MicroVM, dst: Any, message: str) -> str:
    """The migration fails with `message` in its error, the destination starts nothing, and the
    source is intact. Returns the error."""
    with pytest.raises(MigrationError) as ei:
        migrate(vm, dst.address, MigrationOptions())
    assert message in str(ei.value), str(ei.value)
    assert isinstance(dst.wait(), MigrationError), "the destination must not start the guest"
    _source_intact(vm)
    return str(ei.value)


def _source_intact(vm: MicroVM) -> None:
    """After a failed migration: the source VM runs, its VF is RUNNING and delivers packets."""
    assert not vm.paused
    assert vm.core.mig_state(VF) == "RUNNING"
    assert keeps_running(vm), "the source's vCPUs must keep running"
    _packets_flow(vm)


@needs_kvm
def test_vf_migrates_live_and_keeps_every_packet_accounted() -> None:
    """Acceptance: 1 GiB, 2 vCPUs, the VF driver with a 16 MiB-state VF at 50k packets/s,
    migrated with verification while the wire runs. The destination's device state right after
    loading is the source's at stop byte for byte; its guest goes on receiving with no error and,
    once the wire stops, has every packet the device offered either received or seen dropped."""
    spec = DeviceSpec(state_bytes=16 << 20, dma_rate=50_000)
    loaded: dict[str, bytes] = {}
    states: list[str] = []
    listener = Listener("tcp://127.0.0.1:0")
    listener.after_load = lambda v: loaded.update(state=v.core.simvf_state(VF), mig=v.core.mig_state(VF).encode())

    def progress(event: str, data: dict[str, Any]) -> None:
        if event == "iteration":
            states.append(vm.core.mig_state(VF))

    with (
        MicroVM(memory="1G", vcpus=2, guest="vfdrv", devices=[spec], rate_pps=20_000) as vm,
        serve_destination(listener, run_seconds=0.5) as dst,
    ):
        vm.core.simvf_keep_stop_state(VF, True)
        vm.start()
        wait_running(vm)
        _driver_running(vm, packets=1000)
        report = migrate(vm, dst.address, MigrationOptions(verify=True), progress=progress)
        inc = dst.wait()
        assert isinstance(inc, Incoming), inc
        assert report.status == "completed" and report.verification.memory_match is True, report.verification
        assert states and all(st == "PRE_COPY" for st in states), states  # streamed while the VM ran
        assert loaded["mig"] == b"STOP"  # loaded, applied, not yet running
        assert loaded["state"] == vm.core.simvf_stop_state(VF), "device state differs after the migration"
        # The destination's guest receives from its own device, with no error.
        _packets_flow(inc.vm)
        _wire_drained(inc.vm)
        sent = inc.vm.core.simvf_counters(VF)["sent"]
        # The guest moves next_seq before it counts the packet: its books close a moment later.
        # Seen once, on a fresh clone: received + dropped_seen one short right after next_seq matched.
        with contextlib.suppress(AssertionError):  # the assert below says what did not add up
            wait_until(lambda: sum(_driver(inc.vm)[k] for k in ("received", "dropped_seen")) == sent, "books", 2)
        final = _driver(inc.vm)
        assert final["errors"] == 0, final
        assert final["received"] + final["dropped_seen"] == sent, (final, sent)
    (dev,) = report.devices
    assert dev.name == VF and dev.state_bytes == 16 << 20 and dev.precopy
    assert dev.precopy_bytes >= (16 << 20) - _core.SIMVF_TABLE_OFFSET, "the initial image (the table) goes in precopy"
    assert 0 < dev.stopcopy_bytes < dev.precopy_bytes
    assert dev.load_ms is not None and dev.load_ms > 0 and dev.save_ms > 0
    assert dev.dma_pages_logged, "the VF's DMA must show in its dirty log"
    g = report.guest
    assert g.program == "vfdrv" and g.packets_received and g.packet_errors == 0, g
    summary = report.summary()
    assert "  device        vf0: state 16.0 MiB" in summary and "  packets       destination guest" in summary


@needs_kvm
@pytest.mark.parametrize(("precopy", "migration"), [(False, True), (True, False)], ids=["no-precopy", "no-migcap"])
def test_vf_without_precopy_or_migration_capability_migrates(precopy: bool, migration: bool) -> None:
    """Without PRE_COPY the whole state goes at the stop (the pause moved the device to STOP, the
    source on to STOP_COPY); without the migration capability the guest is not told, and the
    device migrates all the same. Either way the destination's state is the source's at stop."""
    spec = DeviceSpec(state_bytes=1 << 20, dma_rate=20_000, precopy=precopy, migration=migration)
    loaded: dict[str, bytes] = {}
    listener = Listener("tcp://127.0.0.1:0")
    listener.after_load = lambda v: loaded.update(state=v.core.simvf_state(VF))
    with (
        MicroVM(memory="128M", guest="vfdrv", devices=[spec]) as vm,
        serve_destination(listener) as dst,
    ):
        assert vm.core.mig_precopy_supported(VF) is precopy
        vm.core.simvf_keep_stop_state(VF, True)
        vm.start()
        wait_running(vm)
        _driver_running(vm)
        report = migrate(vm, dst.address, MigrationOptions(verify=True))
        inc = dst.wait()
        assert isinstance(inc, Incoming), inc
        assert loaded["state"] == vm.core.simvf_stop_state(VF)
        _packets_flow(inc.vm)
    (dev,) = report.devices
    assert dev.precopy is precopy
    # With precopy the initial image goes while the VM runs (stop-copy: what the table updater
    # dirtied since, at 200 chunks/s, plus queues and config space); without, all of it at the stop.
    table = (1 << 20) - _core.SIMVF_TABLE_OFFSET
    if precopy:
        assert dev.precopy_bytes >= table and dev.stopcopy_bytes > 0, dev
    else:
        assert dev.precopy_bytes == 0 and dev.stopcopy_bytes >= table, dev
    assert report.verification.memory_match is True


@needs_kvm
def test_cancel_in_precopy_puts_the_device_back_to_running() -> None:
    """Cancelled at the first iteration event, while the VF streams in PRE_COPY and the VM has
    not stopped: the abort takes the device from PRE_COPY back to RUNNING itself."""
    seen: list[str] = []
    with _vf_vm() as vm, serve_destination() as dst:
        vm.start()
        wait_running(vm)
        _driver_running(vm)

        def cancel_at_first_iteration(event: str, data: dict[str, Any]) -> None:
            if event == "iteration" and not seen:
                seen.append(vm.core.mig_state(VF))
                m.cancel()

        m = Migration(vm, dst.address, MigrationOptions(), cancel_at_first_iteration)
        with pytest.raises(MigrationError, match="^migration cancelled$"):
            m.run()
        assert seen == ["PRE_COPY"], "the cancel must come while the device streams in PRE_COPY"
        assert isinstance(dst.wait(), MigrationError)
        _source_intact(vm)


@needs_kvm
def test_destination_counts_device_state_against_its_memory_limit() -> None:
    limits = Limits(max_memory=(128 << 20) + (512 << 10))  # the RAM fits, RAM + 1 MiB of state does not
    with _vf_vm() as vm, serve_destination(Listener("tcp://127.0.0.1:0", limits=limits)) as dst:
        vm.start()
        wait_running(vm)
        _fails_cleanly(
            vm,
            dst,
            "reports: refused: the VM has 128.0 MiB of RAM and 1.0 MiB of device state, this destination accepts "
            "at most 128.5 MiB (--max-memory)",
        )


def test_a_vm_with_a_migratable_device_is_not_saved_to_a_file() -> None:
    state = VMState(VMConfig(128 << 20, devices=(DeviceSpec(),)), [b"cpu"], {})
    with pytest.raises(ConfigError, match=r"a VM with a migratable device \(vf0\) cannot be saved to a file"):
        state.to_bytes()


def test_downtime_prediction_counts_device_bytes() -> None:
    # 1 MB of device state at 1 MB/s is a second of downtime, pages or not.
    assert Policy.predict_downtime_ms(0, 4096, 1e6, device_bytes=1_000_000) == 1000 + STOP_OVERHEAD_MS
    assert Policy.predict_downtime_ms(250, 4096, 1e6, device_bytes=24_000) == 1024 + 24 + STOP_OVERHEAD_MS


def _vf_vm(**kw: Any) -> MicroVM:
    return MicroVM(memory="128M", guest="vfdrv", devices=[DeviceSpec(state_bytes=1 << 20, dma_rate=20_000)], **kw)


@needs_kvm
def test_broken_dma_log_fails_verification_and_the_source_runs_on() -> None:
    """The negative of the acceptance test: with the VF's DMA dirty log dropping its marks, the
    pages the VF wrote after the first round never travel, and verification catches it."""
    with _vf_vm(rate_pps=10_000) as vm, serve_destination() as dst:
        vm.start()
        wait_running(vm)
        _driver_running(vm)
        vm.core.set_dma_log_broken(VF, True)
        with pytest.raises(MigrationError, match=r"verification failed: \d+ page\(s\) differ .*first at GPA 0x"):
            migrate(vm, dst.address, MigrationOptions(verify=True))
        assert isinstance(dst.wait(), MigrationError), "the destination must not start the guest"
        _source_intact(vm)


Tamper = Callable[[pytest.MonkeyPatch, list[str]], None]


def _corrupt(mp: pytest.MonkeyPatch, fired: list[str]) -> None:
    """One byte of the device's first chunk flipped before it is framed: the record's CRC is
    right, only the device's own checks can see it."""
    real = source.Migration._read_device

    def read(self: source.Migration, name: str, cap: int) -> bytes | None:
        data = real(self, name, cap)
        if data and not fired:
            fired.append("corrupt")
            k = min(100, len(data) - 1)
            data = data[:k] + bytes([data[k] ^ 0x5A]) + data[k + 1 :]
        return data

    mp.setattr(source.Migration, "_read_device", read)


def _last_chunk(change: Callable[[bytes], bytes], what: str) -> Tamper:
    """The last stop-copy chunk changed (its LAST flag kept), before it is framed."""

    def tamper(mp: pytest.MonkeyPatch, fired: list[str]) -> None:
        real = source.encode_device_data

        def encode(name: str, phase: int, last: bool, seq: int, data: bytes) -> bytes:
            if last:
                fired.append(what)
                data = change(data)
            return real(name, phase, last, seq, data)

        mp.setattr(source, "encode_device_data", encode)

    return tamper


@needs_kvm
@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (
            _corrupt,
            "reports: device vf0 refused its state: device data write in RESUMING failed: "
            "simvf state: TABLE section 1 fails its CRC",
        ),
        (
            _last_chunk(lambda d: d[: len(d) // 2], "truncated"),
            "reports: device vf0 refused its state: device state: RESUMING -> STOP failed: "
            "simvf state: the stream ends inside a section",
        ),
        (
            _last_chunk(lambda d: d + bytes(4096), "oversized"),  # 4 KiB more after its END section
            "reports: device vf0 refused its state: device data write in RESUMING failed: "
            "simvf state: no section header at stream byte",
        ),
    ],
    ids=["corrupt", "truncated", "oversized"],
)
def test_bad_device_stream_fails_cleanly(monkeypatch: pytest.MonkeyPatch, tamper: Tamper, message: str) -> None:
    fired: list[str] = []
    tamper(monkeypatch, fired)
    with _vf_vm() as vm, serve_destination() as dst:
        vm.start()
        wait_running(vm)
        _driver_running(vm)
        _fails_cleanly(vm, dst, message)
        assert fired, "the fault did not fire"


@needs_kvm
def test_device_identity_mismatch_is_refused() -> None:
    """A destination whose VF differs from the source's (its state size) refuses the stream."""
    listener = Listener("tcp://127.0.0.1:0")
    built: list[VMConfig] = []

    def other_vf(cfg: VMConfig) -> VMConfig:
        cfg = dataclasses.replace(cfg, devices=(dataclasses.replace(cfg.devices[0], state_bytes=2 << 20),))
        built.append(cfg)
        return cfg

    listener.config_override = other_vf
    with _vf_vm() as vm, serve_destination(listener) as dst:
        vm.start()
        wait_running(vm)
        _driver_running(vm)
        _fails_cleanly(
            vm,
            dst,
            "reports: device vf0 refused its state: device data write in RESUMING failed: "
            "simvf identity: state of 1048576 bytes in the stream, 2097152 here",
        )
        assert built, "the destination did not build the other device"


@needs_kvm
def test_invalid_arc_fails_and_the_source_device_keeps_its_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """At the stop the source wants its device, in STOP_COPY since the pause, in PRE_COPY, an arc
    the VFIO state machine lacks. Asking would put the device in ERROR, which only a reset leaves
    (losing the guest's queues), so the engine refuses the arc itself and never asks: the
    migration fails naming the arc, and the source resumes with its device intact (same counters,
    packets still reaching the guest)."""
    monkeypatch.setattr(source, "DEVICE_STOP_STATE", "PRE_COPY")
    with _vf_vm() as vm, serve_destination() as dst:
        vm.start()
        wait_running(vm)
        _driver_running(vm)
        _fails_cleanly(vm, dst, "device vf0: STOP_COPY -> PRE_COPY is not a valid transition (not requested")
        before = vm.core.simvf_counters(VF)["sent"]
        assert before > 1000, "the device's counters must survive the failed migration"
        _packets_flow(vm)
        assert vm.core.simvf_counters(VF)["sent"] > before


@needs_kvm
def test_an_invalid_arc_asked_of_a_device_puts_it_in_error_until_reset() -> None:
    """The device side of the same rule (VFIO v2): asked directly, the device takes no arc it
    lacks, enters ERROR with the reason, refuses everything but a reset, and a reset runs it again."""
    with _vf_vm() as vm:
        vm.start()
        vm.pause()
        assert vm.core.mig_state(VF) == "STOP" and not vm.core.mig_can_reach(VF, "ERROR")
        vm.core.mig_set_state(VF, "STOP_COPY")
        assert not vm.core.mig_can_reach(VF, "PRE_COPY")
        with pytest.raises(OSError, match="STOP_COPY -> PRE_COPY is not a valid transition"):
            vm.core.mig_set_state(VF, "PRE_COPY")
        assert vm.core.mig_state(VF) == "ERROR"
        with pytest.raises(OSError, match="only a reset leaves it"):
            vm.core.mig_set_state(VF, "RUNNING")
        vm.core.mig_reset(VF)
        assert vm.core.mig_state(VF) == "RUNNING"
        vm.resume()


@needs_kvm
def test_the_prestop_hook_runs_with_the_vcpus_running_before_the_downtime(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each migratable device's pre-stop hook (the guest handshake's place) is called once, with
    the VM still running, before the downtime starts, and its time is reported per device."""
    seen: list[tuple[bool, int]] = []
    real = source.Migration._prestop

    def spy(self: source.Migration) -> None:
        seen.append((self.vm.paused, _core.checkpoint("test-prestop")))
        real(self)

    monkeypatch.setattr(source.Migration, "_prestop", spy)
    with _vf_vm() as vm, serve_destination() as dst:
        vm.start()
        wait_running(vm)
        report = migrate(vm, dst.address, MigrationOptions())
        assert isinstance(dst.wait(), Incoming)
    assert len(seen) == 1 and seen[0][0] is False, seen
    assert seen[0][1] < report.checkpoint("src-downtime-start")
    (dev,) = report.devices
    assert dev.prestop_ms is not None and 0 <= dev.prestop_ms < source.PRESTOP_DEADLINE_MS and dev.prestop_error is None


@needs_kvm
def test_resume_with_a_device_in_error_runs_the_vcpus_and_says_so() -> None:
    """A device that cannot start must not leave the guest paused (it would look hung): the vCPUs
    run, the VM says it is not paused, and the error names the device."""
    with _vf_vm() as vm:
        vm.start()
        wait_running(vm)
        vm.pause()
        with pytest.raises(OSError, match="not a valid transition"):
            vm.core.mig_set_state(VF, "ERROR")  # never a valid target: the device enters ERROR
        with pytest.raises(VfmigError, match="resumed, but a device did not start: .*vf0"):
            vm.resume()
        assert not vm.paused and keeps_running(vm)


@needs_kvm
def test_vcpu_threads_and_msix_counters_for_the_probes() -> None:
    """What the BPF probes filter and count by: each vCPU thread is this process's task named
    vcpuN with its tid published once the VM started, and the VF's per-vector MSI-X message
    counter moves by exactly the one message a raise sends. dma_rate=0: the wire raises nothing
    on its own, so the RX vector carries only the test's raise."""
    with MicroVM(memory="128M", vcpus=2, guest="vfdrv", devices=[DeviceSpec(state_bytes=1 << 20, dma_rate=0)]) as vm:
        assert vm.core.vcpu_tids() == [0, 0]
        vm.start()
        tids = vm.core.vcpu_tids()
        assert len(set(tids)) == 2 and 0 not in tids, tids
        tasks = os.listdir("/proc/self/task")
        for i, tid in enumerate(tids):
            assert str(tid) in tasks, (tid, tasks)
            with open(f"/proc/self/task/{tid}/comm") as f:
                assert f.read() == f"vcpu{i}\n"

        # The driver enables MSI-X and unmasks its vectors before it says it runs.
        wait_until(lambda: (_driver(vm) if vm.vf_driver() else {}).get("state_name") == "running", "the VF driver")
        rx = _core.SIMVF_VECTORS["rx"]
        before = vm.core.msix_counts(VF)
        assert len(before) == len(_core.SIMVF_VECTORS) and before[rx] == 0, before
        assert vm.core.msix_raise(VF, rx) is True
        assert vm.core.msix_counts(VF)[rx] == before[rx] + 1

        with pytest.raises(ValueError, match="has no MSI-X vector 4: it has 4"):
            vm.core.msix_raise(VF, len(before))
        with pytest.raises(ValueError, match="has no MSI-X vector -1"):
            vm.core.msix_raise(VF, -1)
        with pytest.raises(ValueError, match="no device named 'nope'"):
            vm.core.msix_counts("nope")
        with pytest.raises(ValueError, match="device 'console' is not a PCI function with MSI-X"):
            vm.core.msix_counts("console")
