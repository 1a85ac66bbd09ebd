"""What happened to one connection or one L7 request.

The access log and the metrics are both derived from these records when the
connection or request ends, so nothing is counted on the per-byte path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from mcproxy.model import Address, Route

__all__ = ["ConnectionRecord", "RequestRecord"]


@dataclass(slots=True)
class ConnectionRecord:
    """What happened to one connection: the access-log line and the metrics come from it."""

    listener: str
    client: tuple[str, int]
    local: tuple[str, int]
    started: float = field(default_factory=time.monotonic)
    sni: str | None = None
    route: Route | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    outcome: str = "open"
    detail: str = ""
    dial_seconds: float | None = None
    """Time to connect to the backend, when a dial succeeded."""
    backend: Address | None = None
    """The backend chosen (the last one tried, when every dial failed)."""
    failed_backends: tuple[Address, ...] = ()
    """Backends whose dial failed before this one (failover)."""

    @property
    def client_ip(self) -> str:
        return self.client[0]

    def log_line(self) -> str:
        route = self.route
        # Plain f-strings (no dict, no join): this runs once per connection.
        if route is None:
            routing = "route=- mode=- backend=-"
        else:
            backend = self.backend or route.backend
            routing = f"route={route.hostname} mode={route.mode.value} backend={backend}"
            if self.failed_backends:
                routing += " failed=" + ",".join(map(str, self.failed_backends))
        line = (
            f"client={self.client[0]} listener={self.listener} sni={self.sni or '-'} {routing} "
            f"up={self.bytes_up} down={self.bytes_down} "
            f"duration={time.monotonic() - self.started:.3f} outcome={self.outcome}"
        )
        if self.detail:
            detail = self.detail.replace('"', "'")
            line += f' detail="{detail}"'
        return line


@dataclass(slots=True)
class RequestRecord:
    """One HTTP request proxied by an L7 route (HTTP/2 stream or HTTP/1.1 exchange)."""

    listener: str
    route: str
    """The route's hostname."""
    method: str
    status: int
    """The status sent to the client (403 for a policy block, 502/504 when mc-proxy answered)."""
    duration: float
    bytes_in: int = 0
    bytes_out: int = 0
    blocked_by: str | None = None
    """The policy kind that answered 403, if any."""
    backend: Address | None = None
    """The backend the request went to (the last one tried), None if answered locally."""
    failed_backends: tuple[Address, ...] = ()
    """Backends that could not take the request before ``backend`` (failover)."""
    backend_protocol: str | None = None
    """``h2`` or ``h1`` when the request was for a backend (None: answered before that)."""
    websocket: bool = False
    """A WebSocket (tunnelled to an ``h1`` backend)."""
