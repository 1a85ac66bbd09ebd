"""PROXY protocol v1 and v2 (HAProxy's proxy-protocol.txt): a sans-I/O decoder and encoders.

A listener with ``proxy_protocol: true`` sits behind another proxy that prepends a
PROXY header naming the real client; the firewall and the rate limit must see that
address, not the upstream proxy's. A route with ``send_proxy_protocol: true`` does the
same for its backend, with :func:`encode_v2`.

Strategy: :class:`ProxyHeaderDecoder` takes bytes and returns a :class:`ProxyHeader`,
``None`` ("need more") or raises :class:`ProxyHeaderError`. It never touches a socket;
the listener owns reads and the handshake timeout. It is a small state machine:

1. *Detect.* Compare what has arrived with the v1 (``"PROXY "``) and v2 (12 bytes)
   signatures. Bytes that can no longer begin either one raise at once, so a client
   that speaks TLS directly is refused on its first byte, not after 536 bytes.
2. *v1.* Wait for the CRLF within 107 bytes (the spec's maximum line), then parse the
   line strictly: single spaces, addresses of the declared family, canonical ports.
3. *v2.* Check version, command and family as each byte arrives. The length field
   gives the exact size of the header, which is refused at once if it exceeds the
   cap; the address block and the TLV chain are then checked against that length.

Every state has a byte limit (``max_size``, then 107 for v1 or the declared length for
v2) and the decoder never holds more than that: bytes past the limit in one ``feed``
are not copied into the buffer but handed back, with any excess already buffered, as
:attr:`ProxyHeaderDecoder.leftover`: the start of the TLS ClientHello, to be parsed
next. The v1 search for the line end resumes where it stopped, so feeding one byte at
a time costs linear time.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

__all__ = [
    "MAX_HEADER_BYTES",
    "V1_MAX_LINE",
    "V2_SIGNATURE",
    "ProxyHeader",
    "ProxyHeaderDecoder",
    "ProxyHeaderError",
    "encode_v1",
    "encode_v2",
    "encode_v2_local",
]

V1_SIGNATURE = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# The spec's longest v1 line, CRLF included ("PROXY UNKNOWN" with a full TCP6 tail).
V1_MAX_LINE = 107
_V2_FIXED = 16  # signature, ver_cmd, family, 2-byte length
# 107 is the spec's bound for v1. v2 has none (its length field reaches 64 KiB), so we
# cap it at 16 fixed bytes + a 520-byte block: the largest address block (AF_UNIX, 216)
# plus 304 bytes of TLVs, enough for the usual ones (unique id, SSL summary, a cloud
# load balancer's endpoint id). Longer headers are refused, not buffered: every
# connection may hold this much before anything about it has been checked.
MAX_HEADER_BYTES = 536

_CMD_LOCAL = 0x0
_CMD_PROXY = 0x1
_FAM_TCP4 = 0x11
_FAM_TCP6 = 0x21
# The family/transport bytes the spec allows, with the size of their address block:
# UNSPEC, INET, INET6 and UNIX, each over STREAM or DGRAM (UNSPEC only as 0x00).
_V2_ADDRESS_SIZES = {
    0x00: 0,
    0x11: 12,
    0x12: 12,
    0x21: 36,
    0x22: 36,
    0x31: 216,
    0x32: 216,
}


class ProxyHeaderError(Exception):
    """Malformed, unsupported or oversize PROXY header (reason in the message)."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What the upstream proxy told us about the connection it relays.

    ``source`` is None when the header carries no usable address (v2 LOCAL, v1
    UNKNOWN, v2 UNSPEC or AF_UNIX): the caller then keeps the TCP peer address.
    """

    version: int  # 1 or 2
    local: bool  # v2 LOCAL command (health checks): use the TCP source
    source: tuple[str, int] | None  # (ip, port) of the real client
    destination: tuple[str, int] | None


class ProxyHeaderDecoder:
    """Incremental decoder for one PROXY header at the start of a connection."""

    def __init__(self, max_size: int = MAX_HEADER_BYTES) -> None:
        """``max_size`` bounds the whole header; v1 is further bounded by its 107 bytes."""
        if max_size < _V2_FIXED:
            raise ValueError(f"max_size must be at least {_V2_FIXED} bytes, got {max_size}")
        self._max_size = max_size
        self._limit = max_size  # bytes we may hold in the current state
        self._buf = bytearray()
        self._version = 0  # 0 until a signature has matched
        self._scan = 0  # v1: where the search for LF resumes
        self._header_len = 0
        self._header: ProxyHeader | None = None
        self._leftover = b""
        self._error: str | None = None

    @property
    def leftover(self) -> bytes:
        """The bytes after the header (b"" until :meth:`feed` has returned a header)."""
        return self._leftover

    @property
    def buffered(self) -> int:
        """How many bytes are held while waiting for the rest of the header."""
        return len(self._buf)

    def feed(self, data: bytes) -> ProxyHeader | None:
        """Add bytes received from the peer.

        Returns the header once it is complete (the bytes that followed it are then in
        :attr:`leftover`), or None if more bytes are needed.

        Raises:
            ProxyHeaderError: the bytes are not a valid, supported header within the
                size limit; so does every later call.
            RuntimeError: called again after a header was returned.
        """
        if self._header is not None:
            raise RuntimeError("the PROXY header is already decoded; read .leftover")
        if self._error is not None:
            raise ProxyHeaderError(self._error)
        room = self._limit - len(self._buf)
        self._buf += data[:room]
        try:
            header = self._parse()
        except ProxyHeaderError as exc:
            self._error = str(exc)
            self._buf = bytearray()
            raise
        if header is None:
            # _parse raises instead of waiting once the buffer reaches its limit, so a
            # None means everything fitted and nothing was left out.
            assert len(data) <= room
            return None
        self._header = header
        self._leftover = bytes(self._buf[self._header_len :]) + data[room:]
        self._buf = bytearray()
        return header

    def _parse(self) -> ProxyHeader | None:
        if self._version == 0:
            self._detect()
        if self._version == 1:
            return self._parse_v1()
        if self._version == 2:
            return self._parse_v2()
        return None

    def _detect(self) -> None:
        """Pick the version once a full signature is in, or raise once neither can match."""
        buf = self._buf
        n = min(len(buf), len(V2_SIGNATURE))
        if buf[:n] == V2_SIGNATURE[:n]:
            if n == len(V2_SIGNATURE):
                self._version = 2
            return
        n = min(len(buf), len(V1_SIGNATURE))
        if buf[:n] == V1_SIGNATURE[:n]:
            if n == len(V1_SIGNATURE):
                self._version = 1
                self._limit = min(V1_MAX_LINE, self._max_size)
            return
        raise ProxyHeaderError(f"no PROXY protocol signature: starts with {bytes(buf[:16])!r}")

    def _parse_v1(self) -> ProxyHeader | None:
        buf = self._buf
        end = buf.find(b"\n", self._scan, self._limit)
        if end < 0:
            if len(buf) >= self._limit:
                raise ProxyHeaderError(f"v1: no CRLF within the first {self._limit} bytes")
            self._scan = len(buf)
            return None
        if buf[end - 1] != 0x0D:  # end >= 6: the signature holds no LF
            raise ProxyHeaderError("v1: line ends with a bare LF, not CRLF")
        self._header_len = end + 1
        return _parse_v1_line(bytes(buf[: end - 1]))

    def _parse_v2(self) -> ProxyHeader | None:
        buf = self._buf
        n = len(buf)
        if n < 13:
            return None
        version, command = buf[12] >> 4, buf[12] & 0x0F
        if version != 2:
            raise ProxyHeaderError(f"v2: unsupported version {version} (ver_cmd {buf[12]:#04x})")
        if command not in (_CMD_LOCAL, _CMD_PROXY):
            raise ProxyHeaderError(f"v2: unsupported command {command} (ver_cmd {buf[12]:#04x})")
        if n < 14:
            return None
        family = buf[13]
        # LOCAL ignores the family (spec 2.2), so only PROXY must name a known one.
        if command == _CMD_PROXY and family not in _V2_ADDRESS_SIZES:
            raise ProxyHeaderError(f"v2: unsupported address family/transport {family:#04x}")
        if n < _V2_FIXED:
            return None
        length = int.from_bytes(buf[14:16], "big")
        total = _V2_FIXED + length
        if total > self._max_size:
            raise ProxyHeaderError(
                f"v2: header of {total} bytes exceeds the {self._max_size}-byte limit"
            )
        if command == _CMD_PROXY and length < _V2_ADDRESS_SIZES[family]:
            raise ProxyHeaderError(
                f"v2: {length}-byte address block is too short for family {family:#04x}"
                f" (needs {_V2_ADDRESS_SIZES[family]})"
            )
        self._limit = total
        if n < total:
            return None
        self._header_len = total
        return _v2_header(command, family, bytes(buf[_V2_FIXED:total]))


def _parse_v1_line(line: bytes) -> ProxyHeader:
    """Parse ``PROXY <proto> <src> <dst> <sport> <dport>`` (CRLF already stripped)."""
    fields = line.split(b" ")
    proto = fields[1]
    if proto == b"UNKNOWN":
        return ProxyHeader(version=1, local=False, source=None, destination=None)
    if proto not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError(f"v1: unsupported protocol {proto!r}")
    if len(fields) != 6:
        raise ProxyHeaderError(f"v1: expected '{proto.decode()} SRC DST SPORT DPORT' in {line!r}")
    family = 4 if proto == b"TCP4" else 6
    return ProxyHeader(
        version=1,
        local=False,
        source=(_v1_address(fields[2], family), _v1_port(fields[4])),
        destination=(_v1_address(fields[3], family), _v1_port(fields[5])),
    )


def _v1_address(raw: bytes, family: int) -> str:
    # ipaddress accepts IPv6 scope ids ("fe80::1%eth0"), which the spec's grammar does not.
    if not raw.isascii() or b"%" in raw:
        raise ProxyHeaderError(f"v1: {raw!r} is not an IPv{family} address")
    try:
        addr: IPv4Address | IPv6Address = (
            IPv4Address(raw.decode()) if family == 4 else IPv6Address(raw.decode())
        )
    except ValueError:
        raise ProxyHeaderError(f"v1: {raw!r} is not an IPv{family} address") from None
    return _canonical(addr)


def _v1_port(raw: bytes) -> int:
    # bytes.isdigit() is ASCII-only: no sign, space or other Unicode digits get through.
    if not raw.isdigit() or len(raw) > 5 or (len(raw) > 1 and raw[0] == 0x30):
        raise ProxyHeaderError(f"v1: {raw!r} is not a port (0-65535, no leading zeros)")
    port = int(raw)
    if port > 65535:
        raise ProxyHeaderError(f"v1: port {port} is out of range")
    return port


def _v2_header(command: int, family: int, block: bytes) -> ProxyHeader:
    """Build the header from a complete v2 address block (TLVs included)."""
    if command == _CMD_LOCAL:
        # The block is discarded; its TLVs are checked when the family says where they start.
        size = _V2_ADDRESS_SIZES.get(family)
        if size is not None and len(block) >= size:
            _check_tlvs(block, size)
        return ProxyHeader(version=2, local=True, source=None, destination=None)
    _check_tlvs(block, _V2_ADDRESS_SIZES[family])
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None
    if family >> 4 == 0x1:
        source = (_canonical(IPv4Address(block[0:4])), int.from_bytes(block[8:10], "big"))
        destination = (_canonical(IPv4Address(block[4:8])), int.from_bytes(block[10:12], "big"))
    elif family >> 4 == 0x2:
        source = (_canonical(IPv6Address(block[0:16])), int.from_bytes(block[32:34], "big"))
        destination = (_canonical(IPv6Address(block[16:32])), int.from_bytes(block[34:36], "big"))
    return ProxyHeader(version=2, local=False, source=source, destination=destination)


def _check_tlvs(block: bytes, start: int) -> None:
    """Walk the type-length-value chain: every TLV must end inside the declared length."""
    pos, end = start, len(block)
    while pos < end:
        if end - pos < 3:
            raise ProxyHeaderError(f"v2: {end - pos} stray bytes where a TLV (3+ bytes) starts")
        kind, size = block[pos], int.from_bytes(block[pos + 1 : pos + 3], "big")
        pos += 3 + size
        if pos > end:
            raise ProxyHeaderError(
                f"v2: TLV type {kind:#04x} of {size} bytes overruns the header by {pos - end}"
            )


def _canonical(addr: IPv4Address | IPv6Address) -> str:
    """The ipaddress spelling, with IPv4-mapped IPv6 as ``::ffff:a.b.c.d`` (RFC 5952 §5).

    Python 3.13 prints mapped addresses that way; 3.11 and 3.12 print ``::ffff:c000:201``.
    Fixing the form keeps logs and firewall matches the same on every version.
    """
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        return f"::ffff:{addr.ipv4_mapped}"
    return str(addr)


def encode_v2(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A v2 PROXY header for a TCP connection from ``source`` to ``destination``.

    Both addresses travel in one family. If one is IPv4 and the other IPv6 (a dual-stack
    listener dialing an IPv4 backend, say), the IPv4 one is sent as IPv4-mapped IPv6
    (``::ffff:a.b.c.d``) so no information is lost. IPv6 scope ids are dropped: the
    format has no room for them and they mean nothing on the receiving host.

    Raises:
        ValueError: an address is not an IP address or a port is outside 0..65535.
    """
    src, sport, dst, dport = _endpoints(source, destination)
    family = _FAM_TCP4 if src.version == 4 else _FAM_TCP6
    block = src.packed + dst.packed + sport.to_bytes(2, "big") + dport.to_bytes(2, "big")
    ver_cmd = 0x20 | _CMD_PROXY
    return V2_SIGNATURE + bytes((ver_cmd, family)) + len(block).to_bytes(2, "big") + block


def encode_v2_local() -> bytes:
    """A v2 LOCAL header (no address): for health checks the proxy makes on its own behalf."""
    return V2_SIGNATURE + bytes((0x20 | _CMD_LOCAL, 0x00)) + b"\x00\x00"


def encode_v1(source: tuple[str, int] | None, destination: tuple[str, int] | None) -> bytes:
    """A v1 text header; ``None`` for both addresses gives ``PROXY UNKNOWN``.

    Mixed families and scope ids are handled as in :func:`encode_v2`.

    Raises:
        ValueError: only one address is None, an address is not an IP address or a
            port is outside 0..65535.
    """
    if source is None and destination is None:
        return b"PROXY UNKNOWN\r\n"
    if source is None or destination is None:
        raise ValueError("encode_v1 needs both addresses or neither")
    src, sport, dst, dport = _endpoints(source, destination)
    proto = "TCP4" if src.version == 4 else "TCP6"
    line = f"PROXY {proto} {_canonical(src)} {_canonical(dst)} {sport} {dport}\r\n"
    return line.encode("ascii")


def _endpoints(
    source: tuple[str, int], destination: tuple[str, int]
) -> tuple[IPv4Address | IPv6Address, int, IPv4Address | IPv6Address, int]:
    """Validate both endpoints and bring them into one address family."""
    src, sport = _endpoint(source, "source")
    dst, dport = _endpoint(destination, "destination")
    if src.version != dst.version:
        src, dst = _as_ipv6(src), _as_ipv6(dst)
    return src, sport, dst, dport


def _endpoint(endpoint: tuple[str, int], role: str) -> tuple[IPv4Address | IPv6Address, int]:
    host, port = endpoint
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{role} {host!r} is not an IP address") from None
    if isinstance(addr, IPv6Address) and addr.scope_id is not None:
        addr = IPv6Address(addr.packed)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"{role} port {port!r} is not in 0..65535")
    return addr, port


def _as_ipv6(addr: IPv4Address | IPv6Address) -> IPv6Address:
    if isinstance(addr, IPv6Address):
        return addr
    return IPv6Address(0xFFFF << 32 | int(addr))
