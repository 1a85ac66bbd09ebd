"""Process settings that workers need, as plain values (the model layer).

The YAML loader (:mod:`mcproxy.config`) builds these and the supervisor hands
them to each worker in its ``Boot`` message; workers import this module, never
the loader, so they do not depend on YAML parsing or validation.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_ADMIN_SOCKET", "LOG_FORMAT", "ProxyTimeouts"]

DEFAULT_ADMIN_SOCKET = "/srv/mc-proxy/admin.sock"
"""The admin socket when the config names none; ``mcproxyctl``'s default too."""

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s pid=%(process)d %(message)s"
"""Every process's log line (supervisor and workers; the access log renders it itself)."""


@dataclass(frozen=True, slots=True)
class ProxyTimeouts:
    """Seconds."""

    connect_timeout: float = 5.0
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0
    shutdown_timeout: float = 30.0
