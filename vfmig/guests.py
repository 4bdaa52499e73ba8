"""The built-in guest programs and their boot parameters (the layout is csrc/include/vfmig/guest_abi.h)."""

from __future__ import annotations

import os
import struct
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from vfmig import _core
from vfmig.errors import ConfigError

GUESTS = ("dirtier", "idle", "vfdrv")  # vfdrv: simvf's driver plus the dirtier's workload
DEVICE_GUEST = "vfdrv"  # the guest a VM with a simvf runs unless told otherwise
# "fresh": sequential, but every page is rewritten whole with new pseudo-random data each pass.
PATTERNS = {"sequential": 0, "random": 1, "hotcold": 2, "fresh": 3}
# How vfdrv answers a migration notice (enum vfmig_guest_ack in guest_abi.h). "slow" is written "slow:US".
GUEST_ACKS = _core.GUEST_ACKS
ACK_DELAY_MAX_US = 10_000_000

PAGE_SIZE = 4096
BOOT_GPA = 0x2000
STATS_GPA = 0x3000
STATS_STRIDE = 512
DATA_GPA = 0x400000
LOW_RAM_MAX = 0xC0000000
BOOT_MAGIC = 0x544F4256
BOOT_VERSION = 1
GAP_RING = 16

# struct vfmig_boot_params
_BOOT = struct.Struct("<IIIIQQIIIIIIIIII")
# struct vfmig_vcpu_stats (head) and its gap ring
_STATS = struct.Struct("<QQQQQQII")
_GAP = struct.Struct("<QQ")


def guest_image(name: str) -> bytes:
    """The flat binary of a built-in guest, installed as package data by the build."""
    if name not in GUESTS:
        raise ConfigError(f"unknown guest {name!r}: choose one of {', '.join(GUESTS)}")
    path = resources.files("vfmig") / "guests" / f"{name}.bin"
    try:
        return path.read_bytes()
    except FileNotFoundError:  # pragma: no cover - a broken install
        raise ConfigError(f"guest image {name}.bin is missing from the install ({path})") from None


@dataclass(frozen=True)
class GuestParams:
    """What the guest reads from its boot-parameter page."""

    vcpus: int = 1
    pattern: str = "sequential"
    wss_bytes: int = 0  # 0: all low RAM above DATA_GPA
    rate_pps: int = 0  # total pages/s over all vCPUs; 0: as fast as it can
    # pages between clock reads, a power of two; 0: the pattern's default, 256, or 1 for fresh
    # (a fresh page takes ~1000 times an increment's guest instructions: read the clock as often)
    clock_every: int = 0
    gap_threshold_ns: int = 500_000
    hot_pct: int = 90
    hot_size_pct: int = 10
    width: int = 1
    seed: int = 1
    clock_mmio: bool = False  # read the clock through MMIO (0xFEB00000) instead of ports
    # vfdrv's answer to a migration notice: "normal" (quiesce, ack at once), "never" (a stuck
    # driver), "late" (ack after 500 ms, past any deadline) or "slow:US" (ack after US microseconds)
    guest_ack: str = "normal"

    def ack(self) -> tuple[int, int]:
        """guest_ack as the boot parameters carry it: (enum vfmig_guest_ack, ack_delay_us)."""
        spec = self.guest_ack
        if not isinstance(spec, str):
            raise ConfigError(f"guest_ack must be a string, got {spec!r}")
        name, sep, arg = spec.partition(":")
        if name == "slow":
            us = int(arg) if arg.isascii() and arg.isdigit() else 0
            if not 1 <= us <= ACK_DELAY_MAX_US:
                raise ConfigError(
                    f"guest_ack {spec!r}: slow takes its delay as slow:US, a whole number of "
                    f"microseconds 1..{ACK_DELAY_MAX_US:,}"
                )
            return GUEST_ACKS["slow"], us
        if name in GUEST_ACKS and not sep:
            return GUEST_ACKS[name], 0
        raise ConfigError(f"unknown guest_ack {spec!r}: choose normal, never, late or slow:US (US microseconds)")

    def wss(self, mem_bytes: int) -> int:
        low = min(mem_bytes, LOW_RAM_MAX)
        avail = low - DATA_GPA
        wss = self.wss_bytes or avail
        per = wss // PAGE_SIZE // self.vcpus
        return per * self.vcpus * PAGE_SIZE

    @property
    def clock_pages(self) -> int:
        """Pages the guest writes between clock reads (0 takes the pattern's default)."""
        return self.clock_every or (1 if self.pattern == "fresh" else 256)

    def validate(self, mem_bytes: int) -> None:
        if self.pattern not in PATTERNS:
            raise ConfigError(f"unknown pattern {self.pattern!r}: choose one of {', '.join(PATTERNS)}")
        avail = min(mem_bytes, LOW_RAM_MAX) - DATA_GPA
        if self.wss_bytes < 0 or self.wss_bytes > avail:
            raise ConfigError(f"working set of {self.wss_bytes} bytes does not fit in {avail} bytes of guest RAM")
        if self.wss_bytes and self.wss_bytes < PAGE_SIZE * self.vcpus:
            raise ConfigError("working set must hold at least one page per vCPU")
        if self.rate_pps < 0 or (self.rate_pps and self.rate_pps < 1000 * self.vcpus):
            raise ConfigError(f"dirty rate must be 0 (unlimited) or at least {1000 * self.vcpus} pages/s")
        if self.clock_every < 0 or self.clock_every & (self.clock_every - 1):
            raise ConfigError("clock_every must be a power of two (or 0: the pattern's default)")
        if self.width not in (1, 4):
            raise ConfigError("width must be 1 or 4 bytes")
        if not 0 <= self.hot_pct <= 100 or not 1 <= self.hot_size_pct <= 99:
            raise ConfigError("hot_pct must be 0..100 and hot_size_pct 1..99")
        self.ack()

    def pack(self, mem_bytes: int) -> bytes:
        per_vcpu = self.rate_pps / self.vcpus if self.rate_pps else 0
        ps_per_page = round(1e12 / per_vcpu) if per_vcpu else 0
        ack_mode, ack_delay_us = self.ack()
        return _BOOT.pack(
            BOOT_MAGIC,
            BOOT_VERSION,
            self.vcpus,
            PATTERNS[self.pattern],
            DATA_GPA,
            self.wss(mem_bytes),
            min(ps_per_page, 0xFFFFFFFF),
            self.clock_pages,
            self.gap_threshold_ns,
            self.hot_pct,
            self.hot_size_pct,
            self.width,
            self.seed,
            int(self.clock_mmio),
            ack_mode,
            ack_delay_us,
        )


@dataclass(frozen=True)
class VcpuStats:
    """One vCPU's stats page, as the guest wrote it."""

    touches: int
    passes: int
    first_clock_ns: int
    last_clock_ns: int
    max_gap_ns: int
    max_gap_start_ns: int
    state: int
    gap_count: int
    gaps: tuple[tuple[int, int], ...]  # (start_ns, len_ns), most recent last

    @classmethod
    def unpack(cls, raw: bytes) -> VcpuStats:
        touches, passes, first, last, max_gap, max_gap_start, state, count = _STATS.unpack_from(raw, 0)
        ring = [_GAP.unpack_from(raw, _STATS.size + i * _GAP.size) for i in range(GAP_RING)]
        n = min(count, GAP_RING)
        gaps = tuple(ring[(count - n + i) % GAP_RING] for i in range(n))
        return cls(touches, passes, first, last, max_gap, max_gap_start, state, count, gaps)

    def gap_covering(self, start_ns: int, end_ns: int) -> int | None:
        """Length of the logged clock gap that spans [start_ns, end_ns], if any."""
        best = None
        for g_start, g_len in self.gaps:
            if g_start <= end_ns and g_start + g_len >= start_ns and (best is None or g_len > best):
                best = g_len
        return best


STATS_BYTES = _STATS.size + GAP_RING * _GAP.size


def guest_elf(name: str) -> Path:
    """A real file path to the guest's ELF (for QEMU's multiboot loader)."""
    if name not in GUESTS:
        raise ConfigError(f"unknown guest {name!r}: choose one of {', '.join(GUESTS)}")
    res = resources.files("vfmig") / "guests" / f"{name}.elf"
    if isinstance(res, Path):
        return res
    # An editable install serves package data through its own Traversable: copy it out once.
    out = Path(tempfile.gettempdir()) / f"vfmig-{os.getuid()}-{name}.elf"
    data = res.read_bytes()
    if not out.exists() or out.read_bytes() != data:
        out.write_bytes(data)
    return out
