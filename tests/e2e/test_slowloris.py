"""End to end: connections that never finish their PROXY header cost a worker nothing
but a descriptor and a timer, and the supervisor makes sure descriptors are plentiful."""

from __future__ import annotations

import contextlib
import re
import resource
import selectors
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from mcproxy.worker.proxy_protocol import encode_v1
from tests.certs import CA, issue
from tests.e2e.harness import ProxyProcess, TlsBackend, client_context, free_port, wait_for

SLOW = 500
HANDSHAKE_TIMEOUT = 3.0
LOW_SOFT_LIMIT = 256
"""Below what SLOW connections need in one worker: the supervisor must lift it."""


@contextlib.contextmanager
def soft_fd_limit(soft: int) -> Iterator[None]:
    """Run with another soft RLIMIT_NOFILE (inherited by the processes started meanwhile)."""
    before, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (before, hard))


def open_files_limits(pid: int) -> tuple[int, int]:
    line = next(
        line
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines()
        if line.startswith("Max open files")
    )
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


def socket_count(pids: list[int]) -> int:
    count = 0
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                count += Path.readlink(fd).name.startswith("socket:")
    return count


def start_proxy(tmp_path: Path, port: int, backend: TlsBackend) -> ProxyProcess:
    route = {"hostname": "alpha.test", "backend": backend.addr}
    config = {
        "listeners": [{"addr": f"127.0.0.1:{port}", "proxy_protocol": True, "routes": [route]}]
    }
    proxy = ProxyProcess(tmp_path, config, workers=2)
    proxy.config["proxy"]["handshake_timeout"] = f"{HANDSHAKE_TIMEOUT}s"
    with soft_fd_limit(LOW_SOFT_LIMIT):
        proxy.start()
    return proxy


def test_workers_get_the_hard_open_file_limit(tmp_path: Path, ca: CA) -> None:
    cert, key = issue(ca, "alpha.test", tmp_path)
    backend = TlsBackend("alpha.test", cert, key)
    proxy = start_proxy(tmp_path, free_port(), backend)
    try:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        assert proxy.process is not None
        for pid in [proxy.process.pid, *proxy.worker_pids()]:
            assert open_files_limits(pid) == (hard, hard)
    finally:
        proxy.stop()
        backend.close()


def test_500_silent_connections_do_not_delay_a_client_and_are_all_reset(
    tmp_path: Path, ca: CA
) -> None:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    with soft_fd_limit(max(soft, 4 * SLOW)):  # room for this test's own client sockets
        run_slowloris(tmp_path, ca)


def run_slowloris(tmp_path: Path, ca: CA) -> None:
    cert, key = issue(ca, "alpha.test", tmp_path)
    backend = TlsBackend("alpha.test", cert, key)
    port = free_port()
    proxy = start_proxy(tmp_path, port, backend)
    slow: list[tuple[socket.socket, float]] = []
    try:
        baseline = socket_count(proxy.worker_pids())
        for i in range(SLOW):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            if i % 2:
                sock.sendall(b"PROXY TCP4 192.0.2.1 ")  # half a header, then silence
            slow.append((sock, time.monotonic()))
        opened = time.monotonic()
        wait_for(
            lambda: socket_count(proxy.worker_pids()) >= baseline + SLOW,
            10,
            f"the workers to accept {SLOW} connections",
        )

        timings = [well_behaved_request(port, ca, i) for i in range(5)]
        # They all ran while the 500 were still waiting for their headers.
        assert "refused:proxy_header" not in proxy.log()
        assert max(timings) < 1.0, timings

        reset_after = wait_for_resets(slow, timeout=HANDSHAKE_TIMEOUT + 10)
        assert min(reset_after) >= HANDSHAKE_TIMEOUT - 0.1
        last_reset = max(t + after for (_, t), after in zip(slow, reset_after, strict=True))

        def refused() -> int:
            return len(re.findall(r"outcome=refused:proxy_header", proxy.log()))

        wait_for(lambda: refused() >= SLOW, 10, "an access-log line for every slow connection")
        assert refused() == SLOW
        print(
            f"\nslowloris: {SLOW} opened in {opened - slow[0][1]:.3f}s;"
            f" well-behaved requests {', '.join(f'{t * 1000:.0f}' for t in timings)} ms;"
            f" resets {min(reset_after):.3f}-{max(reset_after):.3f}s after connect,"
            f" last {last_reset - opened:.3f}s after the last connect"
        )
    finally:
        for sock, _ in slow:
            sock.close()
        proxy.stop()
        backend.close()


def well_behaved_request(port: int, ca: CA, i: int) -> float:
    """Seconds for a full request: connect, PROXY header, TLS handshake, one exchange."""
    started = time.monotonic()
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    raw.sendall(encode_v1(("198.51.100.9", 40000 + i), ("127.0.0.1", port)))
    with client_context(ca.pem).wrap_socket(raw, server_hostname="alpha.test") as tls:
        tls.sendall(b"NAME\n")
        assert tls.recv(100) == b"alpha.test\n"
    return time.monotonic() - started


def wait_for_resets(slow: list[tuple[socket.socket, float]], timeout: float) -> list[float]:
    """Seconds from each connect to its RST; fails if any gets bytes, a FIN or nothing."""
    selector = selectors.DefaultSelector()
    for number, (sock, _) in enumerate(slow):
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, number)
    after: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    while len(after) < len(slow):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"only {len(after)} of {len(slow)} connections were reset"
        for key, _ in selector.select(remaining):
            index: int = key.data
            sock, connected = slow[index]
            now = time.monotonic()
            selector.unregister(sock)
            try:
                data = sock.recv(1)
            except ConnectionResetError:
                after[index] = now - connected
                continue
            raise AssertionError(f"connection {index} got {data!r} instead of a reset")
    selector.close()
    return [after[i] for i in range(len(slow))]
