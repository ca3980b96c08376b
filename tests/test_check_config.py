"""`check-config` of both daemons on the shipped example configs and broken variants of them: the files a
config names must exist and load, the broker's answer (or silence) is one line, and a torch-less install is
told how to get initial weights."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from agent.cli import main as agent_main
from aggregator.cli import main as aggregator_main
from aggregator.config import TaskConfig
from aggregator.initial import initial_state
from common.config import ConfigError
from common.preflight import mqtt_problems, probe_broker
from protocol.schemas import ModelSpec
from protocol.transport import MqttSettings, TlsSettings
from tests.examples import EXAMPLE_DEVICE, EXAMPLES, PROVISION, install_example

pytestmark = pytest.mark.broker
MAINS = {"aggregator": aggregator_main, "agent": agent_main}


def check(name: str, config: Path, capsys) -> tuple[int, list[str], list[str]]:
    capsys.readouterr()  # what came before (init-weights' "wrote ...")
    code = MAINS[name](["check-config", "--config", str(config)])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


@pytest.mark.parametrize("name", MAINS)
def test_example_config_passes_and_the_tls_broker_accepts_its_certificate(tmp_path, tls_broker, capsys, name):
    code, out, err = check(name, install_example(name, tmp_path, tls_broker), capsys)
    assert code == 0 and err == [], err
    assert out[0].startswith("ok: ")
    assert out[1] == f"broker 127.0.0.1:{tls_broker.port} answers (TLSv1.3, certificate accepted)"


def test_example_agent_is_the_provisioned_device():
    assert f'device = "{EXAMPLE_DEVICE}"' in (EXAMPLES / "agent.toml").read_text()


@pytest.mark.parametrize("name", MAINS)
def test_a_broker_that_does_not_answer_is_a_warning_not_a_failure(tmp_path, tls_broker, capsys, name):
    config = install_example(name, tmp_path, tls_broker)
    tls_broker.stop()
    code, out, _ = check(name, config, capsys)
    assert code == 0
    assert out[1] == f"warning: broker 127.0.0.1:{tls_broker.port} does not answer: Connection refused"


@pytest.mark.parametrize("name", MAINS)
def test_every_missing_file_is_named_on_its_own_line(tmp_path, tls_broker, capsys, name):
    config = install_example(name, tmp_path, tls_broker, weights=False)
    shutil.rmtree(tmp_path / "etc" / "fedmt" / "certs")
    code, out, err = check(name, config, capsys)
    assert code == 2 and out[0].startswith("config: ")
    keys = [line.split(":")[1].strip() for line in err]
    expected = ["mqtt.tls.ca_file", "mqtt.tls.cert_file", "mqtt.tls.key_file"]
    if name == "aggregator":
        expected.append("tasks.digits-resnet18.init_weights")
    assert keys == expected, err
    assert all(line.startswith("error: ") and "does not exist" in line for line in err)


def test_agent_data_folders_and_predictor_are_checked(tmp_path, tls_broker, capsys):
    config = install_example("agent", tmp_path, tls_broker)
    missing = tmp_path / "no-such-folder"
    config.write_text(
        config.read_text().replace("[execution]\n", f'[execution]\npredictor = "{tmp_path}/absent.onnx"\n')
        + f'\n[tasks.pictures]\nkind = "imagefolder"\npath = "{missing}"\n'
    )
    code, _, err = check("agent", config, capsys)
    assert code == 2
    assert err == [
        f"error: execution.predictor: file {tmp_path}/absent.onnx does not exist",
        f"error: tasks.pictures: image folder '{missing}' does not exist or is not a directory",
    ]


def test_an_empty_password_file_and_a_key_of_another_certificate_are_problems(tmp_path, certs):
    empty = tmp_path / "password"
    empty.write_text("\n")
    tls = TlsSettings(
        ca_file=str(certs / "ca.crt"), cert_file=str(certs / "dev1.crt"), key_file=str(certs / "dev2.key")
    )
    problems = mqtt_problems(MqttSettings(password_file=str(empty), tls=tls))
    assert problems[0] == f"mqtt.password_file: {empty} is empty"
    assert problems[1].startswith("mqtt.tls: the CA, certificate and key do not load together")
    assert len(problems) == 2


def test_the_broker_refuses_a_certificate_of_another_ca(tmp_path, tls_broker):
    subprocess.run([PROVISION, "--out", tmp_path / "other", "dev1"], check=True, capture_output=True)
    other = tmp_path / "other"
    settings = MqttSettings(
        host=tls_broker.host,
        port=tls_broker.port,
        tls=TlsSettings(
            ca_file=str(tls_broker.certs / "ca.crt"),
            cert_file=str(other / "dev1.crt"),
            key_file=str(other / "dev1.key"),
        ),
    )
    answer = probe_broker(settings)
    assert not answer.answers and answer.detail == "TLS: tlsv1 alert unknown ca"


def test_a_plain_broker_answers_an_anonymous_connect_without_touching_a_session(broker):
    settings = MqttSettings(host=broker.host, port=broker.port)
    answer = probe_broker(settings)
    assert answer.answers and answer.detail == "MQTT; an anonymous connection is not authorised"


# --- initial weights without torch --------------------------------------------------------------------


@pytest.fixture
def without_torch(monkeypatch):
    """This process as an aggregator install: torch and torchvision cannot be found."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("torch", "torchvision") else find_spec(name, *a),
    )


def test_without_torch_a_model_without_weights_file_is_one_line_that_says_what_to_do(without_torch):
    task = TaskConfig(model=ModelSpec(name="resnet18", num_classes=10, input_size=32), init_seed=3)
    with pytest.raises(ConfigError) as error:
        initial_state("digits", task)
    message = str(error.value)
    assert "\n" not in message and message.startswith("task digits: building resnet18 needs torch")
    assert 'tasks.digits.init_weights = "FILE.safetensors"' in message
    assert (
        "fedmt-aggregator init-weights --model resnet18 --num-classes 10 --input-size 32 --seed 3" in message
    )


def test_without_torch_check_config_and_init_weights_say_so_in_one_line(
    tmp_path, tls_broker, capsys, without_torch
):
    config = install_example("aggregator", tmp_path, tls_broker, weights=False)
    config.write_text(config.read_text().replace("init_weights = ", "# init_weights = "))
    code, _, err = check("aggregator", config, capsys)
    assert code == 2 and len(err) == 1 and "building resnet18 needs torch" in err[0]
    assert aggregator_main(["init-weights", "--model", "resnet18", "--num-classes", "10", "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: init-weights builds the model with torch")
