"""The fault matrix, a fixed sample (vfmig.faultmatrix.sample): each case migrates a small idle VM
with a simvf through a fault proxy that fires at one record (the device's precopy and stop-copy
DEVICE_DATA chunks among them), and must survive by the two-phase commit's rules
(vfmig.faultmatrix explains them). bench/reliability_bench.py runs the whole matrix."""

from __future__ import annotations

import pytest

from vfmig import faultmatrix
from vfmig.faultmatrix import BEFORE_GO, POSITIONS, PROXY_ACTIONS, SIGNALS, Case, Position, run_case, sample
from vfmig.testing import UP

SAMPLE = sample()


@pytest.mark.usefixtures("kvm", "root")
@pytest.mark.parametrize("case", SAMPLE, ids=[c.id for c in SAMPLE])
def test_fault(case: Case) -> None:
    v = run_case(case)
    assert v.phase == case.pos.phase, f"the fault hit {v.hit or 'nothing'}, not {case.position}: {v.problems}"
    assert v.survived, f"{case.id}: {v.problems} (outcome {v.outcome}, error {v.error!r}, {v.details})"
    if v.outcome == "failed":  # the source gave up and runs on: only before the commit, or at a GO
        assert v.phase in (*BEFORE_GO, "go")  # the destination answered with an ERROR (never started)


def test_sample_covers_the_matrix() -> None:
    """Every action, every position, both trackers and both channel counts are in the sample."""
    assert {c.action for c in SAMPLE} == set(PROXY_ACTIONS + SIGNALS)
    assert {c.position for c in SAMPLE} == {p.name for p in POSITIONS}
    assert {(c.tracker, c.channels) for c in SAMPLE} == {("bitmap", 1), ("bitmap", 4), ("ring", 1), ("ring", 4)}


def test_a_fault_that_does_no_harm_is_not_counted_as_survived_by_accident() -> None:
    """The verdict can fail: a case whose fault never fires (a record the stream never carries
    at that position) is reported as not survived."""
    bogus = Position("NEVER", "PAGE_HASHES", "control", "up", "commit")  # the source never sends it
    faultmatrix.BY_NAME["NEVER"] = bogus
    try:
        v = run_case(Case("flip", "NEVER"))
    finally:
        del faultmatrix.BY_NAME["NEVER"]
    assert not v.survived and any("never fired" in p for p in v.problems), v


@pytest.mark.usefixtures("kvm", "root")
def test_a_fault_on_the_wrong_device_chunk_is_not_counted_as_survived() -> None:
    """A DEVICE_DATA position is judged by the chunk it hit, not only by the record type: one
    that lands on the stop-copy chunk (the 2nd DEVICE_DATA) while it means a precopy one is
    reported as not survived."""
    wrong = Position("WRONG_CHUNK", "DEVICE_DATA", "control", UP, "precopy", nth=2, data_phase="precopy")
    faultmatrix.BY_NAME["WRONG_CHUNK"] = wrong
    try:
        v = run_case(Case("flip", "WRONG_CHUNK"))
    finally:
        del faultmatrix.BY_NAME["WRONG_CHUNK"]
    assert v.hit.get("device_phase") == "stop-copy" and v.hit.get("last") is True, v.hit
    assert not v.survived and any("not a precopy DEVICE_DATA chunk" in p for p in v.problems), v
