"""Batch adaptation against accuracy: rounds of the demo's tasks at larger batches under each learning-rate rule.

    python -m bench.batch_rules --out bench/results/batch_rules.json     # CPU, 10-25 minutes on 2 cores
    python -m bench.batch_rules --device cuda --cuda-graphs --tasks digits-densenet121 --resolution 128 \
        --steps 600 --rounds 1 --seeds 0 1 2 3 --runs 16:none 26:sqrt 26:linear --out ...  # the GPU round 1

Each run trains one task for --rounds rounds through the task runtime the agent's rounds use (TaskRuntime.train,
a fresh optimiser each round, every round from the last one's model, as FedAvg with one device), on the demo's
digits share for that task at --resolution, and evaluates after each round on the held-out digits. The round's
work is the configured one (local steps at the configured batch B0 = 16, `batch_policy = "scale_lr"`); a run at
batch B takes B0/B of the steps with the rate its rule gives (agent/batching.py). `ramp` grows the batch as plans
do (`batch_ceiling`: B0 at version 0, twofold per version, up to B). A run is named BATCH:RULE (ramp to BATCH:
rampBATCH:RULE). Rows: median and range over --seeds of the accuracy after each round, each round's mean
difference from B0's, paired by seed, with its standard error, and the mean over rounds 2.. against B0's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import msgspec

from agent.batching import batch_ceiling
from bench.common import describe_device, standard_error, write_json
from protocol.schemas import LrScaling, ModelSpec, TaskAssignment

B0 = 16
TASKS = (
    "digits-resnet18",
    "digits-densenet121",
    "digits-shufflenet",
)  # the demo's (testbed.demo.TASKS): model, optimiser, data share
RUNS = ("16:none", "64:sqrt", "64:none", "128:linear", "ramp128:auto")  # the default runs; 16:none is B0's
STEPS = {
    "digits-resnet18": 120,
    "digits-densenet121": 60,
    "digits-shufflenet": 360,
}  # bench.time_to_accuracy's H200 run: 5 epochs a round (DenseNet121: 1 epoch)


@dataclass(frozen=True)
class Run:
    """A run's batch size, learning-rate rule, and whether the batch ramps up to it as plans grow it."""

    batch: int
    rule: str
    ramp: bool = False

    @classmethod
    def parse(cls, label: str) -> Run:
        """`BATCH:RULE` or `rampBATCH:RULE`, e.g. `26:sqrt`."""
        batch, _, rule = label.partition(":")
        ramp = batch.startswith("ramp")
        batch = batch.removeprefix("ramp")
        if not batch.isdigit() or int(batch) < 1 or rule not in get_args(LrScaling):
            raise ValueError(
                f"run {label!r}: expected BATCH:RULE or rampBATCH:RULE, RULE in {get_args(LrScaling)}"
            )
        return cls(int(batch), rule, ramp)

    def __str__(self) -> str:
        """The run's label, as `parse` reads it."""
        return f"{'ramp' if self.ramp else ''}{self.batch}:{self.rule}"


def accuracies(
    task: str,
    run: Run,
    seed: int,
    *,
    resolution: int,
    rounds: int,
    steps: int | None = None,
    device: str = "cpu",
    cuda_graphs: bool = False,
    agent_seeds: bool = False,
) -> list[float]:
    """Accuracy after each of `rounds` rounds of `task` as `run` says, `steps` local steps at B0 a round
    (default: STEPS), trained and evaluated on `device`. The initial model is seed `seed`'s; round r trains with
    the seed an agent's round r takes at `train_seed` 0 under `agent_seeds` (every run then takes the demo
    federation's data order), else with seed x 1000 + r - 1."""
    import torch

    from agent.data import DigitsData
    from agent.data.digits import digits_test_set
    from agent.training import TaskRuntime, evaluate
    from common.models import build_model, state_to_numpy
    from testbed.demo import TASKS as DEMO

    definition, share = DEMO[task]
    model = msgspec.structs.replace(definition.model, input_size=resolution)
    torch.manual_seed(seed)
    state = state_to_numpy(build_model(model, seed=seed))
    runtime = TaskRuntime(model, DigitsData(fraction=share), device=device, cuda_graphs=cuda_graphs)
    test, result = digits_test_set(model), []
    try:
        for version in range(rounds):
            planned = _assignment(task, model, definition.optimizer, steps or STEPS[task], version, run.rule)
            batch = min(run.batch, batch_ceiling(planned)) if run.ramp else run.batch
            planned = msgspec.structs.replace(planned, batch_size=batch)
            round_seed = planned.round_seed(version + 1) if agent_seeds else seed * 1000 + version
            delta = runtime.train(planned, state, seed=round_seed, reference_batch=B0).delta
            state = {name: state[name] + delta[name] for name in state}
            result.append(evaluate(model, state, test, device=device))
    finally:
        runtime.close()
    return result


def _assignment(task, model: ModelSpec, optimizer, steps: int, version: int, scaling: str) -> TaskAssignment:
    return TaskAssignment(
        task=task,
        model=model,
        optimizer=optimizer,
        base_version=version,
        base_sha256="0" * 64,
        local_steps=steps,
        batch_size=B0,
        lr_scaling=scaling,
    )


def main(argv: list[str] | None = None) -> int:
    import torch
    from rich.console import Console
    from rich.progress import track
    from rich.table import Table

    args = parse(argv)
    torch.set_num_threads(args.threads)
    # seeds outermost: a drift of the machine spreads over every run
    runs = [(t, run, s) for s in args.seeds for t in args.tasks for run in args.runs]
    measured = {
        (t, run, s): accuracies(
            t,
            run,
            s,
            resolution=args.resolution,
            rounds=args.rounds,
            steps=args.steps,
            device=args.device,
            cuda_graphs=args.cuda_graphs,
            agent_seeds=args.agent_seeds,
        )
        for t, run, s in track(runs)
    }
    rows = [
        _row(
            task,
            str(run),
            [measured[task, run, s] for s in args.seeds],
            [measured[task, args.reference, s] for s in args.seeds],
        )
        for task in args.tasks
        for run in args.runs
    ]
    device = describe_device() if args.device == "cuda" else {"gpu": "cpu"}
    title = f"Accuracy per round (median of {len(args.seeds)} seeds), {args.resolution} px, {device['gpu']}"
    table = Table(title=title)
    for column in ("task", "run", *(f"r{r + 1}" for r in range(args.rounds)), "last round vs B0 (pts)"):
        table.add_column(column, justify="left" if column in ("task", "run") else "right")
    for row in rows:
        cells = [f"{100 * a:.1f}" for a in row["accuracy_per_round"]]
        gap, error = row["vs_b0_pts_per_round"][-1], row["vs_b0_pts_stderr_per_round"][-1]
        table.add_row(row["task"], row["run"], *cells, f"{gap:+.1f} +- {error:.1f}")
    Console().print(table)
    write_json(
        args.out,
        {
            "device": device,
            "settings": vars(args)
            | {
                "out": str(args.out),
                "runs": [str(run) for run in args.runs],
                "reference": str(args.reference),
                "steps_at_b0": {t: args.steps or STEPS[t] for t in args.tasks},
            },
            "rows": rows,
        },
    )
    print(f"wrote {args.out}")
    return 0


def _row(task: str, label: str, per_seed: list[list[float]], reference: list[list[float]]) -> dict:
    """A run's figures: the median and range of each round's accuracy over seeds, and its differences from the
    reference run's (B0's), paired by seed, in points."""
    gaps = [[100 * (a - b) for a, b in zip(run, ref)] for run, ref in zip(per_seed, reference)]
    later = [
        statistics.fmean(run[1:]) - statistics.fmean(ref[1:])
        for run, ref in zip(per_seed, reference)
        if len(run) > 1
    ]
    return {
        "task": task,
        "run": label,
        "accuracy_per_round": [statistics.median(r) for r in zip(*per_seed)],
        "range_per_round": [[min(r), max(r)] for r in zip(*per_seed)],
        "vs_b0_pts_per_round": [statistics.fmean(g) for g in zip(*gaps)],
        "vs_b0_pts_stderr_per_round": [standard_error(g) or 0.0 for g in zip(*gaps)],  # one seed: 0
        "later_rounds_vs_b0_pts": 100 * statistics.fmean(later) if later else None,
        "per_seed": per_seed,
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/batch_rules.json"))
    parser.add_argument("--tasks", nargs="+", default=["digits-resnet18", "digits-shufflenet"], choices=TASKS)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), metavar="BATCH:RULE", help=Run.parse.__doc__)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4, choices=range(1, 101), metavar="1..100")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, help="local steps at B0 a round, every task (default: STEPS)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--cuda-graphs", action="store_true", help="capture the training step (TaskRuntime's)"
    )
    parser.add_argument(
        "--agent-seeds",
        action="store_true",
        help="round r trains with seed r, as the agents' rounds do (--seeds then vary the initial model alone)",
    )
    args = parser.parse_args(argv)
    try:
        args.runs = [Run.parse(label) for label in args.runs]
    except ValueError as error:
        parser.error(str(error))
    args.reference = Run(B0, "none")
    if args.reference not in args.runs:
        parser.error(f"--runs must include {args.reference}, the configured batch every run is compared with")
    return args


if __name__ == "__main__":
    sys.exit(main())
