"""The supervisor <-> worker codec: frames in any split, bounded, and nothing but our classes."""

from __future__ import annotations

import os
import pickle
import socket
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcproxy import pipe
from mcproxy.health import CheckTarget, Verdict
from mcproxy.model import (
    Address,
    FirewallRules,
    Listener,
    Route,
    RouteAdded,
    RouteTable,
    make_state,
)
from mcproxy.settings import ProxyTimeouts

STATE = make_state(
    7,
    [
        Listener(
            Address("127.0.0.1", 8443),
            routes={"a.test": Route("a.test", (Address("127.0.0.1", 9000),))},
        )
    ],
    FirewallRules(blocked_ips=frozenset({"192.0.2.1"})),
)

MESSAGES: list[pipe.Message] = [
    pipe.Boot(slot=1, listen_fds={"127.0.0.1:8443": 5}, timeouts=ProxyTimeouts()),
    pipe.Snapshot(STATE),
    pipe.Delta(RouteAdded("127.0.0.1:8443", Route("b.test", (Address("::1", 1),))), 8),
    pipe.Health(
        (Verdict(CheckTarget(Address("127.0.0.1", 9000), "tcp", 1.0, 1.0, 2, 3), False, "x", 1.0),),
        full=True,
    ),
    pipe.Ack(8),
    pipe.Heartbeat(generation=8, active_connections=3),
]


def test_every_message_round_trips() -> None:
    decoder = pipe.FrameDecoder()
    data = b"".join(pipe.encode(message) for message in MESSAGES)
    assert decoder.feed(data) == MESSAGES


@given(st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=40))
def test_frames_survive_any_split(cuts: list[int]) -> None:
    data = b"".join(pipe.encode(message) for message in MESSAGES)
    decoder, received, offset = pipe.FrameDecoder(), [], 0
    for cut in cuts:
        received += decoder.feed(data[offset : offset + cut])
        offset += cut
    received += decoder.feed(data[offset:])
    assert received == MESSAGES


def test_oversize_length_is_refused_before_the_bytes_arrive() -> None:
    decoder = pipe.FrameDecoder(max_frame=1024)
    with pytest.raises(pipe.FrameError):
        decoder.feed(struct.pack(">I", 1025))


def test_foreign_classes_are_refused() -> None:
    payload = pickle.dumps(ValueError("not ours"))
    with pytest.raises(pipe.FrameError, match="forbidden"):
        pipe.FrameDecoder().feed(struct.pack(">I", len(payload)) + payload)


def test_a_non_message_is_refused() -> None:
    payload = pickle.dumps(("a", "tuple"))
    with pytest.raises(pipe.FrameError, match="not a message"):
        pipe.FrameDecoder().feed(struct.pack(">I", len(payload)) + payload)


def test_garbage_is_a_frame_error() -> None:
    with pytest.raises(pipe.FrameError):
        pipe.FrameDecoder().feed(struct.pack(">I", 3) + b"\x80\x05\xff")


# --- the allow-list --------------------------------------------------------------


def _frame_naming(module: str, name: str) -> bytes:
    """A protocol-2 pickle that names ``module.name`` and calls it with no argument."""
    payload = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b")R."
    return struct.pack(">I", len(payload)) + payload


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("os", "system"),
        ("builtins", "getattr"),
        ("builtins", "eval"),
        ("copyreg", "_reconstructor"),
        ("mcproxy.model", "apply_change"),  # a function in an allowed module
        ("mcproxy.model", "dataclasses"),  # a module reachable from one
        ("mcproxy.supervisor.manager", "Supervisor"),  # a class of ours, not a value type
        ("mcproxy.model", "Route.__init__"),
    ],
)
def test_the_decoder_resolves_only_allowed_names(module: str, name: str) -> None:
    with pytest.raises(pipe.FrameError, match="forbidden"):
        pipe.FrameDecoder().feed(_frame_naming(module, name))


def test_the_allow_list_holds_value_types_only() -> None:
    import dataclasses
    import enum

    for (module, name), cls in pipe.ALLOWED.items():
        assert module in (
            "builtins",
            "mcproxy.model",
            "mcproxy.settings",
            "mcproxy.health",
            "mcproxy.pipe",
        )
        assert cls.__qualname__ == name
        if module != "builtins" and cls is not RouteTable:
            assert dataclasses.is_dataclass(cls) or issubclass(cls, enum.Enum)


# --- the outbox: partial writes, a stalled reader ---------------------------------------


class TrickleSocket:
    """Takes at most ``chunk`` bytes per call and then says 'would block' once."""

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk
        self.received = bytearray()
        self.fds: list[tuple[int, list[int]]] = []  # (offset of the byte they came with, fds)
        self.blocked = False

    def _take(self, data: memoryview) -> int:
        if self.blocked:
            self.blocked = False
            raise BlockingIOError
        self.blocked = True
        taken = bytes(data[: self.chunk])
        self.received += taken
        return len(taken)

    def send(self, data: memoryview) -> int:
        return self._take(data)

    def sendmsg(self, buffers: list[memoryview], ancdata: list[tuple[int, int, Any]]) -> int:
        offset = len(self.received)
        sent = self._take(buffers[0])
        self.fds.append((offset, list(ancdata[0][2])))
        return sent


def test_partial_writes_continue_where_they_stopped() -> None:
    frames = [pipe.encode(message) for message in MESSAGES]
    outbox, sock = pipe.Outbox(), TrickleSocket(chunk=7)
    outbox.push(frames[0])
    outbox.push(frames[1], fds=[11, 12])
    for frame in frames[2:]:
        outbox.push(frame)
    rounds = 0
    while not outbox.flush(sock):  # type: ignore[arg-type]
        rounds += 1
    assert bytes(sock.received) == b"".join(frames)  # nothing twice, nothing lost
    assert sock.fds == [(len(frames[0]), [11, 12])]  # once, with the frame's first byte
    assert rounds > len(b"".join(frames)) // 7 - 1
    assert outbox.pending_bytes == 0 and not outbox


def test_a_stalled_reader_leaves_the_rest_queued_and_progress_is_tracked() -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    try:
        big = pipe.encode(pipe.Snapshot(_big_state(20_000)))
        outbox = pipe.Outbox()
        outbox.push(big)
        assert not outbox.flush(ours)  # the reader is not reading: the rest waits
        stalled_at = outbox.progress_at
        assert 0 < outbox.pending_bytes < len(big)
        assert not outbox.flush(ours)
        assert outbox.progress_at == stalled_at  # no byte taken: no progress
        decoder, got = pipe.FrameDecoder(), list[pipe.Message]()
        theirs.settimeout(5)
        while not got:
            got = decoder.feed(theirs.recv(1 << 20))
            outbox.flush(ours)
        assert got[0] == pipe.Snapshot(_big_state(20_000))
        assert not outbox
    finally:
        ours.close()
        theirs.close()


def test_fds_travel_with_their_frame() -> None:
    ours, theirs = socket.socketpair()
    extra_r, extra_w = os.pipe()
    try:
        outbox = pipe.Outbox()
        outbox.push(pipe.encode(pipe.Ack(1)), fds=[extra_w])
        assert outbox.flush(ours)
        data, fds = pipe.recv_with_fds(theirs, 1 << 16)
        assert pipe.FrameDecoder().feed(data) == [pipe.Ack(1)]
        assert len(fds) == 1
        os.write(fds[0], b"x")  # a new descriptor of the same pipe
        assert os.read(extra_r, 1) == b"x"
        os.close(fds[0])
    finally:
        for fd in (extra_r, extra_w):
            os.close(fd)
        ours.close()
        theirs.close()


def _big_state(routes: int) -> Any:
    return make_state(
        1,
        [
            Listener(
                Address("127.0.0.1", 8443),
                routes={
                    f"h{i}.test": Route(f"h{i}.test", (Address("127.0.0.1", 9000),))
                    for i in range(routes)
                },
            )
        ],
        FirewallRules(),
    )


def test_a_snapshot_travels_as_plain_rows_and_comes_back_equal() -> None:
    from mcproxy.model import L7Policy, Mode, PolicyKind

    routes = {
        "a.test": Route("a.test", (Address("10.0.0.1", 1), Address("10.0.0.2", 2))),
        "b.test": Route(
            "b.test",
            (Address("10.0.0.1", 1),),
            mode=Mode.L7,
            tls_cert="/c",
            tls_key="/k",
            policies=(L7Policy(PolicyKind.REQUIRE_HEADER, "X-Key"),),
        ),
    }
    state = make_state(
        4,
        [Listener(Address("127.0.0.1", 1), max_connections=3, routes=routes)],
        FirewallRules(blocked_cidrs=frozenset({"10.0.0.0/8"})),
    )
    (decoded,) = pipe.FrameDecoder().feed(pipe.encode(pipe.Snapshot(state)))
    assert decoded == pipe.Snapshot(state)
    assert isinstance(decoded, pipe.Snapshot)
    table = decoded.state.listeners["127.0.0.1:1"].routes
    assert isinstance(table, RouteTable)
    assert table["b.test"].policies == routes["b.test"].policies
    assert pickle.dumps(pipe.Snapshot(state)).count(b"Route") <= 1  # rows, not objects


def test_a_snapshot_with_other_route_fields_is_refused() -> None:
    packed = pipe._pack_state(STATE)
    bad = pipe.Snapshot.__new__(pipe.Snapshot)
    with pytest.raises(pipe.FrameError, match="fields"):
        bad.__setstate__((("hostname",), packed[1], packed[2]))
