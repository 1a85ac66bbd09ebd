"""The YAML configuration: typed, validated, every problem reported at once.

Process settings (workers, paths, addresses, timeouts) are read from the file
at every start. Listeners, routes, policies and firewall rules in the file
only seed an empty database (DESIGN.md invariant 1): they are returned as
``Config.seed``, a generation-0 :class:`~mcproxy.model.ProxyState`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from mcproxy.model import Address, ProxyState

__all__ = [
    "Config",
    "ConfigError",
    "FirewallSettings",
    "MetricsConfig",
    "ProxyTimeouts",
    "load_config",
    "parse_duration",
]


class ConfigError(Exception):
    """The file has problems; ``problems`` lists every one as ``file: field.path: reason``."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class ProxyTimeouts:
    """Seconds."""

    connect_timeout: float = 5.0
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0
    shutdown_timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    addr: Address
    path: str = "/metrics"


@dataclass(frozen=True, slots=True)
class FirewallSettings:
    """The process-level part of ``firewall:``; the rule lists go to the seed state."""

    geoip_db: str | None = None
    rate_limit: int = 0
    """New connections per IP per window; 0 = off."""
    rate_window: float = 60.0


@dataclass(frozen=True, slots=True)
class Config:
    path: str
    workers: int = 0
    """0 = one per CPU core; see :meth:`worker_count`."""
    database_path: str = "/srv/mc-proxy/mc-proxy.db"
    admin_socket: str = "/srv/mc-proxy/admin.sock"
    metrics: MetricsConfig | None = None
    proxy: ProxyTimeouts = field(default_factory=ProxyTimeouts)
    firewall: FirewallSettings = field(default_factory=FirewallSettings)
    seed: ProxyState = field(default_factory=ProxyState)

    def worker_count(self) -> int:
        return self.workers or os.cpu_count() or 1


def parse_duration(text: str) -> float:
    """``"500ms"``, ``"5s"``, ``"1m"``, ``"1h"`` -> seconds. Raises ValueError."""
    raise NotImplementedError


def load_config(path: str) -> Config:
    """Read and validate ``path``. Raises :class:`ConfigError` listing every problem."""
    raise NotImplementedError
