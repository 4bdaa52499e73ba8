"""`vfmig probe`: watch running VMM processes (vfmig's or QEMU's) from the kernel until
interrupted: vCPU out-of-guest gaps and device interrupt latency per interval and, given a
source and a destination, the downtime of the migration between them."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from typing import Any

from vfmig.errors import ConfigError
from vfmig.observe.probes import SETS, ProbeSession, program_text
from vfmig.observe.runs import Side
from vfmig.report.probes import Histogram, ProbeReport, bucket_quantile


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "probe",
        help="watch VMM processes (vfmig or QEMU) from the kernel: vCPU gaps, interrupt latency, downtime",
    )
    p.add_argument(
        "--pid",
        type=int,
        action="append",
        default=[],
        help="a VMM process; give two (source, then destination) to measure a migration's downtime",
    )
    p.add_argument("--interval", type=float, default=1.0, metavar="S", help="print every S seconds (default 1)")
    p.add_argument("--duration", type=float, default=0.0, metavar="S", help="stop after S seconds (default: Ctrl-C)")
    p.add_argument("--json", action="store_true", help="print one JSON document at the end instead of text")
    p.add_argument("--ebpf", action="store_true", help="print the BPF program text and exit")
    p.set_defaults(func=cmd_probe)


def _check_pids(pids: list[int]) -> None:
    if not pids:
        raise ConfigError("give at least one --pid (two for a migration: source, then destination)")
    if len(pids) > 2:
        raise ConfigError("give at most two --pid: the source, then the destination")
    if len(set(pids)) != len(pids):
        raise ConfigError("the source and destination --pid must differ")
    for pid in pids:
        if pid <= 0 or not os.path.isdir(f"/proc/{pid}"):
            raise ConfigError(f"no process {pid}")


def _sides(pids: list[int]) -> tuple[Side | None, Side | None]:
    return (Side(pids[0]), Side(pids[1])) if len(pids) == 2 else (None, None)


def _key(h: Histogram) -> tuple[str, int, int | None, int | None]:
    return (h.what, h.pid, h.apic, h.vector)


def _delta(h: Histogram, before: Histogram | None) -> Histogram:
    """This interval's part of a cumulative histogram."""
    if before is None:
        return h
    old = {(lo, hi): n for lo, hi, n in before.buckets}
    buckets = [[lo, hi, n - old.get((lo, hi), 0)] for lo, hi, n in h.buckets if n - old.get((lo, hi), 0) > 0]
    return dataclasses.replace(h, total=sum(b[2] for b in buckets), buckets=buckets)


class _Printer:
    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.prev: dict[tuple[str, int, int | None, int | None], Histogram] = {}
        self.downtime_said = False

    def interval(self, rep: ProbeReport) -> None:
        stamp = time.strftime("%H:%M:%S")
        for h in rep.histograms:
            d = _delta(h, self.prev.get(_key(h)))
            self.prev[_key(h)] = h
            if not d.total:
                continue
            if h.what == "vCPU out of guest":
                med, top = bucket_quantile(d.buckets, 0.5), d.buckets[-1]
                assert med is not None
                role = self._role(h.pid)
                print(
                    f"{stamp} pid {h.pid}{role}: {d.total:,} guest entries; out of guest median {med[0]}-{med[1]} us, "
                    f"longest {top[0]}-{top[1]} us",
                    flush=True,
                )
            else:
                print(f"{stamp} pid {h.pid}: {d.summary()}", flush=True)
        if rep.downtime_ms is not None and not self.downtime_said:
            self.downtime_said = True
            per = ", ".join(f"{g:.2f}" for g in rep.per_vcpu_gap_ms)
            print(
                f"{stamp} migration {self.pids[0]} -> {self.pids[1]}: downtime {rep.downtime_ms:.2f} ms "
                f"(per vCPU {per or '?'}), from {rep.downtime_source}",
                flush=True,
            )
        elif rep.overlap_ms is not None and not self.downtime_said:
            self.downtime_said = True
            print(
                f"{stamp} OVERLAP: pid {self.pids[1]} ran its guest {rep.overlap_ms:.2f} ms "
                f"before pid {self.pids[0]} stopped",
                flush=True,
            )

    def _role(self, pid: int) -> str:
        if len(self.pids) != 2:
            return ""
        return " (source)" if pid == self.pids[0] else " (destination)"


def cmd_probe(args: argparse.Namespace) -> int:
    if args.ebpf:
        print(program_text(SETS))
        return 0
    _check_pids(args.pid)
    if args.interval <= 0 or args.duration < 0:
        raise ConfigError("--interval must be positive and --duration not negative")
    stop = threading.Event()
    old = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with ProbeSession() as session:
            session.start(args.pid)
            src, dst = _sides(args.pid)
            if session.backend == "none":
                raise ConfigError(f"no probes: {session.error}")
            # On stderr even with --json: a script waits for this line to know the probes are on.
            print(
                f"vfmig probe: watching {', '.join(map(str, args.pid))} with {session.backend}; Ctrl-C ends",
                file=sys.stderr,
                flush=True,
            )
            printer = _Printer(args.pid)
            end = time.monotonic() + args.duration if args.duration else None
            while not stop.is_set():
                wait = args.interval if end is None else min(args.interval, end - time.monotonic())
                if wait <= 0 or stop.wait(wait):
                    break
                if not args.json:
                    printer.interval(session.collect(src, dst))
            rep = session.collect(src, dst)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if args.json:
        print(json.dumps({"pids": args.pid, "probes": rep.to_dict()}, indent=2), flush=True)
    else:
        print("\n".join(rep.summary_lines()), flush=True)
    return 0
