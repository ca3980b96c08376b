"""Synchronised measurement windows over warm pool workers (real processes on the CPU)."""

from __future__ import annotations

import pytest

from agent import jobs
from agent.data import SyntheticData
from agent.windows import Member, measure_window
from agent.workers import Launch, WorkerPool
from protocol.schemas import ModelSpec

pytestmark = pytest.mark.slow
CPU = jobs.Init(device="cpu", threads=1)
TINY = jobs.Prepare(
    model=ModelSpec(name="shufflenet_v2_x0_5", num_classes=10, input_size=16), data=SyntheticData(samples=64)
)


def member(key, batch: int, **kwargs) -> Member:
    return Member(key, Launch(str(key)), TINY, jobs.Measure(batch=batch, warmup_steps=1, **kwargs))


def test_a_window_measures_together_or_wave_by_wave():
    with WorkerPool(CPU) as pool:
        together = measure_window(pool, [member("a", 8, images=64), member("b", 8, images=64)])
        waves = measure_window(pool, [member("a", 8, images=64), member("b", 8, images=64)], [[0], [1]])
    for window in (together, waves):
        assert [r.images for r in window.results] == [64, 64]
        assert window.images == 128 and window.wall_s > 0
    a, b = waves.results
    assert b.started_at >= a.ended_at  # the second wave starts when the first is done
    assert waves.wall_s == pytest.approx(a.seconds + b.seconds, rel=0.05)


def test_workers_stay_across_windows_and_batch_sizes():
    with WorkerPool(CPU) as pool:
        first = measure_window(
            pool, [member(("tiny", 50.0), 4, seconds=0.2), member(("tiny", 100.0), 8, seconds=0.2)]
        )
        pids = {
            key: pool.acquire(key, Launch(str(key))).ready.pid for key in [("tiny", 50.0), ("tiny", 100.0)]
        }
        for key in pids:
            pool.release(key)
        second = measure_window(pool, [member(("tiny", 50.0), 16, seconds=0.2)])
        again = pool.acquire(("tiny", 50.0), Launch(str(("tiny", 50.0))))
        pool.release(("tiny", 50.0))
        assert again.ready.pid == pids[("tiny", 50.0)]  # no restart for a new batch size
        with pytest.raises(ValueError, match="only once"):
            measure_window(pool, [member("x", 4, seconds=0.1), member("x", 4, seconds=0.1)])
    assert [r.batch for r in first.results] == [4, 8] and second.results[0].batch == 16
    assert all(r.images > 0 and r.seconds >= 0.2 for r in [*first.results, *second.results])
