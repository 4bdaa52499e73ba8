"""MicroVM: a real KVM VM running one of vfmig's own guests, as a context manager."""

from __future__ import annotations

import errno
import json
import os
import struct
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from vfmig import _core
from vfmig.errors import ConfigError, HostError, VfmigError
from vfmig.guests import (
    BOOT_GPA,
    DATA_GPA,
    GUESTS,
    PAGE_SIZE,
    STATS_BYTES,
    STATS_GPA,
    STATS_STRIDE,
    GuestParams,
    VcpuStats,
    guest_image,
)
from vfmig.units import parse_size

TRACKERS = ("bitmap", "ring")
DEFAULT_RING_ENTRIES = 65536  # KVM's maximum: ~70 ms of the fastest dirtier between harvests
KVM_PATH = "/dev/kvm"


def check_pause_timeout(timeout_ms: int) -> None:
    if not 1 <= timeout_ms <= _core.PAUSE_TIMEOUT_MS_MAX:
        raise ConfigError(f"pause timeout must be 1..{_core.PAUSE_TIMEOUT_MS_MAX} ms, got {timeout_ms}")


@dataclass(frozen=True)
class VMConfig:
    """Everything needed to build an identical VM elsewhere (it travels in the stream header)."""

    memory: int
    vcpus: int = 1
    guest: str = "dirtier"
    tracker: str = "bitmap"
    ring_entries: int = DEFAULT_RING_ENTRIES
    params: GuestParams = field(default_factory=GuestParams)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VMConfig:
        try:
            params = GuestParams(**d.get("params", {}))
            return cls(**{**d, "params": params})
        except TypeError as e:
            raise ConfigError(f"malformed VM config: {e}") from None

    def validate(self) -> None:
        if self.guest not in GUESTS:
            raise ConfigError(f"unknown guest {self.guest!r}: choose one of {', '.join(GUESTS)}")
        if self.tracker not in TRACKERS:
            raise ConfigError(f"unknown tracker {self.tracker!r}: choose one of {', '.join(TRACKERS)}")
        if self.memory % PAGE_SIZE:
            raise ConfigError(f"memory size {self.memory} is not a multiple of the page size ({PAGE_SIZE})")
        if self.memory < 64 << 20:
            raise ConfigError(f"memory size {self.memory >> 20} MiB is below the minimum of 64 MiB")
        host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if self.memory > host:
            raise HostError(f"memory size {self.memory >> 20} MiB is too large for this host ({host >> 20} MiB of RAM)")
        if not 1 <= self.vcpus <= 8:
            raise ConfigError(f"vcpus must be 1..8, got {self.vcpus}")
        if self.memory < DATA_GPA + PAGE_SIZE * self.vcpus:
            raise ConfigError("memory too small for the guest's working set")
        self.params.validate(self.memory)


@dataclass
class VMState:
    """A paused VM's vCPU and device state (not its RAM)."""

    config: VMConfig
    vcpus: list[bytes]
    devices: dict[str, bytes]

    _MAGIC = b"VFMSTATE"

    def to_bytes(self) -> bytes:
        head = json.dumps(
            {
                "config": self.config.to_dict(),
                "vcpus": [len(b) for b in self.vcpus],
                "devices": {k: len(v) for k, v in self.devices.items()},
            }
        ).encode()
        return b"".join([self._MAGIC, struct.pack("<I", len(head)), head, *self.vcpus, *self.devices.values()])

    @classmethod
    def from_bytes(cls, raw: bytes) -> VMState:
        if raw[:8] != cls._MAGIC or len(raw) < 12:
            raise ConfigError("not a vfmig VM state file")
        (n,) = struct.unpack_from("<I", raw, 8)
        head = json.loads(raw[12 : 12 + n])
        off = 12 + n
        vcpus = []
        for ln in head["vcpus"]:
            vcpus.append(raw[off : off + ln])
            off += ln
        devices = {}
        for name, ln in head["devices"].items():
            devices[name] = raw[off : off + ln]
            off += ln
        if off != len(raw):
            raise ConfigError("VM state file is truncated or has trailing bytes")
        return cls(VMConfig.from_dict(head["config"]), vcpus, devices)


class PauseTimeoutError(VfmigError):
    """The vCPUs did not all stop within the pause deadline (one is stuck in a device access,
    say). They were let go again: the VM keeps running, as it was."""


def _core_error(e: OSError) -> VfmigError:
    msg = str(e.strerror or e)
    if e.errno in (errno.ENOENT, errno.EACCES, errno.ENODEV, errno.E2BIG, errno.ENOMEM):
        return HostError(msg)
    return ConfigError(msg)


class MicroVM:
    """A KVM VM running a built-in guest.

    >>> with MicroVM(memory="256M", guest="dirtier", rate_pps=100_000) as vm:
    ...     vm.start(); time.sleep(1); print(vm.stats()["dirty_rate_pps"])
    """

    def __init__(
        self,
        memory: int | str = "256M",
        vcpus: int = 1,
        guest: str = "dirtier",
        tracker: str = "bitmap",
        ring_entries: int = DEFAULT_RING_ENTRIES,
        **params: Any,
    ) -> None:
        try:
            gp = GuestParams(vcpus=vcpus, **params)
        except TypeError as e:
            raise ConfigError(f"unknown guest parameter: {e}") from None
        self.config = VMConfig(parse_size(memory), vcpus, guest, tracker, ring_entries, gp)
        self._open(self.config)

    @classmethod
    def from_config(cls, config: VMConfig) -> MicroVM:
        """An empty VM shaped like config, for loading state into (destination, cold restore)."""
        self = cls.__new__(cls)
        self.config = config
        self._open(config)
        return self

    def _open(self, config: VMConfig) -> None:
        config.validate()
        if not os.path.exists(KVM_PATH):
            raise HostError(f"{KVM_PATH} is missing: this host has no KVM (load kvm, or enable nested virtualization)")
        try:
            ring = config.ring_entries if config.tracker == "ring" else 0
            self.core = _core.VM(config.memory, config.vcpus, ring)
        except _core.CoreError as e:
            raise _core_error(e) from None
        self.started = False
        self.paused = False
        self._pause_ns: list[int] = []
        self._resume_ns: list[int] = []

    # lifecycle ----------------------------------------------------------------------------------
    def __enter__(self) -> MicroVM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        core = getattr(self, "core", None)
        if core is not None:
            core.close()

    def start(self) -> None:
        """Fresh boot of the configured guest."""
        self.core.boot(guest_image(self.config.guest))
        self.core.write(BOOT_GPA, self.config.params.pack(self.config.memory))
        self.core.start()
        self.started = True

    def start_loaded(self) -> None:
        """Run vCPUs whose state was loaded (no boot)."""
        self.core.start()
        self.started = True

    def pause(self, timeout_ms: int = _core.PAUSE_TIMEOUT_MS_DEFAULT) -> int:
        """Stop the vCPUs, then the devices; returns the latency in ns. Raises PauseTimeoutError
        (VM still running) if a vCPU does not stop within timeout_ms."""
        check_pause_timeout(timeout_ms)
        try:
            ns = self.core.pause(timeout_ms)
        except _core.CoreError as e:
            if e.errno == errno.ETIMEDOUT:
                raise PauseTimeoutError(f"{e.strerror}; the VM keeps running") from None
            raise VfmigError(f"cannot pause: {e.strerror}") from None
        self.paused = True
        self._pause_ns.append(ns)
        return ns

    def resume(self) -> int:
        try:
            ns = self.core.resume()
        except _core.CoreError as e:
            raise VfmigError(f"cannot resume: {self.core.failed or e}") from None
        self.paused = False
        self._resume_ns.append(ns)
        return ns

    # observation --------------------------------------------------------------------------------
    def vcpu_stats(self) -> list[VcpuStats]:
        return [
            VcpuStats.unpack(self.core.read(STATS_GPA + i * STATS_STRIDE, STATS_BYTES))
            for i in range(self.config.vcpus)
        ]

    def touches(self) -> int:
        """The guest's counter: pages it has incremented since boot, over all vCPUs."""
        return sum(s.touches for s in self.vcpu_stats())

    def measure_rate(self, seconds: float) -> float:
        """Dirty rate in pages/s as the host sees the guest's counter move over `seconds`."""
        t0, c0 = time.monotonic(), self.touches()
        time.sleep(seconds)
        t1, c1 = time.monotonic(), self.touches()
        return (c1 - c0) / (t1 - t0)

    def wrap_edges(self) -> list[int]:
        """Per vCPU slice: places where the per-page counter steps (a sequential dirtier: <= 1)."""
        p = self.config.params
        per = p.wss(self.config.memory) // PAGE_SIZE // self.config.vcpus
        return [self.core.wrap_edges(DATA_GPA + i * per * PAGE_SIZE, per, p.width) for i in range(self.config.vcpus)]

    def stats(self) -> dict[str, Any]:
        vs = self.vcpu_stats()
        return {
            "touches": sum(s.touches for s in vs),
            "passes": [s.passes for s in vs],
            "max_gap_ns": max(s.max_gap_ns for s in vs),
            "guest_state": [s.state for s in vs],
            "exits": self.core.exits(),
            "pause_latency_ns": list(self._pause_ns),
            "resume_latency_ns": list(self._resume_ns),
            "failed": self.core.failed,
            "console": self.core.console(),
        }

    # state --------------------------------------------------------------------------------------
    def save_state(self) -> VMState:
        """vCPU and device state of the paused VM."""
        if not self.paused:
            raise VfmigError("save_state needs a paused VM")
        vcpus = [self.core.save_vcpu(i) for i in range(self.config.vcpus)]
        devices = {}
        for name in self.core.device_names():
            blob = self.core.save_device(name)
            if blob is not None:
                devices[name] = blob
        return VMState(self.config, vcpus, devices)

    def load_state(self, state: VMState) -> None:
        """Apply saved state to this (not yet running) VM. Devices first, then vCPUs."""
        if self.started:
            raise VfmigError("load_state needs a VM that has not started")
        if len(state.vcpus) != self.config.vcpus:
            raise ConfigError(f"state has {len(state.vcpus)} vCPUs, the VM {self.config.vcpus}")
        try:
            for name, blob in state.devices.items():
                self.core.load_device(name, blob)
            for i, blob in enumerate(state.vcpus):
                self.core.load_vcpu(i, blob)
        except (KeyError, ValueError, _core.CoreError) as e:
            raise VfmigError(f"cannot load VM state: {e}") from None

    def save_ram(self, path: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            self.core.save_ram(fd)
        finally:
            os.close(fd)

    def load_ram(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            self.core.load_ram(fd)
        except _core.CoreError as e:
            raise VfmigError(str(e.strerror)) from None
        finally:
            os.close(fd)
