"""Records in, metric samples out: the mapping that every worker applies."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from mcproxy.model import Address, Mode, Route
from mcproxy.worker.metrics import (
    FLUSH_INTERVAL,
    WorkerMetrics,
    method_class,
    observe_all,
    outcome_label,
)
from mcproxy.worker.records import ConnectionRecord, RequestRecord

LISTENER = "127.0.0.1:8443"
ALPHA = Route("alpha.test", (Address("127.0.0.1", 9001),))
WEB = Route("web.test", (Address("127.0.0.1", 9002),), mode=Mode.L7)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> WorkerMetrics:
    return WorkerMetrics(registry)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def connection(
    outcome: str, route: Route | None = None, client: str = "192.0.2.7", **fields: object
) -> ConnectionRecord:
    record = ConnectionRecord(LISTENER, (client, 40000), ("127.0.0.1", 8443))
    record.route = route
    record.outcome = outcome
    for key, field_value in fields.items():
        setattr(record, key, field_value)
    return record


def run(metrics: WorkerMetrics, record: ConnectionRecord) -> None:
    metrics.connection_started(record)
    metrics.connection_finished(record)
    metrics.flush()


def test_nothing_is_counted_until_the_flush(
    metrics: WorkerMetrics, registry: CollectorRegistry
) -> None:
    record = connection("closed", ALPHA, bytes_up=1)
    metrics.connection_started(record)
    metrics.connection_finished(record)
    metrics.connection_started(connection("closed", ALPHA))
    assert value(registry, "mcproxy_connections_total", listener=LISTENER) == 0
    metrics.flush()
    assert value(registry, "mcproxy_connections_total", listener=LISTENER) == 2
    finished = "mcproxy_connections_finished_total"
    assert value(registry, finished, listener=LISTENER, mode="l4", outcome="closed") == 1
    metrics.flush()  # nothing is counted twice
    assert value(registry, "mcproxy_connections_total", listener=LISTENER) == 2


def test_active_shows_the_servers_count_and_zero_once_seen(
    metrics: WorkerMetrics, registry: CollectorRegistry
) -> None:
    metrics.set_active({LISTENER: 2, "[::1]:443": 1})
    assert value(registry, "mcproxy_connections_active", listener=LISTENER) == 2
    metrics.set_active({"[::1]:443": 3})
    assert registry.get_sample_value("mcproxy_connections_active", {"listener": LISTENER}) == 0
    assert value(registry, "mcproxy_connections_active", listener="[::1]:443") == 3
    metrics.set_active({}, seen=["10.0.0.1:443"])
    assert (
        registry.get_sample_value("mcproxy_connections_active", {"listener": "10.0.0.1:443"}) == 0
    )


@pytest.mark.parametrize(
    "reason",
    [
        "firewall_ip",
        "firewall_cidr",
        "firewall_country",
        "rate_limit",
        "max_connections",
        "proxy_header",
        "client_hello",
        "no_route",
    ],
)
def test_refusal_counts_by_reason_and_nothing_per_route(
    metrics: WorkerMetrics, registry: CollectorRegistry, reason: str
) -> None:
    run(metrics, connection(f"refused:{reason}", sni="unknown.test"))
    assert value(registry, "mcproxy_connections_refused_total", listener=LISTENER, reason=reason)
    assert (
        value(
            registry,
            "mcproxy_connections_finished_total",
            listener=LISTENER,
            mode="none",
            outcome="refused",
        )
        == 1
    )
    names = {s.name for m in registry.collect() for s in m.samples}
    assert not any(n.startswith(("mcproxy_backend", "mcproxy_relayed")) for n in names)


def test_successful_dial_is_observed_and_bytes_count_per_direction(
    metrics: WorkerMetrics, registry: CollectorRegistry
) -> None:
    run(metrics, connection("closed", ALPHA, dial_seconds=0.0007, bytes_up=600, bytes_down=1400))
    run(metrics, connection("idle_timeout", ALPHA, dial_seconds=0.2, bytes_up=10, bytes_down=0))
    route = {"listener": LISTENER, "route": "alpha.test"}
    assert value(registry, "mcproxy_backend_dial_seconds_count", **route) == 2
    assert value(registry, "mcproxy_backend_dial_seconds_bucket", le="0.001", **route) == 1
    assert value(registry, "mcproxy_backend_dial_seconds_bucket", le="0.25", **route) == 2
    assert value(registry, "mcproxy_backend_dial_seconds_sum", **route) == pytest.approx(0.2007)
    assert value(registry, "mcproxy_relayed_bytes_total", direction="up", **route) == 610
    assert value(registry, "mcproxy_relayed_bytes_total", direction="down", **route) == 1400
    finished = "mcproxy_connections_finished_total"
    assert value(registry, finished, listener=LISTENER, mode="l4", outcome="closed") == 1
    assert value(registry, finished, listener=LISTENER, mode="l4", outcome="idle_timeout") == 1


def test_an_l7_routes_connections_are_labelled_l7(
    metrics: WorkerMetrics, registry: CollectorRegistry
) -> None:
    run(metrics, connection("closed", WEB, bytes_up=5, bytes_down=7))
    finished = "mcproxy_connections_finished_total"
    assert value(registry, finished, listener=LISTENER, mode="l7", outcome="closed") == 1
    route = {"listener": LISTENER, "route": "web.test"}
    assert value(registry, "mcproxy_relayed_bytes_total", direction="down", **route) == 7


@pytest.mark.parametrize(
    ("outcome", "reason"), [("backend_unreachable", "unreachable"), ("backend_timeout", "timeout")]
)
def test_dial_failure_counts_per_route(
    metrics: WorkerMetrics, registry: CollectorRegistry, outcome: str, reason: str
) -> None:
    run(metrics, connection(outcome, ALPHA))
    route = {"listener": LISTENER, "route": "alpha.test"}
    assert value(registry, "mcproxy_backend_dial_failures_total", reason=reason, **route) == 1
    assert value(registry, "mcproxy_backend_dial_seconds_count", **route) == 0


def test_outcome_and_reason_vocabularies_are_closed() -> None:
    assert outcome_label("closed") == ("closed", None)
    assert outcome_label("refused:no_route") == ("refused", "no_route")
    assert outcome_label("refused:something_new") == ("refused", "other")
    assert outcome_label("l7_specific_thing") == ("other", None)


def test_no_label_carries_the_client_address(
    metrics: WorkerMetrics, registry: CollectorRegistry
) -> None:
    run(metrics, connection("closed", ALPHA, client="198.51.100.77", bytes_up=1, bytes_down=1))
    run(metrics, connection("refused:firewall_ip", client="198.51.100.78"))
    labels = {v for m in registry.collect() for s in m.samples for v in s.labels.values()}
    assert not any(v.startswith("198.51.100.") for v in labels)


def request(
    method: str = "GET", status: int = 200, duration: float = 0.03, blocked_by: str | None = None
) -> RequestRecord:
    return RequestRecord(LISTENER, "web.test", method, status, duration, blocked_by=blocked_by)


def test_requests_count_by_route_method_class_and_code(
    metrics: WorkerMetrics, registry: CollectorRegistry
) -> None:
    metrics.request_finished(request())
    metrics.request_finished(request(method="POST", status=502, duration=2.0))
    metrics.request_finished(request(method="PROPFIND", status=207))
    metrics.flush()
    route = {"listener": LISTENER, "route": "web.test"}
    total = "mcproxy_http_requests_total"
    assert value(registry, total, method="GET", code="200", **route) == 1
    assert value(registry, total, method="POST", code="502", **route) == 1
    assert value(registry, total, method="other", code="207", **route) == 1
    assert value(registry, "mcproxy_http_request_duration_seconds_count", **route) == 3
    assert value(registry, "mcproxy_http_request_duration_seconds_bucket", le="0.05", **route) == 2
    assert value(registry, "mcproxy_http_request_duration_seconds_sum", **route) == pytest.approx(
        2.06
    )


def test_policy_block_counts_per_policy_type(
    metrics: WorkerMetrics, registry: CollectorRegistry
) -> None:
    metrics.request_finished(request(status=403, blocked_by="block_user_agent"))
    metrics.request_finished(request(status=403, blocked_by="require_header"))
    metrics.request_finished(request(status=403, blocked_by="require_header"))
    metrics.request_finished(request(status=403))  # the backend's own 403 is not a block
    metrics.flush()
    route = {"listener": LISTENER, "route": "web.test"}
    blocks = "mcproxy_http_policy_blocks_total"
    assert value(registry, blocks, policy="block_user_agent", **route) == 1
    assert value(registry, blocks, policy="require_header", **route) == 2
    assert value(registry, "mcproxy_http_requests_total", method="GET", code="403", **route) == 4


def test_installed_metrics_flush_on_a_timer_with_the_servers_active_count(
    registry: CollectorRegistry,
) -> None:
    async def scenario() -> None:
        server: Any = SimpleNamespace(
            loop=asyncio.get_running_loop(),
            on_started=[],
            on_finished=[],
            on_request=[],
            active_by_listener={LISTENER: 1},
        )
        WorkerMetrics(registry).install(server)
        record = connection("closed", ALPHA)

        async def flushed(metric: str, **labels: str) -> float | None:
            """The sample once the timer flushed it (None before), within a deadline."""
            deadline = asyncio.get_running_loop().time() + 50 * FLUSH_INTERVAL
            while (got := registry.get_sample_value(metric, labels)) is None:
                assert asyncio.get_running_loop().time() < deadline, f"{metric} never flushed"
                await asyncio.sleep(FLUSH_INTERVAL / 10)
            return got

        for callback in server.on_started:
            callback(record)
        # Nothing is written on the callback itself: the timer does it.
        assert registry.get_sample_value("mcproxy_connections_total", {"listener": LISTENER}) in (
            None,
            0.0,
        )
        assert await flushed("mcproxy_connections_total", listener=LISTENER) == 1
        assert value(registry, "mcproxy_connections_active", listener=LISTENER) == 1
        server.active_by_listener = {}
        for callback in server.on_finished:
            callback(record)
        finished = "mcproxy_connections_finished_total"
        labels = {"listener": LISTENER, "mode": "l4", "outcome": "closed"}
        assert await flushed(finished, **labels) == 1
        assert registry.get_sample_value("mcproxy_connections_active", {"listener": LISTENER}) == 0

    asyncio.run(scenario())


def test_method_class() -> None:
    assert [method_class(m) for m in ("GET", "DELETE", "get", "BREW")] == [
        "GET",
        "DELETE",
        "other",
        "other",
    ]


def test_backend_requests_count_by_protocol_and_kind(
    metrics: WorkerMetrics, registry: CollectorRegistry
) -> None:
    records = [
        replace(request(), backend_protocol="h1"),
        replace(request(), backend_protocol="h1"),
        replace(request(method="CONNECT"), backend_protocol="h1", websocket=True),
        replace(request(), backend_protocol="h2"),
        request(status=403, blocked_by="require_header"),  # never for a backend
    ]
    for record in records:
        metrics.request_finished(record)
    metrics.flush()
    route = {"listener": LISTENER, "route": "web.test"}
    name = "mcproxy_http_backend_requests_total"
    assert value(registry, name, protocol="h1", kind="http", **route) == 2
    assert value(registry, name, protocol="h1", kind="websocket", **route) == 1
    assert value(registry, name, protocol="h2", kind="http", **route) == 1


def test_a_batch_counts_as_one_update_per_request_would() -> None:
    """The flush counts a batch per series (``inc(n)``, buckets summed): same samples as
    one ``observe``/``inc`` per request, on every series a request touches."""
    requests = [
        RequestRecord(
            LISTENER,
            "web.test",
            m,
            s,
            d,
            backend=b,
            failed_backends=f,
            blocked_by=p,
            backend_protocol="h2" if b else None,
        )
        for d, s, m, b, f, p in [
            (0.0004, 200, "GET", Address("127.0.0.1", 9002), (), None),
            (0.02, 200, "GET", Address("127.0.0.1", 9002), (), None),
            (0.05, 502, "POST", Address("127.0.0.1", 9003), (Address("127.0.0.1", 9002),), None),
            (7.5, 0, "GET", None, (), None),
            (100.0, 403, "DELETE", None, (), "require_header"),
            (0.05, 200, "GET", Address("127.0.0.1", 9002), (), None),
        ]
    ]
    batched_registry, single_registry = CollectorRegistry(), CollectorRegistry()
    batched, single = WorkerMetrics(batched_registry), WorkerMetrics(single_registry)
    for record in requests:
        batched.request_finished(record)
        single.request_finished(record)
        single.flush()  # one request per flush: the per-request path
    batched.flush()

    def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[Any, ...]], float]:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for metric in registry.collect()
            for s in metric.samples
            if not s.name.endswith("_created")
        }

    got, want = samples(batched_registry), samples(single_registry)
    assert got.keys() == want.keys()
    for name, wanted in want.items():
        assert got[name] == pytest.approx(wanted), name
    route = {"listener": LISTENER, "route": "web.test"}
    assert value(batched_registry, "mcproxy_http_request_duration_seconds_count", **route) == 6


def test_observe_all_falls_back_to_observe() -> None:
    seen: list[float] = []
    observe_all(SimpleNamespace(observe=seen.append), [0.1, 0.2])
    assert seen == [0.1, 0.2]
