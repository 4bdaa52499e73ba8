"""libFuzzer over every C entry point that takes bytes from the network (csrc/fuzz/).

Each harness runs for VFMIG_FUZZ_SECONDS seconds (default 60 when CI is set, else 10), from its
committed seed corpus, and fails on any crash, naming the reproducer. The harnesses run side by
side, one per core (libFuzzer is single-threaded): each still gets its whole time, and the suite
waits ceil(7 / cores) times it, not 7 times. A crash found here becomes
an input in csrc/fuzz/corpus/<harness>/ and a fix in the C code. With VFMIG_FUZZ_RESULTS=PATH
the execs, seconds and crashes per harness (and the totals fuzz_execs, fuzz_crashes) go to PATH
as JSON (bench/results/fuzz.json by convention).
"""

from __future__ import annotations

import filecmp
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, host_skip

BUILD = REPO / "build-fuzz"
CORPUS = REPO / "csrc" / "fuzz" / "corpus"
# -max_len per harness: room for the largest valid input plus a little past each bound.
HARNESSES = {
    "pages": 20000,  # three RAW pages with their headers, ITERs and EOS
    "record": 4096,  # a header and a payload: the limits are numbers, not sizes to fill
    "hello": 56 + 16384 + 1,  # the largest config, and one byte more
    "channel": 64,
    "vcpu_state": 16384,  # all nine fixed sections and up to 512 MSRs
    "device_state": 2048,  # the 1616-byte platform blob
    "simvf_state": 72 << 10,  # a whole 64 KiB-state stream: the table, PCI, REGS and END
}
CRASH_PREFIXES = ("crash-", "leak-", "timeout-", "oom-")


def fuzz_seconds() -> int:
    default = 60 if os.environ.get("CI") else 10
    return int(os.environ.get("VFMIG_FUZZ_SECONDS", default))


@dataclass
class FuzzRun:
    execs: int
    seconds: float
    crashes: list[Path]
    log: str


def run_harness(binary: Path, seeds: Path, seconds: int, max_len: int, work: Path) -> FuzzRun:
    """Fuzz from seeds (read only: new inputs go to work/corpus) and collect what it found."""
    corpus, artifacts = work / "corpus", work / "artifacts"
    corpus.mkdir(parents=True)
    artifacts.mkdir()
    argv = [
        str(binary),
        f"-max_total_time={seconds}",
        f"-max_len={max_len}",
        "-timeout=25",
        "-rss_limit_mb=2048",
        "-print_final_stats=1",
        f"-artifact_prefix={artifacts}/",
        str(corpus),
        str(seeds),
    ]
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1", "UBSAN_OPTIONS": "print_stacktrace=1"}
    r = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 300, env=env)
    log = r.stdout + r.stderr
    m = re.search(r"stat::number_of_executed_units:\s*(\d+)", log)
    runs = re.findall(r"^#(\d+)\s", log, re.M)  # progress lines: the last is where it stopped
    execs = int(m.group(1)) if m else int(runs[-1]) if runs else 0
    crashes = sorted(p for p in artifacts.iterdir() if p.name.startswith(CRASH_PREFIXES))
    if r.returncode != 0 and not crashes:  # died without an artifact: still a failure
        crashes = [artifacts / f"(exit {r.returncode}, no reproducer written)"]
    return FuzzRun(execs, float(seconds), crashes, log)


def failure(name: str, run: FuzzRun) -> str:
    paths = "\n".join(f"  reproducer: {p}" for p in run.crashes)
    return f"fuzz_{name} crashed {len(run.crashes)} time(s):\n{paths}\n{run.log[-4000:]}"


@pytest.fixture(scope="module")
def fuzz_build() -> Path:
    if shutil.which("clang") is None:
        host_skip("clang is not installed (scripts/bootstrap.sh installs clang and libclang-rt-14-dev)")
    r = subprocess.run([str(REPO / "csrc/fuzz/build.sh"), str(BUILD)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return BUILD


@pytest.fixture(scope="module")
def results() -> Iterator[dict[str, dict[str, float]]]:
    out: dict[str, dict[str, float]] = {}
    yield out
    path = os.environ.get("VFMIG_FUZZ_RESULTS")
    if path and out:
        doc = {
            "harnesses": out,
            "fuzz_execs": sum(int(h["execs"]) for h in out.values()),
            "fuzz_crashes": sum(int(h["crashes"]) for h in out.values()),
            "seconds_per_harness": fuzz_seconds(),
        }
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(doc, indent=2) + "\n")


@pytest.fixture(scope="module")
def fuzz_runs(
    fuzz_build: Path, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, FuzzRun]:
    """Every harness this session selected, run side by side, one per core."""
    chosen = [
        item.callspec.params["name"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_fuzz" and hasattr(item, "callspec")
    ]
    work = tmp_path_factory.mktemp("fuzz")

    def one(name: str) -> tuple[str, FuzzRun]:
        seconds = fuzz_seconds()
        return name, run_harness(fuzz_build / f"fuzz_{name}", CORPUS / name, seconds, HARNESSES[name], work / name)

    with ThreadPoolExecutor(max_workers=max(1, len(os.sched_getaffinity(0)))) as pool:
        return dict(pool.map(one, chosen))


@pytest.mark.parametrize("name", HARNESSES)
def test_fuzz(fuzz_runs: dict[str, FuzzRun], results: dict[str, dict[str, float]], name: str) -> None:
    run = fuzz_runs[name]
    results[name] = {"execs": run.execs, "seconds": run.seconds, "crashes": len(run.crashes)}
    assert not run.crashes, failure(name, run)
    assert run.execs > 0, run.log[-3000:]


def test_seed_corpus_is_current(fuzz_build: Path, tmp_path: Path) -> None:
    """The committed seeds are what csrc/fuzz/seeds.c writes today (regenerate with
    `csrc/fuzz/build.sh --seeds`); crash regressions sit beside them under other names."""
    subprocess.run([str(fuzz_build / "seeds"), str(tmp_path)], check=True)
    for name in HARNESSES:
        fresh = sorted(p.name for p in (tmp_path / name).iterdir())
        assert fresh, name
        _, mismatch, missing = filecmp.cmpfiles(CORPUS / name, tmp_path / name, fresh, shallow=False)
        assert not mismatch and not missing, f"{name}: stale seeds {mismatch + missing}; run csrc/fuzz/build.sh --seeds"


def test_a_crash_fails_and_names_its_reproducer(fuzz_build: Path, tmp_path: Path) -> None:
    """The runner itself: a harness with a planted bug is caught, with the input that crashed it."""
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    (seeds / "bug").write_bytes(b"BUG!")
    run = run_harness(fuzz_build / "fuzz_canary", seeds, 5, 64, tmp_path / "run")
    assert len(run.crashes) == 1 and run.crashes[0].name.startswith("crash-")
    assert run.crashes[0].read_bytes() == b"BUG!"
    assert f"reproducer: {run.crashes[0]}" in failure("canary", run)
    assert "heap-buffer-overflow" in run.log
