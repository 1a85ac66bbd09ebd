"""The admin server in-process, over its real Unix socket, with a fake supervisor.

The fake applies changes with the real ``apply_change`` at once, so these
tests cover the gRPC side (status codes, socket safety, health, reflection,
the client, ``mcproxyctl``'s output) in milliseconds; the e2e tests cover the
real supervisor and workers.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from mcproxy.admin import cli
from mcproxy.admin.client import AdminClient, AdminError, ListedRoute
from mcproxy.admin.client import BackendState as ListedBackend
from mcproxy.admin.server import AdminServer, AdminSocketError, claim_socket_path
from mcproxy.admin.servicer import AdminServicer
from mcproxy.health import BackendState, route_states
from mcproxy.model import (
    Address,
    Balance,
    Change,
    FirewallRules,
    HealthCheck,
    HealthCheckKind,
    L7Policy,
    Listener,
    Mode,
    PolicyKind,
    ProxyState,
    Route,
    RouteUpdated,
    StateError,
    apply_change,
    make_state,
)
from mcproxy.supervisor.manager import Stopping, WorkerNotAcknowledged
from mcproxy.supervisor.status import HeartbeatCounts, Status, WorkerSample, build_status
from tests.certs import make_self_signed

LISTENER = "127.0.0.1:8443"


class FakeSupervisor:
    """Applies each change at once, or fails it with ``fail`` (as the loop would)."""

    def __init__(self) -> None:
        route = Route("alpha.test", (Address("127.0.0.1", 9001),))
        self.state: ProxyState = make_state(
            1, [Listener(Address("127.0.0.1", 8443), routes={"alpha.test": route})], FirewallRules()
        )
        self.submitted: list[Change] = []
        self.fail: Exception | None = None

    def submit(self, change: Change) -> concurrent.futures.Future[int]:
        self.submitted.append(change)
        future: concurrent.futures.Future[int] = concurrent.futures.Future()
        try:
            if self.fail is not None:
                raise self.fail
            self.state = apply_change(self.state, change)
        except Exception as exc:
            future.set_exception(exc)
        else:
            future.set_result(self.state.generation)
        return future

    def status(self) -> Status:
        samples = (WorkerSample(1, 4242, self.state.generation, 2, {LISTENER: 2}, started=0.0),)
        return build_status(
            version="0.0.test",
            state=self.state,
            samples=samples,
            counts=HeartbeatCounts(samples),
            started_at=time.time() - 5,
            worker_restarts=0,
            now=time.time(),
            now_monotonic=time.monotonic(),
        )

    def backend_states(self, route: Route) -> list[BackendState]:
        return route_states(route, {})


@pytest.fixture
def fake() -> FakeSupervisor:
    return FakeSupervisor()


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "run" / "admin.sock")


@pytest.fixture
def server(fake: FakeSupervisor, sock_path: str) -> Iterator[AdminServer]:
    running = AdminServer(sock_path, fake).start()
    yield running
    running.stop(grace=0)


@pytest.fixture
def client(server: AdminServer) -> Iterator[AdminClient]:
    with AdminClient(server.path, timeout=5) as admin:
        yield admin


# --- the socket -------------------------------------------------------------------------


def test_socket_is_created_0600_in_a_new_0700_directory(server: AdminServer) -> None:
    mode = os.stat(server.path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(server.path)).st_mode) == 0o700


def test_stale_socket_is_replaced(fake: FakeSupervisor, sock_path: str) -> None:
    os.makedirs(os.path.dirname(sock_path))
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(sock_path)  # bound, never listening: what a killed process leaves
    running = AdminServer(sock_path, fake).start()
    try:
        with AdminClient(sock_path, timeout=5) as admin:
            assert admin.health()
    finally:
        running.stop(grace=0)


def test_live_socket_is_not_stolen(server: AdminServer, fake: FakeSupervisor) -> None:
    inode = os.stat(server.path).st_ino
    with pytest.raises(AdminSocketError, match="another process answers"):
        AdminServer(server.path, fake).start()
    assert os.stat(server.path).st_ino == inode
    with AdminClient(server.path, timeout=5) as admin:
        assert admin.health()


def test_a_file_that_is_not_a_socket_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "admin.sock"
    path.write_text("precious")
    with pytest.raises(AdminSocketError, match="is not a socket"):
        claim_socket_path(str(path))
    assert path.read_text() == "precious"


def test_a_directory_that_cannot_be_created_is_refused_with_its_name(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(AdminSocketError, match="cannot create the directory"):
        claim_socket_path(str(tmp_path / "file" / "run" / "admin.sock"))


def test_stop_removes_the_socket(fake: FakeSupervisor, sock_path: str) -> None:
    AdminServer(sock_path, fake).start().stop(grace=0)
    assert not os.path.exists(sock_path)


# --- health and reflection -----------------------------------------------------------


def test_health_reports_serving_for_the_server_and_the_service(client: AdminClient) -> None:
    assert client.health()
    assert client.health("mc_proxy.v1.ProxyAdminService")
    with pytest.raises(AdminError) as caught:
        client.health("no.such.Service")
    assert caught.value.code is grpc.StatusCode.NOT_FOUND


def test_reflection_describes_the_admin_service(server: AdminServer) -> None:
    with grpc.insecure_channel(f"unix:{server.path}") as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {
            "mc_proxy.v1.ProxyAdminService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= services
        found = database.FindFileContainingSymbol("mc_proxy.v1.ProxyAdminService")
        assert found.name == "mc_proxy/v1/admin.proto"
        assert "AddRoute" in [m.name for m in found.service[0].method]


# --- calls -----------------------------------------------------------------------------


def test_every_call_round_trips(client: AdminClient, fake: FakeSupervisor, tmp_path: Path) -> None:
    cert, key = (str(p) for p in make_self_signed(tmp_path, "beta.test"))
    assert client.add_route(LISTENER, "Beta.Test", "127.0.0.1:9002", mode="l7", tls_cert=cert,
                            tls_key=key) == 2  # fmt: skip
    assert client.add_policy(LISTENER, "beta.test", "block_user_agent", "BadBot") == 3
    assert client.add_firewall_rule("cidr", "198.51.100.0/24") == 4
    assert client.set_listener_max_connections(LISTENER, 50) == 5
    beta = Route(
        "beta.test",
        (Address("127.0.0.1", 9002),),
        Mode.L7,
        tls_cert=cert,
        tls_key=key,
        policies=(L7Policy(PolicyKind.BLOCK_USER_AGENT, "BadBot"),),
    )
    assert client.list_routes() == [
        ListedRoute(
            LISTENER,
            Route("alpha.test", (Address("127.0.0.1", 9001),)),
            (ListedBackend("127.0.0.1:9001", True),),  # no health check: up
        ),
        ListedRoute(LISTENER, beta, (ListedBackend("127.0.0.1:9002", True),)),
    ]
    assert client.list_routes(LISTENER) == client.list_routes()
    assert client.list_policies(LISTENER, "beta.test") == list(beta.policies)
    assert client.firewall_rules() == FirewallRules(blocked_cidrs=frozenset({"198.51.100.0/24"}))
    status = client.status()
    assert status.generation == 5
    assert status.workers[0].pid == 4242
    assert status.listeners[0].max_connections == 50
    assert status.listeners[0].active_connections == 2
    assert client.remove_policy(LISTENER, "beta.test", "block_user_agent", "BadBot") == 6
    assert client.remove_firewall_rule("cidr", "198.51.100.0/24") == 7
    assert client.remove_route(LISTENER, "BETA.test") == 8
    assert fake.state.generation == 8
    assert [r.route.hostname for r in client.list_routes()] == ["alpha.test"]


@pytest.mark.parametrize(
    ("call", "code", "message"),
    [
        (
            lambda c: c.add_route(LISTENER, "alpha.test", "127.0.0.1:1"),
            grpc.StatusCode.ALREADY_EXISTS,
            "alpha.test",
        ),
        (lambda c: c.remove_route(LISTENER, "nope.test"), grpc.StatusCode.NOT_FOUND, "nope.test"),
        (
            lambda c: c.add_route("10.0.0.1:1", "b.test", "127.0.0.1:1"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "listener: no listener 10.0.0.1:1",
        ),
        (
            lambda c: c.add_route(LISTENER, "b.test", "127.0.0.1:1", mode="l3"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "route.mode: 'l3' is not one of: l4, l7",
        ),
        (
            lambda c: c.remove_firewall_rule("ip", "192.0.2.1"),
            grpc.StatusCode.NOT_FOUND,
            "192.0.2.1",
        ),
        (
            lambda c: c.set_listener_max_connections(LISTENER, -5),
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_connections",
        ),
        (
            lambda c: c.add_policy(LISTENER, "alpha.test", "require_header", "x-key"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "policies apply to l7 only",
        ),
        (
            lambda c: c.add_policy(LISTENER, "alpha.test", "rate_limit", "5"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "type: 'rate_limit' is not one of",
        ),
        (
            lambda c: c.list_policies(LISTENER, "nope.test"),
            grpc.StatusCode.NOT_FOUND,
            "no route nope.test",
        ),
        (
            lambda c: c.list_routes("10.0.0.1:1"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "listener: no listener",
        ),
    ],
)
def test_rejected_calls_answer_their_code_and_change_nothing(
    client: AdminClient, fake: FakeSupervisor, call: object, code: grpc.StatusCode, message: str
) -> None:
    before = fake.state
    with pytest.raises(AdminError) as caught:
        call(client)  # type: ignore[operator]
    assert caught.value.code is code
    assert message in caught.value.message
    assert fake.state == before


def test_invalid_argument_never_reaches_the_supervisor(
    client: AdminClient, fake: FakeSupervisor
) -> None:
    with pytest.raises(AdminError):
        client.add_route(LISTENER, "not a host", "127.0.0.1:1")
    assert fake.submitted == []


def test_unacknowledged_change_is_internal_with_the_loops_message(
    client: AdminClient, fake: FakeSupervisor
) -> None:
    fake.fail = WorkerNotAcknowledged("change committed (generation 2) but worker 2 (pid 77) ...")
    with pytest.raises(AdminError) as caught:
        client.add_route(LISTENER, "b.test", "127.0.0.1:1")
    assert caught.value.code is grpc.StatusCode.INTERNAL
    assert "worker 2 (pid 77)" in caught.value.message


def test_change_while_stopping_is_unavailable(client: AdminClient, fake: FakeSupervisor) -> None:
    fake.fail = Stopping("mc-proxy is shutting down; no changes accepted")
    with pytest.raises(AdminError) as caught:
        client.add_firewall_rule("ip", "192.0.2.1")
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in caught.value.message


def test_store_failure_is_internal(client: AdminClient, fake: FakeSupervisor) -> None:
    fake.fail = StateError("weird", "disk on fire")
    with pytest.raises(AdminError) as caught:
        client.add_firewall_rule("ip", "192.0.2.1")
    assert caught.value.code is grpc.StatusCode.FAILED_PRECONDITION
    fake.fail = OSError("disk full")
    with pytest.raises(AdminError) as caught:
        client.add_firewall_rule("ip", "192.0.2.1")
    assert caught.value.code is grpc.StatusCode.INTERNAL
    assert "disk full" in caught.value.message


def test_unreachable_socket_is_unavailable_naming_the_path(tmp_path: Path) -> None:
    path = str(tmp_path / "nobody.sock")
    with AdminClient(path, timeout=5) as admin, pytest.raises(AdminError) as caught:
        admin.status()
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE
    assert path in caught.value.message


# --- mcproxyctl ------------------------------------------------------------------------------


def ctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_tables_and_json(server: AdminServer, capsys: pytest.CaptureFixture[str]) -> None:
    sock = ["--socket", server.path]
    status, out, _ = ctl(capsys, *sock, "routes", "list")
    assert status == 0
    assert out.split("\n")[0].split() == ["LISTENER", "HOSTNAME", "BACKENDS", "MODE", "OPTIONS"]
    assert out.split("\n")[1].split() == [LISTENER, "alpha.test", "127.0.0.1:9001", "l4", "-"]
    status, out, _ = ctl(capsys, *sock, "--json", "routes", "add", "--listener", LISTENER,
                         "--hostname", "b.test", "--backend", "127.0.0.1:9002")  # fmt: skip
    assert (status, json.loads(out)) == (0, {"generation": 2})
    # --json and --socket are accepted after the command too
    status, out, _ = ctl(capsys, "firewall", "list", "--json", *sock)
    assert (status, json.loads(out)) == (0, [])
    status, out, _ = ctl(capsys, *sock, "status")
    assert status == 0
    assert "mc-proxy 0.0.test" in out and "4242" in out and "unlimited" in out
    status, out, _ = ctl(capsys, *sock, "--json", "status")
    assert json.loads(out)["listeners"][0]["routes"] == 2


def test_cli_error_goes_to_stderr_with_exit_1(
    server: AdminServer, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = ["--socket", server.path]
    status, out, err = ctl(capsys, *sock, "routes", "remove", "--listener", LISTENER,
                           "--hostname", "nope.test")  # fmt: skip
    assert (status, out) == (1, "")
    assert err == f"mcproxyctl: NOT_FOUND: no route nope.test on {LISTENER}\n"
    status, out, err = ctl(capsys, *sock, "--json", "listeners", "set-max-connections",
                           "--listener", LISTENER, "-1")  # fmt: skip
    assert (status, out) == (1, "")
    assert json.loads(err)["error"]["code"] == "INVALID_ARGUMENT"
    assert "max_connections: must be 0" in json.loads(err)["error"]["message"]


def test_cli_usage_error_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["routes", "add", "--listener", ":443"])
    assert caught.value.code == 1
    assert "required" in capsys.readouterr().err


def test_cli_sends_absolute_certificate_paths(
    server: AdminServer,
    fake: FakeSupervisor,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make_self_signed(tmp_path, "c.test")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MCPROXY_SOCKET", server.path)
    status, _, err = ctl(capsys, "routes", "add", "--listener", LISTENER, "--hostname", "c.test",
                         "--backend", "127.0.0.1:9003", "--mode", "l7",
                         "--tls-cert", "c.test.pem", "--tls-key", "c.test.key")  # fmt: skip
    assert (status, err) == (0, "")
    route = fake.state.listeners[LISTENER].routes["c.test"]
    assert route.tls_cert == str(tmp_path / "c.test.pem")
    assert route.tls_key == str(tmp_path / "c.test.key")


def test_table_and_duration_formatting() -> None:
    assert cli.table(("A", "LONG"), [(1, "x"), ("wide", "")]) == "A     LONG\n1     x\nwide"
    assert [cli.duration(s) for s in (0, 59, 61, 3600, 3725, 90061)] == [
        "0s",
        "59s",
        "1m 1s",
        "1h",
        "1h 2m",
        "1d 1h",
    ]


def test_change_the_loop_never_took_is_withdrawn(fake: FakeSupervisor) -> None:
    servicer = AdminServicer(fake, change_timeout=0.01)
    queued: concurrent.futures.Future[int] = concurrent.futures.Future()
    assert servicer._wait(queued) == (
        grpc.StatusCode.UNAVAILABLE,
        "the supervisor did not take the change; nothing was changed (0.01s)",
    )
    assert queued.cancelled()  # so the loop skips it (set_running_or_notify_cancel)
    running: concurrent.futures.Future[int] = concurrent.futures.Future()
    running.set_running_or_notify_cancel()
    outcome = servicer._wait(running)
    assert isinstance(outcome, tuple)
    assert outcome[0] is grpc.StatusCode.UNAVAILABLE and "list before retrying" in outcome[1]


# --- second batch: routes update and the new route flags ---------------------------------------


def test_update_route_round_trips_and_answers_its_codes(
    client: AdminClient, fake: FakeSupervisor
) -> None:
    generation = client.update_route(
        LISTENER,
        "Alpha.test",
        ["127.0.0.1:9101", "127.0.0.1:9102"],
        balance="source_ip",
        health_check="tcp",
        health_interval=1.0,
        health_timeout=0.5,
    )
    want = Route(
        "alpha.test",
        (Address("127.0.0.1", 9101), Address("127.0.0.1", 9102)),
        balance=Balance.SOURCE_IP,
        health_check=HealthCheck(HealthCheckKind.TCP, interval=1.0, timeout=0.5),
    )
    assert fake.submitted[-1] == RouteUpdated(LISTENER, want)
    assert [(r.listener, r.route) for r in client.list_routes()] == [(LISTENER, want)]
    assert generation == fake.state.generation
    with pytest.raises(AdminError) as missing:
        client.update_route(LISTENER, "nope.test", "127.0.0.1:1")
    assert missing.value.code is grpc.StatusCode.NOT_FOUND
    submitted = len(fake.submitted)
    with pytest.raises(AdminError) as bad:
        client.update_route(LISTENER, "alpha.test", ["127.0.0.1:1", "127.0.0.1:1"])
    assert bad.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "route.backends[1]: duplicate of backends[0]" in bad.value.message
    assert len(fake.submitted) == submitted  # never reached the supervisor
    assert [(r.listener, r.route) for r in client.list_routes()] == [(LISTENER, want)]


def test_cli_routes_update_with_every_route_flag(
    server: AdminServer,
    fake: FakeSupervisor,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make_self_signed(tmp_path, "alpha.test")
    make_self_signed(tmp_path, "client")
    (tmp_path / "ca.pem").write_bytes((tmp_path / "client.pem").read_bytes())
    monkeypatch.chdir(tmp_path)
    sock = ["--socket", server.path]
    status, out, err = ctl(capsys, *sock, "routes", "update", "--listener", LISTENER,
                           "--hostname", "alpha.test", "--mode", "l7",
                           "--backend", "127.0.0.1:9201", "--backend", "[::1]:9202",
                           "--balance", "least_conn", "--health-check", "http",
                           "--health-interval", "3s", "--health-timeout", "250ms",
                           "--health-path", "/up", "--health-rise", "1", "--health-fall", "4",
                           "--tls-cert", "alpha.test.pem", "--tls-key", "alpha.test.key",
                           "--backend-tls", "--backend-protocol", "h1",
                           "--backend-ca", "ca.pem", "--backend-server-name", "api.internal",
                           "--backend-client-cert", "client.pem",
                           "--backend-client-key", "client.key",
                           "--client-ca", "ca.pem")  # fmt: skip
    assert (status, err) == (0, ""), err
    assert "updated route alpha.test" in out
    route = fake.state.listeners[LISTENER].routes["alpha.test"]
    assert route.backends == (Address("127.0.0.1", 9201), Address("::1", 9202))
    assert route.balance is Balance.LEAST_CONN
    assert route.health_check == HealthCheck(
        HealthCheckKind.HTTP, interval=3.0, timeout=0.25, path="/up", rise=1, fall=4
    )
    assert route.backend_ca == route.client_ca == str(tmp_path / "ca.pem")
    assert route.backend_client_key == str(tmp_path / "client.key")
    status, out, _ = ctl(capsys, *sock, "routes", "list")
    row = out.split("\n")[1].split()
    assert row[2] == "127.0.0.1:9201,[::1]:9202"
    assert "balance=least_conn" in row[4] and "backend_protocol=h1" in row[4]
    status, out, _ = ctl(capsys, *sock, "--json", "routes", "list")
    [listed] = json.loads(out)
    assert listed["backends"] == ["127.0.0.1:9201", "[::1]:9202"]
    assert listed["backend"] == "127.0.0.1:9201"
    assert listed["health_check"]["timeout_seconds"] == 0.25
    assert listed["backend_server_name"] == "api.internal"


def test_cli_health_flags_need_a_health_check(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["routes", "add", "--listener", ":443", "--hostname", "a.test",
                  "--backend", "127.0.0.1:1", "--health-interval", "1s"])  # fmt: skip
    assert caught.value.code == 1
    assert "--health-interval needs --health-check" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["routes", "add", "--listener", ":443", "--hostname", "a.test",
                  "--backend", "127.0.0.1:1", "--health-check", "tcp",
                  "--health-interval", "5"])  # fmt: skip
    assert "needs a unit" in capsys.readouterr().err
