"""End to end: L7 routes of the real ``mc-proxy serve`` (2 workers) with curl and raw clients."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import select
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h11
import pytest

from mcproxy.admin.client import AdminClient
from mcproxy.worker.l7.frames import GoAwayFilter
from mcproxy.worker.l7.h2front import RAPID_RESET_THRESHOLD
from mcproxy.worker.proxy_protocol import encode_v2
from tests.certs import CA, issue, make_ca
from tests.e2e.h2backend import H2Backend
from tests.e2e.harness import (
    ProxyProcess,
    TlsBackend,
    client_context,
    free_port,
    l7_route,
    pattern,
    wait_for,
)

WEB = "web.test"


def curl(
    port: int, ca_file: Path, url_path: str, *args: str, host: str = WEB, timeout: float = 30
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [
            "curl",
            "-sS",
            "--cacert",
            str(ca_file),
            "--resolve",
            f"{host}:{port}:127.0.0.1",
            *args,
            f"https://{host}:{port}{url_path}",
        ],
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def status_and_body(result: subprocess.CompletedProcess[bytes]) -> tuple[int, bytes]:
    """For curl run with ``-w '\\n%{http_code}'``."""
    assert result.returncode == 0, result.stderr
    body, _, code = result.stdout.rpartition(b"\n")
    return int(code), body


def raw_request(
    port: int,
    ca: CA,
    request: bytes,
    host: str = WEB,
    prefix: bytes = b"",
) -> tuple[h11.Response, bytes]:
    """One HTTP/1.1 request over a fresh TLS connection (``prefix`` first: a PROXY header)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        if prefix:
            raw.sendall(prefix)
        with client_context(ca.pem, ["http/1.1"]).wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(request)
            return read_response(tls)


def read_response(tls: ssl.SSLSocket) -> tuple[h11.Response, bytes]:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    head, body = None, b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(tls.recv(65536))
        elif isinstance(event, h11.Response):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            return head, body


class Web:
    """A proxy on one port with L7 routes to an :class:`H2Backend` and friends."""

    def __init__(self, directory: Path, ca: CA, port: int, backend: H2Backend) -> None:
        self.directory = directory
        self.ca = ca
        self.ca_file = ca.write(directory)
        self.port = port
        self.backend = backend
        self.proxy: ProxyProcess | None = None

    def curl(self, path: str, *args: str, host: str = WEB) -> tuple[int, bytes]:
        return status_and_body(
            curl(self.port, self.ca_file, path, "-w", "\n%{http_code}", *args, host=host)
        )

    def headers(self, *args: str) -> dict[str, str]:
        status, body = self.curl("/headers", *args)
        assert status == 200, body
        return {name: value for name, value in json.loads(body)["headers"]}


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    directory = tmp_path_factory.mktemp("web")
    ca = make_ca()
    backend = H2Backend()
    proxied = H2Backend(proxy_protocol=True)
    l4 = TlsBackend("l4.test", *issue(ca, "l4.test", directory))
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    http1 = socket.create_server(("127.0.0.1", 0))  # answers HTTP/1.1 to our preface
    stop = threading.Event()

    def serve_http1() -> None:
        http1.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = http1.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.recv(1024)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    threading.Thread(target=serve_http1, daemon=True).start()
    other_ca = make_ca("untrusted CA")
    wrong_cert = issue(other_ca, "127.0.0.1", directory)
    untrusted = H2Backend(tls=(str(wrong_cert[0]), str(wrong_cert[1])))
    port = free_port()
    unreachable = f"127.0.0.1:{free_port()}"
    routes = [
        l7_route(directory, ca, WEB, backend.addr),
        l7_route(
            directory,
            ca,
            "policy.test",
            backend.addr,
            l7_policies=[
                {"type": "block_user_agent", "value": "BadBot"},
                {"type": "require_header", "value": "X-API-Key"},
            ],
        ),
        l7_route(directory, ca, "down.test", unreachable),
        l7_route(directory, ca, "silent.test", f"127.0.0.1:{silent.getsockname()[1]}"),
        l7_route(directory, ca, "http1.test", f"127.0.0.1:{http1.getsockname()[1]}"),
        l7_route(directory, ca, "untrusted.test", untrusted.addr, backend_tls=True),
        l7_route(directory, ca, "pp.test", proxied.addr, send_proxy_protocol=True),
        {"hostname": "l4.test", "backend": l4.addr},
    ]
    web = Web(directory, ca, port, backend)
    proxy = ProxyProcess(
        directory, {"listeners": [{"addr": f"127.0.0.1:{port}", "routes": routes}]}
    )
    try:
        with proxy:
            web.proxy = proxy
            yield web
    finally:
        stop.set()
        for closable in (backend, proxied, untrusted, l4, silent, http1):
            closable.close()


def test_curl_http11_sees_forwarding_headers_and_no_hop_by_hop(web: Web) -> None:
    headers = web.headers(
        "--http1.1",
        "-H",
        "X-Forwarded-For: 6.6.6.6",
        "-H",
        "X-Real-IP: 6.6.6.6",
        "-H",
        "X-Forwarded-Proto: http",
        "-H",
        "Connection: keep-alive, X-Hop",
        "-H",
        "X-Hop: secret",
        "-H",
        "Keep-Alive: timeout=5",
        "-H",
        "TE: trailers",
    )
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-real-ip"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "https"
    assert headers["te"] == "trailers"
    assert headers[":authority"] == f"{WEB}:{web.port}"
    for hop in ("connection", "x-hop", "keep-alive", "host"):
        assert hop not in headers


def test_curl_http2_sees_forwarding_headers(web: Web) -> None:
    headers = web.headers("--http2", "-H", "X-Forwarded-For: 6.6.6.6", "-H", "X-Real-IP: 1.1.1.1")
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-real-ip"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "https"
    assert headers[":method"] == "GET"


def test_curl_negotiates_the_protocol_it_asks_for(web: Web) -> None:
    for flag, version in (("--http1.1", "1.1"), ("--http2", "2")):
        result = curl(web.port, web.ca_file, "/status/204", flag, "-w", "%{http_version}")
        assert result.returncode == 0 and result.stdout == version.encode(), result


def test_bodies_both_ways_over_http11_and_http2(web: Web, tmp_path: Path) -> None:
    size = 8 * 1024 * 1024
    upload = tmp_path / "upload.bin"
    upload.write_bytes(os.urandom(size))
    digest = hashlib.sha256(upload.read_bytes()).hexdigest()
    for flag in ("--http1.1", "--http2"):
        status, body = web.curl("/sink", flag, "--data-binary", f"@{upload}")
        assert status == 200
        assert json.loads(body) == {"length": size, "sha256": digest}
        # Chunked upload (HTTP/1.1) or DATA frames without a length (HTTP/2).
        status, body = web.curl(
            "/sink", flag, "-T", str(upload), "-H", "Transfer-Encoding: chunked", "-X", "POST"
        )
        assert status == 200 and json.loads(body)["sha256"] == digest
        status, body = web.curl(f"/bytes/{size}", flag)
        assert status == 200 and body == pattern(size)


def test_trailers_reach_an_http2_client(web: Web) -> None:
    result = curl(web.port, web.ca_file, "/trailers", "--http2", "-v")
    assert result.returncode == 0
    assert result.stdout == b"body before trailers\n"
    assert b"x-checksum: ok" in result.stderr


def test_an_l4_and_an_l7_route_share_the_listener(web: Web) -> None:
    assert web.curl("/status/200")[0] == 200
    assert web.proxy is not None
    with web.proxy.connect(web.port, "l4.test", web.ca.pem) as tls:
        tls.sendall(b"NAME\n")
        assert tls.recv(100) == b"l4.test\n"


def test_policies_answer_403_before_the_backend(web: Web) -> None:
    before = web.backend.requests
    assert web.curl("/", "-A", "BadBot/1.0", "-H", "X-API-Key: k", host="policy.test")[0] == 403
    assert web.curl("/", "--http1.1", "-A", "curl", host="policy.test") == (403, b"403 Forbidden\n")
    assert web.backend.requests == before
    status, _body = web.curl("/headers", "-A", "curl", "-H", "X-API-Key: k", host="policy.test")
    assert status == 200 and web.backend.requests == before + 1


def test_an_unreachable_backend_gives_502(web: Web) -> None:
    for flag in ("--http1.1", "--http2"):
        status, body = web.curl("/", flag, host="down.test")
        assert (status, body) == (502, b"502 Bad Gateway\n")


def test_a_backend_that_never_answers_gives_504_after_connect_timeout(web: Web) -> None:
    started = time.monotonic()
    status, _ = web.curl("/", host="silent.test")
    assert status == 504
    assert 1.5 < time.monotonic() - started < 10  # connect_timeout is 2s in the harness


def test_a_backend_speaking_http11_gives_502(web: Web) -> None:
    assert web.curl("/", host="http1.test")[0] == 502


def test_an_untrusted_backend_certificate_gives_502(web: Web) -> None:
    assert web.curl("/", host="untrusted.test") == (502, b"502 Bad Gateway\n")
    proxy = web.proxy
    assert proxy is not None
    wait_for(lambda: "CERTIFICATE_VERIFY_FAILED" in proxy.log(), 5, "the reason in the log")


def test_send_proxy_protocol_opens_one_backend_connection_per_client_connection(
    web: Web,
) -> None:
    def two_requests() -> list[dict[str, Any]]:
        with socket.create_connection(("127.0.0.1", web.port), timeout=10) as raw:
            ctx = client_context(web.ca.pem, ["http/1.1"])
            with ctx.wrap_socket(raw, server_hostname="pp.test") as tls:
                answers = []
                for _ in range(2):
                    tls.sendall(b"GET /headers HTTP/1.1\r\nHost: pp.test\r\n\r\n")
                    answers.append(json.loads(read_response(tls)[1]))
                return answers

    first, second = two_requests(), two_requests()
    assert first[0]["proxy_header"].startswith("127.0.0.1:")
    assert first[0]["connection"] == first[1]["connection"]
    assert second[0]["connection"] == second[1]["connection"] != first[0]["connection"]


def test_the_proxy_protocol_address_is_the_forwarded_client(tmp_path: Path, web: Web) -> None:
    port = free_port()
    config = {
        "listeners": [
            {
                "addr": f"127.0.0.1:{port}",
                "proxy_protocol": True,
                "routes": [l7_route(tmp_path, web.ca, WEB, web.backend.addr)],
            }
        ]
    }
    header = encode_v2(("203.0.113.9", 40000), ("198.51.100.1", 443))
    with ProxyProcess(tmp_path, config):
        response, body = raw_request(
            port,
            web.ca,
            b"GET /headers HTTP/1.1\r\nHost: web.test\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n",
            prefix=header,
        )
    headers = dict(json.loads(body)["headers"])
    assert response.status_code == 200
    assert headers["x-forwarded-for"] == headers["x-real-ip"] == "203.0.113.9"


class LineReader:
    """Lines of a child's stdout, with a deadline per line."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.lines: queue.Queue[bytes] = queue.Queue()
        assert process.stdout is not None
        stdout = process.stdout

        def pump() -> None:
            for line in iter(stdout.readline, b""):
                self.lines.put(line)

        threading.Thread(target=pump, daemon=True).start()

    def next_event(self, timeout: float = 10) -> bytes:
        event = b""
        while not event.endswith(b"\n\n"):
            event += self.lines.get(timeout=timeout)
        return event


@pytest.mark.parametrize("flag", ["--http1.1", "--http2"])
def test_server_sent_events_pass_one_by_one(web: Web, flag: str) -> None:
    with subprocess.Popen(
        [
            "curl",
            "-sSN",
            flag,
            "--cacert",
            str(web.ca_file),
            "--resolve",
            f"{WEB}:{web.port}:127.0.0.1",
            f"https://{WEB}:{web.port}/sse/3",
        ],
        stdout=subprocess.PIPE,
    ) as process:
        reader = LineReader(process)
        for k in range(3):
            # Event k+1 is produced only once event k arrived here.
            assert reader.next_event() == f"id: {k}\ndata: event {k}\n\n".encode()
            if k < 2:
                web.backend.release_event()
        assert process.wait(10) == 0


def test_a_rapid_reset_flood_is_cut_off_and_others_carry_on(web: Web) -> None:
    raw = socket.create_connection(("127.0.0.1", web.port), timeout=10)
    tls = client_context(web.ca.pem, ["h2"]).wrap_socket(raw, server_hostname=WEB)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding=None))
    conn.initiate_connection()
    for _ in range(RAPID_RESET_THRESHOLD * 5):
        sid = conn.get_next_available_stream_id()
        conn.send_headers(
            sid,
            [
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b":authority", b"web.test"),
                (b":path", b"/headers"),
            ],
            end_stream=True,
        )
        conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    with contextlib.suppress(OSError):  # cut off while still sending: that is the point
        tls.sendall(conn.data_to_send())
    received, goaways = b"", []
    flt = GoAwayFilter(expect_preface=False)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            data = tls.recv(65536)
        except (OSError, ssl.SSLError):
            break
        if not data:
            break
        received += data
        goaways += flt.feed(data)[1]
    tls.close()
    assert [g.error_code for g in goaways] == [h2.errors.ErrorCodes.ENHANCE_YOUR_CALM]
    assert web.curl("/status/200", "--http2")[0] == 200
    proxy = web.proxy
    assert proxy is not None
    wait_for(lambda: "outcome=rapid_reset" in proxy.log(), 10, "the access log line")


def test_certificate_rotation_is_picked_up_without_dropping_connections(
    tmp_path: Path, web: Web
) -> None:
    cert_dir = tmp_path / "certs"
    cert_dir.mkdir()
    cert, key = issue(web.ca, WEB, cert_dir)
    port = free_port()
    route = {
        "hostname": WEB,
        "backend": web.backend.addr,
        "mode": "l7",
        "tls_cert": str(cert),
        "tls_key": str(key),
    }
    config = {"listeners": [{"addr": f"127.0.0.1:{port}", "routes": [route]}]}

    def serial_of_new_connection() -> int:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            ctx = client_context(web.ca.pem, ["http/1.1"])
            with ctx.wrap_socket(raw, server_hostname=WEB) as tls:
                der = tls.getpeercert(binary_form=True)
        from cryptography import x509

        assert der is not None
        return int(x509.load_der_x509_certificate(der).serial_number)

    with ProxyProcess(tmp_path, config):
        old_serial = serial_of_new_connection()
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        held = client_context(web.ca.pem, ["http/1.1"]).wrap_socket(raw, server_hostname=WEB)
        held.sendall(b"GET /status/200 HTTP/1.1\r\nHost: web.test\r\n\r\n")
        assert read_response(held)[0].status_code == 200
        renewed = tmp_path / "renewed"
        renewed.mkdir()
        new_cert, new_key = issue(web.ca, WEB, renewed)
        os.replace(new_key, key)
        os.replace(new_cert, cert)
        rotated = time.monotonic()
        wait_for(lambda: serial_of_new_connection() != old_serial, 5, "the renewed certificate")
        print(f"renewed certificate served after {time.monotonic() - rotated:.2f}s")
        held.sendall(b"GET /status/200 HTTP/1.1\r\nHost: web.test\r\n\r\n")
        assert read_response(held)[0].status_code == 200, "an open connection keeps working"
        held.close()


def test_idle_timeout_closes_idle_connections_and_resets_stalled_streams(
    tmp_path: Path, web: Web
) -> None:
    port = free_port()
    config = {
        "listeners": [
            {
                "addr": f"127.0.0.1:{port}",
                "routes": [l7_route(tmp_path, web.ca, WEB, web.backend.addr)],
            }
        ],
        "proxy": {
            "connect_timeout": "2s",
            "handshake_timeout": "3s",
            "idle_timeout": "1s",
            "shutdown_timeout": "10s",
        },
    }
    with ProxyProcess(tmp_path, config):
        # A stream quiet for less than idle_timeout lives on; one quiet for longer is reset.
        with subprocess.Popen(
            [
                "curl",
                "-sSN",
                "--http2",
                "--cacert",
                str(web.ca_file),
                "--resolve",
                f"{WEB}:{port}:127.0.0.1",
                f"https://{WEB}:{port}/sse/3",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        ) as process:
            reader = LineReader(process)
            assert reader.next_event() == b"id: 0\ndata: event 0\n\n"
            time.sleep(0.4)  # quiet, but for less than idle_timeout
            web.backend.release_event()
            assert reader.next_event() == b"id: 1\ndata: event 1\n\n"
            quiet = time.monotonic()
            assert process.wait(10) != 0  # reset (RST_STREAM) after idle_timeout of silence
            assert 0.9 < time.monotonic() - quiet < 5
            web.backend.release_event()  # the backend's handler waits for it, then sees the reset
        # A keep-alive connection with nothing open is closed.
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        with client_context(web.ca.pem, ["http/1.1"]).wrap_socket(raw, server_hostname=WEB) as tls:
            tls.sendall(b"GET /status/200 HTTP/1.1\r\nHost: web.test\r\n\r\n")
            assert read_response(tls)[0].status_code == 200
            started = time.monotonic()
            readable, _, _ = select.select([tls], [], [], 10)
            assert readable and tls.recv(1) == b""
            assert time.monotonic() - started < 5


def test_graceful_shutdown_lets_open_streams_finish(tmp_path: Path, web: Web) -> None:
    port = free_port()
    config = {
        "listeners": [
            {
                "addr": f"127.0.0.1:{port}",
                "routes": [l7_route(tmp_path, web.ca, WEB, web.backend.addr)],
            }
        ]
    }
    proxy = ProxyProcess(tmp_path, config).start()
    try:
        with subprocess.Popen(
            [
                "curl",
                "-sSN",
                "--http2",
                "--cacert",
                str(web.ca_file),
                "--resolve",
                f"{WEB}:{port}:127.0.0.1",
                f"https://{WEB}:{port}/sse/3",
            ],
            stdout=subprocess.PIPE,
        ) as process:
            reader = LineReader(process)
            assert reader.next_event() == b"id: 0\ndata: event 0\n\n"
            proxy.signal(signal.SIGTERM)
            wait_for(lambda: "draining 1 connections" in proxy.log(), 10, "draining to start")
            for k in (1, 2):
                web.backend.release_event()
                assert reader.next_event() == f"id: {k}\ndata: event {k}\n\n".encode()
            assert process.wait(10) == 0
        assert proxy.stop() == 0
    finally:
        proxy.stop()


def test_a_stalled_tls_handshake_is_reset_at_handshake_timeout(web: Web) -> None:
    # A real ClientHello for an L7 route, then silence: the proxy answers it (the server
    # half of the handshake) and resets the connection once handshake_timeout (3s) is over.
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    hello_only = client_context(web.ca.pem).wrap_bio(incoming, outgoing, server_hostname=WEB)
    with contextlib.suppress(ssl.SSLWantReadError):
        hello_only.do_handshake()
    with socket.create_connection(("127.0.0.1", web.port), timeout=10) as raw:
        raw.sendall(outgoing.read())
        started = time.monotonic()
        with pytest.raises(ConnectionResetError):
            while raw.recv(65536):
                pass
        elapsed = time.monotonic() - started
    assert 1.5 < elapsed < 8
    assert web.proxy is not None
    proxy = web.proxy
    wait_for(lambda: "outcome=handshake_timeout" in proxy.log(), 10, "the access log line")


def test_admin_changes_apply_to_the_next_request_on_an_open_connection(
    tmp_path: Path, web: Web
) -> None:
    """Routes are looked up per request: policies and removals reach keep-alive connections."""
    port = free_port()
    listener = f"127.0.0.1:{port}"
    config = {
        "listeners": [
            {"addr": listener, "routes": [l7_route(tmp_path, web.ca, WEB, web.backend.addr)]}
        ]
    }
    request = b"GET /status/200 HTTP/1.1\r\nHost: web.test\r\nUser-Agent: BadBot\r\n\r\n"
    with ProxyProcess(tmp_path, config):
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        ctx = client_context(web.ca.pem, ["http/1.1"])
        with (
            ctx.wrap_socket(raw, server_hostname=WEB) as tls,
            AdminClient(str(tmp_path / "admin.sock"), timeout=20) as admin,
        ):
            tls.sendall(request)
            assert read_response(tls)[0].status_code == 200
            admin.add_policy(listener, WEB, "block_user_agent", "BadBot")
            tls.sendall(request)
            assert read_response(tls)[0].status_code == 403
            admin.remove_route(listener, WEB)
            tls.sendall(request)
            assert read_response(tls)[0].status_code == 421
        # A route added at runtime serves new connections.
        cert, key = issue(web.ca, "late.test", tmp_path)
        with AdminClient(str(tmp_path / "admin.sock"), timeout=20) as admin:
            admin.add_route(
                listener,
                "late.test",
                web.backend.addr,
                mode="l7",
                tls_cert=str(cert),
                tls_key=str(key),
            )
        status, _ = status_and_body(
            curl(port, web.ca_file, "/status/200", "-w", "\n%{http_code}", host="late.test")
        )
        assert status == 200
