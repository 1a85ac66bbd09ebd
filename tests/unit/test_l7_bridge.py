"""The L7 core against real h2 peers, bytes only (see ``l7world``): HTTP/2 clients."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import h2.events
from h2.errors import ErrorCodes

from mcproxy.model import Address, L7Policy, PolicyKind
from mcproxy.worker.l7.frames import encode_goaway
from mcproxy.worker.l7.h2back import BACKEND_CONNECTION_WINDOW, BACKEND_STREAM_WINDOW
from mcproxy.worker.l7.h2front import RAPID_RESET_THRESHOLD
from mcproxy.worker.l7.h2leg import STREAM_WINDOW
from mcproxy.worker.l7.pool import MAX_CONNECTIONS
from tests.unit.l7world import CLIENT_IP, ROUTE, World, policy_route, settings


def test_request_reaches_backend_with_forwarding_headers_and_response_comes_back() -> None:
    world = World()
    client = world.h2_client()
    sid = client.request(
        "/a?b=1",
        extra=[
            (b"x-forwarded-for", b"6.6.6.6"),
            (b"x-real-ip", b"6.6.6.6"),
            (b"x-forwarded-proto", b"http"),
            (b"te", b"trailers"),
            (b"user-agent", b"test"),
        ],
    )
    world.run()
    backend = world.backends[0]
    (request,) = backend.requests()
    headers = request.headers
    assert headers[:4] == [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", b"web.test"),
        (b":path", b"/a?b=1"),
    ]
    assert (b"te", b"trailers") in headers
    forwarded = [(n, v) for n, v in headers if n.startswith(b"x-")]
    ip = CLIENT_IP.encode()
    assert forwarded == [
        (b"x-forwarded-for", ip),
        (b"x-real-ip", ip),
        (b"x-forwarded-proto", b"https"),
    ]
    backend.respond(request.stream_id, b"hello")
    world.run()
    assert client.response(sid)[b":status"] == b"200"
    assert client.body(sid) == b"hello"
    assert client.of(sid, h2.events.StreamEnded)
    (record,) = world.finished
    assert (record.status, record.method, record.response.forwarded) == (200, "GET", 5)


def test_request_body_is_acknowledged_only_once_the_backend_took_it() -> None:
    # The backend grants 16 KiB per stream and never reads: the proxy may hold at most
    # its own stream window for the client, and the client must stop there.
    world = World(backend_settings=settings(INITIAL_WINDOW_SIZE=16384))
    client = world.h2_client()
    sid = client.request("/upload", method="POST", end=False)
    world.run()
    sent = 0
    chunk = b"x" * 16384
    for _ in range(400):  # up to 6.4 MiB, far more than any window
        room = min(client.conn.local_flow_control_window(sid), len(chunk))
        if room == 0:
            break
        client.conn.send_data(sid, chunk[:room])
        sent += room
        world.run()
    backend = world.backends[0]
    (request,) = backend.requests()
    received = len(backend.body(request.stream_id))
    exchange = client.leg.streams[sid]
    assert received == 16384
    assert exchange.request.buffered == sent - received
    assert exchange.request.buffered <= STREAM_WINDOW
    assert sent <= STREAM_WINDOW + received
    # Now the backend reads everything: the rest flows and the window reopens.
    for _ in range(200):
        backend.ack_all()
        world.run()
        if not exchange.request.buffered:
            break
    assert len(backend.body(request.stream_id)) == sent
    assert client.conn.local_flow_control_window(sid) > 0


def test_response_body_is_acknowledged_only_once_the_client_took_it() -> None:
    world = World()
    client = world.h2_client(settings(INITIAL_WINDOW_SIZE=8192))
    sid = client.request("/download")
    world.run()
    backend = world.backends[0]
    (request,) = backend.requests()
    bsid = request.stream_id
    backend.conn.send_headers(bsid, [(b":status", b"200")])
    sent = 0
    for _ in range(400):
        room = min(backend.conn.local_flow_control_window(bsid), 16384)
        if room == 0:
            break
        backend.conn.send_data(bsid, b"y" * room)
        sent += room
        world.run()
    exchange = client.leg.streams[sid]
    assert len(client.body(sid)) == 8192
    assert exchange.response.buffered == sent - 8192
    assert sent <= STREAM_WINDOW + 8192
    for _ in range(400):
        client.ack_all()
        world.run()
        if not exchange.response.buffered:
            break
    assert len(client.body(sid)) == sent


def test_a_paused_client_transport_stops_the_response_until_resumed() -> None:
    world = World()
    client = world.h2_client()
    sid = client.request("/")
    world.run()
    backend = world.backends[0]
    (request,) = backend.requests()
    client.leg.set_writable(False)
    backend.respond(request.stream_id, b"z" * 1000)
    world.run()
    assert client.body(sid) == b""
    client.leg.set_writable(True)
    world.run()
    assert client.body(sid) == b"z" * 1000


def test_data_buffered_for_streams_the_client_reset_is_acknowledged_to_the_backend() -> None:
    # A full window of responses wait in the proxy (the client's windows are 0) and use up
    # the shared backend connection's whole window. When the client resets them, the proxy
    # must hand those bytes back, or that connection would stay stalled for every client.
    world = World()
    client = world.h2_client(settings(INITIAL_WINDOW_SIZE=0))
    streams = BACKEND_CONNECTION_WINDOW // BACKEND_STREAM_WINDOW
    sids = [client.request(f"/{k}") for k in range(streams)]
    world.run()
    backend = world.backends[0]
    for request in backend.requests():
        backend.respond(request.stream_id, b"d" * BACKEND_STREAM_WINDOW, end=False)
        world.run()
    assert backend.conn.outbound_flow_control_window == 0
    for sid in sids:
        client.conn.reset_stream(sid, ErrorCodes.CANCEL)
    world.run()
    resets = [e for e in backend.events if isinstance(e, h2.events.StreamReset)]
    assert sorted(e.error_code for e in resets) == [ErrorCodes.CANCEL] * streams
    # h2 announces acknowledged bytes in batches of half a window: at least that came back.
    assert backend.conn.outbound_flow_control_window >= BACKEND_CONNECTION_WINDOW // 2
    # And the connection carries a fresh 1 MiB response for another client.
    other = world.h2_client()
    sid = other.request("/after")
    world.run()
    request = backend.requests()[-1]
    backend.respond(request.stream_id, b"a" * BACKEND_STREAM_WINDOW)
    for _ in range(100):
        world.run()
        other.ack_all()
    assert len(other.body(sid)) == BACKEND_STREAM_WINDOW


def test_trailers_are_forwarded() -> None:
    world = World()
    client = world.h2_client()
    sid = client.request("/", extra=[(b"te", b"trailers")])
    world.run()
    backend = world.backends[0]
    (request,) = backend.requests()
    backend.respond(request.stream_id, b"msg", trailers=[(b"grpc-status", b"0")])
    world.run()
    (trailers,) = client.of(sid, h2.events.TrailersReceived)
    assert trailers.headers == [(b"grpc-status", b"0")]
    assert client.body(sid) == b"msg"


def test_a_trailers_only_response_stays_a_single_headers_frame() -> None:
    # gRPC errors come as HEADERS with END_STREAM and grpc-status; split into HEADERS and an
    # empty DATA frame, a gRPC client would not find the status.
    world = World()
    client = world.h2_client()
    sid = client.request("/")
    world.run()
    backend = world.backends[0]
    (request,) = backend.requests()
    backend.conn.send_headers(
        request.stream_id,
        [(b":status", b"200"), (b"grpc-status", b"7"), (b"grpc-message", b"denied")],
        end_stream=True,
    )
    world.run()
    (response,) = client.of(sid, h2.events.ResponseReceived)
    assert response.stream_ended is not None
    assert (b"grpc-status", b"7") in response.headers
    assert not client.of(sid, h2.events.DataReceived)


def test_requests_beyond_the_pool_bound_wait_in_line() -> None:
    world = World(backend_settings=settings(MAX_CONCURRENT_STREAMS=1))
    client = world.h2_client()
    sids = [client.request(f"/{k}") for k in range(MAX_CONNECTIONS + 2)]
    world.run()
    assert len(world.backends) == MAX_CONNECTIONS
    assert [len(b.requests()) for b in world.backends] == [1] * MAX_CONNECTIONS
    first = world.backends[0]
    for expected in range(1, 4):
        requests = first.requests()
        assert len(requests) == expected
        first.respond(requests[-1].stream_id, f"r{expected}".encode())
        world.run()
    assert [client.body(sid) for sid in sids[:1]] == [b"r1"]
    assert {client.body(sid) for sid in sids[-2:]} == {b"r2", b"r3"}


def test_a_client_reset_reaches_the_backend_with_its_code() -> None:
    world = World()
    client = world.h2_client()
    sid = client.request("/slow")
    world.run()
    client.conn.reset_stream(sid, ErrorCodes.CANCEL)
    world.run()
    backend = world.backends[0]
    (request,) = backend.requests()
    (reset,) = backend.of(request.stream_id, h2.events.StreamReset)
    assert reset.error_code == ErrorCodes.CANCEL
    assert not client.leg.streams


def test_a_backend_reset_reaches_the_client_with_its_code() -> None:
    world = World()
    client = world.h2_client()
    sid = client.request("/")
    world.run()
    backend = world.backends[0]
    (request,) = backend.requests()
    backend.conn.send_headers(request.stream_id, [(b":status", b"200")])
    backend.conn.reset_stream(request.stream_id, ErrorCodes.INTERNAL_ERROR)
    world.run()
    (reset,) = client.of(sid, h2.events.StreamReset)
    assert reset.error_code == ErrorCodes.INTERNAL_ERROR


def test_a_rapid_reset_flood_in_one_read_never_reaches_the_backend() -> None:
    world = World()
    victim = world.h2_client()
    victim_sid = victim.request("/")
    world.run()
    backend = world.backends[0]
    attacker = world.h2_client()
    for _ in range(RAPID_RESET_THRESHOLD * 2):
        sid = attacker.request("/")
        attacker.conn.reset_stream(sid, ErrorCodes.CANCEL)
    world.run()
    assert attacker.leg.closed and attacker.leg.outcome == "rapid_reset"
    (goaway,) = attacker.goaways
    assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert len(backend.requests()) == 1  # the victim's, and nothing of the flood
    (request,) = backend.requests()
    backend.respond(request.stream_id, b"still fine")
    world.run()
    assert victim.body(victim_sid) == b"still fine"


def test_a_rapid_reset_flood_across_reads_is_cut_off_at_the_threshold() -> None:
    world = World()
    attacker = world.h2_client()
    for _ in range(RAPID_RESET_THRESHOLD * 3):
        if attacker.leg.closed:
            break
        sid = attacker.request("/")
        world.run()
        attacker.conn.reset_stream(sid, ErrorCodes.CANCEL)
        world.run()
    assert attacker.leg.outcome == "rapid_reset"
    assert len(world.backends[0].requests()) == RAPID_RESET_THRESHOLD


def test_goaway_from_the_backend_lets_older_streams_finish_and_retries_newer_ones() -> None:
    world = World()
    client = world.h2_client()
    first = client.request("/1")
    world.run()
    second = client.request("/2")
    world.run()
    old = world.backends[0]
    r1, r2 = old.requests()
    old.raw_to_leg = encode_goaway(r1.stream_id)
    world.run()
    assert len(world.backends) == 2, "the unprocessed request went to a new connection"
    new = world.backends[1]
    (retried,) = new.requests()
    assert dict(retried.headers)[b":path"] == b"/2"
    old.respond(r1.stream_id, b"old")
    new.respond(retried.stream_id, b"new")
    world.run()
    assert client.body(first) == b"old"
    assert client.body(second) == b"new"
    assert old.leg.closed, "a retired connection closes once its streams are done"
    del r2


def test_a_backend_that_breaks_the_protocol_gives_502() -> None:
    world = World()
    client = world.h2_client()
    sid = client.request("/")
    world.run()
    backend = world.backends[0]
    backend.raw_to_leg = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
    world.run()
    assert client.response(sid)[b":status"] == b"502"
    assert client.body(sid).startswith(b"502 ")


def test_dial_failures_give_502_or_504() -> None:
    world = World(auto_dial=False)
    client = world.h2_client()
    first = client.request("/")
    world.run()
    (group,) = world.dials
    world.dials.clear()
    group.failed(504, "no answer")
    world.run()
    second = client.request("/")
    world.run()
    world.dials.pop().failed(502, "refused")
    world.run()
    assert client.response(first)[b":status"] == b"504"
    assert client.response(second)[b":status"] == b"502"


def test_policies_answer_403_before_the_backend_is_touched() -> None:
    world = World(
        route=policy_route(
            L7Policy(PolicyKind.BLOCK_USER_AGENT, "BadBot"),
            L7Policy(PolicyKind.REQUIRE_HEADER, "x-api-key"),
        )
    )
    client = world.h2_client()
    bot = client.request("/", extra=[(b"user-agent", b"a BadBot/1"), (b"x-api-key", b"k")])
    keyless = client.request("/", extra=[(b"user-agent", b"curl")])
    good = client.request("/", extra=[(b"user-agent", b"curl"), (b"x-api-key", b"k")])
    world.run()
    assert client.response(bot)[b":status"] == b"403"
    assert client.response(keyless)[b":status"] == b"403"
    assert {e.blocked_by for e in world.finished} == {
        PolicyKind.BLOCK_USER_AGENT,
        PolicyKind.REQUIRE_HEADER,
    }
    (request,) = world.backends[0].requests()
    assert dict(request.headers)[b"x-api-key"] == b"k"
    del good


def test_a_403_with_a_body_on_the_way_stops_the_upload_with_no_error() -> None:
    world = World(route=policy_route(L7Policy(PolicyKind.REQUIRE_HEADER, "x-api-key")))
    client = world.h2_client()
    sid = client.request("/", method="POST", end=False)
    client.conn.send_data(sid, b"partial body")
    world.run()
    assert client.response(sid)[b":status"] == b"403"
    (reset,) = client.of(sid, h2.events.StreamReset)
    assert reset.error_code == ErrorCodes.NO_ERROR
    assert not world.dials and not world.backends


def test_a_removed_route_answers_421() -> None:
    world = World(route=None)
    client = world.h2_client()
    sid = client.request("/")
    world.run()
    assert client.response(sid)[b":status"] == b"421"


def test_drain_sends_goaway_and_lets_open_streams_finish() -> None:
    world = World()
    client = world.h2_client()
    sid = client.request("/")
    world.run()
    client.leg.begin_drain()
    world.run()
    assert [g.last_stream_id for g in client.goaways] == [sid]
    assert not client.leg.closed
    late = client.request("/late")  # crossed our GOAWAY on the wire
    world.run()
    (refused,) = client.of(late, h2.events.StreamReset)
    assert refused.error_code == ErrorCodes.REFUSED_STREAM
    backend = world.backends[0]
    (request,) = backend.requests()
    backend.respond(request.stream_id, b"done")
    world.run()
    assert client.body(sid) == b"done"
    assert client.io.closed


def test_a_big_body_arrives_intact_through_both_windows() -> None:
    world = World()
    client = world.h2_client()
    payload = hashlib.sha256(b"seed").digest() * (3 * 1024 * 1024 // 32)
    sid = client.request("/up", method="POST", end=False)
    offset = 0
    for _ in range(5000):
        room = min(client.conn.local_flow_control_window(sid), 16384, len(payload) - offset)
        if room:
            client.conn.send_data(sid, payload[offset : offset + room])
            offset += room
            if offset == len(payload):
                client.conn.end_stream(sid)
        world.run()
        backend = world.backends[0]
        backend.ack_all()
        (request,) = backend.requests()
        if backend.of(request.stream_id, h2.events.StreamEnded):
            break
    assert backend.body(request.stream_id) == payload


def test_a_policy_added_while_the_connection_is_open_applies_to_its_next_request() -> None:
    world = World()
    client = world.h2_client()
    first = client.request("/", extra=[(b"user-agent", b"BadBot")])
    world.run()
    world.route = policy_route(L7Policy(PolicyKind.BLOCK_USER_AGENT, "BadBot"))
    second = client.request("/", extra=[(b"user-agent", b"BadBot")])
    world.run()
    backend = world.backends[0]
    (request,) = backend.requests()
    backend.respond(request.stream_id, b"before the policy")
    world.run()
    assert client.response(first)[b":status"] == b"200"
    assert client.response(second)[b":status"] == b"403"


def test_a_broken_backend_does_not_take_down_streams_to_another_backend() -> None:
    world = World()
    client = world.h2_client()
    doomed = client.request("/a")
    world.run()
    world.route = replace(ROUTE, backends=(Address("127.0.0.1", 9001),))
    healthy = client.request("/b")
    world.run()
    broken, fine = world.backends
    broken.raw_to_leg = b"\x00\xff\xff\xff garbage"
    world.run()
    (request,) = fine.requests()
    fine.respond(request.stream_id, b"unaffected")
    world.run()
    assert client.response(doomed)[b":status"] == b"502"
    assert client.body(healthy) == b"unaffected"
    assert not client.leg.closed


def test_a_stream_reset_by_the_backend_leaves_its_neighbours_alone() -> None:
    world = World()
    client = world.h2_client()
    first, second = client.request("/1"), client.request("/2")
    world.run()
    backend = world.backends[0]
    r1, r2 = backend.requests()
    backend.conn.reset_stream(r1.stream_id, ErrorCodes.INTERNAL_ERROR)
    backend.respond(r2.stream_id, b"fine")
    world.run()
    assert client.of(first, h2.events.StreamReset)
    assert client.body(second) == b"fine"


def test_a_finished_exchange_is_freed_by_reference_counting_alone() -> None:
    # Requests must not feed the garbage collector: an exchange and its flows form no
    # cycle once the exchange is over (ARCHITECTURE.md, "L7 routes: speed").
    import gc
    import weakref

    world = World()
    client = world.h2_client()
    sid = client.request("/")
    world.run()
    world.backends[0].respond(world.backends[0].requests()[0].stream_id, body=b"ok")
    world.run()
    assert client.body(sid) == b"ok"
    (exchange,) = world.finished
    gone = weakref.ref(exchange)
    gc.disable()
    try:
        del exchange
        world.finished.clear()
        assert gone() is None
    finally:
        gc.enable()
