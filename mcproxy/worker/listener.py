"""Accept connections; own the listening sockets, the open connections and what they share.

Each accepted socket becomes a :class:`~mcproxy.worker.connection.Connection`,
which takes it through the pipeline (PROXY header, firewall, admission,
ClientHello, route, L4 relay or L7 hand-off) driven by loop callbacks. This
module holds what connections share: the routing state, the firewall, the
limits, backend dialing, and the end of every connection (access log,
``on_finished`` callbacks).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import ipaddress
import logging
import os
import socket
import sys
from collections.abc import Callable
from typing import Any, Protocol

from mcproxy.health import route_targets
from mcproxy.ip import canonical_ip
from mcproxy.model import Address, Listener, ProxyState, Route, lookup_route
from mcproxy.settings import ProxyTimeouts
from mcproxy.worker.accesslog import AccessLog
from mcproxy.worker.balance import Balancer
from mcproxy.worker.clienthello import ClientHello
from mcproxy.worker.connection import Connection, Endpoint, L7Handler
from mcproxy.worker.deadlines import Deadlines
from mcproxy.worker.errors import Reason, Refused
from mcproxy.worker.firewall import CountryLookup, Firewall
from mcproxy.worker.poller import Poller
from mcproxy.worker.records import ConnectionRecord, RequestRecord

__all__ = ["Admission", "ConnectionServer", "L7Handler", "NoLimits"]

log = logging.getLogger("mcproxy.worker")

_ACCEPT_BATCH = 64
_NODELAY_INHERITED = sys.platform == "linux"
"""Linux copies TCP_NODELAY from a listening socket to the sockets it accepts."""


class Admission(Protocol):
    """Limits that are global across workers (invariant 4); shared memory implements it."""

    def admit(self, listener: Listener, ip: str) -> Reason | None: ...

    def release(self, listener: Listener) -> None: ...


class NoLimits:
    def admit(self, listener: Listener, ip: str) -> Reason | None:
        return None

    def release(self, listener: Listener) -> None:
        return None


def _endpoint(sockaddr: tuple[Any, ...]) -> tuple[str, int]:
    """``(ip, port)`` of a socket address, in the one form the firewall, logs and headers use.

    A dual-stack listener sees IPv4 clients as ``::ffff:a.b.c.d`` on both ends; unmapped,
    they match IPv4 firewall rules, log as IPv4 and go out in a TCP4 PROXY header.
    """
    return canonical_ip(sockaddr[0]), int(sockaddr[1])


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
        self.connections: set[Connection] = set()
        self._all_closed = asyncio.Event()
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
        self.access_log = AccessLog()
        self.poller = Poller(loop)
        """Watches the proxied sockets (relays, handshakes); the loop watches the poller."""
        self.deadlines = Deadlines(loop)
        """The L4 connections' deadlines, on one loop timer."""
        self._listening: dict[str, socket.socket] = {}
        self._local: dict[str, tuple[str, int]] = {}
        self.balancer = Balancer(loop.time, route_targets)  # type: ignore[arg-type]
        """Which backend each connection or request goes to (ARCHITECTURE.md, "Backends and
        health")."""

    def update_state(self, state: ProxyState) -> None:
        if state.firewall != self.state.firewall:
            self.firewall = Firewall(state.firewall, self.country_of)
        changed = state.listeners is not self.state.listeners
        self.state = state
        if changed:
            self.balancer.forget_routes(self._current_route)

    def _current_route(self, listener: str, hostname: str) -> Route | None:
        found = self.state.listeners.get(listener)
        return None if found is None else found.routes.get(hostname)

    # --- accepting -------------------------------------------------------------

    def start_listening(self, sockets: dict[str, socket.socket]) -> None:
        for addr, sock in sockets.items():
            sock.setblocking(False)
            if _NODELAY_INHERITED and sock.family in (socket.AF_INET, socket.AF_INET6):
                # Set once here rather than per accepted socket (one syscall less each).
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._listening[addr] = sock
            local = _endpoint(sock.getsockname())
            if local[0] not in ("0.0.0.0", "::"):  # one address: every connection's local end
                self._local[addr] = local
            self.loop.add_reader(sock.fileno(), self._accept, sock, addr)

    def listening(self) -> list[str]:
        """Addresses of the listeners this worker accepts on."""
        return list(self._listening)

    def close_listener(self, addr: str) -> None:
        """Stop accepting on one listener (removed at runtime); its connections go on."""
        sock = self._listening.pop(addr, None)
        self._local.pop(addr, None)
        if sock is not None:
            self.loop.remove_reader(sock.fileno())
            sock.close()

    def stop_listening(self) -> None:
        """Stop accepting; queued connections stay in the kernel for the next worker."""
        for sock in self._listening.values():
            self.loop.remove_reader(sock.fileno())
            sock.close()
        self._listening.clear()

    def _accept(self, listening: socket.socket, addr: str) -> None:
        # socket.accept() is _accept() plus a Python-level wrapper; build the socket here.
        raw_accept = listening._accept  # type: ignore[attr-defined]
        family, proto = listening.family, listening.proto
        nodelay = not _NODELAY_INHERITED
        for _ in range(_ACCEPT_BATCH):
            try:
                fd, peer = raw_accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: try again on the next event
                log.warning("accept on %s failed: %s", addr, exc)
                return
            sock = socket.socket(family, socket.SOCK_STREAM, proto, fd)
            sock.setblocking(False)
            if nodelay:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            local = self._local.get(addr) or _endpoint(sock.getsockname())
            # IPv4 peers (2-tuples; IPv6 ones have 4) come as canonical text already.
            client = peer if len(peer) == 2 else _endpoint(peer)
            record = ConnectionRecord(addr, client, local)
            for callback in self.on_started:
                callback(record)
            connection = Connection(self, sock, record)
            self.connections.add(connection)
            self.active_by_listener[addr] += 1
            self._all_closed.clear()
            connection.start()

    async def drain(self, timeout: float) -> None:
        """Wait for open connections to end by themselves, then cut the rest."""
        for callback in self.on_drain:
            callback()
        if self.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), timeout)
        for connection in list(self.connections):
            connection.abort()
        if self.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), 1.0)

    def finished(self, connection: Connection) -> None:
        """A connection ended: one access-log line, then the ``on_finished`` callbacks."""
        self.connections.discard(connection)
        addr = connection.record.listener
        self.active_by_listener[addr] -= 1
        if not self.active_by_listener[addr]:
            del self.active_by_listener[addr]
        self.access_log.write(connection.record.log_line())
        for callback in self.on_finished:
            callback(connection.record)
        if not self.connections:
            self._all_closed.set()

    # --- what connections ask (connection.Host, session.Gate) ------------------------

    def admit(self, listener: Listener, ip: str) -> Reason | None:
        return self.firewall.check(ip) or self.admission.admit(listener, ip)

    def release(self, listener: Listener) -> None:
        self.admission.release(listener)

    def next_backend(self, record: ConnectionRecord, route: Route) -> Address | None:
        return self.balancer.choose(
            record.listener, route, record.client_ip, record.failed_backends
        )

    def backend_failed(self, record: ConnectionRecord, route: Route, backend: Address) -> None:
        self.balancer.dial_failed(record.listener, route, backend)

    def backend_connected(self, route: Route, backend: Address) -> bool:
        return self.balancer.connected(route, backend)

    def backend_released(self, backend: Address) -> None:
        self.balancer.released(backend)

    @staticmethod
    def endpoint(sockaddr: tuple[Any, ...]) -> tuple[str, int]:
        return _endpoint(sockaddr)

    @staticmethod
    def route(listener: Listener, hello: ClientHello) -> Route:
        # Exact, then *.parent, then the catch-all "*" (ARCHITECTURE.md, "Routing").
        route = lookup_route(listener.routes, hello.sni)
        if route is None:
            sni = hello.sni
            raise Refused(Reason.NO_ROUTE, "no SNI" if sni is None else f"unknown SNI {sni!r}")
        return route

    @staticmethod
    def resolved(backend: Address) -> Endpoint | None:
        """The socket family and address of an IP-literal backend; None for a hostname."""
        return _ip_endpoint(backend.host, backend.port)

    async def resolve(self, backend: Address) -> Endpoint:
        """Family and address of any backend: IP literals at once, hostnames by getaddrinfo."""
        endpoint = _ip_endpoint(backend.host, backend.port)
        if endpoint is not None:
            return endpoint
        infos = await self.loop.getaddrinfo(backend.host, backend.port, type=socket.SOCK_STREAM)
        family, _, _, _, sockaddr = infos[0]
        return family, (str(sockaddr[0]), int(sockaddr[1]))

    async def dial(self, backend: Address, *, bounded: bool = True) -> socket.socket:
        """Connect to a backend within ``connect_timeout``; raises OSError or TimeoutError.

        ``bounded=False``: no deadline of its own, the caller has one (the L7 backend
        pool's ``connect_timeout``, which covers TLS and SETTINGS too).
        The connect is done here rather than by ``loop.sock_connect``, which in uvloop
        resolves even an IP literal through a thread pool on every call.
        """
        async with asyncio.timeout(self.timeouts.connect_timeout if bounded else None):
            family, address = await self.resolve(backend)
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                err = sock.connect_ex(address)
                if err == errno.EINPROGRESS:
                    writable = self.loop.create_future()
                    self.loop.add_writer(sock.fileno(), _set_once, writable)
                    try:
                        await writable
                    finally:
                        self.loop.remove_writer(sock.fileno())
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err))
            except BaseException:
                sock.close()
                raise
            return sock


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


@functools.lru_cache(maxsize=1024)
def _ip_endpoint(host: str, port: int) -> Endpoint | None:
    """Parsing an IP literal costs microseconds; a backend's is parsed once per worker."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return family, (host, port)
