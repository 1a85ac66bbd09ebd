"""``mc-proxy demo``: a working proxy on loopback that needs nothing but the package.

It makes a throwaway CA and certificates, starts small backends in this
process (two TLS web servers for L4 passthrough, an h2c web server and a gRPC
server for L7), writes a config that routes four hostnames to them, runs the
real ``mc-proxy serve`` as a child process and prints commands to try, in the
order of the README's tour: each kind of route, a route added at runtime (its
certificate is made here too), an address blocked and unblocked, the metrics.
``tests/e2e/test_demo.py`` runs them as printed. Ctrl-C (or SIGTERM) stops
everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
from concurrent import futures
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mcproxy.devcerts import issue, make_ca

__all__ = ["run_demo"]

L4_HOSTNAMES = ("alpha.demo.test", "beta.demo.test")
WEB_HOSTNAME = "web.demo.test"
GRPC_HOSTNAME = "grpc.demo.test"
NEW_HOSTNAME = "gamma.demo.test"
"""Has a certificate but no route: the printed commands add one at runtime."""
DEMO_PORT = 8443
METRICS_PORT = 9090


class _TlsHello(http.server.BaseHTTPRequestHandler):
    """An HTTP/1.1 backend behind TLS: mc-proxy passes its TLS through untouched (L4)."""

    def do_GET(self) -> None:
        name = getattr(self.server, "demo_name", "?")
        body = f"hello from the {name} backend (TLS passed through by mc-proxy)\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return


def _start_tls_backend(name: str, cert: Path, key: Path) -> int:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TlsHello)
    server.demo_name = name  # type: ignore[attr-defined]
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return int(server.server_address[1])


class _H2cHello(asyncio.Protocol):
    """An h2c backend (HTTP/2 without TLS) that shows what mc-proxy sent it (L7)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        self.conn.initiate_connection()
        self.transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.transport.write(self.conn.data_to_send())
            self.transport.close()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived) and event.stream_id is not None:
                self._answer(
                    event.stream_id, [(bytes(n), bytes(v)) for n, v in event.headers or []]
                )
            elif isinstance(event, h2.events.DataReceived) and event.stream_id is not None:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        self.transport.write(self.conn.data_to_send())

    def _answer(self, stream_id: int, raw_headers: list[tuple[bytes, bytes]]) -> None:
        headers = {bytes(name).decode(): bytes(value).decode() for name, value in raw_headers}
        lines = ["hello from the h2c backend behind an L7 route of mc-proxy"]
        for name in (":method", ":path", "x-forwarded-for", "x-real-ip", "x-forwarded-proto"):
            lines.append(f"{name}: {headers.get(name, '-')}")
        body = ("\n".join(lines) + "\n").encode()
        self.conn.send_headers(
            stream_id,
            [
                (":status", "200"),
                ("content-type", "text/plain"),
                ("content-length", str(len(body))),
            ],
        )
        self.conn.send_data(stream_id, body, end_stream=True)


def _start_h2c_backend() -> int:
    ready: futures.Future[int] = futures.Future()

    def serve() -> None:
        loop = asyncio.new_event_loop()
        server = loop.run_until_complete(loop.create_server(_H2cHello, "127.0.0.1", 0))
        ready.set_result(int(server.sockets[0].getsockname()[1]))
        loop.run_forever()

    threading.Thread(target=serve, daemon=True).start()
    return ready.result(timeout=10)


def _start_grpc_backend() -> tuple[grpc.Server, int]:
    """A gRPC server with the standard health service and reflection, over h2c."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def _pick_port(host: str, preferred: int) -> int:
    with socket.socket() as sock:
        try:
            sock.bind((host, preferred))
        except OSError:
            sock.bind((host, 0))
        return int(sock.getsockname()[1])


def run_demo(directory: str | None, listen_host: str = "127.0.0.1") -> int:
    root = Path(directory or tempfile.mkdtemp(prefix="mc-proxy-demo-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    ca = make_ca("mc-proxy demo CA")
    ca_path = ca.write(root)
    routes: list[dict[str, object]] = []
    for name in L4_HOSTNAMES:
        cert, key = issue(ca, name, root)
        port = _start_tls_backend(name.split(".")[0], cert, key)
        routes.append({"hostname": name, "backend": f"127.0.0.1:{port}", "mode": "l4"})
    web_cert, web_key = issue(ca, WEB_HOSTNAME, root)
    h2c_backend = f"127.0.0.1:{_start_h2c_backend()}"
    routes.append(
        {
            "hostname": WEB_HOSTNAME,
            "backend": h2c_backend,
            "mode": "l7",
            "tls_cert": str(web_cert),
            "tls_key": str(web_key),
            "l7_policies": [{"type": "block_user_agent", "value": "BadBot"}],
        }
    )
    grpc_server, grpc_port = _start_grpc_backend()
    grpc_cert, grpc_key = issue(ca, GRPC_HOSTNAME, root)
    routes.append(
        {
            "hostname": GRPC_HOSTNAME,
            "backend": f"127.0.0.1:{grpc_port}",
            "mode": "l7",
            "tls_cert": str(grpc_cert),
            "tls_key": str(grpc_key),
        }
    )
    new_cert, new_key = issue(ca, NEW_HOSTNAME, root)
    listen_port = _pick_port(listen_host, DEMO_PORT)
    metrics_port = _pick_port("127.0.0.1", METRICS_PORT)
    socket_path = root / "admin.sock"
    config = {
        "workers": 2,
        "database": {"path": str(root / "mc-proxy.db")},
        "admin": {"socket": str(socket_path)},
        "metrics": {"addr": f"127.0.0.1:{metrics_port}", "path": "/metrics"},
        "proxy": {"shutdown_timeout": "5s"},
        "listeners": [{"addr": f"{listen_host}:{listen_port}", "routes": routes}],
    }
    config_path = root / "mc-proxy.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    with contextlib.suppress(FileNotFoundError):
        (root / "mc-proxy.db").unlink()  # the demo always starts from its YAML

    p = listen_port
    alpha, beta = L4_HOSTNAMES
    cacert = f"--cacert {ca_path}"
    ctl = shutil.which("mcproxyctl", path=os.path.dirname(sys.executable)) or "mcproxyctl"
    listener = f"{listen_host}:{p}"
    print(
        f"""
mc-proxy demo: everything lives in {root}
  config {config_path}    CA {ca_path}

Try, in another terminal:
  # L4: TLS passed through to each hostname's own backend
  curl {cacert} --resolve {alpha}:{p}:127.0.0.1 https://{alpha}:{p}/
  curl {cacert} --resolve {beta}:{p}:127.0.0.1 https://{beta}:{p}/
  # L7: TLS ends at mc-proxy, HTTP/2 or HTTP/1.1 goes on to an h2c backend
  curl --http2 {cacert} --resolve {WEB_HOSTNAME}:{p}:127.0.0.1 https://{WEB_HOSTNAME}:{p}/hi
  curl --http1.1 -A BadBot -s -o /dev/null -w '%{{http_code}}\\n' {cacert} \\
       --resolve {WEB_HOSTNAME}:{p}:127.0.0.1 https://{WEB_HOSTNAME}:{p}/   # 403: a route policy
  # gRPC through an L7 route (grpcurl, if you have it)
  grpcurl -cacert {ca_path} -authority {GRPC_HOSTNAME} -servername {GRPC_HOSTNAME} \\
       127.0.0.1:{p} grpc.health.v1.Health/Check
  # an unknown hostname is reset without a byte
  curl -k --resolve {NEW_HOSTNAME}:{p}:127.0.0.1 https://{NEW_HOSTNAME}:{p}/
  # the admin API: add a route, and it is live on every worker when the command returns
  export MCPROXY_SOCKET={socket_path}
  {ctl} status
  {ctl} routes add --listener {listener} --hostname {NEW_HOSTNAME} \\
       --backend {h2c_backend} --mode l7 --tls-cert {new_cert} --tls-key {new_key}
  curl {cacert} --resolve {NEW_HOSTNAME}:{p}:127.0.0.1 https://{NEW_HOSTNAME}:{p}/new
  {ctl} routes list
  # block an address (here, yourself): new connections are reset; then unblock it
  {ctl} firewall add --type ip --value 127.0.0.1
  curl {cacert} --resolve {alpha}:{p}:127.0.0.1 https://{alpha}:{p}/
  {ctl} firewall remove --type ip --value 127.0.0.1
  # the metrics, merged across the workers
  curl -s http://127.0.0.1:{metrics_port}/metrics | grep '^mcproxy_connections'

Ctrl-C stops the proxy and the backends.
""",
        flush=True,
    )
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    proxy = subprocess.Popen(
        [sys.executable, "-m", "mcproxy", "serve", "--config", str(config_path)], env=env
    )
    # SIGTERM to the demo stops the proxy the same way as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda signum, frame: proxy.send_signal(signal.SIGTERM))
    try:
        status = proxy.wait()
    except KeyboardInterrupt:
        proxy.send_signal(signal.SIGINT)  # usually already delivered to the whole group
        status = proxy.wait()
    grpc_server.stop(grace=None)
    return status
