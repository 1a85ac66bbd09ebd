"""Which backend each request of one client connection goes to, and L7 failover.

Sans-I/O glue between the router and the worker's
:class:`~mcproxy.worker.balance.Balancer` (ARCHITECTURE.md, "Backends and
health"). Every request is balanced on its own (an HTTP/2 connection's
streams spread over the backends like separate connections would). When no
backend stream can be had for a request and no byte of it was sent (the dial
failed or timed out: 502/504 from the pool), :meth:`Choices.failover` moves
it to the next backend that is up, and marks the failure in the worker's
passive view; a request whose head or body went out is never retried here.
``least_conn`` counts a request as one stream on its backend from routing to
its end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from mcproxy.model import Address, Route
from mcproxy.worker.balance import Balancer

if TYPE_CHECKING:
    from mcproxy.worker.l7.bridge import Exchange

__all__ = ["Choices"]


class _Group(Protocol):
    def submit(self, exchange: Exchange) -> None: ...


@dataclass(slots=True)
class _Routed:
    route: Route
    backend: Address
    counted: bool
    tried: tuple[Address, ...] = ()


class Choices:
    """The backends of one client connection's requests."""

    def __init__(
        self,
        balancer: Balancer,
        listener: str,
        client_ip: str,
        group_of: Callable[[Route, Address], _Group],
    ) -> None:
        self._balancer = balancer
        self._listener = listener
        self._client_ip = client_ip
        self._group_of = group_of
        self._routed: dict[Exchange, _Routed] = {}

    def choose(self, route: Route) -> Address:
        """The backend for a new request of ``route`` (the router's ``group_for`` asks)."""
        backend = self._balancer.choose(self._listener, route, self._client_ip)
        return backend if backend is not None else route.backend

    def routed(self, exchange: Exchange, route: Route, backend: Address) -> None:
        """``exchange`` goes to ``backend``: count it, and let it fail over."""
        counted = self._balancer.count(route, backend)
        self._routed[exchange] = _Routed(route, backend, counted)
        exchange.failover = self.failover

    def failover(self, exchange: Exchange, status: int, detail: str) -> bool:
        """No stream on the exchange's backend (``status`` 502/504, or 503: its queue is
        full); True when the exchange was submitted to another backend."""
        routed = self._routed.get(exchange)
        if routed is None:
            return False
        route, failed = routed.route, routed.backend
        if status in (502, 504):  # the dial failed: not merely a full queue
            self._balancer.dial_failed(self._listener, route, failed)
        tried = (*routed.tried, failed)
        backend = self._balancer.choose(self._listener, route, self._client_ip, tried)
        if backend is None:
            return False
        if routed.counted:
            self._balancer.released(failed)
        routed.backend, routed.tried = backend, tried
        routed.counted = self._balancer.count(route, backend)
        self._group_of(route, backend).submit(exchange)  # which makes it the exchange's home
        return True

    def finished(self, exchange: Exchange) -> tuple[Address | None, tuple[Address, ...]]:
        """The exchange ended: release its count; (its backend, the backends that failed)."""
        routed = self._routed.pop(exchange, None)
        if routed is None:
            return None, ()
        if routed.counted:
            self._balancer.released(routed.backend)
        if exchange.status and not exchange.detail:  # the backend answered
            self._balancer.passive.succeeded(routed.backend)
        return routed.backend, routed.tried
