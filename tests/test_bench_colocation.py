"""bench/colocation's repetitions: spread, and a difference within the spread reported as a tie."""

from __future__ import annotations

import pytest

from bench import colocation
from bench.common import CsvLog, compare, spread


def test_spread_is_the_relative_range_of_the_repetitions():
    assert spread([100.0, 104.0, 98.0]) == pytest.approx(0.06)
    assert spread([5.0, 5.0, 5.0]) == 0.0


def test_a_difference_within_either_spread_is_a_tie():
    assert compare(103.0, 0.02, 100.0, 0.05) == "tie (1.03x)"
    assert compare(103.0, 0.02, 100.0, 0.01) == "1.03x"
    assert compare(90.0, 0.0, 100.0, 0.0) == "0.90x"


def row(policy: str, p: float, p_spread: float, rv: str = "") -> dict:
    return {
        "scenario": "light",
        "policy": policy,
        "rv": rv,
        "P": p,
        "P_norm": 1,
        "P_f": 1,
        "P_f_norm": 1,
        "device": "GPU",
        "P_spread": p_spread,
        "repeats": 3,
    }


def test_the_report_says_tie_when_fedmt_is_within_the_noise_of_the_best_static_split(tmp_path, capsys):
    log = CsvLog(tmp_path / "c.csv", colocation.COLUMNS)
    for r in (
        row("temporal", 1000, 0.01),
        row("isolated", 1900, 0.04),
        row("sharing", 2000, 0.03),
        row("fedmt", 2050, 0.02),
        row("fedmt-predictor", 2400, 0.02),
    ):
        log.add(r)
    assert colocation.main(["report", "--out", str(tmp_path), "--name", "c"]) == 0
    table = (tmp_path / "c.md").read_text()
    assert "| light | GPU | fedmt | 2.05x | tie (1.02x) |" in table
    assert "| light | GPU | fedmt-predictor | 2.40x | 1.20x |" in table
    assert (tmp_path / "c.png").stat().st_size > 0
