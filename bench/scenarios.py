"""One run of one scenario against one proxy: drive the load, read the proxy's CPU and memory.

Every function returns the raw figures of that run as a flat dict; the report
takes medians. CPU is the proxy tree's ``utime + stime`` between the start
and the end of the load (:class:`~bench.procs.ProcessTree`), so the load
generator's and the backends' CPU never count.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import socket
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.proxies import Proxy, Upstreams
from bench.settings import Settings
from bench.stats import percentile
from tests.e2e.harness import REPO_ROOT

__all__ = [
    "Figures",
    "idle",
    "l4_bulk",
    "l4_connrate",
    "l4_latency",
    "l7_available",
    "l7_h2",
    "l7_h2_h1back",
    "l7_http1",
    "l7_http1_h1back",
    "parse_h2load",
    "parse_wrk",
]

Figures = dict[str, Any]

_TOOL_GRACE = 60.0
"""Extra seconds a load tool may take beyond its nominal duration before it is killed."""


def _loadgen(*args: str) -> list[str]:
    return [sys.executable, "-m", "bench.loadgen", *args]


def _run(command: list[str], timeout: float) -> str:
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{command[0]} exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def _measured(proxy: Proxy, load: Callable[[], Figures]) -> Figures:
    """Run ``load`` and add the proxy tree's CPU seconds spent meanwhile."""
    tree = proxy.tree
    before = tree.cpu_seconds()
    figures = load()
    figures["cpu_s"] = tree.cpu_seconds() - before
    return figures


# --- L4 ----------------------------------------------------------------------------------


def l4_bulk(proxy: Proxy, settings: Settings) -> Figures:
    """Parallel downloads through SNI passthrough: CPU seconds per GB, MB/s."""
    command = _loadgen(
        "bulk",
        f"--port={proxy.l4_port}",
        "--sni=bulk.test",
        f"--size={settings.bulk_size}",
        f"--parallel={settings.bulk_parallel}",
    )
    f = _measured(proxy, lambda: json.loads(_run(command, 600)))
    if not f["complete"]:
        raise RuntimeError(f"incomplete downloads through {proxy.name}: {f}")
    gigabytes = f["bytes"] / 1e9
    return {
        **f,
        "cpu_s_per_gb": f["cpu_s"] / gigabytes,
        "mb_per_s": f["bytes"] / 1e6 / f["seconds"],
    }


def l4_connrate(proxy: Proxy, settings: Settings) -> Figures:
    """Short TLS connections, a full handshake each: CPU per connection, rate, p50/p99."""
    command = _loadgen(
        "connrate",
        f"--port={proxy.l4_port}",
        "--sni=conn.test",
        f"--seconds={settings.connrate_seconds}",
        f"--concurrency={settings.connrate_concurrency}",
    )
    f = _measured(proxy, lambda: json.loads(_run(command, settings.connrate_seconds + _TOOL_GRACE)))
    if not f["connections"]:
        raise RuntimeError(f"no connection succeeded through {proxy.name}: {f}")
    return {
        **f,
        "cpu_us_per_conn": f["cpu_s"] / f["connections"] * 1e6,
        "conn_per_s": f["connections"] / f["seconds"],
    }


def l4_latency(
    proxies: list[Proxy], upstreams: Upstreams, settings: Settings
) -> dict[str, Figures]:
    """Fresh TLS connection, one at a time: time through each proxy and direct, alternating."""
    command = _loadgen(
        "latency",
        "--sni=conn.test",
        f"--count={settings.latency_count}",
        f"--target=direct={upstreams.tls_port}",
        *[f"--target={p.name}={p.l4_port}" for p in proxies],
    )
    times = json.loads(_run(command, settings.latency_count * 0.5 + _TOOL_GRACE))
    direct = times["direct"]
    return {
        p.name: {
            "p50_ms": times[p.name]["p50_ms"],
            "p99_ms": times[p.name]["p99_ms"],
            "direct_p50_ms": direct["p50_ms"],
            "direct_p99_ms": direct["p99_ms"],
            "added_ms": times[p.name]["p50_ms"] - direct["p50_ms"],
            "n": times[p.name]["n"],
        }
        for p in proxies
    }


# --- L7 ----------------------------------------------------------------------------------


def l7_available(proxy: Proxy) -> str | None:
    """None when the proxy's L7 route answers a TLS handshake with ALPN h2; else why not."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection(("127.0.0.1", proxy.l7_port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            alpn = tls.selected_alpn_protocol()
    except OSError as exc:
        return f"TLS handshake on the L7 route failed ({type(exc).__name__}: {exc})"
    if alpn != "h2":
        return f"the L7 route negotiated ALPN {alpn!r}, not h2"
    return None


_H2LOAD_FINISHED = re.compile(r"finished in ([\d.]+)s, ([\d.]+) req/s")
_H2LOAD_REQUESTS = re.compile(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded")


def parse_h2load(output: str, log: str) -> Figures:
    """Figures from h2load's summary and its ``--log-file`` (start, status, µs to the end)."""
    finished = _H2LOAD_FINISHED.search(output)
    requests = _H2LOAD_REQUESTS.search(output)
    if finished is None or requests is None:
        raise RuntimeError(f"cannot read h2load output:\n{output[-2000:]}")
    times = [int(line.split("\t")[2]) / 1000 for line in log.splitlines() if line.count("\t") >= 2]
    return {
        "requests": int(requests.group(2)),
        "seconds": float(finished.group(1)),
        "p50_ms": percentile(times, 0.5),
        "p99_ms": percentile(times, 0.99),
    }


def l7_h2(proxy: Proxy, settings: Settings, port: int | None = None) -> Figures:
    """h2load over TLS to the L7 route (h2c backend): CPU per request, req/s, p50/p99."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "h2load.log"
        command = [
            "h2load",
            "-t1",
            f"-c{settings.h2_clients}",
            f"-m{settings.h2_streams}",
            f"-D{settings.l7_seconds}",
            f"--log-file={log}",
            f"https://localhost:{port or proxy.l7_port}/",
        ]
        output = ""

        def load() -> Figures:
            nonlocal output
            output = _run(command, settings.l7_seconds + _TOOL_GRACE)
            return parse_h2load(output, log.read_text())

        f = _measured(proxy, load)
    if not f["requests"]:
        raise RuntimeError(f"no h2 request succeeded through {proxy.name}:\n{output[-2000:]}")
    return {
        **f,
        "cpu_us_per_req": f["cpu_s"] / f["requests"] * 1e6,
        "req_per_s": f["requests"] / f["seconds"],
    }


_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}
_WRK_PERCENTILE = re.compile(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_WRK_TOTAL = re.compile(r"(\d+) requests in ([\d.]+)(us|ms|s|m)")
_WRK_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def parse_wrk(output: str) -> Figures:
    total = _WRK_TOTAL.search(output)
    if total is None:
        raise RuntimeError(f"cannot read wrk output:\n{output[-2000:]}")
    unit_seconds = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[total.group(3)]
    bad = _WRK_NON_2XX.search(output)
    figures: Figures = {
        "requests": int(total.group(1)) - (int(bad.group(1)) if bad else 0),
        "seconds": float(total.group(2)) * unit_seconds,
    }
    for pct, value, unit in _WRK_PERCENTILE.findall(output):
        figures[f"p{pct}_ms"] = float(value) * _WRK_UNITS[unit]
    return figures


def l7_http1(proxy: Proxy, settings: Settings, port: int | None = None) -> Figures:
    """wrk over TLS, HTTP/1.1 keep-alive, to the same L7 route: CPU per request, req/s."""
    command = [
        "wrk",
        "-t1",
        f"-c{settings.http1_connections}",
        f"-d{settings.l7_seconds}s",
        "--latency",
        f"https://localhost:{port or proxy.l7_port}/",
    ]
    f = _measured(proxy, lambda: parse_wrk(_run(command, settings.l7_seconds + _TOOL_GRACE)))
    if not f["requests"]:
        raise RuntimeError(f"no HTTP/1.1 request succeeded through {proxy.name}")
    return {
        **f,
        "cpu_us_per_req": f["cpu_s"] / f["requests"] * 1e6,
        "req_per_s": f["requests"] / f["seconds"],
    }


def l7_h2_h1back(proxy: Proxy, settings: Settings) -> Figures:
    """``l7_h2`` to a route whose backend speaks HTTP/1.1 (keep-alive pool)."""
    return l7_h2(proxy, settings, proxy.l7h1_port)


def l7_http1_h1back(proxy: Proxy, settings: Settings) -> Figures:
    """``l7_http1`` to a route whose backend speaks HTTP/1.1 (keep-alive pool)."""
    return l7_http1(proxy, settings, proxy.l7h1_port)


# --- memory ------------------------------------------------------------------------------


def _hold(port: int, sni: str, count: int, h2: bool) -> tuple[subprocess.Popen[str], Figures]:
    """Start a loadgen that opens ``count`` connections; returns it once they are all open."""
    command = _loadgen("idle", f"--port={port}", f"--sni={sni}", f"--count={count}")
    if h2:
        command.append("--h2")
    process = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT
    )
    assert process.stdout is not None
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            line = pool.submit(process.stdout.readline).result(timeout=count / 50 + _TOOL_GRACE)
        except concurrent.futures.TimeoutError:
            process.kill()
            raise RuntimeError(f"{count} idle connections did not open in time") from None
    if not line:
        process.wait()
        raise RuntimeError(f"the idle loadgen exited {process.returncode}")
    return process, json.loads(line)


def _release(process: subprocess.Popen[str]) -> None:
    assert process.stdin is not None
    process.stdin.close()
    process.wait(_TOOL_GRACE)


def idle(proxy: Proxy, count: int, l7: bool) -> Figures:
    """RSS added per idle open connection (a fresh proxy: freed memory is not reused yet)."""
    port, sni = (proxy.l7_port, "localhost") if l7 else (proxy.l4_port, "conn.test")
    warm, _ = _hold(port, sni, 20, l7)  # first connections pay for lazy set-up
    _release(warm)
    tree = proxy.tree
    before = tree.rss_bytes()
    process, opened = _hold(port, sni, count, l7)
    try:
        after = tree.rss_bytes()
    finally:
        _release(process)
    if opened["failed"]:
        raise RuntimeError(f"{opened['failed']} of {count} idle connections failed")
    return {
        "connections": opened["open"],
        "rss_before": before,
        "rss_after": after,
        "kib_per_conn": (after - before) / opened["open"] / 1024,
    }
