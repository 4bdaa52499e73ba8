"""Helpers for migration tests: an in-process destination and a fault-injecting TCP proxy."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from vfmig.destination import Incoming, Listener


@dataclass
class Destination:
    """A destination served from a thread; `result` holds the Incoming or the exception."""

    listener: Listener
    thread: threading.Thread | None = None
    result: Incoming | BaseException | None = None

    @property
    def address(self) -> str:
        return self.listener.address

    def wait(self, timeout: float = 60) -> Incoming | BaseException | None:
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "destination did not finish"
        return self.result


@contextlib.contextmanager
def destination(run_seconds: float = 0.3, accept_timeout: float = 30) -> Iterator[Destination]:
    d = Destination(Listener("tcp://127.0.0.1:0"))

    def serve() -> None:
        try:
            d.result = d.listener.receive(accept_timeout, run_seconds)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            d.result = e

    d.thread = threading.Thread(target=serve, daemon=True)
    d.thread.start()
    try:
        yield d
    finally:
        if d.thread.is_alive():
            d.thread.join(60)
        if isinstance(d.result, Incoming):
            d.result.vm.close()
        d.listener.close()


@dataclass
class Fault:
    """Break connection number `conn` (0 = control, 1.. = page channels) at byte `offset`:
    flip that byte ("flip"), or close the connection there ("cut")."""

    conn: int
    offset: int
    action: str = "flip"


@dataclass
class Proxy:
    """A TCP proxy in front of `target` that injects one Fault into the source->destination bytes."""

    target: tuple[str, int]
    fault: Fault
    sock: socket.socket = field(default_factory=lambda: socket.create_server(("127.0.0.1", 0)))
    fired: threading.Event = field(default_factory=threading.Event)
    _n: int = 0

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.sock.getsockname()[1]}"

    def start(self) -> Proxy:
        threading.Thread(target=self._accept_loop, daemon=True).start()
        return self

    def _accept_loop(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            index, self._n = self._n, self._n + 1
            up = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(c, up, index), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, c, -1), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, index: int) -> None:
        seen = 0
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if index == self.fault.conn and seen <= self.fault.offset < seen + len(data):
                    k = self.fault.offset - seen
                    self.fired.set()
                    if self.fault.action == "cut":
                        dst.sendall(data[:k])
                        break
                    data = data[:k] + bytes([data[k] ^ 0x5A]) + data[k + 1 :]
                seen += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self.sock.close()
