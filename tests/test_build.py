"""The package imports the compiled extension and its guest images."""

import importlib.machinery
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


def test_checkpoints_are_usdt_probes() -> None:
    # Later BPF probes attach to vfmig:checkpoint; the build must carry the probe notes.
    if not shutil.which("readelf"):
        pytest.skip("readelf is not installed")
    notes = subprocess.run(["readelf", "-n", _core.__file__], capture_output=True, text=True).stdout
    if "stapsdt" not in notes:
        pytest.skip("built without sys/sdt.h (install systemtap-sdt-dev)")
    assert "Provider: vfmig" in notes and "Name: checkpoint" in notes
    assert _core.checkpoint("test") > 0
