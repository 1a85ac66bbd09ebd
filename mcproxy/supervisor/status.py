"""What ``GetStatus`` reports, built from immutable pieces so any thread can read it.

The supervisor's loop is the only writer of its worker table. Once per turn it
publishes a :class:`WorkerSample` tuple (a new tuple, never mutated), and the
admin API's threads combine the latest tuple with the current
:class:`~mcproxy.model.ProxyState` (also immutable) in :func:`build_status`.
No lock, and no gRPC thread ever reads the loop's mutable dicts.

Per-listener connection counts come from a :class:`ConnectionCounts`: the
live shared-memory counters (:class:`mcproxy.limits.SharedLimits`, invariant
4) when the supervisor has them, else :class:`HeartbeatCounts`, the sum of
what the workers said in their last heartbeat (at most about a second old).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from mcproxy.model import ProxyState
from mcproxy.status import ListenerStatus, Status, WorkerStatus

__all__ = [
    "ConnectionCounts",
    "HeartbeatCounts",
    "ListenerStatus",
    "Status",
    "WorkerSample",
    "WorkerStatus",
    "build_status",
]


@dataclass(frozen=True, slots=True)
class WorkerSample:
    """One slot as the loop last saw it."""

    slot: int
    pid: int
    """0 while the slot waits to respawn a worker that died."""
    generation: int = 0
    active_connections: int = 0
    listener_connections: Mapping[str, int] = field(default_factory=dict)
    started: float = 0.0
    """time.monotonic() when the worker was started."""


class ConnectionCounts(Protocol):
    """Open connections per listener, across every worker."""

    def listener_connections(self, addr: str) -> int: ...


@dataclass(frozen=True, slots=True)
class HeartbeatCounts:
    """The sum of the workers' last heartbeats (each at most ~1 s old)."""

    samples: tuple[WorkerSample, ...]

    def listener_connections(self, addr: str) -> int:
        return sum(s.listener_connections.get(addr, 0) for s in self.samples)


def build_status(
    *,
    version: str,
    state: ProxyState,
    samples: tuple[WorkerSample, ...],
    counts: ConnectionCounts,
    started_at: float,
    worker_restarts: int,
    now: float,
    now_monotonic: float,
) -> Status:
    """Assemble a :class:`Status` from immutable inputs (pure; safe on any thread)."""
    workers = tuple(
        WorkerStatus(
            slot=s.slot,
            pid=s.pid,
            generation=s.generation,
            active_connections=s.active_connections,
            uptime_seconds=max(0.0, now_monotonic - s.started) if s.pid else 0.0,
        )
        for s in samples
    )
    listeners = tuple(
        ListenerStatus(
            address=addr,
            routes=len(listener.routes),
            active_connections=counts.listener_connections(addr),
            max_connections=listener.max_connections,
            proxy_protocol=listener.proxy_protocol,
        )
        for addr, listener in state.listeners.items()
    )
    return Status(
        version=version,
        start_time=started_at,
        uptime_seconds=max(0.0, now - started_at),
        generation=state.generation,
        worker_restarts=worker_restarts,
        workers=workers,
        listeners=listeners,
    )
