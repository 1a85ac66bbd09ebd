"""The client's HTTP/1.1 connection: llhttp (``httptools``) parses, one exchange at a time.

Parsing is httptools' strict mode, with callbacks; framing (where a message
ends) is decided here, so the parser is only ever given the bytes of the
message in progress: the head whole (found by the head check below), then
exactly Content-Length body bytes, or chunked bytes up to each possible end
(a chunked message always ends right after a CRLF CRLF). What follows stays
in ``_inbox``: pipelining is safe because the next request is not parsed
before the current response is complete (meanwhile reading is paused).
Keep-alive follows h11's rules: HTTP/1.1 without ``Connection: close``;
HTTP/1.0 always closes after its response (ARCHITECTURE.md, "L7 routes").

HTTP/1.1 has no flow control of its own, so the request body's
back-pressure is the socket: above :data:`BODY_HIGH_WATER` bytes waiting for
the backend, nothing more is parsed and reading pauses; it resumes once the
backend leg has taken the backlog below half of that. The response goes out
as fast as the client's socket takes it (``capacity`` is 0 while the
transport is paused), and only then is it acknowledged to the backend.

Request heads (ARCHITECTURE.md, "L7 routes: hostile input"): until a head
is whole, the bytes that make it are kept here (at most
:data:`MAX_HEAD_SIZE`) and checked before the parser sees them, whatever the
write sizes: size and field count (431), a request line that is not three
parts, a second Content-Length, Content-Length with Transfer-Encoding,
obs-fold, NUL (400, then close: the framing of what follows cannot be
trusted). The parser then refuses bad names and values, bare LF, invalid
lengths and chunk framing (400) and unknown methods (501); here, on top of
it, what h11 refused and llhttp lets through: a transfer coding other than
exactly ``chunked`` (501), HTTP/1.1 without one ``Host`` (400), versions
other than 1.0/1.1 (505), a body on an Upgrade or CONNECT request (llhttp
would skip it: 400). A head must be whole within ``head_timeout`` of its
first byte, else 408 and close. Every refusal has a fixed one-line body:
nothing of the input is echoed.

Responses are serialised here: Content-Length when the backend gave one,
else chunked to an HTTP/1.1 client and close-delimited to HTTP/1.0; no body
for HEAD, 204 and 304; trailers only when chunked. A backend body that
disagrees with its Content-Length resets the connection.

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

import httptools
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
"""A request line and its fields, CRLFs included: a longer head gets 431. Chunk framing
and trailers in a row are bounded by it too."""
HEAD_TIMEOUT = 10.0
"""The default of ``head_timeout`` (the proxy passes ``handshake_timeout``)."""
_SEND_SIZE = 64 * 1024
_HEAD_END = re.compile(rb"\r?\n\r?\n")
"""Where a head ends if it is not at a CRLF CRLF (bare LF: found, then refused by the parser)."""
_CRLF2 = b"\r\n\r\n"
_CR_LF = (13, 10)
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

# Request side: reading a head, a body, or waiting for the response to end (the
# next request stays unparsed); _UPGRADE: a WebSocket request waits for its answer.
_HEAD, _BODY, _DONE, _UPGRADE = range(4)
# Response side, and how its body is framed.
_IDLE, _SENDING, _SENT = range(3)
_NO_BODY, _LENGTH, _CHUNKED, _UNTIL_CLOSE = range(4)

_FRAMING_FIELDS = frozenset(
    {b"connection", b"content-length", b"expect", b"host", b"transfer-encoding"}
)
"""The request fields ``on_headers_complete`` looks at: one set lookup per field."""


def _status_line(status: int) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, _reason(status))


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


_STATUS_LINES = {int(s): _status_line(int(s)) for s in http.HTTPStatus}


def error_response(status: int) -> bytes:
    """A whole HTTP/1.1 error response with a fixed body, then the connection closes."""
    phrase = _reason(status)
    body = b"%d %s\n" % (status, phrase)
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n%s"
    ) % (status, phrase, len(body), body)


def _head_problem(head: bytes) -> tuple[int, str] | None:
    """Check a whole request head (its bytes up to the blank line) before it is parsed."""
    if len(head) > MAX_HEAD_SIZE:
        return 431, "request head too large"
    if head.count(b"\n") > MAX_HEADERS + 2:  # the request line and the blank line
        return 431, "too many header fields"
    if b"\0" in head:
        return 400, "NUL in the request head"
    if b"\n " in head or b"\n\t" in head:
        return 400, "obs-fold in the request head"
    line = head[: head.find(b"\n")]
    if line.count(b" ") != 2 or head[0] in _CR_LF:
        # llhttp takes "GET  / HTTP/1.1" and empty lines before a request; h11 did not.
        return 400, "malformed request line"
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


def _tokens(value: bytes) -> list[bytes]:
    return [t.strip() for t in value.lower().split(b",")]


class _Refused(Exception):
    """Raised from a parser callback: the request must be refused with ``status``."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


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
        self.leg.send_body(data, end)

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
    """The client's HTTP/1.1 leg (sans-I/O: bytes in through ``receive_data``, out through
    ``data_to_send``). The ``on_*`` methods are httptools' parser callbacks."""

    def __init__(
        self,
        io: LegIO,
        router: Router,
        hostname: str,
        head_timeout: float = HEAD_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
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
        self._peer_eof = False
        """The client's EOF was acted on: close once the exchange in progress is done."""
        self._eof = False
        """The client's EOF arrived (it may wait behind pipelined bytes)."""
        self.head_timeout = head_timeout
        self.clock = clock
        self.head_deadline: float | None = None
        """When the head being received must be whole (None: no head in progress)."""
        self._head = bytearray()  # the bytes of a head in progress, until it is whole
        self.tunnel: ClientTunnel | None = None
        """After a WebSocket's 101: bytes only (``tunnel.py``)."""
        self._parser = httptools.HttpRequestParser(self)
        self._parser.set_dangerous_leniencies(
            lenient_headers=False,
            lenient_chunked_length=False,
            lenient_keep_alive=False,
            lenient_transfer_encoding=False,
            lenient_version=False,
            lenient_data_after_close=False,
            lenient_optional_lf_after_cr=False,
            lenient_optional_cr_before_lf=False,
            lenient_optional_crlf_after_chunk=False,
            lenient_spaces_after_chunk_size=False,
        )
        self._inbox = b""
        """Bytes received and not yet parsed: the rest of a body, a pipelined request."""
        self._rstate = _HEAD
        self._sstate = _IDLE
        # The message being parsed (set by the callbacks).
        self._target = b""
        self._fields: Headers = []
        self._trailers: Headers | None = None
        self._body: list[bytes] = []
        self._complete = False
        self._begun = 0
        self._strip = False  # some field value ends in whitespace (llhttp keeps it)
        self._length: int | None = None
        self._chunked = False
        self._keep_alive = True
        self._http10 = False
        self._expect_100 = False
        """The client holds its body back for a 100 Continue: until it sends body bytes or
        gets the 100 (a final response instead means the body is not coming)."""
        self._sent_100 = False
        self._remaining = 0  # Content-Length bytes still to come
        self._tail = b""  # the last bytes of chunked input given to the parser
        self._framing = 0  # chunked bytes in a row that were no body (sizes, trailers)
        self._discarded = 0
        self._upgrade = False  # a WebSocket upgrade request waits for the backend's answer
        self._method = b""
        self._tapped = b""  # the head being parsed
        self._lenient = False  # Content-Length allowed in the trailers of this chunked body
        # The response.
        self._rframing = _NO_BODY
        self._left = 0  # Content-Length bytes still to send
        self._must_close = False

    # --- parser callbacks (httptools) ----------------------------------------------------

    def on_message_begin(self) -> None:
        self._begun += 1

    def on_url(self, url: bytes) -> None:
        self._target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._trailers is None:
            self._fields.append((name.lower(), value))
            return
        trailers = self._trailers
        if len(trailers) >= MAX_HEADERS:
            raise _Refused(431, "too many trailer fields")
        trailers.append((name.lower(), value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        """The framing decisions h11 made and llhttp leaves to us (raised: refused)."""
        self._trailers = []
        if self._strip:
            self._fields = [(n, v.rstrip(b" \t")) for n, v in self._fields]
        version = self._parser.get_http_version()
        if version != "1.1":
            if version != "1.0":
                raise _Refused(505, f"HTTP/{version}")
            self._http10 = True
            self._keep_alive = False  # h11 never keeps an HTTP/1.0 connection alive
        hosts = 0
        for name, value in self._fields:
            if name not in _FRAMING_FIELDS:
                continue
            if name == b"host":
                hosts += 1
            elif name == b"content-length":
                self._length = int(value)  # one, all digits: the head check and llhttp
            elif name == b"transfer-encoding":
                if self._chunked or value.strip().lower() != b"chunked":
                    raise _Refused(501, "transfer coding other than chunked")
                self._chunked = True
            elif name == b"connection":
                if b"close" in _tokens(value):
                    self._keep_alive = False
            elif _tokens(value) == [b"100-continue"]:  # expect
                self._expect_100 = True
        if hosts != 1 and (hosts or not self._http10):
            raise _Refused(400, "no Host, or more than one")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._complete = True

    # --- input -------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client; ``b""`` is its EOF."""
        if self.tunnel is not None:
            self.tunnel.receive_data(data)
            return
        if self.closed:
            return
        if not data:
            self._eof = True
        elif self._inbox:
            self._inbox += data
        else:
            self._inbox = data
        self._process()

    def receive_eof(self) -> None:
        if self.tunnel is not None:
            self.tunnel.receive_eof()
            return
        self.receive_data(b"")

    def _process(self) -> None:
        while not self.closed:
            state = self._rstate
            if state is _HEAD:
                if not self._read_head():
                    return
            elif state is _BODY:
                if not self._read_body():
                    return
            else:
                # The next request waits, unparsed, until this response is out (and after a
                # WebSocket request, until its answer says whether the bytes are a tunnel).
                if self._inbox or state is _UPGRADE:
                    self._pause_reading()
                elif self._eof:
                    self._peer_closed()
                else:
                    self._resume_reading()
                return

    def _read_head(self) -> bool:
        """Take in head bytes; True once a request was started (go on with its body)."""
        data, self._inbox = self._inbox, b""
        if not data:
            if self._eof:
                self._peer_closed()
            else:
                self._resume_reading()
            return False
        if self.head_deadline is None:
            self.head_deadline = self.clock() + self.head_timeout
        head = self._head
        if not head:
            end = data.find(_CRLF2)
            if end >= 0:  # the usual case: a whole head in one read
                end += 4
                whole, self._inbox = data[:end], data[end:]
                return self._parse_head(whole)
        start = max(0, len(head) - 3)
        head += data  # a bytearray: a head trickled byte by byte costs no quadratic copying
        found = _HEAD_END.search(head, start)
        if found is None:
            if len(head) > MAX_HEAD_SIZE:
                self.refuse(431, "request head too large")
            elif self._eof:
                self._peer_closed()
            else:
                self._resume_reading()
            return False
        whole, self._inbox = bytes(head[: found.end()]), bytes(head[found.end() :])
        self._head = bytearray()
        return self._parse_head(whole)

    def _parse_head(self, whole: bytes) -> bool:
        self.head_deadline = None
        self._tapped = whole
        problem = _head_problem(whole)
        if problem is not None:
            self.refuse(*problem)
            return False
        self._target = b""
        self._fields = []
        self._trailers = None
        self._complete = False
        self._begun = 0
        self._strip = b" \r\n" in whole or b"\t\r\n" in whole
        self._length = None
        self._chunked = False
        self._keep_alive = True
        self._http10 = False
        self._expect_100 = False
        if self._lenient:
            self._lenient = False
            self._parser.set_dangerous_leniencies(lenient_chunked_length=False)
        upgrade = False
        try:
            self._parser.feed_data(whole)
        except httptools.HttpParserUpgrade:
            upgrade = True  # an Upgrade or CONNECT head: llhttp parses no body after it
        except httptools.HttpParserError as exc:
            self._parse_error(exc)
            return False
        fields = self._fields
        body = self._chunked or bool(self._length)
        if upgrade and body:
            self.refuse(400, "a body on an Upgrade or CONNECT request")
            return False
        self._method = method = self._parser.get_method()
        head = h1_to_h2_request(method, self._target, fields, self.hostname)
        self._sent_100 = False
        self._discarded = 0
        self._upgrade = upgrade and is_websocket_upgrade(fields)
        if self._upgrade:
            head = as_extended_connect(head)
            self._rstate = _UPGRADE  # its end is kept back: what follows a 101 is the tunnel
        elif body:
            self._rstate = _BODY
            self._remaining = -1 if self._chunked else self._length or 0
            self._tail = b""
            self._framing = 0
            if self._chunked:
                # llhttp refuses a Content-Length trailer, which h11 took (and which
                # request_trailers drops); the head was checked strictly just above.
                self._lenient = True
                self._parser.set_dangerous_leniencies(lenient_chunked_length=True)
        else:
            self._rstate = _DONE
        exchange = self.router.open(self.endpoint, head, ended=self._rstate is _DONE)
        if not exchange.finished:
            self.current = exchange
            exchange.submit()
        return not self.closed

    def _parse_error(self, exc: httptools.HttpParserError) -> None:
        cause = exc.__context__
        if isinstance(cause, _Refused):
            self._bad_request(cause.status, cause.detail)
        elif isinstance(exc, httptools.HttpParserInvalidMethodError):
            # A method llhttp does not know: 501 if it is a token (h11 forwarded those).
            method = self._tapped[: self._tapped.find(b" ")]
            status = 501 if _TOKEN.fullmatch(method) else 400
            self._bad_request(status, "unknown method")
        else:
            self._bad_request(400, str(exc))

    def _read_body(self) -> bool:
        """Give the parser body bytes of the request in progress; True to go on."""
        exchange = self.current
        if exchange is not None and exchange.request.buffered >= BODY_HIGH_WATER:
            self._pause_reading()
            return False
        data = self._inbox
        if not data:
            if self._eof:
                self._bad_request(400, "peer closed the connection inside a request body")
                return False
            if (
                exchange is not None
                and self._expect_100
                and not exchange.request.discarding
                and not self._sent_100
                and self._sstate is _IDLE
            ):
                self._sent_100 = True
                self._informational(100, [])
            self._resume_reading()
            return False
        try:
            if self._remaining >= 0:
                piece = data[: self._remaining]
                self._remaining -= len(piece)
                self._inbox = data[len(piece) :]
                self._parser.feed_data(piece)
                framing = 0
            else:
                framing = self._feed_chunked(data)
        except httptools.HttpParserError as exc:
            self._parse_error(exc)
            return False
        chunks, self._body = self._body, []
        if framing:
            self._framing += framing
            if self._framing > MAX_HEAD_SIZE:
                self._bad_request(431, "chunk framing or trailers too large")
                return False
        if self._begun > 1:  # a message began behind this one: the framing was misjudged
            self._bad_request(400, "request framing")
            return False
        if chunks:
            self._expect_100 = False
            self._framing = 0
        if exchange is not None:
            request = exchange.request
            for chunk in chunks:
                if request.discarding:
                    self._discarded += len(chunk)
                    if self._discarded > DISCARD_LIMIT:
                        self.abort("closed")
                        return False
                request.receive_data(chunk)
        if self._complete:
            trailers = request_trailers(self._trailers) if self._trailers else None
            self._rstate = _DONE
            self._expect_100 = False
            if self.current is not None:
                self.current.request.receive_end(trailers or None)
        return not self.closed

    def _feed_chunked(self, data: bytes) -> int:
        """Feed chunked bytes up to each place the message may end; how many were framing.

        A chunked message ends right after a CRLF CRLF (the last chunk's, or the
        trailers'), and the parser refuses bare LF, so feeding up to each one in turn
        stops it exactly at the end; the rest is left in ``_inbox``.
        """
        view = memoryview(data)
        total = len(data)
        tail = self._tail
        pos = 0
        at = (tail + data[:3]).find(_CRLF2) if tail else -1
        end = at + 4 - len(tail) if at >= 0 else -1
        body = sum(len(b) for b in self._body)
        while pos < total:
            if end < 0:
                at = data.find(_CRLF2, max(0, pos - 3))
                end = at + 4 if at >= 0 else total
            self._parser.feed_data(view[pos:end])
            pos, end = end, -1
            if self._complete:
                break
        self._inbox = data[pos:]
        self._tail = (tail + data[:pos])[-3:] if pos < 3 else data[pos - 3 : pos]
        return max(0, pos - (sum(len(b) for b in self._body) - body))

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
        if self.current is not None or self._sstate is not _IDLE:
            self.abort(self.outcome)
            return
        self._out.append(error_response(status))
        self.io.wake()
        self._close()

    def _peer_closed(self) -> None:
        if self._peer_eof:
            return
        self._peer_eof = True
        exchange = self.current
        if exchange is None:
            self._close()
        elif not exchange.request.ended:
            exchange.client_reset(ErrorCodes.CANCEL)
        # else: the request is complete; the response goes out, then we close.

    def _bad_request(self, status: int, detail: str) -> None:
        exchange = self.current
        if exchange is not None:
            self.outcome = "protocol_error"
            exchange.client_reset(ErrorCodes.CANCEL)
            self.abort("protocol_error")
            return
        self.refuse(status, detail)

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

    def _write(self, data: bytes) -> None:
        self._out.append(data)
        self.io.wake()

    def _backend_broke(self, detail: str) -> None:
        # The backend's response does not fit HTTP/1.1 framing (a wrong content-length).
        log.info("response cannot be sent as HTTP/1.1: %s", detail)
        self.abort("backend_protocol_error")

    def send_response(self, headers: Headers, end: bool) -> None:
        """The final response head; its framing is chosen here (see the module docstring)."""
        if self.closed:
            return
        status, fields = h2_to_h1_response(headers)
        if self._upgrade:
            self._upgrade = False
            if status == 101:
                self._switch(fields)
                return
            self._rstate = _DONE  # refused: the upgrade request ends with its answer
            self.io.schedule(self._end_refused_upgrade)
        if not 200 <= status <= 999 or self._sstate is not _IDLE:
            self._backend_broke(f"status {status}")
            return
        parts = [_STATUS_LINES.get(status) or _status_line(status)]
        length: bytes | None = None
        for name, value in fields:
            if name == b"content-length":
                if length is not None and value != length:
                    self._backend_broke("conflicting content-length")
                    return
                length = value
            parts += (name, b": ", value, b"\r\n")
        close = self.draining or self._peer_eof or not self._keep_alive
        if self._method == b"HEAD" or status in (204, 304):
            self._rframing = _NO_BODY
        elif length is not None:
            if not length.isdigit():
                self._backend_broke("invalid content-length")
                return
            self._rframing = _LENGTH
            self._left = int(length)
        elif not self._http10:
            self._rframing = _CHUNKED
            parts.append(b"transfer-encoding: chunked\r\n")
        else:
            self._rframing = _UNTIL_CLOSE
            close = True
        if close:
            parts.append(b"connection: close\r\n")
        self._must_close = close
        parts.append(b"\r\n")
        self._sstate = _SENDING
        self._write(b"".join(parts))
        if end:
            self.send_end([])

    def _end_refused_upgrade(self) -> None:
        # Scheduled: a local answer (501) comes from inside router.open, before ``current``.
        exchange = self.current
        if exchange is not None and not self.closed:
            exchange.request.receive_end()

    def send_body(self, data: bytes, end: bool) -> None:
        if self.closed or self._sstate is not _SENDING:
            return
        if data:
            framing = self._rframing
            if framing is _CHUNKED:
                self._out += (b"%x\r\n" % len(data), data, b"\r\n")
                self.io.wake()
            elif framing is _LENGTH:
                self._left -= len(data)
                if self._left < 0:
                    self._backend_broke("more body than its content-length")
                    return
                self._write(data)
            elif framing is _UNTIL_CLOSE:
                self._write(data)
            else:
                self._backend_broke("a body where none is allowed")
                return
        if end:
            self.send_end([])

    def send_end(self, trailers: Headers) -> None:
        # Trailers need chunked framing; without it they are dropped.
        if self.closed or self._sstate is not _SENDING:
            return
        framing = self._rframing
        if framing is _CHUNKED:
            if trailers:
                self._write(b"0\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in trailers))
                self._write(b"\r\n")
            else:
                self._write(b"0\r\n\r\n")
        elif framing is _LENGTH and self._left:
            self._backend_broke("less body than its content-length")
            return
        self._sstate = _SENT
        if self._must_close:
            self._close()

    def _informational(self, status: int, fields: Headers) -> None:
        parts = [_STATUS_LINES.get(status) or _status_line(status)]
        for name, value in fields:
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        self._expect_100 = False
        self._write(b"".join(parts))

    def _switch(self, fields: Headers) -> None:
        """The backend took the WebSocket: send the 101, then carry bytes only."""
        exchange = self.current
        assert exchange is not None
        upgrade: Headers = [(b"upgrade", b"websocket"), (b"connection", b"Upgrade")]
        self._informational(101, upgrade + fields)
        early, self._inbox = self._inbox, b""
        self.tunnel = ClientTunnel(self.io, exchange, early, self._eof)
        self._resume_reading()

    def send_informational(self, headers: Headers) -> None:
        if self.closed or self._sstate is not _IDLE:
            return
        status, fields = h2_to_h1_response(headers)
        if (status == 100 and self._sent_100) or not 100 <= status < 200 or status == 101:
            return
        if status == 100:
            self._sent_100 = True
        self._informational(status, fields)

    # --- the exchange's end ----------------------------------------------------------------

    def stop_request(self) -> None:
        """The response is out before the request body: discard the rest, within limits."""
        if self._expect_100:
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
        if self._sstate is _SENT and self._rstate is _DONE:
            self._rstate = _HEAD
            self._sstate = _IDLE
            if self._inbox or self._eof:
                self.io.schedule(self._process)  # a pipelined request: parse it next
            else:
                self._resume_reading()
        elif self._sstate is not _IDLE:
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
