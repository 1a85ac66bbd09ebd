"""One HTTP/1.1 connection to a backend (h11, client side): one exchange at a time.

A route with ``backend_protocol: h1`` reaches its backends through these.
The pool (``pool.BackendPool``) sees a connection whose ``stream_limit()`` is
1: it is READY as soon as the transport is up (TCP, and TLS with ALPN
http/1.1), carries one exchange, and after a complete response on both
sides (h11 says DONE/DONE and neither side asked to close) goes back to the
pool for the next request: keep-alive. Anything else closes it.

Translation: the exchange speaks HTTP/2 header lists (``headers.py``). The
request becomes an ``h11.Request`` with ``Host`` from ``:authority``; the
hop-by-hop fields are already gone (``headers.for_backend``); a body of
unknown length goes chunked; ``cookie`` fields are joined with ``"; "``
(RFC 9113 section 8.2.3). HTTP/1.1 has no trailers a backend must honour, so
request trailers are dropped (gRPC needs ``h2``). The response comes back as
``:status`` plus its end-to-end fields; 1xx other than 100 and 101 are passed
on, and h11 knows which responses have no body (HEAD, 204, 304).

Back-pressure: nothing is read from the backend while more than
:data:`RESPONSE_HIGH_WATER` bytes of its response wait for the client;
reading resumes once the client leg took it below half. The request body
goes out at most :data:`SEND_SIZE` at a time and not while the transport's
write buffer is full (``set_writable``).

A kept-alive connection the backend closed meanwhile is noticed at its EOF
and leaves the pool. If the close crossed a request on the wire (nothing came
back), an idempotent request without a body sent is retried once on a fresh
connection (:meth:`H1Back._peer_closed`): the other idle connections of the
pool are closed first, since they are likely as stale.

WebSocket (``tunnel.py`` has the front half): a request head with
``:protocol: websocket`` (an HTTP/2 extended CONNECT, RFC 8441, or an
HTTP/1.1 upgrade the client leg rewrote into that form) is sent as
``GET`` with ``Upgrade: websocket``. On the backend's 101 the connection
leaves the pool (DRAINING, released) and becomes a byte tunnel: the
exchange's request body is what the client sends, its response body what
the backend sends, with the same flow control. The client sees ``:status
101`` when it did the key handshake itself (an HTTP/1.1 client, whose
``sec-websocket-key`` came along), else ``:status 200`` (RFC 8441).
"""

from __future__ import annotations

import base64
import logging
import os

import h11

from mcproxy.worker.l7.bridge import Exchange, LegIO
from mcproxy.worker.l7.h2core import ErrorCodes
from mcproxy.worker.l7.headers import Headers, end_to_end
from mcproxy.worker.l7.pool import BackendPool, ConnState, PooledConnection
from mcproxy.worker.l7.tls import TlsSession

__all__ = [
    "IDEMPOTENT",
    "MAX_HEAD_SIZE",
    "RESPONSE_HIGH_WATER",
    "SEND_SIZE",
    "H1Back",
    "H1BackEndpoint",
]

log = logging.getLogger("mcproxy.l7")

MAX_HEAD_SIZE = 64 * 1024
"""The largest response head accepted from a backend (h11 refuses more)."""
RESPONSE_HIGH_WATER = 256 * 1024
SEND_SIZE = 64 * 1024
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
"""Methods retried once when a kept-alive connection turns out closed (RFC 9110 9.2.2)."""

_NO_BODY_EXPECTED = frozenset({b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"TRACE"})
_WS_RESPONSE_FIELDS = frozenset(
    {b"sec-websocket-accept", b"sec-websocket-protocol", b"sec-websocket-extensions"}
)


class H1BackEndpoint:
    """The one stream of an HTTP/1.1 backend connection, as the exchange sees it."""

    __slots__ = ("leg",)
    resettable = False

    def __init__(self, leg: H1Back) -> None:
        self.leg = leg

    def capacity(self) -> int:
        return self.leg.capacity()

    def send_head(self, headers: Headers, end: bool) -> None:
        self.leg.send_request(headers, end)

    def send_informational(self, headers: Headers) -> None:
        return None  # a backend is never sent a 1xx

    def send_data(self, data: bytes, end: bool) -> None:
        self.leg.send_body(data, end)

    def send_trailers(self, trailers: Headers) -> None:
        self.leg.send_end()  # HTTP/1.1 backends get no trailers (see the module docstring)

    def end(self) -> None:
        self.leg.send_end()

    def ack(self, size: int) -> None:
        self.leg.body_taken()

    def reset(self, code: int) -> None:
        self.leg.abort()

    def close_after_response(self) -> None:
        return None  # a backend connection is kept alive or closed by its own rules

    def stop_request(self) -> None:  # pragma: no cover - a backend is never a client
        raise AssertionError("a backend leg has no request to stop")

    def release(self) -> None:
        self.leg.exchange_finished()


class H1Back(PooledConnection):
    """One HTTP/1.1 connection to a backend, in a pool, one exchange at a time."""

    def __init__(self, io: LegIO) -> None:
        super().__init__()
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_SIZE)
        self.io = io
        self.endpoint = H1BackEndpoint(self)
        self.exchange: Exchange | None = None
        self.closed = False
        self.writable = True
        self.outcome: str | None = None
        self.served = 0
        """Exchanges this connection was given: above 1, it was reused (kept alive)."""
        self.tunnel = False
        """A WebSocket switched (101): bytes both ways, outside the pool."""
        self.draining = False
        self._upgrading = False
        self._reply_101 = False
        self._response_started = False
        self._answered = False
        self._out: list[bytes] = []
        self._reading_paused = False
        self._resume_scheduled = False
        self.tls: TlsSession | None = None
        """The connection's TLS, when it has one: a TLS error names the cause of an EOF."""

    head_deadline: float | None = None
    """A backend sends no request heads (the channel asks every leg)."""

    def check_deadline(self) -> None:
        return None

    # --- the pool's interface (pool.BackendConnection) -------------------------------------

    def stream_limit(self) -> int:
        return 1

    def stream_count(self) -> int:
        return 0 if self.exchange is None else 1

    def refuse(self, head: Headers) -> tuple[int, str] | None:
        return None

    def open_stream(self, exchange: Exchange) -> None:
        assert self.exchange is None, "an HTTP/1.1 connection carries one exchange at a time"
        self.exchange = exchange
        self.served += 1
        self._response_started = False
        self._answered = False
        exchange.attach(self.endpoint)

    def drain(self) -> None:
        """Shutdown: close when idle or after this response; a tunnel closes now."""
        self.draining = True
        if self.tunnel:
            self._end_tunnel()
        elif self.exchange is None:
            self.close()
        else:
            self.transition(ConnState.DRAINING)

    def close(self) -> None:
        """Close (idle, drained, or a finished tunnel) once what is queued is sent."""
        if self.closed:
            return
        self.closed = True
        self.io.close()
        self._gone(None)

    def abort(self) -> None:
        """Reset the connection now (the client went away mid-exchange, connect timeout)."""
        if self.closed:
            return
        self.closed = True
        self.io.abort()
        # The exchange (if any) asked for this, or the pool gave up on a dial: no one to tell.
        self._gone(self.exchange)

    # --- towards the backend ------------------------------------------------------------------

    def capacity(self) -> int:
        if self.closed or not self.writable:
            return 0
        if self.tunnel:
            return SEND_SIZE
        return SEND_SIZE if self.conn.our_state is h11.SEND_BODY else 0

    def send_request(self, head: Headers, end: bool) -> None:
        method = path = authority = b""
        protocol: bytes | None = None
        fields: Headers = []
        cookies: list[bytes] = []
        host: bytes | None = None
        for name, value in head:
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            elif name == b":protocol":
                protocol = value
            elif name.startswith(b":"):
                continue
            elif name == b"cookie":
                cookies.append(value)
            elif name == b"host":
                host = value
            elif name != b"te":
                fields.append((name, value))
        if cookies:
            fields.append((b"cookie", b"; ".join(cookies)))
        if protocol is not None:
            # RFC 8441 (or an HTTP/1.1 upgrade in that form): the backend gets RFC 6455's GET.
            method = b"GET"
            self._upgrading = True
            self._reply_101 = any(n == b"sec-websocket-key" for n, _ in fields)
            if not self._reply_101:
                key = base64.b64encode(os.urandom(16))
                fields.append((b"sec-websocket-key", key))
            if not any(n == b"sec-websocket-version" for n, _ in fields):
                fields.append((b"sec-websocket-version", b"13"))
            fields += [(b"connection", b"upgrade"), (b"upgrade", protocol)]
            end = True  # the GET has no body; what follows the 101 is the tunnel
        elif not any(n == b"content-length" for n, _ in fields):
            if not end:
                fields.append((b"transfer-encoding", b"chunked"))
            elif method not in _NO_BODY_EXPECTED:
                fields.append((b"content-length", b"0"))
        target = path or b"/"
        request_head = [(b"host", authority or host or b""), *fields]
        if not self._send(h11.Request(method=method, target=target, headers=request_head)):
            return
        if end:
            self._send(h11.EndOfMessage())

    def send_body(self, data: bytes, end: bool) -> None:
        if self.closed:
            return
        if self.tunnel:
            if data:
                self._out.append(data)
                self.io.wake()
            if end:
                self.send_end()
            return
        if data and not self._send(h11.Data(data=data)):
            return
        if end:
            self.send_end()

    def send_end(self) -> None:
        if self.closed:
            return
        if self.tunnel:
            # The client ended its side of the tunnel (HTTP/2 END_STREAM, or EOF): pass the
            # half-close on and keep reading, so that the backend's close frame still comes
            # back; the backend's EOF ends the tunnel (``_end_tunnel``).
            write_eof = getattr(self.io, "write_eof", None)
            if write_eof is not None:
                write_eof()
            return
        if self._upgrading:
            return  # the upgrade GET ended with its head
        self._send(h11.EndOfMessage())

    def _send(self, event: h11.Event) -> bool:
        try:
            data = self.conn.send(event)
        except h11.LocalProtocolError as exc:
            # A request HTTP/1.1 cannot carry (a body longer than its content-length...).
            self.failure = f"request not sendable as HTTP/1.1: {exc}"
            exchange = self.exchange
            self.closed = True
            self.io.abort()
            self._gone(exchange)
            if exchange is not None:
                exchange.backend_failed(502, self.failure)
            return False
        if data:
            self._out.append(data)
            self.io.wake()
        return True

    def data_to_send(self) -> bytes:
        out, self._out = b"".join(self._out), []
        return out

    def set_writable(self, writable: bool) -> None:
        self.writable = writable
        if writable and self.exchange is not None:
            self.exchange.request.pump()

    # --- from the backend -------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if self.closed:
            return
        if self.tunnel:
            exchange = self.exchange
            if exchange is not None and data:
                exchange.response.receive_data(data)
                self._check_backlog()
            return
        if data and self.exchange is not None:
            self._answered = True
        self.conn.receive_data(data)
        self._process()

    def receive_eof(self) -> None:
        if self.closed:
            return
        if self.tunnel:
            self._end_tunnel()
            return
        if self.exchange is not None and not self._answered:
            # Closed before a byte of the answer (h11 would call it a broken response).
            self._peer_closed("backend closed the connection before answering")
            return
        self.conn.receive_data(b"")
        self._process()

    def connection_lost(self) -> None:
        if self.closed:
            return
        self._peer_closed("backend closed the connection")

    def _process(self) -> None:
        while not self.closed:
            exchange = self.exchange
            if exchange is not None and exchange.response.buffered >= RESPONSE_HIGH_WATER:
                self._pause_reading()
                return
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._peer_closed(f"backend broke HTTP/1.1: {exc}", protocol_error=True)
                return
            if event is h11.NEED_DATA:
                self._resume_reading()
                return
            if event is h11.PAUSED:
                return
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101:
                    if self._upgrading and exchange is not None:
                        self._switch(exchange, event)
                    else:
                        self._peer_closed("backend switched protocols unasked", True)
                    return
                if exchange is not None and event.status_code != 100:
                    head = [(b":status", str(event.status_code).encode()), *_fields(event)]
                    exchange.response.receive_informational(head)
            elif isinstance(event, h11.Response):
                if exchange is None:
                    self._peer_closed("backend answered no request", protocol_error=True)
                    return
                self._response_started = True
                self._upgrading = False  # refused (or never asked): a plain response
                head = [(b":status", str(event.status_code).encode()), *_fields(event)]
                exchange.response.receive_head(head, ended=False)
            elif isinstance(event, h11.Data):
                if exchange is not None:
                    exchange.response.receive_data(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                if exchange is not None:
                    trailers = end_to_end([(bytes(n), bytes(v)) for n, v in event.headers])
                    exchange.response.receive_end(trailers or None)
                    if not exchange.finished and not exchange.request.done:
                        # Answered before the request was whole: stop sending it.
                        exchange.backend_reset(ErrorCodes.NO_ERROR)
            elif isinstance(event, h11.ConnectionClosed):
                self._peer_closed("backend closed the connection")
                return

    def _switch(self, exchange: Exchange, event: h11.InformationalResponse) -> None:
        """The backend accepted the WebSocket: leave the pool, become a tunnel."""
        self.tunnel = True
        self._upgrading = False
        self._response_started = True
        fields = [(n, v) for n, v in _fields(event) if n in _WS_RESPONSE_FIELDS]
        if self._reply_101:
            head = [(b":status", b"101"), *fields]
        else:
            head = [(b":status", b"200"), *(f for f in fields if f[0] != b"sec-websocket-accept")]
        pool = self.pool
        self.transition(ConnState.DRAINING)
        if pool is not None:
            pool.released(self, exchange)
        data, closed = self.conn.trailing_data
        exchange.response.receive_head(head, ended=False)
        if data:
            exchange.response.receive_data(bytes(data))
        exchange.request.pump()  # whatever the client sent ahead
        if closed:
            self._end_tunnel()
        else:
            self._check_backlog()

    def _end_tunnel(self) -> None:
        """The tunnel is over (the backend's EOF, or shutdown): end both directions."""
        exchange = self.exchange
        self.close()
        if exchange is not None and not exchange.finished:
            exchange.response.receive_end()
            if not exchange.finished and not exchange.request.done:
                exchange.backend_reset(ErrorCodes.NO_ERROR)

    def _peer_closed(self, detail: str, protocol_error: bool = False) -> None:
        if self.tls is not None and self.tls.error:
            detail = f"{detail} ({self.tls.error})"
        exchange = self.exchange
        self.closed = True
        self.failure = detail
        if protocol_error:
            self.outcome = "backend_protocol_error"
            log.info("backend connection failed: %s", detail)
            self.io.abort()
        else:
            self.io.close()
        siblings_stale = self.served > 1
        pool = self.pool
        self._gone(exchange)  # out of the pool first: a retry must not come back here
        if exchange is not None and not exchange.finished:
            if (
                not self._response_started
                and not protocol_error
                and siblings_stale
                and exchange.requeues == 0
                and exchange.method in IDEMPOTENT
                and not exchange.request.forwarded
            ):
                # A kept-alive connection the backend had closed as the request went out.
                self._close_idle_siblings(pool)
                exchange.requeue_or_fail("backend closed a kept-alive connection")
            else:
                exchange.backend_failed(502, detail)

    def _close_idle_siblings(self, pool: BackendPool | None) -> None:
        if pool is None:
            return
        for connection in list(pool.connections):
            if (
                connection is not self
                and isinstance(connection, H1Back)
                and connection.exchange is None
                and connection.state is ConnState.READY
            ):
                connection.close()

    # --- back-pressure ------------------------------------------------------------------------

    def _check_backlog(self) -> None:
        exchange = self.exchange
        if exchange is not None and exchange.response.buffered >= RESPONSE_HIGH_WATER:
            self._pause_reading()

    def _pause_reading(self) -> None:
        if not self._reading_paused:
            self._reading_paused = True
            self.io.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self.io.resume_reading()

    def body_taken(self) -> None:
        """The client leg took response bytes: resume once the backlog is half drained."""
        exchange = self.exchange
        if (
            self._reading_paused
            and not self._resume_scheduled
            and (exchange is None or exchange.response.buffered < RESPONSE_HIGH_WATER // 2)
        ):
            self._resume_scheduled = True
            self.io.schedule(self._resume)

    def _resume(self) -> None:
        self._resume_scheduled = False
        if self.closed:
            return
        if self.tunnel:
            self._resume_reading()
        else:
            self._process()

    # --- the exchange's end -------------------------------------------------------------------

    def exchange_finished(self) -> None:
        exchange, self.exchange = self.exchange, None
        if self.closed:
            return
        pool = self.pool
        if self.tunnel:
            self.close()
            return
        if (
            not self.draining
            and self.conn.our_state is h11.DONE
            and self.conn.their_state is h11.DONE
        ):
            self.conn.start_next_cycle()
            self._upgrading = False
            if pool is not None and exchange is not None:
                pool.released(self, exchange)
            # Bytes the backend sent past its response, if any, are a protocol error.
            self.io.schedule(self._process)
            return
        self.close()
        if pool is not None and exchange is not None:
            pool.released(self, exchange)

    def _gone(self, exchange: Exchange | None) -> None:
        """CLOSED, and ``exchange`` (the one it served, if any) released to the pool."""
        self.exchange = None if exchange is self.exchange else self.exchange
        pool = self.pool
        self.transition(ConnState.CLOSED)
        if pool is not None and exchange is not None:
            pool.released(self, exchange)


def _fields(event: h11.Response | h11.InformationalResponse) -> Headers:
    return end_to_end([(bytes(n), bytes(v)) for n, v in event.headers])
