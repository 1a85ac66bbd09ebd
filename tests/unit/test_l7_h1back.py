"""The HTTP/1.1 backend leg against h11 as the backend, bytes only (no sockets, no pool)."""

from __future__ import annotations

from collections.abc import Callable

import h11

from mcproxy.worker.l7.bridge import Exchange
from mcproxy.worker.l7.h1back import RESPONSE_HIGH_WATER, H1Back
from mcproxy.worker.l7.headers import Headers
from mcproxy.worker.l7.pool import ConnState
from tests.unit.l7world import FakeIO


class Client:
    """An exchange's client endpoint that records what reaches it."""

    resettable = True

    def __init__(self) -> None:
        self.head: Headers | None = None
        self.informational: list[Headers] = []
        self.body = b""
        self.ended = False
        self.trailers: Headers | None = None
        self.room = 1 << 30
        self.acked = 0
        self.resets: list[int] = []
        self.stopped = False

    def capacity(self) -> int:
        return self.room

    def send_head(self, headers: Headers, end: bool) -> None:
        self.head = headers
        self.ended = end

    def send_informational(self, headers: Headers) -> None:
        self.informational.append(headers)

    def send_data(self, data: bytes, end: bool) -> None:
        self.body += data
        self.ended = self.ended or end

    def send_trailers(self, trailers: Headers) -> None:
        self.trailers = trailers
        self.ended = True

    def end(self) -> None:
        self.ended = True

    def ack(self, size: int) -> None:
        self.acked += size

    def reset(self, code: int) -> None:
        self.resets.append(code)

    def stop_request(self) -> None:
        self.stopped = True

    def close_after_response(self) -> None:
        return None

    def release(self) -> None:
        return None


class Home:
    """Where a retried exchange goes."""

    def __init__(self) -> None:
        self.submitted: list[Exchange] = []

    def submit(self, exchange: Exchange) -> None:
        self.submitted.append(exchange)

    def withdraw(self, exchange: Exchange) -> None:
        return None


class Pair:
    """An ``H1Back`` and a real h11 server as the backend."""

    def __init__(self) -> None:
        self.io = FakeIO()
        self.leg = H1Back(self.io)
        self.leg.transition(ConnState.READY)
        self.server = h11.Connection(h11.SERVER)
        self.events: list[object] = []
        self.raw = b""
        """What reached the backend after a protocol switch."""
        self.finished: list[Exchange] = []

    def request(
        self, head: Headers, ended: bool = True, body: bytes = b""
    ) -> tuple[Exchange, Client]:
        client = Client()
        method = next(v for n, v in head if n == b":method").decode()
        exchange = Exchange(client, method, "web.test", self.finished.append)
        exchange.home = Home()
        exchange.request.head = head
        if body:
            exchange.request.receive_data(body)
        if ended:
            exchange.request.receive_end()
        self.leg.open_stream(exchange)
        self.run()
        return exchange, client

    def run(self) -> None:
        for _ in range(100):
            moved = False
            self.drain_scheduled()
            out = self.leg.data_to_send()
            if out:
                moved = True
                if self.server.their_state is h11.SWITCHED_PROTOCOL:
                    self.raw += out
                else:
                    self.server.receive_data(out)
                    self.pull()
            if not moved:
                return

    def drain_scheduled(self) -> None:
        while self.io.scheduled:
            callbacks: list[Callable[[], None]] = self.io.scheduled
            self.io.scheduled = []
            for callback in callbacks:
                callback()

    def pull(self) -> None:
        while True:
            event = self.server.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            self.events.append(event)

    def respond(self, *events: h11.Event) -> None:
        for event in events:
            data = self.server.send(event)
            if data:
                self.leg.receive_data(data)
        self.run()

    def requests(self) -> list[h11.Request]:
        return [e for e in self.events if isinstance(e, h11.Request)]

    def body(self) -> bytes:
        return b"".join(bytes(e.data) for e in self.events if isinstance(e, h11.Data))

    def next_cycle(self) -> None:
        self.server.start_next_cycle()
        self.events.clear()


def get(path: bytes = b"/", method: bytes = b"GET", *extra: tuple[bytes, bytes]) -> Headers:
    return [
        (b":method", method),
        (b":scheme", b"https"),
        (b":authority", b"web.test"),
        (b":path", path),
        *extra,
    ]


def ok(body: bytes = b"hello", *fields: tuple[bytes, bytes]) -> list[h11.Event]:
    return [
        h11.Response(status_code=200, headers=[(b"content-length", b"%d" % len(body)), *fields]),
        h11.Data(data=body),
        h11.EndOfMessage(),
    ]


def test_a_get_becomes_http11_with_host_and_comes_back_as_http2_fields() -> None:
    pair = Pair()
    head = get(b"/a?b=1", b"GET", (b"cookie", b"a=1"), (b"cookie", b"b=2"), (b"te", b"trailers"))
    exchange, client = pair.request(head)
    (request,) = pair.requests()
    assert request.method == b"GET" and request.target == b"/a?b=1"
    fields = dict(request.headers)
    assert fields[b"host"] == b"web.test"
    assert fields[b"cookie"] == b"a=1; b=2"
    assert b"te" not in fields and b"transfer-encoding" not in fields
    pair.respond(*ok(b"hello", (b"connection", b"keep-alive"), (b"x-app", b"1")))
    assert client.head is not None
    assert client.head[0] == (b":status", b"200")
    assert (b"x-app", b"1") in client.head and all(n != b"connection" for n, _ in client.head)
    assert client.body == b"hello" and client.ended
    assert exchange.finished
    assert pair.leg.exchange is None and not pair.leg.closed  # kept alive


def test_keep_alive_carries_the_next_request_on_the_same_connection() -> None:
    pair = Pair()
    pair.request(get(b"/1"))
    pair.respond(*ok(b"one"))
    pair.next_cycle()
    _, client = pair.request(get(b"/2"))
    assert [r.target for r in pair.requests()] == [b"/2"]
    pair.respond(*ok(b"two"))
    assert client.body == b"two"
    assert pair.leg.served == 2 and not pair.leg.closed


def test_a_body_of_unknown_length_goes_chunked_and_streams() -> None:
    pair = Pair()
    exchange, client = pair.request(get(b"/up", b"POST"), ended=False)
    (request,) = pair.requests()
    assert dict(request.headers)[b"transfer-encoding"] == b"chunked"
    exchange.request.receive_data(b"abc")
    pair.run()
    exchange.request.receive_data(b"def")
    exchange.request.receive_end()
    pair.run()
    assert pair.body() == b"abcdef"
    assert any(isinstance(e, h11.EndOfMessage) for e in pair.events)
    pair.respond(*ok(b"done"))
    assert client.body == b"done" and exchange.finished


def test_an_empty_post_says_content_length_zero() -> None:
    pair = Pair()
    pair.request(get(b"/p", b"POST"))
    (request,) = pair.requests()
    assert dict(request.headers)[b"content-length"] == b"0"


def test_head_and_204_have_no_body() -> None:
    pair = Pair()
    exchange, client = pair.request(get(b"/h", b"HEAD"))
    pair.respond(
        h11.Response(status_code=200, headers=[(b"content-length", b"1000")]), h11.EndOfMessage()
    )
    assert client.head is not None and (b"content-length", b"1000") in client.head
    assert client.body == b"" and client.ended and exchange.finished
    pair.next_cycle()
    exchange, client = pair.request(get(b"/n"))
    pair.respond(h11.Response(status_code=204, headers=[]), h11.EndOfMessage())
    assert client.head is not None and client.head[0] == (b":status", b"204")
    assert exchange.finished and not pair.leg.closed


def test_early_hints_pass_and_100_does_not() -> None:
    pair = Pair()
    _, client = pair.request(get())
    pair.respond(
        h11.InformationalResponse(status_code=100, headers=[]),
        h11.InformationalResponse(status_code=103, headers=[(b"link", b"</s.css>")]),
        *ok(),
    )
    assert client.informational == [[(b":status", b"103"), (b"link", b"</s.css>")]]


def test_a_chunked_response_streams_and_its_trailers_come_along() -> None:
    pair = Pair()
    _exchange, client = pair.request(get())
    pair.respond(
        h11.Response(status_code=200, headers=[(b"transfer-encoding", b"chunked")]),
        h11.Data(data=b"a"),
    )
    assert client.body == b"a" and not client.ended
    pair.respond(h11.Data(data=b"b"), h11.EndOfMessage(headers=[(b"x-sum", b"2")]))
    assert client.body == b"ab" and client.trailers == [(b"x-sum", b"2")]
    assert client.head is not None and all(n != b"transfer-encoding" for n, _ in client.head)


def test_a_slow_client_stops_the_backend_being_read() -> None:
    pair = Pair()
    exchange, client = pair.request(get())
    client.room = 0
    size = 3 * RESPONSE_HIGH_WATER
    pair.respond(h11.Response(status_code=200, headers=[(b"content-length", b"%d" % size)]))
    chunk = b"x" * 65536
    for _ in range(size // len(chunk)):
        pair.leg.receive_data(pair.server.send(h11.Data(data=chunk)))
    # The leg holds what it parsed beyond the high-water mark unread in h11's buffer.
    assert not pair.io.reading
    assert exchange.response.buffered >= RESPONSE_HIGH_WATER
    client.room = 1 << 30
    for _ in range(10):
        exchange.response.pump()
        pair.drain_scheduled()
    assert pair.io.reading
    pair.leg.receive_data(pair.server.send(h11.EndOfMessage()))
    pair.run()
    exchange.response.pump()
    assert len(client.body) == size and client.ended


def test_a_kept_alive_connection_closed_under_a_get_retries_it_once() -> None:
    pair = Pair()
    pair.request(get(b"/1"))
    pair.respond(*ok())
    pair.next_cycle()
    exchange, client = pair.request(get(b"/2"))
    pair.leg.receive_eof()  # the backend had closed it: nothing came back
    home = exchange.home
    assert isinstance(home, Home) and home.submitted == [exchange]
    assert exchange.requeues == 1 and client.head is None
    assert pair.leg.closed and pair.leg.state is ConnState.CLOSED


def test_a_post_is_not_retried_and_a_fresh_connection_is_not_either() -> None:
    pair = Pair()
    pair.request(get(b"/1"))
    pair.respond(*ok())
    pair.next_cycle()
    exchange, client = pair.request(get(b"/2", b"POST"))
    pair.leg.receive_eof()
    assert client.head is not None and client.head[0] == (b":status", b"502")
    assert "closed" in exchange.detail
    pair = Pair()
    exchange, client = pair.request(get(b"/1"))
    pair.leg.receive_eof()
    assert client.head is not None and client.head[0] == (b":status", b"502")


def test_a_broken_response_is_502_and_the_connection_is_reset() -> None:
    pair = Pair()
    _exchange, client = pair.request(get())
    pair.leg.receive_data(b"SPDY/3 200 OK\r\n\r\n")
    assert client.head is not None and client.head[0] == (b":status", b"502")
    assert pair.io.aborted and pair.leg.outcome == "backend_protocol_error"


def test_an_early_answer_stops_the_request_and_closes_the_connection() -> None:
    pair = Pair()
    exchange, client = pair.request(get(b"/up", b"POST", (b"content-length", b"100")), False)
    pair.respond(*ok(b"no"))
    assert client.body == b"no" and client.ended
    assert client.stopped  # the client is told to stop sending
    exchange.request_stopped()
    assert exchange.finished and pair.leg.closed


def test_a_websocket_from_http2_gets_a_key_a_101_and_becomes_a_tunnel() -> None:
    pair = Pair()
    head = get(b"/ws", b"CONNECT", (b"sec-websocket-version", b"13"))
    head.insert(1, (b":protocol", b"websocket"))
    exchange, client = pair.request(head, ended=False, body=b"early")
    (request,) = pair.requests()
    fields = dict(request.headers)
    assert request.method == b"GET" and request.target == b"/ws"
    assert fields[b"upgrade"] == b"websocket" and fields[b"connection"] == b"upgrade"
    assert len(fields[b"sec-websocket-key"]) == 24 and fields[b"sec-websocket-version"] == b"13"
    assert pair.raw == b""  # nothing of the tunnel before the 101
    switch = h11.InformationalResponse(
        status_code=101,
        headers=[
            (b"upgrade", b"websocket"),
            (b"connection", b"upgrade"),
            (b"sec-websocket-accept", b"x"),
            (b"sec-websocket-protocol", b"chat"),
        ],
    )
    pair.leg.receive_data(pair.server.send(switch) + b"\x81\x02hi")
    pair.run()
    assert client.head == [(b":status", b"200"), (b"sec-websocket-protocol", b"chat")]
    assert client.body == b"\x81\x02hi"
    assert pair.raw == b"early"
    assert pair.leg.tunnel and pair.leg.state is ConnState.DRAINING
    exchange.request.receive_data(b"\x88\x02\x03\xe8")
    pair.run()
    assert pair.raw == b"early\x88\x02\x03\xe8"
    pair.leg.receive_data(b"\x88\x02\x03\xe8")
    pair.leg.receive_eof()
    assert client.body.endswith(b"\x88\x02\x03\xe8") and client.ended
    assert pair.leg.closed and client.stopped


def test_a_websocket_from_http11_keeps_its_key_and_sees_the_101() -> None:
    pair = Pair()
    head = get(b"/ws", b"CONNECT", (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="))
    head.insert(1, (b":protocol", b"websocket"))
    _exchange, client = pair.request(head, ended=False)
    (request,) = pair.requests()
    assert dict(request.headers)[b"sec-websocket-key"] == b"dGhlIHNhbXBsZSBub25jZQ=="
    accept = (b"sec-websocket-accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    switch = h11.InformationalResponse(
        status_code=101, headers=[(b"upgrade", b"websocket"), (b"connection", b"upgrade"), accept]
    )
    pair.leg.receive_data(pair.server.send(switch))
    assert client.head == [(b":status", b"101"), accept]


def test_a_refused_websocket_is_a_plain_response() -> None:
    pair = Pair()
    head = get(b"/ws", b"CONNECT")
    head.insert(1, (b":protocol", b"websocket"))
    _exchange, client = pair.request(head, ended=False)
    pair.respond(*ok(b"nope"))
    assert client.head is not None and client.head[0] == (b":status", b"200")
    assert client.body == b"nope" and client.ended and not pair.leg.tunnel
    assert client.stopped


def test_drain_closes_a_tunnel_and_an_idle_connection() -> None:
    pair = Pair()
    head = get(b"/ws", b"CONNECT")
    head.insert(1, (b":protocol", b"websocket"))
    _exchange, client = pair.request(head, ended=False)
    pair.leg.receive_data(
        pair.server.send(h11.InformationalResponse(status_code=101, headers=[(b"upgrade", b"ws")]))
    )
    pair.leg.drain()
    assert pair.leg.closed and pair.io.closed and client.ended
    idle = Pair()
    idle.leg.drain()
    assert idle.leg.closed and idle.leg.state is ConnState.CLOSED
