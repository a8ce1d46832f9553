"""The code reads at 88 columns, in ruff's format, with every name resolved
(pyproject's [tool.ruff]; ../shared/STYLE.md: ruff was configured but not run)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["mlx_flash", "benchmarks", "tests", "tools"]


def ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args, *PATHS],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )


def test_lines_fit_88_columns_and_every_name_resolves():
    r = ruff("check", "--select", "F,E9,E501", "--no-cache")
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_code_is_in_ruff_format():
    r = ruff("format", "--check", "--no-cache")
    assert r.returncode == 0, r.stdout + r.stderr
