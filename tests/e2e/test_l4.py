"""End to end: the real ``mc-proxy serve`` with 2 workers routing TLS by SNI (L4)."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
import signal
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest

from tests.certs import CA
from tests.e2e.harness import (
    ProxyProcess,
    TlsBackend,
    client_context,
    free_port,
    is_reset,
    pattern,
    socket_owner,
    wait_for,
)


def l4_config(port: int, backends: dict[str, TlsBackend], **extra: Any) -> dict[str, Any]:
    return {
        "listeners": [
            {
                "addr": f"127.0.0.1:{port}",
                "routes": [{"hostname": name, "backend": b.addr} for name, b in backends.items()],
            }
        ],
        **extra,
    }


@pytest.fixture
def proxy(tmp_path: Path, backends: dict[str, TlsBackend]) -> Any:
    port = free_port()
    with ProxyProcess(tmp_path, l4_config(port, backends)) as running:
        running.port = port  # type: ignore[attr-defined]
        yield running


def ask_name(proxy: ProxyProcess, port: int, sni: str, ca: CA) -> tuple[str, str]:
    """(backend name, certificate CN) seen through the proxy for ``sni``."""
    with proxy.connect(port, sni, ca.pem) as tls:
        cert = tls.getpeercert()
        assert cert is not None
        subject: Any = cert["subject"]
        common_name = next(value for rdn in subject for key, value in rdn if key == "commonName")
        tls.sendall(b"NAME\n")
        return tls.recv(100).decode().strip(), str(common_name)


def test_two_hostnames_reach_their_own_backends(proxy: Any, ca: CA) -> None:
    assert ask_name(proxy, proxy.port, "alpha.test", ca) == ("alpha.test", "alpha.test")
    assert ask_name(proxy, proxy.port, "beta.test", ca) == ("beta.test", "beta.test")


def test_mixed_case_sni_routes(proxy: Any, ca: CA) -> None:
    assert ask_name(proxy, proxy.port, "BeTa.TEST", ca)[0] == "beta.test"


def test_unknown_sni_is_reset(proxy: Any, ca: CA, backends: dict[str, TlsBackend]) -> None:
    raw = socket.create_connection(("127.0.0.1", proxy.port))
    ctx = client_context(ca.pem)
    with pytest.raises(ConnectionResetError):
        ctx.wrap_socket(raw, server_hostname="gamma.test")
    assert sum(b.connections for b in backends.values()) == 0


def test_missing_sni_is_reset(proxy: Any, ca: CA) -> None:
    raw = socket.create_connection(("127.0.0.1", proxy.port))
    ctx = client_context(ca.pem)
    ctx.check_hostname = False
    with pytest.raises(ConnectionResetError):
        ctx.wrap_socket(raw)  # no server_hostname: no SNI extension


def test_garbage_is_reset_without_bytes(proxy: Any) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: alpha.test\r\n\r\n")
        assert is_reset(sock)


def test_garbage_does_not_disturb_other_connections(proxy: Any, ca: CA) -> None:
    with proxy.connect(proxy.port, "alpha.test", ca.pem) as tls:
        tls.sendall(b"ECHO\n")
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", proxy.port)) as bad:
                bad.sendall(os.urandom(600))
                assert is_reset(bad)
            tls.sendall(b"ping")
            assert tls.recv(4) == b"ping"


def test_100_mib_each_way_arrives_intact(proxy: Any, ca: CA) -> None:
    size = 100 * 1024 * 1024
    with proxy.connect(proxy.port, "alpha.test", ca.pem, timeout=60) as tls:
        tls.sendall(f"SINK {size}\n".encode())
        data = pattern(size, seed=7)
        tls.sendall(data)
        assert tls.recv(100).decode().strip() == hashlib.sha256(data).hexdigest()
    with proxy.connect(proxy.port, "beta.test", ca.pem, timeout=60) as tls:
        tls.sendall(f"SOURCE {size}\n".encode())
        digest, received = hashlib.sha256(), 0
        while chunk := tls.recv(1 << 20):
            digest.update(chunk)
            received += len(chunk)
        assert received == size
        assert digest.hexdigest() == hashlib.sha256(pattern(size)).hexdigest()


def test_half_close_passes_through(proxy: Any, ca: CA) -> None:
    """The client's FIN reaches the backend while the backend's replies still flow back."""
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context(ca.pem).wrap_bio(incoming, outgoing, server_hostname="alpha.test")

    def pump(until: Any) -> Any:
        while True:
            try:
                return until()
            except ssl.SSLWantReadError:
                if pending := outgoing.read():
                    raw.sendall(pending)
                data = raw.recv(65536)
                if not data:
                    incoming.write_eof()
                else:
                    incoming.write(data)

    pump(tls.do_handshake)
    payload = pattern(300_000, seed=3)
    tls.write(b"ECHO\n" + payload)
    raw.sendall(outgoing.read())
    raw.shutdown(socket.SHUT_WR)  # TCP half-close, no close_notify
    echoed = b""
    while True:
        try:
            chunk = pump(lambda: tls.read(65536))
        except ssl.SSLError:
            # The backend saw our FIN (OpenSSL 3 answers an EOF without close_notify
            # with a decode_error alert) and closed after echoing everything.
            break
        if not chunk:
            break
        echoed += chunk
    raw.close()
    assert echoed == payload


def test_blocked_cidr_is_reset_and_others_pass(
    tmp_path: Path, backends: dict[str, TlsBackend], ca: CA
) -> None:
    port = free_port()
    config = l4_config(
        port, backends, firewall={"blocked_cidrs": ["127.0.0.2/32"], "blocked_ips": ["127.0.0.3"]}
    )
    with ProxyProcess(tmp_path, config) as proxy:
        for source in ("127.0.0.2", "127.0.0.3"):
            raw = socket.create_connection(("127.0.0.1", port), source_address=(source, 0))
            assert is_reset(raw)
        assert ask_name(proxy, port, "alpha.test", ca)[0] == "alpha.test"
        log = wait_for(lambda: re.findall(r"outcome=refused:firewall_\w+", proxy.log()), 5, "log")
        assert sorted(set(log)) == ["outcome=refused:firewall_cidr", "outcome=refused:firewall_ip"]


def test_idle_connection_is_reset(tmp_path: Path, backends: dict[str, TlsBackend], ca: CA) -> None:
    """idle_timeout ends the relay with a RST to both sides (ECONNRESET, not an EOF)."""
    port = free_port()
    proxy = ProxyProcess(tmp_path, l4_config(port, backends))
    proxy.config["proxy"]["idle_timeout"] = "1s"
    with proxy:
        tls = proxy.connect(port, "alpha.test", ca.pem, timeout=10)
        tls.sendall(b"HOLD\n")
        started = time.monotonic()
        # Read the TCP stream under TLS: Python's ssl turns a reset that arrives behind
        # unread records (the backend's session tickets) into a clean EOF.
        with pytest.raises(ConnectionResetError):  # a clean close ends the loop: fails
            while socket.socket.recv(tls, 65536):
                pass
        assert 0.9 < time.monotonic() - started < 5
        wait_for(lambda: "outcome=idle_timeout" in proxy.log(), 5, "outcome=idle_timeout logged")


def test_access_log_line_has_every_field(proxy: Any, ca: CA) -> None:
    ask_name(proxy, proxy.port, "alpha.test", ca)
    line = wait_for(
        lambda: re.search(r"client=127\.0\.0\.1 listener=\S+ sni=alpha\.test .*", proxy.log()),
        5,
        "access log line",
    ).group(0)
    for key in ("route=alpha.test", "mode=l4", "backend=127.0.0.1:", "up=", "down=", "duration="):
        assert key in line
    assert "outcome=closed" in line


def test_process_titles(proxy: Any) -> None:
    def title(pid: int) -> str:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()

    assert title(proxy.process.pid) == "mc-proxy: supervisor"
    assert sorted(title(pid) for pid in proxy.worker_pids()) == [
        "mc-proxy: worker 1",
        "mc-proxy: worker 2",
    ]


def test_killed_worker_is_replaced_and_its_queue_is_served(proxy: Any, ca: CA) -> None:
    pids = proxy.worker_pids()
    assert len(pids) == 2
    # Long-lived connections until both workers hold at least one.
    held: dict[int, list[ssl.SSLSocket]] = {}
    for _ in range(40):
        tls = proxy.connect(proxy.port, "alpha.test", ca.pem)
        tls.sendall(b"ECHO\n")
        tls.sendall(b"x")
        assert tls.recv(1) == b"x"
        held.setdefault(socket_owner(tls, pids), []).append(tls)
        if len(held) == 2:
            break
    assert len(held) == 2, "SO_REUSEPORT put every connection on one worker"
    victim, survivor = pids
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()

    # Connections made while the slot is empty wait in its accept queue.
    def name_through_proxy(_: int) -> str:
        return ask_name(proxy, proxy.port, "beta.test", ca)[0]

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        names = list(pool.map(name_through_proxy, range(20)))
    assert names == ["beta.test"] * 20

    wait_for(
        lambda: len(proxy.worker_pids()) == 2 and victim not in proxy.worker_pids(),
        2.5,
        "a replacement worker",
    )
    assert time.monotonic() - killed_at < 2.5
    for tls in held[survivor]:
        tls.sendall(b"still here")
        assert tls.recv(10) == b"still here"
    for group in held.values():
        for tls in group:
            tls.close()


def test_sigterm_lets_an_in_flight_transfer_finish(proxy: Any, ca: CA) -> None:
    size = 20 * 1024 * 1024
    tls = proxy.connect(proxy.port, "alpha.test", ca.pem, timeout=30)
    tls.sendall(f"SOURCE {size}\n".encode())
    first = tls.recv(1 << 16)
    proxy.signal(signal.SIGTERM)
    # New connections are refused once the listeners close.
    wait_for(lambda: _refused(proxy.port), 5, "listener to close")
    digest, received = hashlib.sha256(first), len(first)
    while chunk := tls.recv(1 << 20):
        digest.update(chunk)
        received += len(chunk)
        time.sleep(0.001)
    assert received == size
    assert digest.hexdigest() == hashlib.sha256(pattern(size)).hexdigest()
    assert proxy.process.wait(15) == 0


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_restart_loads_from_database_not_yaml(
    tmp_path: Path, backends: dict[str, TlsBackend], ca: CA
) -> None:
    port = free_port()
    proxy = ProxyProcess(tmp_path, l4_config(port, {"alpha.test": backends["alpha.test"]}))
    with proxy:
        assert ask_name(proxy, port, "alpha.test", ca)[0] == "alpha.test"
    # The edited YAML points alpha at beta's backend and adds beta: both ignored. It adds
    # an invalid route too: serve does not judge the seed part once the database holds
    # state (mc-proxy check still would), but it reads the process settings (workers).
    proxy.config["listeners"][0]["routes"] = [
        {"hostname": "alpha.test", "backend": backends["beta.test"].addr},
        {"hostname": "beta.test", "backend": backends["beta.test"].addr},
        {"hostname": "not a hostname", "backend": "nowhere", "typo": 1},
    ]
    proxy.config["workers"] = proxy.workers = 3
    with proxy:
        assert ask_name(proxy, port, "alpha.test", ca)[0] == "alpha.test"
        wait_for(lambda: len(proxy.worker_pids()) == 3, 10, "3 workers")
        raw = socket.create_connection(("127.0.0.1", port))
        with pytest.raises(ConnectionResetError):
            client_context(ca.pem).wrap_socket(raw, server_hostname="beta.test")


def test_invalid_seed_with_an_empty_database_exits_nonzero_naming_each_field(
    tmp_path: Path,
) -> None:
    routes = [{"hostname": "a.test", "backend": "nowhere"}, {"hostname": "b.test", "typo": 1}]
    proxy = ProxyProcess(
        tmp_path, {"listeners": [{"addr": f"127.0.0.1:{free_port()}", "routes": routes}]}
    )
    proxy.start(wait=False)
    assert proxy.process is not None
    assert proxy.process.wait(20) == 1
    for field in ("listeners[0].routes[0].backend", "listeners[0].routes[1].typo"):
        assert f"{proxy.config_path}: {field}: " in proxy.log()


def test_unbindable_listener_exits_nonzero_with_reason(
    tmp_path: Path, backends: dict[str, TlsBackend]
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as squatter:
        port = squatter.getsockname()[1]
        proxy = ProxyProcess(tmp_path, l4_config(port, backends))
        proxy.start(wait=False)
        assert proxy.process is not None
        assert proxy.process.wait(20) == 1
        assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in proxy.log()
