"""A lean sans-I/O HTTP/2 connection (RFC 9113, RFC 8441): bytes in, events out.

Both legs run on it: the server role for clients, the client role for
backends. It replaces jh2's pure-Python state machine, which was about 60%
of the proxy's CPU per HTTP/2 request (ARCHITECTURE.md, "L7 routes: speed"),
and does only what a proxy needs: no server push, no priorities (PRIORITY
frames and the HEADERS priority fields are parsed and ignored), frames
delivered whole (at most :data:`MAX_FRAME_SIZE` bytes are ever buffered).
HPACK is jh2's compiled codec.

What it guarantees, so the legs do not have to:

- Every inbound head is valid HTTP/2 before anyone sees it (RFC 9113
  section 8): lower-case names, no connection-specific fields, ``te`` only
  ``trailers``, pseudo-headers known, first, once, and the required ones,
  values without NUL, CR, LF or surrounding whitespace, Content-Length equal
  to the DATA received. A violation is a stream error: RST_STREAM
  PROTOCOL_ERROR, and a malformed request never becomes an event.
- The peer never sends beyond the windows we announced (FLOW_CONTROL_ERROR),
  and we never send beyond its windows (:class:`FlowControlError`, a caller
  bug). Credit goes back only for what the application acknowledged.
- A GOAWAY from the peer is an event, not the end: streams up to its
  ``last_stream_id`` run to completion (RFC 9113 section 6.8).
- Abuse is counted as frames arrive (``frames.FrameWatch``): frames that
  make no progress cost the peer budget, and the watch knows when a header
  block has been in progress since, for the head deadline.

Connection errors raise :class:`ProtocolError` from ``receive_data`` after
queueing a GOAWAY with the code; the connection is then closed.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable
from typing import cast

from h2.errors import ErrorCodes
from h2.settings import SettingCodes

# jh2's compiled HPACK codec; it ships a .pyi but no py.typed marker.
from jh2._hazmat import (  # type: ignore[import-untyped]
    Decoder,
    Encoder,
    HPACKError,
    OversizedHeaderListError,
)

from mcproxy.worker.l7.frames import (
    CLIENT_PREFACE,
    MAX_FRAME_SIZE,
    Abuse,
    FlowControlError,
    FrameTooLarge,
    FrameWatch,
    ProtocolError,
    StreamClosedError,
)
from mcproxy.worker.l7.headers import MAX_HEADER_LIST_SIZE, Headers

__all__ = [
    "Abuse",
    "DataReceived",
    "ErrorCodes",
    "Event",
    "FlowControlError",
    "FrameTooLarge",
    "GoAwayReceived",
    "H2Connection",
    "InformationalResponseReceived",
    "ProtocolError",
    "RemoteSettings",
    "RemoteSettingsChanged",
    "RequestReceived",
    "ResponseReceived",
    "SettingCodes",
    "StreamClosedError",
    "StreamReset",
    "TrailersReceived",
    "WindowUpdated",
]

# --- wire constants -------------------------------------------------------------------

_DATA, _HEADERS, _PRIORITY, _RST_STREAM, _SETTINGS = 0x0, 0x1, 0x2, 0x3, 0x4
_PUSH_PROMISE, _PING, _GOAWAY, _WINDOW_UPDATE, _CONTINUATION = 0x5, 0x6, 0x7, 0x8, 0x9
_END_STREAM, _ACK, _END_HEADERS, _PADDED, _PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20

_NO_ERROR = 0x0
_PROTOCOL_ERROR = 0x1
_FLOW_CONTROL_ERROR = 0x3
_STREAM_CLOSED = 0x5
_FRAME_SIZE_ERROR = 0x6
_REFUSED_STREAM = 0x7
_COMPRESSION_ERROR = 0x9
_ENHANCE_YOUR_CALM = 0xB

_HEADER_TABLE_SIZE = 0x1
_ENABLE_PUSH = 0x2
_MAX_CONCURRENT_STREAMS = 0x3
_INITIAL_WINDOW_SIZE = 0x4
_MAX_FRAME_SIZE_SETTING = 0x5
_MAX_HEADER_LIST_SIZE = 0x6
_ENABLE_CONNECT_PROTOCOL = 0x8

_MAX_WINDOW = (1 << 31) - 1
_DEFAULT_WINDOW = 65535
_MAX_BLOCK = MAX_HEADER_LIST_SIZE + MAX_FRAME_SIZE
"""A header block (HEADERS and its CONTINUATIONs) longer than this is not decoded."""
_RESET_MEMORY = 1024
"""Stream ids we reset, remembered so that the peer's frames in flight on them are dropped
quietly; any other frame on a stream that is over is a connection error."""
_FRAME_HEADER = struct.Struct(">BHBBL")
_SETTING = struct.Struct(">HL")
_WINDOW_FRAME = struct.Struct(">BHBBLL")
_RST_FRAME = _WINDOW_FRAME


def _frame(kind: int, flags: int, sid: int, payload: bytes) -> bytes:
    size = len(payload)
    return _FRAME_HEADER.pack(size >> 16, size & 0xFFFF, kind, flags, sid) + payload


# --- events -----------------------------------------------------------------------------


class Event:
    """What the peer did; each kind below carries its own fields."""

    __slots__ = ()


class _Head(Event):
    """A head on a stream, and whether it also ended the peer's side."""

    __slots__ = ("headers", "stream_ended", "stream_id")

    def __init__(self, stream_id: int, headers: Headers, stream_ended: bool) -> None:
        self.stream_id = stream_id
        self.headers = headers
        self.stream_ended = stream_ended


class RequestReceived(_Head):
    """A request head (server role): valid, its Content-Length known to match what follows."""

    __slots__ = ()


class ResponseReceived(_Head):
    """A final response head (client role)."""

    __slots__ = ()


class _Block(Event):
    """A header block that is not the head: what comes before it, or after the body."""

    __slots__ = ("headers", "stream_id")

    def __init__(self, stream_id: int, headers: Headers) -> None:
        self.stream_id = stream_id
        self.headers = headers


class InformationalResponseReceived(_Block):
    """A 1xx head before the final one (client role)."""

    __slots__ = ()


class TrailersReceived(_Block):
    """The trailing header block; it always ends the peer's side of the stream."""

    __slots__ = ()


class DataReceived(Event):
    """Body bytes (padding removed and already credited back)."""

    __slots__ = ("data", "flow_controlled_length", "stream_ended", "stream_id")

    def __init__(self, stream_id: int, data: bytes, stream_ended: bool) -> None:
        self.stream_id = stream_id
        self.data = data
        self.flow_controlled_length = len(data)
        self.stream_ended = stream_ended


class StreamReset(Event):
    """The stream is over: the peer reset it (``remote``) or broke its rules (we reset it)."""

    __slots__ = ("error_code", "remote", "stream_id")

    def __init__(self, stream_id: int, error_code: int, remote: bool) -> None:
        self.stream_id = stream_id
        self.error_code = error_code
        self.remote = remote


class WindowUpdated(Event):
    """The peer gave us more room to send (stream 0: the whole connection)."""

    __slots__ = ("delta", "stream_id")

    def __init__(self, stream_id: int, delta: int) -> None:
        self.stream_id = stream_id
        self.delta = delta


class RemoteSettingsChanged(Event):
    """The peer's SETTINGS, applied and acknowledged."""

    __slots__ = ("changed_settings",)

    def __init__(self, changed_settings: dict[int, int]) -> None:
        self.changed_settings = changed_settings


class GoAwayReceived(Event):
    """The peer will take no new stream; those up to ``last_stream_id`` still complete."""

    __slots__ = ("additional_data", "error_code", "last_stream_id")

    def __init__(self, last_stream_id: int, error_code: int, additional_data: bytes) -> None:
        self.last_stream_id = last_stream_id
        self.error_code = error_code
        self.additional_data = additional_data


class RemoteSettings:
    """The peer's settings in force (RFC 9113 section 6.5.2 defaults until it says otherwise)."""

    __slots__ = (
        "enable_connect_protocol",
        "enable_push",
        "header_table_size",
        "initial_window_size",
        "max_concurrent_streams",
        "max_frame_size",
        "max_header_list_size",
    )

    def __init__(self) -> None:
        self.header_table_size = 4096
        self.enable_push = 1
        self.max_concurrent_streams = _MAX_WINDOW
        self.initial_window_size = _DEFAULT_WINDOW
        self.max_frame_size = MAX_FRAME_SIZE
        self.max_header_list_size: int | None = None
        self.enable_connect_protocol = 0


# --- header validation ------------------------------------------------------------------


class _Malformed(Exception):
    """A head that breaks RFC 9113 section 8: a stream error, PROTOCOL_ERROR."""


_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
_BAD_VALUE = re.compile(rb"[\x00\r\n]|\A[ \t]|[ \t]\Z")
_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
_REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path", b":protocol"})
_DIGITS = re.compile(rb"[0-9]{1,18}")
_CACHE_LIMIT = 4096
_good_names: set[bytes] = set()
_good_values: set[bytes] = set()
"""Names and values already found valid: most heads repeat them, and a set lookup is far
cheaper than a regex. Bounded: cleared when full."""


def _check_field(name: bytes, value: bytes) -> None:
    if name not in _good_names:
        if _NAME.fullmatch(name) is None:
            raise _Malformed("invalid field name")
        if name in _CONNECTION_SPECIFIC:
            raise _Malformed("connection-specific field")
        if len(_good_names) >= _CACHE_LIMIT:
            _good_names.clear()
        if name != b"te":
            _good_names.add(name)
    if name == b"te" and value != b"trailers":
        raise _Malformed("te other than trailers")
    if value not in _good_values:
        if _BAD_VALUE.search(value) is not None:
            raise _Malformed("invalid field value")
        if len(_good_values) >= _CACHE_LIMIT:
            _good_values.clear()
        _good_values.add(value)


def _content_length(value: bytes, seen: int | None) -> int:
    if _DIGITS.fullmatch(value) is None:
        raise _Malformed("invalid content-length")
    length = int(value)
    if seen is not None and seen != length:
        raise _Malformed("conflicting content-length")
    return length


def _request(raw: Iterable[tuple[bytes, bytes, bool]], connect_protocol: bool) -> _Parsed:
    fields: Headers = []
    method = scheme = path = authority = protocol = None
    length: int | None = None
    regular = False
    for name, value, _ in raw:
        if name[:1] == b":":
            if regular:
                raise _Malformed("pseudo-header after a regular field")
            if name not in _REQUEST_PSEUDO:
                raise _Malformed("unknown pseudo-header")
            if _BAD_VALUE.search(value) is not None:
                raise _Malformed("invalid pseudo-header value")
            if name == b":method":
                if method is not None:
                    raise _Malformed("repeated :method")
                method = value
            elif name == b":path":
                if path is not None:
                    raise _Malformed("repeated :path")
                path = value
            elif name == b":scheme":
                if scheme is not None:
                    raise _Malformed("repeated :scheme")
                scheme = value
            elif name == b":authority":
                if authority is not None:
                    raise _Malformed("repeated :authority")
                authority = value
            else:
                if protocol is not None:
                    raise _Malformed("repeated :protocol")
                protocol = value
        else:
            regular = True
            _check_field(name, value)
            if name == b"content-length":
                length = _content_length(value, length)
        fields.append((name, value))
    if not method:
        raise _Malformed("no :method")
    if method == b"CONNECT":
        if protocol is not None:
            if not connect_protocol:
                raise _Malformed(":protocol without SETTINGS_ENABLE_CONNECT_PROTOCOL")
            if not scheme or not path or not authority:
                raise _Malformed("extended CONNECT without :scheme, :path or :authority")
        elif not authority or scheme is not None or path is not None:
            raise _Malformed("CONNECT needs :authority alone")
    else:
        if protocol is not None:
            raise _Malformed(":protocol outside CONNECT")
        if not scheme or not path:
            raise _Malformed("no :scheme or :path")
    return _Parsed(fields, length, method)


def _response(raw: Iterable[tuple[bytes, bytes, bool]]) -> _Parsed:
    fields: Headers = []
    status: bytes | None = None
    length: int | None = None
    regular = False
    for name, value, _ in raw:
        if name[:1] == b":":
            if regular or name != b":status" or status is not None:
                raise _Malformed("invalid pseudo-header in a response")
            status = value
        else:
            regular = True
            _check_field(name, value)
            if name == b"content-length":
                length = _content_length(value, length)
        fields.append((name, value))
    if status is None or len(status) != 3 or not status.isdigit():
        raise _Malformed("no valid :status")
    return _Parsed(fields, length, status)


def _trailers(raw: Iterable[tuple[bytes, bytes, bool]]) -> Headers:
    fields: Headers = []
    for name, value, _ in raw:
        if name[:1] == b":":
            raise _Malformed("pseudo-header in trailers")
        _check_field(name, value)
        fields.append((name, value))
    return fields


class _Parsed:
    __slots__ = ("fields", "length", "token")

    def __init__(self, fields: Headers, length: int | None, token: bytes) -> None:
        self.fields = fields
        self.length = length
        self.token = token
        """The request's method or the response's status."""


# --- streams ------------------------------------------------------------------------------


class _Stream:
    """One open (or half-closed) stream: windows both ways, which sides ended, body length."""

    __slots__ = (
        "expected",
        "head_done",
        "local_closed",
        "method",
        "received",
        "recv_window",
        "remote_closed",
        "send_window",
        "sid",
        "unacked",
    )

    def __init__(self, sid: int, send_window: int, recv_window: int) -> None:
        self.sid = sid
        self.send_window = send_window
        self.recv_window = recv_window
        """What the peer may still send before our next WINDOW_UPDATE."""
        self.unacked = 0
        """Acknowledged by the application, not yet announced to the peer."""
        self.local_closed = False
        self.remote_closed = False
        self.head_done = False
        """The peer's (final) head arrived: what follows is body, then trailers."""
        self.expected: int | None = None
        self.received = 0
        self.method = b""


# --- the connection -----------------------------------------------------------------------


class H2Connection:
    """One HTTP/2 connection, either role; see the module docstring for what it checks."""

    def __init__(
        self,
        client_side: bool,
        local_settings: dict[int, int] | None = None,
        connection_window: int = _DEFAULT_WINDOW,
        watch: FrameWatch | None = None,
    ) -> None:
        self.client_side = client_side
        self.local_settings = dict(local_settings or {})
        self.remote_settings = RemoteSettings()
        self.watch = watch
        self.closed = False
        self._streams: dict[int, _Stream] = {}
        self._out: list[bytes] = []
        self._buf = b""
        self._checked = False
        """The frame header at the start of ``_buf`` was already checked and charged."""
        self._preface_left = 0 if client_side else len(CLIENT_PREFACE)
        self._settings_seen = False
        self._block: list[bytes] | None = None
        self._block_sid = 0
        self._block_flags = 0
        self._block_size = 0
        self._highest_inbound = 0
        self._next_outbound = 1
        self._goaway_received: int | None = None
        self._goaway_sent: int | None = None
        self._reset_ids: dict[int, None] = {}
        self._encoder = Encoder()
        header_limit = self.local_settings.get(_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST_SIZE)
        self._decoder = Decoder(header_limit)
        self._stream_window = self.local_settings.get(_INITIAL_WINDOW_SIZE, _DEFAULT_WINDOW)
        self._max_inbound = self.local_settings.get(_MAX_CONCURRENT_STREAMS, _MAX_WINDOW)
        self._connect_protocol = self.local_settings.get(_ENABLE_CONNECT_PROTOCOL, 0) == 1
        self._connection_window = max(connection_window, _DEFAULT_WINDOW)
        self._conn_recv_window = _DEFAULT_WINDOW
        self._conn_unacked = 0
        self._conn_send_window = _DEFAULT_WINDOW

    # --- properties -------------------------------------------------------------------------

    @property
    def max_outbound_frame_size(self) -> int:
        return self.remote_settings.max_frame_size

    @property
    def open_streams(self) -> int:
        """Streams open or half-closed (all ours in the client role, all the peer's in the
        server role: there is no push)."""
        return len(self._streams)

    def local_flow_control_window(self, sid: int) -> int:
        stream = self._streams.get(sid)
        if stream is None:
            raise StreamClosedError(f"stream {sid} is not open")
        # Below zero after the peer shrank SETTINGS_INITIAL_WINDOW_SIZE: no room.
        return max(0, min(stream.send_window, self._conn_send_window))

    def get_next_available_stream_id(self) -> int:
        return self._next_outbound

    # --- output -----------------------------------------------------------------------------

    def initiate_connection(self) -> None:
        payload = b"".join(
            _SETTING.pack(code, value) for code, value in self.local_settings.items()
        )
        out = [CLIENT_PREFACE] if self.client_side else []
        out.append(_frame(_SETTINGS, 0, 0, payload))
        extra = self._connection_window - _DEFAULT_WINDOW
        if extra:
            out.append(_WINDOW_FRAME.pack(0, 4, _WINDOW_UPDATE, 0, 0, extra))
            self._conn_recv_window += extra
        self._out.extend(out)

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        self._out = []
        return out[0] if len(out) == 1 else b"".join(out)

    def send_headers(self, sid: int, headers: Headers, end_stream: bool = False) -> None:
        if self.closed:
            raise StreamClosedError("the connection is closed")
        stream = self._streams.get(sid)
        if stream is None:
            stream = self._open_outbound(sid, headers)
        elif stream.local_closed:
            raise StreamClosedError(f"stream {sid} already ended")
        block = self._encoder.encode([(name, value, False) for name, value in headers], True)
        flags = _END_STREAM if end_stream else 0
        limit = self.remote_settings.max_frame_size
        size = len(block)
        if size <= limit:
            self._out.append(
                _FRAME_HEADER.pack(size >> 16, size & 0xFFFF, _HEADERS, flags | _END_HEADERS, sid)
            )
            self._out.append(block)
        else:
            self._out.append(_frame(_HEADERS, flags, sid, block[:limit]))
            for start in range(limit, size, limit):
                last = _END_HEADERS if start + limit >= size else 0
                self._out.append(_frame(_CONTINUATION, last, sid, block[start : start + limit]))
        if end_stream:
            self._local_end(stream)

    def _open_outbound(self, sid: int, headers: Headers) -> _Stream:
        if not self.client_side or sid != self._next_outbound:
            raise StreamClosedError(f"stream {sid} is not open")
        if self._goaway_received is not None:
            raise ProtocolError("the peer sent GOAWAY: no new streams", _PROTOCOL_ERROR)
        if len(self._streams) >= self.remote_settings.max_concurrent_streams:
            raise ProtocolError("over the peer's SETTINGS_MAX_CONCURRENT_STREAMS", _REFUSED_STREAM)
        self._next_outbound = sid + 2
        stream = _Stream(sid, self.remote_settings.initial_window_size, self._stream_window)
        for name, value in headers:
            if name == b":method":
                stream.method = value
                break
        self._streams[sid] = stream
        return stream

    def send_data(self, sid: int, data: bytes, end_stream: bool = False) -> None:
        stream = self._streams.get(sid)
        if stream is None or stream.local_closed or self.closed:
            raise StreamClosedError(f"stream {sid} is not open for sending")
        size = len(data)
        if size:
            if size > stream.send_window or size > self._conn_send_window:
                raise FlowControlError(f"{size} bytes over the window of stream {sid}")
            if size > self.remote_settings.max_frame_size:
                raise ProtocolError(f"{size} bytes over the peer's frame size", _FRAME_SIZE_ERROR)
            stream.send_window -= size
            self._conn_send_window -= size
        out = self._out
        out.append(
            _FRAME_HEADER.pack(
                size >> 16, size & 0xFFFF, _DATA, _END_STREAM if end_stream else 0, sid
            )
        )
        if size:
            out.append(data)
        if end_stream:
            self._local_end(stream)

    def _local_end(self, stream: _Stream) -> None:
        stream.local_closed = True
        if stream.remote_closed:
            del self._streams[stream.sid]

    def reset_stream(self, sid: int, code: int) -> None:
        """Reset an open stream (nothing happens for one already over)."""
        if self._streams.pop(sid, None) is not None and not self.closed:
            self._send_reset(sid, code)

    def _send_reset(self, sid: int, code: int) -> None:
        self._out.append(_RST_FRAME.pack(0, 4, _RST_STREAM, 0, sid, code))
        reset = self._reset_ids
        reset[sid] = None
        if len(reset) > _RESET_MEMORY:
            del reset[next(iter(reset))]

    def acknowledge_received_data(self, size: int, sid: int) -> None:
        """The application took ``size`` bytes of ``sid``: credit goes back to the peer once at
        least half a window is due (never for a stream the peer already ended)."""
        if self.closed or size <= 0:
            return
        unacked = self._conn_unacked + size
        if unacked >= self._connection_window >> 1:
            self._out.append(_WINDOW_FRAME.pack(0, 4, _WINDOW_UPDATE, 0, 0, unacked))
            self._conn_recv_window += unacked
            unacked = 0
        self._conn_unacked = unacked
        stream = self._streams.get(sid)
        if stream is not None and not stream.remote_closed:
            unacked = stream.unacked + size
            if unacked >= self._stream_window >> 1:
                self._out.append(_WINDOW_FRAME.pack(0, 4, _WINDOW_UPDATE, 0, sid, unacked))
                stream.recv_window += unacked
                unacked = 0
            stream.unacked = unacked

    def send_goaway(self, last_stream_id: int, code: int = _NO_ERROR) -> None:
        """A graceful GOAWAY: streams up to ``last_stream_id`` go on, newer ones are refused."""
        if self.closed:
            return
        self._goaway_sent = last_stream_id
        self._out.append(_goaway(last_stream_id, code))

    def close_connection(self, code: int = _NO_ERROR) -> None:
        """GOAWAY naming the last stream the peer opened, and the end of the connection."""
        if self.closed:
            return
        self.closed = True
        self._out.append(_goaway(self._highest_inbound, code))
        self._streams.clear()

    # --- input ------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """The events in ``data`` (whole frames; a partial one waits for its remainder)."""
        if self.closed:
            return []
        events: list[Event] = []
        try:
            self._receive(data, events)
        except ProtocolError as exc:
            self.close_connection(exc.error_code)
            raise
        return events

    def _receive(self, data: bytes, events: list[Event]) -> None:
        if self._buf:
            data = self._buf + data
            self._buf = b""
        size = len(data)
        pos = 0
        watch = self.watch
        if self._preface_left:
            done = len(CLIENT_PREFACE) - self._preface_left
            taken = min(self._preface_left, size)
            if data[:taken] != CLIENT_PREFACE[done : done + taken]:
                raise ProtocolError("invalid connection preface", _PROTOCOL_ERROR)
            self._preface_left -= taken
            pos = taken
            if self._preface_left:
                if watch is not None:
                    watch.begin()
                return
        checked = self._checked
        self._checked = False
        while size - pos >= 9:
            length = (data[pos] << 16) | (data[pos + 1] << 8) | data[pos + 2]
            kind = data[pos + 3]
            flags = data[pos + 4]
            if not checked:
                if length > MAX_FRAME_SIZE:
                    raise FrameTooLarge(f"frame of {length} bytes announced (type {kind:#x})")
                if watch is not None:
                    watch.frame(kind, flags, length)
            checked = False
            end = pos + 9 + length
            if end > size:
                self._checked = True
                break
            sid = int.from_bytes(data[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
            payload = data[pos + 9 : end]
            pos = end
            if self._block is not None:
                self._continuation(kind, flags, sid, payload, events)
            elif kind == _DATA:
                self._data(flags, sid, payload, events)
            elif kind == _HEADERS:
                self._headers(flags, sid, payload, events)
            elif not self._settings_seen and kind != _SETTINGS:
                raise ProtocolError("the first frame is not SETTINGS", _PROTOCOL_ERROR)
            elif kind == _WINDOW_UPDATE:
                self._window_update(sid, payload, events)
            elif kind == _SETTINGS:
                self._settings(flags, sid, payload, events)
            elif kind == _RST_STREAM:
                self._rst_stream(sid, payload, events)
            elif kind == _PING:
                self._ping(flags, sid, payload)
            elif kind == _GOAWAY:
                self._goaway(sid, payload, events)
            elif kind == _PRIORITY:
                if len(payload) != 5:
                    raise ProtocolError("PRIORITY of the wrong size", _FRAME_SIZE_ERROR)
                if not sid:
                    raise ProtocolError("PRIORITY on stream 0", _PROTOCOL_ERROR)
            elif kind == _PUSH_PROMISE:
                raise ProtocolError("PUSH_PROMISE (push is disabled)", _PROTOCOL_ERROR)
            elif kind == _CONTINUATION:
                raise ProtocolError("CONTINUATION without a header block", _PROTOCOL_ERROR)
            # Unknown frame types are ignored (RFC 9113 section 4.1); the watch charged them.
        if pos < size:
            self._buf = data[pos:] if pos else data
        if watch is not None:
            rest = self._buf
            if self._block is not None or (
                rest and (len(rest) < 9 or rest[3] == _HEADERS or rest[3] == _CONTINUATION)
            ):
                watch.begin()
            else:
                watch.end()

    def _is_idle(self, sid: int) -> bool:
        """A stream nobody opened yet (frames other than HEADERS on it are a protocol error)."""
        if self.client_side:
            return sid % 2 == 0 or sid >= self._next_outbound
        return sid % 2 == 0 or sid > self._highest_inbound

    def _stream_error(self, stream: _Stream, code: int, events: list[Event]) -> None:
        """RST_STREAM for a stream whose peer broke the rules; the application hears of it."""
        del self._streams[stream.sid]
        self._send_reset(stream.sid, code)
        events.append(StreamReset(stream.sid, code, False))

    def _data(self, flags: int, sid: int, payload: bytes, events: list[Event]) -> None:
        if not self._settings_seen:
            raise ProtocolError("the first frame is not SETTINGS", _PROTOCOL_ERROR)
        if not sid:
            raise ProtocolError("DATA on stream 0", _PROTOCOL_ERROR)
        flow = len(payload)
        if flow > self._conn_recv_window:
            raise ProtocolError("DATA beyond the connection window", _FLOW_CONTROL_ERROR)
        self._conn_recv_window -= flow
        if flags & _PADDED:
            if not flow or payload[0] >= flow:
                raise ProtocolError("padding as long as the frame", _PROTOCOL_ERROR)
            payload = payload[1 : flow - payload[0]]
        stream = self._streams.get(sid)
        if stream is None:
            if self._is_idle(sid):
                raise ProtocolError(f"DATA on idle stream {sid}", _PROTOCOL_ERROR)
            if sid not in self._reset_ids:
                raise ProtocolError(f"DATA on closed stream {sid}", _STREAM_CLOSED)
            self._credit_connection(flow)  # in flight when we reset it: nobody takes these
            return
        if flow > stream.recv_window:
            raise ProtocolError(f"DATA beyond the window of stream {sid}", _FLOW_CONTROL_ERROR)
        stream.recv_window -= flow
        if stream.remote_closed or not stream.head_done:
            self._credit_connection(flow)
            self._stream_error(
                stream, _STREAM_CLOSED if stream.remote_closed else _PROTOCOL_ERROR, events
            )
            return
        size = len(payload)
        if flow != size:
            self.acknowledge_received_data(flow - size, sid)
        ended = flags & _END_STREAM
        if stream.expected is not None:
            stream.received += size
            if stream.received > stream.expected or (ended and stream.received != stream.expected):
                self._credit_connection(size)
                self._stream_error(stream, _PROTOCOL_ERROR, events)
                return
        if ended:
            stream.remote_closed = True
            if stream.local_closed:
                del self._streams[sid]
            events.append(DataReceived(sid, payload, True))
        else:
            events.append(DataReceived(sid, payload, False))

    def _credit_connection(self, size: int) -> None:
        """Connection credit for bytes no stream will acknowledge."""
        if not size:
            return
        unacked = self._conn_unacked + size
        if unacked >= self._connection_window >> 1:
            self._out.append(_WINDOW_FRAME.pack(0, 4, _WINDOW_UPDATE, 0, 0, unacked))
            self._conn_recv_window += unacked
            unacked = 0
        self._conn_unacked = unacked

    def _headers(self, flags: int, sid: int, payload: bytes, events: list[Event]) -> None:
        if not self._settings_seen:
            raise ProtocolError("the first frame is not SETTINGS", _PROTOCOL_ERROR)
        if not sid:
            raise ProtocolError("HEADERS on stream 0", _PROTOCOL_ERROR)
        if flags & _PADDED:
            if not payload or payload[0] >= len(payload):
                raise ProtocolError("padding as long as the frame", _PROTOCOL_ERROR)
            payload = payload[1 : len(payload) - payload[0]]
        if flags & _PRIORITY_FLAG:
            if len(payload) < 5:
                raise ProtocolError("HEADERS too short for its priority", _FRAME_SIZE_ERROR)
            payload = payload[5:]
        if flags & _END_HEADERS:
            self._head(sid, flags, payload, events)
        else:
            self._block = [payload]
            self._block_sid = sid
            self._block_flags = flags
            self._block_size = len(payload)

    def _continuation(
        self, kind: int, flags: int, sid: int, payload: bytes, events: list[Event]
    ) -> None:
        block = self._block
        assert block is not None
        if kind != _CONTINUATION or sid != self._block_sid:
            raise ProtocolError("a header block interrupted", _PROTOCOL_ERROR)
        self._block_size += len(payload)
        if self._block_size > _MAX_BLOCK:
            raise ProtocolError("header block too large", _ENHANCE_YOUR_CALM)
        block.append(payload)
        if flags & _END_HEADERS:
            self._block = None
            self._head(sid, self._block_flags, b"".join(block), events)

    def _decode(self, block: bytes) -> list[tuple[bytes, bytes, bool]]:
        try:
            return cast(list[tuple[bytes, bytes, bool]], self._decoder.decode(block, True))
        except OversizedHeaderListError:
            raise ProtocolError("header list too large", _ENHANCE_YOUR_CALM) from None
        except HPACKError as exc:
            raise ProtocolError(f"HPACK: {exc}", _COMPRESSION_ERROR) from None
        except BaseException as exc:  # the compiled decoder panics on some malformed input
            if isinstance(exc, Exception) or type(exc).__name__ == "PanicException":
                raise ProtocolError("HPACK: undecodable block", _COMPRESSION_ERROR) from None
            raise

    def _head(self, sid: int, flags: int, block: bytes, events: list[Event]) -> None:
        """A whole header block on ``sid``: a request, a response, or trailers."""
        raw = self._decode(block)  # always, so the HPACK state stays in step
        ended = bool(flags & _END_STREAM)
        stream = self._streams.get(sid)
        if stream is None:
            opening = not self.client_side and sid % 2 == 1 and sid > self._highest_inbound
            if not opening:
                if self._is_idle(sid) or sid not in self._reset_ids:
                    # A stream nobody opened, one implicitly closed by a higher id (ids only
                    # grow), or one that ended: RFC 9113 section 5.1.1.
                    raise ProtocolError(f"HEADERS on stream {sid}, not open", _PROTOCOL_ERROR)
                return  # in flight when we reset the stream: decoded, and dropped
            self._highest_inbound = sid
            self._open_inbound(sid, raw, ended, events)
            return
        if stream.remote_closed:
            self._stream_error(stream, _STREAM_CLOSED, events)
            return
        try:
            if stream.head_done:
                if not ended:
                    raise _Malformed("trailers without END_STREAM")
                trailers = _trailers(raw)
                if stream.expected is not None and stream.received != stream.expected:
                    raise _Malformed("content-length and DATA disagree")
                stream.remote_closed = True
                if stream.local_closed:
                    del self._streams[sid]
                events.append(TrailersReceived(sid, trailers))
                return
            head = _response(raw)
        except _Malformed:
            self._stream_error(stream, _PROTOCOL_ERROR, events)
            return
        status = head.token
        if status[0] == 0x31:  # 1xx
            if status == b"101" or ended:
                self._stream_error(stream, _PROTOCOL_ERROR, events)
                return
            events.append(InformationalResponseReceived(sid, head.fields))
            return
        stream.head_done = True
        if head.length is not None and stream.method != b"HEAD" and status != b"304":
            if ended and head.length:
                self._stream_error(stream, _PROTOCOL_ERROR, events)
                return
            stream.expected = head.length
        if ended:
            stream.remote_closed = True
            if stream.local_closed:
                del self._streams[sid]
        events.append(ResponseReceived(sid, head.fields, ended))

    def _open_inbound(
        self, sid: int, raw: list[tuple[bytes, bytes, bool]], ended: bool, events: list[Event]
    ) -> None:
        refuse = (self._goaway_sent is not None and sid > self._goaway_sent) or len(
            self._streams
        ) >= self._max_inbound
        # A stream refused or malformed costs the peer budget (the HEADERS frame earned one
        # token, as for a real request): opening them in a loop is a flood like any other.
        if refuse:
            self._send_reset(sid, _REFUSED_STREAM)
            if self.watch is not None:
                self.watch.glitch("refused streams", 2.0)
            return
        try:
            head = _request(raw, self._connect_protocol)
            if ended and head.length:
                raise _Malformed("content-length without DATA")
        except _Malformed:
            self._send_reset(sid, _PROTOCOL_ERROR)
            if self.watch is not None:
                self.watch.glitch("malformed requests", 2.0)
            return
        stream = _Stream(sid, self.remote_settings.initial_window_size, self._stream_window)
        stream.head_done = True
        stream.method = head.token
        stream.expected = head.length
        stream.remote_closed = ended
        self._streams[sid] = stream
        events.append(RequestReceived(sid, head.fields, ended))

    def _window_update(self, sid: int, payload: bytes, events: list[Event]) -> None:
        if len(payload) != 4:
            raise ProtocolError("WINDOW_UPDATE of the wrong size", _FRAME_SIZE_ERROR)
        delta = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if not sid:
            if not delta:
                raise ProtocolError("WINDOW_UPDATE of 0", _PROTOCOL_ERROR)
            self._conn_send_window += delta
            if self._conn_send_window > _MAX_WINDOW:
                raise ProtocolError("connection window over 2**31-1", _FLOW_CONTROL_ERROR)
            events.append(WindowUpdated(0, delta))
            return
        stream = self._streams.get(sid)
        if stream is None:
            if self._is_idle(sid):
                raise ProtocolError(f"WINDOW_UPDATE on idle stream {sid}", _PROTOCOL_ERROR)
            return
        if not delta:
            self._stream_error(stream, _PROTOCOL_ERROR, events)
            return
        stream.send_window += delta
        if stream.send_window > _MAX_WINDOW:
            self._stream_error(stream, _FLOW_CONTROL_ERROR, events)
            return
        events.append(WindowUpdated(sid, delta))

    def _settings(self, flags: int, sid: int, payload: bytes, events: list[Event]) -> None:
        if sid:
            raise ProtocolError("SETTINGS on a stream", _PROTOCOL_ERROR)
        if flags & _ACK:
            if payload:
                raise ProtocolError("SETTINGS ACK with a payload", _FRAME_SIZE_ERROR)
            return
        if len(payload) % 6:
            raise ProtocolError("SETTINGS of the wrong size", _FRAME_SIZE_ERROR)
        self._settings_seen = True
        remote = self.remote_settings
        changed: dict[int, int] = {}
        for start in range(0, len(payload), 6):
            code, value = _SETTING.unpack_from(payload, start)
            if code == _HEADER_TABLE_SIZE:
                remote.header_table_size = value
                self._encoder.header_table_size = min(value, 4096)
            elif code == _ENABLE_PUSH:
                if value > 1 or (value and self.client_side):
                    raise ProtocolError("invalid SETTINGS_ENABLE_PUSH", _PROTOCOL_ERROR)
                remote.enable_push = value
            elif code == _MAX_CONCURRENT_STREAMS:
                remote.max_concurrent_streams = value
            elif code == _INITIAL_WINDOW_SIZE:
                if value > _MAX_WINDOW:
                    raise ProtocolError(
                        "SETTINGS_INITIAL_WINDOW_SIZE over 2**31-1", _FLOW_CONTROL_ERROR
                    )
                delta = value - remote.initial_window_size
                remote.initial_window_size = value
                if delta:
                    for stream in self._streams.values():
                        stream.send_window += delta
                        if stream.send_window > _MAX_WINDOW:
                            raise ProtocolError("a stream window over 2**31-1", _FLOW_CONTROL_ERROR)
            elif code == _MAX_FRAME_SIZE_SETTING:
                if not MAX_FRAME_SIZE <= value <= 0xFFFFFF:
                    raise ProtocolError("invalid SETTINGS_MAX_FRAME_SIZE", _PROTOCOL_ERROR)
                remote.max_frame_size = value
            elif code == _MAX_HEADER_LIST_SIZE:
                remote.max_header_list_size = value
            elif code == _ENABLE_CONNECT_PROTOCOL:
                if value > 1:
                    raise ProtocolError("invalid SETTINGS_ENABLE_CONNECT_PROTOCOL", _PROTOCOL_ERROR)
                remote.enable_connect_protocol = value
            else:
                continue  # unknown settings are ignored
            changed[code] = value
        self._out.append(_frame(_SETTINGS, _ACK, 0, b""))
        events.append(RemoteSettingsChanged(changed))
        delta = changed.get(_INITIAL_WINDOW_SIZE)
        if delta is not None:
            events.append(WindowUpdated(0, 0))

    def _rst_stream(self, sid: int, payload: bytes, events: list[Event]) -> None:
        if len(payload) != 4:
            raise ProtocolError("RST_STREAM of the wrong size", _FRAME_SIZE_ERROR)
        if not sid or self._is_idle(sid):
            raise ProtocolError(f"RST_STREAM on idle stream {sid}", _PROTOCOL_ERROR)
        if self._streams.pop(sid, None) is not None:
            events.append(StreamReset(sid, int.from_bytes(payload, "big"), True))

    def _ping(self, flags: int, sid: int, payload: bytes) -> None:
        if len(payload) != 8:
            raise ProtocolError("PING of the wrong size", _FRAME_SIZE_ERROR)
        if sid:
            raise ProtocolError("PING on a stream", _PROTOCOL_ERROR)
        if not flags & _ACK:
            self._out.append(_frame(_PING, _ACK, 0, payload))

    def _goaway(self, sid: int, payload: bytes, events: list[Event]) -> None:
        if sid:
            raise ProtocolError("GOAWAY on a stream", _PROTOCOL_ERROR)
        if len(payload) < 8:
            raise ProtocolError("GOAWAY too short", _FRAME_SIZE_ERROR)
        last = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
        self._goaway_received = last
        events.append(GoAwayReceived(last, int.from_bytes(payload[4:8], "big"), payload[8:]))


_GOAWAY_PAYLOAD = struct.Struct(">LL")


def _goaway(last_stream_id: int, code: int) -> bytes:
    return _frame(_GOAWAY, 0, 0, _GOAWAY_PAYLOAD.pack(last_stream_id & 0x7FFFFFFF, code))
