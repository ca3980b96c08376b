"""The agent's model cache: verified versions, and a version rebuilt from its delta to the one before."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from agent.model_cache import ModelCache
from protocol import ProtocolError
from protocol.chunking import transfer_info
from protocol.codecs import make_codec
from protocol.deltas import encode_version
from protocol.schemas import GlobalDelta, GlobalManifest, ModelSpec
from protocol.tensors import describe, encode_state
from tests.test_fuzz_handlers import agent  # noqa: F401 - a fixture

MODEL = ModelSpec(name="tiny", num_classes=10, input_size=8)


def manifest(version: int, state: dict, delta: GlobalDelta | None = None) -> GlobalManifest:
    payload = encode_state(state)
    return GlobalManifest(
        task="t",
        version=version,
        model=MODEL,
        tensors=describe(state),
        transfer=transfer_info(f"t.v{version}", payload),
        created_at=0.0,
        delta=delta,
    )


@pytest.fixture
def cached(tmp_path):
    """A cache holding v0, and v1 as published with an fp16 delta."""
    rng = np.random.default_rng(0)
    v0 = {"w": rng.normal(size=(8, 8)).astype(np.float32), "n": np.array(3, np.int64)}
    target = {"w": v0["w"] + 0.01, "n": np.array(4, np.int64)}
    payload, v1 = encode_version(make_codec("fp16+zstd"), target, v0)
    cache = ModelCache(tmp_path / "models")
    first = manifest(0, v0)
    (tmp_path / "v0").write_bytes(encode_state(v0))
    cache.store(first, tmp_path / "v0")
    info = transfer_info("t.v1.delta", payload)
    second = manifest(
        1,
        v1,
        GlobalDelta(base_version=0, base_sha256=first.transfer.sha256, codec="fp16+zstd", transfer=info),
    )
    (tmp_path / "delta").write_bytes(payload)
    return cache, second, tmp_path / "delta"


def test_a_version_is_rebuilt_from_its_delta_bit_for_bit(cached):
    cache, second, delta_file = cached
    assert cache.holds_base_of(second)
    cache.store(second, cache.rebuild(second, delta_file))
    assert cache.has("t", 1, second.transfer.sha256)


def test_a_delta_that_does_not_rebuild_the_version_is_refused(cached):
    cache, second, delta_file = cached
    wrong = msgspec.structs.replace(second, transfer=transfer_info("t.v1", b"another model"))
    with pytest.raises(ProtocolError, match="does not match its sha256"):
        cache.rebuild(wrong, delta_file)
    assert not cache.has("t", 1, wrong.transfer.sha256)


def test_without_the_base_version_the_whole_model_is_fetched(cached):
    cache, second, _ = cached
    other_base = msgspec.structs.replace(second.delta, base_sha256="0" * 64)
    assert not cache.holds_base_of(msgspec.structs.replace(second, delta=other_base))
    assert not cache.holds_base_of(msgspec.structs.replace(second, delta=None))


def test_an_agent_fetches_the_delta_and_falls_back_to_the_whole_model_when_it_does_not_rebuild(
    agent,  # noqa: F811 - the fixture
    cached,
    tmp_path,
):
    from protocol import topics
    from protocol.chunking import split
    from protocol.schemas import encode
    from protocol.tensors import decode_state
    from tests.test_fuzz_handlers import feed

    cache, second, delta_file = cached
    first = cache.get("t", 0)
    agent.cache.store(first, _copy(cache.payload_path("t", 0), tmp_path / "v0-copy"))
    other = {"w": np.ones((8, 8), np.float32), "n": np.array(4, np.int64)}  # not what the delta rebuilds
    broken = msgspec.structs.replace(second, transfer=transfer_info("t.v1", encode_state(other)))
    whole, delta = topics.global_model("t"), topics.global_delta("t")
    feed(agent, [(topics.manifest(whole), encode(broken))])
    assert f"{delta}/chunks/+" in agent.link._subscriptions  # it holds v0: only the delta is fetched
    assert f"{whole}/chunks/+" not in agent.link._subscriptions
    payload = delta_file.read_bytes()
    feed(agent, [(topics.chunk(delta, c.index), encode(c)) for c in split(payload, broken.delta.transfer)])
    assert f"{whole}/chunks/+" in agent.link._subscriptions  # the rebuild failed its sha256: the whole model
    feed(
        agent,
        [(topics.chunk(whole, c.index), encode(c)) for c in split(encode_state(other), broken.transfer)],
    )
    assert np.array_equal(decode_state(agent.cache.payload_path("t", 1).read_bytes())["w"], other["w"])
    assert f"{whole}/chunks/+" not in agent.link._subscriptions


def _copy(source, target):
    target.write_bytes(source.read_bytes())
    return target
