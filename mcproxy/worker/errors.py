"""Why a connection was refused, as one exception type.

Like h2's ``error_code``, ``reason`` is a small fixed vocabulary: it is the
metric label and the access-log outcome. One handler in the listener turns any
:class:`Refused` into a TCP RST with no bytes (invariant 6).
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Reason", "Refused"]


class Reason(StrEnum):
    FIREWALL_IP = "firewall_ip"
    FIREWALL_CIDR = "firewall_cidr"
    FIREWALL_COUNTRY = "firewall_country"
    RATE_LIMIT = "rate_limit"
    MAX_CONNECTIONS = "max_connections"
    PROXY_HEADER = "proxy_header"
    CLIENT_HELLO = "client_hello"
    NO_ROUTE = "no_route"


class Refused(Exception):
    """Reset this connection; ``detail`` is for the log only, never for the peer."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else str(reason))
        self.reason = reason
        self.detail = detail
