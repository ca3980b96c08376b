"""The retained device profile: host, accelerators, execution policies and the local data per task."""

from __future__ import annotations

import os
import platform
import socket
import time

import psutil

from agent import __version__
from agent.gpu.probe import GpuReport, probe
from protocol.schemas import DeviceProfile, HostInfo, MpsInfo, TaskData


def host_info() -> HostInfo:
    return HostInfo(
        hostname=socket.gethostname(),
        os=f"{platform.system()} {platform.release()}",
        machine=platform.machine(),
        python=platform.python_version(),
        cpu_count=os.cpu_count() or 1,
        memory_bytes=psutil.virtual_memory().total,
    )


def build_profile(
    device: str,
    samples: dict[str, int],
    policies: list[str],
    gpu: GpuReport | None = None,
    mps: MpsInfo | None = None,
    predictor: str | None = None,
) -> DeviceProfile:
    """The profile; `gpu` defaults to a fresh probe that may ask torch, once per process, for SM counts."""
    if gpu is None:
        gpu = probe(allow_torch=True)
    return DeviceProfile(
        device=device,
        ts=time.time(),
        agent_version=__version__,
        host=host_info(),
        driver_version=gpu.driver_version,
        cuda_version=gpu.cuda_version,
        gpus=gpu.gpus,
        mps=mps,
        policies=policies,
        predictor=predictor,
        tasks={task: TaskData(samples=n) for task, n in samples.items()},
    )
