"""The supervisor's health step: verdicts to every worker, logged, the down set kept."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mcproxy import pipe
from mcproxy.config import Config
from mcproxy.health import CheckTarget, RouteKey, Verdict
from mcproxy.model import Address, ProxyState
from mcproxy.supervisor.manager import Slot, Supervisor, WorkerProcess
from mcproxy.supervisor.store import Store

TARGET = CheckTarget(Address("127.0.0.1", 9001), "tcp", 1.0, 0.5, 2, 3, path="")


class FakeRunner:
    def __init__(self) -> None:
        self.states: list[ProxyState] = []
        self.users: dict[CheckTarget, tuple[RouteKey, ...]] = {
            TARGET: (("127.0.0.1:443", "app.test"),)
        }

    def set_state(self, state: ProxyState) -> None:
        self.states.append(state)


class FakePopen:
    pid = 7001
    returncode = None


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[tuple[Supervisor, FakeRunner, socket.socket]]:
    store = Store.open(str(tmp_path / "db"))
    sup = Supervisor(Config(path="test.yaml", workers=1), store, ProxyState(generation=1))
    slot = Slot(1, {})
    sup.slots = [slot]
    ours, theirs = socket.socketpair()
    slot.worker = WorkerProcess(1, FakePopen(), ours, started=time.monotonic())  # type: ignore[arg-type]
    runner = FakeRunner()
    sup.health = runner  # type: ignore[assignment]
    yield sup, runner, theirs
    theirs.close()
    store.close()


def received(theirs: socket.socket) -> list[pipe.Message]:
    theirs.settimeout(5)
    return pipe.FrameDecoder().feed(theirs.recv(1 << 20))


def test_verdicts_go_to_every_worker_and_are_logged(
    supervisor: tuple[Supervisor, FakeRunner, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    sup, runner, theirs = supervisor
    down = Verdict(TARGET, False, "Connection refused", 1.0)
    sup._verdict_arrived(down)
    with caplog.at_level(logging.INFO, "mcproxy.supervisor"):
        sup.handle_health()
    assert runner.states == [sup.state]  # the runner learns the state's targets
    assert received(theirs) == [pipe.Health((down,))]
    assert sup.backends_down == {TARGET: down}
    assert "backend 127.0.0.1:9001 (tcp) is down: Connection refused" in caplog.text
    assert "app.test on 127.0.0.1:443" in caplog.text
    up = Verdict(TARGET, True, "connected", 2.0)
    sup._verdict_arrived(up)
    with caplog.at_level(logging.INFO, "mcproxy.supervisor"):
        sup.handle_health()
    assert received(theirs) == [pipe.Health((up,))]
    assert sup.backends_down == {}
    assert "is up again: connected" in caplog.text
    assert len(runner.states) == 1  # same state: not sent again


def test_a_target_no_route_uses_is_forgotten(
    supervisor: tuple[Supervisor, FakeRunner, socket.socket],
) -> None:
    sup, runner, _ = supervisor
    sup.backends_down = {TARGET: Verdict(TARGET, False, "x", 1.0)}
    runner.users = {}
    sup.handle_health()
    assert sup.backends_down == {}
