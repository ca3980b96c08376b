"""predictor.model, predictor.runtime, predictor.training and predictor.dataset: the throughput predictor.

Order invariance of the DeepSets network, ONNX parity on a dynamic batch axis, the run-time checks of
OnnxPredictor, the shipped predictors (H100, H200) and their model cards, the fit/export pipeline on a synthetic data file,
and the held-out splits behind the card's errors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import struct
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch

from predictor.dataset import Samples, build, mape, mape_interval, split
from predictor.encoding import MAX_TASKS, N_INPUTS, encode_inputs
from predictor.features import FEATURE_NAMES, TaskFeatures, extract
from predictor.model import NETWORKS, Ensemble, ensemble, export_onnx, predict, train
from predictor.records import (
    ALONE_LEVELS,
    BATCHES,
    CO_LOCATIONS_PER_ALONE,
    DataFile,
    Record,
    TaskSample,
    load_records,
    measured_configs,
    sample_configs,
)
from predictor.runtime import PREDICTOR_DIR, OnnxPredictor, PredictorUnavailable, card_path, find_predictor
from predictor.training import card_markdown, export, fit
from protocol.schemas import ModelSpec

H100 = "NVIDIA H100 80GB HBM3"
DATA_DIR = Path(__file__).resolve().parents[1] / "predictor" / "data"
SHIPPED = {H100: "nvidia-h100-80gb-hbm3", "NVIDIA H200": "nvidia-h200"}  # GPU name: file stem
SYNTHETIC_GPU = "Synthetic GPU 1000"
RESOLUTION = 32  # of the synthetic records


# ---------------------------------------------------------------------------------------------- helpers


def random_ensemble(seed: int = 0, hidden: int = 8, members: int = 2, network: str = "deepsets") -> Ensemble:
    torch.manual_seed(seed)
    return ensemble(hidden, members, network).eval()


def random_inputs(rows: int, real: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random features in every slot (masked ones too) and a mask of `real` leading tasks."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, MAX_TASKS, N_INPUTS, generator=gen)
    mask = torch.zeros(rows, MAX_TASKS)
    mask[:, :real] = 1.0
    return x, mask


def window(tasks: list[TaskSample], *, gpu: str = SYNTHETIC_GPU, ts: float = 1_700_000_000.0) -> Record:
    """One profiling record of a made-up 100-SM GPU at RESOLUTION."""
    return Record(
        gpu=gpu,
        sm_total=100,
        driver="1.0",
        torch=str(torch.__version__),
        resolution=RESOLUTION,
        tasks=tasks,
        window_s=1.0,
        ts=ts,
    )


def fake_task(i: int) -> TaskFeatures:
    """Features without building a model (encode_inputs only needs the numbers)."""
    return TaskFeatures(
        model=f"fake{i}",
        input_size=32,
        num_classes=10,
        flops_per_sample=1e8 * (i + 1),
        param_bytes=4_000_000 * (i + 1),
        activation_bytes_per_sample=100_000 * (i + 1),
    )


def dummy_samples(combos: list[tuple[str, ...]], configurations: list[int] | None = None) -> Samples:
    """Samples with only what `split` looks at: the combinations, and each record's configuration (by default
    every record its own)."""
    n = len(combos)
    x, mask = np.zeros((n, MAX_TASKS, N_INPUTS), np.float32), np.zeros((n, MAX_TASKS), np.float32)
    mask[:, 0] = 1.0
    x[:, 0, 0] = configurations if configurations is not None else range(n)
    return Samples(x, mask, np.zeros((n, MAX_TASKS), np.float32), list(combos))


def tiny_card(gpu: str = "Test GPU") -> str:
    return json.dumps({"gpu": gpu, "data": {"batch_range": [16, 128]}}) + "\n"


# ---------------------------------------------------------------------------- 1. order invariance, masks


@torch.no_grad()
@pytest.mark.parametrize("network", sorted(NETWORKS))
@pytest.mark.parametrize("perm", [(2, 0, 1, 3, 4), (1, 2, 0, 4, 3), (3, 0, 4, 2, 1), (4, 3, 2, 1, 0)])
def test_permuting_task_slots_permutes_outputs(perm, network) -> None:
    model = random_ensemble(network=network)
    x, mask = random_inputs(16)
    perm = list(perm)
    out = model(x, mask)
    out_perm = model(x[:, perm], mask[:, perm])
    torch.testing.assert_close(out_perm, out[:, perm], rtol=1e-5, atol=0)
    for member in model.members:  # each network on its own is equivariant too, in log space
        torch.testing.assert_close(
            member.log_throughput(x[:, perm], mask[:, perm]),
            member.log_throughput(x, mask)[:, perm],
            rtol=1e-5,
            atol=1e-6,
        )


@torch.no_grad()
def test_the_factored_network_predicts_a_task_alone_from_its_own_inputs_and_co_runners_only_slow_it() -> None:
    model = random_ensemble(seed=2, network="factored")
    x, mask = random_inputs(32, real=1)
    alone = model(x, mask)[:, 0]
    others = x.clone()
    others[:, 1:] = torch.randn(32, MAX_TASKS - 1, N_INPUTS)
    torch.testing.assert_close(model(others, mask)[:, 0], alone)  # masked slots are nobody
    for real in range(2, MAX_TASKS + 1):
        crowded = mask.clone()
        crowded[:, :real] = 1.0
        assert torch.all(model(x, crowded)[:, 0] <= alone)


@torch.no_grad()
def test_other_tasks_matter_but_not_their_order() -> None:
    """The context term is real: swapping two *other* tasks leaves a task's output alone, changing one does not."""
    model = random_ensemble(seed=1)
    x, mask = random_inputs(8)
    swapped = x.clone()
    swapped[:, [1, 2]] = x[:, [2, 1]]
    torch.testing.assert_close(model(swapped, mask)[:, 0], model(x, mask)[:, 0], rtol=1e-5, atol=0)
    changed = x.clone()
    changed[:, 1] += 1.0
    assert not torch.allclose(model(changed, mask)[:, 0], model(x, mask)[:, 0])


@torch.no_grad()
def test_masked_slots_are_zero_and_ignored() -> None:
    model = random_ensemble()
    x, mask = random_inputs(32)
    out = model(x, mask)
    assert torch.all(out[:, 3:] == 0.0)
    assert torch.all(out[:, :3] > 0.0) and torch.isfinite(out).all()
    assert torch.all(model.log_throughput(x, mask)[:, 3:] == 0.0)
    noisy = x.clone()
    noisy[:, 3:] = (
        torch.randn(32, MAX_TASKS - 3, N_INPUTS, generator=torch.Generator().manual_seed(7)) * 5 + 3
    )
    out_noisy = model(noisy, mask)
    assert torch.equal(out_noisy[:, :3], out[:, :3])
    assert torch.all(out_noisy[:, 3:] == 0.0)


@torch.no_grad()
def test_masked_slot_position_does_not_matter() -> None:
    """Three real tasks in slots (0, 1, 2) or scattered over (4, 0, 2) give the same throughputs."""
    model = random_ensemble()
    x, mask = random_inputs(8)
    scattered = torch.zeros_like(x)
    scattered_mask = torch.zeros_like(mask)
    for src, dst in zip((0, 1, 2), (4, 0, 2)):
        scattered[:, dst] = x[:, src]
        scattered_mask[:, dst] = 1.0
    out, out_scattered = model(x, mask), model(scattered, scattered_mask)
    torch.testing.assert_close(out_scattered[:, [4, 0, 2]], out[:, :3], rtol=1e-5, atol=0)
    assert torch.all(out_scattered[:, [1, 3]] == 0.0)


@pytest.mark.parametrize("n", range(1, MAX_TASKS + 1))
def test_every_task_count_from_one_to_max_works(n: int) -> None:
    rng = np.random.default_rng(n)
    batches = rng.choice([16, 32, 64, 128], size=(6, n))
    resources = rng.choice([20, 40, 60, 80, 100], size=(6, n)).astype(float)
    x, mask = encode_inputs([fake_task(i) for i in range(n)], batches, resources)
    assert x.shape == (6, MAX_TASKS, N_INPUTS) and x.dtype == np.float32
    assert mask.shape == (6, MAX_TASKS) and mask.dtype == np.float32
    np.testing.assert_array_equal(mask, np.repeat([[1.0] * n + [0.0] * (MAX_TASKS - n)], 6, axis=0))
    assert np.all(x[:, n:] == 0.0)
    np.testing.assert_allclose(x[:, :n, -2], np.log2(batches))
    np.testing.assert_allclose(x[:, :n, -1], resources / 100.0, rtol=1e-6)
    np.testing.assert_allclose(x[0, 0, : len(FEATURE_NAMES)], [8.0, math.log10(4e6), 5.0], rtol=1e-6)
    out = predict(random_ensemble(), x, mask)
    assert out.shape == (6, MAX_TASKS)
    assert np.all(out[:, :n] > 0) and np.all(np.isfinite(out)) and np.all(out[:, n:] == 0.0)


def test_one_dimensional_batches_are_one_configuration() -> None:
    x, mask = encode_inputs([fake_task(0), fake_task(1)], np.array([32, 64]), np.array([50, 100]))
    assert x.shape == (1, MAX_TASKS, N_INPUTS) and mask.tolist() == [[1, 1, 0, 0, 0]]


@pytest.mark.parametrize("n", [0, MAX_TASKS + 1])
def test_task_count_out_of_range_is_rejected(n: int) -> None:
    with pytest.raises(ValueError, match=f"1..{MAX_TASKS} tasks, got {n}"):
        encode_inputs(
            [fake_task(i) for i in range(n)], np.full((2, max(n, 1)), 32), np.full((2, max(n, 1)), 50.0)
        )


@pytest.mark.parametrize(
    ("batches_shape", "resources_shape"),
    [((4, 3), (4, 2)), ((4, 3), (5, 3)), ((4, 2), (4, 2)), ((4, 4), (4, 4)), ((3,), (2,))],
)
def test_mismatched_shapes_are_rejected(batches_shape, resources_shape) -> None:
    tasks = [fake_task(i) for i in range(3)]
    with pytest.raises(ValueError, match="must both be"):
        encode_inputs(tasks, np.full(batches_shape, 32), np.full(resources_shape, 50.0))


# --------------------------------------------------------------------------------------- 2. ONNX parity


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Ensemble, Path]:
    model = random_ensemble(seed=3)
    # non-trivial standardisation, so the buffers must travel into the graph as well
    for i, member in enumerate(model.members):
        member.mean.copy_(torch.linspace(-1, 1, N_INPUTS) * (i + 1))
        member.std.copy_(torch.linspace(0.5, 2, N_INPUTS))
    path = tmp_path_factory.mktemp("onnx") / "random.onnx"
    export_onnx(model, str(path))
    return model, path


@pytest.mark.parametrize("rows", [1, 7, 1000])
def test_onnx_matches_torch_on_a_dynamic_batch(exported, rows: int) -> None:
    import onnxruntime

    model, path = exported
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(rows)
    x = rng.normal(size=(rows, MAX_TASKS, N_INPUTS)).astype(np.float32)
    mask = (rng.random((rows, MAX_TASKS)) < 0.6).astype(np.float32)
    mask[0] = [1, 1, 1, 0, 0]
    (out,) = session.run(["throughput"], {"features": x, "mask": mask})
    reference = predict(model, x, mask)
    assert out.shape == (rows, MAX_TASKS)
    assert np.all(out[mask == 0] == 0.0) and np.all(reference[mask == 0] == 0.0)
    assert np.all(out[mask == 1] > 0)
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=0)


def test_a_factored_ensemble_exports_to_onnx_that_matches_torch(tmp_path) -> None:
    import onnxruntime

    model = random_ensemble(seed=4, network="factored")
    export_onnx(model, str(tmp_path / "factored.onnx"))
    session = onnxruntime.InferenceSession(
        str(tmp_path / "factored.onnx"), providers=["CPUExecutionProvider"]
    )
    x, mask = random_inputs(50, real=4)
    (out,) = session.run(["throughput"], {"features": x.numpy(), "mask": mask.numpy()})
    np.testing.assert_allclose(out, predict(model, x.numpy(), mask.numpy()), rtol=1e-5, atol=0)


def test_the_cli_names_the_networks_the_model_has() -> None:
    from predictor.cli import NETWORKS as NAMED

    assert set(NAMED) == set(NETWORKS)


def test_onnx_inputs_declare_the_dynamic_axis(exported) -> None:
    import onnxruntime

    _, path = exported
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    shapes = {i.name: i.shape for i in session.get_inputs()}
    assert shapes == {"features": ["n", MAX_TASKS, N_INPUTS], "mask": ["n", MAX_TASKS]}
    assert [o.name for o in session.get_outputs()] == ["throughput"]
    assert session.get_outputs()[0].shape == ["n", MAX_TASKS]


# --------------------------------------------------------------------------------- 3. OnnxPredictor errors


def test_missing_onnx_file(tmp_path) -> None:
    path = tmp_path / "absent.onnx"
    with pytest.raises(PredictorUnavailable, match="does not exist") as info:
        OnnxPredictor(path)
    assert str(path) in str(info.value)


def test_missing_card(tmp_path, exported) -> None:
    _, source = exported
    path = tmp_path / "no-card.onnx"
    path.write_bytes(source.read_bytes())
    assert card_path(path) == tmp_path / "no-card.card.json"
    with pytest.raises(PredictorUnavailable, match="model card") as info:
        OnnxPredictor(path)
    assert str(card_path(path)) in str(info.value)


def test_unreadable_card(tmp_path, exported) -> None:
    _, source = exported
    path = tmp_path / "bad-card.onnx"
    path.write_bytes(source.read_bytes())
    card_path(path).write_text("{not json")
    with pytest.raises(PredictorUnavailable, match="missing or unreadable"):
        OnnxPredictor(path)


def test_card_without_the_profiled_batch_range(tmp_path, exported) -> None:
    _, source = exported
    path = tmp_path / "old-card.onnx"
    path.write_bytes(source.read_bytes())
    card_path(path).write_text(json.dumps({"gpu": "Test GPU", "data": {}}))
    with pytest.raises(PredictorUnavailable, match="batch range") as info:
        OnnxPredictor(path)
    assert "fedmt-predictor fit" in str(info.value)


def test_card_for_another_gpu(tmp_path, exported) -> None:
    _, source = exported
    path = tmp_path / "a100.onnx"
    path.write_bytes(source.read_bytes())
    card_path(path).write_text(tiny_card("NVIDIA A100-SXM4-80GB"))
    with pytest.raises(PredictorUnavailable) as info:
        OnnxPredictor(path, gpu=H100)
    assert "NVIDIA A100-SXM4-80GB" in str(info.value) and H100 in str(info.value)
    # without gpu= the check is skipped, and with the right one it passes
    assert OnnxPredictor(path).card["gpu"] == "NVIDIA A100-SXM4-80GB"
    OnnxPredictor(path, gpu="NVIDIA A100-SXM4-80GB")


def test_corrupt_onnx_bytes(tmp_path) -> None:
    path = tmp_path / "garbage.onnx"
    path.write_bytes(b"\x00\x01 this is not an ONNX protobuf \xff\xfe" * 10)
    card_path(path).write_text(tiny_card())
    with pytest.raises(PredictorUnavailable, match="cannot load") as info:
        OnnxPredictor(path)
    assert str(path) in str(info.value)


class ThreeSlots(torch.nn.Module):
    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return features.sum(-1).exp() * mask


def test_other_input_layout(tmp_path) -> None:
    path = tmp_path / "three-slots.onnx"
    torch.onnx.export(
        ThreeSlots(),
        (torch.zeros(2, 3, N_INPUTS), torch.ones(2, 3)),
        str(path),
        dynamo=False,
        input_names=["features", "mask"],
        output_names=["throughput"],
        dynamic_axes={"features": {0: "n"}, "mask": {0: "n"}, "throughput": {0: "n"}},
    )
    card_path(path).write_text(tiny_card())
    with pytest.raises(PredictorUnavailable) as info:
        OnnxPredictor(path)
    message = str(info.value)
    assert f"{MAX_TASKS}-task layout" in message and path.name in message
    assert "[3, 5]" in message  # the layout the file has


def test_find_predictor_for_an_unknown_gpu() -> None:
    with pytest.raises(PredictorUnavailable, match="does not exist"):
        find_predictor(PREDICTOR_DIR, "NVIDIA Imaginary GPU 9000")


@pytest.mark.parametrize("gpu", SHIPPED)
def test_find_predictor_for_a_shipped_gpu(gpu) -> None:
    predictor = find_predictor(PREDICTOR_DIR, gpu)
    assert predictor.path == PREDICTOR_DIR / f"{SHIPPED[gpu]}.onnx" and predictor.card["gpu"] == gpu


# ---------------------------------------------------------------------------- 4. the shipped predictors


@pytest.fixture(scope="module", params=list(SHIPPED))
def shipped(request) -> OnnxPredictor:
    return OnnxPredictor(PREDICTOR_DIR / f"{SHIPPED[request.param]}.onnx", gpu=request.param)


def shipped_data(predictor: OnnxPredictor) -> Path:
    return DATA_DIR / predictor.card["data"]["file"]


def test_shipped_card_states_its_errors_and_data(shipped) -> None:
    card, data = shipped.card, shipped_data(shipped)
    assert data.name == f"{SHIPPED[card['gpu']]}.jsonl"
    for name in ("train", "seen", "unseen"):
        value = card["mape_percent"][name]
        assert isinstance(value, (int, float)) and math.isfinite(value) and 0 < value < 100
    assert card["data"]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    records = load_records(data)
    assert card["data"]["records"] == len(records)
    batches = [t.batch for r in records for t in r.tasks]
    assert shipped.batch_range == (min(batches), max(batches))
    shares = [t.resource for r in records for t in r.tasks]
    assert shipped.share_range == (min(shares), max(shares))
    assert shipped.cuda_graphs is DataFile.read(data).cuda_graphs is False  # profiled with eager steps
    assert {r.gpu for r in records} == {card["gpu"]} and {r.resolution for r in records} == {
        card["resolution"]
    }
    split_sizes = card["split"]
    assert split_sizes["train_records"] + split_sizes["seen_test_records"] + split_sizes[
        "unseen_test_records"
    ] == len(records)
    assert card["onnx"]["max_relative_difference_vs_torch"] < 1e-5
    assert card["onnx"]["inputs"] == {"features": ["n", MAX_TASKS, N_INPUTS], "mask": ["n", MAX_TASKS]}


def test_shipped_card_markdown_matches_the_json(shipped) -> None:
    card = json.loads(card_path(shipped.path).read_text())
    text = shipped.path.with_suffix(".card.md").read_text()
    assert card["gpu"] in text and card["data"]["sha256"][:16] in text
    assert f"{card['mape_percent']['seen']}%" in text and f"{card['mape_percent']['unseen']}%" in text


def test_a_card_without_unseen_combinations_says_so(shipped) -> None:
    card = json.loads(card_path(shipped.path).read_text())
    card["mape_percent"]["unseen"], card["split"]["unseen_combinations"] = None, []
    text = card_markdown(card)
    assert "None" not in text and "Unseen combinations: none." in text
    assert "| model combinations left out of training (" in text and "records) | - |" in text


def test_shipped_predictor_is_order_invariant_end_to_end(shipped) -> None:
    resolution = shipped.card["resolution"]
    names = ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x1_0"]
    tasks = [extract(ModelSpec(name=m, num_classes=10, input_size=resolution)) for m in names]
    rng = np.random.default_rng(0)
    batches = rng.choice([16, 32, 64, 128], size=(40, 3))
    resources = rng.choice([20, 40, 60, 80, 100], size=(40, 3)).astype(float)
    out = shipped(tasks, batches, resources)
    assert out.shape == (40, 3) and out.dtype == np.float64
    assert np.all(np.isfinite(out)) and np.all(out > 0)
    for perm in ([2, 0, 1], [1, 0, 2], [2, 1, 0]):
        permuted = shipped([tasks[i] for i in perm], batches[:, perm], resources[:, perm])
        np.testing.assert_allclose(permuted, out[:, perm], rtol=1e-5)
    # one configuration at a time gives the same answers as the whole batch
    np.testing.assert_allclose(shipped(tasks, batches[5], resources[5]), out[5:6], rtol=1e-6)


def test_plan_command_plans_inside_the_profiled_batch_range_and_refuses_beyond_it(shipped, capsys) -> None:
    from predictor.cli import main

    low, high = shipped.batch_range
    tasks = ["--task", "resnet18:1000", "--task", "mobilenet_v3_small:3000"]
    assert main(["plan", "--predictor", str(shipped.path), *tasks, "--batches", f"{low},{high}"]) == 0
    table = capsys.readouterr().out
    assert "resnet18" in table and "mobilenet_v3_small" in table and "R_v" in table
    assert main(["plan", "--predictor", str(shipped.path), *tasks, "--batches", f"{low},{2 * high}"]) == 2
    error = capsys.readouterr().err
    assert f"profiled at batch sizes {low}..{high}" in error and "extrapolates" in error


@pytest.mark.slow
def test_shipped_predictor_reproduces_its_card_errors(shipped) -> None:
    """The ONNX file, run on the committed data with the card's split, gives the MAPE values the card states."""
    records = load_records(shipped_data(shipped))
    samples = build(records)
    parts = split(samples, seed=0)
    assert [list(c) for c in parts.unseen_combos] == shipped.card["split"]["unseen_combinations"]
    for name, index in (("train", parts.train), ("seen", parts.seen), ("unseen", parts.unseen)):
        s = samples.take(index)
        (out,) = shipped.session.run(["throughput"], {"features": s.x, "mask": s.mask})
        assert mape(out, s.throughput, s.mask) == pytest.approx(shipped.card["mape_percent"][name], abs=0.02)


# ---------------------------------------------------------------------------------- profiler sampling


def test_profiler_measures_the_full_gpu_baselines_first_then_each_lower_share_alone_before_co_locations() -> (
    None
):
    models = ("resnet18", "vgg16", "densenet121")
    configs = sample_configs(3, 60, models=models, focus=(("resnet18", "vgg16"),))
    full = len(models) * len(BATCHES)
    assert {c.tasks[0] for c in configs[:full]} == {(m, b, ALONE_LEVELS[0]) for m in models for b in BATCHES}
    lower = full * (len(ALONE_LEVELS) - 1)  # alone at the lower levels
    together = 60 - full - lower
    groups = together // CO_LOCATIONS_PER_ALONE  # one alone, then CO_LOCATIONS_PER_ALONE co-locations
    alone_first = [len(c.tasks) == 1 for c in configs[full:]]
    assert alone_first[: groups * (1 + CO_LOCATIONS_PER_ALONE)] == groups * (
        [True] + [False] * CO_LOCATIONS_PER_ALONE
    )
    assert all(alone_first[groups * (1 + CO_LOCATIONS_PER_ALONE) :])  # the lower shares left over come last
    assert {c.tasks[0] for c in configs if len(c.tasks) == 1} == {
        (m, b, r) for m in models for r in ALONE_LEVELS for b in BATCHES
    }
    assert len(configs) == 60 and sum(len(c.tasks) >= 2 for c in configs) == together
    assert sample_configs(3, 60, models=models, focus=(("resnet18", "vgg16"),)) == configs  # seeded


def test_profiler_skips_baselines_its_data_file_holds(tmp_path) -> None:
    assert measured_configs(tmp_path / "none.jsonl") == frozenset()
    held = [window([TaskSample("resnet18", b, 100.0, 1.0)]) for b in BATCHES]
    held.append(window([TaskSample("resnet18", 16, 20.0, 1.0), TaskSample("vgg16", 32, 40.0, 1.0)]))
    measured = measured_configs(write_records(tmp_path / "g.jsonl", held))
    configs = sample_configs(0, 40, models=("resnet18", "vgg16"), measured=measured)
    alone = {c.tasks[0] for c in configs if len(c.tasks) == 1}
    assert not alone & {("resnet18", b, 100) for b in BATCHES}  # already measured: not again
    assert ("resnet18", 16, 60) in alone and ("vgg16", 16, 100) in alone  # the others still are
    assert len(configs) == 40


# ------------------------------------------------------------------------- 5. fit/export on synthetic data

CHEAP = ("resnet18", "mobilenet_v3_small", "shufflenet_v2_x1_0", "squeezenet1_0", "mnasnet0_5")
CHEAP_FOCUS = (("resnet18", "mobilenet_v3_small"), ("squeezenet1_0", "mnasnet0_5", "shufflenet_v2_x1_0"))


def law(flops: float, batch: int, resource: float, n_tasks: int) -> float:
    return 1e11 / flops * batch / (batch + 16) * (resource / 100) ** 0.6 / (1 + 0.3 * (n_tasks - 1))


def synthetic_records(windows: int = 120, gpu: str = SYNTHETIC_GPU) -> list[Record]:
    flops = {
        m: extract(ModelSpec(name=m, num_classes=10, input_size=RESOLUTION)).flops_per_sample for m in CHEAP
    }
    records = []
    for i, config in enumerate(sample_configs(1, windows, models=CHEAP, focus=CHEAP_FOCUS)):
        n = len(config.tasks)
        tasks = [TaskSample(m, b, float(r), round(law(flops[m], b, r, n), 3)) for m, b, r in config.tasks]
        records.append(window(tasks, gpu=gpu, ts=1_700_000_000.0 + i))
    return records


def write_records(path: Path, records: list[Record]) -> Path:
    path.write_bytes(b"".join(msgspec.json.encode(r) + b"\n" for r in records))
    return path


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("pipeline")
    records = synthetic_records()
    data = write_records(root / "synthetic-gpu-1000.jsonl", records)
    weights = fit(DataFile.read(data), root / "models", hidden=16, members=2, epochs=200, seed=0)
    onnx_path = export(weights)
    return {"records": records, "data": data, "weights": weights, "onnx": onnx_path}


def test_a_factored_predictor_is_fitted_exported_and_named_in_its_card(pipeline, tmp_path) -> None:
    weights = fit(
        DataFile.read(pipeline["data"]), tmp_path, hidden=8, members=1, epochs=100, network="factored"
    )
    card = json.loads(card_path(export(weights)).read_text())
    assert card["network"]["name"] == "factored" and card["network"]["kind"] == NETWORKS["factored"].kind
    assert card["onnx"]["max_relative_difference_vs_torch"] < 1e-4


def test_each_co_located_combination_is_held_out_once_in_cross_validation(pipeline) -> None:
    from predictor.training import combination_errors

    errors = combination_errors(pipeline["data"], network="factored", hidden=8, members=1, epochs=50)
    combinations = {
        "+".join(sorted(t.model for t in r.tasks)) for r in pipeline["records"] if len(r.tasks) > 1
    }
    assert set(errors) == combinations and len(combinations) > 1
    assert all(math.isfinite(e) and e >= 0 for e in errors.values())


@pytest.mark.parametrize("network", sorted(NETWORKS))
def test_ensemble_members_train_together_as_each_would_alone(pipeline, network) -> None:
    """The members of an ensemble train as one batched computation: member i of a fit from seed s is the
    network that a fit of one member from seed s + i gives, and the members differ."""
    samples = build(pipeline["records"])
    options = {"hidden": 8, "epochs": 40, "network": network}
    pair = train(samples.x, samples.mask, samples.throughput, members=2, seed=3, **options)
    alone = train(samples.x, samples.mask, samples.throughput, members=1, seed=4, **options)
    second = predict(Ensemble([pair.members[1]]), samples.x, samples.mask)
    np.testing.assert_allclose(second, predict(alone, samples.x, samples.mask), rtol=1e-4, atol=1e-4)
    first = predict(Ensemble([pair.members[0]]), samples.x, samples.mask)
    assert not np.allclose(first, second, rtol=1e-2)


def test_synthetic_data_is_what_the_test_means() -> None:
    records = synthetic_records()
    assert len(records) == 120
    assert {r.resolution for r in records} == {RESOLUTION}
    assert {len(r.tasks) for r in records} >= {1, 2, 3}
    assert all(t.throughput > 0 for r in records for t in r.tasks)


def test_fit_writes_safetensors_and_report(pipeline) -> None:
    weights = pipeline["weights"]
    assert weights == pipeline["data"].parent / "models" / "synthetic-gpu-1000.safetensors"
    raw = weights.read_bytes()
    assert not raw.startswith(b"\x80")  # not a pickle
    (header_len,) = struct.unpack("<Q", raw[:8])
    assert raw[8:9] == b"{" and 8 + header_len <= len(raw)
    header = json.loads(raw[8 : 8 + header_len])
    assert header["__metadata__"] == {"hidden": "16", "members": "2"}
    assert {k for k in header if k != "__metadata__"} >= {
        "members.0.mean",
        "members.1.std",
        "members.0.phi.0.weight",
    }
    report = json.loads(weights.with_suffix(".fit.json").read_text())
    assert report["gpu"] == SYNTHETIC_GPU and report["resolution"] == RESOLUTION
    assert report["data"]["sha256"] == hashlib.sha256(pipeline["data"].read_bytes()).hexdigest()
    assert report["data"]["records"] == 120 and report["data"]["models"] == sorted(CHEAP)
    for name in ("train", "seen", "unseen"):
        value = report["mape_percent"][name]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, (name, value)
    s = report["split"]
    assert s["train_records"] + s["seen_test_records"] + s["unseen_test_records"] == 120
    assert s["seen_test_records"] > 0 and s["unseen_test_records"] > 0


def test_the_card_lists_the_features_of_the_workloads_it_was_fitted_on(pipeline) -> None:
    expected = [extract(ModelSpec(name=m, num_classes=10, input_size=RESOLUTION)) for m in sorted(CHEAP)]
    report = json.loads(pipeline["weights"].with_suffix(".fit.json").read_text())
    assert report["features"] == [dataclasses.asdict(f) for f in expected]
    assert OnnxPredictor(pipeline["onnx"]).features == expected


FEATURE = {
    "model": "resnet18",
    "input_size": 32,
    "num_classes": 10,
    "flops_per_sample": 1e9,
    "param_bytes": 1,
    "activation_bytes_per_sample": 1,
}


@pytest.mark.parametrize(
    "features, problem",
    [
        (FEATURE, "malformed"),  # not a list
        ([FEATURE | {"flops_per_sample": "many"}], "malformed"),
        ([FEATURE | {"input_size": 32.5}], "malformed"),
        ([FEATURE | {"flops_per_sample": -1.0}], "out of range"),
        ([FEATURE | {"param_bytes": 0}], "out of range"),
    ],
)
def test_a_card_with_bad_features_is_refused(tmp_path, exported, features, problem) -> None:
    path = tmp_path / "bad-features.onnx"
    path.write_bytes(exported[1].read_bytes())
    card_path(path).write_text(json.dumps(json.loads(tiny_card()) | {"features": features}))
    with pytest.raises(PredictorUnavailable, match=problem):
        OnnxPredictor(path)


def test_fit_unseen_split_holds_only_combinations_absent_from_training(pipeline) -> None:
    report = json.loads(pipeline["weights"].with_suffix(".fit.json").read_text())
    unseen = {tuple(c) for c in report["split"]["unseen_combinations"]}
    assert unseen
    combos = [r.combination for r in pipeline["records"]]
    parts = split(
        dummy_samples(combos), seed=0
    )  # the combinations decide fit's split (no configuration repeats)
    assert set(parts.unseen_combos) == unseen
    assert len(parts.unseen) == report["split"]["unseen_test_records"]
    assert len(parts.train) == report["split"]["train_records"]
    assert not unseen & {combos[i] for i in parts.train}
    assert not unseen & {combos[i] for i in parts.seen}
    assert {combos[i] for i in parts.unseen} == unseen


def test_export_writes_onnx_and_card(pipeline) -> None:
    onnx_path = pipeline["onnx"]
    assert onnx_path == pipeline["weights"].with_suffix(".onnx") and onnx_path.is_file()
    card = json.loads(card_path(onnx_path).read_text())
    report = json.loads(pipeline["weights"].with_suffix(".fit.json").read_text())
    assert {k: card[k] for k in report} == report  # the card carries the fit report
    assert card["onnx"]["max_relative_difference_vs_torch"] < 1e-5
    markdown = onnx_path.with_suffix(".card.md").read_text()
    assert SYNTHETIC_GPU in markdown and f"{card['mape_percent']['unseen']}%" in markdown


def test_exported_predictor_matches_the_fitted_weights(pipeline) -> None:
    from safetensors.torch import load_file

    predictor = OnnxPredictor(pipeline["onnx"], gpu=SYNTHETIC_GPU)
    model = ensemble(16, 2)
    model.load_state_dict(load_file(str(pipeline["weights"])))
    model.eval()
    samples = build(pipeline["records"])
    (out,) = predictor.session.run(["throughput"], {"features": samples.x, "mask": samples.mask})
    np.testing.assert_allclose(out, predict(model, samples.x, samples.mask), rtol=1e-5, atol=0)
    tasks = [extract(ModelSpec(name=m, num_classes=10, input_size=RESOLUTION)) for m in CHEAP[:3]]
    result = predictor(tasks, np.array([[32, 64, 128]]), np.array([[40.0, 60.0, 100.0]]))
    assert result.shape == (1, 3) and np.all(result > 0)


def test_fit_rejects_a_file_mixing_gpus(tmp_path) -> None:
    records = synthetic_records(windows=70)
    records[-1] = msgspec.structs.replace(records[-1], gpu="Another GPU")
    data = write_records(tmp_path / "mixed.jsonl", records)
    with pytest.raises(ValueError, match="mixes GPUs"):
        fit(DataFile.read(data), tmp_path / "models", members=1, epochs=1)
    assert not (tmp_path / "models").exists()


def test_a_fit_reports_the_bytes_it_trained_on_while_the_file_grows(tmp_path) -> None:
    """A calibration appends to its data file; a fit's report names the snapshot it read, not the file's later bytes."""
    data = write_records(tmp_path / "growing.jsonl", synthetic_records(windows=70))
    snapshot = DataFile.read(data)
    with data.open("ab") as file:
        file.write(msgspec.json.encode(snapshot.records[0]) + b"\n")
    report = json.loads(
        fit(snapshot, tmp_path / "models", members=1, epochs=1).with_suffix(".fit.json").read_text()
    )
    assert report["data"]["sha256"] == hashlib.sha256(snapshot.raw).hexdigest()
    assert report["data"]["sha256"] != hashlib.sha256(data.read_bytes()).hexdigest()
    assert report["data"]["records"] == len(snapshot.records) == len(load_records(data)) - 1


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_fit_rejects_an_empty_file(tmp_path, content: bytes) -> None:
    data = tmp_path / "empty.jsonl"
    data.write_bytes(content)
    with pytest.raises(ValueError, match="no profiling records"):
        fit(DataFile.read(data), tmp_path / "models", members=1, epochs=1)


# -------------------------------------------------------------------------------------- 6. dataset.split


def random_combos(seed: int, n: int = 80) -> list[tuple[str, ...]]:
    rng = np.random.default_rng(seed)
    names = ["a", "b", "c", "d", "e", "f"]
    return [tuple(sorted(rng.choice(names, rng.integers(1, 4), replace=False).tolist())) for _ in range(n)]


@pytest.mark.parametrize("seed", range(20))
def test_split_partitions_and_keeps_unseen_out_of_training(seed: int) -> None:
    combos = random_combos(seed)
    parts = split(dummy_samples(combos), seed=seed, protected=())
    train, seen, unseen = set(parts.train.tolist()), set(parts.seen.tolist()), set(parts.unseen.tolist())
    assert train | seen | unseen == set(range(len(combos)))
    assert not (train & seen) and not (train & unseen) and not (seen & unseen)
    held = set(parts.unseen_combos)
    assert held and all(len(c) > 1 for c in held)
    assert {combos[i] for i in unseen} == held
    assert not held & {combos[i] for i in train}
    assert not held & {combos[i] for i in seen}
    assert all(combos.count(combos[i]) >= 3 for i in seen)
    assert list(parts.train) == sorted(parts.train) and list(parts.seen) == sorted(parts.seen)


def test_split_is_deterministic_per_seed() -> None:
    combos = random_combos(0)
    a, b = split(dummy_samples(combos), seed=5), split(dummy_samples(combos), seed=5)
    assert a.unseen_combos == b.unseen_combos and a.seen.tolist() == b.seen.tolist()


def test_protected_combinations_are_never_unseen() -> None:
    combos = random_combos(1)
    multi = sorted({c for c in combos if len(c) > 1})
    protected = [tuple(reversed(c)) for c in multi[::2]]  # given in any order
    parts = split(dummy_samples(combos), unseen_share=1.0, seed=0, protected=protected)
    assert set(parts.unseen_combos) == set(multi[1::2])  # every other multi-task combination is held out
    assert not {tuple(sorted(p)) for p in protected} & set(parts.unseen_combos)
    for seed in range(10):
        parts = split(dummy_samples(combos), unseen_share=0.5, seed=seed, protected=protected)
        assert not {tuple(sorted(p)) for p in protected} & set(parts.unseen_combos)


def test_single_model_baselines_are_never_unseen() -> None:
    combos = [("a",)] * 5 + [("b",)] * 5 + [("a", "b")] * 4
    parts = split(dummy_samples(combos), unseen_share=1.0, seed=0, protected=())
    assert parts.unseen_combos == [("a", "b")]
    assert sorted(parts.unseen.tolist()) == list(range(10, 14))


def test_a_repeated_configuration_is_held_out_or_trained_on_whole() -> None:
    """Module docstring: a configuration measured more than once never lands in both training and the seen set."""
    combos = [("a", "b")] * 12 + [("c",)] * 12
    configurations = [i // 3 for i in range(24)]  # each configuration measured three times
    for seed in range(30):
        parts = split(dummy_samples(combos, configurations), seed=seed, protected=(("a", "b"),))
        seen = {configurations[i] for i in parts.seen}
        assert seen and not seen & {configurations[i] for i in parts.train}
        assert all(configurations.count(c) == 3 for c in seen)  # whole groups
        assert len(parts.seen) == 3 * len(seen)


def test_mape_interval_brackets_the_mape_and_narrows_with_records() -> None:
    rng = np.random.default_rng(0)

    def interval(n: int) -> tuple[float, float, float]:
        actual = rng.uniform(100, 200, (n, 2))
        predicted = actual * rng.uniform(0.8, 1.2, (n, 2))
        mask = np.ones((n, 2), np.float32)
        return (mape(predicted, actual, mask), *mape_interval(predicted, actual, mask))

    value, low, high = interval(20)
    assert low < value < high
    many_value, many_low, many_high = interval(2000)
    assert many_low < many_value < many_high and many_high - many_low < (high - low) / 4
    # one record, every resample the same: the interval is the value itself
    assert mape_interval(np.array([[110.0]]), np.array([[100.0]]), np.ones((1, 1))) == pytest.approx(
        (10.0, 10.0)
    )


def test_seen_combinations_stay_in_training() -> None:
    """Module docstring: 'seen: held-out configurations of combinations that stay in training'."""
    combos = [("a", "b")] * 3 + [("c",)] * 17
    parts = split(dummy_samples(combos), seed=269, protected=())  # default shares
    train = {combos[i] for i in parts.train}
    assert {combos[i] for i in parts.seen} <= train


def test_mape_on_hand_computed_values() -> None:
    predicted = np.array([[110.0, 45.0, 7.0], [90.0, 0.0, 123.0]])
    actual = np.array([[100.0, 50.0, 0.0], [100.0, 0.0, 0.0]])
    mask = np.array([[1, 1, 0], [1, 0, 0]], dtype=np.float32)
    # |10|/100, |5|/50, |10|/100 -> 10%, 10%, 10%; masked slots (actual 0) are ignored
    assert mape(predicted, actual, mask) == pytest.approx(10.0)
    assert mape(np.array([[150.0, 50.0]]), np.array([[100.0, 100.0]]), np.ones((1, 2))) == pytest.approx(50.0)
    assert mape(np.array([[3.0, 1.0]]), np.array([[1.0, 4.0]]), np.ones((1, 2))) == pytest.approx(137.5)
    assert mape(actual, actual, mask) == 0.0
