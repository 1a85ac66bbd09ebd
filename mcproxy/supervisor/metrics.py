"""The metrics endpoint: one scrape shows the whole process group.

Workers count in ``prometheus_client``'s multiprocess mode (see
:mod:`mcproxy.worker.metrics`): each writes mmap files named after its pid
into one directory, which the supervisor wipes at start and names in every
worker's environment (``PROMETHEUS_MULTIPROC_DIR``). The supervisor serves
``metrics.path`` on ``metrics.addr`` from a thread, merging the files with the
library's ``MultiProcessCollector`` and adding what it holds itself (config
generations, worker restarts).

A dead worker's files are the one thing the library leaves to us. Its
``live*`` gauge files go (``mark_process_dead``), so its open connections stop
counting. Its counters and histograms must keep counting, but the library
never deletes them, and every file is read at every scrape: left alone, a
worker that crash-loops makes each scrape slower than the last. So when a
worker is reaped, :meth:`MetricsDirectory.worker_exited` folds its counter and
histogram files into one archive file per type (``counter_archive.db``) and
deletes them. The directory then holds one file per type per live worker plus
the archives, whatever the number of respawns, and a scrape reads the same
amount after the thousandth respawn as after the first.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import logging
import os
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from mcproxy import __version__
from mcproxy.config import Config, MetricsConfig
from mcproxy.supervisor.sockets import open_listening_socket

if TYPE_CHECKING:
    from mcproxy.supervisor.manager import Supervisor

__all__ = [
    "ARCHIVE",
    "MetricsDirectory",
    "MetricsEndpoint",
    "MetricsError",
    "SupervisorCollector",
    "directory_for",
    "start_metrics",
]

log = logging.getLogger("mcproxy.supervisor")

ARCHIVE = "archive"
"""Stands in for the pid in the archive files' names (``counter_archive.db``)."""
_FOLDED_TYPES = ("counter", "histogram", "summary")
"""File types whose values outlive their process. Our workers write only these and
``gauge_livesum``; a dead worker's gauge of any other mode is stale, so it is deleted."""


class _MmapWriter(Protocol):
    def write_value(self, key: str, value: float, timestamp: float) -> None: ...

    def close(self) -> None: ...


# The library's multiprocess helpers carry no annotations; these give them their types.
_merge: Callable[[list[str], bool], Iterable[Metric]] = MultiProcessCollector.merge
_mark_process_dead: Callable[[int, str], None] = mark_process_dead
_open_mmap: Callable[[str], _MmapWriter] = MmapedDict


class MetricsError(Exception):
    """The metrics directory cannot be prepared; the message names it and why."""


def directory_for(config: Config) -> str:
    """``$PROMETHEUS_MULTIPROC_DIR`` if the operator set one (a tmpfs is best), else a
    directory beside the database, which is per-instance and writable by us."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or f"{config.database_path}-metrics"


class MetricsDirectory:
    """The multiprocess directory: wiped at start, kept bounded, and a collector of
    every worker's metrics (register it with a registry)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.Lock()
        """Held by a scrape and by a fold, so a scrape sees a dead worker's counts
        exactly once: in its own files or in the archive, never both or neither."""

    def wipe(self) -> None:
        """Start from zero: the counts of a previous run are not this run's."""
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        for name in os.listdir(self.path):
            if name.endswith((".db", ".db.tmp")):
                os.remove(os.path.join(self.path, name))

    def collect(self) -> list[Metric]:
        with self.lock:
            files = glob.glob(os.path.join(self.path, "*.db"))
            return list(_merge(files, True))

    def worker_exited(self, pid: int) -> None:
        """Drop a dead worker's live gauges and fold its counters into the archive."""
        with self.lock:
            _mark_process_dead(pid, self.path)
            by_type: dict[str, list[str]] = defaultdict(list)
            for path in glob.glob(os.path.join(self.path, f"*_{pid}.db")):
                by_type[os.path.basename(path).split("_", 1)[0]].append(path)
            for kind, files in by_type.items():
                if kind in _FOLDED_TYPES:
                    self._fold(kind, files)
                for path in files:
                    os.remove(path)

    def _fold(self, kind: str, files: list[str]) -> None:
        """Rewrite ``<kind>_archive.db`` as itself plus ``files``, atomically."""
        archive = os.path.join(self.path, f"{kind}_{ARCHIVE}.db")
        sources = [*files, archive] if os.path.exists(archive) else files
        # accumulate=False keeps histogram buckets per-bucket, as the files store them.
        merged = _merge(sources, False)
        staging = archive + ".tmp"  # not *.db: a scrape never globs it
        with contextlib.suppress(FileNotFoundError):
            os.remove(staging)
        out = _open_mmap(staging)
        try:
            for metric in merged:
                for sample in metric.samples:
                    key = mmap_key(
                        metric.name,
                        sample.name,
                        list(sample.labels),
                        list(sample.labels.values()),
                        metric.documentation,
                    )
                    out.write_value(key, sample.value, 0.0)
        finally:
            out.close()
        os.replace(staging, archive)


class SupervisorCollector:
    """What the supervisor knows itself, from values its loop publishes whole (the
    state, the ``samples`` tuple, counters): no lock, never the loop's live slot
    table, and a scrape may be a loop turn behind.

    Open connections per listener are the workers' ``livesum`` gauge, not the
    shared-memory counters: those count admitted connections only, the gauge
    counts every accepted one, refused-to-be ones included while they last."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        sup = self.supervisor
        info = GaugeMetricFamily(
            "mcproxy_build_info", "mc-proxy's version; always 1.", labels=["version"]
        )
        info.add_metric([__version__], 1)
        yield info
        yield GaugeMetricFamily(
            "mcproxy_config_generation",
            "Generation of the routing state in the supervisor (and the database).",
            value=sup.state.generation,
        )
        per_worker = GaugeMetricFamily(
            "mcproxy_worker_config_generation",
            "Generation each live worker routes with, per slot.",
            labels=["slot"],
        )
        running = 0
        for sample in sup.samples:  # published by the loop each turn, never mutated
            if sample.pid:
                running += 1
                per_worker.add_metric([str(sample.slot)], sample.generation)
        yield per_worker
        yield GaugeMetricFamily("mcproxy_workers", "Worker processes alive.", value=running)
        limit = GaugeMetricFamily(
            "mcproxy_listener_max_connections",
            "A listener's connection limit across all workers; 0 is unlimited.",
            labels=["listener"],
        )
        for address, listener in sup.state.listeners.items():
            limit.add_metric([address], listener.max_connections)
        yield limit
        up = GaugeMetricFamily(
            "mcproxy_backend_up",
            "1 while the supervisor's health check finds a route's backend up, else 0"
            " (1 without a check); routes with several backends or a check only.",
            labels=["listener", "route", "backend"],
        )
        for address, listener in sup.state.listeners.items():
            for hostname, route in listener.routes.items():
                if len(route.backends) == 1 and route.health_check is None:
                    continue  # nothing to say, and 100,000 routes would be 100,000 series
                for backend in sup.backend_states(route):
                    up.add_metric([address, hostname, str(backend.address)], int(backend.up))
        yield up
        yield CounterMetricFamily(
            "mcproxy_worker_restarts",
            "Workers that died and were replaced since the supervisor started.",
            value=sup.worker_restarts,
        )


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    registry: CollectorRegistry
    metrics_path: str


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10.0
    """A client that sends no request in this time is dropped instead of holding a thread."""

    def do_GET(self) -> None:
        self._respond(with_body=True)

    def do_HEAD(self) -> None:
        self._respond(with_body=False)

    def _respond(self, with_body: bool) -> None:
        if urlsplit(self.path).path != self.server.metrics_path:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8", with_body)
            return
        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        try:
            body = encoder(self.server.registry)
        except Exception:
            log.exception("metrics scrape failed")
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b"scrape failed\n", "text/plain", True)
            return
        encoding = None
        if "gzip" in self.headers.get("Accept-Encoding", ""):
            body, encoding = gzip.compress(body, compresslevel=1), "gzip"
        self._send(HTTPStatus.OK, body, content_type, with_body, encoding)

    def _send(
        self,
        status: HTTPStatus,
        body: bytes,
        content_type: str,
        with_body: bool,
        encoding: str | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if encoding:
            self.send_header("Content-Encoding", encoding)
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """A scrape every few seconds is not news; errors are logged where they happen."""


class MetricsEndpoint:
    """``metrics.path`` on ``metrics.addr``, served from a daemon thread; 404 elsewhere."""

    def __init__(self, config: MetricsConfig, registry: CollectorRegistry) -> None:
        sock = open_listening_socket(config.addr, backlog=64, reuse_port=False)
        sock.setblocking(True)
        sock.set_inheritable(False)
        server = _Server(sock.getsockname()[:2], _Handler, bind_and_activate=False)
        server.socket.close()
        server.socket = sock
        server.registry = registry
        server.metrics_path = config.path
        self.server = server
        self.thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.5}, name="metrics", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_metrics(
    config: Config, supervisor: Supervisor, wipe: bool = True
) -> MetricsEndpoint | None:
    """Wire metrics into the supervisor before any worker starts, or do nothing if the
    config has no ``metrics:``. Raises ListenError when the address cannot be bound and
    MetricsError when the directory cannot be prepared."""
    if config.metrics is None:
        return None
    directory = MetricsDirectory(directory_for(config))
    try:
        if wipe:  # not after an upgrade: the old workers' files are live
            directory.wipe()
    except OSError as exc:
        raise MetricsError(f"cannot prepare the metrics directory {directory.path}: {exc}") from exc
    registry = CollectorRegistry()
    registry.register(directory)
    registry.register(SupervisorCollector(supervisor))
    endpoint = MetricsEndpoint(config.metrics, registry)
    supervisor.metrics_dir = directory.path
    supervisor.worker_env["PROMETHEUS_MULTIPROC_DIR"] = directory.path

    def forget(pid: int) -> None:
        try:
            directory.worker_exited(pid)
        except Exception:  # a metrics hiccup must not stop the supervisor
            log.exception("metrics bookkeeping for worker pid %d failed", pid)

    supervisor.on_worker_exit.append(forget)
    endpoint.start()
    addr, path = config.metrics.addr, config.metrics.path
    log.info("metrics on http://%s%s (files in %s)", addr, path, directory.path)
    return endpoint
