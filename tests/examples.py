"""The shipped example configs (examples/*.toml) installed under a folder for a test broker: their /etc and
/var paths moved below it, the broker's address instead of broker.lan, and the files they name made: TLS files
from the broker's CA (scripts/provision-certs.sh), initial weights by `fedmt-aggregator init-weights`."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from aggregator.cli import main as aggregator_main
from testbed.broker import Mosquitto, free_port

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
PROVISION = REPO / "scripts" / "provision-certs.sh"
EXAMPLE_DEVICE = "jetson-07"  # examples/agent.toml: its certificate is provisioned with the test users'


def localise(text: str, root: Path, broker: Mosquitto) -> str:
    for old, new in (
        ("/etc/fedmt/", f"{root}/etc/fedmt/"),
        ("/var/lib/", f"{root}/var/lib/"),
        ('host = "broker.lan"', f'host = "{broker.host}"'),
        ("port = 8883", f"port = {broker.port}"),
    ):
        assert old in text, f"the example no longer holds {old!r}: update tests/examples.py"
        text = text.replace(old, new)
    metrics = re.compile(r"^(\[metrics\][^\[]*?^port = )\d+", re.MULTILINE | re.DOTALL)
    return metrics.sub(lambda m: f"{m[1]}{free_port()}", text)  # a free port for a Prometheus endpoint


def install_example(name: str, root: Path, broker: Mosquitto, *, weights: bool = True) -> Path:
    """examples/{name}.toml localised under `root`, with its certificates (and, with `weights`, its initial
    weights files) in place; the config file's path."""
    assert broker.certs is not None, "the examples use TLS"
    text = localise((EXAMPLES / f"{name}.toml").read_text(), root, broker)
    config = tomllib.loads(text)
    for path in config["mqtt"]["tls"].values():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(broker.certs / Path(path).name, path)
    for task in config.get("tasks", {}).values():
        if weights and "init_weights" in task:
            Path(task["init_weights"]).parent.mkdir(parents=True, exist_ok=True)
            model = task["model"]
            command = ["init-weights", "--model", model["name"], "--num-classes", str(model["num_classes"])]
            command += ["--input-size", str(model["input_size"]), "--seed", str(task.get("init_seed", 0))]
            assert aggregator_main([*command, "--out", task["init_weights"]]) == 0
    path = root / "etc" / "fedmt" / f"{name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
