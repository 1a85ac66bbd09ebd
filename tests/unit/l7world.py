"""A bytes-only world for the L7 core: real h2/h11 peers on both sides, no sockets.

Like h11's ``ConnectionPair``: a client (an ``h2`` client connection or an
``h11`` client) talks to an ``H2Front``/``H11Front`` leg, exchanges go through
a ``BackendPool`` to ``H2Back`` legs, each talking to an ``h2`` server
connection that the test drives by hand. :meth:`World.run` moves bytes
between every pair until nothing moves. The peers never acknowledge data on
their own, so a test decides how fast each reader is. Time is a
:class:`ManualClock`: timers fire only when a test calls :meth:`World.advance`.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import h11

from mcproxy.model import Address, L7Policy, Mode, Route
from mcproxy.worker.l7.bridge import Exchange
from mcproxy.worker.l7.frames import GoAway, GoAwayFilter
from mcproxy.worker.l7.h2back import H2Back
from mcproxy.worker.l7.h2front import H2Front
from mcproxy.worker.l7.h11front import H11Front
from mcproxy.worker.l7.pool import BackendKey, BackendPool, Dial
from mcproxy.worker.l7.router import Router

CLIENT_IP = "192.0.2.7"
READ_SIZE = 64 * 1024
ROUTE = Route(
    hostname="web.test",
    backends=(Address("127.0.0.1", 9000),),
    mode=Mode.L7,
    tls_cert="/c.pem",
    tls_key="/k.pem",
)


class ManualTimer:
    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self.callback = _noop  # as asyncio's handles do: what it would have called is freed


def _noop() -> None:
    return None


class ManualClock:
    """A clock whose time moves only in :meth:`advance`, firing timers in order."""

    def __init__(self) -> None:
        self.time = 0.0
        self._heap: list[tuple[float, int, ManualTimer]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self.time

    def call_later(self, delay: float, callback: Callable[[], None]) -> ManualTimer:
        timer = ManualTimer(self.time + delay, callback)
        heapq.heappush(self._heap, (timer.when, next(self._seq), timer))
        return timer

    def pending(self) -> int:
        return sum(1 for _, _, t in self._heap if not t.cancelled)

    def fire_next(self, until: float) -> bool:
        """Fire the next timer due by ``until`` (moving time to it); False if none."""
        while self._heap and self._heap[0][0] <= until:
            when, _, timer = heapq.heappop(self._heap)
            if timer.cancelled:
                continue
            self.time = max(self.time, when)
            timer.callback()
            return True
        return False


class FakeIO:
    """Records what a leg asks of its transport."""

    def __init__(self) -> None:
        self.scheduled: list[Callable[[], None]] = []
        self.reading = True
        self.closed = False
        self.aborted = False

    def wake(self) -> None:
        return None

    def schedule(self, callback: Callable[[], None]) -> None:
        self.scheduled.append(callback)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True


def settings(**values: int) -> dict[h2.settings.SettingCodes, int]:
    return {h2.settings.SettingCodes[name]: value for name, value in values.items()}


class H2ClientPeer:
    """A real h2 client in front of an ``H2Front`` leg."""

    def __init__(
        self, world: World, initial: dict[h2.settings.SettingCodes, int] | None = None
    ) -> None:
        self.io = FakeIO()
        self.router = world.router()
        self.leg = H2Front(self.io, self.router)
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        if initial:
            self.conn.local_settings = h2.settings.Settings(client=True, initial_values=initial)
        self.conn.initiate_connection()
        self.events: list[h2.events.Event] = []
        self._acked = 0
        self.goaways: list[GoAway] = []
        self._filter = GoAwayFilter(expect_preface=False)
        self.eof = False

    def move(self) -> bool:
        moved = False
        if self.io.closed or self.io.aborted:
            out = self.leg.data_to_send()
            if out:
                self._receive(out)
            self.eof = True
            return bool(out)
        out = self.conn.data_to_send()
        if out:
            self.leg.receive_data(out)
            moved = True
        out = self.leg.data_to_send()
        if out:
            self._receive(out)
            moved = True
        return moved

    def _receive(self, data: bytes) -> None:
        data, goaways = self._filter.feed(data)
        self.goaways += goaways
        if data:
            self.events += self.conn.receive_data(data)

    def request(
        self,
        path: str = "/",
        method: str = "GET",
        body: bytes | None = None,
        extra: list[tuple[bytes, bytes]] | None = None,
        end: bool = True,
    ) -> int:
        """Open a stream; with ``end=False`` and no body the request stays open for data."""
        sid = self.conn.get_next_available_stream_id()
        headers = [
            (b":method", method.encode()),
            (b":scheme", b"https"),
            (b":authority", b"web.test"),
            (b":path", path.encode()),
            *(extra or []),
        ]
        self.conn.send_headers(sid, headers, end_stream=end and body is None)
        if body is not None:
            self.conn.send_data(sid, body, end_stream=end)
        return sid

    def of(self, sid: int, kind: type[Any]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind) and e.stream_id == sid]

    def body(self, sid: int) -> bytes:
        return b"".join(e.data for e in self.of(sid, h2.events.DataReceived))

    def response(self, sid: int) -> dict[bytes, bytes]:
        (event,) = self.of(sid, h2.events.ResponseReceived)
        return dict(event.headers)

    def ack_all(self) -> None:
        """Acknowledge every DATA frame received so far (a reader that keeps up)."""
        for event in self.events[self._acked :]:
            if isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
                with contextlib.suppress(h2.exceptions.StreamClosedError):
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
        self._acked = len(self.events)


class H11ClientPeer:
    """An h11 client in front of an ``H11Front`` leg; it reads whatever arrives."""

    def __init__(self, world: World) -> None:
        self.io = FakeIO()
        self.router = world.router()
        self.leg = H11Front(self.io, self.router, "web.test")
        self.received = b""
        self.outbox = b""

    def send(self, raw: bytes) -> None:
        self.outbox += raw

    def move(self) -> bool:
        moved = False
        if self.outbox and self.io.reading and not self.leg.closed:
            # One socket read at a time, as a transport would deliver them.
            data, self.outbox = self.outbox[:READ_SIZE], self.outbox[READ_SIZE:]
            self.leg.receive_data(data)
            moved = True
        out = self.leg.data_to_send()
        if out:
            self.received += out
            moved = True
        return moved

    def responses(self) -> list[tuple[h11.Response, bytes, list[tuple[bytes, bytes]]]]:
        """Parse everything received as a sequence of responses (status, body, trailers)."""
        conn = h11.Connection(h11.CLIENT)
        results: list[tuple[h11.Response, bytes, list[tuple[bytes, bytes]]]] = []
        conn.receive_data(self.received)
        while True:
            conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
            conn.send(h11.EndOfMessage())
            head, body, trailers = None, b"", []
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    return results
                if isinstance(event, h11.Response):
                    head = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    trailers = list(event.headers)
                    break
            assert head is not None
            results.append((head, body, trailers))
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return results
            conn.start_next_cycle()


class BackendPeer:
    """A real h2 server behind an ``H2Back`` leg."""

    def __init__(self, initial: dict[h2.settings.SettingCodes, int] | None = None) -> None:
        self.io = FakeIO()
        self.leg = H2Back(self.io)
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        if initial:
            self.conn.local_settings = h2.settings.Settings(client=False, initial_values=initial)
        self.conn.initiate_connection()
        self.events: list[h2.events.Event] = []
        self._acked = 0
        self.raw_to_leg = b""
        """Bytes the test wants to inject toward the leg (a GOAWAY, garbage)."""

    def move(self) -> bool:
        if self.leg.closed and not self.leg.data_to_send():
            return False
        moved = False
        out = self.leg.data_to_send()
        if out:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.events += self.conn.receive_data(out)
            moved = True
        out = self.conn.data_to_send() + self.raw_to_leg
        self.raw_to_leg = b""
        if out:
            self.leg.receive_data(out)
            moved = True
        return moved

    def requests(self) -> list[h2.events.RequestReceived]:
        return [e for e in self.events if isinstance(e, h2.events.RequestReceived)]

    def of(self, sid: int, kind: type[Any]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind) and e.stream_id == sid]

    def body(self, sid: int) -> bytes:
        return b"".join(e.data for e in self.of(sid, h2.events.DataReceived))

    def respond(
        self,
        sid: int,
        body: bytes = b"ok",
        status: int = 200,
        trailers: list[tuple[bytes, bytes]] | None = None,
        end: bool = True,
    ) -> None:
        self.conn.send_headers(sid, [(b":status", str(status).encode())])
        size = self.conn.max_outbound_frame_size
        for offset in range(0, len(body), size):
            last = offset + size >= len(body)
            self.conn.send_data(
                sid, body[offset : offset + size], end_stream=last and end and trailers is None
            )
        if trailers is not None:
            self.conn.send_headers(sid, trailers, end_stream=True)
        elif end and not body:
            self.conn.end_stream(sid)

    def ack_all(self) -> None:
        """Acknowledge every DATA frame received so far (a reader that keeps up)."""
        for event in self.events[self._acked :]:
            if isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
                with contextlib.suppress(h2.exceptions.StreamClosedError):
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
        self._acked = len(self.events)


class World:
    def __init__(
        self,
        route: Route | None = ROUTE,
        backend_settings: dict[h2.settings.SettingCodes, int] | None = None,
        auto_dial: bool = True,
        connect_timeout: float = 5.0,
        idle_timeout: float = 300.0,
    ) -> None:
        self.route = route
        self.backend_settings = backend_settings
        self.auto_dial = auto_dial
        self.timers = ManualClock()
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.groups: dict[BackendKey, BackendPool] = {}
        self.dials: list[Dial] = []
        self.clients: list[H2ClientPeer | H11ClientPeer] = []
        self.backends: list[BackendPeer] = []
        self.finished: list[Exchange] = []

    def router(self) -> Router:
        return Router(
            lookup=lambda: self.route,
            client_ip=CLIENT_IP,
            group_for=self.group_for,
            on_finished=self.finished.append,
            hostname="web.test",
            clock=self.timers.now,
            timers=self.timers,
            idle_timeout=self.idle_timeout,
        )

    def group_for(self, route: Route) -> BackendPool:
        key = BackendKey(route.backend, route.backend_tls)
        if key not in self.groups:
            self.groups[key] = BackendPool(
                key, self.dials.append, self.timers, self.connect_timeout, self.idle_timeout
            )
        return self.groups[key]

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass: fire each timer due, and let the world settle after each."""
        until = self.timers.time + seconds
        while self.timers.fire_next(until):
            self.run()
        self.timers.time = until
        self.run()

    def h2_client(self, initial: dict[h2.settings.SettingCodes, int] | None = None) -> H2ClientPeer:
        client = H2ClientPeer(self, initial)
        self.clients.append(client)
        return client

    def h11_client(self) -> H11ClientPeer:
        client = H11ClientPeer(self)
        self.clients.append(client)
        return client

    def connect(self, dial: Dial) -> BackendPeer:
        """Complete a dial: a backend whose SETTINGS reach the leg, then handed to the pool."""
        backend = BackendPeer(self.backend_settings)
        self.backends.append(backend)
        for _ in range(10):
            if backend.leg.ready:
                break
            backend.move()
        assert backend.leg.ready
        dial.connected(backend.leg)
        return backend

    def run(self, rounds: int = 1000) -> None:
        for _ in range(rounds):
            moved = False
            for peer in [*self.clients, *self.backends]:
                moved = peer.move() or moved
                scheduled, peer.io.scheduled = peer.io.scheduled, []
                for callback in scheduled:
                    callback()
                    moved = True
            if self.auto_dial and self.dials:
                dials = self.dials[:]
                self.dials.clear()  # the groups hold its append method
                for dial in dials:
                    self.connect(dial)
                moved = True
            if not moved:
                return
        raise AssertionError("the world did not settle")


def policy_route(*policies: L7Policy) -> Route:
    return Route(
        hostname=ROUTE.hostname,
        backends=ROUTE.backends,
        mode=Mode.L7,
        tls_cert=ROUTE.tls_cert,
        tls_key=ROUTE.tls_key,
        policies=policies,
    )
