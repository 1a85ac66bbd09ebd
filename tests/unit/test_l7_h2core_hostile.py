"""Our HTTP/2 core against hand-built hostile frames (raw bytes; hpack for header blocks).

Each test reads back what the core sent (parsed with hyperframe) and checks the
GOAWAY or RST_STREAM code RFC 9113 and h2core's contract name, that a stream
error leaves other streams alone, and that nothing malformed becomes an event.
"""

from __future__ import annotations

import pytest
from hyperframe.frame import DataFrame, PingFrame, SettingsFrame, WindowUpdateFrame

from mcproxy.worker.l7 import h2core
from mcproxy.worker.l7.frames import Abuse, FrameWatch
from mcproxy.worker.l7.h2core import ErrorCodes, SettingCodes
from tests.unit.h2peer import (
    ACK,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    Clock,
    Headers,
    Raw,
    data,
    goaway_codes,
    of,
    raw,
    request,
    resets,
    response,
    settings,
    window_update,
)

PROTOCOL = ErrorCodes.PROTOCOL_ERROR
FRAME_SIZE = ErrorCodes.FRAME_SIZE_ERROR
FLOW = ErrorCodes.FLOW_CONTROL_ERROR
CALM = ErrorCodes.ENHANCE_YOUR_CALM


def server(**kwargs: object) -> Raw:
    """A server-role core after a clean start (preface, SETTINGS both ways, ACKs)."""
    srv = Raw(**kwargs)  # type: ignore[arg-type]
    srv.start()
    frames = srv.out()
    assert isinstance(frames[0], SettingsFrame) and "ACK" not in frames[0].flags
    assert any(isinstance(f, SettingsFrame) and "ACK" in f.flags for f in frames)
    return srv


def with_stream(sid: int = 1, **kwargs: object) -> Raw:
    """...with stream ``sid`` open (a POST whose body is still to come)."""
    srv = server(**kwargs)
    events = srv.feed(srv.headers(sid, request(method=b"POST")))
    assert [e.stream_id for e in of(events, h2core.RequestReceived)] == [sid]
    srv.out()
    return srv


def client() -> Raw:
    """A client-role core that opened stream 1 (GET), after a clean start."""
    cli = Raw(core_client=True)
    cli.start()
    cli.core.send_headers(1, request(), end_stream=True)
    cli.out()
    return cli


# -- framing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "sid"),
    [(HEADERS, 1), (DATA, 1), (SETTINGS, 0), (PING, 0), (0xFA, 0)],
    ids=["headers", "data", "settings", "ping", "unknown"],
)
def test_frame_announced_over_16384_bytes_fails_at_its_header(kind: int, sid: int) -> None:
    srv = server()
    srv.connection_error(raw(kind, 0, sid, length=16385), FRAME_SIZE)


def test_a_frame_of_exactly_16384_bytes_is_fine() -> None:
    srv = with_stream()
    events = srv.feed(data(1, b"x" * 16384))
    assert sum(len(e.data) for e in of(events, h2core.DataReceived)) == 16384


@pytest.mark.parametrize(
    "preface",
    [b"GET / HTTP/1.1\r\nHost: web.test\r\n\r\n", PREFACE[:-1] + b"X", b"\0" * 24],
    ids=["http1", "last-byte", "zeros"],
)
def test_bad_preface_is_a_protocol_error(preface: bytes) -> None:
    srv = Raw()
    srv.connection_error(preface + settings(), PROTOCOL)


def test_preface_fed_byte_by_byte_is_fine() -> None:
    srv = Raw()
    for i in range(len(PREFACE)):
        assert srv.feed(PREFACE[i : i + 1]) == []
    events = srv.feed(settings({SettingCodes.MAX_CONCURRENT_STREAMS: 5}))
    assert of(events, h2core.RemoteSettingsChanged)


@pytest.mark.parametrize(
    "first",
    [raw(PING, 0, 0, b"\0" * 8), window_update(0, 100), raw(HEADERS, END_HEADERS, 1, b"\x82")],
    ids=["ping", "window-update", "headers"],
)
def test_first_frame_other_than_settings_is_a_protocol_error(first: bytes) -> None:
    srv = Raw()
    srv.connection_error(PREFACE + first, PROTOCOL)


# -- SETTINGS --------------------------------------------------------------------------


def test_settings_length_not_a_multiple_of_six() -> None:
    server().connection_error(raw(SETTINGS, 0, 0, b"\0\x03\0\0\0\x64\0"), FRAME_SIZE)


def test_settings_on_a_stream() -> None:
    server().connection_error(raw(SETTINGS, 0, 1, b""), PROTOCOL)


def test_settings_ack_with_a_payload() -> None:
    server().connection_error(raw(SETTINGS, ACK, 0, b"\0\x03\0\0\0\x64"), FRAME_SIZE)


@pytest.mark.parametrize(
    ("setting", "value", "code"),
    [
        (SettingCodes.ENABLE_PUSH, 2, PROTOCOL),
        (SettingCodes.INITIAL_WINDOW_SIZE, 2**31, FLOW),
        (SettingCodes.MAX_FRAME_SIZE, 16383, PROTOCOL),
        (SettingCodes.MAX_FRAME_SIZE, 2**24, PROTOCOL),
        (SettingCodes.ENABLE_CONNECT_PROTOCOL, 2, PROTOCOL),
    ],
    ids=["enable-push-2", "window-2**31", "frame-16383", "frame-2**24", "connect-2"],
)
def test_settings_value_out_of_range(setting: int, value: int, code: int) -> None:
    server().connection_error(settings({setting: value}), code)


def test_settings_values_at_the_limits_and_unknown_ids_are_accepted() -> None:
    srv = server()
    values = {
        SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1,
        SettingCodes.MAX_FRAME_SIZE: 2**24 - 1,
        0x4242: 7,
    }
    events = srv.feed(settings(values))
    assert of(events, h2core.RemoteSettingsChanged)
    assert srv.core.remote_settings.max_frame_size == 2**24 - 1
    frames = srv.out()
    assert [f for f in frames if isinstance(f, SettingsFrame) and "ACK" in f.flags]
    assert not srv.core.closed


def test_a_server_enabling_push_is_a_protocol_error_for_the_client() -> None:
    cli = Raw(core_client=True)
    cli.connection_error(settings({SettingCodes.ENABLE_PUSH: 1}), PROTOCOL)


def test_window_overflow_through_initial_window_size_is_a_flow_control_error() -> None:
    srv = with_stream()
    srv.feed(window_update(1, 2**31 - 1 - 65535))  # the core's send window on 1: exactly 2**31-1
    assert not srv.core.closed and not resets(srv.out())
    srv.connection_error(settings({SettingCodes.INITIAL_WINDOW_SIZE: 65536}), FLOW)


# -- PING, WINDOW_UPDATE, RST_STREAM, GOAWAY -------------------------------------------


def test_ping_is_answered_with_the_same_payload_and_a_ping_ack_is_not() -> None:
    srv = server()
    srv.feed(raw(PING, 0, 0, b"12345678") + raw(PING, ACK, 0, b"abcdefgh"))
    pongs = [f for f in srv.out() if isinstance(f, PingFrame)]
    assert [(f.opaque_data, "ACK" in f.flags) for f in pongs] == [(b"12345678", True)]


def test_ping_of_the_wrong_length() -> None:
    server().connection_error(raw(PING, 0, 0, b"1234567"), FRAME_SIZE)


def test_ping_on_a_stream() -> None:
    with_stream().connection_error(raw(PING, 0, 1, b"12345678"), PROTOCOL)


def test_window_update_of_zero_on_the_connection() -> None:
    server().connection_error(window_update(0, 0), PROTOCOL)


def test_window_update_of_zero_on_a_stream() -> None:
    with_stream().stream_or_connection_error(window_update(1, 0), 1, PROTOCOL)


def test_window_update_of_the_wrong_length() -> None:
    server().connection_error(raw(WINDOW_UPDATE, 0, 0, b"\0\0\x01"), FRAME_SIZE)


def test_window_update_overflowing_the_connection_window() -> None:
    srv = server()
    srv.feed(window_update(0, 2**31 - 1 - 65535))  # exactly the maximum: fine
    assert not srv.core.closed
    srv.connection_error(window_update(0, 1), FLOW)


def test_window_update_overflowing_a_stream_window() -> None:
    with_stream().stream_or_connection_error(window_update(1, 2**31 - 1), 1, FLOW)


def test_window_update_on_an_idle_stream() -> None:
    server().connection_error(window_update(1, 100), PROTOCOL)


def test_rst_stream_on_stream_zero() -> None:
    server().connection_error(raw(RST_STREAM, 0, 0, b"\0\0\0\x08"), PROTOCOL)


def test_rst_stream_on_an_idle_stream() -> None:
    with_stream().connection_error(raw(RST_STREAM, 0, 7, b"\0\0\0\x08"), PROTOCOL)


def test_rst_stream_of_the_wrong_length() -> None:
    with_stream().connection_error(raw(RST_STREAM, 0, 1, b"\0\0\x08"), FRAME_SIZE)


def test_goaway_shorter_than_eight_bytes() -> None:
    server().connection_error(raw(GOAWAY, 0, 0, b"\0\0\0\0\0\0\0"), FRAME_SIZE)


def test_goaway_on_a_stream() -> None:
    with_stream().connection_error(raw(GOAWAY, 0, 1, b"\0" * 8), PROTOCOL)


# -- DATA ------------------------------------------------------------------------------


def test_data_on_stream_zero() -> None:
    server().connection_error(data(0, b"x"), PROTOCOL)


def test_data_on_an_idle_stream() -> None:
    with_stream().connection_error(data(3, b"x"), PROTOCOL)


def test_data_beyond_the_stream_window() -> None:
    srv = with_stream(local_settings={SettingCodes.INITIAL_WINDOW_SIZE: 1000})
    srv.feed(data(1, b"x" * 600))
    srv.feed(data(1, b"x" * 400))  # exactly the window: fine
    assert not srv.core.closed
    srv.connection_error(data(1, b"x"), FLOW)


def test_data_beyond_the_connection_window() -> None:
    srv = server(local_settings={SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
    for sid in (1, 3, 5, 7, 9):
        srv.feed(srv.headers(sid, request(method=b"POST")))
    for sid in (1, 3, 5, 7):
        srv.feed(data(sid, b"x" * 16383))
    srv.feed(data(9, b"x" * 3))  # 65535 in all: fine
    assert not srv.core.closed
    srv.connection_error(data(9, b"x"), FLOW)


def test_padding_counts_against_the_window_and_the_core_hands_it_back() -> None:
    srv = with_stream(local_settings={SettingCodes.INITIAL_WINDOW_SIZE: 1000})
    stream_window, conn_window = 1000, 65535
    for f in srv.sent:
        if isinstance(f, WindowUpdateFrame) and f.stream_id == 0:
            conn_window += f.window_increment
    got = b""
    for i in range(40):  # 40 x 301 flow-controlled bytes, 40 x 100 of them data
        assert stream_window >= 301 and conn_window >= 301, (i, stream_window, conn_window)
        events = srv.feed(data(1, bytes([i]) * 100, pad=200))
        stream_window -= 301
        conn_window -= 301
        for e in of(events, h2core.DataReceived):
            assert e.flow_controlled_length == len(e.data) == 100
            got += e.data
            srv.core.acknowledge_received_data(len(e.data), 1)  # the app acks data only
        for f in srv.out():
            if isinstance(f, WindowUpdateFrame):
                if f.stream_id == 1:
                    stream_window += f.window_increment
                elif f.stream_id == 0:
                    conn_window += f.window_increment
    assert got == b"".join(bytes([i]) * 100 for i in range(40))
    assert not srv.core.closed


@pytest.mark.parametrize("kind", [DATA, HEADERS])
def test_padding_as_long_as_the_payload(kind: int) -> None:
    srv = with_stream()
    flags = PADDED | (END_HEADERS | END_STREAM if kind == HEADERS else 0)
    srv.connection_error(raw(kind, flags, 1 if kind == DATA else 3, bytes([5]) + b"abcd"), PROTOCOL)


def test_data_after_end_stream_resets_the_stream() -> None:
    srv = server()
    srv.feed(srv.headers(1, request(method=b"POST")) + srv.headers(3, request(method=b"POST")))
    srv.feed(data(1, b"done", end=True))
    srv.out()
    events = srv.stream_error(data(1, b"more"), 1, ErrorCodes.STREAM_CLOSED)
    assert not of(events, h2core.DataReceived)
    assert [(e.stream_id, e.remote) for e in of(events, h2core.StreamReset)] == [(1, False)]
    events = srv.feed(data(3, b"other", end=True))
    assert [(e.stream_id, e.data, e.stream_ended) for e in of(events, h2core.DataReceived)] == [
        (3, b"other", True)
    ]


def test_frames_on_a_stream_the_app_reset_are_dropped_and_credited_back() -> None:
    srv = with_stream()
    srv.core.reset_stream(1, ErrorCodes.CANCEL)
    assert resets(srv.out()) == {1: ErrorCodes.CANCEL}
    conn_window = 65535 + sum(
        f.window_increment
        for f in srv.sent
        if isinstance(f, WindowUpdateFrame) and f.stream_id == 0
    )
    # 200 KB more on the reset stream: more than the connection window, so only credit helps
    for _ in range(13):
        assert conn_window >= 16384, conn_window
        assert srv.feed(data(1, b"x" * 16384)) == []
        conn_window -= 16384
        conn_window += sum(
            f.window_increment
            for f in srv.out()
            if isinstance(f, WindowUpdateFrame) and f.stream_id == 0
        )
    # its trailers are decoded for HPACK's sake: a later request indexing them still decodes
    srv.feed(srv.headers(1, [(b"x-after-reset", b"v" * 40)], end_stream=True))
    head = request(extra=[(b"x-after-reset", b"v" * 40)])
    events = srv.feed(srv.headers(3, head, end_stream=True))
    assert [e.headers for e in of(events, h2core.RequestReceived)] == [head]
    assert not srv.core.closed


# -- stream ids, CONTINUATION, PUSH_PROMISE, unknown and PRIORITY frames ----------------


def test_even_stream_id_from_a_client() -> None:
    srv = server()
    srv.connection_error(srv.headers(2, request(), end_stream=True), PROTOCOL)


def test_decreasing_stream_ids() -> None:
    srv = server()
    srv.feed(srv.headers(5, request(), end_stream=True))
    srv.connection_error(srv.headers(3, request(), end_stream=True), PROTOCOL)


def test_header_block_in_one_byte_continuations_is_fine() -> None:
    srv = server()
    block = srv.block(request(extra=[(b"x-split", b"yes")]))
    chunk = raw(HEADERS, END_STREAM, 1, block[:1])
    for i in range(1, len(block)):
        chunk += raw(CONTINUATION, END_HEADERS if i == len(block) - 1 else 0, 1, block[i : i + 1])
    events = srv.feed(chunk)
    assert [e.headers for e in of(events, h2core.RequestReceived)] == [
        request(extra=[(b"x-split", b"yes")])
    ]


def test_continuation_without_headers() -> None:
    srv = with_stream()
    srv.connection_error(raw(CONTINUATION, END_HEADERS, 1, b"\x82"), PROTOCOL)


@pytest.mark.parametrize(
    "between",
    [
        raw(PING, 0, 0, b"\0" * 8),
        raw(CONTINUATION, END_HEADERS, 5, b"\x82"),
        raw(HEADERS, END_HEADERS, 5, b"\x82"),
        data(1, b"x"),
    ],
    ids=["ping", "continuation-other-stream", "headers-other-stream", "data"],
)
def test_header_block_interrupted_by_another_frame(between: bytes) -> None:
    srv = with_stream()
    block = srv.block(request())
    srv.connection_error(
        raw(HEADERS, 0, 3, block[:3]) + between + raw(CONTINUATION, END_HEADERS, 3, block[3:]),
        PROTOCOL,
    )


def test_endless_continuation_is_cut_before_it_is_buffered_far() -> None:
    srv = server()
    chunk = raw(HEADERS, 0, 1, srv.block(request()))
    fed = 0
    with pytest.raises(h2core.ProtocolError) as info:
        srv.feed(chunk)
        for _ in range(1000):  # up to 16 MB
            piece = raw(CONTINUATION, 0, 1, b"\x40\x81\x9f\x81\x9f" * 3276)
            srv.feed(piece)
            fed += len(piece)
    assert fed <= 1 << 20, f"{fed} bytes of one header block taken in"
    assert info.value.error_code in (CALM, PROTOCOL, ErrorCodes.COMPRESSION_ERROR)
    assert goaway_codes(srv.out())[-1:] == [info.value.error_code]


def test_empty_continuation_flood_spends_the_glitch_budget() -> None:
    srv = server(watch=FrameWatch(Clock(), budget=50, rate=1.0))
    srv.feed(raw(HEADERS, 0, 1, srv.block(request())[:2]))
    with pytest.raises(Abuse):
        srv.feed(raw(CONTINUATION, 0, 1) * 10_000)
    assert goaway_codes(srv.out())[-1:] == [CALM]


def test_push_promise_from_a_client() -> None:
    srv = with_stream()
    srv.connection_error(
        raw(PUSH_PROMISE, END_HEADERS, 1, b"\0\0\0\x02" + srv.block(request())), PROTOCOL
    )


def test_push_promise_to_a_client_that_never_enabled_push() -> None:
    cli = client()
    promise = b"\0\0\0\x02" + cli.block(request(b"/pushed"))
    cli.connection_error(raw(PUSH_PROMISE, END_HEADERS, 1, promise), PROTOCOL)


def test_unknown_frame_types_and_priority_are_ignored() -> None:
    srv = with_stream()
    events = srv.feed(
        raw(0xFA, 0xFF, 0, b"whatever")
        + raw(0xFB, 0, 1, b"x" * 100)
        + raw(PRIORITY, 0, 1, b"\0\0\0\x03\x10")
        + raw(PRIORITY, 0, 9, b"\0\0\0\x00\x10")  # PRIORITY may name an idle stream
    )
    assert events == []
    assert not srv.core.closed and not resets(srv.out())
    # HEADERS with the PRIORITY flag: the five priority bytes are not part of the block
    head = request(b"/prio")
    block = b"\x80\0\0\x01\x20" + srv.block(head)
    events = srv.feed(raw(HEADERS, PRIORITY_FLAG | END_HEADERS | END_STREAM, 3, block))
    assert [e.headers for e in of(events, h2core.RequestReceived)] == [head]


# -- header validation -----------------------------------------------------------------

R = request()
BAD_REQUESTS: dict[str, Headers] = {
    "uppercase-name": [*R, (b"X-Foo", b"1")],
    "connection": [*R, (b"connection", b"keep-alive")],
    "keep-alive": [*R, (b"keep-alive", b"timeout=5")],
    "proxy-connection": [*R, (b"proxy-connection", b"keep-alive")],
    "transfer-encoding": [*R, (b"transfer-encoding", b"chunked")],
    "upgrade": [*R, (b"upgrade", b"h2c")],
    "te-gzip": [*R, (b"te", b"gzip")],
    "pseudo-after-regular": [R[0], R[1], (b"accept", b"*/*"), R[2], R[3]],
    "duplicate-path": [*R, (b":path", b"/again")],
    "duplicate-method": [R[0], *R],
    "missing-method": R[1:],
    "missing-scheme": [R[0], R[2], R[3]],
    "missing-path": R[:3],
    "empty-path": [*R[:3], (b":path", b"")],
    "unknown-pseudo": [*R, (b":foo", b"bar")],
    "status-in-request": [*R, (b":status", b"200")],
    "protocol-on-get": [*R, (b":protocol", b"websocket")],
    "connect-with-path": [(b":method", b"CONNECT"), (b":authority", b"a:1"), (b":path", b"/")],
    "connect-without-authority": [(b":method", b"CONNECT")],
    "cr-in-value": [*R, (b"x-a", b"a\rb")],
    "lf-in-value": [*R, (b"x-a", b"a\nb")],
    "nul-in-value": [*R, (b"x-a", b"a\0b")],
    "leading-space": [*R, (b"x-a", b" a")],
    "trailing-tab": [*R, (b"x-a", b"a\t")],
    "content-length-not-digits": [*R, (b"content-length", b"1a")],
    "content-length-negative": [*R, (b"content-length", b"-1")],
}


@pytest.mark.parametrize("headers", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_malformed_request_head_resets_only_its_stream(headers: Headers) -> None:
    srv = with_stream(1)
    events = srv.stream_error(srv.headers(3, headers, end_stream=True), 3, PROTOCOL)
    assert not of(events, h2core.RequestReceived)
    assert not of(events, h2core.StreamReset)  # the app never knew stream 3
    # stream 1 goes on, and a later stream decodes (the bad block kept HPACK in step)
    events = srv.feed(data(1, b"body", end=True))
    assert [(e.stream_id, e.data, e.stream_ended) for e in of(events, h2core.DataReceived)] == [
        (1, b"body", True)
    ]
    srv.core.send_headers(1, response(), end_stream=True)
    events = srv.feed(srv.headers(5, request(b"/later"), end_stream=True))
    assert [(e.stream_id, e.headers) for e in of(events, h2core.RequestReceived)] == [
        (5, request(b"/later"))
    ]
    assert not srv.core.closed


def test_te_trailers_is_the_one_te_allowed() -> None:
    srv = server()
    head = [*R, (b"te", b"trailers")]
    events = srv.feed(srv.headers(1, head, end_stream=True))
    assert [e.headers for e in of(events, h2core.RequestReceived)] == [head]


def test_content_length_with_too_much_data() -> None:
    srv = server()
    srv.feed(
        srv.headers(1, [*R, (b"content-length", b"3")]) + srv.headers(3, request(method=b"POST"))
    )
    srv.out()
    events = srv.feed(data(1, b"ab") + data(1, b"cd"))
    assert resets(srv.out()) == {1: PROTOCOL}
    assert sum(len(e.data) for e in of(events, h2core.DataReceived)) <= 3
    assert [(e.stream_id, e.remote) for e in of(events, h2core.StreamReset)] == [(1, False)]
    events = srv.feed(data(3, b"fine", end=True))
    assert [e.data for e in of(events, h2core.DataReceived)] == [b"fine"]


def test_content_length_with_too_little_data_at_end_stream() -> None:
    srv = server()
    srv.feed(srv.headers(1, [*R, (b"content-length", b"5")]))
    srv.out()
    events = srv.feed(data(1, b"abc", end=True))
    assert resets(srv.out()) == {1: PROTOCOL}
    assert not [e for e in of(events, h2core.DataReceived) if e.stream_ended]
    assert [(e.stream_id, e.remote) for e in of(events, h2core.StreamReset)] == [(1, False)]


def test_content_length_on_a_head_that_ends_the_stream() -> None:
    srv = server()
    events = srv.stream_error(
        srv.headers(1, [*R, (b"content-length", b"5")], end_stream=True), 1, PROTOCOL
    )
    assert not of(events, h2core.RequestReceived)


BAD_TRAILERS: dict[str, Headers] = {
    "pseudo": [(b":path", b"/x")],
    "uppercase": [(b"X-Sum", b"1")],
    "connection": [(b"connection", b"close")],
    "cr-in-value": [(b"x-sum", b"1\r2")],
}


@pytest.mark.parametrize("trailers", BAD_TRAILERS.values(), ids=BAD_TRAILERS.keys())
def test_malformed_trailers_reset_the_stream(trailers: Headers) -> None:
    srv = with_stream(1)
    srv.feed(srv.headers(3, request(method=b"POST")))
    srv.out()
    events = srv.stream_error(srv.headers(1, trailers, end_stream=True), 1, PROTOCOL)
    assert not of(events, h2core.TrailersReceived)
    assert [(e.stream_id, e.error_code, e.remote) for e in of(events, h2core.StreamReset)] == [
        (1, PROTOCOL, False)
    ]
    events = srv.feed(srv.headers(3, [(b"x-sum", b"1")], end_stream=True))
    assert [e.headers for e in of(events, h2core.TrailersReceived)] == [[(b"x-sum", b"1")]]


def test_trailers_without_end_stream_reset_the_stream() -> None:
    srv = with_stream(1)
    events = srv.stream_error(srv.headers(1, [(b"x-sum", b"1")]), 1, PROTOCOL)
    assert not of(events, h2core.TrailersReceived)


BAD_RESPONSES: dict[str, Headers] = {
    "missing-status": [(b"content-type", b"text/plain")],
    "short-status": [(b":status", b"20")],
    "letters-status": [(b":status", b"2x0")],
    "path-in-response": [(b":status", b"200"), (b":path", b"/")],
    "duplicate-status": [(b":status", b"200"), (b":status", b"204")],
    "pseudo-after-regular": [(b"server", b"x"), (b":status", b"200")],
    "connection": [(b":status", b"200"), (b"connection", b"close")],
    "uppercase": [(b":status", b"200"), (b"Server", b"x")],
}


@pytest.mark.parametrize("headers", BAD_RESPONSES.values(), ids=BAD_RESPONSES.keys())
def test_malformed_response_head_resets_the_stream(headers: Headers) -> None:
    cli = client()
    cli.core.send_headers(3, request(), end_stream=True)
    cli.out()
    events = cli.stream_error(cli.headers(1, headers, end_stream=True), 1, PROTOCOL)
    assert not of(events, h2core.ResponseReceived)
    assert [(e.stream_id, e.error_code, e.remote) for e in of(events, h2core.StreamReset)] == [
        (1, PROTOCOL, False)
    ]
    events = cli.feed(cli.headers(3, response(), end_stream=True))
    assert [(e.stream_id, e.headers) for e in of(events, h2core.ResponseReceived)] == [
        (3, response())
    ]


def test_response_content_length_mismatch_resets_the_stream() -> None:
    cli = client()
    cli.feed(cli.headers(1, response(extra=[(b"content-length", b"10")])))
    cli.out()
    events = cli.stream_error(data(1, b"short", end=True), 1, PROTOCOL)
    assert not [e for e in of(events, h2core.DataReceived) if e.stream_ended]
    assert [(e.stream_id, e.remote) for e in of(events, h2core.StreamReset)] == [(1, False)]


# -- limits ----------------------------------------------------------------------------


def test_streams_over_our_concurrency_limit_are_refused() -> None:
    srv = server(local_settings={SettingCodes.MAX_CONCURRENT_STREAMS: 2})
    srv.feed(srv.headers(1, request(method=b"POST")) + srv.headers(3, request(method=b"POST")))
    srv.out()
    refused = request(extra=[(b"x-refused", b"r" * 30)])
    events = srv.stream_error(
        srv.headers(5, refused, end_stream=True), 5, ErrorCodes.REFUSED_STREAM
    )
    assert not of(events, h2core.RequestReceived)
    assert srv.core.open_streams == 2
    # finish stream 1 both ways: there is room again, and the refused block kept HPACK in step
    srv.feed(data(1, b"", end=True))
    srv.core.send_headers(1, response(), end_stream=True)
    events = srv.feed(srv.headers(7, refused, end_stream=True))
    assert [(e.stream_id, e.headers) for e in of(events, h2core.RequestReceived)] == [(7, refused)]


def test_oversized_header_list_is_enhance_your_calm() -> None:
    srv = server(local_settings={SettingCodes.MAX_HEADER_LIST_SIZE: 8192})
    big = [*R, *((f"x-{i}".encode(), b"v" * 1000) for i in range(20))]
    srv.connection_error(srv.header_frames(1, big, end_stream=True), CALM)


def test_header_list_under_the_limit_is_fine() -> None:
    srv = server(local_settings={SettingCodes.MAX_HEADER_LIST_SIZE: 8192})
    head = [*R, *((f"x-{i}".encode(), b"v" * 1000) for i in range(6))]
    events = srv.feed(srv.headers(1, head, end_stream=True))
    assert [e.headers for e in of(events, h2core.RequestReceived)] == [head]


def test_default_core_bounds_a_huge_header_list_too() -> None:
    srv = server()
    big = [*R, *((f"x-{i}".encode(), b"v" * 8000) for i in range(128))]  # ~1 MB decoded
    chunk = srv.header_frames(1, big, end_stream=True)
    with pytest.raises(h2core.ProtocolError) as info:
        srv.feed(chunk)
    assert info.value.error_code in (CALM, PROTOCOL)


# -- glitch budgets (FrameWatch) ------------------------------------------------------


FLOODS = {
    "ping": raw(PING, 0, 0, b"\0" * 8),
    "settings": settings(),
    "empty-data": data(1, b""),
    "window-update": window_update(0, 1),
}


@pytest.mark.parametrize("frame", FLOODS.values(), ids=FLOODS.keys())
def test_control_frame_flood_raises_abuse(frame: bytes) -> None:
    clock = Clock()
    srv = with_stream(watch=FrameWatch(clock, budget=20, rate=1.0))
    with pytest.raises(Abuse) as info:
        for _ in range(200):
            srv.feed(frame)
    assert isinstance(info.value, h2core.ProtocolError)
    assert info.value.error_code == CALM
    assert goaway_codes(srv.out())[-1:] == [CALM]
    assert srv.core.closed


def test_glitch_budget_refills_with_the_injected_clock() -> None:
    clock = Clock()
    srv = server(watch=FrameWatch(clock, budget=20, rate=1.0))
    ping = raw(PING, 0, 0, b"\0" * 8)
    for _ in range(5):
        srv.feed(ping * 15)
        clock.now += 30.0
    pongs = [f for f in srv.out() if isinstance(f, PingFrame)]
    assert len(pongs) == 75
    with pytest.raises(Abuse):
        srv.feed(ping * 40)


def test_busy_legitimate_client_stays_under_the_default_budget() -> None:
    srv = server(
        watch=FrameWatch(Clock()), local_settings={SettingCodes.MAX_CONCURRENT_STREAMS: 1000}
    )
    for n in range(600):
        sid = 2 * n + 1
        srv.feed(
            srv.headers(sid, request(f"/{n}".encode(), method=b"POST"))
            + data(sid, b"x" * 10, end=True)
        )
        srv.feed(raw(PING, 0, 0, n.to_bytes(8, "big")))
        srv.core.send_headers(sid, response(), end_stream=True)
    assert len(of(srv.events, h2core.RequestReceived)) == 600
    assert not srv.core.closed
    assert not goaway_codes(srv.out())
    assert [f for f in srv.sent if isinstance(f, DataFrame)] == []
