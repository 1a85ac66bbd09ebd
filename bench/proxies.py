"""The two proxies under test, configured for the same work on the same backends.

Each has an L4 listener (SNI passthrough: ``bulk.test`` to the source backend,
``conn.test`` to the responder's TLS port) and an L7 listener (TLS terminated
with the ``localhost`` certificate, HTTP/2 and HTTP/1.1 to the responder's h2c
port, with ``X-Forwarded-For``, ``X-Real-IP`` and ``X-Forwarded-Proto`` set
as mc-proxy sets them). Both write one access-log line per connection (L4) or
request (L7) to a file, and both run with the same number of workers:
mc-proxy worker processes, HAProxy threads (``nbthread``; HAProxy 2.6 has no
multi-process mode).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bench.backends import port_open
from bench.procs import ProcessTree
from tests.e2e.harness import ProxyProcess, free_port, wait_for

__all__ = ["HAProxy", "McProxy", "Proxy", "Upstreams"]


@dataclass(frozen=True)
class Upstreams:
    """Where the proxies forward to, and the certificate of the L7 route."""

    source_port: int
    tls_port: int
    h2c_port: int
    l7_cert: Path
    l7_key: Path
    l7_pem: Path
    """Certificate and key in one file, as HAProxy's ``crt`` wants it."""
    h1_port: int = 0
    """The responder's cleartext HTTP/1.1 port: the backend of the second L7 listener."""


class Proxy(Protocol):
    name: str
    l4_port: int
    l7_port: int
    l7h1_port: int
    """The L7 listener whose backend speaks HTTP/1.1 (``backend_protocol: h1``)."""

    @property
    def tree(self) -> ProcessTree: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class McProxy:
    name = "mc-proxy"

    def __init__(self, directory: Path, upstreams: Upstreams, workers: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.l4_port, self.l7_port, self.l7h1_port = free_port(), free_port(), free_port()
        l7_route = {
            "hostname": "localhost",
            "mode": "l7",
            "tls_cert": str(upstreams.l7_cert),
            "tls_key": str(upstreams.l7_key),
        }
        config = {
            "proxy": {
                "connect_timeout": "5s",
                "handshake_timeout": "10s",
                "idle_timeout": "15m",
                "shutdown_timeout": "2s",
            },
            "listeners": [
                {
                    "addr": f"127.0.0.1:{self.l4_port}",
                    "routes": [
                        {"hostname": "bulk.test", "backend": f"127.0.0.1:{upstreams.source_port}"},
                        {"hostname": "conn.test", "backend": f"127.0.0.1:{upstreams.tls_port}"},
                    ],
                },
                {
                    "addr": f"127.0.0.1:{self.l7_port}",
                    "routes": [{**l7_route, "backend": f"127.0.0.1:{upstreams.h2c_port}"}],
                },
                {
                    "addr": f"127.0.0.1:{self.l7h1_port}",
                    "routes": [
                        {
                            **l7_route,
                            "backend": f"127.0.0.1:{upstreams.h1_port}",
                            "backend_protocol": "h1",
                        }
                    ],
                },
            ],
        }
        self.process = ProxyProcess(directory, config, workers=workers)

    @property
    def tree(self) -> ProcessTree:
        assert self.process.process is not None
        return ProcessTree(self.process.process.pid)

    def start(self) -> None:
        self.process.start()

    def stop(self) -> None:
        self.process.stop()


HAPROXY_CONFIG = """\
global
    nbthread {threads}
    maxconn {maxconn}
    log stdout format raw local0
defaults
    log global
    timeout connect 5s
    timeout client 15m
    timeout server 15m
    timeout http-request 15m
    timeout http-keep-alive 15m
frontend l4
    mode tcp
    option tcplog
    bind 127.0.0.1:{l4_port}
    tcp-request inspect-delay 10s
    tcp-request content accept if {{ req.ssl_hello_type 1 }}
    use_backend bulk if {{ req.ssl_sni -i bulk.test }}
    use_backend conn if {{ req.ssl_sni -i conn.test }}
backend bulk
    mode tcp
    server source 127.0.0.1:{source_port}
backend conn
    mode tcp
    server responder 127.0.0.1:{tls_port}
frontend l7
    mode http
    option httplog
    bind 127.0.0.1:{l7_port} ssl crt {l7_pem} alpn h2,http/1.1
    option forwardfor
    http-request set-header X-Real-IP %[src]
    http-request set-header X-Forwarded-Proto https
    default_backend h2c
backend h2c
    mode http
    server responder 127.0.0.1:{h2c_port} proto h2
frontend l7h1
    mode http
    option httplog
    bind 127.0.0.1:{l7h1_port} ssl crt {l7_pem} alpn h2,http/1.1
    option forwardfor
    http-request set-header X-Real-IP %[src]
    http-request set-header X-Forwarded-Proto https
    default_backend h1
backend h1
    mode http
    server responder 127.0.0.1:{h1_port}
"""


class HAProxy:
    name = "haproxy"

    def __init__(
        self, directory: Path, upstreams: Upstreams, workers: int, maxconn: int = 20_000
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.l4_port, self.l7_port, self.l7h1_port = free_port(), free_port(), free_port()
        self.config = directory / "haproxy.cfg"
        self.config.write_text(
            HAPROXY_CONFIG.format(
                threads=workers,
                maxconn=maxconn,
                l4_port=self.l4_port,
                l7_port=self.l7_port,
                l7h1_port=self.l7h1_port,
                h1_port=upstreams.h1_port,
                source_port=upstreams.source_port,
                tls_port=upstreams.tls_port,
                h2c_port=upstreams.h2c_port,
                l7_pem=upstreams.l7_pem,
            )
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def tree(self) -> ProcessTree:
        assert self.process is not None
        return ProcessTree(self.process.pid)

    def start(self) -> None:
        with (self.directory / "haproxy.log").open("ab") as log:
            self.process = subprocess.Popen(
                ["haproxy", "-db", "-f", str(self.config)], stdout=log, stderr=log
            )
        wait_for(
            lambda: all(map(port_open, (self.l4_port, self.l7_port, self.l7h1_port))),
            20,
            "haproxy listening",
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
