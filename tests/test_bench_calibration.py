"""bench/calibration's arithmetic on a predictor calibrated with fake timings: round-like refinement and the MAPE
on the card's unseen combinations; bench/calibration_mix's draws."""

from __future__ import annotations

import json

import msgspec
import pytest

from agent.calibration import FIT_SHARE, calibrate, target_for
from bench.calibration import (
    Progress,
    alone_ratio,
    card_unseen,
    median_spread,
    never_profiled,
    records_mape,
    refine,
    this_call,
)
from bench.calibration_mix import draw
from predictor.correction import CorrectedPredictor
from predictor.records import FOCUS, Record, TaskSample, Workload, load_records
from predictor.runtime import OnnxPredictor, card_path
from tests.test_calibration import DEVICE, GPU, TASKS, FakeGpu, law


@pytest.mark.slow
def test_refinement_folds_each_round_into_the_correction_and_the_unseen_mape_matches_the_card(tmp_path):
    gpu = FakeGpu()
    result = calibrate(
        target_for(TASKS),
        tmp_path,
        DEVICE,
        gpu,
        measure_s=150 * 6.0,
        window_s=2.0,
        fit_epochs=300,
        clock=gpu.clock,
    )
    card = json.loads(card_path(result.predictor).read_text())
    assert card["split"]["unseen_test_records"] > 0
    predictor = CorrectedPredictor(OnnxPredictor(result.predictor, gpu=GPU))
    held_out = card_unseen(load_records(result.data), card)
    assert records_mape(predictor.base, held_out) == pytest.approx(card["mape_percent"]["unseen"], abs=0.02)

    def measure(models, batch, resources):
        return [1.3 * law(Workload(m, 32), batch, r, len(models)) for m, r in zip(models, resources)]

    rounds = refine(predictor, [("resnet18", "shufflenet_v2_x0_5")], measure, 32, rounds=4)
    assert len(rounds) == 4 and predictor.correction.observations == 8
    assert rounds[0].models == ["resnet18", "shufflenet_v2_x0_5"] and len(rounds[0].resources) == 2
    assert rounds[0].predicted == pytest.approx(rounds[0].base)  # nothing learnt before the first round
    first, last = rounds[0], rounds[-1]
    error = [sum(abs(p - m) / m for p, m in zip(r.predicted, r.measured)) / 2 for r in (first, last)]
    assert error[1] < error[0]  # the device runs 1.3x the calibrated law: the rounds learn it


def test_a_split_budget_measures_call_by_call_until_the_share_is_spent_then_a_call_of_its_own_fits(tmp_path):
    share = 900.0 * (1 - FIT_SHARE)  # of the budget, measuring
    assert Progress.load(tmp_path) == Progress()  # a new folder: nothing spent
    assert this_call(Progress(), 900.0, None) == (share, True)  # one sitting
    assert this_call(Progress(), 900.0, 480.0) == (480.0, False)
    first = Progress(calls=1, seconds=530.0, measured_s=483.5)  # a window ran past the call's limit
    first.save(tmp_path)
    assert Progress.load(tmp_path) == first
    assert this_call(first, 900.0, 480.0) == pytest.approx((share - 483.5, False))
    assert this_call(Progress(calls=2, measured_s=share), 900.0, 480.0) == (0.0, True)  # spent exactly
    # more than the share (a window ran past it): fit what is there
    assert this_call(Progress(calls=2, measured_s=share + 25), 900.0, 480.0) == (0.0, True)


def test_a_broken_progress_file_is_refused_rather_than_read_as_nothing_spent(tmp_path):
    (tmp_path / "progress.json").write_text('{"calls": 1, "seconds": "many"}')
    with pytest.raises(msgspec.ValidationError):
        Progress.load(tmp_path)


def window(*tasks: tuple[str, int, float, float]) -> Record:
    return Record(
        gpu="G",
        sm_total=132,
        driver=None,
        torch="t",
        resolution=32,
        window_s=1.0,
        ts=0.0,
        tasks=[TaskSample(m, b, r, p) for m, b, r, p in tasks],
    )


def test_the_reference_counts_only_co_locations_of_combinations_the_calibration_never_profiled():
    profiled = [
        window(("resnet18", 16, 100.0, 900.0)),
        window(("resnet18", 32, 100.0, 1500.0)),
        window(("resnet18", 16, 40.0, 300.0), ("vgg16", 64, 60.0, 200.0)),
    ]
    reference = [
        window(("resnet18", 16, 100.0, 1000.0)),  # alone: never a held-out co-location
        window(("resnet18", 32, 100.0, 1500.0)),
        window(("vgg16", 128, 80.0, 250.0), ("resnet18", 64, 20.0, 400.0)),  # profiled at other batches
        window(("resnet18", 16, 50.0, 500.0), ("densenet121", 16, 50.0, 100.0)),
        window(("resnet18", 16, 50.0, 500.0), ("vgg16", 16, 20.0, 90.0), ("densenet121", 16, 30.0, 80.0)),
    ]
    assert never_profiled(reference, profiled) == reference[3:]
    assert alone_ratio(profiled, reference) == pytest.approx(0.95)  # median of 0.9 and 1.0
    assert alone_ratio(profiled, reference[2:]) is None


def test_records_mape_weighs_every_task_of_every_record():
    guesses = {("resnet18", 16): 990.0, ("resnet18", 32): 150.0, ("vgg16", 64): 100.0}

    def predictor(tasks, batches, resources):
        return [[guesses[t.model, int(b)] for t, b in zip(tasks, batches[0])]]

    records = [
        window(("resnet18", 16, 100.0, 900.0)),
        window(("resnet18", 32, 40.0, 300.0), ("vgg16", 64, 60.0, 200.0)),
    ]
    assert records_mape(predictor, records) == pytest.approx(100 * (0.1 + 0.5 + 0.5) / 3, abs=0.01)
    assert records_mape(predictor, []) is None


def test_the_median_spread_is_over_every_measured_task_of_the_data_file_whatever_call_measured_it():
    spread = [TaskSample("resnet18", 16, 100.0, 900.0, spread=s) for s in (0.01, 0.02, 0.03, 0.5)]
    records = [window(), window()]
    records[0] = msgspec.structs.replace(records[0], tasks=spread[:1])
    records[1] = msgspec.structs.replace(records[1], tasks=[*spread[1:], TaskSample("vgg16", 16, 20.0, 90.0)])
    assert median_spread(records) == pytest.approx(0.025)  # the unmeasured spread (None) is not a zero
    assert median_spread([window(("resnet18", 16, 100.0, 900.0))]) is None


def test_a_draw_holds_every_baseline_and_the_asked_lower_share_windows_and_co_locations_once_each():
    models = ("resnet18", "vgg16", "resnet50")
    baselines = [window((m, 16, 100.0, 900.0)) for m in models]
    lower = [window((m, 16, r, 300.0)) for m in models for r in (20.0, 60.0)]
    focus = [
        window(*((m, 16, 20.0 * (i + 1), 100.0) for m in FOCUS[6])) for i in range(3)
    ]  # resnet50 + vgg16
    others = [window(("resnet18", 16, 20.0 + i, 300.0), ("resnet50", 16, 40.0, 200.0)) for i in range(6)]
    records = baselines + lower + focus + others
    picked = draw(records, low=2, co=7, seed=1)
    assert picked[:3] == baselines
    assert len(picked) == 3 + 2 + 7
    assert all(len(r.tasks) == 1 and r.tasks[0].resource < 100 for r in picked[3:5])
    co_located = picked[5:]
    assert all(len(r.tasks) > 1 for r in co_located)
    assert len({id(r) for r in co_located}) == 7  # no window twice
    assert {r.combination for r in co_located} <= {focus[0].combination, others[0].combination}
    assert draw(records, low=2, co=7, seed=1) == picked  # seeded
    with pytest.raises(ValueError, match="10 co-locations asked for, the data file holds 9"):
        draw(records, low=2, co=10, seed=1)
