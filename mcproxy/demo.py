"""``mc-proxy demo``: a working proxy on loopback that needs nothing but the package.

It makes a throwaway CA and certificates, starts small TLS web servers as
backends (in this process, on threads), writes a config that routes two
hostnames to them, runs the real ``mc-proxy serve`` as a child process and
prints commands to try. Ctrl-C stops everything.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import yaml

from mcproxy.devcerts import issue, make_ca

__all__ = ["run_demo"]

DEMO_HOSTNAMES = ("alpha.demo.test", "beta.demo.test")
DEMO_PORT = 8443


class _Hello(http.server.BaseHTTPRequestHandler):
    server_version = "mc-proxy-demo-backend"

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
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    server.demo_name = name  # type: ignore[attr-defined]
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return int(server.server_address[1])


def _pick_port(preferred: int) -> int:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_demo(directory: str | None) -> int:
    root = Path(directory or tempfile.mkdtemp(prefix="mc-proxy-demo-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    ca = make_ca("mc-proxy demo CA")
    ca_path = ca.write(root)
    routes = []
    for name in DEMO_HOSTNAMES:
        cert, key = issue(ca, name, root)
        port = _start_tls_backend(name.split(".")[0], cert, key)
        routes.append({"hostname": name, "backend": f"127.0.0.1:{port}", "mode": "l4"})
    listen_port = _pick_port(DEMO_PORT)
    config = {
        "workers": 2,
        "database": {"path": str(root / "mc-proxy.db")},
        "admin": {"socket": str(root / "admin.sock")},
        "proxy": {"shutdown_timeout": "5s"},
        "listeners": [{"addr": f"127.0.0.1:{listen_port}", "routes": routes}],
    }
    config_path = root / "mc-proxy.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    with contextlib.suppress(FileNotFoundError):
        (root / "mc-proxy.db").unlink()  # the demo always starts from its YAML

    host = DEMO_HOSTNAMES[0]
    print(
        f"""
mc-proxy demo: everything lives in {root}
  config   {config_path}
  CA       {ca_path}

Try, in another terminal:
  curl --cacert {ca_path} --resolve {host}:{listen_port}:127.0.0.1 https://{host}:{listen_port}/
  curl --cacert {ca_path} --resolve {DEMO_HOSTNAMES[1]}:{listen_port}:127.0.0.1 \\
       https://{DEMO_HOSTNAMES[1]}:{listen_port}/
  openssl s_client -connect 127.0.0.1:{listen_port} -servername {host} -CAfile {ca_path} </dev/null
  # an unknown hostname is reset without a byte:
  curl -k --resolve unknown.test:{listen_port}:127.0.0.1 https://unknown.test:{listen_port}/

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
    try:
        return proxy.wait()
    except KeyboardInterrupt:
        proxy.send_signal(signal.SIGINT)  # usually already delivered to the whole group
        return proxy.wait()
