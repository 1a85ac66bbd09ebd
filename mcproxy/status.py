"""What ``GetStatus`` reports, as values the supervisor builds and the admin client returns.

Both ends use these types, so they live beside the model, not in the supervisor
package: the client (and ``mcproxyctl``) import nothing of the supervisor.
:mod:`mcproxy.supervisor.status` builds them from the loop's published samples.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ListenerStatus", "Status", "WorkerStatus"]


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    slot: int
    pid: int
    """0 while the slot waits to respawn a worker that died."""
    generation: int
    active_connections: int
    uptime_seconds: float


@dataclass(frozen=True, slots=True)
class ListenerStatus:
    address: str
    routes: int
    active_connections: int
    """Across every worker."""
    max_connections: int
    """0 = unlimited."""
    proxy_protocol: bool


@dataclass(frozen=True, slots=True)
class Status:
    version: str
    start_time: float
    """Seconds since the epoch."""
    uptime_seconds: float
    generation: int
    """The supervisor's configuration generation."""
    worker_restarts: int
    workers: tuple[WorkerStatus, ...]
    listeners: tuple[ListenerStatus, ...]
