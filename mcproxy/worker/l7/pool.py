"""Backend connections shared by the requests of one worker, and the queue in front of them.

One :class:`BackendGroup` per backend (address, cleartext or TLS) per worker
keeps at most one *active* HTTP/2 connection and multiplexes every request on
it, up to the backend's SETTINGS_MAX_CONCURRENT_STREAMS; requests beyond that
wait in FIFO order for a stream to close. A connection that received a GOAWAY
is *retired*: its open streams finish, new ones go to a fresh connection.
Routes with ``send_proxy_protocol`` get a private group per client connection
instead, since the PROXY header names one client.

Dialing is the glue's job: the group calls ``dial(group)`` when it needs a
connection and is told the result through :meth:`BackendGroup.connected` or
:meth:`BackendGroup.dial_failed`.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mcproxy.model import Address

if TYPE_CHECKING:
    from mcproxy.worker.l7.bridge import Exchange
    from mcproxy.worker.l7.h2back import H2Back

__all__ = ["BackendGroup", "BackendKey"]


@dataclass(frozen=True, slots=True)
class BackendKey:
    backend: Address
    tls: bool


class BackendGroup:
    def __init__(self, key: BackendKey, dial: Callable[[BackendGroup], None]) -> None:
        self.key = key
        self._dial = dial
        self.active: H2Back | None = None
        self.retired: set[H2Back] = set()
        self.waiting: deque[Exchange] = deque()
        self.dialing = False

    def submit(self, exchange: Exchange) -> None:
        """Queue a request for a stream; it is attached as soon as one is free."""
        exchange.group = self
        exchange.home = self
        self.waiting.append(exchange)
        self.dispatch()

    def withdraw(self, exchange: Exchange) -> None:
        """A queued request went away (client reset, local answer)."""
        exchange.group = None
        with contextlib.suppress(ValueError):
            self.waiting.remove(exchange)

    def dispatch(self) -> None:
        """Give waiting requests streams on the active connection, or dial one."""
        while self.waiting:
            leg = self.active
            if leg is None or not leg.usable:
                if leg is not None:
                    self._retire(leg)
                if not self.dialing:
                    self.dialing = True
                    self._dial(self)
                return
            if leg.free_streams() <= 0:
                return
            exchange = self.waiting.popleft()
            exchange.group = None
            leg.open_stream(exchange)

    def connected(self, leg: H2Back) -> None:
        self.dialing = False
        if self.active is not None:
            self._retire(self.active)
        self.active = leg
        leg.group = self
        self.dispatch()

    def dial_failed(self, status: int, detail: str) -> None:
        """Every request waiting for this dial gets ``status`` (502 or 504)."""
        self.dialing = False
        waiting, self.waiting = self.waiting, deque()
        for exchange in waiting:
            exchange.group = None
            exchange.backend_failed(status, detail)

    def retire(self, leg: H2Back, unprocessed: list[Exchange]) -> None:
        """``leg`` got a GOAWAY: no new streams on it; ``unprocessed`` streams are retried."""
        self._retire(leg)
        for exchange in unprocessed:
            exchange.requeue_or_fail("backend went away before processing the request")
        self.dispatch()

    def closed(self, leg: H2Back) -> None:
        self.retired.discard(leg)
        if self.active is leg:
            self.active = None
        self.dispatch()

    def stream_closed(self) -> None:
        self.dispatch()

    def connections(self) -> list[H2Back]:
        return [*([self.active] if self.active else []), *self.retired]

    def _retire(self, leg: H2Back) -> None:
        if self.active is leg:
            self.active = None
        if not leg.closed:
            self.retired.add(leg)
