"""agent.data: digits partitions, device-resident batches and the budget fallback, synthetic and image-folder
data (in memory and streamed), spec validation."""

from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from agent.data import DataSpec, DigitsData, ImageFolderData, SyntheticData
from agent.data.digits import digits_indices, digits_split, digits_test_set
from agent.data.tensors import generator, shuffled_batches
from protocol.schemas import ModelSpec

MODEL = ModelSpec(name="resnet18", num_classes=10, input_size=16)


def partitions(**spec) -> list[np.ndarray]:
    count = spec["num_partitions"]
    return [digits_indices(DigitsData(partition_index=i, **spec)) for i in range(count)]


def label_skew(parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each partition's label histogram and the training split's."""
    target = load_digits().target
    overall = np.bincount(target[digits_split()[0]], minlength=10) / len(digits_split()[0])
    return float(
        np.mean([0.5 * np.abs(np.bincount(target[p], minlength=10) / len(p) - overall).sum() for p in parts])
    )


# --- digits --------------------------------------------------------------------------------------------


def test_split_is_fixed_and_disjoint() -> None:
    train, test = digits_split()
    assert len(train) + len(test) == 1797 and len(test) == round(1797 * 0.2)
    assert not set(train) & set(test)


@pytest.mark.parametrize("kind", ["iid", "dirichlet"])
@pytest.mark.parametrize("count", [1, 3, 7])
def test_partitions_are_disjoint_non_empty_and_cover_the_train_split(kind: str, count: int) -> None:
    parts = partitions(partition=kind, num_partitions=count, alpha=0.3, seed=5)
    train, test = digits_split()
    assert all(len(p) > 0 for p in parts)
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined)) == len(train)
    assert set(joined) == set(train)
    assert not set(joined) & set(test)


def test_iid_partitions_have_equal_sizes() -> None:
    sizes = [len(p) for p in partitions(num_partitions=3)]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_skews_labels_more_than_iid() -> None:
    iid = label_skew(partitions(partition="iid", num_partitions=5))
    skewed = label_skew(partitions(partition="dirichlet", alpha=0.3, num_partitions=5))
    assert iid < 0.1 < skewed


def test_partitions_are_deterministic_per_seed() -> None:
    spec = {"partition": "dirichlet", "num_partitions": 4, "alpha": 0.5}
    a, b, c = partitions(seed=1, **spec), partitions(seed=1, **spec), partitions(seed=2, **spec)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(len(x) == len(y) and np.array_equal(x, y) for x, y in zip(a, c))


def test_fraction_takes_nested_prefixes_of_the_partition() -> None:
    whole = digits_indices(DigitsData(num_partitions=3, partition_index=1))
    third = digits_indices(DigitsData(num_partitions=3, partition_index=1, fraction=1 / 3))
    two_thirds = digits_indices(DigitsData(num_partitions=3, partition_index=1, fraction=2 / 3))
    assert len(third) == round(len(whole) / 3) and len(two_thirds) == round(len(whole) * 2 / 3)
    assert set(third) <= set(two_thirds) <= set(whole)
    assert DigitsData(num_partitions=3, partition_index=1, fraction=2 / 3).sample_count() == len(two_thirds)


def batches(data, batch_size: int = 64, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(data.epoch(batch_size, seed))


def test_digits_are_held_on_the_device_normalised_three_channel_and_resized() -> None:
    data = DigitsData().open(ModelSpec(name="resnet18", num_classes=10, input_size=8), "cpu", 1 << 30)
    assert data.placement == "device" and data.stored.shape == (len(digits_split()[0]), 1, 8, 8)
    assert abs(data.stored.mean().item()) < 1e-4 and abs(data.stored.std().item() - 1) < 1e-3
    images, labels = torch.cat([x for x, _ in batches(data)]), torch.cat([y for _, y in batches(data)])
    assert images.shape == (len(digits_split()[0]), 3, 8, 8) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and set(labels.tolist()) == set(range(10))
    assert torch.equal(images[:, 0], images[:, 2])


def test_digits_over_the_budget_keep_the_originals_and_upscale_each_batch_the_same_way() -> None:
    spec, model = DigitsData(num_partitions=3), ModelSpec(name="resnet18", num_classes=10, input_size=24)
    held, small = spec.open(model, "cpu", 1 << 30), spec.open(model, "cpu", 0)
    assert held.stored.shape[-1] == 24 and small.stored.shape[-1] == 8
    for (x, y), (u, v) in zip(batches(held, 32, seed=3), batches(small, 32, seed=3), strict=True):
        assert torch.equal(y, v) and torch.allclose(x, u, atol=1e-5)


def test_an_epoch_covers_every_sample_once_and_a_lone_tail_joins_the_last_batch() -> None:
    parts = shuffled_batches(33, 8, generator("cpu", 1))
    assert [len(p) for p in parts] == [8, 8, 8, 9]
    assert sorted(torch.cat(parts).tolist()) == list(range(33))
    assert not torch.equal(torch.cat(parts), torch.cat(shuffled_batches(33, 8, generator("cpu", 2))))
    assert torch.equal(torch.cat(parts), torch.cat(shuffled_batches(33, 8, generator("cpu", 1))))


def test_test_set_is_the_held_out_split() -> None:
    test = digits_test_set(MODEL)
    assert len(test) == len(digits_split()[1])
    assert test[0][0].shape == (3, 16, 16)


def test_digits_need_ten_classes() -> None:
    with pytest.raises(ValueError, match="10 classes"):
        DigitsData().open(ModelSpec(name="resnet18", num_classes=5, input_size=16), "cpu", 1 << 30)


def test_more_partitions_than_samples_is_an_error() -> None:
    with pytest.raises(ValueError, match="partitions"):
        digits_indices(DigitsData(num_partitions=5000, partition_index=0))


# --- synthetic -----------------------------------------------------------------------------------------


def test_synthetic_data_is_made_once_when_it_fits_and_per_batch_when_not() -> None:
    model = ModelSpec(name="resnet18", num_classes=3, input_size=12)
    held = SyntheticData(samples=50, seed=4).open(model, "cpu", 1 << 30)
    made = SyntheticData(samples=50, seed=4).open(model, "cpu", 0)
    assert (held.placement, made.placement) == ("device", "stream")
    assert SyntheticData(samples=10**9).sample_count() == 10**9
    for data in (held, made):
        x, y = batches(data, 16)[0]
        assert x.shape == (16, 3, 12, 12) and x.dtype == torch.float32 and 0 <= y.min() <= y.max() < 3
        assert sum(len(y) for _, y in batches(data, 16)) == 50
    again = SyntheticData(samples=50, seed=4).open(model, "cpu", 1 << 30)
    assert torch.equal(again.stored, held.stored)
    assert not torch.equal(SyntheticData(samples=50, seed=5).open(model, "cpu", 1 << 30).stored, held.stored)


# --- image folders -------------------------------------------------------------------------------------


def write_folder(
    root: Path, suffix: str = ".png", counts=(("cat", 2), ("dog", 3)), one_size: bool = False
) -> Path:
    rng = np.random.default_rng(0)
    for cls, count in counts:
        (root / cls).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (20 if one_size else 20 + i, 30, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i}{suffix}")
    return root


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    write_folder(tmp_path)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    return tmp_path


def test_image_folder_samples_are_decoded_once_and_held_as_bytes(folder: Path) -> None:
    spec = ImageFolderData(path=str(folder))
    data = spec.open(MODEL, "cpu", 1 << 30)
    assert data.samples == spec.sample_count() == 5 and data.placement == "device"
    assert data.stored.dtype == torch.uint8 and data.stored.shape == (
        5,
        3,
        18,
        18,
    )  # 16 * 8/7 margin for crops
    x, y = batches(data, 8)[0]
    assert x.shape == (5, 3, 16, 16) and x.dtype == torch.float32 and sorted(y.tolist()) == [0, 0, 1, 1, 1]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("suffix", [".png", ".jpg"])
@pytest.mark.parametrize(
    "one_size", [False, True]
)  # one size: readers only decode, the batch is squared here
def test_a_streamed_folder_gives_the_batches_of_the_held_one(tmp_path, workers, suffix, one_size) -> None:
    folder = write_folder(tmp_path, suffix, [("a", 7), ("b", 6)], one_size)
    spec = ImageFolderData(path=str(folder), augment=False)
    held, streamed = spec.open(MODEL, "cpu", 1 << 30, workers), spec.open(MODEL, "cpu", 0, workers)
    assert (held.placement, streamed.placement) == ("device", "stream")
    for epoch in range(2):  # the stream's workers persist across epochs
        for (x, y), (u, v) in zip(batches(held, 4, epoch), batches(streamed, 4, epoch), strict=True):
            assert torch.equal(y, v) and torch.equal(x, u)


def test_augmentation_crops_and_flips_each_image_differently(tmp_path: Path) -> None:
    spec = ImageFolderData(path=str(write_folder(tmp_path, counts=[("a", 1)])))
    data = spec.open(MODEL, "cpu", 1 << 30)
    data.stored = data.stored.expand(64, -1, -1, -1).contiguous()  # one image, many times
    data.labels = data.labels.expand(64)
    data.samples = 64
    x, _ = batches(data, 64)[0]
    assert x.shape == (64, 3, 16, 16) and torch.isfinite(x).all()
    assert len({tuple(v.flatten()[:20].tolist()) for v in x}) > 32
    plain = ImageFolderData(path=spec.path, augment=False).open(MODEL, "cpu", 1 << 30)
    assert torch.equal(batches(plain, 1, 0)[0][0], batches(plain, 1, 1)[0][0])


def test_image_folder_with_more_classes_than_the_model(folder: Path) -> None:
    (folder / "eel").mkdir()
    Image.new("RGB", (8, 8)).save(folder / "eel" / "0.png")
    with pytest.raises(ValueError, match="3 classes"):
        ImageFolderData(path=str(folder)).open(
            ModelSpec(name="resnet18", num_classes=2, input_size=16), "cpu", 1 << 30
        )


def test_missing_image_folder_names_the_path(tmp_path: Path) -> None:
    spec = ImageFolderData(path=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        spec.open(MODEL, "cpu", 1 << 30)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        spec.sample_count()


# --- specs ---------------------------------------------------------------------------------------------


def test_specs_decode_by_kind() -> None:
    assert msgspec.convert({"kind": "synthetic", "samples": 5}, DataSpec) == SyntheticData(samples=5)
    spec = msgspec.convert(
        {"kind": "digits", "partition": "dirichlet", "num_partitions": 3, "partition_index": 2}, DataSpec
    )
    assert spec == DigitsData(partition="dirichlet", num_partitions=3, partition_index=2)
    assert msgspec.convert({"kind": "imagefolder", "path": "/data"}, DataSpec) == ImageFolderData(
        path="/data"
    )


def test_partition_index_must_be_below_the_count() -> None:
    with pytest.raises(ValueError, match="partition_index 3"):
        DigitsData(num_partitions=3, partition_index=3)
    with pytest.raises(msgspec.ValidationError, match="partition_index 3"):
        msgspec.convert({"kind": "digits", "num_partitions": 3, "partition_index": 3}, DataSpec)


@pytest.mark.parametrize(
    "raw",
    [
        {"kind": "digits", "colour": "red"},
        {"kind": "digits", "fraction": 0.0},
        {"kind": "digits", "fraction": 1.5},
        {"kind": "digits", "alpha": 0.0},
        {"kind": "digits", "num_partitions": 0},
        {"kind": "digits", "partition": "sorted"},
        {"kind": "synthetic", "samples": 0},
        {"kind": "imagefolder"},
        {"kind": "tape"},
    ],
)
def test_invalid_specs_are_rejected(raw: dict) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(raw, DataSpec)


@pytest.mark.parametrize("workers", [0, 2])
def test_encoded_files_stream_as_one_buffer_per_batch_and_decode_where_the_decoder_runs(
    tmp_path, workers
) -> None:
    from agent.data.imagefolder import Augment, Decoder, StreamedImages, _Collate, scan, stored_size

    spec = ImageFolderData(path=str(write_folder(tmp_path, ".jpg", [("a", 5), ("b", 4)])), augment=False)
    paths, labels, _ = scan(spec)
    decoder = Decoder("cpu", gpu_jpeg=False, size=stored_size(16, augment=False))
    decoder.on_device = (
        True  # as on a GPU with nvJPEG: readers send the encoded bytes (decoded here on the CPU)
    )
    streamed = StreamedImages(paths, torch.from_numpy(labels), decoder, Augment(16, augment=False), workers)
    held = spec.open(MODEL, "cpu", 1 << 30)
    for (x, y), (u, v) in zip(batches(held, 4), batches(streamed, 4), strict=True):
        assert torch.equal(y, v) and torch.equal(x, u)
    buffer, lengths = _Collate(decoder)(
        [torch.tensor([1, 2], dtype=torch.uint8), torch.tensor([3], dtype=torch.uint8)]
    )
    assert buffer.tolist() == [1, 2, 3] and lengths.tolist() == [2, 1]


# --- batches made ahead ----------------------------------------------------------------------------------


def counted(samples: int, fail_at: int | None = None):
    """Generated batches whose labels are the sample indices; raises at batch `fail_at`."""
    from agent.data.tensors import GeneratedBatches

    made = []

    def make(index, rng):
        if len(made) == fail_at:
            raise OSError("disk went away")
        made.append(index)
        return torch.randn(len(index), 3, 4, 4, generator=rng), index

    return GeneratedBatches(samples, "cpu", make), made


def test_prefetched_batches_are_the_data_s_own_in_order() -> None:
    from agent.data.prefetch import Prefetched

    data, _ = counted(100)
    ahead = Prefetched(data, "cpu", depth=2)
    assert (ahead.samples, ahead.placement) == (100, "stream")
    for (x, y), (u, v) in zip(batches(data, 16, seed=3), batches(ahead, 16, seed=3), strict=True):
        assert torch.equal(x, u) and torch.equal(y, v)


def test_a_producer_error_reaches_the_training_loop() -> None:
    from agent.data.prefetch import Prefetched

    data, _ = counted(100, fail_at=2)
    with pytest.raises(OSError, match="disk went away"):
        batches(Prefetched(data, "cpu"), 16)


def test_leaving_an_epoch_early_stops_its_producer_within_the_depth() -> None:
    import threading

    from agent.data.prefetch import Prefetched

    data, made = counted(10_000)
    epoch = Prefetched(data, "cpu", depth=2).epoch(10, seed=0)
    next(epoch)
    epoch.close()
    assert not [t for t in threading.enumerate() if t.name == "prefetch"]
    assert len(made) <= 1 + 2 + 1  # the batch taken, the queue's depth, one on its way in


def test_a_closed_image_stream_refuses_further_epochs(tmp_path) -> None:
    spec = ImageFolderData(path=str(write_folder(tmp_path, ".png", [("a", 3), ("b", 3)])))
    data = spec.open(MODEL, "cpu", 0, 1)
    assert len(batches(data, 4)) == 2
    data.close()
    with pytest.raises(RuntimeError, match="closed"):
        batches(data, 4)
