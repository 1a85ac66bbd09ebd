"""Time for the sans-I/O L7 core: a :class:`Clock` that reads the time and arms :class:`Timer` s.

The pool and the exchange deadlines never touch the event loop: they are
given a clock. :class:`LoopClock` is the asyncio one; unit tests drive a
manual clock (``tests/unit/l7world.py``) and fire its timers by hand.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

__all__ = ["Clock", "LoopClock", "Timer"]


class Timer(Protocol):
    def cancel(self) -> None:
        """Do not call the callback (idempotent; harmless after it ran)."""


class Clock(Protocol):
    def now(self) -> float:
        """Seconds, monotonic."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        """Call ``callback`` once, ``delay`` seconds from now, from the event loop."""


class LoopClock:
    """An event loop's clock."""

    __slots__ = ("loop",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def now(self) -> float:
        return self.loop.time()

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return self.loop.call_later(delay, callback)
