"""The client's HTTP/2 connection (``h2core``, server side): its streams become exchanges.

Requests go to the router as they arrive, but are submitted to backend
groups only after the whole read was processed, so a stream opened and reset
in the same read never reaches a backend. A client that resets many streams
before their responses end is cut off (Rapid Reset, CVE-2023-44487).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from mcproxy.worker.l7 import h2core as ev
from mcproxy.worker.l7.bridge import Exchange, Flow, LegIO
from mcproxy.worker.l7.frames import Budget, FrameWatch
from mcproxy.worker.l7.h2core import ErrorCodes, H2Connection, SettingCodes
from mcproxy.worker.l7.h2leg import (
    MAX_HEADER_LIST_SIZE,
    STREAM_WINDOW,
    H2Endpoint,
    H2Leg,
)
from mcproxy.worker.l7.headers import request_trailers

if TYPE_CHECKING:
    from mcproxy.worker.l7.router import Router

__all__ = [
    "CLIENT_CONNECTION_WINDOW",
    "HEAD_TIMEOUT",
    "MAX_CLIENT_STREAMS",
    "RAPID_RESET_BUDGET",
    "RAPID_RESET_RATE",
    "RAPID_RESET_THRESHOLD",
    "H2Front",
]

log = logging.getLogger("mcproxy.l7")

CLIENT_CONNECTION_WINDOW = 4 << 20
MAX_CLIENT_STREAMS = 128
RAPID_RESET_THRESHOLD = 100
"""A client that reset this many streams before their response ended, and at least half of
all its streams, is cut off (CVE-2023-44487). Legitimate cancellations stay far below."""
RAPID_RESET_BUDGET = 200
RAPID_RESET_RATE = 10.0
"""The absolute budget of streams a client may reset before their response ended: a burst
of this many, then this many per second, however many real requests dilute them."""
HEAD_TIMEOUT = 10.0
"""The default of ``head_timeout`` (the proxy passes ``handshake_timeout``)."""


class H2Front(H2Leg):
    """The client's HTTP/2 connection: streams become exchanges through the router."""

    def __init__(
        self,
        io: LegIO,
        router: Router,
        head_timeout: float = HEAD_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        watch = FrameWatch(clock)
        conn = H2Connection(
            client_side=False,
            local_settings={
                SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CLIENT_STREAMS,
                SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
                # RFC 8441: WebSockets over extended CONNECT (routes with backend_protocol h1).
                SettingCodes.ENABLE_CONNECT_PROTOCOL: 1,
            },
            connection_window=CLIENT_CONNECTION_WINDOW,
            watch=watch,
        )
        conn.initiate_connection()
        super().__init__(conn, io, watch=watch, head_timeout=head_timeout)
        self.resets = Budget(RAPID_RESET_BUDGET, RAPID_RESET_RATE, clock)
        self.router = router
        self.streams_opened = 0
        self.premature_resets = 0
        self.highest_stream_id = 0
        self.draining = False
        self.peer_goaway = False
        self._new: list[Exchange] = []

    def outbound(self, exchange: Exchange) -> Flow:
        return exchange.response

    def inbound(self, exchange: Exchange) -> Flow:
        return exchange.request

    def receive_data(self, data: bytes) -> None:
        super().receive_data(data)
        # Requests go to backends only after the whole read was processed, so a stream
        # opened and reset in the same read (a Rapid Reset flood) never reaches one.
        new, self._new = self._new, []
        for exchange in new:
            exchange.submit()
        self._close_if_done()

    def handle(self, event: ev.Event) -> None:
        # Exact type tests, the most frequent first: cheaper than isinstance, and mypy narrows.
        if type(event) is ev.DataReceived:
            self._data(event)
        elif type(event) is ev.RequestReceived:
            self._open(event)
        elif type(event) is ev.WindowUpdated:
            self._window_updated(event)
        elif type(event) is ev.TrailersReceived:
            if (exchange := self.streams.get(event.stream_id)) is not None:
                exchange.request.receive_end(request_trailers(event.headers))
        elif type(event) is ev.StreamReset:
            self._reset(event.stream_id, event.error_code)
        elif type(event) is ev.RemoteSettingsChanged:
            self._settings_changed(event)
        elif type(event) is ev.GoAwayReceived:
            self.on_goaway(event)

    def _open(self, event: ev.RequestReceived) -> None:
        sid = event.stream_id
        self.streams_opened += 1
        self.highest_stream_id = max(self.highest_stream_id, sid)
        if self.draining:
            # Opened after our GOAWAY crossed it on the wire: safe for the client to retry.
            self.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            return
        exchange = self.router.open(H2Endpoint(self, sid), event.headers, ended=event.stream_ended)
        if not exchange.finished:
            self.streams[sid] = exchange
            self._new.append(exchange)

    def _reset(self, sid: int, code: int) -> None:
        exchange = self.streams.pop(sid, None)
        if exchange is None or exchange.finished:
            return
        self.premature_resets += 1
        exchange.client_reset(code)
        if not self.resets.spend() or (
            self.premature_resets >= RAPID_RESET_THRESHOLD
            and self.premature_resets * 2 >= self.streams_opened
        ):
            log.warning(
                "client reset %d of %d streams: closing the connection",
                self.premature_resets,
                self.streams_opened,
            )
            self.fail(
                "rapid_reset", "too many streams reset by the client", ErrorCodes.ENHANCE_YOUR_CALM
            )

    def stop_request(self, sid: int) -> None:
        exchange = self.streams.get(sid)
        # RFC 9113 section 8.1: after a complete response, NO_ERROR asks the client to stop.
        self.reset_stream(sid, ErrorCodes.NO_ERROR)
        if exchange is not None:
            exchange.request_stopped()

    def release(self, sid: int) -> None:
        self.streams.pop(sid, None)
        self._close_if_done()

    def on_goaway(self, goaway: ev.GoAwayReceived) -> None:
        self.peer_goaway = True
        self._close_if_done()

    def begin_drain(self) -> None:
        """Graceful shutdown: GOAWAY, refuse new streams, close once the open ones end."""
        if self.closed or self.draining:
            return
        self.draining = True
        self.send_goaway(self.highest_stream_id)
        self._close_if_done()

    def _close_if_done(self) -> None:
        if (self.draining or self.peer_goaway) and not self.streams and not self.closed:
            self.closed = True
            self.io.close()

    def fail(self, outcome: str, detail: str, code: int | None = None) -> None:
        """End the client connection: every exchange on it is cancelled toward its backend."""
        if self.closed:
            return
        log.info("client connection ended (%s): %s", outcome, detail)
        if code is not None:
            self.terminate(code, outcome)
        else:
            self.outcome = outcome
            self.closed = True
            self.io.wake()
            self.io.close()
        self._cancel_all()

    def receive_eof(self) -> None:
        self.connection_lost()
        self.io.close()

    def connection_lost(self) -> None:
        self.closed = True
        self._cancel_all()

    def _cancel_all(self) -> None:
        streams, self.streams = self.streams, {}
        self._new.clear()
        for exchange in streams.values():
            exchange.client_reset(ErrorCodes.CANCEL)
