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
from collections.abc import Callable

from mcproxy.model import Route
from mcproxy.settings import ProxyTimeouts
from mcproxy.worker.clienthello import ClientHello
from mcproxy.worker.l7.bridge import Exchange
from mcproxy.worker.l7.certs import CertStore
from mcproxy.worker.l7.channel import Channel, handshake
from mcproxy.worker.l7.h2back import H2Back
from mcproxy.worker.l7.h2front import H2Front
from mcproxy.worker.l7.h11front import H11Front
from mcproxy.worker.l7.pool import BackendGroup, BackendKey
from mcproxy.worker.l7.router import Router
from mcproxy.worker.l7.tls import ALPN_H2, TlsSession, backend_context
from mcproxy.worker.listener import ConnectionServer
from mcproxy.worker.proxy_protocol import encode_v2
from mcproxy.worker.records import ConnectionRecord, RequestRecord
from mcproxy.worker.relay import reset

__all__ = ["L7Proxy"]

log = logging.getLogger("mcproxy.l7")


class _Session:
    """One client connection after its handshake: a leg, its router, its idle timer."""

    def __init__(self, proxy: L7Proxy, record: ConnectionRecord, route: Route) -> None:
        self.proxy = proxy
        self.record = record
        self.hostname = route.hostname
        self.private: dict[BackendKey, BackendGroup] = {}
        self.leg: H2Front | H11Front | None = None
        self.channel: Channel | None = None
        self.idle_timed_out = False
        self._idle: asyncio.TimerHandle | None = None
        self.router = Router(
            lookup=self._lookup,
            client_ip=record.client_ip,
            group_for=self._group_for,
            on_finished=self._finished,
            hostname=route.hostname,
            on_dial=self._dialed,
        )

    def _lookup(self) -> Route | None:
        listener = self.proxy.server.state.listeners.get(self.record.listener)
        return listener.routes.get(self.hostname) if listener is not None else None

    def _group_for(self, route: Route) -> BackendGroup:
        key = BackendKey(route.backend, route.backend_tls)
        if not route.send_proxy_protocol:
            return self.proxy.group(key)
        group = self.private.get(key)
        if group is None:
            header = encode_v2(self.record.client, self.record.local)
            group = BackendGroup(key, lambda g: self.proxy.dial(g, header))
            self.private[key] = group
        return group

    def _dialed(self, seconds: float) -> None:
        if self.record.dial_seconds is None:
            self.record.dial_seconds = seconds

    def _finished(self, exchange: Exchange) -> None:
        request = RequestRecord(
            listener=self.record.listener,
            route=exchange.route,
            method=exchange.method,
            status=exchange.status,
            duration=exchange.duration,
            bytes_in=exchange.request.forwarded,
            bytes_out=exchange.response.forwarded,
            blocked_by=exchange.blocked_by.value if exchange.blocked_by else None,
        )
        extra = f" blocked_by={request.blocked_by}" if request.blocked_by else ""
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
        if tls.alpn == ALPN_H2:
            self.leg = H2Front(channel, self.router)
        else:
            self.leg = H11Front(channel, self.router, self.hostname)
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
            for group in self.private.values():
                for leg in group.connections():
                    leg.close()
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
        self.pool: dict[BackendKey, BackendGroup] = {}
        self.sessions: set[_Session] = set()
        self.draining = False
        self._dials: set[asyncio.Task[None]] = set()

    def install(self) -> None:
        self.server.l7_handler = self.handle
        self.server.on_drain.append(self.drain)

    def group(self, key: BackendKey) -> BackendGroup:
        group = self.pool.get(key)
        if group is None:
            group = self.pool[key] = BackendGroup(key, lambda g: self.dial(g, None))
        return group

    # --- client connections ---------------------------------------------------------------

    async def handle(
        self, sock: socket.socket, consumed: bytes, hello: ClientHello, record: ConnectionRecord
    ) -> None:
        route = record.route
        assert route is not None and route.tls_cert is not None and route.tls_key is not None
        try:
            context = self.certs.context(route.tls_cert, route.tls_key)
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
        session = _Session(self, record, route)
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
        for group in self.pool.values():
            for leg in group.connections():
                leg.retire_when_idle()

    # --- backend connections -------------------------------------------------------------

    def dial(self, group: BackendGroup, proxy_header: bytes | None) -> None:
        task = self.loop.create_task(self._dial(group, proxy_header))
        self._dials.add(task)
        task.add_done_callback(self._dials.discard)

    async def _dial(self, group: BackendGroup, proxy_header: bytes | None) -> None:
        started = self.loop.time()
        backend = group.key.backend
        try:
            async with asyncio.timeout(self.timeouts.connect_timeout):
                leg = await self._connect(group.key, proxy_header)
        except TimeoutError:
            group.dial_failed(504, f"backend {backend} not ready within connect_timeout")
            return
        except (OSError, ssl.SSLError, ConnectionError) as exc:
            group.dial_failed(502, f"backend {backend} unreachable: {exc}")
            return
        seconds = self.loop.time() - started
        for exchange in group.waiting:  # every connection that waited for this dial
            if exchange.on_dial is not None:
                exchange.on_dial(seconds)
        group.connected(leg)

    async def _connect(self, key: BackendKey, proxy_header: bytes | None) -> H2Back:
        """Dial, [PROXY v2], [TLS], HTTP/2 preface, and wait for the backend's SETTINGS."""
        sock = await self.server.dial(key.backend)
        channel: Channel | None = None
        try:
            if proxy_header:
                await self.loop.sock_sendall(sock, proxy_header)
            tls = None
            if key.tls:
                host = key.backend.host
                tls = TlsSession(self.backend_tls, server_side=False, server_hostname=host)
                await handshake(sock, tls, self.loop.time() + self.timeouts.connect_timeout)
                if tls.alpn not in (ALPN_H2, None):
                    raise ConnectionError(f"backend chose ALPN {tls.alpn!r}, not h2")
            channel = Channel(self.loop, tls, early=tls.read() if tls else b"")
            leg = H2Back(channel)
            channel.leg = leg
            ready: asyncio.Future[None] = self.loop.create_future()

            def on_ready() -> None:
                if not ready.done():
                    ready.set_result(None)

            leg.on_ready = on_ready
            await self.loop.connect_accepted_socket(lambda: channel, sock)
            lost = channel.lost
            await asyncio.wait({ready, lost}, return_when=asyncio.FIRST_COMPLETED)
            if not ready.done():
                raise ConnectionError(leg.failure or "backend closed before its HTTP/2 SETTINGS")
        except BaseException:
            if channel is not None and channel.transport is not None:
                channel.abort()
            else:
                sock.close()
            raise
        leg.on_closed = self._idle_timer(channel, leg)
        return leg

    def _idle_timer(self, channel: Channel, leg: H2Back) -> Callable[[], None]:
        """Close the backend connection after ``idle_timeout`` without streams."""
        timeout = self.timeouts.idle_timeout
        handle: list[asyncio.TimerHandle] = []

        def check() -> None:
            remaining = channel.last_activity + timeout - self.loop.time()
            if not leg.streams and remaining <= 0:
                leg.close()
                return
            handle[:] = [self.loop.call_later(max(remaining, timeout / 4), check)]

        handle.append(self.loop.call_later(timeout, check))
        return handle[0].cancel
