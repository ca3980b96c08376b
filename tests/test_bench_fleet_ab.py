"""bench.fleet_ab's arithmetic: medians and spreads per tree, and head / base called a tie within the spread."""

from __future__ import annotations

import pytest

from bench.fleet_ab import summarise, verdicts


def fleet_row(cpu_ms: float, updates_per_s: float, rss: float) -> dict:
    return {
        "cpu_ms_per_update": {"aggregator": cpu_ms, "broker": 0.3, "fleet": 0.7},
        "updates_per_s": updates_per_s,
        "peak_rss_mib": rss,
        "lost": 0,
        "load_average": [0.5, 0.6],
    }


def test_summaries_hold_each_run_and_their_median_and_spread():
    summary = summarise(
        1, "abc123", [fleet_row(2.0, 400, 50), fleet_row(3.0, 300, 52), fleet_row(2.5, 500, 51)]
    )
    assert summary["aggregator_cpu_ms_per_update"] == [2.0, 3.0, 2.5]
    assert summary["median_aggregator_cpu_ms_per_update"] == 2.5
    assert summary["spread_aggregator_cpu_ms_per_update"] == pytest.approx((3.0 - 2.0) / 2.5)
    assert summary["median_updates_per_s"] == 400
    assert summary["tree"] == "abc123" and summary["update_kb"] == 1 and summary["lost"] == 0


def test_head_over_base_is_a_ratio_beyond_the_spread_and_a_tie_within_it():
    base = summarise(1, "base", [fleet_row(2.0, 400, 50), fleet_row(2.1, 410, 50), fleet_row(2.2, 420, 50)])
    head = summarise(1, "head", [fleet_row(1.0, 800, 50), fleet_row(1.05, 820, 51), fleet_row(1.1, 700, 50)])
    verdict = verdicts(base, head)
    assert verdict["aggregator_cpu_ms_per_update"] == "0.50x"
    assert verdict["updates_per_s"] == "1.95x"
    assert verdict["peak_rss_mib"] == "tie (1.00x)"
