"""What metrics cost: the L4 connection-rate scenario with metrics on and off.

Short TLS connections, each with a full handshake, through an L4 route on
loopback: ``wrk`` with ``Connection: close`` (one new connection per request)
-> mc-proxy -> HAProxy terminating TLS and answering 200 (no session cache, no
tickets, so every handshake is a full one). Rounds alternate on/off so that a
change in the machine's load hits both sides alike.

On a small box the load generator and the backend saturate before the proxy,
so the fair figure is the proxy's own CPU time per connection, read from
/proc for its whole process group; connections/s is printed too. The ratio
is on/off; the target is within 10%. It also times the metrics updates alone
(one connection's worth, in a worker-like process), which is the part of the
difference that is not noise.

    .venv/bin/python -m bench.metrics_cost [--rounds 5] [--seconds 5] [--workers 1]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.certs import issue, make_ca
from tests.e2e.harness import ProxyProcess, free_port, wait_for

HOSTNAME = "localhost"
"""wrk sends the URL's host as SNI and has no --resolve: a name that resolves to loopback."""
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Options:
    workers: int
    seconds: float
    clients: int
    metrics_dir: str | None = None
    """PROMETHEUS_MULTIPROC_DIR for the proxy (default: beside its database)."""


@dataclass(frozen=True)
class Run:
    metrics: bool
    connections: int
    seconds: float
    cpu_seconds: float
    socket_errors: int

    @property
    def rate(self) -> float:
        return self.connections / self.seconds

    @property
    def cpu_us_per_connection(self) -> float:
        return self.cpu_seconds / self.connections * 1e6


def haproxy_backend(directory: Path, cert: Path, key: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    combined = directory / "backend.pem"
    combined.write_bytes(cert.read_bytes() + key.read_bytes())
    config = directory / "haproxy.cfg"
    config.write_text(
        f"""global
    maxconn 4000
    nbthread 1
    tune.ssl.cachesize 0
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend backend
    bind 127.0.0.1:{port} ssl crt {combined} no-tls-tickets alpn http/1.1
    http-request return status 200 content-type text/plain string "ok"
"""
    )
    process = subprocess.Popen(["haproxy", "-f", str(config)], stdout=subprocess.DEVNULL)
    return process, port


def proxy_cpu_seconds(proxy: ProxyProcess) -> float:
    """utime + stime of the supervisor and its live workers."""
    assert proxy.process is not None
    total = 0
    for pid in [proxy.process.pid, *proxy.worker_pids()]:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / CLOCK_TICKS


def wrk(port: int, seconds: float, connections: int) -> tuple[int, int]:
    """(requests completed, each on its own TLS connection; socket errors)."""
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds:g}s",
            "-H",
            "Connection: close",
            f"https://{HOSTNAME}:{port}/",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 30,
    ).stdout
    match = re.search(r"(\d+) requests in", out)
    if match is None or int(match.group(1)) == 0:
        raise RuntimeError(f"wrk failed:\n{out}")
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return int(match.group(1)), sum(map(int, errors.groups())) if errors else 0


@contextlib.contextmanager
def _environment(name: str, value: str | None) -> Iterator[None]:
    """``name`` set to ``value`` (or unset) for the block."""
    saved = os.environ.pop(name, None)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)
        if saved is not None:
            os.environ[name] = saved


def one_run(directory: Path, backend_port: int, metrics: bool, opts: Options) -> Run:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    port = free_port()
    config: dict[str, object] = {
        "listeners": [
            {
                "addr": f"127.0.0.1:{port}",
                "routes": [{"hostname": HOSTNAME, "backend": f"127.0.0.1:{backend_port}"}],
            }
        ]
    }
    metrics_port = free_port()
    if metrics:
        config["metrics"] = {"addr": f"127.0.0.1:{metrics_port}"}
    proxy = ProxyProcess(directory, config, workers=opts.workers)
    env_dir = opts.metrics_dir if metrics else None
    with _environment("PROMETHEUS_MULTIPROC_DIR", env_dir):  # the proxy inherits it
        proxy.start()
    try:
        wrk(port, 1, opts.clients)  # warm-up: imports, first handshakes
        cpu = proxy_cpu_seconds(proxy)
        started = time.monotonic()
        done, errors = wrk(port, opts.seconds, opts.clients)
        elapsed = time.monotonic() - started
        cpu = proxy_cpu_seconds(proxy) - cpu
        if metrics:
            url = f"http://127.0.0.1:{metrics_port}/metrics"

            def counted() -> bool:
                with urllib.request.urlopen(url, timeout=10) as reply:
                    text = reply.read().decode()
                found = re.search(r"^mcproxy_connections_total\{[^}]*\} (\S+)$", text, re.M)
                return found is not None and float(found.group(1)) >= done

            wait_for(counted, 10, "the scrape to count the run's connections")
    finally:
        proxy.stop()
    return Run(metrics, done, elapsed, cpu, errors)


def record_cost(iterations: int = 100_000) -> float:
    """µs a worker spends on metrics for one relayed L4 connection (accepted, active up
    and down, outcome, dial latency, bytes both ways), in multiprocess mode. Run in a
    child process whose environment names the multiprocess directory."""
    from mcproxy.model import Address, Route
    from mcproxy.worker.metrics import WorkerMetrics
    from mcproxy.worker.records import ConnectionRecord

    metrics = WorkerMetrics()
    record = ConnectionRecord("127.0.0.1:8443", ("127.0.0.1", 40000), ("127.0.0.1", 8443))
    record.route = Route("alpha.test", (Address("127.0.0.1", 9000),))
    record.outcome, record.bytes_up, record.bytes_down = "closed", 600, 1300
    record.dial_seconds = 0.0004
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(iterations):
            metrics.connection_started(record)
            metrics.connection_finished(record)
            metrics.flush()  # the worst case: a batch of one
        best = min(best, (time.perf_counter() - started) / iterations * 1e6)
    return best


def record_cost_in_child() -> float:
    with tempfile.TemporaryDirectory(prefix="mc-proxy-metrics-cost-") as tmp:
        out = subprocess.run(
            [sys.executable, "-m", "bench.metrics_cost", "--record-cost"],
            env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": tmp},
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
    return float(out.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--clients", type=int, default=8, help="concurrent wrk connections")
    parser.add_argument(
        "--metrics-dir", help="the workers' metric files here (e.g. on /dev/shm), not on disk"
    )
    parser.add_argument("--record-cost", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.record_cost:
        print(record_cost())
        return 0
    opts = Options(args.workers, args.seconds, args.clients, args.metrics_dir)
    for tool in ("wrk", "haproxy"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (apt-get install {tool})", file=sys.stderr)
            return 2
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="mc-proxy-metrics-cost-") as tmp:
        root = Path(tmp)
        cert, key = issue(make_ca(), HOSTNAME, root)
        backend, backend_port = haproxy_backend(root, cert, key)
        try:
            for i in range(args.rounds):
                order = (False, True) if i % 2 == 0 else (True, False)
                for metrics in order:
                    run = one_run(root / "proxy", backend_port, metrics, opts)
                    runs.append(run)
                    print(
                        f"round {i + 1} metrics {'on ' if metrics else 'off'}:"
                        f" {run.rate:7.0f} conn/s, {run.cpu_us_per_connection:6.1f} µs CPU/conn"
                        f" ({run.connections} connections, {run.socket_errors} socket errors)",
                        flush=True,
                    )
        finally:
            backend.terminate()
            backend.wait(10)
    on = [r for r in runs if r.metrics]
    off = [r for r in runs if not r.metrics]
    rate_on = statistics.median(r.rate for r in on)
    rate_off = statistics.median(r.rate for r in off)
    cpu_on = statistics.median(r.cpu_us_per_connection for r in on)
    cpu_off = statistics.median(r.cpu_us_per_connection for r in off)
    print()
    print(f"medians of {args.rounds} rounds, {args.workers} worker(s), {args.clients} clients:")
    print(f"  {'':22} {'off':>9} {'on':>9} {'on/off':>7}")
    print(f"  {'connections/s':22} {rate_off:9.0f} {rate_on:9.0f} {rate_on / rate_off:7.3f}")
    print(f"  {'proxy CPU µs/conn':22} {cpu_off:9.1f} {cpu_on:9.1f} {cpu_on / cpu_off:7.3f}")
    within = cpu_on / cpu_off <= 1.10
    print(f"  proxy CPU per connection within 10%: {'yes' if within else 'NO'}")
    per_record = record_cost_in_child()
    print(
        f"  metrics updates per connection, in a worker: {per_record:.1f} µs"
        f" ({per_record / cpu_off * 100:.1f}% of the proxy's CPU per connection)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
