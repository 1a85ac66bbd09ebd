"""End to end: L7 routes to HTTP/1.1 backends (aiohttp), WebSockets, backend trust, client certs.

The backend is aiohttp (tests/e2e/h1backend.py); the clients are curl
(HTTP/1.1 and HTTP/2), the ``websockets`` library over wss://, and a raw h2
client for an RFC 8441 extended CONNECT.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
import websockets

from tests.certs import CA, issue, issue_client, make_ca
from tests.e2e.h1backend import H1Backend
from tests.e2e.h2backend import H2Backend
from tests.e2e.harness import (
    ProxyProcess,
    client_context,
    free_port,
    l7_route,
    pattern,
    wait_for,
)
from tests.e2e.test_l7 import LineReader, curl, status_and_body

WEB = "app.test"


class App:
    """A proxy on one port with ``backend_protocol: h1`` routes to aiohttp backends."""

    def __init__(self, directory: Path, ca: CA, port: int, backend: H1Backend) -> None:
        self.directory = directory
        self.ca = ca
        self.ca_file = ca.write(directory)
        self.port = port
        self.backend = backend
        self.proxy: ProxyProcess | None = None
        self.clients_ca: CA | None = None

    def curl(self, path: str, *args: str, host: str = WEB) -> tuple[int, bytes]:
        return status_and_body(
            curl(self.port, self.ca_file, path, "-w", "\n%{http_code}", *args, host=host)
        )

    def seen(self, *args: str, host: str = WEB) -> dict[str, Any]:
        status, body = self.curl("/headers", *args, host=host)
        assert status == 200, body
        seen: dict[str, Any] = json.loads(body)
        seen["fields"] = {name.lower(): value for name, value in seen["headers"]}
        return seen

    def log(self) -> str:
        assert self.proxy is not None
        return self.proxy.log()


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    directory = tmp_path_factory.mktemp("app")
    ca = make_ca()
    ca_file = ca.write(directory)
    backend = H1Backend()
    h2_backend = H2Backend()
    # A TLS backend addressed by IP whose certificate names backend.test, which asks
    # for a client certificate from our CA (mTLS to the backend).
    secure = H1Backend(
        tls=tuple(str(p) for p in issue(ca, "backend.test", directory)),  # type: ignore[arg-type]
        client_ca=str(ca_file),
    )
    proxy_cert, proxy_key = issue_client(ca, "mc-proxy", directory)
    stranger = make_ca("stranger CA")
    stranger_dir = directory / "stranger"
    stranger_dir.mkdir()
    stranger_file = stranger.write(stranger_dir)
    clients = make_ca("clients CA")
    clients_dir = directory / "clients"
    clients_dir.mkdir()
    clients_file = clients.write(clients_dir)
    port = free_port()
    h1 = {"backend_protocol": "h1"}
    trust = {
        "backend_tls": True,
        "backend_ca": str(ca_file),
        "backend_server_name": "backend.test",
    }
    mtls = {"backend_client_cert": str(proxy_cert), "backend_client_key": str(proxy_key)}
    routes = [
        l7_route(directory, ca, WEB, backend.addr, **h1),
        l7_route(directory, ca, "secure.test", secure.addr, **h1, **trust, **mtls),
        l7_route(directory, ca, "nocert.test", secure.addr, **h1, **trust),
        l7_route(
            directory,
            ca,
            "wrongca.test",
            secure.addr,
            **h1,
            **{**trust, "backend_ca": str(stranger_file)},
        ),
        l7_route(directory, ca, "clients.test", backend.addr, **h1, client_ca=str(clients_file)),
        l7_route(directory, ca, "h2.test", backend.addr),  # an h2 route to an h1 app: 502
        l7_route(directory, ca, "clients-h2.test", h2_backend.addr, client_ca=str(clients_file)),
    ]
    app = App(directory, ca, port, backend)
    app.clients_ca = clients
    listener = {"addr": f"127.0.0.1:{port}", "routes": routes}
    proxy = ProxyProcess(directory, {"listeners": [listener]})
    try:
        with proxy:
            app.proxy = proxy
            yield app
    finally:
        backend.close()
        secure.close()
        h2_backend.close()


# --- HTTP/1.1 backends ------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--http1.1", "--http2"])
def test_both_client_protocols_reach_an_http11_backend(app: App, flag: str) -> None:
    seen = app.seen(flag, "-H", "X-Forwarded-Client-Cert: Hash=forged", "-H", "TE: trailers")
    assert seen["version"] == "1.1"
    fields = seen["fields"]
    assert fields["host"] == f"{WEB}:{app.port}"
    assert fields["x-forwarded-for"] == "127.0.0.1"
    assert fields["x-forwarded-proto"] == "https"
    assert "x-forwarded-client-cert" not in fields
    assert "te" not in fields
    wait_for(lambda: "route=app.test method=GET status=200" in app.log(), 5, "the access log")
    assert "proto=h1" in app.log()


def test_keep_alive_reuses_one_backend_connection(app: App) -> None:
    before = len(app.backend.peers)
    urls = [f"https://{WEB}:{app.port}/headers"] * 5
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "--http2",
            "--cacert",
            str(app.ca_file),
            "--resolve",
            f"{WEB}:{app.port}:127.0.0.1",
            *urls,
        ],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    peers = app.backend.peers[before:]
    assert len(peers) == 5
    assert len({port for _, port in peers}) == 1, peers  # one pooled connection, reused


@pytest.mark.parametrize("flag", ["--http1.1", "--http2"])
def test_large_bodies_both_ways_are_whole(app: App, tmp_path: Path, flag: str) -> None:
    size = 32 * 1024 * 1024
    upload = tmp_path / "upload.bin"
    upload.write_bytes(os.urandom(size))
    digest = hashlib.sha256(upload.read_bytes()).hexdigest()
    status, body = app.curl("/sink", flag, "--data-binary", f"@{upload}")
    assert status == 200 and json.loads(body) == {"size": size, "sha256": digest}
    status, body = app.curl(
        "/sink", flag, "-T", str(upload), "-H", "Transfer-Encoding: chunked", "-X", "POST"
    )
    assert status == 200 and json.loads(body)["sha256"] == digest
    status, body = app.curl(f"/bytes/{size}", flag)
    assert status == 200 and hashlib.sha256(body).digest() == hashlib.sha256(pattern(size)).digest()
    status, body = app.curl("/echo", flag, "--data-binary", f"@{upload}")
    assert status == 200 and hashlib.sha256(body).hexdigest() == digest


@pytest.mark.parametrize("flag", ["--http1.1", "--http2"])
def test_head_204_and_304_have_no_body(app: App, flag: str) -> None:
    result = curl(app.port, app.ca_file, "/headers", flag, "-I", "-w", "%{http_code}", host=WEB)
    assert result.returncode == 0 and result.stdout.endswith(b"200"), result
    assert app.curl("/status/204", flag) == (204, b"")
    assert app.curl("/status/304", flag) == (304, b"")


@pytest.mark.parametrize("flag", ["--http1.1", "--http2"])
def test_server_sent_events_pass_one_by_one_from_an_h1_backend(app: App, flag: str) -> None:
    with subprocess.Popen(
        [
            "curl",
            "-sSN",
            flag,
            "--cacert",
            str(app.ca_file),
            "--resolve",
            f"{WEB}:{app.port}:127.0.0.1",
            f"https://{WEB}:{app.port}/sse/3",
        ],
        stdout=subprocess.PIPE,
    ) as process:
        reader = LineReader(process)
        for k in range(3):
            app.backend.release_event()
            # Event k+1 is produced only once event k arrived here.
            assert reader.next_event() == f"data: event {k}\n\n".encode()
        assert process.wait(10) == 0


def test_an_h2c_upgrade_is_not_passed_on(app: App) -> None:
    seen = app.seen(
        "--http1.1",
        "-H",
        "Upgrade: h2c",
        "-H",
        "Connection: Upgrade, HTTP2-Settings",
        "-H",
        "HTTP2-Settings: AAMAAABkAAQAAP__",
    )
    assert "upgrade" not in seen["fields"] and "http2-settings" not in seen["fields"]


# --- WebSockets -------------------------------------------------------------------------------


def _ws_context(app: App) -> ssl.SSLContext:
    return client_context(app.ca.pem, ["http/1.1"])


def test_a_websocket_over_wss_carries_text_a_1mib_message_and_the_close_code(app: App) -> None:
    async def talk() -> int | None:
        url = f"wss://{WEB}:{app.port}/ws"
        sock = socket.create_connection(("127.0.0.1", app.port))
        async with websockets.connect(
            url, ssl=_ws_context(app), sock=sock, server_hostname=WEB, max_size=1 << 24
        ) as ws:
            await ws.send("hello")
            assert await ws.recv() == "hello"
            blob = os.urandom(1 << 20)
            await ws.send(blob)
            assert await ws.recv() == blob
            await ws.send("close:4001")
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None
            return closed.value.rcvd.code

    assert asyncio.run(asyncio.wait_for(talk(), 30)) == 4001
    wait_for(lambda: 4001 in app.backend.ws_closed, 5, "the backend saw the close")


def _frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (RFC 6455 section 5.2)."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
    return head + mask + masked


def test_an_http2_extended_connect_websocket(app: App) -> None:
    raw = socket.create_connection(("127.0.0.1", app.port), timeout=10)
    tls = client_context(app.ca.pem, ["h2"]).wrap_socket(raw, server_hostname=WEB)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding=None))
    conn.initiate_connection()
    tls.sendall(conn.data_to_send())
    events: list[h2.events.Event] = []

    def pump(until: Any, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, events
            data = tls.recv(65536)
            assert data, "connection closed"
            events.extend(conn.receive_data(data))
            tls.sendall(conn.data_to_send())

    pump(lambda: any(isinstance(e, h2.events.RemoteSettingsChanged) for e in events))
    assert conn.remote_settings[h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL] == 1
    sid = conn.get_next_available_stream_id()
    conn.send_headers(
        sid,
        [
            (b":method", b"CONNECT"),
            (b":protocol", b"websocket"),
            (b":scheme", b"https"),
            (b":authority", f"{WEB}:{app.port}".encode()),
            (b":path", b"/ws"),
            (b"sec-websocket-version", b"13"),
        ],
    )
    tls.sendall(conn.data_to_send())
    pump(lambda: any(isinstance(e, h2.events.ResponseReceived) for e in events))
    response = next(e for e in events if isinstance(e, h2.events.ResponseReceived))
    assert dict(response.headers)[b":status"] == b"200"

    def received() -> bytes:
        data = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
        return data

    conn.send_data(sid, _frame(0x1, b"over h2"))
    tls.sendall(conn.data_to_send())
    pump(lambda: received().endswith(b"over h2"))
    assert received() == b"\x81\x07over h2"  # the server's unmasked text frame, untouched
    conn.send_data(sid, _frame(0x8, struct.pack("!H", 1000)))
    tls.sendall(conn.data_to_send())
    pump(lambda: any(isinstance(e, h2.events.StreamEnded) for e in events))
    assert received().endswith(b"\x88\x02\x03\xe8")
    tls.close()


def test_a_websocket_on_an_h2_route_is_refused(app: App) -> None:
    key = base64.b64encode(os.urandom(16)).decode()
    status, _ = app.curl(
        "/ws",
        "--http1.1",
        "-H",
        "Upgrade: websocket",
        "-H",
        "Connection: Upgrade",
        "-H",
        f"Sec-WebSocket-Key: {key}",
        "-H",
        "Sec-WebSocket-Version: 13",
        host="h2.test",
    )
    assert status >= 400


# --- backend trust and client certificates ----------------------------------------------------


def test_mtls_to_a_backend_verified_by_name_against_the_route_ca(app: App) -> None:
    seen = app.seen("--http2", host="secure.test")
    assert seen["client_subject"] == {"commonName": "mc-proxy"}


def test_a_backend_failing_verification_gives_502_with_the_reason_logged(app: App) -> None:
    assert app.curl("/headers", host="wrongca.test") == (502, b"502 Bad Gateway\n")
    wait_for(lambda: "CERTIFICATE_VERIFY_FAILED" in app.log(), 5, "the reason in the log")


def test_a_backend_wanting_a_client_certificate_refuses_a_proxy_without_one(app: App) -> None:
    status, _ = app.curl("/headers", host="nocert.test")
    assert status == 502
    wait_for(lambda: "route=nocert.test" in app.log(), 5, "the access log")
    assert "Traceback" not in app.log()


def _client_cert(app: App, name: str) -> tuple[Path, Path]:
    assert app.clients_ca is not None
    directory = app.directory / f"client-{name}"
    directory.mkdir(exist_ok=True)
    return issue_client(app.clients_ca, name, directory)


def test_client_ca_needs_a_client_certificate_and_forwards_it(app: App) -> None:
    result = curl(app.port, app.ca_file, "/headers", host="clients.test")
    assert result.returncode != 0  # the handshake fails without a certificate
    cert, key = _client_cert(app, "alice")
    for flag in ("--http1.1", "--http2"):
        seen = app.seen(
            flag,
            "--cert",
            str(cert),
            "--key",
            str(key),
            "-H",
            'X-Forwarded-Client-Cert: Hash=0;Subject="CN=root"',
            host="clients.test",
        )
        der = ssl.PEM_cert_to_DER_cert(cert.read_text())
        expected = f'Hash={hashlib.sha256(der).hexdigest()};Subject="CN=alice"'
        assert seen["fields"]["x-forwarded-client-cert"] == expected
    stranger = make_ca("not the clients CA")
    other_dir = app.directory / "other-client"
    other_dir.mkdir(exist_ok=True)
    cert, key = issue_client(stranger, "mallory", other_dir)
    result = curl(
        app.port,
        app.ca_file,
        "/headers",
        "--cert",
        str(cert),
        "--key",
        str(key),
        host="clients.test",
    )
    assert result.returncode != 0


def test_client_ca_works_on_an_h2_route_too(app: App) -> None:
    cert, key = _client_cert(app, "bob")
    status, body = app.curl(
        "/headers",
        "--cert",
        str(cert),
        "--key",
        str(key),
        "-H",
        "X-Forwarded-Client-Cert: x",
        host="clients-h2.test",
    )
    assert status == 200
    fields = [
        value for name, value in json.loads(body)["headers"] if name == "x-forwarded-client-cert"
    ]
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    assert fields == [f'Hash={hashlib.sha256(der).hexdigest()};Subject="CN=bob"']
    assert curl(app.port, app.ca_file, "/headers", host="clients-h2.test").returncode != 0


def test_a_reader_that_stops_stalls_the_http11_backend(app: App) -> None:
    size = 1 << 30
    before = app.backend.written
    raw = socket.create_connection(("127.0.0.1", app.port), timeout=10)
    with client_context(app.ca.pem, ["http/1.1"]).wrap_socket(raw, server_hostname=WEB) as tls:
        tls.sendall(f"GET /bytes/{size} HTTP/1.1\r\nHost: {WEB}\r\n\r\n".encode())
        got = 0
        while got < 1 << 20:
            got += len(tls.recv(65536))
        # Stop reading: socket buffers and the proxy's bounded buffers fill, then the
        # backend's writes wait: its count holds still for a second (within a deadline).
        deadline = time.monotonic() + 30
        stalled = -1
        while stalled != app.backend.written - before:
            assert time.monotonic() < deadline, "the backend never stopped writing"
            stalled = app.backend.written - before
            time.sleep(1.0)
        assert stalled < 64 << 20, stalled


def test_shutdown_closes_an_open_websocket(tmp_path: Path) -> None:
    ca = make_ca()
    backend = H1Backend()
    port = free_port()
    route = l7_route(tmp_path, ca, WEB, backend.addr, backend_protocol="h1")
    proxy = ProxyProcess(
        tmp_path, {"listeners": [{"addr": f"127.0.0.1:{port}", "routes": [route]}]}
    )

    async def talk() -> float:
        sock = socket.create_connection(("127.0.0.1", port))
        context = client_context(ca.pem, ["http/1.1"])
        async with websockets.connect(
            f"wss://{WEB}:{port}/ws", ssl=context, sock=sock, server_hostname=WEB
        ) as ws:
            await ws.send("hello")
            assert await ws.recv() == "hello"
            started = time.monotonic()
            proxy.signal(signal.SIGTERM)
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
            return time.monotonic() - started

    try:
        proxy.start()
        elapsed = asyncio.run(asyncio.wait_for(talk(), 30))
        assert elapsed < 5  # closed at drain, not cut at shutdown_timeout (10 s)
        assert proxy.stop() == 0
        wait_for(lambda: len(backend.ws_closed) == 1, 5, "the backend saw the tunnel end")
    finally:
        proxy.stop()
        backend.close()


# --- a real browser ---------------------------------------------------------------------------


EXTRA_FLAGS: list[str] = os.environ.get("H1WS_CHROME_FLAGS", "").split()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


async def _devtools(port: int, url: str, timeout: float) -> str:
    """Load ``url`` in the browser on DevTools ``port``; return ``#out`` once the title is done."""
    loop = asyncio.get_running_loop()

    def targets() -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as reply:
            found: list[dict[str, Any]] = json.load(reply)
            return found

    pages = [t for t in await loop.run_in_executor(None, targets) if t.get("type") == "page"]
    assert pages, "no page target"
    async with websockets.connect(pages[0]["webSocketDebuggerUrl"], max_size=1 << 24) as cdp:
        ids = iter(range(1, 1 << 30))

        async def call(method: str, **params: Any) -> dict[str, Any]:
            sent = next(ids)
            await cdp.send(json.dumps({"id": sent, "method": method, "params": params}))
            while True:
                message = json.loads(await cdp.recv())
                if message.get("id") == sent:
                    result: dict[str, Any] = message.get("result", {})
                    return result

        await call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        expression = "document.title === 'done' ? document.getElementById('out').textContent : ''"
        while time.monotonic() < deadline:
            result = await call("Runtime.evaluate", expression=expression, returnByValue=True)
            value = result.get("result", {}).get("value")
            if value:
                return str(value)
            await asyncio.sleep(0.2)
    raise AssertionError("the page did not finish in time")


def test_headless_chromium_fetches_opens_a_websocket_and_reads_sse(
    app: App, tmp_path: Path
) -> None:
    browser = _chromium()
    if browser is None:
        missing = "chromium is not installed (Debian package chromium, in .ci/run)"
        if os.environ.get("CI"):
            pytest.fail(missing)  # CI installs it: a skip there would hide a broken install
        pytest.skip(missing)
    for _ in range(3):
        app.backend.release_event()
    profile = tmp_path / "profile"
    with subprocess.Popen(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--no-first-run",
            *EXTRA_FLAGS,
            "--ignore-certificate-errors",
            f"--user-data-dir={profile}",
            f"--host-resolver-rules=MAP {WEB} 127.0.0.1",
            "--remote-debugging-port=0",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    ) as process:
        try:
            active = profile / "DevToolsActivePort"
            wait_for(active.exists, 30, "chromium's DevTools port")
            wait_for(lambda: active.read_text().count("\n") >= 1, 10, "the port written")
            port = int(active.read_text().split()[0])
            text = asyncio.run(_devtools(port, f"https://{WEB}:{app.port}/page", 60))
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
    seen = json.loads(text)
    assert seen == {
        "fetch": 200,
        "backend_version": "1.1",
        "ws": "ping from the browser",
        "ws_close": 1000,
        "sse": ["event 0", "event 1", "event 2"],
    }, seen


def test_an_h1_route_with_trust_added_through_the_admin_api_is_live_at_once(app: App) -> None:
    """``mcproxyctl routes add --backend-protocol h1`` with the trust flags: served at once."""
    assert app.proxy is not None
    directory = app.directory / "live"
    directory.mkdir()
    cert, key = issue(app.ca, "live.test", directory)
    proxy_cert, proxy_key = issue_client(app.ca, "mc-proxy", directory)
    secure = next(
        r["backend"]
        for r in app.proxy.config["listeners"][0]["routes"]
        if r["hostname"] == "secure.test"
    )
    app.proxy.ctl_json(
        "routes", "add", "--listener", f"127.0.0.1:{app.port}", "--hostname", "live.test",
        "--backend", secure, "--mode", "l7", "--tls-cert", str(cert), "--tls-key", str(key),
        "--backend-protocol", "h1", "--backend-tls", "--backend-ca", str(app.ca_file),
        "--backend-server-name", "backend.test", "--backend-client-cert", str(proxy_cert),
        "--backend-client-key", str(proxy_key),
    )  # fmt: skip
    for flag in ("--http1.1", "--http2"):  # both workers have it when the command returns
        seen = app.seen(flag, host="live.test")
        assert seen["version"] == "1.1" and seen["client_subject"] == {"commonName": "mc-proxy"}
