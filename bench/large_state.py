"""Start-up, snapshot and respawn with a large state (100,000 routes by default).

    python -m bench.large_state [--routes 100000] [--workers 2] [--runs 3]

Prints, for one listener holding ``--routes`` L4 routes:

* in process: building the state, encoding a ``Snapshot`` for the pipe and
  decoding it (what the supervisor and a new worker each pay), and its size;
  loading the state from the database (``Store.load``);
* end to end (a real ``mc-proxy serve``, the e2e harness): the first start,
  which parses the YAML and seeds the empty database; a restart from the
  database (the YAML still lists the routes, as an operator's would); and a
  respawn: from SIGKILL of a worker to its replacement serving the current
  generation (its ``worker K serving generation`` log line), ``--runs`` times.
  Start-up is timed from the ``Popen``, after the harness has written the YAML.

Figures are wall-clock on whatever machine runs them; say how loaded it was.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from mcproxy import pipe
from mcproxy.model import Address, FirewallRules, Listener, Route, make_state
from mcproxy.supervisor.store import Store
from tests.e2e.harness import ProxyProcess, free_port, wait_for


def build(routes: int, listener: str) -> object:
    table = {
        f"host{i}.bench.test": Route(f"host{i}.bench.test", (Address("127.0.0.1", 9),))
        for i in range(routes)
    }
    addr = Address("127.0.0.1", int(listener.rsplit(":", 1)[1]))
    return make_state(1, [Listener(addr, routes=table)], FirewallRules())


def in_process(routes: int, directory: Path) -> None:
    started = time.perf_counter()
    state = build(routes, "127.0.0.1:1")
    build_s = time.perf_counter() - started
    snapshot = pipe.Snapshot(state)  # type: ignore[arg-type]
    encodes, decodes = [], []
    for _ in range(3):
        started = time.perf_counter()
        frame = pipe.encode(snapshot)
        encodes.append(time.perf_counter() - started)
        started = time.perf_counter()
        (decoded,) = pipe.FrameDecoder().feed(frame)
        decodes.append(time.perf_counter() - started)
    assert decoded == snapshot
    store = Store.open(str(directory / "load.db"))
    try:
        store.seed(state)  # type: ignore[arg-type]
        started = time.perf_counter()
        loaded = store.load()
        load_s = time.perf_counter() - started
    finally:
        store.close()
    assert sum(len(listener.routes) for listener in loaded.listeners.values()) == routes
    print(f"in process, {routes} routes:")
    print(f"  build the state         {build_s:7.2f} s")
    print(
        f"  encode Snapshot         {statistics.median(encodes):7.2f} s"
        f"  ({len(frame) / 1e6:.1f} MB)"
    )
    print(f"  decode Snapshot         {statistics.median(decodes):7.2f} s")
    print(f"  Store.load              {load_s:7.2f} s")


def serving_lines(proxy: ProxyProcess) -> int:
    return len(re.findall(r"worker \d+ serving generation", proxy.log()))


def _cpu_seconds(pid: int) -> float:
    """utime + stime of one process so far, from /proc (as bench/procs.py does)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _more_serving(proxy: ProxyProcess, before: int) -> bool:
    return serving_lines(proxy) > before


def end_to_end(routes: int, workers: int, runs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="mcproxy-bench-") as directory:
        port = free_port()
        listener = f"127.0.0.1:{port}"
        seeded = [
            {"hostname": f"host{i}.bench.test", "backend": "127.0.0.1:9"} for i in range(routes)
        ]
        proxy = ProxyProcess(
            Path(directory), {"listeners": [{"addr": listener, "routes": seeded}]}, workers=workers
        )
        # From the Popen at the end of start(): its YAML dump (pure Python, seconds for
        # 100,000 routes) is the harness's cost, not mc-proxy's.
        proxy.start(wait=False)
        started = time.perf_counter()
        proxy.wait_serving(workers, timeout=600)
        first_s = time.perf_counter() - started
        proxy.stop()
        proxy.start(wait=False)
        started = time.perf_counter()
        proxy.wait_serving(workers, timeout=600)
        restart_s = time.perf_counter() - started
        respawns: list[float] = []
        cpu: list[float] = []
        try:
            for _ in range(runs):
                victim = proxy.worker_pids()[0]
                before = serving_lines(proxy)
                started = time.perf_counter()
                os.kill(victim, signal.SIGKILL)
                wait_for(functools.partial(_more_serving, proxy, before), 120, "a respawned worker")
                respawns.append(time.perf_counter() - started)
                cpu.append(_cpu_seconds(max(proxy.worker_pids())))
                time.sleep(0.5)
        finally:
            proxy.stop()
    print(f"end to end, {routes} routes, {workers} workers:")
    print(f"  first start (YAML parse + seed + load + boot)   {first_s:7.2f} s")
    print(f"  restart (settings from YAML + load + boot)      {restart_s:7.2f} s")
    print(
        f"  respawned worker's own CPU until serving, median  {statistics.median(cpu):7.2f} s"
        "  (less noisy on a loaded machine)"
    )
    print(
        f"  respawn after SIGKILL, median of {runs}            "
        f"{statistics.median(respawns):7.2f} s  (all: {', '.join(f'{r:.2f}' for r in respawns)})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.large_state")
    parser.add_argument("--routes", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-e2e", action="store_true", help="only the in-process figures")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mcproxy-bench-") as directory:
        in_process(args.routes, Path(directory))
    if not args.no_e2e:
        end_to_end(args.routes, args.workers, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
