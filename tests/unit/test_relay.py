"""The L4 relay over real loopback sockets, under both event loops the worker may run."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import struct
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from mcproxy.worker.poller import Poller
from mcproxy.worker.relay import Relay

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def run(factory: Callable[[], asyncio.AbstractEventLoop], main: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main)


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(outside end, proxy end) of one loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        outside = socket.create_connection(server.getsockname())
        inside, _ = server.accept()
    inside.setblocking(False)
    return outside, inside


def relay_between(
    loop: asyncio.AbstractEventLoop, client_in: socket.socket, backend_in: socket.socket
) -> asyncio.Future[str]:
    """Start a relay with the session's policy in small (the connection's job in the
    proxy): EOF shuts the other side down, the second EOF closes, an error resets.
    The future resolves to ``"closed"`` or ``"reset"``."""
    done: asyncio.Future[str] = loop.create_future()
    eofs: set[bool] = set()

    def end(outcome: str) -> None:
        relay.stop()
        for sock in (client_in, backend_in):
            if outcome == "reset":
                hard_close(sock)
            else:
                sock.close()
        done.set_result(outcome)

    def on_eof(upstream: bool) -> None:
        eofs.add(upstream)
        if len(eofs) == 2:
            end("closed")
        else:
            (backend_in if upstream else client_in).shutdown(socket.SHUT_WR)

    relay = Relay(
        loop,
        client_in,
        backend_in,
        poller=Poller(loop),
        on_eof=on_eof,
        on_error=lambda detail: end("reset"),
    )
    return done


def hard_close(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize("loop_name", LOOPS)
def test_reset_that_arrives_with_data_ends_the_relay(loop_name: str) -> None:
    """The error comes behind data; the relay must still see the reset (not idle on)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        client, client_in = tcp_pair()
        backend, backend_in = tcp_pair()
        done = relay_between(loop, client_in, backend_in)
        client.sendall(b"last words")
        hard_close(client)
        assert await asyncio.wait_for(done, 5) == "reset"
        backend.settimeout(5)
        received = b""
        with pytest.raises(ConnectionResetError):
            while chunk := backend.recv(100):
                received += chunk
        assert received in (b"", b"last words")
        backend.close()

    run(LOOPS[loop_name], main())


@pytest.mark.parametrize("loop_name", LOOPS)
def test_bulk_transfer_longer_than_one_wakeup_arrives_intact(loop_name: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        client, client_in = tcp_pair()
        backend, backend_in = tcp_pair()
        done = relay_between(loop, client_in, backend_in)
        payload = bytes(range(256)) * (40 * 1024)  # 10 MiB: many reads per wake-up
        for sock in (client, backend):
            sock.setblocking(False)
        sent, received = 0, hashlib.sha256()
        total = 0
        while total < len(payload):
            if sent < len(payload):
                with contextlib.suppress(BlockingIOError):
                    sent += client.send(payload[sent : sent + (1 << 20)])
            try:
                chunk = backend.recv(1 << 20)
                received.update(chunk)
                total += len(chunk)
            except BlockingIOError:
                await asyncio.sleep(0.001)
        assert received.digest() == hashlib.sha256(payload).digest()
        client.shutdown(socket.SHUT_WR)
        backend.shutdown(socket.SHUT_WR)
        assert await asyncio.wait_for(done, 5) == "closed"
        client.close()
        backend.close()

    run(LOOPS[loop_name], main())
