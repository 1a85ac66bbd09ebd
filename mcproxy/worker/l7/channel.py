"""asyncio glue under every leg: :class:`Channel` moves bytes, :func:`handshake` drives TLS.

A :class:`Channel` is the protocol of an asyncio transport made with
``connect_accepted_socket`` on an already connected socket; it only moves
bytes: socket -> TLS -> leg and leg -> TLS -> socket. A leg's output is
flushed once per event-loop iteration (``wake`` schedules it), so the many
small writes an exchange makes coalesce. A client transport whose write
buffer is full stops reading too, so a client that does not read cannot make
the proxy queue its PING or SETTINGS answers.

A client leg that is receiving a request head has a ``head_deadline``; the
channel keeps one timer for it and asks the leg to ``check_deadline()`` when
it passes (the leg decides: 408, or a GOAWAY), so a head trickled a byte at a
time is cut however steadily it trickles.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import cast

from mcproxy.worker.l7.h1back import H1Back
from mcproxy.worker.l7.h2back import H2Back
from mcproxy.worker.l7.h2front import H2Front
from mcproxy.worker.l7.h11front import H11Front
from mcproxy.worker.l7.tls import TlsSession

__all__ = ["WRITE_HIGH_WATER", "WRITE_LOW_WATER", "Channel", "Leg", "handshake"]

log = logging.getLogger("mcproxy.l7")

WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024
_RECV_SIZE = 64 * 1024
_LINGER_RESET = struct.pack("ii", 1, 0)

Leg = H2Front | H11Front | H2Back | H1Back


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
        self._write_eof = False
        self._leg_paused = False
        self._write_paused = False
        self._reading_paused = False
        self._head_timer: asyncio.TimerHandle | None = None

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

    def write_eof(self) -> None:
        """Half-close a cleartext connection once what is queued is out; reading goes on.

        (A WebSocket tunnel whose client ended its side; TLS connections are left open, the
        backend closes them after its close frame.)
        """
        self._write_eof = True
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
        if self._head_timer is None and self.leg is not None:
            self._watch_head()
        self.flush()

    def _watch_head(self) -> None:
        """Arm the head timer when the leg has a head in progress (one timer at a time)."""
        assert self.leg is not None
        deadline = self.leg.head_deadline
        if deadline is not None:
            delay = max(0.0, deadline - time.monotonic())
            self._head_timer = self.loop.call_later(delay, self._head_expired)

    def _head_expired(self) -> None:
        self._head_timer = None
        if self.leg is None:
            return
        self._guarded(self.leg.check_deadline)
        self.flush()
        if not self.leg.closed:
            self._watch_head()  # a later head in progress, if any

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
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
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
        elif self._write_eof and self.tls is None and transport.can_write_eof():
            self._write_eof = False
            transport.write_eof()

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


async def handshake(
    sock: socket.socket, tls: TlsSession, deadline: float | None, counts: list[int] | None = None
) -> None:
    """Drive ``tls`` to the end of its handshake over ``sock`` by ``deadline`` (loop time;
    None: the caller bounds it, as the backend pool does with ``connect_timeout``).

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
