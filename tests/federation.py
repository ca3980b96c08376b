"""A small federation for integration tests: configs, services on threads, and an observer on the broker."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from agent.config import AgentConfig, ExecutionConfig
from aggregator.config import AggregatorConfig, RoundsConfig, TaskConfig
from protocol import topics
from protocol.schemas import ModelSpec, OptimizerSpec, Receipt, UpdateManifest, decode
from protocol.transport import MqttLink, MqttSettings, TlsSettings
from testbed.broker import Mosquitto

USERS = {
    "aggregator": "agg-secret",
    "aggregator-2": "agg2-secret",  # a second aggregator process, owning other tasks
    "monitor": "mon-secret",
    "auditor": "aud-secret",
    **{f"dev{i}": f"dev{i}-secret" for i in range(1, 5)},
}

SMALL_TASKS = {
    "shuffle": TaskConfig(
        model=ModelSpec(name="shufflenet_v2_x0_5", num_classes=10, input_size=32),
        optimizer=OptimizerSpec(name="sgd", lr=0.05, momentum=0.9),
        batch_size=16,
    ),
    "mobile": TaskConfig(
        model=ModelSpec(name="mobilenet_v3_small", num_classes=10, input_size=32),
        optimizer=OptimizerSpec(name="sgd", lr=0.05, momentum=0.9),
        batch_size=16,
    ),
}


BOTH_V1 = [("shuffle", 1), ("mobile", 1)]  # the first new global version of each of SMALL_TASKS


def mqtt(broker: Mosquitto, user: str) -> MqttSettings:
    """`user`'s settings: its password, or its provisioned certificate on a TLS broker."""
    if broker.certs is not None:
        tls = TlsSettings(
            ca_file=str(broker.certs / "ca.crt"),
            cert_file=str(broker.certs / f"{user}.crt"),
            key_file=str(broker.certs / f"{user}.key"),
        )
        return MqttSettings(host=broker.host, port=broker.port, username=user, tls=tls, reconnect_max_s=2.0)
    return MqttSettings(
        host=broker.host, port=broker.port, username=user, password=USERS[user], reconnect_max_s=2.0
    )


def aggregator_config(tmp: Path, broker: Mosquitto, tasks=None, **rounds) -> AggregatorConfig:
    return AggregatorConfig(
        state_dir=str(tmp / "aggregator"),
        mqtt=mqtt(broker, "aggregator"),
        rounds=RoundsConfig(**{"rounds": 1, "min_devices": 2, "round_timeout_s": 120.0, **rounds}),
        tasks=tasks or SMALL_TASKS,
    )


def digits(partition: int, partitions: int = 2, fraction: float = 0.15) -> dict:
    return {
        "kind": "digits",
        "num_partitions": partitions,
        "partition_index": partition,
        "fraction": fraction,
    }


def agent_config(
    tmp: Path, broker: Mosquitto, device: str, tasks: dict[str, dict], policy: str = "concurrent"
) -> AgentConfig:
    import msgspec

    from agent.data import DataSpec

    return AgentConfig(
        device=device,
        state_dir=str(tmp / device),
        telemetry_interval_s=2.0,
        receipt_timeout_s=30.0,
        mqtt=mqtt(broker, device),
        execution=ExecutionConfig(device="cpu", policy=policy),
        tasks={task: msgspec.convert(spec, DataSpec) for task, spec in tasks.items()},
    )


@contextmanager
def running(*services) -> Iterator[list[Running]]:
    """Services running on threads for the `with` block, stopped afterwards (last started, first stopped)."""
    started = [Running(service) for service in services]
    try:
        yield started
    finally:
        for service in reversed(started):
            service.stop()


class Running:
    """A service's `run(stop)` on a daemon thread."""

    def __init__(self, service) -> None:
        self.service = service
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=service.run, args=(self.stop_event,), daemon=True)
        self.thread.start()

    def __call__(self) -> None:
        """Raise if the service died (for Monitor.wait_for's `watch`)."""
        assert self.thread.is_alive() or self.stop_event.is_set(), f"{type(self.service).__name__} died"

    def stop(self, timeout_s: float = 30.0) -> None:
        self.stop_event.set()
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "service did not stop"


def reference_fedavg(base: dict[str, np.ndarray], updates: list[tuple[int, dict[str, np.ndarray]]]) -> dict:
    """FedAvg (Eq. 1) written independently: the sample-weighted mean of the local models."""
    total = sum(samples for samples, _ in updates)
    result = {}
    for name, array in base.items():
        local_models = [(array.astype(np.float64) + delta[name].astype(np.float64)) for _, delta in updates]
        mean = sum(samples * local for (samples, _), local in zip(updates, local_models)) / total
        result[name] = (np.rint(mean) if array.dtype.kind in "iu" else mean).astype(array.dtype)
    return result


class RawDevice:
    """A hand-driven device: announces itself, waits for its schedule, sends whatever updates a test crafts.
    With `samples` None it never announces itself (and is never scheduled)."""

    def __init__(self, broker: Mosquitto, device: str, samples: dict[str, int] | None) -> None:
        from protocol.schemas import DeviceProfile, HostInfo, Status, TaskData, encode

        self.device = device
        self.link = MqttLink(
            mqtt(broker, device),
            [topics.schedules(device), topics.device(device, "receipts")],
            birth=(topics.device(device, "status"), encode(Status(state="online", ts=time.time())))
            if samples is not None
            else None,
        )
        self.link.start()
        assert self.link.wait_connected(10)
        self.schedules: list = []
        self.receipts: list[Receipt] = []
        if samples is None:
            return
        host = HostInfo(hostname="raw", os="test", machine="x", python="3", cpu_count=1, memory_bytes=1)
        profile = DeviceProfile(
            device=device,
            ts=time.time(),
            agent_version="test",
            host=host,
            tasks={task: TaskData(samples=n) for task, n in samples.items()},
        )
        self.link.publish(topics.device(device, "profile"), encode(profile), retain=True).wait_for_publish(5)

    def pump(self, timeout_s: float = 0.2) -> None:
        from protocol.schemas import Schedule

        for message in self.link.received(timeout_s):
            kind = topics.parse(message.topic).kind
            if message.payload and kind == "schedule":
                self.schedules.append(decode(message.payload, Schedule))
            elif message.payload and kind == "receipts":
                self.receipts.append(decode(message.payload, Receipt))

    def wait(self, condition: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, f"{self.device}: timed out waiting for {what}"
            self.pump()

    def receipt_for(self, update_id: str, timeout_s: float = 20.0) -> Receipt:
        self.wait(
            lambda: any(r.update_id == update_id for r in self.receipts), timeout_s, f"receipt of {update_id}"
        )
        return [r for r in self.receipts if r.update_id == update_id][-1]

    def send_update(
        self,
        task: str,
        state: dict[str, np.ndarray],
        *,
        samples: int,
        update_id: str | None = None,
        device: str | None = None,
        base_version: int = 0,
        round_: int = 1,
    ) -> str:
        """Publish `state` as an update under this device's own topic (the manifest may claim another device)."""
        import uuid

        from protocol.chunking import transfer_info
        from protocol.tensors import encode_state

        update_id = update_id or uuid.uuid4().hex
        payload = encode_state(state)
        manifest = UpdateManifest(
            task=task,
            round=round_,
            device=device or self.device,
            update_id=update_id,
            base_version=base_version,
            samples=samples,
            codec="dense",
            transfer=transfer_info(update_id, payload, 64 * 1024),
        )
        self.link.publish_update(self.device, manifest, payload)
        return update_id

    def close(self) -> None:
        self.link.stop()


def random_delta(base: dict[str, np.ndarray], seed: int, scale: float = 1e-2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        name: (rng.normal(0, scale, a.shape).astype(a.dtype) if a.dtype.kind == "f" else np.zeros_like(a))
        for name, a in base.items()
    }
