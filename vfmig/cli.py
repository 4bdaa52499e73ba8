"""The vfmig command line. Every error is one line on stderr and a non-zero exit code."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from vfmig.errors import VfmigError
from vfmig.units import parse_size

Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        print(f"vfmig: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _emit(args: argparse.Namespace, doc: dict[str, Any], text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(text)


# vm run ----------------------------------------------------------------------------------------
def add_guest_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory", default="256M", help="guest RAM (default 256M; 64M..16G and more)")
    p.add_argument("--vcpus", type=int, default=1)
    p.add_argument("--guest", default="dirtier", help="dirtier or idle")
    p.add_argument(
        "--rate", type=int, default=0, help="dirtier pages/s over all vCPUs (0: as fast as it can)"
    )
    p.add_argument("--pattern", default="sequential", help="sequential, random or hotcold")
    p.add_argument("--wss", default="0", help="working-set size (default: all RAM above 4 MiB)")
    p.add_argument("--tracker", default="bitmap", help="dirty tracker the VM is built for: bitmap or ring")


def guest_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "memory": parse_size(args.memory),
        "vcpus": args.vcpus,
        "guest": args.guest,
        "tracker": args.tracker,
        "rate_pps": args.rate,
        "pattern": args.pattern,
        "wss_bytes": parse_size(args.wss),
    }


def cmd_vm_run(args: argparse.Namespace) -> int:
    from vfmig.vm import MicroVM

    if args.seconds <= 0:
        raise VfmigError("--seconds must be positive")
    with MicroVM(**guest_kwargs(args)) as vm:
        vm.start()
        time.sleep(min(0.3, args.seconds / 4))  # boot and first clock reads
        rate = vm.measure_rate(max(args.seconds - 0.3, 0.1))
        pauses = []
        for _ in range(5):
            pauses.append(vm.pause())
            t_paused = vm.touches()
            time.sleep(0.02)
            moved = vm.touches() - t_paused
            vm.resume()
            time.sleep(0.02)
        st = vm.stats()
        if st["failed"]:
            raise VfmigError(st["failed"])
        doc = {
            "memory": vm.config.memory,
            "vcpus": vm.config.vcpus,
            "guest": vm.config.guest,
            "seconds": args.seconds,
            "dirty_rate_pps": round(rate),
            "touches": st["touches"],
            "exits": st["exits"],
            "pause_latency_us": {"mean": sum(pauses) / len(pauses) / 1e3, "max": max(pauses) / 1e3},
            "resume_latency_us": {"mean": sum(st["resume_latency_ns"]) / len(pauses) / 1e3},
            "moved_while_paused": moved,
            "max_gap_ms": st["max_gap_ns"] / 1e6,
        }
    text = (
        f"guest {doc['guest']} on {doc['vcpus']} vCPU(s), {doc['memory'] >> 20} MiB, {args.seconds:g} s\n"
        f"  dirty rate      {doc['dirty_rate_pps']:,} pages/s\n"
        f"  exits           " + ", ".join(f"{k}={v}" for k, v in doc["exits"].items() if v) + "\n"
        f"  pause latency   mean {doc['pause_latency_us']['mean']:.1f} us, "
        f"max {doc['pause_latency_us']['max']:.1f} us\n"
        f"  resume latency  mean {doc['resume_latency_us']['mean']:.1f} us"
    )
    _emit(args, doc, text)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    print("vfmig demo: live migration is not implemented yet; running the micro-VM alone.", file=sys.stderr)
    return cmd_vm_run(args)


def cmd_doctor(args: argparse.Namespace) -> int:
    from vfmig import doctor

    checks = doctor.run_checks()
    _emit(args, doctor.as_json(checks), doctor.format_text(checks))
    return 0 if doctor.summary_ok(checks) else 1


# parser ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="vfmig", description="Live migration of VMs with assigned PCI devices, with measured cost."
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    vm = sub.add_parser("vm", help="run a micro-VM")
    vmsub = vm.add_subparsers(dest="vm_command", required=True, parser_class=_Parser)
    run = vmsub.add_parser("run", help="run a micro-VM and report its dirty rate, exits and pause latency")
    add_guest_options(run)
    run.add_argument("--seconds", type=float, default=5.0)
    run.add_argument("--json", action="store_true", help="print JSON")
    run.set_defaults(func=cmd_vm_run)

    doc = sub.add_parser("doctor", help="report what this host supports")
    doc.add_argument("--json", action="store_true")
    doc.set_defaults(func=cmd_doctor)

    demo = sub.add_parser("demo", help="the main job: run the built-in micro-VM and report")
    add_guest_options(demo)
    demo.set_defaults(memory="512M", rate=200_000)
    demo.add_argument("--seconds", type=float, default=3.0)
    demo.add_argument("--json", action="store_true", help="print JSON")
    demo.set_defaults(func=cmd_demo)

    for register in _EXTRA:
        register(sub)
    return p


# Later subcommands (migrate, receive, demo) register themselves here.
_EXTRA: list[Callable[[Any], None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except VfmigError as e:
        print(f"vfmig: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vfmig: interrupted", file=sys.stderr)
        return 130
