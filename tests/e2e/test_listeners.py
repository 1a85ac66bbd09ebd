"""End to end: listeners added and removed at runtime (AddListener, RemoveListener)."""

from __future__ import annotations

import os
import signal
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest

from tests.certs import CA
from tests.e2e.harness import (
    ProxyProcess,
    TlsBackend,
    free_port,
    mcproxyctl,
    socket_owner,
    wait_for,
)


@pytest.fixture
def proxy(tmp_path: Path, backends: dict[str, TlsBackend]) -> Any:
    port = free_port()
    config = {
        "listeners": [
            {
                "addr": f"127.0.0.1:{port}",
                "routes": [{"hostname": "alpha.test", "backend": backends["alpha.test"].addr}],
            }
        ]
    }
    with ProxyProcess(tmp_path, config) as running:
        running.port = port  # type: ignore[attr-defined]
        yield running


def ctl(proxy: ProxyProcess, *args: str) -> Any:
    return mcproxyctl(proxy.config["admin"]["socket"], *args, cwd=proxy.directory)


def echo_through(proxy: ProxyProcess, port: int, ca: CA) -> ssl.SSLSocket:
    tls = proxy.connect(port, "beta.test", ca.pem)
    tls.sendall(b"ECHO\n")
    tls.sendall(b"ping")
    assert tls.recv(4) == b"ping"
    return tls


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_a_listener_added_at_runtime_serves_on_every_worker_and_survives_a_restart(
    proxy: Any, ca: CA, backends: dict[str, TlsBackend]
) -> None:
    port = free_port()
    listener = f"127.0.0.1:{port}"
    assert refused(port)
    added = proxy.ctl_json("listeners", "add", "--listener", listener, "--max-connections", "50")
    assert added["generation"] > 1
    proxy.ctl_json(
        "routes", "add", "--listener", listener, "--hostname", "beta.test",
        "--backend", backends["beta.test"].addr,
    )  # fmt: skip
    listed = {item["listener"]: item for item in proxy.ctl_json("listeners", "list")}
    assert listed[listener] == {
        "listener": listener,
        "proxy_protocol": False,
        "max_connections": 50,
        "routes": 1,
    }
    # Every worker accepts on it: hold connections until both workers have served one.
    pids = proxy.worker_pids()
    held: dict[int, list[ssl.SSLSocket]] = {}
    for _ in range(60):
        tls = echo_through(proxy, port, ca)
        held.setdefault(socket_owner(tls, pids), []).append(tls)
        if len(held) == len(pids):
            break
    assert len(held) == 2, "one worker never accepted on the new listener"
    # Its shared-memory counters work: the status counts the held connections.
    status = proxy.ctl_json("status")
    row = next(item for item in status["listeners"] if item["address"] == listener)
    assert row["active_connections"] == sum(len(v) for v in held.values())
    for conns in held.values():
        for tls in conns:
            tls.close()
    # A respawned worker gets the new listener's socket of its slot too.
    victim = pids[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(
        lambda: victim not in proxy.worker_pids() and len(proxy.worker_pids()) == 2,
        20,
        "a respawned worker",
    )
    proxy.wait_serving(3)
    new_pids = proxy.worker_pids()
    seen: set[int] = set()
    for _ in range(60):
        with echo_through(proxy, port, ca) as tls:
            seen.add(socket_owner(tls, new_pids))
        if len(seen) == 2:
            break
    assert len(seen) == 2
    # Durable: a restart binds it from the database.
    proxy.stop()
    proxy.start()
    with echo_through(proxy, port, ca):
        pass
    assert listener in {item["listener"] for item in proxy.ctl_json("listeners", "list")}


def test_a_busy_port_is_refused_and_nothing_is_stored(proxy: Any) -> None:
    busy = socket.create_server(("127.0.0.1", 0))
    try:
        listener = f"127.0.0.1:{busy.getsockname()[1]}"
        before = proxy.ctl_json("status")["generation"]
        done = ctl(proxy, "listeners", "add", "--listener", listener)
        assert done.returncode == 1
        assert listener in done.stderr and "in use" in done.stderr, done.stderr
        assert "FAILED_PRECONDITION" in done.stderr or "precondition" in done.stderr.lower()
        assert listener not in {i["listener"] for i in proxy.ctl_json("listeners", "list")}
        assert proxy.ctl_json("status")["generation"] == before
    finally:
        busy.close()
    # Still nothing: a restart does not bind it either.
    proxy.stop()
    proxy.start()
    assert listener not in {i["listener"] for i in proxy.ctl_json("listeners", "list")}


def test_a_removed_listener_refuses_new_connections_and_open_ones_carry_on(
    proxy: Any, ca: CA, backends: dict[str, TlsBackend]
) -> None:
    port = free_port()
    listener = f"127.0.0.1:{port}"
    proxy.ctl_json("listeners", "add", "--listener", listener)
    proxy.ctl_json(
        "routes", "add", "--listener", listener, "--hostname", "beta.test",
        "--backend", backends["beta.test"].addr,
    )  # fmt: skip
    tls = echo_through(proxy, port, ca)
    proxy.ctl_json("listeners", "remove", "--listener", listener)
    assert refused(port)  # no worker accepts on it once the command returned
    for _ in range(20):
        assert refused(port)
    tls.sendall(b"still here")  # the open connection is untouched
    got = b""
    while len(got) < 10:
        got += tls.recv(10 - len(got))
    assert got == b"still here"
    tls.close()
    assert listener not in {i["listener"] for i in proxy.ctl_json("listeners", "list")}
    proxy.stop()
    proxy.start()
    assert refused(port)
    # And the address can be added again.
    proxy.ctl_json("listeners", "add", "--listener", listener)
    assert not refused(port)
