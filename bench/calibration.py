"""Calibration from scratch, and after rounds of refinement: bench/results/calibration.json.

    python -m bench.calibration --budget-s 900 --out bench/results     # GPU + MPS (root, or a running daemon)

1. The path of `fedmt-agent calibrate` (agent.calibration.calibrate_gpu) from an empty folder, for the generic
   model list at --resolution, within --budget-s: `minutes` is the whole run, fitting included; `mape_unseen` the
   model card's MAPE on the model combinations its fit left out (never seen in training). With --reference (a data
   file measured on the same GPU model, such as the shipped predictor's), `reference` also holds the MAPE on every
   co-location of that file whose model combination the calibration never profiled, at any batch or share.
2. Refinement as rounds do it: --rounds co-locations of bench.colocation's scenarios (in turn) at batch 64, each
   at the SM shares the corrected predictor's Eq. 5 picks (makespan, equal data), measured in a window through
   the same workers and folded into the residual correction (predictor.correction) as a round's measurement is;
   `mape_unseen_refined` is the corrected predictor's MAPE on the same unseen records.

A budget longer than one sitting (the device tool runs a command for 10 minutes at most) spans calls: each call
with `--folder DIR --call-s S` measures for at most S seconds, appending to DIR's data file, and records what it
spent in DIR/progress.json; once the measuring share is spent, the next call fits, refines and reports `minutes`
as the sum of every call's wall time (each call pays the workers' start-up again, so the sum overstates one
sitting).

    python -m bench.calibration --budget-s 900 --folder /tmp/cal900 --call-s 480 --out bench/results   # 3 times
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec
import numpy as np

from agent.calibration import WINDOW_S
from bench.common import describe_device, write_json
from common.durable import write_atomically

#: (models, batch, R_i per task) -> measured images/s per task
Measure = Callable[[Sequence[str], int, Sequence[float]], list[float]]
PROGRESS_FILE = "progress.json"


class Round(msgspec.Struct, frozen=True):
    """One refinement round: what ran at which shares, and each task's images/s as the base predictor and the
    corrected one (before this round) predicted it and as measured."""

    models: list[str]
    resources: list[float]
    base: list[float]
    predicted: list[float]
    measured: list[float]


def refine(
    predictor, scenarios: Sequence[Sequence[str]], measure: Measure, resolution: int, rounds: int
) -> list[Round]:
    """`rounds` round-like measurements folded into `predictor` (a CorrectedPredictor) one after another."""
    from predictor.correction import fit_correction, workload_key
    from predictor.features import extract
    from predictor.search import best_resources, default_grid
    from protocol.schemas import ModelSpec

    observations, history = [], []
    for number in range(rounds):
        models = scenarios[number % len(scenarios)]
        tasks = [extract(ModelSpec(name=m, num_classes=10, input_size=resolution)) for m in models]
        batches = [64] * len(models)
        grid = default_grid(len(models), predictor.share_range)
        shares = best_resources(
            tasks, batches, predictor, grid, objective="makespan", volumes=[1.0] * len(models)
        )
        resources = [float(r) for r in shares.resources]
        rows = np.array([batches], dtype=np.float64), np.array([resources])
        before = predictor(tasks, *rows)[0]
        base = predictor.base(tasks, *rows)[0]
        measured = measure(models, 64, resources)
        history.append(
            Round(list(models), resources, [float(b) for b in base], [float(p) for p in before], measured)
        )
        observations += [
            (workload_key(m, resolution), float(b), m_) for m, b, m_ in zip(models, base, measured)
        ]
        predictor.correction = fit_correction(observations)
    return history


class Progress(msgspec.Struct, frozen=True):
    """What the calls of one calibration run have spent so far (DIR/progress.json)."""

    calls: int = 0
    seconds: float = 0.0  # wall time of calibrating: workers' start-up, measuring, fitting
    measured_s: float = 0.0  # of the measuring share

    @classmethod
    def load(cls, folder: Path) -> Progress:
        path = folder / PROGRESS_FILE
        return msgspec.json.decode(path.read_bytes(), type=cls) if path.exists() else cls()

    def save(self, folder: Path) -> None:
        write_atomically(folder / PROGRESS_FILE, msgspec.json.encode(self))


def this_call(before: Progress, budget_s: float, call_s: float | None) -> tuple[float, bool]:
    """Seconds this call measures, and whether it fits. One sitting (no `call_s`) measures the whole measuring
    share and fits; a call of a split run either measures (at most `call_s`) or, once nothing is left to
    measure, fits and refines, so no call holds both the measuring and the fit."""
    from agent.calibration import measuring_left

    left = measuring_left(budget_s, before.measured_s)
    if call_s is None:
        return left, True
    return (min(call_s, left), False) if left > 0 else (0.0, True)


def card_unseen(records: Sequence, card: dict) -> list:
    """The records of the model combinations the card's fit left out (never seen in training)."""
    unseen = {tuple(c) for c in card["split"]["unseen_combinations"]}
    return [r for r in records if r.combination in unseen]


def never_profiled(reference: Sequence, profiled: Sequence) -> list:
    """The co-locations of `reference` (another data file of the same GPU model) whose model combination no
    record of `profiled` holds: combinations the calibration never measured at any batch or share."""
    measured = {r.combination for r in profiled}
    return [r for r in reference if len(r.tasks) > 1 and r.combination not in measured]


def median_spread(records: Sequence) -> float | None:
    """The median over every task of `records` of its spread across a window's repeats."""
    spreads = [t.spread for r in records for t in r.tasks if t.spread is not None]
    return round(statistics.median(spreads), 4) if spreads else None


def records_mape(predictor, records: Sequence) -> float | None:
    """MAPE (percent) of `predictor` over every task of `records` (None when there are none)."""
    from predictor.features import extract
    from predictor.records import task_spec

    errors = []
    for record in records:
        tasks = [extract(task_spec(record, t)) for t in record.tasks]
        predicted = predictor(
            tasks,
            np.array([[t.batch for t in record.tasks]], dtype=np.float64),
            np.array([[t.resource for t in record.tasks]], dtype=np.float64),
        )[0]
        errors += [abs(p - t.throughput) / t.throughput for p, t in zip(predicted, record.tasks)]
    return round(100 * statistics.fmean(errors), 2) if errors else None


def alone_ratio(profiled: Sequence, reference: Sequence) -> float | None:
    """Median of this calibration's single-task throughput on the whole GPU over the reference's, by (model,
    batch): how far the two data files' machines and measurements agree before any co-location."""
    full = {
        (r.tasks[0].model, r.tasks[0].batch): r.tasks[0].throughput
        for r in reference
        if len(r.tasks) == 1 and r.tasks[0].resource == 100
    }
    ratios = [
        r.tasks[0].throughput / full[key]
        for r in profiled
        if len(r.tasks) == 1
        and r.tasks[0].resource == 100
        and (key := (r.tasks[0].model, r.tasks[0].batch)) in full
    ]
    return round(statistics.median(ratios), 3) if ratios else None


def against_reference(base, refined, profiled: Sequence, path: Path) -> dict:
    """The calibrated predictor, before and after refinement, on the reference file's combinations that the
    calibration never profiled."""
    from predictor.records import load_records

    reference = load_records(path)
    unseen = never_profiled(reference, profiled)
    return {
        "file": str(path),
        "records": len(unseen),
        "combinations": len({r.combination for r in unseen}),
        "mape_unseen": records_mape(base, unseen),
        "mape_unseen_refined": records_mape(refined, unseen),
        "alone_ratio": alone_ratio(profiled, reference),
    }


def main(argv: list[str] | None = None) -> int:
    import json

    from agent import jobs
    from agent.calibration import PoolMeasure, calibrate_gpu, generic_target, measuring_left
    from agent.mps import mps_sharing
    from bench.colocation import SCENARIOS
    from predictor.correction import CorrectedPredictor
    from predictor.records import load_records
    from predictor.runtime import OnnxPredictor, card_path

    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    folder = args.folder or Path(tempfile.mkdtemp(prefix="calibration-", dir=args.out))
    folder.mkdir(parents=True, exist_ok=True)
    before = Progress.load(folder)
    measure_s, last_call = this_call(before, args.budget_s, args.call_s)
    target = generic_target(args.resolution)
    scenarios = [SCENARIOS[name] for name in ("heavy", "light", "hybrid")]
    with mps_sharing() as sharing:
        began = time.monotonic()
        result = calibrate_gpu(
            target,
            folder,
            sharing,
            measure_s=measure_s,
            window_s=args.window_s,
            repeats=args.repeats,
            fit=last_call,
        )
        spent = Progress(
            calls=before.calls + 1,
            seconds=before.seconds + time.monotonic() - began,
            measured_s=before.measured_s + result.measured_s,
        )
        if not last_call:
            spent.save(folder)
            print(
                f"measured {spent.measured_s:.0f} s in {spent.calls} call(s), "
                f"{measuring_left(args.budget_s, spent.measured_s):.0f} s left: continue with --folder {folder}"
            )
            return 0
        minutes = spent.seconds / 60
        card = json.loads(card_path(result.predictor).read_text())
        predictor = CorrectedPredictor(OnnxPredictor(result.predictor))
        # refinement measures at the shares Eq. 5 picks: none of the profiling levels' workers is started ahead
        init = jobs.Init(device="cuda", cuda_graphs=target.cuda_graphs)
        with PoolMeasure(target, sharing, init, window_s=args.window_s, levels=()) as pool:

            def measure(models, batch, resources):
                from predictor.records import Config, Workload

                config = Config(
                    tuple((Workload(m, args.resolution), batch, r) for m, r in zip(models, resources))
                )
                return pool(config)[0]

            rounds = refine(predictor, scenarios, measure, args.resolution, args.rounds)
    profiled = load_records(result.data)
    held_out = card_unseen(profiled, card)
    report = {
        "device": describe_device(),
        "minutes": round(minutes, 2),
        "mape_unseen": records_mape(predictor.base, held_out),
        "mape_unseen_refined": records_mape(predictor, held_out),
        "card_mape_percent": card["mape_percent"],
        "calls": spent.calls,
        "windows": len(profiled),  # records measured, by every call
        "co_location_windows": sum(len(r.tasks) > 1 for r in profiled),
        "median_spread": median_spread(profiled),
        "rounds": msgspec.to_builtins(rounds),
        "data": str(result.data),
    }
    if args.reference:
        report["reference"] = against_reference(predictor.base, predictor, profiled, args.reference)
    write_json(args.out / "calibration.json", report)
    print(json.dumps({k: report[k] for k in ("minutes", "mape_unseen", "mape_unseen_refined")}))
    return 0


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--budget-s", type=float, default=900.0)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--window-s", type=float, default=WINDOW_S)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--reference",
        type=Path,
        help="another data file of this GPU model (e.g. predictor/data/nvidia-h200.jsonl): the predictor's MAPE "
        "on its combinations that the calibration never profiled",
    )
    parser.add_argument(
        "--folder", type=Path, help="the run's data folder, kept across calls (default: a new one)"
    )
    parser.add_argument(
        "--call-s", type=float, help="measure at most this long in this call (default: no limit)"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
