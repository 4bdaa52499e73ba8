"""C unit tests, in the normal build and in an ASan/UBSan build of the C core."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

C_TESTS = [("vm", ["{guests}/dirtier.bin"]), ("crc32c", []), ("stream", [])]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}


def _build(build_dir: Path, sanitize: bool) -> None:
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
            f"-Dsanitize={'true' if sanitize else 'false'}",
            "-Dbuildtype=debugoptimized",
        ]
        subprocess.run(setup, cwd=REPO, check=True, capture_output=True, text=True, env=ENV)
    # ninja (not `meson compile TARGET`): a changed meson.build regenerates before targets resolve.
    targets = [f"csrc/tests/test_{n}" for n, _ in C_TESTS] + ["guest/dirtier.bin", "guest/idle.bin"]
    r = subprocess.run([ninja, "-C", str(build_dir), *targets], cwd=REPO, capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.fixture(scope="module", params=["plain", "asan"])
def c_build(request: pytest.FixtureRequest) -> Path:
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm on this host")
    # plain: build/, the editable install's own build directory
    d = REPO / ("build-asan" if request.param == "asan" else "build")
    _build(d, sanitize=request.param == "asan")
    return d


@pytest.mark.parametrize(("name", "args"), C_TESTS)
def test_c_unit(c_build: Path, name: str, args: list[str]) -> None:
    argv = [str(c_build / "csrc" / "tests" / f"test_{name}")]
    argv += [a.format(guests=c_build / "guest") for a in args]
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1", "UBSAN_OPTIONS": "print_stacktrace=1"}
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"test_{name}: ok" in r.stdout
