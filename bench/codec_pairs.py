"""Each codec's own accuracy cost, paired: the same round's updates aggregated exact and as the codec decodes them.

    python -m bench.codec_pairs --out bench/results/codec_pairs.json      # CPU, about 5 minutes a seed on 2 cores

The federation's final accuracy cannot tell a codec whose error is small (fp16) from dense: two runs from one
start drift apart, and the spread between seeds is several points (`comm.json`). Here the CPU demo's tasks train
`--rounds` rounds on the dense trajectory (three devices, each task's share of each device's IID digits, split
with the seed; the task runtime the agents use and the aggregator's FedAvg); after each round the devices' updates
are aggregated twice from the same global model, exact and as each codec decodes them, and both models are
evaluated on the 359 held-out digits. Per codec and task: the accuracy drop in each round (exact minus codec,
points) and the update bytes against dense. Stateless codecs only: top-k's error feedback makes its update depend
on its own past.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import msgspec
import numpy as np

from bench import comm
from bench.common import write_json

#: name in the results -> codec: bench.comm's stateless lossy ones
CODECS = {name: comm.CODECS[name] for name in ("fp16", "dct")}


def paired_drops(
    task: str, rounds: int, seed: int, local_steps: int | None = None
) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Per round, each codec's accuracy drop (points) against the exact aggregate; each codec's update bytes
    against dense (summed over the rounds)."""
    import torch

    from agent.data import DigitsData
    from agent.data.digits import digits_test_set
    from agent.training import TaskRuntime, evaluate
    from common.models import build_model, state_to_numpy
    from protocol.codecs import make_codec
    from protocol.tensors import describe
    from testbed.demo import DEVICES, TASKS

    definition, share = TASKS[task]
    torch.manual_seed(seed)
    state = state_to_numpy(build_model(definition.model, seed=seed))
    runtimes = [
        TaskRuntime(
            definition.model,
            DigitsData(num_partitions=len(DEVICES), partition_index=i, fraction=share, seed=seed),
            device="cpu",
        )
        for i in range(len(DEVICES))
    ]
    codecs = {name: make_codec(spec.name, spec.fraction) for name, spec in CODECS.items()}
    dense = make_codec("dense")
    test = digits_test_set(definition.model)
    drops, sizes = [], dict.fromkeys(["dense", *codecs], 0)
    for version in range(rounds):
        assignment = _assignment(task, definition, version, local_steps)
        results = [r.train(assignment, state, seed=seed * 1000 + version) for r in runtimes]
        weights = [r.samples for r in results]
        deltas = [r.delta for r in results]
        layout = describe(deltas[0])
        sizes["dense"] += sum(len(dense.encode(d)) for d in deltas)
        exact = _fedavg(state, deltas, weights)
        reference = evaluate(definition.model, exact, test)
        drops.append({})
        for name, codec in codecs.items():
            payloads = [codec.encode(d) for d in deltas]
            sizes[name] += sum(len(p) for p in payloads)
            decoded = [codec.decode(p, layout) for p in payloads]
            accuracy = evaluate(definition.model, _fedavg(state, decoded, weights), test)
            drops[-1][name] = round(100 * (reference - accuracy), 2)
        state = exact
    return drops, {name: sizes["dense"] / sizes[name] for name in codecs}


def _fedavg(state: dict, deltas: list[dict], weights: list[int]) -> dict[str, np.ndarray]:
    """The aggregator's FedAvg of `deltas` against `state`, each weighted by its device's samples."""
    from aggregator.strategies.fedavg import StreamingFedAvg

    strategy = StreamingFedAvg(state)
    for delta, weight in zip(deltas, weights):
        strategy.fold(delta, weight)
    return strategy.result()


def _assignment(task: str, definition, version: int, local_steps: int | None):
    from protocol.schemas import TaskAssignment

    return TaskAssignment(
        task=task,
        model=definition.model,
        optimizer=definition.optimizer,
        base_version=version,
        base_sha256="0" * 64,
        local_epochs=definition.local_epochs,
        local_steps=local_steps,
        batch_size=definition.batch_size,
    )


def main(argv: list[str] | None = None) -> int:
    import torch
    from rich.console import Console
    from rich.progress import track
    from rich.table import Table

    from testbed.demo import DEVICES, TASKS

    args = parse(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for task, seed in track([(t, s) for t in args.tasks for s in args.seeds], description="tasks x seeds"):
        drops, ratios = paired_drops(task, args.rounds, seed, args.local_steps)
        for name in CODECS:
            per_round = [d[name] for d in drops]
            rows.append(
                {
                    "task": task,
                    "seed": seed,
                    "codec": name,
                    "codec_spec": msgspec.to_builtins(CODECS[name]),
                    "update_bytes_ratio": round(ratios[name], 3),
                    "drop_pts_per_round": per_round,
                    "mean_drop_pts": round(statistics.fmean(per_round), 3),
                    "max_abs_drop_pts": max(abs(d) for d in per_round),
                }
            )
    table = Table(title=f"Paired accuracy drop per round (points), {args.rounds} rounds, seeds {args.seeds}")
    for column in ("task", "seed", "codec", "bytes vs dense", "drop per round", "mean", "max |drop|"):
        table.add_column(column, justify="left" if column in ("task", "codec", "drop per round") else "right")
    for row in rows:
        table.add_row(
            row["task"],
            str(row["seed"]),
            row["codec"],
            f"{row['update_bytes_ratio']:.2f}x",
            " ".join(f"{d:+.2f}" for d in row["drop_pts_per_round"]),
            f"{row['mean_drop_pts']:+.2f}",
            f"{row['max_abs_drop_pts']:.2f}",
        )
    Console().print(table)
    settings = vars(args) | {"out": str(args.out), "devices": len(DEVICES), "tasks": args.tasks}
    settings["local_epochs"] = {t: TASKS[t][0].local_epochs for t in args.tasks}
    write_json(args.out, {"settings": settings, "rows": rows})
    print(f"wrote {args.out}")
    return 0


def parse(argv: list[str] | None) -> argparse.Namespace:
    from testbed.demo import TASKS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/codec_pairs.json"))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--local-steps", type=int, help="steps a round instead of the tasks' epochs (smoke runs)"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
