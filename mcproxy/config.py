"""The YAML configuration: typed, validated, every problem reported at once.

Process settings (workers, paths, addresses, timeouts) are read from the file
at every start. Listeners, routes, policies and firewall rules in the file
only seed an empty database (ARCHITECTURE.md, invariant 1): they are returned as
``Config.seed``, a generation-0 :class:`~mcproxy.model.ProxyState`. ``mc-proxy
serve`` reads them only when the database is empty (:func:`load_settings`);
``mc-proxy check`` and SIGUSR2 judge the whole file (:func:`load_config`).

The loader is strict because a typo in an ingress config fails open or
silently: unknown keys, keys written twice and bare-number durations are
errors, and each value goes through :mod:`mcproxy.validation`, the same
checks the admin API runs, so the seed holds only canonical values. Relative
paths resolve against the config file's directory.
"""

from __future__ import annotations

import contextlib
import difflib
import gc
import os
import re
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import maxminddb
import yaml

from mcproxy import validation
from mcproxy.model import (
    Address,
    BackendProtocol,
    Balance,
    FirewallRuleKind,
    FirewallRules,
    HealthCheck,
    HealthCheckKind,
    L7Policy,
    Listener,
    Mode,
    ProxyState,
    Route,
    make_state,
)
from mcproxy.settings import DEFAULT_ADMIN_SOCKET, ProxyTimeouts

__all__ = [
    "Config",
    "ConfigError",
    "FirewallSettings",
    "MetricsConfig",
    "ProxyTimeouts",
    "Seed",
    "config_from_data",
    "load_config",
    "load_settings",
    "parse_config",
    "parse_duration",
    "parse_yaml",
    "paused_gc",
]


class ConfigError(Exception):
    """The file has problems; ``problems`` lists every one as ``file: field.path: reason``."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    addr: Address
    path: str = "/metrics"


@dataclass(frozen=True, slots=True)
class FirewallSettings:
    """The process-level part of ``firewall:``; the rule lists go to the seed state."""

    geoip_db: str | None = None
    rate_limit: int = 0
    """New connections per IP per window; 0 = off."""
    rate_window: float = 60.0


@dataclass(frozen=True, slots=True)
class Config:
    path: str
    workers: int = 0
    """0 = one per CPU core; see :meth:`worker_count`."""
    database_path: str = "/srv/mc-proxy/mc-proxy.db"
    admin_socket: str = DEFAULT_ADMIN_SOCKET
    metrics: MetricsConfig | None = None
    proxy: ProxyTimeouts = field(default_factory=ProxyTimeouts)
    firewall: FirewallSettings = field(default_factory=FirewallSettings)
    seed: ProxyState = field(default_factory=ProxyState)

    def worker_count(self) -> int:
        return self.workers or os.cpu_count() or 1


_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """``"500ms"``, ``"5s"``, ``"1m"``, ``"1h"`` or a sum like ``"1m30s"`` -> seconds.

    A unit is required: a bare ``30`` means seconds to nginx and milliseconds
    to HAProxy, so guessing would be wrong for half the readers. Every
    duration in the schema is a timeout or window, so zero is refused too.
    Raises ValueError with the reason.
    """
    text = text.strip()
    if not _DURATION.fullmatch(text):
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            raise ValueError(f"{text!r} needs a unit: did you mean '{text}s'?")
        raise ValueError(f"{text!r} is not a duration (e.g. '500ms', '5s', '1m', '1h', '1m30s')")
    seconds = sum(
        float(number) * _UNIT_SECONDS[unit] for number, unit in _DURATION_PART.findall(text)
    )
    if seconds <= 0:
        raise ValueError("must be greater than zero")
    return seconds


def load_config(path: str) -> Config:
    """Read and validate ``path``. Raises :class:`ConfigError` listing every problem.

    Problems name ``path`` as given; relative paths inside the file resolve
    against the file's directory, so the result does not depend on the
    working directory.
    """
    return parse_config(_read(path), path)


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None


class Seed:
    """The seed part of a file :func:`load_settings` read, judged only if asked for.

    Holds the parsed document until :meth:`take` or :meth:`drop`, so that a
    100,000-route document does not stay in memory once the database is known.
    """

    def __init__(self, data: object, path: str) -> None:
        self._data: object = data
        self._path = path

    def take(self) -> ProxyState:
        """The whole file judged as :func:`load_config` does; raises :class:`ConfigError`
        listing every problem (process settings included, so the messages are the same)."""
        data, self._data = self._data, None
        with paused_gc():
            return config_from_data(data, self._path).seed

    def drop(self) -> None:
        self._data = None


def load_settings(path: str) -> tuple[Config, Seed]:
    """What ``mc-proxy serve`` needs at every start: the process settings of ``path``,
    validated (its ``seed`` is empty), and the file's :class:`Seed` for an empty
    database (invariant 1). Listeners, routes and firewall rules are not built or
    judged here: with 100,000 routes that is most of the start-up time."""
    text = _read(path)
    with paused_gc():
        data = parse_yaml(text, path)
        reader = _Reader(path, settings_only=True)
        config = reader.config(data)
    if reader.problems:
        raise ConfigError(reader.problems)
    return config, Seed(data, path)


def parse_config(text: str, path: str, *, state_only: bool = False) -> Config:
    """:func:`load_config` on text already read; ``path`` names it in problems and is
    where relative paths resolve from.

    ``state_only`` judges the file as a state to apply to a running process
    (``mcproxyctl apply``), whose own process settings stand: a country rule
    then does not need ``firewall.geoip_db`` in the file.
    """
    with paused_gc():
        return config_from_data(parse_yaml(text, path), path, state_only=state_only)


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection while a large document is built or read.

    Building 100,000 routes creates millions of objects, and each of them
    counts towards the collector's next pass over every live object: with the
    collector running, loading 50,000 routes took 25 s instead of 1 s (the
    objects hold no cycles, so reference counting frees them all the same).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def parse_yaml(text: str, path: str) -> object:
    """The document as plain data, with the loader's strictness (duplicate keys are errors)."""
    try:
        data: object = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: {_yaml_reason(exc)}"]) from None
    return data


def config_from_data(data: object, path: str, *, state_only: bool = False) -> Config:
    """:func:`parse_config` on a document :func:`parse_yaml` already read."""
    reader = _Reader(path, state_only=state_only)
    config = reader.config(data)
    if reader.problems:
        raise ConfigError(reader.problems)
    return config


_SafeLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's parser when PyYAML has it: 100,000 routes parse in ~3 s instead of ~40 s."""


class _StrictLoader(_SafeLoader):  # type: ignore[misc]
    """``safe_load``, but a key written twice in one mapping is an error, not last-wins."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                    )
                seen.add(key_node.value)
        mapping: dict[Hashable, Any] = super().construct_mapping(node, deep)
        return mapping


def _yaml_reason(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"line {mark.line + 1}, column {mark.column + 1}: invalid YAML: {exc.problem}"
    return f"invalid YAML: {exc}"


_MISSING: Any = object()
_T = TypeVar("_T")

_TOP = ("workers", "database", "admin", "metrics", "proxy", "firewall", "listeners")
_FIREWALL_LISTS = {
    "blocked_ips": FirewallRuleKind.IP,
    "blocked_cidrs": FirewallRuleKind.CIDR,
    "blocked_countries": FirewallRuleKind.COUNTRY,
}
_FIREWALL = ("geoip_db", *_FIREWALL_LISTS, "rate_limit", "rate_window")
_LISTENER = ("addr", "proxy_protocol", "max_connections", "routes")
_ROUTE = (
    "hostname",
    "backend",
    "backends",
    "balance",
    "health_check",
    "mode",
    "tls_cert",
    "tls_key",
    "backend_tls",
    "backend_protocol",
    "backend_ca",
    "backend_server_name",
    "backend_client_cert",
    "backend_client_key",
    "client_ca",
    "send_proxy_protocol",
    "l7_policies",
)
_HEALTH_CHECK = ("kind", "interval", "timeout", "path", "rise", "fall")
_UNIX_PATH_MAX = 107
"""sun_path is 108 bytes on Linux, one of which is the terminating NUL."""


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    for kind, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string")):
        if isinstance(value, kind):
            return name
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__


class _Reader:
    """Walks the parsed YAML, building dataclasses and collecting every problem.

    Each helper records a problem and returns a default (or None) instead of
    raising, so one pass reports everything. A field that already failed is
    not judged again by the cross-field checks.
    """

    def __init__(self, path: str, *, state_only: bool = False, settings_only: bool = False) -> None:
        self.path = path
        self.state_only = state_only
        self.settings_only = settings_only
        """Skip the seed sections (listeners, firewall rule lists): :func:`load_settings`."""
        self.base = os.path.dirname(os.path.abspath(path))
        self.problems: list[str] = []
        self.failed: list[str] = []
        """The field path of each problem, parallel to ``problems``."""

    def problem(self, path: str, reason: str) -> None:
        self.problems.append(f"{self.path}: {path or 'top level'}: {reason}")
        self.failed.append(path)

    # --- generic fields ---

    def mapping(
        self, value: object, path: str, fields: tuple[str, ...]
    ) -> dict[str, object] | None:
        """The known fields of the mapping at ``path`` (null is empty); flags unknown keys.

        None when it is not a mapping: the caller skips its fields rather than
        reporting each of them missing.
        """
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(path, f"expected mapping, got {_type_name(value)}")
            return None
        result: dict[str, object] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                self.problem(path, f"key {key!r} is not a string")
            elif key not in fields:
                hint = _close_match(key, fields)
                self.problem(_join(path, key), "unknown field" + hint)
            else:
                result[key] = item
        return result

    def typed(self, m: dict[str, object], path: str, key: str, kind: type[_T], default: _T) -> _T:
        """``m[key]`` if it is a ``kind``; missing gives ``default``; wrong type is a problem."""
        value = m.get(key, _MISSING)
        if value is _MISSING:
            return default
        # bool is an int in Python but not in the schema.
        if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            return value
        names = {bool: "boolean", int: "integer", str: "string", list: "list"}
        self.problem(
            _join(path, key), f"expected {names.get(kind, kind.__name__)}, got {_type_name(value)}"
        )
        return default

    def count(self, m: dict[str, object], path: str, key: str, default: int) -> int:
        value = self.typed(m, path, key, int, default)
        if value < 0:
            self.problem(_join(path, key), f"must be 0 or more, got {value}")
            return default
        return value

    def required(self, m: dict[str, object], path: str, key: str) -> str | None:
        if m.get(key) is None:
            self.problem(_join(path, key), "required field is missing")
            return None
        return self.typed(m, path, key, str, None)

    def optional_str(self, m: dict[str, object], path: str, key: str) -> str | None:
        return None if m.get(key) is None else self.typed(m, path, key, str, None)

    def items(self, m: dict[str, object], path: str, key: str) -> list[object]:
        return [] if m.get(key) is None else self.typed(m, path, key, list, [])

    def duration(self, m: dict[str, object], path: str, key: str, default: float) -> float:
        value = m.get(key, _MISSING)
        if value is _MISSING:
            return default
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            reason = f"needs a unit: did you mean '{value}s'?"
        elif not isinstance(value, str):
            reason = f"expected a duration string such as '5s', got {_type_name(value)}"
        else:
            try:
                return parse_duration(value)
            except ValueError as exc:
                reason = str(exc)
        self.problem(_join(path, key), reason)
        return default

    def file_path(self, m: dict[str, object], path: str, key: str) -> str | None:
        """A path from the file, resolved against the config file's directory."""
        value = self.optional_str(m, path, key)
        if value is None:
            return None
        if not value.strip():
            self.problem(_join(path, key), "must not be empty")
            return None
        return os.path.normpath(os.path.join(self.base, value))

    def parsed(
        self, m: dict[str, object], path: str, key: str, parse: Callable[[str], _T]
    ) -> _T | None:
        """A required string field run through a validation function."""
        text = self.required(m, path, key)
        if text is None:
            return None
        try:
            return parse(text)
        except ValueError as exc:
            self.problem(_join(path, key), str(exc))
            return None

    # --- sections ---

    def config(self, data: object) -> Config:
        top = self.mapping(data, "", _TOP) or {}
        d = Config(path=os.path.abspath(self.path))
        workers = self.count(top, "", "workers", d.workers)
        database = self.mapping(top.get("database"), "database", ("path",)) or {}
        database_path = self.file_path(database, "database", "path") or d.database_path
        admin = self.mapping(top.get("admin"), "admin", ("socket",)) or {}
        socket = self.file_path(admin, "admin", "socket") or d.admin_socket
        if len(os.fsencode(socket)) > _UNIX_PATH_MAX:
            self.problem(
                "admin.socket", f"a Unix socket path must be at most {_UNIX_PATH_MAX} bytes"
            )
        metrics = self.metrics(top.get("metrics"))
        proxy = self.proxy(top.get("proxy"))
        firewall, rules = self.firewall(top.get("firewall"))
        listeners = {} if self.settings_only else self.listeners(top)
        for i, listener in listeners.items():
            if metrics is not None and listener.addr == metrics.addr:
                self.problem("metrics.addr", f"same address as listeners[{i}].addr")
        return Config(
            path=d.path,
            workers=workers,
            database_path=database_path,
            admin_socket=socket,
            metrics=metrics,
            proxy=proxy,
            firewall=firewall,
            seed=make_state(0, list(listeners.values()), rules),
        )

    def metrics(self, value: object) -> MetricsConfig | None:
        if value is None:
            return None
        m = self.mapping(value, "metrics", ("addr", "path"))
        if m is None:
            return None
        addr = self.parsed(m, "metrics", "addr", validation.listener_address)
        url_path = self.typed(m, "metrics", "path", str, "/metrics")
        if not url_path.startswith("/") or any(c.isspace() or c in "?#" for c in url_path):
            self.problem("metrics.path", f"{url_path!r} must start with '/' (no query, no spaces)")
        return None if addr is None else MetricsConfig(addr, url_path)

    def proxy(self, value: object) -> ProxyTimeouts:
        fields = ("connect_timeout", "handshake_timeout", "idle_timeout", "shutdown_timeout")
        m = self.mapping(value, "proxy", fields) or {}
        d = ProxyTimeouts()
        return ProxyTimeouts(*(self.duration(m, "proxy", f, getattr(d, f)) for f in fields))

    def firewall(self, value: object) -> tuple[FirewallSettings, FirewallRules]:
        m = self.mapping(value, "firewall", _FIREWALL) or {}
        geoip = self.file_path(m, "firewall", "geoip_db")
        if geoip is not None:
            self.check_geoip(geoip)
        values: dict[str, frozenset[str]] = {}
        for key, kind in _FIREWALL_LISTS.items():
            values[key] = frozenset() if self.settings_only else self.firewall_list(m, key, kind)
        if values["blocked_countries"] and m.get("geoip_db") is None and not self.state_only:
            self.problem("firewall.geoip_db", "required when blocked_countries is not empty")
        d = FirewallSettings()
        settings = FirewallSettings(
            geoip_db=geoip,
            rate_limit=self.count(m, "firewall", "rate_limit", d.rate_limit),
            rate_window=self.duration(m, "firewall", "rate_window", d.rate_window),
        )
        return settings, FirewallRules(**values)

    def check_geoip(self, path: str) -> None:
        if not os.path.isfile(path):
            self.problem("firewall.geoip_db", "file not found")
            return
        try:
            maxminddb.open_database(path).close()
        except (OSError, ValueError, RuntimeError) as exc:
            self.problem("firewall.geoip_db", f"is not a MaxMind DB file: {exc}")

    def firewall_list(
        self, m: dict[str, object], key: str, kind: FirewallRuleKind
    ) -> frozenset[str]:
        path = _join("firewall", key)
        seen: dict[str, int] = {}
        for i, item in enumerate(self.items(m, "firewall", key)):
            if isinstance(item, bool) and kind is FirewallRuleKind.COUNTRY:
                # YAML 1.1 reads an unquoted NO (Norway) as false.
                self.problem(
                    _join(path, i),
                    "got a boolean (YAML reads an unquoted NO as false); quote it: 'NO'",
                )
            elif not isinstance(item, str):
                self.problem(_join(path, i), f"expected string, got {_type_name(item)}")
            else:
                try:
                    value = validation.firewall_value(kind, item)
                except ValueError as exc:
                    self.problem(_join(path, i), str(exc))
                    continue
                if value in seen:
                    self.problem(_join(path, i), f"duplicate of {key}[{seen[value]}] ({value})")
                seen.setdefault(value, i)
        return frozenset(seen)

    def listeners(self, top: dict[str, object]) -> dict[int, Listener]:
        """The distinct, valid listeners by their index in the file."""
        result: dict[int, Listener] = {}
        seen: dict[Address, int] = {}
        for i, item in enumerate(self.items(top, "", "listeners")):
            path = _join("listeners", i)
            m = self.mapping(item, path, _LISTENER)
            if m is None:
                continue
            addr = self.parsed(m, path, "addr", validation.listener_address)
            if addr is not None and addr in seen:
                self.problem(_join(path, "addr"), f"duplicate of listeners[{seen[addr]}] ({addr})")
            proxy_protocol = self.typed(m, path, "proxy_protocol", bool, False)
            max_connections = self.count(m, path, "max_connections", 0)
            routes = self.routes(m, path)
            if addr is not None and addr not in seen:
                seen[addr] = i
                result[i] = Listener(addr, proxy_protocol, max_connections, routes)
        return result

    def routes(self, listener: dict[str, object], listener_path: str) -> dict[str, Route]:
        routes: dict[str, Route] = {}
        seen: dict[str, int] = {}
        for i, item in enumerate(self.items(listener, listener_path, "routes")):
            path = _join(_join(listener_path, "routes"), i)
            m = self.mapping(item, path, _ROUTE)
            if m is None:
                continue
            hostname, route = self.route(m, path)
            if hostname is not None and hostname in seen:
                where = f"routes[{seen[hostname]}]"
                self.problem(_join(path, "hostname"), f"duplicate of {where} ({hostname})")
            elif hostname is not None:
                seen[hostname] = i
                if route is not None:
                    routes[hostname] = route
        return routes

    def route(self, m: dict[str, object], path: str) -> tuple[str | None, Route | None]:
        """The route's hostname (None if invalid) and the route (None if any field failed)."""
        before = len(self.problems)
        name = self.parsed(m, path, "hostname", validation.hostname)
        backends = self.backends(m, path)
        mode = self.choice(m, path, "mode", validation.mode, Mode.L4)
        balance = self.choice(m, path, "balance", validation.balance, Balance.ROUND_ROBIN)
        protocol = self.choice(
            m, path, "backend_protocol", validation.backend_protocol, BackendProtocol.H2
        )
        health_check = self.health_check(m, path)
        cert = self.file_path(m, path, "tls_cert")
        key = self.file_path(m, path, "tls_key")
        backend_tls = self.typed(m, path, "backend_tls", bool, False)
        send_proxy_protocol = self.typed(m, path, "send_proxy_protocol", bool, False)
        policies = self.policies(m, path)
        server_name = self.optional_str(m, path, "backend_server_name")
        if server_name is not None:
            try:
                server_name = validation.server_name(server_name)
            except ValueError as exc:
                self.problem(_join(path, "backend_server_name"), str(exc))
        if mode is None:
            # Without a mode the cross-field rules are moot; the files can still be judged.
            if cert is not None and key is not None:
                for field_name, reason in validation.key_pair_problems(cert, key):
                    self.problem(_join(path, field_name), reason)
            return name, None
        route = Route(
            hostname=name or "invalid.invalid",
            backends=backends or (Address("invalid.invalid", 1),),
            mode=mode,
            tls_cert=cert,
            tls_key=key,
            backend_tls=backend_tls,
            send_proxy_protocol=send_proxy_protocol,
            policies=policies,
            balance=balance or Balance.ROUND_ROBIN,
            health_check=health_check,
            backend_protocol=protocol or BackendProtocol.H2,
            backend_ca=self.file_path(m, path, "backend_ca"),
            backend_server_name=server_name,
            backend_client_cert=self.file_path(m, path, "backend_client_cert"),
            backend_client_key=self.file_path(m, path, "backend_client_key"),
            client_ca=self.file_path(m, path, "client_ca"),
        )
        # A field that already failed (or any field under it) is not judged again.
        failed = {_root(p, path) for p in self.failed[before:]}
        for field_name, reason in validation.route_problems(route):
            root = _root(_join(path, field_name), path)
            if root not in failed and not (root == "backends" and "backend" in failed):
                self.problem(_join(path, field_name), reason)
        return name, None if len(self.problems) > before else route

    def choice(
        self, m: dict[str, object], path: str, key: str, parse: Callable[[str], _T], default: _T
    ) -> _T | None:
        """An optional enum field (``mode``, ``balance``...); None when it is wrong."""
        return default if m.get(key) is None else self.parsed(m, path, key, parse)

    def backends(self, m: dict[str, object], path: str) -> tuple[Address, ...] | None:
        """``backend: A`` or ``backends: [A, B]`` (exactly one of them); None if wrong."""
        has_one, has_many = m.get("backend") is not None, m.get("backends") is not None
        if has_one and has_many:
            self.problem(_join(path, "backends"), "give backend or backends, not both")
            return None
        if not has_many:
            if not has_one:
                self.problem(_join(path, "backend"), "required field is missing (or backends)")
                return None
            one = self.parsed(m, path, "backend", validation.backend_address)
            return None if one is None else (one,)
        items = self.items(m, path, "backends")
        list_path = _join(path, "backends")
        if not items:
            if isinstance(m.get("backends"), list):
                self.problem(list_path, "must list at least one backend")
            return None
        result: list[Address] = []
        seen: dict[Address, int] = {}
        ok = True
        for i, item in enumerate(items):
            if not isinstance(item, str):
                self.problem(_join(list_path, i), f"expected string, got {_type_name(item)}")
                ok = False
                continue
            try:
                addr = validation.backend_address(item)
            except ValueError as exc:
                self.problem(_join(list_path, i), str(exc))
                ok = False
                continue
            if addr in seen:
                self.problem(_join(list_path, i), f"duplicate of backends[{seen[addr]}] ({addr})")
                ok = False
                continue
            seen[addr] = i
            result.append(addr)
        return tuple(result) if ok else None

    def health_check(self, m: dict[str, object], path: str) -> HealthCheck | None:
        if m.get("health_check") is None:
            return None
        hc_path = _join(path, "health_check")
        hc = self.mapping(m["health_check"], hc_path, _HEALTH_CHECK)
        if hc is None:
            return None
        kind = self.parsed(hc, hc_path, "kind", validation.health_check_kind)
        d = HealthCheck(kind=HealthCheckKind.TCP)
        check = HealthCheck(
            kind=kind or d.kind,
            interval=self.duration(hc, hc_path, "interval", d.interval),
            timeout=self.duration(hc, hc_path, "timeout", d.timeout),
            path=self.typed(hc, hc_path, "path", str, d.path),
            rise=self.typed(hc, hc_path, "rise", int, d.rise),
            fall=self.typed(hc, hc_path, "fall", int, d.fall),
        )
        return check if kind is not None else None

    def policies(self, route: dict[str, object], route_path: str) -> tuple[L7Policy, ...]:
        """The valid, distinct policies; the rest become problems."""
        seen: dict[L7Policy, int] = {}
        for i, item in enumerate(self.items(route, route_path, "l7_policies")):
            path = _join(_join(route_path, "l7_policies"), i)
            m = self.mapping(item, path, ("type", "value"))
            if m is None:
                continue
            kind, value = self.required(m, path, "type"), self.required(m, path, "value")
            if kind is None or value is None:
                continue
            try:
                policy = validation.policy(kind, value)
            except validation.FieldError as exc:
                self.problem(_join(path, exc.field), exc.reason)
                continue
            if policy in seen:
                self.problem(path, f"duplicate of l7_policies[{seen[policy]}]")
                continue
            seen[policy] = i
        return tuple(seen)


def _root(field_path: str, route_path: str) -> str:
    """The route field a problem's path falls under: ``backends`` for ``...backends[1]``."""
    rest = field_path.removeprefix(route_path).lstrip(".")
    return re.split(r"[.\[]", rest, maxsplit=1)[0]


def _close_match(key: str, fields: tuple[str, ...]) -> str:
    matches = difflib.get_close_matches(key, fields, n=1)
    return f" (did you mean {matches[0]!r}?)" if matches else ""
