"""Message schemas of protocol v1 and their msgpack encoding.

Every message is a msgspec Struct: decoding checks types, ranges and names, and rejects unknown fields,
so a message is either valid as a whole or raises ProtocolError and is never half-applied.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta

from protocol.errors import ProtocolError
from protocol.topics import NAME_PATTERN

PROTOCOL_VERSION = 1

Name = Annotated[str, Meta(pattern=NAME_PATTERN)]
TransferId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")]
Sha256 = Annotated[str, Meta(pattern=r"^[0-9a-f]{64}\Z")]
NonNegInt = Annotated[int, Meta(ge=0)]
PosInt = Annotated[int, Meta(ge=1)]
NonNegFloat = Annotated[float, Meta(ge=0)]
Percent = Annotated[float, Meta(gt=0, le=100)]
Text = Annotated[str, Meta(max_length=2000)]
Metrics = Annotated[dict[Annotated[str, Meta(max_length=64)], float], Meta(max_length=64)]
UpdateCodec = Literal["delta"]
#: how a device's task processes share its GPU (agent/policies.py)
ExecutionPolicy = Literal["temporal", "concurrent", "isolated", "sharing", "fedmt"]
#: arithmetic of local training: fp32, or autocast to bf16 / fp16 (fp16 with a gradient scaler)
Precision = Literal["fp32", "bf16", "fp16"]
#: how the learning rate follows a planned batch size B from the configured B0 (agent/batching.py): "auto" is
#: linear (lr * B/B0) for SGD and square root for Adam
LrScaling = Literal["auto", "linear", "sqrt", "none"]
#: "scale_lr": a round processes the configured images and the lr follows `LrScaling`; "hold_steps": a round
#: takes the configured number of optimiser steps at the configured lr
BatchPolicy = Literal["scale_lr", "hold_steps"]


class Message(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Base of all wire messages."""


# --- device status and profile -------------------------------------------------------------------------


class Status(Message):
    state: Literal["online", "offline"]
    ts: NonNegFloat
    agent_version: str = ""


class HostInfo(Message):
    hostname: str
    os: str
    machine: str
    python: str
    cpu_count: PosInt
    memory_bytes: NonNegInt


class GpuInfo(Message):
    """One GPU as NVML (or jtop on Jetson) sees it."""

    index: NonNegInt
    name: str
    backend: Literal["nvml", "jtop"]
    memory_total_bytes: NonNegInt
    memory_free_bytes: NonNegInt | None = None
    compute_capability: str | None = None
    sm_count: PosInt | None = None
    clock_sm_mhz: NonNegInt | None = None
    clock_memory_mhz: NonNegInt | None = None
    power_limit_w: NonNegFloat | None = None
    compute_mode: str | None = None
    mig_mode: bool | None = None
    extra: dict[str, str] = {}


class MpsInfo(Message):
    available: bool
    reason: str
    control_binary: str | None = None
    pipe_dir: str | None = None
    daemon_running: bool = False


class TaskData(Message):
    """What a device holds for one task: its local training samples."""

    samples: NonNegInt


class DeviceProfile(Message):
    device: Name
    ts: NonNegFloat
    agent_version: str
    host: HostInfo
    driver_version: str | None = None
    cuda_version: str | None = None
    gpus: list[GpuInfo] = []
    mps: MpsInfo | None = None
    policies: list[str] = []
    predictor: str | None = None
    tasks: dict[Name, TaskData] = {}


class GpuTelemetry(Message):
    index: NonNegInt
    utilization_percent: NonNegFloat | None = None
    memory_used_bytes: NonNegInt | None = None
    power_w: NonNegFloat | None = None
    temperature_c: float | None = None


class Telemetry(Message):
    device: Name
    ts: NonNegFloat
    cpu_percent: NonNegFloat
    memory_used_bytes: NonNegInt
    memory_total_bytes: NonNegInt
    gpus: list[GpuTelemetry] = []


# --- tasks and schedules -------------------------------------------------------------------------------


class ModelSpec(Message):
    """A torchvision classification model, by name."""

    name: Annotated[str, Meta(pattern=r"^[a-z0-9_]{1,64}\Z")]
    num_classes: Annotated[int, Meta(ge=2, le=100_000)]
    input_size: Annotated[int, Meta(ge=8, le=1024)]


class OptimizerSpec(Message):
    name: Literal["sgd", "adam"] = "sgd"
    lr: Annotated[float, Meta(gt=0, le=10)] = 0.05
    momentum: Annotated[float, Meta(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, Meta(ge=0, le=1)] = 0.0


class TaskAssignment(Message):
    """One task of a device's round: what to train, from which global version, for how long."""

    task: Name
    model: ModelSpec
    optimizer: OptimizerSpec
    base_version: NonNegInt
    base_sha256: Sha256
    local_epochs: PosInt = 1
    local_steps: PosInt | None = None  # when set, train this many steps instead of whole epochs
    batch_size: PosInt = 32
    min_batch_size: PosInt = 1
    max_batch_size: PosInt = 1024
    precision: Precision = "fp32"
    lr_scaling: LrScaling = "auto"
    batch_policy: BatchPolicy = "scale_lr"


class Schedule(Message):
    device: Name
    round: PosInt
    issued_at: NonNegFloat
    deadline: NonNegFloat
    tasks: Annotated[list[TaskAssignment], Meta(min_length=1, max_length=64)]
    codec: UpdateCodec = "delta"
    policy: ExecutionPolicy | None = None  # None: the device's own choice


# --- events and receipts -------------------------------------------------------------------------------


class Event(Message):
    device: Name
    ts: NonNegFloat
    kind: Literal["started", "finished", "failed", "uploaded", "acknowledged", "skipped", "plan"]
    round: NonNegInt
    task: Name | None = None
    message: Text = ""
    metrics: Metrics = {}


class Receipt(Message):
    update_id: TransferId
    task: Name
    round: NonNegInt
    status: Literal["accepted", "duplicate", "rejected"]
    reason: Text = ""


# --- transfers -----------------------------------------------------------------------------------------


class TransferInfo(Message):
    """How a payload was cut into chunks; the whole-payload sha256 is checked on reassembly."""

    id: TransferId
    size: NonNegInt
    sha256: Sha256
    chunk_size: PosInt
    chunks: NonNegInt


class TensorInfo(Message):
    name: Annotated[str, Meta(min_length=1, max_length=512)]
    dtype: str
    shape: list[NonNegInt]


class GlobalManifest(Message):
    task: Name
    version: NonNegInt
    model: ModelSpec
    tensors: list[TensorInfo]
    transfer: TransferInfo
    created_at: NonNegFloat


class UpdateManifest(Message):
    task: Name
    round: PosInt
    device: Name
    update_id: TransferId
    base_version: NonNegInt
    samples: PosInt
    codec: UpdateCodec
    transfer: TransferInfo
    metrics: Metrics = {}


class Chunk(Message, array_like=True):
    """One piece of a chunked payload (encoded as a msgpack array: the header costs ~100 bytes)."""

    transfer: TransferId
    index: NonNegInt
    total: PosInt
    chunk_size: PosInt
    size: NonNegInt
    sha256: Sha256
    data: bytes


# --- codec ---------------------------------------------------------------------------------------------

M = TypeVar("M", bound=Message)
_encoder = msgspec.msgpack.Encoder()
_decoders: dict[type, msgspec.msgpack.Decoder] = {}


def encode(message: Message) -> bytes:
    """msgpack bytes of a message."""
    return _encoder.encode(message)


def decode(payload: bytes | memoryview, kind: type[M]) -> M:
    """Decode and validate a message of type `kind`; raise ProtocolError for anything else."""
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.msgpack.Decoder(kind)
    try:
        return decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"bad {kind.__name__} message: {exc}") from None


def to_builtins(message: Message) -> dict[str, Any]:
    """A message as plain dicts/lists (for JSON logs and summaries)."""
    return msgspec.to_builtins(message)
