"""Fixtures that probe the host and skip with the reason when it lacks something.

VFMIG_STRICT=1 (what CI sets) turns every such skip into a failure that names what is missing:
a CI host is supposed to have everything, so a skip there would hide an untested feature.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import NoReturn

import pytest

REPO = Path(__file__).resolve().parent.parent
KVM_PATH = "/dev/kvm"


def strict() -> bool:
    return os.environ.get("VFMIG_STRICT", "") not in ("", "0")


def host_skip(reason: str) -> NoReturn:
    """Skip because the host lacks something; under VFMIG_STRICT=1, fail instead."""
    if strict():
        pytest.fail(f"VFMIG_STRICT=1 and this host lacks it: {reason}", pytrace=False)
    pytest.skip(reason)


def _kvm_reason() -> str | None:
    if not os.path.exists(KVM_PATH):
        return f"no {KVM_PATH} on this host"
    try:
        fd = os.open(KVM_PATH, os.O_RDWR)
    except OSError as e:
        return f"{KVM_PATH} not usable: {e.strerror}"
    os.close(fd)
    return None


def _root_reason() -> str | None:
    return None if os.geteuid() == 0 else "needs root"


@pytest.fixture
def kvm() -> None:
    reason = _kvm_reason()
    if reason:
        host_skip(reason)


@pytest.fixture
def root() -> None:
    reason = _root_reason()
    if reason:
        host_skip(reason)


def proc_stat(pid: int | str) -> tuple[str, str, int] | None:
    """(command name, state letter, parent pid) from /proc/PID/stat; None once it is gone."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return None
    rest = stat[stat.rindex(")") + 2 :].split()
    return stat[stat.index("(") + 1 : stat.rindex(")")], rest[0], int(rest[1])


def _live_children() -> dict[int, str]:
    """This process's child processes that are not zombies: pid -> command name."""
    me, out = os.getpid(), {}
    for d in Path("/proc").iterdir():
        st = proc_stat(d.name) if d.name.isdigit() else None
        if st is not None and st[2] == me and st[1] != "Z":
            out[int(d.name)] = st[0]
    return out


def _vcpu_threads() -> dict[int, str]:
    """Threads of this process that run a VM's vCPU (vfmig names them vcpuN)."""
    out = {}
    for t in Path("/proc/self/task").iterdir():
        try:
            comm = (t / "comm").read_text().strip()
        except OSError:
            continue
        if comm.startswith("vcpu"):
            out[int(t.name)] = comm
    return out


def _exits_soon(pid: int, grace_s: float = 5.0) -> bool:
    """Whether the process ends within grace_s: a test that kill()ed a child without waiting
    for it has not leaked it. Waits on the process's pidfd, which does not reap it."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], grace_s)[0])
    finally:
        os.close(fd)


@pytest.fixture(autouse=True)
def _leaves_nothing_running() -> Iterator[None]:
    """A test must stop what it started: a VM left running (its vCPUs dirtying memory on one of
    this host's two cores) or a child process left behind would slow every later test and skew
    the downtime the later ones measure. Fails the test that leaked, names what, and kills it."""
    children, vcpus = _live_children(), _vcpu_threads()
    yield
    leaked = {p: c for p, c in _live_children().items() if p not in children and not _exits_soon(p)}
    for pid in leaked:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    threads = {t: c for t, c in _vcpu_threads().items() if t not in vcpus}
    assert not leaked and not threads, f"left running: processes {leaked}, vCPU threads {threads}"


def pytest_configure(config: pytest.Config) -> None:
    """Tests press Ctrl-C on vfmig processes (SIGINT). A shell starts a background job with
    SIGINT ignored, and the children of pytest would inherit that and shrug it off (seen: `vm run`
    went on migrating). A handler here is reset to the default in each child at exec."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    """The net under host_skip: with VFMIG_STRICT=1 any other skip (a skipif mark, a bare
    pytest.skip in a file that does not use host_skip) fails too, with its reason."""
    outcome = yield
    rep = outcome.get_result()
    if strict() and rep.skipped and not hasattr(rep, "wasxfail"):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = f"VFMIG_STRICT=1 turns this skip into a failure: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, None, None]:
    """The same for a whole module skipped at import (pytest.importorskip, allow_module_level)."""
    outcome = yield
    rep = outcome.get_result()
    if strict() and rep.skipped:
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = f"VFMIG_STRICT=1 turns this skip into a failure: {reason}"


def run_cli(*args: str, timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run `python -m vfmig ARGS` as a user would, capturing output."""
    return subprocess.run([sys.executable, "-m", "vfmig", *args], capture_output=True, text=True, timeout=timeout, **kw)
