"""The supervisor's arbiter: one loop that owns the state and the worker slots.

Like gunicorn's arbiter, signal handlers only enqueue, and ``run()`` repeats a
fixed list of explicit steps: wait for I/O (worker pipes, the wake-up socket),
handle signals, apply admin changes, reap, expire unanswered changes, kill
unresponsive workers, fill empty slots. Only this loop's thread mutates the
state, the store and the slots; the admin API's threads hand changes in
through :meth:`Supervisor.submit` and wait on a future.

Worker slots are numbered and own their listening sockets (invariant 7). A
worker is started by fork+exec of ``python -m mcproxy.worker`` (invariant 5),
never a bare fork of this process, whose gRPC threads would not survive it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import faulthandler
import logging
import os
import queue
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import mcproxy
from mcproxy import limits, pipe
from mcproxy.config import Config, ConfigError, load_config
from mcproxy.health import BackendState, CheckTarget, Verdict, route_states
from mcproxy.model import (
    Change,
    FirewallRuleAdded,
    FirewallRuleKind,
    ProxyState,
    Route,
    StateError,
    apply_change,
)
from mcproxy.supervisor import upgrade
from mcproxy.supervisor.health import HealthRunner
from mcproxy.supervisor.sockets import ListenError, open_listening_socket
from mcproxy.supervisor.status import HeartbeatCounts, Status, WorkerSample, build_status
from mcproxy.supervisor.store import Store

__all__ = ["Halt", "Stopping", "Supervisor", "UpgradeFailed", "WorkerNotAcknowledged"]

log = logging.getLogger("mcproxy.supervisor")

HEARTBEAT_TIMEOUT = 10.0
"""A worker whose loop has not sent a heartbeat for this long is stuck: SIGABRT, then SIGKILL."""
ABORT_GRACE = 2.0
ACK_TIMEOUT = 5.0
"""How long an admin change waits for every worker's acknowledgement."""
SEND_TIMEOUT = 10.0
"""A worker that takes no byte of what we have queued for it for this long is killed."""
STABLE_LIFETIME = 10.0
"""A worker that lived this long before dying is respawned at once; sooner is a crash loop."""
MAX_BACKOFF = 30.0
SPARE_LISTENER_ROWS = 64
"""Shared-memory counter rows kept free for listeners added at runtime."""


def cell_columns(workers: int) -> int:
    """Counter cells per listener row: twice the workers (at least 16), so that during
    an upgrade the new workers count in cells the old ones do not hold."""
    return max(16, 2 * workers)


def respawn_delay(quick_deaths: int) -> float:
    """No wait after a worker that ran a while; 0.2 s, 0.4 s ... up to 30 s in a crash loop."""
    return min(MAX_BACKOFF, 0.1 * 2**quick_deaths) if quick_deaths else 0.0


class Halt(Exception):
    """Stop the whole server with this message and a non-zero exit."""


class UpgradeFailed(Exception):
    """The program started by an upgrade cannot serve; the old workers must go on."""

    def __init__(self, why: str, inherited: upgrade.Inherited) -> None:
        super().__init__(why)
        self.inherited = inherited


class Stopping(Exception):
    """The supervisor is shutting down and takes no more changes."""


class WorkerNotAcknowledged(Exception):
    """A change was committed but some workers did not confirm it in time (they are restarted)."""


@dataclass
class WorkerProcess:
    slot: int
    process: subprocess.Popen[bytes]
    channel: socket.socket
    started: float
    decoder: pipe.FrameDecoder = field(default_factory=pipe.FrameDecoder)
    outbox: pipe.Outbox = field(default_factory=pipe.Outbox)
    """Frames the worker has not read yet; the loop writes them as the pipe drains."""
    generation: int = 0
    active_connections: int = 0
    listener_connections: Mapping[str, int] = field(default_factory=dict)
    last_seen: float = field(default_factory=time.monotonic)
    aborted_at: float | None = None

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclass
class Slot:
    index: int
    sockets: dict[str, socket.socket]
    worker: WorkerProcess | None = None
    cell: int = -1
    """Column of the shared connection counters its workers count in (-1: ``index - 1``)."""
    quick_deaths: int = 0
    respawn_at: float = 0.0


@dataclass
class RetiringWorker:
    """A worker of the program before an upgrade (ARCHITECTURE.md, "Upgrade in place")."""

    pid: int
    slot: int
    cell: int
    channel: socket.socket


@dataclass
class PendingChange:
    generation: int
    future: concurrent.futures.Future[int]
    waiting: set[int]
    deadline: float


class Supervisor:
    listeners_at_runtime = True
    """``handle_requests`` binds the listeners any change adds, a ChangeBatch included,
    before the commit, and closes those it removes (ApplyState reads this)."""

    def __init__(self, config: Config, store: Store, state: ProxyState) -> None:
        self.config = config
        self.store = store
        self.state = state
        self.started_at = time.time()
        self.slots: list[Slot] = []
        self.selector = selectors.DefaultSelector()
        self.signals: collections.deque[int] = collections.deque()
        self.requests: queue.SimpleQueue[tuple[Change, concurrent.futures.Future[int]]] = (
            queue.SimpleQueue()
        )
        self.pending: list[PendingChange] = []
        self.stopping = False
        self.worker_restarts = 0
        self.worker_env: dict[str, str] = {}
        self.samples: tuple[WorkerSample, ...] = ()
        """The worker table as of the last loop turn; replaced whole, read by API threads."""
        self.shared: limits.SharedMemory | None = None
        """Connection counters and rate table shared with the workers (invariant 4)."""
        self.metrics_dir: str | None = None
        self.on_worker_exit: list[Callable[[int], None]] = []
        """Called with the pid of each worker that is gone for good (metrics bookkeeping)."""
        self.health: HealthRunner | None = None
        """Runs the backends' health checks in its own thread (ARCHITECTURE.md)."""
        self.verdicts_in: queue.SimpleQueue[Verdict] = queue.SimpleQueue()
        self.backends_down: dict[CheckTarget, Verdict] = {}
        """What the workers were told is down (a new worker gets it after its snapshot)."""
        self._health_state: ProxyState | None = None
        self._snapshot_cache: tuple[ProxyState, bytes] | None = None
        self.retiring: list[RetiringWorker] = []
        """The previous program's workers after an upgrade, until they have drained."""
        self.retire_signalled_at: float | None = None
        """When they were told to drain (None: they still accept, and changes wait)."""
        self.upgrade_requested = False
        self.exec_hooks: tuple[Callable[[], None], Callable[[], None]] | None = None
        """(before, after a failed exec): stop and restart what main.py owns (admin API)."""
        self._wake_r, self._wake_w = socket.socketpair()
        for end in (self._wake_r, self._wake_w):
            end.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, self._drain_wakeups)

    # --- set-up ----------------------------------------------------------------

    def open_sockets(self, inherited: upgrade.Inherited | None = None) -> None:
        """Bind every listener once per slot; raises ListenError naming the address.

        After an upgrade, a slot's socket the previous program left is taken as it is
        (its accept queue included); only what it lacked is bound, and what is no
        longer needed (fewer workers) is closed here, the old workers' copies
        living on until they drain."""
        given = inherited.sockets if inherited is not None else {}
        used: set[int] = set()
        for index in range(1, self.config.worker_count() + 1):
            sockets = {}
            for addr, listener in self.state.listeners.items():
                fd = given.get(addr, {}).get(index)
                if fd is not None:  # a copy: the original stays for a caretaker until booted
                    sockets[addr] = socket.socket(fileno=os.dup(fd))
                    used.add(fd)
                else:
                    sockets[addr] = open_listening_socket(listener.addr)
            self.slots.append(Slot(index, sockets, cell=index - 1))

    def create_shared_memory(self, inherited: upgrade.Inherited | None = None) -> None:
        """Create the limits table every worker maps, with rows to spare for listeners
        added at runtime and cells to spare for an upgrade's overlapping workers.

        After an upgrade, the previous table is kept when it has the cells: the old
        workers go on counting in theirs, and the new ones get other cells, so a
        limit stays exact while both serve."""
        workers = self.config.worker_count()
        if inherited is not None and inherited.shm_fd is not None:
            shared = limits.attach(os.dup(inherited.shm_fd))
            held = {w.cell for w in inherited.workers}
            free = [c for c in range(shared.limits.layout.slots) if c not in held]
            missing = [a for a in self.state.listeners if a not in shared.limits.listener_index]
            rows_ok = all(shared.limits.add_listener(a) is not None for a in missing)
            if len(free) >= workers and rows_ok:
                self.shared = shared
                for slot, cell in zip(self.slots, free, strict=False):
                    slot.cell = cell
                return
            log.warning(
                "upgrade: the shared counters have no room for %d more workers; limits"
                " count afresh, without the old workers' connections, until they exit",
                workers,
            )
            shared.close()
            for w in inherited.workers:
                w.cell = -1  # their cells are in the old table: nothing to release
        self.shared = limits.create(
            sorted(self.state.listeners),
            cell_columns(workers),
            rows=len(self.state.listeners) + SPARE_LISTENER_ROWS,
        )
        for slot in self.slots:
            slot.cell = slot.index - 1

    def adopt(self, inherited: upgrade.Inherited) -> None:
        """Track the previous program's workers: they serve until ours are up."""
        self.started_at = inherited.started_at or self.started_at
        if inherited.generation > self.state.generation:
            self.state = replace(self.state, generation=inherited.generation)
        for w in inherited.workers:
            channel = socket.socket(fileno=os.dup(w.fd))
            channel.setblocking(False)
            self.retiring.append(RetiringWorker(w.pid, w.slot, w.cell, channel))
            self.selector.register(channel, selectors.EVENT_READ, self._on_retiring_ready)
        log.info(
            "upgrade: adopted %d workers of the previous program (pids %s)",
            len(self.retiring),
            ", ".join(str(w.pid) for w in self.retiring) or "none",
        )

    def start_health_checks(self) -> None:
        """Start the health-check thread on the current state's targets."""
        self.health = HealthRunner(self._verdict_arrived).start()
        self._health_state = self.state
        self.health.set_state(self.state)

    def backend_states(self, route: Route) -> list[BackendState]:
        """Each backend of ``route`` with its health verdict (thread-safe)."""
        verdicts = self.health.by_target() if self.health is not None else {}
        return route_states(route, verdicts)

    def _verdict_arrived(self, verdict: Verdict) -> None:
        """In the health thread: queue it and wake the loop, which tells the workers."""
        self.verdicts_in.put(verdict)
        with contextlib.suppress(BlockingIOError):
            self._wake_w.send(b"h")

    def install_signal_handlers(self) -> None:
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP, signal.SIGUSR2):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signals.append(signum)  # nothing else here: the loop does the work

    # --- the loop ----------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit status."""
        try:
            self.fill_slots()
            self.publish_status()
            while not self.stopping:
                self.wait(self._next_timeout())
                self.handle_signals()
                if not self.retiring or self.retire_signalled_at is not None:
                    self.handle_requests()  # not while the old workers still accept
                self.handle_health()
                self.reap()
                self.expire_pending()
                self.kill_unresponsive()
                if not self.stopping:
                    self.fill_slots()
                self.retire_old_workers()
                self.publish_status()
                if self.upgrade_requested and not self.stopping:
                    self.upgrade_in_place()
        except Halt as halt:
            log.error("%s", halt)
            if self.retiring and self.retire_signalled_at is None:
                raise UpgradeFailed(str(halt), self.hand_over_retiring()) from None
            self.stop()
            return 1
        self.stop()
        return 0

    def wait(self, timeout: float) -> None:
        for key, events in self.selector.select(timeout):
            key.data(key.fileobj, events)

    def _next_timeout(self) -> float:
        now = time.monotonic()
        deadlines = [now + 1.0]
        deadlines += [s.respawn_at for s in self.slots if s.worker is None]
        deadlines += [p.deadline for p in self.pending]
        return max(0.0, min(deadlines) - now)

    def _drain_wakeups(self, _: object, events: int = selectors.EVENT_READ) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.popleft()
            if signum in (signal.SIGTERM, signal.SIGINT):
                log.info("received %s: stopping", signal.Signals(signum).name)
                self.stopping = True
            elif signum == signal.SIGUSR2:
                log.info("received SIGUSR2: upgrade in place once pending changes settle")
                self.upgrade_requested = True
            elif signum == signal.SIGHUP:
                # A habit from other proxies; dying on it would take the service down.
                log.warning(
                    "SIGHUP ignored: routes change through the admin API; SIGUSR2 upgrades in place"
                )
            # SIGCHLD only wakes the loop; reap() runs on every turn anyway.

    # --- worker lifecycle -----------------------------------------------------------

    def fill_slots(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.worker is None and now >= slot.respawn_at:
                self.spawn(slot)

    def spawn(self, slot: Slot) -> None:
        parent_end, child_end = socket.socketpair()
        fds = {addr: sock.fileno() for addr, sock in slot.sockets.items()}
        shm_fd = self.shared.fd if self.shared is not None else None
        inherited = [child_end.fileno(), *fds.values()]
        if shm_fd is not None:
            inherited.append(shm_fd)
        env = {**os.environ, **self.worker_env}
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(mcproxy.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        process = subprocess.Popen(
            [sys.executable, "-m", "mcproxy.worker", "--pipe-fd", str(child_end.fileno())],
            pass_fds=inherited,
            env=env,
            stdin=subprocess.DEVNULL,
        )
        child_end.close()
        worker = WorkerProcess(slot.index, process, parent_end, started=time.monotonic())
        slot.worker = worker
        parent_end.setblocking(False)
        self.selector.register(parent_end, selectors.EVENT_READ, self._on_worker_ready)
        boot = pipe.Boot(
            slot=slot.index,
            listen_fds=fds,
            timeouts=self.config.proxy,
            geoip_db=self.config.firewall.geoip_db,
            rate_limit=self.config.firewall.rate_limit,
            rate_window=self.config.firewall.rate_window,
            shm_fd=shm_fd,
            metrics_dir=self.metrics_dir,
            cell=slot.cell if slot.cell >= 0 else None,
        )
        self._send(worker, boot)
        self._send_encoded(worker, self._snapshot_frame())
        if self.backends_down:
            self._send(worker, pipe.Health(tuple(self.backends_down.values()), full=True))
        log.info("worker %d started (pid %d)", slot.index, worker.pid)

    def _snapshot_frame(self) -> bytes:
        """The current state's Snapshot frame, encoded once per state (100,000 routes
        take ~0.4 s to encode): every worker started or respawned before the next
        change gets the same bytes."""
        cached = self._snapshot_cache
        if cached is None or cached[0] is not self.state:
            cached = (self.state, pipe.encode(pipe.Snapshot(self.state)))
            self._snapshot_cache = cached
        return cached[1]

    def _send(
        self, worker: WorkerProcess, message: pipe.Message, fds: list[int] | None = None
    ) -> None:
        """Queue a frame for the worker and write what the pipe takes now; never blocks.

        The rest goes out as the worker reads (:meth:`_on_worker_ready`); a worker
        that takes nothing for SEND_TIMEOUT is killed by :meth:`kill_unresponsive`."""
        self._send_encoded(worker, pipe.encode(message), fds or ())

    def _send_encoded(self, worker: WorkerProcess, data: bytes, fds: Sequence[int] = ()) -> None:
        worker.outbox.push(data, fds)
        self._flush(worker)

    def _flush(self, worker: WorkerProcess) -> None:
        if worker.channel.fileno() < 0:
            return
        try:
            done = worker.outbox.flush(worker.channel)
        except OSError as exc:
            log.warning("worker %d: pipe write failed (%s); killing it", worker.slot, exc)
            self._kill(worker, signal.SIGKILL)
            done = True
        events = selectors.EVENT_READ if done else selectors.EVENT_READ | selectors.EVENT_WRITE
        with contextlib.suppress(KeyError, ValueError):
            if self.selector.get_key(worker.channel).events != events:
                self.selector.modify(worker.channel, events, self._on_worker_ready)

    def _worker_by_pipe(self, sock: object) -> WorkerProcess | None:
        for slot in self.slots:
            if slot.worker is not None and slot.worker.channel is sock:
                return slot.worker
        return None

    def _on_worker_ready(self, sock: object, events: int = selectors.EVENT_READ) -> None:
        worker = self._worker_by_pipe(sock)
        if worker is None:
            return
        if events & selectors.EVENT_WRITE:
            self._flush(worker)
        if events & selectors.EVENT_READ:
            self._read_worker(worker)

    def _read_worker(self, worker: WorkerProcess) -> None:
        try:
            data = worker.channel.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(worker.channel)
            return  # the process is exiting; reap() collects it
        worker.last_seen = time.monotonic()
        try:
            messages = worker.decoder.feed(data)
        except pipe.FrameError as exc:
            log.error("worker %d sent garbage (%s); killing it", worker.slot, exc)
            self._kill(worker, signal.SIGKILL)
            return
        for message in messages:
            match message:
                case pipe.Ack(generation=generation):
                    worker.generation = generation
                    self._acknowledged(worker)
                case pipe.Heartbeat(generation=generation, active_connections=active):
                    worker.generation = generation
                    worker.active_connections = active
                    worker.listener_connections = message.listener_connections
                case _:
                    log.warning("worker %d sent unexpected %r", worker.slot, message)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self._reap_retiring(pid, status):
                continue
            slot = next(
                (s for s in self.slots if s.worker is not None and s.worker.pid == pid), None
            )
            if slot is None or slot.worker is None:
                continue  # not one of ours (or already forgotten)
            worker = slot.worker
            worker.process.returncode = os.waitstatus_to_exitcode(status)
            self._forget(slot)
            self._release_connections(slot)
            code = worker.process.returncode
            if code == pipe.BOOT_ERROR and not self.stopping:
                raise Halt(f"worker {slot.index} could not boot (exit {code}); stopping")
            if self.stopping:
                log.info("worker %d (pid %d) exited with %s", slot.index, pid, code)
                continue
            self.worker_restarts += 1
            lived = time.monotonic() - worker.started
            slot.quick_deaths = slot.quick_deaths + 1 if lived < STABLE_LIFETIME else 0
            delay = respawn_delay(slot.quick_deaths)
            slot.respawn_at = time.monotonic() + delay
            log.warning(
                "worker %d (pid %d) died with %s after %.1fs; respawning in %.1fs",
                slot.index,
                pid,
                code,
                lived,
                delay,
            )

    # --- upgrade in place (ARCHITECTURE.md, "Upgrade in place") ------------------------

    def upgrade_in_place(self) -> None:
        """SIGUSR2: check the config as ``mc-proxy check`` does; if it is good, re-exec
        ``mc-proxy serve`` keeping the PID, the sockets, the counters and the workers.
        Waits (one loop turn at a time) for pending changes and queued frames first."""
        if self.pending or any(s.worker and s.worker.outbox for s in self.slots):
            return
        self.upgrade_requested = False
        try:
            load_config(self.config.path)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("SIGUSR2 ignored, nothing changes: %s", problem)
            return
        except OSError as exc:
            log.error("SIGUSR2 ignored, nothing changes: %s: %s", self.config.path, exc)
            return
        inherited = self._inherited(lambda s: s.fileno())
        for slot in self.slots:
            if slot.worker is not None:
                inherited.workers.append(
                    upgrade.InheritedWorker(
                        slot.worker.pid,
                        slot.index,
                        slot.cell if slot.cell >= 0 else slot.index - 1,
                        slot.worker.channel.fileno(),
                    )
                )
        if self.exec_hooks is not None:
            self.exec_hooks[0]()
        try:
            upgrade.exec_serve(inherited)
        except OSError as exc:
            log.error("upgrade: exec failed (%s); carrying on unchanged", exc)
            if self.exec_hooks is not None:
                self.exec_hooks[1]()

    def retire_old_workers(self) -> None:
        """Once every slot has a new worker serving the current state, tell the previous
        program's workers to stop accepting and drain; kill what outlives the drain."""
        if not self.retiring:
            return
        now = time.monotonic()
        if self.retire_signalled_at is None:
            ready = all(
                s.worker is not None and s.worker.generation >= self.state.generation
                for s in self.slots
            )
            if not ready and not self.stopping:
                return
            log.info(
                "upgrade: new workers serving; %d old workers stop accepting and drain",
                len(self.retiring),
            )
            self.retire_signalled_at = now
            for worker in self.retiring:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGTERM)
        elif now - self.retire_signalled_at > self.config.proxy.shutdown_timeout + 5.0:
            for worker in self.retiring:
                log.warning("upgrade: old worker pid %d outlived its drain; killing it", worker.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)
            self.retire_signalled_at = now  # again after another drain period, if need be

    def _reap_retiring(self, pid: int, status: int) -> bool:
        worker = next((w for w in self.retiring if w.pid == pid), None)
        if worker is None:
            return False
        self.retiring.remove(worker)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(worker.channel)
        worker.channel.close()
        if self.shared is not None and worker.cell >= 0:
            self.shared.limits.clear_slot(worker.cell)
        log.info(
            "upgrade: old worker %d (pid %d) exited with %s; %d left",
            worker.slot,
            pid,
            os.waitstatus_to_exitcode(status),
            len(self.retiring),
        )
        for callback in self.on_worker_exit:
            callback(pid)
        return True

    def _on_retiring_ready(self, sock: object, events: int = selectors.EVENT_READ) -> None:
        """Old workers' heartbeats are not needed (the new ones report): discard them. The
        previous program may have stopped reading mid-frame, so they are not decoded."""
        assert isinstance(sock, socket.socket)
        try:
            data = sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(sock)

    def hand_over_retiring(self) -> upgrade.Inherited:
        """After a failed upgrade boot: stop our own workers, and hand the old ones (with
        the sockets and counters) to the caretaker, which keeps them serving."""
        for slot in self.slots:
            if slot.worker is not None:
                self._kill(slot.worker, signal.SIGKILL)
        inherited = self._inherited(lambda s: s.detach())
        self.retiring.clear()
        return inherited

    def _inherited(self, take: Callable[[socket.socket], int]) -> upgrade.Inherited:
        """What the next program inherits: the listening sockets, the counters and the
        retiring workers, each descriptor got by ``take`` (``fileno`` or ``detach``)."""
        inherited = upgrade.Inherited(
            sockets={},
            shm_fd=self.shared.fd if self.shared is not None else None,
            workers=[
                upgrade.InheritedWorker(w.pid, w.slot, w.cell, take(w.channel))
                for w in self.retiring
            ],
            started_at=self.started_at,
            generation=self.state.generation,
        )
        for slot in self.slots:
            for addr, sock in slot.sockets.items():
                inherited.sockets.setdefault(addr, {})[slot.index] = take(sock)
        return inherited

    def _forget(self, slot: Slot) -> None:
        worker = slot.worker
        assert worker is not None
        if worker.channel.fileno() >= 0:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(worker.channel)
            worker.channel.close()
        slot.worker = None
        for pending in self.pending:
            pending.waiting.discard(worker.pid)
        self._settle_pending()
        for callback in self.on_worker_exit:
            callback(worker.pid)

    def _release_connections(self, slot: Slot) -> None:
        """A dead worker's connections are gone with it: free their counts before a
        new worker takes the slot (reap() runs before fill_slots() on every turn)."""
        if self.shared is None:
            return
        freed = self.shared.limits.clear_slot(slot.cell if slot.cell >= 0 else slot.index - 1)
        if freed:
            log.info("worker %d: released %d connection slots it held", slot.index, freed)

    def kill_unresponsive(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            worker = slot.worker
            if worker is None:
                continue
            if worker.aborted_at is not None:
                if now - worker.aborted_at > ABORT_GRACE:
                    self._kill(worker, signal.SIGKILL)
            elif worker.outbox and now - worker.outbox.progress_at > SEND_TIMEOUT:
                log.error(
                    "worker %d (pid %d) has not read its pipe for %.0fs (%d bytes waiting);"
                    " killing it",
                    slot.index,
                    worker.pid,
                    SEND_TIMEOUT,
                    worker.outbox.pending_bytes,
                )
                self._kill(worker, signal.SIGKILL)
                worker.aborted_at = now
            elif now - worker.last_seen > HEARTBEAT_TIMEOUT:
                log.error("worker %d (pid %d) is unresponsive; aborting it", slot.index, worker.pid)
                self._kill(worker, signal.SIGABRT)
                worker.aborted_at = now

    @staticmethod
    def _kill(worker: WorkerProcess, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, sig)

    # --- status and changes for the admin API -------------------------------------

    def publish_status(self) -> None:
        """Swap in a fresh immutable worker table for :meth:`status` (loop thread only)."""
        self.samples = tuple(
            WorkerSample(
                slot=s.index,
                pid=s.worker.pid,
                generation=s.worker.generation,
                active_connections=s.worker.active_connections,
                listener_connections=s.worker.listener_connections,
                started=s.worker.started,
            )
            if s.worker is not None
            else WorkerSample(slot=s.index, pid=0)
            for s in self.slots
        )

    def status(self) -> Status:
        """Version, uptime, workers and listeners (thread-safe: reads immutable values only)."""
        samples = self.samples
        return build_status(
            version=mcproxy.__version__,
            state=self.state,
            samples=samples,
            # Live counts from shared memory; the heartbeats' (~1 s old) without it.
            counts=self.shared.limits if self.shared is not None else HeartbeatCounts(samples),
            started_at=self.started_at,
            worker_restarts=self.worker_restarts,
            now=time.time(),
            now_monotonic=time.monotonic(),
        )

    def submit(self, change: Change) -> concurrent.futures.Future[int]:
        """Queue a change (thread-safe). The future resolves to the new generation once it
        is committed and every live worker has applied it; or raises StateError,
        WorkerNotAcknowledged, Stopping, or the store's error."""
        future: concurrent.futures.Future[int] = concurrent.futures.Future()
        if self.stopping:
            future.set_exception(Stopping("mc-proxy is shutting down; no changes accepted"))
            return future
        self.requests.put((change, future))
        with contextlib.suppress(BlockingIOError):  # full: the loop is already due to wake
            self._wake_w.send(b"r")
        return future

    def handle_requests(self) -> None:
        while True:
            try:
                change, future = self.requests.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            opened: dict[str, dict[int, socket.socket]] = {}
            try:
                new_state = apply_change(self.state, change)  # validates against the state
                self._check_precondition(change)
                added = sorted(new_state.listeners.keys() - self.state.listeners.keys())
                removed = sorted(self.state.listeners.keys() - new_state.listeners.keys())
                opened = self._open_listener_sockets(new_state, added)  # before the commit
                self.store.apply(change)  # invariant 2: commit first...
            except Exception as exc:
                for sockets in opened.values():
                    for sock in sockets.values():
                        sock.close()
                future.set_exception(exc)
                continue
            self.state = new_state  # ...then the supervisor's state, then the workers
            for slot in self.slots:
                for addr in added:
                    slot.sockets[addr] = opened[addr][slot.index]
            live = [s.worker for s in self.slots if s.worker is not None]
            if added:
                for worker in live:
                    slot_sockets = self.slots[worker.slot - 1].sockets
                    self._send(
                        worker,
                        pipe.Delta(change, new_state.generation, tuple(added)),
                        [slot_sockets[addr].fileno() for addr in added],
                    )
            else:
                delta = pipe.encode(pipe.Delta(change, new_state.generation))
                for worker in live:
                    self._send_encoded(worker, delta)
            for addr in removed:  # the workers close theirs as they apply the change
                for slot in self.slots:
                    if addr in slot.sockets:
                        slot.sockets.pop(addr).close()
            if added or removed:
                log.info("listeners: added %s, removed %s", added or "none", removed or "none")
            waiting = {w.pid for w in live if w.generation < new_state.generation}
            self.pending.append(
                PendingChange(new_state.generation, future, waiting, time.monotonic() + ACK_TIMEOUT)
            )
        self._settle_pending()

    def handle_health(self) -> None:
        """Pass the health thread's verdicts to every worker, and the state's targets to it."""
        if self.health is None:
            return
        if self.state is not self._health_state:
            self._health_state = self.state
            self.health.set_state(self.state)
        verdicts: list[Verdict] = []
        while True:
            try:
                verdicts.append(self.verdicts_in.get_nowait())
            except queue.Empty:
                break
        users = self.health.users
        if any(t not in users for t in self.backends_down):  # routes gone: forget them
            self.backends_down = {t: v for t, v in self.backends_down.items() if t in users}
        if not verdicts:
            return
        for verdict in verdicts:
            routes = ", ".join(f"{h} on {addr}" for addr, h in users.get(verdict.target, ()))
            if verdict.up:
                self.backends_down.pop(verdict.target, None)
                log.info(
                    "backend %s is up again: %s (routes: %s)",
                    verdict.target.describe(),
                    verdict.reason,
                    routes or "-",
                )
            else:
                self.backends_down[verdict.target] = verdict
                log.warning(
                    "backend %s is down: %s (routes: %s)",
                    verdict.target.describe(),
                    verdict.reason,
                    routes or "-",
                )
        message = pipe.Health(tuple(verdicts))
        for slot in self.slots:
            if slot.worker is not None:
                self._send(slot.worker, message)

    def _open_listener_sockets(
        self, state: ProxyState, added: list[str]
    ) -> dict[str, dict[int, socket.socket]]:
        """Bind each added listener once per slot, and give it a shared-memory row;
        raises StateError("failed_precondition") naming the address and the reason."""
        if len(added) > pipe.MAX_FDS:
            raise StateError(
                "failed_precondition", f"at most {pipe.MAX_FDS} listeners can be added at once"
            )
        opened: dict[str, dict[int, socket.socket]] = {}
        try:
            for addr in added:
                opened[addr] = {}
                for slot in self.slots:
                    opened[addr][slot.index] = open_listening_socket(state.listeners[addr].addr)
                if self.shared is not None and self.shared.limits.add_listener(addr) is None:
                    raise StateError(
                        "failed_precondition",
                        f"cannot add listener {addr}: every shared-memory listener row is"
                        " taken; restart mc-proxy to make room",
                    )
        except ListenError as exc:
            for sockets in opened.values():
                for sock in sockets.values():
                    sock.close()
            raise StateError("failed_precondition", str(exc)) from None
        except BaseException:
            for sockets in opened.values():
                for sock in sockets.values():
                    sock.close()
            raise
        return opened

    def _check_precondition(self, change: Change) -> None:
        """Refuse a change this process cannot honour (FAILED_PRECONDITION at the API)."""
        if (
            isinstance(change, FirewallRuleAdded)
            and change.kind is FirewallRuleKind.COUNTRY
            and self.config.firewall.geoip_db is None
        ):
            raise StateError(
                "failed_precondition",
                f"country rules need a GeoIP database: set firewall.geoip_db in {self.config.path}"
                " and restart",
            )

    def _acknowledged(self, worker: WorkerProcess) -> None:
        for pending in self.pending:
            if worker.generation >= pending.generation:
                pending.waiting.discard(worker.pid)
        self._settle_pending()

    def _settle_pending(self) -> None:
        done = [p for p in self.pending if not p.waiting]
        for pending in done:
            self.pending.remove(pending)
            pending.future.set_result(pending.generation)

    def expire_pending(self) -> None:
        now = time.monotonic()
        for pending in [p for p in self.pending if p.deadline <= now]:
            self.pending.remove(pending)
            late = [s.worker for s in self.slots if s.worker and s.worker.pid in pending.waiting]
            for worker in late:
                self._kill(worker, signal.SIGKILL)
            names = ", ".join(f"worker {w.slot} (pid {w.pid})" for w in late)
            pending.future.set_exception(
                WorkerNotAcknowledged(
                    f"change committed (generation {pending.generation}) but {names}"
                    f" did not apply it within {ACK_TIMEOUT:g}s; restarting with the"
                    " committed state"
                )
            )

    # --- shutdown ----------------------------------------------------------------

    def stop(self) -> None:
        """Stop accepting, let workers drain up to shutdown_timeout, then kill the rest."""
        self.stopping = True
        if self.health is not None:
            self.health.stop()
        for slot in self.slots:
            for sock in slot.sockets.values():
                sock.close()
        live = [s.worker for s in self.slots if s.worker is not None]
        for worker in live:
            self._kill(worker, signal.SIGTERM)
        for old in self.retiring:
            with contextlib.suppress(ProcessLookupError):
                os.kill(old.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.proxy.shutdown_timeout + 5.0
        while (
            any(s.worker is not None for s in self.slots) or self.retiring
        ) and time.monotonic() < deadline:
            self.wait(0.1)
            self.reap()
            if len(self.signals) and signal.SIGINT in self.signals:
                log.info("second interrupt: not waiting for connections to drain")
                break
        for slot in self.slots:
            if slot.worker is not None:
                log.warning("worker %d did not stop in time; killing it", slot.index)
                self._kill(slot.worker, signal.SIGKILL)
                slot.worker.process.wait()
                self._forget(slot)
        for old in self.retiring:
            log.warning("old worker pid %d did not stop in time; killing it", old.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(old.pid, signal.SIGKILL)
        for pending in self.pending:
            pending.future.set_exception(Stopping("mc-proxy stopped before every worker acked"))
        self.pending.clear()
        while True:
            try:
                _, future = self.requests.get_nowait()
            except queue.Empty:
                break
            if future.set_running_or_notify_cancel():
                future.set_exception(Stopping("mc-proxy is shutting down; no changes accepted"))


def enable_fault_dumps() -> None:
    """A SIGABRT from the heartbeat check prints where a stuck process was."""
    faulthandler.enable(file=sys.stderr, all_threads=True)
