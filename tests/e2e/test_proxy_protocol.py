"""End to end: PROXY protocol on listeners and routes, against hand-built headers,
HAProxy on either side, and a second mc-proxy (edge -> origin).

The headers a test sends by hand come from the codec's encoders (or are spelled
out where the test is about a malformed one); the interop tests use HAProxy's own
``send-proxy``, ``send-proxy-v2`` and ``accept-proxy``.
"""

from __future__ import annotations

import re
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest

from mcproxy.worker.proxy_protocol import (
    V2_SIGNATURE,
    ProxyHeaderDecoder,
    encode_v1,
    encode_v2,
    encode_v2_local,
)
from tests.certs import CA, issue
from tests.e2e.haproxy import HaproxyProcess
from tests.e2e.harness import (
    ProxyProcess,
    TlsBackend,
    client_context,
    free_port,
    is_reset,
    wait_for,
)

EDGE_CLIENT = "127.0.0.2"
"""A loopback source address the firewalls under test block."""
OTHER_CLIENT = "127.0.0.3"


def listener(addr: str, backend: TlsBackend, **options: Any) -> dict[str, Any]:
    route_options = {k: options.pop(k) for k in ("send_proxy_protocol",) if k in options}
    return {
        "addr": addr,
        **options,
        "routes": [{"hostname": backend.name, "backend": backend.addr, **route_options}],
    }


def connect(port: int, source: str = "127.0.0.1", host: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection((host, port), timeout=10, source_address=(source, 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def ask_name(raw: socket.socket, sni: str, ca: CA, prefix: bytes = b"") -> str:
    """The backend's name over TLS on ``raw``, after sending ``prefix`` (a PROXY header)."""
    if prefix:
        raw.sendall(prefix)
    with client_context(ca.pem).wrap_socket(raw, server_hostname=sni) as tls:
        tls.sendall(b"NAME\n")
        return tls.recv(100).decode().strip()


def ask_name_in_one_segment(raw: socket.socket, sni: str, ca: CA, header: bytes) -> str:
    """Like :func:`ask_name`, but the header and the ClientHello leave in one ``send``."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context(ca.pem).wrap_bio(incoming, outgoing, server_hostname=sni)
    first = True

    def pump(step: Any) -> Any:
        nonlocal first
        while True:
            try:
                return step()
            except ssl.SSLWantReadError:
                pending = outgoing.read()
                if first:
                    pending, first = header + pending, False
                if pending:
                    raw.sendall(pending)
                data = raw.recv(65536)
                if not data:
                    raise ConnectionError("closed during the exchange") from None
                incoming.write(data)

    pump(tls.do_handshake)
    tls.write(b"NAME\n")
    raw.sendall(outgoing.read())
    name: bytes = pump(lambda: tls.read(100))
    raw.close()
    return name.decode().strip()


def log_lines(proxy: ProxyProcess, outcome: str) -> list[str]:
    return [line for line in proxy.log().splitlines() if f"outcome={outcome}" in line]


def clients_with(proxy: ProxyProcess, outcome: str, count: int) -> list[str]:
    """The ``client=`` of the first ``count`` access-log lines with ``outcome``."""

    def found() -> list[str]:
        lines = log_lines(proxy, outcome)
        return lines if len(lines) >= count else []

    lines = wait_for(found, 5, f"{count} access-log lines with outcome={outcome}")
    return [re.search(r"client=(\S+)", line).group(1) for line in lines]  # type: ignore[union-attr]


@pytest.fixture
def alpha(tmp_path: Path, ca: CA) -> Any:
    cert, key = issue(ca, "alpha.test", tmp_path)
    backend = TlsBackend("alpha.test", cert, key)
    yield backend
    backend.close()


# --- receiving, with hand-built headers -----------------------------------------------


def test_header_source_is_the_client_for_firewall_and_log(
    tmp_path: Path, ca: CA, alpha: TlsBackend
) -> None:
    port = free_port()
    config = {
        "listeners": [listener(f"127.0.0.1:{port}", alpha, proxy_protocol=True)],
        "firewall": {"blocked_ips": ["192.0.2.1", "2001:db8::1"]},
    }
    dst4, dst6 = ("198.51.100.2", 443), ("2001:db8::443", 443)
    blocked = [
        encode_v1(("192.0.2.1", 5000), dst4),
        encode_v2(("192.0.2.1", 5000), dst4),
        encode_v2(("::ffff:192.0.2.1", 5000), dst6),  # IPv4-mapped: the IPv4 rule applies
        encode_v1(("2001:db8::1", 5000), dst6),
        encode_v2(("2001:db8::1", 5000), dst6),
    ]
    allowed = [
        encode_v1(("192.0.2.9", 5000), dst4),
        encode_v2(("2001:db8::9", 5000), dst6),
    ]
    with ProxyProcess(tmp_path, config, workers=1) as proxy:
        for header in blocked:
            with connect(port) as sock:
                sock.sendall(header)
                assert is_reset(sock), header
        for header in allowed:
            assert ask_name(connect(port), "alpha.test", ca, header) == "alpha.test"
        assert clients_with(proxy, "refused:firewall_ip", 5) == [
            "192.0.2.1",
            "192.0.2.1",
            "192.0.2.1",
            "2001:db8::1",
            "2001:db8::1",
        ]
        assert clients_with(proxy, "closed", 2) == ["192.0.2.9", "2001:db8::9"]
    assert alpha.connections == 2


def test_local_unknown_and_unspec_use_the_tcp_source(
    tmp_path: Path, ca: CA, alpha: TlsBackend
) -> None:
    port = free_port()
    config = {
        "listeners": [listener(f"127.0.0.1:{port}", alpha, proxy_protocol=True)],
        "firewall": {"blocked_ips": [EDGE_CLIENT]},
    }
    unspec = V2_SIGNATURE + b"\x21\x00\x00\x00"  # PROXY command, AF_UNSPEC, no address
    with ProxyProcess(tmp_path, config, workers=1) as proxy:
        for header in (encode_v2_local(), encode_v1(None, None), unspec):
            assert ask_name(connect(port, OTHER_CLIENT), "alpha.test", ca, header) == "alpha.test"
            # The TCP source is what the firewall checks, too.
            with connect(port, EDGE_CLIENT) as sock:
                sock.sendall(header)
                assert is_reset(sock)
        assert clients_with(proxy, "closed", 3) == [OTHER_CLIENT] * 3
        assert clients_with(proxy, "refused:firewall_ip", 3) == [EDGE_CLIENT] * 3


def test_missing_malformed_or_late_header_is_reset(
    tmp_path: Path, ca: CA, alpha: TlsBackend
) -> None:
    port = free_port()
    proxy = ProxyProcess(
        tmp_path, {"listeners": [listener(f"127.0.0.1:{port}", alpha, proxy_protocol=True)]}, 1
    )
    proxy.config["proxy"]["handshake_timeout"] = "1s"
    malformed = [
        b"PROXY TCP4 192.0.2.1 198.51.100.2 5000\r\n",  # a field short
        b"PROXY TCP4 192.0.2.1 198.51.100.2 5000 443\n",  # bare LF
        b"PROXY TCP5 192.0.2.1 198.51.100.2 5000 443\r\n",
        V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12),  # version 3
        V2_SIGNATURE + b"\x21\x11\x02\x58" + bytes(600),  # 616 bytes > 536
        b"PROXY " + b"x" * 200,  # no CRLF within 107 bytes
    ]
    with proxy:
        raw = connect(port)
        with pytest.raises(ConnectionResetError):  # TLS straight away, no header
            client_context(ca.pem).wrap_socket(raw, server_hostname="alpha.test")
        for header in malformed:
            with connect(port) as sock:
                sock.sendall(header)
                assert is_reset(sock), header
        with connect(port) as sock:
            sock.sendall(b"PROXY TCP4 192.0.2.1 ")  # and then nothing
            started = time.monotonic()
            assert is_reset(sock)
            assert time.monotonic() - started >= 0.9

        # The RST reaches us before the worker writes the access-log line: wait for it.
        def refusals() -> list[str] | None:
            found = re.findall(r"outcome=refused:proxy_header detail=\"([^\"]*)\"", proxy.log())
            return found if len(found) == 1 + len(malformed) + 1 else None

        details = wait_for(refusals, 5, "every refusal logged")
        assert details[-1] == "no header in time"
    assert alpha.connections == 0


def test_header_must_come_within_5s_even_with_a_longer_handshake_timeout(
    tmp_path: Path, ca: CA, alpha: TlsBackend
) -> None:
    """5 s bounds the header alone; the ClientHello may take the rest of handshake_timeout."""
    port = free_port()
    proxy = ProxyProcess(
        tmp_path, {"listeners": [listener(f"127.0.0.1:{port}", alpha, proxy_protocol=True)]}, 1
    )
    proxy.config["proxy"]["handshake_timeout"] = "10s"
    with proxy:
        prompt = connect(port, OTHER_CLIENT)
        prompt.sendall(encode_v2_local())  # the header at once, the ClientHello later
        prompt_started = time.monotonic()
        with connect(port) as slow:
            slow.sendall(b"PROXY TCP4 192.0.2.1 ")
            started = time.monotonic()
            assert is_reset(slow, timeout=9)
            assert 4.9 <= time.monotonic() - started < 9
        assert time.monotonic() - prompt_started > 5
        assert ask_name(prompt, "alpha.test", ca) == "alpha.test"
        assert clients_with(proxy, "closed", 1) == [OTHER_CLIENT]
        assert 'detail="no header in time"' in proxy.log()


def test_listener_without_proxy_protocol_resets_a_header(
    tmp_path: Path, ca: CA, alpha: TlsBackend
) -> None:
    port = free_port()
    with ProxyProcess(
        tmp_path, {"listeners": [listener(f"127.0.0.1:{port}", alpha)]}, workers=1
    ) as proxy:
        for header in (
            encode_v1(("192.0.2.1", 5000), ("198.51.100.2", 443)),
            encode_v2(("192.0.2.1", 5000), ("198.51.100.2", 443)),
        ):
            with pytest.raises(ConnectionResetError):
                ask_name(connect(port), "alpha.test", ca, header)
        # The header was never read as one: the TCP peer is the client, SNI parsing failed.
        assert clients_with(proxy, "refused:client_hello", 2) == ["127.0.0.1"] * 2
        assert "192.0.2.1" not in proxy.log()
    assert alpha.connections == 0


def test_header_and_client_hello_in_one_segment_or_split(
    tmp_path: Path, ca: CA, alpha: TlsBackend
) -> None:
    """The bytes after the header go to the ClientHello parser, however the reads fall."""
    port = free_port()
    config = {"listeners": [listener(f"127.0.0.1:{port}", alpha, proxy_protocol=True)]}
    v1 = encode_v1(("192.0.2.10", 5000), ("198.51.100.2", 443))
    v2 = encode_v2(("192.0.2.11", 5000), ("198.51.100.2", 443))
    with ProxyProcess(tmp_path, config, workers=1) as proxy:
        for header in (v1, v2):
            assert ask_name_in_one_segment(connect(port), "alpha.test", ca, header) == "alpha.test"
        for header in (v1, v2):
            sock = connect(port)
            for i in range(len(header)):
                sock.send(header[i : i + 1])
                time.sleep(0.001)  # let the segments go out one by one
            assert ask_name(sock, "alpha.test", ca) == "alpha.test"
        assert clients_with(proxy, "closed", 4) == [
            "192.0.2.10",
            "192.0.2.11",
            "192.0.2.10",
            "192.0.2.11",
        ]


# --- sending ----------------------------------------------------------------------------


def test_forwarded_header_carries_the_client_and_its_original_destination(
    tmp_path: Path, ca: CA
) -> None:
    cert, key = issue(ca, "alpha.test", tmp_path)
    backend = TlsBackend("alpha.test", cert, key, proxy_protocol=True)
    port = free_port()
    config = {
        "listeners": [
            listener(f"127.0.0.1:{port}", backend, proxy_protocol=True, send_proxy_protocol=True)
        ]
    }
    try:
        with ProxyProcess(tmp_path, config, workers=1):
            # IPv4-mapped addresses in a TCP6 header go on as a TCP4 header.
            mapped = encode_v2(("::ffff:192.0.2.7", 4000), ("::ffff:198.51.100.2", 443))
            assert ask_name(connect(port), "alpha.test", ca, mapped) == "alpha.test"
            v6 = encode_v1(("2001:db8::7", 4001), ("2001:db8::443", 8443))
            assert ask_name(connect(port), "alpha.test", ca, v6) == "alpha.test"
            sock = connect(port, OTHER_CLIENT)  # LOCAL: the TCP endpoints go on
            client_port = sock.getsockname()[1]
            assert ask_name(sock, "alpha.test", ca, encode_v2_local()) == "alpha.test"
    finally:
        backend.close()
    received = []
    for raw in backend.proxy_headers:
        header = ProxyHeaderDecoder().feed(raw)
        assert header is not None
        received.append((raw[13], header.source, header.destination))
    assert received == [
        (0x11, ("192.0.2.7", 4000), ("198.51.100.2", 443)),
        (0x21, ("2001:db8::7", 4001), ("2001:db8::443", 8443)),
        (0x11, (OTHER_CLIENT, client_port), ("127.0.0.1", port)),
    ]


# --- HAProxy on either side ---------------------------------------------------------------


@pytest.mark.parametrize("send_proxy", ["send-proxy", "send-proxy-v2"])
def test_haproxy_in_front_of_mc_proxy(
    tmp_path: Path, ca: CA, alpha: TlsBackend, send_proxy: str
) -> None:
    """HAProxy's header is what mc-proxy's firewall and access log go by."""
    mc_port, ha4, ha6 = free_port(), free_port(), free_port()
    config = {
        "listeners": [listener(f"127.0.0.1:{mc_port}", alpha, proxy_protocol=True)],
        "firewall": {"blocked_ips": [EDGE_CLIENT]},
    }
    sections = f"""\
frontend v4
    bind 127.0.0.1:{ha4}
    default_backend mc
frontend v6
    bind ipv6@::1:{ha6}
    default_backend mc
backend mc
    server mc 127.0.0.1:{mc_port} {send_proxy}
"""
    haproxy = HaproxyProcess(tmp_path, sections, [ha4, ha6])
    with ProxyProcess(tmp_path, config, workers=1) as proxy, haproxy:
        with pytest.raises((ConnectionError, ssl.SSLError)):
            ask_name(connect(ha4, EDGE_CLIENT), "alpha.test", ca)
        assert ask_name(connect(ha4, OTHER_CLIENT), "alpha.test", ca) == "alpha.test"
        assert ask_name(connect(ha6, "::1", "::1"), "alpha.test", ca) == "alpha.test"
        assert clients_with(proxy, "refused:firewall_ip", 1) == [EDGE_CLIENT]
        assert clients_with(proxy, "closed", 2) == [OTHER_CLIENT, "::1"]
    assert alpha.connections == 2


def test_haproxy_accept_proxy_sees_the_client_mc_proxy_sends(
    tmp_path: Path, ca: CA, alpha: TlsBackend
) -> None:
    """mc-proxy's v2 header, parsed by HAProxy: its log shows the client and the listener."""
    mc4, mc6, ha_port = free_port(), free_port(), free_port()
    sections = f"""\
frontend pp
    bind 127.0.0.1:{ha_port} accept-proxy
    log-format "seen client=%ci:%cp frontend=%fi:%fp"
    default_backend tls
backend tls
    server alpha {alpha.addr}
"""
    route = {"hostname": "alpha.test", "backend": f"127.0.0.1:{ha_port}"}
    config = {
        "listeners": [
            {"addr": f"127.0.0.1:{mc4}", "routes": [{**route, "send_proxy_protocol": True}]},
            {"addr": f"[::1]:{mc6}", "routes": [{**route, "send_proxy_protocol": True}]},
        ]
    }
    with (
        HaproxyProcess(tmp_path, sections, [ha_port]) as haproxy,
        ProxyProcess(tmp_path, config, workers=1),
    ):
        sock4 = connect(mc4, EDGE_CLIENT)
        port4 = sock4.getsockname()[1]
        assert ask_name(sock4, "alpha.test", ca) == "alpha.test"
        sock6 = connect(mc6, "::1", "::1")
        port6 = sock6.getsockname()[1]
        assert ask_name(sock6, "alpha.test", ca) == "alpha.test"

        def seen_lines() -> list[str]:
            found = re.findall(r"seen (.*)", haproxy.log())
            return found if len(found) >= 2 else []

        seen = wait_for(seen_lines, 5, "two haproxy log lines")
    assert sorted(seen) == sorted(
        [
            f"client={EDGE_CLIENT}:{port4} frontend=127.0.0.1:{mc4}",
            f"client=::1:{port6} frontend=::1:{mc6}",
        ]
    )


# --- two mc-proxies ------------------------------------------------------------------------


def test_edge_to_origin_the_origin_firewall_sees_the_real_client(
    tmp_path: Path, ca: CA, alpha: TlsBackend
) -> None:
    edge_port, origin_port = free_port(), free_port()
    (tmp_path / "edge").mkdir()
    (tmp_path / "origin").mkdir()
    origin = ProxyProcess(
        tmp_path / "origin",
        {
            "listeners": [listener(f"127.0.0.1:{origin_port}", alpha, proxy_protocol=True)],
            "firewall": {"blocked_ips": [EDGE_CLIENT]},
        },
        workers=1,
    )
    edge_route = {
        "hostname": "alpha.test",
        "backend": f"127.0.0.1:{origin_port}",
        "send_proxy_protocol": True,
    }
    edge = ProxyProcess(
        tmp_path / "edge",
        {"listeners": [{"addr": f"127.0.0.1:{edge_port}", "routes": [edge_route]}]},
        workers=1,
    )
    with origin, edge:
        with pytest.raises(ConnectionResetError):
            ask_name(connect(edge_port, EDGE_CLIENT), "alpha.test", ca)
        assert ask_name(connect(edge_port, OTHER_CLIENT), "alpha.test", ca) == "alpha.test"
        # Straight to the origin, without a header: refused whoever asks.
        with pytest.raises(ConnectionResetError):
            ask_name(connect(origin_port, OTHER_CLIENT), "alpha.test", ca)
        assert clients_with(origin, "refused:firewall_ip", 1) == [EDGE_CLIENT]
        assert clients_with(origin, "closed", 1) == [OTHER_CLIENT]
        assert clients_with(origin, "refused:proxy_header", 1) == [OTHER_CLIENT]
        assert clients_with(edge, "reset", 1) == [EDGE_CLIENT]
        assert clients_with(edge, "closed", 1) == [OTHER_CLIENT]
    assert alpha.connections == 1
