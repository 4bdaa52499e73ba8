"""The code stays ruff-clean and its type hints (and the extension's .pyi) check with mypy."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    ("tool", "args"),
    [
        ("ruff", ["check", "vfmig", "tests", "bench"]),
        ("mypy", ["vfmig", "--ignore-missing-imports"]),
    ],
)
def test_static_checks(tool: str, args: list[str]) -> None:
    exe = shutil.which(tool, path=str(BIN))
    if exe is None:
        pytest.skip(f"{tool} is not installed in the venv (run make bootstrap)")
    r = subprocess.run([exe, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
