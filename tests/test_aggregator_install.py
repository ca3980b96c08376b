"""The README's aggregator example on the README's aggregator install: the project's wheel with the
`aggregator` extra in a fresh venv (dependencies resolved by pip from this machine's package indexes, no torch),
run outside the source tree against a real TLS broker."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed.monitor import Monitor
from tests.examples import EXAMPLES, install_example
from tests.federation import mqtt
from tests.test_packaging import STEP_TIMEOUT_S, build_wheel

pytestmark = [pytest.mark.slow, pytest.mark.broker]
README = Path(__file__).resolve().parent.parent / "README.md"
TASK = "digits-resnet18"  # the example's task


@dataclass(frozen=True)
class AggregatorInstall:
    bin: Path
    cwd: Path

    def command(self, *args: str | Path) -> list[str]:
        return [str(self.bin / "fedmt-aggregator"), *map(str, args)]

    def run(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(*args), cwd=self.cwd, env=clean_env(), capture_output=True, text=True, timeout=120
        )


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return env | {"PYTHONNOUSERSITE": "1"}


@pytest.fixture(scope="module")
def aggregator_install(tmp_path_factory) -> AggregatorInstall:
    root = tmp_path_factory.mktemp("aggregator-install")
    wheel = build_wheel(root)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=STEP_TIMEOUT_S)
    pip = subprocess.run(  # what the README says: pip install '.[aggregator]'
        [venv / "bin" / "pip", "install", "--quiet", f"{wheel}[aggregator]"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT_S,
    )
    assert pip.returncode == 0, f"pip install {wheel.name}[aggregator] failed:\n{pip.stdout}\n{pip.stderr}"
    cwd = root / "elsewhere"
    cwd.mkdir()
    return AggregatorInstall(venv / "bin", cwd)


def readme_toml_blocks() -> list[str]:
    return re.findall(r"```toml\n(.*?)```", README.read_text(), re.DOTALL)


def test_the_readme_shows_the_shipped_example_configs():
    blocks = readme_toml_blocks()
    for name in ("aggregator", "agent"):
        assert (EXAMPLES / f"{name}.toml").read_text() in blocks, f"README and examples/{name}.toml differ"


def test_the_aggregator_install_has_no_torch(aggregator_install):
    probe = "import importlib.util as u; print([m for m in ('torch', 'torchvision') if u.find_spec(m)])"
    found = subprocess.run(
        [aggregator_install.bin / "python", "-c", probe], env=clean_env(), capture_output=True, text=True
    )
    assert found.stdout.strip() == "[]", found


def test_readme_aggregator_example_runs_on_the_aggregator_install(aggregator_install, tmp_path, tls_broker):
    config = install_example("aggregator", tmp_path, tls_broker)  # its initial weights made where torch is

    checked = aggregator_install.run("check-config", "--config", config)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.splitlines()[1] == (
        f"broker 127.0.0.1:{tls_broker.port} answers (TLSv1.3, certificate accepted)"
    )

    monitor = Monitor(mqtt(tls_broker, "monitor"), tmp_path / "observer")
    daemon = subprocess.Popen(
        aggregator_install.command("run", "--config", config),
        cwd=aggregator_install.cwd,
        env=clean_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        alive = lambda: None if daemon.poll() is None else pytest.fail(daemon.stderr.read())  # noqa: E731
        monitor.wait_for(lambda: (TASK, 0) in monitor.globals, 120, "the initial global model", [alive])
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
    finally:
        daemon.kill()
        monitor.close()
    stderr = daemon.stderr.read()
    assert "Traceback" not in stderr and "does not answer" not in stderr, stderr
    assert sum(a.size for a in monitor.globals[(TASK, 0)].values()) > 11_000_000  # resnet18's weights


def test_without_torch_init_weights_and_a_model_without_a_weights_file_are_one_line(
    aggregator_install, tmp_path, tls_broker
):
    made = aggregator_install.run("init-weights", "--model", "resnet18", "--num-classes", "10", "--out", "w")
    assert made.returncode == 2 and made.stdout == ""
    assert made.stderr.count("\n") == 1 and made.stderr.startswith(
        "error: init-weights builds the model with torch"
    )

    config = install_example("aggregator", tmp_path, tls_broker, weights=False)
    config.write_text(config.read_text().replace("init_weights = ", "init_seed = 0  # "))
    for command in ("check-config", "run"):
        result = aggregator_install.run(command, "--config", config)
        assert result.returncode == 2, result
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and f"task {TASK}: building resnet18 needs torch" in lines[0], result.stderr
        assert "fedmt-aggregator init-weights --model resnet18" in lines[0]
