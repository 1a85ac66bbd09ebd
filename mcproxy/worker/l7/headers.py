"""What a request and a response look like on the other side of the proxy.

Both legs speak in one form: an HTTP/2 header list of ``(name, value)``
bytes pairs, names in lower case, pseudo-headers first. HTTP/1.1 messages
are converted into it on the way in and back out of it on the way out.

Forwarding rules (RFC 9110 section 7.6.1): hop-by-hop fields, and any field
named in ``Connection``, describe one connection and are dropped; ``te`` is
the exception when it says ``trailers``, which gRPC needs. ``X-Forwarded-For``
and ``X-Real-IP`` are *set* to the real client address, replacing whatever
the client sent so that it cannot spoof them, and ``X-Forwarded-Proto`` to
``https``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

from mcproxy.model import L7Policy, PolicyKind

__all__ = [
    "HOP_BY_HOP",
    "Headers",
    "blocked_by",
    "end_to_end",
    "for_backend",
    "h1_to_h2_request",
    "h2_to_h1_response",
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
_FORWARDING = frozenset({b"x-forwarded-for", b"x-real-ip", b"x-forwarded-proto"})
_H1_ONLY = frozenset({b"host", b"expect"})
"""``host`` becomes ``:authority``; ``expect: 100-continue`` is answered by the proxy."""


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


def _without_hop_by_hop(headers: Sequence[tuple[bytes, bytes]], drop: frozenset[bytes]) -> Headers:
    named = _connection_tokens(headers)
    kept: Headers = []
    for name, value in headers:
        if name == b"te":
            if value.strip().lower() == b"trailers":
                kept.append((b"te", b"trailers"))
        elif name not in HOP_BY_HOP and name not in drop and name not in named:
            kept.append((name, value))
    return kept


def for_backend(headers: Sequence[tuple[bytes, bytes]], client_ip: str) -> Headers:
    """The request header list to send to the backend (pseudo-headers stay first)."""
    kept = _without_hop_by_hop(headers, _FORWARDING | _H1_ONLY)
    if not any(name == b":authority" for name, _ in kept):
        host = next((value for name, value in headers if name == b"host"), None)
        if host is not None:  # an HTTP/2 request may carry Host instead of :authority
            pseudo = sum(1 for name, _ in kept if name.startswith(b":"))
            kept.insert(pseudo, (b":authority", host))
    ip = client_ip.encode("ascii")
    kept += [(b"x-forwarded-for", ip), (b"x-real-ip", ip), (b"x-forwarded-proto", b"https")]
    return kept


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
