"""bench/codec_pairs on the CPU (smoke): the same round's updates aggregated exact and through each codec."""

from __future__ import annotations

import json

import pytest

from bench import codec_pairs
from bench.codec_pairs import CODECS, main
from protocol.schemas import CodecSpec


@pytest.mark.slow
def test_the_benchmark_pairs_every_codec_with_the_exact_aggregate_each_round(tmp_path):
    out = tmp_path / "pairs.json"
    argv = ["--tasks", "digits-shufflenet", "--rounds", "2", "--local-steps", "4", "--threads", "1"]
    assert main([*argv, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["codec"] for r in rows} == set(CODECS)
    for row in rows:
        assert len(row["drop_pts_per_round"]) == 2
        assert all(-100 <= d <= 100 for d in row["drop_pts_per_round"])
    ratios = {r["codec"]: r["update_bytes_ratio"] for r in rows}
    assert 1.9 < ratios["fp16"] <= 2.0  # float32 -> float16, integer buffers and the layout as they are
    assert ratios["dct"] > 1.0


@pytest.mark.slow
def test_a_lossless_codec_is_paired_with_no_drop_at_all(monkeypatch):
    """The pairing compares like with like: an exact codec's aggregate evaluates exactly as the dense one."""
    monkeypatch.setattr(codec_pairs, "CODECS", {"sparse": CodecSpec(name="sparse")})
    drops, ratios = codec_pairs.paired_drops("digits-shufflenet", rounds=2, seed=0, local_steps=3)
    assert drops == [{"sparse": 0.0}, {"sparse": 0.0}]
    assert ratios["sparse"] > 0
