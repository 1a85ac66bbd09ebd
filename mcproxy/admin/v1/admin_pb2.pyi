import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Route(_message.Message):
    __slots__ = ("hostname", "backend", "mode", "tls_cert", "tls_key", "backend_tls", "send_proxy_protocol", "l7_policies")
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    TLS_CERT_FIELD_NUMBER: _ClassVar[int]
    TLS_KEY_FIELD_NUMBER: _ClassVar[int]
    BACKEND_TLS_FIELD_NUMBER: _ClassVar[int]
    SEND_PROXY_PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    L7_POLICIES_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    backend: str
    mode: str
    tls_cert: str
    tls_key: str
    backend_tls: bool
    send_proxy_protocol: bool
    l7_policies: _containers.RepeatedCompositeFieldContainer[L7Policy]
    def __init__(self, hostname: _Optional[str] = ..., backend: _Optional[str] = ..., mode: _Optional[str] = ..., tls_cert: _Optional[str] = ..., tls_key: _Optional[str] = ..., backend_tls: _Optional[bool] = ..., send_proxy_protocol: _Optional[bool] = ..., l7_policies: _Optional[_Iterable[_Union[L7Policy, _Mapping]]] = ...) -> None: ...

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
    __slots__ = ("listener", "route")
    LISTENER_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    listener: str
    route: Route
    def __init__(self, listener: _Optional[str] = ..., route: _Optional[_Union[Route, _Mapping]] = ...) -> None: ...

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
