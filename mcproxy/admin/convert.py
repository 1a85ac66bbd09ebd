"""Between the admin API's protobuf messages and the model's dataclasses.

Requests go one way: each mutation request becomes exactly one
:class:`~mcproxy.model.Change`, with every value checked and made canonical
by :mod:`mcproxy.validation` (the checks the YAML loader runs), or an
:class:`InvalidArgument` naming each request field at fault. Nothing here
looks at anything but the request and an immutable state, so it is tested
without gRPC. Whether a change fits the state (duplicates, absent routes) is
:func:`~mcproxy.model.apply_change`'s call, made in the supervisor's loop.

Replies go the other way, for the client: the server only sends canonical
values, so they are parsed without re-validation.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from enum import StrEnum
from typing import TypeVar

from mcproxy import validation
from mcproxy.admin.v1 import admin_pb2 as pb
from mcproxy.model import (
    Address,
    BackendProtocol,
    Balance,
    FirewallRuleAdded,
    FirewallRuleKind,
    FirewallRuleRemoved,
    FirewallRules,
    HealthCheck,
    HealthCheckKind,
    L7Policy,
    Listener,
    ListenerAdded,
    ListenerMaxConnectionsSet,
    ListenerRemoved,
    Mode,
    PolicyAdded,
    PolicyKind,
    PolicyRemoved,
    ProxyState,
    Route,
    RouteAdded,
    RouteRemoved,
    RouteUpdated,
    parse_address,
)
from mcproxy.status import ListenerStatus, Status, WorkerStatus

__all__ = [
    "InvalidArgument",
    "add_listener",
    "add_route",
    "firewall_rule",
    "firewall_rules_from_message",
    "firewall_rules_to_message",
    "health_check_from_message",
    "health_check_to_message",
    "listener_key",
    "max_connections",
    "policy_change",
    "policy_from_message",
    "policy_to_message",
    "remove_listener",
    "remove_route",
    "route_from_message",
    "route_from_reply",
    "route_key",
    "route_to_message",
    "status_from_message",
    "status_to_message",
    "update_route",
]


_E = TypeVar("_E", bound=StrEnum)


class InvalidArgument(ValueError):
    """Request fields that are wrong, as ``(field, reason)`` pairs; INVALID_ARGUMENT."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{field}: {reason}" for field, reason in problems))


def _one(field: str, reason: str) -> InvalidArgument:
    return InvalidArgument([(field, reason)])


# --- requests -> changes ------------------------------------------------------------


def listener_key(state: ProxyState, text: str, field: str = "listener") -> str:
    """The state's key for the listener an operator named (``:443``, ``[::1]:8443``...).

    Listeners come from the configuration file and cannot be added at runtime,
    so an unknown one is a wrong argument rather than a missing resource.
    """
    if not text.strip():
        raise _one(field, "required (a listener address such as ':443')")
    try:
        addr = str(validation.listener_address(text))
    except ValueError as exc:
        raise _one(field, str(exc)) from None
    if addr not in state.listeners:
        known = ", ".join(sorted(state.listeners)) or "none"
        raise _one(field, f"no listener {addr} is configured (listeners: {known})")
    return addr


def _hostname(text: str, field: str) -> str:
    if not text.strip():
        raise _one(field, "required")
    try:
        return validation.hostname(text)
    except ValueError as exc:
        raise _one(field, str(exc)) from None


def route_key(state: ProxyState, listener: str, hostname: str) -> tuple[str, str]:
    """``(listener, hostname)`` of a route named by a request, both canonical."""
    return listener_key(state, listener), _hostname(hostname, "hostname")


def route_from_message(message: pb.Route, field: str = "route") -> Route:
    """A validated route, or :class:`InvalidArgument` listing every problem.

    Certificate and CA paths must be absolute (the supervisor's working
    directory is not the caller's) and must load, as a worker will load them.
    ``backend`` (one address, for old clients) and ``backends`` may both be
    set only when ``backend`` is ``backends[0]`` (what replies carry).
    """
    problems: list[tuple[str, str]] = []
    hostname = ""
    try:
        hostname = _hostname(message.hostname, f"{field}.hostname")
    except InvalidArgument as exc:
        problems += exc.problems
    backends = _backends(message, field, problems)

    def choice(name: str, parse: Callable[[str], _E], default: _E) -> _E:
        text: str = getattr(message, name)
        if not text.strip():
            return default
        try:
            return parse(text)
        except ValueError as exc:
            problems.append((f"{field}.{name}", str(exc)))
            return default

    mode = choice("mode", validation.mode, Mode.L4)
    balance = choice("balance", validation.balance, Balance.ROUND_ROBIN)
    protocol = choice("backend_protocol", validation.backend_protocol, BackendProtocol.H2)
    health_check = None
    if message.HasField("health_check"):
        try:
            health_check = health_check_from_message(message.health_check)
        except validation.FieldError as exc:
            problems.append((f"{field}.health_check.{exc.field}", exc.reason))
    policies: list[L7Policy] = []
    for index, item in enumerate(message.l7_policies):
        try:
            policies.append(validation.policy(item.type, item.value))
        except validation.FieldError as exc:
            problems.append((f"{field}.l7_policies[{index}].{exc.field}", exc.reason))
    server_name = message.backend_server_name.strip() or None
    if server_name is not None:
        try:
            server_name = validation.server_name(server_name)
        except ValueError as exc:
            problems.append((f"{field}.backend_server_name", str(exc)))
    if problems:
        raise InvalidArgument(problems)
    route = Route(
        hostname=hostname,
        backends=backends,
        mode=mode,
        tls_cert=message.tls_cert or None,
        tls_key=message.tls_key or None,
        backend_tls=message.backend_tls,
        send_proxy_protocol=message.send_proxy_protocol,
        policies=tuple(policies),
        balance=balance,
        health_check=health_check,
        backend_protocol=protocol,
        backend_ca=message.backend_ca or None,
        backend_server_name=server_name,
        backend_client_cert=message.backend_client_cert or None,
        backend_client_key=message.backend_client_key or None,
        client_ca=message.client_ca or None,
    )
    problems = [(f"{field}.{name}", reason) for name, reason in validation.route_problems(route)]
    if problems:
        raise InvalidArgument(problems)
    return route


def _backends(
    message: pb.Route, field: str, problems: list[tuple[str, str]]
) -> tuple[Address, ...]:
    """The route's backends from ``backends`` or the old ``backend``; problems appended."""
    before = len(problems)
    result: list[Address] = []
    for index, text in enumerate(message.backends):
        try:
            result.append(validation.backend_address(text))
        except ValueError as exc:
            problems.append((f"{field}.backends[{index}]", str(exc)))
    if message.backend.strip():
        try:
            one = validation.backend_address(message.backend)
        except ValueError as exc:
            problems.append((f"{field}.backend", str(exc)))
        else:
            if not message.backends:
                result = [one]
            elif result and one != result[0]:
                problems.append(
                    (f"{field}.backend", "give backend or backends, not both (or backends[0])")
                )
    elif not message.backends:
        problems.append((f"{field}.backend", "required (host:port, or one or more in backends)"))
    if len(problems) == before:
        problems += [
            (f"{field}.{name}", why) for name, why in validation.backends_problems(tuple(result))
        ]
    return tuple(result)


def health_check_from_message(message: pb.HealthCheck) -> HealthCheck:
    """A health check; zero and empty fields take the defaults. Raises FieldError (``kind``...)."""
    if not message.kind.strip():
        raise validation.FieldError("kind", "required (tcp or http)")
    try:
        kind = validation.health_check_kind(message.kind)
    except ValueError as exc:
        raise validation.FieldError("kind", str(exc)) from None
    d = HealthCheck(kind)
    return HealthCheck(
        kind=kind,
        interval=message.interval_seconds or d.interval,
        timeout=message.timeout_seconds or d.timeout,
        path=message.path or d.path,
        rise=message.rise or d.rise,
        fall=message.fall or d.fall,
    )


def health_check_to_message(check: HealthCheck) -> pb.HealthCheck:
    return pb.HealthCheck(
        kind=check.kind.value,
        interval_seconds=check.interval,
        timeout_seconds=check.timeout,
        path=check.path,
        rise=check.rise,
        fall=check.fall,
    )


def _listener_and_route(
    state: ProxyState, request: pb.AddRouteRequest | pb.UpdateRouteRequest
) -> tuple[str, Route]:
    """Reports the listener's problems and the route's together."""
    problems: list[tuple[str, str]] = []
    listener = route = None
    try:
        listener = listener_key(state, request.listener)
    except InvalidArgument as exc:
        problems += exc.problems
    if request.HasField("route"):
        try:
            route = route_from_message(request.route)
        except InvalidArgument as exc:
            problems += exc.problems
    else:
        problems.append(("route", "required"))
    if listener is None or route is None:
        raise InvalidArgument(problems)
    return listener, route


def add_route(state: ProxyState, request: pb.AddRouteRequest) -> RouteAdded:
    return RouteAdded(*_listener_and_route(state, request))


def update_route(state: ProxyState, request: pb.UpdateRouteRequest) -> RouteUpdated:
    """Validated exactly like :func:`add_route`; whether the route exists is the loop's call."""
    return RouteUpdated(*_listener_and_route(state, request))


def remove_route(state: ProxyState, request: pb.RemoveRouteRequest) -> RouteRemoved:
    return RouteRemoved(*route_key(state, request.listener, request.hostname))


def firewall_rule(
    kind_text: str, value: str, *, add: bool
) -> FirewallRuleAdded | FirewallRuleRemoved:
    """A firewall change with the value in its canonical form (so removal matches addition)."""
    try:
        kind = validation.firewall_kind(kind_text)
    except ValueError as exc:
        raise _one("type", str(exc)) from None
    try:
        canonical = validation.firewall_value(kind, value)
    except ValueError as exc:
        raise _one("value", str(exc)) from None
    return FirewallRuleAdded(kind, canonical) if add else FirewallRuleRemoved(kind, canonical)


def max_connections(
    state: ProxyState, request: pb.SetListenerMaxConnectionsRequest
) -> ListenerMaxConnectionsSet:
    listener = listener_key(state, request.listener)
    try:
        limit = validation.max_connections(request.max_connections)
    except ValueError as exc:
        raise _one("max_connections", str(exc)) from None
    return ListenerMaxConnectionsSet(listener, limit)


def add_listener(request: pb.AddListenerRequest) -> ListenerAdded:
    """A new listener without routes; whether its address is free is the loop's call."""
    problems: list[tuple[str, str]] = []
    addr: Address | None = None
    if not request.listener.strip():
        problems.append(("listener", "required (a listener address such as ':443')"))
    else:
        try:
            addr = validation.listener_address(request.listener)
        except ValueError as exc:
            problems.append(("listener", str(exc)))
    limit = 0
    try:
        limit = validation.max_connections(request.max_connections)
    except ValueError as exc:
        problems.append(("max_connections", str(exc)))
    if problems or addr is None:
        raise InvalidArgument(problems)
    return ListenerAdded(
        Listener(addr=addr, proxy_protocol=request.proxy_protocol, max_connections=limit)
    )


def remove_listener(request: pb.RemoveListenerRequest) -> ListenerRemoved:
    """NOT_FOUND (from the loop) when no such listener exists."""
    if not request.listener.strip():
        raise _one("listener", "required (a listener address such as ':443')")
    try:
        return ListenerRemoved(str(validation.listener_address(request.listener)))
    except ValueError as exc:
        raise _one("listener", str(exc)) from None


def policy_change(
    state: ProxyState,
    request: pb.AddL7PolicyRequest | pb.RemoveL7PolicyRequest,
    *,
    add: bool,
) -> PolicyAdded | PolicyRemoved:
    listener, hostname = route_key(state, request.listener, request.hostname)
    try:
        policy = validation.policy(request.type, request.value)
    except validation.FieldError as exc:
        raise _one(exc.field, exc.reason) from None
    if add:
        return PolicyAdded(listener, hostname, policy)
    return PolicyRemoved(listener, hostname, policy)


# --- model -> messages (server) and back (client) -------------------------------------


def policy_to_message(policy: L7Policy) -> pb.L7Policy:
    return pb.L7Policy(type=policy.kind.value, value=policy.value)


def policy_from_message(message: pb.L7Policy) -> L7Policy:
    return L7Policy(PolicyKind(message.type), message.value)


def route_to_message(route: Route) -> pb.Route:
    return pb.Route(
        hostname=route.hostname,
        backend=str(route.backend),
        backends=[str(b) for b in route.backends],
        mode=route.mode.value,
        tls_cert=route.tls_cert or "",
        tls_key=route.tls_key or "",
        backend_tls=route.backend_tls,
        send_proxy_protocol=route.send_proxy_protocol,
        l7_policies=[policy_to_message(p) for p in route.policies],
        balance=route.balance.value,
        health_check=None
        if route.health_check is None
        else health_check_to_message(route.health_check),
        backend_protocol=route.backend_protocol.value,
        backend_ca=route.backend_ca or "",
        backend_server_name=route.backend_server_name or "",
        backend_client_cert=route.backend_client_cert or "",
        backend_client_key=route.backend_client_key or "",
        client_ca=route.client_ca or "",
    )


def route_from_reply(message: pb.Route) -> Route:
    """A route as the server sent it (canonical already; not re-validated).

    A server from before ``backends`` sends only ``backend``.
    """
    backends = list(message.backends) or [message.backend]
    check = message.health_check
    return Route(
        hostname=message.hostname,
        backends=tuple(parse_address(b) for b in backends),
        mode=Mode(message.mode or Mode.L4),
        tls_cert=message.tls_cert or None,
        tls_key=message.tls_key or None,
        backend_tls=message.backend_tls,
        send_proxy_protocol=message.send_proxy_protocol,
        policies=tuple(policy_from_message(p) for p in message.l7_policies),
        balance=Balance(message.balance or Balance.ROUND_ROBIN),
        health_check=HealthCheck(
            kind=HealthCheckKind(check.kind),
            interval=check.interval_seconds,
            timeout=check.timeout_seconds,
            path=check.path,
            rise=check.rise,
            fall=check.fall,
        )
        if message.HasField("health_check")
        else None,
        backend_protocol=BackendProtocol(message.backend_protocol or BackendProtocol.H2),
        backend_ca=message.backend_ca or None,
        backend_server_name=message.backend_server_name or None,
        backend_client_cert=message.backend_client_cert or None,
        backend_client_key=message.backend_client_key or None,
        client_ca=message.client_ca or None,
    )


def firewall_rules_to_message(rules: FirewallRules) -> pb.GetFirewallRulesResponse:
    return pb.GetFirewallRulesResponse(
        rules=[
            pb.FirewallRule(type=kind.value, value=value)
            for kind in FirewallRuleKind
            for value in sorted(rules.values(kind))
        ]
    )


def firewall_rules_from_message(message: pb.GetFirewallRulesResponse) -> FirewallRules:
    values: dict[FirewallRuleKind, set[str]] = {kind: set() for kind in FirewallRuleKind}
    for rule in message.rules:
        values[FirewallRuleKind(rule.type)].add(rule.value)
    rules = FirewallRules()
    for kind, found in values.items():
        rules = rules.with_values(kind, frozenset(found))
    return rules


def status_to_message(status: Status) -> pb.GetStatusResponse:
    response = pb.GetStatusResponse(
        version=status.version,
        uptime_seconds=status.uptime_seconds,
        generation=status.generation,
        worker_restarts=status.worker_restarts,
        workers=[
            pb.WorkerStatus(
                slot=w.slot,
                pid=w.pid,
                generation=w.generation,
                active_connections=w.active_connections,
                uptime_seconds=w.uptime_seconds,
            )
            for w in status.workers
        ],
        listeners=[
            pb.ListenerStatus(
                address=lst.address,
                routes=lst.routes,
                active_connections=lst.active_connections,
                max_connections=lst.max_connections,
                proxy_protocol=lst.proxy_protocol,
            )
            for lst in status.listeners
        ],
    )
    response.start_time.FromDatetime(
        datetime.datetime.fromtimestamp(status.start_time, datetime.UTC)
    )
    return response


def status_from_message(message: pb.GetStatusResponse) -> Status:
    return Status(
        version=message.version,
        start_time=message.start_time.ToDatetime(datetime.UTC).timestamp(),
        uptime_seconds=message.uptime_seconds,
        generation=message.generation,
        worker_restarts=message.worker_restarts,
        workers=tuple(
            WorkerStatus(
                slot=w.slot,
                pid=w.pid,
                generation=w.generation,
                active_connections=w.active_connections,
                uptime_seconds=w.uptime_seconds,
            )
            for w in message.workers
        ),
        listeners=tuple(
            ListenerStatus(
                address=lst.address,
                routes=lst.routes,
                active_connections=lst.active_connections,
                max_connections=lst.max_connections,
                proxy_protocol=lst.proxy_protocol,
            )
            for lst in message.listeners
        ),
    )
