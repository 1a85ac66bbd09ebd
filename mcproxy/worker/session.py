"""One client connection's decisions, accept to end, as a sans-I/O state machine.

Strategy (h11's): the glue (:mod:`mcproxy.worker.connection`) does the I/O
and reports what happened (bytes read from the client, a dial's result, an
end of stream the relay passed on, the clock); the :class:`Session` answers
with at most one action, a small immutable value that says what to do next
(:class:`Dial`, :class:`AwaitAnswer`, :class:`Relay`, :class:`Shutdown`,
:class:`HandOff`, :class:`End`). It imports no socket and no event loop:
time comes in as ``now``, and what depends on the worker's shared state
(firewall, limits, route lookup, which backend to dial and how it fared)
comes from a :class:`Gate`.

States and the one deadline of each (``Session.deadline``)::

    PROXY_HEADER  accept + min(PROXY_HEADER_TIMEOUT, handshake_timeout)   (proxy_protocol listeners)
    CLIENT_HELLO  accept + handshake_timeout
    DIALING       start of this dial + connect_timeout (each backend tried gets its own;
                  it covers the wait for the backend's first byte on a multi-backend route)
    RELAYING      last byte relayed + idle_timeout
    L7            none here: the L7 handler keeps its own
    CLOSED        none

Failover: a dial that fails (refused, timed out, or on a route with several
backends, reset or closed before the backend's first byte) is reported to the
gate and the next backend it names is dialled with the same first bytes;
nothing has reached the client yet, so this is safe (ARCHITECTURE.md,
"Backends and health").

Every path ends in exactly one :class:`End`: its ``outcome`` is written to
the :class:`~mcproxy.worker.records.ConnectionRecord`, what admission and
the balancer counted is released, and the glue closes both sockets (with a
RST when ``reset``; invariant 6 for refusals).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from mcproxy.ip import canonical_ip
from mcproxy.model import Address, Listener, Mode, Route
from mcproxy.settings import ProxyTimeouts
from mcproxy.worker.clienthello import ClientHello, ClientHelloError, ClientHelloParser
from mcproxy.worker.errors import Reason, Refused
from mcproxy.worker.proxy_protocol import ProxyHeaderDecoder, ProxyHeaderError, encode_v2
from mcproxy.worker.records import ConnectionRecord

__all__ = [
    "AWAIT_ANSWER",
    "PROXY_HEADER_TIMEOUT",
    "RELAY",
    "Action",
    "AwaitAnswer",
    "Dial",
    "End",
    "Gate",
    "HandOff",
    "Relay",
    "Session",
    "Shutdown",
    "Side",
    "State",
]

PROXY_HEADER_TIMEOUT = 5.0
"""The PROXY spec's advice: a header comes at once or the peer is not a proxy."""
NEVER = math.inf


class State(Enum):
    PROXY_HEADER = "PROXY header"
    CLIENT_HELLO = "ClientHello"
    DIALING = "dialing"
    RELAYING = "relaying"
    L7 = "L7"
    CLOSED = "closed"


class Side(Enum):
    CLIENT = "client"
    BACKEND = "backend"


@dataclass(frozen=True, slots=True)
class Dial:
    """Connect to ``backend`` and send ``data`` first (PROXY v2 header, the ClientHello).

    Report :meth:`Session.connected` when the first byte went out, :meth:`Session.sent`
    once all of ``data`` did, or :meth:`Session.dial_failed`.
    """

    backend: Address
    data: bytes


@dataclass(frozen=True, slots=True)
class AwaitAnswer:
    """Wait for the backend's first byte (peek; report :meth:`Session.answered`, or
    :meth:`Session.dial_failed` when it resets or closes first)."""


AWAIT_ANSWER = AwaitAnswer()


@dataclass(frozen=True, slots=True)
class Relay:
    """Copy bytes both ways; report :meth:`Session.eof` and :meth:`Session.relay_failed`."""


RELAY = Relay()


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Stop writing to ``side`` (``shutdown(SHUT_WR)``): it has been sent everything."""

    side: Side


@dataclass(frozen=True, slots=True)
class HandOff:
    """Give the client socket to the L7 handler with the bytes read so far."""

    hello: ClientHello
    data: bytes


@dataclass(frozen=True, slots=True)
class End:
    """Close both sockets, with a RST if ``reset``; the outcome is in the record."""

    outcome: str
    reset: bool


Action = Dial | AwaitAnswer | Relay | Shutdown | HandOff | End


class Gate(Protocol):
    """What a session asks of its worker: the decisions that depend on shared state."""

    def admit(self, listener: Listener, ip: str) -> Reason | None:
        """Firewall, then the listener's limits; a reason refuses, None takes a slot."""
        ...

    def release(self, listener: Listener) -> None:
        """Give back what :meth:`admit` took (called once per admitted session)."""
        ...

    def route(self, listener: Listener, hello: ClientHello) -> Route:
        """The route for this ClientHello; raises :class:`Refused` when there is none."""
        ...

    def next_backend(self, record: ConnectionRecord, route: Route) -> Address | None:
        """The backend to dial, none of ``record.failed_backends``; None: none is left."""
        ...

    def backend_failed(self, record: ConnectionRecord, route: Route, backend: Address) -> None:
        """A dial to ``backend`` failed or timed out (passive health)."""
        ...

    def backend_connected(self, route: Route, backend: Address) -> bool:
        """The connection to ``backend`` is up; True when it is counted (``least_conn``):
        :meth:`backend_released` follows at the end."""
        ...

    def backend_released(self, backend: Address) -> None:
        """A connection counted by :meth:`backend_connected` ended."""
        ...


def _endpoint(address: tuple[str, int]) -> tuple[str, int]:
    return canonical_ip(address[0]), address[1]


class Session:
    """The L4 decisions of one connection; see the module docstring for the contract.

    Methods take what happened and return the action to take, or None for
    "nothing to do, keep waiting". A method called in a state where its event
    cannot happen (the glue's bug) raises :class:`RuntimeError`.
    """

    __slots__ = (
        "_admitted",
        "_backend_eof",
        "_client_eof",
        "_counted",
        "_dial_started",
        "_gate",
        "_handshake_deadline",
        "_header",
        "_hello",
        "_payload",
        "_timeouts",
        "deadline",
        "listener",
        "record",
        "state",
    )

    def __init__(
        self,
        gate: Gate,
        timeouts: ProxyTimeouts,
        listener: Listener | None,
        record: ConnectionRecord,
    ) -> None:
        self._gate = gate
        self._timeouts = timeouts
        self.listener = listener
        """The listener as it was at accept (None: removed meanwhile)."""
        self.record = record
        self.state = State.CLIENT_HELLO
        self.deadline = NEVER
        """When :meth:`timeout` has something to do; the glue keeps a timer at or before it."""
        self._admitted = False
        self._header: ProxyHeaderDecoder | None = None
        self._hello = ClientHelloParser()
        self._handshake_deadline = NEVER
        self._payload = b""
        self._counted = False
        self._dial_started = 0.0
        self._client_eof = False
        self._backend_eof = False

    @property
    def reading(self) -> bool:
        """Whether the glue should read the client now (PROXY header or ClientHello)."""
        return self.state is State.CLIENT_HELLO or self.state is State.PROXY_HEADER

    # --- the handshake: PROXY header, admission, ClientHello, route ----------------------

    def start(self, now: float) -> End | None:
        """The connection was accepted at ``now``: admit it or wait for its PROXY header."""
        listener = self.listener
        if listener is None:
            return self.refuse(Reason.NO_ROUTE, "listener removed")
        self._handshake_deadline = now + self._timeouts.handshake_timeout
        if listener.proxy_protocol:
            self.state = State.PROXY_HEADER
            self._header = ProxyHeaderDecoder()
            self.deadline = min(self._handshake_deadline, now + PROXY_HEADER_TIMEOUT)
            return None
        return self._admit(listener)

    def _admit(self, listener: Listener) -> End | None:
        reason = self._gate.admit(listener, self.record.client[0])
        if reason is not None:
            return self.refuse(reason)
        self._admitted = True
        self.state = State.CLIENT_HELLO
        self.deadline = self._handshake_deadline
        return None

    def receive(self, data: bytes, now: float) -> Action | None:
        """Bytes read from the client (``b""``: it closed); only while :attr:`reading`."""
        if self.state is State.PROXY_HEADER:
            if not data:
                return self.refuse(Reason.PROXY_HEADER, "closed before the PROXY header")
            data, end = self._feed_header(data)
            if end is not None or not data:
                return end
        elif self.state is not State.CLIENT_HELLO:
            raise RuntimeError(f"client bytes in state {self.state.name}")
        if not data:
            return self.refuse(Reason.CLIENT_HELLO, "closed before the ClientHello")
        try:
            hello = self._hello.feed(data)
        except ClientHelloError as exc:
            return self.refuse(Reason.CLIENT_HELLO, str(exc))
        if hello is None:
            return None
        return self._routed(hello, now)

    def _feed_header(self, data: bytes) -> tuple[bytes, End | None]:
        """Take the PROXY header; returns the bytes after it once it is complete.

        The header's source becomes the client and its destination the local end, as
        HAProxy does: the firewall, the log and a forwarded PROXY header see the
        connection as the real client made it, not the hop from the upstream proxy.
        LOCAL, UNKNOWN and address-less families keep the TCP endpoints.
        """
        assert self._header is not None and self.listener is not None
        try:
            header = self._header.feed(data)
        except ProxyHeaderError as exc:
            return b"", self.refuse(Reason.PROXY_HEADER, str(exc))
        if header is None:
            return b"", None
        if header.source is not None and header.destination is not None:
            self.record.client = _endpoint(header.source)
            self.record.local = _endpoint(header.destination)
        end = self._admit(self.listener)
        return (b"", end) if end is not None else (self._header.leftover, None)

    def read_failed(self, detail: str) -> End | None:
        """Reading the client failed (reset) during the handshake."""
        return self.refuse(self._handshake_reason(), f"read failed: {detail}")

    def _handshake_reason(self) -> Reason:
        return Reason.PROXY_HEADER if self.state is State.PROXY_HEADER else Reason.CLIENT_HELLO

    def _routed(self, hello: ClientHello, now: float) -> Action | None:
        assert self.listener is not None
        record = self.record
        record.sni = hello.sni
        try:
            route = self._gate.route(self.listener, hello)
        except Refused as refused:
            return self.refuse(refused.reason, refused.detail)
        record.route = route
        data = self._hello.consumed
        if route.mode is Mode.L7:
            self.state = State.L7
            self.deadline = NEVER
            return HandOff(hello, data)
        record.bytes_up = len(data)
        if route.send_proxy_protocol:
            data = encode_v2(record.client, record.local) + data
        self._payload = data
        return self._dial_next(now, "", "")

    # --- L4: dial (failing over), then relay ----------------------------------------------

    def _dial_next(self, now: float, outcome: str, detail: str) -> Dial | End | None:
        """Dial the gate's next backend; none left ends with ``outcome`` (no backend at
        all, before any failure, is a refusal)."""
        record = self.record
        assert record.route is not None
        backend = self._gate.next_backend(record, record.route)
        if backend is None:
            if not outcome:
                return self.refuse(Reason.NO_ROUTE, "route has no backend")
            return self._end(outcome, detail, reset=True)
        record.backend = backend
        record.dial_seconds = None
        self.state = State.DIALING
        self._dial_started = now
        self.deadline = now + self._timeouts.connect_timeout
        return Dial(backend, self._payload)

    def connected(self, now: float) -> None:
        """The backend took the first bytes: the TCP connection is up."""
        if self.state is not State.DIALING:
            raise RuntimeError(f"connected in state {self.state.name}")
        self.record.dial_seconds = now - self._dial_started

    def sent(self, now: float) -> Relay | AwaitAnswer:
        """All of :class:`Dial`'s ``data`` went out: relay from here on, or first wait
        for the backend to answer when another backend could still take over."""
        if self.state is not State.DIALING:
            raise RuntimeError(f"sent in state {self.state.name}")
        route = self.record.route
        if route is not None and len(route.backends) > 1:
            return AWAIT_ANSWER  # a crash or a full accept queue is still a failed dial
        return self._relaying(now)

    def answered(self, now: float) -> Relay:
        """The backend sent its first byte (after :class:`AwaitAnswer`)."""
        if self.state is not State.DIALING:
            raise RuntimeError(f"answered in state {self.state.name}")
        return self._relaying(now)

    def _relaying(self, now: float) -> Relay:
        record = self.record
        assert record.route is not None and record.backend is not None
        self._counted = self._gate.backend_connected(record.route, record.backend)
        self.state = State.RELAYING
        self.deadline = now + self._timeouts.idle_timeout
        return RELAY

    def dial_failed(self, now: float, outcome: str, detail: str) -> Dial | End | None:
        """This dial failed (``backend_unreachable``, ``backend_reset``): the next backend,
        or the end with this outcome when the gate has none left."""
        if self.state is not State.DIALING:
            raise RuntimeError(f"dial failed in state {self.state.name}")
        record = self.record
        assert record.route is not None and record.backend is not None
        self._gate.backend_failed(record, record.route, record.backend)
        record.failed_backends += (record.backend,)
        return self._dial_next(now, outcome, detail)

    def eof(self, side: Side) -> Shutdown | End | None:
        """``side`` sent EOF and everything it sent was written to the other one."""
        if self.state is not State.RELAYING:
            raise RuntimeError(f"EOF in state {self.state.name}")
        if side is Side.CLIENT:
            self._client_eof = True
            other = Side.BACKEND
        else:
            self._backend_eof = True
            other = Side.CLIENT
        if self._client_eof and self._backend_eof:
            return self._end("closed", "", reset=False)  # closing sends the last FIN
        return Shutdown(other)

    def relay_failed(self, detail: str = "") -> End | None:
        """A socket of the relay failed (reset, or a shutdown that could not be made)."""
        return self._end("reset", detail, reset=True)

    # --- deadlines ---------------------------------------------------------------------

    def timeout(self, now: float, activity: float = 0.0) -> Action | None:
        """The glue's timer fired at ``now``; ``activity``: when the relay last moved a byte.

        Returns None when the deadline has not come (a timer armed for an earlier
        deadline, or relay traffic since): re-arm at :attr:`deadline`.
        """
        state = self.state
        if state is State.RELAYING:
            self.deadline = max(self.deadline, activity + self._timeouts.idle_timeout)
        if now < self.deadline:
            return None
        if state is State.PROXY_HEADER:
            return self.refuse(Reason.PROXY_HEADER, "no header in time")
        if state is State.CLIENT_HELLO:
            return self.refuse(Reason.CLIENT_HELLO, "no ClientHello in time")
        if state is State.DIALING:
            timeout = self._timeouts.connect_timeout
            return self.dial_failed(now, "backend_timeout", f"no connection in {timeout}s")
        if state is State.RELAYING:
            return self._end("idle_timeout", "", reset=True)
        return None

    # --- the end: one way, whatever the cause --------------------------------------------

    def refuse(self, reason: Reason, detail: str = "") -> End | None:
        """RST and no bytes (invariant 6)."""
        return self._end(f"refused:{reason}", detail, reset=True)

    def fail(self, exc: BaseException) -> End | None:
        """A bug or an unexpected error: this connection alone ends (invariant 8)."""
        return self._end("error", f"{type(exc).__name__}: {exc}", reset=True)

    def abort(self) -> End | None:
        """End now (shutdown after the drain timeout)."""
        return self._end("cancelled", "", reset=True)

    def l7_finished(self) -> End | None:
        """The L7 handler is done with the socket; it wrote the outcome into the record."""
        return self._end(self.record.outcome, self.record.detail, reset=False)

    def _end(self, outcome: str, detail: str, *, reset: bool) -> End | None:
        if self.state is State.CLOSED:
            return None
        self.state = State.CLOSED
        self.deadline = NEVER
        self.record.outcome = outcome
        self.record.detail = detail
        if self._counted:
            self._counted = False
            assert self.record.backend is not None
            self._gate.backend_released(self.record.backend)
        if self._admitted:
            self._admitted = False
            assert self.listener is not None
            self._gate.release(self.listener)
        return End(outcome, reset)
