"""End to end: the L4 path's failures and edges, each ending as the contract says.

The per-connection path is driven by loop callbacks (``worker/connection.py``).
These tests take it through the branches the happy-path tests do not reach: a
backend that refuses, a backend that never answers the SYN, a client that
never finishes its ClientHello, and a ClientHello in two records, which must
reach the backend byte for byte.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path

from tests.certs import CA
from tests.e2e.harness import ProxyProcess, client_context, free_port, is_reset, wait_for


def proxy_to(tmp_path: Path, backend: str, **timeouts: str) -> tuple[ProxyProcess, int]:
    port = free_port()
    config = {
        "listeners": [
            {
                "addr": f"127.0.0.1:{port}",
                "routes": [{"hostname": "alpha.test", "backend": backend}],
            }
        ]
    }
    proxy = ProxyProcess(tmp_path, config, workers=1)
    proxy.config["proxy"].update(timeouts)
    return proxy, port


def outcome_logged(proxy: ProxyProcess, outcome: str) -> str:
    def line() -> str | None:
        return next((ln for ln in proxy.log().splitlines() if f"outcome={outcome}" in ln), None)

    found: str = wait_for(line, 10, f"outcome={outcome} in the access log")
    return found


def test_refusing_backend_resets_the_client(tmp_path: Path, ca: CA) -> None:
    proxy, port = proxy_to(tmp_path, f"127.0.0.1:{free_port()}")  # nothing listens there
    with proxy:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            client_context(ca.pem).wrap_socket(raw, server_hostname="alpha.test")
        except ConnectionResetError:
            pass
        else:
            raise AssertionError("the handshake went through to a backend that refuses")
        finally:
            raw.close()
        assert "sni=alpha.test" in outcome_logged(proxy, "backend_unreachable")


def test_backend_that_never_answers_times_out(tmp_path: Path) -> None:
    # A listener whose accept queue is full drops further SYNs: connect() hangs.
    silent = socket.create_server(("127.0.0.1", 0), backlog=0)
    fillers = [socket.create_connection(silent.getsockname(), timeout=5)]
    try:
        proxy, port = proxy_to(
            tmp_path, f"127.0.0.1:{silent.getsockname()[1]}", connect_timeout="1s"
        )
        with proxy, socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(client_hello("alpha.test"))
            started = time.monotonic()
            assert is_reset(client, timeout=10)
            assert 0.8 < time.monotonic() - started < 8
            assert 'detail="no connection in 1.0s"' in outcome_logged(proxy, "backend_timeout")
    finally:
        for sock in [*fillers, silent]:
            sock.close()


def test_unfinished_client_hello_is_reset_at_the_handshake_timeout(tmp_path: Path) -> None:
    proxy, port = proxy_to(tmp_path, f"127.0.0.1:{free_port()}", handshake_timeout="1s")
    with proxy, socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(client_hello("alpha.test")[:20])
        started = time.monotonic()
        assert is_reset(client, timeout=10)
        assert 0.8 < time.monotonic() - started < 8
        line = outcome_logged(proxy, "refused:client_hello")
        assert 'detail="no ClientHello in time"' in line


def test_client_hello_in_two_records_reaches_the_backend_byte_for_byte(tmp_path: Path) -> None:
    backend = socket.create_server(("127.0.0.1", 0))
    received = bytearray()
    hello = client_hello("alpha.test", padding=18_000)
    assert hello.count(b"\x16\x03\x01") >= 2  # two record headers: a fragmented hello

    def take() -> None:
        conn, _ = backend.accept()
        with conn:
            conn.settimeout(10)
            while len(received) < len(hello) and (chunk := conn.recv(65536)):
                received.extend(chunk)

    reader = threading.Thread(target=take, daemon=True)
    reader.start()
    try:
        proxy, port = proxy_to(tmp_path, f"127.0.0.1:{backend.getsockname()[1]}")
        with proxy, socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(hello)
            reader.join(10)
            assert bytes(received) == hello
    finally:
        backend.close()


def client_hello(sni: str, padding: int = 0) -> bytes:
    """A minimal TLS 1.2-style ClientHello with SNI, in records of at most 2**14 bytes."""
    name = sni.encode()
    server_name = struct.pack("!HBH", len(name) + 3, 0, len(name)) + name
    extensions = struct.pack("!HH", 0, len(server_name)) + server_name
    if padding:
        extensions += struct.pack("!HH", 21, padding) + bytes(padding)
    body = (
        b"\x03\x03"
        + bytes(32)  # random
        + b"\x00"  # session id
        + b"\x00\x02\x13\x01"  # one cipher suite
        + b"\x01\x00"  # null compression
        + struct.pack("!H", len(extensions))
        + extensions
    )
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    records = b""
    for start in range(0, len(message), 2**14):
        fragment = message[start : start + 2**14]
        records += b"\x16\x03\x01" + struct.pack("!H", len(fragment)) + fragment
    return records


def test_reset_behind_data_reaches_the_client_at_once(tmp_path: Path) -> None:
    """Data then a RST from the backend: the client gets the data, then the reset."""
    backend = socket.create_server(("127.0.0.1", 0))
    hello = client_hello("alpha.test")

    def answer_then_reset() -> None:
        conn, _ = backend.accept()
        conn.settimeout(10)
        received = b""
        while len(received) < len(hello):
            received += conn.recv(65536)
        conn.sendall(b"x" * 1000)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    threading.Thread(target=answer_then_reset, daemon=True).start()
    try:
        proxy, port = proxy_to(
            tmp_path, f"127.0.0.1:{backend.getsockname()[1]}", idle_timeout="60s"
        )
        with proxy, socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(hello)
            data = b""
            while len(data) < 1000:
                data += client.recv(1000 - len(data))
            assert data == b"x" * 1000
            assert is_reset(client, timeout=10)
            assert outcome_logged(proxy, "reset")
    finally:
        backend.close()
