"""One agent per GPU on a host with several: `[execution] gpu` picks the GPU (by NVML index or UUID), the agent
profiles, plans for and checks the SMs of that GPU only, and its workers (and an MPS daemon it starts) see that
GPU alone through CUDA_VISIBLE_DEVICES."""

from __future__ import annotations

import msgspec
import pytest

from agent import cli as agent_cli
from agent import service as agent_service
from agent.config import AgentConfig, ExecutionConfig
from agent.data import DataSpec
from agent.gpu.probe import GpuReport, own_gpu, visible_gpu
from protocol.schemas import GpuInfo

#: a host with four GPUs, NVML order; the third is a different card with fewer SMs
HOST = GpuReport(
    gpus=[
        GpuInfo(
            index=i,
            name="NVIDIA H200" if i != 2 else "NVIDIA L40S",
            backend="nvml",
            memory_total_bytes=1 << 30,
            sm_count=132 if i != 2 else 142 - 60,
            extra={"uuid": f"GPU-{i}a{i}b{i}c00-0000-0000-0000-00000000000{i}"},
        )
        for i in range(4)
    ],
    backend="nvml",
    note="NVML: 4 GPUs",
)


@pytest.mark.parametrize(
    ("wanted", "index"),
    [("2", 2), ("0", 0), ("GPU-3a3b3c00-0000-0000-0000-000000000003", 3), ("GPU-1a1", 1), (None, 0)],
)
def test_an_index_a_uuid_or_its_prefix_names_one_gpu(wanted, index):
    [gpu] = own_gpu(HOST, wanted).gpus
    assert gpu.index == index


@pytest.mark.parametrize(("wanted", "named"), [("7", 0), ("GPU-9", 0), ("GPU-", 4)])
def test_a_gpu_the_host_does_not_have_or_an_ambiguous_prefix_is_a_clear_error(wanted, named):
    with pytest.raises(ValueError, match=f"names {named} of this host's GPUs: 0 .*3 "):
        own_gpu(HOST, wanted)


def test_cuda_sees_the_chosen_gpu_by_uuid_which_its_own_numbering_cannot_change():
    assert visible_gpu("2", HOST) == "GPU-2a2b2c00-0000-0000-0000-000000000002"
    assert visible_gpu(None, HOST) is None
    no_uuids = GpuReport(gpus=[msgspec.structs.replace(g, extra={}) for g in HOST.gpus], backend="nvml")
    assert visible_gpu("3", no_uuids) == "3"


def test_the_gpu_in_the_config_must_be_a_gpu_name():
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"gpu": "0; rm -rf /"}, ExecutionConfig)
    assert msgspec.convert({"gpu": "1"}, ExecutionConfig).gpu == "1"


@pytest.fixture
def host(monkeypatch):
    """The agent sees HOST; CUDA_VISIBLE_DEVICES is restored after the test."""
    monkeypatch.setattr(agent_service, "probe", lambda **_: HOST)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    return HOST


def agent_on(tmp_path, gpu: str | None) -> agent_service.Agent:
    config = AgentConfig(
        device="dev1",
        state_dir=str(tmp_path / "dev1"),
        execution=ExecutionConfig(device="cpu", gpu=gpu),
        tasks={"a": msgspec.convert({"kind": "synthetic", "samples": 40}, DataSpec)},
    )
    return agent_service.Agent(config)


def test_an_agent_trains_profiles_and_counts_sms_on_its_own_gpu(host, tmp_path, monkeypatch):
    import os

    agent = agent_on(tmp_path, "2")
    assert (
        os.environ["CUDA_VISIBLE_DEVICES"] == "GPU-2a2b2c00-0000-0000-0000-000000000002"
    )  # workers inherit it
    assert [g.index for g in agent.gpu.gpus] == [2]
    assert agent.sharing.total_sms == 82  # the SM check of an MPS share is against this GPU's count
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1a1b")  # set by the unit instead of the config
    assert [g.index for g in agent_on(tmp_path, None).gpu.gpus] == [1]


def test_an_entry_nvml_cannot_match_falls_back_to_the_first_gpu(host, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-4f1c0a2e-0000-0000-0000-000000000000")
    assert [g.index for g in agent_on(tmp_path, None).gpu.gpus] == [0]


def test_check_config_says_when_the_gpu_is_not_on_this_host(monkeypatch):
    monkeypatch.setattr("agent.gpu.probe.probe", lambda **_: HOST)
    assert agent_cli._gpu_problem("1") is None
    assert "names 0 of this host's GPUs" in agent_cli._gpu_problem("5")
    monkeypatch.setattr("agent.gpu.probe.probe", lambda **_: GpuReport(note="NVML: no GPUs; CPU profile"))
    assert agent_cli._gpu_problem("0") == "execution.gpu: GPU '0' asked for, but NVML: no GPUs; CPU profile"


def test_the_demo_and_its_benchmarks_give_each_agent_its_own_gpu_in_turn(tmp_path):
    from testbed.demo import Options

    options = Options(out=tmp_path, device="cuda", agents=3, gpus=("0", "GPU-1a1"))
    assert [options.execution(i).gpu for i in range(3)] == ["0", "GPU-1a1", "0"]
    assert Options(out=tmp_path).execution(1).gpu is None
