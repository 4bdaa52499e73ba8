"""The migration report: one typed record per migration, as JSON and as a readable summary."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from vfmig.report.probes import ProbeReport
from vfmig.units import human_bytes

# Checkpoint names follow QEMU's (README, Measurement). The guest handshake comes before the
# downtime: the vCPUs run while it waits.
CHECKPOINTS = (
    "src-handshake-start",
    "src-handshake-end",
    "src-downtime-start",
    "src-vm-stopped",
    "src-ram-saved",
    "src-device-saved",
    "dst-ram-loaded",
    "dst-device-loaded",
    "dst-vm-started",
)


@dataclass
class Iteration:
    index: int
    dirty_pages: int  # pages found dirty at the start of this round (all of RAM in round 1)
    pages_sent: int
    zero_pages: int
    bytes: int
    duration_ms: float
    dirty_rate_pps: float  # dirtied since the previous round, per second
    bandwidth_Bps: float
    predicted_downtime_ms: float
    throttle_pct: int = 0
    final: bool = False  # the stop-and-copy round, with vCPUs stopped
    device_bytes: int = 0  # device state sent in DEVICE_DATA records after this round's pages
    # How the round's pages went: raw + delta + zero = pages_sent; zstd counts pages in compressed
    # records. bytes_in is the non-zero pages before encoding (4 KiB each); bytes is after.
    raw_pages: int = 0
    delta_pages: int = 0
    zstd_pages: int = 0
    bytes_in: int = 0
    cache_lookups: int = 0  # re-sent non-zero pages while delta pages were on
    cache_hit_rate: float | None = None  # of those, the share whose last copy was in the cache
    delta_fallbacks: int = 0  # hits whose delta was not smaller than the page: sent raw
    records: int = 0  # PAGES records (runs of contiguous pages of one encoding)

    @classmethod
    def from_round(cls, index: int, dirty: int, st: dict[str, int], **kw: Any) -> Iteration:
        """A round as PageSender.send_round counted it."""
        return cls(
            index,
            dirty,
            st["pages"],
            st["zero_pages"],
            st["bytes"],
            st["ns"] / 1e6,
            raw_pages=st["raw_pages"],
            delta_pages=st["delta_pages"],
            zstd_pages=st["zstd_pages"],
            bytes_in=st["bytes_in"],
            cache_lookups=st["cache_lookups"],
            cache_hit_rate=st["cache_hits"] / st["cache_lookups"] if st["cache_lookups"] else None,
            delta_fallbacks=st["delta_fallbacks"],
            records=st["records"],
            **kw,
        )


@dataclass
class Checkpoint:
    name: str
    t_ns: int


@dataclass
class Verification:
    memory_match: bool | None
    method: str
    mismatched_pages: int = 0
    digest_ms: float = 0.0  # hashing the source's RAM at stop, while the destination loads: inside the downtime


@dataclass
class DeviceReport:
    """A device that migrated through its state machine (DEVICE_DATA records)."""

    name: str
    state_bytes: int = 0  # its configured state size
    precopy: bool = False  # it streamed in PRE_COPY while the VM ran
    precopy_bytes: int = 0
    stopcopy_bytes: int = 0  # sent with the VM stopped: inside the downtime
    save_ms: float = 0.0  # source: STOP_COPY and reading and sending its stop-copy stream
    load_ms: float | None = None  # destination: writing its stream and RESUMING -> STOP (validate, apply)
    dma_pages_logged: int | None = None  # pages its DMA dirty log reported during the migration
    prestop_ms: float | None = None  # its pre-stop hook, vCPUs running, just before the stop
    prestop_error: str | None = None  # what the hook said if it failed (the migration went on)
    # The guest handshake of its pre-stop hook: acked, timeout, late (acked after the deadline,
    # known once the VM stopped), disabled (deadline 0, or the driver never enabled it), or none.
    handshake: str | None = None
    handshake_latency_us: int | None = None  # acked or late: from the interrupt to the ack
    reset_required: bool | None = None  # what the destination told its driver after the load

    def summary(self) -> str:
        pre = f"precopy {human_bytes(self.precopy_bytes)}, " if self.precopy else "no precopy, "
        load = f"{self.load_ms:.2f} ms" if self.load_ms is not None else "?"
        dma = f"; DMA log {self.dma_pages_logged:,} pages" if self.dma_pages_logged is not None else ""
        return (
            f"{self.name}: state {human_bytes(self.state_bytes)}; {pre}stop-copy {human_bytes(self.stopcopy_bytes)}; "
            f"save {self.save_ms:.2f} ms, load {load}{dma}"
        )


@dataclass
class GuestReport:
    """The guest program, and the packets its VF driver counted on the destination after the
    migration (None without a VF driver)."""

    program: str = ""
    packets_received: int | None = None
    packets_dropped: int | None = None  # sequence gaps the driver saw, each explained by a device drop
    packet_errors: int | None = None  # bad packets, or gaps no drop explains: must stay 0
    tx_packets: int | None = None
    # The driver after the load: it reset its device (not quiesced at the stop) or resumed in place.
    driver_resets: int | None = None
    driver_resumed_in_place: int | None = None

    @classmethod
    def from_doc(cls, doc: object) -> GuestReport:
        if isinstance(doc, str):  # reports written before the guest became an object
            return cls(doc)
        return cls(**doc) if isinstance(doc, dict) else cls()


HANDSHAKE_OUTCOMES = ("acked", "timeout", "late", "disabled", "none")  # best first, for the summary


@dataclass
class HandshakeReport:
    """The guest handshake before the stop (issue 8), for the VF: the device whose outcome was
    the worst when a VM has several (devices[] has each one's)."""

    outcome: str = "none"  # acked, timeout, late, disabled; none: no device has the hook
    latency_us: int | None = None  # acked (or late): from raising the interrupt to the guest's ack
    deadline_ms: int = 0  # one deadline for the whole pre-stop phase, all devices
    reset_required: bool | None = None  # the destination told its driver to reset (not quiesced)

    def summary(self) -> str:
        """One line: "acked in 312 us (deadline 50 ms)", "timeout at 50 ms: the destination's
        driver resets", ..."""
        if self.outcome == "acked":
            line = f"acked in {self.latency_us or 0} us (deadline {self.deadline_ms} ms)"
        elif self.outcome == "timeout":
            line = f"timeout at {self.deadline_ms} ms"
        elif self.outcome == "late":
            line = f"late: no ack by the {self.deadline_ms} ms deadline, one came before the stop (a timeout)"
        elif self.outcome == "disabled":
            why = "deadline 0" if self.deadline_ms == 0 else "the driver did not enable the capability"
            line = f"disabled ({why})"
        else:
            line = self.outcome
        if self.reset_required:
            line += ": the destination's driver resets"
        return line


@dataclass
class DowntimeBreakdown:
    """Where the downtime went, from the checkpoints (ms)."""

    stop_vcpus_ms: float = 0.0
    final_ram_ms: float = 0.0
    device_state_ms: float = 0.0
    to_destination_ms: float = 0.0  # vCPU state, end of stream, loading RAM at the destination
    dst_device_load_ms: float = 0.0
    dst_start_ms: float = 0.0


@dataclass
class Report:
    status: str  # "completed", "failed", "cancelled", or "in_doubt" (lost contact after the commit)
    error: str | None = None
    memory: int = 0
    vcpus: int = 0
    guest: GuestReport = field(default_factory=GuestReport)
    tracker: str = ""
    channels: int = 1
    max_downtime_ms: float = 0.0
    downtime_limit_ms: float = 0.0  # the same limit, under the name the convergence report uses
    # True when the downtime (the engine's or the guest's, whichever is longer) went past it.
    downtime_limit_exceeded: bool | None = None
    limit_action: str = ""  # what the policy does when the limit cannot be met: force or cancel
    remedies: list[dict[str, Any]] = field(default_factory=list)  # {remedy, iteration, at_ms, detail}, in order
    bandwidth_limit_Bps: int = 0
    stop_reason: str = ""
    total_time_ms: float = 0.0
    setup_ms: float = 0.0
    downtime_ms: float | None = None
    guest_observed_downtime_ms: float | None = None  # the first vCPU to run again
    guest_observed_downtime_max_ms: float | None = None  # the last one
    # Why the guest's figure differs from the engine's (by over max(1 ms, 10%)); None when they agree.
    downtime_difference: str | None = None
    # Throttle sleeps cut short before the stop: {woken, late, longest_sleep_ms}; None if none.
    stop_unthrottle: dict[str, float] | None = None
    bytes_sent: int = 0
    throughput_Bps: float = 0.0
    iterations: list[Iteration] = field(default_factory=list)
    checkpoints: list[Checkpoint] = field(default_factory=list)
    downtime_breakdown: DowntimeBreakdown = field(default_factory=DowntimeBreakdown)
    verification: Verification = field(default_factory=lambda: Verification(None, "not requested"))
    tracker_stats: dict[str, int] = field(default_factory=dict)
    devices: list[DeviceReport] = field(default_factory=list)
    handshake: HandshakeReport | None = None  # None: no device with a pre-stop hook
    destination: dict[str, Any] = field(default_factory=dict)
    probes: ProbeReport | None = None  # what the kernel saw (MigrationOptions.probes)

    def _limit_lines(self) -> list[str]:
        lines = [f"  remedy        round {m['iteration']}: {m['remedy']} ({m['detail']})" for m in self.remedies]
        if self.downtime_limit_exceeded:
            worst = max(d for d in (self.downtime_ms, self.guest_observed_downtime_ms) if d is not None)
            lines.append(
                f"  WARNING       the downtime ({worst:.1f} ms) exceeded the {self.downtime_limit_ms:g} ms limit "
                f"(limit action {self.limit_action or '?'})"
            )
        return lines

    def checkpoint(self, name: str) -> int | None:
        for c in self.checkpoints:
            if c.name == name:
                return c.t_ns
        return None

    def finish_timings(self) -> None:
        """Derive downtime and its breakdown from the checkpoints."""
        t = {c.name: c.t_ns for c in self.checkpoints}

        def span(a: str, b: str) -> float:
            return (t[b] - t[a]) / 1e6 if a in t and b in t else 0.0

        if "src-downtime-start" in t and "dst-vm-started" in t:
            self.downtime_ms = span("src-downtime-start", "dst-vm-started")
        self.downtime_breakdown = DowntimeBreakdown(
            stop_vcpus_ms=span("src-downtime-start", "src-vm-stopped"),
            final_ram_ms=span("src-vm-stopped", "src-ram-saved"),
            device_state_ms=span("src-ram-saved", "src-device-saved"),
            to_destination_ms=span("src-device-saved", "dst-ram-loaded"),
            dst_device_load_ms=span("dst-ram-loaded", "dst-device-loaded"),
            dst_start_ms=span("dst-device-loaded", "dst-vm-started"),
        )

    def judge_limit(self) -> None:
        """Whether the stop broke the downtime limit, by the longer of the engine's and the
        guest's figures (the guest's is what it felt)."""
        seen = [d for d in (self.downtime_ms, self.guest_observed_downtime_ms) if d is not None]
        if seen and self.downtime_limit_ms:
            self.downtime_limit_exceeded = max(seen) > self.downtime_limit_ms

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Report:
        nested = (
            "iterations",
            "checkpoints",
            "downtime_breakdown",
            "verification",
            "guest",
            "devices",
            "handshake",
            "probes",
        )
        r = cls(**{k: v for k, v in doc.items() if k not in nested})
        r.guest = GuestReport.from_doc(doc.get("guest"))
        r.devices = [DeviceReport(**d) for d in doc.get("devices", [])]
        hs = doc.get("handshake")
        r.handshake = HandshakeReport(**hs) if isinstance(hs, dict) else None  # None also in older reports
        pr = doc.get("probes")
        r.probes = ProbeReport.from_dict(pr) if isinstance(pr, dict) else None
        r.iterations = [Iteration(**i) for i in doc.get("iterations", [])]
        r.checkpoints = [Checkpoint(**c) for c in doc.get("checkpoints", [])]
        r.downtime_breakdown = DowntimeBreakdown(**doc.get("downtime_breakdown", {}))
        r.verification = Verification(**doc.get("verification", {"memory_match": None, "method": "not requested"}))
        return r

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def summary(self) -> str:
        lines = [f"migration {self.status}" + (f": {self.error}" if self.error else "")]
        lines.append(
            f"  VM            {self.guest.program}, {self.memory >> 20} MiB, {self.vcpus} vCPU(s); "
            f"tracker {self.tracker}, {self.channels} channel(s)"
        )
        if self.status != "completed":
            return "\n".join(lines + ["  " + ln for ln in (self.probes.summary_lines() if self.probes else [])])
        lines += [
            f"  total         {self.total_time_ms:.1f} ms (setup {self.setup_ms:.1f} ms), stop: {self.stop_reason}",
            f"  downtime      {self.downtime_ms:.2f} ms (limit {self.max_downtime_ms:g} ms)"
            + (
                f"; guest saw {self.guest_observed_downtime_ms:.2f} ms"
                if self.guest_observed_downtime_ms is not None
                else ""
            ),
            *([f"  difference    {self.downtime_difference}"] if self.downtime_difference else []),
            *self._limit_lines(),
            f"  sent          {human_bytes(self.bytes_sent)} at {human_bytes(self.throughput_Bps)}/s",
            "  iterations    #    dirty      sent      zero     delta        bytes       ms   dirty/s"
            "          B/s  cache hit",
        ]
        for it in self.iterations:
            hit = f"{it.cache_hit_rate:>6.0%}" if it.cache_hit_rate is not None else "     -"
            # Every column starts with a space: a wide figure shifts the line, never runs into its neighbour.
            lines.append(
                f"              {it.index:>3}{'*' if it.final else ' '} {it.dirty_pages:>8} {it.pages_sent:>9}"
                f" {it.zero_pages:>9} {it.delta_pages:>9} {human_bytes(it.bytes):>12} {it.duration_ms:>8.1f}"
                f" {it.dirty_rate_pps:>9.0f} {human_bytes(it.bandwidth_Bps) + '/s':>12}   {hit}"
            )
        b = self.downtime_breakdown
        lines.append(
            f"  downtime by   stop {b.stop_vcpus_ms:.2f} | final RAM {b.final_ram_ms:.2f} | devices "
            f"{b.device_state_ms:.2f} | to dst {b.to_destination_ms:.2f} | dst devices {b.dst_device_load_ms:.2f}"
            f" | start {b.dst_start_ms:.2f} ms"
        )
        for dev in self.devices:
            lines.append(f"  device        {dev.summary()}")
        if self.handshake is not None:
            lines.append(f"  handshake     {self.handshake.summary()}")
        g = self.guest
        if g.packets_received is not None:
            lines.append(
                f"  packets       destination guest: received {g.packets_received:,}, dropped {g.packets_dropped:,}, "
                f"errors {g.packet_errors:,}; sent {g.tx_packets:,}"
            )
        v = self.verification
        if v.memory_match is not None:
            lines.append(
                f"  verify        memory {'matches' if v.memory_match else 'DIFFERS'} "
                f"({v.mismatched_pages} pages differ; {v.method}; hashing took {v.digest_ms:.0f} ms here and "
                f"{self.destination.get('verify_hash_ms', 0):.0f} ms there, inside the downtime)"
            )
        d = self.destination
        if "touches_after" in d:
            lines.append(
                f"  destination   guest counter {d['touches_at_resume']:,} -> {d['touches_after']:,} "
                f"after {d['ran_s']:.1f} s; wrap edges per vCPU {d['wrap_edges']}"
            )
        if self.probes is not None:
            lines += ["  " + ln for ln in self.probes.summary_lines()]
        return "\n".join(lines)
