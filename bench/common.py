"""What every benchmark needs: a description of the machine, GPU utilisation sampling, result files."""

from __future__ import annotations

import csv
import json
import platform
import shlex
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path


def describe_device() -> dict[str, str | int | None]:
    """GPU, driver and software versions (the key under which results are comparable)."""
    import torch

    from agent.gpu.probe import probe

    info: dict[str, str | int | None] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "command": " ".join(shlex.quote(a) for a in sys.argv),
    }
    if torch.cuda.is_available():  # the CUDA device the benchmarks run on (NVML's GPU 0 may be another)
        props = torch.cuda.get_device_properties(0)
        info |= {
            "gpu": props.name,
            "sm_count": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30),
            "driver": probe().driver_version,  # NVML's, or the L4T release on a Jetson; None if unreadable
        }
    else:
        info |= {"gpu": f"cpu ({platform.processor() or platform.machine()})", "sm_count": None}
    return info


class UtilizationSampler:
    """Mean NVML GPU utilisation (percent of time a kernel ran) over a `with` block; None without NVML."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> UtilizationSampler:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # noqa: BLE001 - no NVML: no utilisation column
            return self

        def sample() -> None:
            while not self._stop.wait(self.interval_s):
                self.samples.append(float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


class CsvLog:
    """Appends rows to a CSV as they are measured, so a run cut short keeps what it measured.

    A new log starts the file anew; with `append` an existing file with the same columns is continued."""

    def __init__(self, path: Path, columns: Sequence[str], append: bool = False) -> None:
        self.path = path
        self.columns = list(columns)
        if append and path.exists():
            with open(path, newline="") as f:
                header = next(csv.reader(f), None)
            if header != self.columns:
                raise ValueError(f"{path} has columns {header}, not {self.columns}: cannot append")
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            csv.writer(f).writerow(self.columns)

    def add(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([row.get(c, "") for c in self.columns])


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


class Budget:
    """Wall-clock budget for a benchmark that must end inside a time limit."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def spread(values: Sequence[float]) -> float:
    """(max - min) / median of repeated measurements: how far apart the repetitions landed, relative."""
    import statistics

    middle = statistics.median(values)
    return (max(values) - min(values)) / middle if middle else 0.0


def standard_error(values: Sequence[float]) -> float | None:
    """The standard error of the values' mean; None for fewer than two."""
    import math
    import statistics

    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None


def compare(a: float, a_spread: float, b: float, b_spread: float) -> str:
    """a / b as text, or a tie when the difference is no larger than either measurement's spread."""
    ratio = a / b
    text = f"{ratio:.2f}x"
    return f"tie ({text})" if abs(ratio - 1) <= max(a_spread, b_spread) else text
