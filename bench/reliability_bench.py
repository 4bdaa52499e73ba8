"""Reliability: the whole fault matrix (vfmig.faultmatrix), stray and unauthenticated connections
against a PSK-protected destination, and a soak of verified ping-pong migrations.

    python bench/reliability_bench.py [--sample] [--soak N] [--strays N] [--only SUBSTR]

Writes bench/results/reliability.json. The soak runs in this process: two long-lived Listeners
and a guest that migrates between them (a fresh destination VM each time, as a real receiver
builds one), so fd, thread and RSS growth from the first to the last migration are this process's.
The soak's VM has a simvf whose wire runs, driven by the vfdrv guest (the VF driver plus the
dirtier's workload): every migration carries the VF's state and the pages its DMA wrote.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, write_results  # noqa: E402

from vfmig import _core  # noqa: E402
from vfmig.auth import Authenticator  # noqa: E402
from vfmig.errors import MigrationError  # noqa: E402
from vfmig.faultmatrix import PROXY_ACTIONS, SIGNALS, Verdict, cases, run_case, sample, summarize  # noqa: E402
from vfmig.migration import MigrationOptions, migrate  # noqa: E402
from vfmig.migration.destination import Incoming, Listener  # noqa: E402
from vfmig.migration.policy import Policy  # noqa: E402
from vfmig.testing import serve_destination  # noqa: E402
from vfmig.vm import DeviceSpec, MicroVM  # noqa: E402

SOAK_VF = DeviceSpec(name="vf0", state_bytes=1 << 20, dma_rate=20_000)  # 1 MiB of state, 20k packets/s


def run_matrix(selected: list[Any]) -> list[Verdict]:
    out = []
    t0 = time.monotonic()
    for i, case in enumerate(selected, 1):
        v = run_case(case)
        out.append(v)
        mark = "ok " if v.survived else "BAD"
        print(
            f"[{i}/{len(selected)} {time.monotonic() - t0:6.0f}s] {mark} {case.id:44s} {v.seconds:5.2f}s "
            f"{v.outcome:12s} {(v.error or '')[:90]}" + (f"  PROBLEMS {v.problems}" if v.problems else ""),
            file=sys.stderr,
            flush=True,
        )
    return out


# unauthenticated and stray connections -----------------------------------------------------------
def refused_unauthenticated(n: int) -> dict[str, Any]:
    """n attempts that must be turned away by a PSK-protected Listener (no key, wrong key, garbage,
    a page channel out of nowhere, silence then close), then one keyed migration that must work."""
    import socket

    key = os.urandom(32)
    with tempfile.TemporaryDirectory() as tmp:
        good, bad = Path(tmp, "good.key"), Path(tmp, "bad.key")
        for p, k in ((good, key), (bad, os.urandom(32))):
            p.write_bytes(k.hex().encode())
            p.chmod(0o600)
        listener = Listener("tcp://127.0.0.1:0", auth=Authenticator(key.hex().encode(), allow_open=False))
        host, port = listener.sock.getsockname()[:2]
        kinds: dict[str, int] = {}
        with MicroVM(memory="64M", guest="idle") as vm, serve_destination(listener, 0.05, accept_timeout=120) as dst:
            vm.start()
            opts = MigrationOptions(handshake_timeout_s=5)
            for i in range(n):
                kind = ("no key", "wrong key", "garbage", "stray channel", "closed")[i % 5]
                kinds[kind] = kinds.get(kind, 0) + 1
                if kind in ("no key", "wrong key"):
                    opts.psk_file = str(bad) if kind == "wrong key" else None
                    with contextlib.suppress(MigrationError):
                        migrate(vm, listener.address, opts)
                        raise AssertionError(f"a migration with {kind} was accepted")
                    assert not vm.paused
                    continue
                with socket.create_connection((host, port)) as s:
                    if kind == "garbage":
                        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    elif kind == "stray channel":
                        s.sendall(_core.encode_record(_core.REC["CHANNEL"], _core.encode_channel(bytes(16), 0)))
                    if kind != "closed":
                        s.recv(4096)  # the ERROR that turns it away, or EOF
            deadline = time.monotonic() + 30
            while len(listener.refused) < n and time.monotonic() < deadline:
                time.sleep(0.01)  # the acceptor thread logs closed connections asynchronously
            refused = len(listener.refused)
            report = migrate(vm, dst.address, MigrationOptions(psk_file=str(good), verify=True))
            inc = dst.wait(60)
            ok = isinstance(inc, Incoming) and report.verification.memory_match is True
    return {
        "attempts": n,
        "kinds": kinds,
        "refused": refused,
        "reasons_sample": listener.refused[:5],
        "keyed_migration_after_them": "completed and verified" if ok else f"FAILED: {inc}",
    }


# soak --------------------------------------------------------------------------------------------
def _proc_status() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "Threads"):
            fields[k] = int(v.split()[0])
    return {"fds": len(os.listdir("/proc/self/fd")), "threads": fields["Threads"], "rss_kib": fields["VmRSS"]}


def _wait_driver(vm: MicroVM, packets: int = 100, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        st = vm.vf_driver()
        if st is not None and st["state_name"] == "running" and st["received"] >= packets:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the VF driver did not receive {packets} packets in {timeout:g} s: {st}")
        time.sleep(0.01)


def soak(n: int) -> dict[str, Any]:
    """n verified migrations ping-pong between two long-lived Listeners in this process."""
    listeners = [Listener("tcp://127.0.0.1:0"), Listener("tcp://127.0.0.1:0")]
    mismatches, failures = 0, []
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    downtimes = []
    device_bytes = []  # per migration: the VF's precopy + stop-copy bytes
    packet_errors = 0  # what the destination's guest reported, summed
    vm = MicroVM(memory="64M", guest="vfdrv", rate_pps=20_000, devices=(SOAK_VF,))
    vm.start()
    _wait_driver(vm)  # the VF's driver set the device up and receives: its DMA runs from the first migration
    t0 = time.monotonic()
    try:
        for i in range(n):
            lst = listeners[i % 2]
            got: list[Incoming | BaseException] = []

            def serve(lst: Listener = lst, got: list[Incoming | BaseException] = got) -> None:
                try:
                    got.append(lst.receive(30, run_seconds=0.05))
                except BaseException as e:  # noqa: BLE001 - recorded
                    got.append(e)

            th = threading.Thread(target=serve, name="soak-destination")
            th.start()
            opts = MigrationOptions(verify=True, policy=Policy(max_downtime_ms=50))
            try:
                report = migrate(vm, lst.address, opts)
            except MigrationError as e:
                failures.append(f"migration {i + 1}: {e}")
                th.join(60)
                if got and isinstance(got[0], Incoming):
                    got[0].vm.close()
                continue
            th.join(60)
            inc = got[0] if got else None
            if report.verification.memory_match is not True:
                mismatches += 1
            downtimes.append(report.downtime_ms)
            device_bytes.append(sum(d.precopy_bytes + d.stopcopy_bytes for d in report.devices))
            packet_errors += report.guest.packet_errors or 0
            if not report.devices or report.guest.packets_received is None:
                failures.append(f"migration {i + 1}: no VF state or no packet counters in the report")
            if not isinstance(inc, Incoming):
                failures.append(f"migration {i + 1}: destination {inc}")
                continue
            vm.close()  # the source, paused for good after the commit
            vm = inc.vm
            snap = _proc_status()
            if not first:
                first = snap
            last = snap
        driver = vm.vf_driver() or {}
        vf = vm.device_counters().get(SOAK_VF.name, {})
    finally:
        vm.close()
        for lst in listeners:
            lst.close()
    downtimes.sort()
    device_bytes.sort()
    return {
        "mode": "in one process: two long-lived Listeners, the guest migrates between them",
        "vm": "64 MiB, vfdrv guest at 20k pages/s, simvf with 1 MiB of state and its wire at 20k packets/s",
        "soak_migrations": n,
        "soak_completed": len(downtimes),
        "soak_mismatches": mismatches,
        "soak_failures": failures,
        "seconds": round(time.monotonic() - t0, 1),
        "downtime_ms_median": downtimes[len(downtimes) // 2] if downtimes else None,
        "device_bytes_median": device_bytes[len(device_bytes) // 2] if device_bytes else None,
        "packet_errors": packet_errors,
        # after the last migration: the guest's driver and the VF it runs on now
        "vf_driver": {k: driver.get(k) for k in ("state_name", "received", "dropped_seen", "errors", "tx_sent")},
        "vf_counters": vf,
        "first": first,
        "last": last,
        "fd_growth": last.get("fds", 0) - first.get("fds", 0),
        "thread_growth": last.get("threads", 0) - first.get("threads", 0),
        "rss_growth_kib": last.get("rss_kib", 0) - first.get("rss_kib", 0),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sample", action="store_true", help="only the test sample of the matrix")
    ap.add_argument("--only", default="", help="only cases whose id contains this")
    ap.add_argument("--soak", type=int, default=100)
    ap.add_argument("--strays", type=int, default=50)
    ap.add_argument("--out", default="reliability")
    args = ap.parse_args()
    t0 = time.monotonic()
    selected = sample() if args.sample else list(cases(PROXY_ACTIONS + SIGNALS))
    selected = [c for c in selected if args.only in c.id]
    verdicts = run_matrix(selected)
    matrix_s = time.monotonic() - t0
    strays = refused_unauthenticated(args.strays) if args.strays else None
    soaked = soak(args.soak) if args.soak else None
    fuzz_path = RESULTS / "fuzz.json"
    fuzz = json.loads(fuzz_path.read_text()) if fuzz_path.exists() else {}
    doc: dict[str, Any] = {
        **summarize(verdicts),
        "matrix_seconds": round(matrix_s, 1),
        "case_seconds_max": max((v.seconds for v in verdicts), default=None),
        "outcomes": _count(v.outcome for v in verdicts),
        "fuzz_execs": fuzz.get("fuzz_execs"),
        "fuzz_crashes": fuzz.get("fuzz_crashes"),
        "refused_unauthenticated": strays["refused"] if strays else None,
        "unauthenticated_run": strays,
        "soak_migrations": soaked["soak_migrations"] if soaked else None,
        "soak_mismatches": soaked["soak_mismatches"] if soaked else None,
        "soak_packet_errors": soaked["packet_errors"] if soaked else None,
        "fd_growth": soaked["fd_growth"] if soaked else None,
        "thread_growth": soaked["thread_growth"] if soaked else None,
        "rss_growth_kib": soaked["rss_growth_kib"] if soaked else None,
        "soak": soaked,
        "seconds": round(time.monotonic() - t0, 1),
    }
    path = write_results(args.out, doc)
    print(
        f"{doc['cases_survived']}/{doc['cases_tried']} cases survived in {matrix_s:.0f} s; "
        f"refused {doc['refused_unauthenticated']}; soak {doc['soak_migrations']} migrations, "
        f"{doc['soak_mismatches']} mismatches, growth fds {doc['fd_growth']} threads {doc['thread_growth']} "
        f"RSS {doc['rss_growth_kib']} KiB -> {path}"
    )
    soak_ok = not soaked or (
        soaked["soak_completed"] == soaked["soak_migrations"]
        and not soaked["soak_mismatches"]
        and not soaked["packet_errors"]
        and soaked["fd_growth"] <= 0
        and soaked["thread_growth"] <= 0
    )
    return 0 if doc["cases_survived"] == doc["cases_tried"] and soak_ok else 1


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


if __name__ == "__main__":
    raise SystemExit(main())
