"""The vfmig command line. Every error is one line on stderr and a non-zero exit code."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import stat
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TextIO

from vfmig.errors import VfmigError
from vfmig.units import parse_size

Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage dump
        print(f"vfmig: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _emit(args: argparse.Namespace, doc: dict[str, Any], text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(text)


# devices ---------------------------------------------------------------------------------------
DEVICE_HELP = (
    "add a device: simvf[,name=vf0,state=SIZE,dma_rate=PPS,precopy=on|off,migration=on|off] "
    "(repeatable; defaults: state=1M, dma_rate=10000, on, on)"
)


def device_arg(text: str) -> Any:
    """argparse type of --device: a checked DeviceSpec, or "none"."""
    from vfmig.errors import ConfigError
    from vfmig.vm import parse_device

    if text == "none":
        return None
    try:
        return parse_device(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def devices_of(args: argparse.Namespace, default: Sequence[Any] = ()) -> tuple[Any, ...]:
    """The --device specs (`--device none`: no device), or `default` when none was given."""
    given = getattr(args, "device", None)
    if given is None:
        return tuple(default)
    return tuple(d for d in given if d is not None)


def guest_of(args: argparse.Namespace, devices: Sequence[Any]) -> str:
    """--guest, or the VF driver when the VM has a simvf, else the dirtier."""
    from vfmig.guests import DEVICE_GUEST

    if args.guest:
        return str(args.guest)
    return DEVICE_GUEST if any(d.kind == "simvf" for d in devices) else "dirtier"


def _device_lines(devices: dict[str, dict[str, int]], driver: dict[str, Any] | None) -> list[str]:
    lines = [
        f"  device {name:<8} sent {c['sent']:,} packets: delivered {c['delivered']:,}, dropped {c['dropped']:,}; "
        f"tx {c['tx_ok']:,} ok, {c['tx_bad']:,} bad"
        for name, c in devices.items()
    ]
    if driver is not None:
        lines.append(
            f"  VF driver       {driver['state_name']}: received {driver['received']:,}, dropped "
            f"{driver['dropped_seen']:,}, errors {driver['errors']:,}; sent {driver['tx_sent']:,}"
        )
    return lines


GUEST_ACK_HELP = (
    "how the VF driver answers the migration handshake: normal (quiesce and ack at once), never (a stuck "
    "driver), late (ack after 500 ms, past the deadline) or slow:US (ack after US microseconds); default normal"
)


def guest_ack_arg(text: str) -> str:
    """argparse type of --guest-ack: checked as the guest's boot parameters take it."""
    from vfmig.errors import ConfigError
    from vfmig.guests import GuestParams

    try:
        GuestParams(guest_ack=text).ack()
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def handshake_deadline_arg(text: str) -> int:
    """argparse type of --handshake-deadline: whole ms, 0..10000."""
    from vfmig.errors import ConfigError
    from vfmig.migration.source import check_handshake_deadline

    try:
        ms = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of milliseconds: {text!r}") from None
    try:
        check_handshake_deadline(ms)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return ms


# vm run ----------------------------------------------------------------------------------------
def add_guest_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory", default="256M", help="guest RAM (default 256M; 64M..16G and more)")
    p.add_argument("--vcpus", type=int, default=1)
    p.add_argument("--guest", default=None, help="dirtier, idle or vfdrv (default: vfdrv with a simvf, else dirtier)")
    p.add_argument("--device", action="append", type=device_arg, metavar="SPEC", help=DEVICE_HELP)
    p.add_argument("--rate", type=int, default=0, help="dirtier pages/s over all vCPUs (0: as fast as it can)")
    p.add_argument("--pattern", default="sequential", help="sequential, random, hotcold or fresh (new data)")
    p.add_argument("--wss", default="0", help="working-set size (default: all RAM above 4 MiB)")
    p.add_argument("--tracker", default="bitmap", help="dirty tracker the VM is built for: bitmap or ring")
    p.add_argument("--guest-ack", type=guest_ack_arg, default="normal", metavar="MODE", help=GUEST_ACK_HELP)


def guest_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    devices = devices_of(args)
    return {
        "memory": parse_size(args.memory),
        "vcpus": args.vcpus,
        "guest": guest_of(args, devices),
        "devices": devices,
        "tracker": args.tracker,
        "rate_pps": args.rate,
        "pattern": args.pattern,
        "wss_bytes": parse_size(args.wss),
        "guest_ack": args.guest_ack,
    }


def cmd_vm_run(args: argparse.Namespace) -> int:
    from vfmig.vm import MicroVM

    if args.seconds <= 0 and args.control is None:
        raise VfmigError("--seconds must be positive")
    with MicroVM(**guest_kwargs(args)) as vm:
        vm.start()
        if args.control is not None:
            return _serve_control(args, vm)
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
            "devices": st["devices"],
            "vf_driver": st["vf_driver"],
        }
    text = (
        f"guest {doc['guest']} on {doc['vcpus']} vCPU(s), {doc['memory'] >> 20} MiB, {args.seconds:g} s\n"
        f"  dirty rate      {doc['dirty_rate_pps']:,} pages/s\n"
        f"  exits           " + ", ".join(f"{k}={v}" for k, v in doc["exits"].items() if v) + "\n"
        f"  pause latency   mean {doc['pause_latency_us']['mean']:.1f} us, "
        f"max {doc['pause_latency_us']['max']:.1f} us\n"
        f"  resume latency  mean {doc['resume_latency_us']['mean']:.1f} us"
    )
    text = "\n".join([text, *_device_lines(doc["devices"], doc["vf_driver"])])
    _emit(args, doc, text)
    return 0


def add_migration_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tracker",
        choices=("bitmap", "ring"),
        default=None,
        help="dirty tracker (default: bitmap; the VM is built for it)",
    )
    p.add_argument("--channels", type=int, default=2, help="parallel page channels (1..16, default 2)")
    p.add_argument("--max-downtime", type=float, default=300.0, metavar="MS", help="downtime limit (default 300)")
    p.add_argument("--bandwidth", default="0", help="bytes/s over all channels, e.g. 500M (default unlimited)")
    p.add_argument("--max-iterations", type=int, default=30)
    p.add_argument("--time-limit", type=float, default=120.0, metavar="S")
    p.add_argument(
        "--auto-converge", action="store_true", help="throttle vCPUs that dirty faster than precopy can converge"
    )
    p.add_argument(
        "--limit-action",
        choices=("force", "cancel"),
        default="force",
        help="when the downtime limit cannot be met (precopy stops converging, or --max-iterations/--time-limit "
        "is reached): stop anyway and report the limit exceeded (force, default), or end the migration with "
        "the source running (cancel)",
    )
    p.add_argument(
        "--delta",
        choices=("auto", "always", "off"),
        default="auto",
        help="delta pages: send a re-dirtied page as its XOR against the copy sent before; auto (default) "
        "engages them as the first remedy at the first sign precopy will not converge",
    )
    p.add_argument(
        "--delta-cache",
        metavar="SIZE",
        default="0",
        help="memory for last-sent pages (default: a quarter of guest RAM; when delta pages engage on a "
        "larger dirty set, that set and a quarter more, up to half of RAM and of the host's available memory)",
    )
    p.add_argument(
        "--compress",
        metavar="zstd[:LEVEL]",
        default="",
        help="compress page runs on every channel (zstd level 1..19, default 1); pays only on links slower than "
        "the CPU compresses, about 1 Gbit/s and below",
    )
    p.add_argument("--verify", action="store_true", help="check destination RAM against the source's, per page")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON ('-': stdout)")
    p.add_argument(
        "--pause-timeout",
        type=int,
        metavar="MS",
        help="fail the migration (the source keeps running) if the vCPUs do not all stop within MS (default 1 s)",
    )
    p.add_argument("--psk-file", metavar="PATH", help="pre-shared key the destination asks for (see receive)")
    p.add_argument(
        "--handshake-deadline",
        type=handshake_deadline_arg,
        default=None,
        metavar="MS",
        help="how long the guest's VF driver may take to quiesce before the stop (default 50; 0: don't ask it, "
        "its driver on the destination then resets the device)",
    )
    p.add_argument(
        "--probes",
        action="store_true",
        help="watch both sides with BPF probes (downtime, interrupt and handshake latency as the kernel saw them)",
    )


def migration_options(args: argparse.Namespace) -> Any:
    from vfmig.migration.policy import Policy
    from vfmig.migration.source import MigrationOptions
    from vfmig.units import parse_rate, parse_size

    extra: dict[str, Any] = {} if args.pause_timeout is None else {"pause_timeout_ms": args.pause_timeout}
    if args.handshake_deadline is not None:
        extra["handshake_deadline_ms"] = args.handshake_deadline
    return MigrationOptions(
        **extra,
        channels=args.channels,
        tracker=args.tracker,
        bandwidth=parse_rate(args.bandwidth),
        verify=args.verify,
        psk_file=args.psk_file,
        probes=args.probes,
        delta=args.delta,
        delta_cache=parse_size(args.delta_cache),
        compress=args.compress,
        policy=Policy(
            max_downtime_ms=args.max_downtime,
            max_iterations=args.max_iterations,
            time_limit_s=args.time_limit,
            auto_converge=args.auto_converge,
            limit_action=args.limit_action,
        ),
    )


def parse_uri_host(uri: str) -> str:
    from vfmig.migration.wire import parse_uri

    return parse_uri(uri)[0]


def _write_json(path: str | None, doc: dict[str, Any]) -> None:
    if not path:
        return
    text = json.dumps(doc, indent=2)
    if path == "-":
        print(text)
    else:
        try:
            with open(path, "w") as f:
                f.write(text + "\n")
        except OSError as e:
            raise VfmigError(f"cannot write {path}: {e.strerror or e}") from None


def _open_report(path: str | None) -> tuple[TextIO | None, bool]:
    """Open --json PATH before anything migrates, so a path we cannot write fails with nothing
    moved. Returns the file and whether we created it. Appending leaves an existing file as it is
    until the report replaces it."""
    if not path or path == "-":
        return None, False
    existed = os.path.exists(path)
    try:
        return open(path, "a"), not existed
    except OSError as e:
        raise VfmigError(f"cannot write the report to {path}: {e.strerror or e}") from None


def _write_report(out: TextIO | None, path: str | None, doc: dict[str, Any]) -> None:
    """Write the report into the file _open_report opened (replacing what was there)."""
    if out is None:
        return
    try:
        with out:
            if stat.S_ISREG(os.fstat(out.fileno()).st_mode):
                out.seek(0)
                out.truncate()
            out.write(json.dumps(doc, indent=2) + "\n")
    except OSError as e:
        raise VfmigError(f"its report was not written to {path}: {e.strerror or e}") from None


def _drop_report(f: TextIO | None, created: bool) -> None:
    """No report after all: close, and remove the file if it was ours."""
    if f is not None:
        f.close()
        if created:
            with contextlib.suppress(OSError):
                os.unlink(f.name)


def _progress(event: str, data: dict[str, Any]) -> None:
    if event == "iteration":
        device = f", device state {data['device_bytes'] / 2**20:.1f} MiB" if data.get("device_bytes") else ""
        print(
            f"  iteration {data['index']}: {data['dirty_pages']:,} dirty pages, "
            f"{data['bytes'] / 2**20:.1f} MiB in {data['duration_ms']:.1f} ms{device}",
            file=sys.stderr,
        )
    elif event == "stopped":
        device = f", device state {data['device_bytes'] / 2**10:.1f} KiB" if data.get("device_bytes") else ""
        print(f"  stop-and-copy: {data['final_pages']:,} pages with the guest stopped{device}", file=sys.stderr)
    elif event == "handshake":
        took = f"acked in {data['latency_us']} us" if data.get("outcome") == "acked" else data.get("outcome")
        print(f"  guest handshake: {took} (deadline {data['deadline_ms']} ms)", file=sys.stderr)
    elif event == "resumed":
        print(f"  guest resumed on {data['on']}", file=sys.stderr)
    elif event == "remedy":
        print(f"  round {data['iteration']}: {data['remedy']} ({data['detail']})", file=sys.stderr)
    elif event == "cancel":
        if data.get("accepted"):
            print("  cancelling the migration (Ctrl-C again to stop waiting for the outcome)", file=sys.stderr)
        else:
            print(f"  cannot cancel: {data.get('reason')}", file=sys.stderr)


def cmd_migrate(args: argparse.Namespace) -> int:
    from vfmig import control
    from vfmig.report.model import Report
    from vfmig.vm import check_pause_timeout

    opts = migration_options(args)
    opts.policy.validate()  # the rest needs the VM; the VM process checks it all again
    check_pause_timeout(opts.pause_timeout_ms)
    path = args.control or control.DEFAULT_PATH
    out, created = _open_report(args.json)
    try:
        answer = control.request_migration(path, args.to, opts, progress=_progress)
    except KeyboardInterrupt:
        _drop_report(out, created)
        print(f"vfmig: error: interrupted; `vfmig vm status --control {path}` tells how it ended", file=sys.stderr)
        return 130
    except BaseException:
        _drop_report(out, created)
        raise
    if not answer.get("ok"):
        _drop_report(out, created)
        raise VfmigError(_failure_line(answer, path))
    # The guest runs on the destination now: say what went wrong, never raise.
    doc = answer["report"]
    try:
        print(json.dumps(doc, indent=2) if args.json == "-" else Report.from_dict(doc).summary(), flush=True)
    except (ValueError, KeyError, TypeError) as e:
        print(f"vfmig: warning: the migration completed; its summary failed: {e!r}", file=sys.stderr)
    try:
        _write_report(out, args.json, doc)
    except VfmigError as e:
        print(f"vfmig: error: the migration completed, but {e}", file=sys.stderr)
        return 2
    return 0


def _failure_line(answer: dict[str, Any], path: str) -> str:
    """One line that says what failed and where the guest is, from the VM process's answer."""
    err, kind, source = answer.get("error"), answer.get("kind"), answer.get("source")
    if kind == "refused":
        return f"cannot migrate: {err}"
    head = str(err) if kind == "cancelled" else f"migration failed: {err}"
    if kind == "in_doubt" or source is None:
        return head  # an in-doubt error says the source is paused, and how to resume it
    where = {
        "running": "the source VM keeps running",
        "paused": f"the source VM is paused: `vfmig vm resume --control {path}` resumes it",
    }.get(source, f"the source VM is {source}")
    return f"{head}; {where}"


def cmd_receive(args: argparse.Namespace) -> int:
    from vfmig import _core
    from vfmig.auth import Authenticator, is_loopback, read_key
    from vfmig.migration.destination import Limits, Listener, describe

    auth = Authenticator(
        read_key(args.psk_file) if args.psk_file else None,
        allow_open=args.allow_unauthenticated or is_loopback(parse_uri_host(args.listen)),
    )
    limits = Limits()
    if args.max_memory:
        limits.max_memory = parse_size(args.max_memory)
    if args.max_vcpus is not None:
        limits.max_vcpus = args.max_vcpus
    if limits.max_memory <= 0 or not 1 <= limits.max_vcpus <= _core.MAX_VCPUS:
        raise VfmigError(f"--max-memory must be positive and --max-vcpus 1..{_core.MAX_VCPUS}")
    report, created = _open_report(args.json)  # a path we cannot write fails before anything arrives
    try:
        with Listener(args.listen, auth, limits) as lst:
            print(f"vfmig: listening on {lst.address}", flush=True)
            try:
                inc = lst.receive(args.timeout, run_seconds=args.run_seconds)
            finally:
                for why in lst.refused:
                    print(f"vfmig: refused a connection from {why}", file=sys.stderr)
    except BaseException:
        _drop_report(report, created)
        raise
    with inc.vm:  # the guest runs here now: nothing below may end it but the operator
        g = inc.guest
        if inc.source_lost:
            print(f"vfmig: warning: {inc.source_lost}", file=sys.stderr, flush=True)
        if "touches_after" in g:
            print(
                f"vfmig: guest running here; counter {g['touches_after']:,}, wrap edges {g['wrap_edges']}",
                flush=True,
            )
        elif g.get("error"):
            print(f"vfmig: warning: {g['error']}", file=sys.stderr, flush=True)
        p = g.get("packets")
        if p:
            print(
                f"vfmig: VF driver here: received {p['received']:,}, dropped {p['dropped']:,}, "
                f"errors {p['errors']:,}; sent {p['tx']:,}",
                flush=True,
            )
        if args.json == "-":
            print(json.dumps(describe(inc), indent=2), flush=True)
        try:
            _write_report(report, args.json, describe(inc))
        except VfmigError as e:
            print(f"vfmig: warning: the guest runs here, but {e}", file=sys.stderr, flush=True)
        if args.keep_running:
            while True:
                time.sleep(1)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from vfmig.demo import run_demo

    _drop_report(*_open_report(args.json))  # a --json path we cannot write fails before the demo starts
    return run_demo(args, migration_options(args), _progress, _write_json)


def _serve_control(args: argparse.Namespace, vm: Any) -> int:
    from vfmig import control

    path = args.control or control.DEFAULT_PATH
    server = control.ControlServer(vm, path)
    server.listen()  # before saying so: a client may connect as soon as it reads the line
    print(f"vfmig: VM running; control socket {path}", flush=True)
    report = server.serve(args.seconds if args.seconds > 0 else 0)
    if report is None:
        print("vfmig: VM stopped (not migrated)")
    else:
        print(f"vfmig: VM migrated; downtime {report['downtime_ms']:.2f} ms")
    return 0


def _control_request(args: argparse.Namespace, cmd: str) -> dict[str, Any]:
    from vfmig import control

    path = args.control or control.DEFAULT_PATH
    answer = control.request(path, {"cmd": cmd}, timeout=control.REQUEST_TIMEOUT_S if cmd != "stop" else 600)
    if not answer.get("ok"):
        raise VfmigError(f"cannot {cmd}: {answer.get('error')}")
    return answer


def _on(flag: object) -> str:
    return "on" if flag else "off"


def cmd_vm_status(args: argparse.Namespace) -> int:
    st = _control_request(args, "status")["status"]
    lines = [
        f"state           {st['state']}" + (f" ({st['failed']})" if st.get("failed") else ""),
        f"uptime          {st['uptime_s']:.1f} s",
        f"VM              {st['guest']}, {st['memory'] >> 20} MiB, {st['vcpus']} vCPU(s); tracker {st['tracker']}",
    ]
    for d in st.get("devices", []):
        lines.append(
            f"device          {d['name']}: {d['kind']}, state {d['state_bytes'] >> 10} KiB, "
            f"{d['dma_rate']:,} packets/s, precopy {_on(d['precopy'])}, migration {_on(d['migration'])}"
        )
    if st.get("migration"):
        lines.append(f"migration       to {st['migration']['to']}, at {st['migration']['phase']}")
    last = st.get("last_migration")
    if last:
        detail = f" ({last['error']})" if last.get("error") else ""
        lines.append(f"last migration  {last['status']} to {last['to']}{detail}")
    _emit(args, st, "\n".join(lines))
    return 0


def cmd_vm_resume(args: argparse.Namespace) -> int:
    _control_request(args, "resume")
    print("vfmig: VM resumed")
    return 0


def cmd_vm_stop(args: argparse.Namespace) -> int:
    state = _control_request(args, "stop").get("state")
    print("vfmig: VM was migrated away; its process ended" if state == "migrated" else "vfmig: VM stopped")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from vfmig import doctor

    checks = doctor.run_checks()
    _emit(args, doctor.as_json(checks), doctor.format_text(checks))
    return 0 if doctor.summary_ok(checks) else 1


# parser ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vfmig", description="Live migration of VMs with assigned PCI devices, with measured cost.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    vm = sub.add_parser("vm", help="run a micro-VM")
    vmsub = vm.add_subparsers(dest="vm_command", required=True, parser_class=_Parser)
    run = vmsub.add_parser("run", help="run a micro-VM and report its dirty rate, exits and pause latency")
    add_guest_options(run)
    run.add_argument("--seconds", type=float, default=5.0, help="how long to run (with --control, 0: until migrated)")
    run.add_argument("--json", action="store_true", help="print JSON")
    run.add_argument(
        "--control",
        nargs="?",
        const="",
        default=None,
        metavar="PATH",
        help="serve a control socket so `vfmig migrate` can move this VM (runs until migrated)",
    )
    run.set_defaults(func=cmd_vm_run)
    for name, func, text in (
        ("status", cmd_vm_status, "state, uptime, shape and last migration of a VM run with --control"),
        ("resume", cmd_vm_resume, "resume a paused VM (e.g. after a migration failed at its commit)"),
        ("stop", cmd_vm_stop, "stop a VM run with --control; its process exits"),
    ):
        ctl = vmsub.add_parser(name, help=text)
        ctl.add_argument("--control", default=None, metavar="PATH", help="the VM's control socket")
        if name == "status":
            ctl.add_argument("--json", action="store_true", help="print JSON")
        ctl.set_defaults(func=func)

    doc = sub.add_parser("doctor", help="report what this host supports")
    doc.add_argument("--json", action="store_true")
    doc.set_defaults(func=cmd_doctor)

    mig = sub.add_parser("migrate", help="live-migrate a VM run by `vfmig vm run --control`")
    mig.add_argument("--to", required=True, help="destination, tcp://HOST:PORT (see `vfmig receive`)")
    mig.add_argument("--control", default=None, help="the VM's control socket (default: vm run's default)")
    add_migration_options(mig)
    mig.set_defaults(func=cmd_migrate)

    rcv = sub.add_parser("receive", help="wait for one incoming migration, then run the guest")
    rcv.add_argument("--listen", required=True, help="tcp://HOST:PORT (port 0: any free port)")
    rcv.add_argument(
        "--run-seconds",
        type=float,
        default=0.3,
        help="run the migrated guest this long before reporting and exiting (default 0.3; the source's "
        "migrate waits for this report)",
    )
    rcv.add_argument("--keep-running", action="store_true", help="run the guest until interrupted")
    rcv.add_argument("--timeout", type=float, default=None, help="give up if no source connects in time")
    rcv.add_argument("--json", metavar="PATH", help="write the destination's record as JSON ('-': stdout)")
    rcv.add_argument(
        "--psk-file",
        metavar="PATH",
        help="accept only sources that prove they hold this pre-shared key (mode 600, >= 16 bytes); "
        "without it, only a loopback address accepts migrations",
    )
    rcv.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="accept sources without a key on a non-loopback address (anyone who can reach the port can then "
        "make this host build and run a VM)",
    )
    rcv.add_argument("--max-memory", metavar="SIZE", help="refuse VMs with more RAM (default: this host's RAM)")
    rcv.add_argument("--max-vcpus", type=int, metavar="N", help="refuse VMs with more vCPUs (default: all vfmig runs)")
    rcv.set_defaults(func=cmd_receive)

    demo = sub.add_parser("demo", help="the main job: live-migrate the built-in micro-VM between two processes")
    add_migration_options(demo)
    demo.add_argument("--memory", default="512M")
    demo.add_argument("--vcpus", type=int, default=1)
    demo.add_argument("--guest", default=None, help="default: vfdrv with a simvf, else dirtier")
    demo.add_argument(
        "--device",
        action="append",
        type=device_arg,
        metavar="SPEC",
        help=DEVICE_HELP + "; default simvf,state=16M,dma_rate=20000; `none`: no device",
    )
    demo.add_argument("--rate", type=int, default=100_000, help="guest dirty rate, pages/s (default converges)")
    demo.add_argument("--pattern", default="sequential", help="sequential, random, hotcold or fresh")
    demo.add_argument("--guest-ack", type=guest_ack_arg, default="normal", metavar="MODE", help=GUEST_ACK_HELP)
    demo.set_defaults(func=cmd_demo)

    from vfmig.observe import trace, watch

    watch.add_parser(sub)
    trace.add_parser(sub)
    return p


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
