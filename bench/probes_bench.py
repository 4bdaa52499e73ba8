"""Kernel-probe benchmark (issue 9): the downtime the kernel saw, against what QEMU reports and
what the guest's own clock saw, and what the probes cost vfmig. One run does all of it.

1. QEMU 7.2: REPS live migrations over loopback of our multiboot dirtier (256 MiB, a 128 MiB
   working set, QEMU's default downtime-limit, max-bandwidth far above the link), each watched
   by a `vfmig probe --pid SRC --pid DST --json` process attached before `migrate` and stopped
   with SIGINT once the destination has run for RUN_AFTER_S. Per run: QEMU's own downtime
   (query-migrate), the BPF downtime and per-vCPU gaps, where they came from, and the largest
   gap the guest's clock saw across the migration. The guest's usual clock is vfmig's clock
   port, which QEMU lacks; the runs alternate between the two fallbacks the multiboot command
   line selects (`clock=kvmclock`, `clock=tsc`, see guest/multiboot.c), and the run also checks
   what the guest sees without one.
2. Probe overhead, vfmig only: PAIRS pairs of a 1 GiB dirtier migration (the in-process source
   and a `vfmig receive` process) with and without MigrationOptions(probes=True), alternating
   which goes first; throughput and downtime ratios (with / without), median over the pairs,
   and the probes' own CPU time from report["probes"]["overhead"].

Writes bench/results/probes.json (probes.small.json with --small) and prints a short table.

    .venv/bin/python bench/probes_bench.py [--reps 10] [--pairs 5] [--small]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median, write_results  # noqa: E402
from migrate_bench import _free_port, migrate_once, warm_memory  # noqa: E402
from qemu import Qemu, available  # noqa: E402

from vfmig.guests import GAP_RING, STATS_GPA  # noqa: E402
from vfmig.migration import MigrationOptions  # noqa: E402
from vfmig.migration.policy import Policy  # noqa: E402

WSS_MIB = 128  # the dirtier's working set, as in bench/migrate_bench.py
DOWNTIME_LIMIT_MS = 300  # vfmig's policy; QEMU's default downtime-limit is the same (checked per run)
RUN_AFTER_S = 0.5  # how long the destination runs before the probe is stopped
GAP_THRESHOLD_US = 1000  # the guest logs clock gaps longer than this in its ring
CLOCKS = ("kvmclock", "tsc")  # the QEMU runs alternate between these guest clocks
PROBE_ATTACH_TIMEOUT_S = 120  # bcc compiles for ~2 s, far longer on a loaded machine
ALL_ONES = (1 << 64) - 1
# struct vfmig_vcpu_stats (csrc/include/vfmig/guest_abi.h), vCPU 0, in u64 words: touches,
# passes, first_clock, last_clock, max_gap, max_gap_start, state | gap_count << 32, then the
# gap ring as (start, len) pairs.
STATS_WORDS = 7 + 2 * GAP_RING


# --------------------------------------------------------------------------------------------
# host TSC (to check what the guest's TSC is)


class HostTsc:
    """rdtsc on this host, from a page of machine code (x86-64: rdtsc; shl rdx,32; or rax,rdx; ret)."""

    CODE = bytes([0x0F, 0x31, 0x48, 0xC1, 0xE2, 0x20, 0x48, 0x09, 0xD0, 0xC3])

    def __init__(self) -> None:
        self._page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        self._page.write(self.CODE)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(self._page))
        self._fn = ctypes.CFUNCTYPE(ctypes.c_uint64)(addr)

    def __call__(self) -> int:
        return int(self._fn())


# --------------------------------------------------------------------------------------------
# guest memory through QEMU


def read_u64s(q: Qemu, gpa: int, n: int) -> list[int]:
    """n consecutive u64 of guest-physical memory, in one monitor command."""
    out = q.cmd("human-monitor-command", **{"command-line": f"xp /{n}gx {gpa:#x}"})
    words: list[int] = []
    for line in out.splitlines():
        if ":" in line:
            words += [int(w, 16) for w in line.split(":", 1)[1].split()]
    if len(words) < n:
        raise RuntimeError(f"xp returned {len(words)} of {n} words: {out[:200]!r}")
    return words[:n]


class StatsRead:
    """vCPU 0's stats as read at one host moment (host monotonic and TSC taken around the read)."""

    def __init__(self, q: Qemu, rdtsc: HostTsc) -> None:
        t0, c0 = time.monotonic(), rdtsc()
        w = read_u64s(q, STATS_GPA, STATS_WORDS)
        c1, t1 = rdtsc(), time.monotonic()
        self.host_s = (t0 + t1) / 2
        self.host_tsc = (c0 + c1) // 2
        self.read_ms = (t1 - t0) * 1e3
        self.passes, self.last = w[1], w[3]
        self.max_gap, self.max_gap_start = w[4], w[5]
        self.gap_count = w[6] >> 32
        self.ring = [(w[7 + 2 * i], w[8 + 2 * i]) for i in range(GAP_RING)]


def wait_passes(q: Qemu, passes: int, timeout: float = 60) -> None:
    """Until the dirtier has made `passes` passes over its working set (the first touches are slow)."""
    deadline = time.monotonic() + timeout
    while read_u64s(q, STATS_GPA + 8, 1)[0] < passes:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the QEMU guest did not make {passes} passes in {timeout} s")
        time.sleep(0.05)


def guest_clock_without_fallback(memory_mib: int, rdtsc: HostTsc) -> dict[str, Any]:
    """What the guest's usual clock (vfmig's clock port) reads under QEMU, and the TSC rate
    QEMU's vCPU has (KVM's, which the guest's TSC runs at)."""
    with Qemu(memory_mib, "dirtier", append=f"wss={WSS_MIB // 4}") as q:
        cpu_path = q.cmd("query-cpus-fast")[0]["qom-path"]
        tsc_hz = int(q.cmd("qom-get", path=cpu_path, property="tsc-frequency"))
        q.wait_console("dirtier: running", timeout=60)
        wait_passes(q, 1)
        a = StatsRead(q, rdtsc)
        time.sleep(0.2)
        b = StatsRead(q, rdtsc)
    moved = b.last != a.last
    return {
        "tsc_hz": tsc_hz,
        "clock_port_reads": f"{a.last:#x}",
        "clock_moved_in_0.2s": moved,
        "guest_ran": b.passes > a.passes,
        "note": "port 0x5F0 is not a QEMU device: an unassigned port reads all ones, so the guest's "
        "default clock never moves and it logs no gaps"
        if a.last == ALL_ONES and not moved
        else "the vfmig clock port read something under QEMU: check guest/runtime.h",
    }


# --------------------------------------------------------------------------------------------
# vfmig probe


class Probe:
    """A `vfmig probe --pid SRC --pid DST --json` process, attached when the constructor returns."""

    READY = "vfmig probe: watching"

    def __init__(self, src: int, dst: int) -> None:
        t0 = time.monotonic()
        cmd = [sys.executable, "-m", "vfmig", "probe", "--pid", str(src), "--pid", str(dst), "--json"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stderr: list[str] = []
        self._wait_ready(t0 + PROBE_ATTACH_TIMEOUT_S)
        self.attach_s = time.monotonic() - t0

    def _wait_ready(self, deadline: float) -> None:
        """Block on the probe's stderr until it says it is attached (it prints that line once its
        probes are on, with --json too), it exits, or the deadline passes."""
        assert self.proc.stderr is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stderr, selectors.EVENT_READ)
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    self.kill()
                    raise RuntimeError(
                        f"vfmig probe did not attach in {PROBE_ATTACH_TIMEOUT_S} s (it must print "
                        f"{self.READY!r} on stderr); stderr: {''.join(self.stderr)[-500:]}"
                    )
                line = self.proc.stderr.readline()
                if not line:  # EOF: it exited
                    self.proc.wait()
                    out = self.proc.stdout.read() if self.proc.stdout else ""
                    said = ("".join(self.stderr) + out)[-800:]
                    raise RuntimeError(f"vfmig probe exited ({self.proc.returncode}): {said}")
                self.stderr.append(line)
                if line.startswith(self.READY):
                    return
        finally:
            sel.close()

    def stop(self) -> dict[str, Any]:
        """SIGINT, then its JSON document."""
        self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=120)
        self.stderr.append(err)
        if self.proc.returncode != 0:
            raise RuntimeError(f"vfmig probe failed ({self.proc.returncode}): {''.join(self.stderr)[-800:]}")
        doc: dict[str, Any] = json.loads(out)
        return doc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# --------------------------------------------------------------------------------------------
# 1. QEMU


def _guest_gap(before: StatsRead, after: StatsRead, per_ms: float, threshold_ms: float) -> dict[str, Any]:
    """The largest gap between the guest's clock reads after `before` (taken just before
    `migrate`) up to `after` (on the destination), from the stats that migrated with the guest."""
    since = before.last
    logged = after.gap_count - before.gap_count
    in_window = [(s, n) for s, n in after.ring if n and s >= since]
    if after.max_gap > before.max_gap and after.max_gap_start >= since:
        # the largest gap since boot happened in the window: exact, however many were logged
        gap, start, how = after.max_gap, after.max_gap_start, "max_gap: the largest since boot, and in the window"
    elif in_window and logged <= GAP_RING:
        start, gap = max(in_window, key=lambda g: g[1])
        how = f"gap ring: all {logged} gaps over {threshold_ms:g} ms in the window were kept"
    elif in_window:
        start, gap = max(in_window, key=lambda g: g[1])
        how = f"gap ring lower bound: {logged} gaps over {threshold_ms:g} ms, the ring keeps {GAP_RING}"
    else:
        return {"max_gap_ms": None, "how": f"no gap over {threshold_ms:g} ms in the window", "gaps_logged": logged}
    return {
        "max_gap_ms": gap / per_ms,
        "max_gap_start_ms": (start - since) / per_ms,  # guest time from the read before `migrate`
        "how": how,
        "gaps_logged": logged,
    }


def qemu_once(memory_mib: int, wss_mib: int, clock: str, tsc_hz: int, rdtsc: HostTsc) -> dict[str, Any]:
    port = _free_port()
    tsc_per_us = tsc_hz / 1e6
    # gap=N is N us under kvmclock, N*1000 TSC ticks under clock=tsc
    gap_arg = GAP_THRESHOLD_US if clock == "kvmclock" else round(GAP_THRESHOLD_US * tsc_per_us / 1e3)
    append = f"wss={wss_mib} clock={clock} gap={gap_arg}"
    per_ms = 1e6 if clock == "kvmclock" else tsc_per_us * 1e3  # guest clock units per ms
    probe: Probe | None = None
    with (
        Qemu(memory_mib, "dirtier", append=append) as src,
        Qemu(memory_mib, "dirtier", incoming=f"tcp:127.0.0.1:{port}", append=append) as dst,
    ):
        try:
            src.wait_console("dirtier: running", timeout=60)
            console = src.console.read_text(errors="replace")
            clock_line = next((ln for ln in console.splitlines() if ln.startswith("clock:")), "clock: (none said)")
            wait_passes(src, 3)
            params = src.cmd("query-migrate-parameters")
            src.cmd("migrate-set-parameters", **{"max-bandwidth": 100 << 30})
            probe = Probe(src.proc.pid, dst.proc.pid)
            before = StatsRead(src, rdtsc)
            info = src.migrate(port)
            deadline = time.monotonic() + 120
            while dst.cmd("query-status")["status"] != "running":
                if time.monotonic() > deadline:
                    raise RuntimeError("the QEMU destination never ran")
                time.sleep(0.01)
            time.sleep(RUN_AFTER_S)
            doc = probe.stop()
            attach_s = probe.attach_s
            probe = None
            after = StatsRead(dst, rdtsc)
        finally:
            if probe is not None:
                probe.kill()
    p = doc["probes"]
    run: dict[str, Any] = {
        "guest_clock": clock,
        "guest_clock_said": clock_line,
        "qemu_downtime_ms": float(info["downtime"]),
        "qemu_total_time_ms": float(info["total-time"]),
        "qemu_bytes": int(info["ram"]["transferred"]),
        "qemu_iterations": int(info["ram"].get("dirty-sync-count", 0)),
        "qemu_downtime_limit_ms": params.get("downtime-limit"),
        "bpf_downtime_ms": p.get("downtime_ms"),
        "bpf_per_vcpu_gap_ms": p.get("per_vcpu_gap_ms"),
        "bpf_downtime_source": p.get("downtime_source"),
        "bpf_overlap_ms": p.get("overlap_ms"),
        "bpf_error": p.get("error"),
        "probe_attach_s": attach_s,
        "probe_attached": p.get("attached"),
        "probe_overhead": p.get("overhead"),
        "tsc_hz": tsc_hz,
        "guest_gap_threshold_ms": GAP_THRESHOLD_US / 1e3,
        "stats_read_ms": [before.read_ms, after.read_ms],
        "probes": {k: v for k, v in p.items() if k != "attached"},
    }
    if before.last == ALL_ONES or after.last == ALL_ONES or after.last <= before.last:
        run["guest"] = {"max_gap_ms": None, "how": f"the guest clock did not move ({clock_line})"}
        return run
    guest = _guest_gap(before, after, per_ms, GAP_THRESHOLD_US / 1e3)
    # The guest's clock against the host's across the whole window: time the guest did not see.
    host_ms = (after.host_s - before.host_s) * 1e3
    guest["clock_lost_ms"] = host_ms - (after.last - before.last) / per_ms
    guest["clock_lost_uncertainty_ms"] = before.read_ms + after.read_ms
    if clock == "tsc":  # is the guest's TSC the host's? (on the source before, on the destination after)
        guest["tsc_minus_host_tsc_ms"] = [(s.last - s.host_tsc) / per_ms for s in (before, after)]
    if guest.get("max_gap_start_ms") is not None:  # where the gap sat against QEMU's stop (~ms: clock-read lag)
        stop_ms = run["qemu_total_time_ms"] - run["qemu_downtime_ms"]
        guest["max_gap_start_minus_qemu_stop_ms"] = guest["max_gap_start_ms"] - stop_ms
    run["guest"] = guest
    return run


# --------------------------------------------------------------------------------------------
# 2. probe overhead on vfmig


def vfmig_once(memory_mib: int, probes: bool) -> dict[str, Any]:
    opts = MigrationOptions(probes=probes, policy=Policy(max_downtime_ms=DOWNTIME_LIMIT_MS))
    r = migrate_once(memory_mib, {"guest": "dirtier", "rate_pps": 0, "wss_bytes": WSS_MIB << 20}, opts)
    run: dict[str, Any] = {
        "probes": probes,
        "throughput_Bps": r.throughput_Bps,
        "downtime_ms": r.downtime_ms,
        "total_time_ms": r.total_time_ms,
        "bytes": r.bytes_sent,
        "iterations": len(r.iterations),
        "guest_observed_downtime_ms": r.guest_observed_downtime_ms,
        "setup_ms": r.setup_ms,
        "iteration_ms": [it.duration_ms for it in r.iterations],
        "iteration_Bps": [it.bandwidth_Bps for it in r.iterations],
    }
    if r.probes is not None:
        run["probe_overhead"] = r.probes.overhead
        run["bpf_downtime_ms"] = r.probes.downtime_ms
        run["bpf_downtime_source"] = r.probes.downtime_source
        run["bpf_error"] = r.probes.error
    return run


def overhead(memory_mib: int, pairs: int) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    tp_ratios, dt_ratios = [], []
    for i in range(pairs):
        order = (False, True) if i % 2 == 0 else (True, False)  # alternate which goes first
        pair: dict[bool, dict[str, Any]] = {}
        for with_probes in order:
            warm_memory(memory_mib)
            pair[with_probes] = vfmig_once(memory_mib, with_probes)
            runs.append({"pair": i, **pair[with_probes]})
        on, off = pair[True], pair[False]
        tp_ratios.append(on["throughput_Bps"] / off["throughput_Bps"])
        if on["downtime_ms"] and off["downtime_ms"]:
            dt_ratios.append(on["downtime_ms"] / off["downtime_ms"])
        print(
            f"  pair {i + 1}/{pairs}: with probes {on['throughput_Bps'] / 1e9:.2f} GB/s, {on['downtime_ms']:.1f} ms | "
            f"without {off['throughput_Bps'] / 1e9:.2f} GB/s, {off['downtime_ms']:.1f} ms",
            flush=True,
        )
    on_runs = [r for r in runs if r["probes"]]
    off_runs = [r for r in runs if not r["probes"]]
    costs = [r["probe_overhead"] for r in on_runs if r.get("probe_overhead")]
    tp = median(tp_ratios)
    dt = median(dt_ratios) if dt_ratios else None
    return {
        "memory_mib": memory_mib,
        "pairs": pairs,
        "throughput_ratio": tp,  # with / without, median of the pairs' ratios
        "throughput_ratio_runs": tp_ratios,
        "downtime_ratio": dt,
        "downtime_ratio_runs": dt_ratios,
        "goal": {"throughput_diff_pct_below": 2, "downtime_diff_pct_below": 5},
        "goal_met": {
            "throughput": abs(tp - 1) * 100 < 2,
            "downtime": dt is not None and abs(dt - 1) * 100 < 5,
        },
        "with_probes": _med(on_runs, ("throughput_Bps", "downtime_ms", "total_time_ms")),
        "without_probes": _med(off_runs, ("throughput_Bps", "downtime_ms", "total_time_ms")),
        "probe_cpu_ms": median([c["probe_cpu_ms"] for c in costs]) if costs else None,
        "probe_cpu_share_pct": median([c["cpu_share_pct"] for c in costs]) if costs else None,
        "probe_runs": median([c["probe_runs"] for c in costs]) if costs else None,
        "probe_ns_per_run": median([c["ns_per_run"] for c in costs]) if costs else None,
        "runs": runs,
    }


def _med(runs: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for k in keys:
        xs = [r[k] for r in runs if r.get(k) is not None]
        out[k] = median(xs) if xs else None
    return out


def _stats(xs: list[float]) -> dict[str, Any] | None:
    return {"median": median(xs), "min": min(xs), "max": max(xs), "n": len(xs)} if xs else None


def _fmt(s: dict[str, Any] | None) -> str:
    return f"{s['median']:.1f} ms ({s['min']:.1f}-{s['max']:.1f}, n={s['n']})" if s else "none"


# --------------------------------------------------------------------------------------------


def host_kvm() -> str:
    """Which KVM module this host runs: the guest-clock findings depend on it."""
    mods = [m for m in ("kvm_intel", "kvm_amd", "kvm_pvm") if os.path.isdir(f"/sys/module/{m}")]
    return ", ".join(mods) or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=10, help="QEMU migrations (alternating guest clocks)")
    ap.add_argument("--pairs", type=int, default=None, help="with/without-probes pairs (default 5; 2 with --small)")
    ap.add_argument("--small", action="store_true", help="a quick check: smaller VMs, 2 pairs, probes.small.json")
    args = ap.parse_args()
    pairs = args.pairs if args.pairs is not None else (2 if args.small else 5)
    qemu_mib, qemu_wss = (128, 64) if args.small else (256, WSS_MIB)
    vfmig_mib = 512 if args.small else 1024
    rdtsc = HostTsc()
    doc: dict[str, Any] = {"small": args.small, "host_kvm": host_kvm()}

    qemu_reason = available()
    doc["qemu_skipped"] = qemu_reason
    if qemu_reason is None:
        print(f"QEMU: {args.reps} migrations of {qemu_mib} MiB (dirtier, {qemu_wss} MiB working set)", flush=True)
        doc["guest_default_clock_under_qemu"] = seen = guest_clock_without_fallback(qemu_mib, rdtsc)
        runs = []
        for i in range(args.reps):
            clock = CLOCKS[i % len(CLOCKS)]
            warm_memory(qemu_mib)
            run = qemu_once(qemu_mib, qemu_wss, clock, seen["tsc_hz"], rdtsc)
            runs.append(run)
            g = run["guest"]
            print(
                f"  run {i + 1}/{args.reps}: QEMU {run['qemu_downtime_ms']:.0f} ms, BPF "
                f"{run['bpf_downtime_ms'] if run['bpf_downtime_ms'] is None else round(run['bpf_downtime_ms'], 2)} ms, "
                f"guest ({clock}) largest gap "
                f"{'none' if g['max_gap_ms'] is None else round(g['max_gap_ms'], 2)} ms, "
                f"clock lost {g.get('clock_lost_ms', float('nan')):.1f} ms",
                flush=True,
            )
        doc["qemu"] = {
            "memory_mib": qemu_mib,
            "wss_mib": qemu_wss,
            "reps": args.reps,
            "downtime_limit_ms": runs[0]["qemu_downtime_limit_ms"] if runs else None,
            **qemu_summary(runs),
            "probes_attached": [r.pop("probe_attached") for r in runs][0] if runs else None,  # the same every run
            "runs": runs,
        }
        doc["qemu"]["guest_finding"] = guest_finding(doc)

    print(f"vfmig probe overhead: {pairs} alternating pairs of {vfmig_mib} MiB migrations (dirtier)", flush=True)
    doc["overhead"] = overhead(vfmig_mib, pairs)
    path = write_results("probes.small" if args.small else "probes", doc)
    print_table(doc)
    print(f"wrote {path}")


def qemu_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def of(key: str, clock: str | None = None) -> list[float]:
        return [
            r["guest"][key] if key in r["guest"] else r[key]
            for r in runs
            if (clock is None or r["guest_clock"] == clock) and r["guest"].get(key, r.get(key)) is not None
        ]

    both = [r for r in runs if r["bpf_downtime_ms"] is not None]
    return {
        "qemu_downtime_ms": _stats(of("qemu_downtime_ms")),
        "bpf_downtime_ms": _stats(of("bpf_downtime_ms")),
        "bpf_minus_qemu_ms": _stats([r["bpf_downtime_ms"] - r["qemu_downtime_ms"] for r in both]),
        "bpf_sources": sorted({r["bpf_downtime_source"] for r in runs if r["bpf_downtime_source"]}),
        "guest": {
            c: {
                "max_gap_ms": _stats(of("max_gap_ms", c)),
                "clock_lost_ms": _stats(of("clock_lost_ms", c)),
                "gap_minus_bpf_ms": _stats(
                    [
                        r["guest"]["max_gap_ms"] - r["bpf_downtime_ms"]
                        for r in both
                        if r["guest_clock"] == c and r["guest"]["max_gap_ms"] is not None
                    ]
                ),
            }
            for c in CLOCKS
        },
        "probe_attach_s": _stats(of("probe_attach_s")),
    }


def guest_finding(doc: dict[str, Any]) -> str:
    """What the guest's clocks saw, and why, from this run's own measurements."""
    q = doc["qemu"]
    runs = q["runs"]
    parts = []
    if doc["guest_default_clock_under_qemu"].get("clock_port_reads") == f"{ALL_ONES:#x}":
        parts.append("Without a fallback the guest has no clock under QEMU (port 0x5F0 reads all ones).")
    saw = [
        r
        for r in runs
        if r["guest"]["max_gap_ms"] is not None
        and r["bpf_downtime_ms"]
        and r["guest"]["max_gap_ms"] >= 0.8 * r["bpf_downtime_ms"]
    ]
    parts.append(
        f"With kvmclock or the TSC it saw the outage in {len(saw)} of {len(runs)} runs "
        "(largest gap across the migration at least 0.8x the BPF downtime)."
    )
    diffs = [f"{g['gap_minus_bpf_ms']['median']:+.1f} ms ({c})" for c, g in q["guest"].items() if g["gap_minus_bpf_ms"]]
    if diffs:
        parts.append(f"Largest guest gap minus the BPF downtime, median: {', '.join(diffs)}.")
    tsc_off = [abs(x) for r in runs for x in r["guest"].get("tsc_minus_host_tsc_ms", [])]
    if tsc_off and max(tsc_off) < 10:
        parts.append(
            f"Its TSC is the host's TSC (guest minus host within ±{max(tsc_off):.1f} ms, read through the monitor "
            f"on the source and on the destination): this host's KVM ({doc['host_kvm']}) does not apply "
            "the TSC offset QEMU restores on the destination, so the guest's TSC runs on through the stop."
        )
    elif tsc_off:
        parts.append(f"Its TSC differs from the host's by up to {max(tsc_off):.1f} ms.")
    lost = q["guest"].get("kvmclock", {}).get("clock_lost_ms")
    if lost:
        unc = median([r["guest"].get("clock_lost_uncertainty_ms", 0.0) for r in runs if r["guest_clock"] == "kvmclock"])
        parts.append(
            f"kvmclock, computed from the TSC, fell behind host time by {lost['median']:.1f} ms (median) across a "
            f"migration, against a read uncertainty of {unc:.1f} ms."
        )
    return " ".join(parts)


def print_table(doc: dict[str, Any]) -> None:
    q = doc.get("qemu")
    if q:
        print(f"\nQEMU 7.2, {q['memory_mib']} MiB dirtier, {q['reps']} migrations (median, range):")
        print(f"  QEMU's downtime (query-migrate)      {_fmt(q['qemu_downtime_ms'])}")
        print(f"  kernel (BPF) downtime                {_fmt(q['bpf_downtime_ms'])}")
        for c, g in q["guest"].items():
            print(f"  guest's largest gap ({c:8})       {_fmt(g['max_gap_ms'])}")
            print(f"  guest's clock lost ({c:8})        {_fmt(g['clock_lost_ms'])}")
        print(f"  {q['guest_finding']}")
    o = doc["overhead"]
    dt = "n/a" if o["downtime_ratio"] is None else f"{o['downtime_ratio']:.3f}x"
    tp_runs = ", ".join(f"{x:.3f}" for x in o["throughput_ratio_runs"])
    dt_runs = ", ".join(f"{x:.3f}" for x in o["downtime_ratio_runs"])
    print(f"\nvfmig {o['memory_mib']} MiB dirtier, {o['pairs']} pairs, with/without probes (median of the pairs):")
    print(f"  throughput {o['throughput_ratio']:.3f}x (pairs {tp_runs})")
    print(f"  downtime   {dt} (pairs {dt_runs})")
    if o["probe_cpu_ms"] is not None:
        print(
            f"  probes' own CPU: {o['probe_cpu_ms']:.1f} ms per migration "
            f"({o['probe_cpu_share_pct']:.2f}% of the CPUs while attached)"
        )


if __name__ == "__main__":
    main()
