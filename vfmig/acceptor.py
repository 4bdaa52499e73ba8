"""The destination's front door: every connection is accepted by one thread, which reads its
opening record without blocking and routes it, so that a stray, slow or second connection is
turned away without touching a migration in progress.

    AUTH_INIT  -> `controls`, when no migration holds the listener (the first one claims it);
                  refused with "busy" otherwise
    CHANNEL    -> `channels`, while the migration that holds the listener accepts page channels
    anything else, a bad header or CRC, silence past the deadline -> refused and counted
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import select
import socket
import threading
import time
from dataclasses import dataclass, field

from vfmig import _core

OPENING_MAX = 256  # the longest opening record (AUTH_INIT, CHANNEL) is far shorter
MAX_PENDING = 64  # connections still sending their opening record
MAX_PENDING_PER_PEER = 8  # so one host cannot fill the queue for everyone else
REFUSALS_KEPT = 1000  # the newest reasons; `refused_count` counts them all
HDR_LEN = _core.REC_HEADER_LEN


@dataclass
class Opening:
    """A connection and the record it opened with."""

    sock: socket.socket
    name: str
    header: bytes  # it counts in the control channel's digest
    payload: bytes
    peer: str


@dataclass
class _Pending:
    peer: str
    deadline: float
    buf: bytearray = field(default_factory=bytearray)


def refuse(sock: socket.socket, reason: str) -> None:
    """Tell a peer why (best effort: it may already be gone), then close."""
    with contextlib.suppress(OSError):
        sock.setblocking(False)
        sock.send(_core.encode_record(_core.REC["ERROR"], reason.encode()))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


class Acceptor:
    """Runs one thread for the listener's lifetime. Thread-safe: claim/release/accept_channels
    may be called from any thread; queues hand connections over in blocking mode."""

    def __init__(self, sock: socket.socket, opening_timeout_s: float = 10.0) -> None:
        self.sock = sock
        self.opening_timeout_s = opening_timeout_s
        self.controls: queue.Queue[Opening] = queue.Queue()
        self.channels: queue.Queue[Opening] = queue.Queue()
        self.refused: collections.deque[str] = collections.deque(maxlen=REFUSALS_KEPT)  # newest reasons
        self.refused_count = 0
        self._lock = threading.Lock()
        self._claimed = False
        self._want_channels = False
        self._pending: dict[socket.socket, _Pending] = {}
        self._wake_r, self._wake_w = os.pipe()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="vfmig-acceptor", daemon=True)
        self._thread.start()

    # the migration's side ---------------------------------------------------------------------
    def release(self) -> None:
        """The migration that held the listener is over: the next AUTH_INIT may claim it. Page
        channels still queued for it are turned away. Under the lock that _route holds while it
        claims and queues, so a claim can never be made and then lost."""
        stale: list[Opening] = []
        with self._lock:
            self._claimed = False
            self._want_channels = False
            while True:
                try:
                    stale.append(self.channels.get_nowait())
                except queue.Empty:
                    break
        for o in stale:
            self._refuse(o.sock, o.peer, "no migration is waiting for this page channel")

    def accept_channels(self, on: bool) -> None:
        with self._lock:
            self._want_channels = on

    def refuse(self, o: Opening, reason: str) -> None:
        self._refuse(o.sock, o.peer, reason)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        os.write(self._wake_w, b"x")
        self._thread.join()
        os.close(self._wake_r)
        os.close(self._wake_w)
        for s in list(self._pending):
            s.close()
        self._pending.clear()
        self.release()
        while True:  # a source that claimed the listener but was never served
            try:
                self.controls.get_nowait().sock.close()
            except queue.Empty:
                break

    # the thread ------------------------------------------------------------------------------
    def _refuse(self, sock: socket.socket, peer: str, reason: str) -> None:
        with self._lock:
            self.refused.append(f"{peer}: {reason}")
            self.refused_count += 1
        refuse(sock, reason)

    def _run(self) -> None:
        while True:
            now = time.monotonic()
            timeout = min((p.deadline for p in self._pending.values()), default=now + 3600) - now
            fds: list[socket.socket | int] = [self.sock, self._wake_r, *self._pending]
            ready = select.select(fds, [], [], max(timeout, 0))[0]
            if self._wake_r in ready:
                return
            if self.sock in ready:
                self._accept()
            for s in ready:
                if isinstance(s, socket.socket) and s in self._pending:
                    self._read(s)
            now = time.monotonic()
            for s, p in list(self._pending.items()):
                if now >= p.deadline:
                    del self._pending[s]
                    self._refuse(s, p.peer, f"sent no opening record within {self.opening_timeout_s:g} s")

    def _accept(self) -> None:
        try:
            s, addr = self.sock.accept()
        except OSError:
            return
        peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
        host = peer.rsplit(":", 1)[0]
        if sum(p.peer.rsplit(":", 1)[0] == host for p in self._pending.values()) >= MAX_PENDING_PER_PEER:
            self._refuse(s, peer, "too many connections waiting from this host")
            return
        if len(self._pending) >= MAX_PENDING:
            self._refuse(s, peer, "too many connections waiting")
            return
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._pending[s] = _Pending(peer, time.monotonic() + self.opening_timeout_s)

    def _read(self, s: socket.socket) -> None:
        p = self._pending[s]
        try:
            data = s.recv(OPENING_MAX + HDR_LEN + 1 - len(p.buf))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            del self._pending[s]
            self._refuse(s, p.peer, "closed before its opening record")
            return
        p.buf += data
        if len(p.buf) < HDR_LEN:
            return
        try:
            rtype, length = _core.check_header(bytes(p.buf[:HDR_LEN]), OPENING_MAX)
            if len(p.buf) < HDR_LEN + length:
                return
            payload = bytes(p.buf[HDR_LEN : HDR_LEN + length])
            _core.check_crc(bytes(p.buf[:HDR_LEN]), payload)
        except _core.StreamError as e:
            del self._pending[s]
            self._refuse(s, p.peer, f"bad opening record: {e.strerror}")
            return
        del self._pending[s]
        if len(p.buf) > HDR_LEN + length:
            self._refuse(s, p.peer, "sent data before its opening record was answered")
            return
        self._route(Opening(s, _core.rec_name(rtype), bytes(p.buf[:HDR_LEN]), payload, p.peer))

    def _route(self, o: Opening) -> None:
        o.sock.setblocking(True)
        with self._lock:  # claim and queue in one step (see release)
            if o.name == "AUTH_INIT" and not self._claimed:
                self._claimed = True
                target: queue.Queue[Opening] | None = self.controls
            elif o.name == "CHANNEL" and self._want_channels:
                target = self.channels
            else:
                target = None
            busy = self._claimed
            if target is not None:
                target.put(o)
                return
        if o.name == "AUTH_INIT":
            reason = "busy: a migration into this destination is already in progress"
        elif o.name == "CHANNEL":
            reason = "no migration is accepting page channels now" if not busy else "unexpected page channel"
        else:
            reason = f"a connection must open with AUTH_INIT or CHANNEL, not {o.name}"
        self._refuse(o.sock, o.peer, reason)
