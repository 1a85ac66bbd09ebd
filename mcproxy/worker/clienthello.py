"""Sans-I/O parser for the TLS ClientHello that opens every connection.

The worker must read the SNI hostname (and ALPN) before it can pick a route,
yet an L4 route must hand the backend exactly the bytes the client sent, and an
L7 route must hand them to the TLS engine. So the parser only looks: it owns no
socket, writes nothing, and keeps every byte it was fed in
:attr:`ClientHelloParser.consumed`.

Strategy
--------
``feed()`` appends to one buffer and resumes a small state machine where the
previous call stopped, so every byte is looked at once however the input is
split (one byte per call costs call overhead, never re-parsing):

1. Record header, 5 bytes: content type 22 (handshake), major version 3,
   length 1..2**14 (RFC 8446 5.1). The first two bytes are checked as soon as
   they arrive, so an HTTP request or an SSLv2-format hello fails on byte one.
2. Record payload: copied onto the handshake-message buffer. A ClientHello may
   be fragmented over several records, and a record over several feeds.
3. Handshake header, 4 bytes: the type must be ClientHello and the 24-bit
   length at most ``max_size``; both are checked before the body arrives.
4. When the message is complete its body is parsed, once.

Rules the callers rely on:

- ``feed()`` returns ``None`` while more bytes are needed, then the
  :class:`ClientHello`; later calls append to :attr:`consumed` and return the
  same object. Bytes after the hello (a TLS 1.3 ChangeCipherSpec or early
  data) are kept but never inspected.
- While no hello is complete the parser holds at most :attr:`limit` bytes: the
  largest allowed hello (``max_size`` body bytes plus its 4-byte header) in the
  fewest records that can carry it. Small hellos may be fragmented much
  further; a hello whose record headers push it past the bound is refused, and
  the outcome does not depend on how the input was split.
- The hello must end on a record boundary and no other record type may precede
  or interleave with it (RFC 8446 5.1: messages before a key change must align
  with a record boundary; handshake messages must not interleave).
- Any violation raises :class:`ClientHelloError`; so does every later call.
"""

import re
import struct
from dataclasses import dataclass

__all__ = ["MAX_CLIENT_HELLO_BYTES", "ClientHello", "ClientHelloError", "ClientHelloParser"]

MAX_CLIENT_HELLO_BYTES = 2**14 + 4096
"""Largest ClientHello body accepted, in bytes.

It bounds the memory one not-yet-routed connection can pin. Real hellos are far
smaller (Chrome's with an X25519MLKEM768 key share is about 1.8 KB); one full
record plus 4 KB leaves room for larger post-quantum key shares and session
tickets, and for hellos that spill into a second record.
"""

_CONTENT_HANDSHAKE = 22
_HANDSHAKE_CLIENT_HELLO = 1
_MAX_RECORD_PAYLOAD = 2**14  # RFC 8446 5.1: TLSPlaintext.length MUST NOT exceed 2^14
_RECORD_HEADER = struct.Struct("!BBBH")  # content type, version major, minor, length
_RECORD_HEADER_SIZE = _RECORD_HEADER.size
_HANDSHAKE_HEADER = struct.Struct("!I")  # type (8 bits) and length (24 bits)
_HANDSHAKE_HEADER_SIZE = _HANDSHAKE_HEADER.size
_U16 = struct.Struct("!H")
_EXTENSION_HEADER = struct.Struct("!HH")  # type, length
_RANDOM_SIZE = 32
_MAX_SESSION_ID = 32

_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_EXT_SUPPORTED_VERSIONS = 43
_NAME_TYPE_HOST_NAME = 0
# Printable ASCII without space: a host_name with control bytes can match no
# route and would only smuggle them into logs and metric labels.
_HOST_NAME = re.compile(rb"[!-~]+")


class ClientHelloError(Exception):
    """The peer did not send a parseable TLS ClientHello (reason in the message)."""


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What routing needs from a ClientHello; the bytes stay with the parser.

    ``alpn`` names are decoded as Latin-1, so any octets a client sends survive
    (``name.encode("latin-1")`` gives them back); ``supported_versions`` keeps
    GREASE values as sent.
    """

    sni: str | None
    alpn: tuple[str, ...]
    supported_versions: tuple[int, ...]
    legacy_version: int


class ClientHelloParser:
    """Incremental reader for the first TLS handshake message of a connection."""

    __slots__ = (
        "_error",
        "_hello",
        "_limit",
        "_max_size",
        "_message",
        "_message_size",
        "_pos",
        "_raw",
        "_record_left",
    )

    def __init__(self, max_size: int = MAX_CLIENT_HELLO_BYTES) -> None:
        """Accept ClientHello bodies of at most ``max_size`` bytes (1 .. 2**24-1)."""
        if not 0 < max_size < 2**24:
            raise ValueError(f"max_size must be in 1..{2**24 - 1}, got {max_size}")
        self._max_size = max_size
        message = max_size + _HANDSHAKE_HEADER_SIZE
        records = -(-message // _MAX_RECORD_PAYLOAD)
        self._limit = message + records * _RECORD_HEADER_SIZE
        self._raw = bytearray()  # every byte fed
        self._pos = 0  # bytes of _raw walked so far
        self._record_left = 0  # payload bytes still due in the current record; 0: header next
        self._message = bytearray()  # handshake bytes gathered from the records
        self._message_size = 0  # 4 + body length once the handshake header is in
        self._hello: ClientHello | None = None
        self._error: ClientHelloError | None = None

    @property
    def consumed(self) -> bytes:
        """Every byte fed so far, in order, for replay to the backend or TLS engine."""
        return bytes(self._raw)

    @property
    def limit(self) -> int:
        """Most bytes held while the hello is incomplete; more raises."""
        return self._limit

    def feed(self, data: bytes) -> ClientHello | None:
        """Take the next bytes from the peer.

        Returns the ClientHello once it is complete (and again on every later
        call), or ``None`` when more bytes are needed. ``b""`` is a no-op: end
        of stream before a hello is the caller's refusal to make.

        Raises:
            ClientHelloError: the bytes are not a ClientHello we accept, or the
                parser failed before.
        """
        if self._hello is not None:
            self._raw += data
            return self._hello
        if self._error is not None:
            raise ClientHelloError(f"parser failed earlier: {self._error}")
        self._raw += data
        try:
            hello = self._advance()
            if hello is None and len(self._raw) > self._limit:
                raise ClientHelloError(
                    f"no complete ClientHello within the {self._limit}-byte bound "
                    f"(max_size {self._max_size} plus record headers)"
                )
        except ClientHelloError as exc:
            self._error = exc
            raise
        self._hello = hello
        return hello

    def _advance(self) -> ClientHello | None:
        """Walk the new bytes from ``_pos``; return the hello when its last byte is in."""
        raw = self._raw
        end = len(raw)
        pos = self._pos
        message = self._message
        with memoryview(raw) as view:
            while True:
                if self._record_left == 0:
                    _check_record_prefix(raw, pos, end)
                    if end - pos < _RECORD_HEADER_SIZE:
                        break
                    _type, _major, _minor, length = _RECORD_HEADER.unpack_from(raw, pos)
                    if not 0 < length <= _MAX_RECORD_PAYLOAD:
                        raise ClientHelloError(
                            f"record length {length} at offset {pos} is not in "
                            f"1..{_MAX_RECORD_PAYLOAD}"
                        )
                    pos += _RECORD_HEADER_SIZE
                    self._record_left = length
                    self._check_record_fits(pos)
                take = min(self._record_left, end - pos)
                if take == 0:
                    break
                message += view[pos : pos + take]
                pos += take
                self._record_left -= take
                if not self._message_size and len(message) >= _HANDSHAKE_HEADER_SIZE:
                    self._read_handshake_header()
                    self._check_record_fits(pos)
                if self._message_size and len(message) == self._message_size:
                    self._pos = pos
                    if pos > self._limit:
                        raise ClientHelloError(
                            f"ClientHello ends at byte {pos}, past the {self._limit}-byte bound "
                            "(too many record headers)"
                        )
                    return _parse_body(message)
        self._pos = pos
        return None

    def _read_handshake_header(self) -> None:
        (header,) = _HANDSHAKE_HEADER.unpack_from(self._message, 0)
        msg_type = header >> 24
        body_size = header & 0xFFFFFF
        if msg_type != _HANDSHAKE_CLIENT_HELLO:
            raise ClientHelloError(f"first handshake message has type {msg_type}, not ClientHello")
        if body_size > self._max_size:
            raise ClientHelloError(
                f"ClientHello declares {body_size} bytes, more than the {self._max_size} allowed"
            )
        self._message_size = _HANDSHAKE_HEADER_SIZE + body_size

    def _check_record_fits(self, pos: int) -> None:
        """Refuse a record that carries bytes past the end of the ClientHello."""
        if self._message_size and (len(self._message) + self._record_left > self._message_size):
            raise ClientHelloError(
                f"record ending at offset {pos + self._record_left} continues past the "
                "ClientHello (it must end on a record boundary)"
            )


def _check_record_prefix(raw: bytearray, pos: int, end: int) -> None:
    """Check the content type and major version of a record header, as far as it is in."""
    if end > pos and raw[pos] != _CONTENT_HANDSHAKE:
        if pos == 0 and raw[0] & 0x80:
            raise ClientHelloError("SSLv2-format ClientHello is not supported")
        raise ClientHelloError(
            f"record at offset {pos} has content type {raw[pos]}, not handshake (22)"
        )
    if end > pos + 1 and raw[pos + 1] != 3:
        raise ClientHelloError(f"record at offset {pos} has major version {raw[pos + 1]}, not 3")


def _vector(buf: bytearray, off: int, end: int, prefix: int, what: str) -> tuple[int, int]:
    """Bounds of the length-prefixed vector at ``off`` (1- or 2-byte length), ending by ``end``."""
    if off + prefix > end:
        raise ClientHelloError(f"ClientHello truncated in the {what} length")
    length = buf[off] if prefix == 1 else buf[off] << 8 | buf[off + 1]  # no slice: hot path
    start = off + prefix
    stop = start + length
    if stop > end:
        raise ClientHelloError(f"{what} length {length} overruns its enclosing data")
    return start, stop


def _parse_body(msg: bytearray) -> ClientHello:
    """Parse a complete ClientHello message (handshake header included)."""
    end = len(msg)
    off = _HANDSHAKE_HEADER_SIZE
    if end < off + 2 + _RANDOM_SIZE:
        raise ClientHelloError("ClientHello truncated before the end of random")
    (legacy_version,) = _U16.unpack_from(msg, off)
    off += 2 + _RANDOM_SIZE
    start, off = _vector(msg, off, end, 1, "legacy_session_id")
    if off - start > _MAX_SESSION_ID:
        raise ClientHelloError(f"legacy_session_id is {off - start} bytes, more than 32")
    start, off = _vector(msg, off, end, 2, "cipher_suites")
    if off == start or (off - start) % 2:
        raise ClientHelloError(f"cipher_suites length {off - start} is zero or odd")
    start, off = _vector(msg, off, end, 1, "compression_methods")
    if off == start:
        raise ClientHelloError("compression_methods is empty")
    if off == end:  # TLS 1.2 and earlier may omit the extensions block
        return ClientHello(sni=None, alpn=(), supported_versions=(), legacy_version=legacy_version)
    off, stop = _vector(msg, off, end, 2, "extensions")
    if stop != end:
        raise ClientHelloError(f"{end - stop} bytes of trailing data after the extensions")

    sni: str | None = None
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] = ()
    seen: set[int] = set()
    header_size, unpack_header = _EXTENSION_HEADER.size, _EXTENSION_HEADER.unpack_from
    while off < stop:
        if stop - off < header_size:
            raise ClientHelloError("ClientHello truncated in an extension header")
        ext_type, ext_len = unpack_header(msg, off)
        off += header_size
        ext_end = off + ext_len
        if ext_end > stop:
            raise ClientHelloError(f"extension {ext_type} length {ext_len} overruns the hello")
        if ext_type in seen:
            raise ClientHelloError(f"extension {ext_type} appears twice")
        seen.add(ext_type)
        if ext_type == _EXT_SERVER_NAME:
            sni = _parse_server_name(msg, off, ext_end)
        elif ext_type == _EXT_ALPN:
            alpn = _parse_alpn(msg, off, ext_end)
        elif ext_type == _EXT_SUPPORTED_VERSIONS:
            versions = _parse_supported_versions(msg, off, ext_end)
        off = ext_end
    return ClientHello(
        sni=sni, alpn=alpn, supported_versions=versions, legacy_version=legacy_version
    )


def _parse_server_name(buf: bytearray, off: int, end: int) -> str | None:
    """RFC 6066 3: a ServerNameList; at most one host_name, other name types skipped."""
    off, stop = _vector(buf, off, end, 2, "server_name list")
    if stop != end or off == stop:
        raise ClientHelloError("server_name list is empty or does not fill its extension")
    host: str | None = None
    while off < stop:
        name_type = buf[off]
        start, off = _vector(buf, off + 1, stop, 2, "server_name entry")
        if name_type != _NAME_TYPE_HOST_NAME:
            continue
        if host is not None:
            raise ClientHelloError("server_name list holds more than one host_name")
        if start == off:
            raise ClientHelloError("server_name host_name is empty")
        name = buf[start:off]
        if not _HOST_NAME.fullmatch(name):
            raise ClientHelloError("server_name host_name is not printable ASCII")
        host = name.decode("ascii")
    return host


def _parse_alpn(buf: bytearray, off: int, end: int) -> tuple[str, ...]:
    """RFC 7301 3.1: a non-empty ProtocolNameList of non-empty names."""
    off, stop = _vector(buf, off, end, 2, "ALPN list")
    if stop != end or off == stop:
        raise ClientHelloError("ALPN list is empty or does not fill its extension")
    names: list[str] = []
    while off < stop:
        start, off = _vector(buf, off, stop, 1, "ALPN protocol name")
        if start == off:
            raise ClientHelloError("ALPN protocol name is empty")
        names.append(buf[start:off].decode("latin-1"))
    return tuple(names)


def _parse_supported_versions(buf: bytearray, off: int, end: int) -> tuple[int, ...]:
    """RFC 8446 4.2.1: the ClientHello form, a list of 2-byte versions."""
    off, stop = _vector(buf, off, end, 1, "supported_versions")
    size = stop - off
    if stop != end or size == 0 or size % 2:
        raise ClientHelloError(f"supported_versions length {size} is malformed")
    return struct.unpack_from(f"!{size // 2}H", buf, off)
