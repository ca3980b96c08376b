"""Streaming one update: the agent's outbox to its receipt, against the same bytes with plain paho.

For each size (a ResNet18 update, 44.8 MB, and a ShuffleNetV2 0.5x one, 1.45 MB: the models' real tensor
layouts, random float32 deltas) each repeat measures, back to back and in alternating order:
- project: a device sends an update through the agent's upload path (`agent.uploads.Uploads`: its outbox, its
  MqttLink, the payload memory-mapped and chunked) to the real aggregator process (`python -m aggregator.cli
  run`), through Mosquitto with the shipped config; timed from handing the outbox entry to the uploader to the
  `accepted` receipt (spooled, hashed, validated, durable in the ledger). The update completes its task's round,
  so the aggregator then finalises the task and publishes a new global model; the next measurement starts once
  that model is out (on an idle aggregator and broker, as the first one does);
- raw: the same bytes in chunks of the same size, QoS 1, from one plain paho client to a plain subscriber
  through the same broker (both with TCP_NODELAY and the same in-flight window as the project's link), timed
  from the first publish to the subscriber holding the last byte.
Rates are MB/s (10^6 bytes); a size's ratio is the median project rate over the median raw rate (per-repeat
ratios are kept too).

    python -m bench.stream --repeats 5 --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from safetensors.numpy import save_file

from agent.outbox import Outbox
from agent.uploads import Uploads
from aggregator.config import AggregatorConfig, RoundsConfig, TaskConfig
from common.config import to_toml
from protocol import topics
from protocol.chunking import DEFAULT_CHUNK_SIZE, describe_transfer, sha256_hex
from protocol.schemas import (
    DeviceProfile,
    GlobalManifest,
    HostInfo,
    ModelSpec,
    Receipt,
    Schedule,
    Status,
    TaskData,
    UpdateManifest,
    decode,
    encode,
)
from protocol.tensors import encode_state
from protocol.transport import Incoming, MqttLink, MqttSettings
from testbed.broker import Mosquitto

#: task -> the model whose update it streams (torchvision layouts; 10 classes, 32 px)
MODELS = {"resnet18": "resnet18", "shufflenet": "shufflenet_v2_x0_5"}
TARGETS = {"resnet18": 0.8, "shufflenet": 0.9}
DEVICE, RAW_TOPIC = "stream-dev", "bench/raw"
RAW_ACL = "\n# bench/stream.py: the plain paho pair\nuser raw-pub\ntopic write bench/raw/#\nuser raw-sub\ntopic read bench/raw/#\n"


@dataclass
class Update:
    """One task's update payload (the same bytes every repeat) and its base state."""

    task: str
    base: dict[str, np.ndarray]
    payload: bytes
    sha256: str = field(init=False)

    def __post_init__(self) -> None:
        self.sha256 = sha256_hex(self.payload)


def make_update(task: str, model: str, seed: int) -> Update:
    from common.models import build_model, state_to_numpy

    base = state_to_numpy(build_model(ModelSpec(name=model, num_classes=10, input_size=32), seed=0))
    rng = np.random.default_rng(seed)
    delta = {
        name: (rng.standard_normal(a.shape, dtype=np.float32) * 1e-3).astype(a.dtype)
        if a.dtype.kind == "f"
        else np.zeros_like(a)
        for name, a in base.items()
    }
    return Update(task, base, encode_state(delta))


class Device:
    """A device that uploads through the agent's path: its MqttLink, outbox and `Uploads`."""

    def __init__(self, settings: MqttSettings, state: Path, updates: dict[str, Update]) -> None:
        status = topics.device(DEVICE, "status")
        self.events: queue.Queue = queue.Queue(256)
        globals_ = [topics.manifest(topics.global_model(task)) for task in updates]
        self.link = MqttLink(
            settings,
            [topics.schedules(DEVICE), topics.device(DEVICE, "receipts"), *globals_],
            will=(status, encode(Status(state="offline", ts=time.time()))),
            birth=(status, encode(Status(state="online", ts=time.time()))),
            inbox=self.events,
        )
        self.outbox = Outbox(state / "outbox")
        self.uploads = Uploads(self.link, self.outbox, DEVICE, receipt_timeout_s=600, retry_after_s=600)
        self.state, self.updates = state, updates
        self.schedules: dict[str, Schedule] = {}  # task -> its latest schedule
        self.versions: dict[str, int] = {}  # task -> its latest global version published

    def start(self) -> None:
        self.link.start()
        if not self.link.wait_connected(30):
            raise TimeoutError("the bench device could not connect")
        host = HostInfo(
            hostname=platform.node()[:64] or "host",
            os=sys.platform,
            machine=platform.machine(),
            python=platform.python_version(),
            cpu_count=os.cpu_count() or 1,
            memory_bytes=1 << 30,
        )
        profile = DeviceProfile(
            device=DEVICE,
            ts=time.time(),
            agent_version="bench",
            host=host,
            tasks={task: TaskData(samples=100) for task in self.updates},
        )
        self.link.publish(topics.device(DEVICE, "profile"), encode(profile), retain=True)

    def next_round(self, after: int, timeout_s: float = 120.0) -> int:
        """Wait until every task has its schedule of one round after `after`; that round."""
        deadline = time.monotonic() + timeout_s
        while not self._scheduled(after):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no schedules after round {after}")
            self._pump(deadline)
        return self.schedules[next(iter(self.updates))].round

    def _scheduled(self, after: int) -> bool:
        rounds = {s.round for t in self.updates if (s := self.schedules.get(t)) is not None}
        return len(rounds) == 1 and rounds.pop() > after and self.schedules.keys() >= self.updates.keys()

    def upload(self, task: str) -> float:
        """Send this round's update of `task` through the agent's path; seconds from the send to the receipt."""
        schedule = self.schedules[task]
        assignment = schedule.tasks[0]
        update, update_id = self.updates[task], uuid.uuid4().hex
        path = self.state / f"{update_id}.update"
        path.write_bytes(update.payload)
        manifest = UpdateManifest(
            task=task,
            round=schedule.round,
            device=DEVICE,
            update_id=update_id,
            base_version=assignment.base_version,
            samples=100,
            codec=assignment.codec.name,
            transfer=describe_transfer(update_id, len(update.payload), update.sha256),
        )
        pending = self.outbox.put(manifest, path)  # the outbox entry, durable: where the timing starts
        started = time.perf_counter()
        if not self.uploads.send(pending):
            raise RuntimeError("the link did not take the update")
        deadline = time.monotonic() + 300
        while (receipt := self._pump(deadline)) is None or receipt.update_id != update_id:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no receipt for the {task} update")
        elapsed = time.perf_counter() - started
        self.uploads.settle(receipt)
        if receipt.status != "accepted":
            raise RuntimeError(f"{task} update {receipt.status}: {receipt.reason}")
        while self.versions.get(task, -1) <= assignment.base_version:  # the round it completed is final
            if time.monotonic() > deadline:
                raise TimeoutError(f"no global model of {task} after its update")
            self._pump(deadline)
        return elapsed

    def _pump(self, deadline: float) -> Receipt | None:
        """Take one event: a schedule or a global version is kept, a receipt returned."""
        for item in self.link.take(max(0.0, min(1.0, deadline - time.monotonic())), 1):
            if isinstance(item, Incoming) and item.payload:
                ref = topics.parse(item.topic)
                if ref.kind == "schedule":
                    self.schedules[ref.task] = decode(item.payload, Schedule)
                elif ref.kind == "receipts":
                    return decode(item.payload, Receipt)
                elif ref.kind == "global":
                    manifest = decode(item.payload, GlobalManifest)
                    self.versions[manifest.task] = max(self.versions.get(manifest.task, -1), manifest.version)
        return None

    def stop(self) -> None:
        self.link.stop()


class RawPair:
    """Plain paho: a QoS 1 publisher and a subscriber that counts bytes."""

    def __init__(self, broker: Mosquitto, passwords: dict[str, str], inflight: int) -> None:
        self._done = threading.Event()
        self._want = self._got = 0
        self.subscriber = self._client(broker, "raw-sub", passwords, inflight)
        self.subscriber.on_message = self._on_message
        self.subscriber.subscribe(f"{RAW_TOPIC}/#", qos=1)
        self.publisher = self._client(broker, "raw-pub", passwords, inflight)
        time.sleep(0.5)  # the subscription is in place

    @staticmethod
    def _client(broker: Mosquitto, user: str, passwords: dict[str, str], inflight: int) -> mqtt.Client:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=user, protocol=mqtt.MQTTv5)
        client.username_pw_set(user, passwords[user])
        client.max_inflight_messages_set(inflight)
        client.connect(broker.host, broker.port)
        client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.loop_start()
        return client

    def _on_message(self, client, userdata, message) -> None:
        self._got += len(message.payload)
        if self._got >= self._want:
            self._done.set()

    def send(self, payload: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> float:
        """Seconds from the first publish to the subscriber holding every byte."""
        self._got, self._want = 0, len(payload)
        self._done.clear()
        view = memoryview(payload)
        started = time.perf_counter()
        for index, start in enumerate(range(0, len(payload), chunk_size)):
            self.publisher.publish(f"{RAW_TOPIC}/{index}", bytes(view[start : start + chunk_size]), qos=1)
        if not self._done.wait(300):
            raise TimeoutError("the raw subscriber did not get every byte")
        return time.perf_counter() - started

    def stop(self) -> None:
        for client in (self.publisher, self.subscriber):
            client.disconnect()
            client.loop_stop()


def write_aggregator_config(work: Path, broker: Mosquitto, password: str, updates: dict[str, Update]) -> Path:
    tasks = {}
    for task, update in updates.items():
        weights = work / f"{task}.safetensors"
        save_file(update.base, str(weights))
        tasks[task] = TaskConfig(
            model=ModelSpec(name=MODELS[task], num_classes=10, input_size=32), init_weights=str(weights)
        )
    config = AggregatorConfig(
        state_dir=str(work / "aggregator"),
        mqtt=MqttSettings(host=broker.host, port=broker.port, username="aggregator", password=password),
        rounds=RoundsConfig(rounds=0, min_devices=1, min_updates=1, round_timeout_s=3600),
        tasks=tasks,
    )
    path = work / "aggregator.toml"
    path.write_text(to_toml(config))
    return path


def measure(
    updates: dict[str, Update], repeats: int, warmup: int, work: Path
) -> dict[str, dict[str, list[float]]]:
    """Seconds per repeat: {task: {"project": [...], "raw": [...]}}."""
    passwords = {user: uuid.uuid4().hex for user in ("aggregator", DEVICE, "raw-pub", "raw-sub")}
    times = {task: {"project": [], "raw": []} for task in updates}
    with Mosquitto(work / "broker", passwords, extra_acl=RAW_ACL) as broker:
        config = write_aggregator_config(work, broker, passwords["aggregator"], updates)
        log = open(work / "aggregator.log", "wb")
        aggregator = subprocess.Popen(
            [sys.executable, "-m", "aggregator.cli", "run", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        settings = MqttSettings(
            host=broker.host, port=broker.port, username=DEVICE, password=passwords[DEVICE]
        )
        device = Device(settings, work / "device", updates)
        raw = RawPair(broker, passwords, settings.max_inflight)
        try:
            device.start()
            last_round = 0
            for repeat in range(warmup + repeats):
                last_round = device.next_round(last_round)
                time.sleep(1.0)  # the previous round's global models are out: the broker is idle again
                for task, update in updates.items():
                    kinds = ["raw", "project"] if repeat % 2 == 0 else ["project", "raw"]
                    for kind in kinds:
                        seconds = raw.send(update.payload) if kind == "raw" else device.upload(task)
                        if repeat >= warmup:
                            times[task][kind].append(seconds)
                        time.sleep(0.2)
                if aggregator.poll() is not None:
                    raise RuntimeError(f"the aggregator exited: see {work / 'aggregator.log'}")
                print(
                    f"repeat {repeat + 1 - warmup}/{repeats}" if repeat >= warmup else "warm-up",
                    {t: {k: f"{v[-1] * 1e3:.1f} ms" for k, v in d.items() if v} for t, d in times.items()},
                    flush=True,
                )
        finally:
            raw.stop()
            device.stop()
            aggregator.terminate()
            aggregator.wait(30)
    return times


def summarise(times: dict[str, dict[str, list[float]]], sizes: dict[str, int]) -> list[dict]:
    rows = []
    for task, runs in times.items():
        size = sizes[task]
        project, raw = statistics.median(runs["project"]), statistics.median(runs["raw"])
        rows.append(
            {
                "task": task,
                "model": MODELS[task],
                "bytes": size,
                "project_mb_s": size / 1e6 / project,
                "raw_mb_s": size / 1e6 / raw,
                "ratio": raw / project,
                "target": TARGETS[task],
                "repeats": len(runs["project"]),
                "project_ms": [round(s * 1e3, 2) for s in runs["project"]],
                "raw_ms": [round(s * 1e3, 2) for s in runs["raw"]],
                "ratios": [round(r / p, 3) for p, r in zip(runs["project"], runs["raw"], strict=True)],
            }
        )
    return rows


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="update streaming: agent outbox -> receipt vs plain paho QoS 1 (same broker)")
    for column in ("update", "MB", "project MB/s", "raw MB/s", "ratio", "ratio min-max", "target"):
        table.add_column(column, justify="right")
    for row in rows:
        met = "met" if row["ratio"] >= row["target"] else "[bold red]missed[/]"
        table.add_row(
            row["model"],
            f"{row['bytes'] / 1e6:.2f}",
            f"{row['project_mb_s']:.0f}",
            f"{row['raw_mb_s']:.0f}",
            f"{row['ratio']:.2f}",
            f"{min(row['ratios']):.2f}-{max(row['ratios']):.2f}",
            f">= {row['target']} {met}",
        )
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    updates = {task: make_update(task, model, seed=i) for i, (task, model) in enumerate(MODELS.items())}
    with tempfile.TemporaryDirectory(prefix="fedmt-stream-") as work:
        times = measure(updates, args.repeats, args.warmup, Path(work))
    rows = summarise(times, {task: len(update.payload) for task, update in updates.items()})
    print_table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "rows": rows,
        "machine": {
            "cpus": os.cpu_count(),
            "load_1m_after": os.getloadavg()[0],
            "python": platform.python_version(),
        },
        "command": " ".join(["python -m bench.stream", *(argv if argv is not None else sys.argv[1:])]),
    }
    (args.out / "stream.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
