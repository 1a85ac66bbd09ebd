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

from mcproxy import __version__
from mcproxy.admin.client import AdminClient, AdminError, ListedRoute, default_socket
from mcproxy.model import FirewallRuleKind, FirewallRules, L7Policy, Route
from mcproxy.supervisor.status import Status

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
    return {
        "listener": listed.listener,
        "hostname": route.hostname,
        "backend": str(route.backend),
        "mode": route.mode.value,
        "tls_cert": route.tls_cert,
        "tls_key": route.tls_key,
        "backend_tls": route.backend_tls,
        "send_proxy_protocol": route.send_proxy_protocol,
        "l7_policies": [policy_json(p) for p in route.policies],
    }


def _options(route: Route) -> str:
    options = []
    if route.tls_cert:
        options.append(f"cert={route.tls_cert}")
    if route.backend_tls:
        options.append("backend_tls")
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
    return status_json(status)


def cmd_routes_list(client: AdminClient, args: argparse.Namespace) -> object:
    routes = client.list_routes(args.listener)
    if not args.json:
        rows = [
            (r.listener, r.route.hostname, r.route.backend, r.route.mode.value, _options(r.route))
            for r in routes
        ]
        if rows:
            print(table(("LISTENER", "HOSTNAME", "BACKEND", "MODE", "OPTIONS"), rows))
        else:
            print("no routes")
    return [route_json(r) for r in routes]


def _path(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None


def cmd_routes_add(client: AdminClient, args: argparse.Namespace) -> object:
    generation = client.add_route(
        args.listener,
        args.hostname,
        args.backend,
        mode=args.mode,
        tls_cert=_path(args.tls_cert),
        tls_key=_path(args.tls_key),
        backend_tls=args.backend_tls,
        send_proxy_protocol=args.send_proxy_protocol,
    )
    return _done(args, f"added route {args.hostname} on {args.listener}", generation)


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


def build_parser() -> argparse.ArgumentParser:
    # --socket and --json are accepted before or after the command; SUPPRESS keeps a
    # subcommand's default from overwriting a value given before it.
    common = _Parser(add_help=False)
    common.add_argument("--socket", metavar="PATH", default=argparse.SUPPRESS)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS)

    parser = _Parser(
        prog="mcproxyctl",
        description="Change and inspect a running mc-proxy through its admin socket.",
    )
    parser.add_argument(
        "--socket",
        metavar="PATH",
        default=None,
        help="admin socket (default: $MCPROXY_SOCKET, then /srv/mc-proxy/admin.sock)",
    )
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument("--version", action="version", version=f"mcproxyctl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(
        group: argparse._SubParsersAction[_Parser], name: str, handler: Handler, help: str
    ) -> argparse.ArgumentParser:
        sub = group.add_parser(name, parents=[common], help=help, description=help)
        sub.set_defaults(handler=handler)
        return sub

    def listener_and_hostname(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--listener", required=True, metavar="ADDR", help="e.g. :443")
        sub.add_argument("--hostname", required=True, metavar="H")

    command(commands, "status", cmd_status, "version, uptime, workers and listeners")

    routes = commands.add_parser("routes", help="SNI routes").add_subparsers(
        dest="action", required=True, parser_class=_Parser
    )
    sub = command(routes, "list", cmd_routes_list, "list routes")
    sub.add_argument("--listener", metavar="ADDR", help="only this listener")
    sub = command(routes, "add", cmd_routes_add, "add a route")
    listener_and_hostname(sub)
    sub.add_argument("--backend", required=True, metavar="HOST:PORT")
    sub.add_argument("--mode", default="l4", metavar="l4|l7", help="default: l4")
    sub.add_argument("--tls-cert", metavar="F", help="l7: certificate chain (PEM)")
    sub.add_argument("--tls-key", metavar="F", help="l7: private key (PEM)")
    sub.add_argument("--backend-tls", action="store_true", help="l7: TLS to the backend")
    sub.add_argument(
        "--send-proxy-protocol", action="store_true", help="send a PROXY v2 header to the backend"
    )
    listener_and_hostname(command(routes, "remove", cmd_routes_remove, "remove a route"))

    firewall = commands.add_parser("firewall", help="global firewall rules").add_subparsers(
        dest="action", required=True, parser_class=_Parser
    )
    command(firewall, "list", cmd_firewall_list, "list firewall rules")
    for name, handler, help in (
        ("add", cmd_firewall_add, "block an IP, network or country"),
        ("remove", cmd_firewall_remove, "remove a block"),
    ):
        sub = command(firewall, name, handler, help)
        sub.add_argument("--type", required=True, metavar="ip|cidr|country")
        sub.add_argument("--value", required=True, metavar="V")

    listeners = commands.add_parser("listeners", help="listener settings").add_subparsers(
        dest="action", required=True, parser_class=_Parser
    )
    sub = command(listeners, "set-max-connections", cmd_listeners_set_max, "limit open connections")
    sub.add_argument("--listener", required=True, metavar="ADDR")
    sub.add_argument("max_connections", type=int, metavar="N", help="0 = unlimited")

    policies = commands.add_parser("policies", help="HTTP policies of L7 routes").add_subparsers(
        dest="action", required=True, parser_class=_Parser
    )
    listener_and_hostname(command(policies, "list", cmd_policies_list, "list a route's policies"))
    for name, handler, help in (
        ("add", cmd_policies_add, "add a policy to a route"),
        ("remove", cmd_policies_remove, "remove a policy from a route"),
    ):
        sub = command(policies, name, handler, help)
        listener_and_hostname(sub)
        sub.add_argument("--type", required=True, metavar="block_user_agent|require_header")
        sub.add_argument("--value", required=True, metavar="V")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
