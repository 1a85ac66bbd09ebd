"""The benchmark's order of work: certificates, backends, proxies, scenarios, report.

Per worker count, both proxies run side by side for the throughput and
latency scenarios, and each run alternates which proxy goes first, so slow
drift in the machine's load (it is shared) hits both alike. The memory
scenarios start a fresh proxy for every run: a proxy that has already held and
freed connections would reuse that memory and show a smaller growth.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from bench import scenarios
from bench.backends import ResponderBackend, SourceBackend
from bench.proxies import HAProxy, McProxy, Proxy, Upstreams
from bench.report import JsonLines, table
from bench.settings import Settings
from mcproxy.devcerts import issue, make_ca
from tests.e2e.harness import REPO_ROOT

__all__ = ["run"]

_SIDE_BY_SIDE = (
    "l4_bulk",
    "l4_connrate",
    "l4_latency",
    "l7_h2",
    "l7_http1",
    "l7_h2_h1back",
    "l7_http1_h1back",
)
_FD_HEADROOM = 100


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _maxconn(settings: Settings) -> int:
    """HAProxy's ``maxconn``, for the measured one and the responder backend alike."""
    return max(settings.idle_l4, settings.idle_l7) + _FD_HEADROOM


def _raise_fd_limit(settings: Settings) -> Settings:
    """Room for the idle scenarios: a proxy holds two fds per L4 connection.

    Root may raise the hard limit; anyone else gets the hard limit, and the
    idle counts shrink to fit (the figures record how many were opened).
    """
    wanted = 2 * _maxconn(settings) + _FD_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(wanted, soft), max(wanted, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if limit >= wanted:
        return settings
    fit = (limit - 3 * _FD_HEADROOM) // 2
    _say(f"open-file limit {limit}: idle scenarios use at most {fit} connections")
    return replace(settings, idle_l4=min(settings.idle_l4, fit), idle_l7=min(settings.idle_l7, fit))


def _missing_tools(settings: Settings) -> list[str]:
    needed = ["haproxy"]
    if any(s.startswith("l7_h2") for s in settings.scenarios):
        needed.append("h2load")
    if any(s.startswith("l7_http1") for s in settings.scenarios):
        needed.append("wrk")
    return [tool for tool in needed if shutil.which(tool) is None]


def _commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=False,
    )
    return done.stdout.strip() or "unknown"


class Bench:
    def __init__(self, settings: Settings, directory: Path, upstreams: Upstreams, label: str):
        self.settings = settings
        self.directory = directory
        self.upstreams = upstreams
        self.out = JsonLines(settings.out)
        self.base = {"label": label, "commit": _commit()}
        self._instances = 0

    def record(self, scenario: str, proxy: str, workers: int, run: int, **figures: Any) -> None:
        record = {
            **self.base,
            "scenario": scenario,
            "proxy": proxy,
            "workers": workers,
            "run": run,
            "load1": round(os.getloadavg()[0], 2),
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            **figures,
        }
        self.out.write(record)
        shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}
        _say(f"[w{workers} run {run}] {scenario:11} {proxy:8} {shown}")

    def attempt(
        self, scenario: str, proxy: Proxy, workers: int, run: int, measure: Callable[[], Any]
    ) -> None:
        try:
            figures = measure()
        except Exception as exc:  # one failed run is reported, the others still count
            self.record(scenario, proxy.name, workers, run, error=f"{type(exc).__name__}: {exc}")
            return
        self.record(scenario, proxy.name, workers, run, **figures)

    def new_proxies(self, workers: int) -> list[Proxy]:
        self._instances += 1
        where = self.directory / f"proxies-{self._instances}"
        proxies: list[Proxy] = [
            McProxy(where / "mc-proxy", self.upstreams, workers),
            HAProxy(where / "haproxy", self.upstreams, workers, _maxconn(self.settings)),
        ]
        started: list[Proxy] = []
        try:
            for proxy in proxies:
                proxy.start()
                started.append(proxy)
                if self.settings.proxy_cpus:
                    proxy.tree.pin(set(self.settings.proxy_cpus))
        except BaseException:
            for proxy in started:
                proxy.stop()
            raise
        return proxies

    def side_by_side(self, workers: int) -> None:
        chosen = [s for s in _SIDE_BY_SIDE if s in self.settings.scenarios]
        if not chosen:
            return
        proxies = self.new_proxies(workers)
        try:
            no_l7 = {p.name: scenarios.l7_available(p) for p in proxies}
            for scenario in chosen:
                for run in range(self.settings.runs):
                    order = proxies if run % 2 == 0 else proxies[::-1]
                    if scenario == "l4_latency":
                        self.latency(order, workers, run)
                        continue
                    for proxy in order:
                        if scenario.startswith("l7") and no_l7[proxy.name]:
                            reason = f"L7 not available: {no_l7[proxy.name]}"
                            self.record(scenario, proxy.name, workers, run, unavailable=reason)
                            continue
                        measure = partial(getattr(scenarios, scenario), proxy, self.settings)
                        self.attempt(scenario, proxy, workers, run, measure)
        finally:
            for proxy in proxies:
                proxy.stop()

    def latency(self, proxies: list[Proxy], workers: int, run: int) -> None:
        try:
            by_proxy = scenarios.l4_latency(proxies, self.upstreams, self.settings)
        except Exception as exc:
            for proxy in proxies:
                error = f"{type(exc).__name__}: {exc}"
                self.record("l4_latency", proxy.name, workers, run, error=error)
            return
        for proxy in proxies:
            self.record("l4_latency", proxy.name, workers, run, **by_proxy[proxy.name])

    def idle(self, workers: int) -> None:
        for scenario, count, l7 in (
            ("idle_l4", self.settings.idle_l4, False),
            ("idle_l7", self.settings.idle_l7, True),
        ):
            if scenario not in self.settings.scenarios:
                continue
            for run in range(self.settings.runs):
                proxies = self.new_proxies(workers)
                try:
                    for proxy in proxies if run % 2 == 0 else proxies[::-1]:
                        reason = scenarios.l7_available(proxy) if l7 else None
                        if reason:
                            unavailable = f"L7 not available: {reason}"
                            self.record(scenario, proxy.name, workers, run, unavailable=unavailable)
                            continue
                        measure = partial(scenarios.idle, proxy, count, l7)
                        self.attempt(scenario, proxy, workers, run, measure)
                finally:
                    for proxy in proxies:
                        proxy.stop()


def run(settings: Settings, label: str = "") -> int:
    missing = _missing_tools(settings)
    if missing:
        _say(f"missing tools: {', '.join(missing)} (`make bench` installs them with apt-get)")
        return 2
    settings = _raise_fd_limit(settings)
    if settings.load_cpus:
        # Inherited by the backends and load generators; the proxies are moved after start.
        os.sched_setaffinity(0, settings.load_cpus)
    _say(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    with contextlib.ExitStack() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mc-proxy-bench-")))
        ca = make_ca("mc-proxy bench CA")
        bulk_cert, bulk_key = issue(ca, "bulk.test", directory)
        conn_cert, conn_key = issue(ca, "conn.test", directory)
        l7_cert, l7_key = issue(ca, "localhost", directory)
        conn_pem, l7_pem = directory / "conn.test.combined.pem", directory / "l7.combined.pem"
        conn_pem.write_bytes(conn_cert.read_bytes() + conn_key.read_bytes())
        l7_pem.write_bytes(l7_cert.read_bytes() + l7_key.read_bytes())
        source = SourceBackend(bulk_cert, bulk_key)
        stack.callback(source.stop)
        responder = ResponderBackend(directory, conn_pem, _maxconn(settings))
        stack.callback(responder.stop)
        upstreams = Upstreams(
            source.port,
            responder.tls_port,
            responder.h2c_port,
            l7_cert,
            l7_key,
            l7_pem,
            responder.h1_port,
        )
        bench = Bench(settings, directory, upstreams, label)
        stack.callback(bench.out.close)
        for workers in settings.workers:
            bench.side_by_side(workers)
            bench.idle(workers)
    print(table(bench.out.records))
    print(f"raw figures (JSON lines): {settings.out}")
    return 0
