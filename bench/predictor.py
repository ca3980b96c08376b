"""Predictor benchmarks (FedMT Sec. IV-V, Fig. 7 and 13, Table II).

    python -m bench.predictor measure --predictor M.onnx   # GPU + MPS: completion degree and random-schedule rank
    python -m bench.predictor cost --predictor M.onnx      # CPU: time of the Algorithm 1 search, 3 and 5 tasks
    python -m bench.predictor report --predictor M.onnx    # predictor.json / .md / .png from the above + model card

Completion degree: for fixed batches (the paper's Table III settings), every R vector of a grid is measured in
a synchronised window (agent.windows) through a pool of warm workers, one per (model, R_i), each prepared with
its model on device-resident synthetic data; the search's pick (Eq. 5 on the same grid) is compared with the
best measured vector. Rank: the pick of Eq. 5 with free batch sizes among random (B_i, R_i) schedules, all
measured.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

from bench.common import Budget, CsvLog, describe_device, read_csv, write_json

LEVELS_2 = (25, 50, 75, 100)
LEVELS_4 = (50, 100)
BATCHES = (16, 32, 64, 128)
SETTINGS = {  # name: (models, batches, R grid)
    "T3-1 R50+V16 B=128,32": (("resnet50", "vgg16"), (128, 32), LEVELS_2),
    "T3-3 R50+M3 B=128,512": (("resnet50", "mobilenet_v3_small"), (128, 512), LEVELS_2),
    "T3-2 R50+V16+M3+D121 B=128": (
        ("resnet50", "vgg16", "mobilenet_v3_small", "densenet121"),
        (128,) * 4,
        LEVELS_4,
    ),
    "T3-4 R50+V16+M3+D121 B=32": (
        ("resnet50", "vgg16", "mobilenet_v3_small", "densenet121"),
        (32,) * 4,
        LEVELS_4,
    ),
}
RANK_SETTING = ("resnet50", "vgg16", "mobilenet_v3_small")
RANK_NAME = "rank " + "+".join(RANK_SETTING)
RANK_SCHEDULES = 125
COLUMNS = ["setting", "kind", "models", "batches", "resources", "throughputs", "sum_p", "predicted_sum_p"]


def _specs(models, resolution):
    from protocol.schemas import ModelSpec

    return [ModelSpec(name=m, num_classes=10, input_size=resolution) for m in models]


def measure(args) -> int:
    from agent import jobs
    from agent.calibration import SYNTHETIC_SAMPLES
    from agent.data import SyntheticData
    from agent.mps import mps_sharing
    from agent.windows import Member, measure_window
    from agent.workers import WorkerPool
    from predictor.features import extract
    from predictor.runtime import OnnxPredictor
    from predictor.search import adapt_batches, best_resources

    out, budget = Path(args.out), Budget(args.budget_s)
    predict = OnnxPredictor(Path(args.predictor))
    log = CsvLog(out / "completion.csv", COLUMNS, append=args.append)
    runs_file = out / "completion.json"
    runs = json.loads(runs_file.read_text())["runs"] if args.append and runs_file.exists() else []
    run = {
        "device": describe_device(),
        "resolution": args.resolution,
        "window_s": args.window_s,
        "repeats": args.repeats,
    }
    write_json(runs_file, {"runs": [*runs, run]})

    def chosen(name: str) -> bool:
        return any(name.startswith(prefix) for prefix in args.settings)

    def window(pool, setting, kind, specs, batches, resources, tasks) -> None:
        # One worker per (model, R_i), launched under `sharing` (the MPS daemon of the `with` below).
        members = [
            Member(
                (s.name, float(r)),
                sharing.launch_for(s.name, float(r)),
                jobs.Prepare(model=s, data=SyntheticData(samples=SYNTHETIC_SAMPLES, seed=0)),
                jobs.Measure(batch=int(b), seconds=args.window_s, warmup_steps=2),
            )
            for s, b, r in zip(specs, batches, resources)
        ]
        measured = [m.images_per_s for m in measure_window(pool, members).results]
        predicted = predict(tasks, np.array([batches]), np.array([resources]))[0]
        log.add(
            {
                "setting": setting,
                "kind": kind,
                "models": "+".join(s.name for s in specs),
                "batches": " ".join(map(str, batches)),
                "resources": " ".join(f"{r:g}" for r in resources),
                "throughputs": " ".join(f"{t:.1f}" for t in measured),
                "sum_p": round(sum(measured), 1),
                "predicted_sum_p": round(float(predicted.sum()), 1),
            }
        )

    with mps_sharing() as sharing, WorkerPool(jobs.Init(device="cuda")) as pool:
        for name in filter(chosen, SETTINGS):
            models, batches, levels = SETTINGS[name]
            if budget.left() < len(levels) ** len(models) * 1.6 * args.repeats:
                print(f"budget left {budget.left():.0f} s: skipping {name}", flush=True)
                continue
            specs = _specs(models, args.resolution)
            tasks = [extract(s) for s in specs]
            pick = best_resources(tasks, batches, predict, grid=levels).resources
            for _ in range(args.repeats):  # whole rounds, so that drift spreads over every grid point alike
                window(pool, name, "pick", specs, batches, [float(r) for r in pick], tasks)
                for resources in itertools.product(levels, repeat=len(models)):
                    window(pool, name, "grid", specs, batches, [float(r) for r in resources], tasks)
            print(f"{name}: measured {len(levels) ** len(models)} grid points x {args.repeats}", flush=True)
        if not chosen(RANK_NAME):
            return 0
        specs = _specs(RANK_SETTING, args.resolution)
        tasks = [extract(s) for s in specs]
        name = RANK_NAME
        pick = adapt_batches(
            tasks, [1] * len(tasks), [BATCHES] * len(tasks), predict, tolerance=1e9, grid=LEVELS_2
        )
        window(
            pool,
            name,
            "pick",
            specs,
            [int(b) for b in pick.batches],
            [float(r) for r in pick.resources],
            tasks,
        )
        rng = random.Random(0)
        for _ in range(RANK_SCHEDULES):
            if budget.left() < 3:
                print("budget spent during the random schedules", flush=True)
                break
            batches = [rng.choice(BATCHES) for _ in specs]
            window(pool, name, "random", specs, batches, [float(rng.choice(LEVELS_2)) for _ in specs], tasks)
    return 0


def cost(args) -> int:
    """Median wall time of Algorithm 1 (permutations x batch variations, as in Table II) and of the whole
    configure() (Eq. 6 with Eq. 5 inside, then Algorithm 1) with the ONNX predictor, on this machine's CPU."""
    import platform

    from predictor.features import extract
    from predictor.runtime import OnnxPredictor
    from predictor.search import configure, order_tasks

    predict = OnnxPredictor(Path(args.predictor))
    cases = {
        "3 tasks (V16, R18, M3)": ("vgg16", "resnet18", "mobilenet_v3_small"),
        "5 tasks (+R50, D121)": ("vgg16", "resnet18", "mobilenet_v3_small", "resnet50", "densenet121"),
    }
    results = {}
    for name, models in cases.items():
        tasks = [extract(s) for s in _specs(models, args.resolution)]
        n = len(tasks)
        volumes, candidates, comm = list(range(1, n + 1)), [BATCHES] * n, [0.5] * n
        whole = configure(tasks, volumes, candidates, comm, comm, predict)  # also warms onnxruntime up

        algorithm1 = partial(order_tasks, tasks, volumes, whole.batches, comm, comm, predict, whole.resources)
        whole_search = partial(configure, tasks, volumes, candidates, comm, comm, predict)
        timed = (("algorithm1", algorithm1), ("plan", whole_search))  # "plan": the key of search_cost.json
        timings = {key: _median_ms(fn, args.repeats) for key, fn in timed}
        results[name] = {
            "tasks": n,
            "algorithm1_ms": timings["algorithm1"],
            "plan_ms": timings["plan"],
            "algorithm1_points": algorithm1().evaluated_points,
            "order": list(whole.order),
            "batches": list(whole.batches),
            "resources": list(whole.resources),
        }
        print(
            f"{name}: Algorithm 1 {timings['algorithm1']} ms ({results[name]['algorithm1_points']} points), "
            f"whole configure() {timings['plan']} ms (median of {args.repeats})"
        )
    write_json(
        Path(args.out) / "search_cost.json",
        {
            "cpu": platform.processor() or platform.machine(),
            "cores": __import__("os").cpu_count(),
            "cases": results,
        },
    )
    return 0


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return round(1000 * statistics.median(times), 2)


def report(args) -> int:
    out = Path(args.out)
    rows = read_csv(out / "completion.csv")
    card = json.loads(Path(args.predictor).with_suffix(".card.json").read_text())
    search = json.loads((out / "search_cost.json").read_text())["cases"]
    settings: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        settings.setdefault(row["setting"], []).append(row)
    completion, ranks = [], []
    for name, windows in settings.items():
        if name in SETTINGS:
            points, expected = {r["resources"] for r in windows if r["kind"] == "grid"}, _grid_size(name)
            if len(points) < expected:
                print(f"{name}: only {len(points)} of {expected} grid points measured; not reported")
                continue
            completion.append({"setting": name} | completion_degree(windows))
        elif name == RANK_NAME and len(windows) > 1:  # else the budget ended before any random schedule
            pick = next(float(r["sum_p"]) for r in windows if r["kind"] == "pick")
            measured = [float(r["sum_p"]) for r in windows if r["kind"] == "random"]
            better = sum(m > pick for m in measured)
            ranks.append(
                {
                    "setting": name,
                    "schedules": len(measured),
                    "rank": better + 1,
                    "top_percent": round(100 * (better + 1) / (len(measured) + 1), 1),
                }
            )
    three, five = (search[k]["algorithm1_ms"] for k in search)
    plan_three, plan_five = (search[k]["plan_ms"] for k in search)
    summary = {
        "device": card["gpu"],
        "mape_seen": card["mape_percent"]["seen"],
        "mape_unseen": card["mape_percent"]["unseen"],
        "completion_degree": completion,
        "random_schedule_rank": ranks,
        "search_ms_3tasks": three,
        "search_ms_5tasks": five,
        "plan_ms_3tasks": plan_three,
        "plan_ms_5tasks": plan_five,
        "predictor": card["onnx"]["file"],
        "data": card["data"],
        "command": "python -m bench.predictor measure|cost|report --predictor " + args.predictor,
    }
    write_json(out / "predictor.json", summary)
    lines = [
        f"Predictor on {card['gpu']}: MAPE {card['mape_percent']['seen']}% (seen combinations), "
        f"{card['mape_percent']['unseen']}% (unseen combinations); Algorithm 1 search {three} ms (3 tasks), "
        f"{five} ms (5 tasks); whole plan (Eq. 6, Eq. 5, Algorithm 1) {plan_three} ms and {plan_five} ms.",
        "",
        "| setting | pick R_i | best measured R_i | windows per point | completion degree | rank in grid |",
        "|---|---|---|---:|---:|---:|",
    ]
    lines += [
        f"| {c['setting']} | {c['pick']} | {c['best']} | {c['windows_per_point']} | {c['completion_degree']:.3f} "
        f"| {c['rank_in_grid']}/{c['grid_points']} |"
        for c in completion
    ]
    lines += [
        f"\nRandom schedules ({r['setting']}): the pick ranks {r['rank']} of {r['schedules'] + 1} "
        f"(top {r['top_percent']}%)."
        for r in ranks
    ]
    (out / "predictor.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(rows, completion, out / "predictor.png")
    return 0


def completion_degree(windows: list[dict[str, str]]) -> dict:
    """A grid setting's completion degree: mean measured sum P of the pick over that of the best grid point.

    Every R vector is averaged over all its windows (the pick's own windows count towards its grid point), so
    one lucky window does not make a best point."""
    picks = {r["resources"] for r in windows if r["kind"] == "pick"}
    if len(picks) != 1:
        raise ValueError(
            f"expected one pick per setting, found {sorted(picks)} (results of different predictors?)"
        )
    pick = picks.pop()
    sums: dict[str, list[float]] = {}
    for row in windows:
        sums.setdefault(row["resources"], []).append(float(row["sum_p"]))
    means = {resources: statistics.mean(values) for resources, values in sums.items()}
    best = max(means, key=means.__getitem__)
    return {
        "pick": pick,
        "best": best,
        "completion_degree": round(means[pick] / means[best], 3),
        "grid_points": len(means),
        "windows_per_point": min(len(values) for values in sums.values()),
        "rank_in_grid": 1 + sum(m > means[pick] for m in means.values()),
    }


def _grid_size(setting: str) -> int:
    models, _, levels = SETTINGS[setting]
    return len(levels) ** len(models)


def _plot(rows, completion, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (scatter, bars) = plt.subplots(1, 2, figsize=(12, 4.5))
    for setting in dict.fromkeys(r["setting"] for r in rows):
        points = [(float(r["predicted_sum_p"]), float(r["sum_p"])) for r in rows if r["setting"] == setting]
        scatter.scatter(*zip(*points), s=10, label=setting)
    top = max(max(float(r["sum_p"]), float(r["predicted_sum_p"])) for r in rows)
    scatter.plot([0, top], [0, top], color="gray", lw=0.8)
    scatter.set(
        xlabel="predicted sum P (img/s)", ylabel="measured sum P (img/s)", title="Predicted vs measured"
    )
    scatter.legend(fontsize=7)
    bars.bar(range(len(completion)), [c["completion_degree"] for c in completion])
    bars.set_xticks(range(len(completion)), [c["setting"].split(" ")[0] for c in completion])
    bars.axhline(0.95, color="red", lw=0.8, ls="--", label="target 0.95")
    bars.set(ylim=(0, 1.05), ylabel="measured P(pick) / best of grid", title="Completion degree (Fig. 13)")
    bars.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("measure", "cost", "report"):
        command = sub.add_parser(name)
        command.add_argument("--predictor", required=True)
        command.add_argument("--out", default="bench/results")
        command.add_argument("--resolution", type=int, default=128)
    sub.choices["measure"].add_argument("--window-s", type=float, default=0.8)
    sub.choices["measure"].add_argument("--budget-s", type=float, default=420.0)
    sub.choices["measure"].add_argument(
        "--repeats", type=int, default=1, help="windows per grid point, averaged by report"
    )
    sub.choices["measure"].add_argument(
        "--settings",
        nargs="+",
        default=[""],
        metavar="PREFIX",
        help="only settings named so (T3-1, rank, ...)",
    )
    sub.choices["measure"].add_argument(
        "--append", action="store_true", help="add to completion.csv/json instead of starting them anew"
    )
    sub.choices["cost"].add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    return {"measure": measure, "cost": cost, "report": report}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
