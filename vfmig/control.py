"""The control socket of `vfmig vm run --control PATH`: JSON lines over a UNIX socket, so that
`vfmig migrate` (or an orchestrator) can live-migrate a VM that another process runs."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from vfmig.errors import MigrationError, VfmigError
from vfmig.migration import MigrationOptions, migrate
from vfmig.policy import Policy
from vfmig.vm import MicroVM

DEFAULT_PATH = f"/tmp/vfmig-{os.getuid()}.sock"


def options_to_dict(opts: MigrationOptions) -> dict[str, Any]:
    return asdict(opts)


def options_from_dict(d: dict[str, Any]) -> MigrationOptions:
    d = dict(d)
    policy = Policy(**d.pop("policy", {}))
    return MigrationOptions(policy=policy, **d)


def _reply(conn: socket.socket, doc: dict[str, Any]) -> None:
    conn.sendall(json.dumps(doc).encode() + b"\n")


def serve(vm: MicroVM, path: str, seconds: float) -> dict[str, Any] | None:
    """Run until `seconds` pass (0: forever) or the VM is migrated away; returns the report."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(4)
    srv.settimeout(0.2)
    deadline = time.monotonic() + seconds if seconds > 0 else None
    try:
        while deadline is None or time.monotonic() < deadline:
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with conn:
                report = _handle(vm, conn)
            if report is not None:
                return report
        return None
    finally:
        srv.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _handle(vm: MicroVM, conn: socket.socket) -> dict[str, Any] | None:
    conn.settimeout(10)
    try:
        req = json.loads(conn.makefile().readline() or "{}")
    except (ValueError, OSError):
        _reply(conn, {"ok": False, "error": "malformed request"})
        return None
    cmd = req.get("cmd")
    if cmd == "stats":
        _reply(conn, {"ok": True, "stats": {k: v for k, v in vm.stats().items() if k != "console"}})
        return None
    if cmd != "migrate":
        _reply(conn, {"ok": False, "error": f"unknown command {cmd!r}"})
        return None

    def progress(event: str, data: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):  # a client that left does not stop the migration
            _reply(conn, {"event": event, **data})

    try:
        report = migrate(vm, req["to"], options_from_dict(req.get("options", {})), progress).to_dict()
    except (VfmigError, KeyError, TypeError) as e:
        _reply(conn, {"ok": False, "error": str(e)})
        return None
    _reply(conn, {"ok": True, "report": report})
    return report


def request(
    path: str, doc: dict[str, Any], timeout: float = 600, progress: Callable[[str, dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Send one request to a running `vm run --control` and return its answer; progress events
    streamed before it go to `progress`."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except OSError as e:
        raise VfmigError(f"no VM control socket at {path}: {e.strerror or e}") from None
    with s:
        s.sendall(json.dumps(doc).encode() + b"\n")
        for line in s.makefile():
            msg = json.loads(line)
            if "event" not in msg:
                return msg
            if progress is not None:
                progress(msg.pop("event"), msg)
    raise MigrationError("the VM process closed its control socket without answering")
