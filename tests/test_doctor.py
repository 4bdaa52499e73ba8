"""Tests for vfmig.doctor: real host probes, skipped where the host lacks a feature."""

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import host_skip


def _load_doctor() -> ModuleType:
    try:
        from vfmig import doctor as mod
    except Exception:  # package (or its C extension) not importable: load the file directly
        path = Path(__file__).resolve().parent.parent / "vfmig" / "doctor.py"
        spec = importlib.util.spec_from_file_location("vfmig_doctor", path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules["vfmig_doctor"] = mod
        spec.loader.exec_module(mod)
    return mod


doctor = _load_doctor()

NAMES = [
    "kvm",
    "dirty_ring",
    "manual_protect",
    "irqchip",
    "irqfd",
    "ioeventfd",
    "msi_routing",
    "tracefs",
    "bcc",
    "kernel_headers",
    "sdt",
    "shmem_thp",
    "vfio",
    "sriov",
    "qemu",
    "perf",
]
KVM_DEPENDENT = ["kvm", "dirty_ring", "manual_protect", "irqchip", "irqfd", "ioeventfd", "msi_routing"]


@pytest.fixture(scope="module")
def checks() -> list:
    return doctor.run_checks()


def _by_name(checks: list) -> dict:
    return {c.name: c for c in checks}


def _require_kvm() -> None:
    if not os.path.exists("/dev/kvm"):
        host_skip("no /dev/kvm")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        host_skip("/dev/kvm not accessible")


def test_names_in_order_and_single_line_details(checks: list) -> None:
    assert [c.name for c in checks] == NAMES
    for c in checks:
        assert isinstance(c.ok, bool), c.name
        assert c.detail.strip(), c.name
        assert "\n" not in c.detail and "\r" not in c.detail, c.name
        assert isinstance(c.data, dict), c.name


def test_kvm_api_version(checks: list) -> None:
    _require_kvm()
    kvm = doctor.as_json(checks)["kvm"]
    assert kvm["ok"] is True, kvm["detail"]
    assert kvm["api_version"] == 12
    assert doctor.summary_ok(checks)


def test_dirty_ring(checks: list) -> None:
    _require_kvm()
    ring = _by_name(checks)["dirty_ring"]
    if not ring.ok:
        host_skip(f"dirty ring unavailable: {ring.detail}")
    assert ring.data["max_bytes"] > 0
    assert isinstance(ring.data["acq_rel"], bool)


def test_basic_kvm_caps(checks: list) -> None:
    _require_kvm()
    by = _by_name(checks)
    for name in ("irqchip", "irqfd", "ioeventfd", "msi_routing"):
        assert by[name].ok, f"{name}: {by[name].detail}"


def test_as_json_round_trips(checks: list) -> None:
    data = doctor.as_json(checks)
    assert list(data) == NAMES
    again = json.loads(json.dumps(data))
    assert again == data
    for name, entry in again.items():
        assert entry["ok"] is _by_name(checks)[name].ok
        assert entry["detail"] == _by_name(checks)[name].detail


def test_missing_kvm_fails_gracefully(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(doctor, "KVM_PATH", str(tmp_path / "no-such-kvm"))
    checks = doctor.run_checks()
    by = _by_name(checks)
    assert [c.name for c in checks] == NAMES
    assert not by["kvm"].ok
    assert "missing" in by["kvm"].detail
    for name in KVM_DEPENDENT:
        assert not by[name].ok, name
        assert "\n" not in by[name].detail
    assert not doctor.summary_ok(checks)


def test_format_text_contains_every_check(checks: list) -> None:
    text = doctor.format_text(checks)
    lines = text.splitlines()
    assert len(lines) == len(NAMES)
    for line, c in zip(lines, checks, strict=True):
        assert line.startswith("ok  " if c.ok else "--  ")
        assert c.name in line
        assert line.endswith(c.detail)
    # the detail column is aligned
    assert len({line.index(c.detail, 4 + len(c.name)) for line, c in zip(lines, checks, strict=True)}) == 1


def test_probe_exception_becomes_failed_check(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(probe: object) -> tuple:
        raise RuntimeError("kaboom\nsecond line")

    monkeypatch.setattr(doctor, "_check_sdt", boom)
    by = _by_name(doctor.run_checks())
    assert not by["sdt"].ok
    assert "kaboom" in by["sdt"].detail and "\n" not in by["sdt"].detail


def test_tracefs_absent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(doctor, "TRACEFS_EVENT_DIRS", (str(tmp_path / "nope"),))
    by = _by_name(doctor.run_checks())
    assert not by["tracefs"].ok
    assert "mount -t tracefs tracefs /sys/kernel/tracing" in by["tracefs"].detail


def test_vfio_and_sriov_with_fake_sysfs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    dev_vfio = tmp_path / "dev-vfio"
    dev_vfio.mkdir()
    for name in ("vfio", "12", "13"):
        (dev_vfio / name).touch()
    drv = tmp_path / "drivers" / "vfio-pci"
    drv.mkdir(parents=True)
    for name in ("0000:3b:02.0", "0000:3b:02.1", "bind", "new_id", "module"):
        (drv / name).touch()

    pci = tmp_path / "devices"
    pf = pci / "0000:3b:00.0"
    pf.mkdir(parents=True)
    (pf / "sriov_totalvfs").write_text("64\n")
    (pf / "sriov_numvfs").write_text("2\n")
    ice = tmp_path / "drivers" / "ice"
    ice.mkdir()
    (pf / "driver").symlink_to(ice)
    plain = pci / "0000:00:1f.0"
    plain.mkdir()
    zero = pci / "0000:5e:00.0"
    zero.mkdir()
    (zero / "sriov_totalvfs").write_text("0\n")

    monkeypatch.setattr(doctor, "VFIO_DEV_DIR", str(dev_vfio))
    monkeypatch.setattr(doctor, "VFIO_PCI_DRIVER_DIR", str(drv))
    monkeypatch.setattr(doctor, "PCI_DEVICES_DIR", str(pci))
    data = doctor.as_json(doctor.run_checks())

    assert data["vfio"]["ok"] is True
    assert data["vfio"]["groups"] == ["12", "13"]
    assert data["vfio"]["devices"] == ["0000:3b:02.0", "0000:3b:02.1"]
    assert data["sriov"]["ok"] is True
    assert data["sriov"]["pfs"] == [{"address": "0000:3b:00.0", "total_vfs": 64, "num_vfs": 2, "driver": "ice"}]


def test_vfio_empty_is_ok(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    drv = tmp_path / "vfio-pci"
    drv.mkdir()
    monkeypatch.setattr(doctor, "VFIO_DEV_DIR", str(tmp_path / "no-dev-vfio"))
    monkeypatch.setattr(doctor, "VFIO_PCI_DRIVER_DIR", str(drv))
    vfio = _by_name(doctor.run_checks())["vfio"]
    assert vfio.ok
    assert "vfio-pci has 0 devices" in vfio.detail
    assert vfio.data == {"groups": [], "devices": [], "dev_vfio": False, "vfio_pci_loaded": True}


def test_missing_tool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "QEMU_BINARY", "vfmig-no-such-qemu-binary")
    qemu = _by_name(doctor.run_checks())["qemu"]
    assert not qemu.ok
    assert "not found" in qemu.detail


def test_bcc_fallback_loader_leaves_sys_modules_alone() -> None:
    bcc_dir = doctor.BCC_DIST_DIR
    if not os.path.isfile(os.path.join(bcc_dir, "__init__.py")):
        host_skip(f"no {bcc_dir}")
    before = {k for k in sys.modules if k == "bcc" or k.startswith("bcc.")}
    try:
        mod = doctor._load_bcc_from(bcc_dir)
    except Exception as e:  # e.g. libbcc.so missing
        host_skip(f"bcc not loadable from {bcc_dir}: {e}")
    assert hasattr(mod, "BPF")
    assert {k for k in sys.modules if k == "bcc" or k.startswith("bcc.")} == before


def test_no_fd_leak() -> None:
    if not os.path.isdir("/proc/self/fd"):
        host_skip("no /proc/self/fd")
    doctor.run_checks()  # warm up lazy imports (bcc loads shared libraries once)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        doctor.run_checks()
    assert len(os.listdir("/proc/self/fd")) == before
