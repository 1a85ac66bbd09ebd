"""PROXY protocol codec: the spec's examples, every rejection, round trips and fuzzing.

Headers are built by hand from proxy-protocol.txt where a test is about the wire
format, and with the encoders where it is about the round trip.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcproxy.worker.proxy_protocol import (
    MAX_HEADER_BYTES,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderDecoder,
    ProxyHeaderError,
    encode_v1,
    encode_v2,
    encode_v2_local,
)

# The first bytes of a TLS 1.2/1.3 ClientHello: what follows the header in practice.
CLIENT_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32))


def v2(ver_cmd: int, family: int, block: bytes, length: int | None = None) -> bytes:
    """A v2 header with the given fields; ``length`` overrides the true block length."""
    size = len(block) if length is None else length
    return V2_SIGNATURE + bytes((ver_cmd, family)) + struct.pack("!H", size) + block


def tlv(kind: int, value: bytes) -> bytes:
    return bytes((kind,)) + struct.pack("!H", len(value)) + value


def inet4(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        ipaddress.IPv4Address(src).packed
        + ipaddress.IPv4Address(dst).packed
        + struct.pack("!HH", sport, dport)
    )


def inet6(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + struct.pack("!HH", sport, dport)
    )


def decode(data: bytes, max_size: int = MAX_HEADER_BYTES) -> tuple[ProxyHeader, bytes]:
    """Decode ``data`` in one feed, expecting a complete header."""
    decoder = ProxyHeaderDecoder(max_size)
    header = decoder.feed(data)
    assert header is not None
    return header, decoder.leftover


def decode_bytewise(data: bytes) -> tuple[ProxyHeader, bytes]:
    """Decode one byte per feed; the rest of ``data`` after the header is the leftover."""
    decoder = ProxyHeaderDecoder()
    for i in range(len(data)):
        header = decoder.feed(data[i : i + 1])
        if header is not None:
            return header, decoder.leftover + data[i + 1 :]
    raise AssertionError("no header in the data")


Outcome = tuple[str, ProxyHeader | None, bytes]


def decode_chunks(data: bytes, cuts: list[int], max_size: int = MAX_HEADER_BYTES) -> Outcome:
    """Feed ``data`` split at ``cuts``; check the buffer bound after every feed.

    Returns ("header", header, everything after it), ("error", None, b"") or
    ("more", None, b"").
    """
    decoder = ProxyHeaderDecoder(max_size)
    bounds = sorted({c for c in cuts if 0 < c < len(data)})
    pieces = [data[a:b] for a, b in zip([0, *bounds], [*bounds, len(data)], strict=True)]
    for i, piece in enumerate(pieces):
        try:
            header = decoder.feed(piece)
        except ProxyHeaderError:
            assert decoder.buffered == 0
            return ("error", None, b"")
        assert decoder.buffered <= max_size
        if header is not None:
            assert isinstance(header, ProxyHeader)
            return ("header", header, decoder.leftover + b"".join(pieces[i + 1 :]))
    return ("more", None, b"")


# --- v1: the spec's examples -------------------------------------------------------------


def test_v1_tcp4_line_from_the_spec() -> None:
    request = b"GET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n"
    header, rest = decode(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n" + request)
    assert header == ProxyHeader(1, False, ("192.168.0.1", 56324), ("192.168.0.11", 443))
    assert rest == request


def test_v1_tcp6_longest_line_from_the_spec() -> None:
    full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = f"PROXY TCP6 {full} {full} 65535 65535\r\n".encode()
    assert len(line) == 104  # the spec's maximum for TCP/IPv6
    header, rest = decode(line)
    assert header == ProxyHeader(1, False, (full, 65535), (full, 65535))
    assert rest == b""


def test_v1_tcp6_addresses_come_back_canonical() -> None:
    line = b"PROXY TCP6 2001:DB8:0:0:0::1 0:0::0 0 443\r\n"
    header, _ = decode(line)
    assert header.source == ("2001:db8::1", 0)
    assert header.destination == ("::", 443)


def test_v1_ipv4_mapped_ipv6_is_spelled_dotted() -> None:
    header, _ = decode(b"PROXY TCP6 ::FFFF:c000:0201 ::1 1 2\r\n")
    assert header.source == ("::ffff:192.0.2.1", 1)


def test_v1_unknown_short_form() -> None:
    header, rest = decode(b"PROXY UNKNOWN\r\n" + CLIENT_HELLO)
    assert header == ProxyHeader(1, False, None, None)
    assert rest == CLIENT_HELLO


def test_v1_unknown_ignores_the_rest_of_a_107_byte_line() -> None:
    full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = f"PROXY UNKNOWN {full} {full} 65535 65535\r\n".encode()
    assert len(line) == 107  # the spec's worst case
    header, rest = decode(line + CLIENT_HELLO)
    assert header == ProxyHeader(1, False, None, None)
    assert rest == CLIENT_HELLO


def test_v1_unknown_with_garbage_after_it_is_ignored() -> None:
    header, _ = decode(b"PROXY UNKNOWN not even \xff addresses\r\n")
    assert header.source is None


def test_v1_header_split_across_reads() -> None:
    d = ProxyHeaderDecoder()
    assert d.feed(b"PROXY TCP4 192.0.2.1 198.51.100.2 ") is None
    header = d.feed(b"5000 443\r\n\x16\x03")
    assert header is not None
    assert header.source == ("192.0.2.1", 5000)
    assert header.destination == ("198.51.100.2", 443)
    assert d.leftover == b"\x16\x03"


def test_v1_byte_at_a_time_gives_the_same_result() -> None:
    data = b"PROXY TCP4 192.0.2.1 198.51.100.2 5000 443\r\n" + CLIENT_HELLO
    assert decode_bytewise(data) == decode(data)


def test_v1_leftover_includes_bytes_buffered_past_the_line() -> None:
    # The shortest header (15 bytes) arrives with 600 more: part is buffered, part is not.
    tail = bytes(range(256)) * 3
    header, rest = decode(b"PROXY UNKNOWN\r\n" + tail)
    assert header.source is None
    assert rest == tail


# --- v2: the spec's families -------------------------------------------------------------


def test_v2_tcp4() -> None:
    data = v2(0x21, 0x11, inet4("192.0.2.1", "198.51.100.2", 5000, 443))
    assert len(data) == 28
    header, rest = decode(data + CLIENT_HELLO)
    assert header == ProxyHeader(2, False, ("192.0.2.1", 5000), ("198.51.100.2", 443))
    assert rest == CLIENT_HELLO


def test_v2_tcp6() -> None:
    data = v2(0x21, 0x21, inet6("2001:db8::1", "2001:db8:0:0:1::", 65535, 0))
    header, rest = decode(data + CLIENT_HELLO)
    assert header == ProxyHeader(2, False, ("2001:db8::1", 65535), ("2001:db8:0:0:1::", 0))
    assert rest == CLIENT_HELLO


def test_v2_ipv4_mapped_ipv6_is_spelled_dotted() -> None:
    data = v2(0x21, 0x21, inet6("::ffff:192.0.2.1", "::1", 1, 2))
    header, _ = decode(data)
    assert header.source == ("::ffff:192.0.2.1", 1)


def test_v2_udp4_and_udp6_still_carry_addresses() -> None:
    h4, _ = decode(v2(0x21, 0x12, inet4("192.0.2.1", "192.0.2.2", 53, 53)))
    h6, _ = decode(v2(0x21, 0x22, inet6("::1", "::2", 53, 53)))
    assert h4.source == ("192.0.2.1", 53)
    assert h6.destination == ("::2", 53)


def test_v2_local_health_check() -> None:
    header, rest = decode(b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00" + CLIENT_HELLO)
    assert header == ProxyHeader(2, True, None, None)
    assert rest == CLIENT_HELLO


def test_v2_local_discards_an_address_block_and_its_tlvs() -> None:
    block = inet4("192.0.2.1", "192.0.2.2", 1, 2) + tlv(0x04, b"\x00" * 4)
    header, rest = decode(v2(0x20, 0x11, block) + b"x")
    assert header == ProxyHeader(2, True, None, None)
    assert rest == b"x"


def test_v2_local_ignores_the_family_byte() -> None:
    # Spec 2.2: with LOCAL "the family ... is ignored", even one PROXY would refuse.
    header, _ = decode(v2(0x20, 0xFF, b"opaque"))
    assert header.local


def test_v2_proxy_unspec_has_no_address() -> None:
    header, rest = decode(v2(0x21, 0x00, b"") + CLIENT_HELLO)
    assert header == ProxyHeader(2, False, None, None)
    assert rest == CLIENT_HELLO


def test_v2_unspec_with_tlvs() -> None:
    header, _ = decode(v2(0x21, 0x00, tlv(0x05, b"unique-id")))
    assert header == ProxyHeader(2, False, None, None)


@pytest.mark.parametrize("family", [0x31, 0x32], ids=["stream", "dgram"])
def test_v2_unix_has_no_address(family: int) -> None:
    paths = b"/run/src.sock".ljust(108, b"\x00") + b"/run/dst.sock".ljust(108, b"\x00")
    header, rest = decode(v2(0x21, family, paths) + CLIENT_HELLO)
    assert header == ProxyHeader(2, False, None, None)
    assert rest == CLIENT_HELLO


def test_v2_unix_with_tlvs() -> None:
    header, _ = decode(v2(0x21, 0x31, bytes(216) + tlv(0x01, b"h2")))
    assert header.source is None


def test_v2_tlvs_are_skipped() -> None:
    tlvs = (
        tlv(0x01, b"h2")  # ALPN
        + tlv(0x02, b"example.com")  # authority
        + tlv(0x04, b"")  # NOOP, empty
        + tlv(0x20, b"\x07\x00\x00\x00\x00" + tlv(0x21, b"TLSv1.3"))  # SSL with a sub-TLV
        + tlv(0xEA, b"\x01vpce-0123456789abcdef")  # AWS VPC endpoint id
    )
    data = v2(0x21, 0x11, inet4("192.0.2.1", "198.51.100.2", 5000, 443) + tlvs)
    header, rest = decode(data + CLIENT_HELLO)
    assert header.source == ("192.0.2.1", 5000)
    assert rest == CLIENT_HELLO


def test_v2_extra_address_bytes_are_allowed_when_they_form_tlvs() -> None:
    header, _ = decode(v2(0x21, 0x21, inet6("::1", "::2", 1, 2) + tlv(0x04, bytes(100))))
    assert header.source == ("::1", 1)


def test_v2_header_at_exactly_max_size() -> None:
    block = inet4("192.0.2.1", "192.0.2.2", 1, 2)
    block += tlv(0x04, bytes(MAX_HEADER_BYTES - 16 - len(block) - 3))
    data = v2(0x21, 0x11, block)
    assert len(data) == MAX_HEADER_BYTES
    header, rest = decode_bytewise(data + b"tail")
    assert header.source == ("192.0.2.1", 1)
    assert rest == b"tail"


def test_v2_byte_at_a_time_gives_the_same_result() -> None:
    data = v2(0x21, 0x21, inet6("2001:db8::1", "::2", 1, 2) + tlv(0x01, b"h2")) + CLIENT_HELLO
    assert decode_bytewise(data) == decode(data)


def test_large_feed_leftover_is_kept_exactly_and_not_buffered() -> None:
    tail = CLIENT_HELLO + bytes(range(256)) * 64  # 16 KiB+ in the same read
    decoder = ProxyHeaderDecoder()
    header = decoder.feed(encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2)) + tail)
    assert header is not None
    assert decoder.leftover == tail
    assert decoder.buffered == 0


# --- decoder contract --------------------------------------------------------------------


def test_leftover_is_empty_until_a_header_is_decoded() -> None:
    decoder = ProxyHeaderDecoder()
    assert decoder.feed(b"PROXY TCP4 ") is None
    assert decoder.leftover == b""


def test_empty_feed_needs_more() -> None:
    decoder = ProxyHeaderDecoder()
    assert decoder.feed(b"") is None
    assert decoder.feed(b"PROXY UNKNOWN\r\n") is not None


def test_incomplete_headers_need_more_data() -> None:
    for data in (
        b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r",
        V2_SIGNATURE[:11],
        v2(0x21, 0x11, inet4("192.0.2.1", "192.0.2.2", 1, 2))[:-1],
    ):
        assert ProxyHeaderDecoder().feed(data) is None


def test_feed_after_a_header_is_a_caller_error() -> None:
    decoder = ProxyHeaderDecoder()
    assert decoder.feed(encode_v2_local()) is not None
    with pytest.raises(RuntimeError):
        decoder.feed(b"\x16")


def test_an_error_is_sticky() -> None:
    decoder = ProxyHeaderDecoder()
    with pytest.raises(ProxyHeaderError):
        decoder.feed(b"\x16\x03\x01")
    with pytest.raises(ProxyHeaderError, match="no PROXY protocol signature"):
        decoder.feed(b"PROXY UNKNOWN\r\n")


def test_max_size_below_the_v2_fixed_header_is_refused() -> None:
    with pytest.raises(ValueError):
        ProxyHeaderDecoder(max_size=15)


# --- rejections --------------------------------------------------------------------------


def rejected_at(data: bytes, max_size: int = MAX_HEADER_BYTES) -> tuple[int, str]:
    """Feed ``data`` a byte at a time; return how many bytes it took to fail, and why."""
    decoder = ProxyHeaderDecoder(max_size)
    for i in range(len(data)):
        try:
            assert decoder.feed(data[i : i + 1]) is None
        except ProxyHeaderError as exc:
            return i + 1, str(exc)
    raise AssertionError(f"{data!r} was not rejected")


@pytest.mark.parametrize(
    ("data", "at"),
    [
        (CLIENT_HELLO, 1),
        (b"GET / HTTP/1.1\r\n", 1),
        (b"proxy TCP4", 1),
        (b"PROXY\tTCP4", 6),
        (b"PROXYX", 6),
        (b"\r\n\r\n\x00\r\nQUIX\n\x21\x11", 11),
        (b"\r\n\r\n\x00\r\nQUIT\r\x21\x11", 12),
        (b"\r\n\r\nPROXY", 5),
    ],
    ids=["tls", "http", "lowercase", "tab", "v1-6th-byte", "v2-11th-byte", "v2-12th", "mixed"],
)
def test_bad_signature_is_refused_as_soon_as_it_cannot_match(data: bytes, at: int) -> None:
    failed_at, why = rejected_at(data)
    assert failed_at == at
    assert "signature" in why


def test_tls_client_hello_is_refused_on_its_first_byte_in_one_feed() -> None:
    decoder = ProxyHeaderDecoder()
    with pytest.raises(ProxyHeaderError, match="signature"):
        decoder.feed(CLIENT_HELLO * 100)
    assert decoder.buffered == 0


@pytest.mark.parametrize("ver_cmd", [0x01, 0x11, 0x31, 0xF1])
def test_v2_bad_version(ver_cmd: int) -> None:
    at, why = rejected_at(v2(ver_cmd, 0x11, inet4("192.0.2.1", "192.0.2.2", 1, 2)))
    assert at == 13
    assert "version" in why


@pytest.mark.parametrize("ver_cmd", [0x22, 0x2F])
def test_v2_bad_command(ver_cmd: int) -> None:
    at, why = rejected_at(v2(ver_cmd, 0x11, inet4("192.0.2.1", "192.0.2.2", 1, 2)))
    assert at == 13
    assert "command" in why


@pytest.mark.parametrize("family", [0x01, 0x02, 0x10, 0x13, 0x20, 0x30, 0x41, 0xFF])
def test_v2_bad_family_with_proxy_command(family: int) -> None:
    at, why = rejected_at(v2(0x21, family, bytes(36)))
    assert at == 14
    assert "family" in why


@pytest.mark.parametrize(
    ("family", "length"), [(0x11, 11), (0x12, 0), (0x21, 12), (0x22, 35), (0x31, 215)]
)
def test_v2_address_block_too_short_for_the_family(family: int, length: int) -> None:
    at, why = rejected_at(v2(0x21, family, bytes(length)))
    assert at == 16  # known from the length field: no need to wait for the block
    assert "too short" in why


def test_v2_oversize_length_is_refused_before_reading_the_block() -> None:
    at, why = rejected_at(v2(0x21, 0x11, bytes(MAX_HEADER_BYTES - 16 + 1)))
    assert at == 16
    assert "exceeds" in why


def test_v2_length_limit_follows_max_size() -> None:
    data = v2(0x21, 0x11, inet4("192.0.2.1", "192.0.2.2", 1, 2) + tlv(0x04, bytes(20)))
    assert len(data) == 51
    assert rejected_at(data, max_size=50)[0] == 16
    header, _ = decode(data, max_size=51)
    assert header.source == ("192.0.2.1", 1)


def test_v2_maximum_length_field_is_refused() -> None:
    decoder = ProxyHeaderDecoder()
    with pytest.raises(ProxyHeaderError, match="65551 bytes exceeds"):
        decoder.feed(V2_SIGNATURE + b"\x21\x11\xff\xff" + bytes(65535))
    assert decoder.buffered == 0


@pytest.mark.parametrize(
    "tlvs",
    [
        tlv(0x01, b"h2")[:-1],  # value cut short
        b"\x01\x00\x05ab",  # length 5, 2 bytes present
        tlv(0x04, b"") + b"\x02\xff\xff",  # a valid TLV, then one claiming 65535 bytes
        b"\x01",  # a lone type byte
        b"\x01\x00",  # type and half a length
    ],
    ids=["value-cut", "short-value", "huge-second", "stray-1", "stray-2"],
)
@pytest.mark.parametrize("family", [0x00, 0x11, 0x21, 0x31])
def test_v2_tlv_overrunning_the_declared_length(tlvs: bytes, family: int) -> None:
    address = bytes({0x00: 0, 0x11: 12, 0x21: 36, 0x31: 216}[family])
    decoder = ProxyHeaderDecoder()
    # Bytes after the declared length (here a ClientHello) must not complete a TLV.
    with pytest.raises(ProxyHeaderError, match="TLV"):
        decoder.feed(v2(0x21, family, address + tlvs) + CLIENT_HELLO)


def test_v2_local_tlv_overrun_is_refused_too() -> None:
    with pytest.raises(ProxyHeaderError, match="TLV"):
        ProxyHeaderDecoder().feed(v2(0x20, 0x00, b"\x04\x00\x09short"))


def test_v1_without_crlf_in_107_bytes() -> None:
    line = b"PROXY UNKNOWN " + b"x" * 200
    decoder = ProxyHeaderDecoder()
    assert decoder.feed(line[:106]) is None  # 106 bytes could still end in CRLF
    with pytest.raises(ProxyHeaderError, match="no CRLF within the first 107 bytes"):
        decoder.feed(line[106:107])


def test_v1_line_of_108_bytes_is_refused_even_with_a_crlf() -> None:
    line = b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n"
    assert len(line) == 108
    with pytest.raises(ProxyHeaderError, match="107"):
        ProxyHeaderDecoder().feed(line)


def test_v1_line_limit_follows_a_smaller_max_size() -> None:
    assert rejected_at(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n", max_size=20)[0] == 20


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n",  # bare LF
        b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\r\n",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 \r\n",  # trailing space
        b"PROXY TCP4 192.0.2.1  192.0.2.2 1 2\r\n",  # double space
        b"PROXY TCP4 192.0.2.1\t192.0.2.2 1 2\r\n",
        b"PROXY  TCP4 192.0.2.1 192.0.2.2 1 2\r\n",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 1\r\n",  # field missing
        b"PROXY TCP4\r\n",
        b"PROXY \r\n",
        b"PROXY tcp4 192.0.2.1 192.0.2.2 1 2\r\n",
        b"PROXY UDP4 192.0.2.1 192.0.2.2 1 2\r\n",
        b"PROXY UNKNOWNX\r\n",
        b"PROXY TCP4 256.0.0.1 192.0.2.2 1 2\r\n",
        b"PROXY TCP4 192.0.2.01 192.0.2.2 1 2\r\n",  # leading zero in an octet
        b"PROXY TCP4 192.0.2 192.0.2.2 1 2\r\n",
        b"PROXY TCP4 ::1 192.0.2.2 1 2\r\n",  # IPv6 in TCP4
        b"PROXY TCP6 192.0.2.1 ::1 1 2\r\n",  # IPv4 in TCP6
        b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",  # scope id
        b"PROXY TCP6 ::1::2 ::1 1 2\r\n",
        b"PROXY TCP6 \xc3\xa9::1 ::1 1 2\r\n",  # non-ASCII
        b"PROXY TCP4 192.0.2.1 192.0.2.2 65536 2\r\n",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 0443 2\r\n",  # leading zero in a port
        b"PROXY TCP4 192.0.2.1 192.0.2.2 00 2\r\n",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 +1 2\r\n",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 -1 2\r\n",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 1 0x10\r\n",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 1 999999\r\n",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 1 \xd9\xa1\r\n",  # Arabic-Indic digit
    ],
)
def test_v1_malformed_line(line: bytes) -> None:
    with pytest.raises(ProxyHeaderError, match=r"^v1: "):
        ProxyHeaderDecoder().feed(line + CLIENT_HELLO)


@pytest.mark.parametrize("line", [b"PROXY UNKNOWN x\n", b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n"])
def test_v1_bare_lf_is_refused(line: bytes) -> None:
    with pytest.raises(ProxyHeaderError, match="bare LF"):
        ProxyHeaderDecoder().feed(line)


@pytest.mark.parametrize("stray", [b"\x01", b"\x01\x00", tlv(0x04, b"") + b"\x04\x00"])
def test_v2_stray_bytes_after_the_last_tlv(stray: bytes) -> None:
    with pytest.raises(ProxyHeaderError, match="stray bytes"):
        ProxyHeaderDecoder().feed(v2(0x21, 0x11, bytes(12) + stray))


def test_v1_port_bounds_are_accepted() -> None:
    header, _ = decode(b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n")
    assert header == ProxyHeader(1, False, ("0.0.0.0", 0), ("255.255.255.255", 65535))


# --- encoders ----------------------------------------------------------------------------


def test_encode_v2_matches_the_spec_layout() -> None:
    expected = v2(0x21, 0x11, inet4("192.0.2.1", "198.51.100.2", 5000, 443))
    assert encode_v2(("192.0.2.1", 5000), ("198.51.100.2", 443)) == expected


def test_encode_v2_local_is_the_sixteen_byte_local_header() -> None:
    assert encode_v2_local() == V2_SIGNATURE + b"\x20\x00\x00\x00"
    header, _ = decode(encode_v2_local())
    assert header == ProxyHeader(2, True, None, None)


def test_encode_v1_unknown() -> None:
    assert encode_v1(None, None) == b"PROXY UNKNOWN\r\n"


def test_encoders_map_mixed_families_to_ipv4_mapped_ipv6() -> None:
    for encode in (encode_v1, encode_v2):
        header, _ = decode(encode(("192.0.2.1", 1), ("2001:db8::1", 2)))
        assert header.source == ("::ffff:192.0.2.1", 1)
        assert header.destination == ("2001:db8::1", 2)
    assert encode_v2(("::1", 1), ("192.0.2.1", 2))[13] == 0x21


def test_encoders_drop_ipv6_scope_ids() -> None:
    for encode in (encode_v1, encode_v2):
        header, _ = decode(encode(("fe80::1%eth0", 1), ("fe80::2%7", 2)))
        assert header.source == ("fe80::1", 1)
        assert header.destination == ("fe80::2", 2)


@pytest.mark.parametrize(
    ("source", "destination"),
    [
        (("example.com", 1), ("192.0.2.1", 2)),
        (("192.0.2.1", 1), ("192.0.2.256", 2)),
        (("192.0.2.1", -1), ("192.0.2.2", 2)),
        (("192.0.2.1", 1), ("192.0.2.2", 65536)),
        (("192.0.2.1", True), ("192.0.2.2", 2)),
    ],
)
def test_encoders_refuse_bad_endpoints(
    source: tuple[str, int], destination: tuple[str, int]
) -> None:
    with pytest.raises(ValueError):
        encode_v2(source, destination)
    with pytest.raises(ValueError):
        encode_v1(source, destination)


def test_encode_v1_needs_both_addresses_or_neither() -> None:
    with pytest.raises(ValueError):
        encode_v1(("192.0.2.1", 1), None)


ports = st.integers(min_value=0, max_value=65535)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)


def canonical(ip: str) -> str:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return f"::ffff:{addr.ipv4_mapped}"
    return str(addr)


@given(src=ipv4, dst=ipv4, sport=ports, dport=ports, tail=st.binary(max_size=64))
def test_v1_and_v2_round_trip_ipv4(src: str, dst: str, sport: int, dport: int, tail: bytes) -> None:
    for version, encode in ((1, encode_v1), (2, encode_v2)):
        header, rest = decode(encode((src, sport), (dst, dport)) + tail)
        assert header == ProxyHeader(version, False, (src, sport), (dst, dport))
        assert rest == tail


@given(src=ipv6, dst=ipv6, sport=ports, dport=ports, tail=st.binary(max_size=64))
def test_v1_and_v2_round_trip_ipv6(src: str, dst: str, sport: int, dport: int, tail: bytes) -> None:
    for version, encode in ((1, encode_v1), (2, encode_v2)):
        data = encode((src, sport), (dst, dport)) + tail
        header, rest = decode(data)
        expected = ProxyHeader(version, False, (canonical(src), sport), (canonical(dst), dport))
        assert header == expected
        assert rest == tail
        assert decode_bytewise(data) == (expected, tail)


# --- fuzzing -----------------------------------------------------------------------------

cuts = st.lists(st.integers(min_value=0, max_value=700), max_size=12)


def check_outcome(data: bytes, split: list[int], max_size: int = MAX_HEADER_BYTES) -> Outcome:
    """Decode ``data`` split two ways; both must agree and respect the bound."""
    outcome = decode_chunks(data, split, max_size)
    assert decode_chunks(data, [], max_size) == outcome
    kind, header, rest = outcome
    if kind == "header":
        assert header is not None
        consumed = len(data) - len(rest)
        assert data.endswith(rest)
        assert consumed <= max_size
        # The header alone decodes the same, with nothing left over.
        assert decode_chunks(data[:consumed], [], max_size) == ("header", header, b"")
    return outcome


@settings(max_examples=300)
@given(data=st.binary(max_size=700), split=cuts)
def test_fuzz_arbitrary_bytes(data: bytes, split: list[int]) -> None:
    check_outcome(data, split)


@given(
    data=st.binary(max_size=200),
    split=cuts,
    prefix=st.sampled_from([b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", V2_SIGNATURE]),
    max_size=st.integers(min_value=16, max_value=600),
)
def test_fuzz_bytes_after_a_valid_signature(
    data: bytes, split: list[int], prefix: bytes, max_size: int
) -> None:
    check_outcome(prefix + data, split, max_size)


@st.composite
def valid_headers(draw: st.DrawFn) -> bytes:
    """Valid v1 and v2 headers of every kind, v2 with random TLVs."""
    src4, dst4 = draw(ipv4), draw(ipv4)
    src6, dst6 = draw(ipv6), draw(ipv6)
    sport, dport = draw(ports), draw(ports)
    tlvs = b"".join(
        tlv(kind, value)
        for kind, value in draw(
            st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4)
        )
    )
    return draw(
        st.sampled_from(
            [
                encode_v1((src4, sport), (dst4, dport)),
                encode_v1((src6, sport), (dst6, dport)),
                b"PROXY UNKNOWN\r\n",
                v2(0x21, 0x11, inet4(src4, dst4, sport, dport) + tlvs),
                v2(0x21, 0x22, inet6(src6, dst6, sport, dport) + tlvs),
                v2(0x21, 0x00, tlvs),
                v2(0x21, 0x31, bytes(216) + tlvs),
                v2(0x20, 0x00, tlvs),
            ]
        )
    )


mutations = st.lists(
    st.tuples(
        st.sampled_from(["set", "insert", "delete"]), st.integers(0, 600), st.integers(0, 255)
    ),
    min_size=1,
    max_size=4,
)


def mutate(data: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for op, where, value in edits:
        at = where % (len(buf) + 1)
        if op == "insert":
            buf.insert(at, value)
        elif buf and op == "set":
            buf[at % len(buf)] = value
        elif buf:
            del buf[at % len(buf)]
    return bytes(buf)


@given(header=valid_headers(), tail=st.binary(max_size=40), split=cuts)
def test_fuzz_valid_headers_decode_in_any_split(
    header: bytes, tail: bytes, split: list[int]
) -> None:
    kind, decoded, rest = check_outcome(header + tail, split)
    assert kind == "header"
    assert decoded is not None
    assert rest == tail


@settings(max_examples=300)
@given(header=valid_headers(), tail=st.binary(max_size=40), edits=mutations, split=cuts)
def test_fuzz_mutated_valid_headers(
    header: bytes, tail: bytes, edits: list[tuple[str, int, int]], split: list[int]
) -> None:
    check_outcome(mutate(header, edits) + tail, split)


@given(header=valid_headers(), keep=st.integers(min_value=0, max_value=600))
def test_fuzz_truncated_valid_headers_need_more(header: bytes, keep: int) -> None:
    truncated = header[: keep % len(header)]
    assert check_outcome(truncated, []) == ("more", None, b"")
