"""The backend side of one worker: a pool of connections per backend, and the queue in front.

One :class:`BackendPool` per :class:`BackendKey` (address, TLS, PROXY header)
per worker is the single owner of the backend side: it knows every
connection and its state, which exchange each stream serves, and who waits.
An exchange sees a narrow interface: :meth:`BackendPool.submit` (acquire a
stream; the pool calls ``exchange.attach(endpoint)`` when one is open),
:meth:`BackendPool.withdraw` (cancel while queued), and the endpoint's
``release()`` (which the connection reports with :meth:`BackendPool.released`).

Strategy:

- A request goes to a READY connection with a free stream; else the pool
  dials a new connection if it holds fewer than :data:`MAX_CONNECTIONS`; else
  it queues. Streams are packed onto the oldest connections first, so spare
  ones go idle and expire after ``idle_timeout``.
- The queue is per client connection (the exchange's ``owner``) and served
  round robin across them, not FIFO: a client already holding its fair share
  of the pool's stream bound waits behind clients holding fewer. So one
  client connection cannot take a backend from the others, however many
  requests it stalls. Waiting is bounded by ``connect_timeout`` (then 503, or
  504 while no connection is ready), and queues are bounded in length per
  client connection and per pool (503 at once beyond).
- A connection has one state (:class:`ConnState`), changed only by
  :meth:`PooledConnection.transition`, which tells the pool. A connection
  error ends the streams of that connection alone; the pool forgets the
  connection and dials anew for whoever waits.
- Every timer (connect, queue wait, idle) is armed here, on an injected
  :class:`~mcproxy.worker.l7.clock.Clock`, so unit tests drive them.

Dialing is the glue's job: the pool calls ``dial(attempt)`` with a
:class:`Dial`, and the glue reports through :meth:`Dial.connected` (as soon
as the connection object exists; it becomes READY by itself) or
:meth:`Dial.failed`, and sets :attr:`Dial.cancel` so the pool can give up at
``connect_timeout``.

A connection type plugs in by subclassing :class:`PooledConnection` and
implementing :class:`BackendConnection` (HTTP/2: ``H2Back``; an HTTP/1.1
connection is one whose ``stream_limit()`` is 1). See ARCHITECTURE.md, "L7
routes".
"""

from __future__ import annotations

import enum
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Protocol

from mcproxy.model import Address, BackendProtocol
from mcproxy.worker.l7.certs import DEFAULT_TRUST, BackendTrust
from mcproxy.worker.l7.clock import Clock, Timer

if TYPE_CHECKING:
    from mcproxy.worker.l7.bridge import Exchange
    from mcproxy.worker.l7.headers import Headers

__all__ = [
    "MAX_CONNECTIONS",
    "MAX_QUEUED",
    "MAX_QUEUED_PER_CLIENT",
    "BackendConnection",
    "BackendKey",
    "BackendPool",
    "ConnState",
    "Dial",
    "PooledConnection",
    "header_list_size",
]

MAX_CONNECTIONS = 8
"""Connections per backend per worker. A bound, so that stalled streams cannot make a worker
dial a backend without limit; with 64 streams each it is 512 concurrent streams per backend per
worker, far more than a healthy mix of clients holds, so the fair-share rule only bites under
attack."""

MAX_QUEUED = 1024
"""Exchanges waiting for a stream, per pool; beyond it a request gets 503 at once."""

MAX_QUEUED_PER_CLIENT = 64
"""Exchanges of one client connection waiting for a stream of one pool (503 beyond): a client
connection cannot make the queue, and the memory it holds, grow without bound."""

DIAL_BACKOFF = 1.0
"""After a dial failed while other connections still serve, wait this long before the next one,
so a backend refusing new connections is not dialed on every stream that ends."""

DEFAULT_STREAM_LIMIT = 64
"""What a connection is expected to carry before its peer said (for dialing ahead of demand)."""


@dataclass(frozen=True, slots=True)
class BackendKey:
    backend: Address
    tls: bool
    proxy_header: bytes = b""
    """The PROXY v2 header sent first on every connection (empty: none). It names one client,
    so such pools are private to a client connection."""
    protocol: BackendProtocol = BackendProtocol.H2
    trust: BackendTrust = DEFAULT_TRUST
    """How a TLS backend is verified and what is presented to it (the route's trust fields)."""


class ConnState(enum.Enum):
    CONNECTING = "connecting"
    """Dialed; the peer's readiness (HTTP/2: its SETTINGS) is not known yet."""
    READY = "ready"
    DRAINING = "draining"
    """No new streams (GOAWAY, shutdown); closes when its streams end."""
    CLOSED = "closed"


_ALLOWED: dict[ConnState, frozenset[ConnState]] = {
    ConnState.CONNECTING: frozenset({ConnState.READY, ConnState.CLOSED}),
    ConnState.READY: frozenset({ConnState.DRAINING, ConnState.CLOSED}),
    ConnState.DRAINING: frozenset({ConnState.CLOSED}),
    ConnState.CLOSED: frozenset(),
}


class BackendConnection(Protocol):
    """What the pool asks of a backend connection.

    The connection calls ``pool.released(self, exchange)`` whenever one of its
    streams stops serving an exchange (reset, end, failure), after forgetting it.
    """

    state: ConnState
    pool: BackendPool | None
    failure: str | None

    def stream_limit(self) -> int:
        """Streams it may carry at once (the peer's limit, capped; HTTP/1.1: 1)."""

    def stream_count(self) -> int:
        """Streams it carries now (O(1): the pool asks on every dispatch)."""

    def refuse(self, head: Headers) -> tuple[int, str] | None:
        """A status and detail if this request must not be sent on it (431: too big)."""

    def open_stream(self, exchange: Exchange) -> None:
        """Open a stream and ``exchange.attach`` its endpoint."""

    def drain(self) -> None:
        """Take no new streams; close once the open ones end."""

    def close(self) -> None:
        """Close now, gracefully (idle)."""

    def abort(self) -> None:
        """Reset the transport now (connect timeout); every stream fails."""


class PooledConnection:
    """The state every backend connection keeps for its pool, and its one transition method."""

    def __init__(self) -> None:
        self.state = ConnState.CONNECTING
        self.pool: BackendPool | None = None
        self.failure: str | None = None

    def transition(self, new: ConnState) -> None:
        """Move to ``new`` (a no-op if already there) and tell the pool."""
        old = self.state
        if new is old:
            return
        if new not in _ALLOWED[old]:
            raise AssertionError(f"backend connection cannot go from {old.value} to {new.value}")
        self.state = new
        if self.pool is not None:
            self.pool.connection_changed(self, old, new)  # type: ignore[arg-type]


def header_list_size(head: Headers) -> int:
    """A header list's size as SETTINGS_MAX_HEADER_LIST_SIZE counts it (RFC 9113 6.5.2)."""
    return sum(len(name) + len(value) + 32 for name, value in head)


class Dial:
    """One attempt at a new connection; it counts against the bound until READY or failed."""

    __slots__ = ("cancel", "connection", "pool", "started", "timer")

    def __init__(self, pool: BackendPool, started: float) -> None:
        self.pool = pool
        self.started = started
        self.timer: Timer | None = None
        self.connection: BackendConnection | None = None
        self.cancel: Callable[[], object] = _nothing
        """Set by the glue: stop dialing (the pool gave up at ``connect_timeout``)."""

    @property
    def key(self) -> BackendKey:
        return self.pool.key

    def connected(self, connection: BackendConnection) -> None:
        """The transport is up and the connection exists (READY now or later)."""
        self.pool._handed(self, connection)

    def failed(self, status: int, detail: str) -> None:
        """The dial failed (502: unreachable, TLS, not HTTP/2; 504: too slow)."""
        self.pool._dial_failed(self, status, detail)


def _nothing() -> None:
    return None


class BackendPool:
    """The connections to one backend, the streams they serve, and who waits for one."""

    def __init__(
        self,
        key: BackendKey,
        dial: Callable[[Dial], None],
        clock: Clock,
        connect_timeout: float,
        idle_timeout: float,
        *,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.max_connections = max_connections
        """The bound on connections (HTTP/1.1 pools need more: one request each)."""
        self.key = key
        self._dial = dial
        self.clock = clock
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.connections: list[BackendConnection] = []
        """Handed over by a dial that completed: READY or DRAINING."""
        self.dials: list[Dial] = []
        self.waiting: OrderedDict[object, deque[Exchange]] = OrderedDict()
        """Per client connection (``exchange.owner``), in round-robin order."""
        self.queued = 0
        self.held: dict[object, int] = {}
        """Streams held per client connection."""
        self.serving: dict[Exchange, BackendConnection] = {}
        self._queue_timers: dict[Exchange, Timer] = {}
        self._idle_timers: dict[BackendConnection, Timer] = {}
        self._idle_since: dict[BackendConnection, float] = {}
        self._stream_hint = DEFAULT_STREAM_LIMIT
        self._backoff_until = 0.0
        self._backoff_timer: Timer | None = None
        self._dispatching = False
        self._again = False

    # --- the exchange's interface ----------------------------------------------------

    def submit(self, exchange: Exchange) -> None:
        """Acquire a stream for ``exchange``: now if one is free, else queue (bounded)."""
        exchange.home = self
        if not self.queued:
            connection = self._free_connection()
            if connection is not None:
                self._open(connection, exchange)
                return
        owner = exchange.owner
        queue = self.waiting.get(owner)
        if self.queued >= MAX_QUEUED or (queue is not None and len(queue) >= MAX_QUEUED_PER_CLIENT):
            exchange.backend_failed(503, "too many requests waiting for a backend stream")
            return
        if queue is None:
            queue = self.waiting[owner] = deque()
        queue.append(exchange)
        self.queued += 1
        exchange.group = self
        self._queue_timers[exchange] = self.clock.call_later(
            self.connect_timeout, lambda: self._queue_expired(exchange)
        )
        self.dispatch()

    def withdraw(self, exchange: Exchange) -> None:
        """A queued exchange went away (client reset, local answer, deadline)."""
        if exchange.group is not self:
            return
        exchange.group = None
        queue = self.waiting.get(exchange.owner)
        if queue is not None:
            try:
                queue.remove(exchange)
            except ValueError:
                pass
            else:
                self.queued -= 1
            if not queue:
                del self.waiting[exchange.owner]
        timer = self._queue_timers.pop(exchange, None)
        if timer is not None:
            timer.cancel()

    # --- the connections' interface --------------------------------------------------------

    def released(self, connection: BackendConnection, exchange: Exchange) -> None:
        """A stream of ``connection`` no longer serves ``exchange`` (idempotent)."""
        if self.serving.pop(exchange, None) is None:
            return
        owner = exchange.owner
        held = self.held.get(owner, 0) - 1
        if held > 0:
            self.held[owner] = held
        else:
            self.held.pop(owner, None)
        if connection.stream_count() == 0 and connection.state is ConnState.READY:
            self._went_idle(connection)
        if self.queued:
            self.dispatch()

    def connection_changed(
        self, connection: BackendConnection, old: ConnState, new: ConnState
    ) -> None:
        """Called by :meth:`PooledConnection.transition`."""
        dial = next((d for d in self.dials if d.connection is connection), None)
        if new is ConnState.READY:
            if dial is not None:
                self._dial_done(dial)
            return
        if new is ConnState.CLOSED:
            if dial is not None:
                self._dial_failed(
                    dial, 502, connection.failure or "backend closed before it was ready"
                )
                return
            self._forget(connection)
        self.dispatch()

    # --- dispatch ---------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Give waiting exchanges free streams, fairly; dial when that helps."""
        if self._dispatching:  # re-entered from an exchange's failure: loop once more
            self._again = True
            return
        self._dispatching = True
        try:
            self._again = True
            while self._again:
                self._again = False
                while self.queued:
                    connection = self._free_connection()
                    if connection is None:
                        self._maybe_dial()
                        break
                    self._open(connection, self._next_waiting())
        finally:
            self._dispatching = False

    def _free_connection(self) -> BackendConnection | None:
        for connection in self.connections:
            if (
                connection.state is ConnState.READY
                and connection.stream_count() < connection.stream_limit()
            ):
                return connection
        return None

    def _open(self, connection: BackendConnection, exchange: Exchange) -> None:
        head = exchange.request.head
        refusal = connection.refuse(head) if head is not None else None
        if refusal is not None:
            exchange.backend_failed(*refusal)
            return
        self.serving[exchange] = connection
        self.held[exchange.owner] = self.held.get(exchange.owner, 0) + 1
        self._idle_since.pop(connection, None)
        connection.open_stream(exchange)

    def fair_share(self) -> int:
        """Streams one client connection may hold while others wait: the bound, split evenly."""
        clients = len(self.held.keys() | self.waiting.keys())
        return max(1, self.max_connections * self._stream_hint // max(1, clients))

    def _next_waiting(self) -> Exchange:
        """Round robin across client connections; those under their share go first."""
        share = self.fair_share()
        owner = next((o for o in self.waiting if self.held.get(o, 0) < share), None)
        if owner is None:
            owner = next(iter(self.waiting))
        queue = self.waiting[owner]
        exchange = queue.popleft()
        if queue:
            self.waiting.move_to_end(owner)
        else:
            del self.waiting[owner]
        self.queued -= 1
        exchange.group = None
        timer = self._queue_timers.pop(exchange, None)
        if timer is not None:
            timer.cancel()
        return exchange

    def _queue_expired(self, exchange: Exchange) -> None:
        if exchange.group is not self:
            return
        self._queue_timers.pop(exchange, None)
        self.withdraw(exchange)
        if any(c.state is ConnState.READY for c in self.connections):
            exchange.backend_failed(503, "no backend stream free within connect_timeout")
        else:
            exchange.backend_failed(
                504, f"backend {self.key.backend} not ready within connect_timeout"
            )

    # --- dialing --------------------------------------------------------------------------------

    def _maybe_dial(self) -> None:
        """Dial as many connections as the queue needs, within the bound (HTTP/1.1: one per
        waiting request, since each carries one; HTTP/2: one per ``_stream_hint`` waiting)."""
        while True:
            ready = sum(1 for c in self.connections if c.state is ConnState.READY)
            if ready + len(self.dials) >= self.max_connections:
                return
            if self.queued <= len(self.dials) * self._stream_hint:
                return  # the dials under way will do
            now = self.clock.now()
            if now < self._backoff_until:
                if self._backoff_timer is None:
                    self._backoff_timer = self.clock.call_later(
                        self._backoff_until - now, self._backoff_over
                    )
                return
            dial = Dial(self, now)
            self.dials.append(dial)
            dial.timer = self.clock.call_later(
                self.connect_timeout, partial(self._dial_timed_out, dial)
            )
            self._dial(dial)
            if dial not in self.dials:  # failed at once
                return

    def _backoff_over(self) -> None:
        self._backoff_timer = None
        self.dispatch()

    def _handed(self, dial: Dial, connection: BackendConnection) -> None:
        if dial not in self.dials:  # given up on already
            connection.abort()
            return
        dial.connection = connection
        connection.pool = self
        if connection.state is ConnState.READY:
            self._dial_done(dial)
        elif connection.state is ConnState.CLOSED:
            self._dial_failed(dial, 502, connection.failure or "backend closed before it was ready")

    def _dial_done(self, dial: Dial) -> None:
        self.dials.remove(dial)
        if dial.timer is not None:
            dial.timer.cancel()
        connection = dial.connection
        assert connection is not None
        self._stream_hint = max(1, connection.stream_limit())
        self.connections.append(connection)
        seconds = self.clock.now() - dial.started
        for queue in self.waiting.values():  # whoever waited for this dial
            for exchange in queue:
                if exchange.on_dial is not None:
                    exchange.on_dial(seconds)
        self._went_idle(connection)
        self.dispatch()

    def _dial_timed_out(self, dial: Dial) -> None:
        if dial in self.dials:
            self._dial_failed(
                dial, 504, f"backend {self.key.backend} not ready within connect_timeout"
            )

    def _dial_failed(self, dial: Dial, status: int, detail: str) -> None:
        if dial not in self.dials:
            return
        self.dials.remove(dial)
        if dial.timer is not None:
            dial.timer.cancel()
        dial.cancel()
        if dial.connection is not None:
            dial.connection.abort()
        if any(c.state is ConnState.READY for c in self.connections) or self.dials:
            # Others still serve (or may): the waiting keep waiting, within their deadline.
            self._backoff_until = self.clock.now() + DIAL_BACKOFF
            self.dispatch()
            return
        waiting, self.waiting, self.queued = self.waiting, OrderedDict(), 0
        for queue in waiting.values():
            for exchange in queue:
                exchange.group = None
                timer = self._queue_timers.pop(exchange, None)
                if timer is not None:
                    timer.cancel()
                exchange.backend_failed(status, detail)

    # --- idle connections -----------------------------------------------------------------------

    def _went_idle(self, connection: BackendConnection) -> None:
        self._idle_since[connection] = self.clock.now()
        if connection not in self._idle_timers:
            self._idle_timers[connection] = self.clock.call_later(
                self.idle_timeout, lambda: self._check_idle(connection)
            )

    def _check_idle(self, connection: BackendConnection) -> None:
        """One timer per connection at a time, re-armed for what is left (never leaked)."""
        del self._idle_timers[connection]
        since = self._idle_since.get(connection)
        if connection.state is not ConnState.READY or since is None:
            return  # busy or gone: ``_went_idle`` arms a timer again when it is idle
        remaining = since + self.idle_timeout - self.clock.now()
        if remaining <= 0:
            connection.close()
            return
        self._idle_timers[connection] = self.clock.call_later(
            remaining, lambda: self._check_idle(connection)
        )

    def _forget(self, connection: BackendConnection) -> None:
        if connection in self.connections:
            self.connections.remove(connection)
        timer = self._idle_timers.pop(connection, None)
        if timer is not None:
            timer.cancel()
        self._idle_since.pop(connection, None)

    # --- whole pool -----------------------------------------------------------------------------

    def drain(self) -> None:
        """Shutdown: every connection takes no new streams and closes when its streams end."""
        for connection in list(self.connections):
            connection.drain()

    def close(self) -> None:
        """The pool's owner is gone (a private pool's client connection): close everything."""
        for dial in list(self.dials):
            self._dial_failed(dial, 502, "client connection closed")
        for connection in list(self.connections):
            connection.close()
