"""Commands to and events from task worker processes (JSON lines over stdin/stdout).

A worker is started with its own environment (e.g. CUDA_MPS_ACTIVE_THREAD_PERCENTAGE), receives `Init`, answers
`Ready` with the SM count it actually got, then runs `Train` or `Measure` commands until `Exit`.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from agent.dataspec import DataSpec
from protocol.schemas import ModelSpec, OptimizerSpec, TaskAssignment


class _Line(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True, tag_field="type"):
    pass


# --- parent -> worker ------------------------------------------------------------------------------------


class Init(_Line, tag="init"):
    device: Literal["cpu", "cuda"]
    threads: Annotated[int, Meta(ge=1)] = 1
    seed: int = 0
    cudnn_benchmark: bool = False  # autotuning every new shape stalls for seconds, worse under MPS


class Train(_Line, tag="train"):
    assignment: TaskAssignment
    data: DataSpec
    base_path: str
    output_path: str


class Measure(_Line, tag="measure"):
    """Train on synthetic data and time it. With `wait_go`, warm up, report `Warm`, and wait for `Go`."""

    model: ModelSpec
    batch: Annotated[int, Meta(ge=1)]
    images: Annotated[int, Meta(ge=1)] | None = None
    seconds: Annotated[float, Meta(gt=0)] | None = None
    warmup_steps: Annotated[int, Meta(ge=0)] = 3
    wait_go: bool = False
    optimizer: OptimizerSpec = OptimizerSpec()


class Go(_Line, tag="go"):
    pass


class Exit(_Line, tag="exit"):
    pass


Command = Init | Train | Measure | Go | Exit

# --- worker -> parent ------------------------------------------------------------------------------------


class Ready(_Line, tag="ready"):
    device_name: str
    pid: int
    sm_count: int | None = None


class Progress(_Line, tag="progress"):
    step: int
    total: int


class Trained(_Line, tag="trained"):
    samples: int
    steps: int
    seconds: float
    metrics: dict[str, float]
    output_path: str


class Warm(_Line, tag="warm"):
    pass


class Measured(_Line, tag="measured"):
    batch: int
    images: int
    seconds: float
    started_at: float
    ended_at: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


FailureCode = Literal["error", "mps", "oom", "diverged", "stopped", "protocol"]


class Failed(_Line, tag="failed"):
    code: FailureCode
    error: str


Event = Ready | Progress | Trained | Warm | Measured | Failed

_encoder = msgspec.json.Encoder()
_command_decoder = msgspec.json.Decoder(Command)
_event_decoder = msgspec.json.Decoder(Event)


def encode_line(message: _Line) -> bytes:
    return _encoder.encode(message) + b"\n"


def decode_command(line: bytes) -> Command:
    return _command_decoder.decode(line)


def decode_event(line: bytes) -> Event:
    return _event_decoder.decode(line)
