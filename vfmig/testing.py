"""What tests and benchmarks share: a destination served from a thread, and a fault-injecting,
record-aware TCP proxy.

The proxy sits between a source and a destination and forwards every connection record by record
(it knows the 16-byte record header), so a fault can be placed by stream position: "the 3rd PAGES
record on page channel 1", "byte 5000 of the control channel", "right after GO". Faults fire on
what the stream carries, never on a timer, and the proxy records which record each one hit.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from vfmig import _core
from vfmig.migration.destination import Incoming, Listener
from vfmig.migration.wire import hang_up

HDR_LEN = _core.REC_HEADER_LEN
UP, DOWN = "up", "down"  # source -> destination, destination -> source
ACTIONS = ("flip", "cut", "truncate", "delay", "duplicate", "drop", "reorder", "cut_after", "call")


@dataclass
class Fault:
    """One fault. `conn` counts connections in the order the source opens them (0: control,
    1..N: page channels). The trigger is either `record` (a record type name, and `nth` occurrence
    counted from 1 on that connection and direction) or `offset` (a byte offset there).

    With `after`, the `nth` count starts only once the record `after` has passed `after_nth`
    times there ("the first PAGES after ITER 1": the final round when the policy stops after 1).

    Actions: flip (XOR one byte: `offset`, or byte `at_byte` of the record, negative from its end),
    cut (close both ways before the record or at the offset), truncate (forward half the record,
    then close), delay (hold the stream `delay_s` seconds, then go on), duplicate, drop, reorder
    (swap with the next record), cut_after (forward the record, then close), call (run `hook`
    before forwarding)."""

    conn: int = 0
    direction: str = UP
    record: str | None = None
    nth: int = 1
    offset: int | None = None
    action: str = "flip"
    at_byte: int = HDR_LEN // 2
    delay_s: float = 0.0
    hook: Callable[[], None] | None = None
    after: str | None = None
    after_nth: int = 1

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown fault action {self.action!r}")
        if (self.record is None) == (self.offset is None):
            raise ValueError("a fault needs exactly one trigger: record or offset")


@dataclass
class FaultProxy:
    """A TCP proxy in front of `target` that injects one Fault. `fired` is set when it fires, and
    `hit` names the record it hit (type name, conn, direction, stream offset)."""

    target: tuple[str, int]
    fault: Fault
    host: str = "127.0.0.1"
    fired: threading.Event = field(default_factory=threading.Event)
    hit: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sock = socket.create_server((self.host, 0))
        self._n = 0
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()  # ends a delay early: no pump outlives its proxy

    @property
    def address(self) -> str:
        return f"tcp://{self.host}:{self.sock.getsockname()[1]}"

    def start(self) -> FaultProxy:
        threading.Thread(target=self._accept_loop, name="fault-proxy", daemon=True).start()
        return self

    def close(self) -> None:
        self._closed.set()
        hang_up(self.sock)  # wakes the accept loop
        with self._lock:
            hang_up(*self._socks)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        while True:
            try:
                down, _ = self.sock.accept()
            except OSError:
                return
            index, self._n = self._n, self._n + 1
            try:
                up = socket.create_connection(self.target)
            except OSError:
                down.close()
                continue
            with self._lock:
                self._socks += [down, up]
            pair = _Pair(down, up)
            for src, dst, direction in ((down, up, UP), (up, down, DOWN)):
                th = threading.Thread(target=self._pump, args=(pair, src, dst, index, direction), daemon=True)
                th.start()

    def _armed(self, index: int, direction: str) -> bool:
        return not self.fired.is_set() and index == self.fault.conn and direction == self.fault.direction

    def _pump(self, pair: _Pair, src: socket.socket, dst: socket.socket, index: int, direction: str) -> None:
        f = self.fault
        pos = 0  # stream offset of the next record
        seen: dict[str, int] = {}
        held: bytes | None = None  # a record waiting to be reordered
        counted: dict[str, int] = {}  # records seen since the `after` gate opened
        gate_open = f.after is None
        try:
            while True:
                rec = _read_record(src)
                if rec is None:
                    break
                if len(rec) < HDR_LEN:  # the peer stopped mid-header: pass on what came
                    dst.sendall(rec)
                    break
                name = _core.rec_name(struct.unpack_from("<H", rec, 4)[0])
                seen[name] = seen.get(name, 0) + 1
                if gate_open:
                    counted[name] = counted.get(name, 0) + 1
                elif f.after == name and seen[name] >= f.after_nth:
                    gate_open = True
                out = [rec]
                if held is not None:
                    out, held = [rec, held], None
                elif self._armed(index, direction) and (
                    (f.record == name and counted.get(name, 0) == f.nth and gate_open)
                    or (f.offset is not None and pos <= f.offset < pos + len(rec))
                ):
                    self.hit.update(record=name, conn=index, direction=direction, offset=pos, nth=seen[name])
                    cut_at = (f.offset - pos) if f.offset is not None else None
                    self.fired.set()  # before acting: a delay or hook must not hide that it fired
                    out, held, stop = self._apply(rec, cut_at)
                    if stop is not None:
                        if stop:
                            dst.sendall(stop)
                        break
                pos += len(rec)
                for r in out:
                    dst.sendall(r)
        except OSError:
            # The far end is gone. Like TCP, let the other direction deliver what is already
            # on its way (the peer's ERROR): drain this side until that direction closes both.
            with contextlib.suppress(OSError):
                while not pair.closed and src.recv(1 << 16):
                    pass
        finally:
            pair.close()

    def _apply(self, rec: bytes, cut_at: int | None) -> tuple[list[bytes], bytes | None, bytes | None]:
        """(records to forward now, a record to hold for reordering, bytes to send before closing
        or None to keep going)."""
        f = self.fault
        if f.action == "flip":
            k = cut_at if cut_at is not None else min(f.at_byte, len(rec) - 1)
            if k < 0:
                k = max(0, len(rec) + k)
            return [rec[:k] + bytes([rec[k] ^ 0x5A]) + rec[k + 1 :]], None, None
        if f.action == "cut":
            return [], None, rec[:cut_at] if cut_at else b""
        if f.action == "truncate":
            return [], None, rec[: max(1, len(rec) // 2)]
        if f.action == "cut_after":
            return [], None, rec
        if f.action == "delay":
            self._closed.wait(f.delay_s)  # the fault itself is the delay; what triggers it is the stream
            return [rec], None, None
        if f.action == "duplicate":
            return [rec, rec], None, None
        if f.action == "drop":
            return [], None, None
        if f.action == "reorder":
            return [], rec, None
        assert f.action == "call" and f.hook is not None
        f.hook()
        return [rec], None, None


class _Pair:
    """Both sockets of one proxied connection: closing either direction closes both."""

    def __init__(self, a: socket.socket, b: socket.socket) -> None:
        self.socks = (a, b)
        self.closed = False

    def close(self) -> None:
        self.closed = True
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def _read_record(s: socket.socket) -> bytes | None:
    hdr = _read_exact(s, HDR_LEN)
    if hdr is None:
        return None
    length = struct.unpack_from("<I", hdr, 8)[0]
    payload = _read_exact(s, length) if length else b""
    if payload is None:
        return hdr  # truncated by the peer: pass on what came
    return hdr + payload


def _read_exact(s: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            return bytes(buf) if buf else None
        buf += chunk
    return bytes(buf)


# an in-process destination ------------------------------------------------------------------------
@dataclass
class Destination:
    """A destination served from a thread; `result` holds the Incoming or the exception."""

    listener: Listener
    thread: threading.Thread | None = None
    result: Incoming | BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def address(self) -> str:
        return self.listener.address

    @property
    def port(self) -> int:
        return int(self.listener.sock.getsockname()[1])

    def wait(self, timeout: float = 60) -> Incoming | BaseException | None:
        if not self.done.wait(timeout):
            raise AssertionError("destination did not finish")
        return self.result


@contextlib.contextmanager
def serve_destination(
    listener: Listener | None = None, run_seconds: float = 0.3, accept_timeout: float = 30
) -> Iterator[Destination]:
    """Serve one migration into `listener` (default: loopback, any port) from a thread."""
    d = Destination(listener or Listener("tcp://127.0.0.1:0"))

    def serve() -> None:
        try:
            d.result = d.listener.receive(accept_timeout, run_seconds)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            d.result = e
        finally:
            d.done.set()

    d.thread = threading.Thread(target=serve, name="destination", daemon=True)
    d.thread.start()
    try:
        yield d
    finally:
        d.done.wait(60)
        if isinstance(d.result, Incoming):
            d.result.vm.close()
        d.listener.close()
