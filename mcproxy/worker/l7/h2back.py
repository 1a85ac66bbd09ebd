"""One HTTP/2 connection to a backend (h2, client side), shared through a ``BackendGroup``.

It is ready once the backend's SETTINGS arrived (so we know it speaks HTTP/2
and how many streams it takes). A GOAWAY from the backend retires it: streams
up to ``last_stream_id`` finish here, later ones are retried elsewhere. Its
connection window is larger than a client's: many clients share it, and a
few stalled readers must not stall the others.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Protocol

import h2.events as ev
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes, Settings

from mcproxy.worker.l7.bridge import Exchange, Flow, LegIO
from mcproxy.worker.l7.frames import GoAway
from mcproxy.worker.l7.h2leg import (
    DEFAULT_WINDOW,
    MAX_HEADER_LIST_SIZE,
    STREAM_WINDOW,
    H2Endpoint,
    H2Leg,
    headers_of,
)
from mcproxy.worker.l7.headers import Headers, end_to_end

__all__ = ["BACKEND_CONNECTION_WINDOW", "BackendOwner", "H2Back"]


class BackendOwner(Protocol):
    """The group that shares a backend connection (``pool.BackendGroup``; a protocol
    here so that the pool depends on this module and not the other way round)."""

    def dispatch(self) -> None: ...

    def stream_closed(self) -> None: ...

    def retire(self, leg: H2Back, unprocessed: list[Exchange]) -> None: ...

    def closed(self, leg: H2Back) -> None: ...


log = logging.getLogger("mcproxy.l7")

BACKEND_CONNECTION_WINDOW = 16 << 20


class H2Back(H2Leg):
    """One HTTP/2 connection to a backend, shared by the exchanges of a :class:`BackendGroup`."""

    def __init__(self, io: LegIO) -> None:
        conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        conn.local_settings = Settings(
            client=True,
            initial_values={
                SettingCodes.ENABLE_PUSH: 0,
                SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
            },
        )
        conn.initiate_connection()
        conn.increment_flow_control_window(BACKEND_CONNECTION_WINDOW - DEFAULT_WINDOW)
        super().__init__(conn, io, expect_preface=False)
        self.group: BackendOwner | None = None
        self.ready = False
        """The backend's SETTINGS arrived: it speaks HTTP/2 and we know its limits."""
        self.on_ready: Callable[[], None] | None = None
        self.on_closed: Callable[[], None] | None = None
        self.draining = False
        self.failure: str | None = None
        self._unopened: set[int] = set()

    @property
    def usable(self) -> bool:
        return self.ready and not self.draining and not self.closed

    def free_streams(self) -> int:
        limit = self.conn.remote_settings.max_concurrent_streams
        return int(limit - self.conn.open_outbound_streams)

    def open_stream(self, exchange: Exchange) -> None:
        sid = self.conn.get_next_available_stream_id()
        self.streams[sid] = exchange
        self._unopened.add(sid)
        exchange.attach(H2Endpoint(self, sid))

    def outbound(self, exchange: Exchange) -> Flow:
        return exchange.request

    def inbound(self, exchange: Exchange) -> Flow:
        return exchange.response

    def handle(self, event: ev.Event) -> None:
        if isinstance(event, ev.DataReceived):
            flow = self._data(event)
            if flow is not None:
                flow.receive_data(event.data)
        elif isinstance(event, ev.ResponseReceived):
            if (exchange := self.streams.get(event.stream_id)) is not None:
                exchange.response.receive_head(
                    end_to_end(headers_of(event.headers)), ended=event.stream_ended is not None
                )
        elif isinstance(event, ev.StreamEnded):
            if (exchange := self.streams.get(event.stream_id)) is not None:
                exchange.response.receive_end()
        elif isinstance(event, ev.WindowUpdated):
            self._window_updated(event)
        elif isinstance(event, ev.TrailersReceived):
            if (exchange := self.streams.get(event.stream_id)) is not None:
                exchange.response.receive_end(end_to_end(headers_of(event.headers)))
        elif isinstance(event, ev.InformationalResponseReceived):
            if (exchange := self.streams.get(event.stream_id)) is not None:
                exchange.response.receive_informational(end_to_end(headers_of(event.headers)))
        elif isinstance(event, ev.StreamReset):
            if (exchange := self.streams.pop(event.stream_id, None)) is not None:
                exchange.backend_reset(event.error_code)
                self._stream_gone()
        elif isinstance(event, ev.RemoteSettingsChanged):
            if not self.ready:
                self.ready = True
                if self.on_ready is not None:
                    self.on_ready()
            else:
                self._settings_changed(event)
                if self.group is not None:
                    self.group.dispatch()

    def send_headers(self, sid: int, headers: Headers, end: bool) -> None:
        opening = sid in self._unopened
        self._unopened.discard(sid)
        if not opening:
            super().send_headers(sid, headers, end)
            return
        try:
            self.conn.send_headers(sid, headers, end_stream=end)
        except ProtocolError as exc:
            # A request head HTTP/2 cannot carry. h2 already created the stream: close it.
            with contextlib.suppress(ProtocolError):
                self.conn.reset_stream(sid, ErrorCodes.CANCEL)
            if (exchange := self.streams.pop(sid, None)) is not None:
                exchange.backend_failed(502, f"request not sendable over HTTP/2: {exc}")
        self.io.wake()

    def stop_request(self, sid: int) -> None:  # pragma: no cover - a backend is never a client
        raise AssertionError("a backend leg has no request to stop")

    def release(self, sid: int) -> None:
        self.streams.pop(sid, None)
        self._stream_gone()

    def _stream_gone(self) -> None:
        if self.draining and not self.streams:
            self.close()
        elif self.group is not None:
            self.group.stream_closed()

    def on_goaway(self, goaway: GoAway) -> None:
        """The backend is leaving: streams above ``last_stream_id`` never reached it."""
        self.draining = True
        unprocessed = [ex for sid, ex in self.streams.items() if sid > goaway.last_stream_id]
        for sid in [sid for sid in self.streams if sid > goaway.last_stream_id]:
            self.reset_stream(sid, ErrorCodes.CANCEL)
        if self.group is not None:
            self.group.retire(self, unprocessed)
        else:
            for exchange in unprocessed:
                exchange.backend_failed(502, "backend went away")
        if not self.streams:
            self.close()

    def retire_when_idle(self) -> None:
        """Shutdown: take no new streams and close once the open ones end."""
        self.draining = True
        if self.group is not None:
            self.group.retire(self, [])
        if not self.streams:
            self.close()

    def receive_eof(self) -> None:
        self.connection_lost()
        self.io.close()

    def close(self) -> None:
        """Close an idle (or drained) connection."""
        if self.closed:
            return
        self.send_goaway(0)
        self.closed = True
        self.io.close()
        self._closed()

    def fail(self, outcome: str, detail: str, code: int | None = None) -> None:
        if self.closed:
            return
        if code is not None:
            with contextlib.suppress(ProtocolError):
                self.conn.close_connection(code)
        self.failure = detail
        log.warning("backend connection failed (%s): %s", outcome, detail)
        self.outcome = outcome
        self.closed = True
        self.io.wake()
        self.io.close()
        self._fail_all(f"backend broke the protocol: {detail}")
        self._closed()

    def connection_lost(self, detail: str = "backend closed the connection") -> None:
        if self.closed and not self.streams:
            self._closed()
            return
        self.closed = True
        self._fail_all(detail)
        self._closed()

    def _fail_all(self, detail: str) -> None:
        streams, self.streams = self.streams, {}
        for exchange in streams.values():
            exchange.backend_failed(502, detail)

    def _closed(self) -> None:
        if self.group is not None:
            group, self.group = self.group, None
            group.closed(self)
        if self.on_closed is not None:
            callback, self.on_closed = self.on_closed, None
            callback()
