"""Install boundaries: a server runs the aggregator without torch; a device plans without torch."""

from __future__ import annotations

import subprocess
import sys

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
