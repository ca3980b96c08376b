"""Update codecs on the demo federation: bytes moved and accuracy, and round time on slow links.

    python -m bench.comm --out bench/results --seeds 0 1 2   # CPU: about 2.5 hours on 2 cores
    python -m bench.comm --device cuda --seeds --codecs dense topk --mbps 10 --overlap-mbps 400 \
        --overlap-policies concurrent --out bench/results/comm_gpu   # the link rows only, agents on a GPU

Every run is the real demo (testbed.demo: Mosquitto, the aggregator and three agents as processes; digits,
three tasks) with every task's updates in one codec and global models also published as fp16 deltas:
- accuracy and bytes: `--rounds` rounds per codec at full speed, from the initial models of each of `--seeds`
  (one trajectory each: a final accuracy on 359 test images moves by points from one seed to the next, while
  runs from one seed end bit-identical); update_bytes_ratio = dense update bytes / the codec's (all rounds,
  means over the seeds), final_accuracy_drop_pts = dense final accuracy - the codec's (means over the seeds, per
  task, and the largest; each seed's drop kept beside, and the standard error of the mean drop: a codec's
  small change to one update can move a model's trajectory by points, so a drop within it is a tie); the same
  ratio per task (update_bytes_ratio_by_task); download_bytes_ratio = whole global models / their
  deltas, from round 2 on (the dense run of the first seed);
- round time: `--link-rounds` rounds per codec and bandwidth, each agent behind its own throttled link
  (testbed.throttle); the figure is the median wall time of the rounds after the first (which fetches whole
  models);
- overlap: `--overlap-rounds` dense rounds at each `--overlap-mbps` and under each `--overlap-policies` with the
  agents' Algorithm 1 order (each update uploads as its task finishes, while the others train) against the naive
  order (every upload after the round's training); medians of the rounds after the first, and the share of a
  naive round that a device's updates take on its link (their bytes over the bandwidth: the most any order can
  hide).
Each run's demo summary is kept under `--runs`.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path

import msgspec

from bench.common import standard_error, write_json
from protocol.schemas import CodecSpec
from testbed import demo

#: name in the results -> the codec every task's updates use
CODECS = {
    "dense": CodecSpec(name="dense"),
    "fp16": CodecSpec(name="fp16"),
    "topk": CodecSpec(name="topk+zstd", fraction=0.01),
    "topk_warmup": CodecSpec(
        name="topk+zstd", fraction=0.01, warmup_rounds=2
    ),  # DGC's warm-up: 4%, 2%, then 1%
    "topk_momentum": CodecSpec(
        name="topk+zstd", fraction=0.01, warmup_rounds=2, momentum=0.9
    ),  # and DGC's momentum correction (momentum factor masking)
    "topk10": CodecSpec(name="topk+zstd", fraction=0.1),
    "dct": CodecSpec(name="dct", fraction=0.8),
    "dct90": CodecSpec(name="dct", fraction=0.9),
}
DOWNLOAD_CODEC = "fp16+zstd"


def run_demo(
    runs: Path,
    name: str,
    codec: CodecSpec,
    rounds: int,
    mbps: float | None = None,
    reuse: bool = False,
    upload: str = "on_finish",
    policy: str = "concurrent",
    seed: int = 0,
    device: str = "cpu",
) -> dict:
    """One demo run; its summary (also written to runs/<name>/summary.json, and with `reuse` read from there
    when a run of this configuration finished before)."""
    kept = runs / name / "summary.json"
    if reuse and kept.exists():
        summary = json.loads(kept.read_text())
        same = (
            msgspec.convert(summary.get("codec"), CodecSpec) == codec  # fields added since: their defaults
            and summary.get("link", {}).get("mbps") == mbps
            and summary.get("upload", "on_finish") == upload
            and summary.get("policy") == policy
            and summary.get("seed", 0) == seed
            and (summary.get("device", "cpu") == "cpu") == (device == "cpu")  # the GPU's name on cuda
        )
        if same and summary["num_rounds"] == rounds:
            return summary
    options = demo.Options(
        out=(runs / name).resolve(),
        rounds=rounds,
        codec=codec,
        download_codec=DOWNLOAD_CODEC,
        link_mbps=mbps,
        upload=upload,
        policy=policy,
        seed=seed,
        device=device,
    )
    summary = demo.run(options)
    (options.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def codec_row(name: str, runs: list[dict], dense_runs: list[dict]) -> dict:
    """A codec's figures over its runs (one per seed) against dense's runs from the same seeds."""
    finals = [final_accuracy(run) for run in runs]
    dense_finals = [final_accuracy(run) for run in dense_runs]
    tasks = list(dense_finals[0])
    mean = {t: statistics.fmean(f[t] for f in finals) for t in tasks}
    dense_mean = {t: statistics.fmean(f[t] for f in dense_finals) for t in tasks}
    drops = {t: round(100 * (dense_mean[t] - mean[t]), 2) for t in tasks}
    by_seed = {
        t: [round(100 * (d[t] - f[t]), 2) for d, f in zip(dense_finals, finals, strict=True)] for t in tasks
    }
    codec_bytes = statistics.fmean(update_bytes(run) for run in runs)
    return {
        "codec": CODECS[name].name,
        "fraction": CODECS[name].fraction,
        "update_bytes": round(codec_bytes),
        "update_bytes_ratio": round(
            statistics.fmean(update_bytes(run) for run in dense_runs) / codec_bytes, 2
        ),
        "update_bytes_ratio_by_task": _task_ratios(runs, dense_runs),
        "final_accuracy": mean,
        "final_accuracy_drop_pts_per_task": drops,
        "final_accuracy_drop_pts": max(drops.values()),
        "final_accuracy_by_seed": {t: [f[t] for f in finals] for t in tasks},
        "final_accuracy_drop_pts_by_seed": by_seed,
        "final_accuracy_drop_pts_sem": {
            t: None if (error := standard_error(d)) is None else round(error, 2) for t, d in by_seed.items()
        },
        "accuracy": runs[0]["accuracy"],
    }


def update_bytes(summary: dict) -> int:
    return sum(r["update_bytes"] for r in summary["bytes"])


def task_update_bytes(summary: dict) -> dict[str, int] | None:
    """Each task's update bytes over the run's rounds (None: a summary from before the demo counted them)."""
    if not all("update_bytes_by_task" in r for r in summary["bytes"]):
        return None
    return {t: sum(r["update_bytes_by_task"][t] for r in summary["bytes"]) for t in summary["accuracy"]}


def _task_ratios(runs: list[dict], dense_runs: list[dict]) -> dict[str, float] | None:
    """Per task: dense update bytes / the codec's (means over the runs), where every run counted them."""
    codec, dense = [task_update_bytes(r) for r in runs], [task_update_bytes(r) for r in dense_runs]
    if None in codec or None in dense:
        return None
    return {
        t: round(statistics.fmean(d[t] for d in dense) / statistics.fmean(c[t] for c in codec), 2)
        for t in codec[0]
    }


def final_accuracy(summary: dict) -> dict[str, float]:
    return {task: values[-1] for task, values in summary["accuracy"].items()}


def later_round_s(summary: dict) -> float:
    """The median wall time of the rounds after the first."""
    return statistics.median(w for w in summary["round_wall_time_s"][1:] if w is not None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--runs", type=Path, default=Path("runs/comm"))
    parser.add_argument("--codecs", nargs="+", default=list(CODECS), choices=list(CODECS))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument(
        "--seeds",
        nargs="*",
        type=int,
        default=[0],
        help="initial-model seeds of every codec's accuracy runs (none: only the link rows)",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the agents train")
    parser.add_argument("--link-rounds", type=int, default=3)
    parser.add_argument("--mbps", nargs="*", type=float, default=[10.0, 100.0, 400.0])
    parser.add_argument(
        "--dense-repeats",
        type=int,
        default=2,
        help="dense runs from the first seed (a check that they end alike)",
    )
    parser.add_argument(
        "--overlap-mbps",
        nargs="*",
        type=float,
        default=[100.0, 400.0],
        help="bandwidths where dense rounds run in both upload orders",
    )
    parser.add_argument("--overlap-rounds", type=int, default=6, help="rounds per upload order")
    parser.add_argument(
        "--overlap-policies",
        nargs="+",
        default=["concurrent", "temporal"],
        help="execution policies the upload orders are compared under",
    )
    parser.add_argument(
        "--reuse", nargs="*", default=[], help="codecs whose finished runs under --runs to reuse"
    )
    args = parser.parse_args(argv)
    from rich.console import Console

    console = Console()
    results_path = args.out / "comm.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    run = functools.partial(run_demo, args.runs, device=args.device)  # every run: under --runs, on --device
    summaries = {}  # codec -> its runs, one per seed
    for name in args.codecs:
        summaries[name] = []
        for seed in args.seeds:
            console.rule(f"{name}: {args.rounds} rounds at full speed, seed {seed}")
            run_name = f"accuracy-{name}" + (f"-seed{seed}" if seed else "")
            summaries[name].append(
                run(run_name, CODECS[name], args.rounds, reuse=name in args.reuse, seed=seed)
            )
    if summaries.get("dense"):
        dense = summaries["dense"][0]
        repeats = [dense] + [
            run(f"accuracy-dense-{i}", CODECS["dense"], args.rounds, reuse="dense" in args.reuse)
            for i in range(2, args.dense_repeats + 1)
        ]
        results["dense_final_accuracy_runs"] = {
            t: [final_accuracy(r)[t] for r in repeats] for t in final_accuracy(dense)
        }
        results["dense_spread_pts"] = {
            t: round(100 * (max(values) - min(values)), 2)
            for t, values in results["dense_final_accuracy_runs"].items()
        }
        results["seeds"] = args.seeds
        results["codecs"] = {
            name: codec_row(name, runs, summaries["dense"]) for name, runs in summaries.items()
        }
        later = [r for r in dense["bytes"] if r["round"] >= 2 and r["global_delta_bytes"]]
        results["download_codec"] = DOWNLOAD_CODEC
        results["download_bytes_ratio"] = round(
            sum(r["global_whole_bytes"] for r in later) / sum(r["global_delta_bytes"] for r in later), 2
        )
        results["download_bytes_ratio_by_codec"] = {
            name: round(
                sum(r["global_whole_bytes"] for r in s[0]["bytes"][1:])
                / sum(r["global_delta_bytes"] or r["global_whole_bytes"] for r in s[0]["bytes"][1:]),
                2,
            )
            for name, s in summaries.items()
        }
    for mbps in args.mbps:
        key = f"{mbps:g}"
        times = results.setdefault("round_time_s", {}).setdefault(key, {})
        for name in args.codecs:
            console.rule(f"{name}: {args.link_rounds} rounds at {key} Mbps per agent")
            summary = run(f"link{key}-{name}", CODECS[name], args.link_rounds, mbps, reuse=name in args.reuse)
            times[name] = round(later_round_s(summary), 2)
            results.setdefault("round_wall_s", {}).setdefault(key, {})[name] = summary["round_wall_time_s"]
            write_json(results_path, results)
    for mbps in args.overlap_mbps:
        key = f"{mbps:g}"
        measured = {}
        for policy in args.overlap_policies:
            orders = {}
            for order in ("on_finish", "after_round"):
                console.rule(f"dense, {policy}: {args.overlap_rounds} rounds at {key} Mbps, uploads {order}")
                orders[order] = run(
                    f"overlap{key}-{order}" + ("" if policy == "concurrent" else f"-{policy}"),
                    CODECS["dense"],
                    args.overlap_rounds,
                    mbps,
                    reuse="dense" in args.reuse,
                    upload=order,
                    policy=policy,
                )
            measured[policy] = overlap(orders["on_finish"], orders["after_round"], mbps)
        row = measured.pop("concurrent", {})  # the agents' default policy: its figures head the row
        results.setdefault("overlap", {})[key] = {**row, "by_policy": measured} if measured else row
        write_json(results_path, results)
    write_json(results_path, results)
    report(results, console)
    plot(results, args.out / "comm.png")
    return 0


def overlap(algorithm1: dict, naive: dict, mbps: float) -> dict:
    """Round times of the two upload orders; the time a device's updates take on its link over a naive round
    (the most any order can hide); and the training seconds of a device (its tasks' sum, the slowest device);
    medians over the rounds after the first."""

    def train_s(summary: dict) -> float:
        values = [
            max(sum(t["train_s"] or 0 for t in tasks.values()) for tasks in rd["phases"].values())
            for rd in summary["rounds_detail"][1:]
        ]
        return round(statistics.median(values), 3)

    later = naive["bytes"][1:]
    device_bytes = sum(r["update_bytes"] for r in later) / len(later) / len(naive["devices"])
    link_s = 8 * device_bytes / (mbps * 1e6)

    def spread(summary: dict) -> list[float]:
        later = [w for w in summary["round_wall_time_s"][1:] if w is not None]
        return [round(min(later), 2), round(max(later), 2)]

    a, n = later_round_s(algorithm1), later_round_s(naive)
    a_range, n_range = spread(algorithm1), spread(naive)
    return {
        "algorithm1_s": round(a, 2),
        "naive_s": round(n, 2),
        "saved_pct": round(100 * (n - a) / n, 1),
        "algorithm1_range_s": a_range,
        "naive_range_s": n_range,
        "tie": a_range[0] <= n_range[1] and n_range[0] <= a_range[1],  # the rounds' ranges overlap
        "device_update_bytes_per_round": round(device_bytes),
        "link_s": round(link_s, 2),
        "link_share_of_round": round(link_s / n, 3),
        "algorithm1_train_s": train_s(algorithm1),
        "naive_train_s": train_s(naive),
        "algorithm1_round_wall_s": algorithm1["round_wall_time_s"],
        "naive_round_wall_s": naive["round_wall_time_s"],
    }


def _sem(row: dict, task: str) -> str:
    """' ± the standard error' of a task's mean drop, where the row has one."""
    sem = row.get("final_accuracy_drop_pts_sem", {}).get(task)
    return "" if sem is None else f" ± {sem:.2f}"


def report(results: dict, console) -> None:
    from rich.table import Table

    table = Table(title="update codecs on the demo federation")
    for column in ("codec", "update bytes", "vs dense", "final accuracy drop (pts, worst task)", "by seed"):
        table.add_column(column, justify="right")
    for name, row in results.get("codecs", {}).items():
        drops = row["final_accuracy_drop_pts_per_task"]
        worst = max(drops, key=drops.get)
        table.add_row(
            name,
            f"{row['update_bytes']:,}",
            f"{row['update_bytes_ratio']:.1f}x",
            f"{row['final_accuracy_drop_pts']:+.2f}{_sem(row, worst)} ({worst})",
            " ".join(f"{d:+.2f}" for d in row.get("final_accuracy_drop_pts_by_seed", {}).get(worst, [])),
        )
    console.print(table)
    if "download_bytes_ratio" in results:
        console.print(
            f"global models as {results['download_codec']} deltas: {results['download_bytes_ratio']:.2f}x smaller"
        )
    times = results.get("round_time_s", {})
    if times:
        table = Table(title="round time (s, median of the rounds after the first)")
        names = sorted({n for row in times.values() for n in row}, key=list(CODECS).index)
        table.add_column("Mbps per agent")
        for name in names:
            table.add_column(name, justify="right")
        for mbps, row in sorted(times.items(), key=lambda item: float(item[0])):
            table.add_row(mbps, *(f"{row[n]:.1f}" if n in row else "-" for n in names))
        console.print(table)
    for mbps, row in sorted(results.get("overlap", {}).items(), key=lambda item: float(item[0])):
        for policy, figures in [("concurrent", row), *row.get("by_policy", {}).items()]:
            console.print(
                f"{mbps} Mbps, dense, {policy}: Algorithm 1 order {figures['algorithm1_s']:.1f} s, naive "
                f"{figures['naive_s']:.1f} s ({figures['saved_pct']:+.1f}%{', a tie' if figures['tie'] else ''});"
                f" updates take {100 * figures['link_share_of_round']:.0f}% of a naive round on the link; training "
                f"{figures['algorithm1_train_s']:.1f} s beside uploads, {figures['naive_train_s']:.1f} s without"
            )


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    codecs, times = results.get("codecs", {}), results.get("round_time_s", {})
    panels = max(1, bool(codecs) + bool(times))  # accuracy runs and link rows, each where it was measured
    figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    if codecs:
        left = axes[0][0]
        for name, row in codecs.items():
            left.scatter(row["update_bytes"] / 1e6, -row["final_accuracy_drop_pts"], label=name, s=60)
        left.set(
            xscale="log", xlabel="update bytes over the run (MB, log)", ylabel="final accuracy vs dense (pts)"
        )
        left.axhline(0, color="grey", linewidth=0.8)
        left.legend()
    if times:
        right = axes[0][-1]
        for name in CODECS:
            points = sorted((float(m), row[name]) for m, row in times.items() if name in row)
            if points:
                right.plot(*zip(*points), marker="o", label=name)
        right.set(xscale="log", yscale="log", xlabel="link per agent (Mbps)", ylabel="round time (s)")
        right.legend()
    figure.suptitle("Update codecs on the demo federation")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
