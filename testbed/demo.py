"""`make demo`: a whole federation on this machine, on CPU.

Mosquitto, the aggregator and three agents run as separate processes; three tasks on different model families
(data volumes 1:2:3, as in the FedMT paper) train for several rounds on scikit-learn's digits. A read-only
monitor evaluates every global version on the held-out test split. Output in --out: summary.json (accuracy per
task per round, wall time per round), accuracy.png, logs/ and every process's state.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from agent.config import AgentConfig, ExecutionConfig
from aggregator.config import AggregatorConfig, RoundsConfig, TaskConfig
from common.config import to_toml
from protocol.schemas import ModelSpec, OptimizerSpec
from protocol.transport import MqttSettings
from testbed.broker import Mosquitto
from testbed.monitor import Monitor

DEVICES = ["edge-1", "edge-2", "edge-3"]
ADAM = OptimizerSpec(name="adam", lr=5e-4, weight_decay=0.0)
SGD = OptimizerSpec(name="sgd", lr=0.02, momentum=0.9, weight_decay=0.0)


def _task(model: str, input_size: int, optimizer: OptimizerSpec, epochs: int) -> TaskConfig:
    spec = ModelSpec(name=model, num_classes=10, input_size=input_size)
    return TaskConfig(model=spec, optimizer=optimizer, batch_size=16, local_epochs=epochs)


#: task -> (definition, share of each device's digits partition): volumes 1:2:3. Three model families that a
#: 2-core CPU trains in minutes (MobileNetV3's BatchNorm momentum of 0.01 needs far more steps than this).
TASKS = {
    "digits-resnet18": (_task("resnet18", 32, ADAM, epochs=2), 1 / 3),
    "digits-densenet121": (_task("densenet121", 32, ADAM, epochs=1), 2 / 3),
    "digits-shufflenet": (_task("shufflenet_v2_x0_5", 48, SGD, epochs=1), 1.0),
}


class ProcessDied(RuntimeError):
    pass


def write_configs(out: Path, broker: Mosquitto, passwords: dict[str, str], rounds: int) -> dict[str, Path]:
    def mqtt(user: str) -> MqttSettings:
        return MqttSettings(host=broker.host, port=broker.port, username=user, password=passwords[user])

    configs = {
        "aggregator": AggregatorConfig(
            state_dir=str(out / "state" / "aggregator"),
            mqtt=mqtt("aggregator"),
            rounds=RoundsConfig(rounds=rounds, min_devices=len(DEVICES), round_timeout_s=600.0),
            tasks={task: definition for task, (definition, _) in TASKS.items()},
        )
    }
    for index, device in enumerate(DEVICES):
        data = {"kind": "digits", "num_partitions": len(DEVICES), "partition_index": index}
        configs[device] = AgentConfig(
            device=device,
            state_dir=str(out / "state" / device),
            telemetry_interval_s=10.0,
            mqtt=mqtt(device),
            execution=ExecutionConfig(device="cpu", cpu_threads_per_task=1),
            tasks={task: _data_spec({**data, "fraction": share}) for task, (_, share) in TASKS.items()},
        )
    paths = {}
    for name, config in configs.items():
        paths[name] = out / "config" / f"{name}.toml"
        paths[name].parent.mkdir(parents=True, exist_ok=True)
        paths[name].write_text(to_toml(config))
    return paths


def _data_spec(fields: dict):
    import msgspec

    from agent.dataspec import DataSpec

    return msgspec.convert(fields, DataSpec)


def start(name: str, module: str, config: Path, logs: Path) -> subprocess.Popen:
    log = open(logs / f"{name}.log", "wb")
    return subprocess.Popen(
        [sys.executable, "-m", module, "run", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(processes: dict[str, subprocess.Popen]) -> None:
    for process in processes.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for name, process in processes.items():
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            print(f"{name} did not stop; killing it", file=sys.stderr)
            process.kill()


def run(out: Path, rounds: int, timeout_s: float) -> dict:
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from agent.datasets import digits_test_set
    from agent.training import evaluate

    torch.set_num_threads(1)  # leave the cores to the task processes
    console = Console()
    shutil.rmtree(out, ignore_errors=True)
    (out / "logs").mkdir(parents=True)
    passwords = {user: secrets.token_urlsafe(16) for user in ["aggregator", "monitor", *DEVICES]}
    test_sets = {task: digits_test_set(definition.model) for task, (definition, _) in TASKS.items()}
    accuracy: dict[str, dict[int, float]] = {task: {} for task in TASKS}
    round_started: dict[int, float] = {}
    round_done: dict[int, float] = {}
    started = time.time()
    with Mosquitto(out / "broker", passwords) as broker:
        configs = write_configs(out, broker, passwords, rounds)
        processes = {"aggregator": start("aggregator", "aggregator.cli", configs["aggregator"], out / "logs")}
        processes |= {d: start(d, "agent.cli", configs[d], out / "logs") for d in DEVICES}
        monitor = Monitor(
            MqttSettings(
                host=broker.host, port=broker.port, username="monitor", password=passwords["monitor"]
            ),
            out / "state" / "monitor",
        )

        def check_alive() -> None:
            for name, process in processes.items():
                if process.poll() is not None:
                    tail = (out / "logs" / f"{name}.log").read_text(errors="replace")[-3000:]
                    raise ProcessDied(f"{name} exited with code {process.returncode}:\n{tail}")

        columns = [
            TextColumn("{task.description:<20}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[acc]}"),
            TimeElapsedColumn(),
        ]
        try:
            with Progress(*columns, console=console) as progress:
                bars = {task: progress.add_task(task, total=rounds, acc="") for task in TASKS}
                deadline = time.monotonic() + timeout_s
                while not all(len(accuracy[t]) == rounds + 1 for t in TASKS):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the demo did not finish {rounds} rounds in {timeout_s:.0f} s")
                    check_alive()
                    monitor.pump(0.5)
                    for schedule in monitor.schedules.values():
                        round_started.setdefault(schedule.round, schedule.issued_at)
                    for (task, version), state in sorted(monitor.globals.items()):
                        if task in accuracy and version not in accuracy[task]:
                            acc = evaluate(TASKS[task][0].model, state, test_sets[task])
                            accuracy[task][version] = acc
                            progress.update(bars[task], completed=version, acc=f"test acc {acc:6.1%}")
                    for r in range(1, rounds + 1):
                        if r not in round_done and all(r in accuracy[t] for t in TASKS):
                            round_done[r] = max(monitor.seen_at[(t, r)] for t in TASKS)
                            accs = "  ".join(f"{t.split('-', 1)[1]} {accuracy[t][r]:.1%}" for t in TASKS)
                            progress.console.print(
                                f"round {r}/{rounds} done in "
                                f"{round_done[r] - round_started[r]:5.1f} s: {accs}"
                            )
        finally:
            monitor.close()
            stop(processes)
    return {
        "rounds": rounds,
        "devices": DEVICES,
        "tasks": {
            task: {
                "model": definition.model.name,
                "input_size": definition.model.input_size,
                "data_share": share,
            }
            for task, (definition, share) in TASKS.items()
        },
        "accuracy": {task: [accuracy[task][r] for r in range(rounds + 1)] for task in TASKS},
        "round_wall_time_s": [round(round_done[r] - round_started[r], 2) for r in range(1, rounds + 1)],
        "total_wall_time_s": round(time.time() - started, 1),
    }


def report(summary: dict, out: Path) -> bool:
    """Print the table, write summary.json and accuracy.png; True if every task met the demo's bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rich.console import Console
    from rich.table import Table

    rounds = summary["rounds"]
    table = Table(title=f"Test accuracy per round ({len(summary['devices'])} devices, FedAvg)")
    table.add_column("task")
    for r in range(rounds + 1):
        table.add_column(f"r{r}", justify="right")
    passed = True
    for task, accs in summary["accuracy"].items():
        ok = accs[-1] >= 0.9 and accs[-1] > accs[0] + 0.2
        passed &= ok
        table.add_row(f"{task} ({'ok' if ok else 'BELOW TARGET'})", *(f"{a:.1%}" for a in accs))
    table.add_row("round wall time (s)", "", *(f"{t:.1f}" for t in summary["round_wall_time_s"]))
    Console().print(table)

    figure, axis = plt.subplots(figsize=(6, 4))
    for task, accs in summary["accuracy"].items():
        axis.plot(range(rounds + 1), [100 * a for a in accs], marker="o", label=task)
    axis.set(xlabel="round", ylabel="test accuracy (%)", ylim=(0, 100), title="FedMT demo: digits, 3 devices")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "accuracy.png", dpi=120)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out / 'summary.json'} and {out / 'accuracy.png'} in {summary['total_wall_time_s']:.0f} s")
    return passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--timeout", type=float, default=1200.0, help="give up after this many seconds")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    try:
        summary = run(out, args.rounds, args.timeout)
    except (ProcessDied, TimeoutError) as exc:
        print(f"demo failed: {exc}\nlogs: {out / 'logs'}", file=sys.stderr)
        return 1
    return 0 if report(summary, out) else 1


if __name__ == "__main__":
    sys.exit(main())
