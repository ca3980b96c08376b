"""`fedmt-agent`: run the edge agent, check its config, print the device profile, calibrate the GPU."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from agent.calibration import WINDOW_S
from agent.policies import POLICIES
from common.daemon import cli_main, cli_parser

if TYPE_CHECKING:
    from agent.config import AgentConfig


def main(argv: list[str] | None = None) -> int:
    parser, sub = cli_parser("fedmt-agent", "FedMT edge agent: trains co-located tasks for federated rounds.")
    run = sub.add_parser("run", help="run the agent service")
    run.add_argument("--config", required=True, help="TOML config file")
    run.add_argument("--policy", choices=POLICIES, help="override the config's execution policy")
    check = sub.add_parser(
        "check-config", help="validate a config file, check the files it names and whether the broker answers"
    )
    check.add_argument("--config", required=True)
    profile = sub.add_parser("profile", help="print this device's profile as JSON")
    profile.add_argument("--config", required=True)
    cal = sub.add_parser(
        "calibrate",
        help="profile this GPU for the throughput predictor (needs MPS), then fit and export it",
    )
    cal.add_argument("--config", help="agent config: its MPS daemon, and its state dir as the default --out")
    cal.add_argument("--out", type=Path, help="folder of the GPU's data file and predictor")
    cal.add_argument(
        "--task",
        action="append",
        metavar="MODEL:SIZE:BATCH[:LOW-HIGH]",
        help="a configured task and the batch sizes its plans may choose (repeat); without any: the generic "
        "model list at --resolution",
    )
    cal.add_argument("--resolution", type=int, default=128, help="input size of the generic model list")
    cal.add_argument("--budget-s", type=float, default=900.0, help="the whole run, fitting included")
    cal.add_argument("--window-s", type=float, default=WINDOW_S, help="length of one measurement window")
    cal.add_argument("--repeats", type=int, default=3, help="windows per configuration (median and spread)")
    cal.add_argument("--epochs", type=int, help="predictor training epochs (default: predictor.model.EPOCHS)")
    cal.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="replay training steps from CUDA graphs, as agents with [execution] cuda_graphs do (implied by a "
        "--config that sets it)",
    )
    cal.add_argument("--seed", type=int, default=0)
    return cli_main(parser, COMMANDS, argv)


def _run(args: argparse.Namespace) -> int:
    from agent.config import load
    from agent.service import Agent
    from common.daemon import SystemdNotifier, stop_on_signals
    from common.preflight import before_run

    config = load(args.config)
    before_run(_problems(config), config.mqtt)
    notifier = SystemdNotifier.from_environment()
    Agent(config, policy=args.policy).run(stop_on_signals(notifier), alive=notifier.alive)
    return 0


def _check(args: argparse.Namespace) -> int:
    from agent.config import load
    from common.preflight import report

    config = load(args.config)
    summary = (
        f"device {config.device}, tasks {', '.join(config.tasks) or '(none)'}, "
        f"policy {config.execution.policy}, state in {config.state_dir}"
    )
    return report(summary, _problems(config), config.mqtt)


def _problems(config: AgentConfig) -> list[str]:
    """What stops this config from running here: the files it names and the data each task reads."""
    from common.preflight import file_problem, mqtt_problems, state_dir_problem

    problems = [
        state_dir_problem("state_dir", config.state_dir),
        *mqtt_problems(config.mqtt),
        file_problem("execution.predictor", config.execution.predictor),
        _gpu_problem(config.execution.gpu),
    ]
    for task, spec in config.tasks.items():
        try:  # counting a task's samples reads its data folder (or the library's dataset)
            spec.sample_count()
        except (OSError, ValueError) as exc:
            problems.append(f"tasks.{task}: {exc}")
    return [p for p in problems if p]


def _gpu_problem(wanted: str | None) -> str | None:
    """Whether the GPU `[execution] gpu` names is on this host."""
    from agent.gpu.probe import own_gpu, probe

    if wanted is None:
        return None
    report = probe()
    if not report.gpus:
        return f"execution.gpu: GPU {wanted!r} asked for, but {report.note}"
    try:
        own_gpu(report, wanted)
    except ValueError as exc:
        return f"execution.gpu: {exc}"
    return None


def _profile(args: argparse.Namespace) -> int:
    import msgspec

    from agent.config import load
    from agent.gpu.probe import own_gpu, probe
    from agent.mps import MpsDaemon
    from agent.policies import available_policies
    from agent.profile import build_profile
    from common.daemon import CommandError

    config = load(args.config)
    samples = {task: spec.sample_count() for task, spec in config.tasks.items()}
    mps = MpsDaemon(config.mps).detect()
    try:
        gpu = own_gpu(probe(allow_torch=True), config.execution.gpu)
    except ValueError as exc:
        raise CommandError(f"execution.gpu: {exc}") from None
    profile = build_profile(config.device, samples, available_policies(mps.available), gpu, mps)
    print(msgspec.json.format(msgspec.json.encode(profile).decode(), indent=2))
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    import json
    import statistics
    from contextlib import nullcontext

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from agent.calibration import FIT_SHARE, calibrate_gpu, generic_target, target_for
    from agent.config import load, predictor_dir
    from agent.mps import GpuSharing, MpsDaemon, mps_sharing

    config = None
    if args.config:
        config = load(args.config)
    out = args.out or (predictor_dir(config.state_dir) if config else None)
    if out is None:
        raise SystemExit("calibrate: give --out or --config")
    graphs = args.cuda_graphs or bool(config and config.execution.cuda_graphs)
    target = (
        target_for([_assignment(t) for t in args.task], cuda_graphs=graphs)
        if args.task
        else generic_target(args.resolution, cuda_graphs=graphs)
    )
    if config is None:
        sharing_context = mps_sharing()
    else:
        daemon = MpsDaemon(config.mps)
        if not daemon.ensure_running().available:
            raise SystemExit(f"calibrate: MPS is needed: {daemon.info.reason}")
        sharing_context = nullcontext(GpuSharing(daemon, _sm_count(), Path(config.state_dir) / "work"))
    columns = [TextColumn("calibrating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with sharing_context as sharing, Progress(*columns) as progress:
        bar = progress.add_task("windows", total=None)
        result = calibrate_gpu(
            target,
            out,
            sharing,
            measure_s=args.budget_s * (1 - FIT_SHARE),
            window_s=args.window_s,
            repeats=args.repeats,
            seed=args.seed,
            fit_epochs=args.epochs,
            on_progress=lambda done, total: progress.update(bar, completed=done, total=total),
        )
    summary = {
        "data": str(result.data),
        "predictor": str(result.predictor) if result.predictor else None,
        "windows": result.windows,
        "failed": result.failed,
        "measure_minutes": round(result.measured_s / 60, 2),
        "fit_minutes": round(result.fit_s / 60, 2) if result.fit_s is not None else None,
        "median_spread": statistics.median(result.spreads) if result.spreads else None,
    }
    print(json.dumps(summary))
    return 0


def _assignment(text: str):
    """A TaskAssignment standing for a configured task given as MODEL:SIZE:BATCH[:LOW-HIGH]."""
    from protocol.schemas import ModelSpec, OptimizerSpec, TaskAssignment

    match = re.fullmatch(r"([\w.]+):(\d+):(\d+)(?::(\d+)-(\d+))?", text)
    if match is None:
        raise SystemExit(
            f"--task expects MODEL:SIZE:BATCH[:LOW-HIGH], e.g. resnet50:128:64:16-128; got {text!r}"
        )
    model, size, batch, low, high = match.groups()
    bounds = {"min_batch_size": int(low), "max_batch_size": int(high)} if low else {}
    if low and not int(low) <= int(batch) <= int(high):
        raise SystemExit(f"--task {text!r}: the batch size must lie within LOW-HIGH")
    return TaskAssignment(
        task="calibration",
        model=ModelSpec(name=model, num_classes=10, input_size=int(size)),
        optimizer=OptimizerSpec(),
        base_version=0,
        base_sha256="0" * 64,
        batch_size=int(batch),
        **bounds,
    )


def _sm_count() -> int:
    import torch

    return torch.cuda.get_device_properties(0).multi_processor_count


COMMANDS = {"run": _run, "check-config": _check, "profile": _profile, "calibrate": _calibrate}

if __name__ == "__main__":
    sys.exit(main())
