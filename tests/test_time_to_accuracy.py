"""bench/time_to_accuracy: the time-to-target arithmetic, and the whole benchmark end to end on the CPU (smoke)."""

from __future__ import annotations

import json

import pytest

from bench.time_to_accuracy import main, seconds_to_target


def test_the_target_counts_when_every_task_reached_it():
    accuracy = {"a": [0.1, 0.96, 0.97, 0.98], "b": [0.1, 0.90, 0.95, 0.99]}
    assert seconds_to_target(accuracy, [10.0, 21.0, 30.5], 0.95) == 21.0
    assert seconds_to_target(accuracy, [10.0, 21.0, 30.5], 0.99) is None
    assert seconds_to_target(accuracy, [10.0, None, 30.5], 0.95) == 30.5  # a round without its time


@pytest.mark.slow
def test_the_benchmark_runs_every_policy_through_the_federation_and_writes_its_results(tmp_path):
    """One agent on the CPU, rounds of four steps per task, two policies: the keys the issue names; each run
    ends after the first round with every task at the target; --reuse takes the runs from their summaries."""
    argv = [
        "--device",
        "cpu",
        "--rounds",
        "3",
        "--policies",
        "temporal",
        "fedmt",
        "--models",
        "shufflenet_v2_x0_5",
    ]
    argv += ["--resolution", "16", "--local-steps", "4", "--target", "0.01", "--out", str(tmp_path)]
    assert main(argv) == 0
    result = json.loads((tmp_path / "time_to_accuracy.json").read_text())
    assert result["target"] == 0.01 and result["partition"] == "iid" and list(result["partitions"]) == ["iid"]
    assert "one agent holds what three devices would" in result["note"]
    for policy in ("temporal", "fedmt"):
        accuracy = result["accuracy"][policy]
        assert set(accuracy) == {"digits-resnet18", "digits-densenet121", "digits-shufflenet"}
        assert all(len(accs) == 2 for accs in accuracy.values())  # round 0 and round 1
        assert len(result["round_wall_s"][policy]) == 1 and result["round_wall_s"][policy][0] > 0
        assert result["seconds_to_target"][policy] >= result["round_wall_s"][policy][0]
    assert (tmp_path / "time_to_accuracy.png").stat().st_size > 0
    assert (tmp_path / "time_to_accuracy" / "iid-fedmt" / "logs" / "edge-1.log").exists()

    (tmp_path / "time_to_accuracy" / "iid-fedmt" / "logs" / "edge-1.log").unlink()
    assert main([*argv, "--reuse"]) == 0
    assert json.loads((tmp_path / "time_to_accuracy.json").read_text())["accuracy"] == result["accuracy"]
    assert not (tmp_path / "time_to_accuracy" / "iid-fedmt" / "logs" / "edge-1.log").exists()  # not run again
