"""The source side of a live migration: the phases in order, with the policy deciding when to stop.

    setup -> precopy iterations -> guest handshake -> stop -> final dirty pages -> device state
          -> vCPU state -> destination resumes -> completion (verification, guest-observed downtime)

Devices with a migration state machine (migstate.h: simvf, later VFIO) go to PRE_COPY at setup
and stream their state in DEVICE_DATA records after each page round; at the stop they go to
STOP_COPY and their remaining stream follows the final pages.

Just before the stop, with the vCPUs running, each such device's pre-stop hook asks the guest's
driver to quiesce (the guest handshake, issue 8): one deadline (handshake_deadline_ms) bounds
the whole phase, whatever the guest does; the outcome travels in the device's state and tells
the destination's driver whether it may resume in place or must reset.

Python owns the order and the policy; every loop over pages or bytes runs in C without the GIL.
Any failure before the destination says it resumed leaves the source VM running and unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vfmig import _core
from vfmig.auth import Authenticator, read_key
from vfmig.errors import ConfigError, MigrationError, VfmigError
from vfmig.host import meminfo_bytes
from vfmig.migration.collector import collector_paused
from vfmig.migration.policy import ConvergenceWatch, Policy, WireCost
from vfmig.migration.wire import (
    PHASE_PRECOPY,
    PHASE_STOPCOPY,
    ControlChannel,
    Hello,
    PeerError,
    PeerReported,
    connect,
    device_data_room,
    encode_channel,
    encode_device,
    encode_device_data,
    encode_vcpu,
    parse_uri,
)
from vfmig.report.model import Checkpoint, DeviceReport, GuestReport, HandshakeReport, Iteration, Report
from vfmig.units import human_bytes
from vfmig.vm import MicroVM, check_pause_timeout

if TYPE_CHECKING:
    from vfmig.observe.probes import ProbeSession

VERSION = _core.STREAM_VERSION
# The devices' pre-stop hooks (the guest handshake) run just before the stop, with the vCPUs
# still running, and return by one deadline shared by all of them; whatever they say, the
# migration goes on (a device, or a guest behind it, must never stall the stop). The default;
# MigrationOptions.handshake_deadline_ms sets it, 0: the guest is not asked.
PRESTOP_DEADLINE_MS = 50
HANDSHAKE_DEADLINE_MAX_MS = 10_000
# The report's handshake is the VF's: with several devices, the one whose outcome is the worst.
_OUTCOME_RANK = {"none": 0, "acked": 1, "disabled": 2, "timeout": 3, "late": 4}
DEVICE_STOP_STATE = "STOP_COPY"  # where each migratable device goes once the VM is stopped
# How long the stop waits for each vCPU (woken from a throttle sleep, or stalled in the write
# faults after the last dirty-log sync) to run guest code again: one 10 ms throttle slice. A
# running guest exits far sooner, a halted one is not waited for; one that does neither is late.
UNTHROTTLE_TIMEOUT_MS = 10
DELTA_MODES = ("auto", "always", "off")
APPLIED_TIMEOUT_MS = 30_000  # a destination that has not applied a round by then is stuck
# The default delta cache: a quarter of guest RAM holds the working set of most busy guests
# (a 1 GiB guest rewriting 128 MiB, say) at a cost the source host can spare for the migration.
# When delta pages engage on a larger dirty set, the cache grows to hold it (plus a quarter),
# up to half of RAM: a cache smaller than the set the guest rewrites misses on the rest every
# round (a 1 GiB guest rewriting 512 MiB at 1 Gbit/s: 28.9 s with a quarter, 8.3 s with all).
DELTA_CACHE_FRACTION = 4
DELTA_CACHE_MAX_FRACTION = 2
# zstd's fast end: on a 1 Gbit/s link level 1 already compresses faster than the link carries.
ZSTD_DEFAULT_LEVEL = 1
# The guest's and the engine's downtime agree within max(1 ms, 10%); beyond, the report says why.
DOWNTIME_AGREE_MS = 1.0
DOWNTIME_AGREE_FRACTION = 0.10


@dataclass
class MigrationOptions:
    """How to migrate. Defaults follow QEMU where it has one (300 ms downtime limit, two
    parallel channels as multifd has)."""

    # Two: one sender thread is the bound of a single channel (kernel TCP, then the CRC); two
    # split it, 1.2-2x faster here even on two cores (docs/host-facts.md).
    channels: int = 2
    tracker: str | None = None  # must match what the VM was built with; None: the VM's
    bandwidth: int = 0  # bytes/s over all channels, 0: unlimited
    verify: bool = False
    policy: Policy = field(default_factory=Policy)
    connect_timeout_s: float = 10.0
    handshake_timeout_s: float = 60.0  # the destination builds its VM before it answers HELLO
    resume_timeout_s: float = 30.0  # from end of stream until the destination says it runs
    guest_report_timeout_s: float = 30.0
    pause_timeout_ms: int = _core.PAUSE_TIMEOUT_MS_DEFAULT  # a vCPU stuck in a device must not stall the stop
    psk_file: str | None = None  # pre-shared key the destination asks for (vfmig receive --psk-file)
    handshake_deadline_ms: int = PRESTOP_DEADLINE_MS  # the guest handshake before the stop; 0: don't ask
    probes: bool = False  # watch both sides with the kernel probes; the report gains `probes`
    # Delta pages: "auto" engages them as the first remedy when precopy stops converging,
    # "always" from the first re-sent page, "off" never. The cache holds delta_cache bytes of
    # last-sent pages (0: a quarter of guest RAM; when auto engages them on a larger dirty set,
    # that set and a quarter more, up to half of RAM and of the host's available memory).
    delta: str = "auto"
    delta_cache: int = 0
    compress: str = ""  # "zstd" or "zstd:LEVEL" (1..19): each page channel compresses its runs

    def delta_cache_pages(self, mem_bytes: int, dirty_pages: int = 0, available: int | None = None) -> int:
        """The cache for delta pages engaged on a round of `dirty_pages` (0: not known yet). It
        grows past the default only into half of the host's `available` memory (bytes; None:
        not known), since it lives in the source VM's own process."""
        if self.delta_cache:
            return self.delta_cache // 4096
        floor, cap = mem_bytes // DELTA_CACHE_FRACTION // 4096, mem_bytes // DELTA_CACHE_MAX_FRACTION // 4096
        if available is not None:
            cap = min(cap, available // 2 // 4096)
        return max(floor, min(cap, dirty_pages * 5 // 4))

    def compress_level(self) -> int:
        """The zstd level of `compress` (0: off). Raises ConfigError for anything else."""
        if not self.compress:
            return 0
        name, _, level = self.compress.partition(":")
        if name != "zstd":
            raise ConfigError(f"unknown compression {self.compress!r}: the choice is zstd or zstd:LEVEL")
        if not level:
            return ZSTD_DEFAULT_LEVEL
        if not level.isdigit() or not 1 <= int(level) <= _core.ZSTD_LEVEL_MAX:
            raise ConfigError(f"zstd level must be 1..{_core.ZSTD_LEVEL_MAX}, got {level!r}")
        return int(level)

    def authenticator(self) -> Authenticator:
        return Authenticator(read_key(self.psk_file) if self.psk_file else None)

    def validate(self, vm: MicroVM) -> None:
        if not 1 <= self.channels <= _core.MAX_CHANNELS:
            raise ConfigError(f"channels must be 1..{_core.MAX_CHANNELS}, got {self.channels}")
        if self.bandwidth < 0:
            raise ConfigError("bandwidth must be >= 0")
        if self.bandwidth and self.bandwidth < 1 << 20:
            raise ConfigError("bandwidth below 1 MiB/s is not supported")
        if self.tracker is not None and self.tracker != vm.config.tracker:
            raise ConfigError(
                f"the VM was built for the {vm.config.tracker} tracker; start it with --tracker {self.tracker}"
            )
        self.policy.validate()
        check_handshake_deadline(self.handshake_deadline_ms)
        if self.delta not in DELTA_MODES:
            raise ConfigError(f"delta must be one of {', '.join(DELTA_MODES)}, got {self.delta!r}")
        mem = vm.config.memory
        if self.delta_cache and not self.channels * 4096 <= self.delta_cache <= mem:
            raise ConfigError(
                f"delta cache must be {self.channels * 4} KiB..{mem >> 20} MiB (guest RAM), got {self.delta_cache}"
            )
        self.compress_level()
        check_pause_timeout(self.pause_timeout_ms)
        self.authenticator()  # an unreadable key file fails before anything connects


def check_handshake_deadline(ms: object) -> None:
    """The guest handshake's deadline: whole milliseconds, 0..HANDSHAKE_DEADLINE_MAX_MS."""
    if isinstance(ms, bool) or not isinstance(ms, int) or not 0 <= ms <= HANDSHAKE_DEADLINE_MAX_MS:
        raise ConfigError(
            f"handshake deadline must be 0..{HANDSHAKE_DEADLINE_MAX_MS} ms (0: don't ask the guest), got {ms!r}"
        )


IN_DOUBT = (
    "after the commit point, so the source VM stays paused: resume it (`vfmig vm resume --control PATH`) "
    "only if the destination is known not to run the guest"
)


class CommitError(MigrationError):
    """Failed after the commit point: the guest is stopped here and may or may not run there."""


Progress = Callable[[str, dict[str, Any]], None]


class LimitCancelled(MigrationError):
    """The downtime limit could not be met and the limit action is cancel: the source runs on."""


def _both_unthrottles(first: dict[str, float] | None, second: dict[str, float]) -> dict[str, float]:
    """The stop's unthrottles as one: the vCPUs woken by either, the longest sleep cut, and
    those that had not run again by the pause (the second's)."""
    if first is None:
        return second
    return {
        "woken": first["woken"] + second["woken"],
        "late": second["late"],
        "longest_sleep_ms": max(first["longest_sleep_ms"], second["longest_sleep_ms"]),
    }


@dataclass
class _Device:
    """A device with a migration state machine, as this migration drives it."""

    name: str
    state_bytes: int  # the configured state size: what a device without precopy will send
    precopy: bool = False  # moved to PRE_COPY by this migration
    seq: int = 0  # the next DEVICE_DATA sequence number
    precopy_bytes: int = 0
    stopcopy_bytes: int = 0
    save_ms: float = 0.0
    dma_pages_logged: int | None = None
    prestop_ms: float | None = None  # its pre-stop hook, with the vCPUs still running
    prestop_error: str | None = None
    prestop_called: bool = False  # a failed migration must tell the guest it runs on (prestop_abort)
    handshake: str | None = None  # the hook's outcome; "late" is known only once the VM stopped
    handshake_latency_us: int | None = None
    reset_required: bool | None = None  # what the destination told its driver


def _rounds_text(rounds: float) -> str:
    return "never reaching the limit at this pace" if rounds == float("inf") else f"{rounds:.1f} rounds from the limit"


class Migration:
    """One outgoing migration of a running MicroVM. run() returns the Report or raises."""

    def __init__(
        self,
        vm: MicroVM,
        to: str,
        options: MigrationOptions | None = None,
        progress: Progress | None = None,
        probes: ProbeSession | None = None,
    ) -> None:
        """`probes`: an attached session to reuse (its owner closes it); otherwise
        options.probes attaches one for this migration alone."""
        self.vm = vm
        self.to = to
        self.opts = options or MigrationOptions()
        self.progress = progress or (lambda event, data: None)
        self._cancel = threading.Event()
        self._sender: _core.PageSender | None = None
        self._ctrl: ControlChannel | None = None
        self._chans: list[socket.socket] = []
        self._paused_by_us = False
        self._delta_on = False
        self._stop_predicted_ms = 0.0  # the downtime the policy predicted when it chose to stop
        self._committed = False  # GO is on its way: from here the source never resumes
        self._local_crcs: bytes | None = None  # our RAM at stop, for --verify
        self._devices: list[_Device] = []  # the VM's devices with a migration state machine
        self._reset_devices: list[str] = []  # devices the abort had to reset out of ERROR
        self.report = Report(status="running")
        self._probes = probes
        self._own_probes = False
        self._dst_pid: int | None = None
        self._probe_note: str | None = None

    def cancel(self) -> None:
        """Any thread: stop at the next record or phase boundary; the source keeps running."""
        self._cancel.set()
        if self._sender is not None:
            self._sender.cancel()

    # -------------------------------------------------------------------------------------------
    def run(self) -> Report:
        host, port = parse_uri(self.to)
        self.opts.validate(self.vm)
        if not self.vm.started or self.vm.paused:
            raise MigrationError("the VM must be running to be live-migrated")
        if self.vm.core.failed:
            raise MigrationError(f"the guest has stopped, there is nothing to migrate: {self.vm.core.failed}")
        r = self.report
        cfg = self.vm.config
        r.memory, r.vcpus, r.guest, r.tracker = cfg.memory, cfg.vcpus, GuestReport(cfg.guest), cfg.tracker
        r.channels, r.max_downtime_ms = self.opts.channels, self.opts.policy.max_downtime_ms
        r.downtime_limit_ms, r.limit_action = self.opts.policy.max_downtime_ms, self.opts.policy.limit_action
        r.bandwidth_limit_Bps = self.opts.bandwidth
        self._attach_probes()  # compiling them is not part of the migration's time
        try:
            return self._migrate(host, port)
        finally:
            self._detach_probes()  # however it ended, even on Ctrl-C

    def _migrate(self, host: str, port: int) -> Report:
        r = self.report
        t0 = time.monotonic_ns()
        try:
            self._setup(host, port)
            r.setup_ms = (time.monotonic_ns() - t0) / 1e6
            self._watch_peer()
            with self._watch_destination():
                self._precopy(t0)
                with collector_paused():
                    self._stop_and_copy()
            self._wait_resumed()
        except BaseException as e:
            reason = self._peer_reason(e)
            try:
                not_resumed = self._abort()
            finally:
                self._close()
            committed = self._committed
            cancelled = self._cancel.is_set() or isinstance(e, LimitCancelled)
            r.status = "in_doubt" if committed else "cancelled" if cancelled else "failed"
            r.error = reason or (str(e) if isinstance(e, VfmigError) else _describe(e))
            if isinstance(e, KeyboardInterrupt):
                raise
            if committed and not isinstance(e, CommitError):  # whatever broke after GO, the outcome is in doubt
                r.error = f"{r.error}; {IN_DOUBT}"
            if not_resumed:
                r.error = f"{r.error}; {not_resumed}"
            cls = CommitError if committed else LimitCancelled if isinstance(e, LimitCancelled) else MigrationError
            raise cls(r.error) from e
        # The guest runs on the destination now: nothing below can fail the migration.
        r.status = "completed"
        r.total_time_ms = (time.monotonic_ns() - t0) / 1e6
        r.throughput_Bps = r.bytes_sent / (r.total_time_ms / 1e3) if r.total_time_ms else 0.0
        r.finish_timings()
        r.judge_limit()
        try:
            self._complete()
        except VfmigError as e:
            r.verification.method += f" (incomplete: {e})"
        finally:
            self._close()
        r.judge_limit()  # again, with the guest's own figure
        return r

    # kernel probes (outside the migration's timings) -----------------------------------------------
    def _attach_probes(self) -> None:
        """Probes never fail a migration: whatever goes wrong here ends up in report.probes."""
        try:
            if self._probes is None and self.opts.probes:
                from vfmig.observe.probes import ProbeSession

                self._probes, self._own_probes = ProbeSession(), True
                self._probes.start([os.getpid()])
            elif self._probes is not None:
                self._probes.watch(os.getpid())
                self._probes.reset()
        except Exception as e:  # noqa: BLE001
            self._probe_failed(f"attaching the probes failed: {_describe(e)}")

    def _watch_peer(self) -> None:
        """The destination's process, when it is on this host: the probes watch it too. (A local
        proxy in between is taken for the destination; it runs no guest, so the report then
        has no kernel downtime.)"""
        if self._probes is None or self._ctrl is None:
            return
        from vfmig.observe.peer import local_peer_pid

        try:
            self._dst_pid = local_peer_pid(self._ctrl.sock)
            if self._dst_pid is not None:
                self._probes.watch(self._dst_pid)
        except Exception as e:  # noqa: BLE001 - the migration goes on; the report says why
            self._dst_pid, self._probe_note = None, f"watching the destination failed: {_describe(e)}"

    def _probe_failed(self, why: str) -> None:
        from vfmig.report.probes import ProbeReport

        backend = self._probes.backend if self._probes is not None else "none"
        self.report.probes = ProbeReport(backend=backend, error=why)
        if self._own_probes and self._probes is not None:
            with contextlib.suppress(Exception):
                self._probes.close()
        self._probes = None

    def _detach_probes(self) -> None:
        """Once the destination ran (or the migration ended): what the kernel saw, into the report."""
        if self._probes is None:
            return
        from vfmig.observe.runs import Side
        from vfmig.report.probes import ProbeReport

        dst = None
        try:
            src_tids = frozenset(self.vm.core.vcpu_tids())
            src = Side(os.getpid(), tids=src_tids)
            dst = None if self._dst_pid is None else Side(self._dst_pid, exclude=src_tids)
            rep = self._probes.collect(src, dst)
        except Exception as e:  # noqa: BLE001 - a probe failure never fails a migration
            rep = ProbeReport(backend=self._probes.backend, error=f"reading the probes failed: {_describe(e)}")
        try:
            if dst is None and rep.error is None:
                why = self._probe_note or "not a process on this host: run `vfmig probe` there"
                rep.unavailable.append({"event": "destination", "reason": why})
            self.report.probes = rep
        finally:
            if self._own_probes:
                with contextlib.suppress(Exception):
                    self._probes.close()
            self._probes = None

    # phases ------------------------------------------------------------------------------------
    def _setup(self, host: str, port: int) -> None:
        self.progress("setup", {"to": self.to})
        auth = self.opts.authenticator()
        sock = connect(host, port, self.opts.connect_timeout_s)
        self._ctrl = ctrl = ControlChannel(sock, f"destination {self.to}")
        # Prove who we are (and check who they are) before the VM's shape leaves this host.
        init, nonce_s = auth.client_init()
        ctrl.send("AUTH_INIT", init)
        response, session = auth.client_finish(ctrl.expect("AUTH_CHALLENGE", self.opts.handshake_timeout_s), nonce_s)
        ctrl.send("AUTH_RESPONSE", response)
        cfg = self.vm.config
        hello = Hello(
            VERSION, self.opts.channels, cfg.memory, cfg.vcpus, self.opts.verify, session.hello_token, cfg.to_dict()
        )
        ctrl.send("HELLO", hello.encode())
        ctrl.expect("HELLO_ACK", self.opts.handshake_timeout_s)
        for i in range(self.opts.channels):
            s = connect(host, port, self.opts.connect_timeout_s)
            self._chans.append(s)
            chan = ControlChannel(s, f"destination {self.to}, page channel {i}")
            chan.send("CHANNEL", encode_channel(session.channel_token(i), i))
            chan.expect("HELLO_ACK", self.opts.handshake_timeout_s)  # or the reason it was refused
            s.settimeout(None)  # the C sender sets its own send timeout
        self._sender = _core.PageSender(self.vm.core, [s.fileno() for s in self._chans], self.opts.bandwidth)
        self._sender.start_tracking()
        level = self.opts.compress_level()
        if level:
            self._sender.set_compress(level)
        if self.opts.delta == "always":
            self._engage_delta(0)
        self.report.tracker = self._sender.tracker or self.report.tracker
        # Devices stream their state from here; DMA they do meanwhile is in the dirty log.
        specs = {d.name: d for d in cfg.devices}
        core = self.vm.core
        for name in core.mig_devices():
            dev = _Device(name, specs[name].state_bytes if name in specs else 0)
            self._devices.append(dev)
            if core.mig_precopy_supported(name):
                dev.precopy = True  # before the call: if it fails halfway, the abort still takes it back
                self._set_device_state(dev, "PRE_COPY")

    def _precopy(self, t0: int) -> None:
        policy, sender, r = self.opts.policy, self._sender, self.report
        assert sender is not None
        throttle = 0
        watch = ConvergenceWatch(policy.stall_rounds)
        last_collect = time.monotonic_ns()
        cost, bandwidth = WireCost(), 0.0
        index = 0
        delta_round = 0  # the round delta pages engaged in: it fills the cache, the next shows them
        while True:
            self._check_cancel()
            index += 1
            dirty = sender.collect(accumulate=False)
            now = time.monotonic_ns()
            dirty_rate = dirty / ((now - last_collect) / 1e9) if index > 1 else 0.0
            last_collect = now
            bytes_per_page = cost.per_page(dirty, sender.cached())
            # The guest keeps dirtying while the handshake waits: its deadline is part of the stop.
            handshake_ms = self._handshake_budget_ms() if index > 1 else 0
            final = policy.final_dirty_pages(dirty, dirty_rate, handshake_ms, self.vm.core.npages)
            predicted = (
                policy.predict_downtime_ms(final, bytes_per_page, bandwidth, self._device_pending())
                if index > 1
                else float("inf")
            )
            if index > 1:
                elapsed_ms = (now - t0) / 1e6
                reason = policy.should_stop(index - 1, elapsed_ms / 1e3, predicted, handshake_ms)
                if reason and predicted <= policy.max_downtime_ms:
                    r.stop_reason = reason
                    self._stop_predicted_ms = predicted
                    return  # converged: the collected pages go with the final round
                stalled = watch.observe(dirty, bandwidth)
                dirty_Bps, left = dirty_rate * bytes_per_page, final * bytes_per_page
                outpaced = policy.outpaced(dirty_Bps, bandwidth, left)
                if (stalled or outpaced) and self.opts.delta == "auto" and not self._delta_on:
                    # The first remedy: re-dirtied pages go as deltas against their last copy.
                    # On the same early sign auto-converge throttles on, and before it.
                    why = (
                        f"the dirty set has not shrunk in {policy.stall_rounds} rounds"
                        if stalled
                        else f"dirtying {human_bytes(dirty_Bps)}/s, over half the link, "
                        + _rounds_text(policy.rounds_to_limit(left, dirty_Bps, bandwidth))
                    )
                    engaged = self._engage_delta(dirty)
                    self._remedy("delta pages", index, elapsed_ms, f"not converging ({why}): {engaged}")
                    delta_round = index
                    watch.restart()
                elif stalled and policy.auto_converge and throttle < policy.throttle_max:
                    # The next remedy: throttle harder.
                    throttle = policy.throttle(throttle, float("inf"), bandwidth)
                    self._remedy("throttle", index, elapsed_ms, f"not converging: throttle to {throttle}%")
                    self.vm.core.set_throttle(throttle)
                    watch.restart()
                elif stalled or reason:
                    why = reason or (
                        f"not converging: the dirty set has not shrunk in {policy.stall_rounds} rounds "
                        f"at {human_bytes(bandwidth)}/s"
                    )
                    self._limit_action(why, index, elapsed_ms, predicted)
                    return
                elif index > delta_round + 1:  # delta pages, just engaged, have not been measured yet
                    before = throttle
                    throttle = policy.throttle(throttle, dirty_Bps, bandwidth, left)
                    if throttle:
                        self.vm.core.set_throttle(throttle)
                    if throttle and not before:
                        self._remedy("throttle", index, elapsed_ms, f"dirtying faster than the link: {throttle}%")
            st = sender.send_round(zero_copy=False)
            sender.send_marker(index, dirty)
            # A round is done when the destination has it in RAM, not when the sockets took it: a
            # compressed round can sit whole in the socket buffers, and so would its rate.
            waited = time.monotonic_ns()
            sender.wait_applied(index, APPLIED_TIMEOUT_MS)
            st["ns"] += time.monotonic_ns() - waited
            device_bytes = self._drain_precopy()
            secs = st["ns"] / 1e9
            bandwidth = st["bytes"] / secs if secs > 0 else bandwidth
            cost.update(st)
            it = Iteration.from_round(
                index,
                dirty,
                st,
                dirty_rate_pps=dirty_rate,
                bandwidth_Bps=bandwidth,
                predicted_downtime_ms=predicted,
                throttle_pct=throttle,
                device_bytes=device_bytes,
            )
            r.iterations.append(it)
            r.bytes_sent += st["bytes"] + device_bytes
            self.progress(
                "iteration",
                {
                    "index": index,
                    "dirty_pages": dirty,
                    "bytes": st["bytes"],
                    "device_bytes": device_bytes,
                    "duration_ms": it.duration_ms,
                    "predicted_downtime_ms": predicted,
                },
            )

    def _engage_delta(self, dirty: int) -> str:
        """Delta pages on, sized for a round of `dirty` pages; returns what the report says. A
        grown cache the host cannot give falls back to the default size, and then, under
        --delta auto, to no delta pages (the next remedy takes over); a size the user chose
        (--delta-cache, --delta always) fails the migration with the reason instead."""
        assert self._sender is not None
        self._delta_on = True  # engaged once, whatever came of it
        mem = self.vm.config.memory
        pages = self.opts.delta_cache_pages(mem, dirty, meminfo_bytes("MemAvailable"))
        failed: OSError | None = None
        for n in dict.fromkeys((pages, self.opts.delta_cache_pages(mem))):
            try:
                self._sender.set_delta(n)
            except _core.CoreError as e:
                if e.errno != errno.ENOMEM:
                    raise
                failed = e
                continue
            return f"delta pages against a {human_bytes(n * 4096)} cache"
        assert failed is not None
        if self.opts.delta == "auto" and not self.opts.delta_cache:
            return f"delta pages off: {failed.strerror}"
        raise failed

    def _remedy(self, name: str, iteration: int, at_ms: float, detail: str) -> None:
        event = {"remedy": name, "iteration": iteration, "at_ms": round(at_ms, 1), "detail": detail}
        self.report.remedies.append(event)
        self.progress("remedy", event)

    def _limit_action(self, why: str, iteration: int, at_ms: float, predicted_ms: float) -> None:
        """The downtime limit cannot be met: stop anyway (force, the report says so) or end the
        migration with the source running (cancel)."""
        policy, r = self.opts.policy, self.report
        action = policy.limit_action
        self._remedy(f"limit action: {action}", iteration, at_ms, f"{why}; predicted downtime {predicted_ms:.1f} ms")
        if action == "cancel":
            raise LimitCancelled(
                f"cancelled: the {policy.max_downtime_ms:g} ms downtime limit cannot be met ({why}; predicted "
                f"downtime {predicted_ms:.1f} ms); --limit-action force would have stopped the guest anyway"
            )
        r.stop_reason = f"{why}; stopping anyway (limit action force, predicted {predicted_ms:.1f} ms)"
        self._stop_predicted_ms = predicted_ms

    def _stop_and_copy(self) -> None:
        sender, ctrl, r, vm = self._sender, self._ctrl, self.report, self.vm
        assert sender is not None and ctrl is not None
        self._check_cancel()
        # A throttled vCPU may be in a sleep of up to 99 slices, and the last dirty-log sync
        # stalls a busy one in write faults: a stop that lands there is an outage the guest
        # feels on top of the downtime. So the pause wakes each and lets it run again first, in
        # the same C call: the guest runs unthrottled only until its next exit (two after a
        # sleep, which can fall between the two reads of its clock), not for as long
        # as Python takes (the last round did not count those pages). A device handshake needs
        # the guest awake before that: a sleeping guest could not answer.
        woke = vm.core.unthrottle(UNTHROTTLE_TIMEOUT_MS) if self._devices else None
        self._prestop()
        self._check_cancel()
        cps = r.checkpoints
        # On a timeout the vCPUs run again (unthrottled): nothing to undo.
        vm.pause(self.opts.pause_timeout_ms, "src-downtime-start", UNTHROTTLE_TIMEOUT_MS)
        cps.append(Checkpoint("src-downtime-start", vm.core.pause_checkpoint_ns))
        woke = _both_unthrottles(woke, vm.core.pause_unthrottle)
        if woke["woken"] or woke["late"]:
            r.stop_unthrottle = woke
        self._paused_by_us = True
        cps.append(Checkpoint("src-vm-stopped", _core.checkpoint("src-vm-stopped")))
        vm.core.set_throttle(0)
        dirty = sender.collect(accumulate=True)  # devices are stopped too: their last DMA is in
        st = sender.send_round(zero_copy=True)  # vCPUs stopped: send straight from guest RAM
        cps.append(Checkpoint("src-ram-saved", _core.checkpoint("src-ram-saved")))
        device_bytes = self._send_stop_copy()
        state = vm.save_state()
        for name, blob in state.devices.items():
            ctrl.send("DEVICE", encode_device(name, blob))
        cps.append(Checkpoint("src-device-saved", _core.checkpoint("src-device-saved")))
        for i, blob in enumerate(state.vcpus):
            ctrl.send("VCPU", encode_vcpu(i, blob))
        sender.send_eos()
        ctrl.send("EOS", ctrl.tx.eos())
        if self.opts.verify:  # while the destination loads; our RAM stays as it was at stop
            t = time.monotonic_ns()
            self._local_crcs = vm.core.page_crcs()
            r.verification.digest_ms = (time.monotonic_ns() - t) / 1e6
        it = Iteration.from_round(
            len(r.iterations) + 1,
            dirty,
            st,
            dirty_rate_pps=0.0,
            bandwidth_Bps=st["bytes"] / (st["ns"] / 1e9) if st["ns"] else 0.0,
            predicted_downtime_ms=self._stop_predicted_ms,  # what the stop was chosen on
            final=True,
            device_bytes=device_bytes,
        )
        r.iterations.append(it)
        r.bytes_sent += st["bytes"] + device_bytes
        self._handshake_at_stop()
        r.devices = [
            DeviceReport(
                d.name,
                d.state_bytes,
                d.precopy,
                d.precopy_bytes,
                d.stopcopy_bytes,
                round(d.save_ms, 3),
                dma_pages_logged=d.dma_pages_logged,
                prestop_ms=d.prestop_ms,
                prestop_error=d.prestop_error,
                handshake=d.handshake,
                handshake_latency_us=d.handshake_latency_us,
            )
            for d in self._devices
        ]
        r.handshake = self._handshake_report()
        self.progress("stopped", {"final_pages": dirty, "device_bytes": device_bytes})

    # devices with a migration state machine -------------------------------------------------
    def _prestop(self) -> None:
        """The guest handshake: each device's pre-stop hook, vCPUs running, all bounded by one
        deadline computed here. Not part of the downtime; a failing hook is reported, never
        fatal. Deadline 0: each hook is called with none, so the guest is not asked (disabled)."""
        deadline_ms, cps = self.opts.handshake_deadline_ms, self.report.checkpoints
        start = _core.checkpoint("src-handshake-start")
        cps.append(Checkpoint("src-handshake-start", start))
        until = start + deadline_ms * 1_000_000 if deadline_ms else 0
        for dev in self._devices:
            dev.prestop_called = True  # before the call: a notice may be out even if it fails
            try:
                res = self.vm.core.mig_prestop(dev.name, 0, until)
            except _core.CoreError as e:
                dev.prestop_error = str(e.strerror)
                continue
            dev.prestop_ms = round((res["end_ns"] - res["start_ns"]) / 1e6, 3)
            dev.handshake = str(res["outcome"])
            dev.handshake_latency_us = int(res["latency_us"]) if dev.handshake in ("acked", "late") else None
        cps.append(Checkpoint("src-handshake-end", _core.checkpoint("src-handshake-end")))
        if self._devices:
            hs = self._handshake_report()
            self.progress(
                "handshake",
                {
                    "outcome": hs.outcome if hs else "none",
                    "latency_us": hs.latency_us if hs else None,
                    "deadline_ms": deadline_ms,
                    "ms": (cps[-1].t_ns - start) / 1e6,
                },
            )

    def _handshake_budget_ms(self) -> int:
        """What the handshake will add before the stop, at most: its deadline, if a device's
        driver takes part (it enabled the capability; a device that cannot say is assumed to)."""
        deadline = self.opts.handshake_deadline_ms
        if not deadline:
            return 0
        for dev in self._devices:
            try:
                if self.vm.core.handshake_state(dev.name)["enabled"]:
                    return deadline
            except ValueError:  # not a PCI function this binding knows: assume the worst
                return deadline
        return 0

    def _handshake_at_stop(self) -> None:
        """VM stopped: the outcome each device recorded at the stop, which is what its state
        carries. A driver that acked after the deadline (but before the stop) turned TIMEOUT
        into LATE only now."""
        for dev in self._devices:
            if dev.handshake is None:
                continue
            try:
                st = self.vm.core.handshake_state(dev.name)
            except ValueError:
                continue
            if dev.handshake == "timeout" and st["outcome"] == "late":
                dev.handshake, dev.handshake_latency_us = "late", int(st["latency_us"])

    def _handshake_report(self) -> HandshakeReport | None:
        """The report's handshake: the VF's (the worst device's, with several)."""
        done = [d for d in self._devices if d.handshake is not None]
        if not done:
            return None
        dev = max(done, key=lambda d: _OUTCOME_RANK.get(d.handshake or "none", 0))
        return HandshakeReport(
            dev.handshake or "none", dev.handshake_latency_us, self.opts.handshake_deadline_ms, dev.reset_required
        )

    def _set_device_state(self, dev: _Device, state: str) -> None:
        # An invalid request would put the device in ERROR, and only a reset (which loses the
        # guest's queues) leaves ERROR: the source's device must come through a failed migration
        # intact, so an arc the state machine lacks is refused here, before the device is asked.
        if not self.vm.core.mig_can_reach(dev.name, state):
            cur = self.vm.core.mig_state(dev.name)
            raise MigrationError(
                f"device {dev.name}: {cur} -> {state} is not a valid transition "
                "(not requested: the device keeps its state)"
            )
        try:
            self.vm.core.mig_set_state(dev.name, state)
        except _core.CoreError as e:
            raise MigrationError(f"device {dev.name}: {e.strerror}") from None

    def _read_device(self, name: str, cap: int) -> bytes | None:
        """The next piece of a device's data stream (None: nothing more in PRE_COPY for now;
        b"": the stop-copy stream is complete)."""
        try:
            return self.vm.core.mig_read(name, cap)
        except _core.CoreError as e:
            raise MigrationError(f"device {name}: {e.strerror}") from None

    def _send_device_data(self, dev: _Device, phase: int, data: bytes, last: bool = False) -> None:
        ctrl = self._ctrl
        assert ctrl is not None
        ctrl.send("DEVICE_DATA", encode_device_data(dev.name, phase, last, dev.seq, data))
        dev.seq += 1
        if phase == PHASE_PRECOPY:
            dev.precopy_bytes += len(data)
        else:
            dev.stopcopy_bytes += len(data)

    def _device_pending(self) -> int:
        """What the devices would still send at the stop: a PRE_COPY device's initial and dirty
        bytes not yet read, and the whole configured state of the others."""
        pending = 0
        for dev in self._devices:
            if dev.precopy:
                try:
                    initial, dirty = self.vm.core.mig_precopy_info(dev.name)
                except _core.CoreError as e:
                    raise MigrationError(f"device {dev.name}: {e.strerror}") from None
                pending += initial + dirty
            else:
                pending += dev.state_bytes
        return pending

    def _drain_precopy(self) -> int:
        """After a page round: send what each PRE_COPY device has now. A device that keeps
        producing is read at most for what it had pending when the drain began (and one chunk),
        so the round ends."""
        sent = 0
        for dev in self._devices:
            if not dev.precopy:
                continue
            room = device_data_room(dev.name)
            try:
                initial, dirty = self.vm.core.mig_precopy_info(dev.name)
            except _core.CoreError as e:
                raise MigrationError(f"device {dev.name}: {e.strerror}") from None
            budget, read = max(initial + dirty, room), 0
            while read < budget:
                self._check_cancel()
                data = self._read_device(dev.name, room)
                if not data:
                    break
                self._send_device_data(dev, PHASE_PRECOPY, data)
                read += len(data)
            sent += read
        return sent

    def _send_stop_copy(self) -> int:
        """VM stopped: every device to STOP_COPY (a PRE_COPY one is there already: the pause
        moved it), then its whole remaining stream, the last chunk flagged."""
        sent = 0
        for dev in self._devices:
            t = time.monotonic_ns()
            if self.vm.core.mig_state(dev.name) != DEVICE_STOP_STATE:
                self._set_device_state(dev, DEVICE_STOP_STATE)
            room = device_data_room(dev.name)
            held: bytes | None = None  # the chunk read last: sent once we know if it ends the stream
            while True:
                data = self._read_device(dev.name, room)
                if data is None:
                    raise MigrationError(f"device {dev.name}: its stop-copy stream stalled (no data, no end)")
                if not data:
                    break
                if held is not None:
                    self._send_device_data(dev, PHASE_STOPCOPY, held)
                held = data
            self._send_device_data(dev, PHASE_STOPCOPY, held or b"", last=True)
            sent += dev.stopcopy_bytes
            dev.save_ms = (time.monotonic_ns() - t) / 1e6
            dev.dma_pages_logged = self.vm.core.dma_pages_logged(dev.name)
        return sent

    def _wait_resumed(self) -> None:
        ctrl = self._ctrl
        assert ctrl is not None
        if self._local_crcs is not None:
            self._verify(ctrl.expect("PAGE_HASHES", self.opts.resume_timeout_s, max_len=len(self._local_crcs)))
        ctrl.expect("READY", self.opts.resume_timeout_s)
        # A destination that gave up after READY (no GO in time: this side was stalled) said so
        # already; committing now would leave the guest running nowhere.
        if select.select([ctrl.sock], [], [], 0)[0]:
            name, _ = ctrl.recv(self.opts.resume_timeout_s)  # an ERROR raises PeerReported
            raise MigrationError(f"control channel: unexpected {name} from {ctrl.peer} after READY")
        # The commit point. From here the source never resumes: if GO is lost the destination
        # discards the guest, and the migration fails with the guest stopped on both sides
        # rather than running on two.
        self._paused_by_us = False
        self._committed = True
        try:
            ctrl.send("GO")
            doc = json.loads(ctrl.expect("RESUMED", self.opts.resume_timeout_s))
            names = ("dst-ram-loaded", "dst-device-loaded", "dst-vm-started")
            cps = [Checkpoint(n, int(doc["checkpoints"][n])) for n in names]
        except PeerReported as e:
            # The destination sends ERROR only before it starts a guest (after that it only
            # reports), so this one never ran there: the commit did not happen, and the source
            # takes its guest back.
            self._committed, self._paused_by_us = False, True
            raise MigrationError(f"{e}; the destination never started the guest") from None
        except (VfmigError, ValueError, KeyError, TypeError) as e:
            why = str(e) if isinstance(e, VfmigError) else f"malformed RESUMED record ({type(e).__name__}: {e})"
            raise CommitError(f"{why}; {IN_DOUBT}") from None
        self.report.checkpoints += cps
        self.report.destination = {k: v for k, v in doc.items() if k not in ("checkpoints", "devices")}
        loaded = doc.get("devices")
        ours = {d.name: d for d in self._devices}
        for dev in self.report.devices:
            got = loaded.get(dev.name) if isinstance(loaded, dict) else None
            if not isinstance(got, dict):
                continue
            load_ms = got.get("load_ms")
            dev.load_ms = float(load_ms) if isinstance(load_ms, (int, float)) else None
            # What the destination told its driver after the load (the VMM status it set).
            reset = got.get("reset_required")
            dev.reset_required = ours[dev.name].reset_required = reset if isinstance(reset, bool) else None
        self.report.handshake = self._handshake_report()
        self.progress("resumed", {"on": self.to})

    def _verify(self, remote: bytes) -> None:
        """Before the commit: the destination's RAM after its final load against ours at stop.
        A mismatch fails the migration while the source can still resume."""
        local, r = self._local_crcs, self.report
        assert local is not None
        if len(remote) != len(local):
            raise MigrationError(f"PAGE_HASHES has {len(remote)} bytes, expected {len(local)}")
        bad = _core.count_mismatches(local, remote)
        r.verification.memory_match = bad == 0
        r.verification.mismatched_pages = bad
        r.verification.method = (
            "CRC32C of every page: source RAM at stop vs destination RAM after its final load, before the commit"
        )
        if bad:
            first = next(i for i in range(0, len(local), 4) if local[i : i + 4] != remote[i : i + 4]) // 4
            raise MigrationError(
                f"verification failed: {bad} page(s) differ between source and destination "
                f"(first at GPA {self.vm.core.page_gpa(first):#x}); the destination discards its copy"
            )

    def _complete(self) -> None:
        """After the destination runs: verification and the guest's view, outside the downtime."""
        ctrl, r = self._ctrl, self.report
        assert ctrl is not None and self._sender is not None
        try:
            guest = json.loads(ctrl.expect("GUEST", self.opts.guest_report_timeout_s))
        finally:
            # Only now: ending dirty logging on a large VM is milliseconds of CPU, and on a
            # shared host it would compete with the destination's vCPUs as they start (the
            # paused source dirties nothing meanwhile).
            r.tracker_stats = self._sender.tracker_stats()
            self._sender.stop_tracking()
        packets = guest.pop("packets", None)
        driver = guest.pop("vf_handshake", None)
        r.destination.update(guest)
        if isinstance(driver, dict):
            r.guest.driver_resets = driver.get("resets")
            r.guest.driver_resumed_in_place = driver.get("resumed_in_place")
        if isinstance(packets, dict):
            r.guest.packets_received = packets.get("received")
            r.guest.packets_dropped = packets.get("dropped")
            r.guest.packet_errors = packets.get("errors")
            r.guest.tx_packets = packets.get("tx")
        start, end = r.checkpoint("src-downtime-start"), r.checkpoint("dst-vm-started")
        # Per vCPU, the logged clock gap that spans the downtime window. Downtime ends when the
        # first vCPU runs again, so the guest's figure is the shortest; the longest says how long
        # the last vCPU waited to be scheduled.
        seen = []
        for vcpu_gaps in guest.get("gaps", []):
            spans = [g[1] for g in vcpu_gaps if g[0] <= end and g[0] + g[1] >= start]
            if spans:
                seen.append(max(spans))
        if seen:
            r.guest_observed_downtime_ms = min(seen) / 1e6
            r.guest_observed_downtime_max_ms = max(seen) / 1e6
            r.downtime_difference = _explain_difference(
                r, guest.get("gaps", []), start, end, _clock_granularity(self.vm, r.destination)
            )

    # failure handling -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _watch_destination(self) -> Iterator[None]:
        """While pages flow the destination has nothing to say; if it speaks (an ERROR) or
        hangs up, stop sending at once instead of filling a channel nobody reads."""
        ctrl = self._ctrl
        assert ctrl is not None
        wake_r, wake_w = os.pipe()

        def watch() -> None:
            ready = select.select([ctrl.sock.fileno(), wake_r], [], [])[0]
            if ctrl.sock.fileno() in ready and self._sender is not None:
                self._sender.cancel()
                for s in self._chans:
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)

        th = threading.Thread(target=watch, name="vfmig-watch", daemon=True)
        th.start()
        try:
            yield
        finally:
            os.write(wake_w, b"x")
            th.join()
            os.close(wake_r)
            os.close(wake_w)

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise MigrationError("migration cancelled")

    def _peer_reason(self, e: BaseException) -> str | None:
        """When sending failed, the destination usually said why on the control channel."""
        if self._ctrl is None or isinstance(e, (PeerReported, CommitError)) or self._cancel.is_set():
            return None
        if not isinstance(e, (_core.StreamError, OSError, PeerError)):
            return None
        # A failed control send (the peer hung up) may have an ERROR waiting; a timeout does not.
        if isinstance(e, PeerError) and not select.select([self._ctrl.sock], [], [], 0)[0]:
            return None
        try:
            name, _ = self._ctrl.recv(timeout=2.0)
        except PeerReported as pe:
            return str(pe)
        except PeerError as pe:
            # The watcher stopped the sender because the destination hung up: say so, not "cancelled".
            return str(pe) if isinstance(e, _core.StreamError) and "cancelled" in str(e) else None
        except VfmigError:
            return None
        # The watcher stopped the sender because the destination spoke out of turn.
        return f"{self._ctrl.peer} sent an unexpected {name} record"

    def _abort(self) -> str | None:
        """Leave the source exactly as it was: tracking off, throttle off, vCPUs running. Each
        step runs even if an earlier one failed. Returns why the source is not running again,
        if it should be and is not."""
        sender, ctrl = self._sender, self._ctrl
        steps: list[Callable[[], object]] = []
        if sender is not None:
            steps.append(sender.cancel)
        if ctrl is not None:
            steps.append(lambda: ctrl.send("ERROR", b"source aborted the migration"))
        steps += [functools.partial(s.shutdown, socket.SHUT_RDWR) for s in self._chans]  # unblocks the peer
        if sender is not None:
            steps.append(sender.stop_tracking)
        steps.append(lambda: self.vm.core.set_throttle(0))
        # A device the migration broke (ERROR) is reset first: resuming needs it out of ERROR.
        steps += [functools.partial(self._device_out_of_error, d) for d in self._devices]
        if self._paused_by_us:
            steps.append(self.vm.resume)  # devices in STOP or STOP_COPY run again with the VM
        steps += [functools.partial(self._device_running, d) for d in self._devices]  # PRE_COPY
        # The guest was told a stop is coming: tell it the migration is off, so its driver
        # resumes its queues (a device that ran again may have done so already; a second call
        # raises nothing). Not after the commit: that source stays paused, and if it is ever
        # resumed its devices withdraw the notice as they start.
        if not self._committed:
            told = [d.name for d in self._devices if d.prestop_called]
            steps += [functools.partial(self.vm.core.mig_prestop_abort, name) for name in told]
        first: BaseException | None = None
        for step in steps:
            try:
                step()
            except (VfmigError, OSError, ValueError) as e:  # CoreError and StreamError are OSErrors
                first = first or e
        stuck = self._paused_by_us and self.vm.paused
        self._paused_by_us = False
        if stuck:
            return f"the source VM could not be resumed: {first}"
        notes = [
            f"device {name} was reset (only a reset leaves ERROR): it runs again with empty queues"
            for name in self._reset_devices
        ]
        devices = self._devices_not_running()
        if devices:
            notes.append(f"device(s) not running again: {devices}")
        return "; ".join(notes) or None

    def _device_out_of_error(self, dev: _Device) -> None:
        if self.vm.core.mig_state(dev.name) == "ERROR":
            self.vm.core.mig_reset(dev.name)
            self._reset_devices.append(dev.name)

    def _device_running(self, dev: _Device) -> None:
        if not self.vm.paused and self.vm.core.mig_state(dev.name) != "RUNNING":
            self.vm.core.mig_set_state(dev.name, "RUNNING")

    def _devices_not_running(self) -> str:
        if self.vm.paused:
            return ""
        states = {d.name: self.vm.core.mig_state(d.name) for d in self._devices}
        return ", ".join(f"{n} is {st}" for n, st in states.items() if st != "RUNNING")

    def _close(self) -> None:
        if self._sender is not None:
            self._sender.close()
            self._sender = None
        for s in self._chans:
            s.close()
        self._chans.clear()
        if self._ctrl is not None:
            self._ctrl.close()
            self._ctrl = None


def _clock_granularity(vm: MicroVM, dst: dict[str, Any]) -> tuple[int, float] | None:
    """(pages, ms): how often a full-speed dirtier read its clock on the destination, per vCPU,
    from its counter there. None for a rate-limited guest: it reads its clock while it waits."""
    p = vm.config.params
    moved = dst.get("touches_after", 0) - dst.get("touches_at_resume", 0)
    if vm.config.guest != "dirtier" or p.rate_pps or moved <= 0 or not dst.get("ran_s"):
        return None
    return p.clock_pages, p.clock_pages / (moved / dst["ran_s"] / vm.config.vcpus) * 1e3


def _explain_difference(
    r: Report,
    gaps: list[list[list[int]]],
    start: int | None,
    end: int | None,
    clock: tuple[int, float] | None = None,
) -> str | None:
    """Why the guest's outage differs from the engine's stop-to-start window, from where the
    first vCPU's gap began and ended around that window; None when they agree. `clock`: the
    guest's clock-read granularity (pages, ms), when known: a side within one and a half reads
    of the window is the guest's own resolution, not an outage."""
    engine, guest = r.downtime_ms, r.guest_observed_downtime_ms
    if engine is None or guest is None or start is None or end is None:
        return None
    if abs(guest - engine) <= max(DOWNTIME_AGREE_MS, DOWNTIME_AGREE_FRACTION * engine):
        return None
    spans = [g for vcpu in gaps for g in vcpu if g[0] <= end and g[0] + g[1] >= start]
    if not spans:
        return None
    first = min(spans, key=lambda g: g[1])  # the gap of the first vCPU to run again
    before, after = (start - first[0]) / 1e6, (first[0] + first[1] - end) / 1e6
    why = []
    reads = f"it reads its clock every {clock[0]} page(s), about every {clock[1]:.1f} ms at full speed" if clock else ""

    def within(ms: float) -> bool:
        return clock is not None and ms <= 1.5 * clock[1]

    woke = r.stop_unthrottle or {}
    if before > DOWNTIME_AGREE_MS and within(before) and not woke.get("late"):
        why.append(f"its last clock read came {before:.1f} ms before the stop ({reads})")
    elif before > DOWNTIME_AGREE_MS:
        cause = (
            "in a throttle sleep or write faults the stop could not wait out"
            if woke.get("late")
            else "its last clock read before the stop, or not scheduled on the host, or halted"
        )
        why.append(f"its vCPU had last run {before:.1f} ms before the stop ({cause})")
    if after > DOWNTIME_AGREE_MS and within(after):
        why.append(f"its first clock read came {after:.1f} ms after the destination started it ({reads})")
    elif after > DOWNTIME_AGREE_MS:
        why.append(f"it ran {after:.1f} ms after the destination started it (scheduling delay there)")
    return (
        f"the guest saw {guest:.1f} ms against the engine's {engine:.1f} ms: " + "; ".join(why)
        if why
        else f"the guest saw {guest:.1f} ms against the engine's {engine:.1f} ms"
    )


def _describe(e: BaseException) -> str:
    if isinstance(e, _core.StreamError):
        return str(e.strerror)
    return f"{type(e).__name__}: {e}"


def migrate(vm: MicroVM, to: str, options: MigrationOptions | None = None, progress: Progress | None = None) -> Report:
    """Live-migrate a running MicroVM to a destination listening at `to` (tcp://HOST:PORT)."""
    return Migration(vm, to, options, progress).run()
