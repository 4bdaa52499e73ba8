"""Migration benchmark: vfmig against loopback TCP and QEMU 7.2, in one run on one machine.

For a 1 GiB guest, idle and dirtying (the dirtier, unthrottled, over a 128 MiB working set),
it measures vfmig's throughput and downtime (source here, destination in a second process)
and QEMU's for the same guest image run as a multiboot kernel, with the same downtime limit
and a max-bandwidth far above the link. References in the same run: loopback TCP (one stream)
and memcpy. Each figure is the median of REPS runs. Writes bench/results/migrate.json.

    .venv/bin/python bench/migrate_bench.py [--reps N] [--memory 1G]
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median, write_results  # noqa: E402
from qemu import Qemu, available  # noqa: E402

from vfmig import _core  # noqa: E402
from vfmig.demo import start_destination  # noqa: E402
from vfmig.migration import MigrationOptions, migrate  # noqa: E402
from vfmig.migration.policy import Policy  # noqa: E402
from vfmig.report.model import Report  # noqa: E402
from vfmig.vm import MicroVM  # noqa: E402

MADV_POPULATE_WRITE = 23  # Linux 5.14; not in the mmap module of Python 3.11
DOWNTIME_LIMIT_MS = 300
WSS_MIB = 128
WORKLOADS = {"idle": {"guest": "idle"}, "dirtying": {"guest": "dirtier", "rate_pps": 0, "wss_bytes": WSS_MIB << 20}}


def migrate_once(memory_mib: int, workload: dict[str, Any], opts: MigrationOptions) -> Report:
    """One vfmig migration of a settled VM to a `vfmig receive` process on loopback."""
    with MicroVM(memory=memory_mib << 20, **workload) as vm:
        dst, address = start_destination(run_seconds=0.3)
        try:
            vm.start()
            _settle(vm)
            return migrate(vm, address, opts)
        finally:
            dst.wait(60)


def vfmig_once(memory_mib: int, workload: dict[str, Any], channels: int) -> dict[str, float]:
    opts = MigrationOptions(channels=channels, policy=Policy(max_downtime_ms=DOWNTIME_LIMIT_MS))
    r = migrate_once(memory_mib, workload, opts)
    return {
        "throughput_Bps": r.throughput_Bps,
        "downtime_ms": r.downtime_ms or 0.0,
        "total_time_ms": r.total_time_ms,
        "bytes": r.bytes_sent,
        "iterations": len(r.iterations),
        "guest_observed_downtime_ms": r.guest_observed_downtime_ms or 0.0,
    }


def _settle(vm: MicroVM) -> None:
    """Wait until the guest has touched its memory once (first touches are slow here)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(s.passes >= 1 for s in vm.vcpu_stats()):
        time.sleep(0.1)
    time.sleep(0.5)


def qemu_once(memory_mib: int, workload: dict[str, Any]) -> dict[str, float]:
    guest = workload["guest"]
    append = f"wss={WSS_MIB}" if "wss_bytes" in workload else ""
    port = _free_port()
    with (
        Qemu(memory_mib, guest, append=append) as src,
        Qemu(memory_mib, guest, incoming=f"tcp:127.0.0.1:{port}", append=append) as dst,
    ):
        src.wait_console("idle: memory touched" if guest == "idle" else "dirtier: running", timeout=60)
        if guest == "dirtier":
            time.sleep(1.0)  # let it make a pass over its working set
        src.cmd("migrate-set-parameters", **{"downtime-limit": DOWNTIME_LIMIT_MS, "max-bandwidth": 100 << 30})
        info = src.migrate(port, poll_s=0.05)
        dst.cmd("query-status")
    total_ms = float(info["total-time"])
    transferred = int(info["ram"]["transferred"])
    return {
        "throughput_Bps": transferred / (total_ms / 1e3),
        "downtime_ms": float(info["downtime"]),
        "total_time_ms": total_ms,
        "bytes": transferred,
        "iterations": int(info["ram"].get("dirty-sync-count", 0)),
    }


def warm_memory(memory_mib: int) -> None:
    """Touch and free 3x the guest size first, as small pages (anonymous memory) and as huge
    pages (shared memory). On this machine (itself a VM) the first touch of memory the kernel
    never handed out before costs 2-12 us a page, ten times a warm page, so whoever ran first
    would pay for everyone. Both systems get warm memory this way."""
    _core.ref_memcpy((3 * memory_mib << 20) // 2, 1)
    size = 3 * memory_mib << 20
    fd = os.memfd_create("vfmig-warm")
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size) as m:
            m.madvise(mmap.MADV_HUGEPAGE)
            m.madvise(MADV_POPULATE_WRITE)
    finally:
        os.close(fd)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: median([r[k] for r in runs]) for k in runs[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--memory", type=int, default=1024, help="guest RAM in MiB")
    ap.add_argument("--channels", type=int, default=1)
    args = ap.parse_args()

    tcp = median([_core.ref_tcp_loopback(2 << 30) for _ in range(3)])
    mem = median([_core.ref_memcpy(256 << 20, 4) for _ in range(3)])
    print(f"references: loopback TCP {tcp / 1e9:.2f} GB/s, memcpy {mem / 1e9:.2f} GB/s")
    qemu_reason = available()
    results: dict[str, Any] = {}
    for name, workload in WORKLOADS.items():
        vruns, qruns, tcp_ratios = [], [], []
        for _ in range(args.reps):  # interleaved, so drift on the machine hits both alike
            warm_memory(args.memory)
            tcp_now = _core.ref_tcp_loopback(1 << 30)  # the reference right beside each run
            vruns.append(vfmig_once(args.memory, workload, args.channels))
            tcp_ratios.append(vruns[-1]["throughput_Bps"] / tcp_now)
            if qemu_reason is None:
                warm_memory(args.memory)
                qruns.append(qemu_once(args.memory, workload))
        v = _median_of(vruns)
        row: dict[str, Any] = {"vfmig": v, "vfmig_vs_tcp": median(tcp_ratios), "vfmig_vs_tcp_runs": tcp_ratios}
        if qruns:
            q = _median_of(qruns)
            row["qemu"] = q
            row["vfmig_vs_qemu_throughput"] = v["throughput_Bps"] / q["throughput_Bps"]
            row["vfmig_vs_qemu_downtime"] = v["downtime_ms"] / q["downtime_ms"] if q["downtime_ms"] else None
        results[name] = row
        q = row.get("qemu", {})
        print(
            f"{name:>9}: vfmig {v['throughput_Bps'] / 1e9:.2f} GB/s ({row['vfmig_vs_tcp']:.2f}x TCP), "
            f"downtime {v['downtime_ms']:.1f} ms | QEMU {q.get('throughput_Bps', 0) / 1e9:.2f} GB/s, "
            f"downtime {q.get('downtime_ms', 0):.1f} ms"
        )
    path = write_results(
        "migrate",
        {
            "memory_mib": args.memory,
            "channels": args.channels,
            "reps": args.reps,
            "downtime_limit_ms": DOWNTIME_LIMIT_MS,
            "dirtying_wss_mib": WSS_MIB,
            "reference": {"tcp_loopback_Bps": tcp, "memcpy_Bps": mem},
            "qemu_skipped": qemu_reason,
            "results": results,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
