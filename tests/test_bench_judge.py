"""bench/converge_bench.py's verdict: which QEMU configuration is the one to beat, each vfmig
configuration's speedup (or the bound QEMU's timeout gives), the goal, and the floor that says
when the goal is out of reach. Pure arithmetic over run records, checked on made-up ones."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    sys.path.insert(0, str(REPO / "bench"))
    try:
        return importlib.import_module("converge_bench")
    finally:
        sys.path.remove(str(REPO / "bench"))


def _run(ms: float, held: bool = True, **kw: Any) -> dict[str, Any]:
    return {"completed": True, "held": held, "total_time_ms": ms, **kw}


def test_the_fastest_qemu_that_held_is_the_reference_and_each_vfmig_config_is_judged(bench: ModuleType) -> None:
    runs = {
        "qemu": _run(500.0, held=False),  # faster, but broke the limit: not the reference
        "qemu-xbzrle": _run(3000.0),
        "qemu-auto-converge": _run(2000.0),
        "vfmig": _run(150.0, data_bytes=300 << 20),
        "vfmig-zstd": _run(400.0, held=False),
    }
    v = bench.judge(runs, "unlimited", 300.0, tcp_Bps=2e9)
    assert v["qemu_best"] == "qemu-auto-converge" and v["qemu_best_time_ms"] == 2000.0
    assert v["speedups"] == {"vfmig": 2000.0 / 150.0, "vfmig-zstd": 5.0} and v["speedup_bounds"] == {}
    assert v["goals"] == {"vfmig": True, "vfmig-zstd": False}  # 5x, and it broke the limit
    assert v["goal_met"] is True and v["speedup"] == pytest.approx(13.33, abs=0.01)
    # 300 MiB at 2 GB/s is 157 ms; a tenth of QEMU's 2 s is 200 ms: reachable.
    assert v["floor_ms"] == pytest.approx((300 << 20) / 2e9 * 1e3) and v["goal_reachable"] is True
    runs["qemu-auto-converge"] = _run(1000.0)
    v = bench.judge(runs, "unlimited", 300.0, tcp_Bps=2e9)
    assert v["goal_reachable"] is False and v["goal_met"] is False  # 100 ms is under the floor


def test_when_no_qemu_config_held_its_timeout_bounds_the_speedup(bench: ModuleType) -> None:
    runs = {
        "qemu-1g": _run(300_000.0, held=False),
        "qemu-1g-zstd": {"skipped": "no multifd zstd"},
        "vfmig-1g": _run(28_000.0),
        "vfmig-1g-zstd": _run(1_000.0),
    }
    v = bench.judge(runs, "1gbit", 300.0, tcp_Bps=None)
    assert v["qemu_best"] is None and v["speedups"] == {}
    assert v["speedup_bounds"] == {"vfmig-1g": 300_000.0 / 28_000.0, "vfmig-1g-zstd": 300.0}
    assert v["speedup_lower_bound"] == pytest.approx(10.71, abs=0.01) and v["goal_met"] is True
    assert v["goals"] == {"vfmig-1g": True, "vfmig-1g-zstd": True} and "floor_ms" not in v
    runs["vfmig-1g"] = _run(31_000.0)  # under 10x the timeout's bound
    v = bench.judge(runs, "1gbit", 300.0, tcp_Bps=None)
    assert v["goal_met"] is False and v["goals"]["vfmig-1g"] is False


def test_without_qemu_runs_there_is_no_verdict(bench: ModuleType) -> None:
    v = bench.judge({"qemu": {"skipped": "no qemu"}, "vfmig": _run(10.0)}, "unlimited", 300.0, tcp_Bps=1e9)
    assert v["goal_met"] is None and v["goals"] == {} and v["note"] == "not measured: no QEMU runs"
