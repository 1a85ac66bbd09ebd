"""``make bench-quick`` runs end to end: the table is printed and raw figures are written.

Performance itself belongs to the benchmark, not to the test suite: this only
checks that the quick variant (same code path as ``make bench``, tiny sizes)
completes against the real mc-proxy and HAProxy.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.report import ROWS
from bench.settings import SCENARIOS
from tests.e2e.harness import REPO_ROOT


@pytest.mark.timeout(180)
def test_bench_quick_prints_a_table_and_writes_json_lines(tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "workers=1 (medians of 1 run(s))" in done.stdout
    for row in ROWS:
        assert row.label in done.stdout, f"table row {row.label!r} missing:\n{done.stdout}"
    records = [json.loads(line) for line in out.read_text().splitlines()]
    seen = {(r["scenario"], r["proxy"]) for r in records}
    assert seen == {(s, p) for s in SCENARIOS for p in ("mc-proxy", "haproxy")}
    l4 = [r for r in records if r["scenario"].startswith("l4") or r["scenario"] == "idle_l4"]
    failed = [r for r in l4 if "error" in r or "unavailable" in r]
    assert not failed, failed
    assert all(r["cpu_s"] > 0 for r in l4 if r["scenario"] == "l4_connrate")
