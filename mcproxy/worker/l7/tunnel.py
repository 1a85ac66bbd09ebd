"""WebSocket tunnels: the client half of an HTTP/1.1 upgrade, and the request form both share.

Both client legs hand a WebSocket to the router in one form, an extended
CONNECT (RFC 8441): ``:method CONNECT``, ``:protocol websocket``. An HTTP/2
client sends that itself (the server side advertises
SETTINGS_ENABLE_CONNECT_PROTOCOL); an HTTP/1.1 ``Upgrade: websocket``
request is rewritten into it by :func:`as_extended_connect`, keeping its
``sec-websocket-key`` so that the backend's ``sec-websocket-accept`` is
valid for it. The backend half is ``h1back.H1Back``.

After the backend's 101, an HTTP/1.1 client connection carries bytes only:
:class:`ClientTunnel` takes the place of the exchange's client endpoint and
of the leg's input, so the exchange's two flows carry the WebSocket frames
untouched, with the same back-pressure as bodies (nothing is read from the
client while :data:`TUNNEL_HIGH_WATER` bytes wait for the backend). The
client's EOF (or END_STREAM) half-closes the backend connection, whose own
EOF then ends the tunnel both ways, so the server's close frame still
arrives.
"""

from __future__ import annotations

from collections.abc import Sequence

from mcproxy.worker.l7.bridge import Exchange, LegIO
from mcproxy.worker.l7.h2core import ErrorCodes
from mcproxy.worker.l7.headers import Headers

__all__ = [
    "SEND_SIZE",
    "TUNNEL_HIGH_WATER",
    "ClientTunnel",
    "as_extended_connect",
    "is_websocket",
    "is_websocket_upgrade",
]

TUNNEL_HIGH_WATER = 256 * 1024
SEND_SIZE = 64 * 1024


def is_websocket(head: Headers) -> bool:
    """An extended CONNECT for a WebSocket (the form both client legs hand over)."""
    method = protocol = b""
    for name, value in head:
        if name == b":method":
            method = value
        elif name == b":protocol":
            protocol = value
        elif not name.startswith(b":"):
            break
    return method == b"CONNECT" and protocol.lower() == b"websocket"


def is_websocket_upgrade(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """An HTTP/1.1 request asking ``Upgrade: websocket`` (with ``Connection: upgrade``)."""
    upgrade = connection = False
    for name, value in headers:
        if name == b"upgrade":
            upgrade = upgrade or any(t.strip().lower() == b"websocket" for t in value.split(b","))
        elif name == b"connection":
            connection = connection or any(
                t.strip().lower() == b"upgrade" for t in value.split(b",")
            )
    return upgrade and connection


def as_extended_connect(head: Headers) -> Headers:
    """An HTTP/1.1 WebSocket request head (as HTTP/2 fields) in RFC 8441 form."""
    out: Headers = []
    for name, value in head:
        if name == b":method":
            out.append((b":method", b"CONNECT"))
            out.append((b":protocol", b"websocket"))
        else:
            out.append((name, value))
    return out


class ClientTunnel:
    """An HTTP/1.1 client connection after a 101: the exchange's client endpoint, bytes only."""

    resettable = False

    def __init__(self, io: LegIO, exchange: Exchange, early: bytes, closed: bool) -> None:
        self.io = io
        self.exchange = exchange
        self.writable = True
        self.closed = False
        self._out: list[bytes] = []
        self._paused = False
        self._ending = False
        exchange.client = self
        exchange.request.src = self
        exchange.response.dst = self
        if early:
            self.receive_data(early)
        if closed:
            self.receive_eof()

    # --- from the client (the leg delegates its input) ------------------------------------

    def receive_data(self, data: bytes) -> None:
        if self.closed or not data:
            return
        request = self.exchange.request
        request.receive_data(data)
        if request.buffered >= TUNNEL_HIGH_WATER and not self._paused:
            self._paused = True
            self.io.pause_reading()

    def receive_eof(self) -> None:
        self.exchange.request.receive_end()

    def connection_lost(self) -> None:
        self.closed = True
        exchange = self.exchange
        if exchange.finished:
            return
        if self._ending:  # we closed it, after the backend's end: a clean end
            exchange.request_stopped()
        else:
            exchange.client_reset(ErrorCodes.CANCEL)

    def data_to_send(self) -> bytes:
        out, self._out = b"".join(self._out), []
        return out

    def set_writable(self, writable: bool) -> None:
        self.writable = writable
        if writable:
            self.exchange.response.pump()

    # --- as the exchange's client endpoint -------------------------------------------------

    def capacity(self) -> int:
        return SEND_SIZE if self.writable and not self.closed else 0

    def send_head(self, headers: Headers, end: bool) -> None:  # pragma: no cover - sent already
        return None

    def send_informational(self, headers: Headers) -> None:
        return None

    def send_data(self, data: bytes, end: bool) -> None:
        if data and not self.closed:
            self._out.append(data)
            self.io.wake()
        if end:
            self.end()

    def send_trailers(self, trailers: Headers) -> None:
        self.end()

    def end(self) -> None:
        """The backend ended the tunnel: close once what it sent is out."""
        if not self._ending:
            self._ending = True
            self.io.close()

    def ack(self, size: int) -> None:
        if self._paused and self.exchange.request.buffered < TUNNEL_HIGH_WATER // 2:
            self._paused = False
            self.io.resume_reading()

    def reset(self, code: int) -> None:
        self.closed = True
        self.io.abort()

    def stop_request(self) -> None:
        self.end()

    def close_after_response(self) -> None:
        self.end()

    def release(self) -> None:
        self.end()
