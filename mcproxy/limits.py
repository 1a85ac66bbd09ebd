"""Limits that hold across every worker: one shared buffer, kernel byte-range locks.

With N workers behind SO_REUSEPORT, a limit kept in one worker is a limit
times N (invariant 4). The supervisor creates one anonymous shared file
(``memfd``), every worker maps it, and the limits live in it:

* **Connection counters**, one row per listener with one cell per worker slot.
  A worker only ever writes its own cell, so a listener's count is the sum of
  its row. Admitting under a limit is check-then-increment, made atomic by a
  POSIX byte-range lock (``fcntl(F_SETLKW)``) on one byte that stands for the
  row. The kernel drops a process's POSIX locks when it dies, so no crash can
  leave a lock held; the cells of a dead worker are zeroed by the supervisor
  when it reaps it, before the slot gets a new worker. Releasing a connection
  is a plain store to the worker's own cell, taken without the lock: a reader
  that races with it sees the old, higher count and refuses at worst, never
  admits too many.
* **The per-IP rate table**: a fixed-size, set-associative hash table (each key
  hashes to one bucket of :data:`WAYS` entries; the bucket's lock guards it).
  Keys are IPv4 addresses and IPv6 /64 prefixes; each entry counts the new
  connections of one key in a fixed window that starts at its first
  connection. When a bucket is full of live windows, the entry with the
  fewest connections (then the oldest window) is evicted, so the table's
  memory is fixed whatever the number of clients, and an address spraying
  single connections cannot push a heavy hitter out.
* **Backend counters** for ``balance: least_conn``: a fixed table of
  :data:`BACKEND_ROWS` rows, each a key word (a 63-bit hash of the backend's
  address, top bit set; 0 = free) and one cell per worker slot. A worker
  claims a backend's row the first time it needs it (open addressing, under
  one lock; rows are never freed, a full table means "count locally"), then
  changes only its own cell, exactly like the connection counters, and the
  supervisor zeroes a dead slot's cells with the rest.

Everything except :class:`FcntlLock` and the ``create``/``attach`` functions at
the bottom is sans-I/O: the tables work on any writable buffer with any lock,
which is how the unit tests drive them.

Assumptions, stated once: cells are 8-byte aligned and written with single
8-byte stores (``memoryview`` of format ``Q``), which do not tear on the 64-bit
platforms we run on; the monotonic clock (``CLOCK_MONOTONIC``) is the same in
every process of a host.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import secrets
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "BACKEND_ROWS",
    "BUCKETS",
    "WAYS",
    "FcntlLock",
    "Layout",
    "LayoutError",
    "NoLock",
    "RangeLock",
    "SharedLimits",
    "SharedMemory",
    "attach",
    "create",
    "rate_key",
]

MAGIC = 0x4D43_5052_4F58_5931  # "MCPROXY1"
VERSION = 2
WORD = 8
NAME_WORDS = 8
"""A listener address in the directory: up to 64 bytes of UTF-8, NUL-padded."""
HEADER_WORDS = 16
BUCKETS = 8192
"""Rate-table buckets; with :data:`WAYS` entries of 32 bytes each: 2 MiB, 65,536 keys."""
WAYS = 8
ENTRY_WORDS = 4
"""key, family (0 = empty), window start (monotonic ns), count."""
_MASK64 = (1 << 64) - 1
BACKEND_ROWS = 1024
"""Backends that ``least_conn`` routes can count across workers (about 8 KiB per slot)."""
_BACKEND_PROBES = 32


class LayoutError(Exception):
    """The buffer is not a limits table of this version (or is too small)."""


class RangeLock(Protocol):
    """An exclusive lock on one byte offset of the shared buffer, across processes."""

    def acquire(self, offset: int) -> None: ...

    def release(self, offset: int) -> None: ...


class NoLock:
    """For one process alone: tests, and tools that only read."""

    def acquire(self, offset: int) -> None:
        return None

    def release(self, offset: int) -> None:
        return None


@dataclass(frozen=True, slots=True)
class Layout:
    """Where each part sits, in 8-byte words from the start of the buffer."""

    slots: int
    listeners: int
    buckets: int = BUCKETS
    backends: int = BACKEND_ROWS

    def __post_init__(self) -> None:
        if self.slots < 1 or self.listeners < 0 or self.buckets < 1 or self.backends < 1:
            raise LayoutError(f"bad layout {self}")
        if self.buckets & (self.buckets - 1):
            raise LayoutError("the bucket count must be a power of two")

    @property
    def directory(self) -> int:
        return HEADER_WORDS

    @property
    def counters(self) -> int:
        return self.directory + self.listeners * NAME_WORDS

    @property
    def rate_table(self) -> int:
        return self.counters + self.listeners * self.slots

    @property
    def backend_table(self) -> int:
        return self.rate_table + self.buckets * WAYS * ENTRY_WORDS

    @property
    def words(self) -> int:
        return self.backend_table + self.backends * (1 + self.slots)

    @property
    def size(self) -> int:
        return self.words * WORD


def rate_key(ip: str) -> tuple[int, int]:
    """(family, key) for a canonical client IP: IPv4 whole, IPv6 by its /64 prefix.

    One IPv6 subscriber usually gets a whole /64, so counting single IPv6
    addresses would let every client walk around the limit.
    """
    if ":" in ip:
        return 6, int.from_bytes(socket.inet_pton(socket.AF_INET6, ip)[:8], "big")
    return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, ip), "big")


class SharedLimits:
    """The connection counters and the rate table over one shared buffer.

    ``buffer`` must be writable, 8-byte aligned and :attr:`Layout.size` long;
    ``lock`` locks byte offsets of that same buffer across processes.
    """

    def __init__(self, buffer: memoryview | bytearray | mmap.mmap, lock: RangeLock) -> None:
        words = memoryview(buffer).cast("B").cast("Q")
        if len(words) < HEADER_WORDS or words[0] != MAGIC or words[1] != VERSION:
            raise LayoutError("not a mc-proxy limits table of this version")
        self.layout = Layout(
            slots=words[2], listeners=words[3], buckets=words[4], backends=words[7]
        )
        if len(words) < self.layout.words:
            raise LayoutError(f"buffer of {len(words) * WORD} bytes, need {self.layout.size}")
        self._words = words
        self._lock = lock
        self._hash_a, self._hash_b = words[5], words[6]
        self._bucket_shift = 64 - (self.layout.buckets.bit_length() - 1)
        self.listener_index: dict[str, int] = {}
        """Listener address (``str(Listener.addr)``) -> row."""
        self.reload_directory()

    @staticmethod
    def format(
        buffer: memoryview | bytearray | mmap.mmap,
        layout: Layout,
        listeners: Sequence[str],
        seed: bytes | None = None,
    ) -> None:
        """Write an empty table for ``listeners`` into a zero-filled ``buffer``."""
        if len(listeners) > layout.listeners:
            raise LayoutError("the layout has fewer rows than listeners")
        words = memoryview(buffer).cast("B").cast("Q")
        if len(words) < layout.words:
            raise LayoutError(f"buffer of {len(words) * WORD} bytes, need {layout.size}")
        seed = seed if seed is not None else secrets.token_bytes(16)
        # Random odd multipliers: a client cannot aim many keys at one bucket.
        hash_a = int.from_bytes(seed[:8], "big") | 1
        hash_b = int.from_bytes(seed[8:16], "big") | 1
        words[2], words[3], words[4], words[5], words[6], words[7] = (
            layout.slots,
            layout.listeners,
            layout.buckets,
            hash_a,
            hash_b,
            layout.backends,
        )
        raw = words.cast("B")
        for index, name in enumerate(listeners):
            encoded = name.encode()
            if len(encoded) > NAME_WORDS * WORD:
                raise LayoutError(f"listener address {name!r} is too long")
            start = (layout.directory + index * NAME_WORDS) * WORD
            raw[start : start + len(encoded)] = encoded
        words[1] = VERSION
        words[0] = MAGIC  # last: a reader never sees a half-written header as valid

    def reload_directory(self) -> None:
        """Re-read the listener rows (a worker does when it meets a listener added at
        runtime: the supervisor writes its row before the change reaches any worker)."""
        self.listener_index = {
            name: index for index, name in enumerate(self._read_directory()) if name
        }

    def add_listener(self, name: str) -> int | None:
        """The row of listener ``name``, taking a free one if it has none (supervisor
        only); None when every row is taken. A row is never freed: a listener removed
        and added again gets its old row, where its still-open connections count."""
        if name in self.listener_index:
            return self.listener_index[name]
        encoded = name.encode()
        if len(encoded) > NAME_WORDS * WORD:
            raise LayoutError(f"listener address {name!r} is too long")
        taken = set(self.listener_index.values())
        free = next((i for i in range(self.layout.listeners) if i not in taken), None)
        if free is None:
            return None
        row = self._row(free)
        for cell in range(row, row + self.layout.slots):
            self._words[cell] = 0
        raw = self._words.cast("B")
        start = (self.layout.directory + free * NAME_WORDS) * WORD
        raw[start : start + len(encoded)] = encoded
        self.listener_index[name] = free
        return free

    def _read_directory(self) -> Iterable[str]:
        raw = self._words.cast("B")
        for index in range(self.layout.listeners):
            start = (self.layout.directory + index * NAME_WORDS) * WORD
            yield bytes(raw[start : start + NAME_WORDS * WORD]).rstrip(b"\0").decode()

    # --- connection counters ---------------------------------------------------------

    def _row(self, listener: int) -> int:
        return self.layout.counters + listener * self.layout.slots

    def try_acquire(self, listener: int, slot: int, limit: int) -> bool:
        """Count one more connection of ``listener`` in worker slot ``slot`` (0-based)
        unless the listener already has ``limit`` (0 = unlimited) across all slots."""
        row = self._row(listener)
        cell = row + slot
        words = self._words
        if limit <= 0:
            words[cell] += 1  # our own cell: nobody else writes it
            return True
        offset = row * WORD
        self._lock.acquire(offset)
        try:
            if sum(words[row : row + self.layout.slots]) >= limit:
                return False
            words[cell] += 1
            return True
        finally:
            self._lock.release(offset)

    def release(self, listener: int, slot: int) -> None:
        """One connection counted by :meth:`try_acquire` in this slot has ended."""
        cell = self._row(listener) + slot
        if self._words[cell]:
            self._words[cell] -= 1

    def connections(self, listener: int) -> int:
        """Open connections of ``listener`` across all slots (a moment's reading, no lock)."""
        row = self._row(listener)
        return sum(self._words[row : row + self.layout.slots])

    def listener_connections(self, addr: str) -> int:
        """Open connections of the listener at ``addr`` (0 for an unknown one); this is the
        supervisor's ``status.ConnectionCounts``."""
        row = self.listener_index.get(addr)
        return 0 if row is None else self.connections(row)

    def slot_connections(self, slot: int) -> int:
        return sum(
            self._words[self._row(listener) + slot] for listener in range(self.layout.listeners)
        )

    def clear_slot(self, slot: int) -> int:
        """Zero a dead worker's cells; returns how many connections they held.

        Only the supervisor calls this, after reaping the slot's worker and
        before starting the next one, so no live process writes these cells.
        """
        freed = 0
        for listener in range(self.layout.listeners):
            cell = self._row(listener) + slot
            freed += self._words[cell]
            self._words[cell] = 0
        for row in range(self.layout.backends):
            self._words[self._backend_row(row) + 1 + slot] = 0
        return freed

    # --- rate table --------------------------------------------------------------------

    def _bucket(self, family: int, key: int) -> int:
        mixed = (key * self._hash_a + family * self._hash_b) & _MASK64
        return self.layout.rate_table + (mixed >> self._bucket_shift) * WAYS * ENTRY_WORDS

    def hit(self, family: int, key: int, now: int, limit: int, window: int) -> bool:
        """Count a new connection of ``(family, key)`` at monotonic ``now`` (ns); False
        when the key already had ``limit`` connections in its current ``window`` (ns).

        The window starts at the key's first connection and lasts ``window``;
        the next connection after it starts a new one. A refused connection is
        not counted, so a client that keeps trying is let in again once its
        window is over.
        """
        words = self._words
        bucket = self._bucket(family, key)
        end = bucket + WAYS * ENTRY_WORDS
        offset = bucket * WORD
        self._lock.acquire(offset)
        try:
            victim = -1
            victim_rank = (1 << 64, 1 << 64)  # (count, start): evict the smallest
            for entry in range(bucket, end, ENTRY_WORDS):
                entry_family = words[entry + 1]
                if entry_family == family and words[entry] == key:
                    if now - words[entry + 2] >= window:
                        words[entry + 2] = now
                        words[entry + 3] = 1
                        return True
                    if words[entry + 3] >= limit:
                        return False
                    words[entry + 3] += 1
                    return True
                if entry_family == 0 or now - words[entry + 2] >= window:
                    rank = (0, 0)  # empty or expired: free to take
                else:
                    rank = (words[entry + 3], words[entry + 2])
                if rank < victim_rank:
                    victim, victim_rank = entry, rank
            # Not present: a new window in the emptiest entry. Written so that a
            # crash part-way leaves at worst one key with a wrong count for a window.
            words[victim + 1] = 0
            words[victim] = key
            words[victim + 2] = now
            words[victim + 3] = 1
            words[victim + 1] = family
            return limit >= 1
        finally:
            self._lock.release(offset)

    def rate_entries(self) -> int:
        """How many keys the table holds (live or expired): for tests and diagnostics."""
        start = self.layout.rate_table
        return sum(
            1
            for entry in range(start, self.layout.words, ENTRY_WORDS)
            if self._words[entry + 1] != 0
        )

    # --- backend counters (least_conn) ---------------------------------------------------

    def _backend_row(self, row: int) -> int:
        return self.layout.backend_table + row * (1 + self.layout.slots)

    @staticmethod
    def backend_key(name: str) -> int:
        """The key word of a backend (its ``str(Address)``): never 0, which means free."""
        digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") | (1 << 63)

    def backend_row(self, name: str, claim: bool = True) -> int | None:
        """The row of backend ``name``; claims a free one when ``claim``. None: not there
        (or the table is full, when the caller should count on its own)."""
        key = self.backend_key(name)
        rows = self.layout.backends
        words = self._words
        start = key % rows
        for probe in range(min(rows, _BACKEND_PROBES)):  # lock-free look-up first
            row = (start + probe) % rows
            found = words[self._backend_row(row)]
            if found == key:
                return row
            if found == 0:
                break
        if not claim:
            return None
        offset = self.layout.backend_table * WORD
        self._lock.acquire(offset)
        try:
            for probe in range(min(rows, _BACKEND_PROBES)):
                row = (start + probe) % rows
                at = self._backend_row(row)
                if words[at] == key:
                    return row
                if words[at] == 0:
                    words[at] = key  # cells are zero: rows are never freed
                    return row
            return None
        finally:
            self._lock.release(offset)

    def backend_acquire(self, row: int, slot: int) -> None:
        """One more connection (or L7 stream) to the backend in ``row`` from ``slot``."""
        self._words[self._backend_row(row) + 1 + slot] += 1

    def backend_release(self, row: int, slot: int) -> None:
        cell = self._backend_row(row) + 1 + slot
        if self._words[cell]:
            self._words[cell] -= 1

    def backend_connections(self, row: int) -> int:
        """Open connections to the backend in ``row`` across every slot (no lock)."""
        at = self._backend_row(row) + 1
        return sum(self._words[at : at + self.layout.slots])

    def release_views(self) -> None:
        """Drop the buffer views so that the mmap under them can be closed."""
        self._words.release()


# --- I/O: the shared file and the locks on it ---------------------------------------------


class FcntlLock:
    """POSIX record locks on one byte of the shared file.

    Owned by the process, not the file descriptor: two workers exclude each
    other even though they inherited the same open file, and the kernel
    releases a process's locks when it dies. (Linux's open-file-description
    locks would be shared by every process that inherited the descriptor,
    so they would not exclude anything here.) A process must not open and
    close a second descriptor of the same file, which would drop its locks.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def acquire(self, offset: int) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, offset)

    def release(self, offset: int) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, offset)


@dataclass
class SharedMemory:
    """The mapped shared file and the tables over it."""

    fd: int
    mapping: mmap.mmap
    limits: SharedLimits

    def close(self) -> None:
        self.limits.release_views()
        self.mapping.close()
        os.close(self.fd)


def create(
    listeners: Sequence[str],
    slots: int,
    buckets: int = BUCKETS,
    rows: int = 0,
    backends: int = BACKEND_ROWS,
) -> SharedMemory:
    """The supervisor's side: a new anonymous shared file formatted for ``listeners``,
    with ``rows`` listener rows in all (at least one per listener; the spare ones are
    for listeners added at runtime, :meth:`SharedLimits.add_listener`), and ``backends``
    rows of backend counters.

    The file has no name (``memfd_create``), so nothing is left behind however
    the process group ends; workers get the descriptor by inheritance. It is
    close-on-exec here; pass it explicitly to each worker (``pass_fds``).
    """
    layout = Layout(
        slots=slots, listeners=max(rows, len(listeners)), buckets=buckets, backends=backends
    )
    fd = os.memfd_create("mc-proxy-limits", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, layout.size)
        mapping = mmap.mmap(fd, layout.size)
    except BaseException:
        os.close(fd)
        raise
    SharedLimits.format(mapping, layout, listeners)
    return SharedMemory(fd, mapping, SharedLimits(mapping, FcntlLock(fd)))


def attach(fd: int) -> SharedMemory:
    """A worker's side: map the inherited shared file. Raises LayoutError or OSError."""
    size = os.fstat(fd).st_size
    if size < HEADER_WORDS * WORD:
        raise LayoutError(f"shared memory of {size} bytes is too small")
    mapping = mmap.mmap(fd, size)
    try:
        limits = SharedLimits(mapping, FcntlLock(fd))
    except BaseException:
        mapping.close()
        raise
    return SharedMemory(fd, mapping, limits)
