import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Route(_message.Message):
    __slots__ = ("hostname", "backend", "mode", "tls_cert", "tls_key", "backend_tls", "send_proxy_protocol", "l7_policies", "backends", "balance", "health_check", "backend_protocol", "backend_ca", "backend_server_name", "backend_client_cert", "backend_client_key", "client_ca")
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    TLS_CERT_FIELD_NUMBER: _ClassVar[int]
    TLS_KEY_FIELD_NUMBER: _ClassVar[int]
    BACKEND_TLS_FIELD_NUMBER: _ClassVar[int]
    SEND_PROXY_PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    L7_POLICIES_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    BALANCE_FIELD_NUMBER: _ClassVar[int]
    HEALTH_CHECK_FIELD_NUMBER: _ClassVar[int]
    BACKEND_PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_CA_FIELD_NUMBER: _ClassVar[int]
    BACKEND_SERVER_NAME_FIELD_NUMBER: _ClassVar[int]
    BACKEND_CLIENT_CERT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_CLIENT_KEY_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CA_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    backend: str
    mode: str
    tls_cert: str
    tls_key: str
    backend_tls: bool
    send_proxy_protocol: bool
    l7_policies: _containers.RepeatedCompositeFieldContainer[L7Policy]
    backends: _containers.RepeatedScalarFieldContainer[str]
    balance: str
    health_check: HealthCheck
    backend_protocol: str
    backend_ca: str
    backend_server_name: str
    backend_client_cert: str
    backend_client_key: str
    client_ca: str
    def __init__(self, hostname: _Optional[str] = ..., backend: _Optional[str] = ..., mode: _Optional[str] = ..., tls_cert: _Optional[str] = ..., tls_key: _Optional[str] = ..., backend_tls: _Optional[bool] = ..., send_proxy_protocol: _Optional[bool] = ..., l7_policies: _Optional[_Iterable[_Union[L7Policy, _Mapping]]] = ..., backends: _Optional[_Iterable[str]] = ..., balance: _Optional[str] = ..., health_check: _Optional[_Union[HealthCheck, _Mapping]] = ..., backend_protocol: _Optional[str] = ..., backend_ca: _Optional[str] = ..., backend_server_name: _Optional[str] = ..., backend_client_cert: _Optional[str] = ..., backend_client_key: _Optional[str] = ..., client_ca: _Optional[str] = ...) -> None: ...

class HealthCheck(_message.Message):
    __slots__ = ("kind", "interval_seconds", "timeout_seconds", "path", "rise", "fall")
    KIND_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    RISE_FIELD_NUMBER: _ClassVar[int]
    FALL_FIELD_NUMBER: _ClassVar[int]
    kind: str
    interval_seconds: float
    timeout_seconds: float
    path: str
    rise: int
    fall: int
    def __init__(self, kind: _Optional[str] = ..., interval_seconds: _Optional[float] = ..., timeout_seconds: _Optional[float] = ..., path: _Optional[str] = ..., rise: _Optional[int] = ..., fall: _Optional[int] = ...) -> None: ...

class BackendStatus(_message.Message):
    __slots__ = ("address", "up", "reason")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    UP_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    address: str
    up: bool
    reason: str
    def __init__(self, address: _Optional[str] = ..., up: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class L7Policy(_message.Message):
    __slots__ = ("type", "value")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    type: str
    value: str
    def __init__(self, type: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class FirewallRule(_message.Message):
    __slots__ = ("type", "value")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    type: str
    value: str
    def __init__(self, type: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class ListRoutesRequest(_message.Message):
    __slots__ = ("listener",)
    LISTENER_FIELD_NUMBER: _ClassVar[int]
    listener: str
    def __init__(self, listener: _Optional[str] = ...) -> None: ...

class ListedRoute(_message.Message):
    __slots__ = ("listener", "route", "backend_states")
    LISTENER_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_STATES_FIELD_NUMBER: _ClassVar[int]
    listener: str
    route: Route
    backend_states: _containers.RepeatedCompositeFieldContainer[BackendStatus]
    def __init__(self, listener: _Optional[str] = ..., route: _Optional[_Union[Route, _Mapping]] = ..., backend_states: _Optional[_Iterable[_Union[BackendStatus, _Mapping]]] = ...) -> None: ...

class ListRoutesResponse(_message.Message):
    __slots__ = ("routes",)
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    routes: _containers.RepeatedCompositeFieldContainer[ListedRoute]
    def __init__(self, routes: _Optional[_Iterable[_Union[ListedRoute, _Mapping]]] = ...) -> None: ...

class AddRouteRequest(_message.Message):
    __slots__ = ("listener", "route")
    LISTENER_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    listener: str
    route: Route
    def __init__(self, listener: _Optional[str] = ..., route: _Optional[_Union[Route, _Mapping]] = ...) -> None: ...

class AddRouteResponse(_message.Message):
    __slots__ = ("generation",)
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    generation: int
    def __init__(self, generation: _Optional[int] = ...) -> None: ...

class RemoveRouteRequest(_message.Message):
    __slots__ = ("listener", "hostname")
    LISTENER_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    listener: str
    hostname: str
    def __init__(self, listener: _Optional[str] = ..., hostname: _Optional[str] = ...) -> None: ...

class RemoveRouteResponse(_message.Message):
    __slots__ = ("generation",)
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    generation: int
    def __init__(self, generation: _Optional[int] = ...) -> None: ...

class GetFirewallRulesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetFirewallRulesResponse(_message.Message):
    __slots__ = ("rules",)
    RULES_FIELD_NUMBER: _ClassVar[int]
    rules: _containers.RepeatedCompositeFieldContainer[FirewallRule]
    def __init__(self, rules: _Optional[_Iterable[_Union[FirewallRule, _Mapping]]] = ...) -> None: ...

class AddFirewallRuleRequest(_message.Message):
    __slots__ = ("type", "value")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    type: str
    value: str
    def __init__(self, type: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class AddFirewallRuleResponse(_message.Message):
    __slots__ = ("generation",)
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    generation: int
    def __init__(self, generation: _Optional[int] = ...) -> None: ...

class RemoveFirewallRuleRequest(_message.Message):
    __slots__ = ("type", "value")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    type: str
    value: str
    def __init__(self, type: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class RemoveFirewallRuleResponse(_message.Message):
    __slots__ = ("generation",)
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    generation: int
    def __init__(self, generation: _Optional[int] = ...) -> None: ...

class SetListenerMaxConnectionsRequest(_message.Message):
    __slots__ = ("listener", "max_connections")
    LISTENER_FIELD_NUMBER: _ClassVar[int]
    MAX_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    listener: str
    max_connections: int
    def __init__(self, listener: _Optional[str] = ..., max_connections: _Optional[int] = ...) -> None: ...

class SetListenerMaxConnectionsResponse(_message.Message):
    __slots__ = ("generation",)
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    generation: int
    def __init__(self, generation: _Optional[int] = ...) -> None: ...

class ListL7PoliciesRequest(_message.Message):
    __slots__ = ("listener", "hostname")
    LISTENER_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    listener: str
    hostname: str
    def __init__(self, listener: _Optional[str] = ..., hostname: _Optional[str] = ...) -> None: ...

class ListL7PoliciesResponse(_message.Message):
    __slots__ = ("policies",)
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    policies: _containers.RepeatedCompositeFieldContainer[L7Policy]
    def __init__(self, policies: _Optional[_Iterable[_Union[L7Policy, _Mapping]]] = ...) -> None: ...

class AddL7PolicyRequest(_message.Message):
    __slots__ = ("listener", "hostname", "type", "value")
    LISTENER_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    listener: str
    hostname: str
    type: str
    value: str
    def __init__(self, listener: _Optional[str] = ..., hostname: _Optional[str] = ..., type: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class AddL7PolicyResponse(_message.Message):
    __slots__ = ("generation",)
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    generation: int
    def __init__(self, generation: _Optional[int] = ...) -> None: ...

class RemoveL7PolicyRequest(_message.Message):
    __slots__ = ("listener", "hostname", "type", "value")
    LISTENER_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    listener: str
    hostname: str
    type: str
    value: str
    def __init__(self, listener: _Optional[str] = ..., hostname: _Optional[str] = ..., type: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class RemoveL7PolicyResponse(_message.Message):
    __slots__ = ("generation",)
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    generation: int
    def __init__(self, generation: _Optional[int] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("slot", "pid", "generation", "active_connections", "uptime_seconds")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    slot: int
    pid: int
    generation: int
    active_connections: int
    uptime_seconds: float
    def __init__(self, slot: _Optional[int] = ..., pid: _Optional[int] = ..., generation: _Optional[int] = ..., active_connections: _Optional[int] = ..., uptime_seconds: _Optional[float] = ...) -> None: ...

class ListenerStatus(_message.Message):
    __slots__ = ("address", "routes", "active_connections", "max_connections", "proxy_protocol")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    PROXY_PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    address: str
    routes: int
    active_connections: int
    max_connections: int
    proxy_protocol: bool
    def __init__(self, address: _Optional[str] = ..., routes: _Optional[int] = ..., active_connections: _Optional[int] = ..., max_connections: _Optional[int] = ..., proxy_protocol: _Optional[bool] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("version", "start_time", "uptime_seconds", "generation", "worker_restarts", "workers", "listeners")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    WORKER_RESTARTS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    LISTENERS_FIELD_NUMBER: _ClassVar[int]
    version: str
    start_time: _timestamp_pb2.Timestamp
    uptime_seconds: float
    generation: int
    worker_restarts: int
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    listeners: _containers.RepeatedCompositeFieldContainer[ListenerStatus]
    def __init__(self, version: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., uptime_seconds: _Optional[float] = ..., generation: _Optional[int] = ..., worker_restarts: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., listeners: _Optional[_Iterable[_Union[ListenerStatus, _Mapping]]] = ...) -> None: ...

class UpdateRouteRequest(_message.Message):
    __slots__ = ("listener", "route")
    LISTENER_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    listener: str
    route: Route
    def __init__(self, listener: _Optional[str] = ..., route: _Optional[_Union[Route, _Mapping]] = ...) -> None: ...

class UpdateRouteResponse(_message.Message):
    __slots__ = ("generation",)
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    generation: int
    def __init__(self, generation: _Optional[int] = ...) -> None: ...

class ListListenersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListedListener(_message.Message):
    __slots__ = ("listener", "proxy_protocol", "max_connections", "routes")
    LISTENER_FIELD_NUMBER: _ClassVar[int]
    PROXY_PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    MAX_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    listener: str
    proxy_protocol: bool
    max_connections: int
    routes: int
    def __init__(self, listener: _Optional[str] = ..., proxy_protocol: _Optional[bool] = ..., max_connections: _Optional[int] = ..., routes: _Optional[int] = ...) -> None: ...

class ListListenersResponse(_message.Message):
    __slots__ = ("listeners",)
    LISTENERS_FIELD_NUMBER: _ClassVar[int]
    listeners: _containers.RepeatedCompositeFieldContainer[ListedListener]
    def __init__(self, listeners: _Optional[_Iterable[_Union[ListedListener, _Mapping]]] = ...) -> None: ...

class AddListenerRequest(_message.Message):
    __slots__ = ("listener", "proxy_protocol", "max_connections")
    LISTENER_FIELD_NUMBER: _ClassVar[int]
    PROXY_PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    MAX_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    listener: str
    proxy_protocol: bool
    max_connections: int
    def __init__(self, listener: _Optional[str] = ..., proxy_protocol: _Optional[bool] = ..., max_connections: _Optional[int] = ...) -> None: ...

class AddListenerResponse(_message.Message):
    __slots__ = ("generation",)
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    generation: int
    def __init__(self, generation: _Optional[int] = ...) -> None: ...

class RemoveListenerRequest(_message.Message):
    __slots__ = ("listener",)
    LISTENER_FIELD_NUMBER: _ClassVar[int]
    listener: str
    def __init__(self, listener: _Optional[str] = ...) -> None: ...

class RemoveListenerResponse(_message.Message):
    __slots__ = ("generation",)
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    generation: int
    def __init__(self, generation: _Optional[int] = ...) -> None: ...

class ExportStateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExportStateResponse(_message.Message):
    __slots__ = ("yaml", "generation")
    YAML_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    yaml: str
    generation: int
    def __init__(self, yaml: _Optional[str] = ..., generation: _Optional[int] = ...) -> None: ...

class ApplyStateRequest(_message.Message):
    __slots__ = ("yaml", "dry_run", "source_name")
    YAML_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    SOURCE_NAME_FIELD_NUMBER: _ClassVar[int]
    yaml: str
    dry_run: bool
    source_name: str
    def __init__(self, yaml: _Optional[str] = ..., dry_run: _Optional[bool] = ..., source_name: _Optional[str] = ...) -> None: ...

class StateChange(_message.Message):
    __slots__ = ("action", "kind", "listener", "name", "detail")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LISTENER_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    action: str
    kind: str
    listener: str
    name: str
    detail: str
    def __init__(self, action: _Optional[str] = ..., kind: _Optional[str] = ..., listener: _Optional[str] = ..., name: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class ApplyStateResponse(_message.Message):
    __slots__ = ("changes", "generation", "changed", "notes")
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    changes: _containers.RepeatedCompositeFieldContainer[StateChange]
    generation: int
    changed: bool
    notes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, changes: _Optional[_Iterable[_Union[StateChange, _Mapping]]] = ..., generation: _Optional[int] = ..., changed: _Optional[bool] = ..., notes: _Optional[_Iterable[str]] = ...) -> None: ...
