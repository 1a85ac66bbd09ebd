"""The supervisor's probes and runner against tiny servers on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import ssl
import threading
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest

from mcproxy.health import CheckTarget, Verdict
from mcproxy.model import Address
from mcproxy.supervisor.health import CheckFailed, HealthRunner, probe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(port: int, protocol: str, path: str = "/healthz") -> CheckTarget:
    return CheckTarget(
        Address("127.0.0.1", port), "http", 1.0, 2.0, 1, 1, path=path, protocol=protocol
    )


async def h1_server(status: int) -> tuple[asyncio.Server, int, list[bytes]]:
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], seen


async def h2_server(
    status: int, tls: ssl.SSLContext | None = None
) -> tuple[asyncio.Server, int, list[str]]:
    paths: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        while data := await reader.read(65536):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    paths.append(dict(event.headers)[b":path"].decode())
                    conn.send_headers(event.stream_id, [(":status", str(status))], end_stream=True)
            writer.write(conn.data_to_send())
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls)
    return server, server.sockets[0].getsockname()[1], paths


def test_tcp_probe_connects_and_a_closed_port_fails() -> None:
    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        target = CheckTarget(Address("127.0.0.1", port), "tcp", 1.0, 1.0, 1, 1)
        assert await probe(target) == "connected"
        server.close()
        closed = CheckTarget(Address("127.0.0.1", free_port()), "tcp", 1.0, 1.0, 1, 1)
        with pytest.raises(OSError):
            await probe(closed)

    asyncio.run(main())


@pytest.mark.parametrize("status, healthy", [(200, True), (302, True), (503, False)])
def test_http1_probe_judges_the_status(status: int, healthy: bool) -> None:
    async def main() -> None:
        server, port, seen = await h1_server(status)
        try:
            if healthy:
                assert await probe(http(port, "h1")) == f"HTTP {status}"
            else:
                with pytest.raises(CheckFailed, match=f"HTTP {status}"):
                    await probe(http(port, "h1"))
        finally:
            server.close()
        assert seen[0].startswith(b"GET /healthz HTTP/1.1\r\n")

    asyncio.run(main())


@pytest.mark.parametrize("status, healthy", [(204, True), (503, False)])
def test_h2c_probe_judges_the_status(status: int, healthy: bool) -> None:
    async def main() -> None:
        server, port, paths = await h2_server(status)
        try:
            if healthy:
                assert await probe(http(port, "h2", "/ready")) == f"HTTP {status}"
            else:
                with pytest.raises(CheckFailed):
                    await probe(http(port, "h2", "/ready"))
        finally:
            server.close()
        assert paths == ["/ready"]

    asyncio.run(main())


def test_runner_marks_a_backend_down_then_up_again() -> None:
    listening = socket.create_server(("127.0.0.1", 0))
    port = listening.getsockname()[1]
    target = CheckTarget(Address("127.0.0.1", port), "tcp", 0.05, 0.5, rise=2, fall=2)
    verdicts: list[Verdict] = []
    changed = threading.Event()

    def on_verdict(verdict: Verdict) -> None:
        verdicts.append(verdict)
        changed.set()

    runner = HealthRunner(on_verdict).start()
    try:
        runner.set_targets([target])
        deadline = time.monotonic() + 10
        while runner.checks_run < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert runner.checks_run >= 3 and verdicts == []  # up from the start, and stays up
        listening.close()
        assert changed.wait(10)
        assert not verdicts[-1].up and verdicts[-1].reason
        changed.clear()
        listening = socket.create_server(("127.0.0.1", port))
        assert changed.wait(10)
        assert verdicts[-1].up
        assert [v.up for v in runner.verdicts] == [True]
    finally:
        runner.stop()
        listening.close()


def test_h2_probe_over_tls_verifies_against_the_routes_ca(tmp_path: Path) -> None:
    from tests.certs import issue, make_ca

    ca = make_ca()
    cert, key = issue(ca, "backend.test", tmp_path)
    ca_file = str(ca.write(tmp_path))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    server_ctx.set_alpn_protocols(["h2"])

    async def main() -> None:
        server, port, paths = await h2_server(200, server_ctx)
        base = CheckTarget(Address("127.0.0.1", port), "http", 1.0, 2.0, 1, 1, tls=True, ca=ca_file)
        try:
            named = dataclasses.replace(base, server_name="backend.test")
            assert await probe(named) == "HTTP 200"
            with pytest.raises(ssl.SSLError):  # the certificate does not name 127.0.0.1
                await probe(base)
        finally:
            server.close()
        assert paths == ["/healthz"]

    asyncio.run(main())
