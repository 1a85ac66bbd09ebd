"""Worker-like processes that record metrics in multiprocess mode, for the supervisor's tests.

``python -m tests.unit.metrics_children DIR COUNT`` forks COUNT children; each
records :func:`workload` with the real :class:`WorkerMetrics` into DIR (its
own files, named after its pid) and exits. The pids go to stdout, one a line.
``PROMETHEUS_MULTIPROC_DIR`` is set before ``prometheus_client`` is imported,
as the supervisor does for a real worker.
"""

from __future__ import annotations

import os
import sys

from mcproxy.model import Address, Mode, Route
from mcproxy.worker.errors import Reason
from mcproxy.worker.records import ConnectionRecord, RequestRecord

__all__ = ["LISTENER", "ROUTES", "workload"]

LISTENER = "127.0.0.1:8443"
ROUTES = 20
"""Routes per listener: with every metric, about 600 series per worker."""


def workload() -> tuple[list[ConnectionRecord], list[RequestRecord]]:
    """Per route: 2 relayed connections and a dial failure; one refusal per reason; and
    L7 requests with a policy block. The counts every test expects are derived from it."""
    connections, requests = [], []
    for i in range(ROUTES):
        route = Route(f"r{i}.test", (Address("127.0.0.1", 9000 + i),))
        for up, down in ((100, 1000), (20, 0)):
            record = ConnectionRecord(LISTENER, ("192.0.2.1", 1), ("127.0.0.1", 8443))
            record.route, record.outcome = route, "closed"
            record.bytes_up, record.bytes_down, record.dial_seconds = up, down, 0.001
            connections.append(record)
        failed = ConnectionRecord(LISTENER, ("192.0.2.1", 1), ("127.0.0.1", 8443))
        failed.route, failed.outcome = route, "backend_unreachable"
        connections.append(failed)
        web = Route(f"w{i}.test", (Address("127.0.0.1", 9500 + i),), mode=Mode.L7)
        for status in (200, 404, 502):
            requests.append(RequestRecord(LISTENER, web.hostname, "GET", status, 0.02))
        requests.append(
            RequestRecord(LISTENER, web.hostname, "POST", 403, 0.001, 0, 0, "require_header")
        )
    for reason in Reason:
        refused = ConnectionRecord(LISTENER, ("192.0.2.1", 1), ("127.0.0.1", 8443))
        refused.outcome = f"refused:{reason}"
        connections.append(refused)
    return connections, requests


def _child() -> None:
    from mcproxy.worker.metrics import WorkerMetrics

    metrics = WorkerMetrics()
    connections, requests = workload()
    for record in connections:
        metrics.connection_started(record)
        metrics.connection_finished(record)
    for request in requests:
        metrics.request_finished(request)
    held = ConnectionRecord(LISTENER, ("192.0.2.1", 1), ("127.0.0.1", 8443))
    metrics.connection_started(held)  # still open when the process ends
    metrics.set_active({LISTENER: 1})
    metrics.flush()


def main() -> None:
    directory, count = sys.argv[1], int(sys.argv[2])
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    import prometheus_client  # noqa: F401  (after the variable, as in a worker)

    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            try:
                _child()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        print(pid, flush=True)


if __name__ == "__main__":
    main()
