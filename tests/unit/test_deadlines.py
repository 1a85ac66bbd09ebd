"""Deadlines on a fake loop: nothing fires early, at most a tick late, disarmed never."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from mcproxy.worker.deadlines import TICK, Deadlines


class FakeLoop:
    """time() and call_at() only; run_until(t) fires what is due in order."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[tuple[float, Callable[[], None], list[bool]]] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], None]) -> Handle:
        cancelled = [False]
        self.timers.append((when, callback, cancelled))
        return Handle(cancelled)

    def run_until(self, until: float) -> None:
        while True:
            live = [t for t in self.timers if not t[2][0] and t[0] <= until]
            if not live:
                self.now = until
                return
            timer = min(live, key=lambda t: t[0])
            self.timers.remove(timer)
            self.now = max(self.now, timer[0])
            timer[1]()


class Handle:
    def __init__(self, cancelled: list[bool]) -> None:
        self._cancelled = cancelled

    def cancel(self) -> None:
        self._cancelled[0] = True


class Item:
    def __init__(self, loop: FakeLoop, name: str, fired: list[tuple[str, float]]) -> None:
        self.loop, self.name, self.fired = loop, name, fired

    def on_deadline(self) -> None:
        self.fired.append((self.name, self.loop.now))


def setup() -> tuple[FakeLoop, Deadlines, list[tuple[str, float]]]:
    loop = FakeLoop()
    return loop, Deadlines(cast(asyncio.AbstractEventLoop, loop)), []


def test_fires_at_or_after_the_deadline_within_a_tick_in_order() -> None:
    loop, deadlines, fired = setup()
    deadlines.arm(Item(loop, "late", fired), 3.0)
    deadlines.arm(Item(loop, "early", fired), 1.0)  # earlier than the timer set: re-set
    loop.run_until(0.999)
    assert fired == []
    loop.run_until(10.0)
    assert [name for name, _ in fired] == ["early", "late"]
    for (_, at), deadline in zip(fired, (1.0, 3.0), strict=True):
        assert deadline <= at <= deadline + 2 * TICK


def test_disarmed_never_fires_and_leaves_nothing_behind() -> None:
    loop, deadlines, fired = setup()
    item = Item(loop, "x", fired)
    key = deadlines.arm(item, 1.0)
    deadlines.disarm(item, key)
    assert len(deadlines) == 0
    loop.run_until(5.0)
    assert fired == []


def test_an_item_may_arm_again_when_called() -> None:
    loop, deadlines, fired = setup()

    class Again(Item):
        def on_deadline(self) -> None:
            super().on_deadline()
            if len(self.fired) < 3:
                deadlines.arm(self, self.loop.now + 1.0)

    deadlines.arm(Again(loop, "again", fired), 1.0)
    loop.run_until(10.0)
    assert len(fired) == 3
    assert fired[2][1] >= 3.0
