"""The aggregator's TOML config: broker, state directory, round rules and the task catalogue."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from common.config import load_toml
from protocol.chunking import DEFAULT_CHUNK_SIZE
from protocol.schemas import (
    BatchPolicy,
    ExecutionPolicy,
    LrScaling,
    ModelSpec,
    Name,
    OptimizerSpec,
    Precision,
)
from protocol.transport import MqttSettings

PosInt = Annotated[int, Meta(ge=1)]


class TaskConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A federated task: its model, local training recipe and where its initial weights come from."""

    model: ModelSpec
    optimizer: OptimizerSpec = msgspec.field(default_factory=OptimizerSpec)
    local_epochs: PosInt = 1
    local_steps: PosInt | None = None  # instead of epochs: a fixed number of optimiser steps per round
    batch_size: PosInt = 32
    min_batch_size: PosInt = 1
    max_batch_size: PosInt = 1024
    precision: Precision = "fp32"
    lr_scaling: LrScaling = "auto"  # when a device plans another batch size (README: batch adaptation)
    batch_policy: BatchPolicy = "scale_lr"
    init_seed: int = 0
    init_weights: str | None = (
        None  # a safetensors file; else built from the torchvision model with init_seed
    )

    def __post_init__(self) -> None:
        if not self.min_batch_size <= self.batch_size <= self.max_batch_size:
            raise ValueError("batch sizes must satisfy min_batch_size <= batch_size <= max_batch_size")


class RoundsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    rounds: Annotated[int, Meta(ge=0)] = 0  # 0: keep going
    min_devices: PosInt = 1  # online devices needed to open a round
    min_updates: PosInt = 1  # updates a task needs at the deadline to finalise
    round_timeout_s: Annotated[float, Meta(gt=0)] = 600.0
    policy: ExecutionPolicy | None = None  # sent with every schedule; None leaves it to each device's config


class TransferConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # The broker's message_size_limit (broker_config/mosquitto.conf) is 4 MiB; leave room for the chunk header.
    chunk_size: Annotated[int, Meta(ge=1024, le=(4 << 20) - 4096)] = DEFAULT_CHUNK_SIZE
    max_update_bytes: PosInt = 1 << 30
    reassembly_timeout_s: Annotated[float, Meta(gt=0)] = 120.0


class AggregatorConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    state_dir: str = "/var/lib/fedmt-aggregator"
    keep_checkpoints: PosInt = 5
    mqtt: MqttSettings = msgspec.field(default_factory=lambda: MqttSettings(username="aggregator"))
    rounds: RoundsConfig = msgspec.field(default_factory=RoundsConfig)
    transfers: TransferConfig = msgspec.field(default_factory=TransferConfig)
    tasks: Annotated[dict[Name, TaskConfig], Meta(min_length=1)]


def load(path: str) -> AggregatorConfig:
    return load_toml(path, AggregatorConfig)
