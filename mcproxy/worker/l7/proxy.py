"""The L7 handler: sessions, backend dialing, idle timers, drain.

:class:`L7Proxy` is the listener's ``l7_handler``. For each connection it
finishes the TLS handshake over the raw socket (the ClientHello bytes the
listener read go in first), then hands the socket to an asyncio transport
whose protocol, a :class:`~mcproxy.worker.l7.channel.Channel`, only moves
bytes. Everything that decides anything is in the sans-I/O modules
(``bridge``, ``h2front``, ``h2back``, ``h11front``, ``pool``, ``router``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time

from mcproxy.model import Address, BackendProtocol, Route, lookup_route
from mcproxy.settings import ProxyTimeouts
from mcproxy.worker.clienthello import ClientHello
from mcproxy.worker.l7.backends import Choices
from mcproxy.worker.l7.bridge import Exchange
from mcproxy.worker.l7.certs import (
    BackendContexts,
    BackendTrust,
    CertStore,
    client_cert_header,
)
from mcproxy.worker.l7.channel import Channel, handshake
from mcproxy.worker.l7.clock import LoopClock
from mcproxy.worker.l7.h1back import H1Back
from mcproxy.worker.l7.h2back import H2Back
from mcproxy.worker.l7.h2front import H2Front
from mcproxy.worker.l7.h11front import H11Front
from mcproxy.worker.l7.pool import MAX_CONNECTIONS, BackendKey, BackendPool, ConnState, Dial
from mcproxy.worker.l7.router import Router
from mcproxy.worker.l7.tls import ALPN_H2, ALPN_HTTP1, TlsSession, backend_context
from mcproxy.worker.listener import ConnectionServer
from mcproxy.worker.proxy_protocol import encode_v2
from mcproxy.worker.records import ConnectionRecord, RequestRecord
from mcproxy.worker.relay import reset

__all__ = ["H1_MAX_CONNECTIONS", "L7Proxy", "backend_key"]

H1_MAX_CONNECTIONS = 256
"""Connections per HTTP/1.1 backend per worker: one request each (a WebSocket leaves the pool)."""


def backend_key(
    route: Route, proxy_header: bytes = b"", backend: Address | None = None
) -> BackendKey:
    """The pool a route's requests go to: address (``backend``, default the route's first),
    TLS, protocol, trust (and PROXY header)."""
    trust = BackendTrust(
        ca=route.backend_ca,
        server_name=route.backend_server_name,
        client_cert=route.backend_client_cert,
        client_key=route.backend_client_key,
    )
    address = backend if backend is not None else route.backend
    return BackendKey(address, route.backend_tls, proxy_header, route.backend_protocol, trust)


log = logging.getLogger("mcproxy.l7")


class _Session:
    """One client connection after its handshake: a leg, its router, its idle timer."""

    def __init__(
        self,
        proxy: L7Proxy,
        record: ConnectionRecord,
        route: Route,
        client_cert: bytes | None = None,
    ) -> None:
        self.proxy = proxy
        self.record = record
        self.hostname = route.hostname
        self.private: dict[BackendKey, BackendPool] = {}
        self._shared: dict[Address, tuple[Route, BackendPool]] = {}
        """The shared pool last found per backend, with the route it was found for: routes
        are immutable and pools are never dropped, so while the route object is the same the
        pool is (building and hashing a ``BackendKey`` per request was ~2% of the CPU)."""
        self.leg: H2Front | H11Front | None = None
        self.channel: Channel | None = None
        self.idle_timed_out = False
        self._idle: asyncio.TimerHandle | None = None
        self.choices = Choices(
            proxy.server.balancer, record.listener, record.client_ip, self._group_of
        )
        self.router = Router(
            lookup=self._lookup,
            client_ip=record.client_ip,
            group_for=self._group_for,
            on_finished=self._finished,
            hostname=route.hostname,
            on_dial=self._dialed,
            timers=proxy.clock,
            idle_timeout=proxy.timeouts.idle_timeout,
            route_for=self._route_for,
            on_routed=self._routed,
            client_cert=client_cert,
        )

    def _lookup(self) -> Route | None:
        # The SNI's route now (ARCHITECTURE.md, "Routing"); another one than the
        # handshake's (removed, or a more specific route added) answers 421.
        listener = self.proxy.server.state.listeners.get(self.record.listener)
        route = lookup_route(listener.routes, self.record.sni) if listener is not None else None
        return route if route is not None and route.hostname == self.hostname else None

    def _route_for(self, name: str) -> Route | None:
        """The route serving ``name`` on this listener, matched as SNI is (for 421)."""
        listener = self.proxy.server.state.listeners.get(self.record.listener)
        return lookup_route(listener.routes, name) if listener is not None else None

    def _group_for(self, route: Route) -> BackendPool:
        return self._group_of(route, self.choices.choose(route))

    def _routed(self, exchange: Exchange, route: Route) -> None:
        home = exchange.home  # a BackendPool; the bridge knows it only as a queue
        if isinstance(home, BackendPool):
            self.choices.routed(exchange, route, home.key.backend)

    def _group_of(self, route: Route, backend: Address) -> BackendPool:
        if not route.send_proxy_protocol:
            cached = self._shared.get(backend)
            if cached is not None and cached[0] is route:
                return cached[1]
            shared = self.proxy.group(backend_key(route, backend=backend))
            self._shared[backend] = (route, shared)
            return shared
        # The PROXY header names this client: a pool of its own, closed with the connection.
        header = encode_v2(self.record.client, self.record.local)
        key = backend_key(route, header, backend=backend)
        pool = self.private.get(key)
        if pool is None:
            pool = self.private[key] = self.proxy.new_pool(key)
        return pool

    def _dialed(self, seconds: float) -> None:
        if self.record.dial_seconds is None:
            self.record.dial_seconds = seconds

    def _finished(self, exchange: Exchange) -> None:
        backend, failed = self.choices.finished(exchange)
        home = exchange.home
        protocol = home.key.protocol if isinstance(home, BackendPool) else None
        request = RequestRecord(
            listener=self.record.listener,
            route=exchange.route,
            method=exchange.method,
            status=exchange.status,
            duration=exchange.duration,
            bytes_in=exchange.request.forwarded,
            bytes_out=exchange.response.forwarded,
            blocked_by=exchange.blocked_by.value if exchange.blocked_by else None,
            backend_protocol=protocol.value if protocol is not None else None,
            websocket=protocol is BackendProtocol.H1 and exchange.method == "CONNECT",
            backend=backend,
            failed_backends=failed,
        )
        extra = f" proto={request.backend_protocol}" if request.backend_protocol else ""
        if request.websocket:
            extra += " websocket=1"
        if request.blocked_by:
            extra += f" blocked_by={request.blocked_by}"
        if backend is not None:
            extra += f" backend={backend}"
        if failed:
            extra += " failed=" + ",".join(map(str, failed))
        if exchange.detail:
            extra += ' detail="' + exchange.detail.replace('"', "'") + '"'
        self.proxy.server.access_log.write(
            f"request client={self.record.client_ip} route={request.route} "
            f"method={request.method or '-'} status={request.status} in={request.bytes_in} "
            f"out={request.bytes_out} duration={request.duration:.3f}{extra}"
        )
        for callback in self.proxy.server.on_request:
            try:
                callback(request)
            except Exception:
                log.exception("on_request callback failed")

    async def run(self, sock: socket.socket, tls: TlsSession) -> str:
        loop = self.proxy.loop
        channel = Channel(loop, tls, early=tls.read(), pause_reading_when_full=True)
        head_timeout = self.proxy.timeouts.handshake_timeout
        if tls.alpn == ALPN_H2:
            self.leg = H2Front(channel, self.router, head_timeout=head_timeout)
        else:
            self.leg = H11Front(channel, self.router, self.hostname, head_timeout=head_timeout)
        channel.leg = self.leg
        self.channel = channel
        await loop.connect_accepted_socket(lambda: channel, sock)
        if self.proxy.draining:
            self.leg.begin_drain()
        self._idle = loop.call_later(self.proxy.timeouts.idle_timeout, self._check_idle)
        try:
            await asyncio.shield(channel.lost)
        except asyncio.CancelledError:
            channel.abort()
            raise
        finally:
            if self._idle is not None:
                self._idle.cancel()
            self.record.bytes_up += channel.bytes_in
            self.record.bytes_down += channel.bytes_out
            self.router.close()
            for pool in self.private.values():
                pool.close()
        if self.idle_timed_out:
            return "idle_timeout"
        return self.leg.outcome or "closed"

    def _check_idle(self) -> None:
        assert self.channel is not None and self.leg is not None
        timeout = self.proxy.timeouts.idle_timeout
        remaining = self.channel.last_activity + timeout - self.proxy.loop.time()
        if self.router.open_exchanges == 0 and remaining <= 0:
            # Only a connection with nothing open is idle: a quiet stream is not.
            self.idle_timed_out = True
            self.leg.begin_drain()
            return
        self._idle = self.proxy.loop.call_later(max(remaining, timeout / 4), self._check_idle)


class L7Proxy:
    """Everything L7 in one worker: certificates, the backend pool, the open sessions."""

    def __init__(self, server: ConnectionServer, backend_tls: ssl.SSLContext | None = None) -> None:
        self.server = server
        self.loop = server.loop
        self.timeouts: ProxyTimeouts = server.timeouts
        self.certs = CertStore()
        self.backend_tls = backend_tls or backend_context()
        http1 = backend_context(alpn=ALPN_HTTP1)  # at boot: a bad $MCPROXY_BACKEND_CA fails here
        defaults = {ALPN_H2: self.backend_tls, ALPN_HTTP1: http1}
        self.backend_contexts = BackendContexts(default=defaults.__getitem__)
        self.clock = LoopClock(self.loop)
        self.pool: dict[BackendKey, BackendPool] = {}
        self.sessions: set[_Session] = set()
        self.draining = False
        self._dials: set[asyncio.Task[None]] = set()

    def install(self) -> None:
        self.server.l7_handler = self.handle
        self.server.on_drain.append(self.drain)

    def group(self, key: BackendKey) -> BackendPool:
        pool = self.pool.get(key)
        if pool is None:
            pool = self.pool[key] = self.new_pool(key)
        return pool

    def new_pool(self, key: BackendKey) -> BackendPool:
        h1 = key.protocol is BackendProtocol.H1
        return BackendPool(
            key,
            self.dial,
            self.clock,
            connect_timeout=self.timeouts.connect_timeout,
            idle_timeout=self.timeouts.idle_timeout,
            max_connections=H1_MAX_CONNECTIONS if h1 else MAX_CONNECTIONS,
        )

    # --- client connections ---------------------------------------------------------------

    async def handle(
        self, sock: socket.socket, consumed: bytes, hello: ClientHello, record: ConnectionRecord
    ) -> None:
        route = record.route
        assert route is not None and route.tls_cert is not None and route.tls_key is not None
        try:
            context = self.certs.context(route.tls_cert, route.tls_key, route.client_ca)
        except (OSError, ssl.SSLError) as exc:
            record.outcome, record.detail = "tls_error", f"certificate: {exc}"
            reset(sock)
            return
        tls = TlsSession(context, server_side=True)
        tls.receive(consumed)
        record.bytes_up = len(consumed)
        counts = [0, 0]
        deadline = self.loop.time() + (
            record.started + self.timeouts.handshake_timeout - time.monotonic()
        )
        try:
            await handshake(sock, tls, deadline, counts)
        except TimeoutError:
            record.outcome, record.detail = "handshake_timeout", "TLS handshake not done in time"
            reset(sock)
            return
        except (ssl.SSLError, OSError) as exc:
            record.outcome, record.detail = "tls_error", str(exc)
            with contextlib.suppress(OSError):
                sock.send(tls.data_to_send())  # the alert, if any: best effort
            sock.close()
            return
        finally:
            record.bytes_up += counts[0]
            record.bytes_down += counts[1]
        der = tls.peer_certificate() if route.client_ca else None
        session = _Session(self, record, route, client_cert_header(der) if der else None)
        self.sessions.add(session)
        try:
            record.outcome = await session.run(sock, tls)
        finally:
            self.sessions.discard(session)

    def drain(self) -> None:
        """Graceful shutdown: GOAWAY to every client, close idle backend connections."""
        self.draining = True
        for session in list(self.sessions):
            if session.leg is not None:
                session.leg.begin_drain()
            for private in session.private.values():
                private.drain()  # PROXY-protocol pools: their WebSocket tunnels close too
        for pool in self.pool.values():
            pool.drain()

    # --- backend connections -------------------------------------------------------------

    def dial(self, attempt: Dial) -> None:
        """Start a dial for a pool; the pool's timer bounds it by ``connect_timeout``."""
        task = self.loop.create_task(self._dial(attempt))
        attempt.cancel = task.cancel
        self._dials.add(task)
        task.add_done_callback(self._dials.discard)

    async def _dial(self, attempt: Dial) -> None:
        backend = attempt.key.backend
        try:
            leg = await self._connect(attempt.key)
        except asyncio.CancelledError:
            return  # the pool gave up (connect_timeout) and already answered
        except TimeoutError:
            attempt.failed(504, f"backend {backend} not reachable within connect_timeout")
            return
        except (OSError, ssl.SSLError, ConnectionError) as exc:
            attempt.failed(502, f"backend {backend} unreachable: {exc}")
            return
        attempt.connected(leg)

    async def _connect(self, key: BackendKey) -> H2Back | H1Back:
        """Dial, [PROXY v2], [TLS], and start HTTP/2 or HTTP/1.1.

        HTTP/2 is READY with the backend's SETTINGS; HTTP/1.1 once the transport is up.
        TLS verifies with the route's trust (``backend_ca``, ``backend_server_name``) and
        presents its client certificate, if any.
        """
        h1 = key.protocol is BackendProtocol.H1
        alpn = ALPN_HTTP1 if h1 else ALPN_H2
        sock = await self.server.dial(key.backend, bounded=False)  # the pool's timer bounds it
        channel: Channel | None = None
        try:
            if key.proxy_header:
                await self.loop.sock_sendall(sock, key.proxy_header)
            tls = None
            if key.tls:
                context = self.backend_contexts.context(key.trust, alpn)
                host = key.trust.server_name or key.backend.host
                tls = TlsSession(context, server_side=False, server_hostname=host)
                await handshake(sock, tls, None)
                if tls.alpn not in (alpn, None):
                    raise ConnectionError(f"backend chose ALPN {tls.alpn!r}, not {alpn}")
            channel = Channel(self.loop, tls, early=tls.read() if tls else b"")
            leg: H2Back | H1Back = H1Back(channel) if h1 else H2Back(channel)
            channel.leg = leg
            await self.loop.connect_accepted_socket(lambda: channel, sock)
            if isinstance(leg, H1Back) and not leg.closed:
                leg.tls = tls
                leg.transition(ConnState.READY)
        except BaseException:
            if channel is not None and channel.transport is not None:
                channel.abort()
            else:
                sock.close()
            raise
        return leg
