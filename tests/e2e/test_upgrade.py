"""End to end: SIGUSR2 upgrades in place under load (same PID, new workers, no failure)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mcproxy.admin.client import AdminClient, AdminError
from tests.certs import CA, issue
from tests.e2e.h2backend import H2Backend
from tests.e2e.harness import ProxyProcess, TlsBackend, free_port, wait_for
from tests.e2e.test_l7 import LineReader

WEB = "web.test"


@pytest.fixture
def h2backend() -> Iterator[H2Backend]:
    backend = H2Backend()
    yield backend
    backend.close()


@pytest.fixture
def proxy(
    tmp_path: Path, ca: CA, backends: dict[str, TlsBackend], h2backend: H2Backend
) -> Iterator[ProxyProcess]:
    port = free_port()
    cert, key = issue(ca, WEB, tmp_path)
    config = {
        "listeners": [
            {
                "addr": f"127.0.0.1:{port}",
                "routes": [
                    {"hostname": "alpha.test", "backend": backends["alpha.test"].addr},
                    {
                        "hostname": WEB,
                        "backend": h2backend.addr,
                        "mode": "l7",
                        "tls_cert": str(cert),
                        "tls_key": str(key),
                    },
                ],
            }
        ]
    }
    running = ProxyProcess(tmp_path, config)
    running.port = port  # type: ignore[attr-defined]
    with running:
        yield running


def name_of(proxy: Any, ca: CA, sni: str = "alpha.test") -> str:
    with proxy.connect(proxy.port, sni, ca.pem) as tls:
        tls.sendall(b"NAME\n")
        return str(tls.recv(100).decode().strip())


class Load:
    """New TLS connections in a loop, and one long L4 connection echoing, in threads."""

    def __init__(self, proxy: Any, ca: CA) -> None:
        self.proxy, self.ca = proxy, ca
        self.stopping = threading.Event()
        self.connections = 0
        self.echoes = 0
        self.failures: list[str] = []
        self.echo = proxy.connect(proxy.port, "alpha.test", ca.pem)
        self.echo.sendall(b"ECHO\n")
        self.threads = [
            threading.Thread(target=self._connect_loop, daemon=True),
            threading.Thread(target=self._echo_loop, daemon=True),
        ]
        for thread in self.threads:
            thread.start()

    def _connect_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                assert name_of(self.proxy, self.ca) == "alpha.test"
                self.connections += 1
            except Exception as exc:  # every failure is counted and shown
                self.failures.append(f"new connection: {exc!r}")

    def _echo_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                message = f"echo {self.echoes}\n".encode()
                self.echo.sendall(message)
                got = b""
                while len(got) < len(message):
                    chunk = self.echo.recv(len(message) - len(got))
                    assert chunk, "EOF on the long connection"
                    got += chunk
                assert got == message
                self.echoes += 1
            except Exception as exc:
                self.failures.append(f"long connection: {exc!r}")
                return
            time.sleep(0.05)

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(30)
        self.echo.close()


def serving_lines(proxy: ProxyProcess) -> int:
    return proxy.log().count(" serving generation ")


def sse(proxy: Any, ca: CA) -> tuple[subprocess.Popen[bytes], LineReader]:
    ca_file = ca.write(proxy.directory)
    process = subprocess.Popen(
        [
            "curl", "-sSN", "--http2", "--cacert", str(ca_file),
            "--resolve", f"{WEB}:{proxy.port}:127.0.0.1", f"https://{WEB}:{proxy.port}/sse/3",
        ],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    return process, LineReader(process)


def test_sigusr2_upgrades_in_place_under_load(
    proxy: Any, ca: CA, backends: dict[str, TlsBackend], h2backend: H2Backend
) -> None:
    listener = f"127.0.0.1:{proxy.port}"
    proxy.ctl_json(
        "routes", "add", "--listener", listener, "--hostname", "beta.test",
        "--backend", backends["beta.test"].addr,
    )  # fmt: skip
    extra_port = free_port()  # a listener added at runtime crosses the upgrade too
    extra = f"127.0.0.1:{extra_port}"
    proxy.ctl_json("listeners", "add", "--listener", extra)
    proxy.ctl_json(
        "routes", "add", "--listener", extra, "--hostname", "beta.test",
        "--backend", backends["beta.test"].addr,
    )  # fmt: skip
    generation = proxy.ctl_json("status")["generation"]
    supervisor = proxy.process.pid
    old_pids = set(proxy.worker_pids())
    assert len(old_pids) == 2
    stream, events = sse(proxy, ca)
    assert events.next_event() == b"id: 0\ndata: event 0\n\n"
    load = Load(proxy, ca)
    try:
        wait_for(lambda: load.connections > 5 and load.echoes > 5, 20, "load running")
        proxy.config["workers"] = 3  # a process setting, re-read by the upgrade
        proxy.write_config()
        before = serving_lines(proxy)
        signalled = time.monotonic()
        proxy.signal(signal.SIGUSR2)
        # The admin socket answers again soon (the new program binds it).
        wait_for(lambda: "upgraded in place" in proxy.log(), 30, "the re-exec")
        wait_for(_answers(proxy), 30, "the admin API after the upgrade")
        admin_back = time.monotonic() - signalled
        wait_for(lambda: serving_lines(proxy) >= before + 3, 60, "3 new workers serving")
        wait_for(lambda: "old workers stop accepting" in proxy.log(), 30, "the old workers told")
        h2backend.release_event()  # the SSE stream, opened before, goes on
        assert events.next_event() == b"id: 1\ndata: event 1\n\n"
        # Keep the load going on the new workers for a while, then stop it.
        mark = load.connections
        wait_for(lambda: load.connections > mark + 10, 30, "connections after the upgrade")
    finally:
        load.stop()
    h2backend.release_event()
    assert events.next_event() == b"id: 2\ndata: event 2\n\n"
    assert stream.wait(10) == 0
    assert load.failures == [], load.failures[:5]
    assert load.echoes > 10
    # The old workers drain and exit; the same supervisor PID now runs 3 new workers.
    wait_for(lambda: not old_pids & set(proxy.worker_pids()), 30, "old workers gone")
    assert proxy.process.poll() is None and proxy.process.pid == supervisor
    assert f"pid={supervisor} " in proxy.log().split("upgraded in place")[0].rsplit("\n", 1)[1]
    status = proxy.ctl_json("status")
    pids = {w["pid"] for w in status["workers"]}
    assert len(pids) == 3 and not pids & old_pids
    assert status["generation"] >= generation
    # The routes are there and the admin API changes them.
    hostnames = {r["hostname"] for r in proxy.ctl_json("routes", "list")}
    assert {"alpha.test", "beta.test", WEB} <= hostnames
    assert name_of(proxy, ca, "beta.test") == "beta.test"
    with proxy.connect(extra_port, "beta.test", ca.pem) as tls:
        tls.sendall(b"NAME\n")
        assert tls.recv(100) == b"beta.test\n"
    proxy.ctl_json("routes", "remove", "--listener", listener, "--hostname", "beta.test")
    assert admin_back < 6, f"the admin API was back {admin_back:.1f}s after SIGUSR2"
    assert "old worker 1 (pid" in proxy.log()
    assert proxy.stop() == 0


def _answers(proxy: Any) -> Any:
    def answers() -> bool:
        try:
            with AdminClient(proxy.config["admin"]["socket"], timeout=2) as client:
                return "upgraded in place" in proxy.log() and bool(client.status().workers)
        except AdminError:
            return False

    return answers


def test_sigusr2_with_an_invalid_config_logs_the_problems_and_changes_nothing(
    proxy: Any, ca: CA
) -> None:
    pids = set(proxy.worker_pids())
    good = proxy.config_path.read_text()
    proxy.config_path.write_text(good.replace("workers: 2", "workers: -3"))
    proxy.signal(signal.SIGUSR2)
    wait_for(lambda: "SIGUSR2 ignored" in proxy.log(), 20, "the problem logged")
    assert "workers: must be 0 or more" in proxy.log()
    time.sleep(1)
    assert set(proxy.worker_pids()) == pids
    assert "re-executing" not in proxy.log()
    assert name_of(proxy, ca) == "alpha.test"
    proxy.config_path.write_text(good)


def test_a_failed_upgrade_keeps_the_old_workers_serving_until_a_good_one(
    proxy: Any, ca: CA
) -> None:
    pids = set(proxy.worker_pids())
    good = proxy.config_path.read_text()
    # `check` accepts it, but the new program cannot open its database there.
    proxy.config_path.write_text(
        good.replace(str(proxy.directory / "mc-proxy.db"), "/dev/null/nowhere/mc-proxy.db")
    )
    proxy.signal(signal.SIGUSR2)
    wait_for(lambda: "upgrade failed" in proxy.log(), 30, "the failed boot")
    for _ in range(10):
        assert name_of(proxy, ca) == "alpha.test"  # the old workers serve on
    assert set(proxy.worker_pids()) == pids
    assert proxy.process.poll() is None
    proxy.config_path.write_text(good)
    before = serving_lines(proxy)
    proxy.signal(signal.SIGUSR2)
    wait_for(lambda: serving_lines(proxy) >= before + 2, 60, "new workers")
    wait_for(lambda: not pids & set(proxy.worker_pids()), 30, "old workers gone")
    assert name_of(proxy, ca) == "alpha.test"
    assert proxy.ctl_json("status")["workers"]
    with contextlib.suppress(ProcessLookupError):
        os.kill(proxy.process.pid, 0)
    assert proxy.stop() == 0
