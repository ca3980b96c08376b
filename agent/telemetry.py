"""Periodic load readings: CPU and memory from psutil, GPU from the device backend."""

from __future__ import annotations

import time

import psutil

from agent.gpu.probe import GpuReport, telemetry
from protocol.schemas import Telemetry


def read_telemetry(device: str, gpu: GpuReport | None = None) -> Telemetry:
    """Load now; GPU readings come from the backend of `gpu` (a probe's report), none without it."""
    memory = psutil.virtual_memory()
    return Telemetry(
        device=device,
        ts=time.time(),
        cpu_percent=psutil.cpu_percent(interval=None),
        memory_used_bytes=memory.total - memory.available,
        memory_total_bytes=memory.total,
        gpus=telemetry(gpu) if gpu is not None else [],
    )
