"""What the HTTP/2 core shares with the legs: limits, errors, abuse budgets.

:class:`ProtocolError` and its kinds are the connection errors ``h2core``
raises (each with its RFC 9113 error code); :class:`FrameTooLarge` is raised
at the frame header, before any payload is buffered, so a peer announcing a
16 MiB frame (or an HTTP/1.1 server answering our preface with text) is
refused at once.

A client's abuse is counted on the frame headers the core reads
(ARCHITECTURE.md, "L7 routes: HTTP/2 abuse budgets"): a :class:`FrameWatch`
charges each frame that makes no progress (PING, SETTINGS, PRIORITY,
WINDOW_UPDATE, RST_STREAM, CONTINUATION, empty DATA, unknown types) to a
token bucket, like HAProxy's glitch counters, and knows when a header block
(or a frame header) has been in progress since, for the head deadline. A
spent budget raises :class:`Abuse`; the leg answers GOAWAY ENHANCE_YOUR_CALM
and closes. Time comes from an injected clock, so tests drive it with bytes
only.

:class:`GoAwayFilter` lifts GOAWAY frames out of a byte stream for peers
built on the ``h2`` library (the tests' clients and backends), which would
treat a GOAWAY as the immediate end of the connection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "CLIENT_PREFACE",
    "GLITCH_BUDGET",
    "GLITCH_RATE",
    "MAX_FRAME_SIZE",
    "Abuse",
    "Budget",
    "FlowControlError",
    "FrameTooLarge",
    "FrameWatch",
    "GoAway",
    "GoAwayFilter",
    "ProtocolError",
    "StreamClosedError",
    "encode_goaway",
]

CLIENT_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_FRAME_SIZE = 16384
"""Our SETTINGS_MAX_FRAME_SIZE (the protocol's default; mc-proxy never raises it)."""
_HEADER = 9
_DATA = 0x0
_HEADERS = 0x1
_GOAWAY = 0x7
_CONTINUATION = 0x9
_END_STREAM = 0x1
_END_HEADERS = 0x4
_PROGRESS = frozenset({_DATA, _HEADERS, _GOAWAY})
"""Frame types that carry a request or its body; every other one is charged as a glitch."""

GLITCH_BUDGET = 1000
"""Frames without progress a client may send in a burst (PING, SETTINGS, WINDOW_UPDATE...)."""
GLITCH_RATE = 200.0
"""...and per second after that; each request opened, and each DATA frame sent to the client
(which a WINDOW_UPDATE legitimately answers), earns some back."""


class ProtocolError(Exception):
    """The peer broke HTTP/2: a connection error with ``error_code`` (RFC 9113 section 7)."""

    def __init__(self, message: str, error_code: int = 0x1) -> None:
        super().__init__(message)
        self.error_code = error_code


class StreamClosedError(ProtocolError):
    """A send on a stream that is over (the application's race with the peer, not an error of
    the connection)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 0x5)


class FlowControlError(ProtocolError):
    """A send beyond the peer's window (a caller bug)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 0x3)


class FrameTooLarge(ProtocolError):
    """A frame header announced more than :data:`MAX_FRAME_SIZE` bytes (FRAME_SIZE_ERROR)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 0x6)


class Abuse(ProtocolError):
    """The peer spent one of its budgets (GOAWAY ENHANCE_YOUR_CALM, then close)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 0xB)


class Budget:
    """A token bucket: ``capacity`` tokens, refilled at ``rate`` per second of ``clock``."""

    __slots__ = ("_clock", "_stamp", "capacity", "rate", "tokens")

    def __init__(self, capacity: float, rate: float, clock: Callable[[], float]) -> None:
        self.capacity = capacity
        self.rate = rate
        self.tokens = capacity
        self._clock = clock
        self._stamp = clock()

    def spend(self, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens; False (and nothing taken) when the bucket is empty."""
        tokens = self.tokens - cost
        if tokens < 0:
            now = self._clock()
            tokens = min(self.capacity, tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            if tokens < 0:
                self.tokens = tokens + cost
                return False
        self.tokens = tokens
        return True

    def earn(self, tokens: float) -> None:
        self.tokens = min(self.capacity, self.tokens + tokens)


class FrameWatch:
    """What a client's frame headers say about it: glitches spent, head in progress.

    ``head_since``: the clock when the header block (HEADERS up to END_HEADERS,
    CONTINUATIONs included) or frame header now in progress began; None
    between frames and while a DATA payload streams.
    """

    __slots__ = ("_clock", "glitches", "head_since")

    def __init__(
        self,
        clock: Callable[[], float],
        budget: float = GLITCH_BUDGET,
        rate: float = GLITCH_RATE,
    ) -> None:
        self._clock = clock
        self.glitches = Budget(budget, rate, clock)
        self.head_since: float | None = None

    def frame(self, kind: int, flags: int, length: int) -> None:
        """A frame header arrived. Raises :class:`Abuse`."""
        if kind in _PROGRESS:
            if kind == _HEADERS:
                self.glitches.earn(1)
            elif kind == _DATA and not length and not flags & _END_STREAM:
                self.glitch("empty DATA frames")
            return
        self.glitch(f"frames of type {kind:#x}")

    def glitch(self, what: str, cost: float = 1.0) -> None:
        """Charge one unproductive act (a frame, a refused or malformed stream). Raises
        :class:`Abuse` when the budget is spent."""
        if not self.glitches.spend(cost):
            raise Abuse(f"flood of {what}")

    def now(self) -> float:
        return self._clock()

    def begin(self) -> None:
        if self.head_since is None:
            self.head_since = self._clock()

    def end(self) -> None:
        self.head_since = None


@dataclass(frozen=True, slots=True)
class GoAway:
    last_stream_id: int
    error_code: int
    debug_data: bytes = b""


def encode_goaway(last_stream_id: int, error_code: int = 0, debug_data: bytes = b"") -> bytes:
    """A GOAWAY frame, for a graceful shutdown that h2 itself would not let streams survive."""
    payload = (last_stream_id & 0x7FFFFFFF).to_bytes(4, "big")
    payload += error_code.to_bytes(4, "big") + debug_data
    return len(payload).to_bytes(3, "big") + bytes([_GOAWAY, 0]) + (0).to_bytes(4, "big") + payload


class GoAwayFilter:
    """Feed the bytes a peer sent; get back the bytes for h2 and any GOAWAYs.

    ``expect_preface`` is for the server side, where the client's 24-byte
    connection preface comes before the first frame.
    """

    __slots__ = (
        "_block_ends",
        "_goaway",
        "_goaway_left",
        "_header",
        "_in_block",
        "_preface_left",
        "_remaining",
        "watch",
    )

    def __init__(self, expect_preface: bool, watch: FrameWatch | None = None) -> None:
        self._preface_left = len(CLIENT_PREFACE) if expect_preface else 0
        self._header = b""
        self._remaining = 0
        """Payload bytes of the current passed-through frame still to come."""
        self._goaway: bytearray | None = None
        self._goaway_left = 0
        self.watch = watch
        self._in_block = False  # inside a header block (HEADERS without END_HEADERS so far)
        self._block_ends = False  # the frame being passed through ends a header block

    def feed(self, data: bytes) -> tuple[bytes, list[GoAway]]:
        """Bytes for h2, and the GOAWAYs found. Raises :class:`FrameTooLarge`."""
        goaways: list[GoAway] = []
        pieces: list[bytes] = []
        start = 0  # start of the pass-through run in progress
        pos = 0
        size = len(data)
        if self._preface_left:
            taken = min(self._preface_left, size)
            self._preface_left -= taken
            pos = taken
            if self.watch is not None:
                if self._preface_left:
                    self.watch.begin()
                else:
                    self.watch.end()
        while pos < size:
            if self._remaining:
                taken = min(self._remaining, size - pos)
                self._remaining -= taken
                pos += taken
                if self._block_ends and not self._remaining and self.watch is not None:
                    self._block_ends = False
                    self.watch.end()
            elif self._goaway is not None:
                taken = min(self._goaway_left, size - pos)
                self._goaway += data[pos : pos + taken]
                self._goaway_left -= taken
                pos += taken
                start = pos
                if not self._goaway_left:
                    goaways.append(_parse(bytes(self._goaway)))
                    self._goaway = None
            else:
                need = _HEADER - len(self._header)
                if self._header or size - pos < need:
                    # A header split across reads: hold it until it is whole.
                    if pos > start:
                        pieces.append(data[start:pos])
                    self._header += data[pos : pos + need]
                    pos += min(need, size - pos)
                    start = pos
                    if len(self._header) < _HEADER:
                        if self.watch is not None:
                            self.watch.begin()  # a frame header trickled counts as a head
                        break
                    header, self._header = self._header, b""
                    if not self._classify(header, goaways):
                        pieces.append(header)
                    continue
                header = data[pos : pos + _HEADER]
                if self._classify(header, goaways):
                    if pos > start:
                        pieces.append(data[start:pos])
                    start = pos + _HEADER
                pos += _HEADER
        if not pieces and start == 0:
            return data, goaways
        if pos > start:
            pieces.append(data[start:pos])
        return b"".join(pieces), goaways

    def _classify(self, header: bytes, goaways: list[GoAway]) -> bool:
        """Start the frame whose header this is; True when it is a GOAWAY we keep out of h2."""
        length = int.from_bytes(header[:3], "big")
        if length > MAX_FRAME_SIZE:
            raise FrameTooLarge(f"frame of {length} bytes announced (type {header[3]:#x})")
        watch = self.watch
        if watch is not None:
            kind = header[3]
            watch.frame(kind, header[4], length)
            if kind == _HEADERS or (kind == _CONTINUATION and self._in_block):
                watch.begin()
                self._in_block = not header[4] & _END_HEADERS
                self._block_ends = not self._in_block
                if self._block_ends and not length:
                    self._block_ends = False
                    watch.end()
            elif not self._in_block:
                watch.end()
        if header[3] == _GOAWAY:
            if length:
                self._goaway = bytearray()
                self._goaway_left = length
            else:
                goaways.append(_parse(b""))
            return True
        self._remaining = length
        return False


def _parse(payload: bytes) -> GoAway:
    if len(payload) < 8:
        # Malformed (RFC 9113 says FRAME_SIZE_ERROR); the peer is leaving either way.
        return GoAway(0, 0x6)
    last = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
    return GoAway(last, int.from_bytes(payload[4:8], "big"), payload[8:])
