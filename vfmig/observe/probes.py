"""vfmig's BPF probes (bpf/*.bpf.c), loaded with bcc: downtime, interrupt and handshake latency
as the kernel saw them, for vfmig's VMs and for any VMM process (QEMU included).

Each event has a fixed order of attach methods (tracepoint, USDT, kprobe, fentry); the first
one this kernel has wins and is compiled in with its -D macro. The report names what attached,
what was unavailable and why, and what attached but never fired. Without bcc the downtime
comes from tracefs (``vfmig.observe.tracefs``); without either, the report says so and has no
figures, never zeros.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any

from vfmig.observe import runs
from vfmig.observe.runs import RunRecord, Side
from vfmig.report.probes import Histogram, ProbeReport, log2_buckets

SETS = ("downtime", "irqlat", "handshake")
TRACEFS_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
KPROBE_PMU = "/sys/bus/event_source/devices/kprobe"
# With these on, most EOIs of edge-triggered interrupts complete in hardware without an exit.
APIC_VIRT = (
    ("/sys/module/kvm_intel/parameters/enable_apicv", "APICv"),
    ("/sys/module/kvm_amd/parameters/avic", "AVIC"),
)
USDT_PROVIDER = "vfmig"


@dataclass(frozen=True)
class Method:
    kind: str  # tracepoint, usdt, kprobe, fentry
    point: str  # kvm:kvm_entry, vfmig:checkpoint, vfio_msihandler
    macro: str  # the -D that compiles its handler in
    fn: str = ""  # the handler the loader attaches (USDT, kprobe)


@dataclass(frozen=True)
class Event:
    name: str
    probe_set: str
    methods: tuple[Method, ...]


def _tp(cat: str, ev: str) -> Method:
    return Method("tracepoint", f"{cat}:{ev}", f"VFMIG_TP_{ev.upper()}")


def _usdt(name: str) -> Method:
    return Method("usdt", f"{USDT_PROVIDER}:{name}", f"VFMIG_USDT_{name.upper()}", f"vfmig_on_{name}")


def _kprobe(fn: str) -> Method:
    return Method("kprobe", fn, f"VFMIG_KPROBE_{fn.upper()}", f"vfmig_on_{fn}")


def _fentry(fn: str) -> Method:
    return Method("fentry", fn, f"VFMIG_FENTRY_{fn.upper()}")


EVENTS = (
    Event("guest entry", "downtime", (_tp("kvm", "kvm_entry"),)),
    Event("guest exit", "downtime", (_tp("kvm", "kvm_exit"),)),
    Event("KVM_RUN enter", "downtime", (_tp("raw_syscalls", "sys_enter"),)),
    Event("KVM_RUN exit", "downtime", (_tp("raw_syscalls", "sys_exit"),)),
    Event("KVM_RUN return", "downtime", (_tp("kvm", "kvm_userspace_exit"),)),
    Event("vCPU on/off CPU", "downtime", (_tp("sched", "sched_switch"),)),
    Event("vCPU kick", "downtime", (_tp("signal", "signal_generate"),)),
    Event("checkpoint", "downtime", (_usdt("checkpoint"),)),
    Event("device raise (emulated)", "irqlat", (_usdt("msix_raise"),)),
    Event(
        "device raise (vfio-msix)",
        "irqlat",
        (_tp("irq", "irq_handler_entry"), _kprobe("vfio_msihandler"), _fentry("vfio_msihandler")),
    ),
    Event("MSI into KVM", "irqlat", (_tp("kvm", "kvm_msi_set_irq"),)),
    Event("LAPIC accept", "irqlat", (_tp("kvm", "kvm_apic_accept_irq"),)),
    Event("guest EOI", "irqlat", (_tp("kvm", "kvm_eoi"),)),
    Event("guest PV EOI", "irqlat", (_tp("kvm", "kvm_pv_eoi"),)),
    Event("handshake raise", "handshake", (_usdt("handshake_raise"),)),
    Event("handshake ack", "handshake", (_usdt("handshake_ack"),)),
    Event("handshake end", "handshake", (_usdt("handshake_end"),)),
)

# Index names of the count arrays in the .bpf.c files (their enums).
IRQ_COUNTS = ("raised", "untimed", "msi", "accepted", "eoi", "eoi_unmatched", "vfio_msix")
HS_COUNTS = ("raised", "acks", "acks_past_deadline", "acks_unmatched")
IRQ_STAGES = ("irq delivered", "irq handled")  # raise -> LAPIC accept, raise -> guest EOI
CP_SLOTS = 512


class ProbesUnavailable(Exception):
    """Nothing can be attached; the message says why."""


def bpf_dir() -> Path:
    """The installed bpf/ sources (package data), or the source tree's in a checkout."""
    installed = Path(str(resources.files("vfmig") / "bpf"))
    if (installed / "probes.h").is_file():
        return installed
    return Path(__file__).resolve().parents[2] / "bpf"


def tracefs() -> str | None:
    for d in TRACEFS_DIRS:
        if os.path.isdir(os.path.join(d, "events")):
            return d
    return None


def import_bcc() -> ModuleType:
    try:
        import bcc  # type: ignore[import-not-found]
    except ImportError as e:
        raise ProbesUnavailable(f"bcc is not installed (apt install python3-bpfcc): {e}") from None
    return bcc  # type: ignore[no-any-return]


def usdt_library(pid: int) -> str | None:
    """The vfmig extension mapped by `pid` (its USDT probes live there), or None."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/maps") as f:
        for line in f:
            path = line.rstrip("\n").split(None, 5)[-1]
            name = os.path.basename(path)
            if name.startswith("_core") and ".so" in name and "/vfmig/" in path:
                return path
    return None


def apic_virtualization() -> str | None:
    """APICv or AVIC if KVM has it on (then EOIs mostly do not exit), else None."""
    for path, name in APIC_VIRT:
        with contextlib.suppress(OSError), open(path) as f:
            if f.read().strip() in ("Y", "1"):
                return name
    return None


def _in_kallsyms(symbol: str) -> bool:
    with contextlib.suppress(OSError), open("/proc/kallsyms") as f:
        return any(line.rstrip().split(" ")[2:3] == [symbol] for line in f)
    return False


def _enable_bpf_stats() -> int | None:
    """BPF_ENABLE_STATS(BPF_STATS_RUN_TIME): run time is counted while the fd stays open."""
    libc = ctypes.CDLL(None, use_errno=True)
    attr = ctypes.create_string_buffer(8)  # union bpf_attr { struct { __u32 type; } enable_stats; }
    fd = libc.syscall(321, 32, attr, 8)  # SYS_bpf (x86_64), BPF_ENABLE_STATS, type 0 = RUN_TIME
    return int(fd) if fd >= 0 else None


def _prog_stats(fd: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of a loaded BPF program, from its fdinfo."""
    ns = cnt = 0
    with contextlib.suppress(OSError), open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k == "run_time_ns":
                ns = int(v)
            elif k == "run_cnt":
                cnt = int(v)
    return ns, cnt


class Plan:
    """Which method each event attaches with on this host, and why the others could not."""

    def __init__(self, sets: Iterable[str], usdt_probes: set[str], usdt_reason: str, bcc: ModuleType | None) -> None:
        self.chosen: dict[str, Method] = {}
        self.unavailable: list[dict[str, str]] = []
        self._usdt, self._usdt_reason, self._bcc = usdt_probes, usdt_reason, bcc
        for ev in EVENTS:
            if ev.probe_set not in sets:
                continue
            reasons = []
            for m in ev.methods:
                why = self._why_not(m)
                if why is None:
                    self.chosen[ev.name] = m
                    break
                reasons.append(f"{m.kind} {m.point}: {why}")
            if ev.name not in self.chosen:
                self.unavailable.append({"event": ev.name, "reason": "; ".join(reasons)})

    def _why_not(self, m: Method) -> str | None:
        if m.kind == "tracepoint":
            root = tracefs()
            if root is None:
                return "tracefs is not mounted (mount -t tracefs tracefs /sys/kernel/tracing)"
            cat, ev = m.point.split(":")
            return None if os.path.isdir(os.path.join(root, "events", cat, ev)) else "not in this kernel"
        if m.kind == "usdt":
            return None if m.point.split(":")[1] in self._usdt else self._usdt_reason
        if m.kind == "kprobe":
            if not os.path.isdir(KPROBE_PMU):
                return "kprobes are not available on this kernel"
            return None if _in_kallsyms(m.point) else "not in this kernel (is vfio-pci loaded?)"
        if m.kind == "fentry":
            if self._bcc is None or not self._bcc.BPF.support_kfunc():
                return "fentry (BPF trampolines with BTF) is not available on this kernel"
            return None if _in_kallsyms(m.point) else "not in this kernel (is vfio-pci loaded?)"
        return f"unknown attach method {m.kind}"

    def cflags(self, hs_outcomes: int) -> list[str]:
        return [f"-D{m.macro}" for m in self.chosen.values()] + [f"-DVFMIG_HS_OUTCOMES={hs_outcomes}"]

    def attached(self) -> list[dict[str, str]]:
        return [{"event": e, "method": m.kind, "point": m.point} for e, m in self.chosen.items()]


def program_text(sets: Iterable[str] = SETS) -> str:
    """The probe sets as bcc compiles them: the shared header, then each set. bcc rewrites map
    accesses only in its main text, so the header goes in there too; each set's own
    `#include "probes.h"` then finds its guard defined and adds nothing."""
    d = bpf_dir()
    return "\n".join([(d / "probes.h").read_text()] + [(d / f"{s}.bpf.c").read_text() for s in sets])


class ProbeSession:
    """Attach once, watch processes, collect a ProbeReport per migration (reset in between).

    Not thread-safe: one thread drives it. Needs root (BPF) or, for the fallback, tracefs."""

    def __init__(self, sets: Iterable[str] = SETS, *, hs_outcomes: tuple[str, ...] | None = None) -> None:
        self.sets = tuple(s for s in SETS if s in set(sets))
        if hs_outcomes is None:
            from vfmig import _core

            hs_outcomes = tuple(_core.HS_OUTCOMES)
        self.hs_outcomes = hs_outcomes
        self.backend = "none"
        self.plan: Plan | None = None
        self.error: str | None = None
        self._b: Any = None
        self._fallback: Any = None
        self._usdt_lib: str | None = None
        self._pids: set[int] = set()
        self._stats_fd: int | None = None
        self._t0 = 0
        self._stats_base = (0, 0)  # (ns, runs) at the last reset: run-time stats only grow
        self._fallback_reason: list[dict[str, str]] = []

    # lifecycle --------------------------------------------------------------------------------
    def start(self, pids: Iterable[int]) -> None:
        """Attach, watching `pids`. Never raises for a host without probes: the report says why."""
        pids = list(pids)
        try:
            self._start_bcc(pids)
        except Exception as e:  # noqa: BLE001 - whatever bcc raised, fall back and say why
            if self._b is not None:
                with contextlib.suppress(Exception):
                    self._b.cleanup()
            self._b, self.plan, self._usdt_lib = None, None, None
            self._close_stats()
            why = str(e) if isinstance(e, ProbesUnavailable) else f"bcc failed: {type(e).__name__}: {e}"
            self._fallback_reason = [{"event": "BPF probes", "reason": why}]
            self._start_tracefs(pids)
        self._t0 = time.monotonic_ns()

    def _start_bcc(self, pids: list[int]) -> None:
        bcc = import_bcc()
        lib = next((p for p in map(usdt_library, [*pids, os.getpid()]) if p), None)
        probes: set[str] = set()
        reason = "no watched process has vfmig's USDT probes (e.g. a QEMU process)"
        if lib is not None:
            try:
                probes = {
                    p.name.decode()
                    for p in bcc.USDT(path=lib).enumerate_probes()
                    if p.provider.decode() == USDT_PROVIDER
                }
                reason = f"{lib} has no such probe (built without sys/sdt.h?)"
            except Exception as e:  # noqa: BLE001 - bcc raises plain Exceptions
                reason = f"cannot read the USDT notes of {lib}: {e}"
        self.plan = plan = Plan(self.sets, probes, reason, bcc)
        usdt = None
        if any(m.kind == "usdt" for m in plan.chosen.values()):
            assert lib is not None
            usdt = bcc.USDT(path=lib)
            for m in plan.chosen.values():
                if m.kind == "usdt":
                    usdt.enable_probe(probe=m.point.split(":")[1], fn_name=m.fn)
        self._usdt_lib = lib if usdt is not None else None
        text = program_text(self.sets)
        cflags = [f"-I{bpf_dir()}", *plan.cflags(len(self.hs_outcomes))]
        self._stats_fd = _enable_bpf_stats()
        try:
            self._b = bcc.BPF(text=text.encode(), cflags=cflags, usdt_contexts=[usdt] if usdt else [])
            for m in plan.chosen.values():
                if m.kind == "kprobe":
                    self._b.attach_kprobe(event=m.point.encode(), fn_name=m.fn.encode())
        except Exception as e:  # noqa: BLE001 - a compile or attach failure: fall back, say why
            if self._b is not None:
                with contextlib.suppress(Exception):
                    self._b.cleanup()
            self._b, self.plan, self._usdt_lib = None, None, None
            self._close_stats()
            last = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            raise ProbesUnavailable(f"bcc could not load the probes: {last}") from None
        self.backend = "bcc"
        for pid in pids:
            self.watch(pid)

    def _start_tracefs(self, pids: list[int]) -> None:
        from vfmig.observe.tracefs import TracefsSession

        try:
            self._fallback = TracefsSession()
            self._fallback.start(pids)
            self.backend = "tracefs"
            self._pids.update(pids)
        except ProbesUnavailable as e:
            self._fallback = None
            self.error = f"{self._fallback_reason[0]['reason']}; and no tracefs fallback: {e}"

    def watch(self, pid: int) -> None:
        """Watch one more process (a destination found after the connection), while attached."""
        self._pids.add(pid)
        if self._b is not None:
            flags = 1 | (2 if self._usdt_lib is not None and usdt_library(pid) == self._usdt_lib else 0)
            self._b[b"targets"][ctypes.c_uint32(pid)] = ctypes.c_uint32(flags)
        elif self._fallback is not None:
            self._fallback.watch(pid)

    def reset(self) -> None:
        """Forget what was seen (between migrations); the watched processes stay."""
        if self._b is not None:
            for name in self._map_names():
                self._b[name.encode()].clear()
            # Run records stay: a vCPU preempted inside KVM_RUN since before this reset still
            # needs its entry when it stops. Only threads that are gone are dropped.
            runs_map = self._b[b"runs"]
            for k in [k for k in runs_map if not os.path.exists(f"/proc/{k.tid}")]:
                del runs_map[k]
        elif self._fallback is not None:
            self._fallback.reset()
        self._t0 = time.monotonic_ns()
        self._stats_base = self._prog_totals()

    def close(self) -> None:
        if self._b is not None:
            with contextlib.suppress(Exception):
                self._b.cleanup()
            self._b = None
        if self._fallback is not None:
            self._fallback.close()
            self._fallback = None
        self._close_stats()

    def _close_stats(self) -> None:
        if self._stats_fd is not None:
            os.close(self._stats_fd)
            self._stats_fd = None

    def __enter__(self) -> ProbeSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _map_names(self) -> list[str]:
        names = {
            "downtime": ["gap_hist", "run_fired", "cps", "cp_counts"],
            "irqlat": ["pending", "irq_hist", "vec_src", "irq_counts", "raise_at"],
            "handshake": ["hs_open", "hs_hist", "hs_counts", "hs_outcomes"],
        }
        return [n for s in self.sets for n in names[s]]

    # reading ----------------------------------------------------------------------------------
    def run_records(self) -> list[RunRecord]:
        if self._fallback is not None:
            return list(self._fallback.run_records())
        if self._b is None or "downtime" not in self.sets:
            return []
        out = []
        for k, v in self._b[b"runs"].items():
            out.append(
                RunRecord(
                    tid=k.tid,
                    tgid=v.tgid,
                    source=k.source,
                    comm=bytes(v.comm).split(b"\0", 1)[0].decode(errors="replace"),
                    first_entry=v.first_entry,
                    last_entry=v.last_entry,
                    first_exit=v.first_exit,
                    last_exit=v.last_exit,
                    runs=v.runs,
                    max_gap_ns=v.max_gap_ns,
                )
            )
        return out

    def collect(self, src: Side | None = None, dst: Side | None = None) -> ProbeReport:
        """What was seen since start() or reset(); the downtime when both sides are given."""
        if self.backend == "none":
            return ProbeReport(backend="none", unavailable=self._fallback_reason, error=self.error)
        rep = ProbeReport(backend=self.backend, unavailable=list(self._fallback_reason))
        if self.plan is not None:
            rep.attached, rep.unavailable = self.plan.attached(), rep.unavailable + self.plan.unavailable
            if "irqlat" in self.sets and (virt := apic_virtualization()):
                rep.unavailable.append(
                    {
                        "event": "guest EOI",
                        "reason": f"{virt} is on: most EOIs of edge interrupts do not exit, so 'irq handled' "
                        "misses them and their raises stay pending (counted as untimed)",
                    }
                )
        elif self._fallback is not None:
            rep.attached = self._fallback.attached()
            rep.unavailable += self._fallback.unavailable()
        records = self.run_records()
        if src is not None:
            rep.pids["source"] = src.pid
        if dst is not None:
            rep.pids["destination"] = dst.pid
        if src is not None and dst is not None:
            kd = runs.downtime(records, src, dst)
            if kd is not None:
                rep.downtime_ms, rep.overlap_ms = kd.downtime_ms, kd.overlap_ms
                rep.downtime_source, rep.per_vcpu_gap_ms = kd.source_name, kd.per_vcpu_gap_ms
        if self._b is not None:
            self._read_bpf(rep)
        return rep

    def _read_bpf(self, rep: ProbeReport) -> None:
        b = self._b
        fired: dict[str, int] = {}
        if "downtime" in self.sets:
            rf = [b[b"run_fired"][ctypes.c_int(i)].value for i in range(3)]
            fired.update({"guest entry": rf[0], "guest exit": rf[0], "KVM_RUN enter": rf[1], "KVM_RUN exit": rf[1]})
            fired["KVM_RUN return"] = rf[2]
            # Scheduler and signal events matter only to a vCPU inside KVM_RUN; count those runs.
            fired["vCPU on/off CPU"] = fired["vCPU kick"] = rf[1]
            self._read_checkpoints(rep)
            fired["checkpoint"] = b[b"cp_counts"][ctypes.c_int(0)].value
            slots: dict[int, dict[int, int]] = {}
            best = next((s for s in (0, 1, 2) if rf[s]), None)
            for k, v in b[b"gap_hist"].items():
                if k.source == best:
                    slots.setdefault(k.tgid, {})[k.slot] = v.value
            for pid, sl in sorted(slots.items()):
                bk = log2_buckets(sl)
                rep.histograms.append(Histogram("vCPU out of guest", pid, sum(x[2] for x in bk), bk))
        if "irqlat" in self.sets:
            counts = {n: b[b"irq_counts"][ctypes.c_int(i)].value for i, n in enumerate(IRQ_COUNTS)}
            rep.irq_counts = counts
            srcs = {(k.tgid, k.apic, k.vec): v for k, v in b[b"vec_src"].items()}
            fired["device raise (emulated)"] = sum(v.raises for v in srcs.values())
            fired["device raise (vfio-msix)"] = counts["vfio_msix"]
            fired.update(
                {"MSI into KVM": counts["msi"], "LAPIC accept": counts["accepted"], "guest EOI": counts["eoi"]}
            )
            groups: dict[tuple[int, int, int, int], dict[int, int]] = {}
            for k, v in b[b"irq_hist"].items():
                groups.setdefault((k.tgid, k.apic, k.vec, k.stage), {})[k.slot] = v.value
            for (pid, apic, vec, stage), sl in sorted(groups.items()):
                bk = log2_buckets(sl)
                h = Histogram(IRQ_STAGES[stage], pid, sum(x[2] for x in bk), bk, vector=vec, apic=apic)
                s = srcs.get((pid, apic, vec))
                if s is not None:
                    h.device = f"{s.bdf >> 8:02x}:{(s.bdf >> 3) & 0x1F:02x}.{s.bdf & 7}"
                    h.entry = s.entry
                rep.histograms.append(h)
        if "handshake" in self.sets:
            hc = {n: b[b"hs_counts"][ctypes.c_int(i)].value for i, n in enumerate(HS_COUNTS)}
            oc = {n: b[b"hs_outcomes"][ctypes.c_int(i)].value for i, n in enumerate(self.hs_outcomes)}
            fired.update({"handshake raise": hc["raised"], "handshake ack": hc["acks"] + hc["acks_past_deadline"]})
            fired["handshake end"] = sum(oc.values())
            sl = {}
            for k, v in b[b"hs_hist"].items():
                sl[k.slot] = sl.get(k.slot, 0) + v.value
            bk = log2_buckets(sl)
            rep.handshake = {**hc, "outcomes": {k: v for k, v in oc.items() if v}, "buckets": bk}
            if bk:
                rep.histograms.append(Histogram("handshake ack", 0, sum(x[2] for x in bk), bk))
        assert self.plan is not None
        rep.silent = [e for e in self.plan.chosen if not fired.get(e)]
        rep.overhead = self._overhead()

    def _read_checkpoints(self, rep: ProbeReport) -> None:
        b = self._b
        cps = sorted(
            (k.ts, v.tgid, bytes(v.name).split(b"\0", 1)[0].decode(errors="replace")) for k, v in b[b"cps"].items()
        )
        if cps:
            t0 = cps[0][0]
            rep.checkpoints = [{"name": nm, "pid": pid, "t_ms": (ts - t0) / 1e6} for ts, pid, nm in cps]
            rep.checkpoint_deltas_ms = [
                {"from": a[2], "to": z[2], "ms": (z[0] - a[0]) / 1e6} for a, z in zip(cps, cps[1:], strict=False)
            ]
        lost = b[b"cp_counts"][ctypes.c_int(1)].value
        if lost:
            rep.unavailable.append({"event": "checkpoint", "reason": f"{lost} checkpoints past {CP_SLOTS} not kept"})

    def _prog_totals(self) -> tuple[int, int]:
        ns = cnt = 0
        if self._b is not None and self._stats_fd is not None:
            for fn in self._b.funcs.values():
                t, c = _prog_stats(fn.fd)
                ns, cnt = ns + t, cnt + c
        return ns, cnt

    def _overhead(self) -> dict[str, float]:
        """CPU time the kernel spent running the probes (BPF run-time stats) over the window."""
        if self._stats_fd is None:
            return {}
        ns, runs_ = self._prog_totals()
        ns, runs_ = ns - self._stats_base[0], runs_ - self._stats_base[1]
        window = max(1, time.monotonic_ns() - self._t0)
        return {
            "probe_runs": runs_,
            "probe_cpu_ms": ns / 1e6,
            "ns_per_run": ns / runs_ if runs_ else 0.0,
            "window_ms": window / 1e6,
            "cpu_share_pct": 100.0 * ns / (window * (os.cpu_count() or 1)),
        }
