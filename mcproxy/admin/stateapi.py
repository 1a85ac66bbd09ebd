"""``ExportState`` and ``ApplyState``: the state as a file, and a file made the state.

Apply reads the document with the config loader (:func:`mcproxy.config.parse_config`,
so a problem names its field exactly as ``mc-proxy check`` would), plans the
difference against the current state (:mod:`mcproxy.statefile`) and submits it
as one :class:`~mcproxy.model.ChangeBatch`: one transaction, one generation,
one delta acknowledged by every worker (invariant 2). An empty difference
submits nothing, so applying a file twice makes no new generation.
The plan is made outside the loop, against the state of that moment; when
another change lands between the plan and the loop and makes the batch not
fit, the apply is planned again (up to :data:`REPLANS` times).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable

import grpc

from mcproxy.admin.v1 import admin_pb2 as pb
from mcproxy.config import ConfigError, config_from_data, parse_yaml, paused_gc
from mcproxy.model import Change, FirewallRuleAdded, FirewallRuleKind, ProxyState
from mcproxy.statefile import Plan, export_yaml, plan, process_settings_in

__all__ = ["REPLANS", "apply_state", "export_state"]

REPLANS = 3
_RACE_CODES = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS)

Wait = Callable[[concurrent.futures.Future[int]], "int | tuple[grpc.StatusCode, str]"]


def _geoip_db(backend: object) -> str | None:
    config = getattr(backend, "config", None)
    firewall = getattr(config, "firewall", None)
    path = getattr(firewall, "geoip_db", None)
    return path if isinstance(path, str) else None


def _listeners_at_runtime(backend: object) -> bool:
    """Whether the supervisor binds listeners added in a batch (ARCHITECTURE.md)."""
    return bool(getattr(backend, "listeners_at_runtime", False))


def export_state(state: ProxyState, backend: object) -> pb.ExportStateResponse:
    with paused_gc():
        text = export_yaml(state, _geoip_db(backend))
    return pb.ExportStateResponse(yaml=text, generation=state.generation)


def _response(p: Plan, generation: int, changed: bool, notes: list[str]) -> pb.ApplyStateResponse:
    return pb.ApplyStateResponse(
        changes=[
            pb.StateChange(
                action=e.action, kind=e.kind, listener=e.listener, name=e.name, detail=e.detail
            )
            for e in p.entries
        ],
        generation=generation,
        changed=changed,
        notes=notes,
    )


def _notes(data: object, source: str) -> list[str]:
    ignored = process_settings_in(data)
    if not ignored:
        return []
    return [
        f"{source}: {', '.join(ignored)}: process settings are ignored by apply"
        " (they are read from the config file at start)"
    ]


def _unsupported(p: Plan, backend: object) -> list[str]:
    refused = list(p.refused)
    if _geoip_db(backend) is None and any(
        isinstance(c, FirewallRuleAdded) and c.kind is FirewallRuleKind.COUNTRY for c in p.changes
    ):
        refused.append(
            "firewall.blocked_countries: country rules need a GeoIP database: set"
            " firewall.geoip_db in this node's config file and restart"
        )
    return refused


def apply_state(
    request: pb.ApplyStateRequest,
    backend: object,
    state: Callable[[], ProxyState],
    submit: Callable[[Change], concurrent.futures.Future[int]],
    wait: Wait,
) -> pb.ApplyStateResponse | tuple[grpc.StatusCode, str]:
    """The response, or the status code and message to fail the call with."""
    source = request.source_name or "<apply>"
    try:
        with paused_gc():
            data = parse_yaml(request.yaml, source)  # once: 100,000 routes take seconds
            desired = config_from_data(data, source, state_only=True).seed
    except ConfigError as exc:
        return grpc.StatusCode.INVALID_ARGUMENT, "\n".join(exc.problems)
    notes = _notes(data, source)
    failure = (grpc.StatusCode.ABORTED, "the state kept changing during the apply; apply again")
    for _ in range(REPLANS):
        current = state()
        with paused_gc():
            p = plan(current, desired, listeners_at_runtime=_listeners_at_runtime(backend))
        refused = _unsupported(p, backend)
        if refused:
            return grpc.StatusCode.FAILED_PRECONDITION, "\n".join(f"{source}: {r}" for r in refused)
        if not p.changes or request.dry_run:
            return _response(p, current.generation, False, notes)
        outcome = wait(submit(p.batch))
        if not isinstance(outcome, tuple):
            return _response(p, outcome, True, notes)
        if outcome[0] not in _RACE_CODES or state().generation == current.generation:
            return outcome
    return failure
