"""Periodic load readings: CPU and memory from psutil, GPU from the device backend."""

from __future__ import annotations

import time

import psutil

from protocol.schemas import Telemetry


def read_telemetry(device: str) -> Telemetry:
    memory = psutil.virtual_memory()
    return Telemetry(
        device=device,
        ts=time.time(),
        cpu_percent=psutil.cpu_percent(interval=None),
        memory_used_bytes=memory.total - memory.available,
        memory_total_bytes=memory.total,
    )
