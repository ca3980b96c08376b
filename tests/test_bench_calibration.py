"""bench/calibration's arithmetic on a predictor calibrated with fake timings: round-like refinement and the MAPE
on the card's unseen combinations."""

from __future__ import annotations

import json

import msgspec
import pytest

from agent.calibration import calibrate, target_for
from bench.calibration import Progress, refine, this_call, unseen_mape
from predictor.correction import CorrectedPredictor
from predictor.records import Workload
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
    assert unseen_mape(predictor.base, result.data, card) == pytest.approx(
        card["mape_percent"]["unseen"], abs=0.02
    )

    def measure(models, batch, resources):
        return [1.3 * law(Workload(m, 32), batch, r, len(models)) for m, r in zip(models, resources)]

    rounds = refine(predictor, [("resnet18", "shufflenet_v2_x0_5")], measure, 32, rounds=4)
    assert len(rounds) == 4 and predictor.correction.observations == 8
    first, last = rounds[0], rounds[-1]
    error = [sum(abs(p - m) / m for p, m in zip(*r)) / 2 for r in (first, last)]
    assert error[1] < error[0]  # the device runs 1.3x the calibrated law: the rounds learn it


def test_a_split_budget_measures_call_by_call_until_the_share_is_spent_then_a_call_of_its_own_fits(tmp_path):
    assert Progress.load(tmp_path) == Progress()  # a new folder: nothing spent
    assert this_call(Progress(), 900.0, None) == (675.0, True)  # one sitting
    assert this_call(Progress(), 900.0, 480.0) == (480.0, False)
    first = Progress(calls=1, seconds=530.0, measured_s=483.5)  # a window ran past the call's limit
    first.save(tmp_path)
    assert Progress.load(tmp_path) == first
    assert this_call(first, 900.0, 480.0) == pytest.approx((191.5, False))
    assert this_call(Progress(calls=2, measured_s=675.0), 900.0, 480.0) == (0.0, True)  # spent exactly
    assert this_call(Progress(calls=2, measured_s=700.0), 900.0, 480.0) == (0.0, True)  # fit what is there


def test_a_broken_progress_file_is_refused_rather_than_read_as_nothing_spent(tmp_path):
    (tmp_path / "progress.json").write_text('{"calls": 1, "seconds": "many"}')
    with pytest.raises(msgspec.ValidationError):
        Progress.load(tmp_path)
