"""The routing state as a file: export it, and plan an apply of one.

``export_yaml`` writes a :class:`~mcproxy.model.ProxyState` in the config
file's schema (listeners with their routes and policies, firewall rules; no
process settings), so the file is what ``mc-proxy check`` accepts and what
seeds a new node with the same behaviour. ``plan`` compares the current state
with a desired one (the same file, read by :func:`mcproxy.config.parse_config`)
and returns the changes that make the first equal to the second, as one
:class:`~mcproxy.model.ChangeBatch`, and a readable list of what they do.
Nothing here does I/O: the admin API reads the file and submits the batch
(ARCHITECTURE.md, "Export and apply").
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from mcproxy.model import (
    Address,
    Change,
    ChangeBatch,
    FirewallRuleAdded,
    FirewallRuleKind,
    FirewallRuleRemoved,
    Listener,
    ListenerAdded,
    ListenerMaxConnectionsSet,
    ListenerRemoved,
    ProxyState,
    Route,
    RouteAdded,
    RouteRemoved,
    RouteUpdated,
)

__all__ = [
    "PROCESS_SETTINGS",
    "Plan",
    "PlannedChange",
    "export_yaml",
    "plan",
    "process_settings_in",
    "route_document",
    "state_document",
]

PROCESS_SETTINGS = ("workers", "database", "admin", "metrics", "proxy")
"""Top-level keys that are process settings: read from the config at start, never state."""
_FIREWALL_SETTINGS = ("geoip_db", "rate_limit", "rate_window")
_FIREWALL_LISTS = (
    ("blocked_ips", FirewallRuleKind.IP),
    ("blocked_cidrs", FirewallRuleKind.CIDR),
    ("blocked_countries", FirewallRuleKind.COUNTRY),
)
_YAML_NAMES = {"policies": "l7_policies"}
_DUMPER: type[yaml.SafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
"""libyaml's emitter when PyYAML has it (the same text, about twice as fast)."""
_ALWAYS = ("mode",)
"""Route fields written even at their default, so a reader sees the mode of each route."""


# --- export ------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{seconds * 1000:g}ms"


def _plain(name: str, value: object) -> object:
    """A model value as the config file writes it."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Address):
        return str(value)
    if isinstance(value, bool | int | str | None):
        return value
    if isinstance(value, float):
        return _duration(value)
    if name == "policies":
        return [{"type": p.kind.value, "value": p.value} for p in value]  # type: ignore[attr-defined]
    if isinstance(value, tuple):
        return [_plain(name, v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _non_default(value)
    raise TypeError(f"cannot export {name}={value!r}")  # pragma: no cover


def _non_default(obj: Any) -> dict[str, object]:
    """The fields of a dataclass that differ from their defaults (and those without one)."""
    doc: dict[str, object] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.default is not dataclasses.MISSING and value == f.default and f.name not in _ALWAYS:
            continue
        doc[_YAML_NAMES.get(f.name, f.name)] = _plain(f.name, value)
    return doc


def route_document(route: Route) -> dict[str, object]:
    """A route as one item of a listener's ``routes:`` (defaults left out)."""
    doc = _non_default(route)
    backends = doc.pop("backends", None)
    if isinstance(backends, list):  # one backend reads as the first batch wrote it
        rest = {k: v for k, v in doc.items() if k != "hostname"}
        head = {"backend": backends[0]} if len(backends) == 1 else {"backends": backends}
        return {"hostname": doc["hostname"], **head, **rest}
    return doc


def _listener_document(listener: Listener) -> dict[str, object]:
    doc: dict[str, object] = {"addr": str(listener.addr)}
    if listener.proxy_protocol:
        doc["proxy_protocol"] = True
    if listener.max_connections:
        doc["max_connections"] = listener.max_connections
    doc["routes"] = [route_document(listener.routes[h]) for h in sorted(listener.routes)]
    return doc


def state_document(state: ProxyState, geoip_db: str | None = None) -> dict[str, object]:
    """The state in the config file's schema, as plain data.

    ``geoip_db`` (this process's setting) is written only when there are
    country rules, because the config loader requires it beside them.
    """
    firewall: dict[str, object] = {}
    if state.firewall.blocked_countries and geoip_db:
        firewall["geoip_db"] = geoip_db
    for key, kind in _FIREWALL_LISTS:
        firewall[key] = sorted(state.firewall.values(kind))
    return {
        "firewall": firewall,
        "listeners": [_listener_document(lst) for lst in state.listeners.values()],
    }


def export_yaml(state: ProxyState, geoip_db: str | None = None) -> str:
    """:func:`state_document` as YAML, with a header saying what it is and is not."""
    header = (
        f"# mc-proxy state, generation {state.generation}: listeners, routes, policies and\n"
        "# firewall rules in the config file's schema. No process settings (workers,\n"
        "# database, admin, metrics, proxy: their defaults apply); add them to serve from\n"
        "# this file. `mcproxyctl apply -f` makes a running node's state equal to it.\n"
    )
    body = yaml.dump(
        state_document(state, geoip_db),
        Dumper=_DUMPER,
        sort_keys=False,
        default_flow_style=False,
        width=100,
    )
    return header + body


def process_settings_in(data: object) -> list[str]:
    """The process settings a parsed file holds (``apply`` ignores them, with a note)."""
    if not isinstance(data, dict):
        return []
    found = [key for key in PROCESS_SETTINGS if key in data]
    firewall = data.get("firewall")
    if isinstance(firewall, dict):
        found += [f"firewall.{key}" for key in _FIREWALL_SETTINGS if key in firewall]
    return found


# --- plan --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlannedChange:
    """One line of an apply's diff (the ``StateChange`` message of the admin API)."""

    action: str
    """``add``, ``update`` or ``remove``."""
    kind: str
    """``listener``, ``route`` or ``firewall``."""
    listener: str
    name: str
    """A route's hostname, a listener's address, ``ip 192.0.2.1`` for a firewall rule."""
    detail: str


@dataclass(frozen=True, slots=True)
class Plan:
    changes: tuple[Change, ...]
    entries: tuple[PlannedChange, ...]
    refused: tuple[str, ...] = ()
    """Differences this process cannot apply (FAILED_PRECONDITION), each naming the field."""

    @property
    def batch(self) -> ChangeBatch:
        return ChangeBatch(self.changes)


def _summary(route: Route) -> str:
    doc = route_document(route)
    backend = doc.get("backend") or ", ".join(doc.get("backends", []))  # type: ignore[arg-type]
    return f"{backend} ({route.mode.value})"


def _route_diff(old: Route, new: Route) -> str:
    before, after = route_document(old), route_document(new)
    parts = []
    for key in dict.fromkeys([*before, *after]):
        if before.get(key) != after.get(key):
            parts.append(f"{key}: {_text(before.get(key))} -> {_text(after.get(key))}")
    return "; ".join(parts)


def _text(value: object) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, list | dict):
        return yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip()
    return str(value)


def plan(current: ProxyState, desired: ProxyState, *, listeners_at_runtime: bool = False) -> Plan:
    """The changes that make ``current`` equal to ``desired`` (generations aside).

    Order inside the batch: firewall rules, listeners removed, then per
    listener in the file's order: the listener added, or its limit and its
    routes' removals, updates and additions. A route present in both but
    different is one ``RouteUpdated``, so no connection sees it missing.
    Without ``listeners_at_runtime`` a listener to add or remove is refused,
    as is a change of an existing listener's ``proxy_protocol`` (a listener
    is rebound to change it).
    """
    changes: list[Change] = []
    entries: list[PlannedChange] = []
    refused: list[str] = []

    for key, kind in _FIREWALL_LISTS:
        blocked, wanted = current.firewall.values(kind), desired.firewall.values(kind)
        for value in sorted(blocked - wanted):
            changes.append(FirewallRuleRemoved(kind, value))
            entries.append(PlannedChange("remove", "firewall", "", f"{kind.value} {value}", key))
        for value in sorted(wanted - blocked):
            changes.append(FirewallRuleAdded(kind, value))
            entries.append(PlannedChange("add", "firewall", "", f"{kind.value} {value}", key))

    for addr, listener in current.listeners.items():
        if addr in desired.listeners:
            continue
        routes = len(listener.routes)
        entries.append(PlannedChange("remove", "listener", addr, addr, f"and its {routes} routes"))
        if listeners_at_runtime:
            changes.append(ListenerRemoved(addr))
        else:
            refused.append(
                f"listeners: {addr} is not in the file; removing a listener at runtime is not"
                " supported by this build (remove it with `mcproxyctl listeners remove`)"
            )

    for index, (addr, want) in enumerate(desired.listeners.items()):
        path = f"listeners[{index}]"
        have = current.listeners.get(addr)
        if have is None:
            detail = f"{len(want.routes)} routes" + (
                ", proxy_protocol" if want.proxy_protocol else ""
            )
            entries.append(PlannedChange("add", "listener", addr, addr, detail))
            if listeners_at_runtime:
                changes.append(ListenerAdded(want))
            else:
                refused.append(
                    f"{path}.addr: listener {addr} does not exist; adding a listener at runtime"
                    " is not supported by this build (add it with `mcproxyctl listeners add`)"
                )
            continue
        if have.proxy_protocol != want.proxy_protocol:
            refused.append(
                f"{path}.proxy_protocol: cannot change on a running listener"
                f" ({have.proxy_protocol} -> {want.proxy_protocol}); remove and add {addr}"
            )
        if have.max_connections != want.max_connections:
            changes.append(ListenerMaxConnectionsSet(addr, want.max_connections))
            entries.append(
                PlannedChange(
                    "update",
                    "listener",
                    addr,
                    addr,
                    f"max_connections: {have.max_connections} -> {want.max_connections}",
                )
            )
        _plan_routes(addr, have.routes, want.routes, changes, entries)
    return Plan(tuple(changes), tuple(entries), tuple(refused))


def _plan_routes(
    addr: str,
    have: Mapping[str, Route],
    want: Mapping[str, Route],
    changes: list[Change],
    entries: list[PlannedChange],
) -> None:
    for hostname in sorted(h for h in have if h not in want):
        changes.append(RouteRemoved(addr, hostname))
        entries.append(PlannedChange("remove", "route", addr, hostname, _summary(have[hostname])))
    for hostname in sorted(want):
        route = want[hostname]
        old = have.get(hostname)
        if old is None:
            changes.append(RouteAdded(addr, route))
            entries.append(PlannedChange("add", "route", addr, hostname, _summary(route)))
        elif old != route:
            changes.append(RouteUpdated(addr, route))
            entries.append(
                PlannedChange("update", "route", addr, hostname, _route_diff(old, route))
            )
