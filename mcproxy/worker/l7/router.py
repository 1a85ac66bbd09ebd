"""From a request head to an exchange: route, policies, forwarding headers, backend group.

The route is looked up from the worker's *current* state for every request,
not once per connection: a policy added or a backend changed through the
admin API applies to the next request on a keep-alive connection too. (The
certificate is the one exception: it was chosen by the TLS handshake.) A
route that was removed, or that became L4, answers 421 Misdirected Request,
which tells the client to retry on a new connection, where SNI routing
applies again.

The router also keeps every exchange of its connection to its deadline: a
sweep every ``idle_timeout / STALE_SWEEPS`` (one timer per client connection,
armed only while exchanges are open) resets an exchange whose progress
counter has not moved in :data:`STALE_SWEEPS` sweeps in a row, that is for at
least ``idle_timeout``. An exchange waiting in a pool's queue is the pool's
(``connect_timeout``, then 503).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from mcproxy.model import BackendProtocol, Mode, Route
from mcproxy.worker.l7.bridge import Endpoint, Exchange
from mcproxy.worker.l7.clock import Clock, Timer
from mcproxy.worker.l7.headers import (
    MAX_HEADER_LIST_SIZE,
    Headers,
    blocked_by,
    for_backend,
    header_list_size,
    refusal,
)
from mcproxy.worker.l7.pool import BackendPool
from mcproxy.worker.l7.tunnel import is_websocket

__all__ = ["STALE_SWEEPS", "Router"]

STALE_SWEEPS = 4
"""Sweeps per ``idle_timeout``: a stalled exchange is reset between 1 and 1.25 x idle_timeout
after its last progress, for one timer per connection instead of one per exchange."""


class Router:
    """Opens exchanges for one client connection."""

    def __init__(
        self,
        *,
        lookup: Callable[[], Route | None],
        client_ip: str,
        group_for: Callable[[Route], BackendPool],
        on_finished: Callable[[Exchange], None],
        hostname: str,
        clock: Callable[[], float] = time.monotonic,
        on_dial: Callable[[float], None] | None = None,
        timers: Clock | None = None,
        idle_timeout: float = 0.0,
        route_for: Callable[[str], Route | None] | None = None,
        on_routed: Callable[[Exchange, Route], None] | None = None,
        client_cert: bytes | None = None,
    ) -> None:
        self._on_routed = on_routed
        """Told each exchange sent towards a backend (balancing, failover)."""
        self._lookup = lookup
        self._client_ip = client_ip
        self._group_for = group_for
        self._on_finished = on_finished
        self._hostname = hostname
        self._clock = clock
        self._on_dial = on_dial
        self.open_exchanges = 0
        self._timers = timers if idle_timeout > 0 else None
        self._sweep_every = idle_timeout / STALE_SWEEPS
        self._live: set[Exchange] = set()
        self._sweep: Timer | None = None
        self._route_for = route_for
        """The route of a hostname on this listener (421 when it is not ours)."""
        self._client_cert = client_cert
        """``X-Forwarded-Client-Cert`` for the verified client certificate (``client_ca``)."""

    def open(self, client: Endpoint, head: Headers, ended: bool) -> Exchange:
        """An exchange for this request; ``home`` is its backend group unless answered locally.

        The caller calls ``exchange.submit()`` when it is ready to reach the backend.
        """
        method = next((v for n, v in head if n == b":method"), b"").decode("latin-1")
        route = self._lookup()
        exchange = Exchange(
            client,
            method,
            route.hostname if route else self._hostname,
            self._finished,
            self._clock,
        )
        exchange.on_dial = self._on_dial
        exchange.owner = self
        exchange.seen = -1  # the first sweep counts as progress: a full idle_timeout follows
        self.open_exchanges += 1
        if self._timers is not None:
            self._live.add(exchange)
            if self._sweep is None:
                self._sweep = self._timers.call_later(self._sweep_every, self._check)
        if ended:
            exchange.request.receive_end()
        if route is None or route.mode is not Mode.L7:
            exchange.respond_locally(421, "the route is gone or no longer L7")
        elif method == "CONNECT" and not is_websocket(head):
            exchange.respond_locally(501, "CONNECT is not supported")
        elif method == "CONNECT" and route.backend_protocol is not BackendProtocol.H1:
            exchange.respond_locally(501, "WebSocket needs backend_protocol h1")
        elif (refused := refusal(head, route, self._route_for)) is not None:
            exchange.respond_locally(*refused)
        elif (policy := blocked_by(route.policies, head)) is not None:
            exchange.respond_locally(403, f"policy {policy.kind}", blocked_by=policy.kind)
        else:
            forwarded = for_backend(head, self._client_ip)
            if self._client_cert is not None:  # the client's own was dropped just above
                forwarded.append((b"x-forwarded-client-cert", self._client_cert))
            if header_list_size(forwarded) > MAX_HEADER_LIST_SIZE:
                exchange.respond_locally(431, "header list too large once forwarded")
            else:
                exchange.request.head = forwarded
                exchange.home = self._group_for(route)
                if self._on_routed is not None:
                    self._on_routed(exchange, route)
        return exchange

    def _finished(self, exchange: Exchange) -> None:
        self.open_exchanges -= 1
        self._live.discard(exchange)
        self._on_finished(exchange)

    def _check(self) -> None:
        """The deadline sweep: reset exchanges that made no progress for ``idle_timeout``."""
        self._sweep = None
        for exchange in list(self._live):
            if exchange.finished:
                self._live.discard(exchange)
            elif exchange.group is not None or exchange.moved != exchange.seen:
                exchange.seen = exchange.moved
                exchange.stale = 0
            else:
                exchange.stale += 1
                if exchange.stale >= STALE_SWEEPS:
                    exchange.timed_out()
        if self._live and self._timers is not None:
            self._sweep = self._timers.call_later(self._sweep_every, self._check)

    def close(self) -> None:
        """The client connection is gone: stop the sweep."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        self._live.clear()
