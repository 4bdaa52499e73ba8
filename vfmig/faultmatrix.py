"""The fault matrix: every kind of fault at every position of the stream, in both directions,
with both dirty trackers and 1 or 4 page channels, and a verdict per case.

`cases()` yields the whole matrix; `run_case(case)` runs one migration through a FaultProxy
(vfmig.testing) that fires at the case's record, and judges the outcome by the two-phase commit:

* before GO, the migration fails with an error that names what happened, the source VM runs
  (not paused) with its memory unchanged (CRC32C of every page, before vs after) and its device
  back in RUNNING with its counters unchanged, and the destination never ran a vCPU
  (Listener.receive raised; no Incoming);
* at GO (the commit record itself is hit) the guest runs on exactly one side, or, if the link
  died with GO, on neither (the source stays paused, in doubt); never on two;
* after GO the destination runs the guest (Incoming, its vCPU entered the guest, its memory is
  the source's at stop, its device RUNNING with the state it loaded equal to the source's at
  stop) and the source stays paused, its device stopped, whatever the source's error says.

Every source VM has a simvf (VF, 256 KiB of state, PRE_COPY on), so every position also runs
with device data in the stream: with one precopy round the control connection carries exactly
two DEVICE_DATA records, the precopy image (~252 KiB, one chunk) after round 1 and the stop-copy
rest (~4 KiB, flagged last) after the final pages. The guests here never enable the VF, so its
wire and table stay still and memory digests stay exact; its state streams in full all the same.

Faults in the proxy: flip a byte (the record's last byte, or its type), cut, truncate, cut
after, delay past every timeout, duplicate, drop, reorder. Process faults: SIGKILL or SIGSTOP
the destination (`vfmig receive`) or the source (`vfmig vm run --control`) from a proxy hook at
the record. Every case triggers on a record, never on a timer; only the timeouts under test are
short, so "delay past a timeout" and SIGSTOP cases end quickly.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vfmig import control
from vfmig.demo import start_destination, start_process
from vfmig.errors import MigrationError, VfmigError
from vfmig.migration.destination import Incoming, Listener, Timeouts
from vfmig.migration.policy import Policy
from vfmig.migration.source import CommitError, MigrationOptions, migrate
from vfmig.migration.wire import PHASES as DATA_PHASES
from vfmig.migration.wire import decode_device_data
from vfmig.report.model import Report
from vfmig.testing import DOWN, HDR_LEN, UP, Fault, FaultProxy, serve_destination
from vfmig.vm import DeviceSpec, MicroVM

MEMORY = 64 << 20
TIMEOUT_S = 1.5  # every timeout under test, both sides
DELAY_S = 2.5  # a delay fault: past every timeout above
ACCEPT_S = 3.0  # the destination's wait for a control connection
RUN_S = 0.05  # how long the destination lets the migrated guest run before it reports
PHASES = ("auth", "setup", "precopy", "stop", "commit", "go", "after-go")
BEFORE_GO = PHASES[:5]
PROXY_ACTIONS = ("flip", "flip_type", "cut", "truncate", "cut_after", "delay", "duplicate", "reorder", "drop")
SIGNALS = ("kill_dst", "stop_dst", "kill_src", "stop_src")
TRACKERS = ("bitmap", "ring")
CHANNELS = (1, 4)
DMA = "dma0"
PAGE = 4096
STRIPE = 512 * PAGE  # page index p travels on channel (p / 512) mod N
DMA_STRIPE0 = 8  # DMA pattern pages from here (16 MiB): above the guest's code and stats pages
VF = "vf0"
# 256 KiB of VF state: one precopy DEVICE_DATA chunk and one stop-copy chunk (a chunk holds up to
# CTRL_MAX, 1 MiB), so the 1st and 2nd DEVICE_DATA records are the two phases.
VF_STATE = 256 << 10
DEVICES = (DeviceSpec(name=VF, state_bytes=VF_STATE, dma_rate=0, precopy=True),)
VF_ARG = f"simvf,name={VF},state={VF_STATE >> 10}K,dma_rate=0,precopy=on"  # the same, for `vfmig vm run`


@dataclass(frozen=True)
class Position:
    """Where in the stream: a record on the control connection or on the last page channel."""

    name: str  # unique label
    record: str
    where: str  # "control" or "channel"
    direction: str
    phase: str
    after: str | None = None  # count the record only after this one (PAGES after ITER: final round)
    nth: int = 1  # the nth such record on its connection and direction (after `after`, if given)
    data_phase: str | None = None  # DEVICE_DATA: the device-stream phase the hit record must carry


POSITIONS = (
    Position("AUTH_INIT", "AUTH_INIT", "control", UP, "auth"),
    Position("AUTH_CHALLENGE", "AUTH_CHALLENGE", "control", DOWN, "auth"),
    Position("AUTH_RESPONSE", "AUTH_RESPONSE", "control", UP, "auth"),
    Position("HELLO", "HELLO", "control", UP, "setup"),
    Position("HELLO_ACK", "HELLO_ACK", "control", DOWN, "setup"),
    Position("CHANNEL", "CHANNEL", "channel", UP, "setup"),
    Position("CHANNEL_ACK", "HELLO_ACK", "channel", DOWN, "setup"),
    Position("PAGES_round1", "PAGES", "channel", UP, "precopy"),
    Position("ITER", "ITER", "channel", UP, "precopy"),
    Position("DEVICE_DATA_precopy", "DEVICE_DATA", "control", UP, "precopy", data_phase="precopy"),
    Position("PAGES_final", "PAGES", "channel", UP, "stop", after="ITER"),
    Position("DEVICE_DATA_stopcopy", "DEVICE_DATA", "control", UP, "stop", nth=2, data_phase="stop-copy"),
    Position("EOS_channel", "EOS", "channel", UP, "stop"),
    Position("DEVICE", "DEVICE", "control", UP, "stop"),
    Position("VCPU", "VCPU", "control", UP, "stop"),
    Position("EOS_control", "EOS", "control", UP, "stop"),
    Position("PAGE_HASHES", "PAGE_HASHES", "control", DOWN, "commit"),
    Position("READY", "READY", "control", DOWN, "commit"),
    Position("GO", "GO", "control", UP, "go"),
    Position("RESUMED", "RESUMED", "control", DOWN, "after-go"),
    Position("GUEST", "GUEST", "control", DOWN, "after-go"),
)
BY_NAME = {p.name: p for p in POSITIONS}


@dataclass(frozen=True)
class Case:
    action: str  # a PROXY_ACTIONS entry or a SIGNALS entry
    position: str  # a Position name
    tracker: str = "bitmap"
    channels: int = 1

    @property
    def id(self) -> str:
        return f"{self.action}-{self.position}-{self.tracker}-{self.channels}ch"

    @property
    def pos(self) -> Position:
        return BY_NAME[self.position]


@dataclass
class Verdict:
    case: Case
    survived: bool
    phase: str  # the phase of the record the fault hit ("" if it never fired)
    hit: dict[str, Any]
    error: str | None  # the source's error, None when the migration completed
    outcome: str  # "failed", "commit-error", "completed", "source-killed"
    problems: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["case"] = self.case.id
        return d


def cases(
    actions: tuple[str, ...] = PROXY_ACTIONS + SIGNALS,
    trackers: tuple[str, ...] = TRACKERS,
    channels: tuple[int, ...] = CHANNELS,
    positions: tuple[Position, ...] = POSITIONS,
) -> Iterator[Case]:
    """The matrix, in a stable order: action x position x tracker x channels."""
    for a in actions:
        for p in positions:
            if not applicable(a, p):
                continue
            for t in trackers:
                for c in channels:
                    yield Case(a, p.name, t, c)


def applicable(action: str, p: Position) -> bool:
    # The source's page sender gives up on a destination that stops reading only after its fixed
    # 30 s send timeout (csrc/stream/send.c); stopping the destination while round 1 still has most of
    # RAM to push would only measure that constant.
    return not (action == "stop_dst" and p.name == "PAGES_round1")


# errors that name what happened, per fault: the source's message must match one of them
_NAMES = {
    "flip": r"CRC|corrupt|digest|bad|magic|unknown|invalid|refused|expected|length|not valid|mismatch|short|reserved",
    "flip_type": r"unknown record type|unexpected|expected|bad|CRC|corrupt|refused|page channel",
    "cut": r"closed|went away|mid-stream|reports|did not answer|reset|Broken pipe|arrived in time",
    "truncate": r"closed|went away|mid-stream|reports|did not answer|reset|Broken pipe|arrived in time",
    "cut_after": r"closed|went away|mid-stream|reports|did not answer|reset|Broken pipe|arrived in time",
    "delay": r"in time|sent nothing|did not answer|no opening record|no data|stopped reading",
    "duplicate": r"digest|repeated|out of sequence|expected|unexpected|before its opening|sent data|reports",
    "reorder": r"digest|out of sequence|expected|unexpected|in time|did not answer|sent nothing|reports",
    "drop": r"digest|out of sequence|expected|unexpected|in time|did not answer|sent nothing|reports|carried",
    "kill_dst": r"closed|went away|reset|Broken pipe|mid-stream|reports|cannot connect",
    "stop_dst": r"did not answer|in time|stopped reading",
    "kill_src": r".",
    "stop_src": r".",
}


def _options(case: Case) -> MigrationOptions:
    t = TIMEOUT_S
    return MigrationOptions(
        channels=case.channels,
        verify=True,
        # One precopy round, then the final round: ITER appears once per channel, and the pages
        # the DMA engine writes after round 1 make the final round's PAGES.
        policy=Policy(max_iterations=1),
        connect_timeout_s=t,
        handshake_timeout_s=t,
        resume_timeout_s=t,
        guest_report_timeout_s=t,
    )


def _timeouts() -> Timeouts:
    return Timeouts(setup_s=TIMEOUT_S, stream_s=TIMEOUT_S, go_s=TIMEOUT_S)


def _fault(case: Case, hook: Callable[[], None] | None = None) -> Fault:
    p = case.pos
    conn = case.channels if p.where == "channel" else 0  # the last page channel
    kw: dict[str, Any] = {"conn": conn, "direction": p.direction, "record": p.record, "nth": p.nth, "after": p.after}
    if case.action in SIGNALS:
        return Fault(action="call", hook=hook, **kw)
    if case.action == "flip":
        return Fault(action="flip", at_byte=-1, **kw)  # the payload's last byte (or the CRC)
    if case.action == "flip_type":
        return Fault(action="flip", at_byte=4, **kw)
    return Fault(action=case.action, delay_s=DELAY_S, **kw)


class _Proxy(FaultProxy):
    """The FaultProxy, noting in `hit` what a DEVICE_DATA record it hits carries (device, stream
    phase, seq, last flag, data bytes), read before the fault acts on it: proof of which chunk
    of the device's stream the fault hit."""

    def _apply(self, rec: bytes, cut_at: int | None) -> tuple[list[bytes], bytes | None, bytes | None]:
        if self.hit.get("record") == "DEVICE_DATA":
            try:
                c = decode_device_data(rec[HDR_LEN:])
            except MigrationError as e:
                self.hit["device_data"] = f"undecodable: {e}"
            else:
                phase = DATA_PHASES[c.phase]
                self.hit.update(device=c.name, device_phase=phase, seq=c.seq, last=c.last, data_bytes=len(c.data))
        return super()._apply(rec, cut_at)


def _dma_final_round(vm: MicroVM, channels: int, value: int) -> None:
    """One page in each of `channels` consecutive stripes, so every channel has final-round pages."""
    for s in range(channels):
        assert vm.core.dma_fill(DMA, (DMA_STRIPE0 + 4 + s) * STRIPE + PAGE, value, PAGE)


def _idle_source(case: Case) -> MicroVM:
    vm = MicroVM(memory=MEMORY, guest="idle", tracker=case.tracker, devices=DEVICES)
    try:
        vm.core.add_dma_engine(DMA)
        vm.core.simvf_keep_stop_state(VF, True)  # what the destination must load, after GO
        vm.start()
        _wait(lambda: vm.vcpu_stats()[0].state == 2, "the idle guest to touch its RAM and halt")
        for i in range(64):  # a pattern that is not the guest's, so pages carry data
            assert vm.core.dma_fill(DMA, DMA_STRIPE0 * STRIPE + i * PAGE, i % 251 + 1, PAGE)
    except BaseException:
        vm.close()
        raise
    return vm


def _wait(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.001)


def run_case(case: Case) -> Verdict:
    """Run one case and judge it. Never raises for a migration outcome; harness errors count as
    not survived, with the exception in `problems`."""
    t0 = time.monotonic()
    try:
        if case.action in ("kill_src", "stop_src"):
            v = _run_source_process(case)
        elif case.action in ("kill_dst", "stop_dst"):
            v = _run_destination_process(case)
        else:
            v = _run_in_process(case)
    except Exception as e:  # noqa: BLE001 - a broken harness is a failed case, with the reason
        v = Verdict(case, False, "", {}, None, "harness", [f"harness: {type(e).__name__}: {e}"])
    v.seconds = round(time.monotonic() - t0, 3)
    return v


def may_commit(case: Case) -> bool:
    """Whether the source may get to GO: the fault is at or after it, or a process is signalled
    at PAGE_HASHES or READY (a signal lets the record through, and READY was sent with or right
    after it, so the source may still commit), or the link dies right after READY arrived."""
    if case.pos.phase not in BEFORE_GO:
        return True
    # cut_after READY delivers READY and then loses the link: that is a lost GO.
    return (case.action in SIGNALS and case.position in ("PAGE_HASHES", "READY")) or (
        case.action == "cut_after" and case.position == "READY"
    )


def _phase(case: Case, proxy: FaultProxy) -> str:
    return case.pos.phase if proxy.fired.is_set() else ""


def _check_hit(case: Case, proxy: FaultProxy, problems: list[str]) -> None:
    p = case.pos
    if not proxy.fired.is_set():
        problems.append(f"the fault never fired at {p.name}")
        return
    h = proxy.hit
    conn = case.channels if p.where == "channel" else 0
    if (h.get("record"), h.get("conn"), h.get("direction")) != (p.record, conn, p.direction):
        problems.append(f"the fault hit {h}, not {p.record} on connection {conn} {p.direction}")
    elif p.after is None and h.get("nth") != p.nth:
        problems.append(f"the fault hit {p.record} number {h.get('nth')}, not number {p.nth}: {h}")
    if p.data_phase is not None and (h.get("device"), h.get("device_phase")) != (VF, p.data_phase):
        problems.append(f"the fault hit {h}, not a {p.data_phase} DEVICE_DATA chunk of {VF}")


def _check_error(case: Case, error: str | None, problems: list[str]) -> None:
    if not error:
        problems.append("no error message")
    elif not re.search(_NAMES[case.action], error, re.I):
        problems.append(f"the error does not name a {case.action}: {error!r}")


_DEVICE_NOT_BACK = ("was reset", "not running again")  # what the source's abort says of a device it could not take back


def _judge_source_device(
    vm: MicroVM, outcome: str, error: str | None, counters: dict[str, int], problems: list[str]
) -> None:
    """The source's VF: back in RUNNING after a failure, with the counters it had before (the
    guest never enabled it: nothing moved, and no reset cleared them); stopped while its VM
    stays paused after GO."""
    state = vm.core.mig_state(VF)
    if outcome == "failed":
        if state != "RUNNING":
            problems.append(f"the source's device {VF} is {state} after the failure, not RUNNING")
        now = vm.core.simvf_counters(VF)
        if now != counters or now["sent"] != now["delivered"] + now["dropped"]:
            problems.append(f"the source's device counters changed or disagree: {counters} -> {now}")
        if error and any(s in error for s in _DEVICE_NOT_BACK):
            problems.append(f"the source could not simply take its device back: {error!r}")
    elif vm.paused and state == "RUNNING":
        problems.append(f"the source's device {VF} runs although its VM stays paused after GO")


def _judge_destination_device(dst: MicroVM, loaded: dict[str, bytes], src: MicroVM | None, problems: list[str]) -> None:
    """The destination runs the guest: its VF is RUNNING, and the state it loaded (read right
    after RESUMING -> STOP, before anything ran) is the source's at stop, byte for byte."""
    state = dst.core.mig_state(VF)
    if state != "RUNNING":
        problems.append(f"the destination's device {VF} is {state}, not RUNNING")
    if src is not None and loaded.get("state") != src.core.simvf_stop_state(VF):
        problems.append(f"the destination's device {VF} loaded a state that differs from the source's at stop")


class _Signaller:
    """A process's signal, sent from the proxy's hook at the case's record, and the case's end
    (SIGCONT after a SIGSTOP), in that order. The destination may send the record last and finish
    before the proxy's thread has taken it: the end waits for the signal, and a hook that still
    comes after the end sends nothing (`late`), so no SIGSTOP ever lands after the SIGCONT and
    leaves the process stopped for good."""

    WAIT_S = 10.0  # how long the end waits for a signal whose record is still on its way

    def __init__(self, pid: int, sig: signal.Signals) -> None:
        self.pid, self.sig = pid, sig
        self.sent = threading.Event()
        self.late = False
        self._over = False
        self._lock = threading.Lock()

    def hook(self) -> None:
        with self._lock:
            if self._over:
                self.late = True
                return
            os.kill(self.pid, self.sig)
            self.sent.set()

    def end(self) -> None:
        self.sent.wait(self.WAIT_S)
        with self._lock:
            self._over = True
        if self.sig == signal.SIGSTOP:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)

    def check(self, proxy: FaultProxy, problems: list[str]) -> None:
        if proxy.fired.is_set() and not self.sent.is_set():
            why = "after the case ended" if self.late else "but the hook never ran"
            problems.append(f"the fault fired {why}: {self.sig.name} was not sent")


def _source_outcome(err: BaseException | None) -> tuple[str, str | None]:
    if err is None:
        return "completed", None
    return ("commit-error" if isinstance(err, CommitError) else "failed"), str(err)


# the whole migration in this process -------------------------------------------------------------
def _run_in_process(case: Case) -> Verdict:
    problems: list[str] = []
    details: dict[str, Any] = {}
    vm = _idle_source(case)
    digest = [vm.core.page_crcs()]
    counters = vm.core.simvf_counters(VF)
    loaded: dict[str, bytes] = {}

    def progress(event: str, data: dict[str, Any]) -> None:
        if event == "iteration" and data["index"] == 1:
            _dma_final_round(vm, case.channels, 0xC5)
            digest[0] = vm.core.page_crcs()  # what the source's RAM must be from here on

    try:
        listener = Listener("tcp://127.0.0.1:0", timeouts=_timeouts())
        listener.after_load = lambda v: loaded.update(state=v.core.simvf_state(VF))
        with serve_destination(listener, run_seconds=RUN_S, accept_timeout=ACCEPT_S) as dst:
            proxy = _Proxy(("127.0.0.1", dst.port), _fault(case)).start()
            err: BaseException | None = None
            report: Report | None = None
            try:
                report = migrate(vm, proxy.address, _options(case), progress)
            except MigrationError as e:
                err = e
            finally:
                proxy.close()
            res = dst.wait(60)
            outcome, error = _source_outcome(err)
            _check_hit(case, proxy, problems)
            _judge_source(case, vm, outcome, error, digest[0], report, problems)
            _judge_source_device(vm, outcome, error, counters, problems)
            _judge_destination(case, res, outcome, digest[0], problems, details)
            if isinstance(res, Incoming):
                _judge_destination_device(res.vm, loaded, vm, problems)
            return Verdict(case, not problems, _phase(case, proxy), dict(proxy.hit), error, outcome, problems, details)
    finally:
        vm.close()


def _judge_source(
    case: Case, vm: MicroVM, outcome: str, error: str | None, digest: bytes, report: Report | None, problems: list[str]
) -> None:
    phase = case.pos.phase
    if outcome == "failed":
        # A fault at GO may still end before the commit: the destination answers a GO it cannot
        # read with an ERROR, which proves it never started the guest, and the source takes it
        # back (_judge_destination checks that the guest then runs on one side only).
        if phase not in BEFORE_GO and phase != "go":
            problems.append(f"the source failed as if before the commit, but the fault hit {phase}: {error}")
        _check_error(case, error, problems)
        if vm.paused:
            problems.append("the source stayed paused after a failure before the commit")
        if vm.core.page_crcs() != digest:
            problems.append("the source's memory changed")
        return
    # completed or commit-error: the source sent GO and must never resume
    if not vm.paused:
        problems.append("the source resumed after sending GO")
    if outcome == "commit-error":
        assert error is not None
        if "commit point" not in error or "stays paused" not in error:
            problems.append(f"the commit error does not say where the guest is: {error!r}")
    elif phase in BEFORE_GO and (report is None or report.verification.memory_match is not True):
        # An undetected fault before GO is tolerated only if it did no harm: checked here by the
        # source's own verification, and by the destination's memory in _judge_destination.
        problems.append("completed despite a fault before the commit, without a verified match")


def _judge_destination(
    case: Case,
    res: Incoming | BaseException | None,
    outcome: str,
    digest: bytes,
    problems: list[str],
    details: dict[str, Any],
) -> None:
    phase = case.pos.phase
    if isinstance(res, Incoming):
        details["destination"] = "runs the guest" + (f" ({res.source_lost})" if res.source_lost else "")
        if outcome == "failed":
            problems.append("the destination runs the guest although the source resumed: it runs on two")
        if not res.vm.core.first_run_ns or not res.vm.started:
            problems.append("the destination's vCPU never entered the guest")
        if res.vm.core.page_crcs() != digest:
            problems.append("the destination's memory differs from the source's at stop")
        return
    details["destination"] = f"discarded: {res}"
    if res is None:
        problems.append("the destination did not finish")
    elif outcome == "commit-error" and not may_commit(case):
        # A fault in the stream before GO surfaced only after the source committed, and the
        # destination discarded: the guest is stopped on both sides. (If the destination runs it,
        # the guest is on one side and only the source's report is in doubt: acceptable.)
        problems.append(f"a fault before GO surfaced after the commit, the guest runs nowhere: {res}")
    elif phase == "after-go" and case.action not in ("kill_dst", "stop_dst"):
        problems.append(f"the fault hit {phase} but the destination does not run the guest: {res}")
    elif outcome == "completed":
        problems.append("the source completed but the destination does not run the guest")


# the destination as a `vfmig receive` process -----------------------------------------------------
def _start_receiver(json_path: str) -> tuple[subprocess.Popen[str], int]:
    extra = ["--timeout", str(ACCEPT_S + 5), "--json", json_path]
    proc, address = start_destination(RUN_S, extra)
    return proc, int(address.rsplit(":", 1)[1])


def _run_destination_process(case: Case) -> Verdict:
    problems: list[str] = []
    details: dict[str, Any] = {}
    sig = signal.SIGKILL if case.action == "kill_dst" else signal.SIGSTOP
    vm = _idle_source(case)
    digest = [vm.core.page_crcs()]
    counters = vm.core.simvf_counters(VF)

    def progress(event: str, data: dict[str, Any]) -> None:
        if event == "iteration" and data["index"] == 1:
            _dma_final_round(vm, case.channels, 0x3C)
            digest[0] = vm.core.page_crcs()

    with tempfile.TemporaryDirectory() as tmp:
        json_path = os.path.join(tmp, "dst.json")
        proc, port = _start_receiver(json_path)
        try:
            signaller = _Signaller(proc.pid, sig)
            proxy = _Proxy(("127.0.0.1", port), _fault(case, signaller.hook)).start()
            err: BaseException | None = None
            report: Report | None = None
            try:
                report = migrate(vm, proxy.address, _options(case), progress)
            except MigrationError as e:
                err = e
            finally:
                signaller.end()  # SIGCONT after a SIGSTOP, never before it
                proxy.close()
            try:
                out, errout = proc.communicate(timeout=ACCEPT_S + 20)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, errout = proc.communicate()
                problems.append("the destination process did not end after SIGCONT")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        ran = proc.returncode == 0 and "guest running here" in out
        doc = json.loads(Path(json_path).read_text()) if ran and os.path.exists(json_path) else {}
    try:
        outcome, error = _source_outcome(err)
        phase = case.pos.phase
        _check_hit(case, proxy, problems)
        signaller.check(proxy, problems)
        _judge_source(case, vm, outcome, error, digest[0], report, problems)
        _judge_source_device(vm, outcome, error, counters, problems)
        details["destination"] = f"exit {proc.returncode}: {(out + errout).strip()[-300:]}"
        if ran:
            if outcome == "failed":
                problems.append("the destination process ran the guest although the source resumed")
            if not doc.get("checkpoints", {}).get("dst-vm-started"):
                problems.append("the destination process reports no vCPU start")
        elif case.action == "stop_dst" and phase == "after-go":
            problems.append("the stopped destination did not run the guest once continued")
        return Verdict(case, not problems, _phase(case, proxy), dict(proxy.hit), error, outcome, problems, details)
    finally:
        vm.close()


# the source as a `vfmig vm run --control` process ------------------------------------------------
def _start_source(case: Case, path: str) -> subprocess.Popen[str]:
    vm = ["vm", "run", "--memory", str(MEMORY >> 20) + "M", "--guest", "dirtier", "--tracker", case.tracker]
    vm += ["--device", VF_ARG]  # the dirtier has no VF driver: the VF stays still, its state streams
    # Fast and random, so that the final round has pages on every page channel to fault.
    workload = ["--rate", "40000", "--pattern", "random", "--control", path, "--seconds", "0"]
    return start_process([*vm, *workload], "control socket", "source")[0]


def _source_state(path: str) -> tuple[str, int]:
    """("paused" | "running", touches) of a source process, from its pause/resume counts."""
    st = control.request(path, {"cmd": "stats"}, timeout=10)["stats"]
    paused = len(st["pause_latency_ns"]) > len(st["resume_latency_ns"])
    return ("paused" if paused else "running"), int(st["touches"])


def _source_device(path: str) -> dict[str, int]:
    """The source process's VF counters (its migration state is not on the control socket: the
    source's own abort reports a device it could not take back to RUNNING, in its error)."""
    return dict(control.request(path, {"cmd": "stats"}, timeout=10)["stats"]["devices"][VF])


def _run_source_process(case: Case) -> Verdict:
    problems: list[str] = []
    details: dict[str, Any] = {}
    sig = signal.SIGKILL if case.action == "kill_src" else signal.SIGSTOP
    phase = case.pos.phase
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "vm.sock")
        src = _start_source(case, path)
        try:
            _wait(lambda: _source_state(path)[1] > 0, "the source guest to run")
            counters = _source_device(path)
            listener = Listener("tcp://127.0.0.1:0", timeouts=_timeouts())
            with serve_destination(listener, run_seconds=RUN_S, accept_timeout=ACCEPT_S + 5) as dst:
                signaller = _Signaller(src.pid, sig)
                proxy = _Proxy(("127.0.0.1", dst.port), _fault(case, signaller.hook)).start()
                answer: dict[str, Any] = {}
                req = {"cmd": "migrate", "to": proxy.address, "options": control.options_to_dict(_options(case))}

                def ask() -> None:
                    try:
                        answer.update(control.request(path, req, timeout=60))
                    except VfmigError as e:
                        answer.update(ok=False, error=f"(no answer) {e}", lost=True)

                th = threading.Thread(target=ask, daemon=True)
                th.start()
                res = dst.wait(60)  # the destination ends on its own short timeouts
                signaller.end()  # SIGCONT after a SIGSTOP, never before it
                th.join(60)
                proxy.close()
                _check_hit(case, proxy, problems)
                signaller.check(proxy, problems)
                error = answer.get("error")
                details["source"] = answer.get("error") or "completed"
                details["destination"] = "runs the guest" if isinstance(res, Incoming) else f"discarded: {res}"
                if th.is_alive():
                    problems.append("the source's migration request did not end")
                if isinstance(res, Incoming):
                    if not may_commit(case):
                        problems.append(f"the destination runs the guest after a fault in {phase}")
                    if not res.vm.core.first_run_ns:
                        problems.append("the destination's vCPU never entered the guest")
                    _judge_destination_device(res.vm, {}, None, problems)
                elif phase == "after-go":
                    problems.append(f"the destination does not run the guest after GO: {res}")
                if sig == signal.SIGKILL:
                    outcome = "source-killed"
                    if src.wait(10) != -signal.SIGKILL:
                        problems.append(f"the source exited {src.returncode}, not by SIGKILL")
                else:
                    outcome = "completed" if answer.get("ok") else "failed"
                    try:
                        state = _source_state(path)[0] if src.poll() is None else "exited"
                    except (OSError, VfmigError):  # it exits once migrated away
                        state = "exited" if src.wait(10) is not None else "unknown"
                    details["source_state"] = state
                    if isinstance(res, Incoming):
                        # GO reached the destination: the source must not run (paused, or exited
                        # once its migration completed).
                        if state == "running":
                            problems.append("the source runs although the destination does")
                    elif phase in BEFORE_GO and state != "running":
                        problems.append(f"the source is {state} after a failure before the commit")
                    if state == "running" and (now := _source_device(path)) != counters:
                        problems.append(f"the source's device counters changed: {counters} -> {now}")
                    if error and any(s in str(error) for s in _DEVICE_NOT_BACK):
                        problems.append(f"the source could not simply take its device back: {error!r}")
                    if not answer.get("ok"):
                        if "commit point" in str(error):
                            outcome = "commit-error"
                            if state == "running":
                                problems.append("the source resumed after a commit error")
                        elif phase not in BEFORE_GO and isinstance(res, Incoming):
                            problems.append(f"the source failed as if before the commit: {error}")
                phase_hit = _phase(case, proxy)
                return Verdict(case, not problems, phase_hit, dict(proxy.hit), error, outcome, problems, details)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(src.pid, signal.SIGCONT)
            if src.poll() is None:
                with contextlib.suppress(VfmigError, OSError, KeyError):
                    control.request(path, {"cmd": "stop"}, timeout=5)
            if src.poll() is None:
                src.kill()
            src.communicate(timeout=30)


def summarize(verdicts: list[Verdict]) -> dict[str, Any]:
    """Counts per action and per phase, and the failures."""
    per_action: dict[str, dict[str, int]] = {}
    per_phase: dict[str, dict[str, int]] = {}
    for v in verdicts:
        for table, key in ((per_action, v.case.action), (per_phase, v.phase or "(not fired)")):
            row = table.setdefault(key, {"tried": 0, "survived": 0})
            row["tried"] += 1
            row["survived"] += int(v.survived)
    return {
        "cases_tried": len(verdicts),
        "cases_survived": sum(v.survived for v in verdicts),
        "failures": [v.to_dict() for v in verdicts if not v.survived],
        "per_action": per_action,
        "per_phase": per_phase,
    }


def sample(stride: int = 3) -> list[Case]:
    """A fixed, representative slice of the matrix: every action at every `stride`-th position
    (shifted per action, so together they cover every position), each on one of the four
    tracker/channel configurations in turn."""
    configs = [(t, c) for t in TRACKERS for c in CHANNELS]
    out = []
    for a_i, action in enumerate(PROXY_ACTIONS + SIGNALS):
        for p_i, p in enumerate(POSITIONS):
            if (p_i + a_i) % stride or not applicable(action, p):
                continue
            t, c = configs[(p_i + a_i) // stride % len(configs)]
            out.append(Case(action, p.name, t, c))
    return out
