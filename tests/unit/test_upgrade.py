"""Upgrade in place: what crosses the exec, and the supervisor's steps around it."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mcproxy.config import Config
from mcproxy.model import Address, FirewallRules, Listener, make_state
from mcproxy.supervisor import upgrade
from mcproxy.supervisor.manager import Slot, Supervisor
from mcproxy.supervisor.store import Store

STATE = make_state(5, [Listener(Address("127.0.0.1", 1))], FirewallRules())


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[Supervisor]:
    store = Store.open(str(tmp_path / "db"))
    config_path = tmp_path / "c.yaml"
    config_path.write_text(f"workers: 2\ndatabase: {{path: {tmp_path / 'db'}}}\n")
    sup = Supervisor(Config(path=str(config_path), workers=2), store, STATE)
    yield sup
    store.close()


def test_inherited_round_trips_through_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    r, w = os.pipe()
    try:
        inherited = upgrade.Inherited(
            sockets={"127.0.0.1:1": {1: r, 2: w}},
            shm_fd=None,
            workers=[upgrade.InheritedWorker(pid=10, slot=1, cell=0, fd=w)],
            started_at=12.5,
            generation=7,
        )
        monkeypatch.setenv(upgrade.ENV, inherited.to_json())
        taken = upgrade.take_from_environ()
        assert taken == inherited
        assert upgrade.ENV not in os.environ  # new workers must not see it
        assert not os.get_inheritable(r)
        assert upgrade.take_from_environ() is None
    finally:
        os.close(r)
        os.close(w)


def test_a_malformed_variable_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(upgrade.ENV, "{not json")
    assert upgrade.take_from_environ() is None


def test_inherited_sockets_are_reused_and_new_slots_bound(supervisor: Supervisor) -> None:
    old = socket.create_server(("127.0.0.1", 0), reuse_port=True)
    port = old.getsockname()[1]
    state = make_state(5, [Listener(Address("127.0.0.1", port))], FirewallRules())
    supervisor.state = state
    inherited = upgrade.Inherited(sockets={f"127.0.0.1:{port}": {1: old.fileno()}})
    supervisor.open_sockets(inherited)
    try:
        first = supervisor.slots[0].sockets[f"127.0.0.1:{port}"]
        assert os.path.samestat(os.fstat(first.fileno()), os.fstat(old.fileno()))  # a dup
        assert first.fileno() != old.fileno()
        second = supervisor.slots[1].sockets[f"127.0.0.1:{port}"]
        assert not os.path.samestat(os.fstat(second.fileno()), os.fstat(old.fileno()))
    finally:
        for slot in supervisor.slots:
            for sock in slot.sockets.values():
                sock.close()
        old.close()


def test_new_workers_count_in_cells_the_old_ones_do_not_hold(supervisor: Supervisor) -> None:
    from mcproxy import limits

    supervisor.slots = [Slot(1, {}), Slot(2, {})]
    previous = limits.create(["127.0.0.1:1"], slots=16, buckets=8)
    try:
        row = previous.limits.listener_index["127.0.0.1:1"]
        assert previous.limits.try_acquire(row, 0, 0) and previous.limits.try_acquire(row, 1, 0)
        workers = [
            upgrade.InheritedWorker(pid=1, slot=1, cell=0, fd=-1),
            upgrade.InheritedWorker(pid=2, slot=2, cell=1, fd=-1),
        ]
        supervisor.create_shared_memory(upgrade.Inherited(shm_fd=previous.fd, workers=workers))
        assert supervisor.shared is not None
        assert [s.cell for s in supervisor.slots] == [2, 3]
        # The old workers' connections still count in the table the new ones use.
        assert supervisor.shared.limits.listener_connections("127.0.0.1:1") == 2
        supervisor.shared.close()
    finally:
        previous.close()


def test_sigusr2_with_a_bad_config_does_not_exec(
    supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    execs: list[Any] = []
    monkeypatch.setattr(upgrade, "exec_serve", execs.append)
    Path(supervisor.config.path).write_text("workers: -1\n")
    supervisor.signals.append(signal.SIGUSR2)
    supervisor.handle_signals()
    assert supervisor.upgrade_requested
    supervisor.upgrade_in_place()
    assert not supervisor.upgrade_requested and execs == []
    assert "SIGUSR2 ignored" in caplog.text and "workers" in caplog.text


def test_sigusr2_hands_over_sockets_workers_and_counters(
    supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    execs: list[upgrade.Inherited] = []
    monkeypatch.setattr(upgrade, "exec_serve", execs.append)
    calls: list[str] = []
    supervisor.exec_hooks = (lambda: calls.append("before"), lambda: calls.append("after"))
    sock = socket.create_server(("127.0.0.1", 0))
    supervisor.slots = [Slot(1, {"127.0.0.1:1": sock}, cell=0)]
    supervisor.create_shared_memory()
    try:
        supervisor.upgrade_requested = True
        supervisor.upgrade_in_place()
        (inherited,) = execs
        assert inherited.sockets == {"127.0.0.1:1": {1: sock.fileno()}}
        assert supervisor.shared is not None and inherited.shm_fd == supervisor.shared.fd
        assert inherited.generation == 5
        assert calls == ["before"]  # the exec "returned": our fake does not replace us
    finally:
        sock.close()
        if supervisor.shared is not None:
            supervisor.shared.close()


def test_old_workers_drain_once_every_slot_serves(
    supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mcproxy.supervisor.manager import RetiringWorker, WorkerProcess

    killed: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: killed.append((pid, sig)))
    ours, theirs = socket.socketpair()
    supervisor.slots = [Slot(1, {}, cell=1)]
    supervisor.retiring = [RetiringWorker(pid=77, slot=1, cell=0, channel=theirs)]
    supervisor.retire_old_workers()
    assert killed == [] and supervisor.retire_signalled_at is None  # no new worker yet
    worker = WorkerProcess(1, object(), ours, started=0.0)  # type: ignore[arg-type]
    supervisor.slots[0].worker = worker
    worker.generation = 4
    supervisor.retire_old_workers()
    assert killed == []  # not at the current generation yet
    worker.generation = 5
    supervisor.retire_old_workers()
    assert killed == [(77, signal.SIGTERM)]
    assert supervisor.retire_signalled_at is not None
    ours.close()
    theirs.close()
