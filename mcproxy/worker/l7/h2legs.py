"""HTTP/2 legs: the client's connection (server side) and a backend's (client side).

Each wraps one ``h2.H2Connection`` and turns its events into calls on the
exchanges' flows; each hands out :class:`H2Endpoint` s through which the
exchanges send. Both pass received bytes through a
:class:`~mcproxy.worker.l7.frames.GoAwayFilter` first, because h2 would treat
a GOAWAY as the immediate end of the connection, and both send a graceful
GOAWAY themselves with :func:`~mcproxy.worker.l7.frames.encode_goaway` for
the same reason.

Windows: a client may have ``STREAM_WINDOW`` bytes in flight per stream and
``CLIENT_CONNECTION_WINDOW`` per connection; a backend ``STREAM_WINDOW`` per
stream and ``BACKEND_CONNECTION_WINDOW`` per connection. Since nothing is
acknowledged before the other leg took it, these are also the bounds of what
the proxy buffers. A backend connection is shared by many clients, so its
connection window is larger: a few stalled readers must not stall the others.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import h2.events as ev
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes, Settings

from mcproxy.worker.l7.bridge import Exchange, Flow, LegIO
from mcproxy.worker.l7.frames import FrameTooLarge, GoAway, GoAwayFilter, encode_goaway
from mcproxy.worker.l7.headers import Headers, end_to_end

if TYPE_CHECKING:
    from mcproxy.worker.l7.pool import BackendGroup
    from mcproxy.worker.l7.router import Router

__all__ = [
    "BACKEND_CONNECTION_WINDOW",
    "CLIENT_CONNECTION_WINDOW",
    "MAX_CLIENT_STREAMS",
    "RAPID_RESET_THRESHOLD",
    "STREAM_WINDOW",
    "H2Back",
    "H2Endpoint",
    "H2Front",
]

log = logging.getLogger("mcproxy.l7")

STREAM_WINDOW = 1 << 20
CLIENT_CONNECTION_WINDOW = 4 << 20
BACKEND_CONNECTION_WINDOW = 16 << 20
MAX_CLIENT_STREAMS = 128
MAX_HEADER_LIST_SIZE = 64 * 1024
RAPID_RESET_THRESHOLD = 100
"""A client that reset this many streams before their response ended, and at least half of
all its streams, is cut off (CVE-2023-44487). Legitimate cancellations stay far below."""
_DEFAULT_WINDOW = 65535


class H2Endpoint:
    """One stream on an :class:`H2Leg`."""

    __slots__ = ("leg", "stream_id")
    resettable = True

    def __init__(self, leg: H2Leg, stream_id: int) -> None:
        self.leg = leg
        self.stream_id = stream_id

    def capacity(self) -> int:
        return self.leg.capacity(self.stream_id)

    def send_head(self, headers: Headers, end: bool) -> None:
        self.leg.send_headers(self.stream_id, headers, end)

    def send_informational(self, headers: Headers) -> None:
        self.leg.send_headers(self.stream_id, headers, False)

    def send_data(self, data: bytes, end: bool) -> None:
        self.leg.send_data(self.stream_id, data, end)

    def send_trailers(self, trailers: Headers) -> None:
        self.leg.send_headers(self.stream_id, trailers, True)

    def end(self) -> None:
        self.leg.send_data(self.stream_id, b"", True)

    def ack(self, size: int) -> None:
        self.leg.ack(self.stream_id, size)

    def reset(self, code: int) -> None:
        self.leg.reset_stream(self.stream_id, code)

    def stop_request(self) -> None:
        self.leg.stop_request(self.stream_id)

    def release(self) -> None:
        self.leg.release(self.stream_id)


class H2Leg:
    """What both HTTP/2 legs share: the filter, the output, sending, windows, streams."""

    def __init__(self, conn: H2Connection, io: LegIO, expect_preface: bool) -> None:
        self.conn = conn
        self.io = io
        self.filter = GoAwayFilter(expect_preface)
        self.streams: dict[int, Exchange] = {}
        self.writable = True
        self.closed = False
        self.outcome: str | None = None
        """Why the leg ended, when it was not a plain close."""
        self._early = b""  # bytes that must go out before h2's next ones (a graceful GOAWAY)
        self.goaway_sent = False

    # --- to be specialised ----------------------------------------------------------

    def outbound(self, exchange: Exchange) -> Flow:
        raise NotImplementedError

    def inbound(self, exchange: Exchange) -> Flow:
        raise NotImplementedError

    def handle(self, event: ev.Event) -> None:
        raise NotImplementedError

    def on_goaway(self, goaway: GoAway) -> None:
        raise NotImplementedError

    def fail(self, outcome: str, detail: str, code: int | None = None) -> None:
        """End the connection; ``code``: send a GOAWAY with it (None: h2 has queued one)."""
        raise NotImplementedError

    # --- input ------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            data, goaways = self.filter.feed(data)
        except FrameTooLarge as exc:
            self.fail("protocol_error", str(exc), ErrorCodes.FRAME_SIZE_ERROR)
            return
        if data:
            try:
                events = self.conn.receive_data(data)
            except ProtocolError as exc:
                # h2 queued a GOAWAY naming the error: flush it, then close.
                self.fail("protocol_error", f"{type(exc).__name__}: {exc}")
                return
            for event in events:
                self.handle(event)
                if self.closed:
                    return
            self.io.wake()
        for goaway in goaways:
            self.on_goaway(goaway)

    def _data(self, event: ev.DataReceived) -> Flow | None:
        """Acknowledge padding now (never forwarded) and find the flow the data is for."""
        sid = event.stream_id
        padding = event.flow_controlled_length - len(event.data)
        exchange = self.streams.get(sid)
        if exchange is None:  # an exchange already over: nobody will take these bytes
            self.ack(sid, event.flow_controlled_length)
            return None
        if padding:
            self.ack(sid, padding)
        return self.inbound(exchange)

    def _window_updated(self, event: ev.WindowUpdated) -> None:
        if event.stream_id == 0:
            self.pump_all()
        elif (exchange := self.streams.get(event.stream_id)) is not None:
            self.outbound(exchange).pump()

    def _settings_changed(self, event: ev.RemoteSettingsChanged) -> None:
        changed = event.changed_settings
        if SettingCodes.INITIAL_WINDOW_SIZE in changed or SettingCodes.MAX_FRAME_SIZE in changed:
            self.pump_all()

    # --- output -----------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        out = self.conn.data_to_send()
        if self._early:
            out, self._early = self._early + out, b""
        return out

    def set_writable(self, writable: bool) -> None:
        self.writable = writable
        if writable:
            self.pump_all()

    def pump_all(self) -> None:
        for exchange in list(self.streams.values()):
            self.outbound(exchange).pump()

    def capacity(self, sid: int) -> int:
        if not self.writable or self.closed:
            return 0
        try:
            window = self.conn.local_flow_control_window(sid)
        except ProtocolError:
            return 0
        return min(window, self.conn.max_outbound_frame_size)

    def send_headers(self, sid: int, headers: Headers, end: bool) -> None:
        if self.closed:
            return
        try:
            self.conn.send_headers(sid, headers, end_stream=end)
        except ProtocolError as exc:
            self.send_failed(sid, exc)
        self.io.wake()

    def send_data(self, sid: int, data: bytes, end: bool) -> None:
        if self.closed:
            return
        try:
            self.conn.send_data(sid, data, end_stream=end)
        except ProtocolError as exc:
            self.send_failed(sid, exc)
        self.io.wake()

    def send_failed(self, sid: int, exc: ProtocolError) -> None:
        """A send on a stream the peer has just closed: its reset event will follow."""
        log.debug("send on stream %d failed: %s", sid, exc)

    def ack(self, sid: int, size: int) -> None:
        if self.closed or size <= 0:
            return
        try:
            self.conn.acknowledge_received_data(size, sid)
        except ProtocolError:
            return
        self.io.wake()

    def reset_stream(self, sid: int, code: int) -> None:
        self.streams.pop(sid, None)
        if self.closed:
            return
        try:
            self.conn.reset_stream(sid, code)
        except ProtocolError:
            return
        self.io.wake()

    def stop_request(self, sid: int) -> None:
        raise NotImplementedError

    def release(self, sid: int) -> None:
        self.streams.pop(sid, None)

    def send_goaway(self, last_stream_id: int, code: int = 0) -> None:
        """A GOAWAY that leaves streams up to ``last_stream_id`` running (h2's would not)."""
        if self.closed or self.goaway_sent:
            return
        self.goaway_sent = True
        self._early += self.conn.data_to_send() + encode_goaway(last_stream_id, code)
        self.io.wake()

    def terminate(self, code: int, outcome: str) -> None:
        """End the connection now with h2's GOAWAY; every stream is over."""
        if self.closed:
            return
        self.outcome = self.outcome or outcome
        with contextlib.suppress(ProtocolError):
            self.conn.close_connection(code)
        self.closed = True
        self.io.wake()
        self.io.close()


class H2Front(H2Leg):
    """The client's HTTP/2 connection: streams become exchanges through the router."""

    def __init__(self, io: LegIO, router: Router) -> None:
        conn = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        conn.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CLIENT_STREAMS,
                SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
            },
        )
        conn.initiate_connection()
        conn.increment_flow_control_window(CLIENT_CONNECTION_WINDOW - _DEFAULT_WINDOW)
        super().__init__(conn, io, expect_preface=True)
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
        if isinstance(event, ev.DataReceived):
            flow = self._data(event)
            if flow is not None:
                flow.receive_data(event.data)
        elif isinstance(event, ev.RequestReceived):
            self._open(event)
        elif isinstance(event, ev.StreamEnded):
            if (exchange := self.streams.get(event.stream_id)) is not None:
                exchange.request.receive_end()
        elif isinstance(event, ev.WindowUpdated):
            self._window_updated(event)
        elif isinstance(event, ev.TrailersReceived):
            if (exchange := self.streams.get(event.stream_id)) is not None:
                exchange.request.receive_end(end_to_end(_headers(event.headers)))
        elif isinstance(event, ev.StreamReset):
            self._reset(event.stream_id, event.error_code)
        elif isinstance(event, ev.RemoteSettingsChanged):
            self._settings_changed(event)

    def _open(self, event: ev.RequestReceived) -> None:
        sid = event.stream_id
        self.streams_opened += 1
        self.highest_stream_id = max(self.highest_stream_id, sid)
        if self.draining:
            # Opened after our GOAWAY crossed it on the wire: safe for the client to retry.
            self.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            return
        exchange = self.router.open(
            H2Endpoint(self, sid), _headers(event.headers), ended=event.stream_ended is not None
        )
        if not exchange.finished:
            self.streams[sid] = exchange
            self._new.append(exchange)

    def _reset(self, sid: int, code: int) -> None:
        exchange = self.streams.pop(sid, None)
        if exchange is None or exchange.finished:
            return
        self.premature_resets += 1
        exchange.client_reset(code)
        if (
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

    def on_goaway(self, goaway: GoAway) -> None:
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
        conn.increment_flow_control_window(BACKEND_CONNECTION_WINDOW - _DEFAULT_WINDOW)
        super().__init__(conn, io, expect_preface=False)
        self.group: BackendGroup | None = None
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
                    end_to_end(_headers(event.headers)), ended=event.stream_ended is not None
                )
        elif isinstance(event, ev.StreamEnded):
            if (exchange := self.streams.get(event.stream_id)) is not None:
                exchange.response.receive_end()
        elif isinstance(event, ev.WindowUpdated):
            self._window_updated(event)
        elif isinstance(event, ev.TrailersReceived):
            if (exchange := self.streams.get(event.stream_id)) is not None:
                exchange.response.receive_end(end_to_end(_headers(event.headers)))
        elif isinstance(event, ev.InformationalResponseReceived):
            if (exchange := self.streams.get(event.stream_id)) is not None:
                exchange.response.receive_informational(end_to_end(_headers(event.headers)))
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


def _headers(raw: object) -> Headers:
    """h2 with ``header_encoding=None`` gives bytes pairs; say so to the type checker."""
    return cast(Headers, raw)
