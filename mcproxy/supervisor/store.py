"""SQLite persistence of the routing state (supervisor only; invariant 3).

The database is the source of truth after the first start (invariant 1): the
YAML seeds it only when it is empty. Every admin change is one transaction
(:meth:`Store.apply`) that commits before the supervisor publishes the new
state. Schema changes are forward-only numbered migrations, each applied once
and recorded in ``schema_migrations``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import apsw

from mcproxy.model import (
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
    make_state,
    parse_address,
)

__all__ = ["MIGRATIONS", "Store", "StoreError", "StoreMismatch"]


class StoreError(Exception):
    """The database cannot be opened or is not one of ours."""


class StoreMismatch(StoreError):
    """A change names a row that is missing, or adds one already there.

    What a change means, and whether it fits, is :func:`mcproxy.model.apply_change`'s
    decision, taken before the store sees the change; the store only persists it. So
    this is not a user error but the database and the state disagreeing (a bug): the
    transaction rolls back and the caller reports an internal error.
    """


MIGRATIONS: tuple[str, ...] = (
    # 1: the initial schema
    """
    CREATE TABLE listeners (
        id INTEGER PRIMARY KEY,
        addr TEXT NOT NULL UNIQUE,
        proxy_protocol INTEGER NOT NULL DEFAULT 0 CHECK (proxy_protocol IN (0, 1)),
        max_connections INTEGER NOT NULL DEFAULT 0 CHECK (max_connections >= 0)
    );
    CREATE TABLE routes (
        id INTEGER PRIMARY KEY,
        listener_id INTEGER NOT NULL REFERENCES listeners(id) ON DELETE CASCADE,
        hostname TEXT NOT NULL,
        backend TEXT NOT NULL,
        mode TEXT NOT NULL DEFAULT 'l4' CHECK (mode IN ('l4', 'l7')),
        tls_cert TEXT,
        tls_key TEXT,
        backend_tls INTEGER NOT NULL DEFAULT 0 CHECK (backend_tls IN (0, 1)),
        send_proxy_protocol INTEGER NOT NULL DEFAULT 0 CHECK (send_proxy_protocol IN (0, 1)),
        UNIQUE (listener_id, hostname)
    );
    CREATE TABLE firewall_rules (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('ip', 'cidr', 'country')),
        value TEXT NOT NULL,
        UNIQUE (kind, value)
    );
    CREATE TABLE l7_policies (
        id INTEGER PRIMARY KEY,
        route_id INTEGER NOT NULL REFERENCES routes(id) ON DELETE CASCADE,
        kind TEXT NOT NULL CHECK (kind IN ('block_user_agent', 'require_header')),
        value TEXT NOT NULL,
        UNIQUE (route_id, kind, value)
    );
    """,
    # 2: the later route fields (backends, balance, health check, trust). `backends`
    # is a JSON list of addresses, the route's whole backend list; `backend`
    # keeps the first of them, so the column stays meaningful and NOT NULL.
    # A NULL health_kind means no health check.
    """
    ALTER TABLE routes ADD COLUMN backends TEXT NOT NULL DEFAULT '[]'
        CHECK (json_valid(backends) AND json_type(backends) = 'array');
    UPDATE routes SET backends = json_array(backend);
    ALTER TABLE routes ADD COLUMN balance TEXT NOT NULL DEFAULT 'round_robin'
        CHECK (balance IN ('round_robin', 'least_conn', 'source_ip'));
    ALTER TABLE routes ADD COLUMN health_kind TEXT CHECK (health_kind IN ('tcp', 'http'));
    ALTER TABLE routes ADD COLUMN health_interval REAL NOT NULL DEFAULT 5.0
        CHECK (health_interval > 0);
    ALTER TABLE routes ADD COLUMN health_timeout REAL NOT NULL DEFAULT 2.0
        CHECK (health_timeout > 0);
    ALTER TABLE routes ADD COLUMN health_path TEXT NOT NULL DEFAULT '/healthz';
    ALTER TABLE routes ADD COLUMN health_rise INTEGER NOT NULL DEFAULT 2 CHECK (health_rise >= 1);
    ALTER TABLE routes ADD COLUMN health_fall INTEGER NOT NULL DEFAULT 3 CHECK (health_fall >= 1);
    ALTER TABLE routes ADD COLUMN backend_protocol TEXT NOT NULL DEFAULT 'h2'
        CHECK (backend_protocol IN ('h2', 'h1'));
    ALTER TABLE routes ADD COLUMN backend_ca TEXT;
    ALTER TABLE routes ADD COLUMN backend_server_name TEXT;
    ALTER TABLE routes ADD COLUMN backend_client_cert TEXT;
    ALTER TABLE routes ADD COLUMN backend_client_key TEXT;
    ALTER TABLE routes ADD COLUMN client_ca TEXT;
    """,
)

_ROUTE_COLUMNS = (
    "hostname, backend, mode, tls_cert, tls_key, backend_tls, send_proxy_protocol,"
    " backends, balance, health_kind, health_interval, health_timeout, health_path,"
    " health_rise, health_fall, backend_protocol, backend_ca, backend_server_name,"
    " backend_client_cert, backend_client_key, client_ca"
)
_ROUTE_PLACEHOLDERS = ", ".join("?" * (_ROUTE_COLUMNS.count(",") + 1))


def _route_row(r: Route) -> tuple[object, ...]:
    """``r`` as the values of :data:`_ROUTE_COLUMNS`, in order."""
    hc = r.health_check or HealthCheck(HealthCheckKind.TCP)
    return (
        r.hostname,
        str(r.backends[0]),
        r.mode.value,
        r.tls_cert,
        r.tls_key,
        int(r.backend_tls),
        int(r.send_proxy_protocol),
        json.dumps([str(b) for b in r.backends]),
        r.balance.value,
        None if r.health_check is None else hc.kind.value,
        hc.interval,
        hc.timeout,
        hc.path,
        hc.rise,
        hc.fall,
        r.backend_protocol.value,
        r.backend_ca,
        r.backend_server_name,
        r.backend_client_cert,
        r.backend_client_key,
        r.client_ca,
    )


def _route_from_row(row: tuple[Any, ...], policies: tuple[L7Policy, ...]) -> Route:
    (hostname, backend, mode, cert, key, btls, spp, backends, balance, hkind, hint, htimeout,
     hpath, hrise, hfall, protocol, bca, bsni, bcert, bkey, cca) = row  # fmt: skip
    addresses = json.loads(backends) or [backend]
    return Route(
        hostname=str(hostname),
        backends=tuple(parse_address(str(a)) for a in addresses),
        mode=Mode(mode),
        tls_cert=_text(cert),
        tls_key=_text(key),
        backend_tls=bool(btls),
        send_proxy_protocol=bool(spp),
        policies=policies,
        balance=Balance(balance),
        health_check=None
        if hkind is None
        else HealthCheck(
            kind=HealthCheckKind(hkind),
            interval=float(hint),
            timeout=float(htimeout),
            path=str(hpath),
            rise=int(hrise),
            fall=int(hfall),
        ),
        backend_protocol=BackendProtocol(protocol),
        backend_ca=_text(bca),
        backend_server_name=_text(bsni),
        backend_client_cert=_text(bcert),
        backend_client_key=_text(bkey),
        client_ca=_text(cca),
    )


def _text(value: object) -> str | None:
    return None if value is None else str(value)


@dataclass
class Store:
    """One apsw connection, used only from the supervisor's loop thread."""

    path: str
    db: apsw.Connection

    @classmethod
    def open(cls, path: str) -> Store:
        directory = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError as exc:  # e.g. under systemd's ProtectSystem=strict
            raise StoreError(
                f"{path}: cannot create the directory {directory}: {exc.strerror or exc}"
            ) from exc
        try:
            db = apsw.Connection(path)
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA foreign_keys = ON")
            db.execute("PRAGMA synchronous = FULL")
            db.set_busy_timeout(5000)
        except apsw.Error as exc:
            raise StoreError(f"{path}: cannot open the database: {exc}") from exc
        store = cls(path, db)
        store.migrate()
        return store

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def _transaction(self) -> Iterator[apsw.Connection]:
        with self.db:
            yield self.db

    def schema_version(self) -> int:
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations"
            " (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        row = self.db.execute("SELECT max(version) FROM schema_migrations").fetchone()
        return int(row[0] or 0) if row else 0

    def migrate(self) -> None:
        try:
            current = self.schema_version()
        except apsw.Error as exc:
            raise StoreError(f"{self.path}: not an mc-proxy database: {exc}") from exc
        if current > len(MIGRATIONS):
            raise StoreError(
                f"{self.path}: schema version {current} is newer than this mc-proxy"
                f" ({len(MIGRATIONS)}); refusing to downgrade"
            )
        for version, sql in enumerate(MIGRATIONS[current:], start=current + 1):
            with self._transaction() as db:
                db.execute(sql)
                db.execute("INSERT INTO schema_migrations VALUES (?, datetime('now'))", (version,))

    def is_empty(self) -> bool:
        for table in ("listeners", "firewall_rules"):
            if self.db.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone():
                return False
        return True

    def seed(self, state: ProxyState) -> None:
        """Write a whole state into an empty database, in one transaction."""
        with self._transaction():
            for listener in state.listeners.values():
                self._insert_listener(listener)
            for kind in FirewallRuleKind:
                for value in sorted(state.firewall.values(kind)):
                    self._apply(FirewallRuleAdded(kind, value))

    def load(self) -> ProxyState:
        db = self.db
        policies: dict[int, list[L7Policy]] = {}
        for route_id, kind, value in db.execute(
            "SELECT route_id, kind, value FROM l7_policies ORDER BY id"
        ):
            policies.setdefault(route_id, []).append(L7Policy(PolicyKind(kind), value))
        routes: dict[int, dict[str, Route]] = {}
        for route_id, listener_id, *row in db.execute(
            f"SELECT id, listener_id, {_ROUTE_COLUMNS} FROM routes ORDER BY id"
        ):
            route = _route_from_row(tuple(row), tuple(policies.get(route_id, ())))
            routes.setdefault(listener_id, {})[route.hostname] = route
        listeners = [
            Listener(
                addr=parse_address(addr),
                proxy_protocol=bool(pp),
                max_connections=int(limit),
                routes=routes.get(listener_id, {}),
            )
            for listener_id, addr, pp, limit in db.execute(
                "SELECT id, addr, proxy_protocol, max_connections FROM listeners ORDER BY id"
            )
        ]
        rules: dict[FirewallRuleKind, set[str]] = {kind: set() for kind in FirewallRuleKind}
        for kind, value in db.execute("SELECT kind, value FROM firewall_rules"):
            rules[FirewallRuleKind(kind)].add(value)
        firewall = FirewallRules(
            blocked_ips=frozenset(rules[FirewallRuleKind.IP]),
            blocked_cidrs=frozenset(rules[FirewallRuleKind.CIDR]),
            blocked_countries=frozenset(rules[FirewallRuleKind.COUNTRY]),
        )
        return make_state(1, listeners, firewall)

    def apply(self, change: Change) -> None:
        """Persist one change, already accepted by ``apply_change``, in one transaction.

        A :class:`~mcproxy.model.ChangeBatch` is one transaction too: all of it or none.
        Raises :class:`StoreMismatch` (and changes nothing) if the rows it names are
        not as the state said.
        """
        with self._transaction():
            self._apply(change)

    # --- one statement group per change ------------------------------------------

    def _insert_listener(self, listener: Listener) -> None:
        self.db.execute(
            "INSERT INTO listeners (addr, proxy_protocol, max_connections) VALUES (?, ?, ?)",
            (str(listener.addr), int(listener.proxy_protocol), listener.max_connections),
        )
        for route in listener.routes.values():
            self._apply(RouteAdded(str(listener.addr), route))

    def _listener_id(self, addr: str) -> int:
        row = self.db.execute("SELECT id FROM listeners WHERE addr = ?", (addr,)).fetchone()
        if row is None:
            raise StoreMismatch(f"no listener {addr} in the database")
        return int(row[0])

    def _route_id(self, addr: str, hostname: str) -> int:
        row = self.db.execute(
            "SELECT id FROM routes WHERE listener_id = ? AND hostname = ?",
            (self._listener_id(addr), hostname),
        ).fetchone()
        if row is None:
            raise StoreMismatch(f"no route {hostname} on {addr} in the database")
        return int(row[0])

    def _apply(self, change: Change) -> None:
        db = self.db
        try:
            match change:
                case RouteAdded(listener=addr, route=r):
                    self._insert_route(self._listener_id(addr), r)
                case RouteRemoved(listener=addr, hostname=hostname):
                    db.execute("DELETE FROM routes WHERE id = ?", (self._route_id(addr, hostname),))
                case RouteUpdated(listener=addr, route=r):
                    # Whole replacement: the policies go with the old row (cascade).
                    db.execute(
                        "DELETE FROM routes WHERE id = ?", (self._route_id(addr, r.hostname),)
                    )
                    self._insert_route(self._listener_id(addr), r)
                case ListenerAdded(listener=listener):
                    self._insert_listener(listener)
                case ListenerRemoved(addr=addr):
                    # Routes and their policies go with it (ON DELETE CASCADE).
                    db.execute("DELETE FROM listeners WHERE id = ?", (self._listener_id(addr),))
                case ChangeBatch(changes=changes):
                    for item in changes:  # inside the caller's one transaction
                        self._apply(item)
                case FirewallRuleAdded(kind=kind, value=value):
                    db.execute(
                        "INSERT INTO firewall_rules (kind, value) VALUES (?, ?)",
                        (kind.value, value),
                    )
                case FirewallRuleRemoved(kind=kind, value=value):
                    db.execute(
                        "DELETE FROM firewall_rules WHERE kind = ? AND value = ?",
                        (kind.value, value),
                    )
                    if db.changes() == 0:
                        raise StoreMismatch(f"no firewall rule {kind} {value} in the database")
                case ListenerMaxConnectionsSet(listener=addr, max_connections=limit):
                    db.execute(
                        "UPDATE listeners SET max_connections = ? WHERE id = ?",
                        (limit, self._listener_id(addr)),
                    )
                case PolicyAdded(listener=addr, hostname=hostname, policy=policy):
                    self._insert_policy(self._route_id(addr, hostname), policy)
                case PolicyRemoved(listener=addr, hostname=hostname, policy=policy):
                    db.execute(
                        "DELETE FROM l7_policies WHERE route_id = ? AND kind = ? AND value = ?",
                        (self._route_id(addr, hostname), policy.kind.value, policy.value),
                    )
                    if db.changes() == 0:
                        raise StoreMismatch(
                            f"no policy {policy.kind} {policy.value} in the database"
                        )
        except apsw.ConstraintError as exc:
            raise StoreMismatch(f"{change}: already in the database ({exc})") from exc

    def _insert_route(self, listener_id: int, r: Route) -> None:
        self.db.execute(
            f"INSERT INTO routes (listener_id, {_ROUTE_COLUMNS}) VALUES (?, {_ROUTE_PLACEHOLDERS})",
            (listener_id, *_route_row(r)),
        )
        route_id = self.db.last_insert_rowid()
        for policy in r.policies:
            self._insert_policy(route_id, policy)

    def _insert_policy(self, route_id: int, policy: L7Policy) -> None:
        self.db.execute(
            "INSERT INTO l7_policies (route_id, kind, value) VALUES (?, ?, ?)",
            (route_id, policy.kind.value, policy.value),
        )
