"""Commands to and events from task worker processes (JSON lines over stdin/stdout).

A worker is started with its own environment (e.g. CUDA_MPS_ACTIVE_THREAD_PERCENTAGE), receives `Init` and
answers `Ready` with the SM count it actually got. `Prepare` builds a task's model and opens its data on the
device (kept until another `Prepare` differs); `Train` (a round) and `Measure` (a timed window) then run on it,
as often as asked, until `Exit`.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from agent.data import DataSpec
from protocol.schemas import ModelSpec, OptimizerSpec, Precision, TaskAssignment


class _Line(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True, tag_field="type"):
    pass


# --- parent -> worker ------------------------------------------------------------------------------------


class Init(_Line, tag="init"):
    """Initialise the device. `env` is the launch's environment (MPS pipe and SM share, CUDA_*: read when the
    CUDA driver initialises, which happens here and not at import), so a worker started ahead of its launch
    (a spare, agent.workers) gets its share; `log_path` takes the worker's stderr from then on."""

    device: Literal["cpu", "cuda"]
    threads: Annotated[int, Meta(ge=1)] = 1
    cudnn_benchmark: bool = False  # autotuning every new shape stalls for seconds, worse under MPS
    cuda_graphs: bool = False  # replay training steps from CUDA graphs (agent/step_graph.py)
    env: dict[str, str] = {}
    log_path: str | None = None


class Prepare(_Line, tag="prepare"):
    """Build `model` and open `data` on the worker's device; a no-op when the worker holds exactly this."""

    model: ModelSpec
    data: DataSpec
    precision: Precision = "fp32"
    budget_bytes: Annotated[int, Meta(ge=0)] = (
        1 << 30
    )  # data held on the device up to this size, else streamed
    loader_workers: Annotated[int, Meta(ge=0)] = 2
    seed: int = 0


class Train(_Line, tag="train"):
    """A round of `assignment` from the global model at `base_path`; the delta goes to `output_path`.

    `reference_batch_size` is the task's configured batch size when the plan changed it (agent/batching.py).
    With `handover_path`, SIGUSR1 pauses the round before its next step: its state goes to that file and the
    answer is `HandedOver`; the same command with `resume_path` set to it continues the round in another worker.
    """

    assignment: TaskAssignment
    base_path: str
    output_path: str
    seed: int = 0
    release_memory: bool = False  # return cached device memory once the update is written
    reference_batch_size: Annotated[int, Meta(ge=1)] | None = None
    handover_path: str | None = None
    resume_path: str | None = None
    residual_path: str | None = None  # a lossy codec's error feedback (agent.compression); None: the work dir


class Measure(_Line, tag="measure"):
    """Time the training step on the prepared data. With `wait_go`, warm up, report `Warm`, and wait for `Go`."""

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


WorkerCommand = Init | Prepare | Train | Measure | Go | Exit

# --- worker -> parent ------------------------------------------------------------------------------------


class Loaded(_Line, tag="loaded"):
    """Torch and the training code are imported: the first line a worker writes, before it reads a command."""


class Ready(_Line, tag="ready"):
    device_name: str
    pid: int
    sm_count: int | None = None
    seconds: float = 0.0  # the worker's Init: its environment, torch and (on a GPU) the CUDA context


class Prepared(_Line, tag="prepared"):
    samples: int
    placement: Literal["device", "stream"]
    seconds: float
    reused: bool  # the worker already held this model and data


class Progress(_Line, tag="progress"):
    step: int
    total: int


class Trained(_Line, tag="trained"):
    samples: int
    steps: int
    seconds: float  # the whole command: loading the base, training, the delta, writing it
    metrics: dict[str, float]
    output_path: str
    size: int  # the update's bytes at output_path and their sha256: its transfer, without reading it again
    sha256: str


class HandedOver(_Line, tag="handed_over"):
    """The round paused after `steps` steps; its state is in `path`, for another worker to continue."""

    path: str
    steps: int


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


WorkerEvent = Loaded | Ready | Prepared | Progress | Trained | HandedOver | Warm | Measured | Failed

_encoder = msgspec.json.Encoder()
_command_decoder = msgspec.json.Decoder(WorkerCommand)
_event_decoder = msgspec.json.Decoder(WorkerEvent)


def encode_line(message: _Line) -> bytes:
    return _encoder.encode(message) + b"\n"


def decode_command(line: bytes) -> WorkerCommand:
    return _command_decoder.decode(line)


def decode_event(line: bytes) -> WorkerEvent:
    return _event_decoder.decode(line)
