"""bench/colocation's repetitions: spread, and a difference within the spread reported as a tie."""

from __future__ import annotations

import json
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


def row(policy: str, p: float, p_spread: float, rv: str = "", norms: tuple[float, float] = (1, 1)) -> dict:
    return {
        "scenario": "light",
        "policy": policy,
        "rv": rv,
        "P": p,
        "P_norm": norms[0],
        "P_f": norms[1],
        "P_f_norm": norms[1],
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
        row("fedmt-predictor", 2400, 0.02, norms=(2.4, 2.5)),
    ):
        log.add(r)
    assert colocation.main(["report", "--out", str(tmp_path), "--name", "c"]) == 0
    table = (tmp_path / "c.md").read_text()
    assert "| light | fedmt-predictor |  | 2400 | 2.40 | 2.50 | 2.50 | 0.96 |" in table  # P / P_f
    assert "| light | GPU | fedmt | 2.05x | tie (1.02x) |" in table
    assert "| light | GPU | fedmt-predictor | 2.40x | 1.20x |" in table
    assert (tmp_path / "c.png").stat().st_size > 0


PREDICTOR = Path("predictor/models/nvidia-h100-80gb-hbm3.onnx")
MODELS, SHARES = ["resnet18", "mobilenet_v3_small"], [70.0, 30.0]


def predictions() -> tuple[list[float], list[float]]:
    """The shipped H100 predictor's throughputs for MODELS at batch 64: each alone, and co-located at SHARES."""
    import numpy as np

    from predictor.features import extract
    from predictor.runtime import OnnxPredictor
    from protocol.schemas import ModelSpec

    features = [extract(ModelSpec(name=m, num_classes=10, input_size=128)) for m in MODELS]
    predict = OnnxPredictor(PREDICTOR)
    alone = [float(predict([f], np.array([[64.0]]), np.array([[100.0]]))[0, 0]) for f in features]
    together = [float(x) for x in predict(features, np.array([[64.0, 64.0]]), np.array([SHARES]))[0]]
    return alone, together


def write_run(path: Path, measured: dict[str, list[float]]) -> None:
    """A measured run of MODELS: per policy its tasks' throughputs (temporal alone, the others at SHARES)."""
    log = CsvLog(path, colocation.COLUMNS)
    for policy, throughputs in measured.items():
        for model, share, ips in zip(MODELS, SHARES, throughputs):
            log.add(
                row(policy, 1000.0, 0.0)
                | {"model": model, "batch": 64, "resolution": 128, "throughput_ips": ips}
                | {"resource_pct": 100.0 if policy == "temporal" else share}
            )


def test_the_report_sets_the_predictors_throughputs_against_the_measured_ones(tmp_path):
    alone, together = predictions()
    # temporal measured as predicted, the co-location at twice the prediction
    write_run(tmp_path / "c.csv", {"temporal": alone, "fedmt-predictor": [2 * x for x in together]})
    argv = ["report", "--out", str(tmp_path), "--name", "c", "--predictor", str(PREDICTOR)]
    assert colocation.main(argv) == 0
    table = (tmp_path / "c.md").read_text()
    lines = {line.split(" | ")[1]: line for line in table.splitlines() if line.startswith("| light | ")}
    assert "| 0.0% |" in lines["temporal"]
    assert "| 50.0% |" in lines["fedmt-predictor"]
    assert f"| {2 * min(together):.0f} / 1000 |" in lines["fedmt-predictor"]  # n * the slowest task
    assert "MAPE over 4 task throughputs: 25.0%" in table
    assert "| light | GPU | fedmt-predictor | tie (1.00x) | - |" in table  # no static policy measured


def test_a_refined_copy_plans_with_a_correction_fitted_on_the_runs_windows(tmp_path):
    alone, together = predictions()
    write_run(tmp_path / "c.csv", {"temporal": [2 * x for x in alone], "isolated": [2 * x for x in together]})
    refined = tmp_path / "refined"
    argv = [
        "refine",
        "--out",
        str(tmp_path),
        "--name",
        "c",
        "--predictor",
        str(PREDICTOR),
        "--refined",
        str(refined),
    ]
    assert colocation.main(argv) == 0
    report = json.loads((refined / PREDICTOR.with_suffix(".refinement.json").name).read_text())
    # every window measured twice the prediction: the device-wide factor moves most of the way to 2 (its prior
    # holds it back), the per-model factors stay near 1
    assert 1.6 < report["correction"]["device_factor"] < 2.0
    assert all(0.9 < f < 1.1 for f in report["correction"]["factors"].values())
    assert report["correction"]["observations"] == 4
    assert (refined / PREDICTOR.name).read_bytes() == PREDICTOR.read_bytes()
    assert (refined / PREDICTOR.with_suffix(".card.json").name).exists()
    # the report of the refined copy predicts with the correction: 50% off before, much less after
    argv = ["report", "--out", str(tmp_path), "--name", "c", "--predictor", str(refined / PREDICTOR.name)]
    assert colocation.main(argv) == 0
    table = (tmp_path / "c.md").read_text()
    assert "(nvidia-h100-80gb-hbm3.onnx, 4 observations refining it)" in table
    mape = float(table.split("MAPE over 4 task throughputs: ")[1].split("%")[0])
    assert mape < 20


def test_refinement_rounds_learn_from_the_predictors_own_plans_only():
    from predictor.correction import fit_correction
    from predictor.features import extract
    from protocol.schemas import ModelSpec

    alone, together = predictions()
    predict = colocation.refined_predictor(PREDICTOR)
    features = {m: extract(ModelSpec(name=m, num_classes=10, input_size=128)) for m in MODELS}
    rows = []
    for policy, throughputs in {
        "temporal": [10 * x for x in alone],  # another policy's windows: not the plan's, so not learnt from
        "fedmt-predictor": [together[0], 4 * together[1]],  # the second task 4x as fast as predicted
    }.items():
        for model, share, ips in zip(MODELS, SHARES, throughputs):
            rows.append(
                row(policy, 1000.0, 0.0)
                | {
                    "model": model,
                    "batch": 64,
                    "resolution": 128,
                    "resource_pct": share,
                    "throughput_ips": ips,
                }
            )
    observations = colocation._observations(predict, features, rows)
    assert [(key, round(p, 1), round(m, 1)) for key, p, m in observations] == [
        ("resnet18@128", round(together[0], 1), round(together[0], 1)),
        ("mobilenet_v3_small@128", round(together[1], 1), round(4 * together[1], 1)),
    ]
    # the next round plans with that correction: mobilenet needs a smaller share to finish with resnet18
    shares_before = colocation.plan_resources(predict, list(features.values()), 64, 3200)
    predict.correction = fit_correction(observations)
    shares_after = colocation.plan_resources(predict, list(features.values()), 64, 3200)
    assert shares_after[0] / shares_after[1] > shares_before[0] / shares_before[1]


def test_rounds_need_the_predictors_plan():
    with pytest.raises(SystemExit, match="--rounds"):
        colocation.main(["run", "--rounds", "2", "--policies", "temporal", "isolated"])


def test_a_round_takes_the_best_measured_split_once_the_plans_err_beyond_the_agents_threshold():
    from agent.selection import candidates
    from predictor.features import extract
    from protocol.schemas import ModelSpec

    predict = colocation.refined_predictor(PREDICTOR)
    features = {m: extract(ModelSpec(name=m, num_classes=10, input_size=128)) for m in MODELS}
    planned = colocation.plan_resources(predict, list(features.values()), 64, 3200)
    options = candidates(planned, [f.flops_per_sample * 64 for f in features.values()])
    assert options[0].name == "fedmt" and options[1].name == "isolated"
    rows = []
    for candidate in options:
        # every split measured: isolated a little slower than predicted, the others (the plan first) far slower
        factor = 0.9 if candidate.name == "isolated" else 0.4
        policy = "fedmt-predictor" if candidate.name == "fedmt" else candidate.name
        for model, share in zip(MODELS, candidate.resources):
            rows.append(
                row(policy, 1000.0, 0.0)
                | {"model": model, "batch": 64, "resolution": 128, "resource_pct": share}
                | {"throughput_ips": factor * 2000.0}
            )
    error = colocation._plan_error(predict, features, rows)
    assert error > 20  # the agent's max_prediction_error_pct
    again = colocation.plan_resources(
        predict, list(features.values()), 64, 3200, colocation._measured(rows, MODELS), error
    )
    assert again == list(options[1].resources)
    # the lookup: the throughputs measured at exactly a candidate's shares
    assert colocation._measured(rows, MODELS)(options[1]) == [1800.0, 1800.0]
