"""scripts/check-space.sh: `make` stops before creating a virtualenv that would not fit, and says why."""

from __future__ import annotations

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts" / "check-space.sh"


def test_too_little_space_stops_with_the_figures_and_enough_passes(tmp_path):
    short = subprocess.run([SCRIPT, "1000000000"], cwd=tmp_path, capture_output=True, text=True)
    assert short.returncode == 1
    assert "needs about 1000000000 GiB" in short.stderr and f"free in {tmp_path}" in short.stderr
    assert subprocess.run([SCRIPT, "0"], cwd=tmp_path).returncode == 0
