"""HTTP/1.1 clients through the L7 core, bytes only (see ``l7world``)."""

from __future__ import annotations

import h2.events

from mcproxy.model import L7Policy, PolicyKind
from mcproxy.worker.l7.h11front import BODY_HIGH_WATER
from tests.unit.l7world import CLIENT_IP, READ_SIZE, World, policy_route


def test_keep_alive_serves_two_requests_on_one_connection() -> None:
    world = World()
    client = world.h11_client()
    client.send(b"GET /one HTTP/1.1\r\nHost: web.test\r\n\r\n")
    world.run()
    backend = world.backends[0]
    backend.respond(backend.requests()[0].stream_id, b"first")
    world.run()
    client.send(b"GET /two HTTP/1.1\r\nHost: web.test\r\n\r\n")
    world.run()
    backend.respond(backend.requests()[1].stream_id, b"second")
    world.run()
    bodies = [body for _, body, _ in client.responses()]
    assert bodies == [b"first", b"second"]
    assert not client.io.closed
    assert len(world.backends) == 1


def test_request_head_is_mapped_to_http2_with_hop_by_hop_fields_removed() -> None:
    world = World()
    client = world.h11_client()
    client.send(
        b"GET /p?q=1 HTTP/1.1\r\nHost: web.test:8443\r\n"
        b"Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n"
        b"Proxy-Connection: keep-alive\r\nTE: trailers\r\nUpgrade: h2c\r\n"
        b"X-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nX-Kept: yes\r\n\r\n"
    )
    world.run()
    (request,) = world.backends[0].requests()
    ip = CLIENT_IP.encode()
    assert request.headers == [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", b"web.test:8443"),
        (b":path", b"/p?q=1"),
        (b"te", b"trailers"),
        (b"x-kept", b"yes"),
        (b"x-forwarded-for", ip),
        (b"x-real-ip", ip),
        (b"x-forwarded-proto", b"https"),
    ]


def test_chunked_request_and_response_with_trailers() -> None:
    world = World()
    client = world.h11_client()
    client.send(
        b"POST /up HTTP/1.1\r\nHost: web.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 42\r\n\r\n"
    )
    world.run()
    backend = world.backends[0]
    (request,) = backend.requests()
    assert backend.body(request.stream_id) == b"hello world"
    (trailers,) = backend.of(request.stream_id, h2.events.TrailersReceived)
    assert trailers.headers == [(b"x-sum", b"42")]
    backend.respond(request.stream_id, b"streamed", trailers=[(b"grpc-status", b"0")])
    world.run()
    ((response, body, response_trailers),) = client.responses()
    assert dict(response.headers)[b"transfer-encoding"] == b"chunked"
    assert body == b"streamed"
    assert response_trailers == [(b"grpc-status", b"0")]


def test_pipelined_requests_are_answered_in_order() -> None:
    world = World()
    client = world.h11_client()
    client.send(
        b"GET /1 HTTP/1.1\r\nHost: web.test\r\n\r\n"
        b"GET /2 HTTP/1.1\r\nHost: web.test\r\n\r\n"
        b"GET /3 HTTP/1.1\r\nHost: web.test\r\n\r\n"
    )
    world.run()
    backend = world.backends[0]
    for expected in range(1, 4):
        requests = backend.requests()
        assert len(requests) == expected, "the next request waits for the current response"
        path = dict(requests[-1].headers)[b":path"]
        backend.respond(requests[-1].stream_id, b"answer " + path)
        world.run()
    assert [body for _, body, _ in client.responses()] == [b"answer /1", b"answer /2", b"answer /3"]


def test_expect_100_continue_is_answered_before_the_body() -> None:
    world = World()
    client = world.h11_client()
    client.send(
        b"PUT /f HTTP/1.1\r\nHost: web.test\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
    )
    world.run()
    assert client.received.startswith(b"HTTP/1.1 100 ")
    client.send(b"data")
    world.run()
    backend = world.backends[0]
    (request,) = backend.requests()
    assert b"expect" not in dict(request.headers)
    assert backend.body(request.stream_id) == b"data"


def test_a_large_upload_pauses_reading_until_the_backend_takes_it() -> None:
    world = World()
    client = world.h11_client()
    size = 4 * BODY_HIGH_WATER
    client.send(b"POST /up HTTP/1.1\r\nHost: web.test\r\nContent-Length: %d\r\n\r\n" % size)
    world.run()
    client.send(b"u" * size)
    world.run()
    exchange = client.leg.current
    assert exchange is not None
    assert not client.io.reading
    assert exchange.request.buffered <= BODY_HIGH_WATER + READ_SIZE
    backend = world.backends[0]
    (request,) = backend.requests()
    for _ in range(200):
        backend.ack_all()
        world.run()
    assert len(backend.body(request.stream_id)) == size


def test_policies_answer_403_and_keep_the_connection() -> None:
    world = World(route=policy_route(L7Policy(PolicyKind.BLOCK_USER_AGENT, "BadBot")))
    client = world.h11_client()
    client.send(b"GET / HTTP/1.1\r\nHost: web.test\r\nUser-Agent: BadBot/2\r\n\r\n")
    world.run()
    ((response, body, _),) = client.responses()
    assert response.status_code == 403
    assert body == b"403 Forbidden\n"
    assert not world.dials and not world.backends
    client.send(b"GET / HTTP/1.1\r\nHost: web.test\r\nUser-Agent: curl\r\n\r\n")
    world.run()
    assert len(world.backends[0].requests()) == 1


def test_a_malformed_request_gets_400_and_a_close() -> None:
    world = World()
    client = world.h11_client()
    client.send(b"GET / HTTP/1.1\r\nHost web.test\r\n\r\n")
    world.run()
    assert client.received.startswith(b"HTTP/1.1 400 ")
    assert client.io.closed


def test_a_backend_reset_before_the_response_gives_502() -> None:
    world = World()
    client = world.h11_client()
    client.send(b"GET / HTTP/1.1\r\nHost: web.test\r\n\r\n")
    world.run()
    backend = world.backends[0]
    (request,) = backend.requests()
    backend.conn.reset_stream(request.stream_id, 2)
    world.run()
    ((response, _, _),) = client.responses()
    assert response.status_code == 502


def test_a_backend_reset_mid_response_resets_the_client_connection() -> None:
    world = World()
    client = world.h11_client()
    client.send(b"GET / HTTP/1.1\r\nHost: web.test\r\n\r\n")
    world.run()
    backend = world.backends[0]
    (request,) = backend.requests()
    backend.respond(request.stream_id, b"partial", end=False)
    world.run()
    backend.conn.reset_stream(request.stream_id, 2)
    world.run()
    assert client.io.aborted


def test_a_client_that_goes_away_cancels_the_backend_stream() -> None:
    world = World()
    client = world.h11_client()
    client.send(b"POST / HTTP/1.1\r\nHost: web.test\r\nContent-Length: 10\r\n\r\nabc")
    world.run()
    client.leg.connection_lost()
    world.run()
    backend = world.backends[0]
    (request,) = backend.requests()
    (reset,) = backend.of(request.stream_id, h2.events.StreamReset)
    assert reset.error_code == 8  # CANCEL


def test_drain_closes_after_the_response_in_progress() -> None:
    world = World()
    client = world.h11_client()
    client.send(b"GET / HTTP/1.1\r\nHost: web.test\r\n\r\n")
    world.run()
    client.leg.begin_drain()
    backend = world.backends[0]
    (request,) = backend.requests()
    backend.respond(request.stream_id, b"last")
    world.run()
    ((response, body, _),) = client.responses()
    assert dict(response.headers)[b"connection"] == b"close"
    assert body == b"last"
    assert client.io.closed
