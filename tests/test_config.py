"""Config files: validated as a whole, with errors that name the bad key; both CLIs report them cleanly."""

from __future__ import annotations

import pytest

from agent.cli import main as agent_main
from agent.config import AgentConfig
from aggregator.cli import main as aggregator_main
from aggregator.config import AggregatorConfig
from common.config import ConfigError, load_toml, to_toml

AGENT = 'device = "edge-1"\n[tasks.digits]\nkind = "digits"\nnum_partitions = 2\npartition_index = 1\n'
AGGREGATOR = '[tasks.digits]\nmodel = { name = "resnet18", num_classes = 10, input_size = 32 }\n'


def load(tmp_path, text: str, kind):
    path = tmp_path / "config.toml"
    path.write_text(text)
    return load_toml(path, kind)


def test_valid_files_load_with_defaults(tmp_path):
    agent = load(tmp_path, AGENT, AgentConfig)
    assert agent.mqtt.username == "edge-1"  # the device id is the MQTT username
    assert agent.execution.policy == "concurrent" and agent.mps.pipe_dir == "/run/nvidia-mps"
    aggregator = load(tmp_path, AGGREGATOR, AggregatorConfig)
    assert aggregator.tasks["digits"].batch_size == 32 and aggregator.mqtt.username == "aggregator"


def test_spare_workers_default_to_one_per_task_on_a_gpu_and_none_on_the_cpu(tmp_path):
    execution = load(tmp_path, AGENT, AgentConfig).execution
    assert (execution.spares(3, "cuda"), execution.spares(3, "cpu")) == (3, 0)
    execution = load(tmp_path, AGENT + "[execution]\nspare_workers = 1\n", AgentConfig).execution
    assert (execution.spares(3, "cuda"), execution.spares(3, "cpu")) == (1, 1)


@pytest.mark.parametrize(
    "text, kind, message",
    [
        ("colour = 1\n" + AGENT, AgentConfig, "unknown key 'colour'"),
        (AGENT + "[mqtt]\nprot = 1883\n", AgentConfig, "unknown key 'mqtt.prot'"),
        (AGENT + "[mqtt]\nport = 70000\n", AgentConfig, "key 'mqtt.port': Expected `int` <= 65535"),
        (AGENT + "[execution]\npolicy = 'fastest'\n", AgentConfig, "key 'execution.policy'"),
        (
            AGENT + "[tasks.other]\nkind = 'nope'\n",
            AgentConfig,
            "key 'tasks[...].kind': Invalid value 'nope'",
        ),
        ('[mqtt]\nhost = "b"\n', AgentConfig, "missing key 'device'"),
        (
            AGENT + '[mqtt]\nusername = "edge-2"\n',
            AgentConfig,
            "key 'mqtt.username' is 'edge-2' but device is 'edge-1'",
        ),
        ("state_dir = '/x'\n", AggregatorConfig, "missing key 'tasks'"),
        (AGGREGATOR + "batch_size = 0\n", AggregatorConfig, "batch_size': Expected `int` >= 1"),
        (
            AGGREGATOR + "max_batch_size = 8\n",
            AggregatorConfig,
            "min_batch_size <= batch_size <= max_batch_size",
        ),
        ("[tasks\n", AggregatorConfig, "not valid TOML"),
        (AGENT + "[execution]\nspare_workers = -1\n", AgentConfig, "execution.spare_workers"),
        (AGGREGATOR + 'strategy = { name = "krum" }\n', AggregatorConfig, "'tasks[...].strategy.name'"),
        (AGGREGATOR + "limits = { max_norm = -1 }\n", AggregatorConfig, "'tasks[...].limits.max_norm'"),
        (
            AGGREGATOR + "[registered_samples.dev1]\nother = 5\n",
            AggregatorConfig,
            "registered_samples.dev1: unknown task 'other'",
        ),
        (
            AGGREGATOR + "limits = { max_samples = 10 }\n[registered_samples.dev1]\ndigits = 50\n",
            AggregatorConfig,
            "registered_samples.dev1.digits: 50 is above the task's max_samples 10",
        ),
    ],
)
def test_bad_files_name_the_problem(tmp_path, text, kind, message):
    with pytest.raises(ConfigError) as error:
        load(tmp_path, text, kind)
    assert message in str(error.value)
    assert str(tmp_path / "config.toml") in str(error.value)


def test_a_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_toml(tmp_path / "absent.toml", AgentConfig)


def test_to_toml_round_trips(tmp_path):
    config = load(tmp_path, AGENT, AgentConfig)
    assert load(tmp_path, to_toml(config), AgentConfig) == config


@pytest.mark.parametrize("main", [agent_main, aggregator_main])
def test_the_clis_print_one_clear_line_and_exit_2(tmp_path, capsys, main):
    path = tmp_path / "bad.toml"
    path.write_text("unknown = 1\n")
    assert main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("config error:") and "unknown key 'unknown'" in err and "\n" not in err
