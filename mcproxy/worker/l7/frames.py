"""Lift GOAWAY frames out of an HTTP/2 byte stream before h2 sees them.

h2 treats a received GOAWAY as the end of the connection: its state machine
goes to CLOSED, it clears its outbound buffer and refuses any later frame, so
streams that the peer promised to finish would break. A proxy needs the
graceful meaning (RFC 9113 section 6.8): no new streams above
``last_stream_id``, the others run to completion. This filter walks the frame
headers (9 bytes each, the payload length first), passes every other frame
through untouched and returns each GOAWAY as a :class:`GoAway` value instead.

Strategy: the common case (no GOAWAY, frame boundaries anywhere) returns the
input object itself, so a DATA-heavy stream costs one header walk and no
copy. Only a split frame header or a GOAWAY payload is buffered, and a GOAWAY
is at most :data:`MAX_FRAME_SIZE` bytes.

The walk also enforces the frame size limit on the header, where h2 checks it
only once the whole frame is buffered: a peer announcing a 16 MiB frame (or
an HTTP/1.1 server answering our preface with text) is refused at once
instead of being buffered.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CLIENT_PREFACE",
    "MAX_FRAME_SIZE",
    "FrameTooLarge",
    "GoAway",
    "GoAwayFilter",
    "encode_goaway",
]

CLIENT_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_FRAME_SIZE = 16384
"""Our SETTINGS_MAX_FRAME_SIZE (the protocol's default; mc-proxy never raises it)."""
_HEADER = 9
_GOAWAY = 0x7


class FrameTooLarge(Exception):
    """A frame header announced more than :data:`MAX_FRAME_SIZE` bytes (FRAME_SIZE_ERROR)."""


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

    __slots__ = ("_goaway", "_goaway_left", "_header", "_preface_left", "_remaining")

    def __init__(self, expect_preface: bool) -> None:
        self._preface_left = len(CLIENT_PREFACE) if expect_preface else 0
        self._header = b""
        self._remaining = 0
        """Payload bytes of the current passed-through frame still to come."""
        self._goaway: bytearray | None = None
        self._goaway_left = 0

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
        while pos < size:
            if self._remaining:
                taken = min(self._remaining, size - pos)
                self._remaining -= taken
                pos += taken
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
