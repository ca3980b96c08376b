"""NVIDIA Jetson boards through jetson-stats (`jtop`, imported on first use), which reads from the jtop service.

The integrated GPU shares the board's RAM, so its memory is the RAM. jtop reports memory in kB, power in mW and
GPU clocks in kHz.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from agent.gpu.readout import Readout
from protocol.schemas import GpuInfo, GpuTelemetry

TEGRA_RELEASE = Path("/etc/nv_tegra_release")
DEVICE_TREE_MODEL = Path("/proc/device-tree/model")
JTOP_SOCKET = Path("/run/jtop.sock")
INSTALL_HINT = "jetson-stats is not installed: install jetson-stats (pip install jetson-stats)"
SERVICE_HINT = "the jtop service is not running: sudo systemctl enable --now jtop"


class JtopUnavailable(Exception):
    """jtop cannot be used; the message names the fix."""


def is_jetson(tegra_release: Path = TEGRA_RELEASE, model: Path = DEVICE_TREE_MODEL) -> bool:
    """A Jetson (L4T) board: it has an L4T release file or a device-tree model naming Jetson."""
    if tegra_release.exists():
        return True
    try:
        return "Jetson" in model.read_text(errors="replace")
    except OSError:
        return False


def read_gpus(jtop: ModuleType | None = None) -> Readout:
    """Profile the board's GPU. `jtop` replaces the jtop module (tests)."""
    try:
        with _session(jtop) as board:
            info = _board_info(board.board)
            facts = {
                "board": info.get("model"),
                "module": info.get("module"),
                "jetpack": info.get("jetpack"),
                "l4t": info.get("l4t"),
                "power_rails": ",".join(_power(board.power).get("rail", {})),
            }
            extra = {key: value for key, value in facts.items() if value}
            ram = board.memory["RAM"]
            gpus = [
                _gpu_info(index, name, data, info, ram, extra)
                for index, (name, data) in enumerate(_integrated(board.gpu))
            ]
        l4t = info.get("l4t")
        return Readout(gpus=gpus, driver_version=f"L4T {l4t}" if l4t else None, cuda_version=info.get("cuda"))
    except JtopUnavailable as exc:
        return Readout(error=str(exc))


def read_telemetry(jtop: ModuleType | None = None) -> list[GpuTelemetry]:
    """Current load of the board's GPU; raises JtopUnavailable when jtop cannot be used."""
    with _session(jtop) as board:
        ram = board.memory["RAM"]
        total_mw = _power(board.power).get("tot", {}).get("power")
        temperature = _gpu_temperature(board.temperature)
        return [
            GpuTelemetry(
                index=index,
                utilization_percent=_float(data.get("status", {}).get("load")),
                memory_used_bytes=int(ram["used"]) * 1024,
                power_w=total_mw / 1000 if total_mw is not None else None,
                temperature_c=temperature,
            )
            for index, (_, data) in enumerate(_integrated(board.gpu))
        ]


@contextmanager
def _session(jtop: ModuleType | None) -> Iterator[Any]:
    """A jtop connection holding fresh readings."""
    if jtop is None:
        try:
            import jtop
        except ImportError:
            raise JtopUnavailable(INSTALL_HINT) from None
    if not JTOP_SOCKET.exists():
        raise JtopUnavailable(f"{SERVICE_HINT} (no {JTOP_SOCKET})")
    try:
        with jtop.jtop() as board:
            if not board.ok():
                raise JtopUnavailable(f"{SERVICE_HINT} (no readings from the service)")
            yield board
    except jtop.JtopException as exc:
        raise JtopUnavailable(f"{SERVICE_HINT} ({' '.join(str(exc).split())})") from None


def _gpu_info(
    index: int, name: str, data: dict, info: dict[str, str], ram: dict, extra: dict[str, str]
) -> GpuInfo:
    freq = data.get("freq", {})
    khz = freq.get("max") or freq.get("cur")
    total, used = int(ram["tot"]), int(ram["used"])
    return GpuInfo(
        index=index,
        name=info.get("model") or info.get("module") or name,
        backend="jtop",
        memory_total_bytes=total * 1024,
        memory_free_bytes=max(total - used, 0) * 1024,
        compute_capability=info.get("cuda arch bin"),
        clock_sm_mhz=int(khz) // 1000 if khz else None,
        extra=extra,
    )


def _board_info(board: Any) -> dict[str, str]:
    """The board's facts from all of jtop's sections ('hardware', 'platform', 'libraries', or 3.x 'info'),
    by lower-case key; the first section that names a key wins."""
    sections = board if isinstance(board, dict) else vars(board)
    info: dict[str, str] = {}
    for section in sections.values():
        if isinstance(section, dict):
            for key, value in section.items():
                if value not in (None, ""):
                    info.setdefault(str(key).lower(), str(value))
    return info


def _integrated(gpus: Any) -> list[tuple[str, dict]]:
    """jtop's integrated GPUs (a Jetson may also list discrete ones it reads through nvidia-smi)."""
    return [(name, data) for name, data in gpus.items() if data.get("type", "integrated") == "integrated"]


def _power(power: Any) -> dict:
    return power if isinstance(power, dict) else {}


def _gpu_temperature(temperatures: dict) -> float | None:
    """The GPU sensor in °C: jtop 4.x gives {'temp', 'online'}, 3.x a number."""
    for name, value in temperatures.items():
        if name.lower() == "gpu":
            if isinstance(value, dict):
                return _float(value.get("temp")) if value.get("online", True) else None
            return _float(value)
    return None


def _float(value: Any) -> float | None:
    return float(value) if value is not None else None
