"""The aggregator as the separate process it is in production (`python -m aggregator.cli run --config F`), for
the fleet benchmark and tests: its config written as TOML, its log, its peak resident memory, kill -9 and restart."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from aggregator.config import AggregatorConfig
from common.config import to_toml
from testbed.demo import ProcessDied, start


class AggregatorProcess:
    def __init__(self, config: AggregatorConfig, workdir: Path, name: str = "aggregator") -> None:
        self.name = name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / f"{name}.toml"
        self.config_path.write_text(to_toml(config))
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def start(self) -> AggregatorProcess:
        self.starts += 1
        self.process = start(self.name, "aggregator.cli", self.config_path, self.workdir)
        return self

    def check_alive(self) -> None:
        """Raise ProcessDied, with the end of its log, if the process exited."""
        if self.process is not None and self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise ProcessDied(f"{self.name} exited with code {self.process.returncode}:\n{tail}")

    def peak_rss_mib(self) -> float:
        """The process's peak resident set so far (VmHWM), in MiB."""
        peak = peak_rss_of(self.process.pid)
        if peak is None:
            raise RuntimeError(f"no peak RSS of process {self.process.pid} in /proc")
        return peak

    def kill(self) -> None:
        """kill -9: no clean-up, no goodbye."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def __enter__(self) -> AggregatorProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def cpu_seconds_of(pid: int) -> float | None:
    """A live process's CPU time so far (user + system, /proc/PID/stat); None if it cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_of(pid: int) -> float | None:
    """A live process's peak resident set (VmHWM in /proc/PID/status) in MiB; None if it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None
