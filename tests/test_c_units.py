"""C unit tests, in the normal build, an ASan/UBSan build and a TSan build of the C core (TSan
cannot be combined with ASan, so it has its own build directory, build-tsan/)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

C_TESTS = [
    ("vm", ["{guests}/dirtier.bin"]),
    ("crc32c", []),
    ("stream", []),
    ("threads", ["{guests}/dirtier.bin"]),
    ("migstate", []),
    ("pci", []),
    ("simvf", ["{guests}/vfdrv.bin"]),
    ("dma_log", []),
    ("delta", []),
    ("pace", []),
    ("dirty_ring", []),
]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}


# Build directory and meson options per variant; plain is the editable install's own build/.
VARIANTS = {
    "plain": ("build", {"sanitize": "false"}),
    "asan": ("build-asan", {"sanitize": "true"}),
    "tsan": ("build-tsan", {"tsan": "true"}),
}
SAN_ENV = {
    "ASAN_OPTIONS": "detect_leaks=1",
    "UBSAN_OPTIONS": "print_stacktrace=1",
    # Any race fails the run (exit 66), with both stacks of a lock-order inversion. The
    # suppressions cover only the sender's reads of live guest RAM (see the file).
    "TSAN_OPTIONS": f"halt_on_error=1 second_deadlock_stack=1 suppressions={REPO / 'csrc/tests/tsan.supp'}",
}


def _build(build_dir: Path, options: dict[str, str], extra: list[str]) -> None:
    meson = shutil.which("meson", path=str(BIN))
    ninja = shutil.which("ninja", path=str(BIN))
    if meson is None or ninja is None:
        pytest.skip("meson/ninja are not installed in the venv (run make bootstrap)")
    if not (build_dir / "build.ninja").exists():
        setup = [
            meson,
            "setup",
            str(build_dir),
            f"--native-file={REPO / '.venv/meson-native.ini'}",
            *(f"-D{k}={v}" for k, v in options.items()),
            "-Dbuildtype=debugoptimized",
        ]
        subprocess.run(setup, cwd=REPO, check=True, capture_output=True, text=True, env=ENV)
    # ninja (not `meson compile TARGET`): a changed meson.build regenerates before targets resolve.
    targets = [f"csrc/tests/test_{n}" for n, _ in C_TESTS] + [
        "guest/dirtier.bin",
        "guest/idle.bin",
        "guest/vfdrv.bin",
        *extra,
    ]
    r = subprocess.run([ninja, "-C", str(build_dir), *targets], cwd=REPO, capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.fixture(scope="module", params=list(VARIANTS))
def c_build(request: pytest.FixtureRequest) -> Path:
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm on this host")
    name, options = VARIANTS[request.param]
    d = REPO / name
    _build(d, options, ["csrc/tests/tsan_canary"] if request.param == "tsan" else [])
    return d


@pytest.mark.parametrize(("name", "args"), C_TESTS)
def test_c_unit(c_build: Path, name: str, args: list[str]) -> None:
    argv = [str(c_build / "csrc" / "tests" / f"test_{name}")]
    argv += [a.format(guests=c_build / "guest") for a in args]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300, env={**os.environ, **SAN_ENV})
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"test_{name}: ok" in r.stdout
    assert "WARNING: ThreadSanitizer" not in r.stderr, r.stderr


def test_tsan_reports_a_race() -> None:
    """The TSan build is live: its planted race is reported and fails the run."""
    name, options = VARIANTS["tsan"]
    _build(REPO / name, options, ["csrc/tests/tsan_canary"])
    argv = [str(REPO / name / "csrc" / "tests" / "tsan_canary")]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, env={**os.environ, **SAN_ENV})
    assert r.returncode != 0
    assert "WARNING: ThreadSanitizer: data race" in r.stderr, r.stderr
