"""The L4 session state machine, driven with bytes and an injected clock: no sockets, no loop."""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcproxy.model import Address, Listener, Mode, Route, RouteTable
from mcproxy.settings import ProxyTimeouts
from mcproxy.worker.clienthello import ClientHello
from mcproxy.worker.errors import Reason, Refused
from mcproxy.worker.proxy_protocol import ProxyHeaderDecoder
from mcproxy.worker.records import ConnectionRecord
from mcproxy.worker.session import (
    AWAIT_ANSWER,
    NEVER,
    PROXY_HEADER_TIMEOUT,
    RELAY,
    Dial,
    End,
    HandOff,
    Session,
    Shutdown,
    Side,
    State,
)

TIMEOUTS = ProxyTimeouts(
    connect_timeout=5.0, handshake_timeout=10.0, idle_timeout=300.0, shutdown_timeout=30.0
)
B1, B2 = Address("127.0.0.1", 9001), Address("127.0.0.1", 9002)
LISTENER = ":443"


def client_hello(sni: str = "a.test") -> bytes:
    """A real ClientHello, as Python's TLS client writes it."""
    context = ssl.create_default_context()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


HELLO = client_hello()


@dataclass
class FakeGate:
    """Records what the session asked; answers from its fields."""

    refuse: Reason | None = None
    backends: Sequence[Address] = (B1,)
    counts: bool = False
    admitted: list[str] = field(default_factory=list)
    released: int = 0
    tried: list[tuple[Address, ...]] = field(default_factory=list)
    failed: list[Address] = field(default_factory=list)
    connected: list[Address] = field(default_factory=list)
    backends_released: list[Address] = field(default_factory=list)

    def admit(self, listener: Listener, ip: str) -> Reason | None:
        self.admitted.append(ip)
        return self.refuse

    def release(self, listener: Listener) -> None:
        self.released += 1

    def route(self, listener: Listener, hello: ClientHello) -> Route:
        route = listener.routes.get(hello.sni or "")
        if route is None:
            raise Refused(Reason.NO_ROUTE, f"unknown SNI {hello.sni!r}")
        return route

    def next_backend(self, record: ConnectionRecord, route: Route) -> Address | None:
        tried = record.failed_backends
        self.tried.append(tried)
        left = [b for b in self.backends if b not in tried]
        return left[0] if left else None

    def backend_failed(self, record: ConnectionRecord, route: Route, backend: Address) -> None:
        self.failed.append(backend)

    def backend_connected(self, route: Route, backend: Address) -> bool:
        self.connected.append(backend)
        return self.counts

    def backend_released(self, backend: Address) -> None:
        self.backends_released.append(backend)


def listener(
    *, proxy_protocol: bool = False, backends: tuple[Address, ...] = (B1,), **route: object
) -> Listener:
    routes = {"a.test": Route("a.test", backends, **route)}  # type: ignore[arg-type]
    return Listener(Address("", 443), proxy_protocol=proxy_protocol, routes=RouteTable(routes))


def session(
    gate: FakeGate | None = None, lst: Listener | None = None, now: float = 100.0
) -> tuple[Session, FakeGate]:
    gate = gate or FakeGate()
    record = ConnectionRecord(LISTENER, ("192.0.2.7", 40000), ("198.51.100.1", 443))
    s = Session(gate, TIMEOUTS, lst if lst is not None else listener(), record)
    assert s.start(now) is None
    return s, gate


def relaying(gate: FakeGate | None = None) -> tuple[Session, FakeGate]:
    s, gate = session(gate)
    assert isinstance(s.receive(HELLO, 100.5), Dial)
    s.connected(100.6)
    assert s.sent(100.6) is RELAY
    return s, gate


# --- the handshake ------------------------------------------------------------------------


def test_clienthello_in_two_reads_dials_the_route_backend_with_the_hello() -> None:
    s, gate = session()
    assert (s.state, s.deadline) == (State.CLIENT_HELLO, 110.0)
    assert gate.admitted == ["192.0.2.7"]
    assert s.receive(HELLO[:20], 100.1) is None
    dial = s.receive(HELLO[20:], 100.2)
    assert dial == Dial(B1, HELLO)
    assert s.state is State.DIALING and s.deadline == 105.2
    assert s.record.sni == "a.test" and s.record.route is not None


def test_dial_then_relay_then_two_eofs_close_cleanly() -> None:
    s, gate = session()
    s.receive(HELLO, 101.0)
    s.connected(101.25)
    assert s.record.dial_seconds == 0.25
    assert s.sent(101.5) is RELAY
    assert s.state is State.RELAYING and s.deadline == 401.5
    assert s.eof(Side.CLIENT) == Shutdown(Side.BACKEND)
    assert s.eof(Side.BACKEND) == End("closed", reset=False)
    assert s.record.outcome == "closed" and s.record.bytes_up == len(HELLO)
    assert gate.released == 1


def test_backend_eof_first_shuts_the_client_side() -> None:
    s, _ = relaying()
    assert s.eof(Side.BACKEND) == Shutdown(Side.CLIENT)
    assert s.eof(Side.CLIENT) == End("closed", reset=False)


def test_eof_before_the_clienthello_is_refused() -> None:
    s, gate = session()
    assert s.receive(HELLO[:10], 100.1) is None
    assert s.receive(b"", 100.2) == End("refused:client_hello", reset=True)
    assert "closed before the ClientHello" in s.record.detail
    assert gate.released == 1


def test_garbage_is_refused_with_a_reset() -> None:
    s, _ = session()
    assert s.receive(b"GET / HTTP/1.1\r\n\r\n", 100.1) == End("refused:client_hello", reset=True)


def test_read_error_during_the_handshake_is_a_refusal() -> None:
    s, _ = session()
    assert s.read_failed("Connection reset by peer") == End("refused:client_hello", reset=True)


def test_firewall_or_limit_refusal_takes_no_slot() -> None:
    gate = FakeGate(refuse=Reason.FIREWALL_IP)
    record = ConnectionRecord(LISTENER, ("192.0.2.7", 1), ("198.51.100.1", 443))
    s = Session(gate, TIMEOUTS, listener(), record)
    assert s.start(0.0) == End("refused:firewall_ip", reset=True)
    assert s.state is State.CLOSED and gate.released == 0


def test_removed_listener_is_refused() -> None:
    record = ConnectionRecord(LISTENER, ("192.0.2.7", 1), ("198.51.100.1", 443))
    s = Session(FakeGate(), TIMEOUTS, None, record)
    assert s.start(0.0) == End("refused:no_route", reset=True)


def test_unknown_sni_is_refused() -> None:
    s, gate = session()
    assert s.receive(client_hello("other.test"), 100.1) == End("refused:no_route", reset=True)
    assert s.record.sni == "other.test" and gate.released == 1


def test_clienthello_deadline() -> None:
    s, gate = session(now=0.0)
    assert s.timeout(9.999) is None
    assert s.timeout(10.0) == End("refused:client_hello", reset=True)
    assert s.record.detail == "no ClientHello in time" and gate.released == 1


# --- PROXY header -------------------------------------------------------------------------


def test_proxy_header_source_becomes_the_client_and_is_admitted() -> None:
    s, gate = session(lst=listener(proxy_protocol=True), now=0.0)
    assert s.state is State.PROXY_HEADER and gate.admitted == []
    assert s.deadline == PROXY_HEADER_TIMEOUT
    header = b"PROXY TCP6 ::ffff:203.0.113.9 2001:db8::1 5000 443\r\n"
    assert s.receive(header[:9], 0.1) is None
    assert s.receive(header[9:] + HELLO, 0.2) == Dial(B1, HELLO)
    assert s.record.client == ("203.0.113.9", 5000)  # canonical: mapped IPv4 as IPv4
    assert s.record.local == ("2001:db8::1", 443)
    assert gate.admitted == ["203.0.113.9"]


def test_proxy_header_deadline_then_the_handshake_one() -> None:
    s, _ = session(lst=listener(proxy_protocol=True), now=0.0)
    assert s.receive(b"PROXY TCP4 203.0.113.9 198.51.100.1 5000 443\r\n", 1.0) is None
    assert s.timeout(PROXY_HEADER_TIMEOUT) is None  # the header came: handshake time now
    assert s.deadline == 10.0
    assert s.timeout(10.0) == End("refused:client_hello", reset=True)


def test_late_proxy_header_is_refused_without_admission() -> None:
    s, gate = session(lst=listener(proxy_protocol=True), now=0.0)
    assert s.timeout(4.0) is None
    assert s.timeout(5.0) == End("refused:proxy_header", reset=True)
    assert gate.admitted == [] and gate.released == 0


def test_malformed_proxy_header_is_refused() -> None:
    s, _ = session(lst=listener(proxy_protocol=True))
    assert s.receive(b"PROXY BOGUS\r\n", 100.1) == End("refused:proxy_header", reset=True)


def test_send_proxy_protocol_puts_a_v2_header_before_the_hello() -> None:
    s, _ = session(lst=listener(send_proxy_protocol=True))
    dial = s.receive(HELLO, 100.1)
    assert isinstance(dial, Dial)
    decoder = ProxyHeaderDecoder()
    header = decoder.feed(dial.data)
    assert header is not None and header.source == ("192.0.2.7", 40000)
    assert header.destination == ("198.51.100.1", 443)
    assert decoder.leftover == HELLO


# --- dialing and failover -----------------------------------------------------------------


def test_connect_deadline_without_another_backend_ends_backend_timeout() -> None:
    s, gate = session()
    s.receive(HELLO, 100.0)
    assert s.timeout(104.9) is None
    assert s.timeout(105.0) == End("backend_timeout", reset=True)
    assert s.record.detail == "no connection in 5.0s" and gate.released == 1


def test_failed_dial_moves_on_to_the_next_backend() -> None:
    gate = FakeGate(backends=(B1, B2))
    s, _ = session(gate)
    assert s.receive(HELLO, 100.0) == Dial(B1, HELLO)
    assert s.record.backend == B1
    assert s.dial_failed(100.1, "backend_unreachable", "refused") == Dial(B2, HELLO)
    assert s.deadline == 105.1  # its own connect deadline
    assert gate.tried == [(), (B1,)] and gate.failed == [B1]
    assert s.record.backend == B2 and s.record.failed_backends == (B1,)
    s.connected(100.2)
    assert s.sent(100.2) is RELAY
    assert gate.connected == [B2]


def test_timeouts_fail_over_too_and_the_last_failure_is_the_outcome() -> None:
    gate = FakeGate(backends=(B1, B2))
    s, _ = session(gate)
    s.receive(HELLO, 100.0)
    assert s.timeout(105.0) == Dial(B2, HELLO)
    assert s.dial_failed(105.5, "backend_unreachable", "refused") == End(
        "backend_unreachable", reset=True
    )
    assert gate.tried == [(), (B1,), (B1, B2)]


def test_route_without_a_backend_up_is_refused() -> None:
    s, _ = session(FakeGate(backends=()))
    assert s.receive(HELLO, 100.0) == End("refused:no_route", reset=True)
    assert s.record.detail == "route has no backend"


def test_multi_backend_route_waits_for_the_backend_to_answer() -> None:
    gate = FakeGate(backends=(B1, B2))
    s, _ = session(gate, lst=listener(backends=(B1, B2)))
    s.receive(HELLO, 100.0)
    s.connected(100.1)
    assert s.sent(100.1) is AWAIT_ANSWER
    assert s.state is State.DIALING and s.deadline == 105.0  # still the connect deadline
    # It closed before answering (a crash): the next backend, with the same bytes.
    assert s.dial_failed(100.2, "backend_reset", "closed before answering") == Dial(B2, HELLO)
    s.connected(100.3)
    assert s.sent(100.3) is AWAIT_ANSWER
    assert s.answered(100.4) is RELAY
    assert gate.connected == [B2] and gate.failed == [B1]


def test_a_counted_backend_connection_is_released_once() -> None:
    gate = FakeGate(counts=True)
    s, _ = relaying(gate)
    assert gate.connected == [B1]
    s.relay_failed()
    s.abort()
    assert gate.backends_released == [B1]


def test_an_uncounted_one_is_not_released() -> None:
    s, gate = relaying()
    s.eof(Side.CLIENT)
    s.eof(Side.BACKEND)
    assert gate.backends_released == []


# --- relaying -----------------------------------------------------------------------------


def test_idle_deadline_follows_the_last_activity() -> None:
    s, _ = relaying()  # relaying since 100.6: deadline 400.6
    assert s.timeout(400.6, activity=350.0) is None
    assert s.deadline == 650.0
    assert s.timeout(650.0, activity=350.0) == End("idle_timeout", reset=True)


def test_relay_error_resets_and_ends_once() -> None:
    s, gate = relaying()
    assert s.relay_failed("Connection reset by peer") == End("reset", reset=True)
    assert s.relay_failed() is None and s.abort() is None
    assert gate.released == 1 and s.record.outcome == "reset"


def test_abort_while_dialing() -> None:
    s, gate = session()
    s.receive(HELLO, 100.0)
    assert s.abort() == End("cancelled", reset=True)
    assert gate.released == 1


def test_events_the_state_cannot_have_are_the_callers_bug() -> None:
    s, _ = session()
    s.receive(HELLO, 100.0)
    with pytest.raises(RuntimeError):
        s.receive(b"more", 100.1)
    with pytest.raises(RuntimeError):
        s.eof(Side.CLIENT)


# --- L7 -----------------------------------------------------------------------------------


def test_l7_route_hands_off_the_bytes_read_and_keeps_no_deadline() -> None:
    s, gate = session(lst=listener(mode=Mode.L7))
    action = s.receive(HELLO, 100.0)
    assert isinstance(action, HandOff) and action.data == HELLO
    assert action.hello.sni == "a.test"
    assert s.state is State.L7 and s.deadline == NEVER
    s.record.outcome = "closed"  # what the handler wrote
    assert s.l7_finished() == End("closed", reset=False)
    assert gate.released == 1


# --- whatever happens, one end and one release per admission --------------------------------

EVENTS = st.lists(
    st.sampled_from(
        [
            "hello",
            "half",
            "eof",
            "garbage",
            "read_failed",
            "timeout",
            "connected",
            "sent",
            "answered",
            "dial_failed",
            "eof_client",
            "eof_backend",
            "relay_failed",
            "abort",
        ]
    ),
    max_size=12,
)


def _event(s: Session, event: str, now: float) -> object:
    match event:
        case "hello":
            return s.receive(HELLO, now)
        case "half":
            return s.receive(HELLO[:30], now)
        case "eof":
            return s.receive(b"", now)
        case "garbage":
            return s.receive(b"\x00" * 10, now)
        case "read_failed":
            return s.read_failed("x")
        case "timeout":
            return s.timeout(now + 400.0)
        case "connected":
            s.connected(now)
            return None
        case "answered":
            return s.answered(now)
        case "sent":
            return s.sent(now)
        case "dial_failed":
            return s.dial_failed(now, "backend_unreachable", "x")
        case "eof_client":
            return s.eof(Side.CLIENT)
        case "eof_backend":
            return s.eof(Side.BACKEND)
        case "relay_failed":
            return s.relay_failed()
        case _:
            return s.abort()


@settings(max_examples=300, deadline=None)
@given(EVENTS, st.booleans(), st.booleans())
def test_any_sequence_of_events_ends_at_most_once(
    events: list[str], proxy: bool, multi: bool
) -> None:
    gate = FakeGate(backends=(B1, B2), counts=True)
    backends = (B1, B2) if multi else (B1,)
    s, _ = session(gate, lst=listener(proxy_protocol=proxy, backends=backends), now=0.0)
    ends: list[End] = []
    for i, event in enumerate(events):
        state = s.state
        try:
            action = _event(s, event, float(i + 1))
        except RuntimeError:
            assert s.state is state  # refused as the caller's bug, nothing changed
            continue
        if isinstance(action, End):
            ends.append(action)
            assert s.state is State.CLOSED
    assert len(ends) <= 1
    if s.state is State.CLOSED:
        assert len(ends) == 1 and s.record.outcome == ends[0].outcome
    assert gate.released == (1 if gate.admitted and s.state is State.CLOSED else 0)
    closed_connected = gate.connected if s.state is State.CLOSED else []
    assert gate.backends_released == closed_connected  # each counted one, once
