"""Co-location benchmark (FedMT Fig. 9): every execution policy on the paper's model combinations.

    python -m bench.colocation run --out bench/results      # on a GPU with MPS (as root, or with a running daemon)
    python -m bench.colocation report --out bench/results   # table + plot from the CSV
    python -m bench.colocation refine --predictor P.onnx --refined DIR   # P with a correction fitted on the CSV
    python -m bench.colocation run --predictor P.onnx --rounds 3 ...    # the plan refined round after round

Each policy runs one warm worker process per task (agent.workers), prepared with its model on device-resident
synthetic data and measured in a synchronised window (agent.windows), the task runtime rounds train with; every
task processes the same number of images. P = images of all tasks / wall time (makespan);
P_f (Eq. 2) = sum_i P_i / P_alone_i with P_i a task's throughput while it runs (for `temporal` the tasks never
co-run, so P_i counts over the whole cycle and P_f = 1). Both are normalised by `temporal`. The R_v sweep splits
R_v across tasks in proportion to their workload (training FLOPs per step).

Measurements that beat the noise: every configuration runs `--repeats` windows (default 3) of at least
`--min-window-s` (default 5 s; a first window sizes the image count and is discarded); rows hold the medians and
`P_spread`, (max - min) / median of P over the repetitions. The report calls a difference no larger than the
spread of either side a tie.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from agent import jobs
from agent.calibration import SYNTHETIC_SAMPLES
from agent.config import ExecutionConfig
from agent.data import SyntheticData
from agent.mps import GpuSharing, mps_sharing
from agent.policies import POLICIES, PolicyLaunches, policy_launches, split_by_workload
from agent.windows import Member, Window, measure_window
from agent.workers import WorkerPool
from bench.common import (
    Budget,
    CsvLog,
    UtilizationSampler,
    compare,
    describe_device,
    read_csv,
    spread,
    write_json,
)
from predictor.correction import fit_correction, workload_key
from protocol.schemas import ModelSpec

SCENARIOS = {
    "heavy": ["densenet121", "vgg16", "resnet101"],
    "light": ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x1_0"],
    "hybrid": ["resnet50", "vgg16", "mobilenet_v3_small"],
    "v16+r34": ["vgg16", "resnet34"],
    "r50+r101": ["resnet50", "resnet101"],
    "v16+r18+m3+d121": ["vgg16", "resnet18", "mobilenet_v3_small", "densenet121"],
}
RV_SWEEP = (100, 150, 200, 250, 300)
COLUMNS = [
    "scenario",
    "policy",
    "rv",
    "model",
    "batch",
    "resolution",
    "resource_pct",
    "sm_count",
    "images",
    "seconds",
    "throughput_ips",
    "alone_ips",
    "wall_s",
    "P",
    "P_f",
    "P_norm",
    "P_f_norm",
    "gpu_util",
    "device",
    "repeats",
    "P_spread",
]


@dataclass(frozen=True)
class Run:
    """One configuration to measure, and every (policy, R_v) label it stands for."""

    policy_launches: PolicyLaunches
    labels: list[tuple[str, str]]


def runs_for(
    models: list[str],
    workloads: dict[str, float],
    sharing: GpuSharing,
    policies: list[str],
    planned: dict | None,
) -> list[Run]:
    """The policies (with "sweep": the R_v sweep; "fedmt-predictor": R_i from `planned`); configurations with
    identical R vectors are measured once."""

    def launches_for(policy: str, resources=None) -> PolicyLaunches:
        return policy_launches(
            policy,
            models,
            workloads,
            mps_env=sharing.mps_env,
            no_mps_env=sharing.no_mps_env,
            expected_sms=sharing.expected_sms,
            resources=resources,
        )

    runs: dict[tuple, Run] = {}
    candidates = [(launches_for(p), p, "") for p in policies if p in POLICIES]
    if "fedmt-predictor" in policies:
        candidates.append((launches_for("fedmt", planned), "fedmt-predictor", ""))
    for rv in RV_SWEEP if "sweep" in policies else ():
        shares = split_by_workload([workloads[m] for m in models], rv)
        candidates.append((launches_for("fedmt", dict(zip(models, shares))), "sweep", str(rv)))
    for launches, label, rv in candidates:
        rv = rv or (f"{sum(launches.resources.values()):.0f}" if launches.resources else "")
        key = tuple((launch.wave, tuple(sorted(launch.env.items()))) for launch in launches.launches)
        runs.setdefault(key, Run(launches, [])).labels.append((label, rv))
    return list(runs.values())


def measure(
    pool: WorkerPool,
    run: Run,
    prepares: dict[str, jobs.Prepare],
    batch: int,
    images: int,
    repeats: int = 3,
    min_window_s: float = 5.0,
) -> tuple[list[Window], float | None]:
    """`repeats` synchronised windows over the run's workers (one wave per launch wave: `temporal` runs them in
    turn), each at least `min_window_s` long (a first window sizes the image count; it is not kept); results in
    launch order."""
    launches = run.policy_launches.launches
    waves = [
        [i for i, launch in enumerate(launches) if launch.wave == wave]
        for wave in sorted({launch.wave for launch in launches})
    ]

    def window(count: int) -> Window:
        command = jobs.Measure(batch=batch, images=count, warmup_steps=5)
        members = [Member(launch.task, launch, prepares[launch.task], command) for launch in launches]
        return measure_window(pool, members, waves)

    probe = window(images)
    if probe.wall_s < min_window_s:
        images = batch * math.ceil(images * 1.1 * min_window_s / probe.wall_s / batch)
    with UtilizationSampler() as sampler:
        windows = [window(images) for _ in range(repeats)]
    return windows, sampler.mean


def _close(pool: WorkerPool, starting: list[threading.Thread]) -> None:
    """End a run's workers once their background starts are done (a start still under way would outlive it)."""
    for thread in starting:
        thread.join()
    pool.close()


def run_scenario(name: str, models: list[str], args, sharing: GpuSharing, log: CsvLog, device: str) -> None:
    """Measure every policy of one scenario, then `args.rounds` refinement rounds of the predictor's plan."""
    from predictor.features import extract

    specs = {m: ModelSpec(name=m, num_classes=10, input_size=args.resolution) for m in models}
    features = {m: extract(spec) for m, spec in specs.items()}
    workloads = {m: f.flops_per_sample * args.batch for m, f in features.items()}
    predict = refined_predictor(Path(args.predictor)) if args.predictor else None
    planned = plan_resources(predict, list(features.values()), args.batch, args.images) if predict else None
    runs = runs_for(models, workloads, sharing, args.policies, planned and dict(zip(models, planned)))
    prepares = {
        m: jobs.Prepare(model=spec, data=SyntheticData(samples=SYNTHETIC_SAMPLES, seed=0))
        for m, spec in specs.items()
    }
    init = jobs.Init(device="cuda", cuda_graphs=args.cuda_graphs)
    pools = [WorkerPool(init) for _ in runs]  # one per run: its workers keyed by task
    # Start every run's processes at once (idle ones use no SMs); each is prepared when its run is measured.
    starting = [
        [pool.prestart(launch.task, launch) for launch in run.policy_launches.launches]
        for pool, run in zip(pools, runs)
    ]
    rows, alone = [], {}
    try:
        for run, pool, threads in zip(runs, pools, starting):
            rows += _measured_rows(name, run, pool, threads, prepares, alone, args, device)
    finally:
        for pool, threads in zip(pools, starting):
            _close(pool, threads)
    errors = []  # each plan's MAPE, by the predictor it was made with
    for k in range(1, args.rounds + 1):
        # as an agent that runs the plan each round: its error noted, the correction refit on this scenario's plans
        # so far, the next plan scored against what was measured
        errors.append(_plan_error(predict, features, rows))
        predict.correction = fit_correction(_observations(predict, features, rows))
        recent = statistics.fmean(errors[-ExecutionConfig().error_rounds :])
        shares = plan_resources(
            predict, list(features.values()), args.batch, args.images, _measured(rows, models), recent
        )
        (run,) = runs_for(models, workloads, sharing, ["fedmt-predictor"], dict(zip(models, shares)))
        run = Run(run.policy_launches, [(f"fedmt-round{k}", rv) for _, rv in run.labels])
        pool = WorkerPool(init)
        threads = [pool.prestart(launch.task, launch) for launch in run.policy_launches.launches]
        try:
            rows += _measured_rows(name, run, pool, threads, prepares, alone, args, device)
        finally:
            _close(pool, threads)
    temporal_p = next(r["P"] for r in rows if r["policy"] == "temporal")
    temporal_pf = next(r["P_f"] for r in rows if r["policy"] == "temporal")
    for row in rows:
        row |= {"P_norm": round(row["P"] / temporal_p, 3), "P_f_norm": round(row["P_f"] / temporal_pf, 3)}
        log.add(row)


def _measured_rows(name, run, pool, threads, prepares, alone, args, device) -> list[dict]:
    """Measure one run and return its rows; a `temporal` run first fills `alone` with each task's throughput."""
    windows, util = measure(pool, run, prepares, args.batch, args.images, args.repeats, args.min_window_s)
    _close(pool, threads)
    if run.policy_launches.policy == "temporal":
        alone |= {
            launch.task: statistics.median(w.results[i].images_per_s for w in windows)
            for i, launch in enumerate(run.policy_launches.launches)
        }
    p = [w.images / w.wall_s for w in windows]
    print(
        f"{name:>16} {'/'.join(lbl for lbl, _ in run.labels):>20}: {statistics.median(p):8.0f} img/s "
        f"(spread {spread(p):.1%})  {run.policy_launches.note}",
        flush=True,
    )
    return [
        row
        for label, rv in run.labels
        for row in _rows(name, label, rv, run, windows, alone, util, args, device)
    ]


def _plans(rows: list[dict]) -> list[list[dict]]:
    """The rows of each measured plan of the predictor (`fedmt-predictor`, then the refinement rounds)."""
    return [
        tasks
        for (_, policy, _), tasks in _by_configuration(rows).items()
        if policy == "fedmt-predictor" or policy.startswith("fedmt-round")
    ]


def _at_shares(predict, features: list, tasks: list[dict]) -> list[float]:
    """`predict`'s per-task throughputs for measured rows co-located at their batches and shares."""
    import numpy as np

    shares = np.array([[float(r["resource_pct"]) for r in tasks]])
    batches = np.array([[float(r["batch"]) for r in tasks]])
    return [float(x) for x in predict(features, batches, shares)[0]]


def _plan_error(predict, features: dict, rows: list[dict]) -> float:
    """MAPE (percent) of the last measured plan by `predict`, corrected as it was when that plan was made (the
    caller refits the correction after this)."""
    tasks = _plans(rows)[-1]
    predicted = _at_shares(predict, [features[r["model"]] for r in tasks], tasks)
    return 100 * statistics.fmean(
        abs(p - r["throughput_ips"]) / r["throughput_ips"] for r, p in zip(tasks, predicted)
    )


def _observations(predict, features: dict, rows: list[dict]) -> list[tuple[str, float, float]]:
    """(workload, base prediction, measured throughput) of each task of the predictor's plans measured so far,
    oldest first: what an agent running them has learnt."""
    return [
        (workload_key(r["model"], int(r["resolution"])), b, r["throughput_ips"])
        for tasks in _plans(rows)
        for r, b in zip(tasks, _at_shares(predict.base, [features[r["model"]] for r in tasks], tasks))
    ]


def _rows(scenario, label, rv, run, windows, alone, util, args, device) -> list[dict]:
    """One row per task: medians over the repeated windows (the task's own values from the median window)."""
    temporal = run.policy_launches.policy == "temporal"
    tasks = [launch.task for launch in run.policy_launches.launches]
    ps = [w.images / w.wall_s for w in windows]
    pfs = [
        sum(
            (r.images / w.wall_s if temporal else r.images_per_s) / alone[m] for m, r in zip(tasks, w.results)
        )
        for w in windows
    ]
    window = sorted(windows, key=lambda w: w.images / w.wall_s)[len(windows) // 2]
    p, pf = statistics.median(ps), statistics.median(pfs)
    return [
        {
            "scenario": scenario,
            "policy": label,
            "rv": rv,
            "model": m,
            "batch": args.batch,
            "resolution": args.resolution,
            "resource_pct": round(run.policy_launches.resources.get(m, 100.0), 1),
            "sm_count": sm_count,
            "images": r.images,
            "seconds": round(r.seconds, 4),
            "throughput_ips": round(r.images_per_s, 1),
            "alone_ips": round(alone[m], 1),
            "wall_s": round(window.wall_s, 4),
            "P": round(p, 1),
            "P_f": round(pf, 3),
            "gpu_util": util,
            "device": device,
            "repeats": len(windows),
            "P_spread": round(spread(ps), 4),
        }
        for m, r, sm_count in zip(tasks, window.results, window.sm_counts)
    ]


def refined_predictor(path: Path):
    """The ONNX predictor at `path`, times the correction of `<predictor>.refinement.json` when one lies next to it
    (`refine` writes it, as the agent's learning from rounds does)."""
    import json

    import msgspec

    from predictor.correction import CorrectedPredictor, Correction
    from predictor.runtime import OnnxPredictor

    predict = CorrectedPredictor(OnnxPredictor(path))
    refinement = path.with_suffix(".refinement.json")
    if refinement.exists():
        predict.correction = msgspec.convert(json.loads(refinement.read_text())["correction"], Correction)
    return predict


def plan_resources(
    predict, tasks: list, batch: int, images: int, measured=lambda candidate: None, error: float | None = None
) -> list[float]:
    """R_i (percent) as the agent's `fedmt` plan chooses them with `predict`: Eq. 5 at the scenario's fixed batch,
    every task with `images` images, so minimising the predicted makespan max_i D_i / P_i; then the best of that
    and the static splits (agent/selection.py), each scored by what `measured(candidate)` gives for it (this
    scenario's windows), else by the predictor; with the plans' recent `error` (percent) above the agent's
    threshold, by measurements only."""
    from agent.selection import candidates, choose, trust
    from predictor.search import best_resources, default_grid

    n = len(tasks)
    volumes = [float(images)] * n
    grid = default_grid(n, predict.share_range)
    search = best_resources(tasks, [batch] * n, predict, grid, objective="makespan", volumes=volumes)
    options = candidates([float(r) for r in search.resources], [t.flops_per_sample * batch for t in tasks])
    trusted, note = trust(error, ExecutionConfig().max_prediction_error_pct)
    choice = choose(
        options, tasks, [batch] * n, volumes, predict, measured, trust_model=trusted, error_note=note
    )
    print(f"fedmt-predictor: {choice.note}", flush=True)
    return list(choice.candidate.resources)


def _measured(rows: list[dict], models: list[str]):
    """`plan_resources`'s lookup: per task, the throughput this scenario measured at exactly a candidate's shares
    (any policy's MPS windows: the device history an agent would have after running them), else None."""
    by_shares: dict[tuple[float, ...], list[float]] = {}
    for (_, policy, _), tasks in _by_configuration(rows).items():
        if policy != "temporal" and [r["model"] for r in tasks] == models:
            by_shares[tuple(round(float(r["resource_pct"]), 1) for r in tasks)] = [
                float(r["throughput_ips"]) for r in tasks
            ]
    return lambda candidate: by_shares.get(tuple(candidate.resources))


def _by_configuration(rows: list[dict]) -> dict[tuple[str, str, str], list[dict]]:
    """The rows of each measured configuration (scenario, policy, R_v), in measurement order."""
    result: dict[tuple[str, str, str], list[dict]] = {}
    for row in rows:
        result.setdefault((row["scenario"], row["policy"], row["rv"]), []).append(row)
    return result


def run(args) -> int:
    out = Path(args.out)
    budget = Budget(args.budget_s)
    if args.policies[0] != "temporal":
        raise SystemExit(
            "--policies must start with temporal: it gives the alone throughputs and the baseline"
        )
    if args.rounds and not (args.predictor and "fedmt-predictor" in args.policies):
        raise SystemExit("--rounds refines the predictor's plan: it needs --predictor and fedmt-predictor")
    device = describe_device()
    log = CsvLog(out / f"{args.name}.csv", COLUMNS)
    with mps_sharing() as sharing:
        print(f"device: {device}\nMPS: {sharing.daemon.info.reason}", flush=True)
        write_json(
            out / f"{args.name}.json",
            {
                "device": device,
                "images_per_task": args.images,
                "batch": args.batch,
                "resolution": args.resolution,
                "cuda_graphs": args.cuda_graphs,
                "mps": sharing.daemon.info.reason,
            },
        )
        for name in args.scenarios:
            if budget.left() < 60:
                print(f"time budget spent: skipping {name}", flush=True)
                continue
            run_scenario(name, SCENARIOS[name], args, sharing, log, str(device["gpu"]))
    return report(args)


def report(args) -> int:
    """Markdown table and bar chart from colocation.csv."""
    out = Path(args.out)
    rows = read_csv(out / f"{args.name}.csv")
    runs = {
        key: tasks[0] for key, tasks in _by_configuration(rows).items()
    }  # a configuration's shared columns
    lines = [
        "| scenario | policy | R_v % | P (img/s) | P / temporal | P_f | P_f / temporal | P / P_f | GPU util % |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (scenario, policy, rv), row in runs.items():
        # P / P_f (both against temporal): how much of the fair throughput the tasks keep when their equal
        # images finish apart
        p_norm, p_f_norm = float(row["P_norm"]), float(row["P_f_norm"])
        lines.append(
            f"| {scenario} | {policy} | {rv} | {float(row['P']):.0f} | {p_norm:.2f} | "
            f"{float(row['P_f']):.2f} | {p_f_norm:.2f} | {p_norm / p_f_norm:.2f} | {row['gpu_util']} |"
        )
    lines += [
        "",
        "| scenario | device | policy | vs temporal | vs best static MPS (isolated, sharing) | best R_v of the sweep |",
        "|---|---|---|---:|---:|---|",
    ]
    devices = {r["scenario"]: r["device"] for r in rows}
    for scenario in devices:
        # P and its spread (rows measured before repetitions have none: spread 0)
        p = {
            (pol, rv): (float(r["P"]), float(r.get("P_spread") or 0))
            for (s, pol, rv), r in runs.items()
            if s == scenario
        }
        temporal = p[next(k for k in p if k[0] == "temporal")]
        statics = [v for (pol, _), v in p.items() if pol in ("isolated", "sharing")]
        static = max(statics, key=lambda v: v[0]) if statics else None
        sweep = [(rv, v[0]) for (pol, rv), v in p.items() if pol == "sweep"]
        best_rv = max(sweep, key=lambda x: x[1]) if sweep else None
        for (pol, _), v in p.items():
            if pol.startswith("fedmt"):
                sweep_text = f"{best_rv[0]}% ({best_rv[1] / temporal[0]:.2f}x temporal)" if best_rv else "-"
                lines.append(
                    f"| {scenario} | {devices[scenario]} | {pol} | {compare(*v, *temporal)} | "
                    f"{compare(*v, *static) if static else '-'} | {sweep_text} |"
                )
    if args.predictor:
        lines += ["", *predicted_against_measured(rows, Path(args.predictor))]
    table = "\n".join(lines)
    (out / f"{args.name}.md").write_text(table + "\n")
    print(table)
    _plot(runs, devices, out / f"{args.name}.png")
    return 0


def predictions(rows: list[dict], predict) -> list[tuple[tuple[str, str, str], list[dict], list[float]]]:
    """Per measured configuration (scenario, policy, R_v), its rows and `predict`'s per-task throughputs at their
    batch and R_i (temporal: each task alone at 100%)."""
    import numpy as np

    from predictor.features import extract

    result = []
    for key, tasks in _by_configuration(rows).items():
        features = [
            extract(ModelSpec(name=r["model"], num_classes=10, input_size=int(r["resolution"])))
            for r in tasks
        ]
        batches = [float(r["batch"]) for r in tasks]
        if key[1] == "temporal":
            predicted = [
                float(predict([f], np.array([[b]]), np.array([[100.0]]))[0, 0])
                for f, b in zip(features, batches)
            ]
        else:
            predicted = _at_shares(predict, features, tasks)
        result.append((key, tasks, predicted))
    return result


def predicted_against_measured(rows: list[dict], path: Path) -> list[str]:
    """A markdown table: per configuration, the predictor's per-task throughputs (refined where it has a
    refinement) against the measured ones, their MAPE, and P predicted against measured (every task with the same
    images: temporal's P is n / sum_i 1/P_i, a co-location's n * min_i P_i)."""
    predict = refined_predictor(path)
    lines = [
        f"Predicted against measured ({path.name}, {predict.correction.observations} observations refining it):",
        "",
        "| scenario | policy | R_v % | per task: predicted / measured (img/s) | MAPE | P predicted / measured |",
        "|---|---|---|---|---:|---:|",
    ]
    errors = []
    for (scenario, policy, rv), tasks, predicted in predictions(rows, predict):
        p = (
            len(tasks) / sum(1 / x for x in predicted)
            if policy == "temporal"
            else len(tasks) * min(predicted)
        )
        measured = [float(r["throughput_ips"]) for r in tasks]
        task_errors = [abs(x - m) / m for x, m in zip(predicted, measured)]
        errors += task_errors
        pairs = ", ".join(f"{r['model']} {x:.0f} / {m:.0f}" for r, x, m in zip(tasks, predicted, measured))
        lines.append(
            f"| {scenario} | {policy} | {rv} | {pairs} | {100 * statistics.mean(task_errors):.1f}% | "
            f"{p:.0f} / {float(tasks[0]['P']):.0f} |"
        )
    lines += ["", f"MAPE over {len(errors)} task throughputs: {100 * statistics.mean(errors):.1f}%"]
    return lines


def refine(args) -> int:
    """A refined copy of the predictor: the ONNX and its card in --refined, beside them the correction (as the
    agent learns it from its rounds, predictor.correction) fitted on every window of <name>.csv, in its order.
    `run --predictor <refined>/<file>.onnx` plans with it."""
    import shutil

    import msgspec

    from predictor.runtime import OnnxPredictor, card_path

    source, csv_path = Path(args.predictor), Path(args.out) / f"{args.name}.csv"
    observations = [
        (workload_key(r["model"], int(r["resolution"])), p, float(r["throughput_ips"]))
        for _, tasks, predicted in predictions(read_csv(csv_path), OnnxPredictor(source))
        for r, p in zip(tasks, predicted)
    ]
    correction = fit_correction(observations)
    folder = Path(args.refined)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / source.name
    for path in (source, card_path(source)):
        shutil.copyfile(path, folder / path.name)
    report = {
        "predictor": source.name,
        "correction": msgspec.to_builtins(correction),
        "windows_of": str(csv_path),
    }
    write_json(target.with_suffix(".refinement.json"), report)
    print(f"wrote {target} with its correction from {len(observations)} task throughputs: {correction}")
    return 0


def _plot(runs: dict, devices: dict[str, str], path: Path) -> None:
    """Bars per scenario and policy, and the R_v sweep; scenarios are labelled with their GPU when several ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(s for s, _, _ in runs))
    policies = [
        p
        for p in ("temporal", "concurrent", "isolated", "sharing", "fedmt", "fedmt-predictor")
        if any(pol == p for _, pol, _ in runs)
    ] + sorted({pol for _, pol, _ in runs if pol.startswith("fedmt-round")})
    figure, (bars, sweep) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(policies)
    for i, policy in enumerate(policies):
        values = [
            next((float(r["P_norm"]) for (s, p, _), r in runs.items() if s == sc and p == policy), 0.0)
            for sc in scenarios
        ]
        bars.bar([x + i * width for x in range(len(scenarios))], values, width, label=policy)
    several_gpus = len(set(devices.values())) > 1
    labels = [f"{sc}\n{devices[sc].removeprefix('NVIDIA ')}" if several_gpus else sc for sc in scenarios]
    bars.set_xticks([x + 0.4 - width / 2 for x in range(len(scenarios))], labels, rotation=15, fontsize=8)
    bars.set(ylabel="throughput P / temporal", title="Co-location policies (equal data per task)")
    bars.axhline(1, color="gray", lw=0.8)
    bars.legend(fontsize=8)
    for scenario in scenarios:
        points = sorted(
            (int(rv), float(r["P_norm"])) for (s, p, rv), r in runs.items() if s == scenario and p == "sweep"
        )
        sweep.plot([x for x, _ in points], [y for _, y in points], marker="o", label=scenario)
    sweep.set(xlabel="virtual resource R_v (%)", ylabel="P / temporal", title="R_v sweep (R_i by workload)")
    sweep.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    r.add_argument("--batch", type=int, default=64)
    r.add_argument("--resolution", type=int, default=128)
    r.add_argument("--images", type=int, default=3200, help="images per task and run")
    r.add_argument("--budget-s", type=float, default=540.0, help="skip scenarios that would start after this")
    r.add_argument(
        "--policies", nargs="+", default=[*POLICIES, "sweep"], choices=[*POLICIES, "sweep", "fedmt-predictor"]
    )
    r.add_argument("--repeats", type=int, default=3, help="windows per configuration (median and spread)")
    r.add_argument("--min-window-s", type=float, default=5.0, help="shortest window per configuration")
    r.add_argument(
        "--rounds",
        type=int,
        default=0,
        help="after the policies, this many rounds of the predictor's plan, each planned with the correction "
        "refit on the plans measured before it (fedmt-round1, ...; needs --predictor and fedmt-predictor)",
    )
    r.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="replay training steps from CUDA graphs, as agents with [execution] cuda_graphs do",
    )
    f = sub.add_parser("refine", help="the predictor refined on a run's windows (a refined copy)")
    f.add_argument("--refined", required=True, help="folder of the refined copy")
    for command in (r, sub.add_parser("report"), f):
        command.add_argument(
            "--predictor",
            required=command is f,
            help="ONNX predictor: the fedmt-predictor policy's plan, a table of its error, or the one to refine",
        )
        command.add_argument("--out", default="bench/results")
        command.add_argument("--name", default="colocation", help="file name stem of the results")
    args = parser.parse_args(argv)
    return {"run": run, "report": report, "refine": refine}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
