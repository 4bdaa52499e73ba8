"""The `probes` section of a report: what the kernel saw, and how it was watched."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


def slot_bounds(i: int) -> tuple[int, int]:
    """The values bcc's bpf_log2l() puts in slot i: it returns floor(log2(v)) + 1 for v >= 1
    and 1 for 0, so slot 1 holds 0 and 1, slot i >= 2 holds 2^(i-1) .. 2^i - 1 (slot 0 none)."""
    if i <= 1:
        return (0, 1) if i == 1 else (0, 0)
    return (1 << (i - 1), (1 << i) - 1)


def log2_buckets(slots: dict[int, int]) -> list[list[int]]:
    """bcc log2 slots -> [[low, high, count], ...] in the histogram's unit, empty ones left out."""
    return [[*slot_bounds(i), slots[i]] for i in sorted(slots) if slots[i]]


def bucket_quantile(buckets: list[list[int]], q: float) -> list[int] | None:
    """The [low, high] bucket that holds quantile q (0..1) of the samples."""
    total = sum(b[2] for b in buckets)
    if not total:
        return None
    seen = 0
    for lo, hi, n in buckets:
        seen += n
        if seen >= q * total:
            return [lo, hi]
    return buckets[-1][:2]


@dataclass
class Histogram:
    """A log2 histogram (µs) for one process, vector and stage."""

    what: str  # e.g. "irq handled", "irq delivered", "handshake ack", "vCPU out of guest"
    pid: int
    total: int
    buckets: list[list[int]]  # [[low_us, high_us, count], ...]
    vector: int | None = None  # guest interrupt vector
    apic: int | None = None  # the local APIC (vCPU) it was sent to: vectors are per APIC
    device: str | None = None  # the raising function (bus:dev.fn) and its MSI-X entry, when known
    entry: int | None = None

    def summary(self) -> str:
        med, p99 = bucket_quantile(self.buckets, 0.5), bucket_quantile(self.buckets, 0.99)
        where = f" vector {self.vector:#x}" if self.vector is not None else ""
        if self.apic is not None:
            where += f" on APIC {self.apic}"
        if self.device is not None:
            where += f" ({self.device} entry {self.entry})"
        if med is None or p99 is None:
            return f"{self.what}{where}: none"
        return f"{self.what}{where}: {self.total:,}, median {med[0]}-{med[1]} us, p99 {p99[0]}-{p99[1]} us"


@dataclass
class ProbeReport:
    """Everything here was measured by the kernel (BPF or tracefs), not by the engine."""

    backend: str  # "bcc", "tracefs" or "none"
    attached: list[dict[str, str]] = field(default_factory=list)  # {event, method, point}
    unavailable: list[dict[str, str]] = field(default_factory=list)  # {event, reason}
    silent: list[str] = field(default_factory=list)  # attached, but never fired for the watched processes
    error: str | None = None  # why nothing was measured (then every figure below is None)
    pids: dict[str, int] = field(default_factory=dict)  # source, destination
    downtime_ms: float | None = None
    downtime_source: str | None = None
    overlap_ms: float | None = None  # the destination ran guest code before the source stopped
    per_vcpu_gap_ms: list[float] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)  # {name, pid, t_ms} from the first
    checkpoint_deltas_ms: list[dict[str, Any]] = field(default_factory=list)  # {from, to, ms}
    histograms: list[Histogram] = field(default_factory=list)
    irq_counts: dict[str, int] = field(default_factory=dict)
    handshake: dict[str, Any] | None = None
    overhead: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> ProbeReport:
        r = cls(**{k: v for k, v in doc.items() if k != "histograms"})
        r.histograms = [Histogram(**h) for h in doc.get("histograms", [])]
        return r

    def summary_lines(self) -> list[str]:
        if self.error:
            return [f"probes        none: {self.error}"]
        lines = []
        if self.downtime_ms is not None:
            per = ", ".join(f"{g:.2f}" for g in self.per_vcpu_gap_ms)
            lines.append(
                f"probes        kernel saw downtime {self.downtime_ms:.2f} ms (per vCPU {per or '?'}); "
                f"from {self.downtime_source}"
            )
        elif self.overlap_ms is not None:
            lines.append(
                f"probes        OVERLAP: the destination ran {self.overlap_ms:.2f} ms before the source stopped"
            )
        else:
            lines.append("probes        kernel downtime: no guest execution seen on both sides")
        role = {pid: f"{name}: " for name, pid in self.pids.items()}
        for h in self.histograms:
            if h.what != "vCPU out of guest":
                lines.append(f"              {role.get(h.pid, '')}{h.summary()}")
        if self.handshake:
            hs = self.handshake
            lines.append(
                f"              handshake: raised {hs.get('raised', 0)}, acked {hs.get('acks', 0)}, "
                f"past deadline {hs.get('acks_past_deadline', 0)}, timeouts {hs.get('outcomes', {}).get('timeout', 0)}"
            )
        o = self.overhead
        if o:
            lines.append(
                f"              probe cost {o.get('probe_cpu_ms', 0):.1f} ms CPU over {o.get('probe_runs', 0):,} runs "
                f"({o.get('cpu_share_pct', 0):.2f}% of the CPUs while attached)"
            )
        if self.silent:
            lines.append(f"              attached but silent: {', '.join(self.silent)}")
        if self.unavailable:
            lines.append(
                "              unavailable: " + "; ".join(f"{u['event']} ({u['reason']})" for u in self.unavailable)
            )
        return lines
