"""Downtime from tracefs, for hosts without bcc (or where bcc cannot compile the probes).

A private tracefs instance records, for the watched processes only, the two tracepoints that
bracket each ioctl(KVM_RUN) (raw_syscalls:sys_enter/sys_exit, filtered in the kernel to the
ioctl syscall) and kvm:kvm_userspace_exit. A reader thread drains the instance's trace_pipe as
it fills, and `parse_trace`/`RunParser` turn its text into the same `RunRecord`s the BPF probes
give, so `runs.downtime()` works unchanged. Times are the trace's "mono" clock, i.e.
CLOCK_MONOTONIC like vfmig's checkpoints, at the microsecond resolution of the text format.

What this host showed (kernel 6.18), and why the instance is set up the way it is:
  - set_event_pid filters by thread id, not by process: a process's existing threads are
    written one by one, and with options/event-fork the kernel adds each thread (or child
    process) those threads create later and drops each one that exits. Without event-fork
    the vCPU threads a VM creates after start() were never recorded.
  - an empty set_event_pid means "every task", so a pid 0 (the idle tasks, which never
    call ioctl) stays in it: once the watched processes have exited nothing is recorded.
  - children forked by a watched process are added too (the editable build's ninja, a
    `vfmig receive` started by a test), so options/record-tgid puts each event's process in
    the text and the parser keeps only the watched processes' threads.
  - event filters cannot test an element of sys_enter's args[], so only `id == 16` (ioctl)
    is filtered in the kernel; the KVM_RUN request (args[1] == 0xae80) is matched here.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from vfmig.host import meminfo_bytes
from vfmig.observe import probes, runs
from vfmig.observe.runs import RunRecord

NR_IOCTL = 16  # x86_64
KVM_RUN_REQ = 0xAE80  # _IO(KVMIO, 0x80)
INSTANCE_PREFIX = "vfmig"

# (category, event, kernel filter, event name in probes.EVENTS)
TRACEPOINTS = (
    ("raw_syscalls", "sys_enter", f"id == {NR_IOCTL}", "KVM_RUN enter"),
    ("raw_syscalls", "sys_exit", f"id == {NR_IOCTL}", "KVM_RUN exit"),
    ("kvm", "kvm_userspace_exit", None, "KVM_RUN return"),
)

# Buffer sizing: one KVM_RUN is three events, sys_enter (8 + 64 bytes + a 4-byte ring header),
# sys_exit (8 + 16 + 4) and kvm_userspace_exit (8 + 8 + 4): ~124 bytes, and 39 bytes/event
# measured over a mixed trace here. Each CPU's buffer holds HOLD_S seconds of two busy vCPU
# threads (a source's and a destination's can share a CPU) at RUNS_PER_S, so a migration of
# a few seconds fits even if the reader thread is starved throughout; the reader drains it
# continuously, so longer sessions only need the reader to keep up on average.
RUNS_PER_S = 30_000
BYTES_PER_RUN = 128
HOLD_S = 4
VCPUS_PER_CPU = 2
PER_CPU_KB = RUNS_PER_S * BYTES_PER_RUN * HOLD_S * VCPUS_PER_CPU // 1024
MEM_SHARE = 64  # never more than 1/64 of the host's memory across all CPUs
READ_INTERVAL_S = 0.05  # the reader sleeps this long once trace_pipe is empty
BACKLOG_PARSE = 256 << 20  # unparsed text kept before the reader parses it itself

_counter = itertools.count()

# "  vcpu0-2697    (   2694) [000] ..... 23046.850969: sys_enter: NR 16 (7, ae80, 0, 0, 0, 73)"
# (the "....." irq-info column is optional). The comm may hold spaces and dashes ("CPU 0/KVM"):
# the tid is the first "-N (" after it (a comm is at most 15 characters).
# The timestamp is right-aligned: under 10,000 s of uptime it has spaces before it.
_LINE = re.compile(r" *(.*?)-(\d+) +\( *([-\d]+)\) \[\d+\] +(?:\S+ +)?(\d+)\.(\d+): (\w+): (.*)")
_IOCTL_ENTER = f"NR {NR_IOCTL} ("
_IOCTL_EXIT = f"NR {NR_IOCTL} ="
_KVM_RUN_ARG = f"{KVM_RUN_REQ:x}"
_LOST = re.compile(r"\[LOST (\d+) EVENTS\]")


@dataclass
class RunParser:
    """Incremental parser of trace text into RunRecords (per thread and source of evidence).

    Pure over its input: it reads only the lines it is fed. Lines of threads whose process
    (the tgid that record-tgid puts in each line) is not in `pids` are ignored, as are events
    before `floor_ns` (a reset) and "[LOST n EVENTS]" lines, which are counted in `lost`."""

    pids: set[int] = field(default_factory=set)
    floor_ns: int = 0
    records: dict[tuple[int, int], RunRecord] = field(default_factory=dict)
    in_run: dict[int, bool] = field(default_factory=dict)  # tid -> its last ioctl enter was KVM_RUN
    lost: int = 0

    def feed(self, lines: Iterable[str]) -> None:
        for line in lines:
            if line and line[0] != "#":
                self._line(line)

    def _line(self, line: str) -> None:
        # The hot loop (three lines per KVM_RUN): one regex, then plain string tests.
        m = _LINE.match(line)
        if m is None:
            lost = _LOST.search(line)
            if lost:
                self.lost += int(lost.group(1))
            return
        comm, tid_s, tgid_s, sec, frac, event, rest = m.groups()
        if not tgid_s.isdigit() or int(tgid_s) not in self.pids:
            return
        ts = int(sec) * 1_000_000_000 + int(frac.ljust(9, "0")[:9])
        if ts < self.floor_ns:
            return
        tid = int(tid_s)
        if event == "sys_enter":
            if not rest.startswith(_IOCTL_ENTER):
                return
            # Each ioctl enter decides what the thread's next sys_exit closes.
            args = rest[len(_IOCTL_ENTER) :].split(", ", 2)
            is_run = len(args) > 1 and args[1] == _KVM_RUN_ARG
            self.in_run[tid] = is_run
            if is_run:
                self._entry(self._rec(tid, int(tgid_s), runs.KVM_RUN, comm), ts)
        elif event == "sys_exit":
            if not rest.startswith(_IOCTL_EXIT) or not self.in_run.get(tid):
                return
            self.in_run[tid] = False
            self._exit(self._rec(tid, int(tgid_s), runs.KVM_RUN, comm), ts)
        elif event == "kvm_userspace_exit":
            # Returns only (as in bpf/downtime.bpf.c): no entries, so no runs and no gaps.
            self._exit(self._rec(tid, int(tgid_s), runs.UEXIT, comm), ts)

    def _rec(self, tid: int, tgid: int, source: int, comm: str) -> RunRecord:
        r = self.records.get((tid, source))
        if r is None:
            r = self.records[(tid, source)] = RunRecord(tid=tid, tgid=tgid, source=source, comm=comm)
        elif comm != "<...>":
            r.comm = comm  # the latest name: a thread may be renamed (vcpuN) after it started
        return r

    @staticmethod
    def _entry(r: RunRecord, ts: int) -> None:
        if not r.first_entry:
            r.first_entry = ts
        if r.last_exit and ts - r.last_exit > r.max_gap_ns:
            r.max_gap_ns = ts - r.last_exit
        r.last_entry = ts
        r.runs += 1

    @staticmethod
    def _exit(r: RunRecord, ts: int) -> None:
        if not r.first_exit:
            r.first_exit = ts
        r.last_exit = ts


def parse_trace(lines: Iterable[str], pids: Iterable[int], floor_ns: int = 0) -> list[RunRecord]:
    """The RunRecords of the watched processes' threads in tracefs text (trace or trace_pipe,
    with options/record-tgid)."""
    p = RunParser(pids=set(pids), floor_ns=floor_ns)
    p.feed(lines)
    return list(p.records.values())


def _write(path: str, value: str, append: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | (os.O_APPEND if append else os.O_TRUNC))
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _tids(pid: int) -> set[int]:
    try:
        return {int(t) for t in os.listdir(f"/proc/{pid}/task")}
    except OSError:
        return set()


def _pid_alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def _buffer_kb() -> int:
    ncpu = os.cpu_count() or 1
    mem_kb = (meminfo_bytes("MemTotal") or 0) // 1024
    cap = mem_kb // MEM_SHARE // ncpu if mem_kb else PER_CPU_KB
    return max(1024, min(PER_CPU_KB, cap))


def _remove_stale(instances: str) -> None:
    """Instances left by vfmig processes that died without close()."""
    for name in os.listdir(instances):
        parts = name.split("-")
        if len(parts) == 3 and parts[0] == INSTANCE_PREFIX and parts[1].isdigit() and not _pid_alive(int(parts[1])):
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(instances, name))


class TracefsSession:
    """Downtime without bcc: ioctl(KVM_RUN) enter/exit and kvm_userspace_exit of the watched
    processes' threads, from a private tracefs instance (instances/vfmig-<pid>-<n>), read
    continuously from its trace_pipe. Interrupt and handshake latency and the checkpoints
    need bcc (see unavailable()). Events the instance lost (its buffer overran) are reported in
    `lost_events` and unavailable(), and then run_records() gives nothing rather than figures
    that miss runs."""

    def __init__(self) -> None:
        root = probes.tracefs()
        if root is None:
            raise probes.ProbesUnavailable("tracefs is not mounted (mount -t tracefs tracefs /sys/kernel/tracing)")
        if os.geteuid() != 0:
            raise probes.ProbesUnavailable("tracefs needs root")
        instances = os.path.join(root, "instances")
        if not os.path.isdir(instances):
            raise probes.ProbesUnavailable(f"{root} has no instances (kernel too old for a private trace buffer)")
        self._points = [t for t in TRACEPOINTS if os.path.isdir(os.path.join(root, "events", t[0], t[1]))]
        if not any(t[1] == "sys_enter" for t in self._points) or not any(t[1] == "sys_exit" for t in self._points):
            raise probes.ProbesUnavailable("this kernel has no raw_syscalls:sys_enter/sys_exit tracepoints")
        _remove_stale(instances)
        self.path = os.path.join(instances, f"{INSTANCE_PREFIX}-{os.getpid()}-{next(_counter)}")
        try:
            os.mkdir(self.path)
        except OSError as e:
            raise probes.ProbesUnavailable(f"cannot create a tracefs instance: {e.strerror}") from None
        self.lost_events = 0
        self._parser = RunParser()
        self._backlog: list[bytes] = []
        self._backlog_bytes = 0
        self._partial = b""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reader: threading.Thread | None = None
        self._fd: int | None = None
        self._stats_base = 0
        self._comms: dict[int, str] = {}
        self._closed = False
        try:
            self._setup()
        except OSError as e:
            self.close()
            raise probes.ProbesUnavailable(f"cannot set up tracefs instance {self.path}: {e}") from None

    def _f(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def _setup(self) -> None:
        _write(self._f("tracing_on"), "0")
        if "mono" not in _read(self._f("trace_clock")).replace("[", " ").replace("]", " ").split():
            raise OSError("trace_clock has no 'mono': times would not match CLOCK_MONOTONIC")
        _write(self._f("trace_clock"), "mono")
        _write(self._f("buffer_size_kb"), str(_buffer_kb()))
        _write(self._f("options", "record-tgid"), "1")
        _write(self._f("options", "event-fork"), "1")
        _write(self._f("set_event_pid"), "0")  # see the module docstring: never "every task"
        for cat, ev, flt, _ in self._points:
            if flt:
                _write(self._f("events", cat, ev, "filter"), flt)
            _write(self._f("events", cat, ev, "enable"), "1")

    # lifecycle --------------------------------------------------------------------------------
    def start(self, pids: Iterable[int]) -> None:
        try:
            for pid in pids:
                self.watch(pid)
            self._fd = os.open(self._f("trace_pipe"), os.O_RDONLY | os.O_NONBLOCK)
            self._stats_base = self._dropped()
            _write(self._f("tracing_on"), "1")
        except OSError as e:
            self.close()
            raise probes.ProbesUnavailable(f"cannot start tracefs instance {self.path}: {e}") from None
        self._reader = threading.Thread(target=self._read_loop, name="vfmig-tracefs", daemon=True)
        self._reader.start()

    def watch(self, pid: int) -> None:
        """Record `pid`'s threads: those it has now, written to set_event_pid, and (event-fork) those
        they create. A thread created while its parent was not yet written is found by listing
        again, until a listing finds nothing new."""
        with self._lock:
            self._parser.pids.add(pid)
        written: set[int] = set()
        while True:
            new = _tids(pid) - written
            if not new:
                return
            _write(self._f("set_event_pid"), " ".join(map(str, sorted(new))), append=True)
            written |= new

    def reset(self) -> None:
        """Forget what was recorded so far (what is still in the buffer too); keep recording."""
        with self._lock:
            self._drain()
            floor = time.monotonic_ns()
            # Runs under way stay open: a vCPU in one long KVM_RUN since before the reset (halted,
            # or preempted) must still have its exit recorded when it stops.
            self._parser = RunParser(pids=self._parser.pids, floor_ns=floor, in_run=dict(self._parser.in_run))
            self._backlog, self._backlog_bytes, self._partial = [], 0, b""
            self.lost_events = 0
            self._stats_base = self._dropped()

    def close(self) -> None:
        """Stop recording and remove the instance (its buffer, filters and pid list go with it)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._reader is not None:
            self._reader.join(5)
        with contextlib.suppress(OSError):
            _write(self._f("tracing_on"), "0")
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)  # an open trace_pipe keeps the instance busy (rmdir: EBUSY)
                self._fd = None
        with contextlib.suppress(OSError):
            os.rmdir(self.path)

    # reading ----------------------------------------------------------------------------------
    def _read_loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                got = self._drain()
                if self._backlog_bytes > BACKLOG_PARSE:
                    self._parse_backlog()  # bound the memory; normally parsing waits for run_records()
            if not got:
                self._stop.wait(READ_INTERVAL_S)

    def _drain(self) -> int:
        """Read what trace_pipe holds now (consuming it); called with the lock held."""
        n = 0
        while self._fd is not None:
            try:
                chunk = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                break
            except OSError:
                break
            if not chunk:
                break
            self._backlog.append(chunk)
            self._backlog_bytes += len(chunk)
            n += len(chunk)
        return n

    def _parse_backlog(self) -> None:
        data = self._partial + b"".join(self._backlog)
        self._backlog, self._backlog_bytes = [], 0
        head, sep, self._partial = data.rpartition(b"\n")
        if sep:
            self._parser.feed(head.decode(errors="replace").split("\n"))

    def _dropped(self) -> int:
        """Events the instance's buffer lost so far, over all CPUs (overwritten or dropped)."""
        total = 0
        per_cpu = self._f("per_cpu")
        with contextlib.suppress(OSError):
            for cpu in os.listdir(per_cpu):
                with contextlib.suppress(OSError), open(os.path.join(per_cpu, cpu, "stats")) as f:
                    for line in f:
                        k, _, v = line.partition(":")
                        if k.strip() in ("overrun", "commit overrun", "dropped events"):
                            total += int(v.strip().split()[0])
        return total

    def run_records(self) -> list[RunRecord]:
        """Per thread and source, what was recorded since start() or reset(); nothing when events
        were lost (see `lost_events`)."""
        with self._lock:
            if not self._closed:
                self._drain()
                self.lost_events = max(self.lost_events, self._dropped() - self._stats_base)
            self._parse_backlog()
            self.lost_events = max(self.lost_events, self._parser.lost)
            if self.lost_events:
                return []
            out = [RunRecord(**vars(r)) for r in self._parser.records.values()]
        for r in out:
            r.comm = self._comm(r)
        return out

    def _comm(self, r: RunRecord) -> str:
        """The thread's name now, from /proc while it lives (then the last one read): the trace's
        comm comes from the kernel's saved_cmdlines, updated only when a task is switched out,
        and showed a vCPU thread as "python" for its first runs after it named itself vcpuN."""
        try:
            with open(f"/proc/{r.tgid}/task/{r.tid}/comm") as f:
                self._comms[r.tid] = f.read().strip()
        except OSError:
            pass
        return self._comms.get(r.tid, r.comm)

    def attached(self) -> list[dict[str, str]]:
        return [{"event": name, "method": "tracefs", "point": f"{cat}:{ev}"} for cat, ev, _, name in self._points]

    def unavailable(self) -> list[dict[str, str]]:
        got = {name for *_, name in self._points}
        out = []
        for ev in probes.EVENTS:
            if ev.name in got:
                continue
            if ev.name in ("guest entry", "guest exit"):
                why = "kvm:kvm_entry/kvm_exit fire on every VM entry: too many to read as text; needs bcc"
            elif ev.name == "KVM_RUN return":
                why = "kvm:kvm_userspace_exit is not in this kernel"
            else:
                why = "needs bcc: the tracefs fallback records the KVM_RUN events only"
            out.append({"event": ev.name, "reason": why})
        if self.lost_events:
            out.append(
                {
                    "event": "KVM_RUN enter",
                    "reason": f"tracefs lost {self.lost_events} events (its buffer overran): no downtime figure",
                }
            )
        return out
