"""Operator-facing guarantees: the pause deadline, the `vm run --control` commands (status,
resume, stop) served while a migration runs, Ctrl-C cancelling a migration, honest messages."""

from __future__ import annotations

import json
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_cli
from tests.helpers import vm_process, wait_until
from vfmig import control
from vfmig.demo import start_destination
from vfmig.errors import ConfigError, MigrationError, VfmigError
from vfmig.migration import MigrationOptions, migrate
from vfmig.migration.destination import Incoming
from vfmig.testing import DOWN, Fault, FaultProxy, serve_destination
from vfmig.vm import MicroVM, PauseTimeoutError

pytestmark = pytest.mark.usefixtures("kvm")


def _wait_moving(vm: MicroVM, vcpu: int | None = None, timeout: float = 10.0) -> None:
    """Wait until the guest's counter moves (one vCPU's, or any): the vCPUs run."""

    def count() -> int:
        stats = vm.vcpu_stats()
        return stats[vcpu].touches if vcpu is not None else sum(s.touches for s in stats)

    start = count()
    wait_until(lambda: count() != start, "the guest to run", timeout)


def _pause_expecting_timeout(vm: MicroVM, device: str, timeout_ms: int) -> str:
    """vm.pause(timeout_ms) while a vCPU is held: the PauseTimeoutError message. A pause that
    ignores its deadline fails the test instead of hanging it (the hold is released)."""
    out: list[BaseException | int] = []
    th = threading.Thread(target=lambda: out.append(_call(vm.pause, timeout_ms)), daemon=True)
    th.start()
    th.join(30)
    if th.is_alive():
        vm.core.hold_clock(device, 0)
        th.join(30)
        pytest.fail("pause ignored its deadline: it returned only once the stuck vCPU was released")
    assert isinstance(out[0], PauseTimeoutError), out
    return str(out[0])


def _call(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - the caller inspects it
        return e


# 1. pause deadline --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("device", "where"), [("clock", r"a read of port 0x5f[04]"), ("clock-mmio", r"a read of MMIO 0xfeb0000[04]")]
)
def test_pause_deadline_names_the_stuck_vcpu_and_lets_the_others_run(device: str, where: str) -> None:
    with MicroVM(memory="64M", vcpus=2, rate_pps=20_000, clock_mmio=device == "clock-mmio") as vm:
        vm.start()
        vm.core.hold_clock(device, 1)  # one vCPU blocks in its next clock read; the other parks
        assert vm.core.wait_clock_held(device, 1)
        msg = _pause_expecting_timeout(vm, device, 50)
        stuck = 0 if msg.startswith("pause timed out after 50 ms: vCPU 0 ") else 1
        # The clock's low half or its high half, whichever read the vCPU was at.
        pattern = rf"pause timed out after 50 ms: vCPU {stuck} \(in {where}\) did not stop; the VM keeps running"
        assert re.fullmatch(pattern, msg), msg
        assert not vm.paused
        _wait_moving(vm, vcpu=1 - stuck)  # the vCPU that had parked was let go at the deadline
        vm.core.hold_clock(device, 0)
        _wait_moving(vm, vcpu=stuck)
        vm.pause(50)  # nothing stuck: the same deadline is plenty
        vm.resume()


def _saved_rip(blob: bytes) -> int:
    """RIP from a vCPU state blob: a 16-byte header, then sections {tag u32, len u32, payload
    padded to 8}; the regs section (tag 1) is struct kvm_regs, RIP after 16 GPRs."""
    off = 16
    while off < len(blob):
        tag, n = struct.unpack_from("<II", blob, off)
        if tag == 1:
            return int(struct.unpack_from("<Q", blob, off + 8 + 16 * 8)[0])
        off += 8 + (n + 7) // 8 * 8
    raise AssertionError("no regs section in the vCPU state")


@pytest.mark.parametrize("device", ["clock", "clock-mmio"])
def test_a_pause_that_lands_on_a_device_read_saves_the_read_done(device: str) -> None:
    """KVM stores a port or MMIO read's value and moves RIP past it only on the vCPU's next
    KVM_RUN. A vCPU that parks right after the exit must finish it first, or its saved state is
    mid-instruction and the destination reads again: a clock read before the stop is lost (a
    throttled guest then saw its whole sleep as downtime), a read with side effects repeats.
    Held in a clock read while the pause is requested, the vCPU's saved RIP must be past it."""
    with MicroVM(memory="64M", rate_pps=20_000, clock_mmio=device == "clock-mmio") as vm:
        vm.start()
        vm.core.hold_clock(device, 1)
        assert vm.core.wait_clock_held(device, 1)
        found = re.search(r"in a read of (?:port|MMIO) (0x[0-9a-f]+)", _pause_expecting_timeout(vm, device, 50))
        assert found, "the timeout names the access the vCPU is held in"
        held = int(found.group(1), 16)
        pausing = threading.Thread(target=vm.pause, args=(10_000,))
        pausing.start()
        wait_until(lambda: vm.core.pause_requested, "the pause to be requested")
        vm.core.hold_clock(device, 0)  # the read returns to a vCPU that must park
        pausing.join()
        assert vm.paused
        rip = _saved_rip(vm.core.save_vcpu(0))
        code = vm.core.read(rip, 8)
        vm.resume()
    if device == "clock":  # in (%dx) or in $imm, maybe after an operand-size prefix
        op = code[1] if code[0] == 0x66 else code[0]
        assert op not in (0xE4, 0xE5, 0xEC, 0xED), f"saved RIP {rip:#x} is at an IN ({code.hex()}): not finished"
    else:  # a load from an absolute address: the held one must not be in the instruction at RIP
        assert held.to_bytes(4, "little") not in code[:6], f"saved RIP {rip:#x} is at the read of {held:#x}"


def _hold_in_the_clocks_low_read(vm: MicroVM) -> None:
    """Hold vCPU 0 in the low half of a clock read, the one that samples the time (port 0x5f0;
    a pause timeout names the port it is held in). Held in the high half, it goes round again."""
    for _ in range(20):
        vm.core.hold_clock("clock", 1)
        assert vm.core.wait_clock_held("clock", 1)
        if "port 0x5f0)" in _pause_expecting_timeout(vm, "clock", 50):
            return
        vm.core.hold_clock("clock", 0)
        _wait_moving(vm)
    pytest.fail("vCPU 0 was never held in the clock's low read")


def test_a_stop_after_a_throttle_sleep_waits_for_a_clock_read_made_after_the_sleep() -> None:
    """The throttle can put a vCPU to sleep between the two reads of its clock: the low read has
    sampled the time, the high read comes after the wake. A stop that waited for one exit after
    the wake would freeze a guest whose newest time predates the sleep, and the guest would feel
    the sleep as downtime. Held in its low read until the throttle wants it asleep, the vCPU
    sleeps right after that read; the stop must let it read the clock again first. At full speed
    with a read every 512 pages (~0.9 ms), a stop after one exit lands before that next read."""
    with MicroVM(memory="64M", clock_every=512) as vm:
        vm.start()
        _wait_moving(vm)
        _hold_in_the_clocks_low_read(vm)
        vm.core.set_throttle(99)
        wait_until(lambda: vm.core.throttle_states()[0][0], "the throttle to want vCPU 0 asleep")
        vm.core.hold_clock("clock", 0)  # the low read returns its time; the sleep comes next
        wait_until(lambda: vm.core.throttle_states()[0][1], "vCPU 0 to sleep")
        woken = time.monotonic_ns()
        vm.pause(10_000, unthrottle_ms=10)
        stopped = time.monotonic_ns()
        assert vm.core.pause_unthrottle["woken"] == 1 and vm.core.pause_unthrottle["late"] == 0
        # The stop lasts 2 ms, past the guest's 0.5 ms threshold for logging a gap.
        wait_until(lambda: time.monotonic_ns() - stopped > 2_000_000, "the stop to last 2 ms")
        resumed = time.monotonic_ns()
        vm.resume()

        def across() -> list[tuple[int, int]]:
            return [g for g in vm.vcpu_stats()[0].gaps if g[0] <= stopped and g[0] + g[1] >= resumed]

        wait_until(lambda: bool(across()), "the guest to log its gap across the stop")
        start = across()[0][0]
    assert start >= woken, f"the guest's last time before the stop predates the wake by {(woken - start) / 1e6:.2f} ms"


def test_a_guest_that_has_failed_is_neither_paused_nor_migrated() -> None:
    """A vCPU that stopped on an error (its code overwritten with int3: this KVM's emulator gives
    up on it, or it triple-faults without an IDT) parks the others; a pause must not pass that off
    as its own, or the dead guest would be saved and moved, other vCPUs mid-access. Both say why,
    and the destination is never contacted."""
    with MicroVM(memory="64M", vcpus=2, rate_pps=20_000) as vm:
        vm.start()
        _wait_moving(vm)
        # int3 is one byte, so wherever the vCPU is in its code, its next instruction is one.
        vm.core.write(0x100000, b"\xcc" * 0x8000)
        wait_until(lambda: vm.core.failed is not None, "the vCPU to fail")
        with pytest.raises(VfmigError, match=r"cannot pause: vCPU \d stopped: "):
            vm.pause(100)
        assert not vm.paused
        with pytest.raises(MigrationError, match=r"the guest has stopped, there is nothing to migrate: vCPU \d"):
            migrate(vm, "tcp://127.0.0.1:9", MigrationOptions())


def test_pause_timeout_out_of_range_is_rejected_before_pausing() -> None:
    with MicroVM(memory="64M", rate_pps=20_000) as vm:
        vm.start()
        for bad in (0, 60_001):
            with pytest.raises(ConfigError, match="pause timeout must be 1..60000 ms"):
                vm.pause(bad)
            with pytest.raises(ConfigError, match="pause timeout"):
                migrate(vm, "tcp://127.0.0.1:9", MigrationOptions(pause_timeout_ms=bad))
        _wait_moving(vm)


def test_migration_fails_at_the_pause_deadline_then_the_same_vm_migrates() -> None:
    with MicroVM(memory="128M", rate_pps=20_000) as vm:
        vm.start()

        def stick_at_first_iteration(event: str, data: dict[str, Any]) -> None:
            if event == "iteration" and data["index"] == 1:
                vm.core.hold_clock("clock", 1)
                assert vm.core.wait_clock_held("clock", 1)

        with serve_destination() as dst:
            with pytest.raises(MigrationError) as ei:
                migrate(vm, dst.address, MigrationOptions(pause_timeout_ms=100), progress=stick_at_first_iteration)
            assert isinstance(dst.wait(), BaseException)  # it discarded the unstarted VM
        # The clock's low half or its high half, whichever read the vCPU was at.
        pattern = (
            r"pause timed out after 100 ms: vCPU 0 \(in a read of port 0x5f[04]\) did not stop; the VM keeps running"
        )
        assert re.fullmatch(pattern, str(ei.value)), str(ei.value)
        assert not vm.paused
        vm.core.hold_clock("clock", 0)
        _wait_moving(vm)  # the source guest runs on after the release
        with serve_destination() as dst:
            r = migrate(vm, dst.address, MigrationOptions(verify=True))
            assert isinstance(dst.wait(), Incoming)
        assert r.status == "completed" and r.verification.memory_match is True


# helpers for the `vm run --control` process ----------------------------------------------------
# the guest of most of these tests: a dirtier small and slow enough to start in a blink
SMALL = ("--memory", "64M", "--rate", "20000")
BUSY = ("--memory", "128M", "--rate", "50000")


def status(sock: str) -> dict[str, Any]:
    answer = control.request(sock, {"cmd": "status"}, timeout=10)
    assert answer["ok"], answer
    return dict(answer["status"])


def wait_guest_moving(sock: str, timeout: float = 10.0) -> None:
    def touches() -> int:
        return int(control.request(sock, {"cmd": "stats"}, timeout=10)["stats"]["touches"])

    start = touches()
    wait_until(lambda: touches() != start, "the guest to run", timeout)


def one_line_error(r: subprocess.CompletedProcess[str] | tuple[int, str], needle: str) -> str:
    code, err = (r.returncode, r.stderr) if isinstance(r, subprocess.CompletedProcess) else r
    assert code != 0 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("vfmig: error:") and needle in lines[-1], err
    assert all(not ln.startswith("vfmig:") for ln in lines[:-1]), err  # progress lines only before it
    return lines[-1]


def read_until(stream: Any, needle: str) -> list[str]:
    """Lines of a subprocess pipe up to the first containing `needle` (an event, not a timer)."""
    seen = []
    for line in stream:
        seen.append(line)
        if needle in line:
            return seen
    raise AssertionError(f"{needle!r} never appeared: {''.join(seen)}")


# 2. vm status / resume / stop ------------------------------------------------------------------
def test_vm_status_resume_stop(tmp_path: Path) -> None:
    with vm_process(tmp_path, *SMALL) as (p, sock):
        r = run_cli("vm", "status", "--control", sock, "--json")
        assert r.returncode == 0, r.stderr
        st = json.loads(r.stdout)
        assert st["state"] == "running" and st["memory"] == 64 << 20 and st["vcpus"] == 1
        assert st["uptime_s"] > 0 and st["last_migration"] is None and st["migration"] is None
        r = run_cli("vm", "status", "--control", sock)
        assert r.returncode == 0 and r.stdout.startswith("state           running\n"), r.stdout
        one_line_error(run_cli("vm", "resume", "--control", sock), "cannot resume: the VM is running, not paused")
        r = run_cli("vm", "stop", "--control", sock)
        assert r.returncode == 0 and r.stdout.strip() == "vfmig: VM stopped", r
        assert p.wait(10) == 0
        assert p.stdout is not None and "VM stopped (not migrated)" in p.stdout.read()
    one_line_error(run_cli("vm", "status", "--control", sock), "no VM control socket")


def test_failure_before_commit_says_the_source_keeps_running(tmp_path: Path) -> None:
    with vm_process(tmp_path, *SMALL) as (_, sock):
        line = one_line_error(run_cli("migrate", "--control", sock, "--to", "tcp://127.0.0.1:9"), "cannot connect")
        assert line.endswith("; the source VM keeps running"), line
        st = status(sock)
        assert st["state"] == "running"
        assert st["last_migration"]["status"] == "failed" and st["last_migration"]["source"] == "running"
        wait_guest_moving(sock)


# 3. an ambiguous commit: the source stays paused, and says how to resume it ----------------------
def test_lost_go_leaves_the_source_paused_until_vm_resume(tmp_path: Path) -> None:
    with vm_process(tmp_path, *SMALL) as (_, sock):
        with (
            serve_destination() as dst,
            FaultProxy(("127.0.0.1", dst.port), Fault(record="GO", action="cut")) as proxy,
        ):
            r = run_cli("migrate", "--control", sock, "--to", proxy.address)
            assert proxy.hit["record"] == "GO"
            assert isinstance(dst.wait(), BaseException)  # no GO: the destination never ran the guest
        line = one_line_error(r, "after the commit point, so the source VM stays paused")
        assert f"resume it (`vfmig vm resume --control {sock}`) only if the destination is known not to run" in line
        st = status(sock)
        assert st["state"] == "paused"
        assert st["last_migration"]["status"] == "in_doubt" and st["last_migration"]["source"] == "paused"
        refused = run_cli("migrate", "--control", sock, "--to", "tcp://127.0.0.1:9")
        one_line_error(refused, "cannot migrate: the VM is paused")
        r = run_cli("vm", "resume", "--control", sock)
        assert r.returncode == 0 and "VM resumed" in r.stdout, r
        assert status(sock)["state"] == "running"
        wait_guest_moving(sock)
        one_line_error(run_cli("vm", "resume", "--control", sock), "not paused")


# 4. Ctrl-C cancels; after the final state left, it cannot, and the client says so -------------
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_migrate_cancels_and_the_source_keeps_running(tmp_path: Path, sig: signal.Signals) -> None:
    with vm_process(tmp_path, *BUSY) as (_, sock):
        dst, address = start_destination(run_seconds=0.3)
        try:
            mig = subprocess.Popen(
                [sys.executable, "-m", "vfmig", "migrate", "--control", sock, "--to", address, "--bandwidth", "32M"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            read_until(mig.stderr, "iteration 1:")  # dirtying 200 MB/s over 32 MB/s: it goes on
            during = status(sock)  # answered while the migration runs
            assert during["state"] == "migrating" and during["migration"]["to"] == address
            mig.send_signal(sig)
            out, err = mig.communicate(timeout=60)
            if sig == signal.SIGINT:
                assert "cancelling the migration" in err
                line = one_line_error((mig.returncode, err), "migration cancelled")
                assert line == "vfmig: error: migration cancelled; the source VM keeps running"
            else:  # the client vanished: its closed connection cancels
                wait_until(lambda: status(sock)["state"] != "migrating", "the migration to be cancelled", 60)
            st = status(sock)
            assert st["state"] == "running" and st["last_migration"]["status"] == "cancelled", st
            wait_guest_moving(sock)
            assert dst.wait(60) != 0  # the destination discarded what it had
        finally:
            if dst.poll() is None:
                dst.kill()
                dst.wait(10)


def test_the_suites_children_take_ctrl_c() -> None:
    """The Ctrl-C tests need children that take SIGINT; a suite started as a shell's background
    job has it ignored, and conftest restores it (without that, `vm run` ignored the test's
    Ctrl-C and migrated on)."""
    code = "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "True", out


def test_vm_process_interrupted_mid_migration_cancels_it_and_exits_cleanly(tmp_path: Path) -> None:
    """Ctrl-C on `vm run` itself: the migration is cancelled, the process exits as interrupted
    (not by a signal), and the client is told the source VM is gone, not that it keeps running."""
    with vm_process(tmp_path, *BUSY) as (p, sock):
        dst, address = start_destination(run_seconds=0.3)
        try:
            mig = subprocess.Popen(
                [sys.executable, "-m", "vfmig", "migrate", "--control", sock, "--to", address, "--bandwidth", "32M"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            read_until(mig.stderr, "iteration 1:")
            p.send_signal(signal.SIGINT)
            _, err = mig.communicate(timeout=60)
            assert one_line_error((mig.returncode, err), "migration cancelled").endswith("; the source VM is stopped")
            _, vm_err = p.communicate(timeout=60)
            assert p.returncode == 130 and "Traceback" not in vm_err, vm_err  # not killed by a signal
            assert dst.wait(60) != 0
        finally:
            if dst.poll() is None:
                dst.kill()
                dst.wait(10)


def test_interrupt_after_the_final_state_left_cannot_cancel(tmp_path: Path) -> None:
    gate = threading.Event()  # holds READY in the proxy until the client has been interrupted
    with (
        vm_process(tmp_path, *SMALL) as (p, sock),
        serve_destination() as dst,
        FaultProxy(("127.0.0.1", dst.port), Fault(direction=DOWN, record="READY", action="call", hook=gate.wait)) as px,
    ):
        mig = subprocess.Popen(
            [sys.executable, "-m", "vfmig", "migrate", "--control", sock, "--to", px.address],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            read_until(mig.stderr, "stop-and-copy:")
            mig.send_signal(signal.SIGINT)
            read_until(mig.stderr, "cannot cancel: too late to cancel")
        finally:
            gate.set()
        out, err = mig.communicate(timeout=60)
        assert mig.returncode == 0 and "migration completed" in out, err
        assert isinstance(dst.wait(), Incoming)
        assert p.wait(30) == 0


def test_bad_pause_timeout_fails_before_contacting_anyone() -> None:
    r = run_cli("migrate", "--control", "/nonexistent.sock", "--to", "tcp://127.0.0.1:9", "--pause-timeout", "0")
    one_line_error(r, "pause timeout must be 1..60000 ms, got 0")


# 5. the --json path is checked before anything moves; after the commit nothing tracebacks --------
def test_unwritable_json_path_fails_before_migrating(tmp_path: Path) -> None:
    with vm_process(tmp_path, *SMALL) as (p, sock):
        bad = str(tmp_path / "missing" / "report.json")
        one_line_error(
            run_cli("migrate", "--control", sock, "--to", "tcp://127.0.0.1:9", "--json", bad),
            f"cannot write the report to {bad}: No such file or directory",
        )
        assert status(sock)["last_migration"] is None  # nothing was attempted
        with serve_destination() as dst:
            r = run_cli("migrate", "--control", sock, "--to", dst.address, "--json", "/dev/full")
            assert isinstance(dst.wait(), Incoming)
        line = one_line_error(r, "the migration completed, but its report was not written")
        assert "migration completed" in r.stdout  # the summary still shows
        assert p.wait(30) == 0 and line
