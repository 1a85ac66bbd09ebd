"""The per-value checks shared by the config loader and the admin API."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mcproxy import validation
from mcproxy.model import Address, FirewallRuleKind, L7Policy, Mode, PolicyKind, Route
from tests.certs import issue, make_ca, make_self_signed


@pytest.fixture
def pair(tmp_path: Path) -> tuple[str, str]:
    cert, key = make_self_signed(tmp_path, "example.com")
    return str(cert), str(key)


def l7_route(cert: str | None, key: str | None, policies: tuple[L7Policy, ...] = ()) -> Route:
    return Route(
        hostname="example.com",
        backends=(Address("127.0.0.1", 8443),),
        mode=Mode.L7,
        tls_cert=cert,
        tls_key=key,
        policies=policies,
    )


# --- addresses and hostnames ---


def test_backend_address_requires_a_host() -> None:
    with pytest.raises(ValueError, match="has no host"):
        validation.backend_address(":8080")


def test_listener_address_allows_every_address_and_compresses_ipv6() -> None:
    assert validation.listener_address(":443") == Address("", 443)
    assert validation.listener_address("[0:0::0001]:443") == Address("::1", 443)


def test_hostname_is_lower_cased_without_trailing_dot() -> None:
    assert validation.hostname("Example.COM.") == "example.com"


@pytest.mark.parametrize(
    "text", ["a.*.example.com", "*a.example.com", "**", "*.", "exa mple.com", "", "-a.com"]
)
def test_hostname_rejects_non_dns_names(text: str) -> None:
    with pytest.raises(ValueError, match="not a valid DNS hostname"):
        validation.hostname(text)


def test_mode_accepts_either_case_and_rejects_others() -> None:
    assert validation.mode("L7") is Mode.L7
    with pytest.raises(ValueError, match="not one of: l4, l7"):
        validation.mode("l3")


def test_max_connections_refuses_negative() -> None:
    assert validation.max_connections(0) == 0
    with pytest.raises(ValueError, match="0 \\(unlimited\\) or more"):
        validation.max_connections(-1)


# --- firewall ---


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("192.0.2.1", "192.0.2.1"),
        (" 2001:DB8:0:0::1 ", "2001:db8::1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
    ],
)
def test_canonical_ip(text: str, canonical: str) -> None:
    assert validation.canonical_ip(text) == canonical


@pytest.mark.parametrize("text", ["192.0.2.256", "example.com", "fe80::1%eth0", "10.0.0.0/8"])
def test_canonical_ip_rejects_non_addresses(text: str) -> None:
    with pytest.raises(ValueError):
        validation.canonical_ip(text)


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("198.51.100.0/24", "198.51.100.0/24"),
        ("2001:DB8::/32", "2001:db8::/32"),
        ("192.0.2.1", "192.0.2.1/32"),
        ("10.0.0.0/255.0.0.0", "10.0.0.0/8"),
    ],
)
def test_canonical_cidr(text: str, canonical: str) -> None:
    assert validation.canonical_cidr(text) == canonical


def test_canonical_cidr_with_host_bits_suggests_the_network() -> None:
    with pytest.raises(ValueError, match=r"host bits set; did you mean 198\.51\.100\.0/24\?"):
        validation.canonical_cidr("198.51.100.7/24")


def test_canonical_cidr_rejects_bad_prefix() -> None:
    with pytest.raises(ValueError, match="not a network"):
        validation.canonical_cidr("10.0.0.0/33")


def test_canonical_country_upper_cases_two_letters() -> None:
    assert validation.canonical_country("kp") == "KP"


@pytest.mark.parametrize("text", ["USA", "K", "K1", ""])
def test_canonical_country_rejects_non_alpha2(text: str) -> None:
    with pytest.raises(ValueError, match="two-letter ISO 3166-1"):
        validation.canonical_country(text)


def test_firewall_value_dispatches_on_kind() -> None:
    assert validation.firewall_value(FirewallRuleKind.IP, "::ffff:192.0.2.9") == "192.0.2.9"
    assert validation.firewall_value(FirewallRuleKind.CIDR, "10.0.0.0/8") == "10.0.0.0/8"
    assert validation.firewall_value(FirewallRuleKind.COUNTRY, "de") == "DE"


def test_firewall_kind_parses_names() -> None:
    assert validation.firewall_kind("CIDR") is FirewallRuleKind.CIDR
    with pytest.raises(ValueError, match="not one of: ip, cidr, country"):
        validation.firewall_kind("asn")


# --- policies ---


def test_policy_require_header_lower_cases_the_name() -> None:
    assert validation.policy("require_header", "X-API-Key") == L7Policy(
        PolicyKind.REQUIRE_HEADER, "x-api-key"
    )


def test_policy_block_user_agent_keeps_the_value() -> None:
    assert validation.policy("block_user_agent", "BadBot/1.0 (x)") == L7Policy(
        PolicyKind.BLOCK_USER_AGENT, "BadBot/1.0 (x)"
    )


@pytest.mark.parametrize(
    ("kind", "value", "field", "reason"),
    [
        ("block_ip", "x", "type", "not one of: block_user_agent, require_header"),
        ("block_user_agent", "  ", "value", "must not be empty"),
        ("block_user_agent", "a\r\nb", "value", "control characters"),
        ("require_header", "X API Key", "value", "not a valid HTTP header name"),
        ("require_header", "x-key:", "value", "not a valid HTTP header name"),
    ],
)
def test_policy_errors_name_the_field(kind: str, value: str, field: str, reason: str) -> None:
    with pytest.raises(validation.FieldError) as info:
        validation.policy(kind, value)
    assert info.value.field == field
    assert reason in info.value.reason


def test_field_error_is_a_value_error() -> None:
    assert issubclass(validation.FieldError, ValueError)


# --- routes ---


def test_valid_l4_route_has_no_problems() -> None:
    assert validation.route_problems(Route("example.com", (Address("10.0.0.1", 443),))) == []


def test_valid_l7_route_has_no_problems(pair: tuple[str, str]) -> None:
    policies = (L7Policy(PolicyKind.REQUIRE_HEADER, "x-api-key"),)
    assert validation.route_problems(l7_route(*pair, policies=policies)) == []


def test_l4_route_refuses_l7_fields() -> None:
    route = Route(
        "example.com",
        (Address("10.0.0.1", 443),),
        tls_cert="/c.pem",
        tls_key="/k.pem",
        backend_tls=True,
        policies=(L7Policy(PolicyKind.BLOCK_USER_AGENT, "x"),),
    )
    fields = [field for field, _ in validation.route_problems(route)]
    assert fields == ["tls_cert", "tls_key", "backend_tls", "l7_policies"]


def test_l7_route_requires_cert_and_key() -> None:
    problems = validation.route_problems(l7_route(None, None))
    assert problems == [("tls_cert", "required for mode l7"), ("tls_key", "required for mode l7")]


def test_route_hostname_must_be_normalised_and_backend_have_a_host() -> None:
    route = Route("Example.com", (Address("", 443),))
    assert [field for field, _ in validation.route_problems(route)] == ["hostname", "backends[0]"]


def test_route_duplicate_policy_is_a_problem(pair: tuple[str, str]) -> None:
    p = L7Policy(PolicyKind.BLOCK_USER_AGENT, "x")
    problems = validation.route_problems(l7_route(*pair, policies=(p, p)))
    assert problems == [("l7_policies", "duplicate policy block_user_agent 'x'")]


def test_missing_cert_files_are_reported_per_field(tmp_path: Path) -> None:
    problems = validation.route_problems(
        l7_route(str(tmp_path / "nope.pem"), str(tmp_path / "nope.key"))
    )
    assert problems == [("tls_cert", "file not found"), ("tls_key", "file not found")]


def test_relative_cert_path_is_refused(pair: tuple[str, str]) -> None:
    problems = validation.key_pair_problems("cert.pem", pair[1])
    assert problems[0][0] == "tls_cert"
    assert "absolute path" in problems[0][1]


def test_directory_is_not_a_cert_file(tmp_path: Path, pair: tuple[str, str]) -> None:
    problems = validation.key_pair_problems(str(tmp_path), pair[1])
    assert problems == [("tls_cert", "is a directory, not a file")]


def test_mismatched_key_blames_tls_key(tmp_path: Path, pair: tuple[str, str]) -> None:
    _, other_key = make_self_signed(tmp_path, "other.example")
    problems = validation.key_pair_problems(pair[0], str(other_key))
    assert problems == [("tls_key", "does not match the certificate in tls_cert")]


def test_garbage_cert_blames_tls_cert(tmp_path: Path, pair: tuple[str, str]) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    assert validation.key_pair_problems(str(junk), pair[1]) == [
        ("tls_cert", "is not a PEM certificate")
    ]


def test_cert_given_as_key_blames_tls_key(pair: tuple[str, str]) -> None:
    assert validation.key_pair_problems(pair[0], pair[0]) == [
        ("tls_key", "is not a PEM private key")
    ]


def test_encrypted_key_is_refused_without_prompting(tmp_path: Path, pair: tuple[str, str]) -> None:
    key = serialization.load_pem_private_key(Path(pair[1]).read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    problems = validation.key_pair_problems(pair[0], str(encrypted))
    assert problems == [("tls_key", "is encrypted; mc-proxy cannot ask for a passphrase")]


def test_ca_issued_pair_loads(tmp_path: Path) -> None:
    cert, key = issue(make_ca(), "api.example.com", tmp_path)
    assert validation.key_pair_problems(str(cert), str(key)) == []


def test_cert_and_key_in_one_file_load(tmp_path: Path, pair: tuple[str, str]) -> None:
    combined = tmp_path / "combined.pem"
    combined.write_bytes(Path(pair[0]).read_bytes() + Path(pair[1]).read_bytes())
    assert validation.key_pair_problems(str(combined), str(combined)) == []


@pytest.mark.parametrize(
    ("text", "stored"), [("*.Example.COM", "*.example.com"), ("*", "*"), ("A.b", "a.b")]
)
def test_hostname_takes_wildcards_and_the_catch_all(text: str, stored: str) -> None:
    assert validation.hostname(text) == stored


def test_backend_list_problems_name_the_entry() -> None:
    a = Address("10.0.0.1", 1)
    assert validation.backends_problems(()) == [("backends", "at least one backend is required")]
    assert validation.backends_problems((a, Address("", 2), a)) == [
        ("backends[1]", "has no host (':port' only means 'every address')"),
        ("backends[2]", "duplicate of backends[0] (10.0.0.1:1)"),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("least-conn", "(did you mean 'least_conn'?)"),
        ("roundrobin", "(did you mean 'round_robin'?)"),
        ("weighted", "is not one of: round_robin, least_conn, source_ip"),
    ],
)
def test_balance_suggests_the_nearest_choice(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        validation.balance(text)
