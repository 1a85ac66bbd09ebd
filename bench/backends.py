"""The backends both proxies forward to, so neither proxy's figures depend on who serves.

* :class:`SourceBackend`: the bulk download server, a
  :class:`~tests.e2e.harness.TlsBackend` (``SOURCE n`` streams n bytes) in its
  own process (``python -m bench.backends``), one thread per connection;
  OpenSSL encrypts with the GIL released, so four downloads use four threads.
* :class:`ResponderBackend`: an HAProxy instance that answers every request
  itself (``http-request return``): HTTP/1.1 over TLS for the L4 connection,
  latency and idle scenarios, and prior-knowledge h2c for the L7 route. It is
  C and event-driven, so it is not the bottleneck of a Python proxy; it runs
  apart from the measured proxies and its CPU is not counted.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path

from tests.e2e.harness import REPO_ROOT, TlsBackend, free_port, wait_for

__all__ = ["ResponderBackend", "SourceBackend", "port_open"]


def port_open(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class SourceBackend:
    """``python -m bench.backends --cert C --key K --port P``: serves ``SOURCE n`` over TLS."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.backends",
                f"--cert={cert}",
                f"--key={key}",
                f"--port={self.port}",
            ],
            cwd=REPO_ROOT,
        )
        try:
            wait_for(lambda: port_open(self.port), 20, "the bulk source backend")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


RESPONDER_CONFIG = """\
global
    maxconn {maxconn}
    nbthread 2
defaults
    mode http
    timeout connect 5s
    timeout client 15m
    timeout server 15m
    timeout http-request 15m
    timeout http-keep-alive 15m
frontend tls_http
    bind 127.0.0.1:{tls_port} ssl crt {pem} alpn http/1.1
    http-request return status 200 content-type text/plain string "ok"
frontend h2c
    bind 127.0.0.1:{h2c_port} proto h2
    http-request return status 200 content-type text/plain string "ok"
frontend h1c
    bind 127.0.0.1:{h1_port}
    http-request return status 200 content-type text/plain string "ok"
"""


class ResponderBackend:
    """An HAProxy answering ``200 ok`` on a TLS port (HTTP/1.1), an h2c and a cleartext
    HTTP/1.1 port (the backend of the ``_h1back`` L7 scenarios)."""

    def __init__(self, directory: Path, pem: Path, maxconn: int) -> None:
        self.tls_port, self.h2c_port, self.h1_port = free_port(), free_port(), free_port()
        config = directory / "responder.cfg"
        config.write_text(
            RESPONDER_CONFIG.format(
                tls_port=self.tls_port,
                h2c_port=self.h2c_port,
                h1_port=self.h1_port,
                pem=pem,
                maxconn=maxconn,
            )
        )
        self.process = subprocess.Popen(
            ["haproxy", "-db", "-f", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=(directory / "responder.log").open("wb"),
        )
        try:
            wait_for(
                lambda: all(map(port_open, (self.tls_port, self.h2c_port, self.h1_port))),
                20,
                "the responder backend",
            )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.backends")
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    TlsBackend("bulk", Path(args.cert), Path(args.key), port=args.port)
    signal.pause()  # serve until SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())
