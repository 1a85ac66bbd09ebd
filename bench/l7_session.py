"""CPU per request inside the L7 legs *with the worker's own glue*: ``bench.l7_legs`` plus
the session (route lookup per request, balancing, failover bookkeeping), the access-log line
and the metrics updates.

``python -m bench.l7_session [--requests 2000] [--rounds 5] [--protocol h2|http1]`` runs
``bench.l7_legs``'s loop, but the client legs get the router of a real ``proxy._Session``
(over a real ``ConnectionServer`` and ``L7Proxy`` whose loop never runs), the access log
goes to ``/dev/null`` through the direct writer, and the worker's ``WorkerMetrics`` (in
multiprocess mode, in a temporary directory) is flushed inside the meter after every
batch, so the per-request metric updates count too. Alternate A and B and compare the
medians, as for any A/B.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import tempfile
import time

__all__ = ["main"]


def _setup() -> None:
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="l7-session-"))
    from mcproxy.worker.accesslog import WORKER_FORMAT

    handler = logging.StreamHandler(open(os.devnull, "w"))  # noqa: SIM115 (the process's)
    handler.setFormatter(logging.Formatter(WORKER_FORMAT))
    access = logging.getLogger("mcproxy.access")
    access.handlers[:] = [handler]
    access.setLevel(logging.INFO)
    access.propagate = False


def run(requests: int, protocol: str) -> float:
    """Microseconds of CPU per request: the legs, the session glue, the log and metrics."""
    from bench import l7_legs
    from mcproxy.model import Listener, ProxyState, RouteTable
    from mcproxy.settings import ProxyTimeouts
    from mcproxy.worker.l7.pool import Dial
    from mcproxy.worker.l7.proxy import L7Proxy, _Session
    from mcproxy.worker.listener import ConnectionServer
    from mcproxy.worker.metrics import WorkerMetrics
    from mcproxy.worker.records import ConnectionRecord
    from tests.unit import l7world

    loop = asyncio.new_event_loop()
    server = ConnectionServer(loop, ProxyTimeouts())
    route = l7world.ROUTE
    listener = "127.0.0.1:8443"
    server.state = ProxyState(
        generation=1,
        listeners={
            listener: Listener(addr=_address(listener), routes=RouteTable({route.hostname: route}))
        },
    )
    metrics = WorkerMetrics()
    metrics._loop, metrics._server = loop, server
    server.on_request.append(metrics.request_finished)
    proxy = L7Proxy(server)
    worlds: list[l7world.World] = []

    original_world = l7world.World

    class World(original_world):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            worlds.append(self)
            proxy.dial = self._dial  # type: ignore[method-assign]
            proxy.clock = self.timers

        def _dial(self, attempt: Dial) -> None:
            self.dials.append(attempt)

        def router(self):  # type: ignore[no-untyped-def]
            record = ConnectionRecord(
                listener=listener, client=(l7world.CLIENT_IP, 40000), local=("127.0.0.1", 8443)
            )
            record.sni, record.route = route.hostname, route
            return _Session(proxy, record, route).router

    setattr(l7_legs, "World", World)  # noqa: B010 (a module global the loop reads)
    original_answer = l7_legs._answer

    def answer(world: l7world.World, meter: l7_legs._Meter, wrapped: set[int]) -> None:
        started = time.process_time()
        metrics.flush()  # the last batch's records: one flush per batch, as the timer does
        meter.spent += time.process_time() - started
        original_answer(world, meter, wrapped)

    l7_legs._answer = answer
    try:
        figure = l7_legs.run(requests, protocol)
    finally:
        setattr(l7_legs, "World", original_world)  # noqa: B010
        l7_legs._answer = original_answer
        proxy.pool.clear()
        loop.close()
    return figure


def _address(text: str):  # type: ignore[no-untyped-def]
    from mcproxy.model import Address

    host, _, port = text.rpartition(":")
    return Address(host, int(port))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--protocol", choices=("h2", "http1"), default="h2")
    args = parser.parse_args()
    _setup()
    figures = [run(args.requests, args.protocol) for _ in range(args.rounds)]
    print(
        f"{args.protocol}+session: median {statistics.median(figures):.1f} us per request "
        f"({', '.join(f'{f:.1f}' for f in figures)})",
        file=sys.stdout,
    )


if __name__ == "__main__":
    main()
