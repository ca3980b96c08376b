"""`fedmt-aggregator`: run the aggregator, check its config, build initial weights, show the round ledger."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from common.daemon import cli_main, cli_parser

if TYPE_CHECKING:
    from aggregator.config import AggregatorConfig


def main(argv: list[str] | None = None) -> int:
    parser, sub = cli_parser("fedmt-aggregator", "FedMT aggregator: per-task weighted FedAvg over MQTT.")
    run = sub.add_parser("run", help="run the aggregator service")
    run.add_argument("--config", required=True, help="TOML config file")
    check = sub.add_parser(
        "check-config", help="validate a config file, check the files it names and whether the broker answers"
    )
    check.add_argument("--config", required=True)
    status = sub.add_parser(
        "status", help="devices, the open round (deadline, who is missing) and recent rounds; read-only"
    )
    status.add_argument("--config", required=True)
    status.add_argument("--rounds", type=int, default=5, help="how many recent rounds to list (default 5)")
    init = sub.add_parser(
        "init-weights",
        help="write a task's initial weights to a safetensors file (needs torch: run it where torch is installed)",
    )
    init.add_argument("--model", required=True, help="torchvision model name, e.g. resnet18")
    init.add_argument("--num-classes", type=int, required=True)
    init.add_argument("--input-size", type=int, default=32)
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--out", required=True, type=Path)
    return cli_main(parser, COMMANDS, argv)


def _run(args: argparse.Namespace) -> int:
    from aggregator.config import load
    from aggregator.service import AggregatorService
    from common.daemon import SystemdNotifier, stop_on_signals
    from common.preflight import before_run

    config = load(args.config)
    before_run(_problems(config), config.mqtt)
    notifier = SystemdNotifier.from_environment()
    AggregatorService(config).run(stop_on_signals(notifier), alive=notifier.alive)
    return 0


def _check(args: argparse.Namespace) -> int:
    from aggregator.config import load
    from common.preflight import report

    config = load(args.config)
    summary = f"{len(config.tasks)} tasks ({', '.join(config.tasks)}), state in {config.state_dir}"
    return report(summary, _problems(config), config.mqtt)


def _problems(config: AggregatorConfig) -> list[str]:
    """What stops this config from running here: files it names, and tasks without a way to initial weights."""
    from aggregator.checkpoints import CheckpointStore
    from aggregator.initial import build_problem
    from common.preflight import file_problem, mqtt_problems, state_dir_problem

    problems = [state_dir_problem("state_dir", config.state_dir), *mqtt_problems(config.mqtt)]
    checkpoints = CheckpointStore(Path(config.state_dir) / "checkpoints")
    for task, task_config in config.tasks.items():
        problems.append(file_problem(f"tasks.{task}.init_weights", task_config.init_weights))
        if checkpoints.latest_version(task) is None:  # a resumed task needs no initial weights
            problems.append(build_problem(task, task_config))
    return [p for p in problems if p]


def _status(args: argparse.Namespace) -> int:
    import sqlite3
    import time

    from aggregator.config import load
    from aggregator.ledger import RoundLedger
    from aggregator.status import report

    config = load(args.config)
    path = Path(config.state_dir) / "ledger.sqlite"
    if not path.exists():
        print(f"no ledger at {path}: the aggregator has not run yet")
        return 1
    try:
        with RoundLedger(path, read_only=True) as ledger:
            print("\n".join(report(ledger, config.tasks, time.time(), recent=args.rounds)))
    except (RuntimeError, sqlite3.Error) as exc:
        print(f"error: cannot read {path}: {exc}", file=sys.stderr)
        return 2
    return 0


def _init_weights(args: argparse.Namespace) -> int:
    from aggregator.initial import MODELS_EXTRA, torch_installed
    from common.daemon import CommandError

    if not torch_installed():
        raise CommandError(
            "init-weights builds the model with torch and torchvision, which this install lacks: run it where "
            f"they are installed (an agent install, or {MODELS_EXTRA}) and copy the file here"
        )
    from safetensors.numpy import save_file

    from common.models import build_model, state_to_numpy
    from protocol.schemas import ModelSpec

    spec = ModelSpec(name=args.model, num_classes=args.num_classes, input_size=args.input_size)
    save_file(state_to_numpy(build_model(spec, seed=args.seed)), str(args.out))
    print(f"wrote {args.out}")
    return 0


COMMANDS = {"run": _run, "check-config": _check, "status": _status, "init-weights": _init_weights}

if __name__ == "__main__":
    sys.exit(main())
