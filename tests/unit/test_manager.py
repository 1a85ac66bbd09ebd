"""The arbiter's steps, one at a time, with os.waitpid patched (no real processes)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mcproxy.config import Config
from mcproxy.model import ListenerMaxConnectionsSet, ProxyState
from mcproxy.pipe import BOOT_ERROR
from mcproxy.supervisor import manager
from mcproxy.supervisor.manager import (
    Halt,
    PendingChange,
    Slot,
    Supervisor,
    WorkerProcess,
)
from mcproxy.supervisor.store import Store


class FakePopen:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[Supervisor]:
    store = Store.open(str(tmp_path / "db"))
    sup = Supervisor(Config(path="test.yaml", workers=2), store, ProxyState(generation=1))
    sup.slots = [Slot(1, {}), Slot(2, {})]
    yield sup
    store.close()


def give_worker(sup: Supervisor, slot: Slot, pid: int, age: float) -> WorkerProcess:
    ours, theirs = socket.socketpair()
    theirs.close()
    worker = WorkerProcess(slot.index, FakePopen(pid), ours, started=time.monotonic() - age)  # type: ignore[arg-type]
    slot.worker = worker
    return worker


def exits(monkeypatch: pytest.MonkeyPatch, results: list[tuple[int, int]]) -> None:
    """Make os.waitpid report these (pid, exit code) pairs, then 'nothing more'."""
    queue = [(pid, code << 8) for pid, code in results]

    def waitpid(pid: int, options: int) -> tuple[int, int]:
        return queue.pop(0) if queue else (0, 0)

    monkeypatch.setattr(os, "waitpid", waitpid)


def test_a_worker_that_ran_a_while_is_respawned_at_once(
    supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    slot = supervisor.slots[0]
    give_worker(supervisor, slot, 1001, age=60)
    exits(monkeypatch, [(1001, 1)])
    supervisor.reap()
    assert slot.worker is None
    assert slot.respawn_at <= time.monotonic()
    assert supervisor.worker_restarts == 1


def test_respawn_delay_doubles_up_to_the_cap() -> None:
    delays = [manager.respawn_delay(n) for n in range(12)]
    assert delays[:5] == [0.0, 0.2, 0.4, 0.8, 1.6]
    assert max(delays) == manager.MAX_BACKOFF
    assert delays == sorted(delays)


def test_quick_deaths_count_up_and_set_the_respawn_time(
    supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    slot = supervisor.slots[0]
    for attempt in range(1, 6):
        give_worker(supervisor, slot, 2000 + attempt, age=0.1)
        exits(monkeypatch, [(2000 + attempt, 1)])
        before = time.monotonic()
        supervisor.reap()
        after = time.monotonic()
        assert slot.quick_deaths == attempt
        delay = manager.respawn_delay(attempt)
        assert before + delay <= slot.respawn_at <= after + delay


def test_a_boot_error_halts_instead_of_respawning(
    supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    give_worker(supervisor, supervisor.slots[1], 3001, age=0.5)
    exits(monkeypatch, [(3001, BOOT_ERROR)])
    with pytest.raises(Halt, match="could not boot"):
        supervisor.reap()


def test_unknown_children_are_reaped_and_ignored(
    supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = give_worker(supervisor, supervisor.slots[0], 4001, age=5)
    exits(monkeypatch, [(4999, 0)])
    supervisor.reap()
    assert supervisor.slots[0].worker is worker
    assert supervisor.worker_restarts == 0


def test_a_dead_worker_no_longer_holds_up_a_change(
    supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    give_worker(supervisor, supervisor.slots[0], 5001, age=30)
    future: concurrent.futures.Future[int] = concurrent.futures.Future()
    future.set_running_or_notify_cancel()
    supervisor.pending.append(PendingChange(2, future, {5001}, time.monotonic() + 5))
    exits(monkeypatch, [(5001, 1)])
    supervisor.reap()
    assert future.result(timeout=0) == 2
    assert supervisor.pending == []


def test_an_unanswered_change_fails_naming_the_worker(
    supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    give_worker(supervisor, supervisor.slots[0], 6001, age=30)
    killed: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: killed.append((pid, sig)))
    future: concurrent.futures.Future[int] = concurrent.futures.Future()
    future.set_running_or_notify_cancel()
    supervisor.pending.append(PendingChange(2, future, {6001}, time.monotonic() - 0.1))
    supervisor.expire_pending()
    with pytest.raises(manager.WorkerNotAcknowledged, match="6001"):
        future.result(timeout=0)
    assert killed and killed[0][0] == 6001


def test_a_silent_worker_gets_sigabrt_then_sigkill(
    supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    import signal

    worker = give_worker(supervisor, supervisor.slots[0], 7001, age=30)
    sent: list[Any] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append(sig))
    worker.last_seen = time.monotonic() - manager.HEARTBEAT_TIMEOUT - 1
    supervisor.kill_unresponsive()
    assert sent == [signal.SIGABRT]
    assert worker.aborted_at is not None
    worker.aborted_at -= manager.ABORT_GRACE + 1
    supervisor.kill_unresponsive()
    assert sent == [signal.SIGABRT, signal.SIGKILL]


def test_sighup_is_logged_and_does_not_stop(
    supervisor: Supervisor, caplog: pytest.LogCaptureFixture
) -> None:
    import signal

    supervisor.signals.append(signal.SIGHUP)
    supervisor.handle_signals()
    assert not supervisor.stopping
    assert "SIGHUP ignored" in caplog.text


# --- sends never block the loop ---------------------------------------------------


def live_worker(sup: Supervisor, slot: Slot, pid: int) -> tuple[WorkerProcess, socket.socket]:
    """A worker whose far end of the pipe the test holds (and may leave unread)."""
    import selectors

    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    worker = WorkerProcess(slot.index, FakePopen(pid), ours, started=time.monotonic() - 60)  # type: ignore[arg-type]
    slot.worker = worker
    sup.selector.register(ours, selectors.EVENT_READ, sup._on_worker_ready)
    return worker, theirs


def big_snapshot() -> Any:
    from mcproxy import pipe
    from mcproxy.model import Address, FirewallRules, Listener, Route, make_state

    routes = {f"h{i}.test": Route(f"h{i}.test", (Address("127.0.0.1", 1),)) for i in range(20_000)}
    return pipe.Snapshot(
        make_state(1, [Listener(Address("127.0.0.1", 1), routes=routes)], FirewallRules())
    )


def test_a_send_to_a_worker_that_does_not_read_returns_at_once(
    supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mcproxy import pipe

    worker, theirs = live_worker(supervisor, supervisor.slots[0], 8001)
    killed: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: killed.append((pid, sig)))
    started = time.monotonic()
    supervisor._send(worker, big_snapshot())
    assert time.monotonic() - started < 2.0
    assert worker.outbox.pending_bytes > 0
    # Meanwhile the loop goes on: a heartbeat from the worker is read and counted.
    theirs.sendall(pipe.encode(pipe.Heartbeat(generation=1, active_connections=5)))
    supervisor.wait(0.5)
    assert worker.active_connections == 5
    assert not killed
    # Nothing taken for SEND_TIMEOUT: killed, not waited for.
    worker.outbox.progress_at -= manager.SEND_TIMEOUT + 1
    worker.last_seen = time.monotonic()
    supervisor.kill_unresponsive()
    assert killed == [(8001, 9)]
    theirs.close()


def test_the_loop_drains_the_rest_as_the_worker_reads(supervisor: Supervisor) -> None:
    from mcproxy import pipe

    worker, theirs = live_worker(supervisor, supervisor.slots[0], 8002)
    snapshot = big_snapshot()
    supervisor._send(worker, snapshot)
    supervisor._send(worker, pipe.Delta(ListenerMaxConnectionsSet("127.0.0.1:1", 3), 2))
    assert worker.outbox
    theirs.setblocking(False)
    decoder, got = pipe.FrameDecoder(), list[pipe.Message]()
    deadline = time.monotonic() + 20
    while len(got) < 2 and time.monotonic() < deadline:
        supervisor.wait(0.05)  # EVENT_WRITE: the loop writes more as the pipe drains
        with contextlib.suppress(BlockingIOError):
            got += decoder.feed(theirs.recv(1 << 20))
    assert got[0] == snapshot
    assert isinstance(got[1], pipe.Delta) and got[1].generation == 2
    assert not worker.outbox
    theirs.close()
