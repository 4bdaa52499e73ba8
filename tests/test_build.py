"""The package imports the compiled extension and its guest images."""

import importlib.machinery
import re
import shutil
import subprocess

import pytest

from vfmig import _core
from vfmig.guests import GUESTS, guest_image


def test_extension_is_the_compiled_one() -> None:
    assert _core.COMPILED is True
    assert _core.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), _core.__file__
    assert isinstance(_core.now_ns(), int)


def test_guest_images_are_installed_and_flat_binaries() -> None:
    for name in GUESTS:
        img = guest_image(name)
        # A flat 32-bit image: a short jmp over the multiboot header, well under 1 MiB.
        assert 64 < len(img) < 1 << 20
        assert img[:1] == b"\xeb" and img[4:8] == b"\x02\xb0\xad\x1b", img[:8].hex()  # jmp; multiboot magic


def _usdt_probes() -> dict[str, set[tuple[str, ...]]]:
    """The extension's vfmig USDT probes (readelf -n's stapsdt notes): name -> its sites'
    argument lists, each argument as its size in bytes ("4@%eax" -> "4"; a "-" means signed)."""
    if not shutil.which("readelf"):
        pytest.skip("readelf is not installed")
    notes = subprocess.run(["readelf", "-n", _core.__file__], capture_output=True, text=True).stdout
    if "stapsdt" not in notes:
        pytest.skip("built without sys/sdt.h (install systemtap-sdt-dev)")
    probes: dict[str, set[tuple[str, ...]]] = {}
    # One note per probe site: Provider, Name, Location, then Arguments (absent with none).
    site = re.compile(r"Provider: (\S+)\n\s*Name: (\S+)\n\s*Location: [^\n]*\n(?:\s*Arguments: ([^\n]*))?")
    for provider, name, args in site.findall(notes):
        if provider == "vfmig":
            probes.setdefault(name, set()).add(tuple(a.split("@")[0] for a in args.split()))
    return probes


def test_checkpoints_are_usdt_probes() -> None:
    # Later BPF probes attach to vfmig:checkpoint; the build must carry the probe notes.
    assert _usdt_probes().get("checkpoint") == {("8", "8")}  # (const char *name, uint64_t t_ns)
    assert _core.checkpoint("test") > 0


def test_device_interrupt_and_handshake_usdt_probes() -> None:
    # The BPF probes (bpf/) read these by position and width: msix_raise(u32 bdf, u32 entry,
    # u64 msi_addr, u32 msi_data), handshake_raise(u32 bdf, u32 entry, u64 deadline_ns),
    # handshake_ack(u32 bdf), handshake_end(u32 bdf, u32 outcome, u64 latency_us); every site of
    # a probe (handshake_end has two) has the same arguments.
    probes = _usdt_probes()
    want = {
        "msix_raise": {("4", "4", "8", "4")},
        "handshake_raise": {("4", "4", "8")},
        "handshake_ack": {("4",)},
        "handshake_end": {("4", "4", "8")},
    }
    assert {name: probes.get(name) for name in want} == want, probes
