"""One client connection from accept to its end, driven by event-loop callbacks.

accept -> [PROXY header] -> firewall (real client IP) -> admission (limits)
-> ClientHello -> SNI -> route -> L4: dial, [PROXY v2], replay the ClientHello,
:class:`~mcproxy.worker.relay.Relay`; or L7: a task runs the L7 handler.

Why callbacks and not one task per connection: a new connection is the
proxy's most frequent unit of work after a byte, and a coroutine per
connection paid for a task, futures for each ``sock_recv``, ``sock_connect``
(whose uvloop version resolves even an IP literal in a thread pool) and
``sock_sendall``, and timeout context managers, which made mc-proxy's CPU per
new connection about 2.4 times HAProxy's (``bench/``, ``l4_connrate``). Here a
connection is one object whose methods the loop calls when the client's
socket is readable, when the backend's socket is writable (connected), and
when its one timer fires; the client's socket keeps a single reader
registration from accept to the end of the relay (uvloop swaps the callback
without a system call).

The protocol work stays in the sans-I/O ``proxy_protocol``, ``clienthello``
and ``firewall`` modules. Every read is bounded in size (by the decoders) and
in time (``handshake_timeout``, 5 s for a PROXY header, ``connect_timeout``).
A :class:`Refused` ends in a RST; any other error ends this connection alone
(invariant 8).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import TYPE_CHECKING, Concatenate, ParamSpec

from mcproxy.model import Address, Listener, Mode, Route
from mcproxy.worker.clienthello import ClientHello, ClientHelloError, ClientHelloParser
from mcproxy.worker.errors import Reason, Refused
from mcproxy.worker.poller import READ, WRITE
from mcproxy.worker.proxy_protocol import ProxyHeaderDecoder, ProxyHeaderError, encode_v2
from mcproxy.worker.records import ConnectionRecord
from mcproxy.worker.relay import Relay, reset

if TYPE_CHECKING:
    from mcproxy.worker.listener import ConnectionServer

__all__ = ["PROXY_HEADER_TIMEOUT", "Connection", "Endpoint"]

log = logging.getLogger("mcproxy.worker")

PROXY_HEADER_TIMEOUT = 5.0
"""The PROXY spec's advice: a header comes at once or the peer is not a proxy."""
_READ_SIZE = 4096
_CONNECT_ERRORS = frozenset(
    {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT}
)

P = ParamSpec("P")

Endpoint = tuple[socket.AddressFamily, tuple[str, int]]
"""What ``connect`` needs: the socket family and the address."""


class _Step(Enum):
    PROXY_HEADER = "PROXY header"
    CLIENT_HELLO = "ClientHello"
    DIALING = "dialing"
    RELAYING = "relaying"
    L7 = "L7"
    DONE = "done"


def _guarded(
    method: Callable[Concatenate[Connection, P], None],
) -> Callable[Concatenate[Connection, P], None]:
    """Run a loop callback so that whatever it raises ends this connection alone."""

    def callback(self: Connection, /, *args: P.args, **kwargs: P.kwargs) -> None:
        try:
            method(self, *args, **kwargs)
        except Refused as refused:
            self.refuse(refused)
        except Exception as exc:  # invariant 8
            self.fail(exc)

    callback.__name__ = method.__name__
    callback.__doc__ = method.__doc__
    return callback


class Connection:
    """A client connection until it ends; registered in ``server.connections`` meanwhile."""

    __slots__ = (
        "_admitted",
        "_backend",
        "_counted",
        "_deadline",
        "_dial_started",
        "_first",
        "_header",
        "_hello",
        "_l7_task",
        "_listener",
        "_loop",
        "_poller",
        "_relay",
        "_replay",
        "_step",
        "_timer",
        "record",
        "server",
        "sock",
    )

    def __init__(
        self, server: ConnectionServer, sock: socket.socket, record: ConnectionRecord
    ) -> None:
        self.server = server
        self.sock = sock
        self.record = record
        self._loop = server.loop
        self._poller = server.poller
        self._step = _Step.PROXY_HEADER
        self._deadline = 0.0
        self._listener: Listener | None = None
        self._admitted = False
        self._header: ProxyHeaderDecoder | None = None
        self._hello = ClientHelloParser()
        self._timer: asyncio.TimerHandle | None = None
        self._backend: socket.socket | None = None
        self._first = b""
        self._replay = b""
        self._counted = False
        self._dial_started = 0.0
        self._relay: Relay | None = None
        self._l7_task: asyncio.Task[None] | None = None

    # --- the front half: PROXY header, admission, ClientHello, route ---------------

    def start(self) -> None:
        """Begin reading; from here on the loop drives this connection."""
        try:
            listener = self.server.state.listeners.get(self.record.listener)
            if listener is None:
                raise Refused(Reason.NO_ROUTE, "listener removed")
            self._listener = listener
            now = self._loop.time()
            self._deadline = now + self.server.timeouts.handshake_timeout
            if listener.proxy_protocol:
                self._header = ProxyHeaderDecoder()
                first_deadline = min(self._deadline, now + PROXY_HEADER_TIMEOUT)
            else:
                self._admit(listener)
                first_deadline = self._deadline
            self._timer = self._loop.call_at(first_deadline, self._on_timeout)
            self._poller.watch(self.sock.fileno(), READ, self._on_client_event)
        except Refused as refused:
            self.refuse(refused)
        except Exception as exc:
            self.fail(exc)

    def _admit(self, listener: Listener) -> None:
        """Firewall and limits on the real client IP, then wait for the ClientHello."""
        ip = self.record.client_ip
        reason = self.server.firewall.check(ip) or self.server.admission.admit(listener, ip)
        if reason is not None:
            raise Refused(reason)
        self._admitted = True
        self._step = _Step.CLIENT_HELLO

    @_guarded
    def _on_client_event(self, events: int) -> None:
        if self._step is _Step.DIALING:
            # A TLS client waits for the ServerHello, so this is rare; the relay watches
            # the socket again and then sees whatever is waiting (bytes, EOF or an error).
            self._poller.set_mask(self.sock.fileno(), 0)
            return
        try:
            data = self.sock.recv(_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            raise Refused(self._refusal_reason(), f"read failed: {exc}") from None
        if not data:
            raise Refused(self._refusal_reason(), f"closed before the {self._step.value}")
        if self._step is _Step.PROXY_HEADER:
            data = self._feed_proxy_header(data)
            if self._step is _Step.PROXY_HEADER or not data:
                return
        try:
            hello = self._hello.feed(data)
        except ClientHelloError as exc:
            raise Refused(Reason.CLIENT_HELLO, str(exc)) from None
        if hello is not None:
            self._route(hello)

    def _refusal_reason(self) -> Reason:
        return Reason.PROXY_HEADER if self._step is _Step.PROXY_HEADER else Reason.CLIENT_HELLO

    def _feed_proxy_header(self, data: bytes) -> bytes:
        """Take the PROXY header; returns the bytes after it once it is complete.

        The header's source becomes the client and its destination the local end, as
        HAProxy does: what the firewall, the log and a forwarded PROXY header show is
        the connection as the real client made it, not the hop from the upstream proxy.
        LOCAL, UNKNOWN and address-less families keep the TCP endpoints.
        """
        assert self._header is not None and self._listener is not None
        try:
            header = self._header.feed(data)
        except ProxyHeaderError as exc:
            raise Refused(Reason.PROXY_HEADER, str(exc)) from None
        if header is None:
            return b""
        if header.source is not None and header.destination is not None:
            self.record.client = self.server.endpoint(header.source)
            self.record.local = self.server.endpoint(header.destination)
        self._admit(self._listener)
        assert self._timer is not None
        if self._deadline > self._timer.when():  # the header came: the full handshake time
            self._timer.cancel()
            self._timer = self._loop.call_at(self._deadline, self._on_timeout)
        return self._header.leftover

    def _route(self, hello: ClientHello) -> None:
        assert self._listener is not None
        self.record.sni = hello.sni
        route = self.server.route(self._listener, hello)
        self.record.route = route
        consumed = self._hello.consumed
        if route.mode is Mode.L7:
            self._hand_off_l7(consumed, hello)
        else:
            self._dial(route, consumed)

    # --- L4: dial, replay the ClientHello, relay --------------------------------------

    def _dial(self, route: Route, consumed: bytes) -> None:
        self._step = _Step.DIALING
        self._first = consumed
        if route.send_proxy_protocol:
            self._first = encode_v2(self.record.client, self.record.local) + consumed
        self._replay = self._first
        if not self._dial_next(route):
            raise Refused(Reason.NO_ROUTE, "route has no backend")

    def _dial_next(self, route: Route) -> bool:
        """Dial the balancer's choice among the backends not tried yet; False if none is left.

        Each try has its own ``connect_timeout``; the first bytes are replayed whole.
        """
        backend = self.server.balancer.choose(
            self.record.listener, route, self.record.client_ip, self.record.failed_backends
        )
        if backend is None:
            return False
        self.record.backend = backend
        self.record.dial_seconds = None
        self._first = self._replay
        if self._timer is not None:
            self._timer.cancel()
        self._dial_started = self._loop.time()
        self._timer = self._loop.call_at(
            self._dial_started + self.server.timeouts.connect_timeout, self._on_timeout
        )
        endpoint = self.server.resolved(backend)
        if endpoint is None:  # a hostname: resolve it off the loop, then connect
            task = self._loop.create_task(self.server.resolve(backend))
            task.add_done_callback(lambda t: self._on_resolved(t, backend))
        else:
            self._connect(*endpoint)
        return True

    def _on_resolved(self, task: asyncio.Task[Endpoint], backend: Address) -> None:
        if self._step is not _Step.DIALING or self.record.backend is not backend:
            return  # ended meanwhile (timeout, drain), or moved on to another backend
        try:
            self._connect(*task.result())
        except OSError as exc:
            self._backend_failed("backend_unreachable", str(exc))
        except Exception as exc:
            self.fail(exc)

    def _connect(self, family: socket.AddressFamily, address: tuple[str, int]) -> None:
        backend = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        self._backend = backend
        backend.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = backend.connect_ex(address)
        if err not in (0, errno.EINPROGRESS):
            self._backend_failed("backend_unreachable", os.strerror(err))
            return
        # A backend on this host has usually completed the TCP handshake by the time
        # connect() returns: try to send at once, and wait for writability only if the
        # connection is still being made (EAGAIN). That saves a loop turn and two
        # changes of the socket's epoll registration per connection.
        if not self._send_first():
            self._poller.watch(backend.fileno(), WRITE, self._on_backend_event)

    @_guarded
    def _on_backend_event(self, events: int) -> None:
        """Connected (or failed): send the rest of the first bytes, then relay."""
        assert self._backend is not None
        err = self._backend.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._backend_failed("backend_unreachable", os.strerror(err))
        else:
            self._send_first()

    def _send_first(self) -> bool:
        """Send the PROXY header and ClientHello; True once this step is over.

        Over means sent in full (the relay has started) or failed (the connection
        ended); False means the socket is not writable yet.
        """
        backend = self._backend
        assert backend is not None
        try:
            sent = backend.send(self._first)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            # Before the handshake completes, send() reports what connect() would have.
            unreachable = self.record.dial_seconds is None and exc.errno in _CONNECT_ERRORS
            self._backend_failed(
                "backend_unreachable" if unreachable else "backend_reset", str(exc)
            )
            return True
        if self.record.dial_seconds is None:
            self.record.dial_seconds = self._loop.time() - self._dial_started
        self._first = self._first[sent:]
        if self._first:
            return False  # the rest when the backend can take it
        route = self.record.route
        if route is not None and len(route.backends) > 1:
            # Another backend could still take the connection: wait for this one's first
            # byte, so that a backend that resets or closes before answering (a crash, a
            # full accept queue) is failed over like a refused dial (ARCHITECTURE.md,
            # "Backends and health"). The client waits for the ServerHello meanwhile.
            self._poller.watch(backend.fileno(), READ, self._on_backend_answer)
            return True
        self._start_relay(backend)
        return True

    @_guarded
    def _on_backend_answer(self, events: int) -> None:
        backend = self._backend
        assert backend is not None
        try:
            answered = backend.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._backend_failed("backend_reset", str(exc))
            return
        if not answered:
            self._backend_failed("backend_reset", "closed before answering")
            return
        self._start_relay(backend)

    def _start_relay(self, backend: socket.socket) -> None:
        assert self._timer is not None
        self._timer.cancel()
        self._step = _Step.RELAYING
        route, chosen = self.record.route, self.record.backend
        if route is not None and chosen is not None:
            self._counted = self.server.balancer.connected(route, chosen)
        # The relay's handlers replace ours; the client socket's mask stays as it is.
        idle_timeout = self.server.timeouts.idle_timeout
        self._relay = Relay(
            self._loop,
            self.sock,
            backend,
            idle_timeout,
            poller=self._poller,
            on_done=self._on_relay_done,
        )

    def _on_relay_done(self, outcome: str) -> None:
        assert self._relay is not None
        self.record.outcome = outcome
        self.record.bytes_up = self._relay.bytes_up + len(self._hello.consumed)
        self.record.bytes_down = self._relay.bytes_down
        self._finish()

    def _backend_failed(self, outcome: str, detail: str) -> None:
        route, failed = self.record.route, self.record.backend
        if self._step is _Step.DIALING and route is not None and failed is not None:
            # Failover (ARCHITECTURE.md, "Backends and health"): nothing reached the
            # client yet and the ClientHello is replayed, so another backend is safe.
            self.server.balancer.dial_failed(self.record.listener, route, failed)
            self.record.failed_backends += (failed,)
            self._drop_backend()
            try:
                if self._dial_next(route):
                    return
            except Exception as exc:
                self.fail(exc)
                return
        self.record.outcome, self.record.detail = outcome, detail
        self._close()

    def _drop_backend(self) -> None:
        backend, self._backend = self._backend, None
        if backend is not None and backend.fileno() >= 0:
            self._poller.forget(backend.fileno(), closing=True)
            backend.close()

    # --- L7: the handler takes the socket -----------------------------------------------

    def _hand_off_l7(self, consumed: bytes, hello: ClientHello) -> None:
        handler = self.server.l7_handler
        if handler is None:
            raise Refused(Reason.NO_ROUTE, "L7 routes are not served by this build")
        self._step = _Step.L7
        assert self._timer is not None
        self._timer.cancel()  # the handler keeps its own handshake deadline
        self._poller.forget(self.sock.fileno(), closing=False)
        handling = handler(self.sock, consumed, hello, self.record)
        self._l7_task = self._loop.create_task(self._serve_l7(handling))

    async def _serve_l7(self, handling: Awaitable[None]) -> None:
        try:
            await handling
        except Refused as refused:
            self.record.outcome = f"refused:{refused.reason}"
            self.record.detail = refused.detail
            reset(self.sock)
        except asyncio.CancelledError:
            self.record.outcome = "cancelled"
            reset(self.sock)
            raise
        except Exception as exc:  # invariant 8
            self.record.outcome = "error"
            self.record.detail = f"{type(exc).__name__}: {exc}"
            log.exception("connection from %s failed", self.record.client_ip)
            reset(self.sock)
        finally:
            self._finish()

    # --- the end ----------------------------------------------------------------------

    @_guarded
    def _on_timeout(self) -> None:
        if self._step is _Step.PROXY_HEADER:
            raise Refused(Reason.PROXY_HEADER, "no header in time")
        if self._step is _Step.CLIENT_HELLO:
            raise Refused(Reason.CLIENT_HELLO, "no ClientHello in time")
        if self._step is _Step.DIALING:
            timeout = self.server.timeouts.connect_timeout
            self._backend_failed("backend_timeout", f"no connection in {timeout}s")

    def refuse(self, refused: Refused) -> None:
        """RST and no bytes (invariant 6)."""
        self.record.outcome = f"refused:{refused.reason}"
        self.record.detail = refused.detail
        self._close()

    def fail(self, exc: Exception) -> None:
        self.record.outcome = "error"
        self.record.detail = f"{type(exc).__name__}: {exc}"
        log.error("connection from %s failed", self.record.client_ip, exc_info=exc)
        self._close()

    def abort(self) -> None:
        """End now (shutdown after the drain timeout): reset both sides."""
        if self._l7_task is not None:
            self._l7_task.cancel()
        elif self._relay is not None:
            self._relay.finish("cancelled")
        elif self._step is not _Step.DONE:
            self.record.outcome = "cancelled"
            self._close()

    def _close(self) -> None:
        """Before the relay or the L7 handler owns the sockets: reset them and finish."""
        if self._step is _Step.DONE:
            return
        if self._timer is not None:
            self._timer.cancel()
        for sock in (self.sock, self._backend):
            if sock is not None and sock.fileno() >= 0:
                self._poller.forget(sock.fileno(), closing=True)
                reset(sock)
        self._finish()

    def _finish(self) -> None:
        if self._step is _Step.DONE:
            return
        self._step = _Step.DONE
        if self._counted and self.record.backend is not None:
            self.server.balancer.released(self.record.backend)
        if self._admitted:
            assert self._listener is not None
            self.server.admission.release(self._listener)
        self.server.finished(self)
