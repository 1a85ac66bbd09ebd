"""Which backend a new connection (L4) or request (L7) goes to, and the worker's view of health.

Sans-I/O on an injected clock (ARCHITECTURE.md, "Backends and health"): the
connection code asks :meth:`Balancer.choose` for a backend, reports a failed or
successful dial, and asks again, with the backends already tried, to fail over.

* **Policies.** ``round_robin`` rotates through the backends (each worker
  starts at its own offset, so that N workers do not all send their first
  connection to the first backend). ``least_conn`` takes the backend with the
  fewest open connections (L7: streams) across every worker, from the shared
  counters (:mod:`mcproxy.limits`), ties broken by the rotation.
  ``source_ip`` ranks the backends by rendezvous hashing (HRW) of the real
  client IP and the backend's address: the same order in every worker and
  every restart, and when a backend leaves only its own clients move (to
  their second choice); when one joins, only the clients that rank it first.
* **Up or down.** A backend is skipped when the supervisor's active check says
  it is down (:class:`~mcproxy.health.Verdict`, by check target) or when this
  worker ejected it after failed dials (passive check, below). When every
  backend is skipped, all are tried anyway: a chance beats a certain failure.
* **Passive check.** A failed dial counts in this worker's view only (nothing
  goes up the pipe): ``fall`` failed dials in a row (the route's check's, 1
  without a check) eject the backend for ``interval x rise`` (10 s without a
  check); after that, the next connection tries it again, and one more failure
  ejects it again. A successful dial clears the count.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from mcproxy.health import CheckTarget, Verdict
from mcproxy.model import Address

if TYPE_CHECKING:
    from mcproxy.limits import SharedLimits

__all__ = [
    "PASSIVE_COOLDOWN",
    "BackendRoute",
    "Balancer",
    "Counts",
    "LocalCounts",
    "Passive",
    "SharedCounts",
    "rendezvous",
]

PASSIVE_COOLDOWN = 10.0
"""How long a failed dial ejects a backend of a route without a health check."""


class BackendRoute(Protocol):
    """What the balancer reads of a route (``model.Route``)."""

    @property
    def hostname(self) -> str: ...

    @property
    def backends(self) -> tuple[Address, ...]: ...

    @property
    def balance(self) -> str: ...


class Counts(Protocol):
    """Open connections (L7: streams) per backend, across workers where possible."""

    def active(self, backend: Address) -> int: ...

    def opened(self, backend: Address) -> None: ...

    def closed(self, backend: Address) -> None: ...


class LocalCounts:
    """This worker's own counts (tests, and workers without shared memory)."""

    def __init__(self) -> None:
        self.counts: collections.Counter[Address] = collections.Counter()

    def active(self, backend: Address) -> int:
        return self.counts[backend]

    def opened(self, backend: Address) -> None:
        self.counts[backend] += 1

    def closed(self, backend: Address) -> None:
        if self.counts[backend] > 0:
            self.counts[backend] -= 1


class SharedCounts:
    """Counts in the shared memory's backend table, one cell per worker slot.

    A backend that does not fit in the table (full) is counted in this worker
    alone, which is what ``least_conn`` did before it was global.
    """

    def __init__(self, shared: SharedLimits, slot: int) -> None:
        self._shared = shared
        self._slot = slot
        self._rows: dict[Address, int | None] = {}
        self._local = LocalCounts()

    def _row(self, backend: Address) -> int | None:
        try:
            return self._rows[backend]
        except KeyError:
            row = self._rows[backend] = self._shared.backend_row(str(backend))
            return row

    def active(self, backend: Address) -> int:
        row = self._row(backend)
        return self._local.active(backend) if row is None else self._shared.backend_connections(row)

    def opened(self, backend: Address) -> None:
        row = self._row(backend)
        if row is None:
            self._local.opened(backend)
        else:
            self._shared.backend_acquire(row, self._slot)

    def closed(self, backend: Address) -> None:
        row = self._row(backend)
        if row is None:
            self._local.closed(backend)
        else:
            self._shared.backend_release(row, self._slot)


@dataclass(slots=True)
class _Ejection:
    failures: int = 0
    until: float = 0.0


class Passive:
    """The worker's own view of its backends, from the dials it made."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._state: dict[Address, _Ejection] = {}

    def failed(self, backend: Address, fall: int, cooldown: float) -> bool:
        """Count a failed dial; True when it ejects the backend (from now on, or again)."""
        state = self._state.setdefault(backend, _Ejection())
        state.failures += 1
        if state.failures >= max(1, fall):
            state.until = self._clock() + cooldown
            return True
        return False

    def succeeded(self, backend: Address) -> None:
        self._state.pop(backend, None)

    def ejected(self, backend: Address) -> bool:
        state = self._state.get(backend)
        return state is not None and state.until > self._clock()


def _score(client: bytes, backend: Address) -> int:
    digest = hashlib.blake2b(client + b"|" + str(backend).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous(client_ip: str, backends: Iterable[Address]) -> list[Address]:
    """The backends in ``client_ip``'s order of preference (highest random weight first)."""
    key = client_ip.encode()
    return sorted(backends, key=lambda b: _score(key, b), reverse=True)


@dataclass(slots=True)
class _RouteState:
    route: BackendRoute
    targets: tuple[CheckTarget | None, ...]
    counter: int = 0
    order: dict[Address, int] = field(default_factory=dict)


class Balancer:
    """One per worker: every route's rotation, the verdicts, the passive view and the counts.

    ``targets_of(route)`` gives the check target of each of a route's backends
    (None where the route has no check); verdicts are looked up by target.
    """

    def __init__(
        self,
        clock: Callable[[], float],
        targets_of: Callable[[BackendRoute], tuple[CheckTarget | None, ...]],
        counts: Counts | None = None,
        offset: int = 0,
    ) -> None:
        self.clock = clock
        self.counts: Counts = counts or LocalCounts()
        self.passive = Passive(clock)
        self._targets_of = targets_of
        self._offset = offset
        self._routes: dict[tuple[str, str], _RouteState] = {}
        self.down: dict[CheckTarget, Verdict] = {}
        """The supervisor's verdicts of the backends that are down."""

    # --- verdicts from the supervisor ---------------------------------------------------

    def set_verdicts(self, verdicts: Iterable[Verdict], full: bool = False) -> None:
        """Take the supervisor's verdicts; ``full`` replaces every earlier one."""
        if full:
            self.down = {}
        for verdict in verdicts:
            if verdict.up:
                self.down.pop(verdict.target, None)
            else:
                self.down[verdict.target] = verdict

    def offset(self, offset: int) -> None:
        """Start every rotation at ``offset`` (the worker's slot), from the next state on."""
        self._offset = offset
        self._routes.clear()

    def forget_routes(self, alive: Callable[[str, str], object]) -> None:
        """Drop the rotations of routes that changed or went (``alive(listener, hostname)``
        gives the current route, or None); the others keep their place."""
        self._routes = {
            key: state for key, state in self._routes.items() if alive(*key) is state.route
        }

    # --- choosing --------------------------------------------------------------------

    def _state(self, listener: str, hostname: str, route: BackendRoute) -> _RouteState:
        key = (listener, hostname)
        state = self._routes.get(key)
        if state is None or state.route is not route:
            state = _RouteState(route, self._targets_of(route), counter=self._offset)
            state.order = {b: i for i, b in enumerate(route.backends)}
            self._routes[key] = state
        return state

    def is_up(self, backend: Address, target: CheckTarget | None) -> bool:
        if target is not None and target in self.down:
            return False
        return not self.passive.ejected(backend)

    def choose(
        self,
        listener: str,
        route: BackendRoute,
        client_ip: str,
        tried: Collection[Address] = (),
    ) -> Address | None:
        """The backend for a new connection or request; None when every one was tried.

        ``tried`` holds the backends this connection already failed to reach:
        pass them to fail over to the next one.
        """
        backends = route.backends
        if len(backends) == 1:
            return None if backends[0] in tried else backends[0]
        state = self._state(listener, route.hostname, route)
        up = [
            b
            for b, target in zip(backends, state.targets, strict=True)
            if b not in tried and self.is_up(b, target)
        ]
        if not up:  # all down (or tried): try the untried ones anyway
            up = [b for b in backends if b not in tried]
            if not up:
                return None
        if len(up) == 1:
            if not tried:
                state.counter += 1
            return up[0]
        if route.balance == "source_ip":
            allowed = set(up)
            return next(b for b in rendezvous(client_ip, backends) if b in allowed)
        if not tried:
            state.counter += 1
        start = (state.counter - 1) % len(backends)
        n = len(backends)
        order = state.order

        def rotation(b: Address) -> int:
            return (order[b] - start) % n

        if route.balance == "least_conn":
            active = self.counts.active
            return min(up, key=lambda b: (active(b), rotation(b)))
        return min(up, key=rotation)

    # --- what happened ------------------------------------------------------------------

    def dial_failed(self, listener: str, route: BackendRoute, backend: Address) -> bool:
        """A dial to ``backend`` failed or timed out; True when this ejects it here."""
        target = self.target(listener, route, backend)
        if target is None:
            return self.passive.failed(backend, 1, PASSIVE_COOLDOWN)
        return self.passive.failed(backend, target.fall, target.interval * target.rise)

    def connected(self, route: BackendRoute, backend: Address) -> bool:
        """A dial succeeded and the connection (L7: stream) is open; True when it is counted
        (``least_conn`` routes): call :meth:`released` when it ends."""
        self.passive.succeeded(backend)
        return self.count(route, backend)

    def count(self, route: BackendRoute, backend: Address) -> bool:
        """Count one open connection or stream to ``backend`` if ``route`` is ``least_conn``
        (True: call :meth:`released` when it ends)."""
        if route.balance != "least_conn":
            return False
        self.counts.opened(backend)
        return True

    def released(self, backend: Address) -> None:
        """A counted connection or stream ended."""
        self.counts.closed(backend)

    def target(self, listener: str, route: BackendRoute, backend: Address) -> CheckTarget | None:
        """The check target of one of a route's backends (None without a check)."""
        state = self._state(listener, route.hostname, route)
        index = state.order.get(backend)
        return None if index is None else state.targets[index]
