"""What one route change costs with many routes: a RouteTable change against a dict copy.

Run: ``.venv/bin/python -m bench.route_table [--routes 10000]``. Prints, in
microseconds, the median time of one whole ``apply_change(RouteAdded)`` on a
listener with that many routes, of the ``RouteTable`` step alone, and of
copying a dict of that many routes (what a plain dict per state would cost
instead). The supervisor and every worker pay one change per admin mutation.
"""

from __future__ import annotations

import argparse
import statistics
import time

from mcproxy.model import Address, Listener, ProxyState, Route, RouteAdded, RouteTable, apply_change


def _median_us(fn: object, rounds: int) -> float:
    assert callable(fn)
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routes", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=2_000)
    args = parser.parse_args()
    backends = (Address("127.0.0.1", 8443),)
    routes = {f"h{i}.test": Route(f"h{i}.test", backends) for i in range(args.routes)}
    table = RouteTable(routes)
    counter = iter(range(10**9))

    def change() -> None:
        nonlocal table
        table = table.with_route(Route(f"new{next(counter) % 500}.test", backends))

    def copy() -> None:
        dict(routes)

    addr = Address("", 443)
    state = ProxyState(listeners={str(addr): Listener(addr, routes=RouteTable(routes))})

    def apply() -> None:
        apply_change(state, RouteAdded(str(addr), Route(f"new{next(counter)}.test", backends)))

    print(
        f"{args.routes} routes (medians): apply_change {_median_us(apply, args.rounds):.1f} µs, "
        f"RouteTable change {_median_us(change, args.rounds):.1f} µs, "
        f"dict copy {_median_us(copy, args.rounds):.1f} µs"
    )


if __name__ == "__main__":
    main()
