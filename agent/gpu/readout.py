"""What a GPU backend (NVML or jtop) read: the GPUs and versions, or why there are none."""

from __future__ import annotations

from dataclasses import dataclass, field

from protocol.schemas import GpuInfo


@dataclass(frozen=True)
class Readout:
    gpus: list[GpuInfo] = field(default_factory=list)
    driver_version: str | None = None
    cuda_version: str | None = None
    error: str | None = None  # why nothing could be read (the library, driver or service is missing)
    skipped: list[str] = field(default_factory=list)  # GPUs that failed a required query, with the error
