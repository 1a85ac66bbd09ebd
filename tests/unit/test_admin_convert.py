"""Admin requests -> changes (validation, canonical forms) and model <-> messages, without gRPC."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mcproxy.admin import convert
from mcproxy.admin.convert import InvalidArgument
from mcproxy.admin.v1 import admin_pb2 as pb
from mcproxy.model import (
    Address,
    BackendProtocol,
    Balance,
    FirewallRuleAdded,
    FirewallRuleKind,
    FirewallRuleRemoved,
    FirewallRules,
    HealthCheck,
    HealthCheckKind,
    L7Policy,
    Listener,
    ListenerMaxConnectionsSet,
    Mode,
    PolicyAdded,
    PolicyKind,
    PolicyRemoved,
    ProxyState,
    Route,
    RouteAdded,
    RouteRemoved,
    RouteUpdated,
    make_state,
)
from mcproxy.status import ListenerStatus, Status, WorkerStatus
from tests.certs import make_ca, make_self_signed

LISTENER = "127.0.0.1:8443"


@pytest.fixture
def state() -> ProxyState:
    route = Route("alpha.test", (Address("127.0.0.1", 9001),))
    listeners = [
        Listener(Address("127.0.0.1", 8443), routes={"alpha.test": route}),
        Listener(Address("", 443)),
        Listener(Address("::1", 8443)),
    ]
    return make_state(1, listeners, FirewallRules())


@pytest.fixture
def pair(tmp_path: Path) -> tuple[str, str]:
    cert, key = make_self_signed(tmp_path, "beta.test")
    return str(cert), str(key)


def add(state: ProxyState, listener: str = LISTENER, **route: Any) -> RouteAdded:
    fields: dict[str, Any] = {"hostname": "beta.test", "backend": "127.0.0.1:9002", **route}
    return convert.add_route(state, pb.AddRouteRequest(listener=listener, route=pb.Route(**fields)))


def invalid(state: ProxyState, listener: str = LISTENER, **route: Any) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as caught:
        add(state, listener, **route)
    return dict(caught.value.problems)


# --- listeners ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"), [(":443", ":443"), ("[::1]:8443", "[::1]:8443"), (" 127.0.0.1:8443", LISTENER)]
)
def test_listener_is_named_in_its_canonical_form(state: ProxyState, text: str, key: str) -> None:
    assert convert.listener_key(state, text) == key


def test_unknown_listener_is_an_invalid_argument_listing_the_known_ones(state: ProxyState) -> None:
    with pytest.raises(InvalidArgument) as caught:
        convert.listener_key(state, "127.0.0.1:1")
    [(field, reason)] = caught.value.problems
    assert field == "listener"
    assert "no listener 127.0.0.1:1" in reason and LISTENER in reason and ":443" in reason


@pytest.mark.parametrize("text", ["", "nonsense", "127.0.0.1:99999"])
def test_malformed_listener_is_an_invalid_argument(state: ProxyState, text: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^listener: "):
        convert.listener_key(state, text)


# --- routes --------------------------------------------------------------------------------


def test_add_route_canonicalises_hostname_and_backend(state: ProxyState) -> None:
    change = add(state, hostname="Beta.TEST.", backend="[::0001]:9002")
    assert change == RouteAdded(LISTENER, Route("beta.test", (Address("::1", 9002),), Mode.L4))


def test_add_route_defaults_to_l4(state: ProxyState) -> None:
    assert add(state).route.mode is Mode.L4


def test_l7_route_with_a_pair_that_loads(state: ProxyState, pair: tuple[str, str]) -> None:
    cert, key = pair
    change = add(
        state,
        mode="L7",
        tls_cert=cert,
        tls_key=key,
        backend_tls=True,
        send_proxy_protocol=True,
        l7_policies=[pb.L7Policy(type="require_header", value="X-Api-Key")],
    )
    assert change.route == Route(
        "beta.test",
        (Address("127.0.0.1", 9002),),
        Mode.L7,
        tls_cert=cert,
        tls_key=key,
        backend_tls=True,
        send_proxy_protocol=True,
        policies=(L7Policy(PolicyKind.REQUIRE_HEADER, "x-api-key"),),
    )


@pytest.mark.parametrize(
    ("route", "field", "reason"),
    [
        ({"hostname": "bad_host!"}, "route.hostname", "not a valid DNS hostname"),
        ({"hostname": "*wild.test"}, "route.hostname", "'*.example.com' for one more label"),
        ({"hostname": ""}, "route.hostname", "required"),
        ({"backend": "127.0.0.1"}, "route.backend", "has no port"),
        ({"backend": ":9002"}, "route.backend", "has no host"),
        ({"backend": "127.0.0.1:0"}, "route.backend", "1 to 65535"),
        ({"backend": ""}, "route.backend", "required"),
        ({"mode": "l5"}, "route.mode", "not one of: l4, l7"),
        ({"mode": "l7"}, "route.tls_cert", "required for mode l7"),
        ({"tls_cert": "/x.pem"}, "route.tls_cert", "only for mode l7"),
        ({"backend_tls": True}, "route.backend_tls", "only for mode l7"),
    ],
)
def test_invalid_route_names_the_field(
    state: ProxyState, route: dict[str, Any], field: str, reason: str
) -> None:
    assert reason in invalid(state, **route)[field]


def test_l7_route_needs_a_readable_pair_that_loads(
    state: ProxyState, pair: tuple[str, str], tmp_path: Path
) -> None:
    cert, key = pair
    _, other_key = make_self_signed(tmp_path, "other.test")
    assert (
        "file not found"
        in invalid(state, mode="l7", tls_cert=cert, tls_key="/nope.key")["route.tls_key"]
    )
    assert (
        "absolute path"
        in invalid(state, mode="l7", tls_cert="cert.pem", tls_key=key)["route.tls_cert"]
    )
    mismatch = invalid(state, mode="l7", tls_cert=cert, tls_key=str(other_key))
    assert "does not match" in mismatch["route.tls_key"]
    assert (
        "not a PEM certificate"
        in invalid(state, mode="l7", tls_cert=key, tls_key=key)["route.tls_cert"]
    )


def test_every_problem_is_reported_at_once(state: ProxyState) -> None:
    found = invalid(
        state,
        "10.9.9.9:1",
        hostname="bad host",
        backend="nowhere",
        mode="l9",
        l7_policies=[pb.L7Policy(type="block_everything", value="x")],
    )
    assert set(found) == {
        "listener",
        "route.hostname",
        "route.backend",
        "route.mode",
        "route.l7_policies[0].type",
    }


def test_add_route_without_a_route_is_invalid(state: ProxyState) -> None:
    with pytest.raises(InvalidArgument, match=r"^route: required"):
        convert.add_route(state, pb.AddRouteRequest(listener=LISTENER))


def test_remove_route_canonicalises_the_hostname(state: ProxyState) -> None:
    request = pb.RemoveRouteRequest(listener=" 127.0.0.1:8443", hostname="ALPHA.test")
    assert convert.remove_route(state, request) == RouteRemoved(LISTENER, "alpha.test")


def test_remove_route_with_a_malformed_hostname_is_invalid(state: ProxyState) -> None:
    with pytest.raises(InvalidArgument, match=r"^hostname: "):
        convert.remove_route(state, pb.RemoveRouteRequest(listener=LISTENER, hostname="a b"))


# --- firewall, limits, policies ------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "value", "canonical"),
    [
        ("ip", "::ffff:192.0.2.1", "192.0.2.1"),
        ("IP", "2001:db8::0001", "2001:db8::1"),
        ("cidr", "198.51.100.0/24", "198.51.100.0/24"),
        ("country", "kp", "KP"),
    ],
)
def test_firewall_values_are_canonical_both_ways(kind: str, value: str, canonical: str) -> None:
    expected_kind = FirewallRuleKind(kind.lower())
    assert convert.firewall_rule(kind, value, add=True) == FirewallRuleAdded(
        expected_kind, canonical
    )
    assert convert.firewall_rule(kind, value, add=False) == FirewallRuleRemoved(
        expected_kind, canonical
    )


@pytest.mark.parametrize(
    ("kind", "value", "expected"),
    [
        ("port", "80", "^type: 'port' is not one of: ip, cidr, country"),
        ("ip", "300.1.1.1", "^value: '300.1.1.1' is not an IP address"),
        ("cidr", "198.51.100.7/24", "^value: .*host bits set; did you mean 198.51.100.0/24"),
        ("cidr", "not-a-net", "^value: .*is not a network"),
        ("country", "KPR", "^value: .*two-letter ISO 3166-1"),
    ],
)
def test_bad_firewall_rule_names_the_field(kind: str, value: str, expected: str) -> None:
    with pytest.raises(InvalidArgument, match=expected):
        convert.firewall_rule(kind, value, add=True)


def test_max_connections_zero_means_unlimited(state: ProxyState) -> None:
    request = pb.SetListenerMaxConnectionsRequest(listener=":443", max_connections=0)
    assert convert.max_connections(state, request) == ListenerMaxConnectionsSet(":443", 0)


def test_negative_max_connections_is_invalid(state: ProxyState) -> None:
    request = pb.SetListenerMaxConnectionsRequest(listener=":443", max_connections=-1)
    with pytest.raises(InvalidArgument, match=r"^max_connections: must be 0"):
        convert.max_connections(state, request)


def test_policy_change_is_canonical(state: ProxyState) -> None:
    add_request = pb.AddL7PolicyRequest(
        listener=LISTENER, hostname="Alpha.test", type="require_header", value="X-Key"
    )
    policy = L7Policy(PolicyKind.REQUIRE_HEADER, "x-key")
    assert convert.policy_change(state, add_request, add=True) == PolicyAdded(
        LISTENER, "alpha.test", policy
    )
    remove_request = pb.RemoveL7PolicyRequest(
        listener=LISTENER, hostname="alpha.test", type="REQUIRE_HEADER", value="x-key"
    )
    assert convert.policy_change(state, remove_request, add=False) == PolicyRemoved(
        LISTENER, "alpha.test", policy
    )


@pytest.mark.parametrize(
    ("kind", "value", "expected"),
    [
        ("block_everything", "x", "^type: 'block_everything' is not one of"),
        ("require_header", "not a header", "^value: .*not a valid HTTP header name"),
        ("block_user_agent", "", "^value: must not be empty"),
    ],
)
def test_bad_policy_names_the_field(
    state: ProxyState, kind: str, value: str, expected: str
) -> None:
    request = pb.AddL7PolicyRequest(
        listener=LISTENER, hostname="alpha.test", type=kind, value=value
    )
    with pytest.raises(InvalidArgument, match=expected):
        convert.policy_change(state, request, add=True)


# --- replies -------------------------------------------------------------------------------


def test_route_survives_the_round_trip(pair: tuple[str, str]) -> None:
    cert, key = pair
    route = Route(
        "beta.test",
        (Address("::1", 9002),),
        Mode.L7,
        tls_cert=cert,
        tls_key=key,
        backend_tls=True,
        send_proxy_protocol=True,
        policies=(
            L7Policy(PolicyKind.BLOCK_USER_AGENT, "BadBot"),
            L7Policy(PolicyKind.REQUIRE_HEADER, "x-key"),
        ),
    )
    message = convert.route_to_message(route)
    assert convert.route_from_reply(pb.Route.FromString(message.SerializeToString())) == route
    assert convert.route_from_message(message) == route


def test_firewall_rules_survive_the_round_trip() -> None:
    rules = FirewallRules(
        blocked_ips=frozenset({"192.0.2.1", "2001:db8::1"}),
        blocked_cidrs=frozenset({"198.51.100.0/24"}),
        blocked_countries=frozenset({"KP"}),
    )
    message = convert.firewall_rules_to_message(rules)
    assert [(r.type, r.value) for r in message.rules] == [
        ("ip", "192.0.2.1"),
        ("ip", "2001:db8::1"),
        ("cidr", "198.51.100.0/24"),
        ("country", "KP"),
    ]
    assert convert.firewall_rules_from_message(message) == rules


def test_status_survives_the_round_trip() -> None:
    status = Status(
        version="1.2.3",
        start_time=1_700_000_000.25,
        uptime_seconds=42.5,
        generation=7,
        worker_restarts=1,
        workers=(WorkerStatus(1, 1234, 7, 3, 40.0), WorkerStatus(2, 0, 0, 0, 0.0)),
        listeners=(ListenerStatus(LISTENER, 2, 3, 100, True),),
    )
    message = pb.GetStatusResponse.FromString(convert.status_to_message(status).SerializeToString())
    assert convert.status_from_message(message) == status


# --- second batch ----------------------------------------------------------------------------


@pytest.fixture
def trust(tmp_path: Path, pair: tuple[str, str]) -> dict[str, str]:
    """An l7 route's files: its pair, a CA file and a client pair (absolute paths)."""
    ca = make_ca().write(tmp_path)
    client_cert, client_key = make_self_signed(tmp_path, "client")
    return {
        "tls_cert": pair[0],
        "tls_key": pair[1],
        "ca": str(ca),
        "client_cert": str(client_cert),
        "client_key": str(client_key),
    }


def full_route(trust: dict[str, str]) -> Route:
    return Route(
        "*.beta.test",
        (Address("::1", 9002), Address("backend.internal", 9003)),
        Mode.L7,
        tls_cert=trust["tls_cert"],
        tls_key=trust["tls_key"],
        backend_tls=True,
        balance=Balance.SOURCE_IP,
        health_check=HealthCheck(
            HealthCheckKind.HTTP, interval=3.0, timeout=0.5, path="/up", rise=1, fall=4
        ),
        backend_protocol=BackendProtocol.H1,
        backend_ca=trust["ca"],
        backend_server_name="api.internal",
        backend_client_cert=trust["client_cert"],
        backend_client_key=trust["client_key"],
        client_ca=trust["ca"],
    )


def test_every_new_route_field_survives_the_round_trip(trust: dict[str, str]) -> None:
    route = full_route(trust)
    message = convert.route_to_message(route)
    assert message.backend == "[::1]:9002"  # old clients still see a backend
    assert list(message.backends) == ["[::1]:9002", "backend.internal:9003"]
    wire = pb.Route.FromString(message.SerializeToString())
    assert convert.route_from_reply(wire) == route
    assert convert.route_from_message(wire) == route


def test_a_reply_from_an_older_server_has_one_backend() -> None:
    message = pb.Route(hostname="a.test", backend="127.0.0.1:1", mode="l4")
    assert convert.route_from_reply(message) == Route("a.test", (Address("127.0.0.1", 1),))


def test_backends_canonicalised_and_defaults_applied(state: ProxyState) -> None:
    change = add(
        state,
        hostname="*",
        backend="",
        backends=["Host.Test:1", "[::0001]:2"],
        health_check=pb.HealthCheck(kind="TCP"),
    )
    assert change.route == Route(
        "*",
        (Address("host.test", 1), Address("::1", 2)),
        health_check=HealthCheck(HealthCheckKind.TCP),
    )


def test_old_backend_field_alone_or_equal_to_the_first(state: ProxyState) -> None:
    one = add(state, backend="127.0.0.1:9002")
    both = add(state, backend="127.0.0.1:9002", backends=["127.0.0.1:9002", "127.0.0.1:9003"])
    assert one.route.backends == (Address("127.0.0.1", 9002),)
    assert both.route.backends == (Address("127.0.0.1", 9002), Address("127.0.0.1", 9003))


@pytest.mark.parametrize(
    ("route", "field", "reason"),
    [
        (
            {"backends": ["127.0.0.1:1"]},  # backend 127.0.0.1:9002 from add()
            "route.backend",
            "give backend or backends, not both",
        ),
        ({"backend": "", "backends": ["127.0.0.1:1", ":2"]}, "route.backends[1]", "has no host"),
        (
            {"backend": "", "backends": ["127.0.0.1:1", "127.0.0.1:1"]},
            "route.backends[1]",
            "duplicate of backends[0]",
        ),
        ({"backend": ""}, "route.backend", "required"),
        ({"balance": "random"}, "route.balance", "is not one of: round_robin, least_conn"),
        ({"health_check": pb.HealthCheck()}, "route.health_check.kind", "required"),
        ({"health_check": pb.HealthCheck(kind="icmp")}, "route.health_check.kind", "tcp, http"),
        (
            {"health_check": pb.HealthCheck(kind="tcp", interval_seconds=1, timeout_seconds=2)},
            "route.health_check.timeout",
            "must be shorter than interval",
        ),
        (
            {"health_check": pb.HealthCheck(kind="tcp", interval_seconds=-1)},
            "route.health_check.interval",
            "greater than zero",
        ),
        (
            {"health_check": pb.HealthCheck(kind="http", path="x")},
            "route.health_check.path",
            "must start with '/'",
        ),
        ({"backend_protocol": "h3"}, "route.backend_protocol", "not one of: h2, h1"),
        ({"backend_protocol": "h1"}, "route.backend_protocol", "only for mode l7"),
        ({"client_ca": "/ca.pem"}, "route.client_ca", "only for mode l7"),
        ({"backend_ca": "/ca.pem"}, "route.backend_ca", "only for mode l7"),
        ({"backend_server_name": "a b"}, "route.backend_server_name", "not a DNS hostname"),
    ],
)
def test_invalid_new_route_fields_name_the_field(
    state: ProxyState, route: dict[str, Any], field: str, reason: str
) -> None:
    assert reason in invalid(state, **route)[field]


def test_trust_files_are_checked_like_certificates(
    state: ProxyState, trust: dict[str, str], tmp_path: Path
) -> None:
    base = {"mode": "l7", "tls_cert": trust["tls_cert"], "tls_key": trust["tls_key"]}
    missing = str(tmp_path / "nope.pem")
    assert "file not found" in invalid(state, **base, client_ca=missing)["route.client_ca"]
    assert "absolute path" in invalid(state, **base, client_ca="ca.pem")["route.client_ca"]
    problems = invalid(state, **base, backend_tls=True, backend_client_cert=trust["client_cert"])
    assert "required with backend_client_cert" in problems["route.backend_client_key"]
    problems = invalid(state, **base, backend_ca=trust["ca"])
    assert "only with backend_tls" in problems["route.backend_ca"]


def test_update_route_is_validated_like_add_route(state: ProxyState, trust: dict[str, str]) -> None:
    message = convert.route_to_message(full_route(trust))
    request = pb.UpdateRouteRequest(listener=" 127.0.0.1:8443", route=message)
    assert convert.update_route(state, request) == RouteUpdated(LISTENER, full_route(trust))
    with pytest.raises(InvalidArgument) as caught:
        convert.update_route(
            state,
            pb.UpdateRouteRequest(listener="127.0.0.1:1", route=pb.Route(hostname="a.test")),
        )
    fields = dict(caught.value.problems)
    assert set(fields) == {"listener", "route.backend"}
    with pytest.raises(InvalidArgument, match=r"^route: required"):
        convert.update_route(state, pb.UpdateRouteRequest(listener=LISTENER))


def test_add_listener_requests_are_validated() -> None:
    from mcproxy.model import ListenerAdded, ListenerRemoved

    change = convert.add_listener(
        pb.AddListenerRequest(listener=":8443", proxy_protocol=True, max_connections=5)
    )
    assert isinstance(change, ListenerAdded)
    assert str(change.listener.addr) == ":8443"
    assert change.listener.proxy_protocol and change.listener.max_connections == 5
    with pytest.raises(convert.InvalidArgument) as caught:
        convert.add_listener(pb.AddListenerRequest(listener="nope", max_connections=-1))
    fields = {field for field, _ in caught.value.problems}
    assert fields == {"listener", "max_connections"}
    assert convert.remove_listener(pb.RemoveListenerRequest(listener=":8443")) == (
        ListenerRemoved(":8443")
    )
