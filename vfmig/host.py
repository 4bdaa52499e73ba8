"""What the host has: figures read from /proc."""

from __future__ import annotations

import contextlib


def meminfo_bytes(field: str) -> int | None:
    """A /proc/meminfo figure in bytes ("MemTotal", "MemAvailable", ...); None if unreadable."""
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name == field:
                return int(rest.split()[0]) * 1024
    return None
