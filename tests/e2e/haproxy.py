"""HAProxy as a real PROXY-protocol peer for the end-to-end tests.

:class:`HaproxyProcess` writes a config, runs ``haproxy -db`` (foreground, no
daemon) as a child process, waits until every ``bind`` is listening (read from
``/proc/net/tcp*``, so no probe connection disturbs the logs under test) and
stops it by its PID. Its stdout is a file: with ``log stdout format raw`` in the
config, each session's log line lands there when the session ends.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
from pathlib import Path

from tests.e2e.harness import wait_for

__all__ = ["HaproxyProcess", "listening_ports"]

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"

GLOBAL = """\
global
    log stdout format raw local0
    maxconn 2000

defaults
    mode tcp
    log global
    timeout connect 5s
    timeout client 30s
    timeout server 30s
"""


def listening_ports() -> set[int]:
    """Ports with a TCP socket in LISTEN state (IPv4 or IPv6)."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


class HaproxyProcess:
    """One haproxy in the foreground; ``sections`` is everything after ``defaults``."""

    def __init__(self, directory: Path, sections: str, ports: list[int]) -> None:
        self.directory = directory
        self.config_path = directory / "haproxy.cfg"
        self.log_path = directory / "haproxy.log"
        self.config_path.write_text(GLOBAL + "\n" + sections)
        self.ports = ports
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> HaproxyProcess:
        check = subprocess.run(
            [HAPROXY, "-c", "-q", "-f", str(self.config_path)], capture_output=True, check=False
        )
        assert check.returncode == 0, check.stderr.decode(errors="replace")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [HAPROXY, "-db", "-f", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.directory,
            )

        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"haproxy exited early:\n{self.log()}")
            return set(self.ports) <= listening_ports()

        wait_for(ready, 10, "haproxy to listen")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)  # hard stop: close everything now
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> HaproxyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
