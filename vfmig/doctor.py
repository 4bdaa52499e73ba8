"""``vfmig doctor``: report what this host supports for live migration.

Pure standard library on purpose: this module must work even when the C
extension (``vfmig._core``) is missing or broken, so it imports nothing else
from ``vfmig``.  Every probe is guarded; a failing probe yields a ``Check``
with ``ok=False`` and the reason in ``detail`` rather than an exception.
"""

import contextlib
import errno
import fcntl
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# --- paths (module-level so tests can point them elsewhere) -----------------

KVM_PATH = "/dev/kvm"
TRACEFS_EVENT_DIRS = ("/sys/kernel/tracing/events", "/sys/kernel/debug/tracing/events")
BCC_DIST_DIR = "/usr/lib/python3/dist-packages/bcc"
MODULES_DIR = "/lib/modules"
SDT_HEADER = "/usr/include/sys/sdt.h"
SHMEM_THP = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"
VFIO_DEV_DIR = "/dev/vfio"
VFIO_PCI_DRIVER_DIR = "/sys/bus/pci/drivers/vfio-pci"
PCI_DEVICES_DIR = "/sys/bus/pci/devices"
QEMU_BINARY = "qemu-system-x86_64"
PERF_BINARY = "perf"
VERSION_TIMEOUT_S = 10.0

# --- KVM ABI constants (linux/kvm.h) ----------------------------------------

KVMIO = 0xAE
KVM_GET_API_VERSION = 0xAE00  # _IO(KVMIO, 0x00)
KVM_CREATE_VM = 0xAE01  # _IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = 0xAE03  # _IO(KVMIO, 0x03)
KVM_API_VERSION = 12

KVM_CAP_IRQCHIP = 0
KVM_CAP_NR_VCPUS = 9
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_IRQFD = 32
KVM_CAP_IOEVENTFD = 36
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_SIGNAL_MSI = 77
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_DIRTY_LOG_RING = 192
KVM_CAP_DIRTY_LOG_RING_ACQ_REL = 223

KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1
KVM_DIRTY_GFN_SIZE = 16  # sizeof(struct kvm_dirty_gfn)

_PCI_ADDR_RE = re.compile(r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")


@dataclass
class Check:
    name: str  # e.g. "kvm"
    ok: bool
    detail: str  # one line, human readable
    data: dict[str, Any] = field(default_factory=dict)


_Result = tuple[bool, str, dict[str, Any]]


class _Unavailable(Exception):
    """A prerequisite of a probe (e.g. /dev/kvm) is not available."""


class _Probe:
    """Shared state for one run: lazily opened /dev/kvm and VM fds, closed by ``close()``."""

    def __init__(self) -> None:
        self._kvm_fd: int | None = None
        self._kvm_error: str | None = None
        self._vm_fd: int | None = None
        self._vm_error: str | None = None

    def kvm_fd(self) -> int:
        if self._kvm_fd is not None:
            return self._kvm_fd
        if self._kvm_error is None:
            try:
                self._kvm_fd = os.open(KVM_PATH, os.O_RDWR | os.O_CLOEXEC)
                return self._kvm_fd
            except OSError as e:
                word = "missing" if e.errno in (errno.ENOENT, errno.ENODEV, errno.ENXIO) else "unusable"
                self._kvm_error = f"{KVM_PATH} {word}: {e.strerror or e}"
        raise _Unavailable(self._kvm_error)

    def vm_fd(self) -> int:
        if self._vm_fd is not None:
            return self._vm_fd
        if self._vm_error is None:
            kvm = self.kvm_fd()
            try:
                self._vm_fd = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
                return self._vm_fd
            except OSError as e:
                self._vm_error = f"KVM_CREATE_VM failed: {e.strerror or e}"
        raise _Unavailable(self._vm_error)

    def check_extension(self, cap: int, *, on_vm: bool = False) -> int:
        fd = self.vm_fd() if on_vm else self.kvm_fd()
        return fcntl.ioctl(fd, KVM_CHECK_EXTENSION, cap)

    def close(self) -> None:
        for fd in (self._vm_fd, self._kvm_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._vm_fd = None
        self._kvm_fd = None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


# --- KVM checks --------------------------------------------------------------


def _check_kvm(probe: _Probe) -> _Result:
    try:
        fd = probe.kvm_fd()
    except _Unavailable as e:
        return False, str(e), {}
    api = fcntl.ioctl(fd, KVM_GET_API_VERSION, 0)
    data: dict[str, Any] = {"api_version": api}
    if api != KVM_API_VERSION:
        return False, f"{KVM_PATH} API {api}, expected {KVM_API_VERSION}", data
    nr = probe.check_extension(KVM_CAP_NR_VCPUS)
    mx = probe.check_extension(KVM_CAP_MAX_VCPUS) or nr
    data.update(nr_vcpus=nr, max_vcpus=mx)
    return True, f"{KVM_PATH} API {api}, vcpus recommended {nr} max {mx}", data


def _check_dirty_ring(probe: _Probe) -> _Result:
    max_bytes = probe.check_extension(KVM_CAP_DIRTY_LOG_RING, on_vm=True)
    acq_rel = probe.check_extension(KVM_CAP_DIRTY_LOG_RING_ACQ_REL, on_vm=True)
    data: dict[str, Any] = {"max_bytes": max_bytes, "acq_rel": acq_rel > 0}
    if max_bytes <= 0 and acq_rel > 0:
        # Some architectures only advertise the acquire/release flavour.
        max_bytes = data["max_bytes"] = acq_rel
    if max_bytes <= 0:
        return False, "KVM_CAP_DIRTY_LOG_RING not supported (dirty bitmap only)", data
    entries = max_bytes // KVM_DIRTY_GFN_SIZE
    return True, f"max {max_bytes} bytes ({entries} entries/vcpu), acq_rel {_yes(acq_rel > 0)}", data


def _check_manual_protect(probe: _Probe) -> _Result:
    flags = probe.check_extension(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, on_vm=True)
    initially_set = bool(flags & KVM_DIRTY_LOG_INITIALLY_SET)
    data: dict[str, Any] = {"flags": flags, "initially_set": initially_set}
    if not flags & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
        return False, "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 not supported", data
    return True, f"manual dirty-log protect (flags {flags:#x}, initially_set {_yes(initially_set)})", data


def _cap_check(cap: int, cap_name: str) -> Callable[[_Probe], _Result]:
    def check(probe: _Probe) -> _Result:
        value = probe.check_extension(cap)
        if value > 0:
            return True, f"{cap_name} = {value}", {"value": value}
        return False, f"{cap_name} not supported", {"value": value}

    return check


def _check_msi_routing(probe: _Probe) -> _Result:
    routes = probe.check_extension(KVM_CAP_IRQ_ROUTING)
    signal_msi = probe.check_extension(KVM_CAP_SIGNAL_MSI)
    data: dict[str, Any] = {"irq_routing": routes, "signal_msi": signal_msi > 0}
    missing = [n for n, v in (("KVM_CAP_IRQ_ROUTING", routes), ("KVM_CAP_SIGNAL_MSI", signal_msi)) if v <= 0]
    if missing:
        return False, f"{' and '.join(missing)} not supported", data
    return True, f"IRQ routing ({routes} GSIs), KVM_SIGNAL_MSI", data


# --- tracing / build environment ---------------------------------------------


def _check_tracefs(probe: _Probe) -> _Result:
    for events in TRACEFS_EVENT_DIRS:
        if os.path.isdir(events):
            kvm_events = os.path.isdir(os.path.join(events, "kvm"))
            data: dict[str, Any] = {"path": events, "kvm_events": kvm_events}
            return True, f"{events} (kvm events {_yes(kvm_events)})", data
    return False, "not mounted: mount -t tracefs tracefs /sys/kernel/tracing", {"path": None}


def _load_bcc_from(pkg_dir: str) -> Any:
    """Import ``bcc`` from ``pkg_dir`` only, without adding its parent to sys.path.

    The probe leaves ``sys.modules`` as it found it.
    """
    init = os.path.join(pkg_dir, "__init__.py")
    spec = importlib.util.spec_from_file_location("bcc", init, submodule_search_locations=[pkg_dir])
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot build an import spec for {init}")
    before = {k: v for k, v in sys.modules.items() if k == "bcc" or k.startswith("bcc.")}
    module = importlib.util.module_from_spec(spec)
    sys.modules["bcc"] = module
    try:
        spec.loader.exec_module(module)
    finally:
        for key in [k for k in sys.modules if k == "bcc" or k.startswith("bcc.")]:
            if key not in before:
                del sys.modules[key]
        sys.modules.update(before)
    return module


def _check_bcc(probe: _Probe) -> _Result:
    try:
        import bcc

        module: Any = bcc
        how = "import bcc"
    except ImportError as first:
        if not os.path.isfile(os.path.join(BCC_DIST_DIR, "__init__.py")):
            return False, f"not importable ({_one_line(str(first))}); install python3-bpfcc", {"path": None}
        try:
            module = _load_bcc_from(BCC_DIST_DIR)
        except Exception as e:
            return (
                False,
                f"found {BCC_DIST_DIR} but import failed: {type(e).__name__}: {e}",
                {"path": BCC_DIST_DIR},
            )
        how = "loaded from system dist-packages"
    path = os.path.dirname(getattr(module, "__file__", None) or BCC_DIST_DIR)
    version = getattr(module, "__version__", None)
    data: dict[str, Any] = {"path": path, "version": version}
    return True, f"bcc {version or '?'} at {path} ({how})", data


def _headers_release(build: str) -> str | None:
    try:
        with open(os.path.join(build, "include", "generated", "utsrelease.h")) as f:
            m = re.search(r'UTS_RELEASE\s+"([^"]+)"', f.read())
    except OSError:
        return None
    return m.group(1) if m else None


def _check_kernel_headers(probe: _Probe) -> _Result:
    release = os.uname().release
    build = os.path.join(MODULES_DIR, release, "build")
    data: dict[str, Any] = {"path": build, "target": None, "release": release}
    if not os.path.exists(build):
        return False, f"no headers for {release}: {build} missing", data
    target = os.path.realpath(build)
    data["target"] = target
    # Distro split layouts (e.g. Debian's -amd64/-common) keep include/linux under the "source" tree.
    source = os.path.join(MODULES_DIR, release, "source")
    include_root = next((d for d in (build, source) if os.path.isdir(os.path.join(d, "include", "linux"))), None)
    if include_root is None:
        return False, f"{build} -> {target} has no include/linux", data
    data["include_root"] = os.path.realpath(include_root)
    headers_release = _headers_release(build)
    data["headers_release"] = headers_release
    detail = f"{build} -> {target}"
    if headers_release is not None and headers_release != release:
        detail += f" (WARNING: headers are for {headers_release}, running {release})"
    return True, detail, data


def _check_sdt(probe: _Probe) -> _Result:
    for path in (SDT_HEADER, SDT_HEADER.replace("/usr/include/", "/usr/include/x86_64-linux-gnu/")):
        if os.path.isfile(path):
            return True, f"{path} present (USDT probes compiled in)", {"path": path}
    return False, f"{SDT_HEADER} missing (install systemtap-sdt-dev); USDT probes disabled", {"path": None}


def _check_shmem_thp(probe: _Probe) -> _Result:
    try:
        with open(SHMEM_THP) as f:
            mode = f.read().split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        return False, f"{SHMEM_THP} unreadable", {"mode": None}
    ok = mode in ("advise", "always", "within_size", "force")
    hint = "" if ok else " (guest RAM populates ~10x slower; `make bootstrap` as root sets advise)"
    return ok, f"shared-memory THP: {mode}{hint}", {"mode": mode}


# --- devices -----------------------------------------------------------------


def _sorted_listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


def _check_vfio(probe: _Probe) -> _Result:
    dev_present = os.path.isdir(VFIO_DEV_DIR)
    groups = [g for g in _sorted_listdir(VFIO_DEV_DIR) if g != "vfio"]
    driver_loaded = os.path.isdir(VFIO_PCI_DRIVER_DIR)
    devices = [d for d in _sorted_listdir(VFIO_PCI_DRIVER_DIR) if _PCI_ADDR_RE.match(d)]
    data: dict[str, Any] = {
        "groups": groups,
        "devices": devices,
        "dev_vfio": dev_present,
        "vfio_pci_loaded": driver_loaded,
    }
    if devices:
        detail = f"{len(devices)} device(s) on vfio-pci ({', '.join(devices)}), {len(groups)} group(s)"
    else:
        why = f"vfio-pci has {len(devices)} devices" if driver_loaded else "vfio-pci driver not loaded"
        detail = f"no VFIO devices ({why})"
    if not dev_present:
        detail += f"; {VFIO_DEV_DIR} missing"
    return True, detail, data


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _check_sriov(probe: _Probe) -> _Result:
    pfs: list[dict[str, Any]] = []
    for address in _sorted_listdir(PCI_DEVICES_DIR):
        dev = os.path.join(PCI_DEVICES_DIR, address)
        total = _read_int(os.path.join(dev, "sriov_totalvfs"))
        if not total or total <= 0:
            continue
        driver_link = os.path.join(dev, "driver")
        driver = os.path.basename(os.path.realpath(driver_link)) if os.path.exists(driver_link) else None
        pfs.append(
            {
                "address": address,
                "total_vfs": total,
                "num_vfs": _read_int(os.path.join(dev, "sriov_numvfs")) or 0,
                "driver": driver,
            }
        )
    if not pfs:
        return True, "no SR-IOV capable PFs", {"pfs": pfs}
    parts = [f"{p['address']} ({p['driver'] or 'no driver'}, {p['num_vfs']}/{p['total_vfs']} VFs)" for p in pfs]
    return True, f"{len(pfs)} PF(s): {', '.join(parts)}", {"pfs": pfs}


# --- tools -------------------------------------------------------------------


def _tool_version(binary: str) -> _Result:
    path = shutil.which(binary)
    if path is None:
        return False, f"{binary} not found in PATH", {"path": None}
    data: dict[str, Any] = {"path": path}
    try:
        proc = subprocess.run(
            [path, "--version"],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=VERSION_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return False, f"{path} --version timed out after {VERSION_TIMEOUT_S:g}s", data
    out = proc.stdout.strip() or proc.stderr.strip()
    first = _one_line(out.splitlines()[0]) if out else ""
    data["version"] = first or None
    if proc.returncode != 0:
        return False, f"{path} --version exited {proc.returncode}: {first or 'no output'}", data
    return True, first or f"{path} (no version output)", data


def _check_qemu(probe: _Probe) -> _Result:
    return _tool_version(QEMU_BINARY)


def _check_perf(probe: _Probe) -> _Result:
    return _tool_version(PERF_BINARY)


# --- public API --------------------------------------------------------------


def _check_table() -> list[tuple[str, Callable[[_Probe], _Result]]]:
    # Built per call (not at import) so module attributes can be monkeypatched.
    return [
        ("kvm", _check_kvm),
        ("dirty_ring", _check_dirty_ring),
        ("manual_protect", _check_manual_protect),
        ("irqchip", _cap_check(KVM_CAP_IRQCHIP, "KVM_CAP_IRQCHIP")),
        ("irqfd", _cap_check(KVM_CAP_IRQFD, "KVM_CAP_IRQFD")),
        ("ioeventfd", _cap_check(KVM_CAP_IOEVENTFD, "KVM_CAP_IOEVENTFD")),
        ("msi_routing", _check_msi_routing),
        ("tracefs", _check_tracefs),
        ("bcc", _check_bcc),
        ("kernel_headers", _check_kernel_headers),
        ("sdt", _check_sdt),
        ("shmem_thp", _check_shmem_thp),
        ("vfio", _check_vfio),
        ("sriov", _check_sriov),
        ("qemu", _check_qemu),
        ("perf", _check_perf),
    ]


def _guarded(name: str, fn: Callable[[_Probe], _Result], probe: _Probe) -> Check:
    try:
        ok, detail, data = fn(probe)
    except _Unavailable as e:
        ok, detail, data = False, f"skipped: {e}", {}
    except Exception as e:
        ok, detail, data = False, f"probe failed: {type(e).__name__}: {e}", {"error": str(e)}
    return Check(name=name, ok=bool(ok), detail=_one_line(detail) or ("ok" if ok else "failed"), data=data)


def run_checks() -> list[Check]:
    """Run every probe in a fixed order; never raises for probe failures."""
    probe = _Probe()
    try:
        return [_guarded(name, fn, probe) for name, fn in _check_table()]
    finally:
        probe.close()


def as_json(checks: list[Check]) -> dict[str, Any]:
    """``{name: {"ok": ..., "detail": ..., **data}}``, suitable for ``json.dumps``."""
    out: dict[str, Any] = {}
    for c in checks:
        entry: dict[str, Any] = {"ok": c.ok, "detail": c.detail}
        entry.update({k: v for k, v in c.data.items() if k not in entry})
        out[c.name] = entry
    return out


def format_text(checks: list[Check]) -> str:
    """Aligned table, one line per check: ``ok  kvm             /dev/kvm API 12, ...``."""
    width = max((len(c.name) for c in checks), default=0)
    return "\n".join(f"{'ok' if c.ok else '--'}  {c.name:<{width}}  {c.detail}" for c in checks)


def summary_ok(checks: list[Check]) -> bool:
    """True when the essential ``kvm`` check passed."""
    return any(c.name == "kvm" and c.ok for c in checks)
