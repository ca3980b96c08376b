"""bench/colocation's repetitions: spread, and a difference within the spread reported as a tie."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import colocation
from bench.common import CsvLog, compare, spread


def test_spread_is_the_relative_range_of_the_repetitions():
    assert spread([100.0, 104.0, 98.0]) == pytest.approx(0.06)
    assert spread([5.0, 5.0, 5.0]) == 0.0


def test_a_difference_within_either_spread_is_a_tie():
    assert compare(103.0, 0.02, 100.0, 0.05) == "tie (1.03x)"
    assert compare(103.0, 0.02, 100.0, 0.01) == "1.03x"
    assert compare(90.0, 0.0, 100.0, 0.0) == "0.90x"


def row(policy: str, p: float, p_spread: float, rv: str = "") -> dict:
    return {
        "scenario": "light",
        "policy": policy,
        "rv": rv,
        "P": p,
        "P_norm": 1,
        "P_f": 1,
        "P_f_norm": 1,
        "device": "GPU",
        "P_spread": p_spread,
        "repeats": 3,
    }


def test_the_report_says_tie_when_fedmt_is_within_the_noise_of_the_best_static_split(tmp_path, capsys):
    log = CsvLog(tmp_path / "c.csv", colocation.COLUMNS)
    for r in (
        row("temporal", 1000, 0.01),
        row("isolated", 1900, 0.04),
        row("sharing", 2000, 0.03),
        row("fedmt", 2050, 0.02),
        row("fedmt-predictor", 2400, 0.02),
    ):
        log.add(r)
    assert colocation.main(["report", "--out", str(tmp_path), "--name", "c"]) == 0
    table = (tmp_path / "c.md").read_text()
    assert "| light | GPU | fedmt | 2.05x | tie (1.02x) |" in table
    assert "| light | GPU | fedmt-predictor | 2.40x | 1.20x |" in table
    assert (tmp_path / "c.png").stat().st_size > 0


def test_the_report_sets_the_predictors_throughputs_against_the_measured_ones(tmp_path):
    import numpy as np

    from predictor.features import extract
    from predictor.runtime import OnnxPredictor
    from protocol.schemas import ModelSpec

    path = Path("predictor/models/nvidia-h100-80gb-hbm3.onnx")
    models, shares = ["resnet18", "mobilenet_v3_small"], [70.0, 30.0]
    features = [extract(ModelSpec(name=m, num_classes=10, input_size=128)) for m in models]
    predict = OnnxPredictor(path)
    alone = [float(predict([f], np.array([[64.0]]), np.array([[100.0]]))[0, 0]) for f in features]
    together = predict(features, np.array([[64.0, 64.0]]), np.array([shares]))[0]
    log = CsvLog(tmp_path / "c.csv", colocation.COLUMNS)
    measured = {
        "temporal": alone,
        "fedmt-predictor": [2 * float(x) for x in together],
    }  # exact, then 2x the prediction
    for policy, throughputs in measured.items():
        for model, share, ips in zip(models, shares, throughputs):
            log.add(
                row(policy, 1000.0, 0.0)
                | {"model": model, "batch": 64, "resolution": 128, "throughput_ips": ips}
                | {"resource_pct": 100.0 if policy == "temporal" else share}
            )
    argv = ["report", "--out", str(tmp_path), "--name", "c", "--predictor", str(path)]
    assert colocation.main(argv) == 0
    table = (tmp_path / "c.md").read_text()
    lines = {line.split(" | ")[1]: line for line in table.splitlines() if line.startswith("| light | ")}
    assert "| 0.0% |" in lines["temporal"]
    assert "| 50.0% |" in lines["fedmt-predictor"]
    assert f"| {2 * min(together):.0f} / 1000 |" in lines["fedmt-predictor"]  # n * the slowest task
    assert "MAPE over 4 task throughputs: 25.0%" in table
