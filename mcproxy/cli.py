# PYTHON_ARGCOMPLETE_OK  (shell completion: docs/operations.md, "Shell completion")
"""The ``mc-proxy`` command: serve, check, demo."""

from __future__ import annotations

import argparse
import os
import sys

import argcomplete

from mcproxy import __version__
from mcproxy.config import ConfigError, load_config, load_settings

__all__ = ["main"]


def _check(path: str) -> int:
    try:
        load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{path}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"{path}: OK")
    return 0


def _serve(path: str) -> int:
    try:
        from mcproxy.supervisor.main import serve
    except Exception as exc:  # an upgrade to a broken installation: see _boot_failed
        return _boot_failed(path, [f"cannot load mc-proxy: {type(exc).__name__}: {exc}"])
    try:
        config, seed = load_settings(path)  # the seed part only if the database is empty
    except ConfigError as exc:
        return _boot_failed(path, exc.problems)
    except OSError as exc:
        return _boot_failed(path, [f"{path}: {exc.strerror}"])
    return serve(config, seed)


def _boot_failed(path: str, problems: list[str]) -> int:
    """Print why serve cannot start and exit 1; but after an upgrade in place (SIGUSR2
    re-executed us), keep the previous workers serving instead (supervisor/upgrade.py)."""
    for problem in problems:
        print(problem, file=sys.stderr)
    if not os.environ.get("MCPROXY_UPGRADE"):
        return 1
    import logging

    from mcproxy.supervisor import upgrade

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    inherited = upgrade.take_from_environ()
    if inherited is None:
        return 1
    return upgrade.caretake(inherited, path, "; ".join(problems))


def _demo(directory: str | None, listen_host: str) -> int:
    from mcproxy.demo import run_demo

    status: int = run_demo(directory, listen_host)
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mc-proxy",
        description="TLS ingress proxy: SNI routing to L4 passthrough or L7 HTTP/2 backends.",
        epilog="Routes, firewall rules and limits change at runtime with mcproxyctl."
        " Operations guide: docs/operations.md.",
    )
    parser.add_argument("--version", action="version", version=f"mc-proxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the proxy in the foreground",
        description="Run the proxy in the foreground, logging to stderr. The YAML seeds an"
        " empty database only; after that, routes and firewall rules come from the database."
        " SIGTERM or SIGINT: stop accepting, drain open connections up to"
        " proxy.shutdown_timeout, exit 0 (a second SIGINT stops without waiting)."
        " SIGUSR2 (systemctl reload): check the config, then re-execute in place, same PID"
        " and listening sockets; new workers start and the old ones drain.",
    )
    serve.add_argument("--config", required=True, metavar="FILE", help="YAML configuration")
    check = commands.add_parser(
        "check",
        help="validate a configuration and print every problem",
        description="Validate a configuration as serve would read it, including the"
        " certificate files and the GeoIP database it names. Prints 'FILE: OK' and exits 0,"
        " or prints every problem as 'FILE: field.path: reason' and exits 1.",
    )
    check.add_argument("--config", required=True, metavar="FILE", help="YAML configuration")
    demo = commands.add_parser(
        "demo",
        help="start a throwaway proxy with demo backends and print commands to try",
        description="Generate a throwaway CA and certificates, start demo backends (two TLS"
        " servers for L4 routes, an h2c server and a gRPC server for L7 routes), run"
        " mc-proxy serve on port 8443 (or a free one) and print curl, grpcurl and mcproxyctl"
        " commands to try. Ctrl-C or SIGTERM stops everything.",
    )
    demo.add_argument(
        "--dir",
        metavar="DIR",
        help="where to put certs, config and database (default: a new temp dir)",
    )
    demo.add_argument(
        "--listen",
        default="127.0.0.1",
        metavar="HOST",
        help="address of the demo listener (default: 127.0.0.1; 0.0.0.0 inside a container)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argcomplete.autocomplete(parser)  # returns at once unless the shell asks for completions
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args.config)
    if args.command == "check":
        return _check(args.config)
    return _demo(args.dir, args.listen)


if __name__ == "__main__":
    sys.exit(main())
