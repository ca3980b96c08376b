"""common.models: deterministic construction, numpy state round trips, strict loading, lazy torch import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.models import build_model, load_numpy_state, state_to_numpy
from protocol.schemas import ModelSpec
from protocol.tensors import decode_state, encode_state

SPEC = ModelSpec(name="resnet18", num_classes=10, input_size=32)


def assert_states_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for name, array in a.items():
        assert array.dtype == b[name].dtype and array.shape == b[name].shape, name
        assert np.array_equal(array, b[name]), name


def test_same_seed_gives_bit_identical_states() -> None:
    assert_states_equal(state_to_numpy(build_model(SPEC, seed=0)), state_to_numpy(build_model(SPEC, seed=0)))


def test_different_seeds_differ() -> None:
    a, b = state_to_numpy(build_model(SPEC, seed=0)), state_to_numpy(build_model(SPEC, seed=1))
    assert not np.array_equal(a["conv1.weight"], b["conv1.weight"])


def test_seeded_build_leaves_global_rng_alone() -> None:
    before = torch.random.get_rng_state()
    build_model(SPEC, seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_num_classes_sets_the_head() -> None:
    state = state_to_numpy(build_model(ModelSpec(name="resnet18", num_classes=7, input_size=32), seed=0))
    assert state["fc.weight"].shape == (7, 512)


def test_state_to_numpy_is_an_ordered_contiguous_copy() -> None:
    model = build_model(SPEC, seed=0)
    state = state_to_numpy(model)
    assert list(state) == list(model.state_dict())
    assert all(a.flags.c_contiguous for a in state.values())
    assert state["bn1.num_batches_tracked"].shape == () and state["bn1.num_batches_tracked"].dtype == np.int64
    before = state["conv1.weight"].copy()
    with torch.no_grad():
        model.conv1.weight.add_(1.0)
    assert np.array_equal(state["conv1.weight"], before)


def test_round_trip_through_the_wire_into_a_fresh_model() -> None:
    source = build_model(SPEC, seed=0).eval()
    wire = decode_state(encode_state(state_to_numpy(source)))  # read-only views
    target = build_model(SPEC, seed=1).eval()
    load_numpy_state(target, wire)
    assert_states_equal(state_to_numpy(target), state_to_numpy(source))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop("fc.bias"), "missing \\['fc.bias'\\]"),
        (lambda s: s.update(extra=np.zeros(1, np.float32)), "unexpected \\['extra'\\]"),
        (
            lambda s: s.update({"fc.bias": np.zeros(3, np.float32)}),
            "'fc.bias' is float32\\[3\\], expected float32\\[10\\]",
        ),
        (lambda s: s.update({"fc.bias": np.zeros(10, np.float64)}), "'fc.bias' is float64\\[10\\]"),
    ],
)
def test_load_rejects_mismatches_and_changes_nothing(change, message: str) -> None:
    model = build_model(SPEC, seed=0)
    before = state_to_numpy(model)
    state = state_to_numpy(build_model(SPEC, seed=1))
    change(state)
    with pytest.raises(ValueError, match=message):
        load_numpy_state(model, state)
    assert_states_equal(state_to_numpy(model), before)


def test_unknown_model_lists_available_names() -> None:
    with pytest.raises(ValueError, match="unknown model 'no_such_net'.*resnet18"):
        build_model(ModelSpec(name="no_such_net", num_classes=10, input_size=32))


def test_importing_the_module_does_not_import_torch() -> None:
    code = "import common.models, sys; assert 'torch' not in sys.modules and 'torchvision' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
