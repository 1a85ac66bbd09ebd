"""GetStatus's data: assembled from immutable samples and the state."""

from __future__ import annotations

from mcproxy.model import Address, FirewallRules, Listener, Route, make_state
from mcproxy.supervisor.status import (
    HeartbeatCounts,
    ListenerStatus,
    WorkerSample,
    WorkerStatus,
    build_status,
)


def test_status_combines_worker_samples_with_the_state() -> None:
    route = Route("a.test", (Address("127.0.0.1", 9001),))
    state = make_state(
        5,
        [
            Listener(Address("", 443), max_connections=10, routes={"a.test": route}),
            Listener(Address("127.0.0.1", 8443), proxy_protocol=True),
        ],
        FirewallRules(),
    )
    samples = (
        WorkerSample(1, 100, 5, 3, {":443": 2, "127.0.0.1:8443": 1}, started=90.0),
        WorkerSample(2, 0),
        WorkerSample(3, 102, 4, 4, {":443": 4}, started=99.5),
    )
    status = build_status(
        version="9.9",
        state=state,
        samples=samples,
        counts=HeartbeatCounts(samples),
        started_at=1000.0,
        worker_restarts=2,
        now=1060.0,
        now_monotonic=100.0,
    )
    assert (status.version, status.generation, status.worker_restarts) == ("9.9", 5, 2)
    assert status.uptime_seconds == 60.0
    assert status.workers == (
        WorkerStatus(1, 100, 5, 3, 10.0),
        WorkerStatus(2, 0, 0, 0, 0.0),
        WorkerStatus(3, 102, 4, 4, 0.5),
    )
    assert status.listeners == (
        ListenerStatus(":443", 1, 6, 10, False),
        ListenerStatus("127.0.0.1:8443", 0, 1, 0, True),
    )
