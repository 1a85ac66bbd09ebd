"""The health-check state machine and schedule, on an injected clock."""

from __future__ import annotations

from mcproxy.health import CheckTarget, HealthState, Monitor
from mcproxy.model import Address


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def target(port: int = 9000, interval: float = 1.0, rise: int = 2, fall: int = 3) -> CheckTarget:
    return CheckTarget(Address("127.0.0.1", port), "tcp", interval, 0.5, rise, fall)


def test_starts_up_and_falls_after_fall_failures_in_a_row() -> None:
    s = HealthState(rise=2, fall=3, now=0.0)
    assert s.up
    assert not s.observe(False, "refused", 1.0)
    assert not s.observe(False, "refused", 2.0)
    assert not s.observe(True, "connected", 3.0)  # a success resets the failures
    assert not s.observe(False, "refused", 4.0)
    assert not s.observe(False, "refused", 5.0)
    assert s.observe(False, "timeout", 6.0)
    assert (s.up, s.reason, s.since) == (False, "timeout", 6.0)


def test_rises_after_rise_successes_in_a_row() -> None:
    s = HealthState(rise=2, fall=1, now=0.0)
    assert s.observe(False, "HTTP 503", 1.0)
    assert not s.observe(True, "HTTP 200", 2.0)
    assert not s.observe(False, "HTTP 503", 3.0)  # a failure resets the successes
    assert not s.observe(True, "HTTP 200", 4.0)
    assert s.observe(True, "HTTP 200", 5.0)
    assert s.up and s.since == 5.0


def test_first_checks_are_spread_over_the_first_interval() -> None:
    clock = Clock()
    monitor = Monitor(clock)
    targets = [target(port) for port in range(9000, 9100)]
    monitor.set_targets(targets)
    assert monitor.due() == []  # nothing at the very start...
    seen: list[CheckTarget] = []
    for _ in range(10):
        clock.now += 0.1
        batch = monitor.due()
        seen += batch
        assert len(batch) < 40  # ...and no single tenth of the interval takes them all
        for t in batch:
            monitor.report(t, True, "connected")
    assert sorted(seen, key=lambda t: t.address.port) == targets


def test_next_check_is_one_interval_after_the_last_start_never_overlapping() -> None:
    clock = Clock()
    t = target(interval=1.0)
    monitor = Monitor(clock, spread=lambda _: 0.0)
    monitor.set_targets([t])
    assert monitor.due() == [t]
    assert monitor.due() == []  # in progress: not started twice
    assert monitor.next_due() is None
    clock.now += 0.3
    monitor.report(t, True, "connected")
    assert monitor.next_due() == 101.0
    clock.now = 101.0
    assert monitor.due() == [t]
    clock.now = 103.5  # took longer than the interval: the next one starts at once
    monitor.report(t, True, "connected")
    assert monitor.next_due() == 103.5


def test_verdict_only_on_a_change_of_state() -> None:
    clock = Clock()
    t = target(rise=1, fall=2)
    monitor = Monitor(clock, spread=lambda _: 0.0)
    monitor.set_targets([t])

    def check(ok: bool, reason: str) -> object:
        assert monitor.due() == [t]
        verdict = monitor.report(t, ok, reason)
        clock.now += t.interval
        return verdict

    assert check(False, "refused") is None
    down = check(False, "refused")
    assert down is not None and not down.up and down.reason == "refused"  # type: ignore[attr-defined]
    assert check(False, "refused") is None
    up = check(True, "connected")
    assert up is not None and up.up  # type: ignore[attr-defined]
    assert [v.up for v in monitor.verdicts()] == [True]


def test_dropped_targets_stop_and_a_late_result_is_ignored() -> None:
    clock = Clock()
    a, b = target(9000), target(9001)
    monitor = Monitor(clock, spread=lambda _: 0.0)
    monitor.set_targets([a, b])
    assert set(monitor.due()) == {a, b}
    assert monitor.set_targets([b]) == [a]
    assert monitor.report(a, False, "refused") is None
    monitor.report(b, True, "connected")
    clock.now += 5
    assert monitor.due() == [b]


def test_the_same_backend_with_other_settings_is_another_target() -> None:
    a = target(9000)
    same = target(9000)
    other = CheckTarget(Address("127.0.0.1", 9000), "http", 1.0, 0.5, 2, 3, path="/ready")
    monitor = Monitor(Clock())
    monitor.set_targets([a, same, other])
    assert len(monitor.states) == 2


def test_routes_sharing_a_backend_and_check_share_one_target() -> None:
    from mcproxy.health import route_targets, state_targets
    from mcproxy.model import (
        FirewallRules,
        HealthCheck,
        HealthCheckKind,
        Listener,
        Mode,
        Route,
        make_state,
    )

    tcp = HealthCheck(HealthCheckKind.TCP, interval=1.0)
    http = HealthCheck(HealthCheckKind.HTTP, interval=1.0, path="/ready")
    a, b = Address("127.0.0.1", 9001), Address("127.0.0.1", 9002)
    one = Route("one.test", (a, b), health_check=tcp)
    two = Route("two.test", (b,), health_check=tcp, mode=Mode.L7, backend_tls=True)
    three = Route("three.test", (b,), health_check=http, mode=Mode.L7)
    plain = Route("plain.test", (a,))
    assert route_targets(plain) == (None,)
    assert route_targets(one)[1] == route_targets(two)[0]  # tcp ignores the TLS settings
    (h2c,) = route_targets(three)
    assert h2c is not None
    assert (h2c.kind, h2c.protocol, h2c.tls, h2c.path) == ("http", "h2", False, "/ready")
    l4 = route_targets(Route("l4.test", (a,), health_check=http))[0]
    assert l4 is not None and (l4.tls, l4.protocol, l4.server_name, l4.verify) == (
        True,
        "h1",
        "l4.test",
        False,
    )
    state = make_state(
        1,
        [Listener(Address("127.0.0.1", 443), routes={r.hostname: r for r in (one, two, three)})],
        FirewallRules(),
    )
    users = state_targets(state)
    assert len(users) == 3
    shared = route_targets(two)[0]
    assert shared is not None
    assert users[shared] == (
        ("127.0.0.1:443", "one.test"),
        ("127.0.0.1:443", "two.test"),
    )
