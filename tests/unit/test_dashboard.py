"""The Grafana dashboard asks only for series that mc-proxy exports, with their labels."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry

from mcproxy.health import route_states
from mcproxy.model import Address, FirewallRules, Listener, Route, make_state
from mcproxy.supervisor.metrics import SupervisorCollector
from mcproxy.supervisor.status import WorkerSample
from mcproxy.worker.metrics import WorkerMetrics
from mcproxy.worker.records import ConnectionRecord, RequestRecord

DASHBOARD = Path(__file__).resolve().parents[2] / "packaging" / "grafana" / "mc-proxy.json"
SCRAPE_LABELS = {"instance", "job"}
"""Added by Prometheus to every series it scrapes."""


def exported() -> dict[str, set[str]]:
    """Every sample name mc-proxy exports -> its label names, with every metric exercised."""
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    route = Route("a.test", (Address("127.0.0.1", 1),))
    for outcome, fields in (
        ("closed", {"dial_seconds": 0.001, "bytes_up": 1, "bytes_down": 1}),
        ("backend_timeout", {}),
        ("refused:no_route", {}),
    ):
        record = ConnectionRecord("l", ("192.0.2.1", 1), ("127.0.0.1", 2))
        record.route = None if outcome.startswith("refused") else route
        record.outcome = outcome
        if record.route is not None:
            record.backend = route.backend
            record.failed_backends = (Address("127.0.0.1", 2),)
        for key, value in fields.items():
            setattr(record, key, value)
        metrics.connection_started(record)
        metrics.connection_finished(record)
    metrics.request_finished(RequestRecord("l", "w.test", "GET", 403, 0.1, blocked_by="x"))
    metrics.set_active({"l": 1})
    metrics.flush()
    worker = SimpleNamespace(generation=1)
    pair = Route("p.test", (Address("127.0.0.1", 1), Address("127.0.0.1", 2)))
    listener = Listener(Address("127.0.0.1", 443), max_connections=5, routes={"p.test": pair})
    supervisor: Any = SimpleNamespace(
        state=make_state(1, [listener], FirewallRules()),
        backend_states=lambda route: route_states(route, {}),
        samples=(WorkerSample(slot=1, pid=1234, generation=worker.generation),),
        worker_restarts=0,
    )
    registry.register(SupervisorCollector(supervisor))
    names: dict[str, set[str]] = {}
    for family in registry.collect():
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def queries(node: Any) -> list[str]:
    """Every PromQL text in the dashboard: panel targets and template variables."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                found.append(value)
            else:
                found += queries(value)
    elif isinstance(node, list):
        for item in node:
            found += queries(item)
    return found


def test_dashboard_uses_only_exported_series_and_labels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    series = exported()
    texts = queries(dashboard)
    assert len(texts) > 20
    used = set()
    for text in texts:
        for name, selector in re.findall(r"(mcproxy_\w+)(?:\{([^}]*)\})?", text):
            assert name in series, f"{name} is not exported (in {text!r})"
            used.add(name)
            for label in re.findall(r"(\w+)\s*[=!]~?", selector):
                assert label in series[name] | SCRAPE_LABELS, f"{name} has no label {label}"
        for grouping in re.findall(r"by \(([^)]*)\)", text):
            for label in (part.strip() for part in grouping.split(",")):
                assert label in {"le", "class"} | {
                    lab for values in series.values() for lab in values
                }, f"grouping by unknown label {label}"
    # Every family is on the dashboard somewhere.
    # (_created exists only outside multiprocess mode, so never in the proxy's scrape.)
    families = {
        re.sub(r"_(bucket|sum|count)$", "", name)
        for name in series
        if not name.endswith("_created")
    }
    on_dashboard = {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}
    assert families <= on_dashboard, families - on_dashboard


def test_panel_ids_are_unique_and_every_panel_has_a_query() -> None:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        if panel["type"] != "row":
            assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
