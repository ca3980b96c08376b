"""bench/time_to_accuracy: the time-to-target arithmetic, and the whole benchmark end to end on the CPU (smoke)."""

from __future__ import annotations

import dataclasses
import json

import msgspec
import pytest

import bench.time_to_accuracy as tta
from bench.time_to_accuracy import main, median_run, seconds_to_target


def test_the_target_counts_when_every_task_reached_it():
    accuracy = {"a": [0.1, 0.96, 0.97, 0.98], "b": [0.1, 0.90, 0.95, 0.99]}
    assert seconds_to_target(accuracy, [10.0, 21.0, 30.5], 0.95) == 21.0
    assert seconds_to_target(accuracy, [10.0, 21.0, 30.5], 0.99) is None
    assert seconds_to_target(accuracy, [10.0, None, 30.5], 0.95) == 30.5  # a round without its time


def test_a_policy_is_reported_by_its_median_run_and_a_run_that_never_reached_the_target_is_the_slowest():
    runs = [{"seconds_to_target": t, "id": i} for i, t in enumerate([30.0, None, 20.0])]
    assert median_run(runs) == runs[0] | {"seconds_to_target_runs": [30.0, None, 20.0]}
    assert median_run(runs[1:])["id"] == 1  # of two, the slower: never
    assert median_run(runs[:1])["seconds_to_target_runs"] == [30.0]


def test_repeated_runs_take_the_policies_in_turn_and_report_every_run(tmp_path, monkeypatch):
    """--repeats 3: temporal, fedmt, temporal, fedmt, ... each in a folder of its own; the JSON keeps the median
    run's rounds and every run's time to target."""
    order = []

    def federation(options):
        order.append(options.out.name)
        options.out.mkdir(parents=True)
        seconds = {"temporal": 40.0, "fedmt": 20.0}[options.policy] + len(order)
        accuracy = {"digits-resnet18": [0.1, 0.5, 0.99]}
        return {"accuracy": accuracy, "round_end_s": [seconds / 2, seconds], "round_wall_time_s": [1.0, 2.0]}

    monkeypatch.setattr(tta, "run", federation)
    argv = ["--device", "cpu", "--policies", "temporal", "fedmt", "--repeats", "3", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert order == [
        "iid-temporal",
        "iid-fedmt",
        "iid-temporal-2",
        "iid-fedmt-2",
        "iid-temporal-3",
        "iid-fedmt-3",
    ]
    summaries = sorted(p.name for p in (tmp_path / "time_to_accuracy").iterdir() if p.is_file())
    assert summaries == sorted(f"{name}.summary.json" for name in order)  # flat, beside the runs' folders
    result = json.loads((tmp_path / "time_to_accuracy.json").read_text())
    assert result["seconds_to_target_runs"] == {"temporal": [41.0, 43.0, 45.0], "fedmt": [22.0, 24.0, 26.0]}
    assert result["seconds_to_target"] == {"temporal": 43.0, "fedmt": 24.0}
    assert result["settings"]["repeats"] == 3


def one_round_federation(record):
    """A stand-in for testbed.demo.run that records each run's options and reaches the target in round 1."""

    def federation(options):
        record(options)
        options.out.mkdir(parents=True)
        return {
            "accuracy": {"digits-resnet18": [0.1, 0.99]},
            "round_end_s": [5.0],
            "round_wall_time_s": [5.0],
        }

    return federation


@pytest.mark.parametrize("vary", [False, True])
def test_repeats_start_from_one_seed_unless_told_to_vary_it_alike_for_every_policy(
    tmp_path, monkeypatch, vary
):
    seeds = []
    monkeypatch.setattr(
        tta, "run", one_round_federation(lambda options: seeds.append((options.policy, options.seed)))
    )
    argv = ["--device", "cpu", "--policies", "temporal", "fedmt", "--repeats", "3", "--out", str(tmp_path)]
    assert main(argv + ["--vary-seed"] * vary) == 0
    expected = [0, 1, 2] if vary else [0, 0, 0]
    assert seeds == [(policy, seed) for seed in expected for policy in ("temporal", "fedmt")]
    assert json.loads((tmp_path / "time_to_accuracy.json").read_text())["settings"]["vary_seed"] is vary


def test_the_batch_rules_given_reach_every_task_of_the_federation(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(tta, "run", one_round_federation(lambda options: seen.append(options.tasks())))
    argv = ["--device", "cpu", "--policies", "fedmt", "--out", str(tmp_path)]
    main([*argv, "--initial-batch-growth", "2", "--lr-scaling", "sqrt"])
    (tasks,) = seen
    assert {(d.initial_batch_growth, d.lr_scaling) for d, _ in tasks.values()} == {(2, "sqrt")}


def test_a_device_history_given_is_where_every_agent_reads_its_rounds(tmp_path, monkeypatch):
    from agent.history import DeviceHistory
    from predictor.records import Record, TaskSample, dataset_path
    from testbed.demo import seed_history

    gpu = "NVIDIA H100 80GB HBM3"
    sample = TaskSample("densenet121", 26, 60.0, 962.0, input_size=128, num_classes=10, predicted=1200.0)
    earlier = DeviceHistory(dataset_path(tmp_path / "earlier", gpu))
    record = Record(
        gpu=gpu,
        sm_total=132,
        driver=None,
        torch="2",
        resolution=128,
        tasks=[sample],
        window_s=10.0,
        ts=1.0,
        round=1,
    )
    earlier.add(record)
    renamed = tmp_path / "first-history.jsonl"  # as a run's history is kept under bench/results
    renamed.write_bytes(earlier.path.read_bytes())
    seen = []

    def federation(options):
        seen.append(options)
        options.out.mkdir(parents=True)
        seed_history(options)
        return {
            "accuracy": {"digits-resnet18": [0.1, 0.99]},
            "round_end_s": [5.0],
            "round_wall_time_s": [5.0],
        }

    monkeypatch.setattr(tta, "run", federation)
    argv = ["--device", "cpu", "--policies", "fedmt", "--agents", "2", "--partitions", "iid"]
    argv += ["--out", str(tmp_path / "out")]
    main([*argv, "--device-history", str(renamed)])
    (options,) = seen
    for device in ("edge-1", "edge-2"):
        history = DeviceHistory(dataset_path(options.out / "state" / device / "predictor", gpu))
        assert list(history.rounds) == list(earlier.rounds)
    # rounds of eager steps are no history of agents whose steps replay from CUDA graphs, and the reverse
    with pytest.raises(ValueError, match="eager steps; these agents run steps replayed from CUDA graphs"):
        seed_history(dataclasses.replace(options, cuda_graphs=True))
    graphed = tmp_path / "graphed.jsonl"
    graphed.write_bytes(msgspec.json.encode(msgspec.structs.replace(record, cuda_graphs=True)) + b"\n")
    options = dataclasses.replace(options, cuda_graphs=True, device_history=(graphed,))
    seed_history(options)
    own = options.out / "state" / "edge-1" / "predictor"
    assert DeviceHistory(dataset_path(own, gpu, cuda_graphs=True)).rounds[0].cuda_graphs
    with pytest.raises(ValueError, match="CUDA graphs; these agents run eager steps"):
        seed_history(dataclasses.replace(options, cuda_graphs=False))


def test_a_device_history_of_no_single_gpu_is_refused(tmp_path):
    from testbed.demo import Options, seed_history

    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="holds no profiling records"):
        seed_history(Options(out=tmp_path / "out", device_history=(empty,)))


def test_runs_of_several_invocations_merge_into_one_report_in_the_order_given(tmp_path):
    from bench.tta_merge import main as merge

    base = {"device": {"gpu": "H100", "agents": 1}, "target": 0.95, "settings": {"repeats": 1, "rounds": 6}}
    (tmp_path / "base.json").write_text(json.dumps(base))
    paths = []
    for i, (policy, seconds) in enumerate(
        [("fedmt", 14.0), ("temporal", 21.0), ("fedmt", 12.0), ("fedmt", 13.0)]
    ):
        summary = {
            "partition": "iid",
            "policy": policy,
            "accuracy": {"digits-resnet18": [0.1, 0.97]},
            "round_end_s": [seconds],
            "round_wall_time_s": [seconds],
        }
        paths.append(tmp_path / f"{i}.summary.json")
        paths[-1].write_text(json.dumps(summary))
    assert (
        merge(["--base", str(tmp_path / "base.json"), "--out", str(tmp_path / "out"), *map(str, paths)]) == 0
    )
    result = json.loads((tmp_path / "out" / "time_to_accuracy.json").read_text())
    assert result["seconds_to_target_runs"] == {"fedmt": [14.0, 12.0, 13.0], "temporal": [21.0]}
    assert result["seconds_to_target"] == {"fedmt": 13.0, "temporal": 21.0}
    assert result["device"] == base["device"] and result["settings"]["repeats"] == {"fedmt": 3, "temporal": 1}
    assert (tmp_path / "out" / "time_to_accuracy.png").stat().st_size > 0


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
