"""ClientHelloParser, fed bytes only: captured hellos, Python's own, and hand-built records."""

import itertools
import random
import ssl
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcproxy.worker.clienthello import (
    MAX_CLIENT_HELLO_BYTES,
    ClientHello,
    ClientHelloError,
    ClientHelloParser,
)

DATA = Path(__file__).parent / "data" / "clienthello"
TLS13, TLS12, TLS11, TLS10 = 0x0304, 0x0303, 0x0302, 0x0301


# --- building records by hand -------------------------------------------------------------


def u8(data: bytes) -> bytes:
    return bytes([len(data)]) + data


def u16(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def extension(ext_type: int, data: bytes) -> bytes:
    return ext_type.to_bytes(2, "big") + u16(data)


def sni_ext(*names: bytes, name_type: int = 0) -> bytes:
    return extension(0, u16(b"".join(bytes([name_type]) + u16(n) for n in names)))


def alpn_ext(*names: bytes) -> bytes:
    return extension(16, u16(b"".join(u8(n) for n in names)))


def versions_ext(*versions: int) -> bytes:
    return extension(43, u8(b"".join(v.to_bytes(2, "big") for v in versions)))


DEFAULT_EXTENSIONS = sni_ext(b"example.com") + alpn_ext(b"h2", b"http/1.1") + versions_ext(TLS13)


def hello_body(
    *,
    extensions: bytes | None = DEFAULT_EXTENSIONS,
    session_id: bytes = bytes(32),
    cipher_suites: bytes = b"\x13\x01\x13\x02\xc0\x2f",
    compression: bytes = b"\x00",
    legacy_version: int = TLS12,
    trailing: bytes = b"",
) -> bytes:
    """A ClientHello body; ``extensions=None`` omits the block, as TLS 1.2 allows."""
    body = legacy_version.to_bytes(2, "big") + bytes(range(32))
    body += u8(session_id) + u16(cipher_suites) + u8(compression)
    if extensions is not None:
        body += u16(extensions)
    return body + trailing


def handshake(body: bytes, msg_type: int = 1) -> bytes:
    return bytes([msg_type]) + len(body).to_bytes(3, "big") + body


def records(
    payload: bytes, sizes: Iterable[int] = (), content_type: int = 22, version: bytes = b"\x03\x01"
) -> bytes:
    """``payload`` in records of the given sizes, the rest in one last record."""
    out = bytearray()
    pos = 0
    for size in [*sizes, len(payload)]:
        chunk = payload[pos : pos + size]
        if not chunk:
            break
        out += bytes([content_type]) + version + u16(chunk)
        pos += len(chunk)
    return bytes(out)


def wire(body: bytes) -> bytes:
    return records(handshake(body))


def parse(data: bytes, max_size: int = MAX_CLIENT_HELLO_BYTES) -> ClientHello | None:
    return ClientHelloParser(max_size).feed(data)


def feed_chunks(parser: ClientHelloParser, chunks: Iterable[bytes]) -> ClientHello | None:
    """Feed every chunk, checking after each None that the parser stays within its bound."""
    result = None
    for chunk in chunks:
        result = parser.feed(chunk)
        if result is None:
            assert len(parser.consumed) <= parser.limit
    return result


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def python_hello(
    server_hostname: str | None, alpn: Sequence[str] = (), *, tls13: bool = True
) -> bytes:
    """The ClientHello Python's ssl module (OpenSSL) sends, via MemoryBIO."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if tls13:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    else:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    outgoing = ssl.MemoryBIO()
    tls = ctx.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


FIXTURES = {
    "openssl_s_client_tls13.bin": ClientHello(
        sni="www.Example.com",
        alpn=("h2", "http/1.1"),
        supported_versions=(TLS13, TLS12, TLS11, TLS10),
        legacy_version=TLS12,
    ),
    "openssl_s_client_tls12.bin": ClientHello(
        sni="api.example.net", alpn=("h2", "http/1.1"), supported_versions=(), legacy_version=TLS12
    ),
    "curl_http2.bin": ClientHello(
        sni="grpc.example.org",
        alpn=("h2", "http/1.1"),
        supported_versions=(TLS13, TLS12, TLS11, TLS10),
        legacy_version=TLS12,
    ),
}
CAPTURED = {name: (DATA / name).read_bytes() for name in FIXTURES}
CURL = CAPTURED["curl_http2.bin"]


# --- real ClientHellos --------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_captured_hello_parses_to_what_the_client_sent(name: str) -> None:
    parser = ClientHelloParser()
    assert parser.feed(CAPTURED[name]) == FIXTURES[name]
    assert parser.consumed == CAPTURED[name]


def test_python_tls13_hello_has_sni_alpn_and_tls13() -> None:
    hello = parse(python_hello("www.example.com", ["h2", "http/1.1"]))
    assert hello == ClientHello(
        sni="www.example.com",
        alpn=("h2", "http/1.1"),
        supported_versions=(TLS13,),
        legacy_version=TLS12,
    )


def test_python_tls12_only_hello_has_no_supported_versions() -> None:
    hello = parse(python_hello("legacy.example.com", ["http/1.1"], tls13=False))
    assert hello == ClientHello(
        sni="legacy.example.com", alpn=("http/1.1",), supported_versions=(), legacy_version=TLS12
    )


def test_python_hello_without_server_hostname_has_no_sni() -> None:
    hello = parse(python_hello(None))
    assert hello is not None
    assert hello.sni is None
    assert hello.alpn == ()


def test_mixed_case_sni_is_returned_as_sent() -> None:
    python = parse(python_hello("Mixed.Example.COM"))
    hand = parse(wire(hello_body(extensions=sni_ext(b"WWW.Example.Com"))))
    assert python is not None and python.sni == "Mixed.Example.COM"
    assert hand is not None and hand.sni == "WWW.Example.Com"


LABEL = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
    min_size=1,
    max_size=20,
)
TLD = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=2, max_size=6
)
HOSTNAME = st.builds(lambda labels, tld: ".".join([*labels, tld]), st.lists(LABEL, max_size=3), TLD)
ALPN_NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789/.-", min_size=1, max_size=12)


@settings(max_examples=25, deadline=None)
@given(
    host=HOSTNAME,
    alpn=st.lists(ALPN_NAME, max_size=4, unique=True),
    tls13=st.booleans(),
)
def test_python_hello_round_trips_any_sni_and_alpn(host: str, alpn: list[str], tls13: bool) -> None:
    hello = parse(python_hello(host, alpn, tls13=tls13))
    assert hello is not None
    assert (hello.sni, hello.alpn) == (host, tuple(alpn))
    assert (TLS13 in hello.supported_versions) is tls13


# --- splitting and fragmentation ----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_one_byte_feeds_give_the_same_hello_and_bytes(name: str) -> None:
    data = CAPTURED[name]
    parser = ClientHelloParser()
    results = [parser.feed(data[i : i + 1]) for i in range(len(data))]
    assert results[:-1] == [None] * (len(data) - 1)
    assert results[-1] == FIXTURES[name]
    assert parser.consumed == data


def test_random_splits_give_the_same_hello() -> None:
    rng = random.Random(1234)
    for _ in range(200):
        cuts = [rng.randrange(len(CURL) + 1) for _ in range(rng.randrange(1, 12))]
        parser = ClientHelloParser()
        assert feed_chunks(parser, split_at(CURL, cuts)) == FIXTURES["curl_http2.bin"]
        assert parser.consumed == CURL


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0), max_size=20))
def test_any_split_of_a_captured_hello_gives_the_same_hello(cuts: list[int]) -> None:
    parser = ClientHelloParser()
    assert feed_chunks(parser, split_at(CURL, cuts)) == FIXTURES["curl_http2.bin"]
    assert parser.consumed == CURL


@pytest.mark.parametrize(
    "sizes", [(1,), (3,), (4,), (5, 1, 1, 1), (100, 100), (1,) * 40, (7, 64, 2, 33)]
)
def test_hello_refragmented_across_records_gives_the_same_hello(sizes: tuple[int, ...]) -> None:
    message = CURL[5:]  # the handshake message, without its one record header
    data = records(message, sizes)
    assert len(data) == len(message) + 5 * (len(sizes) + 1)  # one record per size, plus the rest
    parser = ClientHelloParser()
    assert (
        feed_chunks(parser, [data[i : i + 1] for i in range(len(data))])
        == FIXTURES["curl_http2.bin"]
    )
    assert parser.consumed == data


def test_every_handshake_byte_in_its_own_record_is_accepted() -> None:
    message = handshake(hello_body())
    data = records(message, [1] * len(message))
    assert len(data) == 6 * len(message)
    hello = parse(data)
    assert hello is not None and hello.sni == "example.com"


def test_large_post_quantum_sized_hello_spans_two_records() -> None:
    key_share = extension(51, u16(b"\x11\xec" + u16(bytes(1216)) + b"\x00\x1d" + u16(bytes(32))))
    padding = extension(21, bytes(15000))
    message = handshake(hello_body(extensions=DEFAULT_EXTENSIONS + key_share + padding))
    assert len(message) > 2**14
    data = records(message, [2**14])
    hello = parse(data)
    assert hello is not None and hello.alpn == ("h2", "http/1.1")


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_every_truncation_returns_none(name: str) -> None:
    data = CAPTURED[name]
    for end in range(len(data)):
        parser = ClientHelloParser()
        assert parser.feed(data[:end]) is None, end
        assert parser.consumed == data[:end]


def test_empty_feed_is_a_no_op() -> None:
    parser = ClientHelloParser()
    assert parser.feed(b"") is None
    assert parser.feed(CURL[:10]) is None
    assert parser.feed(b"") is None
    assert parser.feed(CURL[10:]) == FIXTURES["curl_http2.bin"]


# --- after the hello ----------------------------------------------------------------------


def test_bytes_after_the_hello_in_the_same_feed_are_kept_not_parsed() -> None:
    ccs = records(b"\x01", content_type=20, version=b"\x03\x03")
    early = records(b"early data", content_type=23, version=b"\x03\x03") + b"\xff\xff"
    parser = ClientHelloParser()
    assert parser.feed(CURL + ccs + early) == FIXTURES["curl_http2.bin"]
    assert parser.consumed == CURL + ccs + early


def test_feed_after_completion_returns_the_same_hello_and_keeps_the_bytes() -> None:
    parser = ClientHelloParser()
    first = parser.feed(CURL)
    again = parser.feed(b"more")
    assert first is not None and again is first
    assert parser.feed(b"") is first
    assert parser.consumed == CURL + b"more"


# --- size bounds --------------------------------------------------------------------------


def test_default_bound_is_max_size_plus_two_record_headers() -> None:
    assert MAX_CLIENT_HELLO_BYTES > 2**14
    assert ClientHelloParser().limit == MAX_CLIENT_HELLO_BYTES + 4 + 2 * 5
    assert ClientHelloParser(100).limit == 100 + 4 + 5


def test_oversize_declared_length_raises_before_the_bytes_arrive() -> None:
    header = b"\x16\x03\x01\x40\x00" + b"\x01" + (MAX_CLIENT_HELLO_BYTES + 1).to_bytes(3, "big")
    parser = ClientHelloParser()
    assert parser.feed(header[:-1]) is None
    with pytest.raises(ClientHelloError, match="declares"):
        parser.feed(header[-1:])
    assert parser.consumed == header


def test_declared_length_equal_to_max_size_is_accepted() -> None:
    message = handshake(hello_body())
    body_size = len(message) - 4
    assert parse(records(message), max_size=body_size) is not None
    with pytest.raises(ClientHelloError, match="declares"):
        parse(records(message[:4]), max_size=body_size - 1)


def test_hello_whose_record_headers_exceed_the_bound_is_refused_however_fed() -> None:
    message = handshake(hello_body())
    max_size = len(message)  # room for the body, not for 1-byte records
    data = records(message, [1] * len(message))
    with pytest.raises(ClientHelloError, match="bound"):
        parse(data, max_size=max_size)
    parser = ClientHelloParser(max_size)
    with pytest.raises(ClientHelloError, match="bound"):
        feed_chunks(parser, [data[i : i + 1] for i in range(len(data))])
    assert len(parser.consumed) == parser.limit + 1


def test_max_size_out_of_range_is_a_value_error() -> None:
    for bad in (0, -1, 2**24):
        with pytest.raises(ValueError, match="max_size"):
            ClientHelloParser(bad)


# --- what the extensions may hold ---------------------------------------------------------


def test_hello_without_extensions_block_has_nothing_optional() -> None:
    assert parse(wire(hello_body(extensions=None))) == ClientHello(
        sni=None, alpn=(), supported_versions=(), legacy_version=TLS12
    )


def test_other_server_name_types_are_skipped() -> None:
    names = b"\x05" + u16(b"opaque") + b"\x00" + u16(b"host.example")
    hello = parse(wire(hello_body(extensions=extension(0, u16(names)))))
    assert hello is not None and hello.sni == "host.example"


def test_grease_versions_are_kept_and_alpn_octets_survive() -> None:
    exts = versions_ext(0x5A5A, TLS13, TLS12) + alpn_ext(b"\xff\x00x")
    hello = parse(wire(hello_body(extensions=exts)))
    assert hello is not None
    assert hello.supported_versions == (0x5A5A, TLS13, TLS12)
    assert hello.alpn[0].encode("latin-1") == b"\xff\x00x"


# --- malformed input ----------------------------------------------------------------------

GOOD = wire(hello_body())
EXT_OVERRUN = extension(0xFF01, b"\x00")[:-1]  # header says 1 byte, nothing follows

MALFORMED: dict[str, tuple[bytes, str]] = {
    "sslv2_hello": (b"\x80\x2e\x01\x03\x01\x00\x15\x00\x00\x00\x10" + bytes(37), "SSLv2"),
    "plaintext_http": (b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n", "content type 71"),
    "application_data_first": (records(b"x", content_type=23) + GOOD, "content type 23"),
    "change_cipher_spec_first": (records(b"\x01", content_type=20) + GOOD, "content type 20"),
    "alert_first": (records(b"\x02\x28", content_type=21) + GOOD, "content type 21"),
    "record_interleaved": (
        records(GOOD[5:15]) + records(b"\x01", content_type=20) + records(GOOD[15:]),
        "content type 20",
    ),
    "record_major_version_2": (b"\x16\x02\x00" + GOOD[3:], "major version 2"),
    "empty_record": (b"\x16\x03\x01\x00\x00" + GOOD, "record length 0"),
    "empty_record_mid_hello": (
        records(GOOD[5:20]) + b"\x16\x03\x01\x00\x00" + records(GOOD[20:]),
        "record length 0",
    ),
    "record_over_2_14": (b"\x16\x03\x01\x40\x01" + b"\x01\x00\x40\x00", "record length 16385"),
    "server_hello": (records(handshake(hello_body(), msg_type=2)), "type 2"),
    "record_continues_past_hello": (records(handshake(hello_body()) + b"\x00"), "record boundary"),
    "second_message_in_hello_record": (
        records(handshake(hello_body()) + handshake(b"", msg_type=20)),
        "record boundary",
    ),
    "body_too_short_for_random": (wire(b"\x03\x03" + bytes(20)), "random"),
    "empty_body": (wire(b""), "truncated"),
    "session_id_33": (wire(hello_body(session_id=bytes(33))), "legacy_session_id is 33"),
    "session_id_overruns_body": (wire(b"\x03\x03" + bytes(32) + b"\x20" + bytes(4)), "overruns"),
    "odd_cipher_suites": (wire(hello_body(cipher_suites=b"\x13\x01\x00")), "cipher_suites"),
    "no_cipher_suites": (wire(hello_body(cipher_suites=b"")), "cipher_suites"),
    "no_compression_methods": (wire(hello_body(compression=b"")), "compression_methods"),
    "extensions_length_truncated": (
        wire(hello_body(extensions=None, trailing=b"\x00")),
        "truncated",
    ),
    "extensions_block_overruns": (
        wire(hello_body(extensions=None, trailing=b"\x00\x10" + sni_ext(b"a.example")[:10])),
        "extensions length",
    ),
    "extension_overruns": (
        wire(hello_body(extensions=DEFAULT_EXTENSIONS + EXT_OVERRUN)),
        "overruns",
    ),
    "extension_header_truncated": (
        wire(hello_body(extensions=DEFAULT_EXTENSIONS + b"\x00")),
        "extension header",
    ),
    "trailing_garbage_in_body": (wire(hello_body(trailing=b"\x00\x00\x00")), "trailing"),
    "duplicate_extension": (
        wire(hello_body(extensions=DEFAULT_EXTENSIONS + extension(0xFF01, b"\x00") * 2)),
        "twice",
    ),
    "duplicate_server_name_extension": (
        wire(hello_body(extensions=sni_ext(b"a.example") + sni_ext(b"a.example"))),
        "twice",
    ),
    "sni_non_ascii": (wire(hello_body(extensions=sni_ext("bü.example".encode()))), "ASCII"),
    "sni_control_byte": (wire(hello_body(extensions=sni_ext(b"a.example\x00.evil"))), "ASCII"),
    "sni_empty_host_name": (wire(hello_body(extensions=sni_ext(b""))), "host_name is empty"),
    "sni_two_host_names": (
        wire(hello_body(extensions=sni_ext(b"a.example", b"b.example"))),
        "more than one",
    ),
    "sni_empty_list": (wire(hello_body(extensions=extension(0, u16(b"")))), "server_name list"),
    "sni_empty_extension": (wire(hello_body(extensions=extension(0, b""))), "server_name list"),
    "sni_list_shorter_than_extension": (
        wire(hello_body(extensions=extension(0, u16(b"\x00" + u16(b"a.example")) + b"\x00"))),
        "server_name list",
    ),
    "sni_entry_overruns_list": (
        wire(hello_body(extensions=extension(0, u16(b"\x00\x00\x20a.example")))),
        "server_name entry",
    ),
    "alpn_empty_name": (wire(hello_body(extensions=alpn_ext(b"h2", b""))), "name is empty"),
    "alpn_empty_list": (wire(hello_body(extensions=extension(16, u16(b"")))), "ALPN list"),
    "alpn_list_shorter_than_extension": (
        wire(hello_body(extensions=extension(16, u16(u8(b"h2")) + b"\x00"))),
        "ALPN list",
    ),
    "alpn_name_overruns_list": (
        wire(hello_body(extensions=extension(16, u16(b"\x05h2")))),
        "ALPN protocol name length",
    ),
    "supported_versions_odd": (
        wire(hello_body(extensions=extension(43, b"\x03\x03\x04\x03"))),
        "supported_versions length 3",
    ),
    "supported_versions_empty": (
        wire(hello_body(extensions=extension(43, b"\x00"))),
        "supported_versions length 0",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_input_raises_with_its_reason(case: str) -> None:
    data, reason = MALFORMED[case]
    with pytest.raises(ClientHelloError, match=reason):
        parse(data)


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_input_raises_when_fed_one_byte_at_a_time(case: str) -> None:
    data, reason = MALFORMED[case]
    parser = ClientHelloParser()
    with pytest.raises(ClientHelloError, match=reason):
        feed_chunks(parser, [data[i : i + 1] for i in range(len(data))])


def test_first_byte_of_a_non_tls_stream_is_enough_to_refuse() -> None:
    for first in (b"G", b"\x80", b"\x17", b"\x00"):
        with pytest.raises(ClientHelloError):
            ClientHelloParser().feed(first)
    with pytest.raises(ClientHelloError, match="major version"):
        ClientHelloParser().feed(b"\x16\x02")


def test_parser_keeps_failing_after_an_error() -> None:
    parser = ClientHelloParser()
    with pytest.raises(ClientHelloError):
        parser.feed(b"GET /")
    with pytest.raises(ClientHelloError, match="failed earlier"):
        parser.feed(CURL)


# --- properties ---------------------------------------------------------------------------


def outcome(parser: ClientHelloParser, chunks: Iterable[bytes]) -> ClientHello | str | None:
    """Feed until done; the hello, None, or "error". Any other exception fails the test."""
    for chunk in chunks:
        try:
            result = parser.feed(chunk)
        except ClientHelloError:
            return "error"
        assert result is None or isinstance(result, ClientHello)
        if result is None:
            assert len(parser.consumed) <= parser.limit
        else:
            return result
    return None


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_arbitrary_bytes_never_escape_the_contract(data: bytes, cuts: list[int]) -> None:
    outcome(ClientHelloParser(), split_at(data, cuts))


@FAST
@given(
    max_size=st.integers(min_value=1, max_value=300),
    sizes=st.lists(st.integers(min_value=1, max_value=40), max_size=30),
    tail=st.binary(max_size=400),
    cuts=st.lists(st.integers(min_value=0), max_size=8),
)
def test_plausible_prefixes_stay_within_a_small_bound(
    max_size: int, sizes: list[int], tail: bytes, cuts: list[int]
) -> None:
    """Valid record and handshake headers make the parser buffer; the bound must still hold."""
    data = records(b"\x01" + max_size.to_bytes(3, "big") + tail, sizes)
    whole = outcome(ClientHelloParser(max_size), [data])
    assert outcome(ClientHelloParser(max_size), split_at(data, cuts)) == whole


MUTATION = st.one_of(
    st.tuples(st.just("set"), st.integers(min_value=0), st.integers(min_value=0, max_value=255)),
    st.tuples(st.just("delete"), st.integers(min_value=0), st.integers(min_value=1, max_value=8)),
    st.tuples(st.just("insert"), st.integers(min_value=0), st.binary(min_size=1, max_size=8)),
)


def mutate(data: bytes, mutations: list[tuple[str, int, int | bytes]]) -> bytes:
    out = bytearray(data)
    for op, where, arg in mutations:
        at = where % (len(out) + 1)
        if op == "set" and at < len(out) and isinstance(arg, int):
            out[at] = arg
        elif op == "delete" and isinstance(arg, int):
            del out[at : at + arg]
        elif op == "insert" and isinstance(arg, bytes):
            out[at:at] = arg
    return bytes(out)


@FAST
@given(
    name=st.sampled_from(sorted(FIXTURES)),
    mutations=st.lists(MUTATION, min_size=1, max_size=4),
    cuts=st.lists(st.integers(min_value=0), max_size=8),
)
def test_mutated_real_hellos_never_escape_the_contract(
    name: str, mutations: list[tuple[str, int, int | bytes]], cuts: list[int]
) -> None:
    data = mutate(CAPTURED[name], mutations)
    whole = outcome(ClientHelloParser(), [data])
    split = outcome(ClientHelloParser(), split_at(data, cuts))
    assert split == whole  # the same bytes give the same answer however they arrive
    if isinstance(whole, ClientHello):
        parser = ClientHelloParser()
        parser.feed(data)
        assert parser.consumed == data
