"""Install boundaries: a server runs the aggregator without torch; a device plans without torch; the built
wheel, installed in a fresh venv, runs `fedmt-predictor` outside the source tree."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest


@pytest.mark.parametrize(
    "modules, absent",
    [
        ("aggregator.service, aggregator.cli", ("torch", "torchvision", "pynvml", "onnxruntime")),
        (
            "protocol.schemas, protocol.tensors, protocol.chunking, protocol.inbox, common.models",
            ("torch", "paho"),
        ),
        ("predictor.runtime, predictor.search, predictor.encoding", ("torch", "torchvision")),
        (
            "agent.config, agent.gpu.probe, agent.mps, agent.policies, agent.service",
            ("torch", "pynvml", "jtop"),
        ),
    ],
)
def test_imports_stay_within_their_install(modules, absent):
    code = f"import sys; import {modules}; print(','.join(m for m in {absent!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"{modules} imported {result.stdout.strip()}"


# --- the built wheel, installed in a fresh venv, outside the source tree -----------------------------------

REPO = Path(__file__).resolve().parents[1]
NOT_SOURCE = (
    ".venv",
    ".git",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "runs",
)
PLAN_ROW = re.compile(r"^\s*(\d+)\s+(\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*$")
STEP_TIMEOUT_S = 300
COMMANDS = ("fit", "export", "plan")  # fedmt-predictor subcommands a wheel install must offer
FAST_FIT = ("--epochs", "100", "--hidden", "16", "--members", "2")  # a few seconds on a CPU


@dataclass(frozen=True)
class Installed:
    wheel: Path
    python: Path  # the fresh venv's interpreter
    site_packages: Path  # the fresh venv's
    cwd: Path  # an empty folder outside the source tree

    def run(self, *command: str | Path) -> subprocess.CompletedProcess[str]:
        """A command from the fresh venv's bin/, in `cwd`, without PYTHONPATH; fails the test if it fails."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env |= {"PYTHONNOUSERSITE": "1", "OMP_NUM_THREADS": "1"}  # tiny models: threads only contend
        program = self.python.parent / str(command[0])
        result = subprocess.run(
            [program, *map(str, command[1:])],
            cwd=self.cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=STEP_TIMEOUT_S,
        )
        assert result.returncode == 0, (
            f"{command} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
        return result


def _run(*command: str | Path) -> str:
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=STEP_TIMEOUT_S)
    assert result.returncode == 0, f"{command} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def build_wheel(root: Path) -> Path:
    """The project's wheel, built from a copy of the source under `root` (an in-tree build would write build/
    into the checkout)."""
    source = root / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    wheels = root / "wheels"
    build = ("-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index")
    _run(sys.executable, *build, "-w", wheels, source)
    (wheel,) = wheels.glob("fedmt_edge-*.whl")
    return wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    """The wheel installed without dependencies into a fresh venv whose third-party packages come from this
    interpreter's site-packages through a plain .pth path line (it adds the folder but runs none of its .pth
    hooks, so the dev venv's editable install stays out)."""
    root = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(root)
    venv = root / "venv"
    _run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    _run(python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", wheel)
    site_packages = Path(
        _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    )
    ours = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
    (site_packages / "third_party_from_dev_venv.pth").write_text(
        "".join(f"{path}\n" for path in sorted(ours))
    )
    cwd = root / "elsewhere"
    cwd.mkdir()
    return Installed(wheel, python, site_packages, cwd)


@pytest.mark.slow
def test_wheel_ships_the_daemons_and_predictors_but_not_bench_or_tests(installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = wheel.namelist()
        entry_points = next(
            wheel.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt")
        )
    tops = {name.split("/")[0] for name in names}
    assert not {"bench", "tests"} & tops, sorted(tops)
    assert {"agent", "aggregator", "common", "predictor", "protocol"} <= tops
    assert {"predictor/models/nvidia-h200.onnx", "predictor/models/nvidia-h200.card.json"} <= set(names)
    assert "fedmt-predictor = predictor.cli:main" in entry_points


@pytest.mark.slow
def test_installed_code_comes_from_the_wheel_only(installed) -> None:
    probe = (
        "import importlib.util, agent, common, predictor, protocol, torch\n"
        "for module in (agent, common, predictor, protocol, torch): print(module.__file__)\n"
        "print(importlib.util.find_spec('bench'), importlib.util.find_spec('tests'))\n"
    )
    *first_party, third_party, absent = installed.run("python", "-c", probe).stdout.splitlines()
    for path in first_party:
        assert Path(path).is_relative_to(installed.site_packages), path
    assert not Path(third_party).is_relative_to(installed.site_packages)  # torch: from the dev venv
    assert absent == "None None"


@pytest.mark.slow
def test_installed_fedmt_predictor_plans_with_the_shipped_predictor(installed) -> None:
    assert all(command in installed.run("fedmt-predictor", "--help").stdout for command in COMMANDS)
    shipped = installed.site_packages / "predictor" / "models" / "nvidia-h200.onnx"
    volumes = {"resnet50": 1000, "vgg16": 2000, "mobilenet_v3_small": 3000}
    tasks = [arg for model, samples in volumes.items() for arg in ("--task", f"{model}:{samples}")]
    out = installed.run("fedmt-predictor", "plan", "--predictor", shipped, *tasks).stdout
    rows = plan_rows(out)
    assert [row[0] for row in rows] == [1, 2, 3]  # the start order, one row per task
    assert {row[1]: row[2] for row in rows} == volumes
    assert all(16 <= row[3] <= 128 and 10 <= row[4] <= 100 and row[5] > 0 for row in rows), rows
    rv = int(re.search(r"^R_v (\d+)%", out, re.MULTILINE).group(1))
    assert abs(rv - sum(row[4] for row in rows)) <= len(rows)  # the table rounds each R_i
    assert "(nvidia-h200.onnx)" in out


@pytest.mark.slow
def test_installed_fedmt_predictor_fits_and_exports(installed) -> None:
    import numpy as np

    from predictor.features import extract
    from predictor.runtime import OnnxPredictor
    from protocol.schemas import ModelSpec
    from tests.test_predictor_model import synthetic_records, write_records

    data = write_records(installed.cwd / "synthetic-gpu-1000.jsonl", synthetic_records(60))
    fitted = installed.run("fedmt-predictor", "fit", "--data", data, "--out", "models", *FAST_FIT).stdout
    weights = installed.cwd / "models" / "synthetic-gpu-1000.safetensors"
    assert f"wrote {weights.relative_to(installed.cwd)}" in fitted and weights.is_file()
    installed.run("fedmt-predictor", "export", "--weights", weights)
    onnx_file = weights.with_suffix(".onnx")
    assert onnx_file.is_file() and weights.with_suffix(".card.json").is_file()
    predictor = OnnxPredictor(onnx_file, gpu="Synthetic GPU 1000")  # what the wheel exported runs
    features = [
        extract(ModelSpec(name=m, num_classes=10, input_size=32)) for m in ("resnet18", "mobilenet_v3_small")
    ]
    throughput = predictor(features, np.array([[32.0, 64.0]]), np.array([[50.0, 50.0]]))
    assert throughput.shape == (1, 2) and np.all(np.isfinite(throughput)) and np.all(throughput > 0)


def plan_rows(out: str) -> list[tuple[int, str, int, int, int, int]]:
    """(position, model, samples, batch, R_i, predicted img/s) per row of `fedmt-predictor plan`'s table."""
    rows = [PLAN_ROW.match(line) for line in out.splitlines()]
    return [(int(m[1]), m[2], int(m[3]), int(m[4]), int(m[5]), int(m[6])) for m in rows if m]
