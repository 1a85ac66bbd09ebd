"""What a benchmark run does: sizes, durations, worker counts, CPU sets."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

__all__ = ["SCENARIOS", "Settings"]

SCENARIOS = (
    "l4_bulk",
    "l4_connrate",
    "l4_latency",
    "l7_h2",
    "l7_http1",
    "l7_h2_h1back",
    "l7_http1_h1back",
    "idle_l4",
    "idle_l7",
)


@dataclass(frozen=True)
class Settings:
    workers: tuple[int, ...] = (1, 2)
    runs: int = 3
    scenarios: tuple[str, ...] = SCENARIOS
    proxy_cpus: frozenset[int] | None = None
    """CPUs for both proxies (every thread of their process trees); None: not pinned."""
    load_cpus: frozenset[int] | None = None
    """CPUs for the load generators and the backends; None: not pinned."""
    out: Path = Path("bench/out/results.jsonl")
    bulk_size: int = 256 << 20
    bulk_parallel: int = 4
    connrate_seconds: float = 5.0
    connrate_concurrency: int = 4
    latency_count: int = 300
    l7_seconds: int = 5
    h2_clients: int = 8
    h2_streams: int = 16
    http1_connections: int = 32
    idle_l4: int = 10_000
    idle_l7: int = 2_000

    @classmethod
    def full(cls, **overrides: object) -> Settings:
        return replace(cls(), **overrides)  # type: ignore[arg-type]

    @classmethod
    def quick(cls, **overrides: object) -> Settings:
        """Same code path, tiny sizes: a minute or less end to end."""
        small = cls(
            workers=(1,),
            runs=1,
            bulk_size=8 << 20,
            connrate_seconds=1.0,
            connrate_concurrency=2,
            latency_count=20,
            l7_seconds=1,
            h2_clients=2,
            http1_connections=4,
            idle_l4=200,
            idle_l7=100,
        )
        return replace(small, **overrides)  # type: ignore[arg-type]
