"""What both HTTP/2 legs share: one ``h2core.H2Connection``, its streams, sending, windows.

A leg turns its connection's events into calls on the exchanges' flows
(``H2Front`` for the client, server side; ``H2Back`` for a backend, client
side) and hands out :class:`H2Endpoint` s through which the exchanges send.
A GOAWAY from the peer is an event like any other: the leg decides what
happens to the streams it left running.

Windows: a peer may have ``STREAM_WINDOW`` bytes in flight per stream, and a
connection window each leg chooses. Since nothing is acknowledged before the
other leg took it, the windows are also the bounds of what the proxy buffers.
"""

from __future__ import annotations

import logging

from mcproxy.worker.l7 import h2core as ev
from mcproxy.worker.l7.bridge import Exchange, Flow, LegIO
from mcproxy.worker.l7.frames import Abuse, FrameWatch
from mcproxy.worker.l7.h2core import ErrorCodes, H2Connection, ProtocolError, SettingCodes
from mcproxy.worker.l7.headers import Headers

__all__ = [
    "DEFAULT_WINDOW",
    "MAX_HEADER_LIST_SIZE",
    "STREAM_WINDOW",
    "H2Endpoint",
    "H2Leg",
]

log = logging.getLogger("mcproxy.l7")

STREAM_WINDOW = 1 << 20
MAX_HEADER_LIST_SIZE = 64 * 1024
DEFAULT_WINDOW = 65535
"""The protocol's initial window."""


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

    def close_after_response(self) -> None:
        return None  # one stream of many: the connection stays

    def stop_request(self) -> None:
        self.leg.stop_request(self.stream_id)

    def release(self) -> None:
        self.leg.release(self.stream_id)


class H2Leg:
    """What both HTTP/2 legs share: the connection, the output, sending, windows, streams."""

    def __init__(
        self,
        conn: H2Connection,
        io: LegIO,
        watch: FrameWatch | None = None,
        head_timeout: float = 0.0,
    ) -> None:
        self.conn = conn
        self.io = io
        self.watch = watch
        """The peer's budgets and head in progress (the client leg only)."""
        self.head_timeout = head_timeout
        self.streams: dict[int, Exchange] = {}
        self.writable = True
        self.closed = False
        self.outcome: str | None = None
        """Why the leg ended, when it was not a plain close."""
        self.goaway_sent = False

    # --- to be specialised ----------------------------------------------------------

    def outbound(self, exchange: Exchange) -> Flow:
        raise NotImplementedError

    def inbound(self, exchange: Exchange) -> Flow:
        raise NotImplementedError

    def handle(self, event: ev.Event) -> None:
        raise NotImplementedError

    def on_goaway(self, goaway: ev.GoAwayReceived) -> None:
        raise NotImplementedError

    def fail(self, outcome: str, detail: str, code: int | None = None) -> None:
        """End the connection; ``code``: send a GOAWAY with it (None: the core queued one)."""
        raise NotImplementedError

    # --- input ------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.conn.receive_data(data)
        except Abuse as exc:
            log.warning("HTTP/2 peer over budget: %s", exc)
            self.fail("abuse", str(exc))
            return
        except ProtocolError as exc:
            # The core queued a GOAWAY naming the error: flush it, then close.
            self.fail("protocol_error", f"{type(exc).__name__}: {exc}")
            return
        handle = self.handle
        for event in events:
            handle(event)
            if self.closed:
                return
        self.io.wake()

    def _data(self, event: ev.DataReceived) -> None:
        """Body bytes for the flow of the stream they are on (padding never reaches us)."""
        exchange = self.streams.get(event.stream_id)
        if exchange is None:  # an exchange already over: nobody will take these bytes
            self.ack(event.stream_id, len(event.data))
            return
        flow = self.inbound(exchange)
        if event.data:
            flow.receive_data(event.data)
        if event.stream_ended:
            flow.receive_end()

    def _window_updated(self, event: ev.WindowUpdated) -> None:
        if event.stream_id == 0:
            self.pump_all()
        elif (exchange := self.streams.get(event.stream_id)) is not None:
            self.outbound(exchange).pump()

    def _settings_changed(self, event: ev.RemoteSettingsChanged) -> None:
        changed = event.changed_settings
        if SettingCodes.INITIAL_WINDOW_SIZE in changed or SettingCodes.MAX_FRAME_SIZE in changed:
            self.pump_all()

    @property
    def head_deadline(self) -> float | None:
        """When the header block (or frame header) in progress must be whole."""
        watch = self.watch
        if watch is None or watch.head_since is None:
            return None
        return watch.head_since + self.head_timeout

    def check_deadline(self) -> None:
        """Called when ``head_deadline`` may have passed: the connection ends if it has."""
        deadline = self.head_deadline
        if deadline is not None and self.watch is not None and self.watch.now() >= deadline:
            self.fail(
                "head_timeout",
                "request head not received within the handshake timeout",
                ErrorCodes.ENHANCE_YOUR_CALM,
            )

    # --- output -----------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        return self.conn.data_to_send()

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
        if self.watch is not None:
            self.watch.glitches.earn(2)  # the WINDOW_UPDATEs this frame may be answered with
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
        self.conn.acknowledge_received_data(size, sid)
        self.io.wake()

    def reset_stream(self, sid: int, code: int) -> None:
        self.streams.pop(sid, None)
        if self.closed:
            return
        self.conn.reset_stream(sid, code)
        self.io.wake()

    def stop_request(self, sid: int) -> None:
        raise NotImplementedError

    def release(self, sid: int) -> None:
        self.streams.pop(sid, None)

    def send_goaway(self, last_stream_id: int, code: int = 0) -> None:
        """A GOAWAY that leaves streams up to ``last_stream_id`` running."""
        if self.closed or self.goaway_sent:
            return
        self.goaway_sent = True
        self.conn.send_goaway(last_stream_id, code)
        self.io.wake()

    def terminate(self, code: int, outcome: str) -> None:
        """End the connection now with a GOAWAY; every stream is over."""
        if self.closed:
            return
        self.outcome = self.outcome or outcome
        self.conn.close_connection(code)
        self.closed = True
        self.io.wake()
        self.io.close()
