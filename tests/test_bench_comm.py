"""bench.comm's codec figures over seeds: means, drops against dense from the same seeds, each seed's drop; its
plot of link rows alone (a run without accuracy runs)."""

from __future__ import annotations

import warnings

import pytest

from bench.comm import codec_row, plot
from testbed.demo import TASKS, Options


def run(final: dict[str, float], update_bytes: int, by_task: dict[str, int] | None = None) -> dict:
    bytes_row = {"round": 1, "update_bytes": update_bytes}
    if by_task is not None:
        bytes_row["update_bytes_by_task"] = by_task
    return {"accuracy": {task: [0.1, value] for task, value in final.items()}, "bytes": [bytes_row]}


def test_a_codec_row_averages_its_seeds_and_pairs_each_seed_with_dense():
    dense = [run({"a": 0.90, "b": 0.80}, 1000), run({"a": 0.96, "b": 0.84}, 1000)]
    topk = [run({"a": 0.88, "b": 0.81}, 20), run({"a": 0.90, "b": 0.83}, 30)]
    row = codec_row("topk", topk, dense)
    assert row["final_accuracy"] == pytest.approx({"a": 0.89, "b": 0.82})
    assert row["final_accuracy_drop_pts_per_task"] == {"a": 4.0, "b": 0.0}
    assert row["final_accuracy_drop_pts"] == 4.0
    assert row["final_accuracy_drop_pts_by_seed"] == {"a": [2.0, 6.0], "b": [-1.0, 1.0]}
    assert row["final_accuracy_drop_pts_sem"] == {"a": 2.0, "b": 1.0}  # sd (2.83, 1.41) / sqrt(2)
    assert row["update_bytes"] == 25 and row["update_bytes_ratio"] == 40.0
    assert row["accuracy"] == topk[0]["accuracy"]  # the first seed's rounds, for the plot
    assert row["update_bytes_ratio_by_task"] is None  # summaries from before the demo counted per task


def test_a_codec_row_gives_each_tasks_own_bytes_ratio():
    dense = [run({"a": 0.9, "b": 0.8}, 1000, {"a": 900, "b": 100}) for _ in range(2)]
    topk = [
        run({"a": 0.9, "b": 0.8}, 24, {"a": 9, "b": 15}),
        run({"a": 0.9, "b": 0.8}, 36, {"a": 9, "b": 25}),
    ]
    row = codec_row("topk", topk, dense)
    assert row["update_bytes_ratio"] == round(1000 / 30, 2)
    assert row["update_bytes_ratio_by_task"] == {"a": 100.0, "b": 5.0}
    one_seed = codec_row("topk", [run({"a": 0.9, "b": 0.8}, 24)], dense[:1])
    assert (
        one_seed["update_bytes_ratio_by_task"] is None
        and one_seed["final_accuracy_drop_pts_sem"]["a"] is None
    )


def test_the_demo_seed_is_every_tasks_initial_model_and_training_seed(tmp_path):
    tasks = Options(out=tmp_path, seed=3).tasks()
    assert set(tasks) == set(TASKS)
    assert all((config.init_seed, config.train_seed) == (3, 3) for config, _ in tasks.values())
    defaults = Options(out=tmp_path).tasks().values()
    assert all((config.init_seed, config.train_seed) == (0, 0) for config, _ in defaults)


@pytest.mark.parametrize("seed", ["-1", "1024", "x"])
def test_a_demo_seed_outside_the_training_seeds_range_is_refused(seed, capsys):
    from testbed.demo import main

    with pytest.raises(SystemExit):
        main(["--seed", seed])
    assert "--seed" in capsys.readouterr().err


@pytest.mark.parametrize(
    "results",
    [
        {"round_time_s": {"10": {"dense": 67.8, "topk": 4.0}}},
        {"codecs": {"topk": {"update_bytes": 25, "final_accuracy_drop_pts": 1.5}}},
    ],
    ids=["link rows alone", "accuracy runs alone"],
)
def test_what_was_measured_alone_is_plotted_in_one_panel(tmp_path, results):
    path = tmp_path / "comm.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. an empty panel's legend
        plot(results, path)
    png = path.read_bytes()
    width = int.from_bytes(png[16:20], "big")  # the IHDR chunk
    assert png.startswith(b"\x89PNG") and width < 800, "one panel, no empty one beside it"


def test_the_demo_counts_update_bytes_per_task_and_round():
    from types import SimpleNamespace

    from protocol.schemas import Event
    from testbed.demo import bytes_moved

    def finished(device: str, task: str, round_: int, size: float) -> Event:
        return Event(
            device=device, ts=1.0, kind="finished", round=round_, task=task, metrics={"update_bytes": size}
        )

    events = [
        finished("edge-1", "a", 1, 100.0),
        finished("edge-2", "a", 1, 50.0),
        finished("edge-1", "b", 1, 7.0),
        finished("edge-1", "b", 1, 7.0),  # the same update reported twice counts once
        finished("edge-1", "a", 2, 30.0),
        Event(device="edge-2", ts=1.0, kind="failed", round=2, task="b"),
    ]
    monitor = SimpleNamespace(events=events, global_manifests={})
    rows = bytes_moved(2, ["a", "b"], monitor)
    assert [r["update_bytes_by_task"] for r in rows] == [{"a": 150, "b": 7}, {"a": 30, "b": 0}]
    assert [(r["update_bytes"], r["updates"]) for r in rows] == [(157, 3), (30, 1)]
