"""Python's garbage collector is held off while the guest waits (vfmig/migration/collector.py):
a pass over a large heap takes tens of milliseconds, in whichever thread allocates."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest

from tests.helpers import wait_running
from vfmig.migration import destination, migrate, source
from vfmig.migration.collector import collector_paused
from vfmig.testing import serve_destination
from vfmig.vm import MicroVM


@pytest.fixture
def collector_on() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


def test_the_collector_is_off_inside_and_back_on_after(collector_on: None) -> None:
    with collector_paused():
        assert not gc.isenabled()
        with collector_paused():  # nested: the inner exit must not turn it back on
            pass
        assert not gc.isenabled()
    assert gc.isenabled()


def test_two_threads_holding_it_turn_it_back_on_only_when_both_leave(collector_on: None) -> None:
    entered, leave = threading.Event(), threading.Event()

    def other() -> None:
        with collector_paused():
            entered.set()
            leave.wait(10)

    t = threading.Thread(target=other)
    t.start()
    assert entered.wait(10)
    with collector_paused():
        pass
    assert not gc.isenabled(), "this thread left while the other still holds it"
    leave.set()
    t.join(10)
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off() -> None:
    was = gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        if was:
            gc.enable()


@pytest.mark.usefixtures("kvm")
def test_a_migration_holds_it_off_over_the_stop_on_both_sides(
    collector_on: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, bool] = {}
    real_stop, real_start = source.Migration._stop_and_copy, destination.Listener._start

    def stop(self: source.Migration) -> None:
        seen["source stop"] = gc.isenabled()
        real_stop(self)

    def start(self: destination.Listener, *a: object) -> destination.Incoming:
        seen["destination start"] = gc.isenabled()
        return real_start(self, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(source.Migration, "_stop_and_copy", stop)
    monkeypatch.setattr(destination.Listener, "_start", start)
    with MicroVM(memory="64M", wss_bytes=8 << 20) as vm:
        vm.start()
        wait_running(vm)
        with serve_destination() as dst:
            report = migrate(vm, dst.address)
    assert report.status == "completed"
    assert seen == {"source stop": False, "destination start": False}, seen
    assert gc.isenabled(), "the migration left the collector off"
