"""Per-value checks shared by the config loader and the admin API.

There is one definition of what a valid hostname, backend, firewall value or
L7 policy is, so a value the YAML accepts is a value ``mcproxyctl`` accepts,
and both store it in the same canonical form (the store and ``remove``
commands compare canonical strings).

The contract has two shapes:

* value functions (``canonical_ip``, ``hostname``, ``policy``...) take the
  text an operator typed and return the canonical value, or raise
  :class:`ValueError` whose message is the human reason, without the field
  name: the caller knows which field it passed (config: the field path;
  admin API: the request field). :class:`FieldError`, a ``ValueError``, is
  raised where one call covers several fields and says which one failed.
* :func:`route_problems` checks a whole :class:`~mcproxy.model.Route` for the
  rules between its fields and for its certificate files, and returns
  ``(field, reason)`` pairs; an empty list means the route is valid.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import ssl
from enum import StrEnum
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mcproxy import ip as _ip
from mcproxy.model import (
    Address,
    BackendProtocol,
    Balance,
    FirewallRuleKind,
    HealthCheck,
    HealthCheckKind,
    L7Policy,
    Mode,
    PolicyKind,
    Route,
    normalize_hostname,
    normalize_route_hostname,
    parse_address,
)

__all__ = [
    "FieldError",
    "backend_address",
    "backend_protocol",
    "backends_problems",
    "balance",
    "ca_file_problems",
    "canonical_cidr",
    "canonical_country",
    "canonical_ip",
    "firewall_kind",
    "firewall_value",
    "header_name",
    "health_check_kind",
    "health_check_problems",
    "hostname",
    "key_pair_problems",
    "listener_address",
    "max_connections",
    "mode",
    "policy",
    "route_problems",
    "server_name",
]


class FieldError(ValueError):
    """A ``ValueError`` that also names the field at fault.

    ``field`` uses the config's names (``type``, ``value``); the admin API maps
    them onto its request fields.
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason


# --- addresses and hostnames ----------------------------------------------------


def _canonical_host(addr: Address) -> Address:
    """Compress IP literals (``[::0001]`` -> ``[::1]``) so equal addresses compare equal."""
    try:
        return Address(str(ipaddress.ip_address(addr.host)), addr.port)
    except ValueError:
        return addr


def listener_address(text: str) -> Address:
    """A listen address: ``host:port``, ``:port`` (every address) or ``[v6]:port``."""
    return _canonical_host(parse_address(text))


def backend_address(text: str) -> Address:
    """A backend address: like a listen address, but a host is required."""
    addr = listener_address(text)
    if not addr.host:
        raise ValueError(f"{text.strip()!r} has no host (':port' only means 'every address')")
    return addr


def hostname(text: str) -> str:
    """A route hostname in the lower-case form routes are stored and matched under.

    An exact name, ``*.example.com`` (one label) or ``*`` (the catch-all):
    :func:`mcproxy.model.normalize_route_hostname` is the judge.
    """
    name = normalize_route_hostname(text)
    if name is None:
        raise ValueError(
            f"{text!r} is not a valid DNS hostname (an exact name, '*.example.com'"
            " for one more label, or '*' for every other name)"
        )
    return name


def max_connections(value: int) -> int:
    """A listener's connection limit; 0 means unlimited."""
    if value < 0:
        raise ValueError(f"must be 0 (unlimited) or more, got {value}")
    return value


_E = TypeVar("_E", bound=StrEnum)


def _choice(kind: type[_E], text: str) -> _E:
    """``text`` as a member of ``kind``; the error lists the choices and the nearest one."""
    try:
        return kind(text.strip().lower())
    except ValueError:
        names = [member.value for member in kind]
        close = difflib.get_close_matches(text.strip().lower(), names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{text!r} is not one of: {', '.join(names)}{hint}") from None


def mode(text: str) -> Mode:
    return _choice(Mode, text)


def balance(text: str) -> Balance:
    return _choice(Balance, text)


def backend_protocol(text: str) -> BackendProtocol:
    return _choice(BackendProtocol, text)


def health_check_kind(text: str) -> HealthCheckKind:
    return _choice(HealthCheckKind, text)


# --- firewall -------------------------------------------------------------------


def canonical_ip(text: str) -> str:
    """An IP address in compressed form; IPv4-mapped IPv6 becomes plain IPv4.

    A dual-stack listener sees IPv4 clients as ``::ffff:a.b.c.d``; the firewall
    compares against the plain form, so ``::ffff:192.0.2.1`` blocks 192.0.2.1.
    """
    text = text.strip()
    if "%" in text:
        raise ValueError(f"{text!r}: zone ids (%eth0) cannot match a client address")
    try:
        return _ip.canonical_ip(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None


def canonical_cidr(text: str) -> str:
    """A network as ``address/prefix``; a bare address is a /32 or /128.

    Host bits set (``198.51.100.7/24``) is refused rather than masked: the
    operator may have meant the /32, so the message names the network instead.
    """
    text = text.strip()
    if "%" in text:
        raise ValueError(f"{text!r}: zone ids (%eth0) cannot match a client address")
    try:
        net = ipaddress.ip_network(text)
    except ValueError:
        try:
            suggestion = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"{text!r} is not a network (expected address/prefix)") from None
        raise ValueError(f"{text!r} has host bits set; did you mean {suggestion}?") from None
    return str(net)


_COUNTRY = re.compile(r"^[A-Za-z]{2}$")


def canonical_country(text: str) -> str:
    """An ISO 3166-1 alpha-2 code, upper-cased as GeoLite2 reports it."""
    text = text.strip()
    if not _COUNTRY.match(text):
        raise ValueError(f"{text!r} is not a two-letter ISO 3166-1 country code")
    return text.upper()


def firewall_kind(text: str) -> FirewallRuleKind:
    try:
        return FirewallRuleKind(text.strip().lower())
    except ValueError:
        raise ValueError(f"{text!r} is not one of: ip, cidr, country") from None


def firewall_value(kind: FirewallRuleKind, value: str) -> str:
    """The canonical form of a firewall rule's value for its kind."""
    match kind:
        case FirewallRuleKind.IP:
            return canonical_ip(value)
        case FirewallRuleKind.CIDR:
            return canonical_cidr(value)
        case FirewallRuleKind.COUNTRY:
            return canonical_country(value)
    raise TypeError(f"not a firewall rule kind: {kind!r}")  # pragma: no cover


# --- L7 policies ------------------------------------------------------------------

# RFC 9110 section 5.1: a field name is a token.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def header_name(text: str) -> str:
    """An HTTP field name, lower-cased: HTTP/2 carries names in lower case only."""
    text = text.strip()
    if not _TOKEN.match(text):
        raise ValueError(f"{text!r} is not a valid HTTP header name")
    return text.lower()


def policy(kind_text: str, value: str) -> L7Policy:
    """An L7 policy from its type and value. Raises :class:`FieldError` (``type`` or ``value``).

    ``block_user_agent`` values are kept as typed (a case-sensitive
    substring); ``require_header`` values are lower-cased header names.
    """
    try:
        kind = PolicyKind(kind_text.strip().lower())
    except ValueError:
        raise FieldError(
            "type", f"{kind_text!r} is not one of: block_user_agent, require_header"
        ) from None
    if not value.strip():
        raise FieldError("value", "must not be empty")
    if kind is PolicyKind.REQUIRE_HEADER:
        try:
            return L7Policy(kind, header_name(value))
        except ValueError as exc:
            raise FieldError("value", str(exc)) from None
    if _CONTROL.search(value):
        raise FieldError("value", "must not contain control characters")
    return L7Policy(kind, value)


# --- routes -----------------------------------------------------------------------------


_L7_ONLY = "only for mode l7 (l4 passes the client's TLS through untouched)"


def route_problems(route: Route) -> list[tuple[str, str]]:
    """Everything wrong with ``route`` as ``(field, reason)`` pairs; empty means valid.

    Checks the hostname and backend forms, the rules that tie fields to the
    mode (certificates, ``backend_tls``, policies, ``backend_protocol: h1``
    and the trust fields are L7 only; L7 needs a certificate and key), the
    health check, and that every file loads as a worker will load it. Field
    names are the config's (``tls_cert``, ``l7_policies``, ``backends[1]``,
    ``health_check.timeout``...).
    """
    problems: list[tuple[str, str]] = []
    if normalize_route_hostname(route.hostname) != route.hostname:
        problems.append(("hostname", f"{route.hostname!r} is not a lower-case route hostname"))
    problems += backends_problems(route.backends)
    if route.health_check is not None:
        problems += [
            (f"health_check.{name}", reason)
            for name, reason in health_check_problems(route.health_check)
        ]
    if route.mode is Mode.L4:
        for name, set_ in (
            ("tls_cert", route.tls_cert is not None),
            ("tls_key", route.tls_key is not None),
            ("backend_tls", route.backend_tls),
            ("l7_policies", bool(route.policies)),
            ("backend_protocol", route.backend_protocol is not BackendProtocol.H2),
            ("backend_ca", route.backend_ca is not None),
            ("backend_server_name", route.backend_server_name is not None),
            ("backend_client_cert", route.backend_client_cert is not None),
            ("backend_client_key", route.backend_client_key is not None),
            ("client_ca", route.client_ca is not None),
        ):
            if set_:
                problems.append((name, _L7_ONLY))
        return problems
    for name, path in (("tls_cert", route.tls_cert), ("tls_key", route.tls_key)):
        if path is None:
            problems.append((name, "required for mode l7"))
        elif route.tls_cert is None or route.tls_key is None:
            # No pair to load, but the file given can still be judged on its own.
            problems += [(name, reason) for reason in filter(None, [_read_problem(path)])]
    seen: set[L7Policy] = set()
    for p in route.policies:
        try:
            canonical = policy(p.kind, p.value)
        except FieldError as exc:
            problems.append(("l7_policies", f"{p.kind} {p.value!r}: {exc.reason}"))
            continue
        if canonical in seen:
            problems.append(("l7_policies", f"duplicate policy {p.kind} {p.value!r}"))
        seen.add(canonical)
    if route.tls_cert is not None and route.tls_key is not None:
        problems += key_pair_problems(route.tls_cert, route.tls_key)
    problems += _trust_problems(route)
    return problems


def backends_problems(backends: tuple[Address, ...]) -> list[tuple[str, str]]:
    """A route's backend list: at least one, each with a host, no address twice."""
    if not backends:
        return [("backends", "at least one backend is required")]
    problems: list[tuple[str, str]] = []
    seen: dict[Address, int] = {}
    for i, addr in enumerate(backends):
        if not addr.host:
            problems.append((f"backends[{i}]", "has no host (':port' only means 'every address')"))
        elif addr in seen:
            problems.append((f"backends[{i}]", f"duplicate of backends[{seen[addr]}] ({addr})"))
        seen.setdefault(addr, i)
    return problems


_URL_PATH = re.compile(r"^/[!-~]*$")


def health_check_problems(check: HealthCheck) -> list[tuple[str, str]]:
    """``(field, reason)`` pairs with field names inside ``health_check`` (``interval``...)."""
    problems: list[tuple[str, str]] = []
    if not check.interval > 0:
        problems.append(("interval", "must be greater than zero"))
    if not check.timeout > 0:
        problems.append(("timeout", "must be greater than zero"))
    elif check.interval > 0 and check.timeout >= check.interval:
        problems.append(
            (
                "timeout",
                f"must be shorter than interval ({check.timeout:g}s >= {check.interval:g}s)",
            )
        )
    if not _URL_PATH.match(check.path) or "#" in check.path:
        problems.append(("path", f"{check.path!r} must start with '/' (no spaces, no fragment)"))
    for name, value in (("rise", check.rise), ("fall", check.fall)):
        if value < 1:
            problems.append((name, f"must be 1 or more, got {value}"))
    return problems


def server_name(text: str) -> str:
    """A backend's TLS name (SNI and the name verified): a DNS name or an IP address."""
    text = text.strip()
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    name = normalize_hostname(text)
    if name is None:
        raise ValueError(f"{text!r} is not a DNS hostname or an IP address")
    return name


def _trust_problems(route: Route) -> list[tuple[str, str]]:
    """The L7 backend-trust and client-certificate fields."""
    problems: list[tuple[str, str]] = []
    needs_tls = "only with backend_tls: true (the backend leg is cleartext otherwise)"
    for name, value in (
        ("backend_ca", route.backend_ca),
        ("backend_server_name", route.backend_server_name),
        ("backend_client_cert", route.backend_client_cert),
        ("backend_client_key", route.backend_client_key),
    ):
        if value is not None and not route.backend_tls:
            problems.append((name, needs_tls))
    if route.backend_server_name is not None:
        try:
            if server_name(route.backend_server_name) != route.backend_server_name:
                problems.append(("backend_server_name", "must be lower-case"))
        except ValueError as exc:
            problems.append(("backend_server_name", str(exc)))
    for name, path in (("backend_ca", route.backend_ca), ("client_ca", route.client_ca)):
        if path is not None:
            problems += [(name, reason) for reason in ca_file_problems(path)]
    cert, key = route.backend_client_cert, route.backend_client_key
    if (cert is None) != (key is None):
        missing = "backend_client_key" if key is None else "backend_client_cert"
        given = "backend_client_cert" if key is None else "backend_client_key"
        problems.append((missing, f"required with {given} (a certificate and its key)"))
        present = cert or key or ""
        problems += [(given, reason) for reason in filter(None, [_read_problem(present)])]
    elif cert is not None and key is not None:
        problems += key_pair_problems(
            cert, key, cert_field="backend_client_cert", key_field="backend_client_key"
        )
    return problems


def ca_file_problems(path: str) -> list[str]:
    """Whether ``path`` is a readable PEM file of CA certificates, as the worker will load it."""
    reason = _read_problem(path)
    if reason is not None:
        return [reason]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=path)
    except (ssl.SSLError, ValueError) as exc:
        return [f"is not a PEM file of CA certificates ({getattr(exc, 'reason', None) or exc})"]
    return []


class _EncryptedKeyError(Exception):
    pass


def _refuse_password() -> bytes:
    """Passed to load_cert_chain so an encrypted key fails instead of prompting on the tty."""
    raise _EncryptedKeyError


def _read_problem(path: str) -> str | None:
    if not path:
        return "must not be empty"
    if not os.path.isabs(path):
        return f"{path!r} must be an absolute path (the server's working directory is not yours)"
    try:
        with open(path, "rb"):
            return None
    except FileNotFoundError:
        return "file not found"
    except IsADirectoryError:
        return "is a directory, not a file"
    except PermissionError:
        return "permission denied"
    except OSError as exc:
        return exc.strerror or str(exc)


def key_pair_problems(
    cert_path: str, key_path: str, *, cert_field: str = "tls_cert", key_field: str = "tls_key"
) -> list[tuple[str, str]]:
    """Whether a certificate chain and private key load together, as ``(field, reason)`` pairs.

    ``ssl.SSLContext.load_cert_chain`` is the judge, since that is what the
    worker runs; ``cryptography`` only refines a failure into which file is at
    fault. Both paths must be absolute. The field names default to the route
    certificate's; the backend client certificate passes its own.
    """
    problems = [
        (name, reason)
        for name, path in ((cert_field, cert_path), (key_field, key_path))
        if (reason := _read_problem(path)) is not None
    ]
    if problems:
        return problems
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_path, key_path, password=_refuse_password)
    except _EncryptedKeyError:
        return [(key_field, "is encrypted; mc-proxy cannot ask for a passphrase")]
    except ssl.SSLError as exc:
        return [_diagnose(cert_path, key_path, exc, cert_field, key_field)]
    return []


def _diagnose(
    cert_path: str, key_path: str, exc: ssl.SSLError, cert_field: str, key_field: str
) -> tuple[str, str]:
    with open(cert_path, "rb") as f:
        cert_pem = f.read()
    with open(key_path, "rb") as f:
        key_pem = f.read()
    try:
        x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        return (cert_field, "is not a PEM certificate")
    try:
        serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        return (key_field, "is not a PEM private key")
    if exc.reason == "KEY_VALUES_MISMATCH":
        return (key_field, f"does not match the certificate in {cert_field}")
    return (cert_field, f"cannot be loaded with {key_field}: {exc.reason or exc}")
