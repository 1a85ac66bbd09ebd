"""AddRoute latency with 10,000 routes loaded, every worker's acknowledgement included.

    python -m bench.admin_latency [--routes 10000] [--calls 500] [--workers 2]

Starts a real ``mc-proxy serve`` (the e2e harness) whose database is seeded
with ``--routes`` routes on one listener, then times ``--calls`` AddRoute
calls and as many RemoveRoute calls through the client library. Each call
returns only after the SQLite commit (synchronous=FULL, so an fsync) and the
acknowledgement of every worker (invariant 2), so the figures are the whole
write path. It also times the pieces that grow with the route count: one
``apply_change``, and encoding a Delta and a full Snapshot for the pipe.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from mcproxy import pipe
from mcproxy.admin.client import AdminClient
from mcproxy.model import Address, FirewallRules, Listener, Route, RouteAdded, apply_change
from mcproxy.model import make_state as build_state
from tests.e2e.harness import ProxyProcess, free_port


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def summary(name: str, samples: list[float]) -> str:
    ms = [s * 1000 for s in samples]
    return (
        f"{name:<12} n={len(ms):<5} p50={percentile(ms, 0.50):7.2f} ms"
        f"  p99={percentile(ms, 0.99):7.2f} ms  max={max(ms):7.2f} ms"
        f"  mean={statistics.fmean(ms):7.2f} ms"
    )


def timed(call: Callable[[], object], repeat: int = 1) -> float:
    started = time.perf_counter()
    for _ in range(repeat):
        call()
    return (time.perf_counter() - started) / repeat


def in_process(routes: int) -> None:
    """The pieces that scale with the route count, without processes or I/O."""
    table = {
        f"host{i}.bench.test": Route(f"host{i}.bench.test", (Address("127.0.0.1", 9),))
        for i in range(routes)
    }
    state = build_state(1, [Listener(Address("127.0.0.1", 1), routes=table)], FirewallRules())
    change = RouteAdded("127.0.0.1:1", Route("new.bench.test", (Address("127.0.0.1", 9),)))
    apply_s = timed(lambda: apply_change(state, change), repeat=200)
    delta = pipe.Delta(change, 2)
    delta_s = timed(lambda: pipe.encode(delta), repeat=200)
    snapshot = pipe.Snapshot(state)
    snapshot_s = timed(lambda: pipe.encode(snapshot), repeat=5)
    decode_s = timed(lambda: pipe.FrameDecoder().feed(pipe.encode(snapshot)), repeat=5) - snapshot_s
    print(f"in process, {routes} routes:")
    print(f"  apply_change(RouteAdded)  {apply_s * 1e6:9.1f} us")
    print(f"  encode Delta              {delta_s * 1e6:9.1f} us  ({len(pipe.encode(delta))} bytes)")
    print(
        f"  encode Snapshot           {snapshot_s * 1e3:9.1f} ms"
        f"  ({len(pipe.encode(snapshot)) / 1e6:.1f} MB); decode {decode_s * 1e3:.1f} ms"
    )


def end_to_end(routes: int, calls: int, workers: int) -> None:
    with tempfile.TemporaryDirectory(prefix="mcproxy-bench-") as directory:
        port = free_port()
        listener = f"127.0.0.1:{port}"
        seeded = [
            {"hostname": f"host{i}.bench.test", "backend": "127.0.0.1:9"} for i in range(routes)
        ]
        proxy = ProxyProcess(
            Path(directory), {"listeners": [{"addr": listener, "routes": seeded}]}, workers=workers
        )
        started = time.perf_counter()
        proxy.start(wait=False)
        proxy.wait_serving(workers, timeout=120)
        boot = time.perf_counter() - started
        try:
            with AdminClient(str(Path(directory) / "admin.sock")) as admin:
                for i in range(20):  # warm-up: connections, caches, the WAL
                    admin.add_route(listener, f"warm{i}.bench.test", "127.0.0.1:9")
                    admin.remove_route(listener, f"warm{i}.bench.test")
                names = [f"new{i}.bench.test" for i in range(calls)]
                adds = [
                    timed(functools.partial(admin.add_route, listener, name, "127.0.0.1:9"))
                    for name in names
                ]
                removes = [
                    timed(functools.partial(admin.remove_route, listener, name)) for name in names
                ]
                list_s = timed(admin.list_routes, repeat=3)
                status = admin.status()
                assert {w.generation for w in status.workers} == {status.generation}
                assert status.listeners[0].routes == routes
        finally:
            proxy.stop()
    print(f"end to end, {routes} routes, {workers} workers ({boot:.1f} s to start and boot):")
    print("  " + summary("AddRoute", adds))
    print("  " + summary("RemoveRoute", removes))
    print(f"  ListRoutes ({routes} routes)  {list_s * 1e3:.1f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.admin_latency")
    parser.add_argument("--routes", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    in_process(args.routes)
    end_to_end(args.routes, args.calls, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
