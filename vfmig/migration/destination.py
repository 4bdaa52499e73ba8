"""The destination side: authenticate the source, build the VM from the stream, load and check
it, and run it only after the source commits.

    AUTH_INIT/CHALLENGE/RESPONSE -> HELLO (limits checked before any VM exists) -> page channels
    -> pages, device data (from precopy on), devices, vCPUs, end-of-stream digests
    -> devices with a migration state machine check and apply their state (RESUMING -> STOP)
    -> [PAGE_HASHES of our RAM] -> READY -> GO (the commit) -> guest runs here -> RESUMED, GUEST

Before GO, any error destroys the VM unstarted and tells the source why. After GO this side owns
the only running copy of the guest: nothing here closes it, and failing to report back to the
source only leaves the source's report incomplete (Incoming.source_lost says so).
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from vfmig import _core
from vfmig.acceptor import REFUSALS_KEPT, Acceptor, Opening
from vfmig.auth import MAC_LEN, Authenticator, AuthError, Session, is_loopback
from vfmig.errors import ConfigError, MigrationError, VfmigError
from vfmig.migration.collector import collector_paused
from vfmig.migration.wire import (
    ControlChannel,
    DeviceDataOrder,
    Hello,
    decode_channel,
    decode_device,
    decode_device_data,
    decode_vcpu,
    parse_uri,
)
from vfmig.units import human_bytes
from vfmig.vm import MicroVM, VMConfig, VMState


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass
class Limits:
    """What a source may ask this destination to build; checked before anything is allocated."""

    max_memory: int = field(default_factory=_host_memory)
    max_vcpus: int = _core.MAX_VCPUS

    def check(self, hello: Hello) -> None:
        if hello.mem_bytes > self.max_memory:
            raise MigrationError(
                f"refused: the VM has {human_bytes(hello.mem_bytes)} of RAM, this destination accepts at most "
                f"{human_bytes(self.max_memory)} (--max-memory)"
            )
        if not 1 <= hello.vcpus <= self.max_vcpus:
            raise MigrationError(
                f"refused: the VM has {hello.vcpus} vCPUs, this destination accepts 1..{self.max_vcpus} (--max-vcpus)"
            )

    def check_devices(self, config: VMConfig) -> None:
        """Device state is host memory too: RAM and every device's state within --max-memory."""
        config.validate_devices()  # bounds each device before anything is allocated
        state = sum(d.state_bytes for d in config.devices)
        if config.memory + state > self.max_memory:
            raise MigrationError(
                f"refused: the VM has {human_bytes(config.memory)} of RAM and {human_bytes(state)} of device state, "
                f"this destination accepts at most {human_bytes(self.max_memory)} (--max-memory)"
            )


@dataclass
class Timeouts:
    """How long the destination waits for the source at each step (seconds)."""

    setup_s: float = 30.0  # each step of authentication, HELLO, and all page channels arriving
    stream_s: float = 120.0  # longest silence while pages flow (precopy can be long)
    go_s: float = 30.0  # from READY to the source's commit
    first_run_s: float = 10.0  # from start to the first vCPU entering the guest


@dataclass
class Incoming:
    """A migrated VM, running on this side. `source_lost` is set when the source could not be
    told the outcome after the commit: the guest runs here all the same."""

    vm: MicroVM
    checkpoints: dict[str, int]
    pages: dict[str, int]
    guest: dict[str, Any] = field(default_factory=dict)
    source_lost: str | None = None


AfterLoad = Callable[[MicroVM], None]
ConfigOverride = Callable[[VMConfig], VMConfig]


class Listener:
    """A listening socket for one or more incoming migrations, one at a time."""

    def __init__(
        self,
        listen: str,
        auth: Authenticator | None = None,
        limits: Limits | None = None,
        timeouts: Timeouts | None = None,
    ) -> None:
        host, port = parse_uri(listen)
        if auth is None:
            auth = Authenticator(None, allow_open=is_loopback(host))
        if auth.key is None and not auth.allow_open:
            raise ConfigError(
                f"refusing to accept unauthenticated migrations on {host}, which is not a loopback address: "
                "give a pre-shared key (--psk-file), or allow anyone who can reach it (--allow-unauthenticated)"
            )
        self.auth = auth
        self.limits = limits or Limits()
        self.timeouts = timeouts or Timeouts()
        self.after_load: AfterLoad | None = None  # test hook: runs on the loaded, unstarted VM
        # Test hook: builds the VM from a changed config (a device unlike the source's, say).
        self.config_override: ConfigOverride | None = None
        try:
            self.sock = socket.create_server((host, port), reuse_port=False, backlog=32)
        except OSError as e:
            raise VfmigError(f"cannot listen on {listen}: {e.strerror or e}") from None
        self.address = f"tcp://{host}:{self.sock.getsockname()[1]}"
        self.acceptor = Acceptor(self.sock, opening_timeout_s=min(10.0, self.timeouts.setup_s))
        self.auth_failures: collections.deque[str] = collections.deque(maxlen=REFUSALS_KEPT)

    @property
    def refused(self) -> list[str]:
        """Every connection turned away, with the reason: strays, busy, failed authentication."""
        return [*self.acceptor.refused, *self.auth_failures]

    def close(self) -> None:
        self.acceptor.close()
        self.sock.close()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def receive(self, accept_timeout: float | None = None, run_seconds: float = 0.3) -> Incoming:
        """Serve one migration. Returns the running VM; the caller owns (and closes) it.
        Sources that fail to authenticate are turned away and the wait goes on."""
        deadline = None if accept_timeout is None else time.monotonic() + accept_timeout
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                opening = self.acceptor.controls.get(timeout=timeout)
            except queue.Empty:
                refused = self.refused
                last = f"; {len(refused)} connection(s) refused, the last: {refused[-1]}" if refused else ""
                raise MigrationError(f"no source authenticated in time{last}") from None
            try:
                ctrl = ControlChannel(opening.sock, f"source {opening.peer}")
                try:
                    session = self._authenticate(ctrl, opening)
                except (AuthError, VfmigError) as e:
                    # Free the listener before the refusal is sent or recorded: whoever reacts to
                    # it (the peer reading this ERROR, a caller or test waiting on the record) may
                    # connect at once and must not find it busy.
                    self.acceptor.release()
                    with contextlib.suppress(VfmigError):
                        ctrl.send("ERROR", str(e).encode())
                    ctrl.close()
                    self.auth_failures.append(f"{opening.peer}: {e}")
                    continue
                return self._serve(ctrl, session, run_seconds)
            finally:
                self.acceptor.release()

    # before the commit ----------------------------------------------------------------------------
    def _authenticate(self, ctrl: ControlChannel, opening: Opening) -> Session:
        ctrl.rx.add(opening.header)
        challenge, nonce_s, nonce_d = self.auth.server_challenge(opening.payload)
        ctrl.send("AUTH_CHALLENGE", challenge)
        # The listener is claimed until this answer: a short record, within one short deadline.
        response = ctrl.expect("AUTH_RESPONSE", self.acceptor.opening_timeout_s, max_len=MAC_LEN)
        return self.auth.server_verify(response, nonce_s, nonce_d)

    def _serve(self, ctrl: ControlChannel, session: Session, run_seconds: float) -> Incoming:
        vm: MicroVM | None = None
        chans: list[socket.socket] = []
        gc_off = contextlib.ExitStack()
        try:
            hello = Hello.decode(ctrl.expect("HELLO", self.timeouts.setup_s, max_len=64 + 16384))
            session = session.with_hello_token(hello.token)
            self.limits.check(hello)
            config = VMConfig.from_dict(hello.config)
            if config.memory != hello.mem_bytes or config.vcpus != hello.vcpus:
                raise MigrationError("stream header and VM config disagree on the VM's shape")
            self.limits.check_devices(config)
            if self.config_override is not None:
                config = self.config_override(config)
            vm = MicroVM.from_config(config)
            chans = self._accept_channels(ctrl, hello, session)
            gc_off.enter_context(collector_paused())  # until the guest runs here (the load is C threads)
            cps, pages, extra = self._load(ctrl, hello, vm, chans)
            ctrl.expect("GO", self.timeouts.go_s)
        except BaseException as e:
            gc_off.close()
            msg = str(e) if isinstance(e, VfmigError) else f"{type(e).__name__}: {e}"
            with contextlib.suppress(VfmigError):
                ctrl.send("ERROR", msg.encode())
            ctrl.close()
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
        # The commit: the source has promised never to resume this guest. From here it is ours,
        # and this side never sends ERROR again: the source reads an ERROR after its GO as proof
        # that the guest never started here, and resumes it.
        with gc_off:
            inc = self._start(vm, cps, pages)
        if "devices" in extra:
            _MigDevices.add_handshake(vm, extra["devices"])
        try:
            self._tell(ctrl, inc, "RESUMED", {"checkpoints": cps, "pages_received": pages["pages"], **extra})
            try:
                inc.guest = observe_guest(vm, cps["dst-vm-started"], extra["touches_at_resume"], run_seconds)
            except Exception as e:  # noqa: BLE001 - observing failed; the guest must live on all the same
                inc.guest = {"error": f"observing the guest failed: {type(e).__name__}: {e}"}
            self._tell(ctrl, inc, "GUEST", inc.guest)
        finally:
            ctrl.close()
        return inc

    @staticmethod
    def _tell(ctrl: ControlChannel, inc: Incoming, rtype: str, doc: dict[str, Any]) -> None:
        """After the commit: report to the source if it still listens; a failure is noted, never raised."""
        if inc.source_lost:
            return
        try:
            ctrl.send_json(rtype, doc)
        except VfmigError as e:
            inc.source_lost = f"the guest runs here, but the source could not be told: {e}"

    def _accept_channels(self, ctrl: ControlChannel, hello: Hello, session: Session) -> list[socket.socket]:
        """Take this session's page channels from the acceptor. A channel with a wrong token or
        index is refused on its own connection and does not disturb the migration; the source
        giving up (an ERROR on the control channel) ends the wait at once."""
        socks: dict[int, socket.socket] = {}
        deadline = time.monotonic() + self.timeouts.setup_s
        self.acceptor.accept_channels(True)
        try:
            ctrl.send("HELLO_ACK")  # only now: the source opens its page channels when it reads this
            while len(socks) < hello.channels:
                if select.select([ctrl.sock], [], [], 0)[0]:
                    name, _ = ctrl.recv(self.timeouts.setup_s)
                    raise MigrationError(f"control channel: unexpected {name} while page channels open")
                if time.monotonic() > deadline:
                    raise MigrationError(f"only {len(socks)} of {hello.channels} page channels arrived in time")
                try:
                    o = self.acceptor.channels.get(timeout=0.05)
                except queue.Empty:
                    continue
                try:
                    token, index = decode_channel(o.payload)
                except MigrationError as e:
                    self.acceptor.refuse(o, str(e))
                    continue
                if index >= hello.channels or index in socks:
                    self.acceptor.refuse(o, f"bad page channel index {index}")
                    continue
                if not session.channel_matches(index, token):
                    self.acceptor.refuse(o, "a page channel presented the wrong session token")
                    continue
                ControlChannel(o.sock, f"page channel {index}").send("HELLO_ACK")
                o.sock.settimeout(None)  # the C receiver sets its own timeout
                socks[index] = o.sock
        except BaseException:
            for s in socks.values():
                s.close()
            raise
        finally:
            self.acceptor.accept_channels(False)
        return [socks[i] for i in range(hello.channels)]

    def _wait_control(self, ctrl: ControlChannel, rx: _core.PageReceiver) -> None:
        """Wait for the next control record, but give up at once if a page channel failed:
        the source must hear why promptly, not block on a channel nobody reads."""
        limit = self.timeouts.stream_s
        deadline = time.monotonic() + limit
        seen = -1
        while not select.select([ctrl.sock], [], [], 0.05)[0]:
            if rx.failed:
                try:
                    rx.join()
                except _core.StreamError as e:
                    raise MigrationError(str(e.strerror)) from None
            records = rx.stats()["records"]
            if records != seen:  # pages flowing count as a live source: precopy can be long
                seen, deadline = records, time.monotonic() + limit
            if time.monotonic() > deadline:
                raise MigrationError(f"the source sent nothing for {limit:g} s")

    def _load(
        self, ctrl: ControlChannel, hello: Hello, vm: MicroVM, chans: list[socket.socket]
    ) -> tuple[dict[str, int], dict[str, int], dict[str, Any]]:
        # Devices with a migration state machine take their stream from the first chunk on.
        mig = _MigDevices(vm)
        mig.resuming()
        rx = _core.PageReceiver(vm.core, [s.fileno() for s in chans])
        rx.start()  # C threads decode the page channels while this thread reads the control one
        devices: dict[str, bytes] = {}
        vcpus: dict[int, bytes] = {}
        try:
            while True:
                self._wait_control(ctrl, rx)
                name, payload = ctrl.recv(self.timeouts.stream_s)
                if name == "DEVICE_DATA":
                    mig.write(payload)
                elif name == "DEVICE":
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
                with contextlib.suppress(OSError):  # a failed channel's receiver shut them already
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
        mig.finish()  # every device checks and applies its whole stream; nothing runs yet
        vm.load_state(VMState(vm.config, [vcpus[i] for i in range(vm.config.vcpus)], devices))
        cps["dst-device-loaded"] = _core.checkpoint("dst-device-loaded")
        if self.after_load is not None:
            self.after_load(vm)
        extra: dict[str, Any] = {"touches_at_resume": vm.touches()}
        if mig.names:
            extra["devices"] = mig.report()
        if hello.verify:
            # Our RAM as it is now, every page (zero and never-sent ones too): the source
            # compares it with its own before it commits. Read back from RAM, not kept as pages
            # landed, so a write after the load (a device's, say) is caught too. Costs downtime;
            # reported as such.
            t = time.monotonic_ns()
            ctrl.send("PAGE_HASHES", vm.core.page_crcs())
            extra["verify_hash_ms"] = (time.monotonic_ns() - t) / 1e6
        # Two-phase commit: the guest may run here only once the source has promised never to
        # resume it there. No GO (the source failed, or gave up): discard, never run it.
        ctrl.send("READY")
        return cps, rx.stats(), extra

    # after the commit -------------------------------------------------------------------------
    def _start(self, vm: MicroVM, cps: dict[str, int], pages: dict[str, int]) -> Incoming:
        vm.start_loaded()
        deadline = time.monotonic() + self.timeouts.first_run_s
        # The first vCPU enters KVM_RUN within microseconds and stamps the time itself. Poll
        # gently: spinning here, or a wakeup from it, would take the CPU that vCPU needs.
        while not vm.core.first_run_ns and time.monotonic() < deadline:
            time.sleep(0.0002)
        cps["dst-vm-started"] = vm.core.first_run_ns or _core.checkpoint("dst-vm-started")
        return Incoming(vm, cps, pages)


class _MigDevices:
    """The destination's devices with a migration state machine: RESUMING before the stream,
    each DEVICE_DATA chunk checked for order and written, and at the end of the stream the
    RESUMING -> STOP arc, where each device checks and applies what it got. Every error is the
    device's own message."""

    def __init__(self, vm: MicroVM) -> None:
        self.vm = vm
        self.names = vm.core.mig_devices()
        self.order = DeviceDataOrder(self.names)
        self.load_ns = dict.fromkeys(self.names, 0)

    def _call(self, name: str, what: str, fn: Callable[[], object]) -> None:
        t = time.monotonic_ns()
        try:
            fn()
        except _core.CoreError as e:
            raise MigrationError(f"device {name} {what}: {e.strerror}") from None
        finally:
            self.load_ns[name] += time.monotonic_ns() - t

    def resuming(self) -> None:
        for name in self.names:
            self._call(name, "cannot take a migration stream", partial(self.vm.core.mig_set_state, name, "RESUMING"))

    def write(self, payload: bytes) -> None:
        chunk = decode_device_data(payload)
        self.order.accept(chunk)
        if chunk.data:
            self._call(chunk.name, "refused its state", partial(self.vm.core.mig_write, chunk.name, chunk.data))

    def finish(self) -> None:
        self.order.check_complete()
        for name in self.names:
            self._call(name, "refused its state", partial(self.vm.core.mig_set_state, name, "STOP"))

    def report(self) -> dict[str, dict[str, Any]]:
        return {n: {"load_ms": round(self.load_ns[n] / 1e6, 3), "bytes": sum(self.order.bytes[n])} for n in self.names}

    @staticmethod
    def add_handshake(vm: MicroVM, devices: dict[str, dict[str, Any]]) -> None:
        """Once the VM started: what each device loaded of the source's guest handshake
        (handshake: its outcome, handshake_latency_us) and what the device then told its
        driver (VMM status: migrated, reset_required unless the source's driver acked). The
        device set the status and raised the post-load interrupt itself, as it started."""
        for name, doc in devices.items():
            try:
                st = vm.core.handshake_state(name)
            except ValueError:  # not a PCI function with the handshake
                continue
            doc.update(
                handshake=st["outcome"],
                handshake_latency_us=st["latency_us"],
                migrated=st["migrated"],
                reset_required=st["reset_required"],
            )


CLOCK_GUESTS = ("dirtier", "vfdrv")  # guests that log their clock gaps
# The VF driver's handshake counters (struct simvf_guest_stats) the GUEST record carries.
_DRIVER_HANDSHAKE = ("mig_notices", "acks", "resets", "resumed_in_place", "cancels")


def observe_guest(vm: MicroVM, started_ns: int, touches_at_resume: int, run_seconds: float) -> dict[str, Any]:
    """Let the guest run, then report what it saw: its clock gaps, counter and wrap edges."""
    t0 = time.monotonic()
    deadline = t0 + max(run_seconds, 2.0)
    # Every vCPU must read its clock once after resuming for the downtime gap to be logged.
    while time.monotonic() < deadline and vm.config.guest in CLOCK_GUESTS:
        if all(s.last_clock_ns > started_ns for s in vm.vcpu_stats()):
            break
        time.sleep(0.001)
    # Read the gap log now: it holds the last 16 gaps, and host noise adds more as time passes.
    gaps = [[list(g) for g in s.gaps] for s in vm.vcpu_stats()]  # per vCPU
    time.sleep(max(0.0, run_seconds - (time.monotonic() - t0)))
    vm.pause()
    try:  # a consistent snapshot of the counters; the guest runs on whatever happens
        stats = vm.vcpu_stats()
        edges = vm.wrap_edges() if vm.config.params.pattern == "sequential" else []
        packets = vm.vf_packets()
        driver = vm.vf_driver()
    finally:
        vm.resume()
    touches = sum(s.touches for s in stats)
    doc = {
        "gaps": gaps,
        "touches_after": touches,
        "ran_s": time.monotonic() - t0,
        "wrap_edges": edges,
        "failed": vm.core.failed,
    }
    if packets is not None:
        doc["packets"] = packets
    if driver is not None:  # the VF driver's side of the handshake, as it ran here
        doc["vf_handshake"] = {k: driver[k] for k in _DRIVER_HANDSHAKE if k in driver}
    return doc


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
        "source_lost": inc.source_lost,
    }
