"""Fleet benchmark: N simulated devices (testbed/fleet.py) x R rounds against the real aggregator process.

For each N: a fresh Mosquitto (the shipped config), `python -m aggregator.cli run` on one task whose model is one
float32 tensor of --update-kb, and N simulated devices that train for --train-s (a burst: all N updates arrive at
once) and send their updates as the agent does. Per round: updates/s (the round's recorded updates over first
upload -> last receipt), finalise latency (last receipt -> the new global manifest seen by a device), lost
updates (uploaded, not refused, not in the ledger) and whether the new global version counts each update
exactly once; the aggregator's peak RSS (VmHWM) over the whole run. Then, with --kill-devices, the same with the
aggregator killed (SIGKILL) in the middle of round 2's burst and restarted.

    python -m bench.fleet --devices 10 100 1000 --rounds 3 --kill-devices 1000 --out bench/results/fleet.json
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from aggregator.config import AggregatorConfig, RoundsConfig, TaskConfig
from bench.common import write_json
from protocol.schemas import ModelSpec
from protocol.transport import MqttSettings
from testbed.aggregator_process import AggregatorProcess, cpu_seconds_of, peak_rss_of
from testbed.broker import Mosquitto
from testbed.fleet import Fleet, FleetConfig, FleetStats, TrainTime, fleet_users, raise_open_files
from testbed.fleet_audit import audit

TASK = "fleet"
TARGETS = {"rss_ratio": 1.2, "updates_per_s": 1000, "finalise_ms": 50}


@dataclass(frozen=True)
class Setup:
    rounds: int
    update_kb: int
    train_s: float
    events: bool
    receipt_timeout_s: float
    timeout_s: float


def run_fleet(devices: int, setup: Setup, work: Path, kill_at: float | None = None) -> dict:
    """One run of `devices` simulated devices; with `kill_at` (a share of round 2's updates), kill -9 and
    restart the aggregator once that many were acknowledged."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    users = fleet_users(devices)
    password = secrets.token_urlsafe(12)
    raise_open_files(2 * devices + 1024)  # the broker, started from here, inherits it
    with Mosquitto(work / "broker", {"aggregator": password, **users}) as broker:
        config = aggregator_config(work, broker, password, devices, setup)
        behaviour = FleetConfig(
            tasks={TASK: 100},
            train_time=TrainTime(median_s=setup.train_s),
            receipt_timeout_s=setup.receipt_timeout_s,
            events=setup.events,
        )
        started, own_cpu = time.monotonic(), time.process_time()
        with AggregatorProcess(config, work / "aggregator") as process:
            with Fleet(broker.host, broker.port, users, behaviour) as fleet:
                watch = [process.check_alive]
                fleet.wait(lambda s: s.connects >= devices, setup.timeout_s, "every device connected", watch)
                connected_s = time.monotonic() - started
                killed = None
                if kill_at is not None:
                    wanted = max(1, int(kill_at * devices))
                    fleet.wait(lambda s: accepted(s, 2) >= wanted, setup.timeout_s, "round 2's burst", watch)
                    process.kill()
                    killed = {
                        "accepted_before_kill": fleet.query(lambda s: accepted(s, 2)),
                        "at": time.monotonic(),
                    }
                    process.start()
                fleet.wait(
                    lambda s: (TASK, setup.rounds) in s.global_seen, setup.timeout_s, "the last round", watch
                )
                try:
                    fleet.wait(FleetStats.settled, 30, "a receipt for every update", watch)
                except TimeoutError:
                    pass  # the audit counts what never got one
                wall_s = time.monotonic() - started
                peak_rss = process.peak_rss_mib()
                broker_rss = peak_rss_of(broker.pid) if broker.pid else None
                cpu_s = {
                    "aggregator": cpu_seconds_of(process.process.pid),
                    "broker": cpu_seconds_of(broker.pid),
                    "fleet": time.process_time() - own_cpu,  # the simulated devices (this process)
                }
                rounds = fleet.query(lambda s: round_rows(s, setup.rounds))
                audits = fleet.query(lambda s: audit(Path(config.state_dir), TASK, fleet.values, s))
                resends = fleet.query(lambda s: sum(r.resends for r in s.tasks.values()))
    for row, checked in zip(rounds, audits):
        row |= {
            "recorded": checked.recorded,
            "lost": len(checked.lost),
            "aggregate_error": checked.aggregate_error,
        }
    result = {
        "devices": devices,
        "peak_rss_mib": round(peak_rss, 1),
        "updates_per_s": round(statistics.median(r["updates_per_s"] for r in rounds), 1),
        "finalise_ms": round(statistics.median(r["finalise_ms"] for r in rounds), 1),
        "finalise_ms_max": max(r["finalise_ms"] for r in rounds),
        "lost": sum(r["lost"] for r in rounds),
        "counted_once": all(r["aggregate_error"] is not None and r["aggregate_error"] < 1e-6 for r in rounds),
        "recorded": sum(r["recorded"] for r in rounds),
        "resends": resends,
        "broker_peak_rss_mib": None if broker_rss is None else round(broker_rss, 1),
        "connect_s": round(connected_s, 1),
        "wall_s": round(wall_s, 1),  # aggregator start -> last round's global seen
        # CPU time of the whole run (start-up included; after a kill, the restarted aggregator's only), and per
        # recorded update: what one core could take, whatever else the machine was running
        "cpu_s": {name: None if s is None else round(s, 1) for name, s in cpu_s.items()},
        "cpu_ms_per_update": {
            name: None if s is None else round(1000 * s / max(1, sum(r["recorded"] for r in rounds)), 2)
            for name, s in cpu_s.items()
        },
        "rounds": rounds,
    }
    if killed is not None:
        last_accept = rounds[1]["last_receipt_at"]
        result["killed"] = {
            "accepted_before_kill": killed["accepted_before_kill"],
            "round_2_done_s_after_kill": round(last_accept - killed["at"], 2),
        }
    for row in rounds:
        row.pop("last_receipt_at")
    return result


def aggregator_config(
    work: Path, broker: Mosquitto, password: str, devices: int, setup: Setup
) -> AggregatorConfig:
    weights = work / "init.safetensors"
    save_file({"w": np.zeros(setup.update_kb * 1024 // 4, np.float32)}, str(weights))
    task = TaskConfig(model=ModelSpec(name="fleet", num_classes=2, input_size=8), init_weights=str(weights))
    return AggregatorConfig(
        state_dir=str(work / "aggregator" / "state"),
        keep_checkpoints=setup.rounds + 1,  # the audit reads every round's base and new global model
        mqtt=MqttSettings(host=broker.host, port=broker.port, username="aggregator", password=password),
        rounds=RoundsConfig(rounds=setup.rounds, min_devices=devices, round_timeout_s=setup.timeout_s),
        tasks={TASK: task},
    )


def accepted(stats: FleetStats, round_: int) -> int:
    record = stats.tasks.get((TASK, round_))
    return 0 if record is None else len(record.accepted())


def round_rows(stats: FleetStats, rounds: int) -> list[dict]:
    """Per round: recorded updates per second (first upload -> last receipt), the spread of the uploads
    themselves (the simulator's own pace) and last receipt -> new global manifest. For the latter, the last
    receipt a device heard before any device saw the new global: one thread reads the devices' sockets in no
    set order, and a device resending after a lost receipt (the kill run) hears `duplicate` after the round."""
    rows = []
    for number in range(1, rounds + 1):
        record = stats.tasks[TASK, number]
        receipts = record.accepted()
        first_upload, last_upload = min(record.uploaded.values()), max(record.uploaded.values())
        last_receipt = max(receipts.values())
        final_seen = stats.global_seen[TASK, number]
        last_before = max((t for t in receipts.values() if t <= final_seen), default=last_receipt)
        rows.append(
            {
                "round": number,
                "updates": len(receipts),
                "updates_per_s": round(len(receipts) / max(last_receipt - first_upload, 1e-6), 1),
                "uploads_span_s": round(last_upload - first_upload, 3),
                "receipts_span_s": round(last_receipt - first_upload, 3),
                "finalise_ms": round(1000 * (final_seen - last_before), 1),
                "resends": record.resends,
                "last_receipt_at": last_receipt,
            }
        )
    return rows


def targets(rows: list[dict]) -> dict:
    """The issue's targets, met or not, from the rows (RSS at the largest N against the smallest)."""
    smallest, largest = min(rows, key=lambda r: r["devices"]), max(rows, key=lambda r: r["devices"])
    ratio = largest["peak_rss_mib"] / smallest["peak_rss_mib"]
    return {
        "rss_ratio": {"value": round(ratio, 2), "target": f"<= {TARGETS['rss_ratio']}", "met": ratio <= 1.2},
        "updates_per_s": {
            "value": largest["updates_per_s"],
            "target": f">= {TARGETS['updates_per_s']}",
            "met": largest["updates_per_s"] >= TARGETS["updates_per_s"],
        },
        "finalise_ms": {
            "value": max(r["finalise_ms_max"] for r in rows),
            "target": f"<= {TARGETS['finalise_ms']}",
            "met": all(r["finalise_ms_max"] <= TARGETS["finalise_ms"] for r in rows),
        },
        "lost": {
            "value": sum(r["lost"] for r in rows),
            "target": "0",
            "met": all(r["lost"] == 0 for r in rows),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--update-kb", type=int, default=275, help="size of every update (one float32 tensor)"
    )
    parser.add_argument("--train-s", type=float, default=0.0, help="simulated training time per round")
    parser.add_argument("--no-events", action="store_true", help="devices send no events, only updates")
    parser.add_argument(
        "--kill-devices", type=int, default=None, help="also a run killed mid-round-2 at this N"
    )
    parser.add_argument(
        "--kill-at", type=float, default=0.5, help="share of round 2's updates in before the kill"
    )
    parser.add_argument("--receipt-timeout-s", type=float, default=10.0, help="devices resend after this")
    parser.add_argument("--timeout-s", type=float, default=900.0)
    parser.add_argument(
        "--work", type=Path, default=None, help="working directory (default: a temporary one)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/fleet.json"))
    args = parser.parse_args(argv)
    setup = Setup(
        rounds=args.rounds,
        update_kb=args.update_kb,
        train_s=args.train_s,
        events=not args.no_events,
        receipt_timeout_s=args.receipt_timeout_s,
        timeout_s=args.timeout_s,
    )
    if args.work is not None:
        result = measure(args, setup, args.work)
    else:  # a run leaves its brokers', aggregators' and devices' files: hundreds of MB at 1000 devices
        with tempfile.TemporaryDirectory(prefix="fedmt-fleet-") as work:
            result = measure(args, setup, Path(work))
    command = " ".join(["python -m bench.fleet", *(argv if argv is not None else sys.argv[1:])])
    result = {"command": command, **result}
    write_json(args.out, result)
    for name, target in result["targets"].items():
        print(
            f"{name}: {target['value']} (target {target['target']}): {'met' if target['met'] else 'missed'}"
        )
    return 0


def measure(args: argparse.Namespace, setup: Setup, work: Path) -> dict:
    """Every run the arguments ask for, in folders under `work`: the rows, the targets and the kill run."""
    rows = []
    for devices in args.devices:
        load = os.getloadavg()[0]
        row = run_fleet(devices, setup, work / f"n{devices}")
        row["load_average"] = [round(load, 1), round(os.getloadavg()[0], 1)]  # 1-minute, before and after
        rows.append(row)
        print(summary(row), flush=True)
    result = {
        "setup": {**setup.__dict__, "cpu_count": _cpus()},
        "rows": rows,
        "targets": targets(rows),
    }
    if args.kill_devices:
        load = os.getloadavg()[0]
        killed = run_fleet(args.kill_devices, setup, work / "kill", kill_at=args.kill_at)
        killed["load_average"] = [round(load, 1), round(os.getloadavg()[0], 1)]
        print("kill -9:", summary(killed), killed["killed"], flush=True)
        result["kill9"] = killed
    return result


def summary(row: dict) -> str:
    return (
        f"{row['devices']:5d} devices: peak RSS {row['peak_rss_mib']:.0f} MiB, {row['updates_per_s']:.0f} updates/s, "
        f"finalise {row['finalise_ms']:.0f} ms, lost {row['lost']}, counted once: {row['counted_once']}, "
        f"resends {row['resends']}"
    )


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    sys.exit(main())
