"""Synchronised measurement windows over real worker processes (on the CPU)."""

from __future__ import annotations

import pytest

from agent import jobs
from agent.colocation import WorkerGroup, WorkerPool
from agent.runner import Launch
from protocol.schemas import ModelSpec

pytestmark = pytest.mark.slow
CPU = jobs.Init(device="cpu", threads=1)
TINY = ModelSpec(name="shufflenet_v2_x0_5", num_classes=10, input_size=16)


def measure(batch: int, **kwargs) -> jobs.Measure:
    return jobs.Measure(model=TINY, batch=batch, warmup_steps=1, **kwargs)


def test_a_group_measures_together_or_wave_by_wave():
    with WorkerGroup([Launch("a"), Launch("b")], CPU) as group:
        together = group.measure({"a": measure(8, images=64), "b": measure(8, images=64)})
        waves = group.measure({"a": measure(8, images=64), "b": measure(8, images=64)}, [["a"], ["b"]])
    for window in (together, waves):
        assert {t: r.images for t, r in window.results.items()} == {"a": 64, "b": 64}
        assert window.images == 128 and window.wall_s > 0
    a, b = waves.results["a"], waves.results["b"]
    assert b.started_at >= a.ended_at  # the second wave starts when the first is done
    assert waves.wall_s == pytest.approx(a.seconds + b.seconds, rel=0.05)


def test_a_pool_keeps_one_worker_per_key_across_windows_and_batch_sizes():
    with WorkerPool(lambda model, percent: Launch(f"{model}@{percent:g}"), CPU) as pool:
        first = pool.measure(
            [(("tiny", 50.0), measure(4, seconds=0.2)), (("tiny", 100.0), measure(8, seconds=0.2))]
        )
        pids = {key: ready.pid for key, ready in pool.ready.items()}
        second = pool.measure([(("tiny", 50.0), measure(16, seconds=0.2))])
        assert {
            key: ready.pid for key, ready in pool.ready.items()
        } == pids  # no restart for a new batch size
        with pytest.raises(ValueError, match="only once"):
            pool.measure(
                [(("tiny", 50.0), measure(4, seconds=0.1)), (("tiny", 50.0), measure(4, seconds=0.1))]
            )
    assert [r.batch for r in first] == [4, 8] and second[0].batch == 16
    assert all(r.images > 0 and r.seconds >= 0.2 for r in [*first, *second])
