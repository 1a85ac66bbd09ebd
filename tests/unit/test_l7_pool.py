"""The backend pool and the per-exchange deadlines, on a manual clock, against h2 peers."""

from __future__ import annotations

import h2.events
import pytest
from h2.errors import ErrorCodes

from mcproxy.worker.l7.frames import encode_goaway
from mcproxy.worker.l7.h2back import H2Back
from mcproxy.worker.l7.pool import (
    MAX_CONNECTIONS,
    MAX_QUEUED_PER_CLIENT,
    BackendPool,
    ConnState,
    header_list_size,
)
from tests.unit.l7world import BackendPeer, FakeIO, World, settings

ONE_STREAM = settings(MAX_CONCURRENT_STREAMS=1)


def only_pool(world: World) -> BackendPool:
    (pool,) = world.groups.values()
    return pool


def status(client: object, sid: int) -> bytes:
    return client.response(sid)[b":status"]  # type: ignore[attr-defined, no-any-return]


def state_of(backend: BackendPeer) -> ConnState:
    return backend.leg.state


def resets(peer: object, sid: int | None = None) -> list[h2.events.StreamReset]:
    events = peer.events  # type: ignore[attr-defined]
    return [
        e
        for e in events
        if isinstance(e, h2.events.StreamReset) and (sid is None or e.stream_id == sid)
    ]


# --- growth, queue, fairness -------------------------------------------------------------------


def test_the_pool_grows_with_demand_up_to_its_bound_then_queues() -> None:
    world = World(backend_settings=settings(MAX_CONCURRENT_STREAMS=2))
    client = world.h2_client()
    for k in range(2 * MAX_CONNECTIONS + 3):
        client.request(f"/{k}", end=False)
    world.run()
    pool = only_pool(world)
    assert len(world.backends) == MAX_CONNECTIONS
    assert [len(b.requests()) for b in world.backends] == [2] * MAX_CONNECTIONS
    assert pool.queued == 3
    assert len(pool.serving) == 2 * MAX_CONNECTIONS


def test_one_connection_serves_many_streams_before_a_second_is_dialed() -> None:
    world = World()
    client = world.h2_client()
    for k in range(10):
        client.request(f"/{k}")
    world.run()
    assert len(world.backends) == 1
    assert len(world.backends[0].requests()) == 10


def test_waiting_for_a_stream_is_bounded_by_connect_timeout_then_503() -> None:
    world = World(backend_settings=ONE_STREAM, connect_timeout=5.0)
    client = world.h2_client()
    sids = [client.request(f"/{k}", end=False) for k in range(MAX_CONNECTIONS + 2)]
    world.run()
    world.advance(4.9)
    assert not client.of(sids[-1], h2.events.ResponseReceived)
    world.advance(0.2)
    for sid in sids[-2:]:
        response = client.response(sid)
        assert response[b":status"] == b"503"
        assert response[b"cache-control"] == b"no-store"
        assert client.body(sid) == b"503 Service Unavailable\n"
    assert only_pool(world).queued == 0
    # The streams that had a backend are untouched.
    assert not client.of(sids[0], h2.events.ResponseReceived)


def test_a_client_holding_its_share_waits_behind_one_holding_fewer() -> None:
    world = World(backend_settings=ONE_STREAM)
    greedy = world.h2_client()
    greedy_sids = [greedy.request(f"/greedy/{k}") for k in range(MAX_CONNECTIONS + 3)]
    world.run()
    polite = world.h2_client()
    polite_sid = polite.request("/polite")
    world.run()
    pool = only_pool(world)
    assert pool.queued == 4
    # One stream frees up: it goes to the client holding none, although greedy queued first.
    first = world.backends[0]
    first.respond(first.requests()[0].stream_id)
    world.run()
    assert [r.headers for r in first.requests()][1][3] == (b":path", b"/polite")
    first.respond(first.requests()[1].stream_id, b"polite")
    world.run()
    assert polite.body(polite_sid) == b"polite"
    # With nobody else waiting, greedy gets the freed streams again (work conserving).
    assert [r.headers[3][1] for r in first.requests()][2] == b"/greedy/8"
    assert greedy.body(greedy_sids[0]) == b"ok"


def test_the_queue_is_served_round_robin_across_client_connections() -> None:
    world = World(backend_settings=ONE_STREAM)
    holder = world.h2_client()
    for k in range(MAX_CONNECTIONS):
        holder.request(f"/hold/{k}")
    world.run()
    a, b = world.h2_client(), world.h2_client()
    for k in range(3):
        a.request(f"/a/{k}")
    world.run()
    for k in range(3):
        b.request(f"/b/{k}")
    world.run()
    held = [(peer, peer.requests()[0].stream_id) for peer in world.backends]
    served: list[bytes] = []
    for peer, backend_sid in held[:6]:
        peer.respond(backend_sid)  # one of holder's streams ends: who gets it?
        world.run()
        served.append(dict(peer.requests()[-1].headers)[b":path"])
    assert served == [b"/a/0", b"/b/0", b"/a/1", b"/b/1", b"/a/2", b"/b/2"]


def test_queued_exchanges_per_client_connection_are_capped() -> None:
    world = World(backend_settings=ONE_STREAM)
    client = world.h2_client()
    for k in range(MAX_CONNECTIONS):
        client.request(f"/held/{k}")
    world.run()
    sids = [client.request(f"/{k}") for k in range(MAX_QUEUED_PER_CLIENT + 5)]
    world.run()
    assert len(only_pool(world).serving) == MAX_CONNECTIONS
    assert only_pool(world).queued == MAX_QUEUED_PER_CLIENT
    assert [status(client, sid) for sid in sids[-5:]] == [b"503"] * 5


# --- dialing ----------------------------------------------------------------------------------


def test_a_dial_is_bounded_once_by_connect_timeout_then_504_and_cancelled() -> None:
    world = World(auto_dial=False, connect_timeout=5.0)
    client = world.h2_client()
    sid = client.request("/")
    world.run()
    (dial,) = world.dials
    cancelled: list[bool] = []
    dial.cancel = lambda: cancelled.append(True)
    # One timer each: the dial's, the queue's, and the client connection's deadline sweep.
    assert world.timers.pending() == 3
    world.advance(5.0)
    assert status(client, sid) == b"504"
    assert cancelled == [True]
    assert only_pool(world).dials == []


def test_a_connection_that_closes_before_its_settings_fails_the_dial_with_502() -> None:
    world = World(auto_dial=False)
    client = world.h2_client()
    sid = client.request("/")
    world.run()
    (dial,) = world.dials
    leg = H2Back(FakeIO())
    dial.connected(leg)
    assert leg.state is ConnState.CONNECTING
    leg.connection_lost()
    world.run()
    assert status(client, sid) == b"502"


# --- containment and recovery -------------------------------------------------------------------


def test_a_connection_error_ends_only_its_own_streams_and_is_never_retried() -> None:
    world = World(backend_settings=ONE_STREAM)
    client = world.h2_client()
    bad = client.request("/bad")
    good = client.request("/good")
    world.run()
    first, second = world.backends
    first.raw_to_leg = encode_goaway(0, ErrorCodes.PROTOCOL_ERROR)
    world.run()
    assert status(client, bad) == b"502"
    # Nobody got the bad request again, and the other connection's stream lives on.
    assert sum(len(b.requests()) for b in world.backends) == 2
    assert state_of(first) is ConnState.CLOSED
    second.respond(second.requests()[0].stream_id, b"fine")
    world.run()
    assert client.body(good) == b"fine"


def test_the_pool_forgets_a_broken_connection_and_dials_anew() -> None:
    world = World()
    client = world.h2_client()
    sid = client.request("/")
    world.run()
    (broken,) = world.backends
    broken.raw_to_leg = b"\x00\x00\x04\x08\x00" + bytes(8)  # a WINDOW_UPDATE of 0
    world.run()
    assert status(client, sid) == b"502"
    assert state_of(broken) is ConnState.CLOSED
    pool = only_pool(world)
    assert pool.connections == []
    again = client.request("/again")
    world.run()
    assert len(world.backends) == 2
    fresh = world.backends[1]
    fresh.respond(fresh.requests()[0].stream_id, b"back")
    world.run()
    assert client.body(again) == b"back"


def test_a_graceful_goaway_retries_unprocessed_streams_on_a_new_connection() -> None:
    world = World()
    client = world.h2_client()
    sids = [client.request(f"/{k}") for k in range(2)]
    world.run()
    (first,) = world.backends
    first.raw_to_leg = encode_goaway(1, ErrorCodes.NO_ERROR)
    world.run()
    assert state_of(first) is ConnState.DRAINING
    second = world.backends[1]
    assert [dict(r.headers)[b":path"] for r in second.requests()] == [b"/1"]
    first.respond(1, b"old")
    second.respond(second.requests()[0].stream_id, b"new")
    world.run()
    assert [client.body(s) for s in sids] == [b"old", b"new"]
    assert state_of(first) is ConnState.CLOSED


def test_a_header_list_over_the_backends_limit_gets_431_and_is_never_sent() -> None:
    world = World(backend_settings=settings(MAX_HEADER_LIST_SIZE=2000))
    client = world.h2_client()
    client.request("/warm")  # the connection exists and its limit is known
    world.run()
    big = client.request("/big", extra=[(b"x-big", b"v" * 1900)])
    world.run()
    assert status(client, big) == b"431"
    assert len(world.backends[0].requests()) == 1
    assert header_list_size([(b"ab", b"cde")]) == 37


# --- connection states --------------------------------------------------------------------------


def test_a_connection_goes_connecting_ready_draining_closed_telling_the_pool() -> None:
    world = World()
    client = world.h2_client()
    sid = client.request("/", end=False)
    world.run()
    (backend,) = world.backends
    seen: list[tuple[ConnState, ConnState]] = []
    pool = only_pool(world)
    original = pool.connection_changed

    def spy(connection: object, old: ConnState, new: ConnState) -> None:
        seen.append((old, new))
        original(connection, old, new)  # type: ignore[arg-type]

    pool.connection_changed = spy  # type: ignore[method-assign]
    pool.drain()
    assert state_of(backend) is ConnState.DRAINING
    client.conn.end_stream(sid)
    world.run()
    backend.respond(backend.requests()[0].stream_id)
    world.run()
    assert client.body(sid) == b"ok"
    assert seen == [
        (ConnState.READY, ConnState.DRAINING),
        (ConnState.DRAINING, ConnState.CLOSED),
    ]
    with pytest.raises(AssertionError):
        backend.leg.transition(ConnState.READY)


def test_an_idle_connection_closes_after_idle_timeout_and_leaks_no_timer() -> None:
    world = World(idle_timeout=300.0)
    client = world.h2_client()
    sid = client.request("/")
    world.run()
    (backend,) = world.backends
    world.advance(200)
    backend.respond(backend.requests()[0].stream_id)
    world.run()
    assert client.body(sid) == b"ok"
    world.advance(150)  # 350 s after the dial, 150 s after the last stream
    assert state_of(backend) is ConnState.READY
    world.advance(151)
    assert state_of(backend) is ConnState.CLOSED
    assert world.timers.pending() == 0
    assert only_pool(world).connections == []


# --- deadlines on both legs -------------------------------------------------------------------


def test_a_request_body_that_never_comes_is_reset_on_both_legs_after_idle_timeout() -> None:
    world = World(idle_timeout=2.0)
    client = world.h2_client()
    sid = client.request("/upload", method="POST", end=False)
    world.run()
    (backend,) = world.backends
    backend_sid = backend.requests()[0].stream_id
    world.advance(1.9)
    assert not resets(client) and not resets(backend)
    world.advance(0.6)
    assert [e.error_code for e in resets(client, sid)] == [ErrorCodes.CANCEL]
    assert [e.error_code for e in resets(backend, backend_sid)] == [ErrorCodes.CANCEL]
    assert only_pool(world).serving == {}
    assert world.finished[-1].detail == "no progress within idle_timeout"


def test_progress_either_way_keeps_a_slow_stream_alive() -> None:
    world = World(idle_timeout=2.0)
    client = world.h2_client()
    sid = client.request("/upload", method="POST", end=False)
    world.run()
    for _ in range(10):
        world.advance(1.5)
        client.conn.send_data(sid, b"x")
        world.run()
    assert not resets(client)
    client.conn.end_stream(sid)
    world.run()
    (backend,) = world.backends
    assert backend.body(backend.requests()[0].stream_id) == b"x" * 10


def test_a_zero_window_reader_is_no_progress_and_is_reset() -> None:
    world = World(idle_timeout=2.0)
    client = world.h2_client(settings(INITIAL_WINDOW_SIZE=0))
    sid = client.request("/big")
    world.run()
    (backend,) = world.backends
    backend_sid = backend.requests()[0].stream_id
    backend.respond(backend_sid, b"d" * 100_000, end=False)
    world.run()
    world.advance(2.6)
    assert resets(client, sid)
    assert resets(backend, backend_sid)
    # What the proxy held for that stream was handed back to the shared connection.
    assert backend.conn.outbound_flow_control_window > 16 << 19


def test_an_http1_body_that_never_comes_gets_408_and_the_connection_closes() -> None:
    world = World(idle_timeout=2.0)
    client = world.h11_client()
    client.send(b"POST /upload HTTP/1.1\r\nhost: web.test\r\ncontent-length: 10\r\n\r\n")
    world.run()
    (backend,) = world.backends
    backend_sid = backend.requests()[0].stream_id
    world.advance(2.6)
    ((response, body, _),) = client.responses()
    assert response.status_code == 408
    assert (b"connection", b"close") in response.headers
    assert body == b"408 Request Timeout\n"
    assert client.io.closed
    assert resets(backend, backend_sid)


def test_a_queued_exchange_is_the_pools_not_the_deadline_sweeps() -> None:
    world = World(backend_settings=ONE_STREAM, idle_timeout=1.0, connect_timeout=5.0)
    client = world.h2_client()
    sids = [client.request(f"/{k}") for k in range(MAX_CONNECTIONS + 1)]
    world.run()
    world.advance(1.5)
    # Every stream holding a backend made no progress and was reset; the one that waited
    # then got a freed stream.
    assert all(resets(client, sid) for sid in sids[:-1])
    assert not resets(client, sids[-1])
    assert len(only_pool(world).serving) == 1


def test_connect_timeout_covers_the_backends_settings_too() -> None:
    world = World(auto_dial=False, connect_timeout=5.0)
    client = world.h2_client()
    sid = client.request("/")
    world.run()
    (dial,) = world.dials
    io = FakeIO()
    leg = H2Back(io)
    world.advance(3.0)
    dial.connected(leg)  # TCP (and TLS) up, but no SETTINGS ever comes
    world.advance(1.9)
    assert not client.of(sid, h2.events.ResponseReceived)
    world.advance(0.2)
    assert status(client, sid) == b"504"
    assert io.aborted
    assert state_of_leg(leg) is ConnState.CLOSED


def test_closing_a_private_pool_cancels_its_dial_and_closes_its_connections() -> None:
    world = World(auto_dial=False, backend_settings=ONE_STREAM)
    client = world.h2_client()
    client.request("/")
    world.run()
    (dial,) = world.dials
    world.dials.clear()
    backend = world.connect(dial)
    world.run()
    client.request("/more")
    world.run()
    pool = only_pool(world)
    cancelled: list[bool] = []
    pending = list(pool.dials)
    assert len(pending) == 1  # the second request needs a second connection
    for d in pending:
        d.cancel = lambda: cancelled.append(True)
    pool.close()
    assert state_of(backend) is ConnState.CLOSED
    assert pool.connections == [] and pool.dials == []
    assert cancelled == [True] * len(pending)


def state_of_leg(leg: H2Back) -> ConnState:
    return leg.state
