"""One client connection's I/O, driven by event-loop callbacks; the decisions are a Session's.

accept -> [PROXY header] -> firewall (real client IP) -> admission (limits)
-> ClientHello -> SNI -> route -> L4: dial, [PROXY v2], replay the ClientHello,
:class:`~mcproxy.worker.relay.Relay`; or L7: a task runs the L7 handler.

This module is glue: it reads, connects, sends, arms one timer and closes;
what each event means (refuse, dial the next backend, shut down a side,
time out, how the connection ended) is decided by the sans-I/O
:class:`~mcproxy.worker.session.Session`, and :meth:`Connection._act` is the
one place that carries its actions out. Everything a connection needs from
its worker comes through :class:`Host` (``ConnectionServer`` is one), so this
module imports nothing above it.

Why callbacks and not one task per connection: a new connection is the
proxy's most frequent unit of work after a byte, and a coroutine per
connection paid for a task, futures for each ``sock_recv``, ``sock_connect``
(whose uvloop version resolves even an IP literal in a thread pool) and
``sock_sendall``, and timeout context managers (``bench/``, ``l4_connrate``,
measures the CPU per new connection). Here a connection is one object whose
methods the loop calls when the client's socket is readable, when the
backend's socket is writable (connected), and when its deadline comes. The
deadline lives in the worker's :class:`~mcproxy.worker.deadlines.Deadlines`
(one loop timer for all connections) and is re-armed only when the
session's deadline moves earlier than the armed one; one that comes early
(the session's deadline moved later) finds nothing due and is armed again.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Concatenate, ParamSpec, Protocol

from mcproxy.model import Address, ProxyState
from mcproxy.settings import ProxyTimeouts
from mcproxy.worker.clienthello import ClientHello
from mcproxy.worker.deadlines import Deadlines
from mcproxy.worker.errors import Reason, Refused
from mcproxy.worker.poller import READ, WRITE, Poller
from mcproxy.worker.records import ConnectionRecord
from mcproxy.worker.relay import Relay, reset
from mcproxy.worker.session import (
    NEVER,
    PROXY_HEADER_TIMEOUT,
    Action,
    AwaitAnswer,
    Dial,
    End,
    Gate,
    HandOff,
    Session,
    Shutdown,
    Side,
    State,
)

__all__ = ["PROXY_HEADER_TIMEOUT", "Connection", "Endpoint", "Host", "L7Handler"]

log = logging.getLogger("mcproxy.worker")

_READ_SIZE = 4096
_CONNECT_ERRORS = frozenset(
    {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT}
)

P = ParamSpec("P")

Endpoint = tuple[socket.AddressFamily, tuple[str, int]]
"""What ``connect`` needs: the socket family and the address."""

L7Handler = Callable[[socket.socket, bytes, ClientHello, ConnectionRecord], Awaitable[None]]
"""Takes over a client socket whose ClientHello bytes were already read."""


class Host(Gate, Protocol):
    """What a connection needs from its worker (the listener's ``ConnectionServer``)."""

    loop: asyncio.AbstractEventLoop
    poller: Poller
    deadlines: Deadlines
    timeouts: ProxyTimeouts
    state: ProxyState
    l7_handler: L7Handler | None

    def resolved(self, backend: Address) -> Endpoint | None:
        """The family and address of an IP-literal backend; None for a hostname."""
        ...

    async def resolve(self, backend: Address) -> Endpoint:
        """The family and address of any backend (getaddrinfo for a hostname)."""
        ...

    def finished(self, connection: Connection) -> None:
        """The connection ended; its record is complete."""
        ...


def _guarded(
    method: Callable[Concatenate[Connection, P], None],
) -> Callable[Concatenate[Connection, P], None]:
    """Run a loop callback so that whatever it raises ends this connection alone."""

    def callback(self: Connection, /, *args: P.args, **kwargs: P.kwargs) -> None:
        try:
            method(self, *args, **kwargs)
        except Exception as exc:  # invariant 8
            self.fail(exc)

    callback.__name__ = method.__name__
    callback.__doc__ = method.__doc__
    return callback


class Connection:
    """A client connection until it ends; registered in ``host.connections`` meanwhile."""

    __slots__ = (
        "_armed",
        "_attempt",
        "_backend",
        "_deadlines",
        "_host",
        "_key",
        "_l7_task",
        "_loop",
        "_owns_client",
        "_payload",
        "_poller",
        "_relay",
        "record",
        "session",
        "sock",
    )

    def __init__(self, host: Host, sock: socket.socket, record: ConnectionRecord) -> None:
        self._host = host
        self.sock = sock
        self.record = record
        self._loop = host.loop
        self._poller = host.poller
        self._deadlines = host.deadlines
        listener = host.state.listeners.get(record.listener)
        self.session = Session(host, host.timeouts, listener, record)
        self._key = 0
        """The armed deadline's key in ``_deadlines``; 0: none armed."""
        self._armed = NEVER
        self._backend: socket.socket | None = None
        self._payload = b""
        self._attempt = 0
        self._relay: Relay | None = None
        self._l7_task: asyncio.Task[None] | None = None
        self._owns_client = True

    def start(self) -> None:
        """Begin reading; from here on the loop drives this connection."""
        try:
            end = self.session.start(self._loop.time())
            if end is not None:
                self._end(end)
                return
            self._arm()
            self._poller.watch(self.sock.fileno(), READ, self._on_client_event)
        except Exception as exc:
            self.fail(exc)

    # --- carrying out the session's actions ----------------------------------------------

    def _act(self, action: Action | None) -> None:
        """The one place where a decision becomes I/O."""
        if action is not None:
            if isinstance(action, End):
                self._end(action)
                return
            if isinstance(action, Dial):
                self._dial(action)
            elif isinstance(action, Shutdown):
                self._shutdown(action)
            elif isinstance(action, AwaitAnswer):
                assert self._backend is not None
                self._poller.watch(self._backend.fileno(), READ, self._on_backend_answer)
            elif isinstance(action, HandOff):
                self._hand_off(action)
                return
            else:
                self._start_relay()
        if self.session.deadline < self._armed:
            self._arm()

    def _arm(self) -> None:
        deadline = self.session.deadline
        self._disarm()
        if deadline < NEVER:
            self._armed = deadline
            self._key = self._deadlines.arm(self, deadline)

    def _disarm(self) -> None:
        if self._key:
            self._deadlines.disarm(self, self._key)
            self._key = 0
        self._armed = NEVER

    @_guarded
    def on_deadline(self) -> None:
        self._key = 0
        self._armed = NEVER
        relay = self._relay
        action = self.session.timeout(self._loop.time(), relay.last_activity if relay else 0.0)
        self._act(action)  # nothing due yet: _act arms the session's deadline again

    # --- the handshake: read the client until the session routes it -------------------

    @_guarded
    def _on_client_event(self, events: int) -> None:
        session = self.session
        if not session.reading:
            # Dialing: a TLS client waits for the ServerHello, so this is rare; the relay
            # watches the socket again and then sees whatever is waiting (bytes, EOF, error).
            self._poller.set_mask(self.sock.fileno(), 0)
            return
        try:
            data = self.sock.recv(_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._act(session.read_failed(str(exc)))
            return
        self._act(session.receive(data, self._loop.time()))

    # --- L4: dial, send the first bytes, relay -----------------------------------------

    def _dial(self, dial: Dial) -> None:
        self._attempt += 1
        self._payload = dial.data
        endpoint = self._host.resolved(dial.backend)
        if endpoint is None:  # a hostname: resolve it off the loop, then connect
            attempt = self._attempt
            task = self._loop.create_task(self._host.resolve(dial.backend))
            task.add_done_callback(lambda done: self._on_resolved(done, attempt))
        else:
            self._connect(*endpoint)

    def _on_resolved(self, task: asyncio.Task[Endpoint], attempt: int) -> None:
        if self.session.state is not State.DIALING or attempt != self._attempt:
            return  # ended or moved on meanwhile (timeout, drain)
        try:
            self._connect(*task.result())
        except OSError as exc:
            self._dial_failed("backend_unreachable", str(exc))
        except Exception as exc:
            self.fail(exc)

    def _connect(self, family: socket.AddressFamily, address: tuple[str, int]) -> None:
        backend = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        self._backend = backend
        backend.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = backend.connect_ex(address)
        if err not in (0, errno.EINPROGRESS):
            self._dial_failed("backend_unreachable", os.strerror(err))
            return
        # A backend on this host has usually completed the TCP handshake by the time
        # connect() returns: try to send at once, and wait for writability only if the
        # connection is still being made (EAGAIN). That saves a loop turn and two
        # changes of the socket's epoll registration per connection.
        if not self._send_first():
            self._poller.watch(backend.fileno(), WRITE, self._on_backend_event)

    @_guarded
    def _on_backend_event(self, events: int) -> None:
        """Connected (or failed): send the rest of the first bytes."""
        assert self._backend is not None
        err = self._backend.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._dial_failed("backend_unreachable", os.strerror(err))
        else:
            self._send_first()

    def _send_first(self) -> bool:
        """Send the PROXY header and ClientHello; True once this step is over.

        Over means sent in full (the relay has started) or failed (the session
        moved on); False means the socket is not writable yet.
        """
        backend = self._backend
        assert backend is not None
        try:
            sent = backend.send(self._payload)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            # Before the handshake completes, send() reports what connect() would have.
            connected = self.record.dial_seconds is not None
            unreachable = not connected and exc.errno in _CONNECT_ERRORS
            self._dial_failed("backend_unreachable" if unreachable else "backend_reset", str(exc))
            return True
        now = self._loop.time()
        self.session.connected(now)
        self._payload = self._payload[sent:]
        if self._payload:
            return False  # the rest when the backend can take it
        self._act(self.session.sent(now))
        return True

    @_guarded
    def _on_backend_answer(self, events: int) -> None:
        """The backend's first byte (peeked, left for the relay), or its reset or EOF."""
        backend = self._backend
        assert backend is not None
        try:
            answered = backend.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._dial_failed("backend_reset", str(exc))
            return
        if not answered:
            self._dial_failed("backend_reset", "closed before answering")
            return
        self._act(self.session.answered(self._loop.time()))

    def _dial_failed(self, outcome: str, detail: str) -> None:
        backend = self._backend
        if backend is not None:
            self._backend = None
            self._poller.forget(backend.fileno(), closing=True)
            reset(backend)
        self._act(self.session.dial_failed(self._loop.time(), outcome, detail))

    def _start_relay(self) -> None:
        assert self._backend is not None
        # The relay's handlers replace ours; the client socket's mask stays as it is.
        self._relay = Relay(
            self._loop,
            self.sock,
            self._backend,
            poller=self._poller,
            on_eof=self._on_relay_eof,
            on_error=self._on_relay_error,
        )

    def _on_relay_eof(self, upstream: bool) -> None:
        self._act(self.session.eof(Side.CLIENT if upstream else Side.BACKEND))

    def _on_relay_error(self, detail: str) -> None:
        self._act(self.session.relay_failed(detail))

    def _shutdown(self, shutdown: Shutdown) -> None:
        sock = self._backend if shutdown.side is Side.BACKEND else self.sock
        assert sock is not None
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._act(self.session.relay_failed(f"shutdown: {exc}"))

    # --- L7: the handler takes the socket -----------------------------------------------

    def _hand_off(self, hand_off: HandOff) -> None:
        self._disarm()  # the handler keeps its own handshake deadline
        handler = self._host.l7_handler
        if handler is None:
            self._act(self.session.refuse(Reason.NO_ROUTE, "L7 routes are not served here"))
            return
        self._owns_client = False
        self._poller.forget(self.sock.fileno(), closing=False)
        handling = handler(self.sock, hand_off.data, hand_off.hello, self.record)
        self._l7_task = self._loop.create_task(self._serve_l7(handling))

    async def _serve_l7(self, handling: Awaitable[None]) -> None:
        session = self.session
        try:
            await handling
        except Refused as refused:
            self._act(session.refuse(refused.reason, refused.detail))
        except asyncio.CancelledError:
            self._act(session.abort())
            raise
        except Exception as exc:  # invariant 8
            log.error("connection from %s failed", self.record.client_ip, exc_info=exc)
            self._act(session.fail(exc))
        else:
            self._act(session.l7_finished())

    # --- the end ----------------------------------------------------------------------

    def fail(self, exc: Exception) -> None:
        """An unexpected error in this connection's code: log it, reset, end."""
        log.error("connection from %s failed", self.record.client_ip, exc_info=exc)
        end = self.session.fail(exc)
        if end is not None:
            self._end(end)

    def abort(self) -> None:
        """End now (shutdown after the drain timeout): reset both sides."""
        if self._l7_task is not None:
            self._l7_task.cancel()
        else:
            self._act(self.session.abort())

    def _end(self, end: End) -> None:
        """The one way a connection ends: stop the timer and relay, close, report."""
        self._disarm()
        relay = self._relay
        if relay is not None:
            relay.stop()
            self.record.bytes_up += relay.bytes_up
            self.record.bytes_down = relay.bytes_down
        close = reset if end.reset else socket.socket.close
        if self._owns_client:
            if relay is None:
                self._poller.forget(self.sock.fileno(), closing=True)
            close(self.sock)
        elif end.reset:
            reset(self.sock)  # the L7 handler failed: whatever it left gets a RST
        backend = self._backend
        if backend is not None:
            if relay is None:
                self._poller.forget(backend.fileno(), closing=True)
            close(backend)
        self._host.finished(self)
