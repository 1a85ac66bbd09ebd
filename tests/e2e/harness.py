"""Real processes and real peers for the end-to-end tests.

:class:`ProxyProcess` runs ``python -m mcproxy serve`` with a temporary
config and database on loopback ports; :class:`TlsBackend` is a threaded TLS
server with a tiny line protocol that lets a test check which backend it
reached and that bytes arrive intact both ways. Every wait is on a condition
with a deadline.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]

__all__ = [
    "ProxyProcess",
    "TlsBackend",
    "client_context",
    "free_port",
    "is_reset",
    "mcproxyctl",
    "pattern",
    "socket_owner",
    "wait_for",
]


def wait_for(
    condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.02
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pattern(size: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating-looking bytes (so a misplaced chunk changes the hash)."""
    block = hashlib.sha256(seed.to_bytes(8, "big")).digest() * 2048  # 64 KiB
    repeats, rest = divmod(size, len(block))
    return block * repeats + block[:rest]


def client_context(ca_pem: bytes, alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def is_reset(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True when the peer answers with a RST and no bytes; False for data or a clean close."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(1)
    except ConnectionResetError:
        return True
    del data  # bytes or a clean EOF: not a reset
    return False


def mcproxyctl(
    socket_path: str | Path, *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``mcproxyctl`` as a separate process, exactly as an operator would run it."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MCPROXY_SOCKET": str(socket_path)}
    return subprocess.run(
        [sys.executable, "-m", "mcproxy.admin.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
        check=False,
    )


def socket_owner(client: socket.socket, pids: list[int]) -> int:
    """The worker pid holding the proxy side of ``client``'s TCP connection."""
    local_port = client.getsockname()[1]
    proxy_port = client.getpeername()[1]
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if (
            int(local.split(":")[1], 16) == proxy_port
            and int(remote.split(":")[1], 16) == local_port
        ):
            inode = fields[9]
    assert inode is not None
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    raise AssertionError("no worker holds the connection")


class TlsBackend:
    """A TLS server with a line protocol, one thread per connection.

    After the handshake the client sends one command line:
    ``NAME`` -> the backend's name; ``SINK n`` -> reads n bytes, answers their
    sha256; ``SOURCE n`` -> sends ``pattern(n)`` and closes; ``ECHO`` -> echoes
    until EOF, then closes; ``HOLD`` -> keeps the connection open until
    the client closes.
    """

    def __init__(
        self, name: str, cert: Path, key: Path, proxy_protocol: bool = False, port: int = 0
    ) -> None:
        self.name = name
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(cert, key)
        self.sock = socket.create_server(("127.0.0.1", port))
        self.port = int(self.sock.getsockname()[1])
        self.connections = 0
        self.proxy_headers: list[bytes] = []
        self._expect_proxy_header = proxy_protocol
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self._stopping = True
        self.sock.close()

    def _serve(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, raw: socket.socket) -> None:
        with contextlib.suppress(OSError), raw:
            raw.settimeout(60)
            if self._expect_proxy_header:
                self.proxy_headers.append(_read_proxy_v2(raw))
            with self.ctx.wrap_socket(raw, server_side=True) as tls:
                command = _read_line(tls).split()
                if not command:
                    return
                if command[0] == "NAME":
                    tls.sendall(self.name.encode() + b"\n")
                elif command[0] == "SINK":
                    remaining, digest = int(command[1]), hashlib.sha256()
                    while remaining:
                        chunk = tls.recv(min(remaining, 1 << 20))
                        if not chunk:
                            break
                        digest.update(chunk)
                        remaining -= len(chunk)
                    tls.sendall(digest.hexdigest().encode() + b"\n")
                elif command[0] == "SOURCE":
                    # pattern() repeats every 64 KiB: stream it from one 1 MiB block, so
                    # a large download (the benchmark's 256 MiB) costs no memory.
                    remaining, block = int(command[1]), memoryview(pattern(1 << 20))
                    while remaining:
                        tls.sendall(block[: min(remaining, len(block))])
                        remaining -= min(remaining, len(block))
                    tls.unwrap()
                elif command[0] == "ECHO":
                    while chunk := tls.recv(65536):
                        tls.sendall(chunk)
                    # The peer may have half-closed TCP without close_notify: answer with FIN.
                elif command[0] == "HOLD":
                    while tls.recv(65536):
                        pass


def _read_line(tls: ssl.SSLSocket) -> str:
    line = b""
    while not line.endswith(b"\n") and len(line) < 256:
        byte = tls.recv(1)
        if not byte:
            break
        line += byte
    return line.decode(errors="replace")


def _read_proxy_v2(sock: socket.socket) -> bytes:
    header = b""
    while len(header) < 16:
        header += sock.recv(16 - len(header))
    length = int.from_bytes(header[14:16], "big")
    while len(header) < 16 + length:
        header += sock.recv(16 + length - len(header))
    return header


class ProxyProcess:
    """``mc-proxy serve`` as a real process with its own temp config and database."""

    def __init__(
        self,
        directory: Path,
        config: dict[str, Any],
        workers: int = 2,
        env: dict[str, str] | None = None,
    ) -> None:
        self.directory = directory
        self.env = env or {}
        self.config = {
            "workers": workers,
            "database": {"path": str(directory / "mc-proxy.db")},
            "admin": {"socket": str(directory / "admin.sock")},
            "proxy": {
                "connect_timeout": "2s",
                "handshake_timeout": "3s",
                "idle_timeout": "60s",
                "shutdown_timeout": "10s",
            },
            **config,
        }
        self.workers = workers
        self.config_path = directory / "mc-proxy.yaml"
        self.log_path = directory / "mc-proxy.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def write_config(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.config))

    def start(self, wait: bool = True) -> ProxyProcess:
        self.write_config()
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1", **self.env}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mcproxy", "serve", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.directory,
            )
        if wait:
            self.wait_serving(self.workers)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[self._log_offset :]

    def wait_serving(self, count: int, timeout: float = 20.0) -> None:
        def serving() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"mc-proxy exited early:\n{self.log()}")
            return len(re.findall(r"worker \d+ serving generation", self.log())) >= count

        wait_for(serving, timeout, f"{count} workers serving")

    def worker_pids(self) -> list[int]:
        """Live worker pids, from /proc (children of the supervisor)."""
        assert self.process is not None
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in children.read_text().split()]

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                for pid in self.worker_pids():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def ctl_json(self, *args: str) -> Any:
        """``mcproxyctl --json`` against this proxy's admin socket; fails the test on error."""
        done = mcproxyctl(self.config["admin"]["socket"], "--json", *args, cwd=self.directory)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def connect(
        self, port: int, hostname: str | None, ca_pem: bytes, timeout: float = 10.0
    ) -> ssl.SSLSocket:
        """A TLS client connection through the proxy, verified against ``ca_pem``."""
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        ctx = client_context(ca_pem)
        if hostname is None:
            ctx.check_hostname = False
        return ctx.wrap_socket(raw, server_hostname=hostname)

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def l7_route(directory: Path, ca: Any, hostname: str, backend: str, **extra: Any) -> dict[str, Any]:
    """A ``mode: l7`` route to ``backend`` with a certificate for ``hostname`` from ``ca``."""
    from tests.certs import issue

    cert, key = issue(ca, hostname, directory)
    return {
        "hostname": hostname,
        "backend": backend,
        "mode": "l7",
        "tls_cert": str(cert),
        "tls_key": str(key),
        **extra,
    }


@contextlib.contextmanager
def tls_backends(directory: Path, ca: Any, names: list[str]) -> Iterator[dict[str, TlsBackend]]:
    from tests.certs import issue

    backends = {}
    for name in names:
        cert, key = issue(ca, name, directory)
        backends[name] = TlsBackend(name, cert, key)
    try:
        yield backends
    finally:
        for backend in backends.values():
            backend.close()
