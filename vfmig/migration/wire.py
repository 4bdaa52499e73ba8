"""TCP transport: addresses, the control channel and the stream's control records.

The record format itself (header, CRC32C, limits) lives in C (csrc/stream/stream.c) and is used here
through vfmig._core, so the page channels and the control channel share one implementation.
"""

from __future__ import annotations

import contextlib
import ipaddress
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
# DEVICE_DATA: name_len u16, phase u8, flags u8, seq u32; then the name and the data.
_DEVICE_DATA = struct.Struct("<HBBI")
PHASE_PRECOPY, PHASE_STOPCOPY = 1, 2
PHASES = {PHASE_PRECOPY: "precopy", PHASE_STOPCOPY: "stop-copy"}
DD_LAST = 0x1  # the last chunk of this device's stop-copy stream
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


@dataclass(frozen=True)
class DeviceData:
    """One chunk of a device's migration data stream (a DEVICE_DATA record)."""

    name: str
    phase: int  # PHASE_PRECOPY or PHASE_STOPCOPY
    last: bool  # the last chunk of the device's stop-copy stream
    seq: int  # per device, from 0, contiguous across both phases
    data: bytes


def device_data_room(name: str) -> int:
    """The most data bytes one DEVICE_DATA record for this device can carry."""
    return _core.CTRL_MAX - _DEVICE_DATA.size - len(name.encode())


def encode_device_data(name: str, phase: int, last: bool, seq: int, data: bytes) -> bytes:
    n = name.encode()
    if not n:
        raise ValueError("a DEVICE_DATA record needs a device name")
    if phase not in PHASES or (last and phase != PHASE_STOPCOPY):
        raise ValueError(f"bad DEVICE_DATA phase {phase} (last={last})")
    if len(data) > device_data_room(name):
        raise ValueError(f"{len(data)} bytes do not fit in one DEVICE_DATA record")
    return _DEVICE_DATA.pack(len(n), phase, DD_LAST if last else 0, seq) + n + data


def decode_device_data(raw: bytes) -> DeviceData:
    """Check one DEVICE_DATA payload on its own (the order across records: DeviceDataOrder)."""
    if len(raw) < _DEVICE_DATA.size:
        raise MigrationError(f"DEVICE_DATA record of {len(raw)} bytes is too short")
    n, phase, flags, seq = _DEVICE_DATA.unpack_from(raw)
    if phase not in PHASES:
        raise MigrationError(f"DEVICE_DATA record has a bad phase {phase} (1 precopy, 2 stop-copy)")
    if flags & ~DD_LAST:
        raise MigrationError(f"DEVICE_DATA record has unknown flags 0x{flags:02x}")
    if n == 0:
        raise MigrationError("DEVICE_DATA record has an empty device name")
    if _DEVICE_DATA.size + n > len(raw):
        raise MigrationError(f"DEVICE_DATA record has a bad name length {n}")
    try:
        name = raw[_DEVICE_DATA.size : _DEVICE_DATA.size + n].decode()
    except UnicodeDecodeError:
        raise MigrationError("DEVICE_DATA record has a device name that is not UTF-8") from None
    last = bool(flags & DD_LAST)
    if last and phase != PHASE_STOPCOPY:
        raise MigrationError(f"DEVICE_DATA for {name!r}: a precopy chunk flagged as the last of the stop-copy stream")
    data = raw[_DEVICE_DATA.size + n :]
    if not data and not last:
        raise MigrationError(f"DEVICE_DATA for {name!r}: chunk {seq} carries no data")
    return DeviceData(name, phase, last, seq, data)


class DeviceDataOrder:
    """The receiver's check of the DEVICE_DATA order: only known devices; per device, seq from 0
    without gaps; precopy chunks, then stop-copy chunks; nothing after the last; and, at the end,
    a last chunk from every device."""

    def __init__(self, devices: list[str]) -> None:
        self.next_seq = dict.fromkeys(devices, 0)
        self.phase = dict.fromkeys(devices, PHASE_PRECOPY)
        self.done = dict.fromkeys(devices, False)
        self.bytes = {d: [0, 0] for d in devices}  # precopy, stop-copy

    def accept(self, c: DeviceData) -> None:
        if c.name not in self.next_seq:
            raise MigrationError(f"DEVICE_DATA for unknown device {c.name!r} (this VM migrates: {self._names()})")
        if self.done[c.name]:
            raise MigrationError(f"DEVICE_DATA for {c.name!r} after its last chunk")
        if c.seq != self.next_seq[c.name]:
            raise MigrationError(
                f"DEVICE_DATA for {c.name!r}: chunk {c.seq} out of sequence (expected {self.next_seq[c.name]})"
            )
        if c.phase < self.phase[c.name]:
            raise MigrationError(f"DEVICE_DATA for {c.name!r}: a precopy chunk after the stop-copy stream began")
        self.next_seq[c.name] += 1
        self.phase[c.name] = c.phase
        self.done[c.name] = c.last
        self.bytes[c.name][c.phase - 1] += len(c.data)

    def check_complete(self) -> None:
        missing = [d for d, done in self.done.items() if not done]
        if missing:
            raise MigrationError(f"stream ended before the last DEVICE_DATA chunk of device(s) {', '.join(missing)}")

    def _names(self) -> str:
        return ", ".join(self.next_seq) or "none"


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


def hang_up(*socks: socket.socket) -> None:
    """Shut each socket both ways, which wakes any thread blocked on it (close() alone does not),
    then close it. A peer already gone is no error."""
    for s in socks:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        s.close()


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
        hang_up(self.sock)


def connect(host: str, port: int, timeout: float) -> socket.socket:
    try:
        s = _open(host, port, timeout)
    except OSError as e:
        raise MigrationError(f"cannot connect to tcp://{host}:{port}: {e.strerror or e}") from None
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _open(host: str, port: int, timeout: float) -> socket.socket:
    """An IP address connects without getaddrinfo(), whose first call in a process loads the
    resolver: 4-8 ms here, inside the migration's setup time. A name is resolved as before."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return socket.create_connection((host, port), timeout=timeout)
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect((host, port))
    except BaseException:
        s.close()
        raise
    return s
