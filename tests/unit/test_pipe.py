"""The supervisor <-> worker codec: frames in any split, bounded, and nothing but our classes."""

from __future__ import annotations

import pickle
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcproxy import pipe
from mcproxy.model import Address, FirewallRules, Listener, Route, RouteAdded, make_state
from mcproxy.settings import ProxyTimeouts

STATE = make_state(
    7,
    [
        Listener(
            Address("127.0.0.1", 8443),
            routes={"a.test": Route("a.test", Address("127.0.0.1", 9000))},
        )
    ],
    FirewallRules(blocked_ips=frozenset({"192.0.2.1"})),
)

MESSAGES: list[pipe.Message] = [
    pipe.Boot(slot=1, listen_fds={"127.0.0.1:8443": 5}, timeouts=ProxyTimeouts()),
    pipe.Snapshot(STATE),
    pipe.Delta(RouteAdded("127.0.0.1:8443", Route("b.test", Address("::1", 1))), 8),
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
