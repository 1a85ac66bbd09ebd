"""One HTTP/2 connection to a backend (``h2core``, client side), one of a ``BackendPool``'s.

Its state (``ConnState``) is CONNECTING until the backend's SETTINGS arrive
(then we know it speaks HTTP/2 and how many streams it takes), READY, then
DRAINING after a GOAWAY (or at shutdown), CLOSED at the end; every change
goes through ``transition``, which tells the pool.

A graceful GOAWAY (NO_ERROR) lets streams up to ``last_stream_id`` finish
here; later ones never reached the backend and are retried elsewhere. A
GOAWAY with an error, or a protocol error, is a connection error: it ends
the streams of this connection alone, and none of them is retried (one of
them may have caused it).

Windows: the connection window is at least the sum of the stream windows of
the streams it may carry (:data:`MAX_STREAMS` x :data:`BACKEND_STREAM_WINDOW`),
so stalled readers on some streams, which leave their stream window full,
can never stall the other streams of the connection.
"""

from __future__ import annotations

import logging

from mcproxy.worker.l7 import h2core as ev
from mcproxy.worker.l7.bridge import Exchange, Flow, LegIO
from mcproxy.worker.l7.h2core import ErrorCodes, H2Connection, ProtocolError, SettingCodes
from mcproxy.worker.l7.h2leg import MAX_HEADER_LIST_SIZE, H2Endpoint, H2Leg
from mcproxy.worker.l7.headers import Headers, end_to_end
from mcproxy.worker.l7.pool import ConnState, PooledConnection, header_list_size

__all__ = ["BACKEND_CONNECTION_WINDOW", "BACKEND_STREAM_WINDOW", "MAX_STREAMS", "H2Back"]

log = logging.getLogger("mcproxy.l7")

MAX_STREAMS = 64
"""Streams per backend connection at most, whatever the backend allows; the pool dials more
connections beyond (up to ``pool.MAX_CONNECTIONS``)."""
BACKEND_STREAM_WINDOW = 256 * 1024
"""What a backend may send on one stream before the proxy's client leg took it."""
BACKEND_CONNECTION_WINDOW = MAX_STREAMS * BACKEND_STREAM_WINDOW
"""16 MiB: every stream may fill its window and the others still have room."""


class H2Back(H2Leg, PooledConnection):
    """One HTTP/2 connection to a backend, carrying the exchanges its pool gives it."""

    def __init__(self, io: LegIO) -> None:
        conn = H2Connection(
            client_side=True,
            local_settings={
                SettingCodes.ENABLE_PUSH: 0,
                SettingCodes.INITIAL_WINDOW_SIZE: BACKEND_STREAM_WINDOW,
                SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
            },
            connection_window=BACKEND_CONNECTION_WINDOW,
        )
        conn.initiate_connection()
        H2Leg.__init__(self, conn, io)
        PooledConnection.__init__(self)
        self._unopened: set[int] = set()
        self._limit = 1
        self._header_limit: int | None = None

    @property
    def ready(self) -> bool:
        return self.state is ConnState.READY

    # --- BackendConnection --------------------------------------------------------------

    def stream_limit(self) -> int:
        return self._limit

    def stream_count(self) -> int:
        return len(self.streams)

    def refuse(self, head: Headers) -> tuple[int, str] | None:
        limit = self._header_limit
        if limit is not None and (size := header_list_size(head)) > limit:
            return 431, f"request header list of {size} bytes over the backend's {limit}"
        return None

    def open_stream(self, exchange: Exchange) -> None:
        sid = self.conn.get_next_available_stream_id()
        self.streams[sid] = exchange
        self._unopened.add(sid)
        exchange.attach(H2Endpoint(self, sid))

    def drain(self) -> None:
        """Shutdown: take no new streams and close once the open ones end."""
        if self.state is ConnState.READY:
            self.transition(ConnState.DRAINING)
        if not self.streams:
            self.close()

    def close(self) -> None:
        """Close an idle (or drained) connection."""
        if self.closed:
            return
        self.send_goaway(0)
        self.closed = True
        self.io.close()
        self.transition(ConnState.CLOSED)
        self._fail_all("backend connection closed")

    def abort(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.failure = self.failure or "backend connection aborted"
        self.io.abort()
        self.transition(ConnState.CLOSED)
        self._fail_all(self.failure)

    # --- leg --------------------------------------------------------------------------------

    def outbound(self, exchange: Exchange) -> Flow:
        return exchange.request

    def inbound(self, exchange: Exchange) -> Flow:
        return exchange.response

    def handle(self, event: ev.Event) -> None:
        # Exact type tests, the most frequent first: cheaper than isinstance, and mypy narrows.
        if type(event) is ev.DataReceived:
            self._data(event)
        elif type(event) is ev.ResponseReceived:
            if (exchange := self.streams.get(event.stream_id)) is not None:
                exchange.response.receive_head(end_to_end(event.headers), ended=event.stream_ended)
        elif type(event) is ev.WindowUpdated:
            self._window_updated(event)
        elif type(event) is ev.TrailersReceived:
            if (exchange := self.streams.get(event.stream_id)) is not None:
                exchange.response.receive_end(end_to_end(event.headers))
        elif type(event) is ev.InformationalResponseReceived:
            if (exchange := self.streams.get(event.stream_id)) is not None:
                exchange.response.receive_informational(end_to_end(event.headers))
        elif type(event) is ev.StreamReset:
            if (exchange := self._forget(event.stream_id)) is not None:
                exchange.backend_reset(event.error_code)
                self._drained()
        elif type(event) is ev.RemoteSettingsChanged:
            self._read_settings()
            if self.state is ConnState.CONNECTING:
                self.transition(ConnState.READY)
            else:
                self._settings_changed(event)
                if self.pool is not None and self.pool.queued:
                    self.pool.dispatch()
        elif type(event) is ev.GoAwayReceived:
            self.on_goaway(event)

    def _read_settings(self) -> None:
        remote = self.conn.remote_settings
        self._limit = max(0, min(remote.max_concurrent_streams, MAX_STREAMS))
        self._header_limit = remote.max_header_list_size

    def send_headers(self, sid: int, headers: Headers, end: bool) -> None:
        opening = sid in self._unopened
        self._unopened.discard(sid)
        if not opening:
            super().send_headers(sid, headers, end)
            return
        try:
            self.conn.send_headers(sid, headers, end_stream=end)
        except ProtocolError as exc:
            # The stream cannot open (the backend's GOAWAY or stream limit crossed it).
            if (exchange := self._forget(sid)) is not None:
                exchange.backend_failed(502, f"request not sendable over HTTP/2: {exc}")
        self.io.wake()

    def stop_request(self, sid: int) -> None:  # pragma: no cover - a backend is never a client
        raise AssertionError("a backend leg has no request to stop")

    def reset_stream(self, sid: int, code: int) -> None:
        # h2 first, then the pool: it may give the freed slot out at once.
        exchange = self.streams.pop(sid, None)
        self._unopened.discard(sid)
        if not self.closed:
            self.conn.reset_stream(sid, code)
            self.io.wake()
        if exchange is not None and self.pool is not None:
            self.pool.released(self, exchange)
        self._drained()

    def release(self, sid: int) -> None:
        self._forget(sid)
        self._drained()

    def _forget(self, sid: int) -> Exchange | None:
        """Every stream leaves ``streams`` through here, so the pool's counts stay right."""
        exchange = self.streams.pop(sid, None)
        self._unopened.discard(sid)
        if exchange is not None and self.pool is not None:
            self.pool.released(self, exchange)
        return exchange

    def _drained(self) -> None:
        if self.state is ConnState.DRAINING and not self.streams:
            self.close()

    def on_goaway(self, goaway: ev.GoAwayReceived) -> None:
        """The backend is leaving: streams above ``last_stream_id`` never reached it."""
        if self.state is ConnState.CONNECTING:
            self.fail("goaway", f"backend sent GOAWAY ({goaway.error_code}) before SETTINGS")
            return
        if self.state is ConnState.READY:
            self.transition(ConnState.DRAINING)
        graceful = goaway.error_code == ErrorCodes.NO_ERROR
        unprocessed = [sid for sid in self.streams if sid > goaway.last_stream_id]
        exchanges = [self._forget(sid) for sid in unprocessed]
        for sid in unprocessed:
            self.conn.reset_stream(sid, ErrorCodes.CANCEL)
        self.io.wake()
        for exchange in exchanges:
            if exchange is None:
                continue
            if graceful:
                exchange.requeue_or_fail("backend went away before processing the request")
            else:
                # A connection error: one of these requests may have caused it. No retry.
                exchange.backend_failed(
                    502, f"backend connection error (GOAWAY code {goaway.error_code})"
                )
        if not graceful:
            log.warning("backend sent GOAWAY with error code %d", goaway.error_code)
        self._drained()

    def receive_eof(self) -> None:
        self.connection_lost()
        self.io.close()

    def fail(self, outcome: str, detail: str, code: int | None = None) -> None:
        if self.closed:
            return
        if code is not None:
            self.conn.close_connection(code)
        self.failure = detail
        log.warning("backend connection failed (%s): %s", outcome, detail)
        self.outcome = outcome
        self.closed = True
        self.io.wake()
        self.io.close()
        self.transition(ConnState.CLOSED)
        self._fail_all(f"backend broke the protocol: {detail}")

    def connection_lost(self, detail: str = "backend closed the connection") -> None:
        if self.state is ConnState.CLOSED:
            return
        self.closed = True
        self.failure = self.failure or detail
        self.transition(ConnState.CLOSED)
        self._fail_all(detail)

    def _fail_all(self, detail: str) -> None:
        """Every stream of this connection ends (502, or a reset if the response started).

        Called once the state is CLOSED, so the pool does not give these streams' slots out
        again on this connection.
        """
        self._unopened.clear()
        streams, self.streams = self.streams, {}
        pool = self.pool
        if pool is not None:
            for exchange in streams.values():
                pool.released(self, exchange)
        for exchange in streams.values():
            exchange.backend_failed(502, detail)
