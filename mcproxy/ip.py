"""The one canonical text form of an IP address (the model layer).

The firewall matches it, the limits count by it, the logs and forwarded
headers show it, and validation stores rules in it, so each of them must
spell an address the same way: a dual-stack listener sees an IPv4 client as
``::ffff:a.b.c.d`` and a PROXY v2 header may carry it that way too, and both
must meet an IPv4 rule. Every such caller goes through :func:`canonical_ip`.
"""

from __future__ import annotations

import ipaddress

__all__ = ["canonical_ip"]


def canonical_ip(text: str) -> str:
    """``ipaddress``'s compressed spelling, IPv4-mapped IPv6 as plain IPv4, no zone id.

    Raises:
        ValueError: ``text`` is not an IP address.
    """
    address = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)
