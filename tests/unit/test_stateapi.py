"""ApplyState without gRPC: one batch, no-ops, dry runs, refusals and re-planning on a race."""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass, field

import grpc

from mcproxy.admin.stateapi import apply_state, export_state
from mcproxy.admin.v1 import admin_pb2 as pb
from mcproxy.model import (
    Address,
    Change,
    ChangeBatch,
    FirewallRules,
    Listener,
    ProxyState,
    Route,
    RouteAdded,
    StateError,
    apply_change,
    make_state,
)

LISTENER = "127.0.0.1:8443"


def _state() -> ProxyState:
    route = Route("a.test", (Address("127.0.0.1", 9000),))
    return make_state(
        3, [Listener(Address("127.0.0.1", 8443), routes={"a.test": route})], FirewallRules()
    )


@dataclass
class Backend:
    state: ProxyState = field(default_factory=_state)
    submitted: list[Change] = field(default_factory=list)
    before_apply: list[Change] = field(default_factory=list)
    """Changes that land just before the next submitted one (another admin's)."""

    def submit(self, change: Change) -> concurrent.futures.Future[int]:
        self.submitted.append(change)
        future: concurrent.futures.Future[int] = concurrent.futures.Future()
        try:
            while self.before_apply:
                self.state = apply_change(self.state, self.before_apply.pop(0))
            self.state = apply_change(self.state, change)
        except StateError as exc:
            future.set_exception(exc)
        else:
            future.set_result(self.state.generation)
        return future


def _wait(future: concurrent.futures.Future[int]) -> int | tuple[grpc.StatusCode, str]:
    try:
        return future.result()
    except StateError as exc:
        code = {"not_found": grpc.StatusCode.NOT_FOUND}.get(
            exc.kind, grpc.StatusCode.ALREADY_EXISTS
        )
        return code, str(exc)


def _apply(
    backend: Backend, text: str, dry_run: bool = False
) -> pb.ApplyStateResponse | tuple[grpc.StatusCode, str]:
    request = pb.ApplyStateRequest(yaml=text, dry_run=dry_run, source_name="/tmp/state.yaml")
    return apply_state(request, backend, lambda: backend.state, backend.submit, _wait)


def _refused(backend: Backend, text: str) -> tuple[grpc.StatusCode, str]:
    outcome = _apply(backend, text)
    assert isinstance(outcome, tuple)
    return outcome


DOC = f"""
workers: 4
listeners:
  - addr: "{LISTENER}"
    routes:
      - {{hostname: a.test, backend: "127.0.0.1:9001"}}
      - {{hostname: "*.b.test", backend: "127.0.0.1:9002"}}
"""


def test_apply_is_one_batch_and_a_second_apply_is_a_no_op() -> None:
    backend = Backend()
    reply = _apply(backend, DOC)
    assert isinstance(reply, pb.ApplyStateResponse)
    assert reply.changed and reply.generation == 4
    assert [type(c) for c in backend.submitted] == [ChangeBatch]
    assert {(c.action, c.name) for c in reply.changes} == {
        ("update", "a.test"),
        ("add", "*.b.test"),
    }
    assert reply.notes and "workers" in reply.notes[0] and "ignored" in reply.notes[0]
    again = _apply(backend, DOC)
    assert isinstance(again, pb.ApplyStateResponse)
    assert not again.changed and again.generation == 4 and list(again.changes) == []
    assert len(backend.submitted) == 1  # nothing submitted: no new generation


def test_dry_run_submits_nothing() -> None:
    backend = Backend()
    reply = _apply(backend, DOC, dry_run=True)
    assert isinstance(reply, pb.ApplyStateResponse)
    assert not reply.changed and reply.generation == 3 and len(reply.changes) == 2
    assert backend.submitted == []


def test_problems_name_each_field_and_submit_nothing() -> None:
    backend = Backend()
    text = DOC.replace('backend: "127.0.0.1:9001"', 'backend: "nowhere", mode: l9')
    code, message = _refused(backend, text)
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "/tmp/state.yaml: listeners[0].routes[0].backend:" in message
    assert "/tmp/state.yaml: listeners[0].routes[0].mode:" in message
    assert backend.submitted == []


def test_listener_changes_are_a_failed_precondition() -> None:
    backend = Backend()
    text = DOC.replace(LISTENER, "127.0.0.1:7443")
    code, message = _refused(backend, text)
    assert code is grpc.StatusCode.FAILED_PRECONDITION
    assert "listeners[0].addr: listener 127.0.0.1:7443 does not exist" in message
    assert f"{LISTENER} is not in the file" in message
    assert backend.submitted == []


def test_country_rules_without_geoip_are_a_failed_precondition() -> None:
    backend = Backend()
    code, message = _refused(backend, DOC + "firewall: {blocked_countries: [KP]}\n")
    assert code is grpc.StatusCode.FAILED_PRECONDITION
    assert "GeoIP" in message and backend.submitted == []


def test_a_change_that_lands_in_between_is_planned_around() -> None:
    backend = Backend()
    backend.before_apply.append(RouteAdded(LISTENER, Route("*.b.test", (Address("10.0.0.1", 1),))))
    reply = _apply(backend, DOC)
    assert isinstance(reply, pb.ApplyStateResponse) and reply.changed
    assert len(backend.submitted) == 2  # the first batch did not fit; planned again
    route = backend.state.listener(LISTENER).routes["*.b.test"]
    assert route.backend == Address("127.0.0.1", 9002)  # the file's state, all the same


def test_export_state_names_its_generation() -> None:
    reply = export_state(_state(), Backend())
    assert reply.generation == 3 and "hostname: a.test" in reply.yaml
