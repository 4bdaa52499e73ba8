"""Helpers for migration tests: a byte-counting relay and waits on conditions (never on timers).
The in-process destination and the fault proxy are vfmig.testing's."""

from __future__ import annotations

import bisect
import contextlib
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vfmig.migration.wire import hang_up
from vfmig.vm import MicroVM


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll `cond` until it holds; fail the test naming `what` if it does not within `timeout`.
    The guest has no way to signal the host, so its state is polled (every millisecond)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.001)


def wait_running(vm: MicroVM, passes: int = 0, timeout: float = 10.0) -> None:
    """Wait until every vCPU demonstrably runs: it has read its clock and counted a page (and,
    with `passes`, gone that many times over its working set, so all of it is faulted in)."""
    wait_until(
        lambda: all(s.first_clock_ns and s.touches and s.passes >= passes for s in vm.vcpu_stats()),
        f"every vCPU to run{f' {passes} pass(es)' if passes else ''}",
        timeout,
    )


def keeps_running(vm: MicroVM, timeout: float = 10.0) -> bool:
    """The guest is not paused and its counter moves (it was left running)."""
    if vm.paused:
        return False
    a = vm.touches()
    try:
        wait_until(lambda: vm.touches() > a, "the guest's counter to move", timeout)
    except AssertionError:
        return False
    return True


@dataclass
class CountingRelay:
    """A TCP relay in front of `target` that counts the source->destination bytes of every
    connection (0 = control, 1.. = page channels, in accept order) with their arrival times,
    as a receiver sees them. Optionally calls `trigger` once, when connection `trigger_conn`
    has carried `trigger_offset` bytes (before forwarding the chunk that crosses it). With
    `drain_Bps`, the page channels' source->destination bytes are taken in at once and passed
    on at that rate: a destination that receives fast and applies slowly."""

    target: tuple[str, int]
    trigger_conn: int = -1
    trigger_offset: int = 0
    trigger: Callable[[], None] | None = None
    drain_Bps: int = 0
    sock: socket.socket = field(default_factory=lambda: socket.create_server(("127.0.0.1", 0)))
    fired: threading.Event = field(default_factory=threading.Event)
    arrivals: list[list[tuple[int, int]]] = field(default_factory=list)  # per conn: (t_ns, total bytes)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.sock.getsockname()[1]}"

    def start(self) -> CountingRelay:
        threading.Thread(target=self._accept_loop, daemon=True).start()
        return self

    def close(self) -> None:
        self.sock.close()

    def _accept_loop(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                index = len(self.arrivals)
                self.arrivals.append([])
            try:
                up = socket.create_connection(self.target)
            except OSError:
                c.close()
                continue
            for sock in (c, up):  # as vfmig's own sockets: no Nagle wait (40 ms) on a small record
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pump, args=(c, up, index), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, c, -1), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, index: int) -> None:
        seen = 0
        log = self.arrivals[index] if index >= 0 else None
        lag: queue.Queue[bytes | None] | None = None
        if index >= 1 and self.drain_Bps:
            lag = queue.Queue()
            threading.Thread(target=self._drain, args=(lag, src, dst), daemon=True).start()
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                seen += len(data)
                if log is not None:
                    log.append((time.monotonic_ns(), seen))
                    if index == self.trigger_conn and seen > self.trigger_offset and not self.fired.is_set():
                        self.fired.set()
                        if self.trigger is not None:
                            self.trigger()
                if lag is not None:
                    lag.put(data)
                else:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            if lag is not None:
                lag.put(None)  # the drain closes both once it has passed everything on
            else:
                hang_up(src, dst)

    def _drain(self, lag: queue.Queue[bytes | None], src: socket.socket, dst: socket.socket) -> None:
        t0, sent = 0.0, 0
        try:
            while (data := lag.get()) is not None:
                # Time spent waiting for bytes (the destination building its VM) earns no credit.
                t0 = max(t0, time.monotonic() - sent / self.drain_Bps - 0.005)
                dst.sendall(data)
                sent += len(data)
                ahead = t0 + sent / self.drain_Bps - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)  # the emulated destination's pace, not a wait for an event
        except OSError:
            pass
        finally:
            hang_up(src, dst)

    def page_bytes(self) -> list[int]:
        """Bytes that arrived on each page channel (the control connection left out)."""
        return [log[-1][1] if log else 0 for log in self.arrivals[1:]]

    def window_rates(self, lo: int, hi: int) -> tuple[float, list[float]]:
        """Arrival rates (bytes/s) over the window from when the page channels together had
        delivered `lo` bytes until they had delivered `hi`: the total and per channel."""
        events = sorted(
            (t, c, n - prev)
            for c, log in enumerate(self.arrivals[1:])
            for (t, n), prev in zip(log, [0] + [n for _, n in log[:-1]], strict=True)
        )
        times, acc, total = [], [], 0
        for t, _, k in events:
            total += k
            times.append(t)
            acc.append(total)
        i_lo, i_hi = bisect.bisect_left(acc, lo), bisect.bisect_left(acc, hi)
        assert i_hi < len(acc), f"only {total} bytes arrived, fewer than {hi}"
        t_lo, t_hi = times[i_lo], times[i_hi]
        secs = (t_hi - t_lo) / 1e9
        per = [0] * (len(self.arrivals) - 1)
        for _, c, k in events[i_lo + 1 : i_hi + 1]:
            per[c] += k
        return (acc[i_hi] - acc[i_lo]) / secs, [b / secs for b in per]


@contextlib.contextmanager
def vm_process(sock_dir: Path, *vm_args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`vfmig vm run --control SOCK --seconds 0 VM_ARGS` in its own process, with the socket in
    `sock_dir`; yields the process once it has said where its control socket is, and the socket
    path. Killed on the way out if it still runs."""
    sock = str(sock_dir / f"vm-{time.monotonic_ns()}.sock")
    cmd = [sys.executable, "-m", "vfmig", "vm", "run", "--control", sock, "--seconds", "0", *vm_args]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None
    try:
        line = p.stdout.readline()
        assert "control socket" in line, line + (p.stderr.read() if p.stderr else "")
        yield p, sock
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(10)
