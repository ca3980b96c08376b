"""GPU profile and telemetry from recorded readings (tests/data/gpu/*.json).

pynvml and jtop are replaced at the boundary by fakes that replay what the libraries returned on real
hardware; everything above them (units, missing features, missing libraries or services, wire encoding) is real.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from agent.gpu import jetson, nvml
from agent.gpu import probe as gpu_probe
from agent.profile import build_profile
from agent.telemetry import read_telemetry
from protocol.schemas import DeviceProfile, GpuTelemetry, Telemetry, decode, encode

DATA = Path(__file__).parent / "data" / "gpu"
REPO = Path(__file__).parent.parent
H100_UUID = "GPU-00000000-0000-4000-8000-000000000100"
# the real functions, before the `host` fixture replaces them
IS_JETSON, SM_COUNT_FROM_TORCH = jetson.is_jetson, gpu_probe.sm_count_from_torch


def load(name: str) -> dict[str, Any]:
    return json.loads((DATA / f"{name}.json").read_text())


# --- a pynvml that replays a recording ----------------------------------------------------------------


class NVMLError(Exception):
    pass


ERRORS = {
    name: type(name, (NVMLError,), {})
    for name in (
        "NVMLError_NotSupported",
        "NVMLError_NoPermission",
        "NVMLError_LibraryNotFound",
        "NVMLError_DriverNotLoaded",
        "NVMLError_GpuIsLost",
        "NVMLError_Uninitialized",
    )
}
CLOCKS = {1: "NVML_CLOCK_SM", 2: "NVML_CLOCK_MEM"}
ARGUMENTS = {
    "nvmlDeviceGetClockInfo": CLOCKS,
    "nvmlDeviceGetMaxClockInfo": CLOCKS,
    "nvmlDeviceGetTemperature": {0: "NVML_TEMPERATURE_GPU"},
}


def replay(value: Any) -> Any:
    """A recorded answer as pynvml gives it: errors raised, structs as attributes, arrays as tuples."""
    if isinstance(value, dict) and "nvml_error" in value:
        raise ERRORS[value["nvml_error"]](value["nvml_error"])
    if isinstance(value, dict) and not any(k.startswith("NVML_") for k in value):
        return SimpleNamespace(**value)
    return tuple(value) if isinstance(value, list) else value


class FakeNvml:
    """The pynvml module as agent.gpu.nvml uses it: a handle is the device's recording."""

    NVMLError = NVMLError
    NVML_TEMPERATURE_GPU, NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_DEVICE_MIG_ENABLE = 0, 1, 2, 1
    NVML_COMPUTEMODE_DEFAULT, NVML_COMPUTEMODE_EXCLUSIVE_THREAD = 0, 1
    NVML_COMPUTEMODE_PROHIBITED, NVML_COMPUTEMODE_EXCLUSIVE_PROCESS = 2, 3

    def __init__(self, recording: dict[str, Any]) -> None:
        self.recording = recording
        self.sessions = 0  # open nvmlInit sessions

    def nvmlInit(self) -> None:
        replay(self.recording.get("nvmlInit"))
        self.sessions += 1

    def nvmlShutdown(self) -> None:
        self.sessions -= 1

    def nvmlDeviceGetCount(self) -> int:
        self._check_open()
        return len(self.recording["devices"])

    def nvmlDeviceGetHandleByIndex(self, index: int) -> dict[str, Any]:
        self._check_open()
        return self.recording["devices"][index]

    def __getattr__(self, name: str) -> Any:
        """Any other query: system ones from the recording's top level, device ones from the handle."""
        if not name.startswith("nvml"):
            raise AttributeError(name)

        def query(*args: Any) -> Any:
            self._check_open()
            if name.startswith("nvmlDevice"):
                handle, *args = args
                value = replay(handle[name])
            else:
                value = replay(self.recording[name])
            return replay(value[ARGUMENTS[name][args[0]]]) if args else value

        query.__name__ = name
        return query

    def _check_open(self) -> None:
        if self.sessions <= 0:
            raise ERRORS["NVMLError_Uninitialized"]("Uninitialized")


for _name, _error in ERRORS.items():
    setattr(FakeNvml, _name, _error)


def unsupported_except(recording: dict[str, Any], keep: set[str]) -> dict[str, Any]:
    """The recording with every query but `keep` answering NotSupported."""
    no = {"nvml_error": "NVMLError_NotSupported"}
    devices = [{k: v if k in keep else no for k, v in device.items()} for device in recording["devices"]]
    return {**{k: no for k in recording if k.startswith("nvmlSystem")}, "devices": devices}


# --- a jtop that replays a recording ------------------------------------------------------------------


class JtopException(Exception):
    pass


class FakeJtop:
    """jtop.jtop as a context manager; `error` fails the connection the way jtop does when its service is down."""

    def __init__(self, recording: dict[str, Any], error: str | None) -> None:
        self.recording, self.error = recording, error

    def __enter__(self) -> FakeJtop:
        if self.error:
            raise JtopException(self.error)
        for key in ("board", "gpu", "memory", "power", "temperature"):
            setattr(self, key, self.recording[key])
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def ok(self) -> bool:
        return True


def jtop_module(error: str | None = None) -> SimpleNamespace:
    recording = load("jtop_agx_orin")
    return SimpleNamespace(jtop=lambda: FakeJtop(recording, error), JtopException=JtopException)


# --- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def host(monkeypatch, tmp_path):
    """Not a Jetson, no jtop service, no torch answers, nothing logged yet: each test states what it has."""
    monkeypatch.setattr(jetson, "is_jetson", lambda: False)
    monkeypatch.setattr(jetson, "JTOP_SOCKET", tmp_path / "jtop.sock")
    monkeypatch.setattr(gpu_probe, "sm_count_from_torch", lambda index, uuid=None, allow_torch=False: None)
    monkeypatch.setattr(gpu_probe, "_sm_counts", {})
    monkeypatch.setattr(gpu_probe, "_logged", set())


def install(monkeypatch, name: str, module: Any) -> Any:
    """`module` answers `import name` (None: the package is not installed)."""
    monkeypatch.setitem(sys.modules, name, module)
    return module


def on_jetson(monkeypatch, tmp_path, service: bool = True) -> None:
    monkeypatch.setattr(jetson, "is_jetson", lambda: True)
    if service:
        (tmp_path / "jtop.sock").touch()


# --- NVML ---------------------------------------------------------------------------------------------


def test_h100_profile_maps_every_field_with_units():
    fake = FakeNvml(load("nvml_h100"))
    report = nvml.read_gpus(fake)
    assert report.error is None and report.skipped == []
    assert (report.driver_version, report.cuda_version) == ("580.159.04", "13.0")
    [gpu] = report.gpus
    assert gpu.index == 0 and gpu.backend == "nvml" and gpu.name == "NVIDIA H100 80GB HBM3"
    assert (gpu.memory_total_bytes, gpu.memory_free_bytes) == (85520809984, 85017493504)
    assert gpu.compute_capability == "9.0"
    assert (gpu.clock_sm_mhz, gpu.clock_memory_mhz) == (1980, 2619)  # max clocks, not the idle 405 MHz
    assert gpu.power_limit_w == 700.0  # from 700000 mW
    assert (gpu.compute_mode, gpu.mig_mode) == ("default", False)
    assert gpu.extra == {"uuid": H100_UUID}
    assert gpu.sm_count is None  # not in NVML
    assert fake.sessions == 0  # shut down again


def test_rtx3090_without_mig_support_reads_the_rest():
    report = nvml.read_gpus(FakeNvml(load("nvml_rtx3090")))
    [gpu] = report.gpus
    assert gpu.mig_mode is None
    assert (gpu.name, gpu.memory_total_bytes, gpu.compute_capability) == (
        "NVIDIA GeForce RTX 3090",
        24 << 30,
        "8.6",
    )
    assert (gpu.power_limit_w, gpu.clock_sm_mhz, gpu.compute_mode) == (350.0, 2100, "default")
    assert report.cuda_version == "12.4"


def test_every_unsupported_query_becomes_none_without_failing():
    recording = unsupported_except(load("nvml_h100"), keep={"nvmlDeviceGetName", "nvmlDeviceGetMemoryInfo"})
    fake = FakeNvml(recording)
    report = nvml.read_gpus(fake)
    [gpu] = report.gpus
    assert (gpu.name, gpu.memory_total_bytes) == ("NVIDIA H100 80GB HBM3", 85520809984)
    optional = (
        "compute_capability",
        "clock_sm_mhz",
        "clock_memory_mhz",
        "power_limit_w",
        "compute_mode",
        "mig_mode",
    )
    assert {name: getattr(gpu, name) for name in optional} == dict.fromkeys(optional)
    assert gpu.extra == {} and report.driver_version is None and report.cuda_version is None
    assert nvml.read_telemetry(fake) == [GpuTelemetry(index=0, memory_used_bytes=503316480)]


def test_max_clock_not_reported_falls_back_to_current_clock():
    recording = load("nvml_h100")
    recording["devices"][0]["nvmlDeviceGetMaxClockInfo"] = {"nvml_error": "NVMLError_NotSupported"}
    [gpu] = nvml.read_gpus(FakeNvml(recording)).gpus
    assert (gpu.clock_sm_mhz, gpu.clock_memory_mhz) == (405, 2619)


def test_gpu_failing_a_required_query_is_skipped_and_named(monkeypatch):
    recording = load("nvml_h100")
    lost = {**recording["devices"][0], "nvmlDeviceGetMemoryInfo": {"nvml_error": "NVMLError_GpuIsLost"}}
    recording["devices"].append(lost)
    report = nvml.read_gpus(FakeNvml(recording))
    assert [g.index for g in report.gpus] == [0]
    assert report.skipped == ["GPU 1: NVMLError_GpuIsLost"]
    install(monkeypatch, "pynvml", FakeNvml(recording))
    assert gpu_probe.probe().note.endswith("; skipped GPU 1: NVMLError_GpuIsLost")


def test_nvml_telemetry_units():
    assert nvml.read_telemetry(FakeNvml(load("nvml_h100"))) == [
        GpuTelemetry(
            index=0, utilization_percent=0.0, memory_used_bytes=503316480, power_w=117.818, temperature_c=38.0
        )
    ]
    [busy] = nvml.read_telemetry(FakeNvml(load("nvml_rtx3090")))
    assert (busy.utilization_percent, busy.power_w, busy.temperature_c) == (97.0, 331.245, 71.0)


# --- probe: backend choice and notes ------------------------------------------------------------------


def test_probe_reports_nvml_gpus(monkeypatch):
    install(monkeypatch, "pynvml", FakeNvml(load("nvml_h100")))
    report = gpu_probe.probe()
    assert report.backend == "nvml"
    assert report.note == "NVML: 1 GPU (NVIDIA H100 80GB HBM3)"
    assert (report.driver_version, report.cuda_version, len(report.gpus)) == ("580.159.04", "13.0", 1)


def test_no_driver_gives_cpu_profile_with_clear_note(monkeypatch, caplog):
    install(monkeypatch, "pynvml", FakeNvml(load("nvml_no_driver")))
    with caplog.at_level(logging.WARNING, logger="agent.gpu.probe"):
        first, second = gpu_probe.probe(), gpu_probe.probe()
    assert (
        first == second == gpu_probe.GpuReport(note="no NVIDIA driver (NVML: library not found); CPU profile")
    )
    assert [r.getMessage() for r in caplog.records] == [first.note]  # logged once


@pytest.mark.parametrize(
    ("module", "note"),
    [
        (None, "NVML unavailable (nvidia-ml-py is not installed); CPU profile"),
        (
            FakeNvml({"nvmlInit": {"nvml_error": "NVMLError_DriverNotLoaded"}}),
            "no NVIDIA driver (NVML: driver not loaded); CPU profile",
        ),
        (FakeNvml({**load("nvml_h100"), "devices": []}), "NVML: no GPUs; CPU profile"),
    ],
)
def test_nvml_unavailable_notes(monkeypatch, module, note):
    install(monkeypatch, "pynvml", module)
    report = gpu_probe.probe()
    assert (report.backend, report.gpus, report.note) == ("none", [], note)


def test_probe_survives_a_backend_bug(monkeypatch):
    monkeypatch.setattr(nvml, "read_gpus", lambda: 1 / 0)
    report = gpu_probe.probe()
    assert report.backend == "none" and report.note.startswith("GPU probe failed (ZeroDivisionError")


def test_telemetry_failure_is_empty_and_logged_once(monkeypatch, caplog):
    install(monkeypatch, "pynvml", FakeNvml(load("nvml_no_driver")))
    report = gpu_probe.GpuReport(backend="nvml")
    with caplog.at_level(logging.WARNING, logger="agent.gpu.probe"):
        assert gpu_probe.telemetry(report) == gpu_probe.telemetry(report) == []
    assert [r.getMessage() for r in caplog.records] == [
        "GPU telemetry (nvml) failed: no NVIDIA driver (NVML: library not found)"
    ]
    assert gpu_probe.telemetry(gpu_probe.GpuReport()) == []


# --- SM counts from torch -----------------------------------------------------------------------------


def fake_torch(*devices: tuple[str, int]) -> SimpleNamespace:
    props = [SimpleNamespace(uuid=uuid, multi_processor_count=sms) for uuid, sms in devices]
    cuda = SimpleNamespace(
        is_available=lambda: bool(props),
        device_count=lambda: len(props),
        get_device_properties=lambda i: props[i],
    )
    return SimpleNamespace(cuda=cuda)


def test_sm_count_from_torch_policy_and_device_matching(monkeypatch):
    sm_count = SM_COUNT_FROM_TORCH
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert sm_count(0) is None and "torch" not in sys.modules  # not imported without allow_torch
    # CUDA lists the 3090 first (CUDA_DEVICE_ORDER=FASTEST_FIRST), NVML the H100: match by UUID
    install(
        monkeypatch,
        "torch",
        fake_torch(
            ("00000000-0000-4000-8000-000000003090", 82), ("00000000-0000-4000-8000-000000000100", 132)
        ),
    )
    assert sm_count(0, H100_UUID) == 132
    assert sm_count(0) == 82  # by index where there is no UUID (Jetson)
    assert sm_count(0, "GPU-hidden-by-CUDA_VISIBLE_DEVICES") is None
    assert sm_count(5) is None
    install(monkeypatch, "torch", None)  # torch not installed
    assert sm_count(0, allow_torch=True) is None


def test_profile_asks_torch_once_and_caches(monkeypatch):
    asked = []

    def torch_says(index, uuid=None, allow_torch=False):
        asked.append((index, uuid, allow_torch))
        return 132

    monkeypatch.setattr(gpu_probe, "sm_count_from_torch", torch_says)
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    install(monkeypatch, "pynvml", FakeNvml(load("nvml_h100")))
    assert gpu_probe.probe().gpus[0].sm_count is None and asked == []  # torch not imported, not allowed
    assert build_profile("dev-1", {}, []).gpus[0].sm_count == 132  # the profile build may import torch
    assert gpu_probe.probe().gpus[0].sm_count == 132  # cached
    assert asked == [(0, H100_UUID, True)]


# --- Jetson -------------------------------------------------------------------------------------------


def test_is_jetson(tmp_path):
    release, model = tmp_path / "nv_tegra_release", tmp_path / "model"
    assert not IS_JETSON(release, model)
    model.write_bytes(b"Raspberry Pi 5 Model B Rev 1.0\x00")
    assert not IS_JETSON(release, model)
    model.write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\x00")
    assert IS_JETSON(release, model)
    model.unlink()
    release.write_text("# R36 (release), REVISION: 3.0\n")
    assert IS_JETSON(release, model)


def test_orin_profile_maps_jtop_reading_with_units(monkeypatch, tmp_path):
    on_jetson(monkeypatch, tmp_path)
    report = jetson.read_gpus(jtop_module())
    assert report.error is None
    assert (report.driver_version, report.cuda_version) == ("L4T 36.3.0", "12.2.140")
    [gpu] = report.gpus
    assert (gpu.index, gpu.backend, gpu.name) == (0, "jtop", "NVIDIA Jetson AGX Orin Developer Kit")
    assert gpu.memory_total_bytes == 64 << 30  # shared RAM, 67108864 kB
    assert gpu.memory_free_bytes == (67108864 - 18874368) * 1024
    assert (gpu.clock_sm_mhz, gpu.compute_capability) == (1300, "8.7")  # 1300500 kHz
    assert gpu.extra == {
        "board": "NVIDIA Jetson AGX Orin Developer Kit",
        "module": "NVIDIA Jetson AGX Orin (64GB ram)",
        "jetpack": "6.0",
        "l4t": "36.3.0",
        "power_rails": "VDD_GPU_SOC,VDD_CPU_CV,VIN_SYS_5V0",
    }
    assert gpu.power_limit_w is gpu.compute_mode is gpu.mig_mode is None


def test_orin_telemetry_units(monkeypatch, tmp_path):
    on_jetson(monkeypatch, tmp_path)
    assert jetson.read_telemetry(jtop_module()) == [
        GpuTelemetry(
            index=0,
            utilization_percent=37.4,
            memory_used_bytes=18874368 * 1024,
            power_w=13.746,
            temperature_c=45.2,
        )
    ]


def test_jetson_board_keys_from_older_jetson_stats():
    board = SimpleNamespace(
        info={"machine": "NVIDIA Jetson Xavier NX", "jetpack": "4.6", "L4T": "32.6.1"},
        hardware={},
        libraries={"CUDA": "10.2.300"},
    )
    info = jetson._board_info(board)
    assert (info["jetpack"], info["l4t"], info["cuda"]) == ("4.6", "32.6.1", "10.2.300")
    assert jetson._gpu_temperature({"GPU": 41.5}) == 41.5
    assert jetson._gpu_temperature({"gpu": {"temp": -256.0, "online": False}}) is None


def test_probe_on_jetson_uses_jtop(monkeypatch, tmp_path):
    on_jetson(monkeypatch, tmp_path)
    install(monkeypatch, "jtop", jtop_module())
    report = gpu_probe.probe()
    assert report.backend == "jtop"
    assert report.note == "Jetson (jtop): 1 GPU (NVIDIA Jetson AGX Orin Developer Kit), L4T 36.3.0"
    assert gpu_probe.telemetry(report)[0].temperature_c == 45.2


def test_jetson_without_jetson_stats_names_the_fix(monkeypatch, tmp_path):
    on_jetson(monkeypatch, tmp_path)
    install(monkeypatch, "jtop", None)
    install(monkeypatch, "pynvml", FakeNvml(load("nvml_no_driver")))
    report = gpu_probe.probe()
    assert report.backend == "none"
    assert report.note == (
        "Jetson: jetson-stats is not installed: install jetson-stats (pip install jetson-stats); "
        "no NVIDIA driver (NVML: library not found); CPU profile"
    )


@pytest.mark.parametrize(
    ("socket", "error"),
    [
        (False, None),
        (True, "The jtop.service is not active. Please run:\nsudo systemctl restart jtop.service"),
    ],
)
def test_jetson_without_jtop_service_names_the_fix(monkeypatch, tmp_path, socket, error):
    on_jetson(monkeypatch, tmp_path, service=socket)
    install(monkeypatch, "jtop", jtop_module(error))
    install(monkeypatch, "pynvml", FakeNvml(load("nvml_no_driver")))
    report = gpu_probe.probe()
    assert report.backend == "none"
    assert report.note.startswith(
        "Jetson: the jtop service is not running: sudo systemctl enable --now jtop ("
    )
    assert report.note.endswith("; no NVIDIA driver (NVML: library not found); CPU profile")
    with pytest.raises(jetson.JtopUnavailable, match="sudo systemctl enable --now jtop"):
        jetson.read_telemetry(jtop_module(error))


def test_jetson_falls_back_to_nvml_without_jtop(monkeypatch, tmp_path):
    on_jetson(monkeypatch, tmp_path, service=False)
    install(monkeypatch, "jtop", jtop_module())
    install(monkeypatch, "pynvml", FakeNvml(load("nvml_h100")))
    report = gpu_probe.probe()
    assert report.backend == "nvml" and report.note.startswith("Jetson: the jtop service is not running")


# --- into the protocol --------------------------------------------------------------------------------


@pytest.mark.parametrize("recording", ["nvml_h100", "nvml_rtx3090", "jtop_agx_orin", "nvml_no_driver"])
def test_profile_and_telemetry_encode_and_decode(monkeypatch, tmp_path, recording):
    if recording.startswith("jtop"):
        on_jetson(monkeypatch, tmp_path)
        install(monkeypatch, "jtop", jtop_module())
    else:
        install(monkeypatch, "pynvml", FakeNvml(load(recording)))
    report = gpu_probe.probe()
    profile = build_profile("dev-1", {"cifar10": 500}, ["concurrent"], gpu=report)
    assert (profile.gpus, profile.driver_version, profile.cuda_version) == (
        report.gpus,
        report.driver_version,
        report.cuda_version,
    )
    assert profile.mps is None and profile.tasks["cifar10"].samples == 500
    assert decode(encode(profile), DeviceProfile) == profile
    telemetry = read_telemetry("dev-1", report)
    assert len(telemetry.gpus) == len(report.gpus)
    assert decode(encode(telemetry), Telemetry) == telemetry
    assert read_telemetry("dev-1").gpus == []


def test_importing_the_gpu_modules_loads_no_backend_library():
    code = (
        "import sys, agent.gpu.probe, agent.profile, agent.telemetry; "
        "print(sorted(m for m in ('pynvml', 'jtop', 'torch') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
