"""The SQLite store: migrations, seed-once, load, write-through of every change."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import apsw
import pytest

from mcproxy.model import (
    Address,
    BackendProtocol,
    Balance,
    Change,
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
    RouteUpdated,
    apply_change,
    make_state,
)
from mcproxy.supervisor.store import MIGRATIONS, Store, StoreError, StoreMismatch

LISTENER = "127.0.0.1:8443"


def seed_state() -> ProxyState:
    policy = L7Policy(PolicyKind.BLOCK_USER_AGENT, "BadBot")
    routes = {
        "a.test": Route("a.test", (Address("127.0.0.1", 9000),)),
        "b.test": Route(
            "b.test",
            (Address("backend.internal", 9443),),
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
        RouteAdded(LISTENER, Route("c.test", (Address("127.0.0.1", 9002),))),
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


def test_a_change_the_database_does_not_match_raises_and_changes_nothing(store: Store) -> None:
    """apply_change decides whether a change fits; the store only refuses to write a
    change its rows contradict (a state/database mismatch), and rolls back."""
    store.seed(seed_state())
    before = store.load()
    with pytest.raises(StoreMismatch, match="already in the database"):
        store.apply(RouteAdded(LISTENER, Route("a.test", (Address("127.0.0.1", 1),))))
    with pytest.raises(StoreMismatch, match="no firewall rule"):
        store.apply(FirewallRuleRemoved(FirewallRuleKind.IP, "203.0.113.99"))
    with pytest.raises(StoreMismatch, match="no listener"):
        store.apply(RouteAdded("127.0.0.1:1", Route("z.test", (Address("127.0.0.1", 1),))))
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


# --- second batch (migration 2) ---------------------------------------------------------

FULL = Route(
    "*.full.test",
    (Address("10.0.0.1", 443), Address("backend.internal", 8443), Address("::1", 9)),
    mode=Mode.L7,
    tls_cert="/certs/f.pem",
    tls_key="/certs/f.key",
    backend_tls=True,
    policies=(L7Policy(PolicyKind.REQUIRE_HEADER, "x-key"),),
    balance=Balance.SOURCE_IP,
    health_check=HealthCheck(
        HealthCheckKind.HTTP, interval=1.5, timeout=0.25, path="/up?x=1", rise=1, fall=7
    ),
    backend_protocol=BackendProtocol.H1,
    backend_ca="/certs/ca.pem",
    backend_server_name="api.internal",
    backend_client_cert="/certs/client.pem",
    backend_client_key="/certs/client.key",
    client_ca="/certs/clients-ca.pem",
)


def test_every_new_route_field_round_trips(store: Store) -> None:
    plain = Route("*", (Address("127.0.0.1", 1),), health_check=HealthCheck(HealthCheckKind.TCP))
    routes = {FULL.hostname: FULL, plain.hostname: plain}
    state = make_state(0, [Listener(Address("", 443), routes=routes)], FirewallRules())
    store.seed(state)
    assert store.load().listeners == state.listeners
    row = store.db.execute(
        "SELECT backend, backends FROM routes WHERE hostname = ?", (FULL.hostname,)
    ).fetchone()
    assert row == ("10.0.0.1:443", '["10.0.0.1:443", "backend.internal:8443", "[::1]:9"]')


def test_new_changes_are_persisted_like_apply_change(store: Store) -> None:
    store.seed(seed_state())
    state = store.load()
    other = Listener(
        Address("127.0.0.1", 9443),
        proxy_protocol=True,
        max_connections=3,
        routes={"x.test": Route("x.test", (Address("127.0.0.1", 7),))},
    )
    changes: list[Change] = [
        RouteUpdated(LISTENER, Route("b.test", (Address("127.0.0.1", 9100),))),
        RouteUpdated(LISTENER, replace(FULL, hostname="a.test")),
        ListenerAdded(other),
        ListenerRemoved(":443"),
        ChangeBatch(
            (
                RouteAdded("127.0.0.1:9443", FULL),
                RouteRemoved("127.0.0.1:9443", "x.test"),
                FirewallRuleAdded(FirewallRuleKind.CIDR, "10.0.0.0/8"),
            )
        ),
        ListenerRemoved(LISTENER),
    ]
    for change in changes:
        state = apply_change(state, change)
        store.apply(change)
        loaded = store.load()
        assert loaded.listeners == state.listeners, change
        assert loaded.firewall == state.firewall, change
    # The removed listener's routes and policies went with it.
    assert store.db.execute("SELECT count(*) FROM routes").fetchone() == (1,)
    assert store.db.execute("SELECT count(*) FROM l7_policies").fetchone() == (1,)


def test_route_updated_drops_the_old_policies(store: Store) -> None:
    store.seed(seed_state())
    store.apply(RouteUpdated(LISTENER, Route("b.test", (Address("127.0.0.1", 1),))))
    assert store.db.execute("SELECT count(*) FROM l7_policies").fetchone() == (0,)


def test_new_changes_that_do_not_fit_raise_and_change_nothing(store: Store) -> None:
    store.seed(seed_state())
    before = store.load()
    bad: list[tuple[Change, str]] = [
        (RouteUpdated(LISTENER, Route("zz.test", (Address("127.0.0.1", 1),))), "no route"),
        (ListenerAdded(Listener(Address("", 443))), "already in the database"),
        (ListenerRemoved("127.0.0.1:1"), "no listener"),
        (
            ChangeBatch(
                (
                    RouteRemoved(LISTENER, "a.test"),
                    FirewallRuleAdded(FirewallRuleKind.IP, "203.0.113.7"),
                    ListenerRemoved(":443"),
                    RouteRemoved(LISTENER, "a.test"),  # fails last: all of it rolls back
                )
            ),
            "no route",
        ),
    ]
    for change, message in bad:
        with pytest.raises(StoreMismatch, match=message):
            store.apply(change)
    after = store.load()
    assert (after.listeners, after.firewall) == (before.listeners, before.firewall)


def test_a_first_batch_database_is_upgraded(tmp_path: Path) -> None:
    path = str(tmp_path / "old.db")
    db = apsw.Connection(path)
    db.execute(
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
    )
    db.execute(MIGRATIONS[0])
    db.execute("INSERT INTO schema_migrations VALUES (1, datetime('now'))")
    db.execute("INSERT INTO listeners (addr, max_connections) VALUES ('127.0.0.1:8443', 4)")
    db.execute(
        "INSERT INTO routes (listener_id, hostname, backend, mode, tls_cert, tls_key,"
        " backend_tls) VALUES (1, 'web.test', '[::1]:9443', 'l7', '/c.pem', '/c.key', 1)"
    )
    db.execute("INSERT INTO routes (listener_id, hostname, backend) VALUES (1, 'a.test', 'a:1')")
    db.execute(
        "INSERT INTO l7_policies (route_id, kind, value) VALUES (1, 'require_header', 'x-k')"
    )
    db.close()
    store = Store.open(path)
    assert store.schema_version() == len(MIGRATIONS)
    routes = store.load().listeners[LISTENER].routes
    assert routes["web.test"] == Route(
        "web.test",
        (Address("::1", 9443),),
        mode=Mode.L7,
        tls_cert="/c.pem",
        tls_key="/c.key",
        backend_tls=True,
        policies=(L7Policy(PolicyKind.REQUIRE_HEADER, "x-k"),),
    )
    assert routes["a.test"] == Route("a.test", (Address("a", 1),))
    # And the upgraded database takes the new fields.
    store.apply(RouteUpdated(LISTENER, replace(FULL, hostname="a.test")))
    assert store.load().listeners[LISTENER].routes["a.test"].backends == FULL.backends


def test_the_database_refuses_values_the_model_would_not_write(store: Store) -> None:
    store.seed(seed_state())
    for column, value in (("balance", "random"), ("backend_protocol", "h3"), ("backends", "x")):
        with pytest.raises(apsw.ConstraintError):
            store.db.execute(f"UPDATE routes SET {column} = ?", (value,))
