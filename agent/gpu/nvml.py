"""NVIDIA GPUs through NVML (the nvidia-ml-py package, import name `pynvml`, imported on first use).

Each optional query that the GPU or driver does not support (common on Jetson and consumer cards) yields None
for its field; only name and memory are required of a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from types import ModuleType
from typing import Any, TypeVar

from agent.gpu.readout import Readout
from protocol.schemas import GpuInfo, GpuTelemetry

log = logging.getLogger(__name__)
T = TypeVar("T")


class NvmlUnavailable(Exception):
    """NVML cannot be used on this machine; the message says why."""


def read_gpus(nvml: ModuleType | None = None) -> Readout:
    """Profile every GPU NVML sees. `nvml` replaces the pynvml module (tests)."""
    try:
        with _session(nvml) as nv:
            gpus, skipped = [], []
            for index in range(nv.nvmlDeviceGetCount()):
                try:
                    gpus.append(_gpu_info(nv, index))
                except nv.NVMLError as exc:
                    skipped.append(f"GPU {index}: {exc}")
            cuda = _optional(nv, nv.nvmlSystemGetCudaDriverVersion)
            return Readout(
                gpus=gpus,
                driver_version=_text(_optional(nv, nv.nvmlSystemGetDriverVersion)),
                cuda_version=f"{cuda // 1000}.{cuda % 1000 // 10}" if cuda else None,
                skipped=skipped,
            )
    except NvmlUnavailable as exc:
        return Readout(error=str(exc))


def read_telemetry(nvml: ModuleType | None = None) -> list[GpuTelemetry]:
    """Current load of every GPU; raises NvmlUnavailable when NVML cannot be used."""
    with _session(nvml) as nv:
        return [_gpu_telemetry(nv, index) for index in range(nv.nvmlDeviceGetCount())]


@contextmanager
def _session(nvml: ModuleType | None) -> Iterator[Any]:
    """An initialised NVML module, shut down afterwards."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            raise NvmlUnavailable("NVML unavailable (nvidia-ml-py is not installed)") from None
    try:
        nvml.nvmlInit()
    except nvml.NVMLError_LibraryNotFound:
        raise NvmlUnavailable("no NVIDIA driver (NVML: library not found)") from None
    except nvml.NVMLError_DriverNotLoaded:
        raise NvmlUnavailable("no NVIDIA driver (NVML: driver not loaded)") from None
    except nvml.NVMLError as exc:
        raise NvmlUnavailable(f"NVML unavailable (init failed: {exc})") from None
    try:
        yield nvml
    finally:
        with suppress(nvml.NVMLError):
            nvml.nvmlShutdown()


def _gpu_info(nv: Any, index: int) -> GpuInfo:
    handle = nv.nvmlDeviceGetHandleByIndex(index)
    memory = nv.nvmlDeviceGetMemoryInfo(handle)
    capability = _optional(nv, nv.nvmlDeviceGetCudaComputeCapability, handle)
    power_limit_mw = _optional(nv, nv.nvmlDeviceGetPowerManagementLimit, handle)
    mig = _optional(nv, nv.nvmlDeviceGetMigMode, handle)  # (current, pending)
    uuid = _text(_optional(nv, nv.nvmlDeviceGetUUID, handle))
    return GpuInfo(
        index=index,
        name=_text(nv.nvmlDeviceGetName(handle)),
        backend="nvml",
        memory_total_bytes=memory.total,
        memory_free_bytes=memory.free,
        compute_capability=f"{capability[0]}.{capability[1]}" if capability else None,
        clock_sm_mhz=_clock_mhz(nv, handle, nv.NVML_CLOCK_SM),
        clock_memory_mhz=_clock_mhz(nv, handle, nv.NVML_CLOCK_MEM),
        power_limit_w=power_limit_mw / 1000 if power_limit_mw is not None else None,
        compute_mode=_compute_mode(nv, handle),
        mig_mode=mig[0] == nv.NVML_DEVICE_MIG_ENABLE if mig is not None else None,
        extra={"uuid": uuid} if uuid else {},
    )


def _gpu_telemetry(nv: Any, index: int) -> GpuTelemetry:
    handle = _optional(nv, nv.nvmlDeviceGetHandleByIndex, index)
    if handle is None:
        return GpuTelemetry(index=index)
    utilization = _optional(nv, nv.nvmlDeviceGetUtilizationRates, handle)
    memory = _optional(nv, nv.nvmlDeviceGetMemoryInfo, handle)
    power_mw = _optional(nv, nv.nvmlDeviceGetPowerUsage, handle)
    temperature = _optional(nv, nv.nvmlDeviceGetTemperature, handle, nv.NVML_TEMPERATURE_GPU)
    return GpuTelemetry(
        index=index,
        utilization_percent=float(utilization.gpu) if utilization is not None else None,
        memory_used_bytes=memory.used if memory is not None else None,
        power_w=power_mw / 1000 if power_mw is not None else None,
        temperature_c=float(temperature) if temperature is not None else None,
    )


def _clock_mhz(nv: Any, handle: Any, clock: int) -> int | None:
    """The maximum clock (what the GPU can do), else the current one where no maximum is reported."""
    return _optional(nv, nv.nvmlDeviceGetMaxClockInfo, handle, clock) or _optional(
        nv, nv.nvmlDeviceGetClockInfo, handle, clock
    )


def _compute_mode(nv: Any, handle: Any) -> str | None:
    mode = _optional(nv, nv.nvmlDeviceGetComputeMode, handle)
    names = {
        nv.NVML_COMPUTEMODE_DEFAULT: "default",
        nv.NVML_COMPUTEMODE_EXCLUSIVE_THREAD: "exclusive_thread",
        nv.NVML_COMPUTEMODE_PROHIBITED: "prohibited",
        nv.NVML_COMPUTEMODE_EXCLUSIVE_PROCESS: "exclusive_process",
    }
    return None if mode is None else names.get(mode, str(mode))


def _optional(nv: Any, query: Callable[..., T], *args: Any) -> T | None:
    """The query's answer, or None where NVML cannot give it (not supported, no permission, ...)."""
    try:
        return query(*args)
    except nv.NVMLError as exc:
        log.debug("NVML %s: %s", getattr(query, "__name__", query), exc)
        return None


def _text(value: str | bytes | None) -> str | None:
    """Older pynvml versions return bytes."""
    return value.decode() if isinstance(value, bytes) else value
