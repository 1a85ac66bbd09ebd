"""SharedAdmission: the rate limit first, then the listener's limit, over a bytearray table."""

from __future__ import annotations

import pytest

from mcproxy.limits import Layout, NoLock, SharedLimits
from mcproxy.model import Address, Listener
from mcproxy.worker.admission import SharedAdmission
from mcproxy.worker.errors import Reason

LISTENER = Listener(Address("127.0.0.1", 443), max_connections=2)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000_000

    def __call__(self) -> int:
        return self.now


def table(slots: int = 2) -> SharedLimits:
    layout = Layout(slots=slots, listeners=1, buckets=16)
    buffer = bytearray(layout.size)
    SharedLimits.format(buffer, layout, [str(LISTENER.addr)])
    return SharedLimits(buffer, NoLock())


def test_max_connections_across_two_workers_and_release() -> None:
    shared = table()
    one, two = SharedAdmission(shared, 1), SharedAdmission(shared, 2)
    assert one.admit(LISTENER, "192.0.2.1") is None
    assert two.admit(LISTENER, "192.0.2.2") is None
    assert one.admit(LISTENER, "192.0.2.3") is Reason.MAX_CONNECTIONS
    two.release(LISTENER)
    assert one.admit(LISTENER, "192.0.2.3") is None
    assert shared.connections(0) == 2


def test_limit_change_applies_to_the_next_connection() -> None:
    admission = SharedAdmission(table(), 1)
    assert admission.admit(LISTENER, "192.0.2.1") is None
    assert admission.admit(LISTENER, "192.0.2.1") is None
    assert admission.admit(LISTENER, "192.0.2.1") is Reason.MAX_CONNECTIONS
    unlimited = Listener(LISTENER.addr, max_connections=0)
    assert admission.admit(unlimited, "192.0.2.1") is None  # 3 open now
    assert admission.admit(Listener(LISTENER.addr, max_connections=3), "192.0.2.9") is (
        Reason.MAX_CONNECTIONS
    )
    assert admission.admit(Listener(LISTENER.addr, max_connections=4), "192.0.2.9") is None


def test_rate_limit_is_checked_first_and_windows_renew() -> None:
    clock = Clock()
    shared = table()
    admission = SharedAdmission(shared, 1, rate_limit=2, rate_window=10.0, clock=clock)
    roomy = Listener(LISTENER.addr, max_connections=100)
    assert [admission.admit(roomy, "2001:db8::1") for _ in range(2)] == [None, None]
    assert admission.admit(roomy, "2001:db8::ffff") is Reason.RATE_LIMIT  # same /64
    assert admission.admit(roomy, "2001:db8:0:1::1") is None  # another /64
    assert shared.connections(0) == 3  # the refused one took no slot
    clock.now += 10_000_000_000
    assert admission.admit(roomy, "2001:db8::1") is None


def test_a_listener_missing_from_the_table_is_not_limited() -> None:
    admission = SharedAdmission(table(), 1)
    other = Listener(Address("127.0.0.1", 8443), max_connections=1)
    assert admission.admit(other, "192.0.2.1") is None
    assert admission.admit(other, "192.0.2.1") is None
    admission.release(other)


def test_slot_outside_the_table_is_a_bug() -> None:
    with pytest.raises(ValueError, match="outside"):
        SharedAdmission(table(slots=2), 3)
