"""Shared helpers for the benchmarks: environment facts and result files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def crc32c_impl() -> str | None:
    try:
        from vfmig import _core
    except ImportError:
        return None
    return _core.crc32c_impl()


def host_facts() -> dict[str, Any]:
    try:
        qemu = subprocess.run(
            ["qemu-system-x86_64", "--version"], capture_output=True, text=True, timeout=10
        ).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        qemu = None
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "qemu": qemu,
        "crc32c": crc32c_impl(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_results(name: str, doc: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"host": host_facts(), **doc}, indent=2, sort_keys=True) + "\n")
    return path


def ref_bps_key(ref: str) -> str:
    """Where the idle row keeps a TCP reference's figure: "tcp_ram_2" -> "tcp_loopback_ram_2_Bps"."""
    return ref.replace("tcp", "tcp_loopback", 1) + "_Bps"


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
