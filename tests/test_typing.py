"""The annotations are true: mypy (configured in pyproject.toml's [tool.mypy]) passes on mi_krr
and probes, which ship `py.typed` and so tell users' type checkers to trust them."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_mypy_passes_on_both_packages():
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"mypy failed (exit {result.returncode}):\n{result.stdout}{result.stderr}"
