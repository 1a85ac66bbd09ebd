"""apply_change is the one meaning of a change: supervisor and workers both call it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcproxy import pipe
from mcproxy.model import (
    Address,
    AddressError,
    BackendProtocol,
    Balance,
    ChangeBatch,
    FirewallRuleAdded,
    FirewallRuleKind,
    FirewallRuleRemoved,
    FirewallRules,
    HealthCheck,
    HealthCheckKind,
    L7Policy,
    Listener,
    ListenerAdded,
    ListenerMaxConnectionsSet,
    ListenerRemoved,
    Mode,
    PolicyAdded,
    PolicyKind,
    PolicyRemoved,
    ProxyState,
    Route,
    RouteAdded,
    RouteRemoved,
    RouteTable,
    RouteUpdated,
    StateError,
    apply_change,
    make_state,
    normalize_hostname,
    normalize_route_hostname,
    parse_address,
)

LISTENER = "127.0.0.1:8443"


def state_with_route(mode: Mode = Mode.L4) -> ProxyState:
    route = Route("a.test", (Address("127.0.0.1", 9000),), mode)
    listener = Listener(parse_address(LISTENER), routes={"a.test": route})
    return make_state(1, [listener], FirewallRules())


def test_parse_address_forms() -> None:
    assert parse_address("127.0.0.1:443") == Address("127.0.0.1", 443)
    assert parse_address(":443") == Address("", 443)
    assert parse_address("[::1]:443") == Address("::1", 443)
    assert str(parse_address("[::1]:443")) == "[::1]:443"
    assert parse_address("Backend.Example:80") == Address("backend.example", 80)


@pytest.mark.parametrize(
    "text", ["127.0.0.1", "::1:443", "[::1]443", "[nope]:1", "h:0", "h:65536", "h:x"]
)
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(AddressError):
        parse_address(text)


def test_normalize_hostname() -> None:
    assert normalize_hostname("ExAmple.COM.") == "example.com"
    assert normalize_hostname("-bad.example") is None
    assert normalize_hostname("a" * 64 + ".example") is None
    assert normalize_hostname("exämple.com") is None


def test_route_added_and_removed_bump_generation() -> None:
    state = state_with_route()
    route = Route("b.test", (Address("127.0.0.1", 9001),))
    added = apply_change(state, RouteAdded(LISTENER, route))
    assert added.generation == 2
    assert added.listeners[LISTENER].routes["b.test"] == route
    removed = apply_change(added, RouteRemoved(LISTENER, "a.test"))
    assert set(removed.listeners[LISTENER].routes) == {"b.test"}
    assert removed.generation == 3


def test_changes_never_mutate_the_previous_state() -> None:
    state = state_with_route()
    apply_change(state, RouteRemoved(LISTENER, "a.test"))
    assert "a.test" in state.listeners[LISTENER].routes


def test_duplicate_and_missing_routes() -> None:
    state = state_with_route()
    route = Route("a.test", (Address("127.0.0.1", 1),))
    with pytest.raises(StateError) as exists:
        apply_change(state, RouteAdded(LISTENER, route))
    assert exists.value.kind == "already_exists"
    with pytest.raises(StateError) as missing:
        apply_change(state, RouteRemoved(LISTENER, "zz.test"))
    assert missing.value.kind == "not_found"
    with pytest.raises(StateError) as no_listener:
        apply_change(state, RouteRemoved("127.0.0.1:1", "a.test"))
    assert no_listener.value.kind == "not_found"


def test_firewall_rules_add_and_remove() -> None:
    state = state_with_route()
    added = apply_change(state, FirewallRuleAdded(FirewallRuleKind.CIDR, "10.0.0.0/8"))
    assert added.firewall.blocked_cidrs == frozenset({"10.0.0.0/8"})
    with pytest.raises(StateError):
        apply_change(added, FirewallRuleAdded(FirewallRuleKind.CIDR, "10.0.0.0/8"))
    removed = apply_change(added, FirewallRuleRemoved(FirewallRuleKind.CIDR, "10.0.0.0/8"))
    assert removed.firewall.blocked_cidrs == frozenset()
    with pytest.raises(StateError):
        apply_change(removed, FirewallRuleRemoved(FirewallRuleKind.IP, "192.0.2.1"))


def test_max_connections_and_policies() -> None:
    state = state_with_route(Mode.L7)
    limited = apply_change(state, ListenerMaxConnectionsSet(LISTENER, 50))
    assert limited.listeners[LISTENER].max_connections == 50
    policy = L7Policy(PolicyKind.REQUIRE_HEADER, "x-api-key")
    with_policy = apply_change(limited, PolicyAdded(LISTENER, "a.test", policy))
    assert with_policy.listeners[LISTENER].routes["a.test"].policies == (policy,)
    with pytest.raises(StateError):
        apply_change(with_policy, PolicyAdded(LISTENER, "a.test", policy))
    without = apply_change(with_policy, PolicyRemoved(LISTENER, "a.test", policy))
    assert without.listeners[LISTENER].routes["a.test"].policies == ()
    with pytest.raises(StateError):
        apply_change(without, PolicyRemoved(LISTENER, "a.test", policy))


def test_policy_on_an_l4_route_is_refused() -> None:
    state = state_with_route(Mode.L4)
    change = PolicyAdded(LISTENER, "a.test", L7Policy(PolicyKind.REQUIRE_HEADER, "x-key"))
    with pytest.raises(StateError, match="is mode l4; policies apply to l7 only") as caught:
        apply_change(state, change)
    assert caught.value.kind == "invalid"


# --- RouteTable ------------------------------------------------------------------------


def _route(name: str, port: int = 9) -> Route:
    return Route(name, (Address("127.0.0.1", port),))


@given(
    st.lists(st.tuples(st.booleans(), st.integers(0, 60), st.integers(1, 65535)), max_size=400),
    st.integers(0, 100),
)
def test_route_table_behaves_like_a_dict(ops: list[tuple[bool, int, int]], initial: int) -> None:
    """Any sequence of adds, replacements and removals, across compactions."""
    model = {f"h{i}.test": _route(f"h{i}.test") for i in range(initial)}
    table = RouteTable(model)
    versions = [(table, dict(model))]
    for add, key, port in ops:
        name = f"h{key}.test"
        if add:
            model[name] = _route(name, port)
            table = table.with_route(model[name])
        elif name in model:
            del model[name]
            table = table.without(name)
        versions.append((table, dict(model)))
    for version, expected in versions:  # older versions are untouched by later changes
        assert len(version) == len(expected)
        assert dict(version.items()) == expected
        assert version == expected
        for key in range(61):
            name = f"h{key}.test"
            assert (name in version) == (name in expected)
            assert version.get(name) == expected.get(name)


def test_route_table_pickles_flat_through_the_pipe() -> None:
    table = RouteTable({"a.test": _route("a.test")}).with_route(_route("b.test")).without("a.test")
    state = make_state(1, [Listener(Address("", 443), routes=table)], FirewallRules())
    [decoded] = pipe.FrameDecoder().feed(pipe.encode(pipe.Snapshot(state)))
    assert isinstance(decoded, pipe.Snapshot)
    routes = decoded.state.listener(":443").routes
    assert isinstance(routes, RouteTable)
    assert dict(routes.items()) == {"b.test": _route("b.test")}


def test_route_changes_do_not_copy_the_whole_table() -> None:
    big = make_state(
        1,
        [
            Listener(
                Address("", 443), routes={f"h{i}.test": _route(f"h{i}.test") for i in range(5000)}
            )
        ],
        FirewallRules(),
    )
    state = apply_change(big, RouteAdded(":443", _route("new.test")))
    old_routes = big.listener(":443").routes
    new_routes = state.listener(":443").routes
    assert isinstance(old_routes, RouteTable) and isinstance(new_routes, RouteTable)
    assert new_routes._base is old_routes._base  # shared, not copied
    assert "new.test" in new_routes and "new.test" not in old_routes
    state = apply_change(state, RouteRemoved(":443", "h7.test"))
    assert "h7.test" not in state.listener(":443").routes
    assert "h7.test" in big.listener(":443").routes
    assert len(state.listener(":443").routes) == 5000


# --- second batch ---------------------------------------------------------------------


def test_route_defaults_keep_first_batch_behaviour() -> None:
    a, b = Address("127.0.0.1", 9000), Address("127.0.0.1", 9001)
    route = Route("a.test", (a, b))
    assert route.backend == a
    assert route.balance is Balance.ROUND_ROBIN
    assert route.health_check is None
    assert route.backend_protocol is BackendProtocol.H2
    assert (route.backend_ca, route.backend_server_name, route.client_ca) == (None, None, None)
    assert (route.backend_client_cert, route.backend_client_key) == (None, None)
    assert HealthCheck(HealthCheckKind.HTTP) == HealthCheck(
        HealthCheckKind.HTTP, interval=5.0, timeout=2.0, path="/healthz", rise=2, fall=3
    )


def test_route_stores_backends_as_a_tuple_whatever_it_is_given() -> None:
    a = Address("127.0.0.1", 9000)
    assert Route("a.test", a).backends == (a,)  # type: ignore[arg-type]
    assert Route("a.test", [a]).backends == (a,)  # type: ignore[arg-type]
    assert hash(Route("a.test", [a])) == hash(Route("a.test", (a,)))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "stored"),
    [
        ("Example.COM", "example.com"),
        ("*.Example.com", "*.example.com"),
        ("*", "*"),
        (" * ", "*"),
        ("*.example.com.", "*.example.com"),
    ],
)
def test_route_hostnames_exact_wildcard_and_catch_all(text: str, stored: str) -> None:
    assert normalize_route_hostname(text) == stored


@pytest.mark.parametrize("text", ["a.*.example.com", "*a.example.com", "**", "*.", "*.*.com", ""])
def test_route_hostnames_refuse_other_stars(text: str) -> None:
    assert normalize_route_hostname(text) is None
    assert normalize_hostname(text) is None  # backends and SNI stay exact names


def test_route_updated_replaces_the_route_whole() -> None:
    state = state_with_route()
    route = Route(
        "a.test",
        (Address("127.0.0.1", 9100), Address("127.0.0.1", 9101)),
        balance=Balance.LEAST_CONN,
        health_check=HealthCheck(HealthCheckKind.TCP),
    )
    new = apply_change(state, RouteUpdated(LISTENER, route))
    assert new.generation == state.generation + 1
    assert new.listeners[LISTENER].routes["a.test"] == route
    assert len(new.listeners[LISTENER].routes) == 1


def test_route_updated_needs_an_existing_route() -> None:
    with pytest.raises(StateError) as exc:
        apply_change(state_with_route(), RouteUpdated(LISTENER, _route("zz.test", 1)))
    assert exc.value.kind == "not_found"
    with pytest.raises(StateError) as exc:
        apply_change(state_with_route(), RouteUpdated("127.0.0.1:1", _route("a.test", 1)))
    assert exc.value.kind == "not_found"


def test_listener_added_and_removed() -> None:
    state = state_with_route()
    listener = Listener(Address("127.0.0.1", 9443), max_connections=5)
    added = apply_change(state, ListenerAdded(listener))
    assert added.generation == state.generation + 1
    assert added.listeners["127.0.0.1:9443"].max_connections == 5
    assert isinstance(added.listeners["127.0.0.1:9443"].routes, RouteTable)
    with pytest.raises(StateError) as exc:
        apply_change(added, ListenerAdded(Listener(Address("127.0.0.1", 9443))))
    assert exc.value.kind == "already_exists"
    removed = apply_change(added, ListenerRemoved(LISTENER))
    assert set(removed.listeners) == {"127.0.0.1:9443"}
    assert removed.generation == added.generation + 1
    with pytest.raises(StateError) as exc:
        apply_change(removed, ListenerRemoved(LISTENER))
    assert exc.value.kind == "not_found"


def test_change_batch_is_one_generation() -> None:
    state = state_with_route()
    batch = ChangeBatch(
        (
            ListenerAdded(Listener(Address("127.0.0.1", 9443))),
            RouteAdded("127.0.0.1:9443", _route("b.test", 2)),
            RouteUpdated(LISTENER, _route("a.test", 3)),
            FirewallRuleAdded(FirewallRuleKind.IP, "192.0.2.1"),
        )
    )
    new = apply_change(state, batch)
    assert new.generation == state.generation + 1
    assert new.listeners["127.0.0.1:9443"].routes["b.test"] == _route("b.test", 2)
    assert new.listeners[LISTENER].routes["a.test"] == _route("a.test", 3)
    assert new.firewall.blocked_ips == {"192.0.2.1"}
    assert apply_change(state, ChangeBatch(())).generation == state.generation + 1


def test_change_batch_is_all_or_nothing() -> None:
    state = state_with_route()
    batch = ChangeBatch(
        (
            RouteRemoved(LISTENER, "a.test"),
            RouteRemoved(LISTENER, "a.test"),  # the second one does not fit
        )
    )
    with pytest.raises(StateError) as exc:
        apply_change(state, batch)
    assert exc.value.kind == "not_found"
    assert "a.test" in state.listeners[LISTENER].routes  # untouched (immutable)


def test_new_changes_travel_over_the_pipe() -> None:
    route = Route(
        "*.a.test",
        (Address("127.0.0.1", 1), Address("::1", 2)),
        mode=Mode.L7,
        health_check=HealthCheck(HealthCheckKind.HTTP, path="/up"),
        backend_protocol=BackendProtocol.H1,
    )
    batch = ChangeBatch(
        (
            RouteUpdated(LISTENER, route),
            ListenerAdded(Listener(Address("", 443), routes={route.hostname: route})),
            ListenerRemoved(":443"),
        )
    )
    assert pipe.FrameDecoder().feed(pipe.encode(pipe.Delta(batch, 7))) == [pipe.Delta(batch, 7)]
