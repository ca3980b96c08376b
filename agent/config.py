"""The agent's TOML config: identity, broker, local data per task, and how tasks are executed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from agent.autocalibration import CalibrationConfig
from agent.data import DataSpec
from agent.mps import MpsConfig
from agent.policies import Policy
from common.config import load_toml
from common.metrics import MetricsConfig
from protocol.schemas import Name
from protocol.transport import MqttSettings


class ExecutionConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """How task processes run; `policy` may be overridden per round by the schedule or on the command line."""

    policy: Policy = "concurrent"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # the GPU this agent trains on, on a host with several: its NVML index (as nvidia-smi numbers them) or UUID;
    # None: the first of CUDA_VISIBLE_DEVICES, else GPU 0 (agent.gpu.probe.own_gpu)
    gpu: Annotated[str, Meta(pattern=r"^([0-9]{1,3}|GPU-[0-9a-fA-F-]{1,60})\Z")] | None = None
    cpu_threads_per_task: Annotated[int, Meta(ge=1)] = 1
    stop_grace_s: Annotated[float, Meta(gt=0)] = 30.0
    predictor: str | None = None  # an .onnx file; default: the one shipped for this GPU, if any
    link_mbps: Annotated[float, Meta(gt=0)] = 100.0  # for Algorithm 1's transfer-time estimates
    # "on_finish": a task's update uploads while the others still train (Algorithm 1); "after_round": the
    # naive order, every upload once the round's training is over (kept to measure what overlap gains)
    upload: Literal["on_finish", "after_round"] = "on_finish"
    batch_damping: Annotated[float, Meta(gt=0, le=1)] = 0.5
    data_budget_mb: Annotated[int, Meta(ge=0)] = (
        1024  # per task: data held on the device up to this, else streamed
    )
    loader_workers: Annotated[int, Meta(ge=0, le=64)] = 2  # file-reading processes of a streamed image folder
    release_memory: bool = False  # return each worker's cached GPU memory between rounds
    # replay each training step from a CUDA graph once it has run a few times (launch-bound steps: small models
    # and batches); steps that cannot be captured (fp16 loss scaling, a learning-rate warm-up) run as before
    cuda_graphs: bool = False
    worker_stall_s: Annotated[float, Meta(gt=0)] = 600.0  # a worker silent this long is replaced
    # processes started with the agent that load torch ahead of any round, each taken by the next worker start
    # (round 1's above all). None: one per task in [tasks] on a GPU; none on the CPU, where their start would
    # compete with training for the same cores (README). Each holds what a worker holds with torch loaded
    # (0.66 GB unique memory on x86 CPU torch) before it is one
    spare_workers: Annotated[int, Meta(ge=0, le=64)] | None = None
    # a finished task's SM share: "off" (kept until the round ends) or "handover" (standby workers, README)
    reallocate: Literal["off", "handover"] = "off"
    plan_objective: Literal["makespan", "sum"] = "makespan"  # Eq. 5: tasks finish together, or sum of P_i
    max_prediction_error_pct: Annotated[float, Meta(gt=0)] = 20.0  # above it: the best measured shares
    error_rounds: Annotated[int, Meta(ge=1)] = 5  # recent rounds the prediction error is taken over

    def spares(self, tasks: int, compute: str) -> int:
        """Spare worker processes for an agent with `tasks` configured tasks training on `compute`."""
        if self.spare_workers is not None:
            return self.spare_workers
        return tasks if compute == "cuda" else 0


class AgentConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """`device` is this agent's id and its MQTT username (the broker ACL confines it to its own topics)."""

    device: Name
    state_dir: str = "/var/lib/fedmt-agent"
    telemetry_interval_s: Annotated[float, Meta(ge=1)] = 30.0
    receipt_timeout_s: Annotated[float, Meta(ge=1)] = 120.0
    retry_after_s: Annotated[float, Meta(ge=1)] = 30.0  # resend an update the aggregator could not take yet
    # a round starts when every task has its schedule, or this long after the first (agent/schedules.py)
    schedule_grace_s: Annotated[float, Meta(ge=0, le=600)] = 2.0
    mqtt: MqttSettings = msgspec.field(default_factory=MqttSettings)
    execution: ExecutionConfig = msgspec.field(default_factory=ExecutionConfig)
    mps: MpsConfig = msgspec.field(default_factory=MpsConfig)
    metrics: MetricsConfig = msgspec.field(
        default_factory=MetricsConfig
    )  # Prometheus endpoint; off by default
    calibration: CalibrationConfig = msgspec.field(default_factory=CalibrationConfig)
    tasks: dict[Name, DataSpec] = {}

    def __post_init__(self) -> None:
        if self.mqtt.username is None:
            self.mqtt.username = self.device
        elif self.mqtt.username != self.device:
            raise ValueError(
                f"key 'mqtt.username' is {self.mqtt.username!r} but device is {self.device!r}: "
                "they must match, the broker ACL confines a device to topics named by its username"
            )


def predictor_dir(state_dir: str | Path) -> Path:
    """Where an agent with this state directory keeps calibration's data and predictor and its rounds' history."""
    return Path(state_dir) / "predictor"


def load(path: str) -> AgentConfig:
    return load_toml(path, AgentConfig)
