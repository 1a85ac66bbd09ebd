"""Coarse deadlines for many connections on one loop timer.

A connection has a deadline in every state (handshake, connect, idle), and
almost none of them ever fires: the ClientHello comes, the dial succeeds,
bytes flow. An event-loop timer per deadline costs a timer handle to create
and one to cancel (several microseconds each in uvloop, two or three per
connection; ``bench/``, ``l4_connrate``). Here a deadline is a dict entry in
a bucket of :data:`TICK` (rounded up, so nothing fires early, and at most
two ticks late), and one loop timer wakes for the earliest bucket.
Disarming deletes the entry, so an ended connection is not kept alive.
"""

from __future__ import annotations

import asyncio
import heapq
from typing import Protocol

__all__ = ["TICK", "Deadlines", "Due"]

TICK = 0.05
"""Resolution in seconds: a deadline fires within two ticks after it."""
_PER_SECOND = round(1 / TICK)


class Due(Protocol):
    def on_deadline(self) -> None:
        """The deadline this was armed for has come (possibly a little later)."""
        ...


class Deadlines:
    """Buckets of :class:`Due` items by tick, and one loop timer for the earliest."""

    __slots__ = ("_buckets", "_handle", "_keys", "_loop", "_wake_key")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._buckets: dict[int, dict[Due, None]] = {}
        self._keys: list[int] = []  # heap of the bucket keys
        self._handle: asyncio.TimerHandle | None = None
        self._wake_key = 0  # the key the loop timer is set for; 0: none

    def arm(self, item: Due, when: float) -> int:
        """Call ``item.on_deadline()`` at ``when`` or up to a tick later; returns a key
        for :meth:`disarm`. An item armed twice is called twice."""
        key = int(when * _PER_SECOND) + 2  # taken from half a tick before its time
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = {}
            heapq.heappush(self._keys, key)
            if not self._wake_key or key < self._wake_key:
                self._wake(key)
        bucket[item] = None
        return key

    def disarm(self, item: Due, key: int) -> None:
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.pop(item, None)

    def __len__(self) -> int:
        return sum(len(bucket) for bucket in self._buckets.values())

    def _wake(self, key: int) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._wake_key = key
        self._handle = self._loop.call_at(key / _PER_SECOND, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._wake_key = 0
        # Half a tick of slack: a loop timer may fire a little before its time (uvloop
        # rounds to milliseconds); waiting for the clock to pass the key would spin.
        now_key = int(self._loop.time() * _PER_SECOND + 0.5)
        keys, buckets = self._keys, self._buckets
        due: list[Due] = []
        while keys and keys[0] <= now_key:
            due.extend(buckets.pop(heapq.heappop(keys)))
        for item in due:
            item.on_deadline()  # may arm again: a new bucket, past the ones just taken
        while keys and not buckets[keys[0]]:  # drop buckets emptied by disarm
            del buckets[heapq.heappop(keys)]
        if keys and not self._wake_key:
            self._wake(keys[0])
