"""The SQLite store: migrations, seed-once, load, write-through of every change."""

from __future__ import annotations

from pathlib import Path

import apsw
import pytest

from mcproxy.model import (
    Address,
    Change,
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
    StateError,
    apply_change,
    make_state,
)
from mcproxy.supervisor.store import MIGRATIONS, Store, StoreError

LISTENER = "127.0.0.1:8443"


def seed_state() -> ProxyState:
    policy = L7Policy(PolicyKind.BLOCK_USER_AGENT, "BadBot")
    routes = {
        "a.test": Route("a.test", Address("127.0.0.1", 9000)),
        "b.test": Route(
            "b.test",
            Address("backend.internal", 9443),
            mode=Mode.L7,
            tls_cert="/certs/b.pem",
            tls_key="/certs/b.key",
            backend_tls=True,
            send_proxy_protocol=True,
            policies=(policy,),
        ),
    }
    listener = Listener(
        Address("127.0.0.1", 8443), proxy_protocol=True, max_connections=9, routes=routes
    )
    firewall = FirewallRules(
        blocked_ips=frozenset({"192.0.2.1"}),
        blocked_cidrs=frozenset({"198.51.100.0/24"}),
        blocked_countries=frozenset({"KP"}),
    )
    return make_state(0, [listener, Listener(Address("", 443))], firewall)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(str(tmp_path / "db" / "mc-proxy.db"))


def test_new_database_is_migrated_wal_and_empty(store: Store) -> None:
    assert store.schema_version() == len(MIGRATIONS)
    assert store.db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert store.db.execute("PRAGMA foreign_keys").fetchone() == (1,)
    assert store.is_empty()


def test_seed_then_load_round_trips(store: Store) -> None:
    seed = seed_state()
    store.seed(seed)
    assert not store.is_empty()
    loaded = store.load()
    assert loaded.listeners == seed.listeners
    assert loaded.firewall == seed.firewall


def test_reopening_keeps_data_and_does_not_migrate_twice(tmp_path: Path) -> None:
    path = str(tmp_path / "mc.db")
    first = Store.open(path)
    first.seed(seed_state())
    first.close()
    again = Store.open(path)
    rows = again.db.execute("SELECT count(*) FROM schema_migrations").fetchone()
    assert rows == (len(MIGRATIONS),)
    assert again.load().listeners == seed_state().listeners


def test_every_change_is_persisted_like_apply_change(store: Store) -> None:
    store.seed(seed_state())
    state = store.load()
    policy = L7Policy(PolicyKind.REQUIRE_HEADER, "x-api-key")
    changes: list[Change] = [
        RouteAdded(LISTENER, Route("c.test", Address("127.0.0.1", 9002))),
        RouteRemoved(LISTENER, "a.test"),
        FirewallRuleAdded(FirewallRuleKind.IP, "203.0.113.5"),
        FirewallRuleRemoved(FirewallRuleKind.COUNTRY, "KP"),
        ListenerMaxConnectionsSet(LISTENER, 0),
        PolicyAdded(LISTENER, "b.test", policy),
        PolicyRemoved(LISTENER, "b.test", L7Policy(PolicyKind.BLOCK_USER_AGENT, "BadBot")),
    ]
    for change in changes:
        state = apply_change(state, change)
        store.apply(change)
        loaded = store.load()
        assert loaded.listeners == state.listeners, change
        assert loaded.firewall == state.firewall, change


def test_removing_a_route_cascades_to_its_policies(store: Store) -> None:
    store.seed(seed_state())
    store.apply(RouteRemoved(LISTENER, "b.test"))
    assert store.db.execute("SELECT count(*) FROM l7_policies").fetchone() == (0,)


def test_conflicts_raise_state_errors_and_change_nothing(store: Store) -> None:
    store.seed(seed_state())
    before = store.load()
    with pytest.raises(StateError) as exists:
        store.apply(RouteAdded(LISTENER, Route("a.test", Address("127.0.0.1", 1))))
    assert exists.value.kind == "already_exists"
    with pytest.raises(StateError) as missing:
        store.apply(FirewallRuleRemoved(FirewallRuleKind.IP, "203.0.113.99"))
    assert missing.value.kind == "not_found"
    with pytest.raises(StateError):
        store.apply(RouteAdded("127.0.0.1:1", Route("z.test", Address("127.0.0.1", 1))))
    after = store.load()
    assert (after.listeners, after.firewall) == (before.listeners, before.firewall)


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "mc.db")
    Store.open(path).close()
    db = apsw.Connection(path)
    db.execute("INSERT INTO schema_migrations VALUES (99, datetime('now'))")
    db.close()
    with pytest.raises(StoreError, match="newer"):
        Store.open(path)


def test_a_foreign_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "not-a-db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError):
        Store.open(str(path))


def test_a_directory_that_cannot_be_created_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError, match="cannot create the directory"):
        Store.open(str(tmp_path / "file" / "state" / "mc-proxy.db"))
