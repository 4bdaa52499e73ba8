"""MicroVM: a real KVM VM running one of vfmig's own guests, as a context manager."""

from __future__ import annotations

import errno
import json
import os
import re
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


DEVICE_KINDS = ("simvf",)
_DEVICE_NAME = re.compile(r"[A-Za-z0-9_-]{1,31}")


@dataclass(frozen=True)
class DeviceSpec:
    """A PCI device model added to the VM (today: simvf, the emulated NIC VF). It travels in the
    stream header so that the destination builds the same device."""

    kind: str = "simvf"
    name: str = "vf0"
    state_bytes: int = 1 << 20  # the device's internal state (queues, counters, flow table)
    dma_rate: int = 10_000  # packets/s its wire offers the guest
    precopy: bool = True  # offer PRE_COPY: the state streams while the VM runs
    migration: bool = True  # the generic migration capability in config space

    def validate(self) -> None:
        if self.kind not in DEVICE_KINDS:
            raise ConfigError(f"unknown device kind {self.kind!r}: choose one of {', '.join(DEVICE_KINDS)}")
        if not isinstance(self.name, str) or not _DEVICE_NAME.fullmatch(self.name):
            raise ConfigError(f"bad device name {self.name!r}: 1..31 of A-Z a-z 0-9 _ -")
        lo, hi, page = _core.SIMVF_STATE_MIN, _core.SIMVF_STATE_MAX, PAGE_SIZE
        if type(self.state_bytes) is not int or not lo <= self.state_bytes <= hi or self.state_bytes % page:
            raise ConfigError(
                f"device {self.name}: state size {self.state_bytes} must be {lo >> 10} KiB..{hi >> 20} MiB, "
                f"a multiple of {page >> 10} KiB"
            )
        if type(self.dma_rate) is not int or not 0 <= self.dma_rate <= _core.SIMVF_RATE_MAX:
            raise ConfigError(
                f"device {self.name}: DMA rate {self.dma_rate} must be 0..{_core.SIMVF_RATE_MAX} packets/s"
            )
        if type(self.precopy) is not bool or type(self.migration) is not bool:
            raise ConfigError(f"device {self.name}: precopy and migration must be on or off")

    @classmethod
    def from_dict(cls, d: object) -> DeviceSpec:
        if not isinstance(d, dict):
            raise ConfigError(f"malformed device in the VM config: {d!r}")
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(f"malformed device in the VM config: {e}") from None


_ON_OFF = {"on": True, "off": False}


def parse_device(text: str) -> DeviceSpec:
    """`simvf[,name=N,state=SIZE,dma_rate=PPS,precopy=on|off,migration=on|off]` -> a checked
    DeviceSpec. ConfigError naming the bad part otherwise."""
    kind, *opts = text.split(",")
    kind = kind.strip()
    if kind not in DEVICE_KINDS:
        raise ConfigError(f"unknown device kind {kind!r} in {text!r}: choose one of {', '.join(DEVICE_KINDS)}")
    kw: dict[str, Any] = {}
    keys = ("name", "state", "dma_rate", "precopy", "migration")
    for opt in opts:
        key, sep, value = opt.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in keys:
            raise ConfigError(f"bad device option {opt!r} in {text!r}: use {', '.join(k + '=...' for k in keys)}")
        if key in kw or (key == "state" and "state_bytes" in kw):
            raise ConfigError(f"device option {key!r} given twice in {text!r}")
        if key == "name":
            kw["name"] = value
        elif key == "state":
            try:
                kw["state_bytes"] = parse_size(value)
            except ConfigError:
                raise ConfigError(f"bad device option {opt!r} in {text!r}: not a size (e.g. 16M)") from None
        elif key == "dma_rate":
            if not value.isdigit():
                raise ConfigError(f"bad device option {opt!r} in {text!r}: not a whole number of packets/s")
            kw["dma_rate"] = int(value)
        else:
            if value not in _ON_OFF:
                raise ConfigError(f"bad device option {opt!r} in {text!r}: use on or off")
            kw[key] = _ON_OFF[value]
    spec = DeviceSpec(kind, **kw)
    spec.validate()
    return spec


@dataclass(frozen=True)
class VMConfig:
    """Everything needed to build an identical VM elsewhere (it travels in the stream header)."""

    memory: int
    vcpus: int = 1
    guest: str = "dirtier"
    tracker: str = "bitmap"
    ring_entries: int = DEFAULT_RING_ENTRIES
    params: GuestParams = field(default_factory=GuestParams)
    devices: tuple[DeviceSpec, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["devices"] = [asdict(s) for s in self.devices]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VMConfig:
        devices = d.get("devices", [])
        if not isinstance(devices, list):
            raise ConfigError("malformed VM config: devices must be a list")
        specs = tuple(DeviceSpec.from_dict(x) for x in devices)
        try:
            params = GuestParams(**d.get("params", {}))
            return cls(**{**d, "params": params, "devices": specs})
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
        self.validate_devices()

    def validate_devices(self) -> None:
        names = set()
        for spec in self.devices:
            spec.validate()
            if spec.name in names:
                raise ConfigError(f"two devices are named {spec.name!r}")
            names.add(spec.name)


@dataclass
class VMState:
    """A paused VM's vCPU and device state (not its RAM)."""

    config: VMConfig
    vcpus: list[bytes]
    devices: dict[str, bytes]

    _MAGIC = b"VFMSTATE"

    def to_bytes(self) -> bytes:
        if self.config.devices:
            names = ", ".join(d.name for d in self.config.devices)
            raise ConfigError(
                f"a VM with a migratable device ({names}) cannot be saved to a file: "
                "device state travels only in a live migration"
            )
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
        devices: tuple[DeviceSpec, ...] | list[DeviceSpec] = (),
        **params: Any,
    ) -> None:
        try:
            gp = GuestParams(vcpus=vcpus, **params)
        except TypeError as e:
            raise ConfigError(f"unknown guest parameter: {e}") from None
        self.config = VMConfig(parse_size(memory), vcpus, guest, tracker, ring_entries, gp, tuple(devices))
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
        try:
            for spec in config.devices:
                self.core.add_simvf(spec.name, spec.state_bytes, spec.dma_rate, spec.precopy, spec.migration)
        except _core.CoreError as e:
            self.core.close()
            raise ConfigError(f"cannot add device: {e.strerror}") from None
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

    def pause(
        self, timeout_ms: int = _core.PAUSE_TIMEOUT_MS_DEFAULT, checkpoint: str | None = None, unthrottle_ms: int = 0
    ) -> int:
        """Stop the vCPUs, then the devices; returns the latency in ns. Raises PauseTimeoutError
        (VM still running) if a vCPU does not stop within timeout_ms. With unthrottle_ms, the
        throttle ends first and each vCPU runs again: one exit, two after a sleep
        (core.pause_unthrottle says what it did); a checkpoint name is recorded right before the
        kick, and core.pause_checkpoint_ns is when the last vCPU left its guest (between that mark
        and the end of the kicks)."""
        check_pause_timeout(timeout_ms)
        try:
            ns = self.core.pause(timeout_ms, checkpoint, unthrottle_ms)
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
            if self.core.failed:
                raise VfmigError(f"cannot resume: {self.core.failed}") from None
            # The vCPUs run again (the guest must not hang on a device); a device did not start.
            self.paused = False
            raise VfmigError(f"resumed, but a device did not start: {e}") from None
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
            "devices": self.device_counters(),
            "vf_driver": self.vf_driver(),
        }

    def vf_driver(self) -> dict[str, Any] | None:
        """The VF driver's counters in guest RAM (struct simvf_guest_stats), with its state by
        name; None when the VM has no simvf or the driver has not started."""
        if not any(d.kind == "simvf" for d in self.config.devices):
            return None
        st: dict[str, Any] = dict(self.core.simvf_guest_stats())
        if st["magic"] != _core.SIMVF_GUEST_MAGIC:
            return None
        st["state_name"] = _core.SIMVF_GUEST_STATES.get(st["state"], str(st["state"]))
        st["first_error_name"] = _core.SIMVF_GUEST_ERRORS.get(st["first_error"], str(st["first_error"]))
        return st

    def vf_packets(self) -> dict[str, int] | None:
        """What the report calls the guest's packet counters (None without a running VF driver)."""
        st = self.vf_driver()
        if st is None:
            return None
        return {"received": st["received"], "dropped": st["dropped_seen"], "errors": st["errors"], "tx": st["tx_sent"]}

    def device_counters(self) -> dict[str, dict[str, int]]:
        """Each simvf's own counters (sent = delivered + dropped, ...)."""
        return {d.name: self.core.simvf_counters(d.name) for d in self.config.devices if d.kind == "simvf"}

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
