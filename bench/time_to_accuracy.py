"""Time to accuracy: the whole federation once per execution policy, until every task reaches the target.

    python -m bench.time_to_accuracy --device cuda --rounds 12 --out bench/results        # one GPU, one agent
    python -m bench.time_to_accuracy --device cuda --agents 4 --gpus 0,1,2,3 --out ...     # N GPUs, an agent each
    python -m bench.time_to_accuracy --device cpu --rounds 1 --policies temporal fedmt \\
        --models shufflenet_v2_x0_5 --resolution 16 --local-steps 4 --out /tmp/tta      # a smoke run

Each run is testbed.demo's federation (Mosquitto, the aggregator and the agents as processes, a monitor that
evaluates every global version on the held-out digits): three tasks (ResNet18, DenseNet121, ShuffleNetV2) with
data volumes 1:2:3, partitioned IID or Dirichlet(0.5) across the agents. Agents sharing one GPU would co-locate
each other's tasks and blur the policies, so on a one-GPU host one agent holds what three devices would (the
whole training split; a non-IID split needs two agents or more, so with one agent only `iid` runs and the JSON
says so). With --agents N --gpus ..., each agent gets its own GPU (`[execution] gpu`: it profiles, plans for and
checks the SMs of that GPU, and its workers see that GPU alone).

With --repeats N every policy runs N times, the policies in turn (so a drift of the machine spreads over all of
them); a policy's figures are its median run's (by time to target, never = infinitely slow), and
"seconds_to_target_runs" lists every run's. Repeats start from seed 0's initial models and data order, so they
sample the GPU's nondeterminism along one trajectory; with --vary-seed repeat k takes seed k-1 (testbed.demo's
--seed: the tasks' `init_seed` and `train_seed`), alike for every policy.

With --device-history FILE every agent starts with those round records (an earlier run's
state/<device>/predictor/<gpu>.jsonl), as a device that ran an earlier federation: its planner's correction is
fitted on them before round 1.

Writes <out>/time_to_accuracy.json: {"device", "target", "seconds_to_target": {policy: seconds or null},
"accuracy": {policy: {task: [per round, round 0 first]}}, "round_wall_s": {policy: [...]}} for the first
partition, the same per partition under "partitions", and <out>/time_to_accuracy.png: the lowest task accuracy
against wall time, per policy. Every run's processes log under <out>/time_to_accuracy/<partition>-<policy>[-k]/.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import get_args

from bench.common import describe_device, write_json
from protocol.schemas import ExecutionPolicy, LrScaling
from testbed.demo import TASKS, Options, ProcessDied, _local_steps, run

POLICIES = ("temporal", "isolated", "sharing", "fedmt")


def seconds_to_target(
    accuracy: dict[str, list[float]], ends_s: list[float | None], target: float
) -> float | None:
    """Wall seconds from the first schedule until the first global version with every task at `target`."""
    for version, end in enumerate(ends_s, 1):
        if end is not None and all(accs[version] >= target for accs in accuracy.values()):
            return end
    return None


def run_policy(args, policy: str, partition: str, repeat: int = 1) -> dict:
    """One federation run in the folder <out>/time_to_accuracy/<name> (or, with --reuse, the one its summary
    recorded); its accuracy per round, round wall times and time to the target. The summary goes to
    <name>.summary.json beside the folder: a flat file that survives a copy leaving out the folder's deep state."""
    name = f"{partition}-{policy}" + (f"-{repeat}" if repeat > 1 else "")
    folder = (args.out / "time_to_accuracy" / name).resolve()
    summary_path = folder.with_name(f"{name}.summary.json")
    if args.reuse and summary_path.exists():
        summary = json.loads(summary_path.read_text())
    else:
        summary = run(_options(args, policy, partition, folder, repeat))
        summary_path.write_text(json.dumps(summary, indent=1))
    run_ = from_summary(summary, args.target)
    print(f"{name:>20}: target {args.target:.0%} after {run_['seconds_to_target']} s", flush=True)
    return run_


def from_summary(summary: dict, target: float) -> dict:
    """A run's accuracy per round, round wall times and time to the target, from testbed.demo's summary."""
    return {
        "accuracy": summary["accuracy"],
        "round_wall_s": summary["round_wall_time_s"],
        "round_end_s": summary["round_end_s"],
        "seconds_to_target": seconds_to_target(summary["accuracy"], summary["round_end_s"], target),
    }


def median_run(runs: list[dict]) -> dict:
    """The run with the median time to target (a run that never reached it counts as infinitely slow; of an
    even number, the slower of the middle two), with every run's time under "seconds_to_target_runs"."""
    times = [r["seconds_to_target"] for r in runs]
    ordered = sorted(range(len(runs)), key=lambda i: math.inf if times[i] is None else times[i])
    return runs[ordered[len(runs) // 2]] | {"seconds_to_target_runs": times}


def _options(args, policy: str, partition: str, folder: Path, repeat: int = 1) -> Options:
    return Options(
        seed=repeat - 1 if args.vary_seed else 0,
        out=folder,
        rounds=args.rounds,
        device=args.device,
        policy=policy,
        resolution=args.resolution,
        local_steps=args.local_steps,
        batch_size=args.batch_size,
        agents=args.agents,
        partition=partition,
        batch_range=args.batch_range,
        initial_batch_growth=args.initial_batch_growth,
        lr_scaling=args.lr_scaling,
        models=dict.fromkeys(TASKS, args.models) if args.models else None,
        gpus=tuple(args.gpus.split(",")) if args.gpus else None,
        reallocate=args.reallocate,
        spare_workers=args.spare_workers,
        device_history=tuple(args.device_history),
        cuda_graphs=args.cuda_graphs,
        predictor=str(args.predictor.resolve()) if args.predictor else None,
        timeout_s=args.timeout,
        stop_at=None if args.all_rounds else args.target,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    partitions = args.partitions if args.agents > 1 else ["iid"]
    runs: dict[str, dict[str, list[dict]]] = {p: {policy: [] for policy in args.policies} for p in partitions}
    try:
        for partition in partitions:
            for repeat in range(1, args.repeats + 1):
                for policy in args.policies:
                    runs[partition][policy].append(run_policy(args, policy, partition, repeat))
    except (ProcessDied, TimeoutError) as exc:
        print(f"time_to_accuracy: a run failed: {exc}", file=sys.stderr)
        return 1
    settings = {
        "rounds": args.rounds,
        "repeats": args.repeats,
        "vary_seed": args.vary_seed,
        "batch_size": args.batch_size,
        "batch_range": args.batch_range,
        "initial_batch_growth": args.initial_batch_growth,
        "lr_scaling": args.lr_scaling,
        "resolution": args.resolution,
        "local_steps": args.local_steps,
        "models": args.models,
        "reallocate": args.reallocate,
        "spare_workers": args.spare_workers,
        "device_history": [str(p) for p in args.device_history],
        "cuda_graphs": args.cuda_graphs,
        "predictor": str(args.predictor) if args.predictor else None,
        "stopped_at_target": not args.all_rounds,
    }
    device = describe_device() | {"agents": args.agents, "gpus": args.gpus}
    write_report(args.out, runs, device, args.target, settings)
    return 0


def write_report(
    out: Path, runs: dict[str, dict[str, list[dict]]], device: dict, target: float, settings: dict
):
    """<out>/time_to_accuracy.json and .png from the runs by partition and policy (each policy's median run)."""
    results = {p: {policy: median_run(r) for policy, r in by_policy.items()} for p, by_policy in runs.items()}
    by_partition = {
        p: {
            key: {policy: r[key] for policy, r in chosen.items()}
            for key in ("seconds_to_target", "accuracy", "round_wall_s", "seconds_to_target_runs")
        }
        | {"round_end_s": {policy: r["round_end_s"] for policy, r in chosen.items()}}
        for p, chosen in results.items()
    }
    first = next(iter(by_partition))
    report = {
        "device": device,
        "target": target,
        **{k: v for k, v in by_partition[first].items() if k != "round_end_s"},
        "partition": first,
        "partitions": by_partition,
        "note": (
            "one agent holds what three devices would (the whole training split): a non-IID split needs two "
            "agents or more"
            if device["agents"] == 1
            else f"{device['agents']} agents, one GPU each"
        ),
        "settings": settings,
    }
    write_json(out / "time_to_accuracy.json", report)
    plot(by_partition, target, out / "time_to_accuracy.png")
    print(f"wrote {out / 'time_to_accuracy.json'} and {out / 'time_to_accuracy.png'}")


def plot(by_partition: dict, target: float, path: Path) -> None:
    """The lowest task accuracy after each round against wall time, per policy, one panel per partition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(by_partition), figsize=(6 * len(by_partition), 4), squeeze=False)
    for axis, (partition, data) in zip(axes[0], by_partition.items()):
        for policy, accuracy in data["accuracy"].items():
            ends = data["round_end_s"][policy]
            lowest = [min(accs[r] for accs in accuracy.values()) for r in range(len(ends) + 1)]
            times = [0.0, *ends]
            points = [(t, 100 * a) for t, a in zip(times, lowest) if t is not None]
            axis.plot([t for t, _ in points], [a for _, a in points], marker="o", label=policy)
        axis.axhline(100 * target, color="gray", lw=0.8, ls="--")
        axis.set(xlabel="wall time (s)", ylabel="lowest task accuracy (%)", ylim=(0, 100), title=partition)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--policies", nargs="+", choices=get_args(ExecutionPolicy), default=list(POLICIES))
    parser.add_argument("--partitions", nargs="+", choices=["iid", "dirichlet"], default=["iid", "dirichlet"])
    parser.add_argument("--agents", type=int, default=1, help="agents, one GPU each (see --gpus)")
    parser.add_argument("--gpus", help="the agents' GPUs (NVML index or UUID), comma-separated, in turn")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs of every policy, in turn (median reported)"
    )
    parser.add_argument(
        "--vary-seed",
        action="store_true",
        help="repeat k takes seed k-1's initial models and data order (every policy the same): repeats then"
        " sample training trajectories, not only the GPU's nondeterminism along one",
    )
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--resolution", type=int, default=128, help="every task's input size")
    parser.add_argument("--batch-size", type=int, default=16, help="every task's configured batch size")
    parser.add_argument(
        "--batch-range",
        type=lambda t: tuple(int(x) for x in t.split("-")),
        default=(16, 128),
        metavar="LOW-HIGH",
        help="the batch sizes a plan may choose (the learning rate follows the tasks' rule)",
    )
    parser.add_argument(
        "--initial-batch-growth",
        type=int,
        default=1,
        help="a plan may train each initial model at up to this many times its batch size (default: 1)",
    )
    parser.add_argument(
        "--lr-scaling",
        choices=get_args(LrScaling),
        help="every task's learning-rate rule for a planned batch size (default: the tasks' own, auto)",
    )
    parser.add_argument("--local-steps", type=_local_steps, help="N or TASK=N,... (default: epochs)")
    parser.add_argument("--models", help="one torchvision model for every task (smoke runs)")
    parser.add_argument("--reallocate", choices=["off", "handover"], default="off")
    parser.add_argument(
        "--spare-workers", type=int, help="the agents' spare worker processes (default: theirs)"
    )
    parser.add_argument(
        "--cuda-graphs", action="store_true", help="the agents replay training steps from CUDA graphs"
    )
    parser.add_argument(
        "--predictor", type=Path, help="the agents' ONNX predictor, e.g. one `fedmt-agent calibrate` made"
    )
    parser.add_argument(
        "--device-history",
        type=Path,
        nargs="+",
        default=[],
        help="round records every agent starts with (an earlier run's state/<device>/predictor/<gpu>.jsonl)",
    )
    parser.add_argument("--timeout", type=float, help="per run (default: the demo's)")
    parser.add_argument(
        "--all-rounds",
        action="store_true",
        help="run every round (default: stop once every task is at target)",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="take a policy's run from its folder's summary.json where one exists",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
