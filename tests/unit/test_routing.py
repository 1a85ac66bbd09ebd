"""Route lookup by SNI: exact beats ``*.parent`` beats the catch-all ``*``."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcproxy.model import (
    CATCH_ALL,
    Address,
    Change,
    ChangeBatch,
    FirewallRules,
    Listener,
    ListenerMaxConnectionsSet,
    ProxyState,
    Route,
    RouteAdded,
    RouteRemoved,
    RouteTable,
    RouteUpdated,
    StateError,
    apply_change,
    lookup_route,
    make_state,
    parse_address,
    route_matches,
)


def _route(name: str, port: int = 9) -> Route:
    return Route(name, (Address("127.0.0.1", port),))


def _table(*names: str) -> RouteTable:
    return RouteTable({name: _route(name) for name in names})


def _hostname(route: Route | None) -> str | None:
    return route.hostname if route is not None else None


FULL = _table("a.example.com", "*.example.com", "example.com", "*")


@pytest.mark.parametrize(
    ("sni", "expected"),
    [
        ("a.example.com", "a.example.com"),  # exact beats the wildcard
        ("b.example.com", "*.example.com"),
        ("example.com", "example.com"),
        ("a.b.example.com", "*"),  # a wildcard is one label only
        ("other.test", "*"),
        ("localhost", "*"),
        (None, "*"),  # no SNI: the catch-all
        ("", "*"),
        ("B.Example.COM", "*.example.com"),  # case-insensitive
        ("A.EXAMPLE.COM.", "a.example.com"),  # trailing dot ignored
        ("b.example.com.", "*.example.com"),
        ("not a hostname", "*"),
    ],
)
def test_precedence(sni: str | None, expected: str) -> None:
    assert _hostname(FULL.lookup(sni)) == expected


@pytest.mark.parametrize(
    ("sni", "expected"),
    [
        ("a.example.com", "a.example.com"),
        ("b.example.com", "*.example.com"),
        ("example.com", None),  # the wildcard does not serve its parent
        ("a.b.example.com", None),
        ("other.test", None),
        (None, None),  # no SNI and no catch-all: nothing (reset)
        (".example.com", None),  # an empty first label is not one label
    ],
)
def test_without_a_catch_all_nothing_matches(sni: str | None, expected: str | None) -> None:
    assert _hostname(_table("a.example.com", "*.example.com").lookup(sni)) == expected


def test_catch_all_alone_serves_everything() -> None:
    table = _table(CATCH_ALL)
    for sni in ("x.test", "a.b.c", None, "X"):
        assert _hostname(table.lookup(sni)) == "*"


def test_changes_in_the_overlay_are_seen() -> None:
    table = _table("*.example.com")
    assert _hostname(table.lookup("a.example.com")) == "*.example.com"
    with_exact = table.with_route(_route("a.example.com"))
    assert _hostname(with_exact.lookup("a.example.com")) == "a.example.com"
    assert _hostname(table.lookup("a.example.com")) == "*.example.com"  # old version intact
    removed = with_exact.without("*.example.com")
    assert _hostname(removed.lookup("b.example.com")) is None
    assert _hostname(removed.with_route(_route("*")).lookup("b.example.com")) == "*"


def test_lookup_route_takes_a_plain_dict() -> None:
    routes = {"*.example.com": _route("*.example.com")}
    assert _hostname(lookup_route(routes, "X.example.com")) == "*.example.com"
    assert lookup_route({}, None) is None
    assert _hostname(lookup_route(FULL, None)) == "*"


@pytest.mark.parametrize(
    ("hostname", "name", "expected"),
    [
        ("a.example.com", "A.example.com.", True),
        ("a.example.com", "b.example.com", False),
        ("*.example.com", "b.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "a.b.example.com", False),
        ("*.example.com", None, False),
        ("*", "anything", True),
        ("*", None, True),
    ],
)
def test_route_matches(hostname: str, name: str | None, expected: bool) -> None:
    assert route_matches(hostname, name) is expected


_LABELS = st.sampled_from(["a", "b", "example", "com", "A", "Com"])
_NAMES = st.lists(_LABELS, min_size=1, max_size=4).map(".".join)
_PATTERNS = st.one_of(
    _NAMES.map(str.lower),
    _NAMES.map(lambda n: "*." + n.lower()),
    st.just(CATCH_ALL),
)


def _reference(routes: dict[str, Route], name: str | None) -> Route | None:
    """Brute force over every route, by precedence: what lookup() must agree with."""
    for rank in ("exact", "wildcard", "catch_all"):
        for hostname, route in routes.items():
            kind = (
                "catch_all"
                if hostname == CATCH_ALL
                else "wildcard"
                if hostname.startswith("*.")
                else "exact"
            )
            if kind == rank and route_matches(hostname, name):
                return route
    return None


@given(
    st.lists(st.tuples(st.booleans(), _PATTERNS), max_size=80),
    st.lists(st.one_of(st.none(), _NAMES, _NAMES.map(lambda n: n + ".")), max_size=20),
)
def test_lookup_agrees_with_brute_force(
    ops: list[tuple[bool, str]], names: list[str | None]
) -> None:
    model: dict[str, Route] = {}
    table = RouteTable()
    for add, hostname in ops:  # through the overlay and its compactions
        if add:
            model[hostname] = _route(hostname)
            table = table.with_route(model[hostname])
        elif hostname in model:
            del model[hostname]
            table = table.without(hostname)
        for name in names:
            assert table.lookup(name) == _reference(model, name)


# --- a batch applies as its changes one by one would ----------------------------------------

_L = ("127.0.0.1:1", "127.0.0.1:2")
_CHANGE = st.one_of(
    st.builds(
        lambda lst, h, port: RouteAdded(lst, _route(f"h{h}.test", port)),
        st.sampled_from(_L),
        st.integers(0, 12),
        st.integers(1, 3),
    ),
    st.builds(
        lambda lst, h, port: RouteUpdated(lst, _route(f"h{h}.test", port)),
        st.sampled_from(_L),
        st.integers(0, 12),
        st.integers(1, 3),
    ),
    st.builds(
        lambda lst, h: RouteRemoved(lst, f"h{h}.test"), st.sampled_from(_L), st.integers(0, 12)
    ),
    st.builds(ListenerMaxConnectionsSet, st.sampled_from(_L), st.integers(0, 3)),
    st.builds(lambda h: RouteAdded("127.0.0.1:9", _route(f"h{h}.test")), st.integers(0, 2)),
)


def _sequential(state: ProxyState, changes: list[Change]) -> ProxyState:
    for change in changes:
        state = apply_change(state, change)
    return state


@given(st.integers(0, 40), st.lists(_CHANGE, max_size=120))
def test_batch_equals_sequential_application(initial: int, changes: list[Change]) -> None:
    listeners = [
        Listener(
            parse_address(addr),
            routes={f"h{i}.test": _route(f"h{i}.test") for i in range(initial) if i % 2 == k},
        )
        for k, addr in enumerate(_L)
    ]
    state = make_state(1, listeners, FirewallRules())
    try:
        expected: ProxyState | StateError = _sequential(state, changes)
    except StateError as exc:
        expected = exc
    try:
        got: ProxyState | StateError = apply_change(state, ChangeBatch(tuple(changes)))
    except StateError as exc:
        got = exc
    if isinstance(expected, StateError):
        assert isinstance(got, StateError)
        assert (got.kind, str(got)) == (expected.kind, str(expected))
        return
    assert isinstance(got, ProxyState)
    assert got.generation == state.generation + 1
    for addr in _L:
        a, b = expected.listener(addr), got.listener(addr)
        assert a.max_connections == b.max_connections
        assert len(a.routes) == len(b.routes)
        assert dict(a.routes.items()) == dict(b.routes.items())
        for name in ("h1.test", "x.test", None):
            assert lookup_route(a.routes, name) == lookup_route(b.routes, name)


def test_a_large_batch_folds_into_a_new_base_once() -> None:
    addr = "127.0.0.1:1"
    routes = {f"h{i}.test": _route(f"h{i}.test") for i in range(2000)}
    state = make_state(1, [Listener(parse_address(addr), routes=routes)], FirewallRules())
    changes: list[Change] = [RouteUpdated(addr, _route(f"h{i}.test", 2)) for i in range(0, 600, 3)]
    changes += [RouteRemoved(addr, f"h{i}.test") for i in range(1, 600, 3)]
    changes += [RouteAdded(addr, _route(f"n{i}.test")) for i in range(300)]
    got = apply_change(state, ChangeBatch(tuple(changes)))
    expected = _sequential(state, changes)
    table = got.listener(addr).routes
    assert isinstance(table, RouteTable) and table._overlay == {}  # folded
    assert dict(table.items()) == dict(expected.listener(addr).routes.items())
    assert len(table) == 2000 - 200 + 300
    assert dict(state.listener(addr).routes.items()) == routes  # the old state is untouched
