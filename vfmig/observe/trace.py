"""`vfmig trace`: record a whole `vfmig migrate` (or `vfmig demo`) run system-wide with trace-cmd
or perf, for kernelshark, `trace-cmd report`, `perf script` or `perf timechart`.

The trace holds the KVM and vCPU events that matter to a migration (userspace exits, MSIs into
KVM, EOIs, the ioctl syscalls, scheduler switches and wakeups) and vfmig's phase markers: the
C checkpoint function writes "vfmig: <name>" to tracefs' trace_marker, which trace-cmd records
as print events. perf cannot record those (it accepts -e ftrace:print but records nothing:
ftrace's own events do not reach perf), so for perf the markers come from a uprobe on vfmig's
USDT probe vfmig:checkpoint, with the checkpoint's name as a string argument.

What this host needed (trace-cmd 3.1.6, perf 6.1, kernel 6.18): the function tracer's files
(set_ftrace_pid, set_ftrace_filter, /proc/sys/kernel/ftrace_enabled) refuse writes even to
root, so trace-cmd runs with -d (leave the function tracer alone) and --no-filter (do not
write set_ftrace_pid, which otherwise crashes trace-cmd), and is stopped with SIGINT rather
than given the command to run (it crashes the same way when it runs a command itself). It
still exits non-zero at the end (it cannot reset set_ftrace_filter) after writing a complete
file, so its exit code is not trusted: `trace-cmd report` on the file is.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from vfmig.errors import ConfigError, HostError

TOOLS = ("trace-cmd", "perf")
INSTALL = {"trace-cmd": "apt install trace-cmd", "perf": "apt install linux-perf"}
COMMANDS = ("migrate", "demo")  # the vfmig commands that run a migration
NR_IOCTL = 16  # x86_64
IOCTL_FILTER = f"id == {NR_IOCTL}"
# (event, filter): the tracepoints a migration's trace needs.
EVENTS = (
    ("kvm:kvm_userspace_exit", None),
    ("kvm:kvm_msi_set_irq", None),
    ("kvm:kvm_eoi", None),
    ("raw_syscalls:sys_enter", IOCTL_FILTER),
    ("raw_syscalls:sys_exit", IOCTL_FILTER),
    ("sched:sched_switch", None),
    ("sched:sched_wakeup", None),
)
TRACEFS_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
MARKER = "vfmig: "  # what vfmig_checkpoint() writes to trace_marker
UPROBE_GROUP, UPROBE_EVENT = "vfmig", "checkpoint"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 300.0  # a large trace takes a while to merge and write


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "trace",
        help="record a migration system-wide with trace-cmd or perf (KVM, vCPU, scheduler events and vfmig's markers)",
        description="Run `vfmig migrate ARGS` (or `vfmig demo ARGS`) while trace-cmd or perf records the whole "
        "host, then say where the trace is and how to open it. Needs root.",
    )
    p.add_argument(
        "--with",
        dest="tool",
        metavar="TOOL",
        help="trace-cmd or perf (default: trace-cmd if installed, else perf)",
    )
    p.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="the trace file (default: ./vfmig-trace-TIMESTAMP.dat, or .perf.data with perf)",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- migrate ARGS... (the command to record)")
    p.set_defaults(func=cmd_trace)


# checks -----------------------------------------------------------------------------------------
def _tracefs() -> str | None:
    return next((d for d in TRACEFS_DIRS if os.path.isdir(os.path.join(d, "events"))), None)


def _command(args: argparse.Namespace) -> list[str]:
    cmd = list(args.command or [])
    if cmd[:1] == ["--"]:
        cmd = cmd[1:]
    if not cmd:
        raise ConfigError("nothing to record: give the command after --, e.g. vfmig trace -- migrate --to ADDR ...")
    if cmd[0] not in COMMANDS:
        raise ConfigError(f"vfmig trace records `vfmig migrate` or `vfmig demo`, not {cmd[0]!r}")
    return cmd


def _tool(name: str | None) -> str:
    if name is None:
        found = next((t for t in TOOLS if shutil.which(t)), None)
        if found is None:
            raise HostError(f"neither trace-cmd nor perf is installed ({INSTALL['trace-cmd']}, or {INSTALL['perf']})")
        return found
    if name not in TOOLS:
        raise ConfigError(f"unknown tracer {name!r}: use --with trace-cmd or --with perf")
    if shutil.which(name) is None:
        raise HostError(f"{name} is not installed ({INSTALL[name]})")
    return name


def _output(path: str | None, tool: str) -> str:
    if path is None:
        ext = ".dat" if tool == "trace-cmd" else ".perf.data"
        path = f"vfmig-trace-{time.strftime('%Y%m%d-%H%M%S')}{ext}"
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise ConfigError(f"cannot write {path}: no directory {d}")
    return path


def _events(root: str) -> list[tuple[str, str | None]]:
    """The events this kernel has, saying which are missing (a kernel without KVM, say)."""
    out = []
    for ev, flt in EVENTS:
        if os.path.isdir(os.path.join(root, "events", *ev.split(":"))):
            out.append((ev, flt))
        else:
            print(f"vfmig trace: warning: this kernel has no {ev}; recording without it", file=sys.stderr)
    return out


def _human(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    x = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        x /= 1024
        if x < 1024 or unit == "GiB":
            break
    return f"{x:.1f} {unit}"


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _wait(cond: Any, proc: subprocess.Popen[Any], what: str, timeout: float = START_TIMEOUT_S) -> None:
    """Poll `cond` until it holds; fail if the recorder exits or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise HostError(f"{what}: the recorder exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise HostError(f"{what}: timed out after {timeout:g} s")
        time.sleep(0.01)


# recorders ---------------------------------------------------------------------------------------
@dataclass
class Recording:
    tool: str
    output: str
    markers: int
    open_with: list[str]
    notes: list[str]


class _Recorder:
    tool = ""

    def __init__(self, output: str, root: str) -> None:
        self.output, self.root = output, root
        self.proc: subprocess.Popen[bytes] | None = None
        # The recorder's own output, shown only if it fails; closed in cleanup().
        self.log = tempfile.TemporaryFile()  # noqa: SIM115
        self.notes: list[str] = []

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """SIGINT ends a recording the way Ctrl-C does; the recorder then writes its file."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def log_tail(self, n: int = 5) -> str:
        self.log.seek(0)
        lines = [ln for ln in self.log.read().decode(errors="replace").splitlines() if ln.strip()]
        return " / ".join(ln.strip() for ln in lines[-n:])

    def report_cmd(self) -> list[str]:
        raise NotImplementedError

    def count_markers(self) -> int:
        raise NotImplementedError

    def open_with(self) -> list[str]:
        raise NotImplementedError

    def _count(self, cmd: list[str], needle: bytes) -> int:
        n = 0
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as p:
            assert p.stdout is not None
            for line in p.stdout:
                if needle in line:
                    n += 1
        if p.returncode != 0:
            raise HostError(f"`{' '.join(cmd)}` cannot read the trace (exit {p.returncode})")
        return n


class _TraceCmd(_Recorder):
    tool = "trace-cmd"
    # Top-level settings trace-cmd changes and, dying at its end here, leaves changed: tracing
    # off (so trace_marker writes fail for everyone) and the function tracer's option off.
    RESTORE = ("tracing_on", "options/function-trace")

    def __init__(self, output: str, root: str) -> None:
        super().__init__(output, root)
        self.saved: dict[str, str] = {}
        for name in self.RESTORE:
            with contextlib.suppress(OSError), open(os.path.join(root, name)) as f:
                self.saved[name] = f.read().strip()

    def cleanup(self) -> None:
        super().cleanup()
        for name, value in self.saved.items():
            with contextlib.suppress(OSError), open(os.path.join(self.root, name), "w") as f:
                f.write(value)

    def start(self) -> None:
        cmd = ["trace-cmd", "record", "-d", "--no-filter", "-C", "mono", "-o", self.output]
        for ev, flt in _events(self.root):
            cmd += ["-e", ev] + (["-f", flt] if flt else [])
        if shutil.which("stdbuf"):
            cmd = ["stdbuf", "-oL", *cmd]  # its "Hit Ctrl^C" line is how we know it records
        for stale in self._cpu_files():
            with contextlib.suppress(OSError):
                os.unlink(stale)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        ncpu = len(self._online_cpus())

        def ready() -> bool:
            self.log.seek(0)
            said = b"Hit Ctrl^C" in self.log.read() or not shutil.which("stdbuf")
            # Each per-CPU recorder creates OUTPUT.cpuN when it starts; stopping it before then
            # loses that CPU's data (seen here with an immediate SIGINT).
            return said and len(self._cpu_files()) >= ncpu

        _wait(ready, self.proc, "trace-cmd did not start recording")

    def _online_cpus(self) -> list[str]:
        return [d for d in os.listdir(os.path.join(self.root, "per_cpu")) if d.startswith("cpu")]

    def _cpu_files(self) -> list[str]:
        d, base = os.path.split(os.path.abspath(self.output))
        with contextlib.suppress(OSError):
            return [os.path.join(d, f) for f in os.listdir(d) if re.fullmatch(re.escape(base) + r"\.cpu\d+", f)]
        return []

    def stop(self) -> None:
        super().stop()
        # It exits 1 here after writing the file (see the module docstring): the file decides.
        if self.proc is not None and self.proc.returncode not in (0, None) and not os.path.exists(self.output):
            raise HostError(f"trace-cmd failed (exit {self.proc.returncode}): {self.log_tail()}")

    def count_markers(self) -> int:
        return self._count(["trace-cmd", "report", self.output], MARKER.encode())

    def open_with(self) -> list[str]:
        return [f"trace-cmd report {self.output} | less", f"kernelshark {self.output}"]


class _Perf(_Recorder):
    tool = "perf"

    def __init__(self, output: str, root: str) -> None:
        super().__init__(output, root)
        self.tmp = tempfile.mkdtemp(prefix="vfmig-trace-")
        self.uprobes: list[str] = []  # "group/event" of the uprobes this run added

    def start(self) -> None:
        marker_ev = self._checkpoint_uprobe()
        ctl, ack = os.path.join(self.tmp, "ctl"), os.path.join(self.tmp, "ack")
        os.mkfifo(ctl)
        os.mkfifo(ack)
        cmd = ["perf", "record", "-a", "-k", "mono", "-D", "-1", "--control", f"fifo:{ctl},{ack}", "-o", self.output]
        for ev, flt in _events(self.root):
            cmd += ["-e", ev] + (["--filter", flt] if flt else [])
        if marker_ev:
            cmd += ["-e", marker_ev]
        # perf starts with its events disabled (-D -1) and acknowledges "enable" on the ack fifo:
        # from then on it records.
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        ack_fd = os.open(ack, os.O_RDONLY | os.O_NONBLOCK)
        try:
            ctl_fd = -1

            def opened() -> bool:
                nonlocal ctl_fd
                try:
                    ctl_fd = os.open(ctl, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO until perf opens it
                except OSError:
                    return False
                return True

            _wait(opened, self.proc, "perf did not start")
            os.write(ctl_fd, b"enable\n")
            os.close(ctl_fd)
            got = b""

            def acked() -> bool:
                nonlocal got
                with contextlib.suppress(BlockingIOError):
                    got += os.read(ack_fd, 64)
                return b"ack" in got

            _wait(acked, self.proc, "perf did not enable its events")
        finally:
            os.close(ack_fd)

    def _checkpoint_uprobe(self) -> str | None:
        """A uprobe on the USDT probe vfmig:checkpoint of this installation's extension, with the
        checkpoint's name as a string. perf resolves the probe's file offset and argument register
        from the ELF note (`perf probe sdt_vfmig:checkpoint`, after `perf buildid-cache --add`,
        in a private buildid dir); its SDT events fetch arguments as integers only, so the same
        location is then added again through uprobe_events with `name=+0(REG):string`."""
        spec = importlib.util.find_spec("vfmig._core")
        lib = spec.origin if spec is not None else None
        uprobe_events = os.path.join(self.root, "uprobe_events")
        if lib is None or not os.path.exists(uprobe_events):
            self.notes.append("no vfmig markers: uprobes are not available")
            return None
        ours = f"{UPROBE_GROUP}:{UPROBE_EVENT}"
        if os.path.isdir(os.path.join(self.root, "events", UPROBE_GROUP, UPROBE_EVENT)):
            return ours  # someone else's: use it, leave it in place
        perf = ["perf", "--buildid-dir", os.path.join(self.tmp, "buildid")]
        r = _run([*perf, "buildid-cache", "--add", lib])
        sdt_existed = os.path.isdir(os.path.join(self.root, "events", "sdt_vfmig", "checkpoint"))
        if r.returncode == 0 and not sdt_existed:
            r = _run([*perf, "probe", "-q", "-a", "sdt_vfmig:checkpoint"])
            if r.returncode == 0:
                self.uprobes.append("sdt_vfmig/checkpoint")
        line = next((ln for ln in _read_lines(uprobe_events) if ln.startswith("p:sdt_vfmig/checkpoint ")), None)
        m = re.match(r"p:\S+ (\S+:0x[0-9a-f]+) arg1=(\S+?):u64", line or "")
        self._remove_uprobes()  # the integer-only SDT event is not needed past this point
        if m is None:
            why = (r.stderr or r.stdout or "").strip().splitlines()[-1:] or ["no such USDT probe"]
            self.notes.append(f"no vfmig markers: cannot place a uprobe on vfmig:checkpoint in {lib}: {why[0]}")
            return None
        where, reg = m.groups()
        arg = f"+0({reg}):string"
        try:
            _append(uprobe_events, f"p:{UPROBE_GROUP}/{UPROBE_EVENT} {where} name={arg}\n")
        except OSError as e:
            self.notes.append(f"no vfmig markers: cannot add the uprobe: {e.strerror}")
            return None
        self.uprobes.append(f"{UPROBE_GROUP}/{UPROBE_EVENT}")
        return ours

    def _remove_uprobes(self) -> None:
        path = os.path.join(self.root, "uprobe_events")
        while self.uprobes:
            ev = self.uprobes.pop()
            with contextlib.suppress(OSError):
                _append(path, f"-:{ev}\n")

    def cleanup(self) -> None:
        super().cleanup()
        self._remove_uprobes()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def stop(self) -> None:
        super().stop()
        if not os.path.exists(self.output):
            code = self.proc.returncode if self.proc else "?"
            raise HostError(f"perf wrote no trace (exit {code}): {self.log_tail()}")

    def count_markers(self) -> int:
        return self._count(["perf", "script", "-i", self.output], f"{UPROBE_GROUP}:{UPROBE_EVENT}:".encode())

    def open_with(self) -> list[str]:
        return [f"perf script -i {self.output} | less", f"perf timechart -i {self.output}"]


def _append(path: str, line: str) -> None:
    """One write with O_APPEND (never O_TRUNC: that would remove every uprobe on the host), and no
    seek: Python's open(..., "a") seeks to the end, which uprobe_events refuses (EINVAL)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _read_lines(path: str) -> list[str]:
    with contextlib.suppress(OSError), open(path) as f:
        return f.read().splitlines()
    return []


@contextlib.contextmanager
def _recording(tool: str, output: str, root: str) -> Iterator[_Recorder]:
    rec: _Recorder = _TraceCmd(output, root) if tool == "trace-cmd" else _Perf(output, root)
    try:
        yield rec
    finally:
        rec.cleanup()


# the command -----------------------------------------------------------------------------------
def record(tool: str, output: str, command: Sequence[str]) -> tuple[int, Recording]:
    """Run `vfmig COMMAND` while `tool` records the host; (its exit code, what was recorded)."""
    root = _tracefs()
    if root is None:
        raise HostError("tracefs is not mounted (mount -t tracefs tracefs /sys/kernel/tracing)")

    # SIGTERM or SIGHUP must also end with the recorder stopped and its probes removed (the
    # context manager's cleanup), not leave it recording the whole host.
    def leave(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    old = {sig: signal.signal(sig, leave) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with _recording(tool, output, root) as rec:
            rec.start()
            child = subprocess.Popen([sys.executable, "-m", "vfmig", *command])
            while True:
                try:
                    code = child.wait()
                    break
                except KeyboardInterrupt:
                    # Ctrl-C reached the migrate command too (the recorder runs in its own
                    # session): it ends the migration its own way, and the trace of it is worth
                    # keeping, however often Ctrl-C is pressed meanwhile.
                    continue
            rec.stop()
            markers = rec.count_markers()
            return code, Recording(tool, output, markers, rec.open_with(), rec.notes)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def cmd_trace(args: argparse.Namespace) -> int:
    command = _command(args)
    tool = _tool(args.tool)
    output = _output(args.output, tool)
    if os.geteuid() != 0:
        raise HostError("vfmig trace records the whole host: run it as root")
    code, rec = record(tool, output, command)
    size = os.path.getsize(rec.output)
    print(f"vfmig trace: {rec.tool} recorded `vfmig {' '.join(command)}` (exit {code})")
    print(f"  trace:   {os.path.abspath(rec.output)} ({_human(size)})")
    print(f"  markers: {rec.markers} vfmig checkpoint markers")
    for note in rec.notes:
        print(f"  note:    {note}")
    for how in rec.open_with:
        print(f"  open:    {how}")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m vfmig.observe.trace ARGS` is `vfmig trace ARGS` (until the CLI has it)."""
    from vfmig.errors import VfmigError

    class _Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:  # one line, like the vfmig CLI
            print(f"vfmig: error: {message}", file=sys.stderr)
            raise SystemExit(2)

    p = _Parser(prog="vfmig")
    add_parser(p.add_subparsers(dest="cmd", required=True, parser_class=_Parser))
    args = p.parse_args(["trace", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args))
    except VfmigError as e:
        print(f"vfmig: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
