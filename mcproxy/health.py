"""Backend health: what one check probes, its up/down state machine, and the schedule.

Sans-I/O on an injected clock (ARCHITECTURE.md, "Backends and health"). The
supervisor's runner (:mod:`mcproxy.supervisor.health`) asks :class:`Monitor`
which checks are due, runs them, and reports each result; the monitor answers
with a :class:`Verdict` when a backend changes state, which the supervisor
logs, exports and sends to every worker. Workers only ever see verdicts.

* **One check per distinct target.** A :class:`CheckTarget` is everything that
  decides what a probe does: the address, the check's settings and the TLS and
  protocol settings it is made with. Routes (and workers) that share a backend
  with the same settings share one target, so one probe.
* **Rise and fall.** A backend starts up (a restart starts from "up"); ``fall``
  failures in a row take it down, ``rise`` successes in a row bring it back. A
  result that agrees with the current state resets the opposite count.
* **Schedule.** A new target's first check is spread over its first interval
  (by a stable hash), so a thousand backends added at once do not all fire in
  the same millisecond. A check is never run twice at once: the next starts
  ``interval`` after the previous one started, or at once if it took longer.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from mcproxy.model import Address, HealthCheckKind, Mode, ProxyState, Route

__all__ = [
    "BackendState",
    "CheckTarget",
    "HealthState",
    "Monitor",
    "RouteKey",
    "Verdict",
    "route_states",
    "route_targets",
    "state_targets",
]

RouteKey = tuple[str, str]
"""(listener address, route hostname)."""


@dataclass(frozen=True, slots=True)
class CheckTarget:
    """What one active check probes; equal targets share a single probe."""

    address: Address
    kind: str
    """``tcp`` (a connect) or ``http`` (a GET of ``path``, healthy on 2xx/3xx)."""
    interval: float
    timeout: float
    rise: int
    fall: int
    path: str = "/healthz"
    protocol: str = "h2"
    """For ``http``: ``h2`` (prior knowledge in cleartext, ALPN h2 over TLS) or ``h1``."""
    tls: bool = False
    server_name: str | None = None
    """SNI and the name verified; None: the address's host (no SNI for an IP)."""
    verify: bool = True
    ca: str | None = None
    client_cert: str | None = None
    client_key: str | None = None

    def describe(self) -> str:
        what = "tcp" if self.kind == "tcp" else f"http {self.protocol} {self.path}"
        return f"{self.address} ({what}{' tls' if self.tls else ''})"


@dataclass(frozen=True, slots=True)
class Verdict:
    """A target's state as the supervisor sees it; sent to every worker."""

    target: CheckTarget
    up: bool
    reason: str
    """Why (the last check's result: ``connected``, ``HTTP 503``, ``timeout``...)."""
    since: float
    """When (the monitor's clock) it entered this state."""


class HealthState:
    """The rise/fall counter of one target."""

    __slots__ = ("failures", "fall", "reason", "rise", "since", "successes", "up")

    def __init__(self, rise: int, fall: int, now: float, up: bool = True) -> None:
        self.rise = max(1, rise)
        self.fall = max(1, fall)
        self.up = up
        self.successes = 0
        self.failures = 0
        self.reason = "not checked yet"
        self.since = now

    def observe(self, ok: bool, reason: str, now: float) -> bool:
        """Count one check's result; True when this flips the state."""
        self.reason = reason
        if ok:
            self.failures = 0
            self.successes += 1
            if not self.up and self.successes >= self.rise:
                self.up, self.since, self.successes = True, now, 0
                return True
        else:
            self.successes = 0
            self.failures += 1
            if self.up and self.failures >= self.fall:
                self.up, self.since, self.failures = False, now, 0
                return True
        return False


def _spread(target: CheckTarget) -> float:
    """A stable fraction in [0, 1) for the first check's offset."""
    digest = hashlib.blake2b(repr(target).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class Monitor:
    """Which checks are due, and the state each result leads to.

    Drive it with :meth:`set_targets` (the targets of the current state),
    :meth:`due` (the checks to start now), :meth:`report` (a check's result)
    and :meth:`next_due` (when to wake up).
    """

    def __init__(
        self, clock: Callable[[], float], spread: Callable[[CheckTarget], float] = _spread
    ) -> None:
        self._clock = clock
        self._spread = spread
        self.states: dict[CheckTarget, HealthState] = {}
        self._started: dict[CheckTarget, float] = {}
        """Checks in progress, by start time."""
        self._queue: list[tuple[float, int, CheckTarget]] = []
        self._scheduled: dict[CheckTarget, tuple[float, int]] = {}
        self._seq = 0

    def set_targets(self, targets: Iterable[CheckTarget]) -> list[CheckTarget]:
        """Check exactly ``targets`` from now on; returns the ones dropped.

        A new target starts up and is first checked within its first interval.
        """
        now = self._clock()
        wanted = set(targets)
        dropped = [t for t in self.states if t not in wanted]
        for target in dropped:
            del self.states[target]
            self._started.pop(target, None)
            self._scheduled.pop(target, None)  # its queue entry is skipped when popped
        for target in wanted:
            if target not in self.states:
                self.states[target] = HealthState(target.rise, target.fall, now)
                self._schedule(target, now + self._spread(target) * target.interval)
        return dropped

    def _schedule(self, target: CheckTarget, at: float) -> None:
        self._seq += 1
        self._scheduled[target] = (at, self._seq)
        heapq.heappush(self._queue, (at, self._seq, target))

    def due(self) -> list[CheckTarget]:
        """The checks to start now; each is in progress until :meth:`report`."""
        now = self._clock()
        ready: list[CheckTarget] = []
        while self._queue and self._queue[0][0] <= now:
            at, seq, target = heapq.heappop(self._queue)
            if self._scheduled.get(target) != (at, seq):
                continue  # dropped, or rescheduled since
            del self._scheduled[target]
            self._started[target] = now
            ready.append(target)
        return ready

    def next_due(self) -> float | None:
        """When the next check is due (the monitor's clock), or None if nothing is scheduled."""
        while self._queue:
            at, seq, target = self._queue[0]
            if self._scheduled.get(target) == (at, seq):
                return at
            heapq.heappop(self._queue)
        return None

    def report(self, target: CheckTarget, ok: bool, reason: str) -> Verdict | None:
        """A check of ``target`` ended; a :class:`Verdict` when its state changed."""
        now = self._clock()
        started = self._started.pop(target, None)
        state = self.states.get(target)
        if state is None or started is None:
            return None  # dropped while it ran
        self._schedule(target, max(now, started + target.interval))
        if state.observe(ok, reason, now):
            return Verdict(target, state.up, reason, state.since)
        return None

    def verdicts(self) -> list[Verdict]:
        """Every target's current state (for a new worker, status and metrics)."""
        return [Verdict(t, s.up, s.reason, s.since) for t, s in self.states.items()]


def route_targets(route: Route) -> tuple[CheckTarget | None, ...]:
    """The check target of each of ``route``'s backends (None: the route has no check).

    ``tcp`` is a bare connect, whatever the route's TLS: routes that share the
    address share the check. ``http`` on an l7 route speaks the route's backend
    protocol over its backend TLS settings (verified as the proxy verifies);
    on an l4 route the backend expects the client's TLS, so the GET is HTTP/1.1
    over TLS with the route's hostname as SNI, unverified (the proxy holds no
    trust for a passthrough backend).
    """
    check = route.health_check
    if check is None:
        return (None,) * len(route.backends)
    if check.kind is HealthCheckKind.TCP:
        return tuple(
            CheckTarget(b, "tcp", check.interval, check.timeout, check.rise, check.fall, path="")
            for b in route.backends
        )
    base = (check.interval, check.timeout, check.rise, check.fall)
    if route.mode is Mode.L7:
        tls = route.backend_tls
        return tuple(
            CheckTarget(
                b,
                "http",
                *base,
                path=check.path,
                protocol=route.backend_protocol.value,
                tls=tls,
                server_name=route.backend_server_name if tls else None,
                ca=route.backend_ca if tls else None,
                client_cert=route.backend_client_cert if tls else None,
                client_key=route.backend_client_key if tls else None,
            )
            for b in route.backends
        )
    sni = route.hostname if "*" not in route.hostname else None
    return tuple(
        CheckTarget(
            b,
            "http",
            *base,
            path=check.path,
            protocol="h1",
            tls=True,
            server_name=sni,
            verify=False,
        )
        for b in route.backends
    )


def state_targets(state: ProxyState) -> dict[CheckTarget, tuple[RouteKey, ...]]:
    """Every target the supervisor checks, with the routes that use it."""
    users: dict[CheckTarget, list[RouteKey]] = {}
    for addr, listener in state.listeners.items():
        for hostname, route in listener.routes.items():
            for target in route_targets(route):
                if target is not None:
                    users.setdefault(target, []).append((addr, hostname))
    return {target: tuple(keys) for target, keys in users.items()}


@dataclass(frozen=True, slots=True)
class BackendState:
    """One backend of a route as the supervisor sees it (``routes list``, metrics)."""

    address: Address
    up: bool
    reason: str
    checked: bool


def route_states(route: Route, verdicts: Mapping[CheckTarget, Verdict]) -> list[BackendState]:
    """Each of ``route``'s backends with the supervisor's verdict (up when unchecked)."""
    states = []
    for backend, target in zip(route.backends, route_targets(route), strict=True):
        if target is None:
            states.append(BackendState(backend, True, "", False))
            continue
        verdict = verdicts.get(target)
        if verdict is None:
            states.append(BackendState(backend, True, "not checked yet", True))
        else:
            states.append(BackendState(backend, verdict.up, verdict.reason, True))
    return states
