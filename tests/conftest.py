"""Fixtures that probe the host and skip with the reason when it lacks something."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _kvm_reason() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm on this host"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError as e:
        return f"/dev/kvm not usable: {e.strerror}"
    os.close(fd)
    return None


def _root_reason() -> str | None:
    return None if os.geteuid() == 0 else "needs root"


@pytest.fixture
def kvm() -> None:
    reason = _kvm_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def root() -> None:
    reason = _root_reason()
    if reason:
        pytest.skip(reason)


def run_cli(*args: str, timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run `python -m vfmig ARGS` as a user would, capturing output."""
    return subprocess.run([sys.executable, "-m", "vfmig", *args], capture_output=True, text=True, timeout=timeout, **kw)
