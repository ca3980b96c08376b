"""Message schemas of protocol v1 and their msgpack encoding.

Every message is a msgspec Struct: decoding checks types, ranges and names, and rejects unknown fields,
so a message is either valid as a whole or raises ProtocolError and is never half-applied. Every integer, string,
list and map is bounded (protocol/limits.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, TypeVar

import msgspec
from msgspec import Meta

from protocol import limits as lim
from protocol.errors import ProtocolError
from protocol.topics import NAME_PATTERN

PROTOCOL_VERSION = 1

Name = Annotated[str, Meta(pattern=NAME_PATTERN)]
TransferId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")]
Sha256 = Annotated[str, Meta(pattern=r"^[0-9a-f]{64}\Z")]
Round = Annotated[int, Meta(ge=1, le=lim.MAX_ROUND)]
RoundOrNone = Annotated[int, Meta(ge=0, le=lim.MAX_ROUND)]  # 0: not about a round
Version = Annotated[int, Meta(ge=0, le=lim.MAX_ROUND)]
Samples = Annotated[int, Meta(ge=0, le=lim.MAX_SAMPLES)]
Timestamp = Annotated[float, Meta(ge=0, le=lim.MAX_TIMESTAMP)]
ByteCount = Annotated[int, Meta(ge=0, le=lim.MAX_REPORTED_BYTES)]
HardwareCount = Annotated[int, Meta(ge=0, le=lim.MAX_HARDWARE_COUNT)]
Measure = Annotated[float, Meta(ge=0, le=1e12)]  # a reported load, power or percentage
BatchSize = Annotated[int, Meta(ge=1, le=lim.MAX_BATCH_SIZE)]
LocalEpochs = Annotated[int, Meta(ge=1, le=lim.MAX_LOCAL_EPOCHS)]
LocalSteps = Annotated[int, Meta(ge=1, le=lim.MAX_LOCAL_STEPS)]
Text = Annotated[str, Meta(max_length=lim.MAX_TEXT)]
ShortText = Annotated[str, Meta(max_length=lim.MAX_SHORT_TEXT)]
PathText = Annotated[str, Meta(max_length=lim.MAX_PATH)]
Metrics = Annotated[
    dict[Annotated[str, Meta(max_length=lim.MAX_METRIC_NAME)], float], Meta(max_length=lim.MAX_METRICS)
]
#: an update codec (protocol.codecs), optionally wrapped in zstd; a receiver refuses one it does not know
CodecName = Annotated[str, Meta(pattern=r"^[a-z0-9_]{1,32}(\+zstd)?\Z")]
#: how a device's task processes share its GPU (agent/policies.py)
ExecutionPolicy = Literal["temporal", "concurrent", "isolated", "sharing", "fedmt"]
#: arithmetic of local training: fp32, or autocast to bf16 / fp16 (fp16 with a gradient scaler)
Precision = Literal["fp32", "bf16", "fp16"]
#: the largest FedProx coefficient a schedule may carry (the FedProx paper tunes mu in 0.001..1)
MAX_PROXIMAL_MU = 100.0
#: how the learning rate follows a planned batch size B from the configured B0 (agent/batching.py): "auto" is
#: linear (lr * B/B0) for SGD, unchanged for Adam
LrScaling = Literal["auto", "linear", "sqrt", "none"]
#: "scale_lr": a round processes the configured images and the lr follows `LrScaling`; "hold_steps": a round
#: takes the configured number of optimiser steps at the configured lr
BatchPolicy = Literal["scale_lr", "hold_steps"]
BatchGrowth = Annotated[int, Meta(ge=1, le=lim.MAX_BATCH_GROWTH)]
TrainSeed = Annotated[int, Meta(ge=0, le=lim.MAX_TRAIN_SEED)]


class Message(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Base of all wire messages."""


# --- device status and profile -------------------------------------------------------------------------


class Status(Message):
    state: Literal["online", "offline"]
    ts: Timestamp
    agent_version: ShortText = ""


class HostInfo(Message):
    hostname: ShortText
    os: ShortText
    machine: ShortText
    python: ShortText
    cpu_count: Annotated[int, Meta(ge=1, le=lim.MAX_HARDWARE_COUNT)]
    memory_bytes: ByteCount


class GpuInfo(Message):
    """One GPU as NVML (or jtop on Jetson) sees it."""

    index: HardwareCount
    name: ShortText
    backend: Literal["nvml", "jtop"]
    memory_total_bytes: ByteCount
    memory_free_bytes: ByteCount | None = None
    compute_capability: ShortText | None = None
    sm_count: Annotated[int, Meta(ge=1, le=lim.MAX_HARDWARE_COUNT)] | None = None
    clock_sm_mhz: HardwareCount | None = None
    clock_memory_mhz: HardwareCount | None = None
    power_limit_w: Measure | None = None
    compute_mode: ShortText | None = None
    mig_mode: bool | None = None
    extra: Annotated[dict[ShortText, ShortText], Meta(max_length=lim.MAX_MAP_ENTRIES)] = {}


class MpsInfo(Message):
    available: bool
    reason: Text
    control_binary: PathText | None = None
    pipe_dir: PathText | None = None
    daemon_running: bool = False


class TaskData(Message):
    """What a device holds for one task: its local training samples."""

    samples: Samples


class DeviceProfile(Message):
    device: Name
    ts: Timestamp
    agent_version: ShortText
    host: HostInfo
    driver_version: ShortText | None = None
    cuda_version: ShortText | None = None
    gpus: Annotated[list[GpuInfo], Meta(max_length=lim.MAX_GPUS)] = []
    mps: MpsInfo | None = None
    policies: Annotated[list[ShortText], Meta(max_length=16)] = []
    predictor: ShortText | None = None
    tasks: Annotated[dict[Name, TaskData], Meta(max_length=lim.MAX_TASKS)] = {}


class GpuTelemetry(Message):
    index: HardwareCount
    utilization_percent: Measure | None = None
    memory_used_bytes: ByteCount | None = None
    power_w: Measure | None = None
    temperature_c: Annotated[float, Meta(ge=-1000, le=1000)] | None = None


class Telemetry(Message):
    device: Name
    ts: Timestamp
    cpu_percent: Measure
    memory_used_bytes: ByteCount
    memory_total_bytes: ByteCount
    gpus: Annotated[list[GpuTelemetry], Meta(max_length=lim.MAX_GPUS)] = []


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


class CodecSpec(Message, omit_defaults=True):
    """How a task's updates travel (protocol.codecs): the codec, the share of each tensor that a partial codec
    keeps (None: its default), the momentum of the sender's error feedback (DGC's momentum correction), and DGC's
    warm-up: a partial codec keeps 2^k times its share in the rounds k = `warmup_rounds`, ..., 1 rounds before a
    task's warm-up ends (the aggregator's schedules carry each round's share: `protocol.codecs.warmed`). Fields
    at their defaults are not sent: an agent that predates one still reads the schedules that do not use it."""

    name: CodecName = "dense"
    fraction: Annotated[float, Meta(gt=0, le=1)] | None = None
    momentum: Annotated[float, Meta(ge=0, lt=1)] = 0.0
    warmup_rounds: Annotated[int, Meta(ge=0, le=lim.MAX_WARMUP_ROUNDS)] = 0


class TaskAssignment(Message, omit_defaults=True):
    """One task of a device's round: what to train, from which global version, for how long. Fields at their
    defaults are not sent (an agent that predates a field still reads the schedules that leave it at its
    default)."""

    task: Name
    model: ModelSpec
    optimizer: OptimizerSpec
    base_version: Version
    base_sha256: Sha256
    local_epochs: LocalEpochs = 1
    local_steps: LocalSteps | None = None  # when set, train this many steps instead of whole epochs
    batch_size: BatchSize = 32
    min_batch_size: BatchSize = 1
    max_batch_size: BatchSize = 1024
    precision: Precision = "fp32"
    # FedProx: add proximal_mu / 2 * ||w - w_base||^2 to the local loss; 0 trains plain local SGD (FedAvg)
    proximal_mu: Annotated[float, Meta(ge=0, le=MAX_PROXIMAL_MU)] = 0.0
    lr_scaling: LrScaling = "auto"
    batch_policy: BatchPolicy = "scale_lr"
    # how many times the configured batch size a plan may train the initial model (version 0) at; the ceiling
    # doubles with each version trained (agent/batching.py)
    initial_batch_growth: BatchGrowth = 1
    codec: CodecSpec = CodecSpec()  # how the update travels
    train_seed: TrainSeed = 0  # the task's training randomness (its data order): see round_seed

    def round_seed(self, round_: int) -> int:
        """The seed a device trains this task's round `round_` with: the round number, at `train_seed` 0."""
        return self.train_seed * (lim.MAX_ROUND + 1) + round_


class Schedule(Message):
    device: Name
    round: Round
    issued_at: Timestamp
    deadline: Timestamp
    tasks: Annotated[list[TaskAssignment], Meta(min_length=1, max_length=lim.MAX_TASKS)]
    policy: ExecutionPolicy | None = None  # None: the device's own choice


# --- events and receipts -------------------------------------------------------------------------------


class Event(Message):
    device: Name
    ts: Timestamp
    kind: Literal["started", "finished", "failed", "uploaded", "acknowledged", "skipped", "plan"]
    round: RoundOrNone
    task: Name | None = None
    message: Text = ""
    metrics: Metrics = {}


class Receipt(Message):
    update_id: TransferId
    task: Name
    round: RoundOrNone
    #: retry: not taken now (the aggregator's spool is full, its disk too): send it again later
    status: Literal["accepted", "duplicate", "rejected", "retry"]
    reason: Text = ""


# --- transfers -----------------------------------------------------------------------------------------

PayloadSize = Annotated[int, Meta(ge=0, le=lim.MAX_TRANSFER_BYTES)]
ChunkSize = Annotated[int, Meta(ge=1, le=lim.MAX_CHUNK_BYTES)]
ChunkCount = Annotated[int, Meta(ge=1, le=lim.MAX_CHUNKS)]
#: dtypes allowed on the wire (numpy names); bfloat16 travels as float32
WireDtype = Literal["float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"]


class TransferInfo(Message):
    """How a payload was cut into chunks; the whole-payload sha256 is checked on reassembly."""

    id: TransferId
    size: PayloadSize
    sha256: Sha256
    chunk_size: ChunkSize
    chunks: ChunkCount


class TensorInfo(Message):
    name: Annotated[str, Meta(min_length=1, max_length=lim.MAX_TENSOR_NAME)]
    dtype: WireDtype
    shape: Annotated[list[Annotated[int, Meta(ge=0, le=lim.MAX_DIM)]], Meta(max_length=lim.MAX_NDIM)]


class GlobalDelta(Message):
    """A global version also published as its difference to the version before (protocol.deltas), under
    .../global/delta: a device holding `base_version` fetches this instead of the whole model."""

    base_version: Version
    base_sha256: Sha256
    codec: CodecName
    transfer: TransferInfo


class GlobalManifest(Message):
    task: Name
    version: Version
    model: ModelSpec
    tensors: Annotated[list[TensorInfo], Meta(max_length=lim.MAX_TENSORS)]
    transfer: TransferInfo
    created_at: Timestamp
    delta: GlobalDelta | None = None


class UpdateManifest(Message):
    task: Name
    round: Round
    device: Name
    update_id: TransferId
    base_version: Version
    samples: Annotated[int, Meta(ge=1, le=lim.MAX_SAMPLES)]
    codec: CodecName  # the assignment's
    transfer: TransferInfo
    metrics: Metrics = {}


class Chunk(Message, array_like=True):
    """One piece of a chunked payload (encoded as a msgpack array: the header costs ~100 bytes)."""

    transfer: TransferId
    index: Annotated[int, Meta(ge=0, lt=lim.MAX_CHUNKS)]
    total: ChunkCount
    chunk_size: ChunkSize
    size: PayloadSize
    sha256: Sha256
    data: Annotated[bytes, Meta(max_length=lim.MAX_CHUNK_BYTES)]


TransferManifest = TypeVar("TransferManifest", bound=Message)


class WholeTransfer(Message, Generic[TransferManifest], array_like=True):
    """A transfer of one chunk and its manifest in one message: nothing for the receiver to pair, hold or keep
    waiting (an agent sends an update that fits one chunk so)."""

    manifest: TransferManifest
    chunk: Chunk


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
