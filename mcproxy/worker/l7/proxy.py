"""The asyncio glue of the L7 proxy: TLS handshakes, transports, dialing, timers.

:class:`L7Proxy` is the listener's ``l7_handler``. For each connection it
finishes the TLS handshake over the raw socket (the ClientHello bytes the
listener read go in first), then hands the socket to an asyncio transport
whose protocol, :class:`Channel`, only moves bytes: socket -> TLS -> leg and
leg -> TLS -> socket. Everything that decides anything is in the sans-I/O
modules (``bridge``, ``h2legs``, ``h11front``, ``pool``, ``router``).

A leg's output is flushed once per event-loop iteration (``wake`` schedules
it), so the many small writes an exchange makes coalesce. A client
transport whose write buffer is full stops reading too, so a client that
does not read cannot make the proxy queue its PING or SETTINGS answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
import time
from collections.abc import Callable
from typing import cast

from mcproxy.config import ProxyTimeouts
from mcproxy.model import Route
from mcproxy.worker.clienthello import ClientHello
from mcproxy.worker.l7.bridge import Exchange
from mcproxy.worker.l7.certs import CertStore
from mcproxy.worker.l7.h2legs import H2Back, H2Front
from mcproxy.worker.l7.h11front import H11Front
from mcproxy.worker.l7.pool import BackendGroup, BackendKey
from mcproxy.worker.l7.router import Router
from mcproxy.worker.l7.tls import ALPN_H2, TlsSession, backend_context
from mcproxy.worker.listener import ConnectionServer
from mcproxy.worker.proxy_protocol import encode_v2
from mcproxy.worker.records import ConnectionRecord, RequestRecord
from mcproxy.worker.relay import reset

__all__ = ["Channel", "L7Proxy"]

log = logging.getLogger("mcproxy.l7")
access_log = logging.getLogger("mcproxy.access")

WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024
_RECV_SIZE = 64 * 1024
_LINGER_RESET = struct.pack("ii", 1, 0)

Leg = H2Front | H11Front | H2Back


class Channel(asyncio.Protocol):
    """One socket under one leg, with TLS in between when there is TLS."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        tls: TlsSession | None,
        early: bytes = b"",
        pause_reading_when_full: bool = False,
    ) -> None:
        self.loop = loop
        self.tls = tls
        self.leg: Leg | None = None
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = loop.create_future()
        self.bytes_in = 0
        self.bytes_out = 0
        self.last_activity = loop.time()
        self._early = early
        self._pause_reading_when_full = pause_reading_when_full
        self._flush_scheduled = False
        self._closing = False
        self._leg_paused = False
        self._write_paused = False
        self._reading_paused = False

    # --- LegIO --------------------------------------------------------------------------

    def wake(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)

    def schedule(self, callback: Callable[[], None]) -> None:
        self.loop.call_soon(self._guarded, callback)

    def pause_reading(self) -> None:
        self._leg_paused = True
        self._update_reading()

    def resume_reading(self) -> None:
        self._leg_paused = False
        self._update_reading()

    def close(self) -> None:
        self._closing = True
        self.wake()

    def abort(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        transport.abort()

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        early, self._early = self._early, b""
        if early:  # plaintext that came with the end of the TLS handshake: it goes first
            self._guarded(lambda: self._receive_plaintext(early))
        self.flush()

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self.last_activity = self.loop.time()
        self._guarded(lambda: self._receive(data))
        self.flush()

    def _receive(self, data: bytes) -> None:
        assert self.leg is not None
        if self.tls is None:
            self.leg.receive_data(data)
            return
        self.tls.receive(data)
        self._receive_plaintext(self.tls.read())

    def _receive_plaintext(self, plaintext: bytes) -> None:
        assert self.leg is not None
        if plaintext:
            self.leg.receive_data(plaintext)
        if self.tls is not None and self.tls.closed:
            self.leg.receive_eof()

    def eof_received(self) -> bool | None:
        if self.leg is not None:
            self._guarded(self.leg.receive_eof)
        self.flush()
        return True  # keep our side open until the leg closes it (flushes first)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.leg is not None:
            self._guarded(self.leg.connection_lost)
        if not self.lost.done():
            self.lost.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.leg is not None:
            self.leg.set_writable(False)
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()
        if self.leg is not None:
            self._guarded(self._set_writable)
        self.flush()

    def _set_writable(self) -> None:
        assert self.leg is not None
        self.leg.set_writable(True)

    # --- plumbing -------------------------------------------------------------------------------

    def flush(self) -> None:
        self._flush_scheduled = False
        self._guarded(self._flush)

    def _flush(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or self.leg is None:
            return
        out = self.leg.data_to_send()
        if self.tls is not None:
            if out:
                self.tls.write(out)
            if self._closing:
                self.tls.close()
            out = self.tls.data_to_send()
        if out:
            self.bytes_out += len(out)
            transport.write(out)
        if self._closing:
            transport.close()

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        paused = self._leg_paused or (self._write_paused and self._pause_reading_when_full)
        if paused and not self._reading_paused:
            self._reading_paused = True
            transport.pause_reading()
        elif not paused and self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()

    def _guarded(self, callback: Callable[[], None]) -> None:
        """Run leg code; a bug there ends this connection alone (invariant 8)."""
        try:
            callback()
        except Exception:
            log.exception("L7 connection failed")
            self.abort()


async def _handshake(
    sock: socket.socket, tls: TlsSession, deadline: float, counts: list[int] | None = None
) -> None:
    """Drive ``tls`` to the end of its handshake over ``sock`` by ``deadline`` (loop time).

    Raises TimeoutError, ssl.SSLError, or OSError/ConnectionError. ``counts``
    collects [bytes received, bytes sent].
    """
    loop = asyncio.get_running_loop()
    async with asyncio.timeout_at(deadline):
        while True:
            done = tls.do_handshake()
            out = tls.data_to_send()
            if out:
                await loop.sock_sendall(sock, out)
                if counts is not None:
                    counts[1] += len(out)
            if done:
                return
            data = await loop.sock_recv(sock, _RECV_SIZE)
            if not data:
                raise ConnectionError("closed during the TLS handshake")
            if counts is not None:
                counts[0] += len(data)
            tls.receive(data)


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
            group = BackendGroup(key, lambda g: self.proxy.dial(g, header, self.record))
            self.private[key] = group
        return group

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
        access_log.info(
            "request client=%s route=%s method=%s status=%d in=%d out=%d duration=%.3f%s",
            self.record.client_ip,
            request.route,
            request.method or "-",
            request.status,
            request.bytes_in,
            request.bytes_out,
            request.duration,
            extra,
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
            group = self.pool[key] = BackendGroup(key, lambda g: self.dial(g, None, None))
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
            await _handshake(sock, tls, deadline, counts)
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

    def dial(
        self, group: BackendGroup, proxy_header: bytes | None, record: ConnectionRecord | None
    ) -> None:
        task = self.loop.create_task(self._dial(group, proxy_header, record))
        self._dials.add(task)
        task.add_done_callback(self._dials.discard)

    async def _dial(
        self, group: BackendGroup, proxy_header: bytes | None, record: ConnectionRecord | None
    ) -> None:
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
        if record is not None and record.dial_seconds is None:
            record.dial_seconds = self.loop.time() - started
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
                await _handshake(sock, tls, self.loop.time() + self.timeouts.connect_timeout)
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
