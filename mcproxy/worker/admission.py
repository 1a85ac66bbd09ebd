"""The worker's side of the global limits: :class:`~mcproxy.worker.listener.Admission`
over the shared tables of :mod:`mcproxy.limits`.

Called once per accepted connection, after the firewall and before the
ClientHello: first the per-IP rate limit, then the listener's
``max_connections``. The limit itself comes from this worker's copy of the
state, so ``SetListenerMaxConnections`` takes effect here as soon as the delta
is applied; the counts come from shared memory, so they hold across workers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from mcproxy.limits import SharedLimits, rate_key
from mcproxy.model import Address, Listener
from mcproxy.worker.errors import Reason

__all__ = ["SharedAdmission"]

log = logging.getLogger("mcproxy.worker")


class SharedAdmission:
    def __init__(
        self,
        limits: SharedLimits,
        slot: int,
        rate_limit: int = 0,
        rate_window: float = 60.0,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        """``slot`` is the worker's 1-based slot number, as in :class:`~mcproxy.pipe.Boot`."""
        if not 1 <= slot <= limits.layout.slots:
            raise ValueError(f"slot {slot} is outside 1..{limits.layout.slots}")
        self.limits = limits
        self.cell = slot - 1
        self.rate_limit = rate_limit
        self.rate_window = int(rate_window * 1e9)
        self.clock = clock
        self._rows: dict[Address, int | None] = {}

    def _row(self, listener: Listener) -> int | None:
        try:
            return self._rows[listener.addr]
        except KeyError:
            pass
        row = self.limits.listener_index.get(str(listener.addr))
        if row is None:  # added at runtime: the supervisor wrote its row before the change
            self.limits.reload_directory()
            row = self.limits.listener_index.get(str(listener.addr))
        if row is None:  # no row was free; a bug or an exhausted table, not an attack
            log.error("listener %s has no connection counter; not limiting it", listener.addr)
        self._rows[listener.addr] = row
        return row

    def admit(self, listener: Listener, ip: str) -> Reason | None:
        if self.rate_limit:
            family, key = rate_key(ip)
            if not self.limits.hit(family, key, self.clock(), self.rate_limit, self.rate_window):
                return Reason.RATE_LIMIT
        row = self._row(listener)
        if row is not None and not self.limits.try_acquire(
            row, self.cell, listener.max_connections
        ):
            return Reason.MAX_CONNECTIONS
        return None

    def release(self, listener: Listener) -> None:
        row = self._row(listener)
        if row is not None:
            self.limits.release(row, self.cell)
