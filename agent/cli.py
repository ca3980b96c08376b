"""`fedmt-agent`: run the edge agent, check its config, print the device profile, calibrate the GPU."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agent.policies import POLICIES
from common.daemon import cli_main, cli_parser


def main(argv: list[str] | None = None) -> int:
    parser, sub = cli_parser("fedmt-agent", "FedMT edge agent: trains co-located tasks for federated rounds.")
    run = sub.add_parser("run", help="run the agent service")
    run.add_argument("--config", required=True, help="TOML config file")
    run.add_argument("--policy", choices=POLICIES, help="override the config's execution policy")
    check = sub.add_parser("check-config", help="validate a config file and summarise it")
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
    from common.daemon import stop_on_signals

    Agent(load(args.config), policy=args.policy).run(stop_on_signals())
    return 0


def _check(args: argparse.Namespace) -> int:
    from agent.config import load

    config = load(args.config)
    print(
        f"ok: device {config.device}, tasks {', '.join(config.tasks) or '(none)'}, "
        f"policy {config.execution.policy}, broker {config.mqtt.host}:{config.mqtt.port}"
    )
    return 0


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
