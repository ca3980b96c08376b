"""Error feedback: nothing a device learned is lost across rounds and agent restarts, only delayed."""

from __future__ import annotations

import numpy as np
import pytest

from agent.compression import ErrorFeedback, write_update
from protocol.codecs import make_codec
from protocol.schemas import CodecSpec
from protocol.tensors import describe


def deltas(rounds: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "w": (rng.normal(size=(30, 20)) * 1e-2).astype(np.float32),
            "steps": np.array(r, dtype=np.int64),
        }
        for r in range(rounds)
    ]


def sent_over(rounds: list[dict], feedback_for, codec) -> tuple[np.ndarray, ErrorFeedback]:
    total = np.zeros((30, 20))
    for r, delta in enumerate(rounds):
        feedback = feedback_for(r)
        payload = feedback.encode(codec, delta)
        decoded = codec.decode(payload, describe(delta))
        assert decoded["steps"] == r  # integers travel untouched, never accumulated
        total += decoded["w"]
    return total, feedback


@pytest.mark.parametrize("name", ["topk", "dct", "fp16"])
def test_what_was_sent_plus_the_residual_is_everything_learned(tmp_path, name):
    codec = make_codec(name, 0.05 if name != "fp16" else None)
    rounds = deltas(6)
    feedback = ErrorFeedback(tmp_path / "t.state")
    total, _ = sent_over(rounds, lambda r: feedback, codec)
    residual = ErrorFeedback(tmp_path / "t.state")._load(rounds[0])[0]["w"]
    assert np.allclose(total + residual, sum(d["w"].astype(np.float64) for d in rounds), atol=1e-6)


def test_the_residual_survives_an_agent_restart(tmp_path):
    codec = make_codec("topk", 0.05)
    rounds = deltas(5, seed=1)
    kept, _ = sent_over(rounds, lambda r: ErrorFeedback(tmp_path / "kept.state"), codec)
    one = ErrorFeedback(tmp_path / "one.state")
    reference, _ = sent_over(rounds, lambda r: one, codec)
    assert np.array_equal(kept, reference)


def test_without_feedback_top_k_loses_what_feedback_delivers_later(tmp_path):
    codec = make_codec("topk", 0.05)
    drift = np.random.default_rng(3).normal(size=(30, 20)) * 1e-2  # training keeps pulling one way
    rounds = [{"w": (drift + d["w"] * 0.1).astype(np.float32), "steps": d["steps"]} for d in deltas(60, 2)]
    truth = sum(d["w"].astype(np.float64) for d in rounds)
    with_feedback, _ = sent_over(rounds, lambda r: ErrorFeedback(tmp_path / "ef.state"), codec)
    without = sum(codec.decode(codec.encode(d), describe(d))["w"] for d in rounds)
    assert np.linalg.norm(with_feedback - truth) < 0.25 * np.linalg.norm(without - truth)


def test_momentum_correction_accumulates_a_velocity_and_masks_what_was_sent(tmp_path):
    codec = make_codec("topk", 0.01)
    feedback = ErrorFeedback(tmp_path / "m.state", momentum=0.5)
    delta = {"w": np.ones((128, 128), dtype=np.float32)}
    first = codec.decode(feedback.encode(codec, delta), describe(delta))["w"]
    sent = np.flatnonzero(first)
    assert len(sent) == 164 and np.all(first.ravel()[sent] == 1.0)  # ceil(1% of 16384)
    residual, velocity = feedback._load(delta)
    assert np.all(velocity["w"].ravel()[sent] == 0) and np.all(np.delete(velocity["w"].ravel(), sent) == 1.0)
    second = codec.decode(feedback.encode(codec, delta), describe(delta))["w"]
    assert second.max() == pytest.approx(1.0 + 1.5)  # residual 1 + velocity 0.5 * 1 + 1


def test_a_changed_model_starts_from_a_clean_residual(tmp_path):
    codec = make_codec("topk", 0.1)
    feedback = ErrorFeedback(tmp_path / "t.state")
    feedback.encode(codec, {"w": np.ones((4, 4), dtype=np.float32)})
    other = {"w": np.ones((5, 5), dtype=np.float32)}
    out = codec.decode(feedback.encode(codec, other), describe(other))["w"]
    assert out.max() == 1.0


def test_the_update_is_written_before_the_residual_moves_on(tmp_path):
    codec = make_codec("topk", 0.1)
    feedback = ErrorFeedback(tmp_path / "t.state")
    delta = {"w": np.arange(16, dtype=np.float32).reshape(4, 4)}

    def crash(payload: bytes) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError):
        feedback.encode(codec, delta, write_update=crash)
    assert not (tmp_path / "t.state").exists()


def test_restated_entries_travel_as_given_and_keep_no_residual(tmp_path):
    codec = make_codec("topk", 0.05)
    rng = np.random.default_rng(4)
    delta = {
        "w": (rng.normal(size=(150, 120)) * 1e-2).astype(np.float32),
        "bn.running_var": (rng.normal(size=20) * 1e-2).astype(np.float32),
    }
    seen = []

    def restate(sent):
        seen.append(sent)
        return {"bn.running_var": np.full(20, 0.5, np.float32)}

    feedback = ErrorFeedback(tmp_path / "t.state")
    payload = feedback.encode(codec, delta, restate=restate)
    decoded = codec.decode(payload, describe(delta))
    assert np.allclose(decoded["bn.running_var"], 0.5)  # the restated entry, as sent
    assert np.count_nonzero(seen[0]["w"]) == np.count_nonzero(decoded["w"]) == 900  # restate saw the top 5%
    assert np.array_equal(decoded["w"], seen[0]["w"])  # the matrix's selection did not change
    residual = feedback._load(delta)[0]
    assert np.abs(residual["bn.running_var"]).max() < 1e-3  # fp16 rounding only, not the trained statistics
    assert np.allclose(residual["w"] + decoded["w"], delta["w"], atol=1e-6)


def test_only_codecs_with_a_sparse_step_restate(tmp_path):
    delta = {"w": np.ones((4, 4), np.float32), "v": np.ones(4, np.float32)}
    calls = []
    for name in ("fp16", "topk", "dense", "dct", "fp16+zstd", "topk+zstd"):
        write_update(
            delta,
            CodecSpec(name=name),
            tmp_path / f"{name}.update",
            tmp_path / f"{name}.residual",
            restate=lambda sent, name=name: calls.append(name) or {},
        )
    assert calls == ["topk", "topk+zstd"]
