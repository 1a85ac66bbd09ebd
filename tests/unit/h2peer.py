"""Peers for the HTTP/2 core's tests (tests/unit/test_l7_h2core*.py): bytes only, no sockets.

:class:`Pair` joins our core in one role to h2's ``H2Connection`` in the other
and moves bytes by hand until nothing moves, recording every frame each way
(h2 ends its whole connection on any GOAWAY, so GOAWAYs from the core are
lifted out before h2 sees them and kept in :attr:`Pair.goaways`).
:class:`Raw` puts the core in front of hand-built frames (raw bytes, an
``hpack`` encoder for header blocks) for the hostile cases, and parses what
the core sends back with hyperframe.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

import h2.config
import h2.connection
import h2.events
import hpack
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from mcproxy.worker.l7 import h2core
from mcproxy.worker.l7.frames import FrameWatch

Headers = list[tuple[bytes, bytes]]
T = TypeVar("T")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE = 0, 1, 2, 3, 4, 5
PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 6, 7, 8, 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20


def request(
    path: bytes = b"/", method: bytes = b"GET", extra: Iterable[tuple[bytes, bytes]] = ()
) -> Headers:
    return [
        (b":method", method),
        (b":scheme", b"https"),
        (b":authority", b"web.test"),
        (b":path", path),
        *extra,
    ]


def response(status: bytes = b"200", extra: Iterable[tuple[bytes, bytes]] = ()) -> Headers:
    return [(b":status", status), *extra]


def of(events: Iterable[object], kind: type[T]) -> list[T]:
    return [e for e in events if isinstance(e, kind)]


def fields(event: object) -> tuple[Any, ...]:
    """An event as a comparable tuple: its class name and its slots' values."""
    names: list[str] = []
    for cls in type(event).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        names += [slots] if isinstance(slots, str) else list(slots)
    if not names:
        names = sorted(vars(event))
    return (type(event).__name__, *(getattr(event, n) for n in names if not n.startswith("_")))


def raw(kind: int, flags: int, sid: int, payload: bytes = b"", length: int | None = None) -> bytes:
    """One frame, exactly as given (``length`` overrides the announced length)."""
    size = len(payload) if length is None else length
    return size.to_bytes(3, "big") + bytes([kind, flags]) + sid.to_bytes(4, "big") + payload


def settings(values: dict[int, int] | None = None, sid: int = 0) -> bytes:
    payload = b"".join(
        k.to_bytes(2, "big") + v.to_bytes(4, "big") for k, v in (values or {}).items()
    )
    return raw(SETTINGS, 0, sid, payload)


def window_update(sid: int, increment: int) -> bytes:
    return raw(WINDOW_UPDATE, 0, sid, increment.to_bytes(4, "big"))


def data(sid: int, payload: bytes, end: bool = False, pad: int | None = None) -> bytes:
    if pad is None:
        return raw(DATA, END_STREAM if end else 0, sid, payload)
    flags = PADDED | (END_STREAM if end else 0)
    return raw(DATA, flags, sid, bytes([pad]) + payload + b"\0" * pad)


class FrameReader:
    """Whole frames out of a byte stream (after an optional client preface)."""

    def __init__(self, preface: bool = False) -> None:
        self.buffer = b""
        self.preface_left = len(PREFACE) if preface else 0

    def feed(self, chunk: bytes) -> list[tuple[bytes, Frame]]:
        """(raw bytes, parsed frame) for each frame completed by ``chunk``."""
        self.buffer += chunk
        out: list[tuple[bytes, Frame]] = []
        if self.preface_left:
            taken = min(self.preface_left, len(self.buffer))
            assert self.buffer[:taken] == PREFACE[len(PREFACE) - self.preface_left :][:taken]
            self.preface_left -= taken
            self.buffer = self.buffer[taken:]
        while len(self.buffer) >= 9:
            length = int.from_bytes(self.buffer[:3], "big")
            if len(self.buffer) < 9 + length:
                break
            whole, self.buffer = self.buffer[: 9 + length], self.buffer[9 + length :]
            frame, _ = Frame.parse_frame_header(memoryview(whole[:9]))
            frame.parse_body(memoryview(whole[9:]))
            out.append((whole, frame))
        return out


def parse_frames(chunk: bytes, preface: bool = False) -> list[Frame]:
    reader = FrameReader(preface)
    frames = [frame for _, frame in reader.feed(chunk)]
    assert reader.buffer == b"", "the core sent a partial frame"
    return frames


def goaway_codes(frames: Iterable[Frame]) -> list[int]:
    return [f.error_code for f in frames if isinstance(f, GoAwayFrame)]


def resets(frames: Iterable[Frame]) -> dict[int, int]:
    """stream id -> error code of each RST_STREAM."""
    return {f.stream_id: f.error_code for f in frames if isinstance(f, RstStreamFrame)}


class Pair:
    """Our core (``core``) and h2 (``peer``), bytes moved by :meth:`pump`."""

    def __init__(
        self,
        core_client: bool,
        *,
        local_settings: dict[int, int] | None = None,
        connection_window: int = 65535,
        watch: FrameWatch | None = None,
        peer_settings: dict[int, int] | None = None,
        validate: bool = True,
    ) -> None:
        self.core = h2core.H2Connection(
            client_side=core_client,
            local_settings=dict(local_settings or {}),
            connection_window=connection_window,
            watch=watch,
        )
        config = h2.config.H2Configuration(
            client_side=not core_client,
            header_encoding=None,
            validate_outbound_headers=validate,
            normalize_outbound_headers=validate,
        )
        self.peer = h2.connection.H2Connection(config=config)
        self.peer_settings = peer_settings
        self.to_peer = FrameReader(preface=core_client)
        self.to_core = FrameReader(preface=not core_client)
        self.peer_started = False
        self.core_client = core_client
        self.core_frames: list[Frame] = []  # what the core sent, in order
        self.peer_frames: list[Frame] = []  # what h2 sent, in order
        self.goaways: list[GoAwayFrame] = []
        self.core_events: list[object] = []
        self.peer_events: list[h2.events.Event] = []

    def handshake(self) -> tuple[list[object], list[h2.events.Event]]:
        self.core.initiate_connection()
        self.peer.initiate_connection()
        if self.peer_settings:
            self.peer.update_settings(self.peer_settings)
        return self.pump()

    def pump(self, *, rounds: int = 1000) -> tuple[list[object], list[h2.events.Event]]:
        """Move bytes both ways until neither side has any; the events each side got."""
        core_events: list[object] = []
        peer_events: list[h2.events.Event] = []
        for _ in range(rounds):
            moved = False
            out = self.core.data_to_send()
            if out:
                moved = True
                passed: list[bytes] = []
                for whole, frame in self.to_peer.feed(out):
                    self.core_frames.append(frame)
                    if isinstance(frame, GoAwayFrame):
                        self.goaways.append(frame)
                    else:
                        passed.append(whole)
                if passed and not self.peer_started:
                    self.peer_started = True
                    if self.core_client:
                        passed.insert(0, PREFACE)
                if passed:
                    peer_events += self.peer.receive_data(b"".join(passed))
            back = self.peer.data_to_send()
            if back:
                moved = True
                self.peer_frames += [frame for _, frame in self.to_core.feed(back)]
                core_events += self.core.receive_data(back)
            if not moved:
                break
        else:
            raise AssertionError("the two sides never went quiet")
        self.core_events += core_events
        self.peer_events += peer_events
        return core_events, peer_events

    def open(self, headers: Headers, end_stream: bool = False) -> int:
        """The client side (whichever it is) opens a stream; its id. Not pumped."""
        if self.peer.config.client_side:
            sid = self.peer.get_next_available_stream_id()
            self.peer.send_headers(sid, headers, end_stream=end_stream)
        else:
            sid = self.core.get_next_available_stream_id()
            self.core.send_headers(sid, headers, end_stream=end_stream)
        return sid

    def send_body(
        self, from_core: bool, sid: int, body: bytes, end_stream: bool = True
    ) -> tuple[bytes, bool]:
        """Send ``body`` as flow control allows, the receiver acking all it gets.

        Returns what the receiver got on ``sid`` and whether it saw the end.
        """
        sender: Any = self.core if from_core else self.peer
        got = bytearray()
        ended = False
        sent = 0
        done = False
        idle = 0
        while True:
            chunk = b""
            if not done:
                room = min(sender.local_flow_control_window(sid), sender.max_outbound_frame_size)
                chunk = body[sent : sent + max(room, 0)]
                last = end_stream and sent + len(chunk) == len(body)
                if chunk or last:
                    sender.send_data(sid, chunk, end_stream=last)
                    sent += len(chunk)
                done = sent == len(body) and (last or not end_stream)
            core_events, peer_events = self.pump()
            now, end_now = self._take(from_core, sid, core_events, peer_events)
            got += now
            ended = ended or end_now
            if done and (ended or not end_stream):
                return bytes(got), ended
            idle = 0 if chunk or now else idle + 1
            assert idle < 5, f"stuck at {sent} of {len(body)} bytes sent, {len(got)} received"

    def ack(self, core_events: list[object], peer_events: list[h2.events.Event]) -> None:
        """Each side acknowledges all the data it got in these events; then pump."""
        for e in of(peer_events, h2.events.DataReceived):
            assert e.flow_controlled_length is not None and e.stream_id is not None
            self.peer.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
        for c in of(core_events, h2core.DataReceived):
            if c.data:
                self.core.acknowledge_received_data(len(c.data), c.stream_id)
        self.pump()

    def _take(
        self,
        from_core: bool,
        sid: int,
        core_events: list[object],
        peer_events: list[h2.events.Event],
    ) -> tuple[bytes, bool]:
        """The receiver's data on ``sid`` in these events; it acks all data it got."""
        got = bytearray()
        ended = False
        acked = False
        if from_core:
            for e in of(peer_events, h2.events.DataReceived):
                assert e.data is not None and e.flow_controlled_length is not None
                self.peer.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                acked = True
                if e.stream_id == sid:
                    got += e.data
            ended = any(e.stream_id == sid for e in of(peer_events, h2.events.StreamEnded))
        else:
            for c in of(core_events, h2core.DataReceived):
                if c.data:
                    self.core.acknowledge_received_data(len(c.data), c.stream_id)
                    acked = True
                if c.stream_id == sid:
                    got += c.data
                    ended = ended or c.stream_ended
        if acked:
            self.pump()
        return bytes(got), ended


def peer_window(pair: Pair, sid: int) -> int:
    """The core's send window on ``sid`` by the RFC's arithmetic over the wire so far.

    window = the peer's current SETTINGS_INITIAL_WINDOW_SIZE + its WINDOW_UPDATEs
    on the stream - the DATA the core sent on it; likewise 65535 + updates on 0 -
    all DATA for the connection. What the core may send is the smaller one.
    """
    initial = 65535
    stream = conn = 0
    for f in pair.peer_frames:
        if isinstance(f, SettingsFrame) and "ACK" not in f.flags:
            initial = f.settings.get(h2core.SettingCodes.INITIAL_WINDOW_SIZE, initial)
        elif isinstance(f, WindowUpdateFrame):
            if f.stream_id == sid:
                stream += f.window_increment
            elif f.stream_id == 0:
                conn += f.window_increment
    for f in pair.core_frames:
        if isinstance(f, DataFrame):
            conn -= f.flow_controlled_length
            if f.stream_id == sid:
                stream -= f.flow_controlled_length
    return min(initial + stream, 65535 + conn)


class Raw:
    """Our core facing hand-built frames: feed bytes, read back parsed frames."""

    def __init__(
        self,
        core_client: bool = False,
        *,
        local_settings: dict[int, int] | None = None,
        connection_window: int = 65535,
        watch: FrameWatch | None = None,
    ) -> None:
        self.core = h2core.H2Connection(
            client_side=core_client,
            local_settings=dict(local_settings or {}),
            connection_window=connection_window,
            watch=watch,
        )
        self.core.initiate_connection()
        self.encoder = hpack.Encoder()
        self.reader = FrameReader(preface=core_client)
        self.sent: list[Frame] = []
        self.events: list[object] = []
        self.core_client = core_client

    def start(self, values: dict[int, int] | None = None) -> list[object]:
        """Preface (core as server), our SETTINGS and the ACK of the core's."""
        head = b"" if self.core_client else PREFACE
        return self.feed(head + settings(values) + raw(SETTINGS, ACK, 0))

    def feed(self, chunk: bytes) -> list[object]:
        events: list[object] = list(self.core.receive_data(chunk))
        self.events += events
        return events

    def out(self) -> list[Frame]:
        """The frames the core sent since the last call."""
        frames = [frame for _, frame in self.reader.feed(self.core.data_to_send())]
        self.sent += frames
        return frames

    def block(self, headers: Headers) -> bytes:
        return self.encoder.encode(headers)

    def headers(
        self,
        sid: int,
        headers: Headers,
        end_stream: bool = False,
        end_headers: bool = True,
        block: bytes | None = None,
    ) -> bytes:
        flags = (END_STREAM if end_stream else 0) | (END_HEADERS if end_headers else 0)
        return raw(HEADERS, flags, sid, self.block(headers) if block is None else block)

    def header_frames(self, sid: int, headers: Headers, end_stream: bool = False) -> bytes:
        """A header block as HEADERS + CONTINUATIONs of at most 16384 bytes each."""
        block = self.block(headers)
        pieces = [block[i : i + 16384] for i in range(0, len(block), 16384)] or [b""]
        out = b""
        for i, piece in enumerate(pieces):
            flags = END_HEADERS if i == len(pieces) - 1 else 0
            if i == 0:
                out += raw(HEADERS, flags | (END_STREAM if end_stream else 0), sid, piece)
            else:
                out += raw(CONTINUATION, flags, sid, piece)
        return out

    def connection_error(self, chunk: bytes, code: int) -> h2core.ProtocolError:
        """Feeding ``chunk`` must raise ProtocolError(code), GOAWAY(code) queued, closed."""
        try:
            self.feed(chunk)
        except h2core.ProtocolError as exc:
            error = exc
        else:
            raise AssertionError(f"no connection error; the core sent {self.out()}")
        assert error.error_code == code, (error.error_code, code, error)
        frames = self.out()
        assert goaway_codes(frames)[-1:] == [code], frames
        assert self.core.closed
        return error

    def stream_error(self, chunk: bytes, sid: int, code: int) -> list[object]:
        """Feeding ``chunk`` must reset ``sid`` with ``code`` and leave the connection up."""
        events = self.feed(chunk)
        frames = self.out()
        assert resets(frames).get(sid) == code, frames
        assert not goaway_codes(frames), frames
        assert not self.core.closed
        return events

    def stream_or_connection_error(self, chunk: bytes, sid: int, code: int) -> None:
        """RFC 9113 5.4.1 lets a stream error be treated as a connection error: either one."""
        try:
            self.feed(chunk)
        except h2core.ProtocolError as exc:
            assert exc.error_code == code, (exc.error_code, code, exc)
            assert goaway_codes(self.out())[-1:] == [code]
            return
        frames = self.out()
        assert resets(frames).get(sid) == code, frames


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now
