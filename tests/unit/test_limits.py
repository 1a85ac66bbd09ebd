"""The shared limits tables: sans-I/O over a bytearray, then real processes over a memfd."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import random
import signal
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcproxy import limits
from mcproxy.limits import (
    WAYS,
    FcntlLock,
    Layout,
    LayoutError,
    NoLock,
    SharedLimits,
    rate_key,
)

SECOND = 1_000_000_000


def table(
    listeners: tuple[str, ...] = ("127.0.0.1:443",), slots: int = 4, buckets: int = 64
) -> SharedLimits:
    layout = Layout(slots=slots, listeners=len(listeners), buckets=buckets)
    buffer = bytearray(layout.size)
    SharedLimits.format(buffer, layout, listeners, seed=bytes(range(16)))
    return SharedLimits(buffer, NoLock())


# --- layout ----------------------------------------------------------------------------


def test_directory_maps_listener_addresses_to_rows() -> None:
    t = table(("127.0.0.1:443", "[::1]:8443", ":80"))
    assert t.listener_index == {"127.0.0.1:443": 0, "[::1]:8443": 1, ":80": 2}
    assert (t.layout.slots, t.layout.buckets) == (4, 64)


def test_an_unformatted_buffer_is_refused() -> None:
    with pytest.raises(LayoutError, match="not a mc-proxy limits table"):
        SharedLimits(bytearray(Layout(slots=1, listeners=1).size), NoLock())


def test_a_truncated_buffer_is_refused() -> None:
    layout = Layout(slots=2, listeners=1, buckets=8)
    buffer = bytearray(layout.size)
    SharedLimits.format(buffer, layout, ["a:1"])
    with pytest.raises(LayoutError, match="need"):
        SharedLimits(buffer[: layout.size - 8], NoLock())


def test_bucket_count_must_be_a_power_of_two() -> None:
    with pytest.raises(LayoutError, match="power of two"):
        Layout(slots=1, listeners=1, buckets=12)


def test_memory_is_fixed_whatever_the_clients() -> None:
    assert Layout(slots=64, listeners=100).size < 3 * 1024 * 1024


# --- connection counters -----------------------------------------------------------------


def test_limit_counts_across_slots() -> None:
    t = table()
    assert [t.try_acquire(0, slot % 4, 5) for slot in range(7)] == [True] * 5 + [False] * 2
    assert t.connections(0) == 5
    t.release(0, 2)
    assert t.connections(0) == 4
    assert t.try_acquire(0, 3, 5)
    assert not t.try_acquire(0, 0, 5)


def test_status_reads_counts_by_listener_address() -> None:
    t = table(("a:1", "b:2"))
    t.try_acquire(1, 0, 0)
    t.try_acquire(1, 3, 0)
    assert (t.listener_connections("a:1"), t.listener_connections("b:2")) == (0, 2)
    assert t.listener_connections("c:3") == 0


def test_zero_means_unlimited_but_still_counted() -> None:
    t = table()
    for _ in range(100):
        assert t.try_acquire(0, 1, 0)
    assert t.connections(0) == 100


def test_listeners_are_counted_apart() -> None:
    t = table(("a:1", "b:2"))
    assert t.try_acquire(0, 0, 1)
    assert not t.try_acquire(0, 1, 1)
    assert t.try_acquire(1, 1, 1)
    assert (t.connections(0), t.connections(1)) == (1, 1)


def test_lowering_the_limit_keeps_open_connections_and_refuses_new_ones() -> None:
    t = table()
    for slot in range(4):
        assert t.try_acquire(0, slot, 10)
    assert not t.try_acquire(0, 0, 3)
    assert t.connections(0) == 4
    for slot in range(2):
        t.release(0, slot)
    assert t.try_acquire(0, 0, 3)


def test_clear_slot_frees_what_a_dead_worker_held() -> None:
    t = table(("a:1", "b:2"))
    for _ in range(3):
        t.try_acquire(0, 2, 10)
    t.try_acquire(1, 2, 10)
    t.try_acquire(0, 1, 10)
    assert t.slot_connections(2) == 4
    assert t.clear_slot(2) == 4
    assert (t.connections(0), t.connections(1)) == (1, 0)
    assert t.clear_slot(2) == 0


def test_release_never_goes_below_zero() -> None:
    t = table()
    t.release(0, 0)  # e.g. a late release after the supervisor cleared the slot
    assert t.connections(0) == 0


# --- rate table ----------------------------------------------------------------------------


def test_rate_key_ipv4_whole_and_ipv6_by_64() -> None:
    assert rate_key("192.0.2.1") == (4, 0xC0000201)
    assert rate_key("2001:db8:1:2::1") == rate_key("2001:db8:1:2:ffff:ffff:ffff:ffff")
    assert rate_key("2001:db8:1:2::1") != rate_key("2001:db8:1:3::1")
    assert rate_key("2001:db8:1:2::1")[0] == 6


def test_rate_limit_per_key_in_window() -> None:
    t = table()
    key = rate_key("192.0.2.1")
    now = 100 * SECOND
    assert [t.hit(*key, now + i, 3, 10 * SECOND) for i in range(5)] == [True] * 3 + [False] * 2
    assert t.hit(*rate_key("192.0.2.2"), now, 3, 10 * SECOND)


def test_window_starts_at_first_connection_and_then_renews() -> None:
    t = table()
    key = rate_key("192.0.2.1")
    start = 50 * SECOND
    assert t.hit(*key, start, 1, 10 * SECOND)
    assert not t.hit(*key, start + 9 * SECOND, 1, 10 * SECOND)
    assert t.hit(*key, start + 10 * SECOND, 1, 10 * SECOND)
    assert not t.hit(*key, start + 19 * SECOND, 1, 10 * SECOND)


def test_ipv4_and_ipv6_with_equal_numbers_are_different_keys() -> None:
    t = table()
    assert t.hit(4, 7, SECOND, 1, SECOND)
    assert t.hit(6, 7, SECOND, 1, SECOND)
    assert not t.hit(4, 7, SECOND, 1, SECOND)


def test_full_bucket_evicts_the_lightest_live_key() -> None:
    t = table(buckets=1)  # every key in one bucket of WAYS entries
    now, window = 10 * SECOND, 60 * SECOND
    heavy = (4, 1)
    for _ in range(5):
        assert t.hit(*heavy, now, 5, window)
    for key in range(2, WAYS + 1):  # fill the other ways with single connections
        assert t.hit(4, key, now + key, 5, window)
    assert t.rate_entries() == WAYS
    # A burst of new keys keeps evicting single-connection entries, never the heavy one.
    for key in range(100, 200):
        assert t.hit(4, key, now + key, 5, window)
    assert t.rate_entries() == WAYS
    assert not t.hit(*heavy, now + 300, 5, window)


def test_full_bucket_reuses_expired_entries_first() -> None:
    t = table(buckets=1)
    window = 10 * SECOND
    for key in range(WAYS):
        assert t.hit(4, key, SECOND, 3, window)
    assert t.hit(4, 0, SECOND, 3, window)  # key 0 now has 2 connections
    later = 12 * SECOND
    for key in range(100, 100 + WAYS):
        assert t.hit(4, key, later, 3, window)
    # Every old window had expired, so the new keys took their entries.
    assert t.hit(4, 0, later, 1, window)  # key 0 starts afresh


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 5), st.integers(0, 3 * SECOND)),  # (client, time step)
        max_size=80,
    ),
    st.integers(1, 4),
)
def test_rate_table_matches_a_plain_model(events: list[tuple[int, int]], limit: int) -> None:
    """With room for every key, the table behaves exactly like a dict of windows."""
    t = table(buckets=64)
    window = 5 * SECOND
    model: dict[int, tuple[int, int]] = {}
    now = SECOND
    for client, step in events:
        now += step
        start, count = model.get(client, (0, 0))
        if client not in model or now - start >= window:
            expected, model[client] = True, (now, 1)
        elif count >= limit:
            expected = False
        else:
            expected, model[client] = True, (start, count + 1)
        assert t.hit(4, client, now, limit, window) is expected


# --- real processes over a memfd -------------------------------------------------------------


@pytest.fixture
def shared() -> Iterator[limits.SharedMemory]:
    memory = limits.create(["127.0.0.1:443"], slots=6, buckets=64)
    yield memory
    memory.close()


def _hammer_connections(
    fd: int, slot: int, *, limit: int, rounds: int, out: multiprocessing.Queue[int]
) -> None:
    """Acquire and release at random; under the row's lock, the count is never over."""
    memory = limits.attach(fd)
    t, rng = memory.limits, random.Random(slot)
    held, admitted, refused = 0, 0, 0
    row_lock = t.layout.counters * limits.WORD
    lock = FcntlLock(fd)
    for _ in range(rounds):
        if held and rng.random() < 0.5:
            t.release(0, slot)
            held -= 1
        elif t.try_acquire(0, slot, limit):
            held, admitted = held + 1, admitted + 1
            lock.acquire(row_lock)
            try:
                total = t.connections(0)
            finally:
                lock.release(row_lock)
            if total > limit:
                os._exit(10)  # over the limit: the test fails on the exit status
        else:
            refused += 1
    for _ in range(held):
        t.release(0, slot)
    out.put(refused)
    out.close()
    out.join_thread()
    os._exit(0)


def test_processes_hammering_never_exceed_the_limit(shared: limits.SharedMemory) -> None:
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue[int] = ctx.Queue()
    workers = [
        ctx.Process(
            target=_hammer_connections,
            args=(shared.fd, slot),
            kwargs={"limit": 5, "rounds": 3000, "out": out},
        )
        for slot in range(6)
    ]
    for process in workers:
        process.start()
    refused = [out.get(timeout=60) for _ in workers]
    for process in workers:
        process.join(60)
    assert [p.exitcode for p in workers] == [0] * 6  # 10: a process saw the count over the limit
    assert sum(refused) > 0  # the limit was reached, so the processes did contend
    assert shared.limits.connections(0) == 0


def _hammer_rate(fd: int, tries: int, out: multiprocessing.Queue[int]) -> None:
    t = limits.attach(fd).limits
    admitted = sum(t.hit(4, 42, time.monotonic_ns(), 50, 3600 * SECOND) for _ in range(tries))
    out.put(admitted)


def test_rate_limit_is_exact_across_processes(shared: limits.SharedMemory) -> None:
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue[int] = ctx.Queue()
    workers = [ctx.Process(target=_hammer_rate, args=(shared.fd, 400, out)) for _ in range(5)]
    for process in workers:
        process.start()
    admitted = [out.get(timeout=60) for _ in workers]
    for process in workers:
        process.join(60)
    assert sum(admitted) == 50


def _hold_and_spin(fd: int, slot: int, ready: multiprocessing.Queue[int]) -> None:
    t = limits.attach(fd).limits
    for _ in range(3):
        t.try_acquire(0, slot, 100)
    ready.put(slot)
    while True:  # take and drop the row lock as fast as possible until killed
        t.try_acquire(0, slot, 100)
        t.release(0, slot)


def test_a_killed_process_leaves_no_lock_and_its_slot_can_be_cleared(
    shared: limits.SharedMemory,
) -> None:
    ctx = multiprocessing.get_context("fork")
    ready: multiprocessing.Queue[int] = ctx.Queue()
    victims = [ctx.Process(target=_hold_and_spin, args=(shared.fd, slot, ready)) for slot in (1, 2)]
    for process in victims:
        process.start()
    assert sorted(ready.get(timeout=30) for _ in victims) == [1, 2]
    for process in victims:
        assert process.pid is not None
        os.kill(process.pid, signal.SIGKILL)
        process.join(10)
    t = shared.limits
    row_lock = t.layout.counters * limits.WORD
    # Were a lock left held, this non-blocking attempt would fail with EAGAIN/EACCES.
    fcntl.lockf(shared.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, row_lock)
    fcntl.lockf(shared.fd, fcntl.LOCK_UN, 1, row_lock)
    held = {slot: t.slot_connections(slot) for slot in (1, 2)}
    assert all(count in (3, 4) for count in held.values())  # killed between acquire and release
    assert t.clear_slot(1) + t.clear_slot(2) == sum(held.values())
    assert t.connections(0) == 0
    assert t.try_acquire(0, 0, 1)


# --- backend counters (least_conn) -------------------------------------------------------


def test_backend_rows_are_claimed_once_and_found_again() -> None:
    t = table(slots=3)
    row = t.backend_row("127.0.0.1:9001")
    assert row is not None
    assert t.backend_row("127.0.0.1:9001") == row
    assert t.backend_row("127.0.0.1:9001", claim=False) == row
    assert t.backend_row("127.0.0.1:9002", claim=False) is None
    other = t.backend_row("127.0.0.1:9002")
    assert other is not None and other != row


def test_backend_counts_sum_every_slot_and_a_dead_slot_is_zeroed() -> None:
    t = table(slots=3)
    row = t.backend_row("10.0.0.1:80")
    assert row is not None
    t.backend_acquire(row, 0)
    t.backend_acquire(row, 1)
    t.backend_acquire(row, 1)
    assert t.backend_connections(row) == 3
    t.backend_release(row, 0)
    t.backend_release(row, 0)  # never below zero
    assert t.backend_connections(row) == 2
    t.clear_slot(1)
    assert t.backend_connections(row) == 0
    assert t.backend_row("10.0.0.1:80", claim=False) == row  # the row stays claimed


def test_a_full_backend_table_says_so() -> None:
    layout = Layout(slots=1, listeners=0, buckets=8, backends=4)
    buffer = bytearray(layout.size)
    SharedLimits.format(buffer, layout, [])
    t = SharedLimits(buffer, NoLock())
    rows = {t.backend_row(f"10.0.0.{i}:80") for i in range(4)}
    assert rows == {0, 1, 2, 3}
    assert t.backend_row("10.0.0.99:80") is None


def test_spare_rows_take_listeners_added_at_runtime() -> None:
    from mcproxy import limits as limits_module

    shared = limits_module.create(["127.0.0.1:1"], slots=4, buckets=8, rows=3)
    try:
        table = shared.limits
        assert table.listener_index == {"127.0.0.1:1": 0}
        row = table.add_listener("127.0.0.1:2")
        assert row == 1 and table.add_listener("127.0.0.1:2") == 1
        assert table.try_acquire(row, 0, 1) and not table.try_acquire(row, 1, 1)
        # Another process's view learns the row from the directory.
        other = limits_module.SharedLimits(shared.mapping, limits_module.NoLock())
        assert other.listener_index["127.0.0.1:2"] == 1
        assert table.add_listener("127.0.0.1:3") == 2
        assert table.add_listener("127.0.0.1:4") is None  # every row taken
        other.reload_directory()
        assert other.listener_index["127.0.0.1:3"] == 2
        other.release_views()
    finally:
        shared.close()
