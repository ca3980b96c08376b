"""Batch adaptation against accuracy: rounds of the demo's tasks at larger batches under each learning-rate rule.

    python -m bench.batch_rules --out bench/results/batch_rules.json     # CPU, about 25 minutes on 2 cores

Each run trains one task for --rounds rounds through the task runtime the agent's rounds use (`TaskRuntime.train`,
a fresh optimiser each round, every round from the last one's model, as FedAvg with one device), on the demo's
digits share for that task at --resolution, and evaluates after each round on the held-out digits. The round's
work is the configured one (local steps at the configured batch B0 = 16, `batch_policy = "scale_lr"`); a run at
batch B takes B0/B of the steps with the rate its rule gives (agent/batching.py). `ramp` grows the batch as plans
do (`batch_ceiling`: B0 at version 0, twofold per version, up to B). Rows: median and range over --seeds of the
accuracy after each round, and the mean over rounds 2.. against B0's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import msgspec

from agent.batching import batch_ceiling
from bench.common import write_json
from protocol.schemas import ModelSpec, TaskAssignment

B0 = 16
TASKS = (
    "digits-resnet18",
    "digits-shufflenet",
)  # the demo's (testbed.demo.TASKS): model, optimiser, data share
RUNS = {  # label -> (batch, lr_scaling, ramp)
    "B0": (B0, "none", False),
    "4x sqrt": (4 * B0, "sqrt", False),
    "4x none": (4 * B0, "none", False),
    "8x linear": (8 * B0, "linear", False),
    "ramp, auto": (8 * B0, "auto", True),  # up to 8x as far as the plans' ceiling allows
}
STEPS = {
    "digits-resnet18": 120,
    "digits-shufflenet": 360,
}  # bench.time_to_accuracy's H200 run: 5 epochs a round


def accuracies(
    task: str, label: str, resolution: int, rounds: int, seed: int, steps: int | None = None
) -> list[float]:
    """Accuracy after each of `rounds` rounds of `task` as `label` says, `steps` local steps at B0 a round
    (default: STEPS)."""
    import torch

    from agent.data import DigitsData
    from agent.data.digits import digits_test_set
    from agent.training import TaskRuntime, evaluate
    from common.models import build_model, state_to_numpy
    from testbed.demo import TASKS as DEMO

    definition, share = DEMO[task]
    model = msgspec.structs.replace(definition.model, input_size=resolution)
    batch, scaling, ramp = RUNS[label]
    torch.manual_seed(seed)
    state = state_to_numpy(build_model(model, seed=seed))
    runtime = TaskRuntime(model, DigitsData(fraction=share), device="cpu")
    test, result = digits_test_set(model), []
    for version in range(rounds):
        planned = _assignment(task, model, definition.optimizer, steps or STEPS[task], version, scaling)
        if label != "B0":
            planned = msgspec.structs.replace(
                planned, batch_size=min(batch, batch_ceiling(planned)) if ramp else batch
            )
        delta = runtime.train(planned, state, seed=seed * 1000 + version, reference_batch=B0).delta
        state = {name: state[name] + delta[name] for name in state}
        result.append(evaluate(model, state, test))
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
    runs = [(t, label, s) for t in args.tasks for label in RUNS for s in range(args.seeds)]
    measured = {
        (t, label, s): accuracies(t, label, args.resolution, args.rounds, s, args.steps)
        for t, label, s in track(runs)
    }
    rows = []
    for task in args.tasks:
        reference = [statistics.fmean(measured[task, "B0", s][1:]) for s in range(args.seeds)]
        for label in RUNS:
            per_seed = [measured[task, label, s] for s in range(args.seeds)]
            later = [statistics.fmean(accs[1:]) for accs in per_seed]
            rows.append(
                {
                    "task": task,
                    "run": label,
                    "accuracy_per_round": [statistics.median(r) for r in zip(*per_seed)],
                    "range_per_round": [[min(r), max(r)] for r in zip(*per_seed)],
                    "later_rounds_mean": statistics.fmean(later),
                    "later_rounds_vs_b0_pts": 100 * statistics.fmean(a - b for a, b in zip(later, reference)),
                    "per_seed": per_seed,
                }
            )
    table = Table(title=f"Accuracy per round (median of {args.seeds} seeds), {args.resolution} px, CPU")
    for column in ("task", "run", *(f"r{r + 1}" for r in range(args.rounds)), "rounds 2.. vs B0 (pts)"):
        table.add_column(column, justify="left" if column in ("task", "run") else "right")
    for row in rows:
        cells = [f"{100 * a:.1f}" for a in row["accuracy_per_round"]]
        table.add_row(row["task"], row["run"], *cells, f"{row['later_rounds_vs_b0_pts']:+.1f}")
    Console().print(table)
    write_json(
        args.out,
        {
            "settings": vars(args)
            | {"out": str(args.out), "steps_at_b0": {t: args.steps or STEPS[t] for t in args.tasks}},
            "rows": rows,
        },
    )
    print(f"wrote {args.out}")
    return 0


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/batch_rules.json"))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4, choices=range(2, 101), metavar="2..100")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, help="local steps at B0 a round, every task (default: STEPS)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
