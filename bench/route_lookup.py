"""Cost of one SNI route lookup (``RouteTable.lookup``) as the number of routes grows.

``python -m bench.route_lookup [--routes 100000]`` builds tables of 10 and of
N routes (exact names, ``*.zoneK.test`` wildcards and a catch-all), with and
without a pending overlay of changes, and prints the median cost per lookup of
an exact hit, a wildcard hit, a catch-all hit, a miss, and no SNI, over 5
rounds. The figures should not depend on N.
"""

from __future__ import annotations

import argparse
import statistics
import timeit

from mcproxy.model import Address, Route, RouteTable


def build(n: int, overlay: int) -> RouteTable:
    routes: dict[str, Route] = {}
    backends = (Address("127.0.0.1", 9000),)
    for i in range(n):
        name = f"*.zone{i}.test" if i % 10 == 0 else f"h{i}.zone{i // 10 * 10}.test"
        routes[name] = Route(name, backends)
    routes["*"] = Route("*", backends)
    table = RouteTable(routes)
    for i in range(overlay):  # changes not yet folded into the base
        table = table.with_route(Route(f"new{i}.test", backends))
    return table


CASES = {
    "exact": "h1.zone0.test",
    "exact (mixed case)": "H1.Zone0.TEST",
    "wildcard": "other.zone0.test",
    "catch-all": "nowhere.example",
    "no SNI": None,
}


def per_lookup_ns(table: RouteTable, name: str | None, number: int) -> float:
    lookup = table.lookup
    rounds = timeit.repeat(lambda: lookup(name), number=number, repeat=5)
    return statistics.median(rounds) / number * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--routes", type=int, default=100_000)
    parser.add_argument("--number", type=int, default=200_000)
    args = parser.parse_args()
    sizes = [10, args.routes]
    tables = {(n, o): build(n, o) for n in sizes for o in (0, 30)}
    header = f"{'case':<20}" + "".join(f"{f'{n} routes, overlay {o}':>26}" for n, o in tables)
    print(header)
    for case, name in CASES.items():
        row = f"{case:<20}"
        for table in tables.values():
            row += f"{per_lookup_ns(table, name, args.number):>23.0f} ns"
        print(row)
    no_catch_all = build(args.routes, 0).without("*")
    ns = per_lookup_ns(no_catch_all, "nowhere.example", args.number)
    print(f"{'miss, no catch-all':<20}{'':>26}{'':>26}{ns:>23.0f} ns")


if __name__ == "__main__":
    main()
