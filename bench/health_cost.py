"""What health checks cost the supervisor: N backends checked every second.

Runs ``mc-proxy serve`` with ``--routes`` L4 routes of ``--backends-per-route``
backends each, every backend a distinct address (``127.0.x.y:PORT``, all
answered by one listening socket on ``0.0.0.0:PORT`` in a helper process), and
reads the supervisor's own CPU time (utime + stime of its process, all its
threads, from /proc; the workers and the backend never count) over
``--seconds``. Rounds alternate with checks on and off (the same routes
without ``health_check``) so that the machine's load hits both alike; medians.

    .venv/bin/python -m bench.health_cost [--kind tcp|http] [--rounds 3] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.e2e.harness import ProxyProcess, free_port

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def _serve(port: int, kind: str) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            if kind == "http":
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                await writer.drain()
        writer.close()

    async def main() -> None:
        sock = socket.create_server(("0.0.0.0", port), backlog=4096, reuse_port=True)
        server = await asyncio.start_server(handle, sock=sock)
        await server.serve_forever()

    asyncio.run(main())


HAPROXY_HTTP = """\
global
    maxconn 4000
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend checks
    bind 0.0.0.0:{port}
    http-request return status 200 content-type text/plain string "ok"
"""


@contextlib.contextmanager
def backend_server(port: int, kind: str) -> Iterator[None]:
    """One listening socket on 0.0.0.0:``port`` for every backend address: HAProxy for
    ``http`` when installed (a Python server cannot answer 1,000 GETs a second on a
    loaded 2-core box), else a small asyncio server."""
    process: Any
    if kind == "http" and shutil.which("haproxy"):
        directory = tempfile.mkdtemp(prefix="mcproxy-health-haproxy-")
        config = Path(directory) / "haproxy.cfg"
        config.write_text(HAPROXY_HTTP.format(port=port))
        process = subprocess.Popen(
            ["haproxy", "-db", "-f", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    else:
        process = multiprocessing.get_context("spawn").Process(
            target=_serve, args=(port, kind), daemon=True
        )
        process.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            time.sleep(0.05)
        yield
    finally:
        process.kill()
        if isinstance(process, subprocess.Popen):
            process.wait()
        else:
            process.join()


def addresses(count: int, port: int) -> list[str]:
    # 127.0.0.0/8 is all loopback: one socket on 0.0.0.0 answers every one of them.
    return [f"127.0.{1 + i // 250}.{1 + i % 250}:{port}" for i in range(count)]


def config(args: argparse.Namespace, port: int, checks: bool, tmp: Path) -> dict[str, Any]:
    backends = addresses(args.routes * args.backends_per_route, port)
    cert = key = None
    if args.kind == "http":  # l7 routes with an HTTP/1.1 cleartext backend leg
        from tests.certs import issue, make_ca

        cert, key = issue(make_ca(), "bench.test", tmp)
    routes = []
    for r in range(args.routes):
        route: dict[str, Any] = {
            "hostname": f"r{r}.bench.test",
            "backends": backends[r * args.backends_per_route : (r + 1) * args.backends_per_route],
        }
        if checks:
            check: dict[str, Any] = {"kind": args.kind, "interval": "1s", "timeout": "500ms"}
            route["health_check"] = check
        if cert is not None:
            route.update(mode="l7", tls_cert=str(cert), tls_key=str(key), backend_protocol="h1")
        routes.append(route)
    return {"listeners": [{"addr": f"127.0.0.1:{free_port()}", "routes": routes}]}


def measure(args: argparse.Namespace, port: int, checks: bool) -> float:
    """The supervisor's CPU, in percent of one core, once settled."""
    with tempfile.TemporaryDirectory(prefix="mcproxy-health-") as tmp:
        proxy = ProxyProcess(Path(tmp), config(args, port, checks, Path(tmp)), workers=1)
        with proxy:
            assert proxy.process is not None
            pid = proxy.process.pid
            time.sleep(args.settle)
            cpu0, t0 = cpu_seconds(pid), time.monotonic()
            time.sleep(args.seconds)
            cpu1, t1 = cpu_seconds(pid), time.monotonic()
            down = proxy.log().count("is down")
        if down:
            print(f"  (warning: {down} backends reported down)")
    return 100.0 * (cpu1 - cpu0) / (t1 - t0)


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.health_cost")
    parser.add_argument("--kind", choices=["tcp", "http"], default="tcp")
    parser.add_argument("--routes", type=int, default=10)
    parser.add_argument("--backends-per-route", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--settle", type=float, default=3.0)
    args = parser.parse_args()
    port = free_port()
    total = args.routes * args.backends_per_route
    on: list[float] = []
    off: list[float] = []
    with backend_server(port, args.kind):
        for round_ in range(args.rounds):
            for checks, results in ((False, off), (True, on)):
                results.append(measure(args, port, checks))
                print(f"round {round_ + 1}: checks {'on ' if checks else 'off'} {results[-1]:.1f}%")
    print(
        f"{total} backends, {args.kind} check every 1s: supervisor CPU median "
        f"{statistics.median(on):.1f}% of one core with checks, "
        f"{statistics.median(off):.1f}% without ({args.rounds} rounds of {args.seconds:g}s)"
    )


if __name__ == "__main__":
    main()
