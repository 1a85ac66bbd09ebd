"""The worker process: an asyncio loop that serves its slot's listening sockets.

Started by the supervisor as ``python -m mcproxy.worker --pipe-fd N`` from a
clean interpreter (fork+exec, invariant 5), with the pipe and its slot's
SO_REUSEPORT sockets inherited. Everything else arrives on the pipe: a
:class:`~mcproxy.pipe.Boot`, then a :class:`~mcproxy.pipe.Snapshot`, then
:class:`~mcproxy.pipe.Delta` s. It never opens the database (invariant 3).

Lifecycle: boot -> first snapshot -> start accepting -> (deltas, heartbeats)
-> SIGTERM or supervisor gone -> stop accepting -> drain -> exit 0. A failure
before the first snapshot exits with :data:`BOOT_ERROR` so that the supervisor
halts instead of respawning in a loop.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import logging
import os
import signal
import socket
import sys

from mcproxy import limits, pipe
from mcproxy.model import ProxyState, StateError, apply_change
from mcproxy.pipe import BOOT_ERROR
from mcproxy.worker.accesslog import WORKER_FORMAT
from mcproxy.worker.admission import SharedAdmission
from mcproxy.worker.balance import SharedCounts
from mcproxy.worker.geoip import GeoIP
from mcproxy.worker.l7 import L7Proxy
from mcproxy.worker.listener import Admission, ConnectionServer

__all__ = ["BOOT_ERROR", "HEARTBEAT_INTERVAL", "main"]

HEARTBEAT_INTERVAL = 1.0

log = logging.getLogger("mcproxy.worker")


class Worker:
    def __init__(self, pipe_sock: socket.socket) -> None:
        self.pipe_sock = pipe_sock
        self.decoder = pipe.FrameDecoder()
        self.outbox = pipe.Outbox()
        self._writing = False
        self.fds: collections.deque[int] = collections.deque()
        """Descriptors received with frames (SCM_RIGHTS), in order, until a message takes them."""
        self.state = ProxyState()
        self.server: ConnectionServer | None = None
        self.boot: pipe.Boot | None = None
        self.geoip: GeoIP | None = None
        self.stopping = asyncio.Event()
        self.booted = False
        self.failure: Exception | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        self.pipe_sock.setblocking(False)
        loop.add_reader(self.pipe_sock.fileno(), self._on_pipe_readable)
        heartbeat = loop.create_task(self._heartbeat())
        await self.stopping.wait()
        # Draining is under way; the supervisor escalates with SIGKILL if it must.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        heartbeat.cancel()
        if self.failure is not None:
            raise self.failure
        if self.server is not None:
            self.server.stop_listening()
            timeout = self.server.timeouts.shutdown_timeout
            log.info("draining %d connections (up to %ss)", len(self.server.connections), timeout)
            await self.server.drain(timeout)
        return 0

    def _on_pipe_readable(self) -> None:
        # Read until the socket is empty: uvloop reports readiness once for data
        # followed by a reset, so a reset must be found in the same call.
        while True:
            try:
                data, fds = pipe.recv_with_fds(self.pipe_sock, 1 << 20)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            self.fds.extend(fds)
            if not data:
                self._supervisor_gone("supervisor pipe closed")
                return
            try:
                for message in self.decoder.feed(data):
                    self._handle(message)
            except Exception as exc:  # a pipe we cannot follow leaves us with unknown state
                self.failure = exc
                self.stopping.set()
                return

    def _supervisor_gone(self, why: str) -> None:
        """Nobody will route for us any more: drain and exit rather than serve as an orphan."""
        if not self.stopping.is_set():
            asyncio.get_running_loop().remove_reader(self.pipe_sock.fileno())
            log.warning("%s; shutting down", why)
            self.stopping.set()

    def _handle(self, message: pipe.Message) -> None:
        match message:
            case pipe.Boot():
                self._boot(message)
            case pipe.Snapshot(state=state):
                self._set_state(state)
                if not self.booted:
                    self._start_serving()
            case pipe.Health(verdicts=verdicts, full=full):
                if self.server is not None:
                    self.server.balancer.set_verdicts(verdicts, full)
                return  # not a change: nothing to acknowledge
            case pipe.Delta(change=change, generation=generation):
                if generation != self.state.generation + 1:
                    raise RuntimeError(
                        f"delta for generation {generation} on top of {self.state.generation}"
                    )
                sockets = self._take_sockets(message.listen_addrs)
                try:
                    self._set_state(apply_change(self.state, change))
                except StateError as exc:  # the supervisor checked it: a bug if we get here
                    raise RuntimeError(f"delta does not apply: {exc}") from exc
                self._sync_listeners(sockets)
            case _:
                raise RuntimeError(f"unexpected message {message!r}")
        if isinstance(message, pipe.Snapshot | pipe.Delta):
            self._send(pipe.Ack(self.state.generation))

    def _boot(self, boot: pipe.Boot) -> None:
        from setproctitle import setproctitle

        self.boot = boot
        setproctitle(f"mc-proxy: worker {boot.slot}")
        admission: Admission | None = None
        shared: limits.SharedLimits | None = None
        if boot.shm_fd is not None:
            shared = limits.attach(boot.shm_fd).limits
            column = boot.cell + 1 if boot.cell is not None else boot.slot
            admission = SharedAdmission(shared, column, boot.rate_limit, boot.rate_window)
        if boot.geoip_db is not None:
            self.geoip = GeoIP(boot.geoip_db)
        country_of = self.geoip.country if self.geoip is not None else None
        self.server = ConnectionServer(
            asyncio.get_running_loop(), boot.timeouts, admission, country_of
        )
        self.server.balancer.offset(boot.slot)
        if shared is not None:
            cell = boot.cell if boot.cell is not None else boot.slot - 1
            self.server.balancer.counts = SharedCounts(shared, cell)
        L7Proxy(self.server).install()
        if boot.metrics_dir is not None:
            from mcproxy.worker.metrics import WorkerMetrics, require_multiprocess_mode

            require_multiprocess_mode(boot.metrics_dir)
            WorkerMetrics().install(self.server)

    def _start_serving(self) -> None:
        assert self.boot is not None and self.server is not None
        sockets = {addr: socket.socket(fileno=fd) for addr, fd in self.boot.listen_fds.items()}
        self.server.start_listening(sockets)
        self.booted = True
        _freeze_boot_objects()
        log.info("worker %d serving generation %d", self.boot.slot, self.state.generation)

    def _take_sockets(self, addrs: tuple[str, ...]) -> dict[str, socket.socket]:
        """The listening sockets that came with a frame (SCM_RIGHTS), in its order."""
        if len(self.fds) < len(addrs):
            raise RuntimeError(f"a delta adds {len(addrs)} listeners but came with fewer fds")
        return {addr: socket.socket(fileno=self.fds.popleft()) for addr in addrs}

    def _sync_listeners(self, added: dict[str, socket.socket]) -> None:
        """Accept on listeners just added; stop accepting on those removed (their open
        connections carry on). Done before the Ack, so the RPC returns only once every
        worker accepts, or no longer accepts, on them."""
        server = self.server
        if server is None:
            for sock in added.values():
                sock.close()
            return
        for addr in [a for a in server.listening() if a not in self.state.listeners]:
            server.close_listener(addr)
            log.info("stopped listening on %s", addr)
        if added:
            server.start_listening(added)
            log.info("listening on %s", ", ".join(added))

    def _set_state(self, state: ProxyState) -> None:
        self.state = state
        if self.server is not None:
            self.server.update_state(state)

    def _send(self, message: pipe.Message) -> None:
        """Queue a frame and write what the pipe takes; the rest goes when it drains.

        Never blocks the loop, and a partial write is continued, never resent."""
        self.outbox.push(pipe.encode(message))
        self._flush()

    def _flush(self) -> None:
        try:
            done = self.outbox.flush(self.pipe_sock)
        except OSError:
            done = True
            self._supervisor_gone("supervisor pipe broken")
        loop = asyncio.get_running_loop()
        if not done and not self._writing:
            loop.add_writer(self.pipe_sock.fileno(), self._flush)
            self._writing = True
        elif done and self._writing:
            loop.remove_writer(self.pipe_sock.fileno())
            self._writing = False

    async def _heartbeat(self) -> None:
        parent = os.getppid()
        while True:
            if os.getppid() != parent:  # reparented: the supervisor died without closing the pipe
                self._supervisor_gone("supervisor process gone")
                return
            server = self.server
            active = len(server.connections) if server else 0
            by_listener = dict(server.active_by_listener) if server else {}
            self._send(pipe.Heartbeat(self.state.generation, active, by_listener))
            if self.geoip is not None:
                self.geoip.refresh()  # a replaced database is picked up within a second
            await asyncio.sleep(HEARTBEAT_INTERVAL)


GC_GEN0_THRESHOLD = 50_000
"""Net container allocations between young-generation collections (CPython's default is
700). Requests leave no cycles behind, but connections and their state do accumulate; a
collection every few requests was 3-7% of a worker's CPU (ARCHITECTURE.md, "L7 routes:
speed")."""


def _tune_gc() -> None:
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, older, oldest)


def _freeze_boot_objects() -> None:
    """Move what booting allocated (modules, state, listeners) out of the collector's sight:
    it lives as long as the worker, and full collections no longer walk it."""
    gc.collect()
    gc.freeze()


def _install_event_loop_policy() -> None:
    try:
        import uvloop
    except ImportError:
        return
    if os.environ.get("MCPROXY_NO_UVLOOP") != "1":
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mcproxy.worker")
    parser.add_argument("--pipe-fd", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format=WORKER_FORMAT,
        stream=sys.stderr,
    )
    # The supervisor forwards SIGINT as SIGTERM; a terminal's ^C must not hit us twice.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _install_event_loop_policy()
    _tune_gc()
    # The compiled HPACK decoder panics (caught: COMPRESSION_ERROR) on some malformed blocks
    # and Rust prints each panic to stderr; a backtrace there would let any client write
    # dozens of lines into our log per connection. Two lines it is.
    os.environ["RUST_BACKTRACE"] = "0"
    worker = Worker(socket.socket(fileno=args.pipe_fd))
    try:
        return asyncio.run(worker.run())
    except Exception:
        log.exception("worker failed")
        return 1 if worker.booted else BOOT_ERROR
