"""The supervisor's side of multiprocess metrics: wipe, fold dead workers, serve.

The worker files come from real processes (``tests/unit/metrics_children.py``)
that record with the real ``WorkerMetrics`` in multiprocess mode; the
supervisor's side is the real one, down to ``Supervisor.reap()`` with
``os.waitpid`` patched as in ``test_manager.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mcproxy.config import Config, MetricsConfig
from mcproxy.model import Address, ProxyState
from mcproxy.supervisor.manager import Slot, Supervisor
from mcproxy.supervisor.metrics import (
    MetricsDirectory,
    MetricsEndpoint,
    MetricsError,
    start_metrics,
)
from mcproxy.supervisor.store import Store
from mcproxy.worker.errors import Reason
from tests.unit.metrics_children import LISTENER, ROUTES
from tests.unit.test_manager import exits, give_worker

REPO_ROOT = Path(__file__).resolve().parents[2]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def spawn_children(directory: Path, count: int) -> list[int]:
    """Run ``count`` worker-like processes to completion; their pids, in order."""
    out = subprocess.run(
        [sys.executable, "-m", "tests.unit.metrics_children", str(directory), str(count)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        check=True,
        capture_output=True,
        timeout=60,
    )
    return [int(line) for line in out.stdout.split()]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest.fixture
def directory(tmp_path: Path) -> MetricsDirectory:
    d = MetricsDirectory(str(tmp_path / "metrics"))
    d.wipe()
    return d


def scrape(directory: MetricsDirectory) -> Samples:
    registry = CollectorRegistry()
    registry.register(directory)
    return parse(generate_latest(registry).decode())


def test_wipe_removes_a_previous_runs_files_only(tmp_path: Path) -> None:
    path = tmp_path / "metrics"
    path.mkdir()
    for name in ("counter_123.db", "gauge_livesum_123.db", "counter_archive.db.tmp", "notes.txt"):
        (path / name).write_bytes(b"x")
    MetricsDirectory(str(path)).wipe()
    assert os.listdir(path) == ["notes.txt"]


def test_folding_a_dead_worker_keeps_its_counts_and_drops_its_live_gauge(
    directory: MetricsDirectory,
) -> None:
    pids = spawn_children(Path(directory.path), 3)
    before = scrape(directory)
    assert sample(before, "mcproxy_connections_active", listener=LISTENER) == 3
    directory.worker_exited(pids[0])
    directory.worker_exited(pids[1])
    after = scrape(directory)
    active = ("mcproxy_connections_active", frozenset({("listener", LISTENER)}))
    assert after.pop(active) == 1  # only the worker that was not reaped
    before.pop(active)
    assert after == before
    assert not [name for name in os.listdir(directory.path) if str(pids[0]) in name]
    assert not [name for name in os.listdir(directory.path) if str(pids[1]) in name]


def test_folding_twice_adds_up(directory: MetricsDirectory) -> None:
    for pid in spawn_children(Path(directory.path), 2):
        directory.worker_exited(pid)
    samples = scrape(directory)
    route = {"listener": LISTENER, "route": "r0.test"}
    assert sample(samples, "mcproxy_relayed_bytes_total", direction="up", **route) == 2 * 120
    assert sample(samples, "mcproxy_backend_dial_seconds_count", **route) == 2 * 2
    assert sample(samples, "mcproxy_backend_dial_seconds_bucket", le="0.001", **route) == 2 * 2
    assert sample(samples, "mcproxy_backend_dial_seconds_bucket", le="0.0005", **route) == 0
    # No live worker, no active-connections series: nothing stale is left behind.
    assert not [key for key in samples if key[0] == "mcproxy_connections_active"]


@pytest.fixture
def endpoint(directory: MetricsDirectory) -> Iterator[MetricsEndpoint]:
    registry = CollectorRegistry()
    registry.register(directory)
    served = MetricsEndpoint(MetricsConfig(Address("127.0.0.1", 0), "/metrics"), registry)
    served.start()
    yield served
    served.close()


@pytest.fixture
def supervisor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Supervisor]:
    """A supervisor with 2 slots and metrics on (no real workers: waitpid is patched)."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    metrics = MetricsConfig(Address("127.0.0.1", 0), "/metrics")
    config = Config(path="t.yaml", workers=2, database_path=str(tmp_path / "db"), metrics=metrics)
    store = Store.open(config.database_path)
    sup = Supervisor(config, store, ProxyState(generation=1))
    sup.slots = [Slot(1, {}), Slot(2, {})]
    yield sup
    store.close()


def test_fifty_respawns_leave_a_scrape_under_one_second(
    supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """52 worker processes recorded connections; the supervisor reaped 50 of them, one
    respawn at a time, through ``reap()``; 2 are live. The directory holds the live
    workers' files and one archive per type, and a scrape counts all 52."""
    endpoint = start_metrics(supervisor.config, supervisor)
    assert endpoint is not None and supervisor.metrics_dir is not None
    try:
        directory = Path(supervisor.metrics_dir)
        assert supervisor.worker_env["PROMETHEUS_MULTIPROC_DIR"] == str(directory)
        pids = spawn_children(directory, 52)
        slot = supervisor.slots[0]
        for pid in pids[:50]:
            give_worker(supervisor, slot, pid, age=60)
            exits(monkeypatch, [(pid, 1)])
            supervisor.reap()
        for live, pid in zip(supervisor.slots, pids[50:], strict=True):
            give_worker(supervisor, live, pid, age=60)
        supervisor.publish_status()  # as the loop does every turn; scrapes read this
        files = sorted(
            f"{kind}_{pid}.db"
            for pid in pids[50:]
            for kind in ("counter", "gauge_livesum", "histogram")
        )
        assert sorted(os.listdir(directory)) == sorted(
            ["counter_archive.db", "histogram_archive.db", *files]
        )
        started = time.monotonic()
        url = f"http://127.0.0.1:{endpoint.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        elapsed = time.monotonic() - started
    finally:
        endpoint.close()
    assert elapsed < 1.0, f"scrape took {elapsed:.3f}s"
    samples = parse(text)
    assert sample(samples, "mcproxy_worker_restarts_total") == 50
    assert sample(samples, "mcproxy_workers") == 2
    assert [name for name, _ in samples if name == "mcproxy_listener_max_connections"] == []
    workers = 52
    assert sample(samples, "mcproxy_connections_total", listener=LISTENER) == workers * (
        3 * ROUTES + len(Reason) + 1
    )
    assert sample(samples, "mcproxy_connections_active", listener=LISTENER) == 2
    for reason in Reason:
        refused = sample(
            samples, "mcproxy_connections_refused_total", listener=LISTENER, reason=reason.value
        )
        assert refused == workers
    for i in range(ROUTES):
        route = {"listener": LISTENER, "route": f"r{i}.test"}
        assert sample(samples, "mcproxy_relayed_bytes_total", direction="down", **route) == (
            workers * 1000
        )
        assert sample(samples, "mcproxy_backend_dial_seconds_count", **route) == workers * 2
        failures = "mcproxy_backend_dial_failures_total"
        assert sample(samples, failures, reason="unreachable", **route) == workers
        web = {"listener": LISTENER, "route": f"w{i}.test"}
        requests = "mcproxy_http_requests_total"
        assert sample(samples, requests, method="GET", code="502", **web) == workers
        blocks = "mcproxy_http_policy_blocks_total"
        assert sample(samples, blocks, policy="require_header", **web) == workers


def test_only_the_metrics_path_is_served(endpoint: MetricsEndpoint) -> None:
    base = f"http://127.0.0.1:{endpoint.port}"
    for path in ("/", "/metrics/", "/metricsx", "/other"):
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(base + path, timeout=10)
        assert caught.value.code == 404
    head = urllib.request.Request(base + "/metrics", method="HEAD")
    with urllib.request.urlopen(head, timeout=10) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert reply.read() == b""


def test_the_operators_directory_wins_and_an_unusable_one_is_named(
    supervisor: Supervisor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chosen = tmp_path / "run" / "metrics"
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(chosen))
    endpoint = start_metrics(supervisor.config, supervisor)
    assert endpoint is not None
    endpoint.close()
    assert supervisor.metrics_dir == str(chosen) and chosen.is_dir()
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(blocked))
    with pytest.raises(MetricsError, match=f"cannot prepare the metrics directory {blocked}"):
        start_metrics(supervisor.config, supervisor)
