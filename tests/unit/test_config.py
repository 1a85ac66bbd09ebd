"""Loading the YAML config: the typed result, defaults, and every rejection with its field path."""

from __future__ import annotations

import dataclasses
import os
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from mmdb_writer import MMDBWriter
from netaddr import IPSet

from mcproxy.config import (
    Config,
    ConfigError,
    FirewallSettings,
    MetricsConfig,
    ProxyTimeouts,
    load_config,
    load_settings,
    parse_duration,
)
from mcproxy.model import (
    Address,
    BackendProtocol,
    Balance,
    FirewallRules,
    HealthCheck,
    HealthCheckKind,
    L7Policy,
    Listener,
    Mode,
    PolicyKind,
    Route,
)
from tests.certs import make_ca, make_self_signed


@pytest.fixture
def certs(tmp_path: Path) -> tuple[Path, Path]:
    """example.com.pem / example.com.key beside the config file."""
    return make_self_signed(tmp_path, "example.com")


@pytest.fixture
def geoip(tmp_path: Path) -> Path:
    path = tmp_path / "GeoLite2-Country.mmdb"
    writer = MMDBWriter(ip_version=4, database_type="GeoLite2-Country")
    writer.insert_network(IPSet(["192.0.2.0/24"]), {"country": {"iso_code": "KP"}})
    writer.to_db_file(str(path))
    return path


def write(tmp_path: Path, data: object) -> Path:
    """Write ``data`` (YAML text, or a value to dump) as conf.yaml."""
    path = tmp_path / "conf.yaml"
    text = textwrap.dedent(data) if isinstance(data, str) else yaml.safe_dump(data)
    path.write_text(text)
    return path


def problems(tmp_path: Path, data: object) -> list[str]:
    """The problems loading ``data`` reports, without the leading ``FILE: ``."""
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    prefix = f"{path}: "
    assert all(p.startswith(prefix) for p in info.value.problems)
    return [p.removeprefix(prefix) for p in info.value.problems]


def with_route(**route: object) -> dict[str, Any]:
    """A config whose one listener has one route: defaults overridden by ``route``."""
    fields: dict[str, object] = {"hostname": "example.com", "backend": "127.0.0.1:8443"}
    fields.update(route)
    return {"listeners": [{"addr": ":443", "routes": [fields]}]}


L7 = {"mode": "l7", "tls_cert": "example.com.pem", "tls_key": "example.com.key"}

FULL = """\
    workers: 4
    database: {path: state/mc-proxy.db}
    admin: {socket: /run/mc-proxy/admin.sock}
    metrics: {addr: "127.0.0.1:9090", path: /metrics}
    proxy:
      connect_timeout: 5s
      handshake_timeout: 10s
      idle_timeout: 300s
      shutdown_timeout: 30s
    firewall:
      geoip_db: GeoLite2-Country.mmdb
      blocked_ips: ["192.0.2.1", "2001:DB8::1"]
      blocked_cidrs: ["198.51.100.0/24"]
      blocked_countries: ["kp"]
      rate_limit: 20
      rate_window: 1m
    listeners:
      - addr: ":443"
        proxy_protocol: true
        max_connections: 1000
        routes:
          - hostname: Example.COM
            backend: "127.0.0.1:28443"
            mode: l7
            tls_cert: example.com.pem
            tls_key: example.com.key
            backend_tls: true
            send_proxy_protocol: true
            l7_policies:
              - {type: block_user_agent, value: "BadBot"}
              - {type: require_header, value: "X-API-Key"}
          - hostname: passthrough.example.com
            backend: "[2001:db8::5]:443"
      - addr: "127.0.0.1:8443"
"""


# --- parse_duration ---


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("5s", 5.0),
        ("1m", 60.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("1m30s", 90.0),
        (" 2h ", 7200.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "5 s", "5sec", "-5s", "s", "1d", "5S"])
def test_parse_duration_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_parse_duration_bare_number_suggests_seconds() -> None:
    with pytest.raises(ValueError, match="needs a unit: did you mean '30s'"):
        parse_duration("30")


@pytest.mark.parametrize("text", ["0s", "0ms", "0m0s"])
def test_parse_duration_rejects_zero(text: str) -> None:
    with pytest.raises(ValueError, match="greater than zero"):
        parse_duration(text)


# --- valid configs ---


def test_full_config_round_trips_into_dataclasses(
    tmp_path: Path, certs: tuple[Path, Path], geoip: Path
) -> None:
    path = write(tmp_path, FULL)
    config = load_config(str(path))
    route = Route(
        hostname="example.com",
        backends=(Address("127.0.0.1", 28443),),
        mode=Mode.L7,
        tls_cert=str(certs[0]),
        tls_key=str(certs[1]),
        backend_tls=True,
        send_proxy_protocol=True,
        policies=(
            L7Policy(PolicyKind.BLOCK_USER_AGENT, "BadBot"),
            L7Policy(PolicyKind.REQUIRE_HEADER, "x-api-key"),
        ),
    )
    passthrough = Route("passthrough.example.com", (Address("2001:db8::5", 443),))
    assert config == Config(
        path=str(path),
        workers=4,
        database_path=str(tmp_path / "state" / "mc-proxy.db"),
        admin_socket="/run/mc-proxy/admin.sock",
        metrics=MetricsConfig(Address("127.0.0.1", 9090), "/metrics"),
        proxy=ProxyTimeouts(5.0, 10.0, 300.0, 30.0),
        firewall=FirewallSettings(geoip_db=str(geoip), rate_limit=20, rate_window=60.0),
        seed=config.seed,
    )
    seed = config.seed
    assert seed.generation == 0
    assert seed.firewall == FirewallRules(
        blocked_ips=frozenset({"192.0.2.1", "2001:db8::1"}),
        blocked_cidrs=frozenset({"198.51.100.0/24"}),
        blocked_countries=frozenset({"KP"}),
    )
    assert dict(seed.listeners) == {
        ":443": Listener(
            Address("", 443),
            proxy_protocol=True,
            max_connections=1000,
            routes={"example.com": route, "passthrough.example.com": passthrough},
        ),
        "127.0.0.1:8443": Listener(Address("127.0.0.1", 8443)),
    }


def test_empty_file_gives_all_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    config = load_config(str(path))
    assert config == Config(path=str(path))
    assert config.metrics is None
    assert config.proxy == ProxyTimeouts(5.0, 10.0, 300.0, 30.0)
    assert config.firewall == FirewallSettings(geoip_db=None, rate_limit=0, rate_window=60.0)
    assert dict(config.seed.listeners) == {}


def test_listener_and_route_defaults_apply(tmp_path: Path) -> None:
    config = load_config(str(write(tmp_path, with_route())))
    listener = config.seed.listener(":443")
    assert (listener.proxy_protocol, listener.max_connections) == (False, 0)
    assert listener.routes["example.com"] == Route(
        "example.com", (Address("127.0.0.1", 8443),), mode=Mode.L4
    )


def test_metrics_path_defaults_and_null_sections_are_empty(tmp_path: Path) -> None:
    text = """\
        metrics: {addr: ":9090"}
        proxy:
        firewall:
        listeners:
    """
    config = load_config(str(write(tmp_path, text)))
    assert config.metrics == MetricsConfig(Address("", 9090), "/metrics")
    assert config.proxy == ProxyTimeouts()


def test_relative_paths_resolve_against_the_config_directory(
    tmp_path: Path, certs: tuple[Path, Path], geoip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = with_route(**L7)
    data["database"] = {"path": "db/mc.db"}
    data["admin"] = {"socket": "../run/admin.sock"}
    data["firewall"] = {"geoip_db": "GeoLite2-Country.mmdb"}
    path = write(tmp_path, data)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(os.path.relpath(path))
    assert config.path == str(path)
    assert config.database_path == str(tmp_path / "db" / "mc.db")
    assert config.admin_socket == str(tmp_path.parent / "run" / "admin.sock")
    assert config.firewall.geoip_db == str(geoip)
    route = config.seed.listener(":443").routes["example.com"]
    assert (route.tls_cert, route.tls_key) == (str(certs[0]), str(certs[1]))


def test_worker_count_zero_means_cpu_count(tmp_path: Path) -> None:
    config = load_config(str(write(tmp_path, {"workers": 0})))
    assert config.worker_count() == (os.cpu_count() or 1)


# --- rejections: one field each ---

R = "listeners[0].routes[0]"
L7_ONLY = "only for mode l7 (l4 passes the client's TLS through untouched)"
NOT_DURATION = "is not a duration (e.g. '500ms', '5s', '1m', '1h', '1m30s')"

REJECTIONS: list[tuple[str, dict[str, Any], str]] = [
    # top level and process settings
    ("unknown top-level key", {"worker": 2}, "worker: unknown field (did you mean 'workers'?)"),
    ("workers type", {"workers": "4"}, "workers: expected integer, got string"),
    ("workers bool", {"workers": True}, "workers: expected integer, got boolean"),
    ("workers negative", {"workers": -1}, "workers: must be 0 or more, got -1"),
    ("database type", {"database": "x.db"}, "database: expected mapping, got string"),
    ("database key", {"database": {"file": "x"}}, "database.file: unknown field"),
    ("database empty", {"database": {"path": ""}}, "database.path: must not be empty"),
    ("admin type", {"admin": {"socket": 5}}, "admin.socket: expected string, got integer"),
    (
        "socket too long",
        {"admin": {"socket": "/" + "s" * 120}},
        "admin.socket: a Unix socket path must be at most 107 bytes",
    ),
    (
        "metrics addr missing",
        {"metrics": {"path": "/m"}},
        "metrics.addr: required field is missing",
    ),
    (
        "metrics addr invalid",
        {"metrics": {"addr": "localhost"}},
        "metrics.addr: 'localhost' has no port (expected host:port)",
    ),
    (
        "metrics path",
        {"metrics": {"addr": ":9090", "path": "metrics"}},
        "metrics.path: 'metrics' must start with '/' (no query, no spaces)",
    ),
    (
        "metrics on a listener address",
        {"metrics": {"addr": ":443"}, "listeners": [{"addr": ":443"}]},
        "metrics.addr: same address as listeners[0].addr",
    ),
    (
        "duration without unit",
        {"proxy": {"connect_timeout": 5}},
        "proxy.connect_timeout: needs a unit: did you mean '5s'?",
    ),
    (
        "duration malformed",
        {"proxy": {"idle_timeout": "5 minutes"}},
        f"proxy.idle_timeout: '5 minutes' {NOT_DURATION}",
    ),
    (
        "duration zero",
        {"proxy": {"shutdown_timeout": "0s"}},
        "proxy.shutdown_timeout: must be greater than zero",
    ),
    (
        "duration type",
        {"proxy": {"handshake_timeout": ["5s"]}},
        "proxy.handshake_timeout: expected a duration string such as '5s', got list",
    ),
    ("proxy key", {"proxy": {"read_timeout": "5s"}}, "proxy.read_timeout: unknown field"),
    ("metrics type", {"metrics": 9090}, "metrics: expected mapping, got integer"),
    # firewall
    (
        "ip invalid",
        {"firewall": {"blocked_ips": ["192.0.2"]}},
        "firewall.blocked_ips[0]: '192.0.2' is not an IP address",
    ),
    (
        "ip duplicate after canonicalisation",
        {"firewall": {"blocked_ips": ["2001:db8::1", "2001:DB8:0::1"]}},
        "firewall.blocked_ips[1]: duplicate of blocked_ips[0] (2001:db8::1)",
    ),
    (
        "ip type",
        {"firewall": {"blocked_ips": [1]}},
        "firewall.blocked_ips[0]: expected string, got integer",
    ),
    (
        "ips not a list",
        {"firewall": {"blocked_ips": "192.0.2.1"}},
        "firewall.blocked_ips: expected list, got string",
    ),
    (
        "cidr host bits",
        {"firewall": {"blocked_cidrs": ["198.51.100.7/24"]}},
        "firewall.blocked_cidrs[0]: '198.51.100.7/24' has host bits set; "
        "did you mean 198.51.100.0/24?",
    ),
    (
        "country not alpha-2",
        {"firewall": {"blocked_countries": ["PRK"], "geoip_db": "GeoLite2-Country.mmdb"}},
        "firewall.blocked_countries[0]: 'PRK' is not a two-letter ISO 3166-1 country code",
    ),
    (
        "countries need geoip",
        {"firewall": {"blocked_countries": ["KP"]}},
        "firewall.geoip_db: required when blocked_countries is not empty",
    ),
    ("geoip missing", {"firewall": {"geoip_db": "nope.mmdb"}}, "firewall.geoip_db: file not found"),
    (
        "rate_limit negative",
        {"firewall": {"rate_limit": -5}},
        "firewall.rate_limit: must be 0 or more, got -5",
    ),
    (
        "rate_window",
        {"firewall": {"rate_window": "1y"}},
        f"firewall.rate_window: '1y' {NOT_DURATION}",
    ),
    (
        "firewall key",
        {"firewall": {"blocked_ip": []}},
        "firewall.blocked_ip: unknown field (did you mean 'blocked_ips'?)",
    ),
    # listeners
    ("listeners type", {"listeners": {"addr": ":443"}}, "listeners: expected list, got mapping"),
    (
        "listener addr missing",
        {"listeners": [{"routes": []}]},
        "listeners[0].addr: required field is missing",
    ),
    (
        "listener addr port",
        {"listeners": [{"addr": ":99999"}]},
        "listeners[0].addr: port '99999' is not a number from 1 to 65535",
    ),
    (
        "listener duplicate after canonicalisation",
        {"listeners": [{"addr": "[::1]:443"}, {"addr": "[0:0::1]:443"}]},
        "listeners[1].addr: duplicate of listeners[0] ([::1]:443)",
    ),
    (
        "listener typo",
        {"listeners": [{"addr": ":443", "rotues": []}]},
        "listeners[0].rotues: unknown field (did you mean 'routes'?)",
    ),
    (
        "proxy_protocol type",
        {"listeners": [{"addr": ":443", "proxy_protocol": "yes please"}]},
        "listeners[0].proxy_protocol: expected boolean, got string",
    ),
    (
        "max_connections negative",
        {"listeners": [{"addr": ":443", "max_connections": -1}]},
        "listeners[0].max_connections: must be 0 or more, got -1",
    ),
    (
        "listener not a mapping",
        {"listeners": [":443"]},
        "listeners[0]: expected mapping, got string",
    ),
    # routes
    (
        "route not a mapping",
        {"listeners": [{"addr": ":443", "routes": ["x"]}]},
        "listeners[0].routes[0]: expected mapping, got string",
    ),
    (
        "policy not a mapping",
        with_route(**L7, l7_policies=["require_header"]),
        f"{R}.l7_policies[0]: expected mapping, got string",
    ),
    (
        "route typo",
        with_route(bakend="x"),
        "listeners[0].routes[0].bakend: unknown field (did you mean 'backend'?)",
    ),
    (
        "hostname missing",
        with_route(hostname=None),
        "listeners[0].routes[0].hostname: required field is missing",
    ),
    (
        "hostname invalid",
        with_route(hostname="a.*.example.com"),
        f"{R}.hostname: 'a.*.example.com' is not a valid DNS hostname (an exact name, "
        "'*.example.com' for one more label, or '*' for every other name)",
    ),
    (
        "backend missing",
        with_route(backend=None),
        "listeners[0].routes[0].backend: required field is missing",
    ),
    (
        "backend without host",
        with_route(backend=":8443"),
        "listeners[0].routes[0].backend: ':8443' has no host (':port' only means 'every address')",
    ),
    (
        "mode invalid",
        with_route(mode="l3"),
        "listeners[0].routes[0].mode: 'l3' is not one of: l4, l7",
    ),
    (
        "l7 without cert",
        with_route(mode="l7", tls_key="example.com.key"),
        "listeners[0].routes[0].tls_cert: required for mode l7",
    ),
    (
        "l7 without key",
        with_route(mode="l7", tls_cert="example.com.pem"),
        "listeners[0].routes[0].tls_key: required for mode l7",
    ),
    (
        "l4 with cert",
        with_route(tls_cert="example.com.pem"),
        f"{R}.tls_cert: {L7_ONLY}",
    ),
    (
        "l4 with key",
        with_route(tls_key="example.com.key"),
        f"{R}.tls_key: {L7_ONLY}",
    ),
    (
        "l4 with backend_tls",
        with_route(backend_tls=True),
        f"{R}.backend_tls: {L7_ONLY}",
    ),
    (
        "l4 with policies",
        with_route(l7_policies=[{"type": "block_user_agent", "value": "x"}]),
        f"{R}.l7_policies: {L7_ONLY}",
    ),
    (
        "cert file missing",
        with_route(**{**L7, "tls_cert": "missing.pem"}),
        "listeners[0].routes[0].tls_cert: file not found",
    ),
    (
        "key file missing",
        with_route(**{**L7, "tls_key": "missing.key"}),
        "listeners[0].routes[0].tls_key: file not found",
    ),
    (
        "key is the cert",
        with_route(**{**L7, "tls_key": "example.com.pem"}),
        "listeners[0].routes[0].tls_key: is not a PEM private key",
    ),
    (
        "backend_tls type",
        with_route(**L7, backend_tls="true"),
        "listeners[0].routes[0].backend_tls: expected boolean, got string",
    ),
    (
        "send_proxy_protocol type",
        with_route(send_proxy_protocol=1),
        "listeners[0].routes[0].send_proxy_protocol: expected boolean, got integer",
    ),
    (
        "policies type",
        with_route(**L7, l7_policies={"type": "x"}),
        "listeners[0].routes[0].l7_policies: expected list, got mapping",
    ),
    (
        "policy type invalid",
        with_route(**L7, l7_policies=[{"type": "block_ip", "value": "x"}]),
        f"{R}.l7_policies[0].type: 'block_ip' is not one of: block_user_agent, require_header",
    ),
    (
        "policy value missing",
        with_route(**L7, l7_policies=[{"type": "block_user_agent"}]),
        "listeners[0].routes[0].l7_policies[0].value: required field is missing",
    ),
    (
        "policy value empty",
        with_route(**L7, l7_policies=[{"type": "block_user_agent", "value": ""}]),
        "listeners[0].routes[0].l7_policies[0].value: must not be empty",
    ),
    (
        "require_header not a header name",
        with_route(**L7, l7_policies=[{"type": "require_header", "value": "X API Key"}]),
        "listeners[0].routes[0].l7_policies[0].value: 'X API Key' is not a valid HTTP header name",
    ),
    (
        "policy unknown key",
        with_route(**L7, l7_policies=[{"type": "require_header", "value": "x", "status": 401}]),
        "listeners[0].routes[0].l7_policies[0].status: unknown field",
    ),
    (
        "policy duplicate after canonicalisation",
        with_route(
            **L7,
            l7_policies=[
                {"type": "require_header", "value": "X-Key"},
                {"type": "require_header", "value": "x-key"},
            ],
        ),
        "listeners[0].routes[0].l7_policies[1]: duplicate of l7_policies[0]",
    ),
]


@pytest.mark.parametrize(
    ("data", "expected"),
    [pytest.param(data, expected, id=name) for name, data, expected in REJECTIONS],
)
def test_rejection_names_field_path_and_reason(
    tmp_path: Path, certs: tuple[Path, Path], geoip: Path, data: dict[str, Any], expected: str
) -> None:
    found = problems(tmp_path, data)
    assert any(p == expected or p.startswith(expected + " (") for p in found), found
    assert len(found) == 1, found


def test_duplicate_hostname_after_normalisation_is_rejected(tmp_path: Path) -> None:
    data = with_route()
    data["listeners"][0]["routes"].append({"hostname": "EXAMPLE.com.", "backend": "10.0.0.1:1"})
    assert problems(tmp_path, data) == [
        "listeners[0].routes[1].hostname: duplicate of routes[0] (example.com)"
    ]


def test_same_hostname_on_two_listeners_is_fine(tmp_path: Path) -> None:
    data = with_route()
    data["listeners"].append({"addr": ":8443", "routes": data["listeners"][0]["routes"]})
    config = load_config(str(write(tmp_path, data)))
    assert set(config.seed.listeners) == {":443", ":8443"}


def test_mismatched_cert_and_key_blame_the_key(tmp_path: Path, certs: tuple[Path, Path]) -> None:
    make_self_signed(tmp_path, "other.example")
    data = with_route(**{**L7, "tls_key": "other.example.key"})
    assert problems(tmp_path, data) == [
        "listeners[0].routes[0].tls_key: does not match the certificate in tls_cert"
    ]


def test_geoip_db_must_be_a_maxmind_db(tmp_path: Path) -> None:
    (tmp_path / "geo.mmdb").write_text("not a database")
    found = problems(tmp_path, {"firewall": {"geoip_db": "geo.mmdb"}})
    assert len(found) == 1
    assert found[0].startswith("firewall.geoip_db: is not a MaxMind DB file")


def test_unquoted_norway_is_explained(tmp_path: Path, geoip: Path) -> None:
    text = f"""\
        firewall:
          geoip_db: {geoip}
          blocked_countries: [NO]
    """
    assert problems(tmp_path, text) == [
        "firewall.blocked_countries[0]: got a boolean (YAML reads an unquoted NO as false); "
        "quote it: 'NO'"
    ]


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    assert problems(tmp_path, "- workers: 1\n") == ["top level: expected mapping, got list"]


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    found = problems(tmp_path, "workers: 1\nlisteners: [\n")
    assert len(found) == 1
    assert found[0].startswith("line 3, column 1: invalid YAML:")


def test_key_written_twice_is_an_error(tmp_path: Path) -> None:
    text = """\
        workers: 1
        workers: 2
    """
    assert problems(tmp_path, text) == ["line 2, column 1: invalid YAML: duplicate key 'workers'"]


def test_missing_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.problems == [f"{path}: cannot read: No such file or directory"]


def test_problem_names_the_file_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, {"workers": -1})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config("conf.yaml")
    assert info.value.problems == ["conf.yaml: workers: must be 0 or more, got -1"]
    assert str(info.value) == "conf.yaml: workers: must be 0 or more, got -1"


def test_every_problem_is_reported_at_once(tmp_path: Path, certs: tuple[Path, Path]) -> None:
    text = """\
        workers: -2
        proxy: {connect_timeout: 5}
        firewall: {blocked_cidrs: ["10.1.2.3/8"]}
        listeners:
          - addr: ":443"
            routes:
              - {hostname: a.example, backend: ":80"}
              - {hostname: b.example, backend: "10.0.0.1:80", mode: l7, tls_cert: missing.pem}
              - {hostname: c.example, backend: "10.0.0.1:80", rotue: x}
          - addr: ":443"
    """
    assert problems(tmp_path, text) == [
        "workers: must be 0 or more, got -2",
        "proxy.connect_timeout: needs a unit: did you mean '5s'?",
        "firewall.blocked_cidrs[0]: '10.1.2.3/8' has host bits set; did you mean 10.0.0.0/8?",
        "listeners[0].routes[0].backend: ':80' has no host (':port' only means 'every address')",
        "listeners[0].routes[1].tls_cert: file not found",
        "listeners[0].routes[1].tls_key: required for mode l7",
        "listeners[0].routes[2].rotue: unknown field",
        "listeners[1].addr: duplicate of listeners[0] (:443)",
    ]


# --- second batch: route fields ---------------------------------------------------------


@pytest.fixture
def trust(tmp_path: Path, certs: tuple[Path, Path]) -> Path:
    """ca.pem and client.pem/client.key beside the config file (with the route's pair)."""
    make_ca().write(tmp_path)
    make_self_signed(tmp_path, "client")
    return tmp_path


def test_second_batch_route_fields_load(tmp_path: Path, trust: Path) -> None:
    path = write(
        tmp_path,
        """\
        listeners:
          - addr: ":443"
            routes:
              - hostname: "*.Example.com"
                backends: ["10.0.0.1:443", "Backend.internal:443", "[::1]:443"]
                balance: least_conn
                health_check:
                  {kind: http, interval: 2s, timeout: 500ms, path: /up, rise: 1, fall: 5}
                mode: l7
                tls_cert: example.com.pem
                tls_key: example.com.key
                backend_tls: true
                backend_protocol: h1
                backend_ca: ca.pem
                backend_server_name: API.internal
                backend_client_cert: client.pem
                backend_client_key: client.key
                client_ca: ca.pem
              - hostname: "*"
                backend: "127.0.0.1:1"
                health_check: {kind: tcp}
        """,
    )
    routes = load_config(str(path)).seed.listeners[":443"].routes
    d = str(tmp_path)
    assert routes["*.example.com"] == Route(
        "*.example.com",
        (Address("10.0.0.1", 443), Address("backend.internal", 443), Address("::1", 443)),
        mode=Mode.L7,
        tls_cert=f"{d}/example.com.pem",
        tls_key=f"{d}/example.com.key",
        backend_tls=True,
        balance=Balance.LEAST_CONN,
        health_check=HealthCheck(
            HealthCheckKind.HTTP, interval=2.0, timeout=0.5, path="/up", rise=1, fall=5
        ),
        backend_protocol=BackendProtocol.H1,
        backend_ca=f"{d}/ca.pem",
        backend_server_name="api.internal",
        backend_client_cert=f"{d}/client.pem",
        backend_client_key=f"{d}/client.key",
        client_ca=f"{d}/ca.pem",
    )
    assert routes["*"] == Route(
        "*", (Address("127.0.0.1", 1),), health_check=HealthCheck(HealthCheckKind.TCP)
    )


TLS_L7 = {**L7, "backend_tls": True}

SECOND_BATCH_REJECTIONS: list[tuple[str, dict[str, Any], str]] = [
    (
        "backend and backends",
        with_route(backends=["10.0.0.1:1"]),
        f"{R}.backends: give backend or backends, not both",
    ),
    ("neither backend", with_route(backend=None), f"{R}.backend: required field is missing"),
    (
        "backends empty",
        with_route(backend=None, backends=[]),
        f"{R}.backends: must list at least one backend",
    ),
    (
        "backends not a list",
        with_route(backend=None, backends="10.0.0.1:1"),
        f"{R}.backends: expected list, got string",
    ),
    (
        "backends entry invalid",
        with_route(backend=None, backends=["10.0.0.1:1", ":80"]),
        f"{R}.backends[1]: ':80' has no host (':port' only means 'every address')",
    ),
    (
        "backends entry not a string",
        with_route(backend=None, backends=["10.0.0.1:1", 80]),
        f"{R}.backends[1]: expected string, got integer",
    ),
    (
        "backends duplicate",
        with_route(backend=None, backends=["[::1]:1", "10.0.0.2:1", "[::0001]:1"]),
        f"{R}.backends[2]: duplicate of backends[0] ([::1]:1)",
    ),
    (
        "balance invalid",
        with_route(balance="least_connections"),
        f"{R}.balance: 'least_connections' is not one of: round_robin, least_conn, source_ip"
        " (did you mean 'least_conn'?)",
    ),
    (
        "backend_protocol invalid",
        with_route(**L7, backend_protocol="http2"),
        f"{R}.backend_protocol: 'http2' is not one of: h2, h1",
    ),
    (
        "health_check kind missing",
        with_route(health_check={"interval": "1s"}),
        f"{R}.health_check.kind: required field is missing",
    ),
    (
        "health_check kind invalid",
        with_route(health_check={"kind": "htp"}),
        f"{R}.health_check.kind: 'htp' is not one of: tcp, http (did you mean 'http'?)",
    ),
    (
        "health_check unknown field",
        with_route(health_check={"kind": "tcp", "intervall": "1s"}),
        f"{R}.health_check.intervall: unknown field (did you mean 'interval'?)",
    ),
    (
        "health_check interval bare number",
        with_route(health_check={"kind": "tcp", "interval": 5}),
        f"{R}.health_check.interval: needs a unit: did you mean '5s'?",
    ),
    (
        "health_check timeout not shorter",
        with_route(health_check={"kind": "tcp", "interval": "1s", "timeout": "1s"}),
        f"{R}.health_check.timeout: must be shorter than interval (1s >= 1s)",
    ),
    (
        "health_check path",
        with_route(health_check={"kind": "http", "path": "healthz"}),
        f"{R}.health_check.path: 'healthz' must start with '/' (no spaces, no fragment)",
    ),
    (
        "health_check rise zero",
        with_route(health_check={"kind": "tcp", "rise": 0}),
        f"{R}.health_check.rise: must be 1 or more, got 0",
    ),
    (
        "health_check fall type",
        with_route(health_check={"kind": "tcp", "fall": "3"}),
        f"{R}.health_check.fall: expected integer, got string",
    ),
    ("l4 with h1", with_route(backend_protocol="h1"), f"{R}.backend_protocol: {L7_ONLY}"),
    ("l4 with backend_ca", with_route(backend_ca="ca.pem"), f"{R}.backend_ca: {L7_ONLY}"),
    (
        "l4 with backend_server_name",
        with_route(backend_server_name="a.internal"),
        f"{R}.backend_server_name: {L7_ONLY}",
    ),
    (
        "l4 with backend_client_cert",
        with_route(backend_client_cert="client.pem"),
        f"{R}.backend_client_cert: {L7_ONLY}",
    ),
    ("l4 with client_ca", with_route(client_ca="ca.pem"), f"{R}.client_ca: {L7_ONLY}"),
    (
        "backend_ca without backend_tls",
        with_route(**L7, backend_ca="ca.pem"),
        f"{R}.backend_ca: only with backend_tls: true (the backend leg is cleartext otherwise)",
    ),
    (
        "backend_ca missing file",
        with_route(**TLS_L7, backend_ca="nope.pem"),
        f"{R}.backend_ca: file not found",
    ),
    (
        "backend_ca not a CA file",
        with_route(**TLS_L7, backend_ca="client.key"),
        f"{R}.backend_ca: is not a PEM file of CA certificates",
    ),
    (
        "client_ca missing file",
        with_route(**L7, client_ca="nope.pem"),
        f"{R}.client_ca: file not found",
    ),
    (
        "backend_server_name invalid",
        with_route(**TLS_L7, backend_server_name="not a name"),
        f"{R}.backend_server_name: 'not a name' is not a DNS hostname or an IP address",
    ),
    (
        "client cert without key",
        with_route(**TLS_L7, backend_client_cert="client.pem"),
        f"{R}.backend_client_key: required with backend_client_cert (a certificate and its key)",
    ),
    (
        "client key without cert",
        with_route(**TLS_L7, backend_client_key="client.key"),
        f"{R}.backend_client_cert: required with backend_client_key (a certificate and its key)",
    ),
    (
        "client cert and key mismatch",
        with_route(
            **TLS_L7, backend_client_cert="client.pem", backend_client_key="example.com.key"
        ),
        f"{R}.backend_client_key: does not match the certificate in backend_client_cert",
    ),
    (
        "client cert missing",
        with_route(**TLS_L7, backend_client_cert="nope.pem", backend_client_key="client.key"),
        f"{R}.backend_client_cert: file not found",
    ),
]


@pytest.mark.parametrize(
    ("data", "expected"),
    [pytest.param(data, expected, id=name) for name, data, expected in SECOND_BATCH_REJECTIONS],
)
def test_second_batch_rejection_names_field_path_and_reason(
    tmp_path: Path, trust: Path, data: dict[str, Any], expected: str
) -> None:
    found = problems(tmp_path, data)
    assert any(p == expected or p.startswith(expected + " (") for p in found), found
    assert len(found) == 1, found


def test_wildcard_and_catch_all_hostnames_are_distinct_routes(tmp_path: Path) -> None:
    data = with_route(hostname="*.example.com")
    data["listeners"][0]["routes"] += [
        {"hostname": "example.com", "backend": "10.0.0.1:1"},
        {"hostname": "*", "backend": "10.0.0.1:2"},
        {"hostname": "*.EXAMPLE.com", "backend": "10.0.0.1:3"},
    ]
    assert problems(tmp_path, data) == [
        "listeners[0].routes[3].hostname: duplicate of routes[0] (*.example.com)"
    ]


def test_load_settings_reads_process_settings_and_leaves_the_seed_unjudged(
    tmp_path: Path,
) -> None:
    data = {
        "workers": 3,
        "proxy": {"idle_timeout": "7s"},
        "firewall": {"rate_limit": 5, "blocked_ips": ["not an ip"]},
        "listeners": [
            {"addr": ":8443", "routes": [{"hostname": "a.test", "backend": "nowhere"}]},
            {"addr": "bad", "rotues": []},
        ],
    }
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as full:
        load_config(str(path))
    config, seed = load_settings(str(path))
    assert (config.workers, config.proxy.idle_timeout, config.firewall.rate_limit) == (3, 7.0, 5)
    assert config.seed.listeners == {} and not config.seed.firewall.blocked_ips
    with pytest.raises(ConfigError) as taken:
        seed.take()  # judged as `mc-proxy check` judges it: the same messages
    assert taken.value.problems == full.value.problems


def test_load_settings_seed_matches_load_config(tmp_path: Path) -> None:
    data = {
        "workers": 2,
        "firewall": {"blocked_cidrs": ["192.0.2.0/24"]},
        "listeners": [
            {"addr": ":8443", "routes": [{"hostname": "a.test", "backend": "127.0.0.1:1"}]}
        ],
    }
    path = write(tmp_path, data)
    full = load_config(str(path))
    config, seed = load_settings(str(path))
    assert config == dataclasses.replace(full, seed=config.seed)
    assert seed.take() == full.seed


def test_load_settings_reports_process_setting_problems(tmp_path: Path) -> None:
    path = write(tmp_path, {"workers": -1, "proxy": {"idle_timeout": "soon"}, "listeners": "x"})
    with pytest.raises(ConfigError) as exc:
        load_settings(str(path))
    fields = {problem.split(": ")[1] for problem in exc.value.problems}
    assert fields == {"workers", "proxy.idle_timeout"}
