"""End to end: routes over several real backends, health checks and failover (L4)."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.certs import CA, issue
from tests.e2e.harness import ProxyProcess, TlsBackend, client_context, free_port, wait_for

HOST = "pool.test"


class Pool:
    """Three TLS backends serving one hostname's certificate, each answering NAME with its own."""

    def __init__(self, directory: Path, ca: CA, count: int = 3) -> None:
        self.cert, self.key = issue(ca, HOST, directory)
        self.backends = [TlsBackend(f"b{i}", self.cert, self.key) for i in range(count)]

    def kill(self, index: int) -> None:
        """Stop listening now: new connections are refused (RST)."""
        backend = self.backends[index]
        backend._stopping = True
        # shutdown() wakes the thread blocked in accept(), which close() alone does not
        # (it would accept one more connection on the still-open socket).
        with contextlib.suppress(OSError):
            backend.sock.shutdown(socket.SHUT_RDWR)
        backend.sock.close()

    def restart(self, index: int) -> TlsBackend:
        """Bring a closed backend back on its port."""
        old = self.backends[index]
        self.backends[index] = TlsBackend(old.name, self.cert, self.key, port=old.port)
        return self.backends[index]

    def close(self) -> None:
        for index in range(len(self.backends)):
            self.kill(index)


@pytest.fixture
def pool(tmp_path: Path, ca: CA) -> Iterator[Pool]:
    running = Pool(tmp_path, ca)
    yield running
    running.close()


def start(
    tmp_path: Path, pool: Pool, metrics: bool = False, **route: Any
) -> tuple[ProxyProcess, int]:
    port = free_port()
    config: dict[str, Any] = {
        "listeners": [
            {
                "addr": f"127.0.0.1:{port}",
                "routes": [
                    {"hostname": HOST, "backends": [b.addr for b in pool.backends], **route}
                ],
            }
        ]
    }
    if metrics:
        config["metrics"] = {"addr": f"127.0.0.1:{free_port()}", "path": "/metrics"}
    return ProxyProcess(tmp_path, config), port


def ask(port: int, ca: CA, source: str | None = None, timeout: float = 15.0) -> str:
    """The name of the backend that answers one connection through the proxy."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.settimeout(timeout)
    if source is not None:
        raw.bind((source, 0))
    raw.connect(("127.0.0.1", port))
    with client_context(ca.pem).wrap_socket(raw, server_hostname=HOST) as tls:
        tls.sendall(b"NAME\n")
        return tls.recv(100).decode().strip()


def hold(port: int, ca: CA) -> socket.socket:
    """A connection that stays open on its backend (HOLD); returns the TLS socket."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=15)
    tls = client_context(ca.pem).wrap_socket(raw, server_hostname=HOST)
    tls.sendall(b"HOLD\n")
    return tls


def test_round_robin_spreads_connections(tmp_path: Path, pool: Pool, ca: CA) -> None:
    proxy, port = start(tmp_path, pool)
    with proxy:
        spread = collections.Counter(ask(port, ca) for _ in range(30))
    assert set(spread) == {"b0", "b1", "b2"}
    assert all(count >= 6 for count in spread.values()), spread  # 10 each, give or take


def test_source_ip_is_sticky_for_one_address_and_spreads_over_many(
    tmp_path: Path, pool: Pool, ca: CA
) -> None:
    proxy, port = start(tmp_path, pool, balance="source_ip")
    with proxy:
        # Whichever worker accepts (2 of them), one address gets one backend.
        one = {ask(port, ca, source="127.0.0.5") for _ in range(12)}
        assert len(one) == 1
        many = collections.Counter(ask(port, ca, source=f"127.0.1.{i}") for i in range(1, 61))
    assert set(many) == {"b0", "b1", "b2"}, many
    assert all(count >= 8 for count in many.values()), many


def test_least_conn_steers_away_from_a_backend_holding_long_connections(
    tmp_path: Path, pool: Pool, ca: CA
) -> None:
    proxy, port = start(tmp_path, pool, balance="least_conn")
    with proxy:
        on_b0: list[socket.socket] = []
        others: list[socket.socket] = []
        try:
            for _ in range(6):  # spread by least_conn over the two workers: two each
                before = [b.connections for b in pool.backends]
                tls = hold(port, ca)
                after = [b.connections for b in pool.backends]
                (on_b0 if after[0] > before[0] else others).append(tls)
            assert len(on_b0) == 2, [b.connections for b in pool.backends]
            for tls in others:  # now b0 alone holds long connections
                tls.close()
            spread = collections.Counter(ask(port, ca) for _ in range(20))
        finally:
            for tls in on_b0 + others:
                tls.close()
    assert "b0" not in spread, spread
    assert set(spread) == {"b1", "b2"}, spread


def test_a_backend_killed_under_load_fails_no_connection(
    tmp_path: Path, pool: Pool, ca: CA
) -> None:
    proxy, port = start(
        tmp_path,
        pool,
        metrics=True,
        health_check={"kind": "tcp", "interval": "500ms", "timeout": "300ms", "fall": 2, "rise": 2},
    )
    failures: list[str] = []
    seen: collections.Counter[str] = collections.Counter()
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                seen[ask(port, ca)] += 1
            except OSError as exc:
                failures.append(repr(exc))

    with proxy:
        with concurrent.futures.ThreadPoolExecutor(4) as executor:
            for _ in range(4):
                executor.submit(load)
            wait_for(lambda: sum(seen.values()) >= 20, 30, "load running")
            pool.kill(1)
            killed = time.monotonic()
            wait_for(lambda: "is down" in proxy.log(), 30, "b1 marked down")
            marked = time.monotonic() - killed
            before = seen["b1"]
            time.sleep(1.0)
            stop.set()
        assert failures == []
        assert seen["b1"] == before  # no connection reached it once it was down
        assert marked < 0.5 * 2 + 3.0  # interval x fall, plus a loaded machine's margin
        states = proxy.ctl_json("routes", "list")[0]["backend_states"]
        assert [s["up"] for s in states] == [True, False, True]
        metrics_addr = proxy.config["metrics"]["addr"]
        body = urllib.request.urlopen(f"http://{metrics_addr}/metrics", timeout=10).read()
        assert f'backend="{pool.backends[1].addr}"'.encode() in body
        assert (
            f'mcproxy_backend_up{{backend="{pool.backends[1].addr}",listener="127.0.0.1:{port}",'
            f'route="{HOST}"}} 0.0'.encode()
            in body
        )
        # Recovery within interval x rise (plus margin), and traffic comes back.
        pool.restart(1)
        back = time.monotonic()
        wait_for(lambda: "is up again" in proxy.log(), 30, "b1 back up")
        assert time.monotonic() - back < 0.5 * 2 + 3.0
        wait_for(lambda: "b1" in {ask(port, ca) for _ in range(6)}, 30, "b1 serving again")


def test_failover_without_a_health_check(tmp_path: Path, pool: Pool, ca: CA) -> None:
    proxy, port = start(tmp_path, pool)
    with proxy:
        pool.kill(0)
        names = [ask(port, ca) for _ in range(12)]
        assert "b0" not in names and set(names) == {"b1", "b2"}
        assert "failed=" in proxy.log()  # the access log names the backend that failed


def test_all_backends_down_then_one_back(tmp_path: Path, pool: Pool, ca: CA) -> None:
    proxy, port = start(
        tmp_path,
        pool,
        health_check={"kind": "tcp", "interval": "500ms", "timeout": "300ms", "fall": 1, "rise": 1},
    )
    with proxy:
        for index in range(3):
            pool.kill(index)
        wait_for(lambda: proxy.log().count("is down") >= 3, 30, "all down")
        with pytest.raises(OSError):
            ask(port, ca, timeout=10)
        pool.restart(2)
        # All are down as far as the checks know, so all are tried: b2 answers at once.
        assert ask(port, ca) == "b2"
