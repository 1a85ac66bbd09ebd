# PYTHON_ARGCOMPLETE_OK  (shell completion: docs/operations.md, "Shell completion")
"""``mcproxyctl``: the admin API from a shell.

    mcproxyctl [--socket PATH] [--json] COMMAND

Tables for people by default; ``--json`` prints one JSON document for every
command (lists as arrays, mutations as ``{"generation": N}``). Any failure
goes to stderr with the server's message and exit status 1. Values are sent
as typed and judged by the server, so the CLI and the API cannot disagree;
the one thing done here is making certificate paths absolute, because the
server does not share the caller's working directory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import argcomplete
import grpc
from argcomplete.completers import ChoicesCompleter

from mcproxy import __version__
from mcproxy.admin.client import (
    DEFAULT_SOCKET,
    AdminClient,
    AdminError,
    ListedRoute,
    default_socket,
)
from mcproxy.config import parse_duration
from mcproxy.model import BackendProtocol, Balance, FirewallRuleKind, FirewallRules, L7Policy, Route
from mcproxy.status import Status

__all__ = ["main"]

Handler = Callable[[AdminClient, argparse.Namespace], object]
"""Runs one command; returns what ``--json`` prints (the human output is printed by it)."""


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 1 like every other error (argparse's default is 2)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


# --- output -------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns separated by two spaces, like ``kubectl get``."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def duration(seconds: float) -> str:
    """``3d 4h``, ``2h 5m``, ``7m 3s``, ``12s``: the two largest units."""
    seconds = int(seconds)
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not parts):
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return " ".join(parts[:2])


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat(timespec="seconds")


def policy_json(policy: L7Policy) -> dict[str, str]:
    return {"type": policy.kind.value, "value": policy.value}


def route_json(listed: ListedRoute) -> dict[str, Any]:
    route = listed.route
    check = route.health_check
    return {
        "listener": listed.listener,
        "hostname": route.hostname,
        "backend": str(route.backend),
        "backends": [str(b) for b in route.backends],
        "backend_states": [
            {"address": b.address, "up": b.up, "reason": b.reason} for b in listed.backend_states
        ],
        "balance": route.balance.value,
        "health_check": None
        if check is None
        else {
            "kind": check.kind.value,
            "interval_seconds": check.interval,
            "timeout_seconds": check.timeout,
            "path": check.path,
            "rise": check.rise,
            "fall": check.fall,
        },
        "mode": route.mode.value,
        "tls_cert": route.tls_cert,
        "tls_key": route.tls_key,
        "backend_tls": route.backend_tls,
        "backend_protocol": route.backend_protocol.value,
        "backend_ca": route.backend_ca,
        "backend_server_name": route.backend_server_name,
        "backend_client_cert": route.backend_client_cert,
        "backend_client_key": route.backend_client_key,
        "client_ca": route.client_ca,
        "send_proxy_protocol": route.send_proxy_protocol,
        "l7_policies": [policy_json(p) for p in route.policies],
    }


def _backends(listed: ListedRoute) -> str:
    """``a:1,b:2``, each marked ``(down)`` when the server says it is."""
    down = {b.address for b in listed.backend_states if not b.up}
    return ",".join(f"{b}(down)" if str(b) in down else str(b) for b in listed.route.backends)


def _options(route: Route) -> str:
    options = []
    if route.balance is not Balance.ROUND_ROBIN:
        options.append(f"balance={route.balance.value}")
    if route.health_check is not None:
        check = route.health_check
        options.append(f"health={check.kind.value}/{check.interval:g}s")
    if route.tls_cert:
        options.append(f"cert={route.tls_cert}")
    if route.backend_tls:
        options.append("backend_tls")
    if route.backend_protocol is not BackendProtocol.H2:
        options.append(f"backend_protocol={route.backend_protocol.value}")
    if route.backend_ca:
        options.append(f"backend_ca={route.backend_ca}")
    if route.backend_server_name:
        options.append(f"backend_server_name={route.backend_server_name}")
    if route.backend_client_cert:
        options.append(f"backend_client_cert={route.backend_client_cert}")
    if route.client_ca:
        options.append(f"client_ca={route.client_ca}")
    if route.send_proxy_protocol:
        options.append("send_proxy_protocol")
    if route.policies:
        options.append(f"policies={len(route.policies)}")
    return ",".join(options) or "-"


def status_json(status: Status) -> dict[str, Any]:
    return {
        "version": status.version,
        "start_time": _iso(status.start_time),
        "uptime_seconds": round(status.uptime_seconds, 3),
        "generation": status.generation,
        "worker_restarts": status.worker_restarts,
        "workers": [
            {
                "slot": w.slot,
                "pid": w.pid or None,
                "generation": w.generation,
                "active_connections": w.active_connections,
                "uptime_seconds": round(w.uptime_seconds, 3),
            }
            for w in status.workers
        ],
        "listeners": [
            {
                "address": lst.address,
                "routes": lst.routes,
                "active_connections": lst.active_connections,
                "max_connections": lst.max_connections,
                "proxy_protocol": lst.proxy_protocol,
            }
            for lst in status.listeners
        ],
    }


def firewall_json(rules: FirewallRules) -> list[dict[str, str]]:
    return [
        {"type": kind.value, "value": value}
        for kind in FirewallRuleKind
        for value in sorted(rules.values(kind))
    ]


# --- commands -------------------------------------------------------------------------


def cmd_status(client: AdminClient, args: argparse.Namespace) -> object:
    status = client.status()
    if not args.json:
        print(
            f"mc-proxy {status.version}, up {duration(status.uptime_seconds)}"
            f" (since {_iso(status.start_time)}), generation {status.generation},"
            f" {status.worker_restarts} worker restarts"
        )
        print()
        workers = [
            (
                w.slot,
                w.pid or "-",
                w.generation if w.pid else "-",
                w.active_connections if w.pid else "-",
                duration(w.uptime_seconds) if w.pid else "respawning",
            )
            for w in status.workers
        ]
        print(table(("WORKER", "PID", "GENERATION", "CONNECTIONS", "UPTIME"), workers))
        print()
        listeners = [
            (
                lst.address,
                lst.routes,
                lst.active_connections,
                lst.max_connections or "unlimited",
                "yes" if lst.proxy_protocol else "no",
            )
            for lst in status.listeners
        ]
        headers = ("LISTENER", "ROUTES", "CONNECTIONS", "MAX_CONNECTIONS", "PROXY_PROTOCOL")
        print(table(headers, listeners))
    balanced = [r for r in client.list_routes() if _balanced(r)]
    if not args.json and balanced:
        rows = [
            (
                r.listener,
                r.route.hostname,
                b.address,
                "up" if b.up else "DOWN",
                b.reason or ("-" if r.route.health_check is None else ""),
            )
            for r in balanced
            for b in r.backend_states
        ]
        print()
        print(table(("LISTENER", "ROUTE", "BACKEND", "STATE", "REASON"), rows))
    return {**status_json(status), "backends": [backends_json(r) for r in balanced]}


def _balanced(listed: ListedRoute) -> bool:
    """A route whose backends are worth a status line: several, or health-checked."""
    return len(listed.route.backends) > 1 or listed.route.health_check is not None


def backends_json(listed: ListedRoute) -> dict[str, Any]:
    """A route's backends and their health, for ``status --json``."""
    return {
        "listener": listed.listener,
        "route": listed.route.hostname,
        "balance": listed.route.balance.value,
        "health_check": listed.route.health_check is not None,
        "backends": [
            {"address": b.address, "up": b.up, "reason": b.reason} for b in listed.backend_states
        ],
    }


def cmd_routes_list(client: AdminClient, args: argparse.Namespace) -> object:
    routes = client.list_routes(args.listener)
    if not args.json:
        rows = [
            (r.listener, r.route.hostname, _backends(r), r.route.mode.value, _options(r.route))
            for r in routes
        ]
        if rows:
            print(table(("LISTENER", "HOSTNAME", "BACKENDS", "MODE", "OPTIONS"), rows))
        else:
            print("no routes")
    return [route_json(r) for r in routes]


def _path(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None


def _route_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``AdminClient.add_route``/``update_route`` from the flags."""
    health = {
        "health_interval": args.health_interval,
        "health_timeout": args.health_timeout,
        "health_path": args.health_path,
        "health_rise": args.health_rise,
        "health_fall": args.health_fall,
    }
    if args.health_check is None and any(v is not None for v in health.values()):
        given = next(f"--{k.replace('_', '-')}" for k, v in health.items() if v is not None)
        _usage_error(args, f"{given} needs --health-check tcp|http")
    return {
        "mode": args.mode,
        "tls_cert": _path(args.tls_cert),
        "tls_key": _path(args.tls_key),
        "backend_tls": args.backend_tls,
        "send_proxy_protocol": args.send_proxy_protocol,
        "balance": args.balance or "",
        "health_check": args.health_check,
        **{k: v for k, v in health.items() if v is not None},
        "backend_protocol": args.backend_protocol or "",
        "backend_ca": _path(args.backend_ca),
        "backend_server_name": args.backend_server_name,
        "backend_client_cert": _path(args.backend_client_cert),
        "backend_client_key": _path(args.backend_client_key),
        "client_ca": _path(args.client_ca),
    }


def _usage_error(args: argparse.Namespace, message: str) -> NoReturn:
    parser: argparse.ArgumentParser = args.parser
    parser.error(message)


def cmd_routes_add(client: AdminClient, args: argparse.Namespace) -> object:
    options = _route_options(args)
    generation = client.add_route(args.listener, args.hostname, args.backend, **options)
    return _done(args, f"added route {args.hostname} on {args.listener}", generation)


def cmd_routes_update(client: AdminClient, args: argparse.Namespace) -> object:
    options = _route_options(args)
    generation = client.update_route(args.listener, args.hostname, args.backend, **options)
    return _done(args, f"updated route {args.hostname} on {args.listener}", generation)


def cmd_routes_remove(client: AdminClient, args: argparse.Namespace) -> object:
    generation = client.remove_route(args.listener, args.hostname)
    return _done(args, f"removed route {args.hostname} from {args.listener}", generation)


def cmd_firewall_list(client: AdminClient, args: argparse.Namespace) -> object:
    rules = firewall_json(client.firewall_rules())
    if not args.json:
        if rules:
            print(table(("TYPE", "VALUE"), [(r["type"], r["value"]) for r in rules]))
        else:
            print("no firewall rules")
    return rules


def cmd_firewall_add(client: AdminClient, args: argparse.Namespace) -> object:
    generation = client.add_firewall_rule(args.type, args.value)
    return _done(args, f"blocked {args.type} {args.value}", generation)


def cmd_firewall_remove(client: AdminClient, args: argparse.Namespace) -> object:
    generation = client.remove_firewall_rule(args.type, args.value)
    return _done(args, f"unblocked {args.type} {args.value}", generation)


def cmd_listeners_list(client: AdminClient, args: argparse.Namespace) -> object:
    listeners = [
        {
            "listener": item.listener,
            "proxy_protocol": item.proxy_protocol,
            "max_connections": item.max_connections,
            "routes": item.routes,
        }
        for item in client.list_listeners()
    ]
    if not args.json:
        if listeners:
            headers = ("LISTENER", "PROXY_PROTOCOL", "MAX_CONNECTIONS", "ROUTES")
            rows = [
                (
                    item["listener"],
                    "yes" if item["proxy_protocol"] else "no",
                    item["max_connections"] or "unlimited",
                    item["routes"],
                )
                for item in listeners
            ]
            print(table(headers, rows))
        else:
            print("no listeners")
    return listeners


def cmd_listeners_add(client: AdminClient, args: argparse.Namespace) -> object:
    generation = client.add_listener(args.listener, args.proxy_protocol, args.max_connections)
    return _done(args, f"listening on {args.listener}", generation)


def cmd_listeners_remove(client: AdminClient, args: argparse.Namespace) -> object:
    generation = client.remove_listener(args.listener)
    return _done(args, f"stopped listening on {args.listener}", generation)


def cmd_listeners_set_max(client: AdminClient, args: argparse.Namespace) -> object:
    generation = client.set_listener_max_connections(args.listener, args.max_connections)
    limit = args.max_connections or "unlimited"
    return _done(args, f"max_connections of {args.listener} set to {limit}", generation)


def cmd_policies_list(client: AdminClient, args: argparse.Namespace) -> object:
    policies = [policy_json(p) for p in client.list_policies(args.listener, args.hostname)]
    if not args.json:
        if policies:
            print(table(("TYPE", "VALUE"), [(p["type"], p["value"]) for p in policies]))
        else:
            print("no policies")
    return policies


def cmd_policies_add(client: AdminClient, args: argparse.Namespace) -> object:
    generation = client.add_policy(args.listener, args.hostname, args.type, args.value)
    return _done(args, f"added policy {args.type} {args.value!r} to {args.hostname}", generation)


def cmd_policies_remove(client: AdminClient, args: argparse.Namespace) -> object:
    generation = client.remove_policy(args.listener, args.hostname, args.type, args.value)
    what = f"removed policy {args.type} {args.value!r} from {args.hostname}"
    return _done(args, what, generation)


def _done(args: argparse.Namespace, what: str, generation: int) -> object:
    if not args.json:
        print(f"{what} (generation {generation}, live on every worker)")
    return {"generation": generation}


# --- arguments ------------------------------------------------------------------------


_EPILOG = """\
Every change is committed to the database and live on every worker when the
command returns. Errors go to stderr as CODE: message (with --json, as a JSON
document) and exit with status 1. The socket is mode 0600: run as root or as
the user mc-proxy runs as. Operations guide: docs/operations.md.
"""


def _complete(action: argparse.Action, *choices: str) -> None:
    """Offer ``choices`` to shell completion; the server still judges what is typed."""
    action.completer = ChoicesCompleter(dict.fromkeys(choices, ""))  # type: ignore[attr-defined]


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def listener_flag(sub: argparse.ArgumentParser) -> None:
    """``--listener ADDR``, required."""
    sub.add_argument(
        "--listener",
        required=True,
        metavar="ADDR",
        help="the listener's address as configured: :443, 10.0.0.1:443, [::1]:443",
    )


def route_flags(sub: argparse.ArgumentParser) -> None:
    """The flags of ``routes add`` and ``routes update``."""
    listener_flag(sub)
    sub.add_argument(
        "--hostname",
        required=True,
        metavar="H",
        help="SNI hostname, case-insensitive: exact, *.example.com (one more label) or '*'"
        " (every other name, and no SNI)",
    )
    sub.add_argument(
        "--backend",
        required=True,
        action="append",
        metavar="HOST:PORT",
        help="where to connect: IP or DNS name, and port; [v6]:port for IPv6;"
        " give it more than once for several backends",
    )
    _complete(
        sub.add_argument(
            "--balance",
            metavar="round_robin|least_conn|source_ip",
            help="how to pick a backend (default: round_robin)",
        ),
        "round_robin",
        "least_conn",
        "source_ip",
    )
    _complete(
        sub.add_argument(
            "--health-check",
            metavar="tcp|http",
            help="check every backend actively: tcp connects, http GETs --health-path"
            " (healthy on 2xx/3xx); default: no check",
        ),
        "tcp",
        "http",
    )
    sub.add_argument("--health-interval", type=_duration, metavar="DURATION", help="default: 5s")
    sub.add_argument(
        "--health-timeout",
        type=_duration,
        metavar="DURATION",
        help="default: 2s; shorter than the interval",
    )
    sub.add_argument("--health-path", metavar="PATH", help="http checks (default: /healthz)")
    sub.add_argument(
        "--health-rise", type=int, metavar="N", help="successes in a row to come up (default: 2)"
    )
    sub.add_argument(
        "--health-fall", type=int, metavar="N", help="failures in a row to go down (default: 3)"
    )
    _complete(
        sub.add_argument("--mode", default="l4", metavar="l4|l7", help="default: l4"), "l4", "l7"
    )
    sub.add_argument(
        "--tls-cert",
        metavar="F",
        help="l7 (required): certificate chain, PEM; reloaded when the file changes",
    )
    sub.add_argument("--tls-key", metavar="F", help="l7 (required): unencrypted private key, PEM")
    sub.add_argument(
        "--backend-tls",
        action="store_true",
        help="l7: TLS to the backend, verified (default: cleartext, h2c for h2)",
    )
    _complete(
        sub.add_argument(
            "--backend-protocol",
            metavar="h2|h1",
            help="l7: what the backend speaks: h2 (default) or h1 (HTTP/1.1)",
        ),
        "h2",
        "h1",
    )
    sub.add_argument(
        "--backend-ca",
        metavar="F",
        help="l7 with --backend-tls: verify the backend against this PEM CA file",
    )
    sub.add_argument(
        "--backend-server-name",
        metavar="NAME",
        help="l7 with --backend-tls: SNI sent and name verified (default: the backend host)",
    )
    sub.add_argument(
        "--backend-client-cert",
        metavar="F",
        help="l7 with --backend-tls: client certificate chain (PEM) for mTLS to the backend",
    )
    sub.add_argument(
        "--backend-client-key",
        metavar="F",
        help="its unencrypted private key, PEM (with --backend-client-cert)",
    )
    sub.add_argument(
        "--client-ca",
        metavar="F",
        help="l7: require client certificates issued by this PEM CA file",
    )
    sub.add_argument(
        "--send-proxy-protocol",
        action="store_true",
        help="send a PROXY v2 header with the client's address to the backend first",
    )


def build_parser() -> argparse.ArgumentParser:
    # --socket and --json are accepted before or after the command; SUPPRESS keeps a
    # subcommand's default from overwriting a value given before it.
    socket_help = f"admin socket (default: $MCPROXY_SOCKET, then {DEFAULT_SOCKET})"
    json_help = "print machine-readable JSON"
    common = _Parser(add_help=False)
    common.add_argument("--socket", metavar="PATH", default=argparse.SUPPRESS, help=socket_help)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=json_help)

    parser = _Parser(
        prog="mcproxyctl",
        description="Change and inspect a running mc-proxy through its admin socket.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--socket", metavar="PATH", default=None, help=socket_help)
    parser.add_argument("--json", action="store_true", help=json_help)
    parser.add_argument("--version", action="version", version=f"mcproxyctl {__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, parser_class=_Parser, metavar="COMMAND"
    )

    def group(name: str, help: str) -> argparse._SubParsersAction[_Parser]:
        sub = commands.add_parser(name, help=help, description=help)
        return sub.add_subparsers(
            dest="action", required=True, parser_class=_Parser, metavar="ACTION"
        )

    def command(
        group: argparse._SubParsersAction[_Parser],
        name: str,
        handler: Handler,
        help: str,
        description: str = "",
    ) -> argparse.ArgumentParser:
        sub = group.add_parser(name, parents=[common], help=help, description=description or help)
        sub.set_defaults(handler=handler, parser=sub)
        return sub

    def listener_and_hostname(sub: argparse.ArgumentParser) -> None:
        listener_flag(sub)
        sub.add_argument("--hostname", required=True, metavar="H", help="the route's SNI hostname")

    command(
        commands,
        "status",
        cmd_status,
        "version, uptime, workers and listeners",
        "Version, uptime and configuration generation; each worker (pid, generation it"
        " runs, open connections); each listener (routes, open connections across all"
        " workers, max_connections, proxy_protocol).",
    )

    routes = group("routes", "SNI routes: hostname -> backend, L4 or L7")
    sub = command(routes, "list", cmd_routes_list, "list routes")
    sub.add_argument("--listener", metavar="ADDR", help="only this listener")
    for name, handler, help, description in (
        (
            "add",
            cmd_routes_add,
            "add a route",
            "Add a route for one SNI hostname on a listener. l4 passes the client's TLS"
            " through to the backend untouched; l7 terminates TLS with --tls-cert/--tls-key"
            " and proxies HTTP/2 and HTTP/1.1 (gRPC included) to the backend (HTTP/2, or"
            " HTTP/1.1 with --backend-protocol h1). --backend more than once spreads the"
            " route over several backends (--balance).",
        ),
        (
            "update",
            cmd_routes_update,
            "replace a route",
            "Replace a route whole, in one step: no connection sees it missing; open"
            " connections keep their backend. Takes the flags of 'routes add'; what is not"
            " given takes its default (it is not merged with the old route).",
        ),
    ):
        route_flags(command(routes, name, handler, help, description))
    listener_and_hostname(
        command(
            routes,
            "remove",
            cmd_routes_remove,
            "remove a route",
            "Remove a route. New connections for the hostname are reset; open L4"
            " connections go on; requests on open L7 connections get 421.",
        )
    )

    firewall = group("firewall", "global firewall: blocked IPs, networks and countries")
    command(firewall, "list", cmd_firewall_list, "list firewall rules")
    for name, handler, help, description in (
        (
            "add",
            cmd_firewall_add,
            "block an IP, network or country",
            "Block new connections from an address, a network or a country (by the real"
            " client address: the PROXY header's on proxy_protocol listeners). Blocked"
            " connections are reset without a byte; open connections are not cut."
            " Countries need firewall.geoip_db in the config.",
        ),
        ("remove", cmd_firewall_remove, "remove a block", "Remove a block."),
    ):
        sub = command(firewall, name, handler, help, description)
        _complete(
            sub.add_argument(
                "--type", required=True, metavar="ip|cidr|country", help="what --value is"
            ),
            "ip",
            "cidr",
            "country",
        )
        sub.add_argument(
            "--value",
            required=True,
            metavar="V",
            help="192.0.2.1, 2001:db8::1, 198.51.100.0/24 or an ISO 3166 code such as KP",
        )

    listeners = group("listeners", "listeners and their settings")
    command(
        listeners,
        "list",
        cmd_listeners_list,
        "list the listeners",
        "Every listener: address, PROXY protocol, connection limit, number of routes.",
    )
    sub = command(
        listeners,
        "add",
        cmd_listeners_add,
        "start listening on a new address",
        "Bind a new listener on every worker and store it. When the command returns, every"
        " worker accepts on it; add routes to it with 'routes add'. A port that cannot be"
        " bound fails naming the reason, and nothing is stored.",
    )
    sub.add_argument("--listener", required=True, metavar="ADDR", help="e.g. :8443")
    sub.add_argument(
        "--proxy-protocol",
        action="store_true",
        help="expect a PROXY protocol header (v1 or v2) from every client",
    )
    sub.add_argument(
        "--max-connections",
        type=int,
        default=0,
        metavar="N",
        help="open connections at once, across all workers (0 = unlimited)",
    )
    sub = command(
        listeners,
        "remove",
        cmd_listeners_remove,
        "stop listening on an address",
        "Remove a listener and its routes. When the command returns no worker accepts on"
        " it; connections already open on it carry on until they end.",
    )
    sub.add_argument("--listener", required=True, metavar="ADDR", help="e.g. :8443")
    sub = command(
        listeners,
        "set-max-connections",
        cmd_listeners_set_max,
        "limit open connections",
        "Set how many connections a listener holds at once, across all workers. Over the"
        " limit, new connections are reset; a lower limit does not cut open connections.",
    )
    sub.add_argument("--listener", required=True, metavar="ADDR", help="e.g. :443")
    sub.add_argument("max_connections", type=int, metavar="N", help="0 = unlimited")

    policies = group("policies", "HTTP policies of L7 routes (403 when they match)")
    listener_and_hostname(command(policies, "list", cmd_policies_list, "list a route's policies"))
    for name, handler, help, description in (
        (
            "add",
            cmd_policies_add,
            "add a policy to a route",
            "Add a policy to an L7 route; it applies to the next request, also on open"
            " connections. block_user_agent: 403 when the User-Agent contains V"
            " (case-sensitive). require_header: 403 when the request has no header V.",
        ),
        ("remove", cmd_policies_remove, "remove a policy from a route", ""),
    ):
        sub = command(policies, name, handler, help, description)
        listener_and_hostname(sub)
        _complete(
            sub.add_argument(
                "--type",
                required=True,
                metavar="block_user_agent|require_header",
                help="what --value is",
            ),
            "block_user_agent",
            "require_header",
        )
        sub.add_argument(
            "--value",
            required=True,
            metavar="V",
            help="a User-Agent substring, or a header name",
        )

    command(
        commands,
        "export",
        cmd_export,
        "print the state as YAML",
        "Print listeners, routes, policies and firewall rules as YAML in the config"
        " file's schema (no process settings). `mc-proxy check` accepts it, it seeds a"
        " new node, and `apply -f` makes a node's state equal to it.",
    )
    sub = command(
        commands,
        "apply",
        cmd_apply,
        "make the state equal to a YAML file",
        "Make the state equal to FILE (the config file's schema, as `export` prints it)"
        " in one change: one transaction, one generation, live on every worker when the"
        " command returns. Prints what it adds (+), updates (~) and removes (-). A file"
        " with any problem changes nothing and exits 1 naming each field. Process"
        " settings in FILE are ignored, with a note. Applying the same file twice is a"
        " no-op.",
    )
    sub.add_argument(
        "-f", "--file", required=True, metavar="FILE", help="the desired state, YAML; - for stdin"
    )
    sub.add_argument(
        "--dry-run", action="store_true", help="print what would change; change nothing"
    )
    return parser


# --- export / apply ---------------------------------------------------------------


def cmd_export(client: AdminClient, args: argparse.Namespace) -> object:
    text, generation = client.export_state()
    if not args.json:
        sys.stdout.write(text)
    return {"generation": generation, "yaml": text}


_SIGNS = {"add": "+", "update": "~", "remove": "-"}


def cmd_apply(client: AdminClient, args: argparse.Namespace) -> object:
    # "-" is standard input; relative paths in it resolve against the working directory.
    source = os.path.abspath("<stdin>" if args.file == "-" else args.file)
    try:
        if args.file == "-":
            text = sys.stdin.read()
        else:
            with open(args.file, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise AdminError(grpc.StatusCode.INVALID_ARGUMENT, f"{args.file}: {exc}") from None
    result = client.apply_state(text, dry_run=args.dry_run, source_name=source)
    if not args.json:
        rows = [
            (_SIGNS.get(c.action, c.action), c.kind, c.listener, c.name, c.detail)
            for c in result.changes
        ]
        if rows:
            print(table(("", "KIND", "LISTENER", "NAME", "DETAIL"), rows))
        for note in result.notes:
            print(f"note: {note}")
        count = f"{len(rows)} change{'s' if len(rows) != 1 else ''}"
        if args.dry_run:
            print(f"dry run: {count}; nothing changed (generation {result.generation})")
        elif result.changed:
            print(f"applied {count}: generation {result.generation}")
        else:
            print(f"no changes: the state already matches (generation {result.generation})")
    return {
        "changes": [
            {
                "action": c.action,
                "kind": c.kind,
                "listener": c.listener,
                "name": c.name,
                "detail": c.detail,
            }
            for c in result.changes
        ],
        "generation": result.generation,
        "changed": result.changed,
        "dry_run": bool(args.dry_run),
        "notes": result.notes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argcomplete.autocomplete(parser)  # returns at once unless the shell asks for completions
    args = parser.parse_args(argv)
    path = args.socket or default_socket()
    try:
        with AdminClient(path) as client:
            result = args.handler(client, args)
    except AdminError as exc:
        if args.json:
            error = {"error": {"code": exc.code.name, "message": exc.message}}
            print(json.dumps(error), file=sys.stderr)
        else:
            print(f"mcproxyctl: {exc.code.name}: {exc.message}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
