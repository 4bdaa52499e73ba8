"""Parsing of sizes and rates given on the command line."""

import re

from vfmig.errors import ConfigError

_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int) -> int:
    """'256M', '1G', '4096', '1.5G' -> bytes (binary units)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConfigError(f"cannot parse size {text!r}: use a number with an optional K, M, G or T suffix")
    return int(float(m.group(1)) * _SUFFIX[m.group(2).upper()])


def parse_rate(text: str | int | None) -> int:
    """Bandwidth: '500M' (bytes/s), '2G', '0' or None for unlimited."""
    if text in (None, "", "0", 0):
        return 0
    return parse_size(text)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
