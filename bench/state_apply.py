"""Export and apply at scale: 100,000 routes, an apply of 10,000 changes, one AddRoute.

    python -m bench.state_apply [--routes 100000] [--changes 10000] [--e2e] [--workers 2]

In process (always): the pieces of an apply on a state of ``--routes`` routes
(distinct backends, so no cache flatters the figures), for a desired state
that differs by ``--changes`` changes (40% updates, 30% additions, 30%
removals): ``export_yaml``, ``parse_config`` of the edited file (the same
validation as the config loader), ``plan``, ``apply_change`` of the batch
(what the supervisor and every worker do), the store's one transaction
(synchronous=FULL), and the pipe encoding of the Delta.

End to end (``--e2e``): a real ``mc-proxy serve`` seeded with those routes;
times a single AddRoute (median of 20, both workers' acks included),
``mcproxyctl export``-equivalent ``ExportState``, ``ApplyState`` with
``dry_run``, the apply itself (one generation, acknowledged by every worker),
and the same apply again (a no-op).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from mcproxy import pipe
from mcproxy.config import parse_config, paused_gc
from mcproxy.model import (
    Address,
    FirewallRules,
    Listener,
    ProxyState,
    Route,
    apply_change,
    make_state,
)
from mcproxy.statefile import export_yaml, plan
from mcproxy.supervisor.store import Store

LISTENER = "127.0.0.1:{port}"


def _backend(i: int) -> Address:
    return Address(f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}", 8000 + i % 1000)


def build(routes: int, port: int) -> ProxyState:
    table = {f"h{i}.bench.test": Route(f"h{i}.bench.test", (_backend(i),)) for i in range(routes)}
    return make_state(1, [Listener(Address("127.0.0.1", port), routes=table)], FirewallRules())


def edited(text: str, changes: int, routes: int) -> str:
    """The exported document with ``changes`` changes: 40% updates, 30% adds, 30% removals."""
    doc: dict[str, Any] = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    items: list[dict[str, Any]] = doc["listeners"][0]["routes"]
    updates, adds = changes * 4 // 10, changes * 3 // 10
    removes = changes - updates - adds
    by_name = {item["hostname"]: item for item in items}
    for i in range(updates):
        by_name[f"h{i}.bench.test"]["backend"] = str(_backend(i + routes))
    gone = {f"h{i}.bench.test" for i in range(updates, updates + removes)}
    items[:] = [item for item in items if item["hostname"] not in gone]
    items += [{"hostname": f"new{i}.bench.test", "backend": str(_backend(i))} for i in range(adds)]
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    return str(yaml.dump(doc, Dumper=dumper, sort_keys=False))


def timed(call: Callable[[], object]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


def in_process(routes: int, changes: int, directory: Path) -> None:
    state = build(routes, 1)
    with paused_gc():  # as ExportState and ApplyState run them
        export_s, text = timed(lambda: export_yaml(state))
    desired_text = edited(text, changes, routes)
    parse_s, config = timed(lambda: parse_config(desired_text, str(directory / "state.yaml")))
    with paused_gc():
        plan_s, p = timed(lambda: plan(state, config.seed))
    assert len(p.changes) == changes, len(p.changes)
    apply_s, after = timed(lambda: apply_change(state, p.batch))
    assert plan(after, config.seed).changes == ()
    store = Store.open(str(directory / "bench.db"))
    seed_s, _ = timed(lambda: store.seed(state))
    commit_s, _ = timed(lambda: store.apply(p.batch))
    store.close()
    delta = pipe.Delta(p.batch, after.generation)
    encode_s, frame = timed(lambda: pipe.encode(delta))
    print(f"in process, {routes} routes, an apply of {len(p.changes)} changes:")
    print(f"  export_yaml            {export_s:7.2f} s  ({len(text) / 1e6:.1f} MB)")
    print(f"  parse_config (file)    {parse_s:7.2f} s")
    print(f"  plan                   {plan_s:7.3f} s")
    print(f"  apply_change(batch)    {apply_s:7.3f} s  (supervisor, and each worker)")
    print(f"  store: one transaction {commit_s:7.3f} s  (seeding {routes} routes: {seed_s:.1f} s)")
    print(f"  encode Delta           {encode_s:7.3f} s  ({len(frame) / 1e6:.1f} MB)")


def end_to_end(routes: int, changes: int, workers: int, directory: Path) -> None:
    from mcproxy.admin.client import AdminClient
    from tests.e2e.harness import ProxyProcess, free_port

    port = free_port()
    listener = f"127.0.0.1:{port}"
    state = build(routes, port)
    seed = yaml.safe_load(export_yaml(state))

    class FastConfig(ProxyProcess):
        def write_config(self) -> None:  # libyaml: 100,000 routes in seconds, not a minute
            dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
            self.config_path.write_text(yaml.dump(self.config, Dumper=dumper, sort_keys=False))

    proxy = FastConfig(directory, seed, workers=workers)
    started = time.perf_counter()
    proxy.start(wait=False)
    proxy.wait_serving(workers, timeout=900)
    boot_s = time.perf_counter() - started
    try:
        with AdminClient(str(directory / "admin.sock"), timeout=600) as admin:
            adds = []
            for i in range(20):
                add = functools.partial(admin.add_route, listener, f"one{i}.test", "10.9.9.9:1")
                adds.append(timed(add)[0])
                admin.remove_route(listener, f"one{i}.test")
            export_s, (text, generation) = timed(admin.export_state)
            desired = edited(text, changes, routes)
            dry_s, dry = timed(
                lambda: admin.apply_state(desired, dry_run=True, source_name="bench")
            )
            apply_s, applied = timed(lambda: admin.apply_state(desired, source_name="bench"))
            again_s, again = timed(lambda: admin.apply_state(desired, source_name="bench"))
            status = admin.status()
    finally:
        proxy.stop()
    assert len(dry.changes) == changes and not dry.changed
    assert applied.changed and applied.generation == generation + 1
    assert not again.changed and again.generation == applied.generation
    assert {w.generation for w in status.workers} == {applied.generation}
    print(f"end to end, {routes} routes, {workers} workers ({boot_s:.1f} s to start):")
    p50, worst = statistics.median(adds) * 1e3, max(adds) * 1e3
    print(f"  AddRoute p50           {p50:7.1f} ms  (max {worst:.1f} ms of 20)")
    print(f"  ExportState            {export_s:7.2f} s")
    print(f"  ApplyState dry run     {dry_s:7.2f} s  ({len(dry.changes)} changes)")
    gens = f"generation {generation} -> {applied.generation}"
    print(f"  ApplyState             {apply_s:7.2f} s  ({gens}, acknowledged by every worker)")
    print(f"  ApplyState again       {again_s:7.2f} s  (no-op: no new generation)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.state_apply")
    parser.add_argument("--routes", type=int, default=100_000)
    parser.add_argument("--changes", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--e2e", action="store_true", help="also through a real mc-proxy")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mcproxy-bench-") as directory:
        in_process(args.routes, args.changes, Path(directory))
    if args.e2e:
        with tempfile.TemporaryDirectory(prefix="mcproxy-bench-") as directory:
            end_to_end(args.routes, args.changes, args.workers, Path(directory))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
