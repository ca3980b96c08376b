"""bench/batch_rules end to end on the CPU (smoke): every rule's rounds through the task runtime, and the JSON."""

from __future__ import annotations

import json

import pytest

from bench.batch_rules import RUNS, main


@pytest.mark.slow
def test_the_benchmark_trains_every_rule_and_compares_later_rounds_with_the_configured_batch(tmp_path):
    out = tmp_path / "rules.json"
    argv = [
        "--tasks",
        "digits-resnet18",
        "--rounds",
        "2",
        "--seeds",
        "1",
        "--resolution",
        "16",
        "--threads",
        "1",
        "--steps",
        "16",  # 16 at B0, 4 at 4x, 2 at 8x: a smoke run
    ]
    assert main([*argv, "--out", str(out)]) == 0
    rows = {row["run"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == set(RUNS)
    assert rows["B0"]["later_rounds_vs_b0_pts"] == 0
    assert json.loads(out.read_text())["settings"]["steps_at_b0"] == {"digits-resnet18": 16}
    for row in rows.values():
        assert len(row["accuracy_per_round"]) == 2 and all(0 <= a <= 1 for a in row["accuracy_per_round"])
    # the ramp trains round 1 (version 0) at the configured batch, so it starts where B0 does
    assert rows["ramp, auto"]["per_seed"][0][0] == rows["B0"]["per_seed"][0][0]


def test_fewer_than_two_rounds_is_refused():
    with pytest.raises(SystemExit):
        main(["--rounds", "1"])
