"""The HTTP/1.1 client leg's own parsing and framing decisions (llhttp under it).

Where llhttp and h11 disagree, the leg refuses what h11 refused; a
hypothesis differential against h11 checks that no head h11 refuses reaches
a backend, and that any split of a valid pipelined stream gives the same
exchanges. Bytes only (``l7world``).
"""

from __future__ import annotations

import h2.events
import h11
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcproxy.worker.l7.h11front import MAX_HEAD_SIZE, error_response
from tests.unit.l7world import BackendPeer, H11ClientPeer, World

HOST = b"Host: web.test\r\n"
Seen = tuple[bytes, bytes, bytes, list[tuple[bytes, bytes]]]
"""What the backend saw of one request: method, path, body, trailers."""


def _refused(raw: bytes, status: int) -> None:
    world = World()
    client = world.h11_client()
    client.send(raw)
    world.run()
    assert client.received == error_response(status), client.received[:200]
    assert client.io.closed
    assert not world.dials and not world.backends


def _served(world: World, client: H11ClientPeer, raw: bytes) -> BackendPeer:
    client.send(raw)
    world.run()
    (backend,) = world.backends
    return backend


# --- refusals where llhttp is more lenient than h11 ----------------------------------------


def test_a_coding_before_chunked_is_refused_with_501() -> None:
    _refused(
        b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501
    )


def test_http11_needs_exactly_one_host() -> None:
    _refused(b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n", 400)
    _refused(b"GET / HTTP/1.1\r\n" + HOST + HOST + b"\r\n", 400)


def test_versions_other_than_1_0_and_1_1_are_refused() -> None:
    _refused(b"GET / HTTP/2.0\r\n" + HOST + b"\r\n", 505)
    _refused(b"GET / HTTP/1.2\r\n" + HOST + b"\r\n", 400)
    _refused(b"GET /\r\n\r\n", 400)  # HTTP/0.9


def test_a_request_line_with_extra_spaces_is_refused() -> None:
    _refused(b"GET  / HTTP/1.1\r\n" + HOST + b"\r\n", 400)
    _refused(b"GET / HTTP/1.1 \r\n" + HOST + b"\r\n", 400)


def test_a_body_on_an_upgrade_or_connect_request_is_refused() -> None:
    # llhttp would skip the body and hand it over as the upgraded protocol's bytes.
    _refused(
        b"POST / HTTP/1.1\r\n" + HOST + b"Upgrade: h2c\r\nConnection: Upgrade\r\n"
        b"Content-Length: 5\r\n\r\nhello",
        400,
    )
    _refused(b"CONNECT web.test:443 HTTP/1.1\r\n" + HOST + b"Content-Length: 2\r\n\r\nhi", 400)


def test_empty_lines_before_a_request_are_refused_as_h11_did() -> None:
    _refused(b"\r\nGET / HTTP/1.1\r\n" + HOST + b"\r\n", 400)
    _refused(b"\rGET / HTTP/1.1\r\n" + HOST + b"\r\n", 400)


def test_unknown_methods_get_501_and_bad_bytes_400() -> None:
    _refused(b"BREW / HTTP/1.1\r\n" + HOST + b"\r\n", 501)
    _refused(b"G:ET / HTTP/1.1\r\n" + HOST + b"\r\n", 400)
    _refused(b"GET / HTTP/1.1\r\n" + HOST + b"X-A: 1\x012\r\n\r\n", 400)
    _refused(b"GET /a\x7f HTTP/1.1\r\n" + HOST + b"\r\n", 400)
    _refused(b"GET / HTTP/1.1\r\nHost : web.test\r\n\r\n", 400)


def test_bare_lf_line_ends_are_refused() -> None:
    _refused(b"GET / HTTP/1.1\nHost: web.test\n\n", 400)
    _refused(b"GET / HTTP/1.1\r\nHost: web.test\n\r\n", 400)


def test_field_values_lose_trailing_whitespace() -> None:
    world = World()
    client = world.h11_client()
    backend = _served(world, client, b"GET / HTTP/1.1\r\nHost: web.test \r\nX-A: 1 \t\r\n\r\n")
    (request,) = backend.requests()
    assert (b"x-a", b"1") in request.headers
    assert (b":authority", b"web.test") in request.headers


def test_too_many_trailers_reset_the_connection() -> None:
    world = World()
    client = world.h11_client()
    trailers = b"".join(b"x-%d: 1\r\n" % i for i in range(200))
    backend = _served(
        world,
        client,
        b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n"
        b"2\r\nhi\r\n0\r\n" + trailers + b"\r\n",
    )
    world.run()
    assert client.io.aborted
    assert not any(isinstance(e, h2.events.TrailersReceived) for e in backend.events)


def test_endless_trailers_are_cut_at_the_head_limit() -> None:
    world = World()
    client = world.h11_client()
    backend = _served(
        world,
        client,
        b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nx-a: ",
    )
    for _ in range(4):
        if client.leg.closed:
            break
        client.send(b"a" * (MAX_HEAD_SIZE // 2))
        world.run()
    assert client.io.aborted
    (request,) = backend.requests()
    assert not backend.of(request.stream_id, h2.events.TrailersReceived)


def test_a_websocket_refused_locally_keeps_the_connection() -> None:
    world = World()  # an h2 backend: no WebSockets (501, from the router itself)
    client = world.h11_client()
    client.send(
        b"GET /ws HTTP/1.1\r\n" + HOST + b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    world.run()
    ((response, _, _),) = client.responses()
    assert response.status_code == 501 and len(world.finished) == 1
    client.send(b"GET /next HTTP/1.1\r\n" + HOST + b"\r\n")
    world.run()
    (backend,) = world.backends
    assert [dict(r.headers)[b":path"] for r in backend.requests()] == [b"/next"]


# --- framing ----------------------------------------------------------------------------


def test_pipelined_after_a_chunked_body_holding_crlf_crlf() -> None:
    world = World()
    client = world.h11_client()
    body = b"a\r\n\r\n0\r\n\r\nb"
    backend = _served(
        world,
        client,
        b"POST /1 HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n"
        b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
        b"GET /2 HTTP/1.1\r\n" + HOST + b"\r\n",
    )
    (first,) = backend.requests()
    assert backend.body(first.stream_id) == body
    backend.respond(first.stream_id, b"one")
    world.run()
    second = backend.requests()[1]
    assert dict(second.headers)[b":path"] == b"/2"
    backend.respond(second.stream_id, b"two")
    world.run()
    assert [b for _, b, _ in client.responses()] == [b"one", b"two"]


def test_http10_gets_a_close_delimited_body_and_a_close() -> None:
    world = World()
    client = world.h11_client()
    backend = _served(world, client, b"GET / HTTP/1.0\r\n\r\n")
    (request,) = backend.requests()
    assert (b":authority", b"web.test") in request.headers  # no Host: the route's name
    backend.respond(request.stream_id, b"old")
    world.run()
    head, _, body = client.received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"transfer-encoding" not in head and b"content-length" not in head
    assert b"connection: close" in head
    assert body == b"old"
    assert client.io.closed


def test_http10_keep_alive_still_closes_after_the_response() -> None:
    world = World()
    client = world.h11_client()
    backend = _served(world, client, b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    (request,) = backend.requests()
    backend.conn.send_headers(request.stream_id, [(b":status", b"200"), (b"content-length", b"2")])
    backend.conn.send_data(request.stream_id, b"ok", end_stream=True)
    world.run()
    assert client.received.endswith(b"connection: close\r\n\r\nok")
    assert client.io.closed


def test_head_204_and_304_responses_carry_no_body() -> None:
    for method, status in ((b"HEAD", 200), (b"GET", 204), (b"GET", 304)):
        world = World()
        client = world.h11_client()
        backend = _served(world, client, method + b" / HTTP/1.1\r\n" + HOST + b"\r\n")
        (request,) = backend.requests()
        fields = [(b":status", b"%d" % status)]
        if method == b"HEAD":
            fields.append((b"content-length", b"1234"))
        backend.conn.send_headers(request.stream_id, fields, end_stream=True)
        world.run()
        head, _, rest = client.received.partition(b"\r\n\r\n")
        assert rest == b"" and b"transfer-encoding" not in head, (method, status)
        assert (b"content-length: 1234" in head) is (method == b"HEAD")
        assert not client.io.closed
        client.send(b"GET /next HTTP/1.1\r\n" + HOST + b"\r\n")  # still keep-alive
        world.run()
        assert len(backend.requests()) == 2


def test_a_content_length_response_is_sent_as_is_and_trailers_are_dropped() -> None:
    world = World()
    client = world.h11_client()
    backend = _served(world, client, b"GET / HTTP/1.1\r\n" + HOST + b"\r\n")
    (request,) = backend.requests()
    sid = request.stream_id
    backend.conn.send_headers(sid, [(b":status", b"200"), (b"content-length", b"5")])
    backend.conn.send_data(sid, b"hello")
    backend.conn.send_headers(sid, [(b"x-t", b"1")], end_stream=True)
    world.run()
    ((response, body, trailers),) = client.responses()
    assert dict(response.headers)[b"content-length"] == b"5"
    assert body == b"hello" and trailers == []
    assert not client.io.closed


def test_a_backend_body_longer_than_its_content_length_resets_the_client() -> None:
    world = World()
    client = world.h11_client()
    backend = _served(world, client, b"GET / HTTP/1.1\r\n" + HOST + b"\r\n")
    (request,) = backend.requests()
    backend.conn.send_headers(request.stream_id, [(b":status", b"200"), (b"content-length", b"2")])
    world.run()
    client.leg.send_body(b"toolong", False)  # what a broken backend leg would pass on
    assert client.io.aborted
    assert client.leg.outcome == "backend_protocol_error"


def test_connection_close_from_the_client_closes_after_the_response() -> None:
    world = World()
    client = world.h11_client()
    backend = _served(world, client, b"GET / HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n")
    (request,) = backend.requests()
    backend.respond(request.stream_id, b"bye")
    world.run()
    ((response, body, _),) = client.responses()
    assert dict(response.headers)[b"connection"] == b"close" and body == b"bye"
    assert client.io.closed


# --- properties ---------------------------------------------------------------------------


_BODY = st.binary(max_size=40) | st.sampled_from([b"\r\n\r\n", b"0\r\n\r\n", b"a\r\n\r\n0\r\n"])


@st.composite
def _requests(draw: st.DrawFn) -> tuple[bytes, Seen]:
    """One request's bytes, and what the backend must see of it."""
    kind = draw(st.sampled_from(["get", "length", "chunked"]))
    path = b"/" + draw(st.text("abc/%=?", max_size=8)).encode()
    if kind == "get":
        return b"GET " + path + b" HTTP/1.1\r\n" + HOST + b"\r\n", (b"GET", path, b"", [])
    body = draw(_BODY)
    if kind == "length":
        raw = b"POST " + path + b" HTTP/1.1\r\n" + HOST + b"Content-Length: %d\r\n\r\n" % len(body)
        return raw + body, (b"POST", path, body, [])
    sizes = draw(st.lists(st.integers(1, 16), max_size=4))
    chunks, rest = [], body
    for size in sizes:
        if rest:
            chunks.append(rest[:size])
            rest = rest[size:]
    if rest:
        chunks.append(rest)
    trailers = draw(st.sampled_from([[], [(b"x-sum", b"1")], [(b"x-a", b"1"), (b"x-b", b"")]]))
    raw = b"PUT " + path + b" HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n"
    raw += b"".join(b"%x\r\n" % len(c) + c + b"\r\n" for c in chunks) + b"0\r\n"
    raw += b"".join(n + b": " + v + b"\r\n" for n, v in trailers) + b"\r\n"
    return raw, (b"PUT", path, body, trailers)


def _drive(pieces: list[bytes]) -> tuple[list[Seen], int]:
    """Feed the pieces as reads (only while the leg reads), answering each request once whole."""
    world = World()
    client = world.h11_client()
    answered: set[tuple[int, int]] = set()
    seen: list[Seen] = []
    for _ in range(10 * len(pieces) + 20):
        if pieces and client.io.reading and not client.leg.closed:
            client.leg.receive_data(pieces.pop(0))
        world.run()
        moved = False
        for b, backend in enumerate(world.backends):
            for request in backend.requests():
                sid = request.stream_id
                if (b, sid) in answered or not backend.of(sid, h2.events.StreamEnded):
                    continue
                answered.add((b, sid))
                fields = dict(request.headers)
                trailers = [
                    (n, v)
                    for t in backend.of(sid, h2.events.TrailersReceived)
                    for n, v in t.headers
                ]
                seen.append((fields[b":method"], fields[b":path"], backend.body(sid), trailers))
                backend.respond(sid, b"r%d" % len(seen))
                moved = True
        world.run()
        if not pieces and not moved:
            break
    assert not client.io.aborted and not client.io.closed
    return seen, len(client.responses())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_requests(), min_size=1, max_size=4), st.data())
def test_any_split_of_a_pipelined_stream_gives_the_same_exchanges(
    requests: list[tuple[bytes, Seen]],
    data: st.DataObject,
) -> None:
    stream = b"".join(raw for raw, _ in requests)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=8))))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    seen, responses = _drive([p for p in pieces if p])
    assert seen == [expected for _, expected in requests]
    assert responses == len(requests)


_NASTY = [b" ", b"\t", b"\r", b"\n", b"\x00", b"\x01", b"\x7f", b"\xff", b":", b",", b";", b"0"]
_LINES = [
    b"Host: web.test",
    b"Content-Length: 3",
    b"Content-Length: 03",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: identity",
    b"Connection: close",
    b"Expect: 100-continue",
    b"Upgrade: websocket",
    b"Connection: Upgrade",
    b"X-A: b",
    b"X-A:",
]


def _h11_accepts(head: bytes) -> bool:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_SIZE)
    conn.receive_data(head)
    try:
        return isinstance(conn.next_event(), h11.Request)
    except h11.RemoteProtocolError:
        return False


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from([b"GET", b"POST", b"HEAD", b"OPTIONS"]),
    st.lists(st.sampled_from(_LINES), max_size=5),
    st.lists(st.tuples(st.integers(0, 200), st.sampled_from(_NASTY)), max_size=3),
)
def test_a_head_h11_refuses_never_reaches_a_backend(
    method: bytes, lines: list[bytes], mutations: list[tuple[int, bytes]]
) -> None:
    head = bytearray(method + b" /p HTTP/1.1\r\n" + b"".join(line + b"\r\n" for line in lines))
    for at, byte in mutations:
        head[at % len(head) : at % len(head)] = byte
    raw = bytes(head) + b"\r\n"
    if _h11_accepts(raw):
        return
    world = World()
    client = world.h11_client()
    client.send(raw + b"abc")
    world.run()
    assert not any(backend.requests() for backend in world.backends), raw
    assert client.received[:9] in (b"", b"HTTP/1.1 ") and (
        client.received == b"" or client.received[9:10] in b"45"
    ), (raw, client.received[:40])
