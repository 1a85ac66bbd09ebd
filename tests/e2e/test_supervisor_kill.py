"""End to end: the supervisor SIGKILLed in a burst of admin changes.

Its workers keep the connections they hold, stop accepting at once and exit
once those end; a new ``mc-proxy serve`` starts at once on the same ports and
database, and every change that was acknowledged before the kill is there.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from pathlib import Path

from mcproxy.admin.client import AdminClient, AdminError
from tests.certs import CA
from tests.e2e.harness import ProxyProcess, TlsBackend, free_port, socket_owner, wait_for


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_killed_supervisor_loses_no_acknowledged_change_and_a_new_one_binds_at_once(
    tmp_path: Path, ca: CA, backends: dict[str, TlsBackend]
) -> None:
    port = free_port()
    listener = f"127.0.0.1:{port}"
    config = {
        "listeners": [
            {
                "addr": listener,
                "routes": [{"hostname": "alpha.test", "backend": backends["alpha.test"].addr}],
            }
        ]
    }
    proxy = ProxyProcess(tmp_path, config).start()
    socket_path = proxy.config["admin"]["socket"]
    try:
        orphans = proxy.worker_pids()
        held = proxy.connect(port, "alpha.test", ca.pem)
        held.sendall(b"ECHO\n")
        held.sendall(b"before")
        assert held.recv(6) == b"before"
        holder = socket_owner(held, orphans)
        acknowledged: list[str] = []
        errors: list[str] = []
        lock = threading.Lock()

        def burst(thread: int) -> None:
            with AdminClient(socket_path, timeout=5) as client:
                for i in range(10_000):
                    name = f"burst-{thread}-{i}.test"
                    try:
                        client.add_route(listener, name, backends["beta.test"].addr)
                    except AdminError as exc:
                        errors.append(f"{exc.code.name}: {exc}")
                        return
                    with lock:
                        acknowledged.append(name)

        threads = [threading.Thread(target=burst, args=(t,), daemon=True) for t in range(4)]
        for thread in threads:
            thread.start()
        wait_for(lambda: len(acknowledged) >= 40, 60, "a burst of acknowledged changes")
        assert proxy.process is not None
        proxy.process.send_signal(signal.SIGKILL)
        proxy.process.wait(10)
        for thread in threads:
            thread.join(30)
        assert errors, "the calls in flight must fail, not hang"
        # The old workers keep the connection they hold...
        held.sendall(b"after")
        got = b""
        while len(got) < 5:
            got += held.recv(5 - len(got))
        assert got == b"after"
        assert alive(holder)  # (it drains for shutdown_timeout, 10 s, at most)
        # ...and a new serve starts at once on the same port and database.
        started = time.monotonic()
        proxy.start()
        startup = time.monotonic() - started
        new_pids = proxy.worker_pids()
        assert not set(new_pids) & set(orphans)

        # Only the new workers accept: the orphans closed their listening sockets as soon
        # as they noticed (pipe EOF, or at worst their next heartbeat, on a loaded box).
        def noticed() -> bool:
            text = proxy.log_path.read_text()
            return all(re.search(rf"pid={pid} .*shutting down", text) for pid in orphans)

        wait_for(noticed, 10, "the orphans to notice")
        for _ in range(20):
            with proxy.connect(port, "alpha.test", ca.pem) as tls:
                tls.sendall(b"ECHO\n")
                tls.sendall(b"x")
                assert tls.recv(1) == b"x"  # open until we close it: its owner can be found
                live_orphans = [pid for pid in orphans if alive(pid)]
                assert socket_owner(tls, new_pids + live_orphans) in new_pids
        # Every change acknowledged before the kill is in the database.
        with AdminClient(socket_path) as client:
            hostnames = {r.route.hostname for r in client.list_routes(listener)}
        lost = [name for name in acknowledged if name not in hostnames]
        assert lost == [], f"{len(lost)} acknowledged changes lost: {lost[:5]}"
        assert len(hostnames) >= len(acknowledged) + 1
        # The orphans exit once the connection they hold ends (or its drain time is up).
        held.close()
        wait_for(lambda: not any(alive(pid) for pid in orphans), 30, "the orphans to exit")
        assert startup < 30
    finally:
        proxy.stop()
