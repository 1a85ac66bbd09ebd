"""The balancers and the worker's view of backend health, with values only."""

from __future__ import annotations

import collections
import ipaddress
from dataclasses import dataclass

from mcproxy.health import CheckTarget, Verdict
from mcproxy.model import Address
from mcproxy.worker.balance import BackendRoute, Balancer, LocalCounts, rendezvous

A, B, C = (Address("127.0.0.1", port) for port in (9001, 9002, 9003))


@dataclass(frozen=True)
class FakeRoute:
    backends: tuple[Address, ...]
    balance: str = "round_robin"
    checked: bool = False
    hostname: str = "h"


def check(backend: Address) -> CheckTarget:
    return CheckTarget(backend, "tcp", 1.0, 0.5, rise=2, fall=3)


def targets_of(route: BackendRoute) -> tuple[CheckTarget | None, ...]:
    assert isinstance(route, FakeRoute)
    return tuple(check(b) if route.checked else None for b in route.backends)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def balancer(clock: Clock | None = None, offset: int = 0) -> Balancer:
    return Balancer(clock or Clock(), targets_of, LocalCounts(), offset=offset)


def picks(b: Balancer, route: FakeRoute, n: int, ip: str = "192.0.2.1") -> list[Address]:
    return [b.choose("l", route, ip) or Address("none", 1) for _ in range(n)]


def test_round_robin_rotates_and_workers_start_at_their_own_offset() -> None:
    route = FakeRoute((A, B, C))
    assert picks(balancer(), route, 6) == [A, B, C, A, B, C]
    assert picks(balancer(offset=1), route, 3) == [B, C, A]


def test_a_single_backend_is_always_chosen_until_tried() -> None:
    b = balancer()
    route = FakeRoute((A,))
    assert b.choose("l", route, "192.0.2.1") == A
    assert b.choose("l", route, "192.0.2.1", tried={A}) is None


def test_failover_goes_to_the_next_backend_then_gives_up() -> None:
    b = balancer()
    route = FakeRoute((A, B, C))
    first = b.choose("l", route, "192.0.2.1")
    assert first == A
    assert b.choose("l", route, "192.0.2.1", tried={A}) == B
    assert b.choose("l", route, "192.0.2.1", tried={A, B}) == C
    assert b.choose("l", route, "192.0.2.1", tried={A, B, C}) is None
    assert b.choose("l", route, "192.0.2.1") == B  # retries did not move the rotation


def test_a_backend_down_by_verdict_is_skipped_and_comes_back() -> None:
    b = balancer()
    route = FakeRoute((A, B, C), checked=True)
    b.set_verdicts([Verdict(check(B), False, "refused", 0.0)])
    assert set(picks(b, route, 10)) == {A, C}
    b.set_verdicts([Verdict(check(B), True, "connected", 1.0)])
    assert set(picks(b, route, 10)) == {A, B, C}
    b.set_verdicts([Verdict(check(A), False, "x", 0.0)])
    b.set_verdicts([], full=True)  # a full set replaces the earlier verdicts
    assert set(picks(b, route, 10)) == {A, B, C}


def test_a_verdict_for_other_check_settings_does_not_apply() -> None:
    b = balancer()
    route = FakeRoute((A, B), checked=True)
    other = CheckTarget(B, "http", 1.0, 0.5, 2, 3, path="/other")
    b.set_verdicts([Verdict(other, False, "HTTP 503", 0.0)])
    assert set(picks(b, route, 4)) == {A, B}


def test_when_every_backend_is_down_all_are_tried_anyway() -> None:
    b = balancer()
    route = FakeRoute((A, B), checked=True)
    b.set_verdicts([Verdict(check(A), False, "x", 0.0), Verdict(check(B), False, "x", 0.0)])
    assert set(picks(b, route, 4)) == {A, B}
    first = b.choose("l", route, "192.0.2.1")
    assert first is not None
    assert b.choose("l", route, "192.0.2.1", tried={first}) not in (None, first)


def test_passive_ejection_and_its_expiry() -> None:
    clock = Clock()
    b = balancer(clock)
    route = FakeRoute((A, B))  # no check: one failure ejects for 10 s
    assert b.dial_failed("l", route, A)
    assert set(picks(b, route, 4)) == {B}
    clock.now = 10.5
    assert set(picks(b, route, 4)) == {A, B}
    b.connected(route, A)
    assert not b.passive.ejected(A)


def test_passive_ejection_follows_the_checks_fall_and_rise() -> None:
    clock = Clock()
    b = balancer(clock)
    route = FakeRoute((A, B), checked=True)  # fall 3, rise 2, interval 1 s: ejected for 2 s
    assert not b.dial_failed("l", route, A)
    assert not b.dial_failed("l", route, A)
    assert b.dial_failed("l", route, A)
    assert b.passive.ejected(A)
    clock.now = 2.5
    assert not b.passive.ejected(A)
    assert b.dial_failed("l", route, A)  # the probe after the cooldown failed: out again
    assert b.connected(route, A) is False  # not least_conn: not counted
    assert not b.passive.ejected(A)


def test_least_conn_prefers_the_backend_with_fewest_connections() -> None:
    counts = LocalCounts()
    b = Balancer(Clock(), targets_of, counts)
    route = FakeRoute((A, B, C), balance="least_conn")
    for _ in range(5):
        counts.opened(A)
    counts.opened(B)
    assert b.choose("l", route, "192.0.2.1") == C
    counts.opened(C)
    counts.opened(C)
    assert b.choose("l", route, "192.0.2.1") == B
    # ties rotate instead of always landing on the first backend
    fresh = Balancer(Clock(), targets_of, LocalCounts())
    assert set(picks(fresh, route, 3)) == {A, B, C}


def test_source_ip_is_sticky_and_spreads_over_many_clients() -> None:
    route = FakeRoute((A, B, C), balance="source_ip")
    one, other = balancer(), balancer(offset=5)  # two workers
    assert len(set(picks(one, route, 20, ip="198.51.100.7"))) == 1
    assert picks(one, route, 1, ip="198.51.100.7") == picks(other, route, 1, ip="198.51.100.7")
    clients = [str(ipaddress.IPv4Address(0x0A000000 + i)) for i in range(3000)]
    spread = collections.Counter(one.choose("l", route, ip) for ip in clients)
    assert all(800 < spread[backend] < 1200 for backend in (A, B, C)), spread


def test_source_ip_reshuffles_only_the_clients_of_a_backend_that_leaves_or_joins() -> None:
    backends = [Address("10.1.0.1", 8000 + i) for i in range(10)]
    clients = [str(ipaddress.IPv4Address(0xC0000000 + 7919 * i)) for i in range(10_000)]
    before = {ip: rendezvous(ip, backends)[0] for ip in clients}
    gone = backends[3]
    after = {ip: rendezvous(ip, [b for b in backends if b != gone])[0] for ip in clients}
    moved = [ip for ip in clients if before[ip] != after[ip]]
    assert all(before[ip] == gone for ip in moved)  # only the leaver's clients move
    assert len(moved) < 10_000 / 10 * 1.2  # about 1/N of them
    joined = Address("10.1.0.99", 8000)
    grown = {ip: rendezvous(ip, [*backends, joined])[0] for ip in clients}
    moved = [ip for ip in clients if before[ip] != grown[ip]]
    assert all(grown[ip] == joined for ip in moved)  # only towards the newcomer
    assert len(moved) < 10_000 / 11 * 1.2


def test_source_ip_skips_a_down_backend_for_its_clients_only() -> None:
    b = balancer()
    route = FakeRoute((A, B, C), balance="source_ip", checked=True)
    clients = [f"203.0.113.{i}" for i in range(1, 200)]
    before = {ip: b.choose("l", route, ip) for ip in clients}
    b.set_verdicts([Verdict(check(B), False, "x", 0.0)])
    after = {ip: b.choose("l", route, ip) for ip in clients}
    assert B not in after.values()
    assert all(after[ip] == before[ip] for ip in clients if before[ip] != B)


def test_a_changed_route_restarts_its_rotation() -> None:
    b = balancer()
    assert picks(b, FakeRoute((A, B, C)), 2) == [A, B]
    assert picks(b, FakeRoute((C, A)), 2) == [C, A]


def test_shared_counts_add_up_across_worker_slots() -> None:
    from mcproxy.limits import Layout, NoLock, SharedLimits
    from mcproxy.worker.balance import SharedCounts

    layout = Layout(slots=2, listeners=0, buckets=8, backends=2)
    buffer = bytearray(layout.size)
    SharedLimits.format(buffer, layout, [])
    shared = SharedLimits(buffer, NoLock())
    one, two = SharedCounts(shared, 0), SharedCounts(shared, 1)
    one.opened(A)
    two.opened(A)
    two.opened(B)
    assert (one.active(A), one.active(B)) == (2, 1)
    two.closed(A)
    assert one.active(A) == 1
    one.opened(C)  # the table (2 rows) is full: counted in this worker alone
    assert (one.active(C), two.active(C)) == (1, 0)
