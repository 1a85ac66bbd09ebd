"""A proxy's whole process tree as seen in /proc: CPU time, resident memory, CPU affinity.

The benchmark's fair figure is the proxy's own CPU time per unit of work, so
CPU is read for every process of the tree (mc-proxy: supervisor and workers;
HAProxy: its one multi-threaded process): ``utime + stime`` from
``/proc/PID/stat``, which covers all threads of a process, dead threads
included. Processes are found by walking ``/proc/PID/task/TID/children``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["ProcessTree"]

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                found += [int(p) for p in (task / "children").read_text().split()]
    return found


def _cpu_ticks(pid: int) -> int:
    """utime + stime of one process (all its threads), in clock ticks; 0 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def _rss_bytes(pid: int) -> int:
    try:
        statm = Path(f"/proc/{pid}/statm").read_text().split()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return int(statm[1]) * _PAGE


class ProcessTree:
    """The process ``root`` and all its descendants, re-read at every call."""

    def __init__(self, root: int) -> None:
        self.root = root

    def pids(self) -> list[int]:
        pids, todo = [], [self.root]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            todo += _children(pid)
        return pids

    def cpu_seconds(self) -> float:
        """User + system CPU time of the whole tree so far."""
        return sum(_cpu_ticks(pid) for pid in self.pids()) / _CLOCK_TICKS

    def rss_bytes(self) -> int:
        """Resident memory of the whole tree (shared pages count once per process)."""
        return sum(_rss_bytes(pid) for pid in self.pids())

    def pin(self, cpus: set[int]) -> None:
        """Move every thread of the tree to ``cpus``; threads and processes started later
        inherit it from their parent."""
        for pid in self.pids():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                for task in Path(f"/proc/{pid}/task").iterdir():
                    with contextlib.suppress(ProcessLookupError):
                        os.sched_setaffinity(int(task.name), cpus)
