"""The aggregator's TOML config: broker, state directory, round rules and the task catalogue."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from aggregator.limits import UpdateLimits
from aggregator.sampling import SamplingConfig
from aggregator.strategies import FedAvgSpec, StrategySpec
from common.config import load_toml
from common.metrics import MetricsConfig
from protocol.chunking import DEFAULT_CHUNK_SIZE
from protocol.codecs import PartialCodec, codec_kind, make_codec
from protocol.limits import MAX_TRANSFER_BYTES
from protocol.schemas import (
    BatchGrowth,
    BatchPolicy,
    BatchSize,
    CodecName,
    CodecSpec,
    ExecutionPolicy,
    LocalEpochs,
    LocalSteps,
    LrScaling,
    ModelSpec,
    Name,
    OptimizerSpec,
    Precision,
    TrainSeed,
)
from protocol.transport import MqttSettings

PosInt = Annotated[int, Meta(ge=1)]


class TaskConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A federated task: its model, local training recipe and where its initial weights come from."""

    model: ModelSpec
    optimizer: OptimizerSpec = msgspec.field(default_factory=OptimizerSpec)
    local_epochs: LocalEpochs = 1
    local_steps: LocalSteps | None = None  # instead of epochs: a fixed number of optimiser steps per round
    batch_size: BatchSize = 32
    min_batch_size: BatchSize = 1
    max_batch_size: BatchSize = 1024
    precision: Precision = "fp32"
    lr_scaling: LrScaling = "auto"  # when a device plans another batch size (README: batch adaptation)
    batch_policy: BatchPolicy = "scale_lr"
    initial_batch_growth: BatchGrowth = 1  # the initial model's batch ceiling, times batch_size
    init_seed: int = 0
    train_seed: TrainSeed = 0  # the devices' training randomness (data order), sent with every schedule
    init_weights: str | None = (
        None  # a safetensors file; else built from the torchvision model with init_seed
    )
    strategy: StrategySpec = msgspec.field(default_factory=FedAvgSpec)  # how the round combines its updates
    limits: UpdateLimits = msgspec.field(default_factory=UpdateLimits)  # what one update may weigh
    codec: CodecSpec = msgspec.field(default_factory=CodecSpec)  # how schedules ask devices to send updates
    accept_codecs: Annotated[list[CodecName], Meta(max_length=16)] = []  # also accepted (a codec change)
    download_codec: CodecName | None = None  # global models also published as a delta of this codec
    sampling: SamplingConfig | None = None  # K of the eligible devices per round; None: every eligible device

    def __post_init__(self) -> None:
        if not self.min_batch_size <= self.batch_size <= self.max_batch_size:
            raise ValueError("batch sizes must satisfy min_batch_size <= batch_size <= max_batch_size")
        for name in (self.codec.name, *self.accept_codecs, *filter(None, [self.download_codec])):
            make_codec(name, self.codec.fraction if name == self.codec.name else None)  # ValueError: unknown
        if self.codec.warmup_rounds and not issubclass(codec_kind(self.codec.name), PartialCodec):
            raise ValueError(
                f"warmup_rounds needs a codec that keeps a part (topk, dct), not {self.codec.name!r}"
            )

    @property
    def codecs(self) -> set[str]:
        """The codecs whose updates this task accepts."""
        return {self.codec.name, *self.accept_codecs}


class RoundsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    rounds: Annotated[int, Meta(ge=0)] = 0  # 0: keep going
    min_devices: PosInt = 1  # online devices needed to open a round
    min_updates: PosInt = 1  # updates a task needs at the deadline to finalise
    round_timeout_s: Annotated[float, Meta(gt=0)] = 600.0
    policy: ExecutionPolicy | None = None  # sent with every schedule; None leaves it to each device's config


class TransferConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Chunking of global models, and what the update spool may hold (a transfer over a quota is refused)."""

    # The broker's max_packet_size (broker_config/mosquitto.conf) is 4 MiB; leave room for the chunk header.
    chunk_size: Annotated[int, Meta(ge=1024, le=(4 << 20) - 4096)] = DEFAULT_CHUNK_SIZE
    max_update_bytes: Annotated[int, Meta(ge=1, le=MAX_TRANSFER_BYTES)] = 1 << 30
    reassembly_timeout_s: Annotated[float, Meta(gt=0)] = 120.0
    max_device_spool_bytes: PosInt = 2 << 30  # one device's update transfers held at once
    max_device_transfers: Annotated[int, Meta(ge=1, le=4096)] = 16  # one device's transfers held at once
    max_spool_bytes: PosInt = 16 << 30  # every device's update transfers held at once

    def __post_init__(self) -> None:
        if not self.max_update_bytes <= self.max_device_spool_bytes <= self.max_spool_bytes:
            raise ValueError(
                "transfers: need max_update_bytes <= max_device_spool_bytes <= max_spool_bytes, got "
                f"{self.max_update_bytes}, {self.max_device_spool_bytes}, {self.max_spool_bytes}"
            )


class AggregatorMetricsConfig(MetricsConfig, kw_only=True):
    # devices whose task events get Prometheus series of their own (the first ones heard from); later devices
    # count under device="other", so the aggregator's memory and a scrape stay bounded in a large fleet
    device_series: Annotated[int, Meta(ge=0, le=100_000)] = 100


class AggregatorConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    state_dir: str = "/var/lib/fedmt-aggregator"
    keep_checkpoints: PosInt = 5
    mqtt: MqttSettings = msgspec.field(default_factory=lambda: MqttSettings(username="aggregator"))
    rounds: RoundsConfig = msgspec.field(default_factory=RoundsConfig)
    transfers: TransferConfig = msgspec.field(default_factory=TransferConfig)
    metrics: AggregatorMetricsConfig = msgspec.field(
        default_factory=AggregatorMetricsConfig
    )  # Prometheus endpoint; off by default
    tasks: Annotated[dict[Name, TaskConfig], Meta(min_length=1)]
    # true: other aggregators own other tasks on this broker (README, "Scaling"): take only these tasks' updates
    # and answer none for others; false: an update for a task not in `tasks` is rejected as unknown
    sharded: bool = False
    # device -> task -> samples the operator knows it holds: its update's weight instead of its own word
    registered_samples: dict[Name, dict[Name, PosInt]] = {}

    def __post_init__(self) -> None:
        if self.mqtt.username is None:  # also the client id, which names the persistent session
            self.mqtt.username = "aggregator"
        for device, counts in self.registered_samples.items():
            for task, samples in counts.items():
                if task not in self.tasks:
                    raise ValueError(f"registered_samples.{device}: unknown task {task!r}")
                cap = self.tasks[task].limits.max_samples
                if cap is not None and samples > cap:
                    raise ValueError(
                        f"registered_samples.{device}.{task}: {samples} is above the task's max_samples {cap}"
                    )


def load(path: str) -> AggregatorConfig:
    return load_toml(path, AggregatorConfig)
