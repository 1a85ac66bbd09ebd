"""End to end: routes over several real backends, health checks and failover (L4)."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.certs import CA, issue
from tests.e2e.h2backend import H2Backend
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
        assert failures == [], proxy.log()[-3000:]
        assert seen["b1"] == before  # no connection reached it once it was down
        assert marked < 0.5 * 2 + 3.0  # interval x fall, plus a loaded machine's margin
        states = proxy.ctl_json("routes", "list")[0]["backend_states"]
        assert [s["up"] for s in states] == [True, False, True]
        assert states[1]["reason"]  # why: connection refused
        status = proxy.ctl_json("status")["backends"][0]
        assert [b["up"] for b in status["backends"]] == [True, False, True]
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


# --- L7 ---------------------------------------------------------------------------------

WEB = "web.test"


@pytest.fixture
def web_pool() -> Iterator[list[H2Backend]]:
    backends = [H2Backend(name=f"w{i}") for i in range(3)]
    yield backends
    for backend in backends:
        backend.close()


def l7_proxy(tmp_path: Path, ca: CA, backends: list[str], **route: Any) -> tuple[ProxyProcess, int]:
    cert, key = issue(ca, WEB, tmp_path)
    port = free_port()
    config = {
        "listeners": [
            {
                "addr": f"127.0.0.1:{port}",
                "routes": [
                    {
                        "hostname": WEB,
                        "backends": backends,
                        "mode": "l7",
                        "tls_cert": str(cert),
                        "tls_key": str(key),
                        **route,
                    }
                ],
            }
        ]
    }
    return ProxyProcess(tmp_path, config), port


def get_many(port: int, ca_file: Path, count: int) -> list[tuple[int, str]]:
    """``count`` GETs of /headers over one HTTP/2 connection: (status, x-backend) each."""
    url = f"https://{WEB}:{port}/headers"
    done = subprocess.run(
        [
            *("curl", "-sS", "--http2", "--cacert", str(ca_file)),
            *("--resolve", f"{WEB}:{port}:127.0.0.1", "-o", "/dev/null", "-D", "-"),
            *([url] * count),
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    results: list[tuple[int, str]] = []
    for block in done.stdout.decode().split("HTTP/2 ")[1:]:
        lines = block.splitlines()
        name = next(
            (ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("x-backend:")), ""
        )
        results.append((int(lines[0].split()[0]), name))
    assert len(results) == count, done.stdout
    return results


def test_l7_spreads_requests_and_ejects_a_backend_whose_health_answers_503(
    tmp_path: Path, ca: CA, web_pool: list[H2Backend]
) -> None:
    ca_file = ca.write(tmp_path)
    check = {"kind": "http", "interval": "500ms", "timeout": "400ms", "fall": 2, "rise": 2}
    proxy, port = l7_proxy(tmp_path, ca, [b.addr for b in web_pool], health_check=check)
    with proxy:
        spread = collections.Counter(get_many(port, ca_file, 30))
        assert {status for status, _ in spread} == {200}
        assert {name for _, name in spread} == {"w0", "w1", "w2"}, spread
        wait_for(lambda: all(b.health_checks >= 2 for b in web_pool), 30, "checks running")
        web_pool[1].health_status = 503  # still accepts connections and requests
        wait_for(lambda: "is down: HTTP 503" in proxy.log(), 30, "w1 ejected")
        before = web_pool[1].requests
        results = get_many(port, ca_file, 30)
        assert {status for status, _ in results} == {200}  # no 5xx to clients
        assert "w1" not in {name for _, name in results}
        assert web_pool[1].requests == before  # no request reached it
        web_pool[1].health_status = 200
        recovered = time.monotonic()
        wait_for(lambda: "is up again" in proxy.log(), 30, "w1 back")
        assert time.monotonic() - recovered < 0.5 * 2 + 3.0  # interval x rise, and a margin
        wait_for(lambda: "w1" in {name for _, name in get_many(port, ca_file, 6)}, 30, "w1 serving")


def test_l7_fails_over_from_an_unreachable_backend(
    tmp_path: Path, ca: CA, web_pool: list[H2Backend]
) -> None:
    ca_file = ca.write(tmp_path)
    dead = f"127.0.0.1:{free_port()}"
    proxy, port = l7_proxy(tmp_path, ca, [dead, web_pool[0].addr, web_pool[1].addr])
    with proxy:
        results = get_many(port, ca_file, 12)
        assert {status for status, _ in results} == {200}, results
        assert {name for _, name in results} == {"w0", "w1"}
        assert f"failed={dead}" in proxy.log()


def test_l7_least_conn_counts_streams(tmp_path: Path, ca: CA, web_pool: list[H2Backend]) -> None:
    ca_file = ca.write(tmp_path)
    proxy, port = l7_proxy(tmp_path, ca, [b.addr for b in web_pool], balance="least_conn")
    with proxy:
        results = get_many(port, ca_file, 12)
    # Sequential requests leave every count at 0 in turn: ties rotate over all three.
    assert {status for status, _ in results} == {200}
    assert {name for _, name in results} == {"w0", "w1", "w2"}


def test_removing_a_backend_lets_its_open_connections_finish(
    tmp_path: Path, pool: Pool, ca: CA
) -> None:
    proxy, port = start(tmp_path, pool)
    with proxy:
        echo = []
        for _ in range(3):  # one on each backend, round robin
            raw = socket.create_connection(("127.0.0.1", port), timeout=15)
            tls = client_context(ca.pem).wrap_socket(raw, server_hostname=HOST)
            tls.sendall(b"ECHO\n")
            echo.append(tls)
        try:
            proxy.ctl_json(
                "routes",
                "update",
                "--listener",
                f"127.0.0.1:{port}",
                "--hostname",
                HOST,
                "--backend",
                pool.backends[2].addr,
            )
            assert {ask(port, ca) for _ in range(4)} == {"b2"}
            for tls in echo:  # the connections to b0 and b1 still work
                tls.sendall(b"still there")
                assert tls.recv(100) == b"still there"
        finally:
            for tls in echo:
                tls.close()


def test_a_respawned_worker_starts_with_the_current_verdicts(
    tmp_path: Path, ca: CA, web_pool: list[H2Backend]
) -> None:
    ca_file = ca.write(tmp_path)
    check = {"kind": "http", "interval": "500ms", "timeout": "400ms", "fall": 2, "rise": 2}
    proxy, port = l7_proxy(tmp_path, ca, [b.addr for b in web_pool], health_check=check)
    with proxy:
        web_pool[1].health_status = 503
        wait_for(lambda: "is down: HTTP 503" in proxy.log(), 30, "w1 ejected")
        for pid in proxy.worker_pids():
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: proxy.log().count("serving generation") >= 4, 60, "workers respawned")
        before = web_pool[1].requests
        names = {name for _ in range(8) for _, name in get_many(port, ca_file, 2)}
        assert "w1" not in names and names <= {"w0", "w2"}
        assert web_pool[1].requests == before
