"""apply_change is the one meaning of a change: supervisor and workers both call it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcproxy import pipe
from mcproxy.model import (
    Address,
    AddressError,
    FirewallRuleAdded,
    FirewallRuleKind,
    FirewallRuleRemoved,
    FirewallRules,
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
    RouteTable,
    StateError,
    apply_change,
    make_state,
    normalize_hostname,
    parse_address,
)

LISTENER = "127.0.0.1:8443"


def state_with_route(mode: Mode = Mode.L4) -> ProxyState:
    route = Route("a.test", Address("127.0.0.1", 9000), mode)
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
    route = Route("b.test", Address("127.0.0.1", 9001))
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
    route = Route("a.test", Address("127.0.0.1", 1))
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
    return Route(name, Address("127.0.0.1", port))


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
