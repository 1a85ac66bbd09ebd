"""Properties of our HTTP/2 core (hypothesis) and a fuzz of its server role.

- chunking: any split of a byte stream gives the events and replies of one feed;
- random application operations on both sides, h2 as the peer: neither raises,
  every byte sent arrives, both agree on open streams and on the send window;
- flow control: a peer that ignores our windows gets FLOW_CONTROL_ERROR exactly
  when it overruns one, never before;
- bounds: hostile input ends in an error within bounded memory and time;
- fuzz: random bytes and mutations of a valid client stream raise nothing but
  ProtocolError, each with its GOAWAY.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
from hyperframe.frame import WindowUpdateFrame
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcproxy.worker.l7 import h2core
from mcproxy.worker.l7.frames import FrameWatch
from mcproxy.worker.l7.h2core import ErrorCodes, SettingCodes
from tests.unit.h2peer import (
    CONTINUATION,
    HEADERS,
    PREFACE,
    Clock,
    FrameReader,
    Pair,
    Raw,
    data,
    fields,
    goaway_codes,
    of,
    peer_window,
    raw,
    request,
    response,
)
from tests.unit.h2peer import (
    settings as settings_frame,
)

FAST = settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
"""Each example is a few ms; the deadline is generous for a loaded 2-core machine."""


def _h2(client: bool) -> h2.connection.H2Connection:
    return h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=client, header_encoding=None)
    )


def _client_stream() -> bytes:
    """What an h2 client sends for a varied session (fits the default windows)."""
    c = _h2(True)
    c.initiate_connection()
    c.send_headers(1, request(b"/a"), end_stream=True)
    c.send_headers(3, request(b"/b", b"POST", [(b"content-length", b"20000")]))
    c.send_data(3, b"x" * 16384)
    c.send_data(3, b"y" * 3616, end_stream=True)
    c.send_headers(5, request(b"/c", b"POST", [(b"te", b"trailers")]))
    c.send_data(5, b"padded", pad_length=20)
    c.ping(b"pingpong")
    c.send_headers(5, [(b"x-sum", b"1")], end_stream=True)
    c.send_headers(7, request(b"/d", b"POST"))
    c.send_data(7, b"abc")
    c.reset_stream(7, ErrorCodes.CANCEL)
    c.increment_flow_control_window(1000)
    c.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 30000})
    c.send_headers(9, request(b"/e", extra=[(b"x-long", b"v" * 500)]), end_stream=True)
    return c.data_to_send()


CLIENT_STREAM = _client_stream()


def _server_script() -> tuple[Callable[[], Any], bytes]:
    """A client-role core with three requests out, and an h2 server's answer to them."""

    def make() -> Any:
        core = h2core.H2Connection(client_side=True)
        core.initiate_connection()
        core.send_headers(1, request(b"/a"), end_stream=True)
        core.send_headers(3, request(b"/b", b"POST"))
        core.send_data(3, b"body", end_stream=True)
        core.send_headers(5, request(b"/c"), end_stream=True)
        return core

    s = _h2(False)
    s.initiate_connection()
    s.receive_data(make().data_to_send())
    s.send_headers(1, response(b"100"))
    s.send_headers(1, response(extra=[(b"content-length", b"5")]))
    s.send_data(1, b"hello", end_stream=True)
    s.send_headers(3, response())
    s.send_data(3, b"z" * 16384)
    s.send_data(3, b"z" * 3616)
    s.send_headers(3, [(b"grpc-status", b"0")], end_stream=True)
    s.reset_stream(5, ErrorCodes.REFUSED_STREAM)
    s.ping(b"12345678")
    return make, s.data_to_send()


MAKE_CLIENT, SERVER_STREAM = _server_script()


def _feed(core: Any, stream: bytes, cuts: list[int]) -> tuple[list[Any], bytes]:
    events: list[Any] = []
    start = 0
    for end in [*sorted(set(cuts)), len(stream)]:
        events += core.receive_data(stream[start:end])
        start = end
    return [fields(e) for e in events], core.data_to_send()


def _server_core() -> Any:
    core = h2core.H2Connection(client_side=False)
    core.initiate_connection()
    return core


def test_the_scripted_streams_are_accepted_whole() -> None:
    events, _ = _feed(_server_core(), CLIENT_STREAM, [])
    kinds = [e[0] for e in events]
    assert kinds.count("RequestReceived") == 5
    assert "TrailersReceived" in kinds and "StreamReset" in kinds
    events, _ = _feed(MAKE_CLIENT(), SERVER_STREAM, [])
    kinds = [e[0] for e in events]
    assert kinds.count("ResponseReceived") == 2 and "InformationalResponseReceived" in kinds


@FAST
@given(st.lists(st.integers(0, len(CLIENT_STREAM)), max_size=30))
def test_any_split_of_a_client_stream_gives_the_same_events(cuts: list[int]) -> None:
    whole = _feed(_server_core(), CLIENT_STREAM, [])
    assert _feed(_server_core(), CLIENT_STREAM, cuts) == whole


@FAST
@given(st.lists(st.integers(0, len(SERVER_STREAM)), max_size=30))
def test_any_split_of_a_server_stream_gives_the_same_events(cuts: list[int]) -> None:
    whole = _feed(MAKE_CLIENT(), SERVER_STREAM, [])
    assert _feed(MAKE_CLIENT(), SERVER_STREAM, cuts) == whole


def test_the_stream_fed_one_byte_at_a_time_gives_the_same_events() -> None:
    whole = _feed(_server_core(), CLIENT_STREAM, [])
    assert _feed(_server_core(), CLIENT_STREAM, list(range(len(CLIENT_STREAM)))) == whole


# -- random operations against h2 ------------------------------------------------------


@dataclass
class Stream:
    sent: dict[bool, bytearray] = field(
        default_factory=lambda: {True: bytearray(), False: bytearray()}
    )
    """By "sent by the client?"."""
    ended: dict[bool, bool] = field(default_factory=lambda: {True: False, False: False})
    responded: bool = False
    reset: bool = False


OPS = ["open", "respond", "data", "data", "data", "trailers", "reset", "ack", "ack", "window"]
op_strategy = st.tuples(
    st.sampled_from(OPS),
    st.booleans(),  # by the client side?
    st.integers(0, 7),  # which stream
    st.integers(0, 40000),  # size
    st.booleans(),  # end the stream
)


class Session:
    """Both sides driven by the same operations; the expectations kept by hand."""

    def __init__(self, core_client: bool, window: int) -> None:
        self.pair = Pair(core_client, local_settings={SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.pair.handshake()
        self.core_client = core_client
        self.streams: dict[int, Stream] = {}
        self.got: dict[tuple[bool, int], bytearray] = {}  # (received by the client?, sid)
        self.ended_at: dict[tuple[bool, int], bool] = {}
        self.unacked: dict[tuple[bool, int], int] = {}

    def side(self, is_client: bool) -> Any:
        return self.pair.core if is_client == self.core_client else self.pair.peer

    def pump(self) -> None:
        core_events, peer_events = self.pair.pump()
        for is_client, events in (
            (self.core_client, core_events),
            (not self.core_client, peer_events),
        ):
            for e in events:
                sid = getattr(e, "stream_id", 0)
                key = (is_client, sid)
                if isinstance(e, (h2core.DataReceived, h2.events.DataReceived)):
                    self.got.setdefault(key, bytearray()).extend(e.data or b"")
                    fc = (
                        len(e.data)
                        if isinstance(e, h2core.DataReceived)
                        else e.flow_controlled_length
                    )
                    self.unacked[key] = self.unacked.get(key, 0) + (fc or 0)
                if getattr(e, "stream_ended", False) is True or isinstance(
                    e, (h2.events.StreamEnded, h2core.TrailersReceived)
                ):
                    self.ended_at[key] = True
                if isinstance(e, (h2core.StreamReset, h2.events.StreamReset)):
                    self.streams[sid].reset = True
        self.check()

    def check(self) -> None:
        core, peer = self.pair.core, self.pair.peer
        if self.core_client:
            assert core.open_streams == peer.open_inbound_streams
        else:
            assert core.open_streams == peer.open_outbound_streams
        core_is_client = self.core_client
        for sid, s in self.streams.items():
            can_send = (
                not s.reset and not s.ended[core_is_client] and (core_is_client or s.responded)
            )
            if can_send:
                assert max(core.local_flow_control_window(sid), 0) == max(
                    peer_window(self.pair, sid), 0
                )

    def run(self, op: str, by_client: bool, index: int, size: int, end: bool) -> None:
        sids = sorted(self.streams)
        sid = sids[index % len(sids)] if sids else 0
        s = self.streams.get(sid)
        actor = self.side(by_client)
        if op == "open":
            if len(self.streams) >= 8:
                return
            sid = self.pair.open(request(f"/{len(self.streams)}".encode(), b"POST"), end_stream=end)
            self.streams[sid] = st_ = Stream()
            st_.ended[True] = end
        elif s is None or s.reset:
            return
        elif op == "respond":
            if s.responded:
                return
            self.side(False).send_headers(sid, response(), end_stream=end)
            s.responded = True
            s.ended[False] = end
        elif op in ("data", "trailers"):
            if s.ended[by_client] or (not by_client and not s.responded):
                return
            if op == "trailers":
                actor.send_headers(sid, [(b"x-t", b"1")], end_stream=True)
                s.ended[by_client] = True
            else:
                room = min(
                    actor.local_flow_control_window(sid), actor.max_outbound_frame_size, size
                )
                if room <= 0:
                    # (not even an empty DATA with END_STREAM: h2 as the receiver
                    # counts it against a negative window and raises)
                    return
                chunk = bytes([sid % 251]) * max(room, 0)
                actor.send_data(sid, chunk, end_stream=end)
                s.sent[by_client] += chunk
                s.ended[by_client] = end
        elif op == "reset":
            if s.ended[True] and s.ended[False]:
                return
            actor.reset_stream(sid, ErrorCodes.CANCEL)
            s.reset = True
        elif op == "ack":
            n = self.unacked.pop((by_client, sid), 0)
            if n:
                actor.acknowledge_received_data(n, sid)
        elif op == "window":
            self.pair.peer.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: size * 2})
        self.pump()

    def finish(self) -> None:
        for (is_client, sid), n in list(self.unacked.items()):
            self.side(is_client).acknowledge_received_data(n, sid)
        self.unacked.clear()
        self.pump()
        for sid, s in self.streams.items():
            for by_client in (True, False):
                assert bytes(self.got.get((not by_client, sid), b"")) == bytes(s.sent[by_client]), (
                    sid
                )
                if s.ended[by_client] and not s.reset:
                    assert self.ended_at.get((not by_client, sid)), (sid, by_client)


@settings(max_examples=80, deadline=3000, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.booleans(),
    st.sampled_from([1000, 16384, 65535, 200_000]),
    st.lists(op_strategy, min_size=1, max_size=40),
)
def test_random_operations_against_h2_keep_both_sides_in_agreement(
    core_client: bool, window: int, ops: list[tuple[str, bool, int, int, bool]]
) -> None:
    session = Session(core_client, window)
    for op in ops:
        session.run(*op)
    session.finish()
    assert not session.pair.core.closed


# -- flow control enforcement ----------------------------------------------------------


@settings(max_examples=80, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(1, 100_000),
    st.integers(65535, 300_000),
    st.lists(
        st.tuples(
            st.integers(0, 2),
            st.integers(0, 16384),
            st.one_of(st.none(), st.integers(0, 255)),
            st.booleans(),
        ),
        min_size=1,
        max_size=60,
    ),
)
def test_a_peer_ignoring_our_windows_gets_flow_control_error_exactly_when_it_overruns(
    initial: int, conn: int, frames: list[tuple[int, int, int | None, bool]]
) -> None:
    srv = Raw(local_settings={SettingCodes.INITIAL_WINDOW_SIZE: initial}, connection_window=conn)
    srv.start()
    sids = (1, 3, 5)
    for sid in sids:
        srv.feed(srv.headers(sid, request(method=b"POST")))
    windows = {sid: initial for sid in sids}
    windows[0] = 65535
    unacked = dict.fromkeys(sids, 0)

    def credit() -> None:
        for f in srv.out():
            if isinstance(f, WindowUpdateFrame):
                windows[f.stream_id] += f.window_increment

    credit()
    assert windows[0] == conn, "the connection window was not opened to what was asked"
    for index, size, pad, ack in frames:
        sid = sids[index]
        payload_size = size if pad is None else min(size, 16384 - 1 - pad)
        fc = payload_size if pad is None else payload_size + 1 + pad
        frame = data(sid, b"d" * payload_size, pad=pad)
        if fc > windows[sid] or fc > windows[0]:
            srv.connection_error(frame, ErrorCodes.FLOW_CONTROL_ERROR)
            return
        events = srv.feed(frame)
        windows[sid] -= fc
        windows[0] -= fc
        unacked[sid] += sum(len(e.data) for e in of(events, h2core.DataReceived))
        if ack and unacked[sid]:
            srv.core.acknowledge_received_data(unacked[sid], sid)
            unacked[sid] = 0
        credit()
        assert all(w >= 0 for w in windows.values())
    assert not srv.core.closed


# -- bounds ----------------------------------------------------------------------------


def _peak(run: Callable[[], None]) -> tuple[float, int]:
    tracemalloc.start()
    start = time.perf_counter()
    try:
        run()
    finally:
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return elapsed, peak


def _attack(chunks: Callable[[Raw], list[bytes]]) -> Callable[[], None]:
    def run() -> None:
        srv = Raw()
        srv.start()
        try:
            for chunk in chunks(srv):
                srv.feed(chunk)
                srv.out()
        except h2core.ProtocolError:
            assert goaway_codes(srv.out())
            return
        raise AssertionError("the attack ran to its end without an error")

    return run


ATTACKS: dict[str, Callable[[Raw], list[bytes]]] = {
    "endless-continuation": lambda srv: (
        [raw(HEADERS, 0, 1, srv.block(request()))]
        + [raw(CONTINUATION, 0, 1, b"\x40\x81\x9f\x81\x9f" * 3000)] * 500
    ),
    "data-never-acked": lambda srv: (
        [srv.headers(1, request(method=b"POST"))] + [data(1, b"x" * 16384)] * 500
    ),
    "announced-16-mb-frame": lambda srv: [raw(0, 0, 1, length=2**24 - 1)] + [b"\0" * 16384] * 500,
    "garbage-after-preface": lambda srv: [bytes(range(256)) * 64] * 500,
}


@pytest.mark.parametrize("attack", ATTACKS.values(), ids=ATTACKS.keys())
def test_hostile_input_ends_in_an_error_in_bounded_memory_and_time(
    attack: Callable[[Raw], list[bytes]],
) -> None:
    # up to 8 MB offered; the core must give up early, holding little
    elapsed, peak = _peak(_attack(attack))
    assert peak < 4 << 20, f"peak {peak} bytes"
    assert elapsed < 10.0, f"{elapsed:.1f} s"


# -- fuzz ------------------------------------------------------------------------------

START = PREFACE + settings_frame() + raw(4, 1, 0)


def _fuzz(stream: bytes, cuts: list[int], watch: bool) -> None:
    core = h2core.H2Connection(
        client_side=False, watch=FrameWatch(Clock(), budget=30, rate=1.0) if watch else None
    )
    core.initiate_connection()
    reader = FrameReader()
    started = time.perf_counter()
    start = 0
    try:
        for end in [*sorted(set(cuts)), len(stream)]:
            core.receive_data(stream[start:end])
            start = end
            reader.feed(core.data_to_send())  # what it sends always parses as frames
    except h2core.ProtocolError as exc:
        frames = [f for _, f in reader.feed(core.data_to_send())]
        assert goaway_codes(frames)[-1:] == [exc.error_code]
        assert core.closed
    assert reader.buffer == b""
    assert time.perf_counter() - started < 1.0


FUZZ = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=3000), st.lists(st.integers(0, 3000), max_size=8), st.booleans())
def test_fuzz_random_bytes_after_a_valid_start(junk: bytes, cuts: list[int], watch: bool) -> None:
    _fuzz(START + junk, [c for c in cuts if c <= len(START) + len(junk)], watch)


@FUZZ
@given(st.binary(max_size=200), st.booleans())
def test_fuzz_random_bytes_from_the_first_byte(junk: bytes, watch: bool) -> None:
    _fuzz(junk, [], watch)


mutation = st.tuples(
    st.sampled_from(["flip", "set", "insert", "delete", "truncate", "duplicate"]),
    st.integers(0, len(CLIENT_STREAM) - 1),
    st.integers(0, 255),
    st.integers(1, 64),
)


def _mutate(stream: bytes, ops: list[tuple[str, int, int, int]]) -> bytes:
    buf = bytearray(stream)
    for kind, where, value, span in ops:
        pos = where % max(len(buf), 1)
        if kind == "flip" and buf:
            buf[pos] ^= 1 << (value % 8)
        elif kind == "set" and buf:
            buf[pos] = value
        elif kind == "insert":
            buf[pos:pos] = bytes([value]) * span
        elif kind == "delete":
            del buf[pos : pos + span]
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "duplicate":
            buf[pos:pos] = buf[pos : pos + span * 8]
    return bytes(buf)


@FUZZ
@given(
    st.lists(mutation, min_size=1, max_size=6),
    st.lists(st.integers(0, 30000), max_size=6),
    st.booleans(),
)
def test_fuzz_mutations_of_a_valid_client_stream(
    ops: list[tuple[str, int, int, int]], cuts: list[int], watch: bool
) -> None:
    stream = _mutate(CLIENT_STREAM, ops)
    _fuzz(stream, [c for c in cuts if c <= len(stream)], watch)


def test_fuzz_harness_sees_the_unmutated_stream_accepted() -> None:
    core = _server_core()
    events = core.receive_data(CLIENT_STREAM)
    assert len(of(events, h2core.RequestReceived)) == 5 and not core.closed
