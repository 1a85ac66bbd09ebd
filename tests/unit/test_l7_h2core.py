"""Our HTTP/2 core against h2 as the peer, both roles, frame by frame (bytes only).

The contract is ARCHITECTURE.md's L7 section and h2core's docstrings; the
peer is the pure-Python ``h2`` package, so every frame the core sends is also
checked by an independent implementation (h2 raises on a window overrun, a bad
header block or a frame out of sequence). tests/unit/h2peer.py has the pair.
Hostile input: test_l7_h2core_hostile.py; properties and fuzzing:
test_l7_h2core_props.py.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import h2.events
import h2.exceptions
import hpack
import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    HeadersFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from mcproxy.worker.l7 import h2core
from mcproxy.worker.l7.h2core import ErrorCodes, SettingCodes
from tests.unit.h2peer import Headers, Pair, of, parse_frames, peer_window, raw, request, response

ROLES = pytest.mark.parametrize("core_client", [False, True], ids=["core-server", "core-client"])


@dataclass
class View:
    """One stream as one side saw it (either library's events)."""

    head: Headers | None = None
    head_ended: bool = False
    informational: list[Headers] = field(default_factory=list)
    body: bytes = b""
    trailers: Headers | None = None
    ended: bool = False
    reset: int | None = None
    reset_remote: bool | None = None


_HEADS = (
    h2core.RequestReceived,
    h2core.ResponseReceived,
    h2.events.RequestReceived,
    h2.events.ResponseReceived,
)


def views(events: list[Any]) -> dict[int, View]:
    out: dict[int, View] = {}
    for e in events:
        sid = getattr(e, "stream_id", None)
        if not sid:
            continue
        v = out.setdefault(sid, View())
        if isinstance(e, _HEADS):
            assert v.head is None, f"two heads on stream {sid}"
            v.head = [tuple(h) for h in e.headers]  # type: ignore[misc]
            if isinstance(e, (h2core.RequestReceived, h2core.ResponseReceived)):
                v.head_ended = v.ended = v.ended or e.stream_ended
        elif isinstance(
            e, (h2core.InformationalResponseReceived, h2.events.InformationalResponseReceived)
        ):
            v.informational.append([tuple(h) for h in e.headers])  # type: ignore[misc]
        elif isinstance(e, (h2core.DataReceived, h2.events.DataReceived)):
            assert not v.ended, f"data after the end of stream {sid}"
            v.body += e.data
            if isinstance(e, h2core.DataReceived):
                assert e.flow_controlled_length == len(e.data)
                v.ended = v.ended or e.stream_ended
        elif isinstance(e, (h2core.TrailersReceived, h2.events.TrailersReceived)):
            v.trailers = [tuple(h) for h in e.headers]  # type: ignore[misc]
            if isinstance(e, h2core.TrailersReceived):
                v.ended = True  # trailers always end the stream
        elif isinstance(e, h2.events.StreamEnded):
            v.ended = True
        elif isinstance(e, (h2core.StreamReset, h2.events.StreamReset)):
            v.reset = e.error_code
            v.reset_remote = e.remote if isinstance(e, h2core.StreamReset) else e.remote_reset
    return out


def client(pair: Pair) -> Any:
    return pair.core if pair.core_client else pair.peer


def server(pair: Pair) -> Any:
    return pair.peer if pair.core_client else pair.core


def at_server(pair: Pair) -> dict[int, View]:
    return views(pair.peer_events if pair.core_client else pair.core_events)


def at_client(pair: Pair) -> dict[int, View]:
    return views(pair.core_events if pair.core_client else pair.peer_events)


def started(core_client: bool, **kwargs: Any) -> Pair:
    pair = Pair(core_client, **kwargs)
    pair.handshake()
    return pair


def text(n: int, seed: int) -> bytes:
    """``n`` bytes that HPACK's Huffman code cannot squeeze much (a header value)."""
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    rng = random.Random(seed)
    return bytes(rng.choice(alphabet) for _ in range(n))


def body(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


# -- handshake -------------------------------------------------------------------------


@ROLES
def test_handshake_exchanges_and_acknowledges_settings_both_ways(core_client: bool) -> None:
    pair = Pair(
        core_client,
        local_settings={
            SettingCodes.MAX_CONCURRENT_STREAMS: 33,
            SettingCodes.INITIAL_WINDOW_SIZE: 70000,
        },
        connection_window=1 << 20,
        peer_settings={
            SettingCodes.MAX_CONCURRENT_STREAMS: 7,
            SettingCodes.MAX_HEADER_LIST_SIZE: 9000,
            SettingCodes.INITIAL_WINDOW_SIZE: 1234,
            SettingCodes.MAX_FRAME_SIZE: 20000,
        },
    )
    core_events, peer_events = pair.handshake()
    assert of(peer_events, h2.events.RemoteSettingsChanged)
    changed: dict[int, int] = {}
    for e in of(core_events, h2core.RemoteSettingsChanged):
        changed.update(e.changed_settings)
    assert changed[SettingCodes.MAX_CONCURRENT_STREAMS] == 7
    assert changed[SettingCodes.INITIAL_WINDOW_SIZE] == 1234
    # what the core says about the peer
    remote = pair.core.remote_settings
    assert remote.max_concurrent_streams == 7
    assert remote.max_header_list_size == 9000
    assert remote.initial_window_size == 1234
    assert remote.max_frame_size == 20000
    assert pair.core.max_outbound_frame_size == 20000
    # what h2 says about the core
    assert pair.peer.remote_settings.max_concurrent_streams == 33
    assert pair.peer.remote_settings.initial_window_size == 70000
    assert pair.peer.outbound_flow_control_window == 1 << 20
    # each side acknowledged the other's SETTINGS (h2 sent two, the core acked both)
    acks = [f for f in pair.core_frames if isinstance(f, SettingsFrame) and "ACK" in f.flags]
    assert len(acks) == 2
    assert any(isinstance(f, SettingsFrame) and "ACK" in f.flags for f in pair.peer_frames)
    assert not pair.core.closed


def test_client_core_starts_with_the_preface_then_settings() -> None:
    core = h2core.H2Connection(client_side=True)
    core.initiate_connection()
    out = core.data_to_send()
    assert out.startswith(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    frames = parse_frames(out, preface=True)
    assert isinstance(frames[0], SettingsFrame)
    assert core.data_to_send() == b""


def test_client_stream_ids_are_odd_and_increasing() -> None:
    pair = started(True)
    ids = []
    for _ in range(3):
        sid = pair.core.get_next_available_stream_id()
        pair.core.send_headers(sid, request(), end_stream=True)
        ids.append(sid)
    assert ids == [1, 3, 5]
    pair.pump()
    assert sorted(at_server(pair)) == [1, 3, 5]


# -- requests and responses ------------------------------------------------------------


@ROLES
def test_get_without_body_and_a_response_with_one(core_client: bool) -> None:
    pair = started(core_client)
    sid = pair.open(request(b"/a?b=c", extra=[(b"accept", b"*/*")]), end_stream=True)
    pair.pump()
    seen = at_server(pair)[sid]
    assert seen.head == request(b"/a?b=c", extra=[(b"accept", b"*/*")])
    assert seen.ended and seen.body == b""
    server(pair).send_headers(sid, response(extra=[(b"content-length", b"5")]))
    pair.send_body(not core_client, sid, b"hello")
    got = at_client(pair)[sid]
    assert got.head == response(extra=[(b"content-length", b"5")])
    assert (got.body, got.ended, got.reset) == (b"hello", True, None)
    assert pair.core.open_streams == 0


@ROLES
def test_post_bodies_both_ways_larger_than_every_window(core_client: bool) -> None:
    up, down = body(200_000, 1), body(300_000, 2)
    pair = started(core_client)
    sid = pair.open(request(method=b"POST", extra=[(b"content-length", str(len(up)).encode())]))
    got, ended = pair.send_body(core_client, sid, up)
    assert (got, ended) == (up, True)
    server(pair).send_headers(sid, response())
    got, ended = pair.send_body(not core_client, sid, down)
    assert (got, ended) == (down, True)
    assert at_server(pair)[sid].body == up and at_client(pair)[sid].body == down
    data = [f for f in pair.core_frames if isinstance(f, DataFrame)]
    assert all(len(f.data) <= pair.core.max_outbound_frame_size for f in data)
    assert sum(len(f.data) for f in data) == len(down if not core_client else up)


@ROLES
def test_end_of_stream_on_an_empty_data_frame(core_client: bool) -> None:
    pair = started(core_client)
    sid = pair.open(request(method=b"POST"))
    client(pair).send_data(sid, b"abc")
    client(pair).send_data(sid, b"", end_stream=True)
    pair.pump()
    server(pair).send_headers(sid, response())
    server(pair).send_data(sid, b"xyz")
    server(pair).send_data(sid, b"", end_stream=True)
    pair.pump()
    assert (at_server(pair)[sid].body, at_server(pair)[sid].ended) == (b"abc", True)
    assert (at_client(pair)[sid].body, at_client(pair)[sid].ended) == (b"xyz", True)
    last = [e for e in of(pair.core_events, h2core.DataReceived) if e.stream_id == sid][-1]
    assert (last.data, last.stream_ended, last.flow_controlled_length) == (b"", True, 0)


@ROLES
def test_grpc_style_exchange_with_response_trailers(core_client: bool) -> None:
    pair = started(core_client)
    head = request(
        b"/pkg.Service/Method",
        method=b"POST",
        extra=[(b"content-type", b"application/grpc"), (b"te", b"trailers")],
    )
    message = b"\0\0\0\0\x05hello"
    sid = pair.open(head)
    pair.send_body(core_client, sid, message)
    server(pair).send_headers(sid, response(extra=[(b"content-type", b"application/grpc")]))
    pair.send_body(not core_client, sid, b"\0\0\0\0\x02ok", end_stream=False)
    trailers = [(b"grpc-status", b"0"), (b"grpc-message", b"fine")]
    server(pair).send_headers(sid, trailers, end_stream=True)
    pair.pump()
    assert at_server(pair)[sid].head == head
    assert at_server(pair)[sid].body == message
    got = at_client(pair)[sid]
    assert (got.body, got.trailers, got.ended, got.reset) == (
        b"\0\0\0\0\x02ok",
        trailers,
        True,
        None,
    )


@ROLES
def test_request_trailers_end_the_request(core_client: bool) -> None:
    pair = started(core_client)
    sid = pair.open(request(method=b"POST", extra=[(b"te", b"trailers")]))
    pair.send_body(core_client, sid, b"part", end_stream=False)
    client(pair).send_headers(sid, [(b"x-checksum", b"abc")], end_stream=True)
    pair.pump()
    seen = at_server(pair)[sid]
    assert (seen.body, seen.trailers, seen.ended) == (b"part", [(b"x-checksum", b"abc")], True)
    server(pair).send_headers(sid, response(b"204"), end_stream=True)
    pair.pump()
    assert at_client(pair)[sid].head == response(b"204")
    assert at_client(pair)[sid].ended


@ROLES
def test_informational_responses_come_before_the_final_one(core_client: bool) -> None:
    pair = started(core_client)
    sid = pair.open(request(method=b"POST", extra=[(b"expect", b"100-continue")]))
    pair.pump()
    server(pair).send_headers(sid, response(b"100"))
    server(pair).send_headers(sid, response(b"103", extra=[(b"link", b"</s.css>; rel=preload")]))
    pair.pump()
    assert at_client(pair)[sid].head is None
    pair.send_body(core_client, sid, b"body")
    server(pair).send_headers(sid, response(), end_stream=True)
    pair.pump()
    got = at_client(pair)[sid]
    assert got.informational == [
        response(b"100"),
        response(b"103", extra=[(b"link", b"</s.css>; rel=preload")]),
    ]
    assert (got.head, got.ended) == (response(), True)
    if core_client:
        infos = of(pair.core_events, h2core.InformationalResponseReceived)
        assert [e.headers[0] for e in infos] == [(b":status", b"100"), (b":status", b"103")]
        assert not [
            e for e in of(pair.core_events, h2core.ResponseReceived) if e.headers[0][1] != b"200"
        ]


def test_response_to_head_may_announce_a_length_without_data() -> None:
    pair = started(True)
    sid = pair.open(request(method=b"HEAD"), end_stream=True)
    pair.pump()
    pair.peer.send_headers(sid, response(extra=[(b"content-length", b"1000")]), end_stream=True)
    pair.pump()
    got = at_client(pair)[sid]
    assert got.head == response(extra=[(b"content-length", b"1000")])
    assert (got.ended, got.reset) == (True, None)
    assert not [f for f in pair.core_frames if f.stream_id == sid and f.type == 0x3]


# -- flow control ----------------------------------------------------------------------


@ROLES
def test_large_body_to_a_peer_with_a_small_window_goes_in_many_frames(core_client: bool) -> None:
    pair = started(core_client, peer_settings={SettingCodes.INITIAL_WINDOW_SIZE: 1000})
    sid = pair.open(request(method=b"POST"))
    if not core_client:
        pair.pump()
        pair.core.send_headers(sid, response())
    payload = body(150_000, 3)
    got, ended = pair.send_body(True, sid, payload)
    assert (got, ended) == (payload, True)
    frames = [f for f in pair.core_frames if isinstance(f, DataFrame) and f.stream_id == sid]
    assert len(frames) >= 150
    assert all(len(f.data) <= 1000 for f in frames)


@ROLES
def test_core_reopens_a_small_receive_window_as_the_app_acknowledges(core_client: bool) -> None:
    pair = started(core_client, local_settings={SettingCodes.INITIAL_WINDOW_SIZE: 1000})
    assert pair.peer.remote_settings.initial_window_size == 1000
    sid = pair.open(request(method=b"POST"))
    if core_client:
        pair.pump()
        pair.peer.send_headers(sid, response())
    payload = body(100_000, 4)
    got, ended = pair.send_body(False, sid, payload)
    assert (got, ended) == (payload, True)
    updates = [
        f for f in pair.core_frames if isinstance(f, WindowUpdateFrame) and f.stream_id == sid
    ]
    assert updates, "the core never reopened the stream window"
    # credit is announced once at least half the window was acknowledged
    assert all(f.window_increment >= 500 for f in updates), [f.window_increment for f in updates]
    assert sum(f.window_increment for f in updates) <= len(payload)


@ROLES
def test_sender_stops_at_the_window_and_resumes_on_window_update(core_client: bool) -> None:
    pair = started(core_client)
    sid = pair.open(request(method=b"POST"))
    if not core_client:
        pair.pump()
        pair.core.send_headers(sid, response())
    sent = 0
    while (
        room := min(pair.core.local_flow_control_window(sid), pair.core.max_outbound_frame_size)
    ) > 0:
        pair.core.send_data(sid, b"x" * room)
        sent += room
    assert sent == 65535
    with pytest.raises(h2core.FlowControlError):
        pair.core.send_data(sid, b"x")
    _, peer_events = pair.pump()
    received = sum(e.flow_controlled_length or 0 for e in of(peer_events, h2.events.DataReceived))
    assert received == 65535
    pair.peer.acknowledge_received_data(received, sid)
    core_events, _ = pair.pump()
    deltas = {e.stream_id: e.delta for e in of(core_events, h2core.WindowUpdated)}
    increments = {
        f.stream_id: f.window_increment
        for f in pair.peer_frames
        if isinstance(f, WindowUpdateFrame)
    }
    assert deltas == increments and set(deltas) == {0, sid}
    assert pair.core.local_flow_control_window(sid) == peer_window(pair, sid) == 65535
    pair.core.send_data(sid, b"y" * 16384, end_stream=True)
    _, peer_events = pair.pump()
    assert of(peer_events, h2.events.StreamEnded)


@ROLES
def test_initial_window_size_growing_mid_stream_frees_the_stalled_sender(core_client: bool) -> None:
    pair = started(core_client, peer_settings={SettingCodes.INITIAL_WINDOW_SIZE: 1000})
    sid = pair.open(request(method=b"POST"))
    if not core_client:
        pair.pump()
        pair.core.send_headers(sid, response())
    pair.core.send_data(sid, b"a" * 1000)
    pair.pump()
    assert pair.core.local_flow_control_window(sid) == 0
    pair.peer.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 5000})
    core_events, _ = pair.pump()
    assert pair.core.remote_settings.initial_window_size == 5000
    assert pair.core.local_flow_control_window(sid) == peer_window(pair, sid) == 4000
    assert [e.changed_settings for e in of(core_events, h2core.RemoteSettingsChanged)] == [
        {SettingCodes.INITIAL_WINDOW_SIZE: 5000}
    ]
    assert [e for e in of(core_events, h2core.WindowUpdated) if e.stream_id == 0]
    pair.core.send_data(sid, b"b" * 4000, end_stream=True)
    _, peer_events = pair.pump()
    assert sum(len(e.data or b"") for e in of(peer_events, h2.events.DataReceived)) == 4000


@ROLES
def test_initial_window_size_shrinking_mid_stream_makes_the_window_negative(
    core_client: bool,
) -> None:
    pair = started(core_client)
    sid = pair.open(request(method=b"POST"))
    if not core_client:
        pair.pump()
        pair.core.send_headers(sid, response())
    pair.core.send_data(sid, b"a" * 16384)
    pair.core.send_data(sid, b"a" * 3616)
    pair.pump()
    pair.peer.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 1000})
    pair.pump()
    assert pair.core.remote_settings.initial_window_size == 1000
    assert peer_window(pair, sid) == 1000 - 20000
    assert pair.core.local_flow_control_window(sid) <= 0
    with pytest.raises(h2core.FlowControlError):
        pair.core.send_data(sid, b"b")
    # another stream opened now starts from the new, smaller window
    other = pair.open(request(), end_stream=core_client)
    if not core_client:
        pair.pump()
        pair.core.send_headers(other, response())
    assert pair.core.local_flow_control_window(other) == 1000
    # the peer hands back what it read: the window climbs out of the hole
    pair.peer.acknowledge_received_data(20000, sid)
    pair.pump()
    expected = peer_window(pair, sid)
    assert expected > 0
    assert pair.core.local_flow_control_window(sid) == expected
    payload = body(5000, 5)
    got, ended = pair.send_body(True, sid, payload)
    assert (got, ended) == (payload, True)


# -- many streams, big header blocks, HPACK state ---------------------------------------


@ROLES
def test_a_hundred_concurrent_streams_with_interleaved_bodies(core_client: bool) -> None:
    pair = started(core_client, local_settings={SettingCodes.MAX_CONCURRENT_STREAMS: 128})
    sids = [pair.open(request(f"/{i}".encode(), method=b"POST")) for i in range(100)]
    pair.pump()
    assert pair.core.open_streams == 100
    for rnd in range(3):
        for i, sid in enumerate(sids):
            client(pair).send_data(sid, bytes([i]) * 300, end_stream=rnd == 2)
        pair.ack(*pair.pump())
    seen = at_server(pair)
    for i, sid in enumerate(sids):
        assert seen[sid].head == request(f"/{i}".encode(), method=b"POST")
        assert (seen[sid].body, seen[sid].ended) == (bytes([i]) * 900, True)
    for i, sid in enumerate(reversed(sids)):
        server(pair).send_headers(sid, response())
        server(pair).send_data(sid, str(i).encode(), end_stream=True)
    pair.pump()
    got = at_client(pair)
    assert all(got[sid].ended and got[sid].head == response() for sid in sids)
    assert [got[sid].body for sid in reversed(sids)] == [str(i).encode() for i in range(100)]
    assert pair.core.open_streams == 0


def _blocks(frames: list[Frame], sid: int) -> list[list[Frame]]:
    """The header blocks on ``sid``: each a HEADERS and its CONTINUATIONs, checked contiguous."""
    blocks: list[list[Frame]] = []
    open_block: list[Frame] | None = None
    for f in frames:
        if open_block is not None:
            assert isinstance(f, ContinuationFrame) and f.stream_id == sid, f"{f} inside a block"
            open_block.append(f)
            if "END_HEADERS" in f.flags:
                open_block = None
        elif isinstance(f, HeadersFrame) and f.stream_id == sid:
            blocks.append([f])
            if "END_HEADERS" not in f.flags:
                open_block = blocks[-1]
        else:
            assert not isinstance(f, ContinuationFrame), "CONTINUATION outside a block"
    assert open_block is None
    return blocks


@ROLES
def test_header_blocks_larger_than_a_frame_go_in_continuations_both_ways(core_client: bool) -> None:
    big = [(f"x-big-{i}".encode(), text(10_000, i)) for i in range(4)]
    pair = started(core_client, local_settings={SettingCodes.MAX_HEADER_LIST_SIZE: 1 << 17})
    assert pair.core.max_outbound_frame_size == 16384
    sid = pair.open(request(extra=big))
    pair.pump()
    assert at_server(pair)[sid].head == request(extra=big)
    server(pair).send_headers(sid, response(extra=big))
    pair.pump()
    client(pair).send_headers(sid, big, end_stream=True)  # trailers, as big
    pair.pump()
    server(pair).send_headers(sid, big, end_stream=True)
    pair.pump()
    assert at_server(pair)[sid].trailers == big
    got = at_client(pair)[sid]
    assert (got.head, got.trailers, got.ended) == (response(extra=big), big, True)
    for frames in (pair.core_frames, pair.peer_frames):
        blocks = _blocks(frames, sid)
        assert len(blocks) == 2
        for block in blocks:
            assert len(block) >= 2  # more than 16384 bytes: HEADERS + CONTINUATION(s)
            assert all(
                isinstance(f, HeadersFrame | ContinuationFrame) and len(f.data) <= 16384
                for f in block
            )


@ROLES
def test_hpack_dynamic_tables_stay_in_step_over_many_requests(core_client: bool) -> None:
    pair = started(core_client)
    rng = random.Random(7)
    pool = [(f"x-h{i}".encode(), text(rng.randrange(1, 300), i)) for i in range(40)]
    sent_heads: dict[int, Headers] = {}
    sent_resps: dict[int, Headers] = {}
    for n in range(250):
        extra = [*rng.sample(pool, rng.randrange(0, 8)), (b"x-n", str(n).encode())]
        head = request(f"/r/{n}".encode(), extra=extra)
        sid = pair.open(head, end_stream=True)
        sent_heads[sid] = head
        pair.pump()
        resp = response(extra=rng.sample(pool, rng.randrange(0, 8)))
        server(pair).send_headers(sid, resp, end_stream=True)
        sent_resps[sid] = resp
        pair.pump()
    seen, got = at_server(pair), at_client(pair)
    assert {sid: v.head for sid, v in seen.items()} == sent_heads
    assert {sid: v.head for sid, v in got.items()} == sent_resps
    # the core does use its dynamic table: its blocks are smaller than fresh-table encodings
    ours = sum(len(f.data) for f in pair.core_frames if isinstance(f, HeadersFrame))
    fresh = sum(
        len(hpack.Encoder().encode(h)) for h in (sent_heads if core_client else sent_resps).values()
    )
    assert ours < 0.9 * fresh, (ours, fresh)
    assert not pair.core.closed


@ROLES
def test_peer_shrinking_its_header_table_is_signalled_and_honoured(core_client: bool) -> None:
    pair = started(core_client)
    pool = [(f"x-h{i}".encode(), text(100, i)) for i in range(10)]

    def exchange(n: int) -> int:
        head = request(f"/{n}".encode(), extra=pool[n % 10 :] + pool[: n % 10])
        sid = pair.open(head, end_stream=True)
        pair.pump()
        server(pair).send_headers(sid, response(extra=pool), end_stream=True)
        pair.pump()
        assert at_server(pair)[sid].head == head
        assert at_client(pair)[sid].head == response(extra=pool)
        return sid

    for n in range(5):
        exchange(n)
    mark = len(pair.core_frames)
    pair.peer.update_settings({SettingCodes.HEADER_TABLE_SIZE: 0})
    pair.pump()
    assert pair.core.remote_settings.header_table_size == 0
    for n in range(5, 10):
        exchange(n)
    # the first header block the core sent after the change opens with a size update to 0
    first = next(f for f in pair.core_frames[mark:] if isinstance(f, HeadersFrame))
    assert first.data[0] == 0x20, first.data[:4].hex()
    # ...and from then on it adds nothing to its table (mirror decoder of everything it sent)
    mirror = hpack.Decoder()
    for f in pair.core_frames:
        if isinstance(f, (HeadersFrame, ContinuationFrame)):
            mirror.decode(f.data, raw=True)
    assert mirror.header_table.maxsize == 0
    # growing it again is allowed and still decodes
    pair.peer.update_settings({SettingCodes.HEADER_TABLE_SIZE: 256})
    pair.pump()
    for n in range(10, 15):
        exchange(n)
    assert not pair.core.closed


# -- resets ----------------------------------------------------------------------------


@ROLES
def test_core_resets_a_stream_the_peer_sees_it_and_others_go_on(core_client: bool) -> None:
    pair = started(core_client)
    doomed = pair.open(request(method=b"POST"))
    other = pair.open(request(method=b"POST"))
    pair.pump()
    if not core_client:
        pair.core.send_headers(doomed, response())
    client(pair).send_data(doomed, b"a" * 100)
    pair.pump()
    pair.core.reset_stream(doomed, ErrorCodes.CANCEL)
    core_events, peer_events = pair.pump()
    assert [(e.stream_id, e.error_code) for e in of(peer_events, h2.events.StreamReset)] == [
        (doomed, ErrorCodes.CANCEL)
    ]
    assert not of(core_events, h2core.StreamReset)  # no event for our own reset
    with pytest.raises(h2core.StreamClosedError):
        pair.core.send_data(doomed, b"x")
    with pytest.raises(h2core.StreamClosedError):
        pair.core.send_headers(doomed, response())
    client(pair).send_data(other, b"fine", end_stream=True)
    pair.pump()
    server(pair).send_headers(other, response(), end_stream=True)
    pair.pump()
    assert at_server(pair)[other].body == b"fine" and at_client(pair)[other].ended
    assert pair.core.open_streams == 0


@ROLES
def test_peer_resets_a_stream_the_core_reports_it_remote(core_client: bool) -> None:
    pair = started(core_client)
    sid = pair.open(request(method=b"POST"))
    pair.pump()
    pair.peer.reset_stream(sid, ErrorCodes.INTERNAL_ERROR)
    core_events, _ = pair.pump()
    resets = of(core_events, h2core.StreamReset)
    assert [(e.stream_id, e.error_code, e.remote) for e in resets] == [
        (sid, ErrorCodes.INTERNAL_ERROR, True)
    ]
    with pytest.raises(h2core.StreamClosedError):
        pair.core.send_data(sid, b"x")
    # the connection is fine: another exchange
    sid2 = pair.open(request(), end_stream=True)
    pair.pump()
    server(pair).send_headers(sid2, response(), end_stream=True)
    pair.pump()
    assert at_client(pair)[sid2].ended and not pair.core.closed


# -- GOAWAY and closing ----------------------------------------------------------------


def test_send_goaway_lets_streams_up_to_the_last_id_finish_and_refuses_later_ones() -> None:
    pair = started(False)
    s1 = pair.open(request(method=b"POST"))
    s3 = pair.open(request(), end_stream=True)
    pair.pump()
    pair.core.send_goaway(s3)
    pair.pump()
    assert [(g.last_stream_id, g.error_code) for g in pair.goaways] == [(s3, 0)]
    assert not pair.core.closed
    # h2 never saw the GOAWAY (lifted out): it opens another stream, which is refused
    s5 = pair.open(request(), end_stream=True)
    core_events, peer_events = pair.pump()
    assert not of(core_events, h2core.RequestReceived)
    assert [(e.stream_id, e.error_code) for e in of(peer_events, h2.events.StreamReset)] == [
        (s5, ErrorCodes.REFUSED_STREAM)
    ]
    # the streams under the promise run to completion
    pair.send_body(False, s1, body(100_000, 9))
    for sid in (s1, s3):
        pair.core.send_headers(sid, response())
        pair.send_body(True, sid, body(80_000, sid))
    got = at_client(pair)
    assert at_server(pair)[s1].body == body(100_000, 9)
    assert got[s1].body == body(80_000, s1) and got[s3].body == body(80_000, s3)
    assert got[s1].ended and got[s3].ended and s5 not in at_server(pair)


def test_client_core_sends_goaway_and_its_open_stream_still_completes() -> None:
    pair = started(True)
    sid = pair.open(request(), end_stream=True)
    pair.pump()
    pair.core.send_goaway(0)
    pair.pump()
    assert [(g.last_stream_id, g.error_code) for g in pair.goaways] == [(0, 0)]
    pair.peer.send_headers(sid, response())
    pair.send_body(False, sid, body(70_000, 1))
    got = at_client(pair)[sid]
    assert (got.body, got.ended) == (body(70_000, 1), True)


@ROLES
def test_goaway_received_is_an_event_and_streams_below_it_still_work(core_client: bool) -> None:
    pair = started(core_client)
    sids = [pair.open(request(method=b"POST")) for _ in range(3)]
    pair.pump()
    last = sids[1]
    goaway = raw(0x7, 0, 0, last.to_bytes(4, "big") + (0).to_bytes(4, "big") + b"bye")
    events = pair.core.receive_data(goaway)
    goaways = of(events, h2core.GoAwayReceived)
    assert [(e.last_stream_id, e.error_code, e.additional_data) for e in goaways] == [
        (last, 0, b"bye")
    ]
    assert not pair.core.closed
    if core_client:
        with pytest.raises(h2core.ProtocolError):
            pair.core.send_headers(pair.core.get_next_available_stream_id(), request())
    for sid in sids[:2]:
        pair.send_body(core_client, sid, b"req")
        server(pair).send_headers(sid, response())
        pair.send_body(not core_client, sid, body(70_000, sid))
    got = at_client(pair)
    assert all(got[sid].body == body(70_000, sid) and got[sid].ended for sid in sids[:2])


@ROLES
def test_close_connection_sends_goaway_with_the_last_peer_stream_and_ends(
    core_client: bool,
) -> None:
    pair = started(core_client)
    sid = pair.open(request(), end_stream=True)
    pair.pump()
    pair.core.close_connection(ErrorCodes.ENHANCE_YOUR_CALM)
    assert pair.core.closed
    pair.pump()
    expected_last = 0 if core_client else sid
    assert [(g.last_stream_id, g.error_code) for g in pair.goaways] == [
        (expected_last, ErrorCodes.ENHANCE_YOUR_CALM)
    ]
    # later input is ignored, later sends raise
    if core_client:
        pair.peer.send_headers(sid, response(), end_stream=True)
    else:
        pair.peer.send_headers(pair.peer.get_next_available_stream_id(), request(), end_stream=True)
    assert pair.core.receive_data(pair.peer.data_to_send()) == []
    assert pair.core.data_to_send() == b""
    with pytest.raises(h2core.ProtocolError):
        pair.core.send_headers(
            sid if not core_client else 3, response() if not core_client else request()
        )


# -- CONNECT ---------------------------------------------------------------------------

WEBSOCKET = [
    (b":method", b"CONNECT"),
    (b":protocol", b"websocket"),
    (b":scheme", b"https"),
    (b":path", b"/chat"),
    (b":authority", b"web.test"),
    (b"sec-websocket-version", b"13"),
]


def test_extended_connect_accepted_when_we_enabled_it() -> None:
    pair = started(False, local_settings={SettingCodes.ENABLE_CONNECT_PROTOCOL: 1})
    assert pair.peer.remote_settings.enable_connect_protocol == 1
    sid = pair.open(WEBSOCKET)
    core_events, _ = pair.pump()
    assert [e.headers for e in of(core_events, h2core.RequestReceived)] == [WEBSOCKET]
    pair.core.send_headers(sid, response())
    pair.pump()
    pair.send_body(False, sid, b"\x81\x02hi", end_stream=False)
    pair.send_body(True, sid, b"\x81\x02yo", end_stream=False)
    assert at_server(pair)[sid].body == b"\x81\x02hi"
    assert at_client(pair)[sid].body == b"\x81\x02yo" and at_client(pair)[sid].head == response()


def test_extended_connect_refused_when_we_did_not_enable_it() -> None:
    pair = started(False)
    assert pair.peer.remote_settings.enable_connect_protocol == 0
    sid = pair.open(WEBSOCKET)
    core_events, peer_events = pair.pump()
    assert not of(core_events, h2core.RequestReceived)
    assert [(e.stream_id, e.error_code) for e in of(peer_events, h2.events.StreamReset)] == [
        (sid, ErrorCodes.PROTOCOL_ERROR)
    ]
    # a plain request afterwards is fine (the refused block still updated HPACK state)
    sid2 = pair.open(request(extra=[(b"sec-websocket-version", b"13")]), end_stream=True)
    core_events, _ = pair.pump()
    assert [e.stream_id for e in of(core_events, h2core.RequestReceived)] == [sid2]


def test_plain_connect_needs_only_an_authority() -> None:
    pair = started(False)
    head = [(b":method", b"CONNECT"), (b":authority", b"db.test:5432")]
    sid = pair.open(head)
    core_events, _ = pair.pump()
    assert [(e.stream_id, e.headers) for e in of(core_events, h2core.RequestReceived)] == [
        (sid, head)
    ]


def test_client_core_sees_the_peer_enable_extended_connect_and_uses_it() -> None:
    pair = started(True, peer_settings={SettingCodes.ENABLE_CONNECT_PROTOCOL: 1})
    assert pair.core.remote_settings.enable_connect_protocol == 1
    sid = pair.open(WEBSOCKET)
    _, peer_events = pair.pump()
    assert [
        [tuple(h) for h in e.headers or []] for e in of(peer_events, h2.events.RequestReceived)
    ] == [WEBSOCKET]
    pair.peer.send_headers(sid, response())
    pair.pump()
    assert at_client(pair)[sid].head == response()


def test_h2_rejects_what_the_core_sends_nowhere() -> None:
    """Sanity of the harness: h2 as the peer does raise on a bad frame from the core's side."""
    pair = started(False)
    with pytest.raises(h2.exceptions.ProtocolError):
        pair.peer.receive_data(raw(0x0, 0, 0, b"x"))
