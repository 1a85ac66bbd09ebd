"""End to end: limits that hold across every worker, and GeoIP country blocks.

Connections admitted by the proxy but not yet sent a ClientHello stay open
(the handshake timeout is long here), so a raw TCP connection is enough to
hold one of a listener's slots; a refused one is reset at once.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import selectors
import signal
import socket
import ssl
import time
from collections import Counter
from pathlib import Path
from typing import Any

from mcproxy.worker.proxy_protocol import encode_v2
from tests.certs import CA
from tests.e2e.harness import (
    ProxyProcess,
    TlsBackend,
    client_context,
    free_port,
    mcproxyctl,
    wait_for,
)
from tests.geoipdb import write_country_db


def config(port: int, backends: dict[str, TlsBackend], **listener: Any) -> dict[str, Any]:
    return {
        "listeners": [
            {
                "addr": f"127.0.0.1:{port}",
                "routes": [{"hostname": name, "backend": b.addr} for name, b in backends.items()],
                **listener,
            }
        ],
    }


def patient(tmp_path: Path, cfg: dict[str, Any], workers: int) -> ProxyProcess:
    """A proxy (not started) that waits a minute for a ClientHello, so idle connections stay."""
    proxy = ProxyProcess(tmp_path, cfg, workers=workers)
    proxy.config["proxy"]["handshake_timeout"] = "60s"
    return proxy


class Connections:
    """TCP connections started at once (non-blocking connects), all established.

    A connection's end is remembered: a RST shows up once, as the first
    recv's error, and reads as a plain EOF after that.
    """

    def __init__(self, port: int, count: int, source: str = "127.0.0.1") -> None:
        selector = selectors.DefaultSelector()
        self.sockets: list[socket.socket] = []
        for _ in range(count):
            sock = socket.socket()
            sock.bind((source, 0))
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            selector.register(sock, selectors.EVENT_WRITE)
            self.sockets.append(sock)
        pending, deadline = count, time.monotonic() + 30
        while pending and time.monotonic() < deadline:
            for key, _ in selector.select(1.0):
                selector.unregister(key.fileobj)
                pending -= 1
        selector.close()
        assert pending == 0, f"{pending} connections never completed"
        self.ended: dict[socket.socket, str] = {}

    def state(self, sock: socket.socket) -> str:
        """``open`` (nothing to read yet), ``reset`` or ``closed``; never blocks."""
        if sock in self.ended:
            return self.ended[sock]
        sock.setblocking(False)
        try:
            data = sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return "open"
        except ConnectionResetError:
            self.ended[sock] = "reset"
            return "reset"
        assert not data, "the proxy sent bytes before the ClientHello"
        self.ended[sock] = "closed"
        return "closed"

    def counts(self) -> dict[str, int]:
        return dict(Counter(self.state(sock) for sock in self.sockets))

    def open(self) -> list[socket.socket]:
        return [sock for sock in self.sockets if self.state(sock) == "open"]

    def settle(self, gone: int, timeout: float = 20.0) -> dict[str, int]:
        """Wait until ``gone`` connections have ended; returns the count of each state."""

        def counted() -> dict[str, int] | None:
            counts = self.counts()
            return counts if len(self.sockets) - counts.get("open", 0) >= gone else None

        return dict(wait_for(counted, timeout, f"{gone} connections to end", interval=0.05))

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def handshake(sock: socket.socket, ca: CA, hostname: str = "alpha.test") -> ssl.SSLSocket:
    """Finish a TLS handshake through the proxy on an already connected socket."""
    sock.setblocking(True)
    sock.settimeout(10)
    return client_context(ca.pem).wrap_socket(sock, server_hostname=hostname)


def refusals(proxy: ProxyProcess, reason: str, expected: int) -> list[str]:
    """The worker pids that logged a refusal for ``reason``, one per connection, once there
    are ``expected`` of them (a line is written just after the RST, so it can trail it)."""

    def logged() -> list[str] | None:
        pids = re.findall(rf"pid=(\d+) client=\S+ .*outcome=refused:{reason}\b", proxy.log())
        return pids if len(pids) >= expected else None

    pids: list[str] = wait_for(logged, 10, f"{expected} refusals for {reason} in the log")
    assert len(pids) == expected, f"{len(pids)} refusals for {reason}, expected {expected}"
    return pids


def ended(proxy: ProxyProcess) -> int:
    return len(re.findall(r" outcome=", proxy.log()))


def live(proxy: ProxyProcess) -> tuple[int, int]:
    """(open connections, max_connections) of the only listener, from ``mcproxyctl status``."""
    (listener,) = proxy.ctl_json("status")["listeners"]
    return listener["active_connections"], listener["max_connections"]


def test_max_connections_changed_at_runtime_through_mcproxyctl(
    tmp_path: Path, backends: dict[str, TlsBackend]
) -> None:
    port = free_port()
    addr = f"127.0.0.1:{port}"
    proxy = patient(tmp_path, config(port, backends), workers=4)
    with proxy:
        crowd = Connections(port, 30)
        wait_for(lambda: live(proxy) == (30, 0), 10, "30 live connections in status")
        assert proxy.ctl_json("listeners", "set-max-connections", "--listener", addr, "20")
        # Applied by every worker before the call returned: nobody gets in, whichever worker.
        late = Connections(port, 10)
        assert late.settle(10) == {"reset": 10}
        assert crowd.counts() == {"open": 30}  # a lower limit leaves open connections alone
        assert live(proxy) == (30, 20)
        for sock in crowd.sockets[:15]:
            sock.close()
        wait_for(lambda: live(proxy) == (15, 20), 10, "15 connections after closing 15")
        more = Connections(port, 10)
        assert more.settle(5) == {"open": 5, "reset": 5}
        assert live(proxy) == (20, 20)
        proxy.ctl_json("listeners", "set-max-connections", "--listener", addr, "0")
        unlimited = Connections(port, 10)
        wait_for(lambda: live(proxy) == (30, 0), 10, "30 live connections with no limit")
        assert unlimited.counts() == {"open": 10}
        proxy.ctl_json("listeners", "set-max-connections", "--listener", addr, "25")
        for group in (crowd, late, more, unlimited):
            group.close()
    with proxy:  # persisted: a restart keeps the last limit
        assert live(proxy) == (0, 25)


def test_max_connections_holds_across_four_workers(
    tmp_path: Path, backends: dict[str, TlsBackend], ca: CA
) -> None:
    port = free_port()
    proxy = patient(tmp_path, config(port, backends, max_connections=50), workers=4)
    with proxy:
        crowd = Connections(port, 400)
        assert crowd.settle(350) == {"open": 50, "reset": 350}
        assert live(proxy) == (50, 50)  # mcproxyctl status reads the shared counters
        assert len(set(refusals(proxy, "max_connections", 350))) > 1  # several workers refused
        # The 50 are real connections: each completes TLS with its backend.
        held = [handshake(sock, ca) for sock in crowd.open()]
        for tls in held:
            tls.sendall(b"HOLD\n")
        assert len(held) == 50

        # Closing 10 lets exactly 10 more in.
        before = ended(proxy)
        for tls in held[:10]:
            tls.close()
        wait_for(lambda: ended(proxy) >= before + 10, 10, "10 connections to end")
        newcomers = Connections(port, 20)
        assert newcomers.settle(10) == {"open": 10, "reset": 10}
        refusals(proxy, "max_connections", 360)
        for tls in held[10:]:
            tls.sendall(b"still here")  # HOLD swallows it; a reset would raise
        newcomers.close()
        for tls in held:
            tls.close()
        wait_for(lambda: ended(proxy) == 420, 10, "every connection to end")


def test_killed_worker_frees_its_slots_within_two_seconds(
    tmp_path: Path, backends: dict[str, TlsBackend]
) -> None:
    port = free_port()
    proxy = patient(tmp_path, config(port, backends, max_connections=40), workers=4)
    with proxy:
        crowd = Connections(port, 41)
        assert crowd.settle(1) == {"open": 40, "reset": 1}
        # Which worker holds which connection is the kernel's choice: take the one with
        # the most descriptors.
        victim = max(proxy.worker_pids(), key=lambda pid: len(os.listdir(f"/proc/{pid}/fd")))
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        line = wait_for(
            lambda: re.search(r"worker \d+: released (\d+) connection slots", proxy.log()),
            2.0,
            "the supervisor to release the dead worker's slots",
        )
        released_after = time.monotonic() - killed_at
        freed = int(line.group(1))
        assert released_after < 2.0
        assert 0 < freed < 40
        assert live(proxy) == (40 - freed, 40)
        assert crowd.settle(1 + freed, timeout=5) == {
            "open": 40 - freed,
            "closed": freed,
            "reset": 1,
        }
        # The freed slots take new connections, and the limit still holds after them.
        proxy.wait_serving(5)  # the replacement worker
        newcomers = Connections(port, freed + 5)
        assert newcomers.settle(5) == {"open": freed, "reset": 5}
        newcomers.close()
        crowd.close()


def test_rate_limit_per_ip_across_five_workers(
    tmp_path: Path, backends: dict[str, TlsBackend], ca: CA
) -> None:
    port = free_port()
    cfg = {**config(port, backends), "firewall": {"rate_limit": 20, "rate_window": "10s"}}
    proxy = ProxyProcess(tmp_path, cfg, workers=5)

    def attempt(source: str) -> bool:
        return reaches(port, ca, source)

    with proxy, concurrent.futures.ThreadPoolExecutor(10) as pool:
        started = time.monotonic()
        results = list(pool.map(attempt, ["127.0.0.1"] * 100))
        elapsed = time.monotonic() - started
        assert elapsed < 10, "the test must run within one rate window"
        assert results.count(True) == 20
        refused_by = refusals(proxy, "rate_limit", 80)
        assert len(refused_by) == 80
        assert len(set(refused_by)) > 1  # the count is shared: several workers refused
        # Another address has its own count.
        assert list(pool.map(attempt, ["127.0.0.2"] * 5)) == [True] * 5


def reaches(port: int, ca: CA, source: str = "127.0.0.1") -> bool:
    """A TLS connection from ``source`` reaches alpha.test; False when it is reset."""
    try:
        raw = socket.create_connection(("127.0.0.1", port), 10, (source, 0))
        with client_context(ca.pem).wrap_socket(raw, server_hostname="alpha.test") as tls:
            tls.sendall(b"NAME\n")
            return tls.recv(100) == b"alpha.test\n"
    except (OSError, ssl.SSLError):
        return False


def test_firewall_rules_from_mcproxyctl_apply_before_it_returns(
    tmp_path: Path, backends: dict[str, TlsBackend], ca: CA
) -> None:
    port = free_port()
    with ProxyProcess(tmp_path, config(port, backends)) as proxy:
        for kind, value in (("ip", "127.0.0.2"), ("cidr", "127.0.0.2/32")):
            proxy.ctl_json("firewall", "add", "--type", kind, "--value", value)
            # No wait: every worker applied it before mcproxyctl returned.
            assert [reaches(port, ca, "127.0.0.2") for _ in range(6)] == [False] * 6
            assert reaches(port, ca, "127.0.0.1")
            proxy.ctl_json("firewall", "remove", "--type", kind, "--value", value)
            assert [reaches(port, ca, "127.0.0.2") for _ in range(6)] == [True] * 6
        refusals(proxy, "firewall_ip", 6)
        refusals(proxy, "firewall_cidr", 6)


def test_country_rule_needs_a_geoip_database(
    tmp_path: Path, backends: dict[str, TlsBackend]
) -> None:
    with ProxyProcess(tmp_path, config(free_port(), backends)) as proxy:
        done = mcproxyctl(
            proxy.config["admin"]["socket"], "firewall", "add", "--type", "country", "--value", "FR"
        )
        assert done.returncode == 1
        assert "country rules need a GeoIP database: set firewall.geoip_db" in done.stderr
        assert proxy.ctl_json("firewall", "list") == []


def proxied(port: int, source: str, ca: CA) -> bool:
    """Reach alpha.test through a PROXY-protocol listener as ``source``; False when reset
    (ECONNRESET only: a TLS alert or a clean close is not what a refusal looks like)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    raw.sendall(encode_v2((source, 40000), ("127.0.0.1", port)))
    try:
        with client_context(ca.pem).wrap_socket(raw, server_hostname="alpha.test") as tls:
            tls.sendall(b"NAME\n")
            return tls.recv(100) == b"alpha.test\n"
    except ConnectionResetError:
        return False


def test_blocked_country_is_reset_and_others_pass(
    tmp_path: Path, backends: dict[str, TlsBackend], ca: CA
) -> None:
    db = write_country_db(
        tmp_path / "country.mmdb",
        {
            "203.0.113.0/24": "KP",
            "198.51.100.0/24": "FR",
            "2001:db8:1::/48": "KP",
            "2001:db8:2::/48": "FR",
        },
    )
    port = free_port()
    cfg = {
        **config(port, backends, proxy_protocol=True),
        "firewall": {"geoip_db": str(db), "blocked_countries": ["KP"]},
    }
    with ProxyProcess(tmp_path, cfg) as proxy:
        assert not proxied(port, "203.0.113.7", ca)
        assert proxied(port, "198.51.100.7", ca)
        assert not proxied(port, "2001:db8:1::7", ca)
        assert proxied(port, "2001:db8:2::7", ca)
        assert proxied(port, "192.0.2.1", ca)  # not in the database: let in
        refusals(proxy, "firewall_country", 2)

        # A country blocked through the admin API applies before the call returns.
        proxy.ctl_json("firewall", "add", "--type", "country", "--value", "FR")
        assert [proxied(port, "2001:db8:2::7", ca) for _ in range(4)] == [False] * 4
        proxy.ctl_json("firewall", "remove", "--type", "country", "--value", "FR")
        assert [proxied(port, "198.51.100.7", ca) for _ in range(4)] == [True] * 4

        # Replaced on disk, the database is reopened by every worker without a restart.
        write_country_db(db, {"198.51.100.0/24": "KP"})
        wait_for(
            lambda: proxy.log().count(f"GeoIP database {db} reloaded") == proxy.workers,
            10,
            "every worker to reload the database",
        )
        for _ in range(4):  # whichever worker accepts
            assert not proxied(port, "198.51.100.7", ca)
            assert proxied(port, "203.0.113.7", ca)


def test_country_rules_from_the_database_need_a_geoip_file(
    tmp_path: Path, backends: dict[str, TlsBackend]
) -> None:
    db = write_country_db(tmp_path / "country.mmdb", {"203.0.113.0/24": "KP"})
    port = free_port()
    cfg = {**config(port, backends), "firewall": {"geoip_db": str(db), "blocked_countries": ["KP"]}}
    proxy = ProxyProcess(tmp_path, cfg, workers=1)
    with proxy:
        pass
    # The rules now live in the database; the YAML, read at every start, lost its geoip_db.
    del proxy.config["firewall"]
    proxy.start(wait=False)
    assert proxy.process is not None
    assert proxy.process.wait(30) == 1
    assert "firewall.geoip_db: required: the firewall blocks countries KP" in proxy.log()
    # And a file that is not a MaxMind DB is named with the reason.
    (tmp_path / "garbage.mmdb").write_bytes(b"not a database")
    proxy.config["firewall"] = {"geoip_db": str(tmp_path / "garbage.mmdb")}
    proxy.start(wait=False)
    assert proxy.process.wait(30) == 1
    assert "firewall.geoip_db: is not a MaxMind DB file" in proxy.log()
    assert "garbage.mmdb" in proxy.log()
