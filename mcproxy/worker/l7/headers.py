"""What a request and a response look like on the other side of the proxy.

Both legs speak in one form: an HTTP/2 header list of ``(name, value)``
bytes pairs, names in lower case, pseudo-headers first. HTTP/1.1 messages
are converted into it on the way in and back out of it on the way out.

Forwarding rules (RFC 9110 section 7.6.1): hop-by-hop fields, and any field
named in ``Connection``, describe one connection and are dropped; ``te`` is
the exception when it says ``trailers``, which gRPC needs. ``X-Forwarded-For``
and ``X-Real-IP`` are *set* to the real client address, replacing whatever
the client sent so that it cannot spoof them, and ``X-Forwarded-Proto`` to
``https``. Client-sent ``Forwarded``, ``X-Forwarded-Host``, ``-Port``,
``-Prefix`` and ``-Client-Cert`` are removed: only the proxy may say them.

Request hygiene (ARCHITECTURE.md, "L7 routes: hostile input"): before a
request goes anywhere, :func:`refusal` checks what the two legs' parsers do
not: field names and values (no NUL, CR or LF, token names), Content-Length
(one, digits only), the header count, ``Host`` against ``:authority``, and
that the authority names this connection's route (else 421). The list *as
forwarded*, our additions included, must fit :data:`MAX_HEADER_LIST_SIZE`
(431), so that a list just under our limit is not pushed over a backend's.
Trailers (:func:`request_trailers`) lose every field that frames, routes or
forwards, so they cannot smuggle ``X-Forwarded-For`` past us.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from urllib.parse import urlsplit

from mcproxy.model import L7Policy, PolicyKind, Route, normalize_hostname

__all__ = [
    "HOP_BY_HOP",
    "MAX_HEADERS",
    "MAX_HEADER_LIST_SIZE",
    "Headers",
    "authority_host",
    "blocked_by",
    "end_to_end",
    "for_backend",
    "h1_to_h2_request",
    "h2_to_h1_response",
    "header_list_size",
    "refusal",
    "request_trailers",
    "status_of",
]

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
        b"http2-settings",
    }
)
_FORWARDING = frozenset(
    {
        b"x-forwarded-for",
        b"x-real-ip",
        b"x-forwarded-proto",
        b"forwarded",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-forwarded-client-cert",
    }
)
"""Set by the proxy alone: whatever the client sent under these names is dropped."""
_NOT_IN_TRAILERS = _FORWARDING | frozenset(
    {
        b"content-length",
        b"content-type",
        b"content-encoding",
        b"host",
        b"trailer",
        b"authorization",
        b"cookie",
        b"expect",
        b"range",
        b"cache-control",
        b"max-forwards",
        b"set-cookie",
    }
)
"""RFC 9110 section 6.5.1: fields that frame, route, authenticate or control a message
are not allowed in trailers; we drop them rather than let a backend merge them."""

MAX_HEADER_LIST_SIZE = 64 * 1024
"""Our SETTINGS_MAX_HEADER_LIST_SIZE (RFC 9113 section 6.5.2: names, values, 32 each),
and the bound of a request head as it will be forwarded, our added fields included."""
MAX_HEADERS = 100
"""Fields in one request head (pseudo-headers aside), as Envoy and HAProxy bound them."""

_TOKEN_NAMES = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+(?:\n[!#$%&'*+\-.^_`|~0-9a-z]+)*")
"""Lower-case field names joined by LF (HTTP/2 names are lower case, RFC 9113 8.2.1): one
match checks them all; a name holding an LF itself was refused by :data:`_BAD_VALUE`."""
_BAD_VALUE = re.compile(rb"[\x00\r\n]")
_DIGITS = re.compile(rb"[0-9]{1,19}")
_H1_ONLY = frozenset({b"host", b"expect"})
"""``host`` becomes ``:authority``; ``expect: 100-continue`` is answered by the proxy."""
_DROPPED = _FORWARDING | _H1_ONLY


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


_REMOVED: dict[frozenset[bytes], frozenset[bytes]] = {}
"""Per ``drop`` set (a few module constants): every name that :func:`_without_hop_by_hop`
must look at twice, so the common field costs one set lookup (bench/l7_legs.py)."""


def _without_hop_by_hop(headers: Sequence[tuple[bytes, bytes]], drop: frozenset[bytes]) -> Headers:
    removed = _REMOVED.get(drop)
    if removed is None:
        removed = _REMOVED[drop] = HOP_BY_HOP | drop
    kept: Headers = []
    connection = False
    for name, value in headers:
        if name not in removed:
            kept.append((name, value))
        elif name == b"te":
            if value.strip().lower() == b"trailers":
                kept.append((b"te", b"trailers"))
        elif name == b"connection":
            connection = True
    if connection:  # rare: drop the fields the Connection header names too (not te: trailers)
        named = _connection_tokens(headers)
        kept = [(name, value) for name, value in kept if name == b"te" or name not in named]
    return kept


def for_backend(headers: Sequence[tuple[bytes, bytes]], client_ip: str) -> Headers:
    """The request header list to send to the backend (pseudo-headers stay first)."""
    kept = _without_hop_by_hop(headers, _DROPPED)
    if not _has_authority(kept):
        host = next((value for name, value in headers if name == b"host"), None)
        if host is not None:  # an HTTP/2 request may carry Host instead of :authority
            pseudo = sum(1 for name, _ in kept if name.startswith(b":"))
            kept.insert(pseudo, (b":authority", host))
    ip = client_ip.encode("ascii")
    kept += [(b"x-forwarded-for", ip), (b"x-real-ip", ip), (b"x-forwarded-proto", b"https")]
    return kept


def _has_authority(headers: Headers) -> bool:
    for name, _ in headers:  # pseudo-headers come first: usually found among them
        if name == b":authority":
            return True
        if not name.startswith(b":"):
            break
    return any(name == b":authority" for name, _ in headers)


def header_list_size(headers: Iterable[tuple[bytes, bytes]]) -> int:
    """The size a SETTINGS_MAX_HEADER_LIST_SIZE bounds: names, values and 32 per field."""
    total = 0
    for name, value in headers:  # a plain loop: about 1.5x faster than sum() over a genexpr
        total += len(name) + len(value) + 32
    return total


def authority_host(authority: bytes) -> str | None:
    """The host of a ``Host`` / ``:authority`` value, as route lookups take it.

    Lower case, port and trailing dot dropped; an IP literal stays as it is
    (brackets dropped), so only a catch-all route can match it. None when the
    value is no host at all (userinfo, garbage). Memoised: a client sends the
    same few values again and again, and parsing one costs more than the rest
    of the request checks together (bench/, ``python -m bench.profile l7_h2``).
    """
    try:
        return _AUTHORITIES[authority]
    except KeyError:
        pass
    host = _parse_authority(authority)
    if len(_AUTHORITIES) >= _AUTHORITIES_MAX:
        _AUTHORITIES.clear()
    _AUTHORITIES[authority] = host
    return host


_AUTHORITIES: dict[bytes, str | None] = {}
_AUTHORITIES_MAX = 4096
"""Bounded: a client sending a new value each time only makes the cache start over."""


def _parse_authority(authority: bytes) -> str | None:
    if b"@" in authority or len(authority) > 300:
        return None
    host = authority
    if host.startswith(b"["):
        end = host.find(b"]")
        rest = host[end + 1 :]
        if end < 0 or (rest and not (rest[:1] == b":" and rest[1:].isdigit())):
            return None
        host = host[1:end]
        try:
            return str(ipaddress.IPv6Address(host.decode("ascii")))
        except (ValueError, UnicodeDecodeError):
            return None
    colon = host.rfind(b":")
    if colon >= 0:
        port = host[colon + 1 :]
        if port and not port.isdigit():
            return None
        host = host[:colon]
    try:
        text = host.decode("ascii")
    except UnicodeDecodeError:
        return None
    if text[-1:].isdigit():
        try:
            return str(ipaddress.IPv4Address(text))
        except ValueError:
            pass
    return normalize_hostname(text)


def refusal(
    head: Sequence[tuple[bytes, bytes]],
    route: Route,
    route_for: Callable[[str], Route | None] | None,
) -> tuple[int, str] | None:
    """Why this request head must not be forwarded, as (status, detail); None if it may.

    ``route`` is the connection's; ``route_for`` finds the route of a hostname on
    this listener (the same matching as SNI). 400 for malformed fields,
    Content-Length or ``Host`` disagreeing with ``:authority``; 431 for too many
    fields; 421 when the authority names another route, or none.
    """
    names: list[bytes] = []
    values: list[bytes] = []
    authority: bytes | None = None
    host: bytes | None = None
    lengths = 0
    for name, value in head:
        if name[:1] == b":":
            if name == b":authority":
                authority = value
            values.append(value)
            continue
        names.append(name)
        values.append(name)
        values.append(value)
        if name == b"host":
            if host is not None:
                return 400, "more than one Host"
            host = value
        elif name == b"content-length":
            lengths += 1
            if lengths > 1 or _DIGITS.fullmatch(value) is None:
                return 400, "invalid or repeated Content-Length"
    if len(names) > MAX_HEADERS:
        return 431, f"{len(names)} header fields"
    if _BAD_VALUE.search(b"\x01".join(values)) is not None:
        return 400, "NUL, CR or LF in a header field"
    if names and _TOKEN_NAMES.fullmatch(b"\n".join(names)) is None:
        return 400, "invalid header name"
    if host is not None and authority is not None and host != authority:
        return 400, "Host and :authority disagree"
    named = authority if authority is not None else host
    if named is None:
        return None  # HTTP/1.0 without Host: the route's own name stands in (h1_to_h2_request)
    hostname = authority_host(named)
    if hostname is None:
        return 400, "invalid authority"
    if hostname == route.hostname:
        return None  # the route itself: the exact name wins any lookup (RouteTable.lookup)
    match = None if route_for is None else route_for(hostname)
    if match is None or match.hostname != route.hostname:
        return 421, "the authority names another route"
    return None


def request_trailers(trailers: Sequence[tuple[bytes, bytes]]) -> Headers:
    """Request trailers as they may be forwarded: no hop-by-hop, framing or forwarding fields."""
    return [
        (name, value)
        for name, value in _without_hop_by_hop(trailers, _NOT_IN_TRAILERS)
        if name[:1] != b":" and name != b"te"
    ]


def end_to_end(headers: Sequence[tuple[bytes, bytes]]) -> Headers:
    """A header or trailer list without its hop-by-hop fields (responses, trailers)."""
    return _without_hop_by_hop(headers, frozenset())


def status_of(headers: Sequence[tuple[bytes, bytes]]) -> int:
    for name, value in headers:
        if name == b":status":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def h1_to_h2_request(
    method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]], default_authority: str
) -> Headers:
    """An HTTP/1.1 request head as an HTTP/2 header list (before :func:`for_backend`).

    The authority is the Host field, or the absolute-form target's, or the
    route's hostname for an HTTP/1.0 request without Host.
    """
    authority = next((v for n, v in headers if n == b"host"), b"")
    path = target
    if not target.startswith(b"/") and target != b"*":
        parts = urlsplit(target)
        if parts.netloc:
            authority = parts.netloc
        path = parts.path or b"/"
        if parts.query:
            path += b"?" + parts.query
    if not authority:
        authority = default_authority.encode("ascii")
    return [
        (b":method", method),
        (b":scheme", b"https"),
        (b":authority", authority),
        (b":path", path),
        *headers,
    ]


def h2_to_h1_response(headers: Sequence[tuple[bytes, bytes]]) -> tuple[int, Headers]:
    """A response (or 1xx) header list as an HTTP/1.1 status and fields."""
    return status_of(headers), [(n, v) for n, v in end_to_end(headers) if not n.startswith(b":")]


def blocked_by(
    policies: Sequence[L7Policy], headers: Sequence[tuple[bytes, bytes]]
) -> L7Policy | None:
    """The first policy that refuses this request, or None.

    ``block_user_agent`` matches a case-sensitive substring of any
    ``user-agent`` value; ``require_header`` needs the (lower-case) field
    present, whatever its value.
    """
    for policy in policies:
        if policy.kind is PolicyKind.BLOCK_USER_AGENT:
            needle = policy.value.encode("utf-8", "surrogateescape")
            if any(n == b"user-agent" and needle in v for n, v in headers):
                return policy
        elif policy.kind is PolicyKind.REQUIRE_HEADER:
            wanted = policy.value.encode("ascii")
            if not any(n == wanted for n, _ in headers):
                return policy
    return None
