"""The global firewall as a pure function of the client IP.

Built once per state generation from :class:`~mcproxy.model.FirewallRules`
and consulted once per connection with the real client IP (the PROXY header's
source when the listener takes one). CIDR matching costs one set lookup per
distinct prefix length, whatever the number of rules.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from mcproxy.model import FirewallRules
from mcproxy.worker.errors import Reason

__all__ = ["CountryLookup", "Firewall"]

CountryLookup = Callable[[str], str | None]
"""IP -> ISO country code, or None when unknown."""

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Firewall:
    def __init__(self, rules: FirewallRules, country_of: CountryLookup | None = None) -> None:
        self._ips = frozenset(rules.blocked_ips)
        self._countries = frozenset(rules.blocked_countries)
        self._country_of = country_of
        # prefix length -> set of network addresses, per IP version
        self._networks: dict[tuple[int, int], set[int]] = {}
        for cidr in rules.blocked_cidrs:
            network = ipaddress.ip_network(cidr)
            key = (network.version, network.prefixlen)
            self._networks.setdefault(key, set()).add(int(network.network_address))

    def check(self, ip: str) -> Reason | None:
        """The refusal reason for a canonical client IP, or None to let it in."""
        if ip in self._ips:
            return Reason.FIREWALL_IP
        if self._networks:
            address: _IPAddress = ipaddress.ip_address(ip)
            value, bits = int(address), address.max_prefixlen
            for (version, prefix), networks in self._networks.items():
                if version == address.version:
                    mask = ((1 << prefix) - 1) << (bits - prefix)
                    if value & mask in networks:
                        return Reason.FIREWALL_CIDR
        if self._countries and self._country_of is not None:
            country = self._country_of(ip)
            if country is not None and country in self._countries:
                return Reason.FIREWALL_COUNTRY
        return None
