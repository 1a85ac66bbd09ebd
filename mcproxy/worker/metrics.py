"""A worker's Prometheus metrics, derived from connection and request records.

Nothing here runs on the per-byte path, and little on the per-connection one.
A connection is counted when it is accepted and, from its
:class:`~mcproxy.worker.records.ConnectionRecord`, when it ends; an L7 request
from its :class:`~mcproxy.worker.records.RequestRecord`. Those callbacks only
note the record; :meth:`WorkerMetrics.flush` turns what was noted into metric
updates at most :data:`FLUSH_INTERVAL` later, in one batch. Updating the
metrics of each connection as it ended cost a worker under load several
percent of its CPU (``bench/metrics_cost.py`` measures it): each update is a
lock, a ``getpid`` and an mmap write, cheap in a loop but slow on caches that
the TLS relay has just evicted. In a batch the code and the mmap pages stay warm. The price: a
worker killed by SIGKILL loses the counts of its last ~0.1 s (a worker that
exits flushes first). The active-connections gauge is set in the same batch
from the server's own per-listener count.

In the proxy, ``prometheus_client`` runs in multiprocess mode: the supervisor
puts ``PROMETHEUS_MULTIPROC_DIR`` in the worker's environment, each worker
writes its own mmap files there, and the supervisor merges them at scrape time
(:mod:`mcproxy.supervisor.metrics`). The active-connections gauge is a
``livesum``: the supervisor deletes a dead worker's file, so its connections
stop counting the moment it is reaped.

Labels are bounded: listener address, configured route hostname, mode,
refusal reason, outcome, method class, status code. Never the client address
and never an SNI that matched no route.
"""

from __future__ import annotations

import asyncio
import atexit
import os
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mcproxy.model import PolicyKind, Route
from mcproxy.worker.errors import Reason
from mcproxy.worker.records import ConnectionRecord, RequestRecord

if TYPE_CHECKING:
    from mcproxy.worker.listener import ConnectionServer

__all__ = [
    "DIAL_BUCKETS",
    "FLUSH_INTERVAL",
    "OUTCOMES",
    "REQUEST_BUCKETS",
    "WorkerMetrics",
    "method_class",
    "observe_all",
    "outcome_label",
    "require_multiprocess_mode",
]

FLUSH_INTERVAL = 0.1
"""Most seconds between a connection's end (or start) and its counts in the files."""
DIAL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""A loopback dial takes ~100 µs, a LAN one ~1 ms; the top buckets are for a slow backend."""
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

OUTCOMES = frozenset(
    {
        "closed",
        "reset",
        "idle_timeout",
        "backend_unreachable",
        "backend_timeout",
        "backend_reset",
        "error",
        "cancelled",
        # L7 connections (mcproxy/worker/l7): the client side's own ends.
        "tls_error",
        "handshake_timeout",
        "rapid_reset",
        "abuse",
        "head_timeout",
        "protocol_error",
        "backend_protocol_error",
    }
)
"""How a connection that was not refused can end; anything else is counted as ``other``."""

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT"})
_POLICIES = frozenset(kind.value for kind in PolicyKind)
_REASONS = frozenset(reason.value for reason in Reason)
_DIAL_FAILURES = {"backend_unreachable": "unreachable", "backend_timeout": "timeout"}
_NO_MODE = "none"

_M = TypeVar("_M", Counter, Gauge, Histogram)


def method_class(method: str) -> str:
    """The method as a label: the standard ones as they are, anything else ``other``."""
    return method if method in _METHODS else "other"


def outcome_label(outcome: str) -> tuple[str, str | None]:
    """``(outcome, refusal reason)`` for a record's outcome, each from a closed vocabulary."""
    if outcome.startswith("refused:"):
        reason = outcome[len("refused:") :]
        return "refused", reason if reason in _REASONS else "other"
    return (outcome if outcome in OUTCOMES else "other"), None


def require_multiprocess_mode(directory: str) -> None:
    """Make sure this process writes its metrics to ``directory``, or raise.

    The supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` in the worker's environment;
    ``prometheus_client`` reads it once, when it is first imported. Setting it
    here covers a worker started some other way, as long as nothing imported
    the library earlier.
    """
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", directory)
    from prometheus_client import values

    if os.environ["PROMETHEUS_MULTIPROC_DIR"] != directory:
        raise RuntimeError(
            f"PROMETHEUS_MULTIPROC_DIR is {os.environ['PROMETHEUS_MULTIPROC_DIR']!r},"
            f" the supervisor collects {directory!r}"
        )
    if not getattr(values.ValueClass, "_multiprocess", False):
        raise RuntimeError("prometheus_client was imported before multiprocess mode was set")


class WorkerMetrics:
    """The metric objects of one worker, and the mapping from records onto them.

    ``registry`` is for tests (a private :class:`CollectorRegistry` to read
    back); the proxy passes ``None`` because the supervisor reads the files.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._children: dict[tuple[Any, ...], Any] = {}
        self._accepted: dict[str, int] = {}
        self._connections: list[ConnectionRecord] = []
        self._requests: list[RequestRecord] = []
        self._active: dict[str, int] = {}
        """What the active gauge shows, per listener (kept at 0 once seen)."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: ConnectionServer | None = None
        self._flush_at: asyncio.TimerHandle | None = None
        r = registry
        self.accepted = Counter(
            "mcproxy_connections",
            "Connections accepted, per listener.",
            ["listener"],
            registry=r,
        )
        self.active = Gauge(
            "mcproxy_connections_active",
            "Connections open now, per listener (all live workers).",
            ["listener"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.finished = Counter(
            "mcproxy_connections_finished",
            "Connections that ended, per listener, route mode and outcome.",
            ["listener", "mode", "outcome"],
            registry=r,
        )
        self.refused = Counter(
            "mcproxy_connections_refused",
            "Connections reset before routing, per listener and reason.",
            ["listener", "reason"],
            registry=r,
        )
        self.dial = Histogram(
            "mcproxy_backend_dial_seconds",
            "Time to connect to a route's backend (successful dials).",
            ["listener", "route"],
            buckets=DIAL_BUCKETS,
            registry=r,
        )
        self.dial_failures = Counter(
            "mcproxy_backend_dial_failures",
            "Backend dials that failed, per route and reason (unreachable, timeout).",
            ["listener", "route", "reason"],
            registry=r,
        )
        self.relayed = Counter(
            "mcproxy_relayed_bytes",
            "Bytes relayed for a route's connections; up is client to backend.",
            ["listener", "route", "direction"],
            registry=r,
        )
        self.requests = Counter(
            "mcproxy_http_requests",
            "L7 requests answered, per route, method class and status code.",
            ["listener", "route", "method", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "mcproxy_http_request_duration_seconds",
            "L7 request duration, from the request headers to the end of the response.",
            ["listener", "route"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.policy_blocks = Counter(
            "mcproxy_http_policy_blocks",
            "L7 requests answered 403 by a route policy, per policy type.",
            ["listener", "route", "policy"],
            registry=r,
        )
        self.backend_requests = Counter(
            "mcproxy_http_backend_requests",
            "L7 requests for a backend, per backend protocol (h2, h1) and kind (http, websocket).",
            ["listener", "route", "protocol", "kind"],
            registry=r,
        )

        self.backend_selected = Counter(
            "mcproxy_backend_selected",
            "Connections (l4) and requests (l7) sent to each backend of a route.",
            ["listener", "route", "backend"],
            registry=r,
        )
        self.backend_failures = Counter(
            "mcproxy_backend_failures",
            "Dials to a route's backend that failed or timed out (failed over, or not).",
            ["listener", "route", "backend"],
            registry=r,
        )

    def _child(self, metric: _M, *labels: str) -> _M:
        """``metric.labels(*labels)``, remembered: the library's lookup takes a lock and
        validates every time, which is a third of the cost of a connection's updates."""
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def install(self, server: ConnectionServer) -> None:
        """Count ``server``'s connections and requests; flush on a timer and at exit."""
        self._loop, self._server = server.loop, server
        server.on_started.append(self.connection_started)
        server.on_finished.append(self.connection_finished)
        server.on_request.append(self.request_finished)
        atexit.register(self._flush_at_exit)

    # --- noting (per connection, per request) -----------------------------------------

    def connection_started(self, record: ConnectionRecord) -> None:
        self._accepted[record.listener] = self._accepted.get(record.listener, 0) + 1
        self._flush_soon()

    def connection_finished(self, record: ConnectionRecord) -> None:
        self._connections.append(record)
        self._flush_soon()

    def request_finished(self, record: RequestRecord) -> None:
        self._requests.append(record)
        self._flush_soon()

    def _flush_soon(self) -> None:
        if self._flush_at is None and self._loop is not None:
            self._flush_at = self._loop.call_later(FLUSH_INTERVAL, self.flush)

    # --- counting (per batch) -----------------------------------------------------------

    def flush(self) -> None:
        """Apply everything noted since the last flush, and refresh the active gauge."""
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_at = None
        accepted, self._accepted = self._accepted, {}
        connections, self._connections = self._connections, []
        requests, self._requests = self._requests, []
        # A scrape may read the files halfway through: outcomes first, then accepted,
        # then active, so that accepted and active never look settled before the rest.
        for record in connections:
            self._count_connection(record)
        if requests:
            self._count_requests(requests)
        for listener, count in accepted.items():
            self._child(self.accepted, listener).inc(count)
        if self._server is not None:
            self.set_active(self._server.active_by_listener, seen=accepted.keys())
            if any(self._active.values()):
                # Connections end after their records are noted: look again until the
                # gauge shows them gone, or it would stay stale in a quiet worker.
                self._flush_soon()

    def _flush_at_exit(self) -> None:
        """The last flush, once the event loop is gone: no timer to cancel or arm."""
        self._loop, self._flush_at = None, None
        self.flush()

    def set_active(self, counts: Mapping[str, int], seen: Iterable[str] = ()) -> None:
        """Show this worker's open connections per listener: 0 for a listener that has
        none now but had some (or is in ``seen``), so that its series exists."""
        for listener in self._active.keys() | counts.keys() | set(seen):
            count = counts.get(listener, 0)
            if self._active.get(listener) != count:
                self._child(self.active, listener).set(count)
                self._active[listener] = count

    def _count_connection(self, record: ConnectionRecord) -> None:
        listener, route = record.listener, record.route
        outcome, reason = outcome_label(record.outcome)
        mode = route.mode.value if route is not None else _NO_MODE
        self._child(self.finished, listener, mode, outcome).inc()
        if reason is not None:
            self._child(self.refused, listener, reason).inc()
        if route is not None:
            self._route_finished(record, route)

    def _route_finished(self, record: ConnectionRecord, route: Route) -> None:
        listener = record.listener
        if record.dial_seconds is not None:
            self._child(self.dial, listener, route.hostname).observe(record.dial_seconds)
        failure = _DIAL_FAILURES.get(record.outcome)
        if failure is not None:
            self._child(self.dial_failures, listener, route.hostname, failure).inc()
        for failed in record.failed_backends:
            self._child(self.backend_failures, listener, route.hostname, str(failed)).inc()
        if record.backend is not None and route.mode.value == "l4":
            if failure is not None:
                self._child(
                    self.backend_failures, listener, route.hostname, str(record.backend)
                ).inc()
            elif record.dial_seconds is not None:
                self._child(
                    self.backend_selected, listener, route.hostname, str(record.backend)
                ).inc()
        if record.bytes_up:
            self._child(self.relayed, listener, route.hostname, "up").inc(record.bytes_up)
        if record.bytes_down:
            self._child(self.relayed, listener, route.hostname, "down").inc(record.bytes_down)

    def _count_requests(self, requests: list[RequestRecord]) -> None:
        """Count a batch of requests with one update per series, not one per request.

        Under load a flush holds hundreds of requests on a few label sets, and each
        update is a lock, a ``getpid`` and an mmap write: counting first and calling
        ``inc(n)`` once per series (and observing the durations per histogram bucket)
        is most of what metrics cost per request (ARCHITECTURE.md, "Speed"). The
        values are those of one update per request (a histogram's sum up to rounding).
        """
        counts: dict[tuple[Any, ...], int] = {}
        durations: dict[tuple[str, str], list[float]] = {}
        get = counts.get
        for record in requests:
            listener, route, status = record.listener, record.route, record.status
            code = str(status) if 100 <= status <= 599 else "other"
            key: tuple[Any, ...] = (
                self.requests,
                listener,
                route,
                method_class(record.method),
                code,
            )
            counts[key] = get(key, 0) + 1
            observed = durations.get((listener, route))
            if observed is None:
                durations[(listener, route)] = [record.duration]
            else:
                observed.append(record.duration)
            if record.blocked_by is not None:
                policy = record.blocked_by if record.blocked_by in _POLICIES else "other"
                key = (self.policy_blocks, listener, route, policy)
                counts[key] = get(key, 0) + 1
            for failed in record.failed_backends:
                key = (self.backend_failures, listener, route, str(failed))
                counts[key] = get(key, 0) + 1
            if record.backend is not None:
                # 502/504 from mc-proxy: that backend could not be reached either.
                unreachable = status in (502, 504)
                counter = self.backend_failures if unreachable else self.backend_selected
                key = (counter, listener, route, str(record.backend))
                counts[key] = get(key, 0) + 1
            if record.backend_protocol is not None:
                kind = "websocket" if record.websocket else "http"
                key = (self.backend_requests, listener, route, record.backend_protocol, kind)
                counts[key] = get(key, 0) + 1
        for key, count in counts.items():
            self._child(*key).inc(count)
        for (listener, route), amounts in durations.items():
            observe_all(self._child(self.request_duration, listener, route), amounts)


def observe_all(child: Any, amounts: list[float]) -> None:
    """``child.observe(a) for a in amounts``, with one update per histogram bucket touched.

    Reads the child's ``_sum``/``_buckets``/``_upper_bounds`` (prometheus_client's
    Histogram keeps its buckets non-cumulative, one increment per observation), and
    falls back to ``observe`` when they are not there.
    """
    bounds = getattr(child, "_upper_bounds", None)
    buckets = getattr(child, "_buckets", None)
    total = getattr(child, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for amount in amounts:
            child.observe(amount)
        return
    hits: dict[int, int] = {}
    for amount in amounts:
        index = bisect_left(bounds, amount)  # the first bound >= amount, as observe finds it
        hits[index] = hits.get(index, 0) + 1
    total.inc(sum(amounts))
    for index, count in hits.items():
        if index < len(buckets):
            buckets[index].inc(count)
