"""NVIDIA MPS: config, SM arithmetic, client environment and the control daemon.

Task processes get `client_env(config, R_i)`; the SM count a child must see is `expected_sm_count(total, R_i)`,
checked by `agent.workers.start_worker` against what the child reports (without a daemon the percentage is
silently ignored, so a mismatch fails the task). `MpsDaemon` finds or starts
the control daemon through `nvidia-cuda-mps-control`; when MPS is unavailable its `MpsInfo.reason` says why and
callers run plain concurrent processes.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Annotated

import msgspec
import numpy as np
from msgspec import Meta

from agent.workers import Launch
from protocol.schemas import MpsInfo

log = logging.getLogger(__name__)

CONTROL = "nvidia-cuda-mps-control"
FALLBACK_DIRS: tuple[str, ...] = ("/usr/local/nvidia/bin", "/usr/bin")
JETSON_RELEASE = Path("/etc/nv_tegra_release")
MIN_SMS = 8  # H100: any percentage below ~6% still gets 8 SMs


class MpsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The agent's [mps] table. Daemon and clients must share `pipe_dir`; keep both dirs out of /tmp
    (systemd's PrivateTmp hides it)."""

    enabled: bool = True
    manage_daemon: bool = False
    pipe_dir: str = "/run/nvidia-mps"
    log_dir: str = "/run/nvidia-mps-log"
    control_binary: str | None = None
    pinned_memory_limit: Annotated[str, Meta(pattern=r"^\d+=\d+[KMG]?(,\d+=\d+[KMG]?)*\Z")] | None = None


class MpsError(RuntimeError):
    """The control binary is missing, failed, or did not answer in time."""


# --- SM arithmetic and client environment ---------------------------------------------------------------


def _check_percent(percent: float) -> None:
    if not 0 < percent <= 100:
        raise ValueError(f"MPS active thread percentage must be in (0, 100], got {percent}")


def expected_sm_count(total_sms: int, percent: float) -> int:
    """SMs a client with CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=`percent` sees: rounded down to an even count,
    at least 8, at most `total_sms` (measured on an H100 with 132 SMs)."""
    _check_percent(percent)
    if total_sms < 1:
        raise ValueError(f"total_sms must be >= 1, got {total_sms}")
    if percent == 100:
        return total_sms
    even = int(Fraction(total_sms) * Fraction(percent) / 200) * 2
    return min(total_sms, max(MIN_SMS, even))


def client_env(config: MpsConfig, percent: float) -> dict[str, str]:
    """Environment for one MPS client (task process) limited to `percent` of the SMs."""
    _check_percent(percent)
    env = {
        "CUDA_MPS_PIPE_DIRECTORY": config.pipe_dir,
        "CUDA_MPS_LOG_DIRECTORY": config.log_dir,
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": np.format_float_positional(percent, trim="-"),
    }
    if config.pinned_memory_limit:
        env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = config.pinned_memory_limit
    return env


# --- the control daemon ---------------------------------------------------------------------------------


class MpsDaemon:
    """Finds, starts (only when `manage_daemon`), stops (only if it started it) and recovers the MPS control
    daemon. Methods returning MpsInfo report trouble in `reason` instead of raising. Each call of the control
    binary is bounded by `timeout_s`; waiting for the daemon to come up or go away by `start_timeout_s`."""

    def __init__(self, config: MpsConfig, *, timeout_s: float = 5.0, start_timeout_s: float = 30.0) -> None:
        self.config = config
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self._started = False
        self.info = MpsInfo(available=False, reason="MPS not checked yet")

    @property
    def available(self) -> bool:
        """Whether the last detect/ensure_running/recover found a usable daemon."""
        return self.info.available

    @property
    def started(self) -> bool:
        """Whether this object started the running daemon (and so may stop it)."""
        return self._started

    @property
    def binary(self) -> str | None:
        """The control binary: the configured one, else on PATH, else in the usual driver directories."""
        if self.config.control_binary:
            return shutil.which(self.config.control_binary)
        return shutil.which(
            CONTROL, path=os.pathsep.join(filter(None, [os.environ.get("PATH"), *FALLBACK_DIRS]))
        )

    def server_list(self) -> list[int]:
        """PIDs of the MPS servers (empty before the first client); MpsError when no daemon answers."""
        rc, out = self._control(stdin="get_server_list")
        if rc != 0:
            raise MpsError(f"get_server_list failed (exit {rc}): {out or 'no output'}")
        return [int(word) for word in out.split() if word.isdigit()]

    def detect(self) -> MpsInfo:
        """Is MPS usable now: binary found, control socket present, daemon answering."""
        return self._set(self._detect())

    def ensure_running(self) -> MpsInfo:
        """Use a running daemon; else start one if `manage_daemon`; else report MPS unavailable."""
        info = self.detect()
        if info.available or not self.config.manage_daemon or info.control_binary is None:
            return info
        try:
            for path in (self.config.pipe_dir, self.config.log_dir):
                if not os.path.isdir(path):
                    os.makedirs(path, mode=0o755)
                    os.chmod(path, 0o755)
        except OSError as exc:
            return self._set(self._unavailable(f"cannot create MPS directory {exc.filename}: {exc.strerror}"))
        log.info("starting MPS control daemon (pipe %s, log %s)", self.config.pipe_dir, self.config.log_dir)
        try:
            rc, out = self._control("-d")
            if rc != 0:
                raise MpsError(f"{CONTROL} -d failed (exit {rc}): {out or 'no output'}")
            self._started = True
            if not self._wait(answering=True):
                raise MpsError(f"MPS daemon started but did not answer within {self.start_timeout_s:g} s")
        except MpsError as exc:
            return self._set(self._unavailable(str(exc)))
        return self.detect()

    def stop(self) -> bool:
        """Quit the daemon if this object started it (never one run by someone else); True if it did.
        Raises MpsError when quit fails or the daemon still answers after `start_timeout_s`."""
        if not self._started:
            return False
        log.info("stopping the MPS control daemon we started (pipe %s)", self.config.pipe_dir)
        rc, out = self._control(stdin="quit", timeout_s=self.start_timeout_s)
        if rc != 0:
            raise MpsError(f"quit failed (exit {rc}): {out or 'no output'}")
        if not self._wait(answering=False):
            raise MpsError(f"MPS daemon still answers {self.start_timeout_s:g} s after quit")
        self._started = False
        self._set(self._unavailable("MPS daemon stopped by the agent"))
        return True

    def recover(self) -> MpsInfo:
        """After an MPS fault (CUDA error 807/805), once every task process has exited: restart a daemon this
        object started; a daemon run by someone else must be restarted by an operator."""
        try:
            self.stop()
        except MpsError as exc:
            return self._set(self._unavailable(f"MPS recovery failed: {exc}"))
        info = self.detect()
        if info.daemon_running:  # not ours: never stop it
            return self._set(
                self._unavailable(
                    f"MPS daemon (pipe {self.config.pipe_dir}) faulted and is not managed by this agent: "
                    "an operator must restart the MPS service; plain concurrent processes until then",
                    daemon_running=True,
                )
            )
        return self.ensure_running()

    # --- internals

    def _detect(self) -> MpsInfo:
        if not self.config.enabled:
            return MpsInfo(
                available=False, reason="MPS disabled in the agent config: plain concurrent processes"
            )
        binary = self.binary
        if binary is None:
            return self._unavailable("MPS control binary not found: plain concurrent processes")
        pipe = self.config.pipe_dir
        control = os.path.join(pipe, "control")
        try:
            if not os.path.exists(control):
                raise MpsError(f"no {control}")
            self.server_list()  # the socket outlives a daemon that quit: ask
        except MpsError as exc:
            then = "it will be started" if self.config.manage_daemon else "manage_daemon is false"
            return self._unavailable(f"daemon not running ({exc}) and {then}: plain concurrent processes")
        whose = "started by the agent" if self._started else "running"
        return MpsInfo(
            available=True,
            reason=f"daemon {whose} (pipe {pipe})",
            control_binary=binary,
            pipe_dir=pipe,
            daemon_running=True,
        )

    def _unavailable(self, reason: str, daemon_running: bool = False) -> MpsInfo:
        if JETSON_RELEASE.exists():
            reason = f"Jetson: {reason} (MPS on Jetson depends on the JetPack release)"
        return MpsInfo(
            available=False,
            reason=reason,
            control_binary=self.binary,
            pipe_dir=self.config.pipe_dir,
            daemon_running=daemon_running,
        )

    def _set(self, info: MpsInfo) -> MpsInfo:
        self.info = info
        return info

    def _wait(self, answering: bool) -> bool:
        """Poll get_server_list until the daemon answers (or stops answering); False after start_timeout_s."""
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            rc, _ = self._control(stdin="get_server_list")
            if (rc == 0) == answering:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)

    def _control(self, *args: str, stdin: str = "", timeout_s: float | None = None) -> tuple[int, str]:
        """Run the control binary with the config's pipe/log dirs; (exit code, output). Output goes to a
        file, not a pipe, so a daemon forked by `-d` cannot hold us up."""
        binary = self.binary
        if binary is None:
            raise MpsError("MPS control binary not found")
        env = {
            **os.environ,
            "CUDA_MPS_PIPE_DIRECTORY": self.config.pipe_dir,
            "CUDA_MPS_LOG_DIRECTORY": self.config.log_dir,
        }
        env.pop("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", None)  # on the daemon it would cap every client
        timeout_s = timeout_s or self.timeout_s
        what = f"'{stdin}' to {CONTROL}" if stdin else f"{CONTROL} {' '.join(args)}"
        with tempfile.TemporaryFile() as out:
            try:
                proc = subprocess.run(
                    [binary, *args],
                    check=False,
                    input=f"{stdin}\n".encode() if stdin else b"",
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    timeout=timeout_s,
                )
            except subprocess.TimeoutExpired:
                raise MpsError(f"{what} did not answer within {timeout_s:g} s") from None
            except OSError as exc:
                raise MpsError(f"cannot run {binary}: {exc.strerror}") from None
            out.seek(0)
            return proc.returncode, out.read().decode(errors="replace").strip()


class GpuSharing:
    """How task processes reach the GPU: MPS client environments and expected SM counts, or plain processes.

    `no_mps_env` points a process at an empty pipe directory, so it never joins a running daemon (the
    `temporal` and `concurrent` policies time-slice without MPS).
    """

    def __init__(self, daemon: MpsDaemon, total_sms: int | None, work_dir: Path) -> None:
        self.daemon = daemon
        self.total_sms = total_sms
        empty = Path(work_dir) / "no-mps"
        empty.mkdir(parents=True, exist_ok=True)
        self.no_mps_env = {"CUDA_MPS_PIPE_DIRECTORY": str(empty)}

    @property
    def mps_env(self) -> Callable[[float], dict[str, str]] | None:
        """`percent -> client environment` while MPS is available, else None."""
        return (lambda percent: client_env(self.daemon.config, percent)) if self.daemon.available else None

    def expected_sms(self, percent: float) -> int | None:
        return expected_sm_count(self.total_sms, percent) if self.total_sms else None

    def launch(self, name: str, percent: float) -> Launch:
        """A worker's launch under MPS at `percent` of the SMs."""
        if self.mps_env is None:
            raise MpsError(f"MPS is unavailable: {self.daemon.info.reason}")
        return Launch(
            name, env=self.mps_env(percent), percent=percent, expected_sms=self.expected_sms(percent)
        )

    def launch_for(self, model: str, percent: float) -> Launch:
        """A pool worker's launch: `model` under MPS at `percent` (workers of WorkerPool)."""
        return self.launch(f"{model}@{percent:g}", percent)


@contextmanager
def mps_sharing(root: Path | None = None) -> Iterator[GpuSharing]:
    """A private MPS daemon for benchmarks and profiling (root, or a user allowed to run MPS), stopped afterwards."""
    import torch

    root = Path(root or tempfile.mkdtemp(prefix="fedmt-mps-"))
    daemon = MpsDaemon(MpsConfig(manage_daemon=True, pipe_dir=str(root / "pipe"), log_dir=str(root / "log")))
    info = daemon.ensure_running()
    if not info.available:
        raise MpsError(f"MPS is needed here: {info.reason}")
    try:
        yield GpuSharing(daemon, torch.cuda.get_device_properties(0).multi_processor_count, root)
    finally:
        daemon.stop()
