"""The destination side: build the VM from the stream, load it, and resume only when it is whole.

The guest is started only after every page channel's end-of-stream digest matched, the control
channel's digest matched, and every device and vCPU accepted its state. On any error the VM is
destroyed unstarted and the source is told why.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from vfmig import _core
from vfmig.errors import MigrationError, VfmigError
from vfmig.transport import (
    ControlChannel,
    Hello,
    decode_channel,
    decode_device,
    decode_vcpu,
    parse_uri,
)
from vfmig.vm import MicroVM, VMConfig, VMState

ACCEPT_TIMEOUT_S = 30.0
GO_TIMEOUT_S = 30.0
STREAM_TIMEOUT_S = 120.0  # longest silence on the control channel while pages flow


@dataclass
class Incoming:
    """A migrated VM, running on this side."""

    vm: MicroVM
    checkpoints: dict[str, int]
    pages: dict[str, int]
    guest: dict[str, Any] = field(default_factory=dict)


class Listener:
    """A listening socket for one or more incoming migrations."""

    def __init__(self, listen: str) -> None:
        host, port = parse_uri(listen)
        try:
            self.sock = socket.create_server((host, port), reuse_port=False, backlog=32)
        except OSError as e:
            raise VfmigError(f"cannot listen on {listen}: {e.strerror or e}") from None
        self.address = f"tcp://{host}:{self.sock.getsockname()[1]}"

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self, timeout: float | None) -> socket.socket:
        self.sock.settimeout(timeout)
        try:
            conn, _ = self.sock.accept()
        except TimeoutError:
            raise MigrationError("no connection from the source in time") from None
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def receive(self, accept_timeout: float | None = None, run_seconds: float = 0.3) -> Incoming:
        """Serve one migration. Returns the running VM; the caller owns (and closes) it."""
        ctrl = ControlChannel(self._accept(accept_timeout), "source")
        vm: MicroVM | None = None
        chans: list[socket.socket] = []
        try:
            hello = Hello.decode(ctrl.expect("HELLO", ACCEPT_TIMEOUT_S, max_len=64 + 16384))
            config = VMConfig.from_dict(hello.config)
            if config.memory != hello.mem_bytes or config.vcpus != hello.vcpus:
                raise MigrationError("stream header and VM config disagree on the VM's shape")
            vm = MicroVM.from_config(config)
            ctrl.send("HELLO_ACK")
            chans = self._accept_channels(hello)
            return self._load(ctrl, hello, vm, chans, run_seconds)
        except BaseException as e:
            msg = str(e) if isinstance(e, VfmigError) else f"{type(e).__name__}: {e}"
            with contextlib.suppress(VfmigError):
                ctrl.send("ERROR", msg.encode())
            if vm is not None:
                vm.close()  # never started: nothing half-loaded ever runs
            if isinstance(e, MigrationError):
                raise
            if isinstance(e, VfmigError):
                raise MigrationError(msg) from None
            raise
        finally:
            for s in chans:
                s.close()
            ctrl.close()

    def _accept_channels(self, hello: Hello) -> list[socket.socket]:
        socks: dict[int, socket.socket] = {}
        try:
            while len(socks) < hello.channels:
                s = self._accept(ACCEPT_TIMEOUT_S)
                try:
                    token, index = decode_channel(ControlChannel(s, "page channel").expect("CHANNEL", 10))
                    if token != hello.token:
                        raise MigrationError("a page channel presented the wrong session token")
                    if index >= hello.channels or index in socks:
                        raise MigrationError(f"bad page channel index {index}")
                except BaseException:
                    s.close()
                    raise
                s.settimeout(None)  # the C receiver sets its own timeout
                socks[index] = s
        except BaseException:
            for s in socks.values():
                s.close()
            raise
        return [socks[i] for i in range(hello.channels)]

    @staticmethod
    def _wait_control(ctrl: ControlChannel, rx: _core.PageReceiver) -> None:
        """Wait for the next control record, but give up at once if a page channel failed:
        the source must hear why promptly, not block on a channel nobody reads."""
        deadline = time.monotonic() + STREAM_TIMEOUT_S
        seen = -1
        while not select.select([ctrl.sock], [], [], 0.05)[0]:
            if rx.failed:
                try:
                    rx.join()
                except _core.StreamError as e:
                    raise MigrationError(str(e.strerror)) from None
            records = rx.stats()["records"]
            if records != seen:  # pages flowing count as a live source: precopy can be long
                seen, deadline = records, time.monotonic() + STREAM_TIMEOUT_S
            if time.monotonic() > deadline:
                raise MigrationError(f"the source sent nothing for {STREAM_TIMEOUT_S:g} s")

    def _load(
        self, ctrl: ControlChannel, hello: Hello, vm: MicroVM, chans: list[socket.socket], run_seconds: float
    ) -> Incoming:
        rx = _core.PageReceiver(vm.core, [s.fileno() for s in chans], hello.verify)
        rx.start()  # C threads decode the page channels while this thread reads the control one
        devices: dict[str, bytes] = {}
        vcpus: dict[int, bytes] = {}
        try:
            while True:
                self._wait_control(ctrl, rx)
                name, payload = ctrl.recv(STREAM_TIMEOUT_S)
                if name == "DEVICE":
                    dname, blob = decode_device(payload)
                    if dname in devices:
                        raise MigrationError(f"repeated state for device {dname!r}")
                    devices[dname] = blob
                elif name == "VCPU":
                    index, blob = decode_vcpu(payload)
                    if index >= vm.config.vcpus or index in vcpus:
                        raise MigrationError(f"bad or repeated state for vCPU {index}")
                    vcpus[index] = blob
                elif name == "EOS":
                    ctrl.rx.check_eos(payload)
                    break
                else:
                    raise MigrationError(f"unexpected {name} record on the control channel")
        except BaseException:
            rx.cancel()
            for s in chans:
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(_core.StreamError):
                rx.join()
            raise
        try:
            rx.join()
        except _core.StreamError as e:
            raise MigrationError(str(e.strerror)) from None
        cps = {"dst-ram-loaded": _core.checkpoint("dst-ram-loaded")}
        if len(vcpus) != vm.config.vcpus:
            raise MigrationError(f"stream carried state for {len(vcpus)} of {vm.config.vcpus} vCPUs")
        missing = set(vm.core.stateful_devices()) - set(devices)
        if missing:
            raise MigrationError(f"stream carried no state for device(s) {', '.join(sorted(missing))}")
        vm.load_state(VMState(vm.config, [vcpus[i] for i in range(vm.config.vcpus)], devices))
        cps["dst-device-loaded"] = _core.checkpoint("dst-device-loaded")
        # Two-phase commit: the guest may run here only once the source has promised never to
        # resume it there. No GO (the source failed, or gave up): discard, never run it.
        ctrl.send("READY")
        ctrl.expect("GO", GO_TIMEOUT_S)
        touches_at_resume = vm.touches()
        vm.start_loaded()
        deadline = time.monotonic() + 10
        while not vm.core.first_run_ns and time.monotonic() < deadline:
            time.sleep(0)  # the first vCPU is about to enter KVM_RUN: a few microseconds
        cps["dst-vm-started"] = vm.core.first_run_ns or _core.checkpoint("dst-vm-started")
        pages = rx.stats()
        ctrl.send_json(
            "RESUMED",
            {"checkpoints": cps, "pages_received": pages["pages"], "touches_at_resume": touches_at_resume},
        )
        if hello.verify:
            ctrl.send("PAGE_HASHES", rx.page_crcs() or b"")
        guest = observe_guest(vm, cps["dst-vm-started"], touches_at_resume, run_seconds)
        ctrl.send_json("GUEST", guest)
        return Incoming(vm, cps, pages, guest)


def observe_guest(vm: MicroVM, started_ns: int, touches_at_resume: int, run_seconds: float) -> dict[str, Any]:
    """Let the guest run, then report what it saw: its clock gaps, counter and wrap edges."""
    t0 = time.monotonic()
    deadline = t0 + max(run_seconds, 2.0)
    # Every vCPU must read its clock once after resuming for the downtime gap to be logged.
    while time.monotonic() < deadline and vm.config.guest == "dirtier":
        if all(s.last_clock_ns > started_ns for s in vm.vcpu_stats()):
            break
        time.sleep(0.001)
    # Read the gap log now: it holds the last 16 gaps, and host noise adds more as time passes.
    gaps = [[list(g) for g in s.gaps] for s in vm.vcpu_stats()]  # per vCPU
    time.sleep(max(0.0, run_seconds - (time.monotonic() - t0)))
    vm.pause()
    stats = vm.vcpu_stats()
    edges = vm.wrap_edges() if vm.config.params.pattern == "sequential" else []
    touches = sum(s.touches for s in stats)
    vm.resume()
    return {
        "gaps": gaps,
        "touches_after": touches,
        "ran_s": time.monotonic() - t0,
        "wrap_edges": edges,
        "failed": vm.core.failed,
    }


def receive(listen: str, accept_timeout: float | None = None, run_seconds: float = 0.3) -> Incoming:
    """Listen at `listen` (tcp://HOST:PORT) and serve one incoming migration."""
    with Listener(listen) as lst:
        return lst.receive(accept_timeout, run_seconds)


def describe(inc: Incoming) -> dict[str, Any]:
    return {
        "checkpoints": inc.checkpoints,
        "pages": inc.pages,
        "guest": inc.guest,
        "config": inc.vm.config.to_dict(),
    }
