"""L4 relay: copy bytes both ways between two connected sockets.

Driven by the event loop's reader/writer callbacks on raw non-blocking
sockets rather than transports, so a chunk costs one ``recv_into`` and one
``send`` and no Python allocation: every relay of the worker reads into one
shared buffer, which is safe because ``send`` copies into the kernel before
the callback returns. Only the unsent remainder of a chunk, when the peer is
slow, is copied into a per-direction buffer; while it waits, that direction
stops reading its source (back-pressure, like uvicorn's ``FlowControl``), so
a relay never holds more than one chunk per direction.

Half-close is passed through: EOF from one side becomes ``shutdown(SHUT_WR)``
on the other once its pending bytes are written. A reset or error on either
side resets both (SO_LINGER 0), so the peer sees what the proxy saw.

A readable event is served by reading until the socket has nothing more
(``EAGAIN``), EOF or an error, not by one ``recv``: uvloop (libuv) reports a
socket error (a RST that arrives with data still queued) once, runs the reader
that one time and then stops watching the descriptor, so a reader that took
only the data would never hear of the reset, and the relay and its connection
slot would stay until the idle timeout. The reads per event are bounded for
fairness; a reader that hits the bound re-registers, which gives it a fresh
watcher in uvloop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

__all__ = ["Relay", "reset"]

_CHUNK = 256 * 1024
_shared_buffer = bytearray(_CHUNK)
_shared_view = memoryview(_shared_buffer)
_LINGER_RESET = struct.pack("ii", 1, 0)
_READS_PER_EVENT = 16
"""At most 4 MiB per direction per wake-up, so one busy relay cannot starve the others."""


def reset(sock: socket.socket) -> None:
    """Close with a TCP RST and no further bytes (invariant 6)."""
    with contextlib.suppress(OSError):  # already closed, or never connected
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


class _Direction:
    """One way of the relay: bytes read from ``src`` are written to ``dst``."""

    __slots__ = ("bytes", "dst", "eof", "pending", "src")

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src = src
        self.dst = dst
        self.pending = b""
        self.eof = False
        self.bytes = 0


class Relay:
    """Relays until both directions have seen EOF, an error, or ``idle_timeout`` of silence.

    ``done`` resolves to the outcome: ``"closed"``, ``"reset"`` or ``"idle_timeout"``.
    The relay owns both sockets from the start and closes them at the end.
    """

    __slots__ = (
        "_idle_timeout",
        "_idle_timer",
        "_last_activity",
        "_loop",
        "done",
        "downstream",
        "upstream",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client: socket.socket,
        backend: socket.socket,
        idle_timeout: float,
    ) -> None:
        self._loop = loop
        self.upstream = _Direction(client, backend)
        self.downstream = _Direction(backend, client)
        self.done: asyncio.Future[str] = loop.create_future()
        self._idle_timeout = idle_timeout
        self._last_activity = loop.time()
        self._idle_timer = loop.call_later(idle_timeout, self._check_idle)
        loop.add_reader(client.fileno(), self._on_readable, self.upstream)
        loop.add_reader(backend.fileno(), self._on_readable, self.downstream)

    @property
    def bytes_up(self) -> int:
        return self.upstream.bytes

    @property
    def bytes_down(self) -> int:
        return self.downstream.bytes

    def _on_readable(self, d: _Direction) -> None:
        for _ in range(_READS_PER_EVENT):
            try:
                n = d.src.recv_into(_shared_buffer)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.finish("reset")
                return
            if n == 0:
                d.eof = True
                self._loop.remove_reader(d.src.fileno())
                self._shutdown_if_flushed(d)
                return
            d.bytes += n
            self._last_activity = self._loop.time()
            try:
                sent = d.dst.send(_shared_view[:n])
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.finish("reset")
                return
            if sent < n:
                d.pending = bytes(_shared_view[sent:n])
                self._loop.remove_reader(d.src.fileno())
                self._loop.add_writer(d.dst.fileno(), self._on_writable, d)
                return
        # Still more to read: come back on the next turn with a fresh registration.
        self._loop.remove_reader(d.src.fileno())
        self._loop.add_reader(d.src.fileno(), self._on_readable, d)

    def _on_writable(self, d: _Direction) -> None:
        try:
            sent = d.dst.send(d.pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.finish("reset")
            return
        self._last_activity = self._loop.time()
        d.pending = d.pending[sent:]
        if d.pending:
            return
        self._loop.remove_writer(d.dst.fileno())
        if d.eof:
            self._shutdown_if_flushed(d)
        else:
            self._loop.add_reader(d.src.fileno(), self._on_readable, d)

    def _shutdown_if_flushed(self, d: _Direction) -> None:
        if d.pending:
            return  # _on_writable comes back here once the remainder is written
        try:
            d.dst.shutdown(socket.SHUT_WR)
        except OSError:
            self.finish("reset")
            return
        if self.upstream.eof and self.downstream.eof:
            self.finish("closed")

    def _check_idle(self) -> None:
        remaining = self._last_activity + self._idle_timeout - self._loop.time()
        if remaining > 0:
            self._idle_timer = self._loop.call_later(remaining, self._check_idle)
        else:
            self.finish("idle_timeout")

    def finish(self, outcome: str) -> None:
        """Stop relaying and close both sockets; resets them unless both sides closed cleanly."""
        if self.done.done():
            return
        self._idle_timer.cancel()
        for sock in (self.upstream.src, self.downstream.src):
            fd = sock.fileno()
            if fd >= 0:
                self._loop.remove_reader(fd)
                self._loop.remove_writer(fd)
            if outcome == "closed":
                sock.close()
            else:
                reset(sock)
        self.done.set_result(outcome)
