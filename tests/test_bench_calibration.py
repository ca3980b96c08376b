"""bench/calibration's arithmetic on a predictor calibrated with fake timings: round-like refinement and the MAPE
on the card's unseen combinations."""

from __future__ import annotations

import json

import pytest

from agent.calibration import calibrate, target_for
from bench.calibration import refine, unseen_mape
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
