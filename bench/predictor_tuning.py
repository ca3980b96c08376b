"""Choosing the predictor's size and training length without touching its test sets.

    python -m bench.predictor_tuning --data predictor/data/nvidia-h200.jsonl --out bench/results/h200

Carves a validation set out of the training split that `fedmt-predictor fit` uses (the seen and unseen test
sets stay unseen), trains a small ensemble per (hidden, epochs) candidate and reports train and validation
MAPE; `tuning.json` keeps the table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import write_json

CANDIDATES = (
    (16, 2000),
    (32, 2000),
    (64, 2000),
    (32, 4000),
    (64, 4000),
    (32, 8000),
    (32, 12000),
    (32, 16000),
)


def tune(args: argparse.Namespace) -> int:
    from predictor.dataset import build, split
    from predictor.model import train
    from predictor.records import load_records
    from predictor.training import samples_mape

    samples = build(load_records(args.data))
    training = samples.take(split(samples, seed=0).train)
    order = np.random.default_rng(args.seed).permutation(len(training))
    cut = round(args.validation_share * len(training))
    fit_set, validation = training.take(order[cut:]), training.take(order[:cut])
    rows = []
    print(f"{len(fit_set)} training / {len(validation)} validation records of {args.data}")
    print("| hidden | epochs | train MAPE % | validation MAPE % | seconds |\n|---:|---:|---:|---:|---:|")
    for hidden, epochs in CANDIDATES:
        started = time.perf_counter()
        model = train(
            fit_set.x, fit_set.mask, fit_set.throughput, hidden=hidden, members=args.members, epochs=epochs
        )
        row = {
            "hidden": hidden,
            "epochs": epochs,
            "train_mape": samples_mape(model, fit_set),
            "validation_mape": samples_mape(model, validation),
            "seconds": round(time.perf_counter() - started, 1),
        }
        rows.append(row)
        print(f"| {hidden} | {epochs} | {row['train_mape']} | {row['validation_mape']} | {row['seconds']} |")
    best = min(rows, key=lambda r: r["validation_mape"])
    print(f"best: hidden {best['hidden']}, epochs {best['epochs']}")
    write_json(
        Path(args.out) / "tuning.json",
        {
            "data": str(args.data),
            "members": args.members,
            "validation_records": cut,
            "rows": rows,
            "best": best,
        },
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a profiling data file")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--members", type=int, default=3, help="networks per candidate ensemble")
    parser.add_argument("--validation-share", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=1)
    return tune(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
