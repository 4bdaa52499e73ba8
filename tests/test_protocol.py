"""Control records: every message round-trips, and malformed ones are rejected with a reason."""

from __future__ import annotations

import socket
import struct

import pytest

from vfmig import _core
from vfmig.errors import MigrationError
from vfmig.migration.wire import (
    Digest,
    Hello,
    decode_channel,
    decode_device,
    decode_vcpu,
    encode_channel,
    encode_device,
    encode_vcpu,
)

TOKEN = bytes(range(16))


def _hello(**kw: object) -> Hello:
    args = {
        "version": _core.STREAM_VERSION,
        "channels": 4,
        "mem_bytes": 1 << 30,
        "vcpus": 2,
        "verify": True,
        "token": TOKEN,
        "config": {"memory": 1 << 30, "vcpus": 2},
    }
    args.update(kw)
    return Hello(**args)  # type: ignore[arg-type]


def test_hello_round_trip() -> None:
    h = _hello()
    assert Hello.decode(h.encode()) == h


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda b: b"XFMIGSTR" + b[8:], "bad stream magic"),
        (lambda b: b[:8] + struct.pack("<H", 99) + b[10:], "unsupported stream version 99"),
        (lambda b: b[:10] + struct.pack("<H", 0) + b[12:], "channels"),
        (lambda b: b[:10] + struct.pack("<H", 99) + b[12:], "channels"),
        (lambda b: b[:12] + struct.pack("<I", 8192) + b[16:], "page size"),
        (lambda b: b[:28] + struct.pack("<I", 0x80) + b[32:], "flags"),
        (lambda b: b[:-1], "bad length"),
        (lambda b: b[:20], "too short"),
        (lambda b: b[: len(b) - 5] + b"{{{{{", "not valid JSON"),
    ],
)
def test_hello_rejects(mutate, match: str) -> None:
    with pytest.raises(MigrationError, match=match):
        Hello.decode(mutate(_hello().encode()))


def test_hello_and_channel_wire_format() -> None:
    """The C encoders write the documented layout, byte for byte (docs/stream-format.md §4)."""
    h = _hello()
    cfg = b'{"memory": 1073741824, "vcpus": 2}'
    assert h.encode() == struct.pack("<8sHHIQII16sII", b"VFMIGSTR", 2, 4, 4096, 1 << 30, 2, 1, TOKEN, len(cfg), 0) + cfg
    assert encode_channel(TOKEN, 3) == struct.pack("<16sHHI", TOKEN, 3, 2, 0)
    with pytest.raises(ValueError, match="16 bytes"):
        encode_channel(b"short", 3)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (_hello().encode()[:52] + b"\1\0\0\0" + _hello().encode()[56:], "unsupported page size or flags"),
        (b"", "too short"),
        (_hello().encode()[:48] + struct.pack("<I", 16385) + _hello().encode()[52:], "bad length"),
    ],
)
def test_hello_rejects_reserved_and_lengths(raw: bytes, match: str) -> None:
    with pytest.raises(MigrationError, match=match):
        Hello.decode(raw)


def test_channel_rejects_reserved_and_lengths() -> None:
    good = encode_channel(TOKEN, 3)
    with pytest.raises(MigrationError, match=r"^bad channel opener \(reserved field set\)$"):
        decode_channel(good[:20] + b"\0\0\0\1")
    with pytest.raises(MigrationError, match="^bad channel opener$"):
        decode_channel(good + b"\0")
    with pytest.raises(MigrationError, match="^page channel speaks stream version 0, not 2$"):
        decode_channel(good[:18] + b"\0" * 6)


def test_channel_device_vcpu_round_trip_and_reject() -> None:
    assert decode_channel(encode_channel(TOKEN, 3)) == (TOKEN, 3)
    with pytest.raises(MigrationError, match="version"):
        decode_channel(encode_channel(TOKEN, 3)[:18] + struct.pack("<H", 7) + b"\0" * 4)
    with pytest.raises(MigrationError, match="bad channel opener"):
        decode_channel(b"short")
    assert decode_device(encode_device("platform", b"\x01\x02")) == ("platform", b"\x01\x02")
    with pytest.raises(MigrationError, match="name length"):
        decode_device(struct.pack("<HH", 200, 0) + b"abc")
    with pytest.raises(MigrationError, match="too short"):
        decode_device(b"\x01")
    assert decode_vcpu(encode_vcpu(1, b"state")) == (1, b"state")
    with pytest.raises(MigrationError, match="too short"):
        decode_vcpu(b"\x01\x00")


def test_record_framing_round_trip_and_every_byte_is_checked() -> None:
    rec = _core.encode_record(_core.REC["GUEST"], b'{"x": 1}')
    hdr, payload = rec[:16], rec[16:]
    assert _core.check_header(hdr, 1024) == (_core.REC["GUEST"], len(payload))
    _core.check_crc(hdr, payload)
    for i in range(len(rec)):  # any single flipped bit: a clear rejection, never acceptance
        bad = bytearray(rec)
        bad[i] ^= 0x01
        with pytest.raises(_core.StreamError):
            _core.check_header(bytes(bad[:16]), 1024)
            _core.check_crc(bytes(bad[:16]), bytes(bad[16:]))


@pytest.mark.parametrize(
    ("hdr", "match"),
    [
        (struct.pack("<IHHII", 0x12345678, 1, 0, 0, 0), "bad record magic"),
        (struct.pack("<IHHII", 0x524D4656, 0, 0, 0, 0), "unknown record type 0"),
        (struct.pack("<IHHII", 0x524D4656, 99, 0, 0, 0), "unknown record type 99"),
        (struct.pack("<IHHII", 0x524D4656, 1, 4, 0, 0), "unknown flags"),
        (struct.pack("<IHHII", 0x524D4656, 1, 0, 1 << 30, 0), "exceeds the limit"),
    ],
)
def test_record_header_rejects(hdr: bytes, match: str) -> None:
    with pytest.raises(_core.StreamError, match=match):
        _core.check_header(hdr, _core.CTRL_MAX)


def test_control_digest_detects_a_lost_record() -> None:
    tx, rx = Digest(), Digest()
    recs = [_core.encode_record(_core.REC["DEVICE"], encode_device(f"d{i}", b"x" * i)) for i in range(3)]
    for r in recs:
        tx.add(r[:16])
    for r in recs[:2]:
        rx.add(r[:16])
    with pytest.raises(MigrationError, match="digest mismatch"):
        rx.check_eos(tx.eos())
    rx.add(recs[2][:16])
    rx.check_eos(tx.eos())
    with pytest.raises(MigrationError, match="bad length"):
        rx.check_eos(b"\0")


def test_crc32c_known_answer() -> None:
    assert _core.crc32c(b"123456789") == 0xE3069283
    assert _core.crc32c(b"56789", _core.crc32c(b"1234")) == 0xE3069283


def _zero_run_and_eos(first_page: int, count: int) -> bytes:
    """A CRC-valid ZERO run, then the EOS whose digest covers it: a complete channel stream."""
    rec = _core.encode_record(_core.REC["PAGES"], struct.pack("<QIB3x", first_page * 4096, count, 2))
    d = Digest()
    d.add(rec[:16])
    return rec + _core.encode_record(_core.REC["EOS"], d.eos())


@pytest.mark.parametrize(
    ("channel", "first", "count", "match"),
    [
        (1, 512, 256, None),  # 512 / 512 mod 2 = 1: its own stripe
        (1, 0, 1, "channel 1: run at page 0 belongs to channel 0"),
        (0, 510, 4, "channel 0: run at page 510 \\(\\+4\\) crosses its stripe"),
    ],
)
def test_page_channel_rejects_a_run_outside_its_stripes(
    kvm: None, channel: int, first: int, count: int, match: str | None
) -> None:
    vm = _core.VM(64 << 20)
    pairs = [socket.socketpair() for _ in range(2)]
    try:
        rx = _core.PageReceiver(vm, [p[1].fileno() for p in pairs])
        for c, (tx, _) in enumerate(pairs):
            tx.sendall(_zero_run_and_eos(first, count) if c == channel else _zero_run_and_eos(c * 512, 1))
        rx.start()
        if match is None:
            rx.join()
            assert rx.stats()["pages"] == count + 1
        else:
            with pytest.raises(_core.StreamError, match=match):
                rx.join()
    finally:
        for p in pairs:
            p[0].close()
            p[1].close()
        vm.close()
