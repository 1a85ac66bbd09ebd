"""Accept connections and take each through the front half of the pipeline.

accept -> [PROXY header] -> firewall (real client IP) -> admission (limits)
-> ClientHello -> SNI -> route -> L4 relay, or hand-off to the L7 proxy.

This is thin glue: the protocol work is in the sans-I/O ``proxy_protocol``,
``clienthello`` and ``firewall`` modules. Every read is bounded in size (by the
decoders) and in time (``handshake_timeout``, and 5 s for a PROXY header).
Any :class:`Refused` ends in a RST; any other error ends this connection alone
(invariant 8).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from mcproxy.config import ProxyTimeouts
from mcproxy.model import Address, Listener, Mode, ProxyState, Route, normalize_hostname
from mcproxy.worker.clienthello import ClientHello, ClientHelloError, ClientHelloParser
from mcproxy.worker.errors import Reason, Refused
from mcproxy.worker.firewall import CountryLookup, Firewall, client_ip
from mcproxy.worker.proxy_protocol import ProxyHeaderDecoder, ProxyHeaderError, encode_v2
from mcproxy.worker.records import ConnectionRecord, RequestRecord
from mcproxy.worker.relay import Relay, reset

__all__ = ["Admission", "ConnectionServer", "L7Handler", "NoLimits"]

log = logging.getLogger("mcproxy.worker")
access_log = logging.getLogger("mcproxy.access")

PROXY_HEADER_TIMEOUT = 5.0
"""The PROXY spec's advice: a header comes at once or the peer is not a proxy."""
_READ_SIZE = 4096
_ACCEPT_BATCH = 64


class Admission(Protocol):
    """Limits that are global across workers (invariant 4); shared memory implements it."""

    def admit(self, listener: Listener, ip: str) -> Reason | None: ...

    def release(self, listener: Listener) -> None: ...


class NoLimits:
    def admit(self, listener: Listener, ip: str) -> Reason | None:
        return None

    def release(self, listener: Listener) -> None:
        return None


L7Handler = Callable[[socket.socket, bytes, ClientHello, ConnectionRecord], Awaitable[None]]
"""Takes over a client socket whose ClientHello bytes were already read."""


def _endpoint(sockaddr: tuple[Any, ...]) -> tuple[str, int]:
    """``(ip, port)`` of a socket address, in the one form the firewall, logs and headers use.

    A dual-stack listener sees IPv4 clients as ``::ffff:a.b.c.d`` on both ends; unmapped,
    they match IPv4 firewall rules, log as IPv4 and go out in a TCP4 PROXY header.
    """
    return client_ip(sockaddr[0]), int(sockaddr[1])


class ConnectionServer:
    """Owns this worker's listening sockets and its open connections."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        timeouts: ProxyTimeouts,
        admission: Admission | None = None,
        country_of: CountryLookup | None = None,
    ) -> None:
        self.loop = loop
        self.timeouts = timeouts
        self.admission: Admission = admission or NoLimits()
        self.country_of = country_of
        self.l7_handler: L7Handler | None = None
        self.state = ProxyState()
        self.firewall = Firewall(self.state.firewall)
        self.connections: set[asyncio.Task[None]] = set()
        self.active_by_listener: collections.Counter[str] = collections.Counter()
        """Open connections per listener address, reported in heartbeats."""
        self.on_started: list[Callable[[ConnectionRecord], None]] = []
        """Called once per accepted connection, before anything is read (metrics)."""
        self.on_finished: list[Callable[[ConnectionRecord], None]] = []
        """Called once per connection when it ends (access log, metrics)."""
        self.on_request: list[Callable[[RequestRecord], None]] = []
        """Called once per L7 request when it ends; the L7 handler calls these."""
        self.on_drain: list[Callable[[], None]] = []
        """Called when draining starts, so that handlers can wind down (HTTP/2 GOAWAY)."""
        self._listening: dict[str, socket.socket] = {}

    def update_state(self, state: ProxyState) -> None:
        if state.firewall != self.state.firewall:
            self.firewall = Firewall(state.firewall, self.country_of)
        self.state = state

    # --- accepting -------------------------------------------------------------

    def start_listening(self, sockets: dict[str, socket.socket]) -> None:
        for addr, sock in sockets.items():
            sock.setblocking(False)
            self._listening[addr] = sock
            self.loop.add_reader(sock.fileno(), self._accept, sock, addr)

    def stop_listening(self) -> None:
        """Stop accepting; queued connections stay in the kernel for the next worker."""
        for sock in self._listening.values():
            self.loop.remove_reader(sock.fileno())
            sock.close()
        self._listening.clear()

    def _accept(self, listening: socket.socket, addr: str) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, peer = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: try again on the next event
                log.warning("accept on %s failed: %s", addr, exc)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = self.loop.create_task(self._serve(sock, peer, addr))
            self.connections.add(task)
            self.active_by_listener[addr] += 1
            task.add_done_callback(functools.partial(self._finished, addr))

    def _finished(self, addr: str, task: asyncio.Task[None]) -> None:
        self.connections.discard(task)
        self.active_by_listener[addr] -= 1
        if not self.active_by_listener[addr]:
            del self.active_by_listener[addr]

    async def drain(self, timeout: float) -> None:
        """Wait for open connections to end by themselves, then cut the rest."""
        for callback in self.on_drain:
            callback()
        if self.connections:
            await asyncio.wait(set(self.connections), timeout=timeout)
        for task in list(self.connections):
            task.cancel()
        if self.connections:
            await asyncio.wait(set(self.connections), timeout=1.0)

    # --- one connection ----------------------------------------------------------

    async def _serve(self, sock: socket.socket, peer: tuple[str, int], addr: str) -> None:
        record = ConnectionRecord(addr, _endpoint(peer), _endpoint(sock.getsockname()))
        for callback in self.on_started:
            callback(record)
        admitted: Listener | None = None
        try:
            listener = self.state.listeners.get(addr)
            if listener is None:
                raise Refused(Reason.NO_ROUTE, "listener removed")
            deadline = self.loop.time() + self.timeouts.handshake_timeout
            if listener.proxy_protocol:
                pending = await self._read_proxy_header(sock, record, deadline)
            else:
                pending = b""
            self._check_firewall(record.client_ip)
            reason = self.admission.admit(listener, record.client_ip)
            if reason is not None:
                raise Refused(reason)
            admitted = listener
            consumed, hello = await self._read_client_hello(sock, pending, deadline)
            record.sni = hello.sni
            route = self._route(listener, hello)
            record.route = route
            if route.mode is Mode.L7:
                if self.l7_handler is None:
                    raise Refused(Reason.NO_ROUTE, "L7 routes are not served by this build")
                await self.l7_handler(sock, consumed, hello, record)
            else:
                await self._relay(sock, consumed, route, record)
        except Refused as refused:
            record.outcome = f"refused:{refused.reason}"
            record.detail = refused.detail
            reset(sock)
        except asyncio.CancelledError:
            record.outcome = "cancelled"
            reset(sock)
            raise
        except Exception as exc:  # invariant 8: this connection alone ends
            record.outcome = "error"
            record.detail = f"{type(exc).__name__}: {exc}"
            log.exception("connection from %s failed", record.client_ip)
            reset(sock)
        finally:
            if admitted is not None:
                self.admission.release(admitted)
            access_log.info(record.log_line())
            for callback in self.on_finished:
                callback(record)

    def _check_firewall(self, ip: str) -> None:
        reason = self.firewall.check(ip)
        if reason is not None:
            raise Refused(reason)

    async def _read_proxy_header(
        self, sock: socket.socket, record: ConnectionRecord, deadline: float
    ) -> bytes:
        """Read the PROXY header and return the bytes that followed it (the ClientHello's start).

        The header's source becomes the client and its destination the local end, as
        HAProxy does: what the firewall, the log and a forwarded PROXY header show is
        the connection as the real client made it, not the hop from the upstream proxy.
        LOCAL, UNKNOWN and address-less families keep the TCP endpoints.
        """
        decoder = ProxyHeaderDecoder()
        try:
            async with asyncio.timeout_at(min(deadline, self.loop.time() + PROXY_HEADER_TIMEOUT)):
                while True:
                    data = await self.loop.sock_recv(sock, _READ_SIZE)
                    if not data:
                        raise Refused(Reason.PROXY_HEADER, "closed before the header")
                    header = decoder.feed(data)
                    if header is not None:
                        break
        except TimeoutError:
            raise Refused(Reason.PROXY_HEADER, "no header in time") from None
        except ProxyHeaderError as exc:
            raise Refused(Reason.PROXY_HEADER, str(exc)) from None
        if header.source is not None and header.destination is not None:
            record.client = _endpoint(header.source)
            record.local = _endpoint(header.destination)
        return decoder.leftover

    async def _read_client_hello(
        self, sock: socket.socket, pending: bytes, deadline: float
    ) -> tuple[bytes, ClientHello]:
        parser = ClientHelloParser()
        try:
            hello = parser.feed(pending) if pending else None
            async with asyncio.timeout_at(deadline):
                while hello is None:
                    data = await self.loop.sock_recv(sock, _READ_SIZE)
                    if not data:
                        raise Refused(Reason.CLIENT_HELLO, "closed before the ClientHello")
                    hello = parser.feed(data)
        except TimeoutError:
            raise Refused(Reason.CLIENT_HELLO, "no ClientHello in time") from None
        except ClientHelloError as exc:
            raise Refused(Reason.CLIENT_HELLO, str(exc)) from None
        return parser.consumed, hello

    @staticmethod
    def _route(listener: Listener, hello: ClientHello) -> Route:
        if hello.sni is None:
            raise Refused(Reason.NO_ROUTE, "no SNI")
        hostname = normalize_hostname(hello.sni)
        route = listener.routes.get(hostname) if hostname else None
        if route is None:
            raise Refused(Reason.NO_ROUTE, f"unknown SNI {hello.sni!r}")
        return route

    # --- L4 ------------------------------------------------------------------

    async def dial(self, backend: Address) -> socket.socket:
        """Connect to a backend within ``connect_timeout``; raises OSError or TimeoutError."""
        async with asyncio.timeout(self.timeouts.connect_timeout):
            family, address = await self._resolve(backend)
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await self.loop.sock_connect(sock, address)
            except BaseException:
                sock.close()
                raise
            return sock

    async def _resolve(self, backend: Address) -> tuple[socket.AddressFamily, tuple[str, int]]:
        try:
            ip = ipaddress.ip_address(backend.host)
        except ValueError:
            infos = await self.loop.getaddrinfo(backend.host, backend.port, type=socket.SOCK_STREAM)
            family, _, _, _, sockaddr = infos[0]
            return family, (str(sockaddr[0]), int(sockaddr[1]))
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        return family, (backend.host, backend.port)

    async def _relay(
        self, client: socket.socket, consumed: bytes, route: Route, record: ConnectionRecord
    ) -> None:
        dial_started = self.loop.time()
        try:
            backend = await self.dial(route.backend)
            record.dial_seconds = self.loop.time() - dial_started
        except TimeoutError:
            record.outcome, record.detail = (
                "backend_timeout",
                f"no connection in {self.timeouts.connect_timeout}s",
            )
            reset(client)
            return
        except OSError as exc:
            record.outcome, record.detail = "backend_unreachable", str(exc)
            reset(client)
            return
        first = consumed
        if route.send_proxy_protocol:
            first = encode_v2(record.client, record.local) + consumed
        try:
            await self.loop.sock_sendall(backend, first)
        except OSError as exc:
            record.outcome, record.detail = "backend_reset", str(exc)
            reset(client)
            reset(backend)
            return
        relay = Relay(self.loop, client, backend, self.timeouts.idle_timeout)
        try:
            record.outcome = await asyncio.shield(relay.done)
        except asyncio.CancelledError:
            relay.finish("cancelled")
            raise
        finally:
            record.bytes_up = relay.bytes_up + len(consumed)
            record.bytes_down = relay.bytes_down
