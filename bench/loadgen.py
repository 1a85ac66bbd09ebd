"""TLS clients for the L4 scenarios: ``python -m bench.loadgen MODE ...`` prints one JSON object.

Modes:

* ``bulk``: parallel downloads of ``--size`` bytes each (``SOURCE n`` to a
  :class:`~tests.e2e.harness.TlsBackend`), one thread per download; OpenSSL
  releases the GIL while it decrypts, so threads run in parallel.
* ``connrate``: ``--concurrency`` processes, each in a loop for ``--seconds``:
  connect, full TLS handshake (no session reuse), one HTTP/1.1 request with
  ``Connection: close``, read to EOF, close. Reports each connection's time.
* ``latency``: one connection at a time, alternating between the targets
  (direct to the backend, through each proxy), so drift hits them alike.
* ``idle``: opens ``--count`` TLS connections (optionally ALPN h2 with the h2
  preface sent), prints ``{"open": n}``, holds them until stdin is closed.

Certificates are not verified: every handshake is still a full one, and the
load generator's own work is not what is measured.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import socket
import ssl
import sys
import time

from bench.stats import percentile

__all__ = ["main"]

_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")


def _context(alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def _request(sni: str) -> bytes:
    return f"GET / HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode()


# --- bulk ------------------------------------------------------------------------


def _download(port: int, sni: str, size: int) -> int:
    ctx = _context()
    buffer = bytearray(1 << 20)
    received = 0
    with (
        socket.create_connection(("127.0.0.1", port), timeout=120) as raw,
        ctx.wrap_socket(raw, server_hostname=sni) as tls,
    ):
        tls.sendall(f"SOURCE {size}\n".encode())
        while received < size:
            n = tls.recv_into(buffer)
            if not n:
                break
            received += n
    return received


def bulk(args: argparse.Namespace) -> dict[str, object]:
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        sizes = list(
            pool.map(lambda _: _download(args.port, args.sni, args.size), range(args.parallel))
        )
    seconds = time.perf_counter() - started
    return {"bytes": sum(sizes), "seconds": seconds, "complete": all(s == args.size for s in sizes)}


# --- one fresh connection ----------------------------------------------------------


def _fresh_connection(ctx: ssl.SSLContext, port: int, sni: str, request: bytes) -> float:
    """Connect, handshake, ask, read to EOF; returns the seconds it took."""
    started = time.perf_counter()
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=sni) as tls,
    ):
        tls.sendall(request)
        answer = b""
        try:
            while chunk := tls.recv(4096):
                answer += chunk
        except ssl.SSLEOFError:
            pass  # EOF without close_notify: the response is what counts
    if not answer.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(f"unexpected answer {answer[:40]!r}")
    return time.perf_counter() - started


def _connrate_process(port: int, sni: str, seconds: float) -> tuple[list[float], int]:
    ctx, request = _context(), _request(sni)
    times: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        try:
            times.append(_fresh_connection(ctx, port, sni, request))
        except (OSError, ConnectionError):
            errors += 1
    return times, errors


def connrate(args: argparse.Namespace) -> dict[str, object]:
    started = time.perf_counter()
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(args.concurrency, mp_context=context) as pool:
        futures = [
            pool.submit(_connrate_process, args.port, args.sni, args.seconds)
            for _ in range(args.concurrency)
        ]
        results = [f.result() for f in futures]
    seconds = time.perf_counter() - started
    times = [t for result in results for t in result[0]]
    return {
        "connections": len(times),
        "errors": sum(result[1] for result in results),
        "seconds": seconds,
        "p50_ms": percentile(times, 0.5) * 1000,
        "p99_ms": percentile(times, 0.99) * 1000,
    }


def latency(args: argparse.Namespace) -> dict[str, object]:
    ctx, request = _context(), _request(args.sni)
    targets: list[tuple[str, int]] = []
    for spec in args.target:
        name, _, port = spec.partition("=")
        targets.append((name, int(port)))
    times: dict[str, list[float]] = {name: [] for name, _ in targets}
    for _, port in targets:  # warm-up: first connections pay for lazy set-up
        for _ in range(3):
            _fresh_connection(ctx, port, args.sni, request)
    for i in range(args.count):
        shift = i % len(targets)
        for name, port in targets[shift:] + targets[:shift]:
            times[name].append(_fresh_connection(ctx, port, args.sni, request))
    return {
        name: {
            "p50_ms": percentile(values, 0.5) * 1000,
            "p99_ms": percentile(values, 0.99) * 1000,
            "n": len(values),
        }
        for name, values in times.items()
    }


# --- idle ----------------------------------------------------------------------------


def _open_idle(ctx: ssl.SSLContext, port: int, sni: str, h2: bool) -> socket.socket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        tls = ctx.wrap_socket(raw, server_hostname=sni)
    except BaseException:
        raw.close()
        raise
    if h2:
        if tls.selected_alpn_protocol() != "h2":
            tls.close()
            raise ConnectionError("h2 was not negotiated")
        tls.sendall(_H2_PREFACE)
    # Keep the TCP connection, drop the TLS state: only the proxy's memory is measured.
    return socket.socket(fileno=tls.detach())


def idle(args: argparse.Namespace) -> dict[str, object]:
    ctx = _context(["h2"] if args.h2 else None)

    def opener(_: int) -> socket.socket:
        return _open_idle(ctx, args.port, args.sni, args.h2)

    held: list[socket.socket] = []
    failed = 0
    with concurrent.futures.ThreadPoolExecutor(args.threads) as pool:
        for future in [pool.submit(opener, i) for i in range(args.count)]:
            try:
                held.append(future.result())
            except (OSError, ConnectionError):
                failed += 1
    print(json.dumps({"open": len(held), "failed": failed}), flush=True)
    sys.stdin.read()  # hold until the benchmark closes our stdin
    for sock in held:
        sock.close()
    return {"closed": len(held)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.loadgen")
    modes = parser.add_subparsers(dest="mode", required=True)
    p = modes.add_parser("bulk")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--sni", required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--parallel", type=int, default=4)
    p.set_defaults(run=bulk)
    p = modes.add_parser("connrate")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--sni", required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--concurrency", type=int, default=4)
    p.set_defaults(run=connrate)
    p = modes.add_parser("latency")
    p.add_argument("--target", action="append", required=True, metavar="NAME=PORT")
    p.add_argument("--sni", required=True)
    p.add_argument("--count", type=int, required=True)
    p.set_defaults(run=latency)
    p = modes.add_parser("idle")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--sni", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--h2", action="store_true")
    p.add_argument("--threads", type=int, default=16)
    p.set_defaults(run=idle)
    args = parser.parse_args(argv)
    result = args.run(args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
