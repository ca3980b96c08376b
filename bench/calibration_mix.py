"""What a short calibration should measure, replayed on a large data file: bench/results/calibration_mix.json.

    python -m bench.calibration_mix --mix 26:25 10:41 23:91 --draws 3     # CPU, ~1.5 minutes a fit on 2 cores

A calibration first measures every model alone on all the SMs (the baselines), then spends the rest of its budget
on windows alone at lower shares and on co-locations. Each --mix LOW:CO draws that calibration's data from a data
file measured at length on one GPU (default: the shipped H200 set): its baselines, LOW single-task windows at
lower shares and CO co-locations (half of them on the benchmarks' focus combinations, as
predictor.records.sample_configs picks), fits the network a calibration of that size fits
(agent.calibration.calibration_network) and reports its MAPE on every co-location of the file whose model
combination the draw never holds. Draws differ by seed; each mix reports every draw's MAPE.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.progress import track

from bench.calibration import never_profiled
from predictor.records import FOCUS, Record, load_records


def draw(records: Sequence[Record], low: int, co: int, seed: int) -> list[Record]:
    """Baselines, `low` windows alone at lower shares and `co` co-locations, half of them on FOCUS."""
    rng = random.Random(seed)
    alone = [r for r in records if len(r.tasks) == 1]
    focus = {tuple(sorted(c)) for c in FOCUS}
    co_located = [r for r in records if len(r.tasks) > 1]
    if co > len(co_located):
        raise ValueError(f"{co} co-locations asked for, the data file holds {len(co_located)}")
    remaining = [
        [r for r in co_located if r.combination in focus],
        [r for r in co_located if r.combination not in focus],
    ]
    picked = []
    for _ in range(co):
        pool = remaining[0] if rng.random() < 0.5 and remaining[0] else remaining[1] or remaining[0]
        picked.append(pool.pop(rng.randrange(len(pool))))
    baselines = [r for r in alone if r.tasks[0].resource == 100]
    lower = [r for r in alone if r.tasks[0].resource != 100]
    return baselines + rng.sample(lower, low) + picked


def unseen_error(records: Sequence[Record], low: int, co: int, seed: int, epochs: int) -> tuple[float, int]:
    """The MAPE (percent) of a fit on one draw over the file's co-locations of combinations the draw lacks, and
    their number."""
    from agent.calibration import calibration_network
    from predictor.dataset import build, mape
    from predictor.model import predict, train

    profiled = draw(records, low, co, seed)
    unseen = never_profiled(records, profiled)
    fitted, held_out = build(profiled), build(unseen)
    model = train(
        fitted.x,
        fitted.mask,
        fitted.throughput,
        epochs=epochs,
        seed=seed,
        network=calibration_network(profiled),
    )
    return mape(predict(model, held_out.x, held_out.mask), held_out.throughput, held_out.mask), len(unseen)


def main(argv: list[str] | None = None) -> int:
    from bench.common import describe_device, write_json
    from predictor.model import EPOCHS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("predictor/data/nvidia-h200.jsonl"))
    parser.add_argument("--mix", nargs="+", default=["26:25", "10:41", "23:91"], metavar="LOW:CO")
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--out", type=Path, default=Path("bench/results/calibration_mix.json"))
    args = parser.parse_args(argv)
    records = load_records(args.data)
    rows = []
    for mix in args.mix:
        low, co = (int(n) for n in mix.split(":"))
        runs = [
            unseen_error(records, low, co, seed, args.epochs)
            for seed in track(range(args.draws), description=f"mix {mix}")
        ]
        rows.append(
            {
                "lower_share_windows": low,
                "co_locations": co,
                "mape_unseen": [round(e, 2) for e, _ in runs],
                "unseen_records": [n for _, n in runs],
            }
        )
        print(f"{mix}: unseen MAPE {', '.join(f'{e:.1f}%' for e, _ in runs)}", flush=True)
    write_json(
        args.out, {"device": describe_device(), "data": str(args.data), "epochs": args.epochs, "rows": rows}
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
