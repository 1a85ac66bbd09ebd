"""The GOAWAY filter: frames pass untouched, GOAWAYs come out as values, at any split."""

from __future__ import annotations

import pytest
from hyperframe.frame import DataFrame, GoAwayFrame, HeadersFrame, PingFrame, SettingsFrame

from mcproxy.worker.l7.frames import (
    CLIENT_PREFACE,
    MAX_FRAME_SIZE,
    FrameTooLarge,
    GoAway,
    GoAwayFilter,
    encode_goaway,
)


def _goaway(last: int, code: int, debug: bytes = b"") -> bytes:
    frame = GoAwayFrame(0)
    frame.last_stream_id, frame.error_code, frame.additional_data = last, code, debug
    return frame.serialize()


def _data(sid: int, payload: bytes) -> bytes:
    frame = DataFrame(sid)
    frame.data = payload
    return frame.serialize()


def _feed_in_pieces(stream: bytes, cut: list[int], preface: bool) -> tuple[bytes, list[GoAway]]:
    flt = GoAwayFilter(expect_preface=preface)
    passed, goaways, start = b"", [], 0
    for end in [*cut, len(stream)]:
        out, found = flt.feed(stream[start:end])
        passed += out
        goaways += found
        start = end
    return passed, goaways


def test_a_stream_without_goaway_comes_back_as_the_same_object() -> None:
    data = SettingsFrame(0).serialize() + _data(1, b"x" * 1000) + PingFrame(0).serialize()
    out, goaways = GoAwayFilter(expect_preface=False).feed(data)
    assert out is data
    assert goaways == []


def test_goaway_is_lifted_out_at_every_split_point() -> None:
    before = CLIENT_PREFACE + SettingsFrame(0).serialize() + _data(1, b"abc")
    after = _data(3, b"defg") + HeadersFrame(5).serialize()
    stream = before + _goaway(3, 0, b"bye") + after
    for cut in range(len(stream) + 1):
        passed, goaways = _feed_in_pieces(stream, [cut], preface=True)
        assert passed == before + after, cut
        assert goaways == [GoAway(3, 0, b"bye")], cut


def test_goaway_fed_one_byte_at_a_time() -> None:
    stream = _data(1, b"a") + _goaway(1, 2) + _goaway(0, 0) + _data(1, b"b")
    passed, goaways = _feed_in_pieces(stream, list(range(1, len(stream))), preface=False)
    assert passed == _data(1, b"a") + _data(1, b"b")
    assert goaways == [GoAway(1, 2), GoAway(0, 0)]


def test_encode_goaway_is_what_hyperframe_writes() -> None:
    assert encode_goaway(7, 11, b"why") == _goaway(7, 11, b"why")


def test_a_frame_announced_larger_than_the_limit_is_refused_at_its_header() -> None:
    flt = GoAwayFilter(expect_preface=False)
    header = (MAX_FRAME_SIZE + 1).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01"
    with pytest.raises(FrameTooLarge):
        flt.feed(header)


def test_an_http1_answer_to_the_preface_is_refused_at_once() -> None:
    with pytest.raises(FrameTooLarge):
        GoAwayFilter(expect_preface=False).feed(b"HTTP/1.1 400 Bad Request\r\n\r\n")
