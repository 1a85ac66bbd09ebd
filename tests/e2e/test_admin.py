"""End to end: the admin API of a real ``mc-proxy serve`` with 2 workers.

Through ``mcproxyctl`` (a subprocess, as an operator runs it) and through the
client library: every RPC, restarts, SIGKILL of the supervisor, rejected
calls, route churn under a load of new TLS connections, a worker that does
not acknowledge, health and a second instance on the same socket.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mcproxy.admin.client import AdminClient, AdminError, ListedRoute
from mcproxy.model import Address, FirewallRules, L7Policy, Mode, PolicyKind, Route
from mcproxy.status import Status
from tests.certs import CA, issue
from tests.e2e.harness import (
    ProxyProcess,
    TlsBackend,
    client_context,
    free_port,
    mcproxyctl,
    wait_for,
)
from tests.geoipdb import write_country_db


@pytest.fixture
def gamma(tmp_path: Path, ca: CA) -> Iterator[TlsBackend]:
    backend = TlsBackend("gamma.test", *issue(ca, "gamma.test", tmp_path))
    yield backend
    backend.close()


class Setup:
    """A running proxy with alpha.test and beta.test routed on one listener."""

    def __init__(self, tmp_path: Path, backends: dict[str, TlsBackend], ca: CA) -> None:
        self.port = free_port()
        self.listener = f"127.0.0.1:{self.port}"
        self.ca = ca
        self.dir = tmp_path
        routes = [{"hostname": name, "backend": b.addr} for name, b in backends.items()]
        geoip = write_country_db(tmp_path / "country.mmdb", {"203.0.113.0/24": "KP"})
        self.proxy = ProxyProcess(
            tmp_path,
            {
                "listeners": [{"addr": self.listener, "routes": routes}],
                "firewall": {"geoip_db": str(geoip)},  # country rules need one
            },
        )
        self.socket = str(tmp_path / "admin.sock")

    def client(self) -> AdminClient:
        return AdminClient(self.socket, timeout=20)

    def ctl(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return mcproxyctl(self.socket, *args, cwd=cwd or self.dir)

    def ctl_json(self, *args: str, cwd: Path | None = None) -> Any:
        done = self.ctl("--json", *args, cwd=cwd)
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""
        return json.loads(done.stdout)

    def ask(self, sni: str, verify_name: bool = True) -> str:
        """The name of the backend a new TLS connection for ``sni`` reaches."""
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        ctx = client_context(self.ca.pem)
        ctx.check_hostname = verify_name  # still verified against the CA; SNI is sent either way
        with ctx.wrap_socket(raw, server_hostname=sni) as tls:
            tls.sendall(b"NAME\n")
            return tls.recv(100).decode().strip()

    def refused(self, sni: str) -> bool:
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


@pytest.fixture
def setup(tmp_path: Path, backends: dict[str, TlsBackend], ca: CA) -> Iterator[Setup]:
    running = Setup(tmp_path, backends, ca)
    running.proxy.start()
    yield running
    running.proxy.stop()


def durable(admin: AdminClient) -> tuple[object, ...]:
    """Everything an RPC can change and a restart must keep (not generations or pids)."""
    status = admin.status()
    policies = {
        (r.listener, r.route.hostname): admin.list_policies(r.listener, r.route.hostname)
        for r in admin.list_routes()
    }
    limits = [(lst.address, lst.max_connections, lst.routes) for lst in status.listeners]
    return admin.list_routes(), admin.firewall_rules(), policies, limits


def wait_exited(pids: list[int], timeout: float = 15.0) -> None:
    """Processes that are not our children: gone, or zombies nobody reaped yet."""

    def exited() -> bool:
        for pid in pids:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except FileNotFoundError:
                continue
            if state not in ("Z", "X"):
                return False
        return True

    wait_for(exited, timeout, f"processes {pids} to exit")


# --- every RPC, through mcproxyctl and through the client, and a restart ----------------------


def test_every_command_round_trips_through_mcproxyctl(
    setup: Setup, ca: CA, gamma: TlsBackend
) -> None:
    listener = setup.listener
    certs = setup.dir / "certs"
    certs.mkdir()
    issue(ca, "web.test", certs)
    assert setup.ctl_json("routes", "add", "--listener", listener, "--hostname", "Gamma.Test",
                          "--backend", gamma.addr) == {"generation": 2}  # fmt: skip
    # relative certificate paths are resolved against mcproxyctl's working directory
    web = setup.ctl_json("routes", "add", "--listener", listener, "--hostname", "web.test",
                         "--backend", "127.0.0.1:9", "--mode", "l7", "--tls-cert", "web.test.pem",
                         "--tls-key", "web.test.key", "--backend-tls", "--send-proxy-protocol",
                         cwd=certs)  # fmt: skip
    assert web == {"generation": 3}
    for kind, value in (("block_user_agent", "BadBot"), ("require_header", "X-Key")):
        setup.ctl_json("policies", "add", "--listener", listener, "--hostname", "web.test",
                       "--type", kind, "--value", value)  # fmt: skip
    setup.ctl_json("policies", "remove", "--listener", listener, "--hostname", "web.test",
                   "--type", "require_header", "--value", "x-key")  # fmt: skip
    for kind, value in (("ip", "192.0.2.1"), ("cidr", "198.51.100.0/24"), ("country", "kp")):
        setup.ctl_json("firewall", "add", "--type", kind, "--value", value)
    setup.ctl_json("firewall", "remove", "--type", "country", "--value", "KP")
    setup.ctl_json("listeners", "set-max-connections", "--listener", listener, "100")
    done = setup.ctl("routes", "remove", "--listener", listener, "--hostname", "beta.test")
    assert (done.returncode, done.stderr) == (0, "")
    assert "removed route beta.test" in done.stdout
    assert setup.ask("gamma.test") == "gamma.test"

    def check() -> None:
        routes = setup.ctl_json("routes", "list")
        assert [r["hostname"] for r in routes] == ["alpha.test", "gamma.test", "web.test"]
        assert routes[2] == {
            "listener": listener,
            "hostname": "web.test",
            "backend": "127.0.0.1:9",
            "backends": ["127.0.0.1:9"],
            "backend_states": routes[2]["backend_states"],  # the health checks' business
            "balance": "round_robin",
            "health_check": None,
            "mode": "l7",
            "tls_cert": str(certs / "web.test.pem"),
            "tls_key": str(certs / "web.test.key"),
            "backend_tls": True,
            "backend_protocol": "h2",
            "backend_ca": None,
            "backend_server_name": None,
            "backend_client_cert": None,
            "backend_client_key": None,
            "client_ca": None,
            "send_proxy_protocol": True,
            "l7_policies": [{"type": "block_user_agent", "value": "BadBot"}],
        }
        assert setup.ctl_json("routes", "list", "--listener", listener) == routes
        assert setup.ctl_json("firewall", "list") == [
            {"type": "ip", "value": "192.0.2.1"},
            {"type": "cidr", "value": "198.51.100.0/24"},
        ]
        assert setup.ctl_json(
            "policies", "list", "--listener", listener, "--hostname", "web.test"
        ) == [{"type": "block_user_agent", "value": "BadBot"}]
        status = setup.ctl_json("status")
        assert status["listeners"] == [
            {
                "address": listener,
                "routes": 3,
                "active_connections": 0,
                "max_connections": 100,
                "proxy_protocol": False,
            }
        ]
        assert sorted(w["pid"] for w in status["workers"]) == sorted(setup.proxy.worker_pids())
        assert {w["generation"] for w in status["workers"]} == {status["generation"]}
        table = setup.ctl("routes", "list").stdout
        assert re.search(r"web\.test\s+127\.0\.0\.1:9\s+l7\s+cert=\S+web\.test\.pem", table)
        with setup.client() as admin:  # the library sees the same
            assert [r.route.hostname for r in admin.list_routes()] == [
                "alpha.test",
                "gamma.test",
                "web.test",
            ]

    check()
    setup.proxy.stop()
    setup.proxy.start()
    check()
    assert setup.ask("gamma.test") == "gamma.test"


def test_every_rpc_round_trips_through_the_client(
    setup: Setup, ca: CA, backends: dict[str, TlsBackend], gamma: TlsBackend
) -> None:
    cert, key = (str(p) for p in issue(ca, "web.test", setup.dir))
    listener, alpha = setup.listener, backends["alpha.test"]
    with setup.client() as admin:
        generation = admin.status().generation
        assert admin.add_route(listener, "gamma.test", gamma.addr) == generation + 1
        admin.add_route(
            listener,
            "web.test",
            "127.0.0.1:9",
            mode="l7",
            tls_cert=cert,
            tls_key=key,
            policies=[("require_header", "X-Key")],
        )
        admin.add_policy(listener, "web.test", "block_user_agent", "BadBot")
        admin.remove_policy(listener, "web.test", "require_header", "X-KEY")
        admin.add_firewall_rule("ip", "::ffff:192.0.2.9")
        admin.add_firewall_rule("cidr", "2001:db8::/32")
        admin.add_firewall_rule("country", "KP")
        admin.remove_firewall_rule("country", "kp")
        admin.set_listener_max_connections(listener, 7)
        last = admin.remove_route(listener, "beta.test")
        assert last == generation + 10
        assert setup.ask("gamma.test") == "gamma.test"
        assert setup.refused("beta.test")
        web = Route(
            "web.test",
            (Address("127.0.0.1", 9),),
            Mode.L7,
            tls_cert=cert,
            tls_key=key,
            policies=(L7Policy(PolicyKind.BLOCK_USER_AGENT, "BadBot"),),
        )
        expected_routes = [
            ListedRoute(listener, Route("alpha.test", (Address("127.0.0.1", alpha.port),))),
            ListedRoute(listener, Route("gamma.test", (Address("127.0.0.1", gamma.port),))),
            ListedRoute(listener, web),
        ]
        listed = admin.list_routes()
        assert [ListedRoute(r.listener, r.route) for r in listed] == expected_routes
        assert admin.list_routes(listener) == listed
        # one state per backend; without a health check every backend counts as up
        assert [[b.up for b in r.backend_states] for r in listed] == [[True]] * 3
        assert admin.firewall_rules() == FirewallRules(
            blocked_ips=frozenset({"192.0.2.9"}), blocked_cidrs=frozenset({"2001:db8::/32"})
        )
        assert admin.list_policies(listener, "web.test") == list(web.policies)
        status = admin.status()
        assert status.generation == last
        assert [w.generation for w in status.workers] == [last, last]
        assert status.listeners[0].max_connections == 7
        before = durable(admin)
    setup.proxy.stop()
    setup.proxy.start()
    with setup.client() as admin:
        assert durable(admin) == before
        assert admin.health()
    assert setup.ask("gamma.test") == "gamma.test"


# --- second batch: several backends, the new fields, routes update ---------------------------


def test_new_route_fields_survive_a_restart_and_update_replaces_a_route(
    setup: Setup, ca: CA, backends: dict[str, TlsBackend], gamma: TlsBackend
) -> None:
    listener, alpha, beta = setup.listener, backends["alpha.test"], backends["beta.test"]
    certs = setup.dir / "certs"
    certs.mkdir()
    issue(ca, "web.test", certs)
    issue(ca, "client", certs)
    ca.write(certs)
    setup.ctl_json("routes", "add", "--listener", listener, "--hostname", "multi.test",
                   "--backend", gamma.addr, "--backend", alpha.addr, "--balance", "least_conn",
                   "--health-check", "tcp", "--health-interval", "1s",
                   "--health-timeout", "500ms", "--health-fall", "2")  # fmt: skip
    setup.ctl_json("routes", "add", "--listener", listener, "--hostname", "web.test",
                   "--backend", "127.0.0.1:9", "--mode", "l7", "--tls-cert", "web.test.pem",
                   "--tls-key", "web.test.key", "--backend-tls", "--backend-protocol", "h1",
                   "--backend-ca", "ca.pem", "--backend-server-name", "api.internal",
                   "--backend-client-cert", "client.pem", "--backend-client-key", "client.key",
                   "--client-ca", "ca.pem", cwd=certs)  # fmt: skip
    # Workers route with the new fields present (which backend: the balancer's call).
    assert setup.ask("multi.test", verify_name=False) in ("gamma.test", "alpha.test")
    routes = {r["hostname"]: r for r in setup.ctl_json("routes", "list")}
    multi, web = routes["multi.test"], routes["web.test"]
    assert multi["backends"] == [gamma.addr, alpha.addr]
    assert multi["backend"] == gamma.addr
    assert multi["balance"] == "least_conn"
    assert multi["health_check"] == {
        "kind": "tcp",
        "interval_seconds": 1.0,
        "timeout_seconds": 0.5,
        "path": "/healthz",
        "rise": 2,
        "fall": 2,
    }
    assert (web["backend_protocol"], web["backend_server_name"]) == ("h1", "api.internal")
    assert web["backend_ca"] == web["client_ca"] == str(certs / "ca.pem")
    assert web["backend_client_cert"] == str(certs / "client.pem")
    assert web["backend_client_key"] == str(certs / "client.key")
    table = setup.ctl("routes", "list").stdout
    assert re.search(rf"multi\.test\s+{gamma.addr},{alpha.addr}\s+l4\s+balance=least_conn", table)

    # routes update replaces the route whole: the next connection uses the new backend.
    generation = setup.ctl_json("status")["generation"]
    done = setup.ctl_json("routes", "update", "--listener", listener, "--hostname", "Multi.Test",
                          "--backend", beta.addr)  # fmt: skip
    assert done == {"generation": generation + 1}
    assert setup.ask("multi.test", verify_name=False) == "beta.test"
    updated = {r["hostname"]: r for r in setup.ctl_json("routes", "list")}["multi.test"]
    assert (updated["backends"], updated["balance"], updated["health_check"]) == (
        [beta.addr],
        "round_robin",
        None,
    )

    # An invalid update, or one of a missing route, changes nothing.
    before = stored(setup.ctl_json("routes", "list"))
    for args, message in (
        (("--hostname", "multi.test", "--backend", alpha.addr, "--backend", alpha.addr),
         "INVALID_ARGUMENT: route.backends[1]: duplicate of backends[0]"),
        (("--hostname", "multi.test", "--backend", alpha.addr, "--health-check", "tcp",
          "--health-interval", "1s", "--health-timeout", "2s"),
         "INVALID_ARGUMENT: route.health_check.timeout: must be shorter than interval"),
        (("--hostname", "multi.test", "--backend", alpha.addr, "--backend-protocol", "h1"),
         "INVALID_ARGUMENT: route.backend_protocol: only for mode l7"),
        (("--hostname", "nope.test", "--backend", alpha.addr),
         "NOT_FOUND: no route nope.test"),
    ):  # fmt: skip
        failed = setup.ctl("routes", "update", "--listener", listener, *args)
        assert (failed.returncode, failed.stdout) == (1, ""), failed
        assert message in failed.stderr
    assert stored(setup.ctl_json("routes", "list")) == before
    assert setup.ctl_json("status")["generation"] == generation + 1
    assert setup.ask("multi.test", verify_name=False) == "beta.test"

    setup.proxy.stop()
    setup.proxy.start()
    assert stored(setup.ctl_json("routes", "list")) == before
    assert setup.ask("multi.test", verify_name=False) == "beta.test"


def stored(routes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Listed routes without what is not stored (the backends' health)."""
    return [{k: v for k, v in r.items() if k != "backend_states"} for r in routes]


# --- rejected calls ---------------------------------------------------------------------------


def test_rejected_calls_change_nothing(setup: Setup, gamma: TlsBackend) -> None:
    listener = setup.listener
    cases: list[tuple[Any, str, str]] = [
        (lambda a: a.add_route(listener, "bad..host", gamma.addr), "INVALID_ARGUMENT",
         "route.hostname"),
        (lambda a: a.add_route(listener, "x.test", "nowhere"), "INVALID_ARGUMENT", "route.backend"),
        (lambda a: a.add_route("127.0.0.1:1", "x.test", gamma.addr), "INVALID_ARGUMENT",
         "listener: no listener 127.0.0.1:1"),
        (lambda a: a.add_route(listener, "x.test", gamma.addr, mode="l5"), "INVALID_ARGUMENT",
         "route.mode"),
        (lambda a: a.add_route(listener, "x.test", gamma.addr, mode="l7"), "INVALID_ARGUMENT",
         "route.tls_cert: required for mode l7"),
        (lambda a: a.add_route(listener, "x.test", gamma.addr, mode="l7", tls_cert="/nope.pem",
                               tls_key="/nope.key"), "INVALID_ARGUMENT", "file not found"),
        (lambda a: a.set_listener_max_connections(listener, -1), "INVALID_ARGUMENT",
         "max_connections"),
        (lambda a: a.add_firewall_rule("cidr", "10.0.0.1/8"), "INVALID_ARGUMENT", "host bits"),
        (lambda a: a.add_firewall_rule("country", "Korea"), "INVALID_ARGUMENT", "value:"),
        (lambda a: a.add_firewall_rule("port", "80"), "INVALID_ARGUMENT", "type:"),
        (lambda a: a.add_policy(listener, "alpha.test", "rate", "1"), "INVALID_ARGUMENT", "type:"),
        (lambda a: a.add_route(listener, "alpha.test", gamma.addr), "ALREADY_EXISTS", "alpha.test"),
        (lambda a: a.remove_route(listener, "nope.test"), "NOT_FOUND", "nope.test"),
        (lambda a: a.remove_firewall_rule("ip", "192.0.2.1"), "NOT_FOUND", "192.0.2.1"),
        (lambda a: a.list_policies(listener, "nope.test"), "NOT_FOUND", "nope.test"),
        (lambda a: a.remove_policy(listener, "nope.test", "require_header", "x"), "NOT_FOUND",
         "nope.test"),
    ]  # fmt: skip
    with setup.client() as admin:
        admin.add_firewall_rule("ip", "192.0.2.7")
        before, generation = durable(admin), admin.status().generation
        for call, code, message in cases:
            with pytest.raises(AdminError) as caught:
                call(admin)
            assert (caught.value.code.name, message in caught.value.message) == (code, True), (
                caught.value
            )
        assert durable(admin) == before
        assert admin.status().generation == generation  # nothing was committed
    done = setup.ctl("firewall", "add", "--type", "ip", "--value", "192.0.2.7")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == "mcproxyctl: ALREADY_EXISTS: firewall rule ip 192.0.2.7 exists\n"
    done = setup.ctl("routes", "add", "--listener", listener, "--hostname", "x.test",
                     "--backend", gamma.addr, "--mode", "l9")  # fmt: skip
    assert done.returncode == 1
    assert "INVALID_ARGUMENT: route.mode: 'l9' is not one of: l4, l7" in done.stderr
    setup.proxy.stop()
    setup.proxy.start()
    with setup.client() as admin:
        assert durable(admin) == before


# --- live reload under load ---------------------------------------------------------------------


def test_route_churn_under_load(setup: Setup, gamma: TlsBackend) -> None:
    """200 Add/RemoveRoute calls while new TLS connections stream to unchanged routes.

    No connection to alpha/beta fails; each new route is reached by the very
    next connection after AddRoute returns, and refused right after
    RemoveRoute returns, whichever worker accepts it.
    """
    stop = threading.Event()
    served: list[str] = []
    failures: list[str] = []

    def load(sni: str) -> None:
        while not stop.is_set():
            try:
                name = setup.ask(sni)
            except Exception as exc:
                failures.append(f"{sni}: {exc!r}")
                continue
            (served if name == sni else failures).append(f"{sni}: {name}")

    threads = [threading.Thread(target=load, args=(h,)) for h in ("alpha.test", "beta.test")]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(served) > 10, 10, "load to start")
        with setup.client() as admin:
            for i in range(100):
                hostname = f"new{i}.test"
                admin.add_route(setup.listener, hostname, gamma.addr)
                assert setup.ask(hostname, verify_name=False) == "gamma.test", hostname
                admin.remove_route(setup.listener, hostname)
                assert setup.refused(hostname), hostname
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert failures == []
    assert len(served) > 100
    # The kernel spread the new-route connections over both workers.
    log = setup.proxy.log()
    pids = set(re.findall(r"pid=(\d+) client=\S+ listener=\S+ sni=new\d+\.test route=new", log))
    assert len(pids) == 2


def test_worker_that_does_not_acknowledge_is_named_and_restarted(
    setup: Setup, gamma: TlsBackend
) -> None:
    victim = setup.proxy.worker_pids()[0]
    os.kill(victim, signal.SIGSTOP)
    try:
        with setup.client() as admin, pytest.raises(AdminError) as caught:
            admin.add_route(setup.listener, "late.test", gamma.addr)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGCONT)
    assert caught.value.code is grpc.StatusCode.INTERNAL
    assert re.search(rf"worker \d \(pid {victim}\) did not apply it", caught.value.message)

    def replaced() -> bool:
        pids = setup.proxy.worker_pids()
        return len(pids) == 2 and victim not in pids

    wait_for(replaced, 15, "the late worker to be replaced")
    with setup.client() as admin:

        def current() -> Status | None:
            status = admin.status()
            up_to_date = all(w.pid and w.generation == status.generation for w in status.workers)
            return status if up_to_date else None

        status = wait_for(current, 15, "every worker on the current generation")
        assert status.worker_restarts == 1
        assert "late.test" in [r.route.hostname for r in admin.list_routes()]
    for _ in range(20):  # on whichever worker: both route it now
        assert setup.ask("late.test", verify_name=False) == "gamma.test"


# --- durability -----------------------------------------------------------------------------------


def test_sigkill_of_the_supervisor_loses_nothing_reported_done(
    setup: Setup, ca: CA, gamma: TlsBackend
) -> None:
    cert, key = (str(p) for p in issue(ca, "web.test", setup.dir))
    with setup.client() as admin:
        for i in range(20):
            admin.add_route(setup.listener, f"r{i}.test", gamma.addr)
        admin.add_route(
            setup.listener, "web.test", "127.0.0.1:9", mode="l7", tls_cert=cert, tls_key=key
        )
        admin.add_policy(setup.listener, "web.test", "require_header", "X-Key")
        admin.add_firewall_rule("cidr", "203.0.113.0/24")
        admin.set_listener_max_connections(setup.listener, 33)
        admin.remove_route(setup.listener, "beta.test")
        before = durable(admin)
        workers = setup.proxy.worker_pids()
        assert setup.proxy.process is not None
        setup.proxy.process.kill()  # right after the last call returned
    setup.proxy.process.wait()
    wait_exited(workers)  # they see their pipe close and drain
    assert os.path.exists(setup.socket)  # left behind: the restart must replace it
    setup.proxy.start()
    with setup.client() as admin:
        assert durable(admin) == before
    assert setup.ask("r19.test", verify_name=False) == "gamma.test"


# --- health, status, one instance per socket -----------------------------------------------------


def test_health_check_with_the_standard_stub(setup: Setup) -> None:
    with grpc.insecure_channel(f"unix:{setup.socket}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "mc_proxy.v1.ProxyAdminService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_status_counts_open_connections(setup: Setup) -> None:
    raw = socket.create_connection(("127.0.0.1", setup.port), timeout=10)
    with client_context(setup.ca.pem).wrap_socket(raw, server_hostname="alpha.test") as tls:
        tls.sendall(b"HOLD\n")
        with setup.client() as admin:

            def counted() -> Status | None:
                status = admin.status()
                by_workers = sum(w.active_connections for w in status.workers)
                return status if status.listeners[0].active_connections == by_workers == 1 else None

            # The listener's count is live (shared memory); the workers' come with heartbeats.
            status = wait_for(counted, 10, "the open connection in a heartbeat")
            assert sorted(w.active_connections for w in status.workers) == [0, 1]
            assert sorted(w.pid for w in status.workers) == sorted(setup.proxy.worker_pids())
            assert status.uptime_seconds > 0 and status.version
            human = setup.ctl("status").stdout
            assert re.search(rf"{re.escape(setup.listener)}\s+2\s+1\s+unlimited\s+no", human)


def test_second_instance_on_the_same_socket_refuses_to_start(
    setup: Setup, backends: dict[str, TlsBackend]
) -> None:
    other_dir = setup.dir / "second"
    other_dir.mkdir()
    other = ProxyProcess(
        other_dir,
        {
            "admin": {"socket": setup.socket},
            "listeners": [{"addr": f"127.0.0.1:{free_port()}", "routes": []}],
        },
    )
    other.start(wait=False)
    assert other.process is not None
    assert other.process.wait(30) == 1
    assert "another process answers on this admin socket" in other.log()
    with setup.client() as admin:
        assert admin.health()  # the first instance kept its socket
    assert setup.ask("alpha.test") == "alpha.test"
