"""A typed client for the admin API: model dataclasses in and out, one error type.

``mcproxyctl`` is built on it, and so can any Python control plane::

    with AdminClient("/srv/mc-proxy/admin.sock") as admin:
        admin.add_route(":443", "example.com", "10.0.0.5:8443")
        for listed in admin.list_routes():
            print(listed.listener, listed.route.hostname, listed.route.backend)

Arguments are the operator's text (``"l7"``, ``"cidr"``, ``"10.0.0.5:8443"``):
the server validates and canonicalises them, so its message is the one error
an operator sees. Every failure raises :class:`AdminError` with the gRPC code
and the server's message. A mutation returns the configuration generation
that carries it, live on every worker by the time the call returns.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mcproxy.admin import convert
from mcproxy.admin.v1 import admin_pb2 as pb
from mcproxy.admin.v1 import admin_pb2_grpc
from mcproxy.model import FirewallRules, L7Policy, Route
from mcproxy.settings import DEFAULT_ADMIN_SOCKET
from mcproxy.statefile import PlannedChange
from mcproxy.status import Status

__all__ = [
    "DEFAULT_SOCKET",
    "AdminClient",
    "AdminError",
    "AppliedState",
    "BackendState",
    "ListedRoute",
    "default_socket",
]

DEFAULT_SOCKET = DEFAULT_ADMIN_SOCKET
DEFAULT_TIMEOUT = 30.0
"""Longer than the server's own wait for worker acknowledgements, so its message wins."""

STATE_TIMEOUT = 300.0
"""Export and apply read and write the whole state: 100,000 routes take seconds of YAML."""

MAX_REPLY_BYTES = 256 * 1024 * 1024
"""gRPC's default 4 MiB holds ~70,000 routes in a ListRoutes reply; allow far more."""

_Reply = TypeVar("_Reply")


def default_socket() -> str:
    """``$MCPROXY_SOCKET``, else :data:`DEFAULT_SOCKET`."""
    return os.environ.get("MCPROXY_SOCKET") or DEFAULT_SOCKET


class AdminError(Exception):
    """A call failed; ``code`` is the gRPC status code, ``message`` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class BackendState:
    """One backend of a listed route as the health checks see it (``BackendStatus``)."""

    address: str
    up: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ListedRoute:
    listener: str
    route: Route
    backend_states: tuple[BackendState, ...] = ()
    """One per backend when the server reports them; empty when it does not."""


@dataclass(frozen=True, slots=True)
class ListedListener:
    listener: str
    proxy_protocol: bool
    max_connections: int
    routes: int


@dataclass(frozen=True, slots=True)
class AppliedState:
    """What ``apply_state`` did (or, with ``dry_run``, would do)."""

    changes: list[PlannedChange]
    generation: int
    """The generation carrying the change; the current one when nothing changed."""
    changed: bool
    notes: list[str]


class AdminClient:
    """A connection to one mc-proxy's admin socket. Close it, or use it as a context manager."""

    def __init__(self, socket_path: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.socket_path = os.path.abspath(socket_path)
        self.timeout = timeout
        self._channel = grpc.insecure_channel(
            f"unix:{self.socket_path}",
            options=[("grpc.max_receive_message_length", MAX_REPLY_BYTES)],
        )
        self._stub: Any = admin_pb2_grpc.ProxyAdminServiceStub(self._channel)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _call(
        self,
        rpc: Callable[..., object],
        request: object,
        reply: type[_Reply],
        timeout: float | None = None,
    ) -> _Reply:
        try:
            response = rpc(request, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        assert isinstance(response, reply)
        return response

    def _error(self, exc: grpc.RpcError) -> AdminError:
        if not isinstance(exc, grpc.Call):  # pragma: no cover - grpcio's errors are Calls
            return AdminError(grpc.StatusCode.UNKNOWN, str(exc))
        code, details = exc.code(), exc.details() or ""
        if code is grpc.StatusCode.UNAVAILABLE:
            details = f"cannot reach mc-proxy at {self.socket_path} ({details})"
        return AdminError(code, details)

    # --- routes -----------------------------------------------------------------------

    def list_routes(self, listener: str | None = None) -> list[ListedRoute]:
        """Routes of ``listener`` (every listener when None), by listener then hostname."""
        response = self._call(
            self._stub.ListRoutes,
            pb.ListRoutesRequest(listener=listener or ""),
            pb.ListRoutesResponse,
        )
        return [
            ListedRoute(
                item.listener,
                convert.route_from_reply(item.route),
                tuple(BackendState(b.address, b.up, b.reason) for b in item.backend_states),
            )
            for item in response.routes
        ]

    def add_route(
        self, listener: str, hostname: str, backend: str | Sequence[str], **options: Any
    ) -> int:
        """Add a route to one backend (a string) or several (a sequence of strings).

        ``options`` are the keyword arguments of :func:`route_message` (``mode``,
        ``tls_cert``, ``balance``, ``health_check``...); file paths are paths
        on the proxy's host (absolute).
        """
        route = route_message(hostname, backend, **options)
        request = pb.AddRouteRequest(listener=listener, route=route)
        return self._call(self._stub.AddRoute, request, pb.AddRouteResponse).generation

    def update_route(
        self, listener: str, hostname: str, backend: str | Sequence[str], **options: Any
    ) -> int:
        """Replace the route of ``hostname`` whole (what is not given takes its default).

        The arguments are :meth:`add_route`'s. NOT_FOUND when there is no such route.
        """
        route = route_message(hostname, backend, **options)
        request = pb.UpdateRouteRequest(listener=listener, route=route)
        return self._call(self._stub.UpdateRoute, request, pb.UpdateRouteResponse).generation

    def remove_route(self, listener: str, hostname: str) -> int:
        request = pb.RemoveRouteRequest(listener=listener, hostname=hostname)
        return self._call(self._stub.RemoveRoute, request, pb.RemoveRouteResponse).generation

    # --- firewall ---------------------------------------------------------------------

    def firewall_rules(self) -> FirewallRules:
        response = self._call(
            self._stub.GetFirewallRules, pb.GetFirewallRulesRequest(), pb.GetFirewallRulesResponse
        )
        return convert.firewall_rules_from_message(response)

    def add_firewall_rule(self, kind: str, value: str) -> int:
        """``kind`` is ``ip``, ``cidr`` or ``country``."""
        request = pb.AddFirewallRuleRequest(type=kind, value=value)
        return self._call(
            self._stub.AddFirewallRule, request, pb.AddFirewallRuleResponse
        ).generation

    def remove_firewall_rule(self, kind: str, value: str) -> int:
        request = pb.RemoveFirewallRuleRequest(type=kind, value=value)
        return self._call(
            self._stub.RemoveFirewallRule, request, pb.RemoveFirewallRuleResponse
        ).generation

    # --- listeners --------------------------------------------------------------------

    def list_listeners(self) -> list[ListedListener]:
        """Every listener, by address."""
        response = self._call(
            self._stub.ListListeners, pb.ListListenersRequest(), pb.ListListenersResponse
        )
        return [
            ListedListener(item.listener, item.proxy_protocol, item.max_connections, item.routes)
            for item in response.listeners
        ]

    def add_listener(
        self, listener: str, proxy_protocol: bool = False, max_connections: int = 0
    ) -> int:
        """Bound, stored and accepting on every worker when this returns."""
        request = pb.AddListenerRequest(
            listener=listener, proxy_protocol=proxy_protocol, max_connections=max_connections
        )
        return self._call(self._stub.AddListener, request, pb.AddListenerResponse).generation

    def remove_listener(self, listener: str) -> int:
        """No worker accepts on it when this returns; open connections finish."""
        request = pb.RemoveListenerRequest(listener=listener)
        return self._call(self._stub.RemoveListener, request, pb.RemoveListenerResponse).generation

    def set_listener_max_connections(self, listener: str, max_connections: int) -> int:
        """0 = unlimited."""
        request = pb.SetListenerMaxConnectionsRequest(
            listener=listener, max_connections=max_connections
        )
        reply = pb.SetListenerMaxConnectionsResponse
        return self._call(self._stub.SetListenerMaxConnections, request, reply).generation

    # --- L7 policies ------------------------------------------------------------------

    def list_policies(self, listener: str, hostname: str) -> list[L7Policy]:
        request = pb.ListL7PoliciesRequest(listener=listener, hostname=hostname)
        response = self._call(self._stub.ListL7Policies, request, pb.ListL7PoliciesResponse)
        return [convert.policy_from_message(p) for p in response.policies]

    def add_policy(self, listener: str, hostname: str, kind: str, value: str) -> int:
        """``kind`` is ``block_user_agent`` or ``require_header``."""
        request = pb.AddL7PolicyRequest(
            listener=listener, hostname=hostname, type=kind, value=value
        )
        return self._call(self._stub.AddL7Policy, request, pb.AddL7PolicyResponse).generation

    def remove_policy(self, listener: str, hostname: str, kind: str, value: str) -> int:
        request = pb.RemoveL7PolicyRequest(
            listener=listener, hostname=hostname, type=kind, value=value
        )
        return self._call(self._stub.RemoveL7Policy, request, pb.RemoveL7PolicyResponse).generation

    # --- state as a file ------------------------------------------------------------

    def export_state(self) -> tuple[str, int]:
        """The state as YAML in the config file's schema, and its generation."""
        response = self._call(
            self._stub.ExportState,
            pb.ExportStateRequest(),
            pb.ExportStateResponse,
            max(self.timeout, STATE_TIMEOUT),
        )
        return response.yaml, response.generation

    def apply_state(
        self, text: str, *, dry_run: bool = False, source_name: str = ""
    ) -> AppliedState:
        """Make the state equal to the YAML document ``text``, as one change.

        ``source_name`` names the document in problems; when it is a path,
        relative paths inside the document resolve against its directory.
        A document with problems raises INVALID_ARGUMENT naming each field.
        """
        request = pb.ApplyStateRequest(yaml=text, dry_run=dry_run, source_name=source_name)
        response = self._call(
            self._stub.ApplyState, request, pb.ApplyStateResponse, max(self.timeout, STATE_TIMEOUT)
        )
        return AppliedState(
            changes=[
                PlannedChange(c.action, c.kind, c.listener, c.name, c.detail)
                for c in response.changes
            ],
            generation=response.generation,
            changed=response.changed,
            notes=list(response.notes),
        )

    # --- status -----------------------------------------------------------------------

    def status(self) -> Status:
        response = self._call(self._stub.GetStatus, pb.GetStatusRequest(), pb.GetStatusResponse)
        return convert.status_from_message(response)

    def health(self, service: str = "") -> bool:
        """True when ``grpc.health.v1.Health/Check`` answers SERVING for ``service``."""
        stub: Any = health_pb2_grpc.HealthStub(self._channel)
        request = health_pb2.HealthCheckRequest(service=service)
        response = self._call(stub.Check, request, health_pb2.HealthCheckResponse)
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


def route_message(
    hostname: str,
    backend: str | Sequence[str],
    *,
    mode: str = "l4",
    tls_cert: str | None = None,
    tls_key: str | None = None,
    backend_tls: bool = False,
    send_proxy_protocol: bool = False,
    policies: Iterable[tuple[str, str]] = (),
    balance: str = "",
    health_check: str | None = None,
    health_interval: float = 0.0,
    health_timeout: float = 0.0,
    health_path: str = "",
    health_rise: int = 0,
    health_fall: int = 0,
    backend_protocol: str = "",
    backend_ca: str | None = None,
    backend_server_name: str | None = None,
    backend_client_cert: str | None = None,
    backend_client_key: str | None = None,
    client_ca: str | None = None,
) -> pb.Route:
    """A ``Route`` message from the operator's text; empty and zero values take the defaults.

    ``health_check`` is the check's kind (``tcp``, ``http``); the ``health_*``
    values (seconds, path, counts) apply only with it.
    """
    backends = [backend] if isinstance(backend, str) else list(backend)
    message = pb.Route(
        hostname=hostname,
        backends=backends,
        mode=mode,
        tls_cert=tls_cert or "",
        tls_key=tls_key or "",
        backend_tls=backend_tls,
        send_proxy_protocol=send_proxy_protocol,
        l7_policies=[pb.L7Policy(type=kind, value=value) for kind, value in policies],
        balance=balance,
        backend_protocol=backend_protocol,
        backend_ca=backend_ca or "",
        backend_server_name=backend_server_name or "",
        backend_client_cert=backend_client_cert or "",
        backend_client_key=backend_client_key or "",
        client_ca=client_ca or "",
    )
    if len(backends) == 1:
        message.backend = backends[0]  # what a server from before `backends` reads
    if health_check is not None:
        message.health_check.CopyFrom(
            pb.HealthCheck(
                kind=health_check,
                interval_seconds=health_interval,
                timeout_seconds=health_timeout,
                path=health_path,
                rise=health_rise,
                fall=health_fall,
            )
        )
    return message
