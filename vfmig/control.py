"""The control socket of `vfmig vm run --control PATH`: JSON lines over a UNIX socket, so that
`vfmig migrate`, `vfmig vm status|resume|stop` (or an orchestrator) can drive a VM that another
process runs, as virsh drives a domain.

Requests are one JSON line, {"cmd": ...}; answers one JSON line with "ok". A migration streams
{"event": ...} lines before its answer. Connections are served concurrently, so status answers
while a migration runs. The migrating client's connection is watched: a {"cmd": "cancel"} line
on it, or the connection closing, cancels the migration (the source keeps running) until the
VM's final state is on its way; from then on the migration commits or fails on its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shlex
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from vfmig.errors import MigrationError, VfmigError
from vfmig.migration.policy import Policy
from vfmig.migration.source import CommitError, Migration, MigrationOptions
from vfmig.vm import MicroVM

DEFAULT_PATH = f"/tmp/vfmig-{os.getuid()}.sock"
REQUEST_TIMEOUT_S = 10.0  # a client must send its request line, and read our lines, this fast
STOP_JOIN_S = 5.0  # at exit, how long to let in-flight requests finish their answers
TOO_LATE = (
    "too late to cancel: the VM's final state is on its way to the destination, and the migration "
    "now commits or fails on its own"
)

Progress = Callable[[str, dict[str, Any]], None]


def options_to_dict(opts: MigrationOptions) -> dict[str, Any]:
    return asdict(opts)


def options_from_dict(d: dict[str, Any]) -> MigrationOptions:
    d = dict(d)
    policy = Policy(**d.pop("policy", {}))
    return MigrationOptions(policy=policy, **d)


class _Conn:
    """One client connection: line reads with a deadline, and writes from several threads."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(REQUEST_TIMEOUT_S)  # bounds sendall to a client that stops reading
        self._buf = b""
        self._wlock = threading.Lock()

    def readline(self, timeout: float | None, wake: int | None = None) -> bytes | None:
        """The next line; b"" when the client closed; None on timeout or when `wake` is readable."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            fds = [self.sock.fileno()] + ([wake] if wake is not None else [])
            ready = select.select(fds, [], [], left)[0]
            if self.sock.fileno() not in ready:
                return None
            try:
                data = self.sock.recv(4096)
            except OSError:
                data = b""
            if not data:
                return b""
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return line + b"\n"

    def send(self, doc: dict[str, Any]) -> None:
        """Best effort: a client that left does not fail what it asked for."""
        with self._wlock, contextlib.suppress(OSError):
            self.sock.sendall(json.dumps(doc).encode() + b"\n")


class ControlServer:
    """Serves one VM's control socket until the VM is stopped, migrated away, or `seconds` pass."""

    def __init__(self, vm: MicroVM, path: str) -> None:
        self.vm = vm
        self.path = path
        self.started = time.monotonic()
        # Guards everything below, and every lifecycle call on the VM made from here.
        self._lock = threading.Lock()
        self._migration: Migration | None = None
        self._migration_to = ""
        self._phase = ""  # the migration's last progress event
        self._cancel_asked = False
        self._past_stop = False  # the final state was sent: cancelling is no longer possible
        self._migrated: dict[str, Any] | None = None  # the report, once the guest runs elsewhere
        self._stop = False
        self.last_migration: dict[str, Any] | None = None
        self._loop_done = threading.Event()
        self._threads: list[threading.Thread] = []
        self._srv: socket.socket | None = None
        self._migration_thread: threading.Thread | None = None

    # the accept loop ------------------------------------------------------------------------
    def listen(self) -> None:
        """Bind the socket: clients can connect once this returns."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._srv = srv = socket.socket(socket.AF_UNIX)
        try:
            srv.bind(self.path)
        except OSError as e:
            srv.close()
            raise VfmigError(f"cannot serve a control socket at {self.path}: {e.strerror or e}") from None
        srv.listen(16)
        srv.settimeout(0.2)

    def serve(self, seconds: float = 0) -> dict[str, Any] | None:
        """Run until stopped, migrated, or `seconds` pass (0: no limit) with no migration under
        way. Returns the migration report if the VM was migrated away, else None."""
        if self._srv is None:
            self.listen()
        srv = self._srv
        assert srv is not None
        deadline = self.started + seconds if seconds > 0 else None
        try:
            while not self._finished(deadline):
                try:
                    conn, _ = srv.accept()
                except TimeoutError:
                    continue
                th = threading.Thread(target=self._serve_conn, args=(conn,), name="vfmig-control", daemon=True)
                th.start()
                self._threads = [t for t in self._threads if t.is_alive()] + [th]
        finally:
            srv.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self._loop_done.set()
            # Left early (Ctrl-C on this process): the VM must outlive a migration still using it.
            with self._lock:
                self._stop = True
                self._cancel_locked()
                running = self._migration_thread if self._migration is not None else None
            if running is not None:
                running.join()
            end = time.monotonic() + STOP_JOIN_S
            for t in self._threads:
                t.join(max(0.0, end - time.monotonic()))
        return self._migrated

    def _finished(self, deadline: float | None) -> bool:
        with self._lock:
            if self._migration is not None:
                return False  # it ends by itself (or by cancel); the VM must outlive it
            return self._stop or self._migrated is not None or (deadline is not None and time.monotonic() >= deadline)

    def _serve_conn(self, sock: socket.socket) -> None:
        with sock:
            conn = _Conn(sock)
            try:
                line = conn.readline(REQUEST_TIMEOUT_S)
                req = json.loads(line or b"{}")
                if not isinstance(req, dict):
                    raise ValueError
            except ValueError:
                conn.send({"ok": False, "error": "malformed request"})
                return
            try:
                conn.send(self._dispatch(conn, req))
            except Exception as e:  # noqa: BLE001 - the client gets one line, the server lives on
                conn.send({"ok": False, "error": f"{type(e).__name__}: {e}"})

    def _dispatch(self, conn: _Conn, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "status":
            return {"ok": True, "status": self.status()}
        if cmd == "stats":
            return {"ok": True, "stats": {k: v for k, v in self.vm.stats().items() if k != "console"}}
        if cmd == "resume":
            return self._resume()
        if cmd == "stop":
            return self._stop_vm()
        if cmd == "migrate":
            return self._migrate(conn, req)
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    # commands -------------------------------------------------------------------------------
    def _state(self) -> str:
        """Under the lock."""
        if self._migrated is not None:
            return "migrated"
        if self._migration is not None:
            return "migrating"
        if self.vm.core.failed:
            return "failed"
        return "paused" if self.vm.paused else "running"

    def status(self) -> dict[str, Any]:
        with self._lock:
            state = self._state()
            migration = {"to": self._migration_to, "phase": self._phase} if self._migration is not None else None
            last = dict(self.last_migration) if self.last_migration else None
        cfg = self.vm.config
        return {
            "state": state,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "memory": cfg.memory,
            "vcpus": cfg.vcpus,
            "guest": cfg.guest,
            "tracker": cfg.tracker,
            "devices": [asdict(d) for d in cfg.devices],
            "pid": os.getpid(),
            "failed": self.vm.core.failed,
            "vcpu_stats": self._vcpu_stats(),
            "migration": migration,
            "last_migration": last,
        }

    def _vcpu_stats(self) -> list[dict[str, int]] | None:
        """Per vCPU, the guest's own counters (from its stats page): pages touched since boot and
        passes over its working set, so a client can wait for the workload to settle."""
        try:
            return [{"touches": s.touches, "passes": s.passes} for s in self.vm.vcpu_stats()]
        except (ValueError, OSError):  # the VM is gone (it migrated away)
            return None

    def _resume(self) -> dict[str, Any]:
        with self._lock:
            state = self._state()
            if state != "paused":
                return {"ok": False, "error": f"the VM is {state}, not paused: nothing to resume"}
            try:
                self.vm.resume()
            except VfmigError as e:
                return {"ok": False, "error": str(e)}
        return {"ok": True, "state": "running"}

    def _stop_vm(self) -> dict[str, Any]:
        """Like virsh destroy: cancels a migration that can still be cancelled, and waits for it."""
        with self._lock:
            self._stop = True
            self._cancel_locked()
        self._loop_done.wait()
        with self._lock:
            state = self._state()
        return {"ok": True, "state": state if state == "migrated" else "stopped"}

    def _cancel_locked(self) -> str | None:
        """Cancel the migration under way, if it can be. Under the lock. None, or why not."""
        if self._migration is None:
            return "no migration is in progress"
        self._cancel_asked = True
        if self._past_stop:
            return TOO_LATE
        self._migration.cancel()
        return None

    def _migrate(self, conn: _Conn, req: dict[str, Any]) -> dict[str, Any]:
        try:
            to = str(req["to"])
            opts = options_from_dict(req.get("options", {}))
        except (KeyError, TypeError) as e:
            return {"ok": False, "error": f"malformed migrate request: {e}"}
        with self._lock:
            state = self._state()
            if state != "running" or self._stop:
                why = {
                    "paused": "the VM is paused; resume it first (vfmig vm resume)",
                    "migrating": "a migration of this VM is already in progress",
                }.get(state, f"the VM is {'stopping' if self._stop else state}")
                return {"ok": False, "error": why, "kind": "refused", "source": state}
            m = Migration(self.vm, to, opts, lambda event, data: self._progress(conn, event, data))
            self._migration, self._migration_to, self._phase = m, to, "starting"
            self._migration_thread = threading.current_thread()
            self._cancel_asked = self._past_stop = False
        wake_r, wake_w = os.pipe()
        watcher = threading.Thread(target=self._watch_client, args=(conn, wake_r), daemon=True)
        watcher.start()
        try:
            report = m.run().to_dict()
            error: BaseException | None = None
        except Exception as e:  # noqa: BLE001 - any failure is reported; the server lives on
            report, error = m.report.to_dict(), e
        except BaseException:
            with self._lock:
                self._migration = None
            raise
        finally:
            os.write(wake_w, b"x")
            watcher.join()
            os.close(wake_r)
            os.close(wake_w)
        with self._lock:
            self._migration = None
            if error is None:
                self._migrated = report
                self.last_migration = {"status": "completed", "to": to, "downtime_ms": report.get("downtime_ms")}
                return {"ok": True, "report": report}
            # Failed before the commit (the source runs again), cancelled, or in doubt after it.
            in_doubt = m.report.status == "in_doubt" or isinstance(error, CommitError)
            kind = "in_doubt" if in_doubt else str(report.get("status") or "failed")
            source = "stopped" if self._stop else self._state()  # the process ends with the VM
            msg = str(error).replace("--control PATH", f"--control {shlex.quote(self.path)}")
            self.last_migration = {"status": kind, "to": to, "error": msg, "source": source}
            return {"ok": False, "error": msg, "kind": kind, "source": source, "report": report}

    def _progress(self, conn: _Conn, event: str, data: dict[str, Any]) -> None:
        """Migration thread. "stopped" is the last point at which a cancel can still win: the
        cancel check and the no-going-back flag change together, under the lock."""
        with self._lock:
            self._phase = event
            if event == "stopped":
                if self._cancel_asked:
                    raise MigrationError("migration cancelled")
                self._past_stop = True
        conn.send({"event": event, **data})

    def _watch_client(self, conn: _Conn, wake: int) -> None:
        """Until the migration ends: a cancel line, or the client going away, cancels it."""
        while True:
            line = conn.readline(None, wake)
            if line is None:
                return  # the migration ended
            try:
                gone, req = not line, json.loads(line) if line else {}
            except ValueError:
                gone, req = False, {}
            if not gone and not (isinstance(req, dict) and req.get("cmd") == "cancel"):
                conn.send({"event": "cancel", "accepted": False, "reason": "only cancel is accepted here"})
                continue
            with self._lock:
                why = self._cancel_locked()
            if gone:
                return
            conn.send({"event": "cancel", "accepted": why is None, "reason": why or "cancelling"})


def serve(vm: MicroVM, path: str, seconds: float) -> dict[str, Any] | None:
    """Run until `seconds` pass (0: forever), the VM is stopped, or it is migrated away; returns
    the migration report in the last case."""
    return ControlServer(vm, path).serve(seconds)


# client ---------------------------------------------------------------------------------------
def _connect(path: str, timeout: float | None) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except OSError as e:
        s.close()
        raise VfmigError(f"no VM control socket at {path}: {e.strerror or e}") from None
    return s


def request(
    path: str, doc: dict[str, Any], timeout: float | None = 600, progress: Progress | None = None
) -> dict[str, Any]:
    """Send one request to a running `vm run --control` and return its answer; progress events
    streamed before it go to `progress`."""
    with _connect(path, timeout) as s:
        s.sendall(json.dumps(doc).encode() + b"\n")
        return _answer(s, path, progress)


def _answer(s: socket.socket, path: str, progress: Progress | None) -> dict[str, Any]:
    try:
        for line in s.makefile():
            msg = json.loads(line)
            if "event" not in msg:
                return dict(msg)
            if progress is not None:
                progress(msg.pop("event"), msg)
    except TimeoutError:
        raise VfmigError(f"the VM process at {path} did not answer in time") from None
    except ValueError:
        raise VfmigError(f"the VM process at {path} sent a malformed answer") from None
    raise MigrationError("the VM process closed its control socket without answering")


def request_migration(path: str, to: str, opts: MigrationOptions, progress: Progress | None = None) -> dict[str, Any]:
    """Ask the VM process to migrate and wait for the outcome. The first Ctrl-C (SIGINT) asks it
    to cancel (reported to `progress` as a "cancel" event, then the answer says how it ended);
    a second one raises KeyboardInterrupt, and closing the connection cancels too if it still can."""
    with _connect(path, None) as s:
        s.sendall(json.dumps({"cmd": "migrate", "to": to, "options": options_to_dict(opts)}).encode() + b"\n")
        interrupts = 0

        def on_sigint(signum: int, frame: object) -> None:
            nonlocal interrupts
            interrupts += 1
            if interrupts > 1:
                raise KeyboardInterrupt
            with contextlib.suppress(OSError):
                s.sendall(b'{"cmd": "cancel"}\n')

        main = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGINT, on_sigint) if main else None
        try:
            return _answer(s, path, progress)
        finally:
            if main:
                signal.signal(signal.SIGINT, old)
