"""TCP transport: addresses, the control channel and the stream's control records.

The record format itself (header, CRC32C, limits) lives in C (csrc/stream/stream.c) and is used here
through vfmig._core, so the page channels and the control channel share one implementation.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from vfmig import _core
from vfmig.errors import ConfigError, MigrationError

REC = _core.REC
HDR_LEN = _core.REC_HEADER_LEN
VERSION = _core.STREAM_VERSION
HELLO_VERIFY = _core.HELLO_VERIFY
CONFIG_MAX = _core.CONFIG_MAX
_DEVICE = struct.Struct("<HH")
_VCPU = struct.Struct("<II")
_EOS = struct.Struct("<QQII")


class PeerError(MigrationError):
    """The peer reported an error (an ERROR record) or went away."""


class PeerReported(PeerError):
    """The peer said why it gave up (an ERROR record)."""


def parse_uri(uri: str) -> tuple[str, int]:
    """'tcp://HOST:PORT' -> (host, port)."""
    u = urlparse(uri)
    if u.scheme != "tcp" or not u.hostname or u.port is None:
        raise ConfigError(f"bad address {uri!r}: expected tcp://HOST:PORT")
    return u.hostname, u.port


@dataclass(frozen=True)
class Hello:
    """The stream header: protocol version, RAM shape, channels, session token, VM config."""

    version: int
    channels: int
    mem_bytes: int
    vcpus: int
    verify: bool
    token: bytes
    config: dict[str, Any]

    def encode(self) -> bytes:
        cfg = json.dumps(self.config).encode()
        flags = HELLO_VERIFY if self.verify else 0
        hdr = _core.encode_hello(self.version, self.channels, self.mem_bytes, self.vcpus, flags, self.token, len(cfg))
        return hdr + cfg

    @classmethod
    def decode(cls, raw: bytes) -> Hello:
        # The fixed header is checked in C (csrc/stream/hello.c, fuzzed); the JSON config here.
        try:
            version, channels, mem, vcpus, flags, token, _ = _core.decode_hello(raw)
        except _core.StreamError as e:
            raise MigrationError(e.strerror) from None
        try:
            config = json.loads(raw[_core.HELLO_LEN :])
        except ValueError:
            raise MigrationError("stream header's VM config is not valid JSON") from None
        return cls(version, channels, mem, vcpus, bool(flags & HELLO_VERIFY), token, config)


def encode_channel(token: bytes, index: int) -> bytes:
    return _core.encode_channel(token, index)


def decode_channel(raw: bytes) -> tuple[bytes, int]:
    try:
        return _core.decode_channel(raw)
    except _core.StreamError as e:
        raise MigrationError(e.strerror) from None


def encode_device(name: str, blob: bytes) -> bytes:
    n = name.encode()
    return _DEVICE.pack(len(n), 0) + n + blob


def decode_device(raw: bytes) -> tuple[str, bytes]:
    if len(raw) < _DEVICE.size:
        raise MigrationError("DEVICE record too short")
    n, reserved = _DEVICE.unpack_from(raw)
    if n == 0 or reserved or _DEVICE.size + n > len(raw):
        raise MigrationError("DEVICE record has a bad name length")
    return raw[_DEVICE.size : _DEVICE.size + n].decode(errors="replace"), raw[_DEVICE.size + n :]


def encode_vcpu(index: int, blob: bytes) -> bytes:
    return _VCPU.pack(index, 0) + blob


def decode_vcpu(raw: bytes) -> tuple[int, bytes]:
    if len(raw) < _VCPU.size:
        raise MigrationError("VCPU record too short")
    index, reserved = _VCPU.unpack_from(raw)
    if reserved:
        raise MigrationError("VCPU record has a reserved field set")
    return index, raw[_VCPU.size :]


class Digest:
    """Running digest of the records on one channel: count, payload bytes, CRC chain."""

    def __init__(self) -> None:
        self.records = 0
        self.bytes = 0
        self.chain = 0

    def add(self, header: bytes) -> None:
        length, crc = _hdr_len_crc(header)
        self.records += 1
        self.bytes += length
        self.chain = _core.crc32c(struct.pack("<I", crc), self.chain)

    def eos(self) -> bytes:
        return _EOS.pack(self.records, self.bytes, self.chain, 0)

    def check_eos(self, raw: bytes) -> None:
        if len(raw) != _EOS.size:
            raise MigrationError("EOS record has a bad length")
        records, nbytes, chain, reserved = _EOS.unpack(raw)
        if reserved or (records, nbytes, chain) != (self.records, self.bytes, self.chain):
            raise MigrationError(
                f"control channel: end-of-stream digest mismatch (sent {records} records, got {self.records})"
            )


def _hdr_len_crc(header: bytes) -> tuple[int, int]:
    _, _, _, length, crc = struct.unpack("<IHHII", header)
    return length, crc


class ControlChannel:
    """Framed records over a TCP socket, with timeouts and a digest of what was sent/received."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self.tx = Digest()
        self.rx = Digest()

    def send(self, rtype: str, payload: bytes = b"") -> None:
        rec = _core.encode_record(REC[rtype], payload)
        try:
            self.sock.sendall(rec)
        except OSError as e:
            raise PeerError(f"{self.peer} went away: {e.strerror or e}") from None
        if rtype != "EOS":
            self.tx.add(rec[:HDR_LEN])

    def _read(self, n: int, deadline: float | None) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            if deadline is not None:  # one deadline for the whole record: a trickle can't stretch it
                self.sock.settimeout(max(deadline - time.monotonic(), 1e-3))
            try:
                r = self.sock.recv_into(view[got:])
            except TimeoutError:
                raise PeerError(f"{self.peer} did not answer in time") from None
            except OSError as e:
                raise PeerError(f"{self.peer} went away: {e.strerror or e}") from None
            if r == 0:
                raise PeerError(f"{self.peer} closed the connection")
            got += r
        return bytes(buf)

    def recv(self, timeout: float | None, max_len: int = _core.CTRL_MAX) -> tuple[str, bytes]:
        """Next record as (type name, payload), within `timeout` seconds for the whole record.
        An ERROR record raises PeerReported."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self.sock.settimeout(timeout)
        hdr = self._read(HDR_LEN, deadline)
        try:
            rtype, length = _core.check_header(hdr, max_len)
            payload = self._read(length, deadline) if length else b""
            _core.check_crc(hdr, payload)
        except _core.StreamError as e:
            raise MigrationError(f"control channel from {self.peer}: {e.strerror}") from None
        name = _core.rec_name(rtype)
        if name == "ERROR":
            raise PeerReported(f"{self.peer} reports: {payload.decode(errors='replace')}")
        if name != "EOS":
            self.rx.add(hdr)
        return name, payload

    def expect(self, rtype: str, timeout: float | None, max_len: int = _core.CTRL_MAX) -> bytes:
        name, payload = self.recv(timeout, max_len)
        if name != rtype:
            raise MigrationError(f"control channel: expected {rtype} from {self.peer}, got {name}")
        return payload

    def send_json(self, rtype: str, doc: dict[str, Any]) -> None:
        self.send(rtype, json.dumps(doc).encode())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def connect(host: str, port: int, timeout: float) -> socket.socket:
    try:
        s = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise MigrationError(f"cannot connect to tcp://{host}:{port}: {e.strerror or e}") from None
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s
