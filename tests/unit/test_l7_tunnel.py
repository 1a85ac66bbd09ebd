"""HTTP/1.1 backends and WebSocket tunnels through the whole L7 core, bytes only.

Real h2/h11 clients in front (``l7world``), a pool of ``H1Back`` legs behind,
each facing a real h11 server that the test drives; after a 101 both ends
carry raw bytes, which must pass untouched.
"""

from __future__ import annotations

from dataclasses import replace

import h2.events
import h11

from mcproxy.model import BackendProtocol
from mcproxy.worker.l7.h1back import RESPONSE_HIGH_WATER, H1Back
from mcproxy.worker.l7.pool import BackendKey, BackendPool, ConnState, Dial
from tests.unit.l7world import READ_SIZE, ROUTE, FakeIO, World

H1_ROUTE = replace(ROUTE, backend_protocol=BackendProtocol.H1)
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: web.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: " + KEY + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


class HalfClosingIO(FakeIO):
    def __init__(self) -> None:
        super().__init__()
        self.eof_written = False

    def write_eof(self) -> None:
        self.eof_written = True


class H1BackendPeer:
    """A real h11 server behind an ``H1Back`` leg; raw bytes after a protocol switch."""

    def __init__(self) -> None:
        self.io = HalfClosingIO()
        self.leg = H1Back(self.io)
        self.leg.transition(ConnState.READY)
        self.server = h11.Connection(h11.SERVER)
        self.events: list[h11.Event] = []
        self.raw = b""
        self.outbox = b""
        self.closed = False

    def move(self) -> bool:
        moved = False
        out = self.leg.data_to_send()
        if out:
            moved = True
            if self.server.their_state is h11.SWITCHED_PROTOCOL:
                self.raw += out
            else:
                self.server.receive_data(out)
                self.pull()
        if self.outbox and self.io.reading and not self.leg.closed:
            # One socket read at a time, as a transport would deliver them.
            data, self.outbox = self.outbox[:READ_SIZE], self.outbox[READ_SIZE:]
            self.leg.receive_data(data)
            moved = True
        return moved

    def pull(self) -> None:
        while True:
            event = self.server.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            assert isinstance(event, h11.Event)
            self.events.append(event)

    def send(self, *events: h11.Event) -> None:
        for event in events:
            self.outbox += self.server.send(event) or b""

    def respond(self, body: bytes = b"ok", status: int = 200) -> None:
        self.send(
            h11.Response(status_code=status, headers=[(b"content-length", b"%d" % len(body))]),
            h11.Data(data=body),
            h11.EndOfMessage(),
        )

    def next_cycle(self) -> None:
        self.server.start_next_cycle()
        self.events.clear()
        self.pull()  # a request that arrived meanwhile

    def requests(self) -> list[h11.Request]:
        return [e for e in self.events if isinstance(e, h11.Request)]


class H1World(World):
    def __init__(self, **kwargs: object) -> None:
        super().__init__(route=H1_ROUTE, **kwargs)  # type: ignore[arg-type]
        self.h1: list[H1BackendPeer] = []

    def group_for(self, route: object) -> BackendPool:
        key = BackendKey(ROUTE.backend, False, protocol=BackendProtocol.H1)
        if key not in self.groups:
            self.groups[key] = BackendPool(
                key,
                self.dials.append,
                self.timers,
                self.connect_timeout,
                self.idle_timeout,
                max_connections=4,
            )
        return self.groups[key]

    def connect(self, dial: Dial) -> H1BackendPeer:  # type: ignore[override]
        peer = H1BackendPeer()
        self.h1.append(peer)
        self.backends.append(peer)  # type: ignore[arg-type]
        dial.connected(peer.leg)
        return peer


def test_an_http11_websocket_becomes_a_byte_tunnel_with_the_clients_own_key() -> None:
    world = H1World()
    client = world.h11_client()
    client.send(UPGRADE + b"\x81\x85early")  # a frame sent right behind the request
    world.run()
    (backend,) = world.h1
    (request,) = backend.requests()
    fields = dict(request.headers)
    assert request.method == b"GET" and request.target == b"/ws"
    assert fields[b"upgrade"] == b"websocket" and fields[b"sec-websocket-key"] == KEY
    assert backend.raw == b""  # nothing of the tunnel goes before the 101
    backend.send(
        h11.InformationalResponse(
            status_code=101,
            headers=[
                (b"upgrade", b"websocket"),
                (b"connection", b"Upgrade"),
                (b"sec-websocket-accept", ACCEPT),
            ],
        )
    )
    backend.outbox += b"\x81\x02hi"
    world.run()
    head, _, rest = client.received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"sec-websocket-accept: " + ACCEPT in head
    assert b"upgrade: websocket" in head.lower()
    assert rest == b"\x81\x02hi"
    assert backend.raw == b"\x81\x85early"
    client.send(b"\x88\x82\x00\x00\x00\x00\x03\xe8")  # a close frame, passed as is
    world.run()
    assert backend.raw.endswith(b"\x88\x82\x00\x00\x00\x00\x03\xe8")
    assert backend.leg.state is ConnState.DRAINING  # out of the pool's bound
    pool = next(iter(world.groups.values()))
    assert not pool.serving
    backend.outbox += b"\x88\x02\x03\xe8"
    world.run()
    backend.leg.receive_eof()  # the server closes after its close frame
    world.run()
    assert client.received.endswith(b"\x88\x02\x03\xe8")
    assert client.io.closed and backend.leg.closed
    client.leg.connection_lost()
    assert len(world.finished) == 1 and world.finished[0].status == 101


def test_an_http2_extended_connect_gets_200_and_data_frames_carry_the_tunnel() -> None:
    world = H1World()
    client = world.h2_client()
    world.run()
    assert client.conn.remote_settings.enable_connect_protocol == 1
    sid = client.request(
        "/ws",
        "CONNECT",
        extra=[(b":protocol", b"websocket"), (b"sec-websocket-version", b"13")],
        end=False,
    )
    world.run()
    (backend,) = world.h1
    (request,) = backend.requests()
    fields = dict(request.headers)
    assert fields[b"upgrade"] == b"websocket" and len(fields[b"sec-websocket-key"]) == 24
    backend.send(h11.InformationalResponse(status_code=101, headers=[(b"upgrade", b"websocket")]))
    world.run()
    assert client.response(sid)[b":status"] == b"200"
    client.conn.send_data(sid, b"\x81\x80abcd")
    backend.outbox += b"\x81\x03hey"
    world.run()
    assert backend.raw == b"\x81\x80abcd"
    assert client.body(sid) == b"\x81\x03hey"
    client.conn.send_data(sid, b"\x88\x80abcd", end_stream=True)  # close frame, END_STREAM
    world.run()
    assert backend.io.eof_written and not backend.io.closed  # half-closed: its answer comes
    assert not client.of(sid, h2.events.StreamEnded)
    backend.outbox += b"\x88\x02\x03\xe8"
    world.run()
    backend.leg.receive_eof()
    world.run()
    assert backend.io.closed
    assert client.body(sid).endswith(b"\x88\x02\x03\xe8")
    assert client.of(sid, h2.events.StreamEnded)
    assert not client.of(sid, h2.events.StreamReset)  # a clean end both ways
    assert world.finished and world.finished[0].method == "CONNECT"


def test_a_tunnel_that_stalls_for_idle_timeout_is_reset_both_ways() -> None:
    world = H1World(idle_timeout=60.0)
    client = world.h11_client()
    client.send(UPGRADE)
    world.run()
    (backend,) = world.h1
    backend.send(h11.InformationalResponse(status_code=101, headers=[(b"upgrade", b"ws")]))
    world.run()
    world.advance(30)
    client.send(b"\x81\x80abcd")  # traffic keeps it alive
    world.run()
    world.advance(55)
    assert not backend.io.aborted
    world.advance(30)
    assert backend.io.aborted and client.io.aborted


def test_a_refused_upgrade_is_a_plain_response_and_the_connection_goes_on() -> None:
    world = H1World()
    client = world.h11_client()
    client.send(UPGRADE)
    world.run()
    (backend,) = world.h1
    backend.respond(b"no websockets here", status=400)
    world.run()
    ((response, body, _),) = client.responses()
    assert response.status_code == 400 and body == b"no websockets here"
    assert not client.io.closed
    backend.next_cycle()
    client.send(b"GET /next HTTP/1.1\r\nHost: web.test\r\n\r\n")
    world.run()
    assert [r.target for r in backend.requests()] == [b"/next"]


def test_an_h2c_upgrade_goes_to_the_backend_as_a_plain_request() -> None:
    world = H1World()
    client = world.h11_client()
    client.send(
        b"GET / HTTP/1.1\r\nHost: web.test\r\nUpgrade: h2c\r\n"
        b"Connection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
    )
    world.run()
    (backend,) = world.h1
    (request,) = backend.requests()
    names = {name for name, _ in request.headers}
    assert not names & {b"upgrade", b"connection", b"http2-settings"}


def test_keep_alive_reuses_a_connection_and_a_stale_one_is_retried_on_a_fresh_one() -> None:
    world = H1World()
    client = world.h2_client()
    first = client.request("/1")
    world.run()
    (backend,) = world.h1
    backend.respond(b"one")
    world.run()
    assert client.body(first) == b"one"
    backend.next_cycle()
    second = client.request("/2")
    world.run()
    assert len(world.h1) == 1 and [r.target for r in backend.requests()] == [b"/2"]
    backend.respond(b"two")
    world.run()
    assert client.body(second) == b"two" and backend.leg.served == 2
    backend.next_cycle()
    third = client.request("/3")
    world.run()
    backend.leg.receive_eof()  # the backend had closed it as the request went out
    world.run()
    assert len(world.h1) == 2
    fresh = world.h1[1]
    assert [r.target for r in fresh.requests()] == [b"/3"]
    fresh.respond(b"three")
    world.run()
    assert client.body(third) == b"three"
    assert client.response(third)[b":status"] == b"200"


def test_concurrent_requests_take_one_connection_each_up_to_the_bound() -> None:
    world = H1World()
    client = world.h2_client()
    sids = [client.request(f"/{i}") for i in range(6)]
    world.run()
    assert len(world.h1) == 4  # the pool's bound in this world; two wait
    for peer in world.h1:
        peer.respond(b"x")
    world.run()
    assert sum(1 for sid in sids if client.body(sid) == b"x") == 4
    for peer in world.h1:
        peer.next_cycle()
    world.run()
    waiting = [peer for peer in world.h1 if peer.requests()]
    assert len(waiting) == 2 and len(world.h1) == 4  # served by kept-alive connections
    for peer in waiting:
        peer.respond(b"y")
    world.run()
    assert all(client.body(sid) in (b"x", b"y") for sid in sids)


def test_a_slow_http2_reader_stops_the_backend_being_read() -> None:
    world = H1World()
    client = world.h2_client()
    sid = client.request("/big")
    world.run()
    (backend,) = world.h1
    size = 8 << 20
    backend.send(h11.Response(status_code=200, headers=[(b"content-length", b"%d" % size)]))
    chunk = b"z" * (1 << 20)
    for _ in range(8):
        backend.send(h11.Data(data=chunk))
    world.run()
    # The client never acknowledges: its 64 KiB window, then the proxy holds up to its
    # high-water mark (plus one read) and stops reading the backend.
    assert not backend.io.reading
    exchange = backend.leg.exchange
    assert exchange is not None
    assert exchange.response.buffered < RESPONSE_HIGH_WATER + READ_SIZE
    assert len(backend.outbox) > size - (1 << 20)  # the rest waits at the backend
    for _ in range(1000):
        if len(client.body(sid)) == size:
            break
        client.ack_all()
        world.run()
        assert exchange.response.buffered < RESPONSE_HIGH_WATER + READ_SIZE
    assert len(client.body(sid)) == size


def test_tunnel_back_pressure_both_ways() -> None:
    world = H1World()
    client = world.h2_client()
    world.run()
    sid = client.request("/ws", "CONNECT", extra=[(b":protocol", b"websocket")], end=False)
    world.run()
    (backend,) = world.h1
    backend.send(h11.InformationalResponse(status_code=101, headers=[(b"upgrade", b"websocket")]))
    world.run()
    # Backend -> client: the client does not read (no WINDOW_UPDATE).
    blob = bytes(range(256)) * 8192  # 2 MiB
    backend.outbox += blob
    world.run()
    assert not backend.io.reading
    assert len(backend.outbox) > len(blob) // 2
    for _ in range(1000):
        if client.body(sid) == blob:
            break
        client.ack_all()
        world.run()
    assert client.body(sid) == blob
    # Client -> backend: the backend's transport is full; HTTP/1.1 clients stop being read.
    h11_client = world.h11_client()
    h11_client.send(UPGRADE)
    world.run()
    second = world.h1[-1]
    second.send(h11.InformationalResponse(status_code=101, headers=[(b"upgrade", b"websocket")]))
    world.run()
    second.leg.set_writable(False)
    h11_client.send(blob)
    world.run()
    assert not h11_client.io.reading
    assert len(h11_client.outbox) > len(blob) // 2
    second.leg.set_writable(True)
    world.run()
    assert second.raw == blob
