"""Which GPUs this device has: a Jetson through jtop, other NVIDIA GPUs through NVML, else none (CPU only).

Probing never raises: a missing library, driver or service gives backend "none" and a note naming the cause,
logged once. SM counts are not in NVML; they come from torch, asked once per process and cached.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field, replace
from typing import Literal

import msgspec

from agent.gpu import jetson, nvml
from protocol.schemas import GpuInfo, GpuTelemetry

log = logging.getLogger(__name__)
Backend = Literal["nvml", "jtop", "none"]

_sm_counts: dict[str, int | None] = {}  # by GPU UUID (or index), once torch was asked
_logged: set[str] = set()


@dataclass(frozen=True)
class GpuReport:
    """The GPUs found, by which backend, and a note saying what was found or why nothing was."""

    gpus: list[GpuInfo] = field(default_factory=list)
    driver_version: str | None = None
    cuda_version: str | None = None
    backend: Backend = "none"
    note: str = ""


def probe(*, allow_torch: bool = False) -> GpuReport:
    """Profile the GPUs. `allow_torch` lets it import torch for SM counts (3-5 s, once per process): the
    profile builder passes it at agent start; later probes reuse the cached counts."""
    try:
        report = _probe_jetson() if jetson.is_jetson() else _probe_nvml()
    except Exception as exc:  # a backend surprise must not stop the agent
        report = GpuReport(note=f"GPU probe failed ({exc!r}); CPU profile")
    if report.backend == "none":
        _warn_once(report.note)
    else:
        log.info("%s", report.note)
    gpus = [msgspec.structs.replace(gpu, sm_count=_sm_count(gpu, allow_torch)) for gpu in report.gpus]
    return replace(report, gpus=gpus)


def own_gpu(report: GpuReport, wanted: str | None) -> GpuReport:
    """The report narrowed to the GPU an agent trains on: `wanted` is an NVML index or a GPU UUID (or its
    unique prefix, as CUDA_VISIBLE_DEVICES takes it), None for the first GPU. ValueError if it names none of the
    report's GPUs (with several, the agent must not profile, plan for and check the SMs of another GPU)."""
    if not report.gpus:
        return report
    if wanted is None:
        return replace(report, gpus=report.gpus[:1])
    matches = [gpu for gpu in report.gpus if _names(gpu, wanted)]
    if len(matches) != 1:
        seen = ", ".join(f"{g.index} ({g.extra.get('uuid', 'no uuid')})" for g in report.gpus)
        raise ValueError(f"GPU {wanted!r} names {len(matches)} of this host's GPUs: {seen}")
    return replace(report, gpus=matches)


def _names(gpu: GpuInfo, wanted: str) -> bool:
    if wanted.isdigit():
        return gpu.index == int(wanted)
    uuid = gpu.extra.get("uuid", "")
    return bool(uuid) and uuid.startswith(wanted)


def visible_gpu(wanted: str | None, report: GpuReport) -> str | None:
    """What CUDA_VISIBLE_DEVICES should hold for the GPU `wanted` names: its UUID, which CUDA cannot number
    differently from NVML (its index where NVML gave no UUID); None when nothing was asked for."""
    if wanted is None or not report.gpus:
        return wanted
    gpu = own_gpu(report, wanted).gpus[0]
    return gpu.extra.get("uuid") or str(gpu.index)


def telemetry(report: GpuReport) -> list[GpuTelemetry]:
    """Current GPU load from the report's backend; [] without GPUs or when reading fails (logged once)."""
    try:
        if report.backend == "nvml":
            return nvml.read_telemetry()
        if report.backend == "jtop":
            return jetson.read_telemetry()
    except Exception as exc:  # e.g. the driver or the jtop service went away since the probe
        _warn_once(f"GPU telemetry ({report.backend}) failed: {exc}")
    return []


def sm_count_from_torch(index: int, uuid: str | None = None, *, allow_torch: bool = False) -> int | None:
    """SMs of a GPU as torch sees it, or None. Imports torch only when it is already imported or `allow_torch`.

    With `uuid` (NVML's "GPU-..."), the CUDA device is matched by UUID, since CUDA's order and
    CUDA_VISIBLE_DEVICES may differ from NVML's; else by index. Run it where CUDA_MPS_ACTIVE_THREAD_PERCENTAGE
    is unset: under MPS that setting lowers the count torch reports.
    """
    if "torch" not in sys.modules and not allow_torch:
        return None
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        devices = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    except Exception as exc:  # no torch, or CUDA fails to initialise
        log.debug("torch SM count: %s", exc)
        return None
    if uuid is not None:
        wanted = uuid.removeprefix("GPU-")
        return next((d.multi_processor_count for d in devices if str(getattr(d, "uuid", "")) == wanted), None)
    return devices[index].multi_processor_count if index < len(devices) else None


def _probe_nvml(prefix: str = "") -> GpuReport:
    found = nvml.read_gpus()
    if found.error is not None or not found.gpus:
        return GpuReport(note=f"{prefix}{found.error or 'NVML: no GPUs'}; CPU profile")
    note = f"{prefix}NVML: {_count(found.gpus)}" + "".join(f"; skipped {s}" for s in found.skipped)
    return GpuReport(found.gpus, found.driver_version, found.cuda_version, "nvml", note)


def _probe_jetson() -> GpuReport:
    """jtop first; where it is unavailable, NVML (partial on recent JetPack), with jtop's fix in the note."""
    found = jetson.read_gpus()
    if found.error is not None or not found.gpus:
        return _probe_nvml(prefix=f"Jetson: {found.error or 'jtop reports no integrated GPU'}; ")
    note = f"Jetson (jtop): {_count(found.gpus)}, {found.driver_version or 'L4T unknown'}"
    return GpuReport(found.gpus, found.driver_version, found.cuda_version, "jtop", note)


def _sm_count(gpu: GpuInfo, allow_torch: bool) -> int | None:
    uuid = gpu.extra.get("uuid")
    key = uuid or f"index {gpu.index}"
    if key not in _sm_counts and (allow_torch or "torch" in sys.modules):
        _sm_counts[key] = sm_count_from_torch(gpu.index, uuid, allow_torch=allow_torch)
    return _sm_counts.get(key)


def _count(gpus: list[GpuInfo]) -> str:
    return f"{len(gpus)} GPU{'' if len(gpus) == 1 else 's'} ({', '.join(sorted({g.name for g in gpus}))})"


def _warn_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.warning("%s", message)
