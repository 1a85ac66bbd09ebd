"""The supervisor <-> worker pipe: framed, size-capped messages.

Sans-I/O like h11: :func:`encode` turns a message into bytes to write and a
:class:`FrameDecoder` turns received bytes into messages. A frame is a 4-byte
big-endian length and a pickle of one frozen dataclass below. Both ends are
this program over a private socketpair, so pickle is safe enough; still, the
unpickler only resolves classes of the :mod:`mcproxy` package and a few
builtins, so a corrupted frame cannot name arbitrary callables.

Messages carry the config generation they describe, which is how the
supervisor knows that every worker has applied a change (invariant 2).
"""

from __future__ import annotations

import io
import pickle
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from mcproxy.model import Change, ProxyState
from mcproxy.settings import ProxyTimeouts

__all__ = [
    "BOOT_ERROR",
    "MAX_FRAME_BYTES",
    "Ack",
    "Boot",
    "Delta",
    "FrameDecoder",
    "FrameError",
    "Heartbeat",
    "Message",
    "Snapshot",
    "encode",
]

BOOT_ERROR = 3
"""A worker's exit status when it fails before its first snapshot: the supervisor
halts instead of respawning it (a respawn would fail the same way)."""

MAX_FRAME_BYTES = 256 * 1024 * 1024
"""A snapshot of 10,000 routes is a few MB; this only stops a corrupt length
from making the reader allocate without limit."""

_HEADER = struct.Struct(">I")


class FrameError(Exception):
    """The peer wrote something that is not a frame of this protocol."""


# --- supervisor -> worker ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Boot:
    """First message to a new worker: who it is and which inherited fds are its listeners."""

    slot: int
    listen_fds: dict[str, int]
    """Listener address -> fd of this slot's SO_REUSEPORT socket."""
    timeouts: ProxyTimeouts
    geoip_db: str | None = None
    rate_limit: int = 0
    rate_window: float = 60.0
    shm_fd: int | None = None
    """Inherited fd of the shared limits file (:mod:`mcproxy.limits`)."""
    metrics_dir: str | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The whole state; the worker replaces what it had and acknowledges the generation."""

    state: ProxyState


@dataclass(frozen=True, slots=True)
class Delta:
    """One change that takes the worker from ``generation - 1`` to ``generation``."""

    change: Change
    generation: int


# --- worker -> supervisor ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ack:
    """The worker now routes with this generation."""

    generation: int


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Sent from the worker's event loop every second: proof the loop is responsive."""

    generation: int
    active_connections: int
    listener_connections: Mapping[str, int] = field(default_factory=dict)
    """Open connections by listener address (for ``GetStatus``)."""


Message = Boot | Snapshot | Delta | Ack | Heartbeat

_SAFE_BUILTINS = frozenset({"frozenset", "set", "dict", "tuple", "list", "getattr"})


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if module == "mcproxy" or module.startswith("mcproxy."):
            return super().find_class(module, name)
        if module == "builtins" and name in _SAFE_BUILTINS:
            return super().find_class(module, name)
        if module == "copyreg" and name == "_reconstructor":
            return super().find_class(module, name)
        raise FrameError(f"frame names a forbidden class {module}.{name}")


def encode(message: Message) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if len(payload) > MAX_FRAME_BYTES:
        raise FrameError(f"message of {len(payload)} bytes exceeds the frame limit")
    return _HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Accumulates bytes and yields whole messages; a frame may arrive in any split."""

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self._buffer = bytearray()
        self._max_frame = max_frame

    def feed(self, data: bytes) -> list[Message]:
        self._buffer += data
        messages: list[Message] = []
        while len(self._buffer) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buffer)
            if length > self._max_frame:
                raise FrameError(f"frame of {length} bytes exceeds the limit")
            end = _HEADER.size + length
            if len(self._buffer) < end:
                break
            payload = bytes(memoryview(self._buffer)[_HEADER.size : end])
            del self._buffer[:end]
            messages.append(_decode(payload))
        return messages


def _decode(payload: bytes) -> Message:
    try:
        message = _RestrictedUnpickler(io.BytesIO(payload)).load()
    except FrameError:
        raise
    except Exception as exc:
        raise FrameError(f"undecodable frame: {exc}") from exc
    if not isinstance(message, Boot | Snapshot | Delta | Ack | Heartbeat):
        raise FrameError(f"frame holds {type(message).__name__}, not a message")
    return message
