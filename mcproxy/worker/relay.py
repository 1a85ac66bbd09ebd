"""L4 relay: copy bytes both ways between two connected sockets.

Driven by the worker's :class:`~mcproxy.worker.poller.Poller` on raw
non-blocking sockets rather than transports, so a chunk costs one
``recv_into`` and one ``send`` and no Python allocation: every relay of the
worker reads into one shared buffer, which is safe because ``send`` copies
into the kernel before the handler returns. Only the unsent remainder of a
chunk, when the peer is slow, is copied into a per-direction buffer; while it
waits, that direction stops reading its source (back-pressure, like
uvicorn's ``FlowControl``), so a relay never holds more than one chunk per
direction.

Bulk transfers move to ``splice``: once a direction has carried
:data:`SPLICE_AFTER` bytes it gets a pipe, and chunks go socket -> pipe ->
socket inside the kernel, never copied into Python (less CPU per GB than
``recv_into`` + ``send``; ``bench/``, ``l4_bulk``). Short and idle connections never pay
for the pipe (two more descriptors and its buffer).

The relay moves bytes and nothing else: what an end of stream or an error
means is the :class:`~mcproxy.worker.session.Session`'s decision, reached
through the connection. It reports an EOF once everything read before it was
written (``on_eof``: the session answers with a ``shutdown(SHUT_WR)`` of the
other side, or with the end once both sides sent EOF; closing sends the last
FIN) and any socket error (``on_error``: the session resets both, so the peer
sees what the proxy saw). The epoll set is level-triggered: an error that
arrives behind data is reported again after the data is read, so a reset is
never missed. ``last_activity`` is when a byte last moved, for the session's
idle deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import struct
from collections.abc import Callable

from mcproxy.worker.poller import READ, WRITE, Poller

__all__ = ["Relay", "reset"]

_CHUNK = 256 * 1024
_shared_buffer = bytearray(_CHUNK)
_shared_view = memoryview(_shared_buffer)
_LINGER_RESET = struct.pack("ii", 1, 0)
SPLICE_AFTER = 1 << 20
"""Bytes a direction carries by copying before it switches to splice."""
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def reset(sock: socket.socket) -> None:
    """Close with a TCP RST and no further bytes (invariant 6)."""
    with contextlib.suppress(OSError):  # already closed, or never connected
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


class _Direction:
    """One way of the relay: bytes read from ``src`` are written to ``dst``."""

    __slots__ = ("bytes", "dst", "eof", "in_pipe", "pending", "pipe", "src")

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src = src
        self.dst = dst
        self.pending = b""
        """Bytes read but not yet written (copy mode)."""
        self.pipe: tuple[int, int] | tuple[()] | None = None
        """Read and write ends once the direction splices; ``()`` if no pipe could be had."""
        self.in_pipe = 0
        """Bytes in the pipe, read but not yet written (splice mode)."""
        self.eof = False
        self.bytes = 0

    @property
    def waiting(self) -> bool:
        """Bytes are held until ``dst`` can take them; meanwhile ``src`` is not read."""
        return bool(self.pending) or self.in_pipe > 0

    @property
    def reading(self) -> bool:
        return not self.eof and not self.waiting

    def close_pipe(self) -> None:
        if self.pipe:
            os.close(self.pipe[0])
            os.close(self.pipe[1])
        self.pipe = ()


def _open_pipe() -> tuple[int, int] | tuple[()]:
    """A non-blocking pipe as big as a chunk, or ``()`` (out of descriptors, say)."""
    try:
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ()
    with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size: keep the default
        fcntl.fcntl(write_end, _F_SETPIPE_SZ, _CHUNK)
    return read_end, write_end


class Relay:
    """Copies between two connected sockets until :meth:`stop`.

    ``on_eof(upstream)`` is called when a direction's source sent EOF and all it
    sent was written (``upstream``: the client's); ``on_error(detail)`` when a
    socket fails. Either may call :meth:`stop`, after which the relay does
    nothing more. The sockets stay the caller's to close.
    """

    __slots__ = (
        "_backend_fd",
        "_client_fd",
        "_loop",
        "_on_eof",
        "_on_error",
        "_poller",
        "downstream",
        "finished",
        "last_activity",
        "upstream",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client: socket.socket,
        backend: socket.socket,
        *,
        poller: Poller,
        on_eof: Callable[[bool], None],
        on_error: Callable[[str], None],
    ) -> None:
        self._loop = loop
        self._poller = poller
        self.upstream = _Direction(client, backend)
        self.downstream = _Direction(backend, client)
        self._client_fd = client.fileno()
        self._backend_fd = backend.fileno()
        self._on_eof = on_eof
        self._on_error = on_error
        self.finished = False
        self.last_activity = loop.time()
        """Loop time a byte last moved, either way."""
        # A handler that was watching either socket (the handshake's) is replaced.
        self._poller.watch(self._client_fd, READ, self._on_client_event)
        self._poller.watch(self._backend_fd, READ, self._on_backend_event)

    @property
    def bytes_up(self) -> int:
        return self.upstream.bytes

    @property
    def bytes_down(self) -> int:
        return self.downstream.bytes

    def _on_client_event(self, events: int) -> None:
        self._on_event(events, self.upstream, self.downstream)

    def _on_backend_event(self, events: int) -> None:
        self._on_event(events, self.downstream, self.upstream)

    def _on_event(self, events: int, reads: _Direction, writes: _Direction) -> None:
        """``reads`` has this socket as its source, ``writes`` as its destination."""
        if events & WRITE and writes.waiting:
            self._on_writable(writes)
        # Anything else (readable, error, hang-up) is news for the reading side.
        if events & ~WRITE and reads.reading and not self.finished:
            self._on_readable(reads)

    def _on_readable(self, d: _Direction) -> None:
        if d.pipe:
            self._splice_in(d)
            return
        try:
            n = d.src.recv_into(_shared_buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._on_error(str(exc))
            return
        if n == 0:
            self._at_eof(d)
            return
        d.bytes += n
        self.last_activity = self._loop.time()
        try:
            sent = d.dst.send(_shared_view[:n])
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._on_error(str(exc))
            return
        if sent < n:
            d.pending = bytes(_shared_view[sent:n])
            self._update_masks()
        elif d.bytes >= SPLICE_AFTER and d.pipe is None:
            d.pipe = _open_pipe()

    def _splice_in(self, d: _Direction) -> None:
        assert d.pipe
        try:
            n = os.splice(d.src.fileno(), d.pipe[1], _CHUNK, flags=_SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._on_error(str(exc))
            return
        if n == 0:
            self._at_eof(d)
            return
        d.bytes += n
        d.in_pipe = n
        self.last_activity = self._loop.time()
        if self._splice_out(d) and d.in_pipe:
            self._update_masks()  # wait for dst to take the rest

    def _splice_out(self, d: _Direction) -> bool:
        """Move what is in the pipe to ``dst``; False if the relay ended meanwhile."""
        assert d.pipe
        try:
            d.in_pipe -= os.splice(d.pipe[0], d.dst.fileno(), d.in_pipe, flags=_SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            self._on_error(str(exc))
            return False
        return True

    def _on_writable(self, d: _Direction) -> None:
        if d.in_pipe:
            if not self._splice_out(d):
                return
        else:
            try:
                sent = d.dst.send(d.pending)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._on_error(str(exc))
                return
            d.pending = d.pending[sent:]
        self.last_activity = self._loop.time()
        if d.waiting:
            return
        self._update_masks()
        if d.eof:
            self._shutdown_if_flushed(d)

    def _at_eof(self, d: _Direction) -> None:
        d.eof = True
        self._update_masks()
        self._shutdown_if_flushed(d)

    def _update_masks(self) -> None:
        """Watch each socket for what its two directions wait for."""
        up, down = self.upstream, self.downstream
        self._poller.set_mask(
            self._client_fd, (READ if up.reading else 0) | (WRITE if down.waiting else 0)
        )
        self._poller.set_mask(
            self._backend_fd, (READ if down.reading else 0) | (WRITE if up.waiting else 0)
        )

    def _shutdown_if_flushed(self, d: _Direction) -> None:
        if d.waiting:
            return  # _on_writable comes back here once the remainder is written
        self._on_eof(d is self.upstream)

    def stop(self) -> None:
        """Stop relaying: forget both sockets (closed right after) and drop the pipes."""
        if self.finished:
            return
        self.finished = True
        self._poller.forget(self._client_fd, closing=True)
        self._poller.forget(self._backend_fd, closing=True)
        self.upstream.close_pipe()
        self.downstream.close_pipe()
