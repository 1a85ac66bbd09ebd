"""End to end: bulk relays switch to splice after 1 MiB; bytes, back-pressure and EOF hold.

A direction that has carried ``SPLICE_AFTER`` bytes moves through a pipe
inside the kernel (``worker/relay.py``). These tests push several MiB each
way, with a reader slower than the writer (the pipe holds what the client
cannot take yet) and with a half-close in the middle of a spliced stream.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from pathlib import Path

from mcproxy.worker.relay import SPLICE_AFTER
from tests.certs import CA
from tests.e2e.harness import ProxyProcess, TlsBackend, free_port, pattern
from tests.e2e.test_l4_dial import client_hello


def test_slow_reader_gets_every_byte_of_a_spliced_download(
    tmp_path: Path, backends: dict[str, TlsBackend], ca: CA
) -> None:
    size = 16 * SPLICE_AFTER
    port = free_port()
    config = {
        "listeners": [
            {
                "addr": f"127.0.0.1:{port}",
                "routes": [{"hostname": "alpha.test", "backend": backends["alpha.test"].addr}],
            }
        ]
    }
    with (
        ProxyProcess(tmp_path, config, workers=1) as proxy,
        proxy.connect(port, "alpha.test", ca.pem, timeout=30) as tls,
    ):
        tls.sendall(f"SOURCE {size}\n".encode())
        digest, received = hashlib.sha256(), 0
        while chunk := tls.recv(256 * 1024):
            digest.update(chunk)
            received += len(chunk)
            time.sleep(0.002)  # slower than the backend: the relay has to hold back
        assert received == size
        assert digest.hexdigest() == hashlib.sha256(pattern(size)).hexdigest()


def test_half_close_in_the_middle_of_a_spliced_echo(tmp_path: Path) -> None:
    """Several MiB each way, then the client's FIN; the echo still comes back whole."""
    backend = socket.create_server(("127.0.0.1", 0))

    def echo_until_eof() -> None:
        conn, _ = backend.accept()
        with conn:
            conn.settimeout(30)
            while data := conn.recv(1 << 20):
                conn.sendall(data)

    threading.Thread(target=echo_until_eof, daemon=True).start()
    hello, payload = client_hello("alpha.test"), pattern(4 * SPLICE_AFTER, seed=9)
    port = free_port()
    config = {
        "listeners": [
            {
                "addr": f"127.0.0.1:{port}",
                "routes": [
                    {"hostname": "alpha.test", "backend": f"127.0.0.1:{backend.getsockname()[1]}"}
                ],
            }
        ]
    }
    try:
        with (
            ProxyProcess(tmp_path, config, workers=1),
            socket.create_connection(("127.0.0.1", port), timeout=30) as client,
        ):

            def send_then_half_close() -> None:
                client.sendall(hello + payload)
                client.shutdown(socket.SHUT_WR)

            sender = threading.Thread(target=send_then_half_close, daemon=True)
            sender.start()
            echoed = bytearray()
            while chunk := client.recv(1 << 20):
                echoed.extend(chunk)
            sender.join(30)
            assert bytes(echoed) == hello + payload
    finally:
        backend.close()
