"""The ``mc_proxy.v1.ProxyAdminService`` handlers, run on the admin server's threads.

A handler never touches the supervisor's mutable parts. Reads use values that
are immutable and swapped whole by the loop (``state``, ``status()``); a
mutation becomes one :class:`~mcproxy.model.Change` (:mod:`.convert`) that
goes to :meth:`Supervisor.submit`, and the handler waits for its future: the
loop validates it against the state, commits it, applies it and resolves the
future once every live worker has acknowledged it (invariant 2).

Errors map onto gRPC codes: a bad field is INVALID_ARGUMENT naming it, a
duplicate ALREADY_EXISTS, something absent NOT_FOUND; a worker that did not
acknowledge in time is INTERNAL naming it (the change is committed and the
worker restarts with it); a supervisor that is stopping is UNAVAILABLE.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable
from typing import Protocol, TypeVar

import grpc

from mcproxy.admin import convert, stateapi
from mcproxy.admin.convert import InvalidArgument
from mcproxy.admin.v1 import admin_pb2 as pb
from mcproxy.admin.v1 import admin_pb2_grpc
from mcproxy.health import BackendState
from mcproxy.model import Change, ProxyState, Route, StateError
from mcproxy.status import Status
from mcproxy.supervisor.manager import ACK_TIMEOUT, Stopping, WorkerNotAcknowledged

__all__ = ["AdminBackend", "AdminServicer"]

log = logging.getLogger("mcproxy.admin")
_T = TypeVar("_T")

CHANGE_TIMEOUT = ACK_TIMEOUT + 10.0
"""How long a handler waits for the loop; the loop itself gives up on acks at ACK_TIMEOUT."""

_STATE_ERROR_CODES = {
    "not_found": grpc.StatusCode.NOT_FOUND,
    "already_exists": grpc.StatusCode.ALREADY_EXISTS,
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
}


class AdminBackend(Protocol):
    """What the servicer needs from the supervisor (a fake in the unit tests)."""

    @property
    def state(self) -> ProxyState: ...

    def submit(self, change: Change) -> concurrent.futures.Future[int]: ...

    def status(self) -> Status: ...

    def backend_states(self, route: Route) -> list[BackendState]: ...


class AdminServicer(admin_pb2_grpc.ProxyAdminServiceServicer):
    """One method per RPC of ``mc_proxy.v1.ProxyAdminService``."""

    def __init__(self, backend: AdminBackend, change_timeout: float = CHANGE_TIMEOUT) -> None:
        self.backend = backend
        self.change_timeout = change_timeout

    # --- plumbing ---------------------------------------------------------------------

    def _change(self, context: grpc.ServicerContext, make: Callable[[ProxyState], Change]) -> int:
        """Build the change from the request, submit it and wait; aborts the RPC on error."""
        try:
            change = make(self.backend.state)
        except InvalidArgument as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        outcome = self._wait(self.backend.submit(change))
        if isinstance(outcome, tuple):
            context.abort(*outcome)
        log.info("admin: %s (generation %d)", change, outcome)
        return outcome

    def _wait(self, future: concurrent.futures.Future[int]) -> int | tuple[grpc.StatusCode, str]:
        """The new generation, or the status code and message to fail the call with."""
        try:
            return future.result(timeout=self.change_timeout)
        except StateError as exc:
            return _STATE_ERROR_CODES.get(exc.kind, grpc.StatusCode.FAILED_PRECONDITION), str(exc)
        except WorkerNotAcknowledged as exc:
            log.error("admin: %s", exc)
            return grpc.StatusCode.INTERNAL, str(exc)
        except Stopping as exc:
            return grpc.StatusCode.UNAVAILABLE, str(exc)
        except TimeoutError:
            if future.cancel():  # the loop never picked it up: it will not be applied
                why = "did not take the change; nothing was changed"
            else:
                why = "did not confirm the change; list before retrying"
            return grpc.StatusCode.UNAVAILABLE, f"the supervisor {why} ({self.change_timeout:g}s)"
        except Exception as exc:  # the store failed: nothing was committed
            log.exception("admin: change failed")
            return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"

    @staticmethod
    def _read(context: grpc.ServicerContext, read: Callable[[], _T]) -> _T:
        try:
            return read()
        except InvalidArgument as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    # --- routes -----------------------------------------------------------------------

    def ListRoutes(
        self, request: pb.ListRoutesRequest, context: grpc.ServicerContext
    ) -> pb.ListRoutesResponse:
        state = self.backend.state
        if request.listener:
            wanted = self._read(context, lambda: convert.listener_key(state, request.listener))
            addrs = [wanted]
        else:
            addrs = sorted(state.listeners)
        return pb.ListRoutesResponse(
            routes=[
                pb.ListedRoute(
                    listener=addr,
                    route=convert.route_to_message(route),
                    backend_states=[
                        pb.BackendStatus(address=str(b.address), up=b.up, reason=b.reason)
                        for b in self.backend.backend_states(route)
                    ],
                )
                for addr in addrs
                for _, route in sorted(state.listeners[addr].routes.items())
            ]
        )

    def AddRoute(
        self, request: pb.AddRouteRequest, context: grpc.ServicerContext
    ) -> pb.AddRouteResponse:
        generation = self._change(context, lambda state: convert.add_route(state, request))
        return pb.AddRouteResponse(generation=generation)

    def RemoveRoute(
        self, request: pb.RemoveRouteRequest, context: grpc.ServicerContext
    ) -> pb.RemoveRouteResponse:
        generation = self._change(context, lambda state: convert.remove_route(state, request))
        return pb.RemoveRouteResponse(generation=generation)

    def UpdateRoute(
        self, request: pb.UpdateRouteRequest, context: grpc.ServicerContext
    ) -> pb.UpdateRouteResponse:
        generation = self._change(context, lambda state: convert.update_route(state, request))
        return pb.UpdateRouteResponse(generation=generation)

    # --- firewall ---------------------------------------------------------------------

    def GetFirewallRules(
        self, request: pb.GetFirewallRulesRequest, context: grpc.ServicerContext
    ) -> pb.GetFirewallRulesResponse:
        return convert.firewall_rules_to_message(self.backend.state.firewall)

    def AddFirewallRule(
        self, request: pb.AddFirewallRuleRequest, context: grpc.ServicerContext
    ) -> pb.AddFirewallRuleResponse:
        generation = self._change(
            context, lambda _: convert.firewall_rule(request.type, request.value, add=True)
        )
        return pb.AddFirewallRuleResponse(generation=generation)

    def RemoveFirewallRule(
        self, request: pb.RemoveFirewallRuleRequest, context: grpc.ServicerContext
    ) -> pb.RemoveFirewallRuleResponse:
        generation = self._change(
            context, lambda _: convert.firewall_rule(request.type, request.value, add=False)
        )
        return pb.RemoveFirewallRuleResponse(generation=generation)

    # --- listeners --------------------------------------------------------------------

    def SetListenerMaxConnections(
        self, request: pb.SetListenerMaxConnectionsRequest, context: grpc.ServicerContext
    ) -> pb.SetListenerMaxConnectionsResponse:
        generation = self._change(context, lambda state: convert.max_connections(state, request))
        return pb.SetListenerMaxConnectionsResponse(generation=generation)

    def ListListeners(
        self, request: pb.ListListenersRequest, context: grpc.ServicerContext
    ) -> pb.ListListenersResponse:
        state = self.backend.state
        return pb.ListListenersResponse(
            listeners=[
                pb.ListedListener(
                    listener=addr,
                    proxy_protocol=listener.proxy_protocol,
                    max_connections=listener.max_connections,
                    routes=len(listener.routes),
                )
                for addr, listener in sorted(state.listeners.items())
            ]
        )

    def AddListener(
        self, request: pb.AddListenerRequest, context: grpc.ServicerContext
    ) -> pb.AddListenerResponse:
        """Bound on every slot (FAILED_PRECONDITION naming the reason if not, nothing
        stored), committed, then accepting on every worker when this returns."""
        generation = self._change(context, lambda _: convert.add_listener(request))
        return pb.AddListenerResponse(generation=generation)

    def RemoveListener(
        self, request: pb.RemoveListenerRequest, context: grpc.ServicerContext
    ) -> pb.RemoveListenerResponse:
        """No worker accepts on it when this returns; its open connections carry on."""
        generation = self._change(context, lambda _: convert.remove_listener(request))
        return pb.RemoveListenerResponse(generation=generation)

    # --- state ------------------------------------------------------------------------

    def ExportState(
        self, request: pb.ExportStateRequest, context: grpc.ServicerContext
    ) -> pb.ExportStateResponse:
        return stateapi.export_state(self.backend.state, self.backend)

    def ApplyState(
        self, request: pb.ApplyStateRequest, context: grpc.ServicerContext
    ) -> pb.ApplyStateResponse:
        outcome = stateapi.apply_state(
            request, self.backend, lambda: self.backend.state, self.backend.submit, self._wait
        )
        if isinstance(outcome, tuple):
            context.abort(*outcome)
        log.info(
            "admin: applied %s: %d changes (generation %d)",
            request.source_name or "a state",
            len(outcome.changes) if outcome.changed else 0,
            outcome.generation,
        )
        return outcome

    # --- L7 policies ------------------------------------------------------------------

    def ListL7Policies(
        self, request: pb.ListL7PoliciesRequest, context: grpc.ServicerContext
    ) -> pb.ListL7PoliciesResponse:
        state = self.backend.state
        listener, hostname = self._read(
            context, lambda: convert.route_key(state, request.listener, request.hostname)
        )
        route = state.listeners[listener].routes.get(hostname)
        if route is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no route {hostname} on {listener}")
        return pb.ListL7PoliciesResponse(
            policies=[convert.policy_to_message(p) for p in route.policies]
        )

    def AddL7Policy(
        self, request: pb.AddL7PolicyRequest, context: grpc.ServicerContext
    ) -> pb.AddL7PolicyResponse:
        generation = self._change(
            context, lambda state: convert.policy_change(state, request, add=True)
        )
        return pb.AddL7PolicyResponse(generation=generation)

    def RemoveL7Policy(
        self, request: pb.RemoveL7PolicyRequest, context: grpc.ServicerContext
    ) -> pb.RemoveL7PolicyResponse:
        generation = self._change(
            context, lambda state: convert.policy_change(state, request, add=False)
        )
        return pb.RemoveL7PolicyResponse(generation=generation)

    # --- status -----------------------------------------------------------------------

    def GetStatus(
        self, request: pb.GetStatusRequest, context: grpc.ServicerContext
    ) -> pb.GetStatusResponse:
        return convert.status_to_message(self.backend.status())
