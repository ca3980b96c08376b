"""bench/calibration_mix's draw: the baselines, then the asked numbers of lower-share windows and co-locations."""

from __future__ import annotations

from bench.calibration_mix import combination, draw
from predictor.records import FOCUS, Record, TaskSample


def window(*tasks: tuple[str, float]) -> Record:
    return Record(
        gpu="G",
        sm_total=132,
        driver=None,
        torch="t",
        resolution=32,
        window_s=1.0,
        ts=0.0,
        tasks=[TaskSample(m, 16, r, 100.0) for m, r in tasks],
    )


def test_a_draw_holds_every_baseline_and_the_asked_lower_share_windows_and_co_locations_once_each():
    models = ("resnet18", "vgg16", "resnet50")
    baselines = [window((m, 100.0)) for m in models]
    lower = [window((m, r)) for m in models for r in (20.0, 60.0)]
    focus = [window(*((m, 20.0 * (i + 1)) for m in FOCUS[6])) for i in range(3)]  # resnet50 + vgg16
    others = [window(("resnet18", 20.0 + i), ("resnet50", 40.0)) for i in range(6)]
    records = baselines + lower + focus + others
    picked = draw(records, low=2, co=7, seed=1)
    assert picked[:3] == baselines
    assert len(picked) == 3 + 2 + 7
    assert all(len(r.tasks) == 1 and r.tasks[0].resource < 100 for r in picked[3:5])
    co_located = picked[5:]
    assert all(len(r.tasks) > 1 for r in co_located)
    assert len({id(r) for r in co_located}) == 7  # no window twice
    assert {combination(r) for r in co_located} <= {combination(focus[0]), combination(others[0])}
    assert draw(records, low=2, co=7, seed=1) == picked  # seeded
