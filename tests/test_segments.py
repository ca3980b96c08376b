"""Segments: small payloads appended to one file per task round, and what a sync must make durable."""

from __future__ import annotations

from aggregator.segments import Segments


def test_payloads_share_their_rounds_segment_and_a_sync_covers_its_folder_once(tmp_path):
    segments = Segments(tmp_path)
    first, at_first = segments.append("t", 1, b"abc")
    assert segments.written() == {first, first.parent}  # a new file: its folder entry too
    second, at_second = segments.append("t", 1, b"defg")
    other, _ = segments.append("u", 1, b"h")
    assert second == first and (at_first, at_second) == (0, 3) and other.parent != first.parent
    assert segments.written() == {first, other, other.parent}
    assert segments.written() == set()
    assert first.read_bytes() == b"abcdefg"
    segments.close("t", 1)
    again, at = segments.append("t", 1, b"i")  # after a restart (or close), a new segment
    assert again != first and at == 0
    segments.close_all()
