"""`fedmt-agent`: run the edge agent, check its config, print the device profile, calibrate the GPU."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

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
        help="measure co-located training throughput on this GPU for the predictor (needs MPS; appends to a data file)",
    )
    cal.add_argument(
        "--out", type=Path, default=Path("predictor/data"), help="folder of the per-GPU data files"
    )
    cal.add_argument("--budget-s", type=float, default=480.0, help="stop after this many seconds")
    cal.add_argument("--resolution", type=int, default=128)
    cal.add_argument("--window-s", type=float, default=1.0, help="length of one measurement window")
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
    ]
    for task, spec in config.tasks.items():
        try:  # counting a task's samples reads its data folder (or the library's dataset)
            spec.sample_count()
        except (OSError, ValueError) as exc:
            problems.append(f"tasks.{task}: {exc}")
    return [p for p in problems if p]


def _profile(args: argparse.Namespace) -> int:
    import msgspec

    from agent.config import load
    from agent.gpu.probe import probe
    from agent.mps import MpsDaemon
    from agent.policies import available_policies
    from agent.profile import build_profile

    config = load(args.config)
    samples = {task: spec.sample_count() for task, spec in config.tasks.items()}
    mps = MpsDaemon(config.mps).detect()
    profile = build_profile(
        config.device, samples, available_policies(mps.available), probe(allow_torch=True), mps
    )
    print(msgspec.json.format(msgspec.json.encode(profile).decode(), indent=2))
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from agent.calibration import calibrate

    calibrate(
        args.out, budget_s=args.budget_s, seed=args.seed, resolution=args.resolution, window_s=args.window_s
    )
    return 0


COMMANDS = {"run": _run, "check-config": _check, "profile": _profile, "calibrate": _calibrate}

if __name__ == "__main__":
    sys.exit(main())
