"""Forwarding rules and policies on header lists."""

from __future__ import annotations

from mcproxy.model import L7Policy, PolicyKind
from mcproxy.worker.l7.headers import (
    blocked_by,
    end_to_end,
    for_backend,
    h1_to_h2_request,
    h2_to_h1_response,
)


def test_for_backend_replaces_forwarding_headers_and_drops_hop_by_hop() -> None:
    headers = [
        (b":method", b"GET"),
        (b":path", b"/"),
        (b"connection", b"close, x-private"),
        (b"x-private", b"secret"),
        (b"keep-alive", b"5"),
        (b"transfer-encoding", b"chunked"),
        (b"te", b"gzip"),
        (b"x-forwarded-for", b"10.0.0.1, 6.6.6.6"),
        (b"x-real-ip", b"6.6.6.6"),
        (b"x-forwarded-proto", b"http"),
        (b"accept", b"*/*"),
    ]
    assert for_backend(headers, "2001:db8::1") == [
        (b":method", b"GET"),
        (b":path", b"/"),
        (b"accept", b"*/*"),
        (b"x-forwarded-for", b"2001:db8::1"),
        (b"x-real-ip", b"2001:db8::1"),
        (b"x-forwarded-proto", b"https"),
    ]


def test_te_trailers_passes_in_canonical_form() -> None:
    assert (b"te", b"trailers") in for_backend([(b"te", b"Trailers ")], "192.0.2.1")


def test_host_becomes_authority_when_an_http2_request_has_none() -> None:
    out = for_backend([(b":method", b"GET"), (b":path", b"/"), (b"host", b"a.test")], "192.0.2.1")
    assert out[:3] == [(b":method", b"GET"), (b":path", b"/"), (b":authority", b"a.test")]


def test_absolute_form_target_gives_authority_and_path() -> None:
    head = h1_to_h2_request(b"GET", b"https://a.test:8443/x?y=1", [], "fallback.test")
    assert head == [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", b"a.test:8443"),
        (b":path", b"/x?y=1"),
    ]


def test_http10_request_without_host_gets_the_route_hostname() -> None:
    head = h1_to_h2_request(b"GET", b"/", [], "web.test")
    assert (b":authority", b"web.test") in head


def test_response_conversion_drops_pseudo_and_hop_by_hop() -> None:
    status, fields = h2_to_h1_response(
        [(b":status", b"404"), (b"connection", b"close"), (b"content-length", b"3")]
    )
    assert (status, fields) == (404, [(b"content-length", b"3")])
    assert end_to_end([(b"grpc-status", b"0"), (b"keep-alive", b"1")]) == [(b"grpc-status", b"0")]


def test_block_user_agent_is_a_case_sensitive_substring() -> None:
    policy = L7Policy(PolicyKind.BLOCK_USER_AGENT, "BadBot")
    assert blocked_by([policy], [(b"user-agent", b"Mozilla BadBot/1.0")]) == policy
    assert blocked_by([policy], [(b"user-agent", b"badbot")]) is None
    assert blocked_by([policy], []) is None


def test_require_header_needs_the_field_present() -> None:
    policy = L7Policy(PolicyKind.REQUIRE_HEADER, "x-api-key")
    assert blocked_by([policy], [(b"accept", b"*/*")]) == policy
    assert blocked_by([policy], [(b"x-api-key", b"")]) is None
