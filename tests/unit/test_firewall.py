from __future__ import annotations

from mcproxy.ip import canonical_ip
from mcproxy.model import FirewallRules
from mcproxy.worker.errors import Reason
from mcproxy.worker.firewall import Firewall


def test_ip_cidr_and_country_rules() -> None:
    rules = FirewallRules(
        blocked_ips=frozenset({"192.0.2.1"}),
        blocked_cidrs=frozenset({"198.51.100.0/24", "2001:db8::/32", "10.0.0.0/8"}),
        blocked_countries=frozenset({"KP"}),
    )
    countries = {"203.0.113.9": "KP", "203.0.113.10": "FR"}
    firewall = Firewall(rules, countries.get)
    assert firewall.check("192.0.2.1") is Reason.FIREWALL_IP
    assert firewall.check("198.51.100.77") is Reason.FIREWALL_CIDR
    assert firewall.check("10.255.0.1") is Reason.FIREWALL_CIDR
    assert firewall.check("2001:db8:1::5") is Reason.FIREWALL_CIDR
    assert firewall.check("203.0.113.9") is Reason.FIREWALL_COUNTRY
    assert firewall.check("203.0.113.10") is None
    assert firewall.check("198.51.101.1") is None
    assert firewall.check("2001:db9::1") is None


def test_countries_without_a_lookup_block_nothing() -> None:
    firewall = Firewall(FirewallRules(blocked_countries=frozenset({"KP"})))
    assert firewall.check("203.0.113.9") is None


def test_client_ip_unmaps_dual_stack_addresses() -> None:
    assert canonical_ip("::ffff:192.0.2.1") == "192.0.2.1"
    assert canonical_ip("2001:DB8::1") == "2001:db8::1"
    assert canonical_ip("fe80::1%eth0") == "fe80::1"
