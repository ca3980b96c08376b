"""MPS support against a fake `nvidia-cuda-mps-control` (tests/fake_mps) placed on PATH."""

from __future__ import annotations

import math
import os
import shutil
import stat
import time
from pathlib import Path

import msgspec
import pytest

from agent import mps
from agent.mps import CONTROL, MpsConfig, MpsDaemon, MpsError

FAKE = Path(__file__).parent / "fake_mps" / CONTROL
PID = "nvidia-cuda-mps-control.pid"  # the fake's "daemon runs" flag, as the real daemon's pid file

# (percent, SMs seen by torch) on an H100 with 132 SMs
H100_MEASURED = [
    (1, 8),
    (2, 8),
    (3, 8),
    (4, 8),
    (5, 8),
    (10, 12),
    (20, 26),
    (25, 32),
    (33, 42),
    (50, 66),
    (60, 78),
    (75, 98),
    (90, 118),
    (100, 132),
]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No real driver directories, not a Jetson, calls of the fake logged to calls.log."""
    monkeypatch.setattr(mps, "FALLBACK_DIRS", ())
    monkeypatch.setattr(mps, "JETSON_RELEASE", tmp_path / "nv_tegra_release")
    monkeypatch.setenv("FAKE_MPS_LOG", str(tmp_path / "calls.log"))
    for name in ("FAKE_MPS_HANG", "FAKE_MPS_START_DELAY", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """The fake control binary first on PATH (copied, so it is executable whatever the checkout's file modes)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(FAKE, bin_dir / CONTROL)
    (bin_dir / CONTROL).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir / CONTROL


@pytest.fixture
def running(tmp_path):
    """A daemon somebody else started on our pipe dir."""
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "control").touch()
    (tmp_path / "pipe" / PID).write_text("99\n")


def config(tmp_path: Path, **kwargs) -> MpsConfig:
    return MpsConfig(pipe_dir=str(tmp_path / "pipe"), log_dir=str(tmp_path / "log"), **kwargs)


def calls(tmp_path: Path) -> list[list[str]]:
    """Every command the fake received: [command, pipe dir, log dir]."""
    path = tmp_path / "calls.log"
    return [line.split("\t") for line in path.read_text().splitlines()] if path.exists() else []


def commands(tmp_path: Path) -> list[str]:
    return [call[0] for call in calls(tmp_path)]


# --- config, SM arithmetic, client environment


def test_config_from_toml():
    cfg = msgspec.toml.decode(b'manage_daemon = true\npinned_memory_limit = "0=2G,1=512M"', type=MpsConfig)
    assert (cfg.enabled, cfg.manage_daemon, cfg.pipe_dir, cfg.log_dir) == (
        True,
        True,
        "/run/nvidia-mps",
        "/run/nvidia-mps-log",
    )
    with pytest.raises(msgspec.ValidationError):
        msgspec.toml.decode(b"pipe = '/tmp/x'", type=MpsConfig)
    with pytest.raises(msgspec.ValidationError):
        msgspec.toml.decode(b"pinned_memory_limit = '2 GB'", type=MpsConfig)


@pytest.mark.parametrize(("percent", "sms"), H100_MEASURED)
def test_expected_sm_count_matches_h100(percent, sms):
    assert mps.expected_sm_count(132, percent) == sms


def test_expected_sm_count_bounds():
    assert mps.expected_sm_count(16, 25) == 8  # the floor of 8 SMs
    assert mps.expected_sm_count(6, 50) == 6  # never more than the GPU has
    assert mps.expected_sm_count(132, 37.5) == 48  # measured, as 33.3333 -> 42
    assert mps.expected_sm_count(132, 33.3333) == 42
    for percent in (0, -5, 100.5, math.nan):
        with pytest.raises(ValueError):
            mps.expected_sm_count(132, percent)
    with pytest.raises(ValueError):
        mps.expected_sm_count(0, 50)


def test_client_env():
    cfg = MpsConfig(pinned_memory_limit="0=2G")
    assert mps.client_env(cfg, 37.5) == {
        "CUDA_MPS_PIPE_DIRECTORY": "/run/nvidia-mps",
        "CUDA_MPS_LOG_DIRECTORY": "/run/nvidia-mps-log",
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "37.5",
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=2G",
    }
    plain = MpsConfig()
    assert mps.client_env(plain, 50.0)["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "50"
    assert mps.client_env(plain, 100)["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "100"
    assert mps.client_env(plain, 0.001)["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "0.001"
    assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in mps.client_env(plain, 50)
    for percent in (0, -1, 100.01, math.nan):
        with pytest.raises(ValueError, match=r"\(0, 100\]"):
            mps.client_env(plain, percent)


# --- detection and fallback


def test_no_binary_is_unavailable(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    daemon = MpsDaemon(config(tmp_path, manage_daemon=True))
    for info in (daemon.detect(), daemon.ensure_running(), daemon.recover()):
        assert not info.available and info.control_binary is None
        assert info.reason == "MPS control binary not found: plain concurrent processes"
    assert not daemon.available
    assert daemon.stop() is False


def test_jetson_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    mps.JETSON_RELEASE.write_text("# R36 (release), REVISION: 4.0\n")
    assert MpsDaemon(config(tmp_path)).detect().reason.startswith("Jetson: MPS control binary not found")


def test_disabled_never_calls_the_binary(tmp_path, fake, running):
    info = MpsDaemon(config(tmp_path, enabled=False, manage_daemon=True)).ensure_running()
    assert not info.available and "disabled" in info.reason
    assert calls(tmp_path) == []


def test_not_running_and_not_managed(tmp_path, fake):
    daemon = MpsDaemon(config(tmp_path))
    info = daemon.ensure_running()
    assert not info.available and not info.daemon_running and info.control_binary == str(fake)
    assert info.reason == (
        f"daemon not running (no {tmp_path / 'pipe' / 'control'}) and manage_daemon is false: "
        "plain concurrent processes"
    )
    assert "-d" not in commands(tmp_path)
    assert not (tmp_path / "pipe").exists()


def test_running_daemon_is_used_not_stopped(tmp_path, fake, running):
    daemon = MpsDaemon(config(tmp_path, manage_daemon=True))
    assert daemon.detect() == daemon.ensure_running()
    info = daemon.info
    assert info.available and info.daemon_running and daemon.available and not daemon.started
    assert info.reason == f"daemon running (pipe {tmp_path / 'pipe'})"
    assert (info.control_binary, info.pipe_dir) == (str(fake), str(tmp_path / "pipe"))
    assert daemon.server_list() == [4242]
    assert daemon.stop() is False
    assert set(commands(tmp_path)) == {"get_server_list"}
    assert (tmp_path / "pipe" / PID).exists()


def test_control_socket_left_by_a_daemon_that_quit(tmp_path, fake, running):
    (tmp_path / "pipe" / PID).unlink()  # the real daemon leaves `control` behind on quit
    info = MpsDaemon(config(tmp_path)).detect()
    assert not info.available and not info.daemon_running
    assert "Cannot find MPS control daemon process" in info.reason and "manage_daemon is false" in info.reason
    assert MpsDaemon(config(tmp_path, manage_daemon=True)).ensure_running().available


# --- managing the daemon


def test_managed_daemon_started_then_stopped(tmp_path, fake, monkeypatch):
    monkeypatch.setenv("FAKE_MPS_START_DELAY", "0.5")  # the daemon answers only after a while
    daemon = MpsDaemon(config(tmp_path, manage_daemon=True))
    info = daemon.ensure_running()
    assert info.available and daemon.started
    assert info.reason == f"daemon started by the agent (pipe {tmp_path / 'pipe'})"
    log = calls(tmp_path)
    assert log[0] == ["-d", str(tmp_path / "pipe"), str(tmp_path / "log")]
    assert log[1][0] == "get_server_list" and len(log) > 2  # polled until it answered
    for path in (tmp_path / "pipe", tmp_path / "log"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o755

    assert daemon.ensure_running().available
    assert commands(tmp_path).count("-d") == 1  # already running: not started twice

    assert daemon.stop() is True
    assert "quit" in commands(tmp_path) and not daemon.available and not daemon.started
    assert not (tmp_path / "pipe" / PID).exists()
    assert daemon.stop() is False


def test_managed_daemon_that_never_answers(tmp_path, fake, monkeypatch):
    monkeypatch.setenv("FAKE_MPS_START_DELAY", "5")
    start = time.monotonic()
    info = MpsDaemon(config(tmp_path, manage_daemon=True), start_timeout_s=0.5).ensure_running()
    assert time.monotonic() - start < 5
    assert not info.available and "did not answer within 0.5 s" in info.reason


def test_unwritable_dirs(tmp_path, fake):
    (tmp_path / "file").touch()
    info = MpsDaemon(MpsConfig(pipe_dir=str(tmp_path / "file" / "pipe"), manage_daemon=True)).ensure_running()
    assert not info.available and info.reason.startswith("cannot create MPS directory")
    assert "-d" not in commands(tmp_path)


def test_recover_restarts_a_managed_daemon(tmp_path, fake):
    daemon = MpsDaemon(config(tmp_path, manage_daemon=True))
    assert daemon.ensure_running().available
    info = daemon.recover()
    assert info.available and daemon.started
    assert [c for c in commands(tmp_path) if c != "get_server_list"] == ["-d", "quit", "-d"]


def test_recover_leaves_a_foreign_daemon_to_the_operator(tmp_path, fake, running):
    daemon = MpsDaemon(config(tmp_path, manage_daemon=True))
    assert daemon.ensure_running().available
    info = daemon.recover()
    assert not info.available and info.daemon_running and not daemon.available
    assert "operator must restart the MPS service" in info.reason
    assert set(commands(tmp_path)) == {"get_server_list"}
    assert (tmp_path / "pipe" / PID).exists()


def test_recover_unmanaged_without_daemon(tmp_path, fake):
    info = MpsDaemon(config(tmp_path)).recover()
    assert not info.available and "manage_daemon is false" in info.reason


def test_hanging_binary_times_out(tmp_path, fake, running, monkeypatch):
    monkeypatch.setenv("FAKE_MPS_HANG", "1")
    daemon = MpsDaemon(config(tmp_path, manage_daemon=True), timeout_s=0.3, start_timeout_s=0.3)
    start = time.monotonic()
    with pytest.raises(
        MpsError, match=r"'get_server_list' to nvidia-cuda-mps-control did not answer within 0.3 s"
    ):
        daemon.server_list()
    assert "daemon not running ('get_server_list' to" in daemon.detect().reason
    info = daemon.ensure_running()  # control socket present but no answer: tries -d, which hangs too
    assert not info.available and "did not answer within 0.3 s" in info.reason
    assert time.monotonic() - start < 5
