"""Per-connection cost of the global limits and the GeoIP lookup, in microseconds.

Run: ``.venv/bin/python -m bench.admission``. Uses the real shared file
(memfd), the real fcntl locks and a GeoIP2-Country database whose records are
shaped like MaxMind's (names in eight languages), built with mmdb-writer.
``contended`` runs the same admit/release loop in several processes at once
on one listener, which is the worst case for the row lock.
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from mmdb_writer import MMDBWriter
from netaddr import IPSet

from mcproxy import limits
from mcproxy.model import Address, FirewallRules, Listener
from mcproxy.worker.admission import SharedAdmission
from mcproxy.worker.firewall import Firewall
from mcproxy.worker.geoip import GeoIP

LISTENER = "127.0.0.1:443"
LANGUAGES = ("de", "en", "es", "fr", "ja", "pt-BR", "ru", "zh-CN")


def per_call(fn: Callable[[], object], rounds: int = 200_000) -> float:
    """Best of five, in microseconds per call (the machine may be shared)."""
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(rounds):
            fn()
        best = min(best, time.perf_counter() - started)
    return best / rounds * 1e6


def admission(slot: int, fd: int, rate_limit: int) -> SharedAdmission:
    return SharedAdmission(limits.attach(fd).limits, slot, rate_limit, 3600.0)


def cycle(gate: SharedAdmission, listener: Listener, ips: list[str]) -> Callable[[], object]:
    index = [0]

    def one() -> None:
        index[0] = (index[0] + 1) % len(ips)
        if gate.admit(listener, ips[index[0]]) is None:
            gate.release(listener)

    return one


def _contended(fd: int, slot: int, rounds: int, out: multiprocessing.Queue[float]) -> None:
    gate = admission(slot, fd, 0)
    listener = Listener(Address("127.0.0.1", 443), max_connections=1_000_000)
    out.put(per_call(cycle(gate, listener, ["192.0.2.1"]), rounds))


def country_db(path: Path) -> Path:
    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoIP2-Country")
    names = {lang: f"Country {lang}" for lang in LANGUAGES}
    for octet, code in ((1, "FR"), (2, "KP")):
        section = {"geoname_id": 3017382, "iso_code": code, "names": names}
        record = {
            "continent": {"code": "EU", "geoname_id": 6255148, "names": names},
            "country": {**section, "is_in_european_union": True},
            "registered_country": section,
        }
        writer.insert_network(IPSet([f"198.51.{octet}.0/24"]), record)
    writer.to_db_file(str(path))
    return path


def main() -> None:
    memory = limits.create([LISTENER], slots=4)
    fd = memory.fd
    unlimited = Listener(Address("127.0.0.1", 443))
    limited = Listener(Address("127.0.0.1", 443), max_connections=1_000_000)
    many_ips = [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(50_000)]
    results = {
        "admit+release, max_connections 0, no rate limit": per_call(
            cycle(admission(1, fd, 0), unlimited, ["192.0.2.1"])
        ),
        "admit+release, max_connections set": per_call(
            cycle(admission(1, fd, 0), limited, ["192.0.2.1"])
        ),
        "admit+release, rate limit only (50k IPv4 addresses)": per_call(
            cycle(admission(1, fd, 1_000_000), unlimited, many_ips)
        ),
        "admit+release, rate limit + max_connections (IPv6)": per_call(
            cycle(admission(1, fd, 1_000_000), limited, ["2001:db8::1"])
        ),
    }
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue[float] = ctx.Queue()
    workers = [ctx.Process(target=_contended, args=(fd, s, 100_000, out)) for s in (1, 2, 3, 4)]
    for process in workers:
        process.start()
    contended = [out.get() for _ in workers]
    for process in workers:
        process.join()
    results["admit+release, max_connections set, 4 processes on one listener"] = max(contended)
    with tempfile.TemporaryDirectory() as tmp:
        geoip = GeoIP(str(country_db(Path(tmp) / "country.mmdb")))
        firewall = Firewall(FirewallRules(blocked_countries=frozenset({"KP"})), geoip.country)
        results["GeoIP country lookup, record decoded (cache miss)"] = per_call(
            lambda: geoip._lookup("198.51.1.7")
        )
        results["GeoIP country lookup, not in database (cache miss)"] = per_call(
            lambda: geoip._lookup("192.0.2.7")
        )
        results["GeoIP country lookup (cache hit)"] = per_call(lambda: geoip.country("198.51.1.7"))
        results["Firewall.check with a country rule"] = per_call(
            lambda: firewall.check("198.51.1.7")
        )
        results["GeoIP refresh (stat, unchanged)"] = per_call(geoip.refresh, 20_000)
    width = max(map(len, results))
    for name, micros in results.items():
        print(f"{name:<{width}}  {micros:6.2f} µs")


if __name__ == "__main__":
    main()
