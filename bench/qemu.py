"""QEMU 7.2 as the baseline: runs vfmig's guest ELF as a multiboot kernel and talks QMP."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from vfmig.guests import STATS_GPA, guest_elf

QBOOT = "/usr/share/qemu/qboot.rom"  # boots a multiboot kernel in ~0.1 s instead of SeaBIOS's ~4 s


def available() -> str | None:
    """None if QEMU can run here, else the reason."""
    if not shutil.which("qemu-system-x86_64"):
        return "qemu-system-x86_64 is not installed"
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm"
    return None


class Qemu:
    """One qemu-system-x86_64 process running our guest (or waiting for an incoming migration)."""

    def __init__(self, memory_mib: int, guest: str = "dirtier", incoming: str | None = None, append: str = "") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="vfmig-qemu-"))
        self.qmp_path = self.dir / "qmp.sock"
        self.console = self.dir / "console.txt"
        cmd = [
            "qemu-system-x86_64",
            "-accel",
            "kvm",
            "-m",
            str(memory_mib),
            "-nographic",
            "-monitor",
            "none",
            "-serial",
            "none",
            "-nodefaults",
            # vCPU threads named "CPU N/KVM", so `vfmig probe` can match per-vCPU gaps across two QEMUs
            "-name",
            "guest=vm,debug-threads=on",
            "-kernel",
            str(guest_elf(guest)),
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
            "-chardev",
            f"file,id=dbg,path={self.console}",
            "-device",
            "isa-debugcon,iobase=0xe9,chardev=dbg",
        ]
        if os.path.exists(QBOOT):
            cmd += ["-bios", QBOOT]
        if append:
            cmd += ["-append", append]
        if incoming:
            cmd += ["-incoming", incoming]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._connect()

    def _connect(self) -> None:
        deadline = time.monotonic() + 20
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(str(self.qmp_path))
                break
            except OSError:
                self.sock.close()
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"QEMU did not start: {self.proc.stderr.read().decode()[-500:]}") from None
                time.sleep(0.05)
        self.f = self.sock.makefile("rw")
        self.f.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, **args: Any) -> Any:
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            msg = json.loads(self.f.readline())
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                raise RuntimeError(f"QMP {name}: {msg['error']}")

    def migrate(self, port: int, timeout: float = 120, poll_s: float = 0.02) -> dict[str, Any]:
        """Migrate to a destination listening on loopback `port`; query-migrate once it ends.
        Raises unless it completed."""
        self.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        deadline = time.monotonic() + timeout
        while True:
            info: dict[str, Any] = self.cmd("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled") or time.monotonic() > deadline:
                break
            time.sleep(poll_s)  # QMP has events, but query-migrate is what carries the figures
        if info.get("status") != "completed":
            raise RuntimeError(f"QEMU migration did not complete: {info.get('status')}")
        return info

    def migrate_within(self, uri: str, timeout: float, poll_s: float = 0.05) -> dict[str, Any]:
        """Migrate to `uri` (the destination set up beforehand); query-migrate once it ends. Past
        `timeout` s, migrate_cancel (the source runs on) and return the query-migrate of that
        moment with "timed_out": True. Never raises for a migration that did not complete."""
        self.cmd("migrate", uri=uri)
        deadline = time.monotonic() + timeout
        while True:
            info: dict[str, Any] = self.cmd("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                return {**info, "timed_out": False}
            if time.monotonic() > deadline:
                break
            time.sleep(poll_s)
        self.cmd("migrate_cancel")
        end, after = time.monotonic() + 30, info
        while time.monotonic() < end:
            after = self.cmd("query-migrate")
            if after.get("status") in ("completed", "failed", "cancelled"):
                break
            time.sleep(poll_s)
        return {**info, "status_after_cancel": after.get("status"), "timed_out": True}

    def set_capabilities(self, **caps: bool) -> None:
        """migrate-set-capabilities, with names as QMP spells them ("auto_converge" -> auto-converge)."""
        self.cmd(
            "migrate-set-capabilities",
            capabilities=[{"capability": k.replace("_", "-"), "state": v} for k, v in caps.items()],
        )

    def passes(self) -> int:
        """vCPU 0's passes over its working set (struct vfmig_vcpu_stats, guest_abi.h)."""
        return self.read_u64(STATS_GPA + 8)

    def wait_passes(self, passes: int, timeout: float = 60) -> None:
        """Until the dirtier has made `passes` passes over its working set."""
        deadline = time.monotonic() + timeout
        while self.passes() < passes:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"the QEMU guest did not make {passes} pass(es) in {timeout:g} s")
            time.sleep(0.1)

    def read_u64(self, gpa: int) -> int:
        out = self.cmd("human-monitor-command", **{"command-line": f"xp /1gx {gpa:#x}"})
        return int(out.split(":")[1].split()[0], 16)

    def wait_console(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.console.exists() and text in self.console.read_text(errors="replace"):
                return
            time.sleep(0.02)
        raise RuntimeError(f"QEMU guest never printed {text!r}")

    def close(self) -> None:
        with contextlib.suppress(Exception):  # best effort on teardown
            self.cmd("quit")
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Qemu:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
