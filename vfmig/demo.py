"""`vfmig demo`: live-migrate the built-in micro-VM from this process to a second one on
loopback, let the guest run there for a second, and print the report."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from vfmig.errors import MigrationError
from vfmig.guests import DEVICE_GUEST
from vfmig.migration.source import Migration, MigrationOptions
from vfmig.units import human_bytes, parse_size
from vfmig.vm import DeviceSpec, MicroVM

PROCESS_START_TIMEOUT_S = 30
# The demo's VM has a VF unless told otherwise (--device none): an emulated NIC VF whose wire
# delivers 20k packets/s into the guest, with 16 MiB of device state to migrate.
DEMO_DEVICES = (DeviceSpec("simvf", "vf0", state_bytes=16 << 20, dma_rate=20_000),)


def start_process(args: list[str], ready: str, what: str) -> tuple[subprocess.Popen[str], str]:
    """Start `vfmig ARGS` and wait for its first line of output, which must contain `ready`;
    returns the process and that line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "vfmig", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + PROCESS_START_TIMEOUT_S
    line = proc.stdout.readline()
    if ready not in line or time.monotonic() > deadline:
        proc.kill()
        err = proc.stderr.read() if proc.stderr else ""
        raise MigrationError(f"the {what} process did not start: {(line + err).strip()}")
    return proc, line


def start_destination(run_seconds: float, extra: list[str] | None = None) -> tuple[subprocess.Popen[str], str]:
    """A `vfmig receive` process on a free loopback port (with `extra` options; later ones win);
    returns it and its address."""
    args = ["receive", "--listen", "tcp://127.0.0.1:0", "--run-seconds", str(run_seconds), "--timeout", "60"]
    proc, line = start_process([*args, *(extra or [])], "listening on", "destination")
    return proc, line.rsplit(" ", 1)[1].strip()  # "vfmig: listening on tcp://127.0.0.1:PORT"


def run_demo(
    args: argparse.Namespace,
    opts: MigrationOptions,
    progress: Callable[[str, dict[str, Any]], None],
    write_json: Callable[[str | None, dict[str, Any]], None],
) -> int:
    memory = parse_size(args.memory)
    tracker = opts.tracker or "bitmap"
    given = getattr(args, "device", None)
    devices = DEMO_DEVICES if given is None else tuple(d for d in given if d is not None)
    guest = args.guest or (DEVICE_GUEST if devices else "dirtier")
    guest_ack = getattr(args, "guest_ack", "normal")
    kw = {
        "vcpus": args.vcpus,
        "guest": guest,
        "tracker": tracker,
        "rate_pps": args.rate,
        "pattern": args.pattern,
        "guest_ack": guest_ack,
    }
    with MicroVM(memory=memory, devices=devices, **kw) as vm:
        opts.validate(vm)  # bad options fail before any process starts
        print(
            f"vfmig demo: {guest} guest, {memory >> 20} MiB, {args.vcpus} vCPU(s), "
            f"{args.rate:,} pages/s; tracker {tracker}, {opts.channels} channel(s)",
            file=sys.stderr,
        )
        for d in devices:
            print(
                f"  device {d.name}: {d.kind}, {human_bytes(d.state_bytes)} of state, {d.dma_rate:,} packets/s, "
                f"precopy {'on' if d.precopy else 'off'}",
                file=sys.stderr,
            )
        if devices:
            print(
                f"  guest handshake: deadline {opts.handshake_deadline_ms} ms, the VF driver acks {guest_ack}",
                file=sys.stderr,
            )
        dst, address = start_destination(run_seconds=1.0)
        try:
            vm.start()
            time.sleep(1.0)  # let the guest populate its memory and reach its rate
            print(
                f"  source guest running, counter {vm.touches():,}; migrating to {address} (destination pid {dst.pid})",
                file=sys.stderr,
            )
            report = Migration(vm, address, opts, progress).run()
        except BaseException:
            dst.kill()
            raise
        out, err = dst.communicate(timeout=60)
    if dst.returncode != 0:
        raise MigrationError(f"the destination process failed: {err.strip() or out.strip()}")
    write_json(args.json, report.to_dict())
    if args.json != "-":
        print(report.summary())
    return 0
