"""End to end: ``/metrics`` of the real ``mc-proxy serve`` with 2 workers.

Traffic and refusals go through both workers; the scrape is parsed with
prometheus_client's own parser and every count is checked exactly. Counts
land when a connection ends, a moment after the client sees its end, so each
test first waits for the accepted and active counts to settle.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mcproxy.supervisor.metrics import MetricsDirectory
from tests.certs import CA
from tests.e2e.h2backend import H2Backend
from tests.e2e.harness import (
    ProxyProcess,
    TlsBackend,
    client_context,
    free_port,
    is_reset,
    l7_route,
    socket_owner,
    wait_for,
)
from tests.e2e.test_l7 import curl, status_and_body

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class MetricsProxy:
    """``mc-proxy serve`` with metrics on and one listener with ``routes``."""

    def __init__(self, directory: Path, routes: list[dict[str, Any]], **extra: Any) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.listener = f"127.0.0.1:{self.port}"
        self.proc = ProxyProcess(
            directory,
            {
                "metrics": {"addr": f"127.0.0.1:{self.metrics_port}", "path": "/metrics"},
                "listeners": [{"addr": self.listener, "routes": routes}],
                **extra,
            },
        )
        self.metrics_dir = directory / "mc-proxy.db-metrics"

    def scrape(self, path: str = "/metrics") -> Samples:
        url = f"http://127.0.0.1:{self.metrics_port}{path}"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def value(self, samples: Samples, name: str, **labels: str) -> float | None:
        return samples.get((name, frozenset(labels.items())))

    def settled(self, accepted: int, active: int, requests: int | None = None) -> Samples:
        """Wait until the proxy has accepted ``accepted`` and holds ``active``; the scrape.

        With ``requests``, also wait until that many L7 requests are counted both in the
        request counter and in the duration histogram: each family lives in its own file per
        worker, so one scrape can fall between the two writes of a flush.
        """

        def total(samples: Samples, name: str) -> float:
            return sum(v for (n, _), v in samples.items() if n == name)

        def check() -> Samples | None:
            samples = self.scrape()
            got = (
                self.value(samples, "mcproxy_connections_total", listener=self.listener),
                self.value(samples, "mcproxy_connections_active", listener=self.listener),
            )
            if got != (accepted, active):
                return None
            if requests is not None and (
                total(samples, "mcproxy_http_requests_total") != requests
                or total(samples, "mcproxy_http_request_duration_seconds_count") != requests
            ):
                return None
            return samples

        result: Samples = wait_for(check, 10, f"{accepted} accepted and {active} active")
        return result

    def ask_name(self, sni: str, ca: CA) -> str:
        with self.proc.connect(self.port, sni, ca.pem) as tls:
            tls.sendall(b"NAME\n")
            return tls.recv(100).decode().strip()

    def access_lines(self) -> list[dict[str, str]]:
        lines = re.findall(r"pid=(\d+) (client=.*)", self.proc.log())
        return [{"pid": pid, **dict(re.findall(r"(\w+)=(\S+)", rest))} for pid, rest in lines]


@pytest.fixture
def proxy(tmp_path: Path, backends: dict[str, TlsBackend]) -> Any:
    """L4 routes to alpha and beta, one to a closed port, and a firewall."""
    routes = [{"hostname": name, "backend": b.addr} for name, b in backends.items()]
    routes.append({"hostname": "dead.test", "backend": f"127.0.0.1:{free_port()}"})
    firewall = {"blocked_ips": ["127.0.0.3"], "blocked_cidrs": ["127.0.0.4/32"]}
    running = MetricsProxy(tmp_path, routes, firewall=firewall)
    with running.proc:
        yield running


def refuse_tls(proxy: MetricsProxy, sni: str, ca: CA) -> None:
    raw = socket.create_connection(("127.0.0.1", proxy.port))
    with pytest.raises(ConnectionResetError):
        client_context(ca.pem).wrap_socket(raw, server_hostname=sni)


def test_counts_across_two_workers_are_exact(proxy: MetricsProxy, ca: CA) -> None:
    alpha = beta = 0
    # Until both workers have finished connections: the scrape must add them up.
    while len({line["pid"] for line in proxy.access_lines()}) < 2 or alpha < 5:
        assert proxy.ask_name("alpha.test", ca) == "alpha.test"
        alpha += 1
        assert alpha < 200, "SO_REUSEPORT put every connection on one worker"
    for _ in range(3):
        assert proxy.ask_name("beta.test", ca) == "beta.test"
        beta += 1
    for _ in range(2):
        refuse_tls(proxy, "gamma.test", ca)  # unknown SNI
        refuse_tls(proxy, "dead.test", ca)  # routed, but the backend port is closed
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", proxy.port)) as garbage:
            garbage.sendall(b"GET / HTTP/1.1\r\nHost: alpha.test\r\n\r\n")
            assert is_reset(garbage)
    for source in ("127.0.0.3", "127.0.0.4", "127.0.0.4"):
        with socket.create_connection(("127.0.0.1", proxy.port), source_address=(source, 0)) as s:
            assert is_reset(s)
    total = alpha + beta + 2 + 2 + 3 + 3
    samples = proxy.settled(accepted=total, active=0)

    listener = proxy.listener

    def value(name: str, **labels: str) -> float | None:
        return proxy.value(samples, name, **labels)

    finished = "mcproxy_connections_finished_total"
    assert value(finished, listener=listener, mode="l4", outcome="closed") == alpha + beta
    assert value(finished, listener=listener, mode="l4", outcome="backend_unreachable") == 2
    assert value(finished, listener=listener, mode="none", outcome="refused") == 2 + 3 + 3
    refused = {
        labels["reason"]: v
        for (name, key), v in samples.items()
        if name == "mcproxy_connections_refused_total"
        for labels in [dict(key)]
    }
    assert refused == {"no_route": 2, "client_hello": 3, "firewall_ip": 1, "firewall_cidr": 2}
    for route, count in (("alpha.test", alpha), ("beta.test", beta)):
        assert value("mcproxy_backend_dial_seconds_count", listener=listener, route=route) == count
    assert value("mcproxy_backend_dial_seconds_count", listener=listener, route="dead.test") is None
    failures = "mcproxy_backend_dial_failures_total"
    assert value(failures, listener=listener, route="dead.test", reason="unreachable") == 2
    assert [
        key for key in samples if key[0] == failures and ("route", "alpha.test") in key[1]
    ] == []
    # Bytes: exactly what the access log reports for the same connections.
    logged: Counter[tuple[str, str]] = Counter()
    for line in proxy.access_lines():
        logged[(line["route"], "up")] += int(line["up"])
        logged[(line["route"], "down")] += int(line["down"])
    for route in ("alpha.test", "beta.test"):
        for direction in ("up", "down"):
            got = value(
                "mcproxy_relayed_bytes_total", listener=listener, route=route, direction=direction
            )
            assert got == logged[(route, direction)] > 0
    # No label anywhere is a client address or an SNI that matched no route.
    labels = {v for _, key in samples for _, v in key}
    assert not labels & {"127.0.0.3", "127.0.0.4", "gamma.test"}
    # Two workers wrote their own files.
    pids = {name.rsplit("_", 1)[1] for name in os.listdir(proxy.metrics_dir)}
    assert pids == {f"{pid}.db" for pid in proxy.proc.worker_pids()}
    assert value("mcproxy_workers") == 2
    assert value("mcproxy_worker_restarts_total") == 0
    assert value("mcproxy_listener_max_connections", listener=listener) == 0
    generation = value("mcproxy_config_generation")
    for slot in ("1", "2"):
        assert value("mcproxy_worker_config_generation", slot=slot) == generation


def test_killed_worker_keeps_its_counts_and_leaves_no_active_series(
    proxy: MetricsProxy, ca: CA
) -> None:
    finished = 0
    while len({line["pid"] for line in proxy.access_lines()}) < 2:
        proxy.ask_name("alpha.test", ca)
        finished += 1
        assert finished < 200, "SO_REUSEPORT put every connection on one worker"
    pids = proxy.proc.worker_pids()
    held: dict[int, list[ssl.SSLSocket]] = {pid: [] for pid in pids}
    while not all(held.values()):
        tls = proxy.proc.connect(proxy.port, "beta.test", ca.pem)
        tls.sendall(b"ECHO\nx")
        assert tls.recv(1) == b"x"
        held[socket_owner(tls, pids)].append(tls)
        assert sum(map(len, held.values())) < 40, "SO_REUSEPORT put every connection on one worker"
    opened = sum(map(len, held.values()))
    before = proxy.settled(accepted=finished + opened, active=opened)
    victim, survivor = pids

    os.kill(victim, signal.SIGKILL)
    wait_for(
        lambda: len(proxy.proc.worker_pids()) == 2 and victim not in proxy.proc.worker_pids(),
        10,
        "a replacement worker",
    )
    wait_for(lambda: proxy.value(proxy.scrape(), "mcproxy_workers") == 2, 10, "2 workers")
    # The victim's live gauge is gone at once; its counters are still counted.
    after = proxy.settled(accepted=finished + opened, active=len(held[survivor]))
    closed = ("mcproxy_connections_finished_total", "l4", "closed")
    for samples in (before, after):
        assert (
            proxy.value(samples, closed[0], listener=proxy.listener, mode="l4", outcome="closed")
            == finished
        )
    assert [n for n in os.listdir(proxy.metrics_dir) if str(victim) in n] == []
    assert "counter_archive.db" in os.listdir(proxy.metrics_dir)
    assert proxy.value(after, "mcproxy_worker_restarts_total") == 1
    assert proxy.value(after, "mcproxy_workers") == 2
    slots = sorted(
        dict(key)["slot"] for name, key in after if name == "mcproxy_worker_config_generation"
    )
    assert slots == ["1", "2"]

    # The survivor's connections still work and end normally; the replacement counts.
    for tls in held[survivor]:
        tls.sendall(b"y")
        assert tls.recv(1) == b"y"
        tls.close()
    for tls in held[victim]:
        tls.close()
    for _ in range(4):
        proxy.ask_name("alpha.test", ca)
    final = proxy.settled(accepted=finished + opened + 4, active=0)
    # Every connection that ended in a live worker is counted once, whatever its outcome
    # (an echo connection closed by the client may end in a reset); the victim's never end.
    ended = [
        value
        for (name, key), value in final.items()
        if name == closed[0] and ("listener", proxy.listener) in key
    ]
    assert sum(ended) == finished + len(held[survivor]) + 4


def test_only_the_metrics_path_answers(proxy: MetricsProxy) -> None:
    assert proxy.value(proxy.scrape(), "mcproxy_workers") == 2
    for path in ("/", "/metric", "/metrics/x", "/favicon.ico"):
        with pytest.raises(urllib.error.HTTPError) as caught:
            proxy.scrape(path)
        assert caught.value.code == 404


def test_metrics_off_writes_no_files(
    tmp_path: Path, backends: dict[str, TlsBackend], ca: CA
) -> None:
    port = free_port()
    config = {
        "listeners": [
            {
                "addr": f"127.0.0.1:{port}",
                "routes": [{"hostname": "alpha.test", "backend": backends["alpha.test"].addr}],
            }
        ]
    }
    with ProxyProcess(tmp_path, config) as proxy, proxy.connect(port, "alpha.test", ca.pem) as tls:
        tls.sendall(b"NAME\n")
        assert tls.recv(100) == b"alpha.test\n"
    assert not (tmp_path / "mc-proxy.db-metrics").exists()


def test_metrics_address_in_use_stops_the_start(
    tmp_path: Path, backends: dict[str, TlsBackend]
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as squatter:
        taken = squatter.getsockname()[1]
        proxy = ProxyProcess(
            tmp_path,
            {
                "metrics": {"addr": f"127.0.0.1:{taken}"},
                "listeners": [{"addr": f"127.0.0.1:{free_port()}", "routes": []}],
            },
        )
        proxy.start(wait=False)
        assert proxy.process is not None
        assert proxy.process.wait(20) == 1
        assert f"cannot listen on 127.0.0.1:{taken}: Address already in use" in proxy.log()


def test_l7_requests_codes_and_policy_blocks_are_exact(tmp_path: Path, ca: CA) -> None:
    backend = H2Backend()
    routes = [
        l7_route(tmp_path, ca, "web.test", backend.addr),
        l7_route(
            tmp_path,
            ca,
            "policy.test",
            backend.addr,
            l7_policies=[
                {"type": "block_user_agent", "value": "BadBot"},
                {"type": "require_header", "value": "X-API-Key"},
            ],
        ),
        l7_route(tmp_path, ca, "down.test", f"127.0.0.1:{free_port()}"),
    ]
    proxy = MetricsProxy(tmp_path, routes)
    port, listener = proxy.port, proxy.listener
    ca_file = ca.write(tmp_path)

    def status(host: str, path: str, *args: str) -> int:
        result = curl(port, ca_file, path, "-w", "\n%{http_code}", *args, host=host)
        return status_and_body(result)[0]

    try:
        with proxy.proc:
            calls = [
                *[("web.test", "/status/200", "--http2")] * 3,
                *[("web.test", "/status/404", "--http1.1")] * 2,
                ("web.test", "/sink", "-d", "0123456789"),
                *[("policy.test", "/", "-A", "BadBot/1.0", "-H", "X-API-Key: k")] * 2,
                ("policy.test", "/", "-A", "curl"),
                *[("down.test", "/", "--http2")] * 2,
            ]
            codes = [status(host, path, *args) for host, path, *args in calls]
            assert codes == [200] * 3 + [404] * 2 + [200] + [403] * 3 + [502] * 2
            samples = proxy.settled(accepted=len(calls), active=0, requests=len(calls))
    finally:
        backend.close()

    def value(name: str, **labels: str) -> float | None:
        return proxy.value(samples, name, listener=listener, **labels)

    requests = {
        (labels["route"], labels["method"], labels["code"]): v
        for (name, key), v in samples.items()
        if name == "mcproxy_http_requests_total"
        for labels in [dict(key)]
    }
    assert requests == {
        ("web.test", "GET", "200"): 3,
        ("web.test", "GET", "404"): 2,
        ("web.test", "POST", "200"): 1,
        ("policy.test", "GET", "403"): 3,
        ("down.test", "GET", "502"): 2,
    }
    blocks = "mcproxy_http_policy_blocks_total"
    assert value(blocks, route="policy.test", policy="block_user_agent") == 2
    assert value(blocks, route="policy.test", policy="require_header") == 1
    assert value(blocks, route="web.test", policy="block_user_agent") is None
    duration = "mcproxy_http_request_duration_seconds_count"
    assert [value(duration, route=r) for r in ("web.test", "policy.test", "down.test")] == [6, 3, 2]
    ended = sum(
        v
        for (name, key), v in samples.items()
        if name == "mcproxy_connections_finished_total" and ("mode", "l7") in key
    )
    assert ended == len(calls)


def test_workers_that_stop_flush_what_they_noted(proxy: MetricsProxy, ca: CA) -> None:
    """Counts are written in batches; a worker that exits writes its last batch first."""
    for _ in range(6):
        assert proxy.ask_name("alpha.test", ca) == "alpha.test"
    assert proxy.proc.stop() == 0  # at once: the last batches are still in the workers
    assert "Traceback" not in proxy.proc.log()
    # Every worker is gone and folded into the archives, which hold all the counts.
    assert sorted(os.listdir(proxy.metrics_dir)) == ["counter_archive.db", "histogram_archive.db"]
    totals = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in MetricsDirectory(str(proxy.metrics_dir)).collect()
        for s in family.samples
    }
    listener = proxy.listener
    assert totals[("mcproxy_connections_total", frozenset({("listener", listener)}))] == 6
    route = frozenset({("listener", listener), ("route", "alpha.test")})
    assert totals[("mcproxy_backend_dial_seconds_count", route)] == 6
