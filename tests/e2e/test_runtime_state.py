"""End to end: wildcard and catch-all routes, ``routes update``, export and apply.

A real ``mc-proxy serve`` with 2 workers, driven through ``mcproxyctl`` (a
subprocess) and the client library; L4 backends are ``TlsBackend``s that
answer ``NAME`` with their name, so each connection says which route it got.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h11
import pytest
import yaml

from mcproxy.admin.client import AdminClient
from tests.certs import CA, issue
from tests.e2e.h2backend import H2Backend
from tests.e2e.harness import (
    REPO_ROOT,
    ProxyProcess,
    TlsBackend,
    client_context,
    free_port,
    mcproxyctl,
    tls_backends,
    wait_for,
)

NAMES = ["exact.wild.test", "star.wild.test", "catchall.test", "alpha.test", "beta.test"]


class Node:
    """A proxy with one listener: alpha.test, beta.test and the wildcard routes."""

    def __init__(self, directory: Path, backends: dict[str, TlsBackend], ca: CA) -> None:
        self.dir = directory
        self.ca = ca
        self.backends = backends
        self.port = free_port()
        self.listener = f"127.0.0.1:{self.port}"
        routes = [
            {"hostname": name, "backend": backends[name].addr}
            for name in ("alpha.test", "beta.test")
        ]
        self.proxy = ProxyProcess(
            directory, {"listeners": [{"addr": self.listener, "routes": routes}]}
        )
        self.socket = str(directory / "admin.sock")

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return mcproxyctl(self.socket, *args, cwd=self.dir)

    def ctl_ok(self, *args: str) -> str:
        done = self.ctl(*args)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def ctl_json(self, *args: str) -> Any:
        return json.loads(self.ctl_ok("--json", *args))

    def client(self) -> AdminClient:
        return AdminClient(self.socket, timeout=30)

    def ask(self, sni: str | None) -> str:
        """The backend a new TLS connection with SNI ``sni`` (None: no SNI) reaches."""
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        ctx = client_context(self.ca.pem)
        ctx.check_hostname = False  # the backend's certificate is verified against the CA
        with ctx.wrap_socket(raw, server_hostname=sni) as tls:
            tls.sendall(b"NAME\n")
            return tls.recv(100).decode().strip()

    def refused(self, sni: str | None) -> bool:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        ctx = client_context(self.ca.pem)
        ctx.check_hostname = False
        try:
            ctx.wrap_socket(raw, server_hostname=sni).close()
        except ConnectionResetError:
            return True
        except ssl.SSLError:
            return False
        return False

    def generations(self) -> set[int]:
        """The generation of the supervisor and of every worker."""
        status = self.ctl_json("status")
        return {status["generation"], *(w["generation"] for w in status["workers"])}

    def generation(self) -> int:
        [only] = self.generations()
        return only


@pytest.fixture
def node(tmp_path: Path, ca: CA) -> Iterator[Node]:
    with tls_backends(tmp_path, ca, NAMES) as backends:
        running = Node(tmp_path, backends, ca)
        running.proxy.start()
        try:
            yield running
        finally:
            running.proxy.stop()


def _spread(node: Node, sni: str | None, times: int = 12) -> set[str]:
    """The backends ``times`` new connections reach (the kernel spreads them over both workers)."""
    return {node.ask(sni) for _ in range(times)}


# --- wildcard and catch-all -------------------------------------------------------------------


def test_exact_beats_wildcard_beats_catch_all(node: Node) -> None:
    b = node.backends
    # The wildcard through the client library, the others through mcproxyctl.
    with node.client() as admin:
        admin.add_route(node.listener, "*.Wild.Test", b["star.wild.test"].addr)
    node.ctl_ok("routes", "add", "--listener", node.listener, "--hostname", "exact.wild.test",
                "--backend", b["exact.wild.test"].addr)  # fmt: skip
    assert node.refused("other.test") and node.refused(None)  # no catch-all yet: reset
    assert _spread(node, "x.wild.test") == {"star.wild.test"}
    assert _spread(node, "EXACT.Wild.TEST") == {"exact.wild.test"}
    assert node.refused("wild.test") and node.refused("a.b.wild.test")  # one label only
    node.ctl_ok("routes", "add", "--listener", node.listener, "--hostname", "*",
                "--backend", b["catchall.test"].addr)  # fmt: skip
    cases = {
        "exact.wild.test": "exact.wild.test",
        "Exact.Wild.Test": "exact.wild.test",
        "x.wild.test": "star.wild.test",
        "X.WILD.test": "star.wild.test",
        "wild.test": "catchall.test",
        "a.b.wild.test": "catchall.test",
        "alpha.test": "alpha.test",
        "ALPHA.TEST": "alpha.test",
        "unknown.example": "catchall.test",
    }
    for sni, expected in cases.items():
        assert _spread(node, sni, 6) == {expected}, sni
    assert _spread(node, None) == {"catchall.test"}  # no SNI: the catch-all
    listed = {r["hostname"] for r in node.ctl_json("routes", "list")}
    assert {"*", "*.wild.test", "exact.wild.test"} <= listed
    node.ctl_ok("routes", "remove", "--listener", node.listener, "--hostname", "*")
    assert node.refused("unknown.example") and node.refused(None)
    assert _spread(node, "y.wild.test", 4) == {"star.wild.test"}


def test_l7_wildcard_route_serves_its_certificate(tmp_path: Path, ca: CA) -> None:
    backend = H2Backend()
    port = free_port()
    wild_cert, wild_key = issue(ca, "*.app.test", tmp_path)
    api_cert, api_key = issue(ca, "api.app.test", tmp_path)
    routes = [
        {"hostname": "*.app.test", "backend": backend.addr, "mode": "l7",
         "tls_cert": str(wild_cert), "tls_key": str(wild_key)},
        {"hostname": "api.app.test", "backend": backend.addr, "mode": "l7",
         "tls_cert": str(api_cert), "tls_key": str(api_key)},
    ]  # fmt: skip
    proxy = ProxyProcess(tmp_path, {"listeners": [{"addr": f"127.0.0.1:{port}", "routes": routes}]})
    try:
        proxy.start()

        def served_names(sni: str) -> list[str]:
            raw = socket.create_connection(("127.0.0.1", port), timeout=10)
            ctx = client_context(ca.pem, ["http/1.1"])  # verifies sni against the certificate
            with ctx.wrap_socket(raw, server_hostname=sni) as tls:
                cert: Any = tls.getpeercert()
                tls.sendall(f"GET /headers HTTP/1.1\r\nHost: {sni}\r\n\r\n".encode())
                assert tls.recv(12) == b"HTTP/1.1 200"
            return [str(v) for kind, v in cert.get("subjectAltName", ()) if kind == "DNS"]

        for _ in range(4):  # both workers
            assert served_names("Shop.App.Test") == ["*.app.test"]
            assert served_names("api.app.test") == ["api.app.test"]

        # A keep-alive connection routed by the wildcard: once a more specific route
        # exists for its SNI, its next request is misdirected (421), and a new
        # connection gets the new route's certificate.
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        ctx = client_context(ca.pem, ["http/1.1"])
        with ctx.wrap_socket(raw, server_hostname="shop.app.test") as tls:
            conn = h11.Connection(h11.CLIENT)

            def status() -> int:
                request = h11.Request(
                    method="GET", target="/headers", headers=[("Host", "shop.app.test")]
                )
                tls.sendall(conn.send(request) + conn.send(h11.EndOfMessage()))
                code = 0
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(tls.recv(65536))
                    elif isinstance(event, h11.Response):
                        code = event.status_code
                    elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                            conn.start_next_cycle()
                        return code

            assert status() == 200
            shop_cert, shop_key = issue(ca, "shop.app.test", tmp_path)
            with AdminClient(str(tmp_path / "admin.sock"), timeout=30) as admin:
                admin.add_route(f"127.0.0.1:{port}", "shop.app.test", backend.addr, mode="l7",
                                tls_cert=str(shop_cert), tls_key=str(shop_key))  # fmt: skip
            assert status() == 421
        assert served_names("shop.app.test") == ["shop.app.test"]
    finally:
        proxy.stop()
        backend.close()


# --- routes update under load -------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_fifty_route_updates_under_l4_load_fail_no_connection(node: Node) -> None:
    b = node.backends
    node.ctl_ok("routes", "add", "--listener", node.listener, "--hostname", "flip.test",
                "--backend", b["alpha.test"].addr)  # fmt: skip
    held = socket.create_connection(("127.0.0.1", node.port), timeout=10)
    ctx = client_context(node.ca.pem)
    ctx.check_hostname = False
    open_tls = ctx.wrap_socket(held, server_hostname="flip.test")
    open_tls.sendall(b"ECHO\n")

    stop = threading.Event()
    served: list[str] = []
    failures: list[str] = []

    def load(sni: str, allowed: set[str]) -> None:
        while not stop.is_set():
            try:
                name = node.ask(sni)
            except Exception as exc:
                failures.append(f"{sni}: {exc!r}")
                continue
            (served if name in allowed else failures).append(f"{sni}: {name}")

    flip = {"alpha.test", "beta.test"}
    threads = [
        threading.Thread(target=load, args=("flip.test", flip)),
        threading.Thread(target=load, args=("alpha.test", {"alpha.test"})),
    ]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(served) > 10, 20, "load to start")
        with node.client() as admin:
            for i in range(50):
                target = "beta.test" if i % 2 == 0 else "alpha.test"
                if i % 5 == 0:  # every fifth through mcproxyctl (a process each: slow)
                    node.ctl_ok("routes", "update", "--listener", node.listener, "--hostname",
                                "flip.test", "--backend", b[target].addr)  # fmt: skip
                else:
                    admin.update_route(node.listener, "flip.test", b[target].addr)
                assert node.ask("flip.test") == target  # live on return, whichever worker
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert failures == []
    assert len(served) > 50
    open_tls.sendall(b"still here")  # the open connection kept its backend
    assert open_tls.recv(100) == b"still here"
    open_tls.close()


# --- export and apply ---------------------------------------------------------------------------


def _body(text: str) -> str:
    """An export without its header comment (which names the generation)."""
    return "\n".join(line for line in text.splitlines() if not line.startswith("#"))


def test_export_edit_dry_run_apply_twice_and_restart(node: Node) -> None:
    b = node.backends
    with node.client() as admin:
        admin.add_route(node.listener, "*.wild.test", b["star.wild.test"].addr)
    exported = node.ctl_ok("export")
    doc = yaml.safe_load(exported)
    [listener] = doc["listeners"]
    assert listener["addr"] == node.listener
    assert {r["hostname"] for r in listener["routes"]} == {"alpha.test", "beta.test", "*.wild.test"}
    check_file = node.dir / "exported.yaml"
    check_file.write_text(exported)
    checked = subprocess.run(
        [sys.executable, "-m", "mcproxy", "check", "--config", str(check_file)],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO_ROOT,
    )
    assert checked.returncode == 0, checked.stderr  # a config the loader accepts

    # Edit: alpha.test -> beta's backend, drop *.wild.test, add a catch-all, a firewall rule,
    # a connection limit, and a process setting that apply must ignore.
    for route in listener["routes"]:
        if route["hostname"] == "alpha.test":
            route["backend"] = b["beta.test"].addr
    listener["routes"] = [r for r in listener["routes"] if r["hostname"] != "*.wild.test"]
    listener["routes"].append({"hostname": "*", "backend": b["catchall.test"].addr})
    listener["max_connections"] = 500
    doc["firewall"]["blocked_ips"] = ["192.0.2.77"]
    doc["workers"] = 7
    edited = node.dir / "edited.yaml"
    edited.write_text(yaml.safe_dump(doc, sort_keys=False))

    before = node.generation()
    dry = node.ctl_ok("apply", "-f", str(edited), "--dry-run")
    assert "dry run: 5 changes; nothing changed" in dry
    assert re.search(r"~\s+route\s+\S+\s+alpha\.test\s+backend: \S+ -> " + b["beta.test"].addr, dry)
    assert re.search(r"-\s+route\s+\S+\s+\*\.wild\.test", dry)
    assert re.search(r"\+\s+route\s+\S+\s+\*\s", dry)
    assert re.search(r"\+\s+firewall\s+ip 192\.0\.2\.77", dry)
    assert "note: " in dry and "workers" in dry
    assert node.generation() == before  # the dry run changed nothing
    assert _spread(node, "alpha.test", 6) == {"alpha.test"}
    assert _spread(node, "x.wild.test", 4) == {"star.wild.test"}

    # An open connection keeps its backend (its TLS session is end to end with it).
    ctx = client_context(node.ca.pem)
    ctx.check_hostname = False
    held = ctx.wrap_socket(
        socket.create_connection(("127.0.0.1", node.port), timeout=10), server_hostname="alpha.test"
    )
    held.sendall(b"ECHO\n")
    # While the apply replaces alpha.test's route, new connections to it never fail.
    stop, answers, failures = threading.Event(), set(), []

    def load() -> None:
        while not stop.is_set():
            try:
                answers.add(node.ask("alpha.test"))
            except Exception as exc:
                failures.append(repr(exc))

    thread = threading.Thread(target=load)
    thread.start()
    try:
        applied = node.ctl_json("apply", "-f", str(edited))
    finally:
        stop.set()
        thread.join(30)
    assert failures == [] and answers <= {"alpha.test", "beta.test"}
    held.sendall(b"still alpha")
    assert held.recv(100) == b"still alpha"
    held.close()
    assert applied["changed"] is True and applied["generation"] == before + 1
    assert {(c["action"], c["kind"], c["name"]) for c in applied["changes"]} == {
        ("update", "route", "alpha.test"),
        ("remove", "route", "*.wild.test"),
        ("add", "route", "*"),
        ("add", "firewall", "ip 192.0.2.77"),
        ("update", "listener", node.listener),
    }
    assert node.generations() == {before + 1}  # one generation, on every worker
    assert _spread(node, "alpha.test", 8) == {"beta.test"}
    assert _spread(node, "x.wild.test", 8) == {"catchall.test"}
    assert _spread(node, None, 8) == {"catchall.test"}

    again = node.ctl_ok("apply", "-f", str(edited))
    assert "no changes: the state already matches" in again
    piped = subprocess.run(
        [sys.executable, "-m", "mcproxy.admin.cli", "apply", "-f", "-"],
        input=node.ctl_ok("export"),
        capture_output=True,
        text=True,
        check=False,
        cwd=node.dir,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "MCPROXY_SOCKET": node.socket},
    )
    assert piped.returncode == 0, piped.stderr
    assert "no changes: the state already matches" in piped.stdout  # export | apply -f -
    assert node.generation() == before + 1  # applying twice makes no new generation
    after = node.ctl_ok("export")

    node.proxy.stop()
    node.proxy.start()
    assert _body(node.ctl_ok("export")) == _body(after)  # a restart keeps all of it
    assert _spread(node, "alpha.test", 6) == {"beta.test"}
    assert _spread(node, None, 6) == {"catchall.test"}
    assert node.ctl_json("firewall", "list") == [{"type": "ip", "value": "192.0.2.77"}]


def test_invalid_file_names_each_field_and_changes_nothing(node: Node) -> None:
    exported = yaml.safe_load(node.ctl_ok("export"))
    routes = exported["listeners"][0]["routes"]
    routes[0]["mode"] = "l9"
    routes.append({"hostname": "new.test", "backend": "nowhere"})
    routes.append({"hostname": "a.*.test", "backend": "127.0.0.1:1"})
    bad = node.dir / "bad.yaml"
    bad.write_text(yaml.safe_dump(exported, sort_keys=False))
    before = node.generation()
    done = node.ctl("apply", "-f", str(bad))
    assert done.returncode == 1
    assert "listeners[0].routes[0].mode:" in done.stderr
    assert "listeners[0].routes[2].backend:" in done.stderr
    assert "listeners[0].routes[3].hostname:" in done.stderr
    assert str(bad) in done.stderr
    assert node.generation() == before
    dry = node.ctl("apply", "-f", str(bad), "--dry-run")
    assert dry.returncode == 1 and "listeners[0].routes[0].mode:" in dry.stderr
    valid = yaml.safe_load(node.ctl_ok("export"))
    valid["listeners"][0]["proxy_protocol"] = True
    pp = node.dir / "pp.yaml"
    pp.write_text(yaml.safe_dump(valid, sort_keys=False))
    refused = node.ctl("apply", "-f", str(pp))  # a running listener keeps its proxy_protocol
    assert refused.returncode == 1
    assert "FAILED_PRECONDITION" in refused.stderr
    assert "listeners[0].proxy_protocol:" in refused.stderr
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    valid = yaml.safe_load(node.ctl_ok("export"))
    valid["listeners"].append({"addr": f"127.0.0.1:{busy.getsockname()[1]}", "routes": []})
    taken = node.dir / "taken.yaml"
    taken.write_text(yaml.safe_dump(valid, sort_keys=False))
    done = node.ctl("apply", "-f", str(taken))  # its port is taken: nothing is stored
    busy.close()
    assert done.returncode == 1 and "FAILED_PRECONDITION" in done.stderr, done.stderr
    missing = node.ctl("apply", "-f", str(node.dir / "missing.yaml"))
    assert missing.returncode == 1
    assert node.generation() == before
    assert _spread(node, "alpha.test", 4) == {"alpha.test"}


def test_a_new_node_seeded_from_an_export_behaves_the_same(node: Node, tmp_path: Path) -> None:
    b = node.backends
    with node.client() as admin:
        admin.add_route(node.listener, "*.wild.test", b["star.wild.test"].addr)
        admin.add_route(node.listener, "*", b["catchall.test"].addr)
        admin.add_firewall_rule("cidr", "198.51.100.0/24")
    exported = node.ctl_ok("export")
    node.proxy.stop()  # the new node takes over the same address

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    seeded = ProxyProcess(fresh, yaml.safe_load(exported))
    try:
        seeded.start()
        done = mcproxyctl(str(fresh / "admin.sock"), "export", cwd=fresh)
        assert done.returncode == 0, done.stderr
        assert _body(done.stdout) == _body(exported)
        assert _spread(node, "x.wild.test", 6) == {"star.wild.test"}
        assert _spread(node, None, 6) == {"catchall.test"}
        assert _spread(node, "beta.test", 6) == {"beta.test"}
    finally:
        seeded.stop()


def test_apply_adds_and_removes_listeners(node: Node) -> None:
    b = node.backends
    doc = yaml.safe_load(node.ctl_ok("export"))
    second = free_port()
    doc["listeners"].append(
        {
            "addr": f"127.0.0.1:{second}",
            "max_connections": 50,
            "routes": [{"hostname": "*", "backend": b["catchall.test"].addr}],
        }
    )
    more = node.dir / "more.yaml"
    more.write_text(yaml.safe_dump(doc, sort_keys=False))
    before = node.generation()
    applied = node.ctl_json("apply", "-f", str(more))
    assert applied["generation"] == before + 1
    assert ("add", "listener", f"127.0.0.1:{second}") in {
        (c["action"], c["kind"], c["name"]) for c in applied["changes"]
    }
    assert node.generations() == {before + 1}
    other = Node.__new__(Node)
    other.__dict__.update(node.__dict__, port=second)
    assert _spread(other, "anything.test", 12) == {"catchall.test"}  # on every worker
    assert _spread(other, None, 4) == {"catchall.test"}
    assert _spread(node, "alpha.test", 4) == {"alpha.test"}  # the first listener as it was
    node.proxy.stop()
    node.proxy.start()  # the database keeps the added listener; the config never had it
    assert _spread(other, "anything.test", 6) == {"catchall.test"}

    doc["listeners"] = doc["listeners"][:1]
    fewer = node.dir / "fewer.yaml"
    fewer.write_text(yaml.safe_dump(doc, sort_keys=False))
    removed = node.ctl_json("apply", "-f", str(fewer))
    assert removed["changed"] is True
    assert ("remove", "listener", f"127.0.0.1:{second}") in {
        (c["action"], c["kind"], c["name"]) for c in removed["changes"]
    }
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", second), timeout=5).close()
    assert _spread(node, "alpha.test", 4) == {"alpha.test"}
