"""`make demo`'s processes serve metrics: scraped after each round, every endpoint shows the round advancing."""

from __future__ import annotations

import pytest

from testbed.demo import TASKS, Options, run

pytestmark = [pytest.mark.slow, pytest.mark.broker]


def test_every_demo_process_counts_the_rounds_on_its_endpoint(tmp_path):
    summary = run(Options(out=tmp_path / "demo", rounds=2, local_steps=dict.fromkeys(TASKS, 2)))
    names = ["aggregator", "edge-1", "edge-2", "edge-3"]
    assert list(summary["metrics_urls"]) == names
    assert all(url.startswith("http://127.0.0.1:") for url in summary["metrics_urls"].values())
    scraped = summary["metrics_after_round"]
    assert [s["round"] for s in scraped] == [1, 2]
    for s in scraped:  # with 2 steps a round, a process may finish the next round before the scrape comes
        assert all(s["round"] <= count <= 2 for count in s["rounds_done"].values()), s
    assert scraped[-1]["rounds_done"] == dict.fromkeys(names, 2.0)
