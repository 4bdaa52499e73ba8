"""When each vCPU thread ran guest code, and the downtime that follows from it.

The BPF probes and the tracefs fallback both produce ``RunRecord``s (one per thread and
source of evidence); this module turns them into the downtime the kernel saw. A source
process's last guest exit to a destination process's first guest entry is the outage; a
destination that entered its guest before the source's last exit is reported as an overlap,
never as a small downtime."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# Sources of evidence, best first (the order in bpf/downtime.bpf.c).
KVM_ENTRY, KVM_RUN, UEXIT = 0, 1, 2
SOURCE_NAMES = {
    KVM_ENTRY: "kvm:kvm_entry/kvm_exit (each VM entry and exit)",
    KVM_RUN: "raw_syscalls enter/exit of ioctl(KVM_RUN) on vCPU threads",
    UEXIT: "kvm:kvm_userspace_exit (returns only: an upper bound)",
}

_VCPU_COMM = (re.compile(r"^vcpu(\d+)$"), re.compile(r"^CPU (\d+)/KVM$"))


@dataclass
class RunRecord:
    tid: int
    tgid: int
    source: int
    comm: str
    first_entry: int = 0  # ns, CLOCK_MONOTONIC; 0: never seen
    last_entry: int = 0
    first_exit: int = 0
    last_exit: int = 0
    runs: int = 0
    max_gap_ns: int = 0


@dataclass(frozen=True)
class Side:
    """One VM's vCPU threads: those of `pid` that ran guest code, limited to `tids` when
    given (a process that holds more than one VM, as in-process tests do), minus `exclude`."""

    pid: int
    tids: frozenset[int] | None = None
    exclude: frozenset[int] = frozenset()

    def has(self, r: RunRecord) -> bool:
        return r.tgid == self.pid and r.tid not in self.exclude and (self.tids is None or r.tid in self.tids)


@dataclass
class KernelDowntime:
    source: int
    downtime_ms: float | None  # None with an overlap or no evidence
    per_vcpu_gap_ms: list[float]  # by vCPU index, where both sides have that vCPU
    last_source_exit_ns: int
    first_destination_entry_ns: int
    overlap_ms: float | None = None  # the destination ran guest code before the source stopped

    @property
    def source_name(self) -> str:
        return SOURCE_NAMES[self.source]


def vcpu_index(comm: str) -> int | None:
    """vfmig names its vCPU threads vcpuN; QEMU (with debug-threads=on) CPU N/KVM."""
    for rx in _VCPU_COMM:
        m = rx.match(comm)
        if m:
            return int(m.group(1))
    return None


def _first_in(r: RunRecord) -> int:
    # kvm_userspace_exit sees returns only: the first return bounds the first entry from above.
    return r.first_entry or (r.first_exit if r.source == UEXIT else 0)


def _by_vcpu(records: list[RunRecord]) -> dict[int, RunRecord]:
    """vCPU index -> record, from thread names, else by thread id (VMMs create their vCPU
    threads in index order; when each first ran after the probes attached says nothing)."""
    named = {vcpu_index(r.comm): r for r in records}
    if None not in named and len(named) == len(records):
        return {k: v for k, v in named.items() if k is not None}
    return dict(enumerate(sorted(records, key=lambda r: r.tid)))


def downtime(records: Iterable[RunRecord], src: Side, dst: Side) -> KernelDowntime | None:
    """The outage from the best source of evidence that saw both sides, or None."""
    recs = list(records)
    for source in (KVM_ENTRY, KVM_RUN, UEXIT):
        s = [r for r in recs if r.source == source and src.has(r) and r.last_exit]
        d = [r for r in recs if r.source == source and dst.has(r) and _first_in(r) and r.tid not in {x.tid for x in s}]
        if not s or not d:
            continue
        last_exit = max(r.last_exit for r in s)
        first_entry = min(_first_in(r) for r in d)
        gap_ms = (first_entry - last_exit) / 1e6
        sv, dv = _by_vcpu(s), _by_vcpu(d)
        per_vcpu = [(_first_in(dv[i]) - sv[i].last_exit) / 1e6 for i in sorted(sv.keys() & dv.keys())]
        if gap_ms < 0:
            return KernelDowntime(source, None, per_vcpu, last_exit, first_entry, overlap_ms=-gap_ms)
        return KernelDowntime(source, gap_ms, per_vcpu, last_exit, first_entry)
    return None
