"""Live migration on real KVM over real loopback TCP: correctness, downtime, failures."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable

import pytest

from tests.helpers import CountingRelay, keeps_running, wait_running, wait_until
from vfmig import _core
from vfmig.demo import start_destination
from vfmig.errors import ConfigError, MigrationError
from vfmig.migration import Migration, MigrationOptions, migrate
from vfmig.migration import source as migration
from vfmig.migration.destination import Incoming
from vfmig.migration.policy import Policy
from vfmig.testing import DOWN, Destination, Fault, FaultProxy, serve_destination
from vfmig.vm import MicroVM

pytestmark = pytest.mark.usefixtures("kvm")

MEM = "128M"
# Page-channel framing around the PAGES records that Report.bytes_sent counts: a CHANNEL opener
# and an EOS on every channel, and an ITER marker per precopy round (16-byte header + payload).
CHANNEL_REC, EOS_REC, ITER_REC = 16 + 24, 16 + 24, 16 + 16


def _dst_addr(dst: Destination) -> tuple[str, int]:
    host, port = dst.listener.sock.getsockname()[:2]
    return host, port


def _same_ram(a: MicroVM, b: MicroVM, chunk: int = 64 << 10) -> bool:
    """Byte-for-byte comparison of two stopped VMs' RAM, by the test itself (not the stream's
    verification)."""
    assert a.core.ram_bytes == b.core.ram_bytes
    low = min(a.core.ram_bytes, 3 << 30)
    return all(a.core.read(off, chunk) == b.core.read(off, chunk) for off in range(0, low, chunk))


def _read(vm: MicroVM, gpa: int, length: int, chunk: int = 64 << 10) -> bytes:
    return b"".join(vm.core.read(off, min(chunk, gpa + length - off)) for off in range(gpa, gpa + length, chunk))


@pytest.mark.parametrize("tracker", ["bitmap", "ring"])
@pytest.mark.parametrize("channels", [1, 4])
@pytest.mark.parametrize("guest", ["dirtier", "idle"])
def test_verified_migration(tracker: str, channels: int, guest: str) -> None:
    with MicroVM(memory=MEM, guest=guest, tracker=tracker, rate_pps=50_000) as vm, serve_destination() as dst:
        vm.start()
        wait_running(vm)
        if guest == "idle":  # so that the destination's halted guest has the source's RAM
            wait_until(lambda: vm.vcpu_stats()[0].state == 2, "the idle guest to touch its RAM and halt")
        report = migrate(vm, dst.address, MigrationOptions(channels=channels, verify=True))
        inc = dst.wait()
        assert isinstance(inc, Incoming), inc
        assert report.status == "completed"
        assert report.verification.memory_match is True, report.verification
        assert vm.paused, "the source must stay stopped after the commit point"
        # The receiver's own count of pages decoded equals what the sender says it sent.
        assert inc.pages["pages"] == sum(i.pages_sent for i in report.iterations)
        if tracker == "ring" and guest == "dirtier":  # a halted guest dirties nothing to harvest
            assert report.tracker_stats["harvested"] > 0, "the dirty ring was not used"
        g = report.destination
        assert g["failed"] is None
        if guest == "dirtier":
            # The guest's counter, read by the test from the stopped source's RAM, is where the
            # destination's guest resumed counting.
            assert g["touches_at_resume"] == vm.touches() > 0
            assert g["touches_after"] > g["touches_at_resume"], "the guest's counter must keep increasing"
            assert all(e <= 1 for e in g["wrap_edges"]), g["wrap_edges"]
        else:
            assert inc.vm.vcpu_stats()[0].state == 2  # still halted after touching its memory
            assert _same_ram(vm, inc.vm), "destination RAM differs from the source's"


def test_ring_at_full_dirty_rate_loses_nothing() -> None:
    # The dirtier as fast as it can go: the harvester must keep up or fall back to "all dirty".
    with MicroVM(memory="256M", tracker="ring", rate_pps=0) as vm, serve_destination() as dst:
        vm.start()
        wait_running(vm, passes=1)
        report = migrate(vm, dst.address, MigrationOptions(verify=True, channels=2))
        inc = dst.wait()
        assert isinstance(inc, Incoming)
        assert inc.pages["pages"] == sum(i.pages_sent for i in report.iterations)
    assert report.verification.memory_match is True, report.verification
    assert report.tracker_stats["harvested"] > 0


def test_two_vcpus_and_dma_writes_arrive() -> None:
    # Pages written only by a device's DMA (not by any vCPU) must reach the destination through
    # the device's dirty log.
    with MicroVM(memory=MEM, vcpus=2, rate_pps=40_000, wss_bytes=64 << 20) as vm, serve_destination() as dst:
        vm.core.add_dma_engine("dma0")
        vm.start()
        stop, wrapped = threading.Event(), threading.Event()
        dma_base, dma_len = 0x5000000, 1024 * 4096  # beyond the guest's 64 MiB working set

        def dma() -> None:
            i = 0
            while not stop.is_set():
                vm.core.dma_fill("dma0", dma_base + (i % 1024) * 4096, i % 251 + 1, 4096)
                i += 1
                if i == 1024:
                    wrapped.set()  # every DMA page written at least once
                time.sleep(0.0002)  # pacing the device's workload, not synchronisation

        th = threading.Thread(target=dma)
        th.start()
        try:
            wait_running(vm)
            wait_until(wrapped.is_set, "the DMA engine to write all its pages")
            opts = MigrationOptions(verify=True, policy=Policy(max_downtime_ms=5, max_iterations=4))
            report = migrate(vm, dst.address, opts)
        finally:
            stop.set()
            th.join()
        inc = dst.wait()
        assert isinstance(inc, Incoming)
        # A stopped device does no DMA, so the source's DMA pages are frozen at stop; the
        # destination's guest never touches them: they must be the source's, byte for byte.
        src_dma = _read(vm, dma_base, dma_len)
        assert src_dma.count(0) == 0, "the DMA engine should have filled every page"
        assert _read(inc.vm, dma_base, dma_len) == src_dma
    assert report.verification.memory_match is True, report.verification


def test_downtime_measures_agree() -> None:
    events: dict[str, int] = {}

    def observe(event: str, data: dict) -> None:
        events[event] = time.monotonic_ns()  # the last of each kind: the test's own clock

    with MicroVM(memory="256M", rate_pps=200_000) as vm, serve_destination() as dst:
        vm.start()
        # A full pass first: pages the guest never wrote arrive as holes, and its first writes
        # to them on the destination would fault them in inside the gap its clock measures.
        wait_running(vm, passes=1)
        r = migrate(vm, dst.address, progress=observe)
        assert isinstance(dst.wait(), Incoming)
    names = [c.name for c in r.checkpoints]
    assert names == list(migration_checkpoints())
    times = [c.t_ns for c in r.checkpoints]
    assert times == sorted(times), "checkpoints out of order"
    # An outside observer brackets the downtime: it starts after the last precopy round was
    # reported and ends before the source hears the destination resumed (same CLOCK_MONOTONIC).
    assert r.downtime_ms is not None
    assert events["iteration"] <= times[0] and times[-1] <= events["resumed"], (events, times)
    assert r.downtime_ms <= (events["resumed"] - events["iteration"]) / 1e6
    assert r.guest_observed_downtime_ms is not None
    # The guest sees the gap between its last clock read on the source and its first on the
    # destination: the engine's downtime plus at most one loop of clock reads on each side.
    assert abs(r.guest_observed_downtime_ms - r.downtime_ms) <= max(1.0, 0.1 * r.downtime_ms), (
        r.guest_observed_downtime_ms,
        r.downtime_ms,
    )
    assert r.downtime_ms < r.max_downtime_ms + 50


def migration_checkpoints() -> tuple[str, ...]:
    from vfmig.report.model import CHECKPOINTS

    return CHECKPOINTS


def test_report_has_the_documented_keys() -> None:
    channels = 2
    with MicroVM(memory=MEM, rate_pps=20_000) as vm, serve_destination() as dst:
        relay = CountingRelay(_dst_addr(dst)).start()
        vm.start()
        wait_running(vm)
        try:
            doc = migrate(vm, relay.address, MigrationOptions(verify=True, channels=channels)).to_dict()
        finally:
            relay.close()
        inc = dst.wait()
        assert isinstance(inc, Incoming)
    for key in (
        "status",
        "total_time_ms",
        "downtime_ms",
        "setup_ms",
        "iterations",
        "bytes_sent",
        "throughput_Bps",
        "tracker",
        "channels",
        "checkpoints",
        "guest_observed_downtime_ms",
        "verification",
    ):
        assert key in doc, key
    for key in (
        "dirty_pages",
        "pages_sent",
        "zero_pages",
        "bytes",
        "duration_ms",
        "dirty_rate_pps",
        "bandwidth_Bps",
    ):
        assert key in doc["iterations"][0], key
    assert set(doc["verification"]) >= {"memory_match", "method"}
    # Bytes and pages as the receiving side counted them: the relay saw exactly the reported
    # bytes plus the framing, and the destination decoded exactly the reported pages.
    precopy = sum(1 for i in doc["iterations"] if not i["final"])
    framing = channels * (CHANNEL_REC + EOS_REC + precopy * ITER_REC)
    assert len(relay.arrivals) == 1 + channels
    assert sum(relay.page_bytes()) == doc["bytes_sent"] + framing
    assert inc.pages["pages"] == sum(i["pages_sent"] for i in doc["iterations"])
    assert doc["iterations"][0]["pages_sent"] == (128 << 20) // 4096  # round 1: all of RAM


BW_LIMIT = 64 << 20
# Arrival rate bounds, as a fraction of the limit. Upper 1.15: the sender paces all channels
# together to the limit from the start of the round, so beyond one 1 MiB record in flight per
# channel nothing can arrive early; 15% covers a relay thread that stalled and caught up. Lower 0.5: 64 MiB/s is
# a small fraction of what loopback and this relay carry, so only a starved CPU (2 shared cores)
# slows it, and 0.5 still catches a limit applied twice (e.g. divided by the channel count again).
BW_LOW, BW_HIGH = 0.5, 1.15


@pytest.mark.parametrize(("limit", "channels"), [(BW_LIMIT, 1), (BW_LIMIT, 4), (0, 4)])
def test_bandwidth_limit_is_honoured_at_the_receiver(limit: int, channels: int) -> None:
    """Arrival rates at a byte-counting relay in front of the destination, over round 1 (all of
    RAM) from 10% to 90% of it: past any start-up burst and before the round's tail. limit=0 is
    the negative: the same measurement of an unlimited migration must break the upper bound."""
    ram = 128 << 20
    with MicroVM(memory=ram, guest="idle") as vm, serve_destination() as dst:
        relay = CountingRelay(_dst_addr(dst)).start()
        vm.start()
        wait_until(lambda: vm.vcpu_stats()[0].state == 2, "the idle guest to touch its RAM and halt")
        try:
            r = migrate(vm, relay.address, MigrationOptions(bandwidth=limit, channels=channels))
        finally:
            relay.close()
        assert isinstance(dst.wait(), Incoming)
    assert len(relay.arrivals) == 1 + channels, "one control connection and one per channel"
    assert r.iterations[0].pages_sent == ram // 4096
    total, per_channel = relay.window_rates(ram // 10, ram * 9 // 10)
    mib = [round(x / 2**20, 1) for x in per_channel]
    if not limit:
        assert total > BW_HIGH * BW_LIMIT, f"unlimited ran at only {total / 2**20:.1f} MiB/s: the bound is moot"
        return
    assert BW_LOW * limit <= total <= BW_HIGH * limit, (total / 2**20, mib)
    for rate in per_channel:  # pages are striped evenly, so the channels share the limit evenly
        assert BW_LOW * limit / channels <= rate <= BW_HIGH * limit / channels, mib


def test_a_round_on_one_channel_gets_the_whole_bandwidth() -> None:
    """--bandwidth is the link's, shared by all channels: when a round's pages all fall on one
    channel's stripes (a guest dirtying a few MiB in a row, the usual final round), that channel
    must get the whole limit, not its 1/N share, or the stop takes N times what the policy
    predicted. The idle guest's 2 MiB working set at 4 MiB is one stripe (512 pages): channel 0
    of 2. Pacing per channel (the old code) ran it at limit/2 (and broke a 30 ms limit in the
    converge bench). Timed at the relay, by when channel 0's bytes arrived: its 2 MiB come as
    two 1 MiB records, each followed by a pace, so its last bytes (the zero runs of later
    stripes, then ITER) come once the 2 MiB's time at the limit has passed, 0.5 s; at limit/2
    the sleeps alone take 1 s."""
    limit = 4 << 20
    with MicroVM(memory="64M", guest="idle", wss_bytes=2 << 20) as vm, serve_destination() as dst:
        relay = CountingRelay(_dst_addr(dst)).start()
        vm.start()
        wait_until(lambda: vm.vcpu_stats()[0].state == 2, "the idle guest to touch its RAM and halt")
        try:
            r = migrate(vm, relay.address, MigrationOptions(bandwidth=limit, channels=2))
        finally:
            relay.close()
        assert isinstance(dst.wait(), Incoming)
    assert r.status == "completed"
    data = relay.page_bytes()
    assert data[0] > 2 << 20 and data[1] < 64 << 10, data  # the round's data all on channel 0
    first, last = relay.arrivals[1][0][0], relay.arrivals[1][-1][0]
    span = (last - first) / 1e9
    at_limit = (2 << 20) / limit
    assert 0.9 * at_limit <= span < 1.5 * at_limit, f"channel 0's bytes spanned {span:.3f} s"


def test_a_round_ends_when_the_destination_has_applied_it() -> None:
    """A destination that takes pages in fast but applies them slowly (a compressed round
    decoding into cold memory; here a relay that buffers without bound and passes 40 MB/s on)
    must not let the source stop while it is behind: a round ends, and its rate is measured,
    when the destination says APPLIED. Before, the idle guest's 16 MiB went into the buffers in
    milliseconds, the source measured GB/s, found nothing dirty, and stopped with 16 MiB still
    to apply: a stop of ~400 ms against a 50 ms limit. One page channel: the relay paces each."""
    drain = 40_000_000
    with MicroVM(memory="64M", guest="idle", wss_bytes=16 << 20) as vm, serve_destination() as dst:
        relay = CountingRelay(_dst_addr(dst), drain_Bps=drain).start()
        vm.start()
        wait_until(lambda: vm.vcpu_stats()[0].state == 2, "the idle guest to touch its RAM and halt")
        try:
            r = migrate(vm, relay.address, MigrationOptions(channels=1, policy=Policy(max_downtime_ms=50)))
        finally:
            relay.close()
        assert isinstance(dst.wait(), Incoming)
    assert r.status == "completed", r.error
    assert r.iterations[0].bandwidth_Bps < 2 * drain, r.iterations[0]  # the applied rate, not the buffers'
    assert r.downtime_ms is not None and r.downtime_ms <= 50, r.summary()
    assert r.downtime_limit_exceeded is False


def _rates_at_events(vm: MicroVM, samples: list[tuple[int, int]]) -> Callable[[str, dict], None]:
    """A progress callback that samples the guest's own counter at every event."""

    def progress(event: str, data: dict) -> None:
        if event in ("setup", "iteration"):
            samples.append((time.monotonic_ns(), vm.touches()))

    return progress


def _unthrottled_rate(vm: MicroVM, passes: int = 3) -> float:
    """The guest's own dirty rate over `passes` more trips through its working set, before any
    migration: round 1's rate alone reads low when the destination, in this process, builds its
    VM and faults in its RAM at the same time."""
    t0, n0, p0 = time.monotonic_ns(), vm.touches(), min(s.passes for s in vm.vcpu_stats())
    wait_until(lambda: min(s.passes for s in vm.vcpu_stats()) >= p0 + passes, "the guest to dirty", 10)
    return (vm.touches() - n0) / ((time.monotonic_ns() - t0) / 1e9)


def _throttle_violations(samples: list[tuple[int, int]], throttles: list[int], unthrottled: float) -> list[str]:
    """Rounds in which the guest dirtied faster than (100 - throttle)% of its unthrottled rate
    (the faster of round 1 and the rate measured before the migration), plus 25 points of
    slack: on 2 shared cores the guest's rate swings by +-30% round to round. Only this upper
    bound is a guarantee (too much throttling is covered by test_vm.py's throttle test)."""
    rates = [(n1 - n0) / ((t1 - t0) / 1e9) for (t0, n0), (t1, n1) in zip(samples, samples[1:], strict=False)]
    base, bad = max(rates[0], unthrottled), []
    for k, (rate, pct) in enumerate(zip(rates, throttles, strict=True)):
        if pct and rate / base > (100 - pct) / 100 + 0.25:
            bad.append(f"round {k + 1} at {pct}%: {rate / base:.2f} of the unthrottled rate")
    return bad


@pytest.mark.parametrize("auto_converge", [True, False])
def test_auto_converge_slows_the_guests_own_dirty_rate(auto_converge: bool) -> None:
    """The guest's counter (read at each progress event) must slow to about (100 - throttle)%
    of its rate in round 1. The throttle starts at 60% (not QEMU's 20%) so that the drop stands
    out of the noise. Without auto-converge (the negative) the same check, applied with the
    throttle levels auto-converge would have used, must fire."""
    samples: list[tuple[int, int]] = []
    policy = Policy(max_downtime_ms=1, max_iterations=3, auto_converge=auto_converge, throttle_initial=60)
    with MicroVM(memory=MEM, rate_pps=0) as vm, serve_destination() as dst:
        vm.start()
        wait_running(vm, passes=1)
        unthrottled = _unthrottled_rate(vm)
        # Delta pages off: they would engage first, in round 2, and this is about the throttle.
        opts = MigrationOptions(bandwidth=200 << 20, policy=policy, delta="off")
        r = migrate(vm, dst.address, opts, progress=_rates_at_events(vm, samples))
        assert isinstance(dst.wait(), Incoming)
    assert r.stop_reason.startswith("reached 3 iterations")
    throttles = [i.throttle_pct for i in r.iterations if not i.final]
    assert len(samples) == len(throttles) + 1 == 4
    if auto_converge:
        # 60% from round 2; +10% in round 3 only if the guest still outran half the link.
        assert throttles[:2] == [0, 60] and throttles[2] in (60, 70), throttles
        assert _throttle_violations(samples, throttles, unthrottled) == []
    else:
        assert throttles == [0, 0, 0]
        assert _throttle_violations(samples, [0, 60, 70], unthrottled), "an unthrottled guest passed the check"


# failures ---------------------------------------------------------------------------------------
def _fails_cleanly(vm: MicroVM, to: str, match: str, **opts: object) -> MigrationError:
    before = vm.touches()
    with pytest.raises(MigrationError, match=match) as ei:
        migrate(vm, to, MigrationOptions(**opts))
    assert keeps_running(vm), "the source must keep running"
    assert vm.touches() > before
    return ei.value


@pytest.mark.parametrize(
    ("fault", "match"),
    [
        (Fault(conn=0, offset=30), "HELLO|corrupt|CRC"),  # stream header
        (Fault(conn=1, offset=20), "corrupt|CRC|magic|record"),  # first page record header
        (Fault(conn=1, offset=5000), "CRC mismatch"),  # page data
        (Fault(conn=1, offset=(1 << 20) + 77), "CRC mismatch"),  # in a later record
        (Fault(conn=1, offset=(1 << 20) + 100, action="cut"), "closed|went away|mid-stream"),  # truncated
        (Fault(conn=0, offset=100, action="cut"), "closed|went away|mid-stream"),
    ],
)
def test_corrupt_or_truncated_stream_is_refused(fault: Fault, match: str) -> None:
    # A destination that refuses a bad opening connection goes on listening for a good one; 5 s
    # (not 30) bounds that wait, the source having connected at once.
    with MicroVM(memory=MEM, rate_pps=20_000) as vm, serve_destination(accept_timeout=5) as dst:
        vm.start()
        wait_running(vm)
        host, port = dst.listener.sock.getsockname()[:2]
        proxy = FaultProxy((host, port), fault).start()
        try:
            _fails_cleanly(vm, proxy.address, match, verify=True)
        finally:
            proxy.close()
        assert proxy.fired.is_set()
        res = dst.wait()
        assert isinstance(res, MigrationError), "the destination must not resume a guest"


@pytest.mark.parametrize(
    ("action", "match"), [("flip", "APPLIED.*CRC|CRC mismatch"), ("cut", "closed the connection|APPLIED")]
)
def test_a_bad_applied_record_fails_the_migration_cleanly(action: str, match: str) -> None:
    """The destination's APPLIED is checked like any record: a flipped payload byte is a CRC
    mismatch, a channel closed in its place is a peer gone; either way the source runs on and
    the destination resumes nothing."""
    with MicroVM(memory=MEM, rate_pps=20_000) as vm, serve_destination(accept_timeout=5) as dst:
        vm.start()
        wait_running(vm)
        host, port = dst.listener.sock.getsockname()[:2]
        fault = Fault(conn=1, direction=DOWN, record="APPLIED", action=action, at_byte=-4)
        proxy = FaultProxy((host, port), fault).start()
        try:
            _fails_cleanly(vm, proxy.address, match)
        finally:
            proxy.close()
        assert proxy.fired.is_set()
        assert isinstance(dst.wait(), MigrationError), "the destination must not resume a guest"


def test_wrong_protocol_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(migration, "VERSION", _core.STREAM_VERSION + 1)
    with MicroVM(memory=MEM) as vm, serve_destination() as dst:
        vm.start()
        wait_running(vm)
        err = _fails_cleanly(vm, dst.address, "unsupported stream version")
        assert f"this vfmig speaks version {_core.STREAM_VERSION}" in str(err)
        assert isinstance(dst.wait(), MigrationError)


def test_wrong_session_token_on_a_channel(monkeypatch: pytest.MonkeyPatch) -> None:
    real = migration.encode_channel
    monkeypatch.setattr(migration, "encode_channel", lambda token, i: real(b"\0" * 16, i))
    with MicroVM(memory=MEM) as vm, serve_destination() as dst:
        vm.start()
        wait_running(vm)
        _fails_cleanly(vm, dst.address, "wrong session token")


def test_destination_killed_mid_stream_then_source_migrates_intact() -> None:
    ram = 256 << 20
    with MicroVM(memory=ram, rate_pps=100_000) as vm:
        vm.start()
        wait_running(vm)
        proc, addr = start_destination(run_seconds=1.0)
        host, port = addr.removeprefix("tcp://").rsplit(":", 1)
        # The destination process dies when 16 MiB of round 1 have reached it on channel 0.
        relay = CountingRelay((host, int(port)), trigger_conn=1, trigger_offset=16 << 20, trigger=proc.kill).start()
        try:
            with pytest.raises(MigrationError, match="closed|went away|reset|Broken pipe|send failed"):
                Migration(vm, relay.address, MigrationOptions()).run()
        finally:
            relay.close()
            proc.kill()
            proc.wait(10)
        assert relay.fired.is_set() and proc.returncode == -9
        assert relay.page_bytes()[0] < ram, "killed mid-stream, before round 1 was through"
        assert keeps_running(vm)
        # Intact: a fresh migration afterwards verifies page for page.
        with serve_destination() as dst:
            r = migrate(vm, dst.address, MigrationOptions(verify=True))
            assert isinstance(dst.wait(), Incoming)
        assert r.verification.memory_match is True


@pytest.mark.parametrize("when", ["mid-round", "iteration"])
def test_cancel_leaves_the_source_running(when: str) -> None:
    """Cancel from another thread in the middle of a round (8 MiB into channel 0, seen at the
    destination's side), or at a phase boundary (the first "iteration" progress event)."""
    ram = 256 << 20
    with MicroVM(memory=ram, rate_pps=0) as vm, serve_destination() as dst:
        vm.start()
        wait_running(vm)
        m: Migration | None = None

        def cancel() -> None:
            assert m is not None
            m.cancel()

        def on_event(event: str, data: dict) -> None:
            if when == "iteration" and event == "iteration":
                cancel()

        relay = CountingRelay(_dst_addr(dst), trigger_conn=1 if when == "mid-round" else -1, trigger_offset=8 << 20)
        relay.trigger = cancel
        relay.start()
        m = Migration(vm, relay.address, MigrationOptions(bandwidth=100 << 20 if when == "mid-round" else 0), on_event)
        try:
            with pytest.raises(MigrationError, match="cancel"):
                m.run()
        finally:
            relay.close()
        assert m.report.status == "cancelled"
        assert not vm.paused and keeps_running(vm)
        if when == "mid-round":
            assert relay.fired.is_set()
            assert relay.page_bytes()[0] < ram, "the round went on after the cancel"
        else:
            assert len(m.report.iterations) == 1, "cancelled at the first phase boundary"
        assert isinstance(dst.wait(), MigrationError)


def test_silent_destination_times_out() -> None:
    srv = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    with MicroVM(memory=MEM) as vm:
        vm.start()
        wait_running(vm)
        opts = MigrationOptions(connect_timeout_s=0.5, handshake_timeout_s=0.5)
        with pytest.raises(MigrationError, match="did not answer"):
            migrate(vm, f"tcp://127.0.0.1:{srv.getsockname()[1]}", opts)
        assert keeps_running(vm)
    srv.close()


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({"channels": 0}, "channels"),
        ({"channels": 17}, "channels"),
        ({"bandwidth": 1000}, "bandwidth"),
        ({"policy": Policy(max_downtime_ms=0)}, "max downtime"),
        ({"tracker": "ring"}, "built for the bitmap tracker"),
    ],
)
def test_bad_options_rejected_before_connecting(opts: dict, match: str) -> None:
    with MicroVM(memory=MEM) as vm:
        vm.start()
        with pytest.raises(ConfigError, match=match):
            migrate(vm, "tcp://127.0.0.1:9", MigrationOptions(**opts))
        assert keeps_running(vm)


def test_bad_address() -> None:
    with MicroVM(memory=MEM) as vm:
        vm.start()
        with pytest.raises(ConfigError, match="tcp://HOST:PORT"):
            migrate(vm, "udp://nowhere", MigrationOptions())
        with pytest.raises(MigrationError, match="cannot connect"):
            migrate(vm, "tcp://127.0.0.1:9", MigrationOptions(connect_timeout_s=1))
        assert keeps_running(vm)


def test_lost_go_never_runs_the_guest_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """If the commit (GO) is lost, the destination discards the guest and the source does not
    resume it either: stopped on both sides beats running on two."""
    from vfmig.migration import wire as transport

    real = transport.ControlChannel.send

    def send(self: transport.ControlChannel, rtype: str, payload: bytes = b"") -> None:
        if rtype == "GO":
            self.sock.shutdown(socket.SHUT_RDWR)
            raise transport.PeerError("connection lost")
        real(self, rtype, payload)

    monkeypatch.setattr(transport.ControlChannel, "send", send)
    with MicroVM(memory=MEM, rate_pps=20_000) as vm, serve_destination() as dst:
        vm.start()
        wait_running(vm)
        with pytest.raises(MigrationError, match="stays paused"):
            migrate(vm, dst.address)
        assert vm.paused
        assert isinstance(dst.wait(), MigrationError)


def test_sparse_guest_above_4g_migrates_without_touching_holes() -> None:
    # 5 GiB: RAM above 3 GiB lives in a second memslot at 4 GiB. The guest uses 16 MiB; pages it
    # never wrote are memfd holes and must be sent as zero without being read (a read would
    # allocate them on the source), and verification must not allocate them either.
    with MicroVM(memory="5G", wss_bytes=16 << 20, rate_pps=50_000) as vm, serve_destination() as dst:
        vm.core.add_dma_engine("dma0")  # a device write above 4 GiB, only visible through its log
        vm.start()
        wait_running(vm)

        def dma_at_setup(event: str, data: dict) -> None:
            if event == "setup":
                vm.core.dma_fill("dma0", (4 << 30) + (512 << 20), 0xAB, 8192)

        r = migrate(vm, dst.address, MigrationOptions(verify=True, channels=2), progress=dma_at_setup)
        inc = dst.wait()
        assert isinstance(inc, Incoming)
        allocated = os.fstat(vm.core.mem_fd).st_blocks * 512
        assert allocated < 256 << 20, f"source RAM grew to {allocated >> 20} MiB"
        assert inc.vm.core.read((4 << 30) + (512 << 20), 8192) == b"\xab" * 8192
    assert r.verification.memory_match is True
    assert r.iterations[0].zero_pages > 1_200_000


def test_ring_overrun_is_detected_and_loses_nothing() -> None:
    # A ring far too small for the dirtier at full rate: this KVM overruns it (see docs/host-facts.md).
    # The tracker must notice and send everything for those rounds; verification must hold.
    npages = (128 << 20) // 4096
    with MicroVM(memory="128M", tracker="ring", ring_entries=256, rate_pps=0) as vm, serve_destination() as dst:
        vm.start()
        wait_running(vm, passes=1)  # full rate needs RAM faulted in: a first pass is far slower
        r = migrate(vm, dst.address, MigrationOptions(verify=True, policy=Policy(max_iterations=3)))
        inc = dst.wait()
        assert isinstance(inc, Incoming)
    assert r.tracker_stats["overruns"] > 0
    assert all(i.dirty_pages == npages for i in r.iterations[1:]), [i.dirty_pages for i in r.iterations]
    assert r.verification.memory_match is True
    assert r.destination["touches_after"] > r.destination["touches_at_resume"]
