"""Learning from every round: the round's measured throughputs join the device's data, the predictor's residual
correction (predictor/correction.py) is refit, and a report compares predictions with measurements.

A round gives one record per co-location (predictor.records): all tasks of an MPS round with their B_i and R_i,
or each wave of a `temporal` round alone on the whole GPU (`concurrent` rounds, time-sliced without SM shares,
are not recorded). A task's throughput is its pace while every task of its wave still trained
(agent/runner.py), so a task that finished early does not make the others look faster than their co-location
allows. A wave with a failed task is not recorded.

The report, `<gpu>.refinement.json` next to the data file (and a `refinement` section in the model card of a
predictor that lives there), holds the correction, the cost of its refit and, for the last REPORT_ROUNDS rounds,
each task's predicted and measured throughput.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import msgspec

from agent.history import DeviceHistory
from agent.planning import Planner, RoundPlan
from agent.runner import TaskOutcome
from common.durable import write_atomically
from predictor.correction import CorrectedPredictor, fit_correction, workload_key
from predictor.records import Record, TaskSample, dataset_path, task_spec
from protocol.schemas import GpuInfo

REPORT_ROUNDS = 10
REFIT_RECORDS = 200  # the most recent round records the correction is fitted on


def round_records(
    number: int,
    plan: RoundPlan,
    outcomes: Mapping[str, TaskOutcome],
    gpu: GpuInfo,
    driver: str | None,
    cuda_graphs: bool = False,
) -> list[Record]:
    """The records a finished round gives (see the module docstring); `cuda_graphs`: the agent's steps replay
    from CUDA graphs."""
    if plan.policy == "concurrent":
        return []
    planned = {a.task: a for a in plan.assignments}
    waves: dict[int, list[str]] = {}
    for launch in plan.launches:
        waves.setdefault(launch.wave, []).append(launch.task)
    records = []
    for tasks in waves.values():
        done = [outcomes.get(t) for t in tasks]
        if any(o is None or o.trained is None for o in done):
            continue
        samples = []
        for task, outcome in zip(tasks, done):
            a, metrics = planned[task], outcome.trained.metrics
            measured = outcome.co_run_images_per_s or metrics["images"] / max(metrics["train_s"], 1e-9)
            predicted = plan.predicted.get(task)
            samples.append(
                TaskSample(
                    a.model.name,
                    a.batch_size,
                    float(plan.resources.get(task, 100.0)),
                    round(float(measured), 2),
                    input_size=a.model.input_size,
                    num_classes=a.model.num_classes,
                    predicted=round(float(predicted), 2) if predicted else None,
                )
            )
        records.append(
            Record(
                gpu=gpu.name,
                sm_total=gpu.sm_count or 0,
                driver=driver,
                torch=_torch_version(),
                resolution=samples[0].input_size,
                tasks=samples,
                window_s=round(float(max(o.trained.metrics["train_s"] for o in done)), 3),
                ts=time.time(),
                round=number,
                policy=plan.shares,
                cuda_graphs=cuda_graphs,
            )
        )
    return records


class RoundLearning:
    """The device's history and the planner's correction, kept up to date round after round."""

    def __init__(
        self, directory: Path, gpu: GpuInfo, driver: str | None, planner: Planner, cuda_graphs: bool = False
    ) -> None:
        self.directory, self.gpu, self.driver, self.planner = Path(directory), gpu, driver, planner
        self.cuda_graphs = cuda_graphs  # the agent's steps replay from CUDA graphs: their own data file
        self.data = dataset_path(self.directory, gpu.name, cuda_graphs)
        self.history = DeviceHistory(self.data)
        planner.history = self.history
        self.refit_ms: float | None = None
        self.use(planner.predictor)

    def use(self, predictor) -> None:
        """Plan with `predictor` (a fitted one, or None) corrected by this device's rounds from now on."""
        base = predictor.base if isinstance(predictor, CorrectedPredictor) else predictor
        self.planner.predictor = None if base is None else CorrectedPredictor(base)
        self._refit()

    def observe(self, number: int, plan: RoundPlan, outcomes: Mapping[str, TaskOutcome]) -> list[Record]:
        """Record a finished round, refit the correction and write the report; the records added."""
        records = round_records(number, plan, outcomes, self.gpu, self.driver, self.cuda_graphs)
        for record in records:
            self.history.add(record)
        if records:
            self._refit()
            self._report()
        return records

    def _refit(self) -> None:
        predictor = self.planner.predictor
        if predictor is None:
            return
        started = time.perf_counter()
        predictor.correction = fit_correction(self._observations(predictor.base))
        self.refit_ms = 1000 * (time.perf_counter() - started)

    def _observations(self, base):
        """(workload, base prediction, measurement) of the recent round records the predictor covers."""
        import numpy as np

        from predictor.features import extract

        sizes = base.input_sizes
        for record in list(self.history.rounds)[-REFIT_RECORDS:]:
            specs = [task_spec(record, t) for t in record.tasks]
            if any(s.input_size not in sizes for s in specs) or not 1 <= len(specs) <= 5:
                continue
            predicted = base(
                [extract(s) for s in specs],
                np.array([[t.batch for t in record.tasks]], dtype=np.float64),
                np.array([[t.resource for t in record.tasks]], dtype=np.float64),
            )[0]
            for spec, task, p in zip(specs, record.tasks, predicted):
                yield workload_key(spec.name, spec.input_size), float(p), task.throughput

    def _report(self) -> None:
        recent = self.history.recent(REPORT_ROUNDS)
        predictor = self.planner.predictor
        errors = [abs(t.predicted - t.throughput) / t.throughput for r in recent for t in r.tasks]
        report = {
            "predictor": predictor.path.name if predictor else None,
            "correction": msgspec.to_builtins(predictor.correction) if predictor else None,
            "refit_ms": round(self.refit_ms, 3) if self.refit_ms is not None else None,
            "recent_rounds": len({r.round for r in recent}),
            "mape_recent_percent": round(100 * statistics.fmean(errors), 2) if errors else None,
            "rounds": [
                {
                    "round": r.round,
                    "shares": r.policy,
                    "tasks": [
                        {
                            "model": t.model,
                            "batch": t.batch,
                            "resource": t.resource,
                            "predicted": t.predicted,
                            "measured": t.throughput,
                        }
                        for t in r.tasks
                    ],
                }
                for r in recent
            ],
        }
        path = self.data.with_suffix(".refinement.json")
        write_atomically(path, (json.dumps(report, indent=2) + "\n").encode())
        if predictor is not None and predictor.path.parent.resolve() == self.directory.resolve():
            from predictor.runtime import card_path

            card = card_path(predictor.path)
            content = json.loads(card.read_text())
            content["refinement"] = {k: v for k, v in report.items() if k != "rounds"}
            write_atomically(card, (json.dumps(content, indent=2) + "\n").encode())


def _torch_version() -> str:
    try:
        return version("torch")
    except PackageNotFoundError:
        return "unknown"
