"""Hostile requests on the client legs: heads, framing, authority, HTTP/2 floods.

Bytes in only, real h2/h11 peers (tests/unit/l7world.py), an injected clock.
Each case checks that nothing reached a backend.
"""

from __future__ import annotations

import h2.events
import h2.settings
import hpack
from h2.errors import ErrorCodes
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from mcproxy.model import Address, L7Policy, Mode, PolicyKind, Route
from mcproxy.worker.l7.frames import CLIENT_PREFACE, GLITCH_BUDGET, Abuse, Budget, FrameWatch
from mcproxy.worker.l7.h2core import H2Connection
from mcproxy.worker.l7.h2front import RAPID_RESET_BUDGET, H2Front
from mcproxy.worker.l7.h11front import MAX_HEAD_SIZE, H11Front, error_response
from mcproxy.worker.l7.headers import (
    MAX_HEADER_LIST_SIZE,
    authority_host,
    for_backend,
    refusal,
    request_trailers,
)
from mcproxy.worker.l7.router import Router
from tests.unit.l7world import CLIENT_IP, ROUTE, H2ClientPeer, H11ClientPeer, World


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


OTHER = Route(
    hostname="other.test",
    backends=(Address("127.0.0.1", 9000),),
    mode=Mode.L7,
    tls_cert="/c.pem",
    tls_key="/k.pem",
    policies=(L7Policy(PolicyKind.REQUIRE_HEADER, "x-api-key"),),
)
ROUTES = {ROUTE.hostname: ROUTE, OTHER.hostname: OTHER}


def route_for(name: str) -> Route | None:
    return ROUTES.get(name)


class HostileWorld(World):
    """Two routes on the listener, sharing one backend; legs on an injected clock."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()

    def router(self) -> Router:
        return Router(
            lookup=lambda: self.route,
            client_ip=CLIENT_IP,
            group_for=self.group_for,
            on_finished=self.finished.append,
            hostname="web.test",
            route_for=route_for,
        )

    def h2(self) -> H2ClientPeer:
        client = self.h2_client()
        client.leg = H2Front(client.io, client.router, head_timeout=10.0, clock=self.clock)
        return client

    def h11(self) -> H11ClientPeer:
        client = self.h11_client()
        client.leg = H11Front(client.io, client.router, "web.test", 10.0, self.clock)
        return client

    def backend_requests(self) -> int:
        return sum(len(b.requests()) for b in self.backends)


# --- HTTP/1.1 heads and framing ----------------------------------------------------------


def _h11_refused(raw: bytes, status: int) -> None:
    world = HostileWorld()
    client = world.h11()
    client.send(raw)
    world.run()
    assert client.received == error_response(status), client.received[:200]
    assert client.io.closed
    assert world.backend_requests() == 0
    assert not world.dials


def test_content_length_with_transfer_encoding_is_refused() -> None:
    _h11_refused(
        b"POST / HTTP/1.1\r\nhost: web.test\r\ncontent-length: 5\r\n"
        b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    )
    _h11_refused(
        b"POST / HTTP/1.1\r\nhost: web.test\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 5\r\n\r\n0\r\n\r\n",
        400,
    )


def test_duplicate_content_length_is_refused_even_when_equal() -> None:
    _h11_refused(
        b"POST / HTTP/1.1\r\nhost: web.test\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\nhello",
        400,
    )
    _h11_refused(b"POST / HTTP/1.1\r\nhost: web.test\r\ncontent-length: 5, 5\r\n\r\nhello", 400)
    _h11_refused(b"POST / HTTP/1.1\r\nhost: web.test\r\ncontent-length: -5\r\n\r\n", 400)


def test_transfer_codings_other_than_chunked_are_refused() -> None:
    _h11_refused(b"POST / HTTP/1.1\r\nhost: web.test\r\ntransfer-encoding: gzip\r\n\r\n", 501)


def test_obs_fold_and_nul_are_refused() -> None:
    _h11_refused(b"GET / HTTP/1.1\r\nhost: web.test\r\nx-a: 1\r\n  folded\r\n\r\n", 400)
    _h11_refused(b"GET / HTTP/1.1\r\nhost: web.test\r\nx-a: 1\x002\r\n\r\n", 400)


def test_three_thousand_headers_in_one_write_get_431() -> None:
    fields = b"".join(b"x-%d: 1\r\n" % i for i in range(3000))
    _h11_refused(b"GET / HTTP/1.1\r\nhost: web.test\r\n" + fields + b"\r\n", 431)


def test_a_100_kib_header_in_one_write_gets_431() -> None:
    _h11_refused(
        b"GET / HTTP/1.1\r\nhost: web.test\r\nx-big: " + b"a" * (100 << 10) + b"\r\n\r\n", 431
    )


def test_a_head_just_under_the_limit_passes() -> None:
    world = HostileWorld()
    client = world.h11()
    value = b"a" * (MAX_HEAD_SIZE - 1000)
    client.send(b"GET / HTTP/1.1\r\nhost: web.test\r\nx-big: " + value + b"\r\n\r\n")
    world.run()
    # Not refused by the head checks; the forwarded list is then bounded by its own limit.
    assert world.backend_requests() == 1
    (backend,) = world.backends
    (request,) = backend.requests()
    backend.respond(request.stream_id)
    world.run()
    assert client.responses()[0][0].status_code == 200


def test_a_bad_request_body_never_echoes_the_input() -> None:
    world = HostileWorld()
    client = world.h11()
    client.send(b"GET /<script> HTTP/1.1\r\nhost: web.test\r\nbad header\r\n\r\n")
    world.run()
    assert client.received == error_response(400)
    assert b"script" not in client.received


def test_a_trickled_head_is_cut_at_the_deadline() -> None:
    world = HostileWorld()
    client = world.h11()
    head = b"GET / HTTP/1.1\r\nhost: web.test\r\n"
    for byte in head:
        client.leg.receive_data(bytes([byte]))
        world.clock.now += 0.5
        client.leg.check_deadline()
        if client.leg.closed:
            break
    assert client.leg.closed
    assert client.leg.data_to_send() == error_response(408)
    assert world.backend_requests() == 0


def test_the_head_deadline_restarts_for_each_request() -> None:
    world = HostileWorld()
    client = world.h11()
    client.send(b"GET / HTTP/1.1\r\nhost: web.test\r\n\r\n")
    world.run()
    assert client.leg.head_deadline is None
    world.clock.now += 60  # a slow backend is not the client's head
    client.leg.check_deadline()
    assert not client.leg.closed
    (backend,) = world.backends
    backend.respond(1)
    world.run()
    client.send(b"GET /2 HTTP/1.1\r\n")
    world.run()
    assert client.leg.head_deadline == world.clock.now + 10.0


def test_forwarded_headers_in_http1_trailers_are_dropped() -> None:
    world = HostileWorld()
    client = world.h11()
    client.send(
        b"POST / HTTP/1.1\r\nhost: web.test\r\ntransfer-encoding: chunked\r\n"
        b"x-forwarded-for: 6.6.6.6\r\n\r\n"
        b"2\r\nhi\r\n0\r\nx-forwarded-for: 6.6.6.6\r\nx-real-ip: 6.6.6.6\r\n"
        b"forwarded: for=6.6.6.6\r\ncontent-length: 99\r\nx-checksum: abc\r\n\r\n"
    )
    world.run()
    (backend,) = world.backends
    (request,) = backend.requests()
    fields = dict(request.headers)
    assert fields[b"x-forwarded-for"] == CLIENT_IP.encode()
    trailers = [e for e in backend.events if isinstance(e, h2.events.TrailersReceived)]
    assert [list(t.headers) for t in trailers] == [[(b"x-checksum", b"abc")]]


# --- header hygiene -------------------------------------------------------------------------


def test_client_sent_forwarding_fields_are_removed() -> None:
    out = for_backend(
        [
            (b":method", b"GET"),
            (b"forwarded", b"for=6.6.6.6"),
            (b"x-forwarded-host", b"evil"),
            (b"x-forwarded-port", b"1"),
            (b"x-forwarded-prefix", b"/admin"),
            (b"x-forwarded-client-cert", b"Hash=00"),
            (b"accept", b"*/*"),
        ],
        "192.0.2.1",
    )
    assert [n for n, _ in out] == [
        b":method",
        b"accept",
        b"x-forwarded-for",
        b"x-real-ip",
        b"x-forwarded-proto",
    ]


def test_request_trailers_lose_framing_and_forwarding_fields() -> None:
    assert request_trailers(
        [
            (b"grpc-status", b"0"),
            (b"x-real-ip", b"6.6.6.6"),
            (b"host", b"other.test"),
            (b"transfer-encoding", b"chunked"),
            (b"connection", b"x-a"),
            (b"x-a", b"1"),
        ]
    ) == [(b"grpc-status", b"0")]


def test_authority_host_ignores_port_case_and_trailing_dot() -> None:
    assert authority_host(b"Web.Test.:8443") == "web.test"
    assert authority_host(b"web.test") == "web.test"
    assert authority_host(b"[::1]:443") == "::1"
    assert authority_host(b"127.0.0.1:80") == "127.0.0.1"
    assert authority_host(b"user@web.test") is None
    assert authority_host(b"web.test:x") is None


def _head(*extra: tuple[bytes, bytes], authority: bytes = b"web.test") -> list[tuple[bytes, bytes]]:
    return [(b":method", b"GET"), (b":authority", authority), (b":path", b"/"), *extra]


def test_refusal_reasons() -> None:
    assert refusal(_head(), ROUTE, route_for) is None
    assert refusal(_head(authority=b"WEB.test.:443"), ROUTE, route_for) is None
    assert refusal(_head(authority=b"other.test"), ROUTE, route_for) == (
        421,
        "the authority names another route",
    )
    assert refusal(_head(authority=b"nowhere.test"), ROUTE, route_for)[0] == 421  # type: ignore[index]
    assert refusal(_head((b"host", b"other.test")), ROUTE, route_for)[0] == 400  # type: ignore[index]
    assert refusal(_head((b"host", b"web.test")), ROUTE, route_for) is None
    bad = [
        (b"content-length", b"5, 5"),
        (b"content-length", b"+5"),
        (b"x-a", b"1\r\nx-b: 2"),
        (b"x-a", b"1\x00"),
        (b"bad name", b"1"),
        (b"X-Upper", b"1"),
    ]
    for field in bad:
        assert refusal(_head(field), ROUTE, route_for)[0] == 400, field  # type: ignore[index]
    two = _head((b"content-length", b"5"), (b"content-length", b"5"))
    assert refusal(two, ROUTE, route_for)[0] == 400  # type: ignore[index]
    many = _head(*[(b"x-%d" % i, b"1") for i in range(101)])
    assert refusal(many, ROUTE, route_for)[0] == 431  # type: ignore[index]


# --- HTTP/2: authority, forwarded size ------------------------------------------------------


def test_an_authority_naming_another_route_gets_421_and_no_backend() -> None:
    world = HostileWorld()
    client = world.h2()
    sid = client.request(extra=[])
    client.conn.send_headers(
        client.conn.get_next_available_stream_id(),
        [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":authority", b"other.test"),
            (b":path", b"/"),
        ],
        end_stream=True,
    )
    world.run()
    assert world.backend_requests() == 1  # the first one, for web.test
    assert client.response(sid + 2)[b":status"] == b"421"


def test_a_header_list_pushed_over_the_limit_by_our_additions_gets_431() -> None:
    world = HostileWorld()
    client = world.h2_client(initial={h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 1 << 20})
    client.leg = H2Front(client.io, client.router, clock=world.clock)
    # Just under our limit as received; over it once X-Forwarded-* are added.
    pseudo = 4 * 32 + len(b":method:GET:schemehttps:authorityweb.test:path/")
    size = MAX_HEADER_LIST_SIZE - pseudo - 32 - len(b"x-big") - 10
    sid = client.request(extra=[(b"x-big", b"a" * size)])
    world.run()
    assert client.response(sid)[b":status"] == b"431"
    assert world.backend_requests() == 0


# --- HTTP/2 abuse budgets -------------------------------------------------------------------


def _flood(frames: list[bytes], code: int = ErrorCodes.ENHANCE_YOUR_CALM) -> HostileWorld:
    world = HostileWorld()
    client = world.h2()
    client.move()
    good = client.request()
    world.run()
    client.leg.receive_data(b"".join(frames))
    world.run()
    assert [g.error_code for g in client.goaways] == [code]
    assert client.leg.outcome == "abuse"
    assert good  # the stream opened before the flood got its request through
    return world


def test_ping_flood_costs_the_connection() -> None:
    _flood([PingFrame(0, opaque_data=b"12345678").serialize()] * (GLITCH_BUDGET + 10))


def test_settings_flood_costs_the_connection() -> None:
    _flood([SettingsFrame(0).serialize()] * (GLITCH_BUDGET + 10))


def test_window_update_flood_costs_the_connection() -> None:
    frame = WindowUpdateFrame(0)
    frame.window_increment = 1
    _flood([frame.serialize()] * (GLITCH_BUDGET + 10))


def test_priority_flood_costs_the_connection() -> None:
    _flood([PriorityFrame(1).serialize()] * (GLITCH_BUDGET + 10))


def test_empty_data_flood_costs_the_connection() -> None:
    world = HostileWorld()
    client = world.h2()
    sid = client.request(end=False)
    world.run()
    client.leg.receive_data(DataFrame(sid).serialize() * (GLITCH_BUDGET + 10))
    assert client.leg.outcome == "abuse"


def test_rst_stream_flood_on_closed_streams_costs_the_connection() -> None:
    frame = RstStreamFrame(1)  # the good request's stream, over by then
    frame.error_code = 8
    _flood([frame.serialize()] * (GLITCH_BUDGET + 10))


def test_continuation_floods_across_header_blocks_cost_the_connection() -> None:
    world = HostileWorld()
    client = world.h2()
    client.move()
    headers = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"web.test")]
    frames = []
    for k in range(60):
        # Each block cut into 1-byte CONTINUATIONs: fewer than h2's 64 per block, many in all.
        block = client.conn.encoder.encode([*headers, (b":path", b"/%d" % k + b"x" * 20)])
        sid = 2 * k + 1
        frames.append(HeadersFrame(sid, data=block[:1], flags=["END_STREAM"]).serialize())
        for i in range(1, len(block)):
            flags = ["END_HEADERS"] if i == len(block) - 1 else []
            frames.append(ContinuationFrame(sid, data=block[i : i + 1], flags=flags).serialize())
    client.leg.receive_data(b"".join(frames))
    assert client.leg.outcome == "abuse"
    assert world.backend_requests() == 0


def test_the_budget_refills_with_time_and_with_data_sent() -> None:
    clock = Clock()
    budget = Budget(3, 1.0, clock)
    assert budget.spend() and budget.spend() and budget.spend()
    assert not budget.spend()
    clock.now += 2
    assert budget.spend() and budget.spend()
    assert not budget.spend()
    budget.earn(1)
    assert budget.spend()


def test_a_download_with_many_window_updates_is_not_cut() -> None:
    world = HostileWorld()
    client = world.h2()
    sid = client.request()
    world.run()
    (backend,) = world.backends
    (request,) = backend.requests()
    bsid = request.stream_id
    backend.conn.send_headers(bsid, [(b":status", b"200")])
    total = 16384 * (GLITCH_BUDGET * 2)
    sent = seen = updates = 0
    while sent < total:
        room = min(backend.conn.local_flow_control_window(bsid), 16384, total - sent)
        if room > 0:
            sent += room
            backend.conn.send_data(bsid, b"x" * room, end_stream=sent == total)
        world.run()
        backend.ack_all()
        for event in client.events[seen:]:
            if isinstance(event, h2.events.DataReceived) and not client.of(
                sid, h2.events.StreamEnded
            ):
                # Two WINDOW_UPDATEs per DATA frame, stream and connection: the most eager reader.
                client.conn.increment_flow_control_window(event.flow_controlled_length, sid)
                client.conn.increment_flow_control_window(event.flow_controlled_length)
                updates += 2
        seen = len(client.events)
        world.run()
    assert updates > GLITCH_BUDGET * 3
    assert client.leg.outcome is None
    assert client.of(sid, h2.events.StreamEnded)
    assert len(client.body(sid)) == total


def test_diluted_rapid_reset_is_cut_by_the_absolute_budget() -> None:
    world = HostileWorld()
    client = world.h2()
    client.move()
    answered: set[int] = set()
    for _ in range(RAPID_RESET_BUDGET * 3):
        # Three real requests for each one reset: the ratio guard alone never fires.
        for _ in range(3):
            client.request()
        sid = client.request(end=False)
        client.conn.reset_stream(sid, ErrorCodes.CANCEL)
        world.run()
        for backend in world.backends:
            for request in backend.requests():
                if request.stream_id not in answered and backend.of(
                    request.stream_id, h2.events.StreamEnded
                ):
                    answered.add(request.stream_id)
                    backend.respond(request.stream_id)
        world.run()
        if client.leg.closed:
            break
    assert client.leg.closed
    assert client.leg.outcome == "rapid_reset"
    assert client.leg.premature_resets * 2 < client.leg.streams_opened


def test_a_trickled_http2_head_is_cut_at_the_deadline() -> None:
    world = HostileWorld()
    client = world.h2()
    client.move()
    block = client.conn.encoder.encode(
        [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":authority", b"web.test"),
            (b":path", b"/"),
        ]
    )
    frame = HeadersFrame(1, data=block[:3], flags=["END_STREAM"]).serialize()
    client.leg.receive_data(frame)  # HEADERS without END_HEADERS: the head is open
    assert client.leg.head_deadline == world.clock.now + 10.0
    for byte in ContinuationFrame(1, data=block[3:], flags=["END_HEADERS"]).serialize()[:-1]:
        client.leg.receive_data(bytes([byte]))
        world.clock.now += 1
        client.leg.check_deadline()
        if client.leg.closed:
            break
    assert client.leg.closed and client.leg.outcome == "head_timeout"
    assert world.backend_requests() == 0


def test_a_complete_http2_head_clears_the_deadline() -> None:
    world = HostileWorld()
    client = world.h2()
    client.request()
    client.move()
    assert client.leg.head_deadline is None
    world.clock.now += 100
    client.leg.check_deadline()
    assert not client.leg.closed


def test_the_frame_watch_tracks_split_frame_headers_and_header_blocks() -> None:
    clock = Clock()
    watch = FrameWatch(clock)
    conn = H2Connection(client_side=False, watch=watch)
    conn.receive_data(CLIENT_PREFACE[:10])
    assert watch.head_since == clock.now  # a preface in progress
    conn.receive_data(CLIENT_PREFACE[10:] + SettingsFrame(0).serialize())
    assert watch.head_since is None
    ping = PingFrame(0, opaque_data=b"12345678").serialize()
    conn.receive_data(ping[:4])
    assert watch.head_since == clock.now
    conn.receive_data(ping[4:])
    assert watch.head_since is None
    block = hpack.Encoder().encode(
        [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "a.test")]
    )
    conn.receive_data(HeadersFrame(1, data=block[:3], flags=["END_STREAM"]).serialize())
    assert watch.head_since == clock.now
    events = conn.receive_data(
        ContinuationFrame(1, data=block[3:], flags=["END_HEADERS"]).serialize()
    )
    assert watch.head_since is None
    assert [type(e).__name__ for e in events] == ["RequestReceived"]
    flood = FrameWatch(clock, budget=2, rate=0)
    conn = H2Connection(client_side=False, watch=flood)
    conn.receive_data(CLIENT_PREFACE + SettingsFrame(0).serialize() + ping)
    try:
        conn.receive_data(ping)
    except Abuse:
        pass
    else:
        raise AssertionError("the third frame without progress should be over budget")


def test_a_stream_of_malformed_requests_costs_the_connection() -> None:
    world = HostileWorld()
    client = world.h2()
    client.move()
    frames = []
    for k in range(GLITCH_BUDGET):
        block = client.conn.encoder.encode(
            [
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b":authority", b"web.test"),
                (b":path", b"/%d" % k),
                (b"X-Upper", b"1"),  # malformed in HTTP/2: each is reset, and charged
            ]
        )
        frames.append(HeadersFrame(2 * k + 1, data=block, flags=["END_STREAM", "END_HEADERS"]))
    client.leg.receive_data(b"".join(frame.serialize() for frame in frames))
    assert client.leg.outcome == "abuse"
    assert world.backend_requests() == 0
