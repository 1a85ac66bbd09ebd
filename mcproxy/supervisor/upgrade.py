"""Upgrade in place (SIGUSR2): what crosses the ``exec``, and the caretaker.

The supervisor re-executes ``mc-proxy serve`` with its own arguments, so the
PID stays, and with it the parenthood of the running workers. What the new
program needs from the old one crosses the ``exec`` as inherited descriptors
(FD_CLOEXEC cleared) listed in one environment variable, :data:`ENV`, as JSON
(:class:`Inherited`): every slot's listening socket per listener (so no accept
queue is dropped), the shared-memory limits file (so the old workers'
connections keep counting), and one pipe per old worker (so the old workers,
whose parent is still this PID and whose pipe stays open, keep serving until
the new supervisor's workers are up and it tells them to drain).

If the new program cannot boot (its database, its admin socket, its workers),
:func:`caretake` keeps the old workers serving instead of exiting: it reaps
them, drains their pipes, answers SIGTERM by draining them, and SIGUSR2 by
trying the exec again (fix the config or the installation first). See
ARCHITECTURE.md, "Upgrade in place".
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import selectors
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, field

__all__ = [
    "ENV",
    "Inherited",
    "InheritedWorker",
    "caretake",
    "close_originals",
    "exec_serve",
    "take_from_environ",
]

ENV = "MCPROXY_UPGRADE"

log = logging.getLogger("mcproxy.supervisor")


@dataclass
class InheritedWorker:
    """A worker of the previous program: it keeps serving until told to drain."""

    pid: int
    slot: int
    cell: int
    """Its column in the shared connection counters (zeroed once it is reaped)."""
    fd: int
    """The supervisor's end of its pipe."""


@dataclass
class Inherited:
    sockets: dict[str, dict[int, int]] = field(default_factory=dict)
    """Listener address -> slot -> fd of that slot's SO_REUSEPORT socket."""
    shm_fd: int | None = None
    workers: list[InheritedWorker] = field(default_factory=list)
    started_at: float = 0.0
    generation: int = 0

    def fds(self) -> list[int]:
        fds = [fd for slots in self.sockets.values() for fd in slots.values()]
        fds += [w.fd for w in self.workers]
        if self.shm_fd is not None:
            fds.append(self.shm_fd)
        return fds

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Inherited:
        data = json.loads(text)
        return cls(
            sockets={
                addr: {int(slot): int(fd) for slot, fd in slots.items()}
                for addr, slots in data["sockets"].items()
            },
            shm_fd=data["shm_fd"],
            workers=[InheritedWorker(**w) for w in data["workers"]],
            started_at=float(data["started_at"]),
            generation=int(data["generation"]),
        )


def take_from_environ() -> Inherited | None:
    """What the previous program left us, removed from the environment (new workers
    must not see it); None when this is a plain start. Descriptors that are not open
    (a bogus variable) are dropped, with a warning."""
    text = os.environ.pop(ENV, None)
    if not text:
        return None
    try:
        inherited = Inherited.from_json(text)
    except (ValueError, KeyError, TypeError) as exc:
        log.error("ignoring a malformed %s: %s", ENV, exc)
        return None
    for fd in inherited.fds():
        try:
            os.fstat(fd)
        except OSError:
            log.warning("upgrade: inherited fd %d is not open", fd)
            continue
        os.set_inheritable(fd, False)  # only what we pass on explicitly goes to children
    return inherited


def close_originals(inherited: Inherited) -> None:
    """The new supervisor booted: it holds copies of everything; drop the originals."""
    for fd in inherited.fds():
        with contextlib.suppress(OSError):
            os.close(fd)


def exec_serve(inherited: Inherited) -> None:
    """Replace this program with ``mc-proxy serve`` and the same arguments, handing it
    ``inherited``. Returns only if the exec itself failed (raises OSError)."""
    for fd in inherited.fds():
        os.set_inheritable(fd, True)
    env = {**os.environ, ENV: inherited.to_json()}
    argv = list(sys.orig_argv)
    log.info("upgrade: re-executing %s", " ".join(argv))
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        os.execve(sys.executable, argv, env)
    except OSError:
        for fd in inherited.fds():
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)
        raise


def caretake(inherited: Inherited, config_path: str, why: str) -> int:
    """Keep the previous workers serving after a failed upgrade, until SIGTERM (drain
    them, exit 0), a successful SIGUSR2 (exec again), or their end (exit 1)."""
    log.error(
        "upgrade failed (%s): the previous %d workers keep serving; fix it and send"
        " SIGUSR2 again, or SIGTERM to stop",
        why,
        len(inherited.workers),
    )
    signals: collections.deque[int] = collections.deque()
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGUSR2, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: signals.append(signum))
    selector = selectors.DefaultSelector()
    selector.register(wake_r, selectors.EVENT_READ)
    pipes = {w.fd: socket.socket(fileno=w.fd) for w in inherited.workers}
    for sock in pipes.values():
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    alive = {w.pid for w in inherited.workers}
    stopping_at: float | None = None
    while alive:
        for key, _ in selector.select(1.0):
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            sock = ready
            try:
                data = sock.recv(1 << 16)  # wake-ups, or heartbeats nobody needs now
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data and sock is not wake_r:
                selector.unregister(sock)
        while signals:
            signum = signals.popleft()
            if signum in (signal.SIGTERM, signal.SIGINT) and stopping_at is None:
                log.info("caretaker: stopping; the previous workers drain")
                stopping_at = time.monotonic()
                for pid in alive:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
            elif signum == signal.SIGUSR2 and stopping_at is None and _config_ok(config_path):
                try:
                    exec_serve(inherited)  # the fds go on to the next program
                except OSError as exc:
                    log.error("upgrade: exec failed: %s", exc)
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                alive.clear()
                break
            if pid == 0:
                break
            alive.discard(pid)
        if stopping_at is not None and time.monotonic() - stopping_at > 60.0:
            for pid in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    return 0 if stopping_at is not None else 1


def _config_ok(path: str) -> bool:
    from mcproxy.config import ConfigError, load_config

    try:
        load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("SIGUSR2 ignored: %s", problem)
        return False
    except OSError as exc:
        log.error("SIGUSR2 ignored: %s: %s", path, exc.strerror or exc)
        return False
    return True
