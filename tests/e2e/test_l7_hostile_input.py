"""End to end: hostile requests are refused before any backend sees them, and nobody else notices.

The real ``mc-proxy serve`` with 2 workers and three L7 routes sharing one h2c
backend: ``a.test`` (the attacker's), ``b.test`` (a good client's, which
downloads over one HTTP/2 connection all along) and ``c.test``, which has a
``require_header`` policy. Every hostile request carries a path of its own;
the backend records every header list it receives, so "never reached the
backend" is checked by path. After each case the good client must have
completed downloads and failed none. Loopback only; every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    PingFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from mcproxy.worker.l7.frames import GoAwayFilter
from tests.certs import CA, make_ca
from tests.e2e.h2backend import H2Backend
from tests.e2e.harness import (
    ProxyProcess,
    client_context,
    free_port,
    l7_route,
    pattern,
    wait_for,
)

ATTACK = "a.test"
COMPRESSION_ERROR = 0x9
GOOD = "b.test"
GUARDED = "c.test"
HEAD_TIMEOUT = 2.0
GOOD_SIZE = 1_000_000
ENHANCE_YOUR_CALM = 0xB


@dataclass
class Stack:
    port: int
    ca: CA
    backend: H2Backend
    proxy: ProxyProcess


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("hostile")
    ca = make_ca()
    backend = H2Backend()
    port = free_port()
    config = {
        "listeners": [
            {
                "addr": f"127.0.0.1:{port}",
                "routes": [
                    l7_route(directory, ca, ATTACK, backend.addr),
                    l7_route(directory, ca, GOOD, backend.addr),
                    l7_route(
                        directory,
                        ca,
                        GUARDED,
                        backend.addr,
                        l7_policies=[{"type": "require_header", "value": "X-API-Key"}],
                    ),
                ],
            }
        ],
        "proxy": {"handshake_timeout": f"{HEAD_TIMEOUT:g}s", "idle_timeout": "30s"},
    }
    try:
        with ProxyProcess(directory, config, workers=2) as proxy:
            yield Stack(port, ca, backend, proxy)
    finally:
        backend.close()


def _tls(stack: Stack, host: str, alpn: str, timeout: float = 10.0) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", stack.port), timeout=timeout)
    return client_context(stack.ca.pem, [alpn]).wrap_socket(raw, server_hostname=host)


def _reached(stack: Stack, path: str) -> bool:
    return any((b":path", path.encode()) in headers for headers in stack.backend.seen)


# --- the good client ---------------------------------------------------------------------


class H2Client:
    """A blocking HTTP/2 client; it acknowledges what it reads."""

    def __init__(self, stack: Stack, host: str) -> None:
        self.host = host
        self.tls = _tls(stack, host, "h2")
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=True, header_encoding=None, validate_outbound_headers=False
            )
        )
        self.conn.local_settings = h2.settings.Settings(
            client=True,
            initial_values={h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 1 << 20},
        )
        self.conn.initiate_connection()
        self.filter = GoAwayFilter(expect_preface=False)
        self.goaway_codes: list[int] = []
        self.closed = False
        self.flush()

    def flush(self) -> None:
        out = self.conn.data_to_send()
        if out and not self.closed:
            try:
                self.tls.sendall(out)
            except OSError:
                self.closed = True

    def send_raw(self, data: bytes) -> None:
        with contextlib.suppress(OSError):
            self.tls.sendall(data)

    def request(
        self,
        path: str,
        authority: str | None = None,
        extra: list[tuple[bytes, bytes]] | None = None,
        end: bool = True,
    ) -> int:
        sid = self.conn.get_next_available_stream_id()
        headers = [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":authority", (authority or self.host).encode()),
            (b":path", path.encode()),
            *(extra or []),
        ]
        self.conn.send_headers(sid, headers, end_stream=end)
        self.flush()
        return sid

    def events(self, timeout: float) -> list[h2.events.Event]:
        """What arrives within ``timeout`` (one read); ``closed`` on EOF."""
        if self.closed:
            return []
        self.tls.settimeout(timeout)
        try:
            data = self.tls.recv(65536)
        except (TimeoutError, ssl.SSLWantReadError):
            return []
        except OSError:
            data = b""
        if not data:
            self.closed = True
            return []
        data, goaways = self.filter.feed(data)
        self.goaway_codes += [g.error_code for g in goaways]
        try:
            events = self.conn.receive_data(data) if data else []
        except h2.exceptions.ProtocolError:
            self.closed = True
            return []
        for event in events:
            if isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
                with contextlib.suppress(h2.exceptions.StreamClosedError):
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
        self.flush()
        return events

    def response(self, sid: int, timeout: float = 10.0) -> tuple[int, bytes]:
        """(status, body) of stream ``sid``; status 0 if it was reset or the connection ended."""
        status, body = 0, b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.closed:
            for event in self.events(0.2):
                if getattr(event, "stream_id", None) != sid:
                    continue
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                elif isinstance(event, h2.events.StreamEnded):
                    return status, body
                elif isinstance(event, h2.events.StreamReset):
                    return 0, body
        return 0, body

    def wait_closed(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.closed and time.monotonic() < deadline:
            self.events(0.2)

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.tls.close()


class GoodClient:
    """Downloads ``/bytes/GOOD_SIZE`` again and again over one HTTP/2 connection, in a thread."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.completed = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        client = H2Client(self.stack, GOOD)
        try:
            while not self._stop.is_set():
                sid = client.request(f"/bytes/{GOOD_SIZE}")
                status, body = client.response(sid, timeout=20)
                if status != 200 or body != pattern(GOOD_SIZE):
                    self.failures.append(f"status {status}, {len(body)} bytes")
                    client.close()
                    client = H2Client(self.stack, GOOD)
                else:
                    self.completed += 1
        except Exception as exc:  # reported by the test
            self.failures.append(repr(exc))
        finally:
            client.close()

    def __enter__(self) -> GoodClient:
        self._thread.start()
        wait_for(lambda: self.completed >= 1 or self.failures, 20, "a first good download")
        return self

    def __exit__(self, *exc: object) -> None:
        before = self.completed
        wait_for(lambda: self.completed > before or self.failures, 20, "a good download after")
        self._stop.set()
        self._thread.join(30)
        assert not self.failures, self.failures
        assert self.completed >= 2


@pytest.fixture
def good(stack: Stack) -> Iterator[GoodClient]:
    with GoodClient(stack) as client:
        yield client


# --- HTTP/1.1 -------------------------------------------------------------------------------


def _h1_exchange(stack: Stack, raw: bytes, timeout: float = 10.0) -> bytes:
    """Send ``raw`` in one write; everything received until the proxy closes."""
    with _tls(stack, ATTACK, "http/1.1") as tls:
        tls.sendall(raw)
        received = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            tls.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = tls.recv(65536)
            except (TimeoutError, ssl.SSLError, OSError):
                break
            if not chunk:
                break
            received += chunk
    return received


def _refused(received: bytes, status: int) -> None:
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), received[:200]
    assert b"connection: close" in head.lower()
    assert body.startswith(b"%d " % status) and body.count(b"\n") == 1, body


@pytest.mark.parametrize(
    ("name", "fields"),
    [
        ("clte", b"content-length: 5\r\ntransfer-encoding: chunked\r\n"),
        ("tecl", b"transfer-encoding: chunked\r\ncontent-length: 5\r\n"),
        ("dupcl", b"content-length: 5\r\ncontent-length: 5\r\n"),
        ("badcl", b"content-length: 5, 6\r\n"),
        ("obsfold", b"x-a: 1\r\n folded\r\ncontent-length: 5\r\n"),
    ],
)
def test_malformed_http1_framing_is_refused(
    stack: Stack, good: GoodClient, name: str, fields: bytes
) -> None:
    path = f"/attack/{name}"
    raw = f"POST {path} HTTP/1.1\r\nhost: {ATTACK}\r\n".encode() + fields + b"\r\n0\r\n\r\n"
    _refused(_h1_exchange(stack, raw), 400)
    assert not _reached(stack, path)


def test_three_thousand_headers_in_one_write_get_431(stack: Stack, good: GoodClient) -> None:
    fields = b"".join(b"x-h%d: v\r\n" % i for i in range(3000))
    raw = f"GET /attack/many HTTP/1.1\r\nhost: {ATTACK}\r\n".encode() + fields + b"\r\n"
    _refused(_h1_exchange(stack, raw), 431)
    assert not _reached(stack, "/attack/many")


def test_a_100_kib_header_gets_431(stack: Stack, good: GoodClient) -> None:
    raw = f"GET /attack/big HTTP/1.1\r\nhost: {ATTACK}\r\nx-big: ".encode()
    raw += b"a" * (100 << 10) + b"\r\n\r\n"
    _refused(_h1_exchange(stack, raw), 431)
    assert not _reached(stack, "/attack/big")


def test_a_trickled_head_is_cut_with_408(stack: Stack, good: GoodClient) -> None:
    head = f"GET /attack/trickle HTTP/1.1\r\nhost: {ATTACK}\r\nx-pad: ".encode() + b"p" * 100
    received = b""
    started = time.monotonic()
    with _tls(stack, ATTACK, "http/1.1") as tls:
        for byte in head:
            try:
                tls.sendall(bytes([byte]))
            except OSError:
                break
            tls.settimeout(0.1)
            try:
                chunk = tls.recv(65536)
            except (TimeoutError, ssl.SSLWantReadError):
                continue
            except OSError:
                break
            if not chunk:
                break
            received += chunk
            if time.monotonic() - started > HEAD_TIMEOUT * 5:
                break
    elapsed = time.monotonic() - started
    _refused(received, 408)
    assert HEAD_TIMEOUT * 0.8 <= elapsed <= HEAD_TIMEOUT * 4, elapsed
    assert not _reached(stack, "/attack/trickle")


def test_forwarded_headers_cannot_be_spoofed_even_in_trailers(
    stack: Stack, good: GoodClient
) -> None:
    raw = (
        f"POST /attack/spoof HTTP/1.1\r\nhost: {ATTACK}\r\ntransfer-encoding: chunked\r\n"
        "x-forwarded-for: 6.6.6.6\r\nx-real-ip: 6.6.6.6\r\nforwarded: for=6.6.6.6\r\n"
        "x-forwarded-host: evil.test\r\nx-forwarded-port: 1\r\nx-forwarded-prefix: /admin\r\n"
        "x-forwarded-client-cert: Hash=00\r\nx-forwarded-proto: http\r\nconnection: close\r\n\r\n"
        "2\r\nhi\r\n0\r\nx-forwarded-for: 6.6.6.6\r\nx-real-ip: 6.6.6.6\r\n"
        "forwarded: for=6.6.6.6\r\nx-checksum: ok\r\n\r\n"
    ).encode()
    received = _h1_exchange(stack, raw)
    assert received.startswith(b"HTTP/1.1 200"), received[:200]
    (headers,) = [h for h in stack.backend.seen if (b":path", b"/attack/spoof") in h]
    fields = dict(headers)
    assert fields[b"x-forwarded-for"] == b"127.0.0.1"
    assert fields[b"x-real-ip"] == b"127.0.0.1"
    assert fields[b"x-forwarded-proto"] == b"https"
    names = [n for n, _ in headers]
    for name in (b"forwarded", b"x-forwarded-host", b"x-forwarded-port", b"x-forwarded-prefix"):
        assert name not in names
    assert names.count(b"x-forwarded-for") == 1
    for trailers in stack.backend.trailers_seen:
        assert not {n for n, _ in trailers} & {b"x-forwarded-for", b"x-real-ip", b"forwarded"}


# --- HTTP/2 ---------------------------------------------------------------------------------


def test_an_authority_naming_another_route_gets_421(stack: Stack, good: GoodClient) -> None:
    client = H2Client(stack, ATTACK)
    try:
        sid = client.request("/attack/misdirected", authority=GUARDED)
        assert client.response(sid)[0] == 421
        sid = client.request("/attack/misdirected-port", authority=f"{GUARDED.upper()}.:443")
        assert client.response(sid)[0] == 421
        # The connection's own name, with a port and a trailing dot, is fine.
        sid = client.request("/headers", authority=f"{ATTACK.upper()}.:{stack.port}")
        assert client.response(sid)[0] == 200
        # Host disagreeing with :authority is refused outright (h2 ends the connection).
        sid = client.request("/attack/two-hosts", extra=[(b"host", GUARDED.encode())])
        assert client.response(sid)[0] in (0, 400)
    finally:
        client.close()
    for path in ("/attack/misdirected", "/attack/misdirected-port", "/attack/two-hosts"):
        assert not _reached(stack, path)


def test_a_header_list_pushed_over_the_limit_by_our_additions_gets_431(
    stack: Stack, good: GoodClient
) -> None:
    client = H2Client(stack, ATTACK)
    try:
        # Under 64 KiB as sent; over it once X-Forwarded-For, X-Real-IP and -Proto are added.
        value = b"v" * (64 * 1024 - 32 * 5 - 100)
        sid = client.request("/attack/near-limit", extra=[(b"x-big", value)])
        assert client.response(sid)[0] == 431
        sid = client.request("/headers")  # the connection is still usable
        assert client.response(sid)[0] == 200
    finally:
        client.close()
    assert not _reached(stack, "/attack/near-limit")


def _window_update(increment: int) -> bytes:
    frame = WindowUpdateFrame(0)
    frame.window_increment = increment
    return frame.serialize()


def _cut_for(stack: Stack, client: H2Client, what: str) -> None:
    """The proxy ended the connection for abuse. The GOAWAY may be lost: a proxy that
    closes a socket with the flood still unread sends a TCP reset, which can discard it."""
    client.wait_closed()
    assert client.closed
    assert not client.goaway_codes or ENHANCE_YOUR_CALM in client.goaway_codes
    wait_for(lambda: f"over budget: flood of {what}" in stack.proxy.log(), 10, what)


@pytest.mark.parametrize(
    ("frame", "what"),
    [
        (PingFrame(0, opaque_data=b"floodfld").serialize(), "frames of type 0x6"),
        (SettingsFrame(0).serialize(), "frames of type 0x4"),
        (_window_update(1), "frames of type 0x8"),
    ],
)
def test_control_frame_floods_cost_the_connection(
    stack: Stack, good: GoodClient, frame: bytes, what: str
) -> None:
    client = H2Client(stack, ATTACK)
    try:
        client.send_raw(frame * 20_000)
        _cut_for(stack, client, what)
    finally:
        client.close()


def test_an_empty_data_flood_costs_the_connection(stack: Stack, good: GoodClient) -> None:
    client = H2Client(stack, ATTACK)
    try:
        sid = client.request("/attack/empty-data", end=False)
        client.send_raw(DataFrame(sid).serialize() * 20_000)
        _cut_for(stack, client, "empty DATA frames")
    finally:
        client.close()


def test_diluted_rapid_reset_is_cut(stack: Stack, good: GoodClient) -> None:
    client = H2Client(stack, ATTACK)
    resets = 0
    try:
        deadline = time.monotonic() + 60
        while not client.closed and time.monotonic() < deadline:
            while client.conn.open_outbound_streams > 120 and not client.closed:
                client.events(0.05)  # stay under the proxy's 128 concurrent streams
            if client.closed:
                break
            # Three real requests for every one reset: the ratio alone never trips.
            for _ in range(3):
                client.request("/status/204")
            sid = client.request("/attack/rapid-reset", end=False)
            client.conn.reset_stream(sid)
            client.flush()
            resets += 1
            while client.events(0.001):
                pass
        client.wait_closed()
        assert resets < 2000, resets
        wait_for(lambda: "client reset" in stack.proxy.log(), 10, "the rapid reset guard")
    finally:
        client.close()


def test_a_trickled_http2_head_costs_the_connection(stack: Stack, good: GoodClient) -> None:
    client = H2Client(stack, ATTACK)
    try:
        sid = client.request("/headers")  # the SETTINGS exchange is over (and ACKed)
        assert client.response(sid)[0] == 200
        block = client.conn.encoder.encode(
            [
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b":authority", ATTACK.encode()),
                (b":path", b"/attack/h2-trickle"),
            ]
        )
        # HEADERS without END_HEADERS, then its CONTINUATION a byte at a time. Nothing else
        # may be sent meanwhile (RFC 9113 6.10), so what arrives is read raw.
        client.send_raw(HeadersFrame(3, data=block[:4], flags=["END_STREAM"]).serialize())
        rest = ContinuationFrame(3, data=block[4:], flags=["END_HEADERS"]).serialize()
        started = time.monotonic()
        closed = False
        for byte in rest[:-1]:
            client.send_raw(bytes([byte]))
            client.tls.settimeout(0.3)
            try:
                closed = not client.tls.recv(65536)
            except (TimeoutError, ssl.SSLWantReadError):
                continue
            except OSError:
                closed = True
            if closed or time.monotonic() - started > HEAD_TIMEOUT * 5:
                break
        elapsed = time.monotonic() - started
        assert closed
        assert HEAD_TIMEOUT * 0.8 <= elapsed <= HEAD_TIMEOUT * 4, elapsed
    finally:
        client.close()
    assert not _reached(stack, "/attack/h2-trickle")


def test_an_undecodable_header_block_costs_only_its_connection(
    stack: Stack, good: GoodClient
) -> None:
    # An HPACK integer that runs past the end of the block: the compiled decoder panics on
    # it, which must become COMPRESSION_ERROR on this connection, not a worker failure.
    client = H2Client(stack, ATTACK)
    other = H2Client(stack, ATTACK)
    try:
        assert client.response(client.request("/headers"))[0] == 200
        client.send_raw(
            HeadersFrame(3, data=b"\xff\xff\xff\xff", flags=["END_HEADERS"]).serialize()
        )
        client.wait_closed()
        assert client.closed
        assert not client.goaway_codes or COMPRESSION_ERROR in client.goaway_codes
        assert other.response(other.request("/headers"))[0] == 200  # same worker, unharmed
    finally:
        client.close()
        other.close()


@pytest.mark.parametrize(
    ("name", "headers"),
    [
        ("uppercase", [(b"X-Upper", b"1")]),
        ("connection-specific", [(b"connection", b"keep-alive")]),
        ("te", [(b"te", b"gzip")]),
        ("surrounding-space", [(b"x-space", b" padded")]),
    ],
)
def test_a_malformed_http2_head_resets_its_stream_alone(
    stack: Stack, good: GoodClient, name: str, headers: list[tuple[bytes, bytes]]
) -> None:
    client = H2Client(stack, ATTACK)
    client.conn.config.normalize_outbound_headers = False  # send the fields as written
    try:
        bad = client.request(f"/attack/malformed-{name}", extra=headers)
        assert client.response(bad)[0] == 0  # reset (PROTOCOL_ERROR), no answer
        fine = client.request("/headers")  # the same connection goes on
        assert client.response(fine)[0] == 200
        assert not _reached(stack, f"/attack/malformed-{name}")
    finally:
        client.close()
