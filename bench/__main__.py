"""``python -m bench``: mc-proxy next to HAProxy (``make bench``, ``make bench-quick``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.runner import run
from bench.settings import SCENARIOS, Settings


def _cpus(text: str) -> frozenset[int]:
    """``0``, ``0,2`` or ``0-3`` (taskset's list form)."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return frozenset(cpus)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run mc-proxy and HAProxy side by side on loopback; print medians and ratios.",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 worker, 1 run")
    parser.add_argument("--workers", help="worker counts, e.g. 1,2 (default 1,2; quick: 1)")
    parser.add_argument("--runs", type=int, help="runs per figure; the table shows medians")
    parser.add_argument("--only", help=f"comma-separated scenarios out of: {', '.join(SCENARIOS)}")
    parser.add_argument("--proxy-cpus", type=_cpus, help="pin both proxies to these CPUs (0-1)")
    parser.add_argument("--load-cpus", type=_cpus, help="pin load generators and backends")
    parser.add_argument("--out", type=Path, help="JSON lines file to append raw figures to")
    parser.add_argument("--label", default="", help="a tag stored in every record")
    args = parser.parse_args(argv)
    overrides: dict[str, object] = {}
    if args.workers:
        overrides["workers"] = tuple(int(w) for w in args.workers.split(","))
    if args.runs:
        overrides["runs"] = args.runs
    if args.only:
        unknown = set(args.only.split(",")) - set(SCENARIOS)
        if unknown:
            parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
        overrides["scenarios"] = tuple(s for s in SCENARIOS if s in args.only.split(","))
    if args.proxy_cpus:
        overrides["proxy_cpus"] = args.proxy_cpus
    if args.load_cpus:
        overrides["load_cpus"] = args.load_cpus
    if args.out:
        overrides["out"] = args.out
    settings = Settings.quick(**overrides) if args.quick else Settings.full(**overrides)
    return run(settings, args.label)


if __name__ == "__main__":
    sys.exit(main())
