"""Export writes the state in the config schema; plan turns a desired state into one batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mcproxy.config import ConfigError, parse_config
from mcproxy.model import (
    Address,
    BackendProtocol,
    Balance,
    ChangeBatch,
    FirewallRules,
    HealthCheck,
    HealthCheckKind,
    L7Policy,
    Listener,
    ListenerAdded,
    ListenerRemoved,
    Mode,
    PolicyKind,
    ProxyState,
    Route,
    RouteAdded,
    RouteRemoved,
    RouteUpdated,
    apply_change,
    make_state,
)
from mcproxy.statefile import export_yaml, plan, process_settings_in
from tests.certs import make_ca, make_self_signed

A = "127.0.0.1:8443"
B = "127.0.0.1:9443"


def _route(name: str, port: int = 9000, **fields: object) -> Route:
    return Route(name, (Address("127.0.0.1", port),), **fields)  # type: ignore[arg-type]


def _state(*listeners: Listener, firewall: FirewallRules | None = None) -> ProxyState:
    return make_state(7, list(listeners), firewall or FirewallRules())


def _listener(addr: str, *routes: Route, **fields: object) -> Listener:
    host, port = addr.rsplit(":", 1)
    return Listener(
        Address(host, int(port)),
        routes={r.hostname: r for r in routes},
        **fields,  # type: ignore[arg-type]
    )


def _same(a: ProxyState, b: ProxyState) -> None:
    """Equal but for the generation."""
    assert list(a.listeners) == list(b.listeners)
    for addr, listener in a.listeners.items():
        other = b.listeners[addr]
        assert (listener.addr, listener.proxy_protocol, listener.max_connections) == (
            other.addr,
            other.proxy_protocol,
            other.max_connections,
        )
        assert dict(listener.routes.items()) == dict(other.routes.items())
    assert a.firewall == b.firewall


@pytest.fixture
def rich(tmp_path: Path) -> ProxyState:
    cert, key = make_self_signed(tmp_path, "example.com")
    l7 = _route(
        "example.com",
        9100,
        mode=Mode.L7,
        tls_cert=str(cert),
        tls_key=str(key),
        backend_tls=True,
        policies=(
            L7Policy(PolicyKind.BLOCK_USER_AGENT, "BadBot"),
            L7Policy(PolicyKind.REQUIRE_HEADER, "x-api-key"),
        ),
    )
    return _state(
        _listener(
            A,
            _route("a.test"),
            _route("*.wild.test", 9001, send_proxy_protocol=True),
            _route("*", 9002),
            l7,
            max_connections=100,
        ),
        _listener(B, _route("b.test", 9003), proxy_protocol=True),
        firewall=FirewallRules(
            blocked_ips=frozenset({"192.0.2.1", "2001:db8::1"}),
            blocked_cidrs=frozenset({"198.51.100.0/24"}),
        ),
    )


def test_export_is_a_config_that_seeds_the_same_state(rich: ProxyState, tmp_path: Path) -> None:
    text = export_yaml(rich)
    assert text.startswith("# mc-proxy state, generation 7")
    seeded = parse_config(text, str(tmp_path / "exported.yaml")).seed
    _same(rich, seeded)
    assert export_yaml(seeded).splitlines()[1:] == text.splitlines()[1:]  # stable


def test_export_leaves_defaults_out(rich: ProxyState) -> None:
    doc = yaml.safe_load(export_yaml(rich))
    first = doc["listeners"][0]
    assert first["addr"] == A and first["max_connections"] == 100
    assert "proxy_protocol" not in first
    assert [r["hostname"] for r in first["routes"]] == ["*", "*.wild.test", "a.test", "example.com"]
    assert first["routes"][2] == {"hostname": "a.test", "backend": "127.0.0.1:9000", "mode": "l4"}
    assert first["routes"][3]["l7_policies"] == [
        {"type": "block_user_agent", "value": "BadBot"},
        {"type": "require_header", "value": "x-api-key"},
    ]
    assert doc["firewall"]["blocked_ips"] == ["192.0.2.1", "2001:db8::1"]
    assert doc["listeners"][1]["proxy_protocol"] is True


def test_country_rules_export_the_geoip_path_the_loader_requires() -> None:
    state = _state(firewall=FirewallRules(blocked_countries=frozenset({"KP"})))
    doc = yaml.safe_load(export_yaml(state, "/srv/geo.mmdb"))
    assert doc["firewall"]["geoip_db"] == "/srv/geo.mmdb"
    assert "geoip_db" not in yaml.safe_load(export_yaml(_state(), "/srv/geo.mmdb"))["firewall"]


def test_state_only_parsing_needs_no_geoip_for_countries(tmp_path: Path) -> None:
    text = "firewall: {blocked_countries: [KP]}\n"
    with pytest.raises(ConfigError):
        parse_config(text, str(tmp_path / "c.yaml"))
    seed = parse_config(text, str(tmp_path / "c.yaml"), state_only=True).seed
    assert seed.firewall.blocked_countries == {"KP"}


def test_plan_of_the_same_state_is_empty(rich: ProxyState) -> None:
    p = plan(rich, rich)
    assert p.changes == () and p.entries == () and p.refused == ()


def test_plan_makes_the_current_state_equal_to_the_desired_one(rich: ProxyState) -> None:
    listener = rich.listeners[A]
    desired = _state(
        _listener(
            A,
            _route("a.test", 9999),  # updated
            _route("*", 9002),  # same
            _route("new.test"),  # added; *.wild.test and example.com removed
            max_connections=5,
        ),
        rich.listeners[B],
        firewall=FirewallRules(blocked_ips=frozenset({"192.0.2.1", "203.0.113.9"})),
    )
    p = plan(rich, desired)
    assert p.refused == ()
    kinds = [type(c).__name__ for c in p.changes]
    assert kinds.count("RouteUpdated") == 1 and kinds.count("RouteAdded") == 1
    assert kinds.count("RouteRemoved") == 2
    assert RouteUpdated(A, _route("a.test", 9999)) in p.changes
    assert RouteRemoved(A, "example.com") in p.changes
    assert RouteAdded(A, _route("new.test")) in p.changes
    after = apply_change(rich, p.batch)
    assert after.generation == rich.generation + 1  # one batch, one generation
    _same(after, desired)
    assert plan(after, desired).changes == ()
    lines = {(e.action, e.kind, e.name): e.detail for e in p.entries}
    assert lines[("update", "route", "a.test")] == "backend: 127.0.0.1:9000 -> 127.0.0.1:9999"
    assert lines[("update", "listener", A)] == "max_connections: 100 -> 5"
    assert ("remove", "firewall", "ip 2001:db8::1") in lines
    assert ("remove", "firewall", "cidr 198.51.100.0/24") in lines
    assert ("add", "firewall", "ip 203.0.113.9") in lines
    assert ("add", "route", "new.test") in lines and ("remove", "route", "*.wild.test") in lines
    assert listener is rich.listeners[A]  # nothing mutated


def test_listener_changes_are_refused_without_runtime_listeners(rich: ProxyState) -> None:
    desired = _state(rich.listeners[A], _listener("127.0.0.1:7443", _route("c.test")))
    p = plan(rich, desired)
    assert len(p.refused) == 2
    assert p.refused[0].startswith("listeners: 127.0.0.1:9443 is not in the file")
    assert p.refused[1].startswith("listeners[1].addr: listener 127.0.0.1:7443 does not exist")
    changed_pp = _state(rich.listeners[A], _listener(B, _route("b.test", 9003)))
    assert plan(rich, changed_pp).refused[0].startswith("listeners[1].proxy_protocol:")


def test_listener_changes_with_runtime_listeners(rich: ProxyState) -> None:
    added = _listener("127.0.0.1:7443", _route("c.test"))
    desired = _state(rich.listeners[A], added)
    p = plan(rich, desired, listeners_at_runtime=True)
    assert p.refused == ()
    assert (
        ListenerRemoved(B) in p.changes
        and ListenerAdded(desired.listeners["127.0.0.1:7443"]) in p.changes
    )
    _same(apply_change(rich, ChangeBatch(p.changes)), desired)


def test_process_settings_in() -> None:
    data = {
        "workers": 2,
        "proxy": {},
        "listeners": [],
        "firewall": {"geoip_db": "x", "rate_limit": 1},
    }
    assert process_settings_in(data) == [
        "workers",
        "proxy",
        "firewall.geoip_db",
        "firewall.rate_limit",
    ]
    assert process_settings_in({"listeners": []}) == []
    assert process_settings_in(None) == []


def test_every_second_batch_route_field_round_trips_through_export(tmp_path: Path) -> None:
    """Export writes each new route field so the config loader reads the same route back."""
    cert, key = make_self_signed(tmp_path, "web.test")
    client_cert, client_key = make_self_signed(tmp_path, "client")
    ca = make_ca().write(tmp_path)
    web = Route(
        "*.web.test",
        (Address("127.0.0.1", 9000), Address("::1", 9001), Address("backend.internal", 9002)),
        mode=Mode.L7,
        tls_cert=str(cert),
        tls_key=str(key),
        backend_tls=True,
        balance=Balance.SOURCE_IP,
        health_check=HealthCheck(
            HealthCheckKind.HTTP, interval=1.5, timeout=0.25, path="/up?full=1", rise=1, fall=4
        ),
        backend_protocol=BackendProtocol.H1,
        backend_ca=str(ca),
        backend_server_name="api.internal",
        backend_client_cert=str(client_cert),
        backend_client_key=str(client_key),
        client_ca=str(ca),
    )
    catch_all = _route("*", 9100, health_check=HealthCheck(HealthCheckKind.TCP))
    state = _state(_listener(A, web, catch_all))
    seeded = parse_config(export_yaml(state), str(tmp_path / "exported.yaml")).seed
    assert seeded.listeners[A].routes == state.listeners[A].routes
