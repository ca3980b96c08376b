"""`make demo`: a whole federation on this machine, on CPU by default, on the GPU with --device cuda.

Mosquitto, the aggregator and three agents run as separate processes; three tasks on different model families
(data volumes 1:2:3, as in the FedMT paper) train for several rounds on scikit-learn's digits. A read-only
monitor evaluates every global version on the held-out test split, on the same device. Output in --out:
summary.json (accuracy per task per round, wall time and phases of every round, the Prometheus endpoint of
every process and what they showed after each round), accuracy.png, phases.png, logs/ and every process's state.

With --device cuda the agents share the GPU through the MPS daemon already running at the default pipe
directory (/run/nvidia-mps); the demo does not start one. Every task's batch size is pinned (min = max =
--batch-size), so the agents' planner only chooses the SM shares R_i.
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
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import msgspec

from agent.autocalibration import CalibrationConfig
from agent.config import AgentConfig, ExecutionConfig, predictor_dir
from aggregator.config import AggregatorConfig, AggregatorMetricsConfig, RoundsConfig, TaskConfig
from common.config import to_toml
from common.metrics import MetricsConfig
from protocol.limits import MAX_TRAIN_SEED
from protocol.schemas import (
    CodecSpec,
    ExecutionPolicy,
    LrScaling,
    ModelSpec,
    OptimizerSpec,
    Precision,
    TrainSeed,
)
from protocol.transport import MqttSettings
from testbed import phases
from testbed.broker import Mosquitto, free_port
from testbed.monitor import Monitor
from testbed.scrape import scrape
from testbed.throttle import ThrottledLink

DEVICES = ["edge-1", "edge-2", "edge-3"]
#: per process: the metric that counts its finished rounds
ROUND_COUNTERS = {
    "aggregator": "fedmt_aggregator_rounds_completed_total",
    "agent": "fedmt_agent_rounds_trained_total",
}
Partition = Literal["iid", "dirichlet"]
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


@dataclass(frozen=True)
class Options:
    """What the command line chooses; the defaults are `make demo`'s CPU run."""

    out: Path
    rounds: int = 6
    timeout_s: float | None = None  # None: 600 s plus 200 s per round
    device: Literal["cpu", "cuda"] = "cpu"
    policy: ExecutionPolicy | None = None  # None: the agents' configured default
    resolution: int | None = None  # None: each task's own input size
    local_steps: dict[str, int] | None = None  # task -> optimiser steps per round; None: each task's epochs
    batch_size: int = 16
    precision: Precision = "fp32"
    agents: int = len(DEVICES)  # each holds one partition of every task's digits (with one: all of them)
    partition: Partition = "iid"
    batch_range: tuple[int, int] | None = None  # the plans' batch bounds; None: free on cpu, pinned on cuda
    initial_batch_growth: int = 1  # every task's: its initial model at up to this x batch_size
    lr_scaling: LrScaling | None = None  # every task's rate rule for planned batches (None: their own)
    models: dict[str, str] | None = None  # task -> another torchvision model
    gpus: tuple[str, ...] | None = None  # each agent's GPU (`[execution] gpu`: NVML index or UUID), in turn
    reallocate: Literal["off", "handover"] = "off"
    spare_workers: int | None = None  # the agents' spare worker processes (None: their default)
    cuda_graphs: bool = False  # the agents replay training steps from CUDA graphs
    predictor: str | None = (
        None  # the agents' ONNX predictor (default: calibrated in their state, or shipped)
    )
    codec: CodecSpec | None = None  # how every task's updates travel (None: dense)
    download_codec: str | None = None  # global models also published as deltas of this codec
    link_mbps: float | None = None  # each agent reaches the broker through its own link of this bandwidth
    link_latency_ms: float = 0.0
    upload: Literal["on_finish", "after_round"] = "on_finish"  # the agents' upload order
    stop_at: float | None = None  # end the run after the first round with every task at this accuracy
    #: every task's initial global model and data order (`init_seed`, `train_seed`): another trajectory
    seed: int = 0
    device_history: tuple[Path, ...] = ()  # files of one GPU's round records every agent starts with

    def devices(self) -> list[str]:
        return [f"edge-{i + 1}" for i in range(self.agents)]

    def tasks(self) -> dict[str, tuple[TaskConfig, float]]:
        """TASKS with this run's overrides."""
        tasks = {}
        for task, (definition, share) in TASKS.items():
            changes = {
                "batch_size": self.batch_size,
                "precision": self.precision,
                "init_seed": self.seed,
                "train_seed": self.seed,
                "initial_batch_growth": self.initial_batch_growth,
            }
            model = definition.model
            if self.models is not None:
                model = msgspec.structs.replace(model, name=self.models[task])
            if self.resolution is not None:
                model = msgspec.structs.replace(model, input_size=self.resolution)
            changes["model"] = model
            if self.local_steps is not None:
                changes["local_steps"] = self.local_steps[task]
            if self.lr_scaling is not None:
                changes["lr_scaling"] = self.lr_scaling
            if self.codec is not None:
                changes["codec"] = self.codec
            if self.download_codec is not None:
                changes["download_codec"] = self.download_codec
            if self.batch_range is not None:
                changes |= {"min_batch_size": self.batch_range[0], "max_batch_size": self.batch_range[1]}
            elif self.device == "cuda":
                changes |= {"min_batch_size": self.batch_size, "max_batch_size": self.batch_size}
            tasks[task] = (msgspec.structs.replace(definition, **changes), share)
        return tasks

    def execution(self, index: int = 0) -> ExecutionConfig:
        """Agent `index`'s execution settings (its GPU when several are given)."""
        chosen = {} if self.policy is None else {"policy": self.policy}
        if self.gpus:
            chosen["gpu"] = self.gpus[index % len(self.gpus)]
        return ExecutionConfig(
            device=self.device,
            cpu_threads_per_task=1,
            reallocate=self.reallocate,
            spare_workers=self.spare_workers,
            cuda_graphs=self.cuda_graphs,
            predictor=self.predictor,
            upload=self.upload,
            **chosen,
        )


def write_configs(
    broker: Mosquitto, passwords: dict[str, str], options: Options, ports: dict[str, int] | None = None
) -> tuple[dict[str, Path], dict[str, str]]:
    """Every process's config file, and its metrics URL (each listens on a free port of 127.0.0.1). `ports`:
    where a process reaches the broker, when not at the broker's own port (a throttled link)."""
    out = options.out

    def mqtt(user: str) -> MqttSettings:
        port = (ports or {}).get(user, broker.port)
        return MqttSettings(host=broker.host, port=port, username=user, password=passwords[user])

    metrics_ports = {name: free_port() for name in ["aggregator", *options.devices()]}
    configs = {
        "aggregator": AggregatorConfig(
            state_dir=str(state_dir(out, "aggregator")),
            mqtt=mqtt("aggregator"),
            metrics=AggregatorMetricsConfig(port=metrics_ports["aggregator"]),
            rounds=RoundsConfig(rounds=options.rounds, min_devices=options.agents, round_timeout_s=600.0),
            tasks={task: definition for task, (definition, _) in options.tasks().items()},
        )
    }
    for index, device in enumerate(options.devices()):
        data = {
            "kind": "digits",
            "num_partitions": options.agents,
            "partition_index": index,
            "partition": options.partition,
        }
        configs[device] = AgentConfig(
            device=device,
            state_dir=str(state_dir(out, device)),
            telemetry_interval_s=10.0,
            mqtt=mqtt(device),
            metrics=MetricsConfig(port=metrics_ports[device]),
            execution=options.execution(index),
            calibration=CalibrationConfig(auto=False),  # runs compare policies: no profiling between rounds
            tasks={task: _data_spec({**data, "fraction": share}) for task, (_, share) in TASKS.items()},
        )
    paths = {}
    for name, config in configs.items():
        paths[name] = out / "config" / f"{name}.toml"
        paths[name].parent.mkdir(parents=True, exist_ok=True)
        paths[name].write_text(to_toml(config))
    return paths, {name: f"http://127.0.0.1:{port}/metrics" for name, port in metrics_ports.items()}


def state_dir(out: Path, name: str) -> Path:
    """The state directory of a run's process `name` (the aggregator, a device, the monitor)."""
    return out / "state" / name


def seed_history(options: Options) -> None:
    """Give every agent `options.device_history`, as a device that ran earlier federations holds it: the data
    files of its own rounds, each under its GPU's name in the folder where the planner reads it
    (agent.config.predictor_dir), whatever the file was called. ValueError for a file that does not name one
    GPU and one kind of training step, the agents' (`cuda_graphs`)."""
    from predictor.records import STEP_KINDS, DataFile, dataset_path

    for path in options.device_history:
        history = DataFile.read(path)
        gpu = history.gpu
        if history.cuda_graphs != options.cuda_graphs:
            raise ValueError(
                f"{path} holds rounds of {STEP_KINDS[history.cuda_graphs]}; these agents run "
                f"{STEP_KINDS[options.cuda_graphs]}"
            )
        for device in options.devices():
            own = predictor_dir(state_dir(options.out, device))
            own.mkdir(parents=True, exist_ok=True)
            # the bytes checked, read once for every agent
            dataset_path(own, gpu, history.cuda_graphs).write_bytes(history.raw)


def round_counters(urls: dict[str, str]) -> dict[str, float | None]:
    """Each process's count of finished rounds, scraped from its endpoint (None: it did not answer)."""
    counts = {}
    for name, url in urls.items():
        try:
            counts[name] = scrape(url).get(ROUND_COUNTERS["aggregator" if name == "aggregator" else "agent"])
        except OSError:
            counts[name] = None
    return counts


def _data_spec(fields: dict):
    from agent.data import DataSpec

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


def run(options: Options) -> dict:
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from agent.data.digits import digits_test_set
    from agent.training import evaluate

    torch.set_num_threads(1)  # leave the cores to the task processes
    out, rounds, tasks = options.out, options.rounds, options.tasks()
    timeout_s = options.timeout_s if options.timeout_s is not None else 600.0 + 200.0 * rounds
    console = Console()
    shutil.rmtree(out, ignore_errors=True)
    (out / "logs").mkdir(parents=True)
    devices = options.devices()
    passwords = {user: secrets.token_urlsafe(16) for user in ["aggregator", "monitor", *devices]}
    test_sets = {task: digits_test_set(definition.model) for task, (definition, _) in tasks.items()}
    accuracy: dict[str, dict[int, float]] = {task: {} for task in tasks}
    reported: set[int] = set()
    scraped: list[dict] = []  # per round, once its globals are out: each process's round counter (endpoint)
    started = time.time()
    with Mosquitto(out / "broker", passwords) as broker, ExitStack() as links:
        throttled = {
            device: links.enter_context(
                ThrottledLink(broker.host, broker.port, options.link_mbps, options.link_latency_ms)
            ).port
            for device in (devices if options.link_mbps is not None else [])
        }
        configs, metrics_urls = write_configs(broker, passwords, options, throttled)
        seed_history(options)
        console.print("metrics: " + ", ".join(f"{name} {url}" for name, url in metrics_urls.items()))
        processes = {"aggregator": start("aggregator", "aggregator.cli", configs["aggregator"], out / "logs")}
        processes |= {d: start(d, "agent.cli", configs[d], out / "logs") for d in devices}
        monitor = Monitor(
            MqttSettings(
                host=broker.host, port=broker.port, username="monitor", password=passwords["monitor"]
            ),
            state_dir(out, "monitor"),
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

        def reached() -> int | None:
            """The round the run stops after (options.stop_at), once every task's accuracy shows it."""
            return None if options.stop_at is None else _round_at(accuracy, options.stop_at)

        try:
            with Progress(*columns, console=console) as progress:
                bars = {task: progress.add_task(task, total=rounds, acc="") for task in tasks}
                deadline = time.monotonic() + timeout_s
                while not all(len(accuracy[t]) == rounds + 1 for t in tasks) and not reached():
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the demo did not finish {rounds} rounds in {timeout_s:.0f} s")
                    check_alive()
                    monitor.pump(0.5)
                    # as soon as a round's globals are out (before they are evaluated)
                    while len(scraped) < rounds and all(
                        (t, len(scraped) + 1) in monitor.globals for t in tasks
                    ):
                        scraped.append(
                            {"round": len(scraped) + 1, "rounds_done": round_counters(metrics_urls)}
                        )
                    for (task, version), state in sorted(monitor.globals.items()):
                        if task in accuracy and version not in accuracy[task]:
                            model = tasks[task][0].model
                            acc = evaluate(model, state, test_sets[task], device=options.device)
                            accuracy[task][version] = acc
                            progress.update(bars[task], completed=version, acc=f"test acc {acc:6.1%}")
                    for r in range(1, rounds + 1):
                        if r not in reported and all(r in accuracy[t] for t in tasks):
                            reported.add(r)
                            wall_s = phases.round_wall_s(
                                r, tasks, monitor.schedule_issued_at, monitor.seen_at
                            )
                            accs = "  ".join(f"{t.split('-', 1)[1]} {accuracy[t][r]:.1%}" for t in tasks)
                            counters = scraped[r - 1]["rounds_done"]
                            progress.console.print(
                                f"round {r}/{rounds} done in {phases.format_seconds(wall_s, 1):>5} s: {accs}  "
                                f"(metrics: rounds done {' '.join(_count(c) for c in counters.values())})"
                            )
            monitor.pump(1.0)  # the last round's trailing events
            # the stop also holds when the later rounds' models came in with the round that reached it
            rounds = reached() or rounds
        finally:
            monitor.close()
            stop(processes)
    detail = [
        phases.round_detail(r, monitor.events, monitor.schedule_issued_at, monitor.seen_at)
        for r in range(1, rounds + 1)
    ]
    return {
        "num_rounds": rounds,
        "device": torch.cuda.get_device_name(0) if options.device == "cuda" else "cpu",
        "policy": options.execution().policy,
        "devices": devices,
        "partition": options.partition,
        "seed": options.seed,
        "tasks": {
            task: {
                "model": definition.model.name,
                "input_size": definition.model.input_size,
                "data_share": share,
                "batch_size": definition.batch_size,
                "precision": definition.precision,
                "local_epochs": definition.local_epochs,
                "local_steps": definition.local_steps,
            }
            for task, (definition, share) in tasks.items()
        },
        "stopped_at": None if rounds == options.rounds else options.stop_at,
        "accuracy": {task: [accuracy[task][r] for r in range(rounds + 1)] for task in tasks},
        "round_wall_time_s": [None if rd["wall_s"] is None else round(rd["wall_s"], 2) for rd in detail],
        "round_end_s": phases.round_ends_s(rounds, tasks, monitor.schedule_issued_at, monitor.seen_at),
        "rounds": [{key: rd[key] for key in ("round", "wall_s", "non_training_fraction")} for rd in detail],
        "rounds_detail": detail,
        "total_wall_time_s": round(time.time() - started, 1),
        "metrics_urls": metrics_urls,
        "metrics_after_round": scraped,
        "codec": msgspec.to_builtins(options.codec) if options.codec else None,
        "download_codec": options.download_codec,
        "link": {"mbps": options.link_mbps, "latency_ms": options.link_latency_ms},
        "upload": options.upload,
        "bytes": bytes_moved(rounds, tasks, monitor),
    }


def _round_at(accuracy: dict[str, dict[int, float]], target: float) -> int | None:
    """The first round after which every task is evaluated at `target` or above (None: none yet)."""
    evaluated = set.intersection(*(set(accs) for accs in accuracy.values())) - {0}
    return next((r for r in sorted(evaluated) if all(a[r] >= target for a in accuracy.values())), None)


def bytes_moved(rounds: int, tasks, monitor: Monitor) -> list[dict]:
    """Per round: the updates' bytes (as the agents' finished events say; the monitor may not read updates), in
    all and per task, and each new global version's bytes as a whole and as a delta (what a device holding the
    version before fetches)."""
    moved = []
    for r in range(1, rounds + 1):
        finished = {(e.device, e.task): e for e in monitor.events if e.kind == "finished" and e.round == r}
        by_task = dict.fromkeys(tasks, 0)
        for (_, task), event in finished.items():
            by_task[task] = by_task.get(task, 0) + int(event.metrics.get("update_bytes", 0.0))
        manifests = [monitor.global_manifests.get((t, r)) for t in tasks]
        moved.append(
            {
                "round": r,
                "update_bytes": sum(by_task.values()),
                "update_bytes_by_task": by_task,
                "updates": len(finished),
                "global_whole_bytes": sum(m.transfer.size for m in manifests if m),
                "global_delta_bytes": sum(m.delta.transfer.size for m in manifests if m and m.delta) or None,
            }
        )
    return moved


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def report(summary: dict, out: Path) -> bool:
    """Print the tables, write summary.json, accuracy.png and phases.png; True if every task met the demo's bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rich.console import Console
    from rich.table import Table

    rounds = summary["num_rounds"]
    console = Console()
    table = Table(
        title=f"Test accuracy per round ({len(summary['devices'])} devices, FedAvg, {summary['device']})"
    )
    table.add_column("task")
    for r in range(rounds + 1):
        table.add_column(f"r{r}", justify="right")
    passed = True
    for task, accs in summary["accuracy"].items():
        ok = accs[-1] >= 0.9 and accs[-1] > accs[0] + 0.2
        passed &= ok
        table.add_row(f"{task} ({'ok' if ok else 'BELOW TARGET'})", *(f"{a:.1%}" for a in accs))
    table.add_row(
        "round wall time (s)", "", *(phases.format_seconds(t, 1) for t in summary["round_wall_time_s"])
    )
    console.print(table)
    console.print(phases.phase_tables(summary["rounds_detail"]))
    for rd in summary["rounds_detail"]:
        for note in rd["missing"]:
            console.print(f"round {rd['round']}: {note}", style="yellow", markup=False)

    figure, axis = plt.subplots(figsize=(6, 4))
    for task, accs in summary["accuracy"].items():
        axis.plot(range(rounds + 1), [100 * a for a in accs], marker="o", label=task)
    axis.set(xlabel="round", ylabel="test accuracy (%)", ylim=(0, 100), title="FedMT demo: digits, 3 devices")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "accuracy.png", dpi=120)
    phases.plot_phases(summary["rounds_detail"], out / "phases.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"wrote {out / 'summary.json'}, {out / 'accuracy.png'} and {out / 'phases.png'} "
        f"in {summary['total_wall_time_s']:.0f} s"
    )
    return passed


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _seed(text: str) -> int:
    """A seed that the tasks' config takes (protocol.schemas.TrainSeed)."""
    try:
        return msgspec.convert(int(text), TrainSeed)
    except msgspec.ValidationError as error:
        raise argparse.ArgumentTypeError(f"{text}: {error}") from None


def _local_steps(text: str) -> dict[str, int]:
    """`N` (every task) or `task=N,task=N,...` naming every task of the demo."""
    if "=" not in text:
        return dict.fromkeys(TASKS, _positive(text))
    steps = {}
    for part in text.split(","):
        task, _, count = part.partition("=")
        if task not in TASKS:
            raise argparse.ArgumentTypeError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
        steps[task] = _positive(count)
    if set(steps) != set(TASKS):
        raise argparse.ArgumentTypeError(f"give steps for every task: {', '.join(TASKS)}")
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--rounds", type=_positive, default=6)
    parser.add_argument(
        "--timeout", type=float, help="give up after this many seconds (default: 600 + 200 per round)"
    )
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="where agents and monitor run"
    )
    parser.add_argument(
        "--policy", choices=get_args(ExecutionPolicy), help="the agents' execution policy (default: theirs)"
    )
    parser.add_argument("--resolution", type=_positive, help="every task's input size (default: per task)")
    parser.add_argument(
        "--local-steps",
        type=_local_steps,
        help="optimiser steps per round: N for every task, or TASK=N,TASK=N,... (default: epochs)",
    )
    parser.add_argument(
        "--batch-size", type=_positive, default=16, help="per task (on cuda pinned: min = max = this)"
    )
    parser.add_argument("--precision", choices=get_args(Precision), default="fp32")
    parser.add_argument("--codec", help="every task's update codec, e.g. topk+zstd (default: dense)")
    parser.add_argument("--codec-fraction", type=float, help="what topk / dct keep (default: theirs)")
    parser.add_argument("--download-codec", help="also publish global models as deltas, e.g. fp16+zstd")
    parser.add_argument(
        "--link-mbps", type=float, help="each agent's link to the broker (default: unthrottled)"
    )
    parser.add_argument("--link-latency-ms", type=float, default=0.0)
    parser.add_argument(
        "--upload",
        choices=["on_finish", "after_round"],
        default="on_finish",
        help="on_finish: each update uploads while other tasks train (Algorithm 1); after_round: naive",
    )
    parser.add_argument(
        "--seed",
        type=_seed,
        default=0,
        help=f"the initial global models' seed and the tasks' training seed, 0..{MAX_TRAIN_SEED}",
    )
    parser.add_argument(
        "--spare-workers", type=int, help="each agent's spare worker processes (default: theirs)"
    )
    parser.add_argument(
        "--cuda-graphs", action="store_true", help="the agents replay training steps from CUDA graphs"
    )
    args = parser.parse_args(argv)
    codec = CodecSpec(name=args.codec, fraction=args.codec_fraction) if args.codec else None
    options = Options(
        out=args.out.resolve(),
        rounds=args.rounds,
        timeout_s=args.timeout,
        device=args.device,
        policy=args.policy,
        resolution=args.resolution,
        local_steps=args.local_steps,
        batch_size=args.batch_size,
        precision=args.precision,
        codec=codec,
        download_codec=args.download_codec,
        link_mbps=args.link_mbps,
        link_latency_ms=args.link_latency_ms,
        upload=args.upload,
        seed=args.seed,
        spare_workers=args.spare_workers,
        cuda_graphs=args.cuda_graphs,
    )
    try:
        summary = run(options)
    except (ProcessDied, TimeoutError) as exc:
        print(f"demo failed: {exc}\nlogs: {options.out / 'logs'}", file=sys.stderr)
        return 1
    return 0 if report(summary, options.out) else 1


if __name__ == "__main__":
    sys.exit(main())
