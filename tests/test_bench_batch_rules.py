"""bench/batch_rules end to end on the CPU (smoke): every rule's rounds through the task runtime, and the JSON."""

from __future__ import annotations

import json

import pytest

from bench.batch_rules import RUNS, Run, accuracies, main


@pytest.mark.slow
def test_the_benchmark_trains_every_rule_and_compares_later_rounds_with_the_configured_batch(tmp_path):
    out = tmp_path / "rules.json"
    # 16 steps at B0, 4 at 4x, 2 at 8x: a smoke run
    argv = "--tasks digits-resnet18 --rounds 2 --seeds 0 --resolution 16 --threads 1 --steps 16".split()
    assert main([*argv, "--out", str(out)]) == 0
    rows = {row["run"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == set(RUNS)
    assert rows["16:none"]["later_rounds_vs_b0_pts"] == 0
    assert rows["16:none"]["vs_b0_pts_per_round"] == [0, 0]
    assert json.loads(out.read_text())["settings"]["steps_at_b0"] == {"digits-resnet18": 16}
    for row in rows.values():
        assert len(row["accuracy_per_round"]) == 2 and all(0 <= a <= 1 for a in row["accuracy_per_round"])
    # the ramp trains round 1 (version 0) at the configured batch, so it starts where B0 does
    assert rows["ramp128:auto"]["per_seed"][0][0] == rows["16:none"]["per_seed"][0][0]


@pytest.mark.slow
def test_one_round_of_named_runs_compares_each_with_the_configured_batch(tmp_path):
    out = tmp_path / "rules.json"
    argv = "--tasks digits-shufflenet --rounds 1 --seeds 0 1 --resolution 16 --steps 4".split()
    assert main([*argv, "--runs", "16:none", "24:sqrt", "--threads", "1", "--out", str(out)]) == 0
    rows = {row["run"]: row for row in json.loads(out.read_text())["rows"]}
    grown = rows["24:sqrt"]
    gaps = [100 * (a[0] - b[0]) for a, b in zip(grown["per_seed"], rows["16:none"]["per_seed"])]
    assert grown["vs_b0_pts_per_round"] == [pytest.approx(sum(gaps) / 2)]
    assert grown["vs_b0_pts_stderr_per_round"] == [pytest.approx(abs(gaps[0] - gaps[1]) / 2)]
    assert grown["later_rounds_vs_b0_pts"] is None  # no round 2


def test_a_run_is_a_batch_and_a_rule_optionally_ramped():
    assert Run.parse("26:sqrt") == Run(26, "sqrt")
    assert Run.parse("ramp128:auto") == Run(128, "auto", ramp=True)
    assert [str(Run.parse(label)) for label in RUNS] == list(RUNS)  # the label back, for the results
    for label in ("26", "x:sqrt", "0:none", "26:cubic", "ramp:auto"):
        with pytest.raises(ValueError, match="BATCH:RULE"):
            Run.parse(label)


@pytest.mark.parametrize(
    "argv", [["--rounds", "0"], ["--runs", "26:sqrt"], ["--runs", "16:none", "26:cubic"]]
)
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit):
        main(argv)


@pytest.mark.parametrize("agent_seeds, expected", [(False, [5000, 5001]), (True, [1, 2])])
def test_rounds_train_with_the_agents_seeds_when_asked(monkeypatch, agent_seeds, expected):
    from agent.training import TaskRuntime

    seeds, train = [], TaskRuntime.train

    def recording(self, assignment, base, *, seed, **options):
        seeds.append(seed)
        return train(self, assignment, base, seed=seed, **options)

    monkeypatch.setattr(TaskRuntime, "train", recording)
    run = Run(16, "none")
    accuracies("digits-shufflenet", run, 5, resolution=16, rounds=2, steps=2, agent_seeds=agent_seeds)
    assert seeds == expected
