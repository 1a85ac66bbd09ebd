"""The client's HTTP/1.1 connection: one ``h11.Connection``, one exchange at a time.

Keep-alive, chunked bodies and trailers are h11's; pipelining is safe
because h11 hands out the next request only after the current response is
complete (it answers ``PAUSED`` meanwhile, and we stop reading the socket).
HTTP/1.1 has no flow control of its own, so the request body's back-pressure
is the socket: above :data:`BODY_HIGH_WATER` bytes waiting for the backend,
events are no longer pulled and reading pauses; it resumes once the backend
leg has taken the backlog below half of that. The response goes out as fast
as the client's socket takes it (``capacity`` is 0 while the transport is
paused), and only then is it acknowledged to the backend.

Request heads (ARCHITECTURE.md, "L7 routes: hostile input"): until a head
is whole, the bytes that make it are also kept here (at most
:data:`MAX_HEAD_SIZE`) and checked before h11 parses them, whatever the write
sizes: size and field count (431), a second Content-Length, Content-Length
with Transfer-Encoding, obs-fold, NUL (400, then close: the framing of what
follows cannot be trusted). h11 itself refuses conflicting lengths and
transfer codings other than ``chunked`` (501). A head must be whole within
``head_timeout`` of its first byte, else 408 and close. Every refusal has a
fixed one-line body: nothing of the input is echoed.

``Expect: 100-continue`` is answered here, when the body is wanted. A
response that ends before its request body (a 403, an early backend answer)
discards up to :data:`DISCARD_LIMIT` more body bytes to keep the connection,
then gives up and closes.
"""

from __future__ import annotations

import http
import logging
import re
import time
from collections.abc import Callable

import h11
from h2.errors import ErrorCodes

from mcproxy.worker.l7.bridge import Exchange, LegIO
from mcproxy.worker.l7.headers import (
    MAX_HEADERS,
    Headers,
    h1_to_h2_request,
    h2_to_h1_response,
    request_trailers,
)
from mcproxy.worker.l7.router import Router
from mcproxy.worker.l7.tunnel import ClientTunnel, as_extended_connect, is_websocket_upgrade

__all__ = [
    "BODY_HIGH_WATER",
    "DISCARD_LIMIT",
    "HEAD_TIMEOUT",
    "MAX_HEAD_SIZE",
    "H11Endpoint",
    "H11Front",
    "error_response",
]

log = logging.getLogger("mcproxy.l7")

BODY_HIGH_WATER = 256 * 1024
DISCARD_LIMIT = 1 << 20
MAX_HEAD_SIZE = 64 * 1024
"""A request line and its fields, CRLFs included: a longer head gets 431."""
HEAD_TIMEOUT = 10.0
"""The default of ``head_timeout`` (the proxy passes ``handshake_timeout``)."""
_SEND_SIZE = 64 * 1024
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_OBS_FOLD = re.compile(rb"\n[ \t]")


def error_response(status: int) -> bytes:
    """A whole HTTP/1.1 error response with a fixed body, then the connection closes."""
    phrase = _reason(status)
    body = b"%d %s\n" % (status, phrase)
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n%s"
    ) % (status, phrase, len(body), body)


def _head_problem(head: bytes) -> tuple[int, str] | None:
    """Check a whole request head (its bytes up to the blank line) before h11 parses it."""
    if len(head) > MAX_HEAD_SIZE:
        return 431, "request head too large"
    if head.count(b"\n") > MAX_HEADERS:
        return 431, "too many header fields"
    if b"\0" in head:
        return 400, "NUL in the request head"
    if _OBS_FOLD.search(head) is not None:
        return 400, "obs-fold in the request head"
    lowered = head.lower()
    lengths = lowered.count(b"\ncontent-length:") + lowered.count(b"\ncontent-length ")
    if lengths > 1 or (lengths and b"," in _field(lowered, b"content-length")):
        return 400, "repeated Content-Length"
    if lengths and (b"\ntransfer-encoding:" in lowered or b"\ntransfer-encoding " in lowered):
        return 400, "Content-Length with Transfer-Encoding"
    return None


def _field(lowered: bytes, name: bytes) -> bytes:
    start = lowered.find(b"\n" + name + b":")
    if start < 0:
        return b""
    end = lowered.find(b"\n", start + 1)
    return lowered[start : end if end >= 0 else len(lowered)]


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


class H11Endpoint:
    """The one stream of an HTTP/1.1 connection."""

    __slots__ = ("leg",)
    resettable = False

    def __init__(self, leg: H11Front) -> None:
        self.leg = leg

    def capacity(self) -> int:
        return _SEND_SIZE if self.leg.writable and not self.leg.closed else 0

    def send_head(self, headers: Headers, end: bool) -> None:
        self.leg.send_response(headers, end)

    def send_informational(self, headers: Headers) -> None:
        self.leg.send_informational(headers)

    def send_data(self, data: bytes, end: bool) -> None:
        self.leg.send(h11.Data(data=data))
        if end:
            self.leg.send_end([])

    def send_trailers(self, trailers: Headers) -> None:
        self.leg.send_end(trailers)

    def end(self) -> None:
        self.leg.send_end([])

    def ack(self, size: int) -> None:
        self.leg.body_taken()

    def reset(self, code: int) -> None:
        self.leg.abort("reset")

    def close_after_response(self) -> None:
        self.leg.begin_drain()  # Connection: close on the response, then close

    def stop_request(self) -> None:
        self.leg.stop_request()

    def release(self) -> None:
        self.leg.exchange_finished()


class H11Front:
    def __init__(
        self,
        io: LegIO,
        router: Router,
        hostname: str,
        head_timeout: float = HEAD_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_SIZE)
        self.io = io
        self.router = router
        self.hostname = hostname
        self.endpoint = H11Endpoint(self)
        self.current: Exchange | None = None
        self.writable = True
        self.closed = False
        self.draining = False
        self.outcome: str | None = None
        self._out: list[bytes] = []
        self._reading_paused = False
        self._resume_scheduled = False
        self._sent_100 = False
        self._chunked = False
        self._discarded = 0
        self._peer_eof = False
        self.head_timeout = head_timeout
        self.clock = clock
        self.head_deadline: float | None = None
        """When the head being received must be whole (None: no head in progress)."""
        self._head = bytearray()  # the bytes of the head in progress, until it was checked
        self._tapping = True
        self._upgrade = False  # a WebSocket upgrade request waits for the backend's answer
        self.tunnel: ClientTunnel | None = None
        """After a WebSocket's 101: bytes only (``tunnel.py``)."""

    # --- input -------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.receive_data(data)
            return
        if self.closed:
            return
        if self._tapping and data and not self._tap(data):
            return
        self.conn.receive_data(data)
        self._process()

    def _tap(self, data: bytes) -> bool:
        """Keep and check the bytes of a head in progress; False when it was refused."""
        if self.head_deadline is None:
            self.head_deadline = self.clock() + self.head_timeout
        head = self._head
        if not head:
            # Leading empty lines before a request line are allowed (RFC 9112 section 2.2).
            data = data.lstrip(b"\r\n")
        start = max(0, len(head) - 3)
        head += data  # a bytearray: a head trickled byte by byte costs no quadratic copying
        end = _HEAD_END.search(head, start)
        if end is None:
            if len(head) > MAX_HEAD_SIZE:
                self.refuse(431, "request head too large")
                return False
            return True
        problem = _head_problem(bytes(head[: end.start()]))
        self._head = bytearray()
        self._tapping = False
        self.head_deadline = None
        if problem is not None:
            self.refuse(*problem)
            return False
        return True

    def check_deadline(self) -> None:
        """Called when ``head_deadline`` may have passed: 408 for a head still incomplete."""
        deadline = self.head_deadline
        if deadline is not None and not self.closed and self.clock() >= deadline:
            self.refuse(408, "request head not received within the handshake timeout")

    def refuse(self, status: int, detail: str) -> None:
        """Answer an unusable request head with a fixed error, then close."""
        if self.closed:
            return
        log.info("HTTP/1.1 request refused (%d): %s", status, detail)
        self.outcome = "head_timeout" if status == 408 else "protocol_error"
        self.head_deadline = None
        exchange = self.current
        if exchange is not None or self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            self.abort(self.outcome)
            return
        self._out.append(error_response(status))
        self.io.wake()
        self._close()

    def receive_eof(self) -> None:
        if self.tunnel is not None:
            self.tunnel.receive_eof()
            return
        self.receive_data(b"")

    def _process(self) -> None:
        while not self.closed:
            exchange = self.current
            if exchange is not None and exchange.request.buffered >= BODY_HIGH_WATER:
                self._pause_reading()
                return
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._bad_request(exc)
                return
            if event is h11.NEED_DATA:
                if (
                    exchange is not None
                    and self.conn.they_are_waiting_for_100_continue
                    and not exchange.request.discarding
                    and not self._sent_100
                ):
                    self._sent_100 = True
                    self.send(h11.InformationalResponse(status_code=100, headers=[]))
                self._resume_reading()
                return
            if event is h11.PAUSED:
                # A pipelined request waits in h11's buffer until this response is out.
                self._pause_reading()
                return
            if isinstance(event, h11.Request):
                self._start(event)
            elif isinstance(event, h11.Data):
                assert exchange is not None
                if exchange.request.discarding:
                    self._discarded += len(event.data)
                    if self._discarded > DISCARD_LIMIT:
                        self.abort("closed")
                        return
                exchange.request.receive_data(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                assert exchange is not None
                if self._upgrade:
                    continue  # what follows a 101 is the tunnel; else it ends at the answer
                trailers = request_trailers([(bytes(n), bytes(v)) for n, v in event.headers])
                exchange.request.receive_end(trailers or None)
            elif isinstance(event, h11.ConnectionClosed):
                self._peer_closed()
                return

    def _start(self, request: h11.Request) -> None:
        self._sent_100 = False
        self._discarded = 0
        headers = [(bytes(n), bytes(v)) for n, v in request.headers]
        method, target = bytes(request.method), bytes(request.target)
        head = h1_to_h2_request(method, target, headers, self.hostname)
        self._upgrade = is_websocket_upgrade(headers)
        if self._upgrade:
            head = as_extended_connect(head)
        exchange = self.router.open(self.endpoint, head, ended=False)
        if not exchange.finished:
            self.current = exchange
            exchange.submit()

    def _peer_closed(self) -> None:
        self._peer_eof = True
        exchange = self.current
        if exchange is None:
            self._close()
        elif not exchange.request.ended:
            exchange.client_reset(ErrorCodes.CANCEL)
        # else: the request is complete; the response goes out, then we close.

    def _bad_request(self, exc: h11.RemoteProtocolError) -> None:
        exchange = self.current
        if exchange is not None:
            self.outcome = "protocol_error"
            exchange.client_reset(ErrorCodes.CANCEL)
            self.abort("protocol_error")
            return
        self.refuse(exc.error_status_hint, str(exc))

    # --- back-pressure -------------------------------------------------------------------

    def _pause_reading(self) -> None:
        if not self._reading_paused:
            self._reading_paused = True
            self.io.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self.io.resume_reading()

    def body_taken(self) -> None:
        """The backend leg took request bytes: resume once the backlog is half drained."""
        exchange = self.current
        if (
            self._reading_paused
            and not self._resume_scheduled
            and (exchange is None or exchange.request.buffered < BODY_HIGH_WATER // 2)
        ):
            self._resume_scheduled = True
            self.io.schedule(self._resume)

    def _resume(self) -> None:
        self._resume_scheduled = False
        self._process()

    def set_writable(self, writable: bool) -> None:
        self.writable = writable
        if self.tunnel is not None:
            self.tunnel.set_writable(writable)
            return
        if writable and self.current is not None:
            self.current.response.pump()

    # --- output --------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        out, self._out = b"".join(self._out), []
        if self.tunnel is not None:
            out += self.tunnel.data_to_send()
        return out

    def send(self, event: h11.Event) -> None:
        if self.closed:
            return
        try:
            data = self.conn.send(event)
        except h11.LocalProtocolError as exc:
            # The backend's response does not fit HTTP/1.1 framing (a wrong content-length).
            log.info("response cannot be sent as HTTP/1.1: %s", exc)
            self.abort("backend_protocol_error")
            return
        if data:
            self._out.append(data)
            self.io.wake()

    def send_response(self, headers: Headers, end: bool) -> None:
        status, fields = h2_to_h1_response(headers)
        if self._upgrade:
            self._upgrade = False
            if status == 101:
                self._switch(fields)
                return
            if self.current is not None:  # refused: the upgrade request ends with its answer
                self.io.schedule(self.current.request.receive_end)
        if not 200 <= status <= 999:
            self.abort("backend_protocol_error")
            return
        if self.draining or self._peer_eof:
            fields.append((b"connection", b"close"))
        exchange = self.current
        self._chunked = (
            self.conn.their_http_version == b"1.1"
            and not any(n == b"content-length" for n, _ in fields)
            and status not in (204, 304)
            and (exchange is None or exchange.method != "HEAD")
        )
        self.send(h11.Response(status_code=status, headers=fields, reason=_reason(status)))
        if end:
            self.send_end([])

    def _switch(self, fields: Headers) -> None:
        """The backend took the WebSocket: send the 101, then carry bytes only."""
        exchange = self.current
        assert exchange is not None
        upgrade = [(b"upgrade", b"websocket"), (b"connection", b"Upgrade")]
        self.send(
            h11.InformationalResponse(
                status_code=101, headers=upgrade + fields, reason=b"Switching Protocols"
            )
        )
        if self.closed:
            return
        early, closed = self.conn.trailing_data
        self.tunnel = ClientTunnel(self.io, exchange, bytes(early), closed)
        self._resume_reading()

    def send_informational(self, headers: Headers) -> None:
        status, fields = h2_to_h1_response(headers)
        if (status == 100 and self._sent_100) or not 100 <= status < 200 or status == 101:
            return
        if status == 100:
            self._sent_100 = True
        self.send(h11.InformationalResponse(status_code=status, headers=fields))

    def send_end(self, trailers: Headers) -> None:
        # Trailers need chunked framing; without it they are dropped.
        self.send(h11.EndOfMessage(headers=trailers if self._chunked else []))
        if self.conn.our_state is h11.MUST_CLOSE:
            self._close()

    # --- the exchange's end ----------------------------------------------------------------

    def stop_request(self) -> None:
        """The response is out before the request body: discard the rest, within limits."""
        if self.conn.they_are_waiting_for_100_continue:
            self._close()  # the client holds the body back; do not wait for it
            return
        self.io.schedule(self._process)

    def exchange_finished(self) -> None:
        self.current = None
        if self.closed:
            return
        if self.draining or self._peer_eof:
            self._close()
            return
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
            self._tapping = True
            pipelined = self.conn.trailing_data[0]  # already in h11's buffer: check it only
            if pipelined and not self._tap(pipelined):
                return
            self.io.schedule(self._process)
        elif self.conn.our_state is not h11.SEND_RESPONSE:
            self._close()

    def begin_drain(self) -> None:
        """Graceful shutdown: finish the exchange in progress (Connection: close), then close."""
        self.draining = True
        if self.current is None:
            self._close()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self.io.close()

    def abort(self, outcome: str) -> None:
        if self.closed:
            return
        self.outcome = self.outcome or outcome
        self.closed = True
        self.io.abort()
        exchange = self.current
        if exchange is not None:
            # Not from inside the exchange's own pump: let the caller unwind first.
            self.io.schedule(lambda: exchange.client_reset(ErrorCodes.CANCEL))

    def connection_lost(self) -> None:
        self.closed = True
        if self.tunnel is not None:
            self.tunnel.connection_lost()
            return
        exchange = self.current
        if exchange is not None:
            exchange.client_reset(ErrorCodes.CANCEL)
