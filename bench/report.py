"""Raw figures as JSON lines, and the table of medians with the ratios to HAProxy.

A record is one run of one scenario against one proxy: ``scenario``,
``proxy``, ``workers``, ``run``, the 1-minute load average when it ran, and
either the scenario's figures, ``"error"``, or ``"unavailable"`` with the
reason (mc-proxy without L7 support).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from bench.stats import median

__all__ = ["ROWS", "JsonLines", "Row", "table"]

MC, HA = "mc-proxy", "haproxy"


@dataclass(frozen=True)
class Row:
    scenario: str
    key: str
    label: str
    target: str = ""
    """``"ratio<=X"``: mc-proxy / HAProxy at most X; ``"<=X"``: mc-proxy's own figure at most X."""


ROWS = (
    Row("l4_bulk", "cpu_s_per_gb", "L4 bulk: CPU s per GB", "ratio<=1.0"),
    Row("l4_bulk", "mb_per_s", "L4 bulk: MB/s"),
    Row("l4_connrate", "cpu_us_per_conn", "L4 new conn: CPU us per conn", "ratio<=1.5"),
    Row("l4_connrate", "conn_per_s", "L4 new conn: conn/s"),
    Row("l4_connrate", "p50_ms", "L4 new conn: p50 ms"),
    Row("l4_connrate", "p99_ms", "L4 new conn: p99 ms"),
    Row("l4_latency", "added_ms", "L4 fresh TLS: added p50 ms", "<=0.5"),
    Row("l4_latency", "p99_ms", "L4 fresh TLS: p99 ms"),
    Row("l7_h2", "cpu_us_per_req", "L7 h2: CPU us per req", "ratio<=6"),
    Row("l7_h2", "req_per_s", "L7 h2: req/s"),
    Row("l7_h2", "p50_ms", "L7 h2: p50 ms"),
    Row("l7_h2", "p99_ms", "L7 h2: p99 ms"),
    Row("l7_http1", "cpu_us_per_req", "L7 HTTP/1.1: CPU us per req", "ratio<=2.5"),
    Row("l7_http1", "req_per_s", "L7 HTTP/1.1: req/s"),
    Row("l7_http1", "p99_ms", "L7 HTTP/1.1: p99 ms"),
    Row("l7_h2_h1back", "cpu_us_per_req", "L7 h2, h1 backend: CPU us per req", "ratio<=6"),
    Row("l7_h2_h1back", "req_per_s", "L7 h2, h1 backend: req/s"),
    Row("l7_h2_h1back", "p99_ms", "L7 h2, h1 backend: p99 ms"),
    Row("l7_http1_h1back", "cpu_us_per_req", "L7 HTTP/1.1, h1 backend: CPU us per req", "ratio<=6"),
    Row("l7_http1_h1back", "req_per_s", "L7 HTTP/1.1, h1 backend: req/s"),
    Row("idle_l4", "kib_per_conn", "idle L4: KiB per conn", "<=16"),
    Row("idle_l7", "kib_per_conn", "idle L7: KiB per conn", "<=64"),
)


class JsonLines:
    """Appends one JSON object per line, flushed at once so a cut-short run keeps its figures."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.records: list[dict[str, Any]] = []
        self._file: TextIO = path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _format(value: float) -> str:
    if math.isnan(value):
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}" if abs(value) < 1 else f"{value:.2f}"


def _verdict(target: str, mine: float, ratio: float) -> str:
    if not target:
        return ""
    limit = float(target.split("<=")[1])
    value = ratio if target.startswith("ratio") else mine
    if math.isnan(value):
        return f"{target} ?"
    return f"{target} {'ok' if value <= limit else 'MISSED'}"


def _cell(records: list[dict[str, Any]], key: str) -> tuple[float, str]:
    """(median of ``key``, note) over the records of one scenario, proxy and worker count."""
    if not records:
        return math.nan, "not run"
    unavailable = [r for r in records if "unavailable" in r]
    if unavailable:
        return math.nan, str(unavailable[0]["unavailable"])
    values = [float(r[key]) for r in records if key in r]
    errors = [r for r in records if "error" in r]
    note = f"{len(errors)} run(s) failed: {errors[0]['error']}" if errors else ""
    return median(values), note


def table(records: Iterable[dict[str, Any]]) -> str:
    """Medians per worker count, mc-proxy next to HAProxy, with the ratio and the target."""
    records = list(records)
    lines: list[str] = []
    header = f"{'':34} {MC:>10} {HA:>10} {'ratio':>7}  target"
    for workers in sorted({int(r["workers"]) for r in records}):
        runs = max((int(r["run"]) for r in records if r["workers"] == workers), default=0) + 1
        lines += [f"workers={workers} (medians of {runs} run(s))", header]
        notes: list[str] = []
        for row in ROWS:
            group = [
                r for r in records if r["workers"] == workers and r["scenario"] == row.scenario
            ]
            if not group:
                continue
            mine, mine_note = _cell([r for r in group if r["proxy"] == MC], row.key)
            theirs, their_note = _cell([r for r in group if r["proxy"] == HA], row.key)
            ratio = mine / theirs if theirs else math.nan
            lines.append(
                f"{row.label:34} {_format(mine):>10} {_format(theirs):>10} {_format(ratio):>7}  "
                f"{_verdict(row.target, mine, ratio)}".rstrip()
            )
            for who, note in ((MC, mine_note), (HA, their_note)):
                message = f"{row.scenario} {who}: {note}"
                if note and message not in notes:
                    notes.append(message)
        lines += [f"  ! {note}" for note in notes]
        lines.append("")
    return "\n".join(lines)
