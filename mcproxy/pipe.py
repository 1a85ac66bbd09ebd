"""The supervisor <-> worker pipe: framed, size-capped messages.

Sans-I/O like h11: :func:`encode` turns a message into bytes to write and a
:class:`FrameDecoder` turns received bytes into messages. A frame is a 4-byte
big-endian length and a pickle of one frozen dataclass below. Both ends are
this program over a private socketpair; still, the unpickler resolves names
only through an explicit allow-list (:data:`ALLOWED`: the dataclasses and
enums of the message modules, and the plain containers), never by importing or
``getattr``, so a corrupted frame can build only values of those types: it
cannot name a function, a module or any other class (ARCHITECTURE.md, "State
and changes", says what it can do).

Writing is non-blocking on both ends: an :class:`Outbox` keeps the frames not
yet taken by the kernel, remainder of a partial write included, so that
neither end ever blocks on the other and no byte is written twice. File
descriptors (listening sockets for a listener added at runtime) travel with a
frame's first byte as SCM_RIGHTS ancillary data.

Messages carry the config generation they describe, which is how the
supervisor knows that every worker has applied a change (invariant 2).
"""

from __future__ import annotations

import array
import collections
import dataclasses
import enum
import io
import operator
import pickle
import socket
import struct
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mcproxy import health, model, settings
from mcproxy.health import Verdict
from mcproxy.model import Change, ProxyState
from mcproxy.settings import ProxyTimeouts

__all__ = [
    "ALLOWED",
    "BOOT_ERROR",
    "MAX_FDS",
    "MAX_FRAME_BYTES",
    "Ack",
    "Boot",
    "Delta",
    "FrameDecoder",
    "FrameError",
    "Health",
    "Heartbeat",
    "Message",
    "Outbox",
    "Snapshot",
    "encode",
    "recv_with_fds",
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
    cell: int | None = None
    """Its column in the shared connection counters (0-based); None: ``slot - 1``. It
    differs from the slot's after an upgrade, while the old workers hold theirs."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The whole state; the worker replaces what it had and acknowledges the generation.

    Pickled compactly (:func:`_pack_state`): each route as a tuple of its field
    values rather than a slotted dataclass, which pickle rebuilds ~5x slower;
    100,000 routes decode in ~0.2 s instead of ~0.7 s."""

    state: ProxyState

    def __getstate__(self) -> object:
        return _pack_state(self.state)

    def __setstate__(self, packed: object) -> None:
        object.__setattr__(self, "state", _unpack_state(packed))


@dataclass(frozen=True, slots=True)
class Delta:
    """One change that takes the worker from ``generation - 1`` to ``generation``."""

    change: Change
    generation: int
    listen_addrs: tuple[str, ...] = ()
    """Listeners the change adds: this frame carries the worker's slot socket of each,
    in this order, as SCM_RIGHTS descriptors."""


@dataclass(frozen=True, slots=True)
class Health:
    """Backend verdicts of the supervisor's health checks. Not a change: no generation,
    no acknowledgement, never stored; ``full`` replaces every earlier verdict (sent
    after a new worker's snapshot)."""

    verdicts: tuple[Verdict, ...]
    full: bool = False


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


Message = Boot | Snapshot | Delta | Health | Ack | Heartbeat


def _value_types(*modules: object) -> dict[tuple[str, str], type]:
    """The dataclasses and enums *defined* in ``modules`` (not those they import)."""
    allowed: dict[tuple[str, str], type] = {}
    for module in modules:
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and value.__module__ == getattr(module, "__name__", None)
                and (dataclasses.is_dataclass(value) or issubclass(value, enum.Enum))
            ):
                allowed[(value.__module__, value.__qualname__)] = value
    return allowed


ALLOWED: dict[tuple[str, str], type] = {}
"""Every ``(module, name)`` a frame may name, and nothing else: the messages,
the state and change dataclasses, their enums, the route table, plain
containers. Building any of them runs no code but field assignment. Filled
at the end of this module, once every message class is defined."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        try:
            return ALLOWED[(module, name)]  # a lookup: nothing is imported or resolved
        except KeyError:
            raise FrameError(f"frame names a forbidden class {module}.{name}") from None


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
    if not isinstance(message, Boot | Snapshot | Delta | Health | Ack | Heartbeat):
        raise FrameError(f"frame holds {type(message).__name__}, not a message")
    return message


# --- the compact snapshot ----------------------------------------------------------

_ROUTE_FIELDS = tuple(f.name for f in dataclasses.fields(model.Route))
_LISTENER_FIELDS = tuple(f.name for f in dataclasses.fields(model.Listener))
_STATE_FIELDS = tuple(f.name for f in dataclasses.fields(model.ProxyState))
_route_values = operator.attrgetter(*_ROUTE_FIELDS)
_ROUTE_SETTERS = tuple(getattr(model.Route, name).__set__ for name in _ROUTE_FIELDS)
"""Slot descriptors: set a field of a new Route without __init__ (the values were one)."""


def _pack_state(state: ProxyState) -> tuple[object, ...]:
    """Plain tuples: field names (checked on unpacking), the state's other fields, and per
    listener its other fields and one tuple of field values per route. Equal values
    (backend tuples, policies) are made one object, which pickle then writes once."""
    interned: dict[object, object] = {}
    listeners = []
    for listener in state.listeners.values():
        rows = []
        for route in listener.routes.values():
            values = _route_values(route)
            rows.append(tuple([interned.setdefault(v, v) for v in values]))
        fields = {n: getattr(listener, n) for n in _LISTENER_FIELDS if n != "routes"}
        listeners.append((fields, rows))
    others = {n: getattr(state, n) for n in _STATE_FIELDS if n != "listeners"}
    return (_ROUTE_FIELDS, others, listeners)


def _unpack_state(packed: object) -> ProxyState:
    try:
        names: tuple[str, ...]
        others: dict[str, object]
        listeners: list[tuple[dict[str, object], list[tuple[object, ...]]]]
        names, others, listeners = packed  # type: ignore[misc]
        if tuple(names) != _ROUTE_FIELDS:
            raise FrameError(f"snapshot routes have fields {names}, this worker {_ROUTE_FIELDS}")
        new, setters = object.__new__, _ROUTE_SETTERS
        built: dict[str, model.Listener] = {}
        for fields, rows in listeners:
            routes: dict[str, model.Route] = {}
            for row in rows:
                if len(row) != len(setters):
                    raise FrameError("snapshot route of the wrong length")
                route = new(model.Route)
                for setter, value in zip(setters, row, strict=True):
                    setter(route, value)
                routes[route.hostname] = route
            listener = model.Listener(**fields, routes=model.RouteTable(routes))  # type: ignore[arg-type]
            built[str(listener.addr)] = listener
        return ProxyState(**others, listeners=built)  # type: ignore[arg-type]
    except FrameError:
        raise
    except Exception as exc:
        raise FrameError(f"malformed snapshot: {exc}") from exc


# --- writing without blocking ------------------------------------------------------

MAX_FDS = 64
"""File descriptors one frame may carry (a listener's sockets for one slot)."""


class Outbox:
    """Frames waiting for a non-blocking socket, in order.

    :meth:`flush` writes as much as the kernel takes and keeps the exact
    remainder of a partial write, so a frame is never resent whole nor cut.
    ``fds`` of a frame go with its first byte (SCM_RIGHTS); the receiver
    queues them in arrival order (:func:`recv_with_fds`). ``progress_at`` is
    when the last byte went out (or the outbox became non-empty): the owner
    kills a peer that takes nothing for too long.
    """

    def __init__(self) -> None:
        self._frames: collections.deque[tuple[memoryview, Sequence[int]]] = collections.deque()
        self.pending_bytes = 0
        self.progress_at = time.monotonic()

    def __bool__(self) -> bool:
        return bool(self._frames)

    def push(self, data: bytes, fds: Sequence[int] = ()) -> None:
        if not self._frames:
            self.progress_at = time.monotonic()
        self._frames.append((memoryview(data), tuple(fds)))
        self.pending_bytes += len(data)

    def flush(self, sock: socket.socket) -> bool:
        """Write what the socket takes now; True once nothing is left.

        Raises OSError (other than "would block") when the peer is gone."""
        frames = self._frames
        while frames:
            data, fds = frames[0]
            try:
                if fds:
                    sent = sock.sendmsg(
                        [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                    )
                else:
                    sent = sock.send(data)
            except (BlockingIOError, InterruptedError):
                return False
            if sent:
                self.progress_at = time.monotonic()
                self.pending_bytes -= sent
            if sent < len(data):
                frames[0] = (data[sent:], ())  # the fds went with the first byte
                return False
            frames.popleft()
        return True


def recv_with_fds(sock: socket.socket, size: int) -> tuple[bytes, list[int]]:
    """One ``recvmsg`` that also collects SCM_RIGHTS descriptors (a frame's fds)."""
    data, ancdata, _flags, _addr = sock.recvmsg(size, socket.CMSG_SPACE(MAX_FDS * 4))
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds += array.array("i", payload[:usable]).tolist()
    return data, fds


ALLOWED.update(
    {
        **_value_types(model, settings, health, sys.modules[__name__]),
        ("mcproxy.model", "RouteTable"): model.RouteTable,
        **{("builtins", t.__name__): t for t in (frozenset, set, dict, tuple, list)},
    }
)
