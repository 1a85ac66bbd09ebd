"""``mc-proxy serve``: assemble the supervisor's parts in the order that is safe.

Order matters: listening sockets and the database come first so that a bad
address or database fails fast with a clear message; the workers are started
by fork+exec, so starting grpcio's threads before them is safe (invariant 5).
"""

from __future__ import annotations

import logging
import resource
import sys
from dataclasses import dataclass

from setproctitle import setproctitle

from mcproxy import __version__
from mcproxy.admin.server import AdminServer, AdminSocketError
from mcproxy.config import Config, ConfigError, Seed
from mcproxy.model import ProxyState
from mcproxy.settings import LOG_FORMAT
from mcproxy.supervisor import upgrade
from mcproxy.supervisor.manager import Supervisor, UpgradeFailed, enable_fault_dumps
from mcproxy.supervisor.metrics import MetricsEndpoint, MetricsError, start_metrics
from mcproxy.supervisor.sockets import ListenError
from mcproxy.supervisor.store import Store, StoreError
from mcproxy.worker.geoip import GeoIP, GeoIPError

__all__ = ["geoip_problem", "serve"]

log = logging.getLogger("mcproxy.supervisor")


def configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format=LOG_FORMAT,
        stream=sys.stderr,
    )


def raise_fd_limit() -> None:
    """Lift the soft RLIMIT_NOFILE to the hard limit; the workers inherit it.

    Each connection costs a worker one or two descriptors, and the usual soft limit
    of 1024 would refuse accepts (EMFILE) long before the machine is busy: a few
    hundred half-open connections from a slowloris would do it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit still meets the kernel's fs.nr_open (1048576 by default).
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
    log.info("open-file limit: %d", soft)


def geoip_problem(config: Config, state: ProxyState) -> str | None:
    """Why country rules cannot work, if they cannot: they may come from the database
    (invariant 1) while the YAML, read at every start, names no usable GeoIP file."""
    countries = sorted(state.firewall.blocked_countries)
    if not countries:
        return None
    where = f"{config.path}: firewall.geoip_db"
    if config.firewall.geoip_db is None:
        return f"{where}: required: the firewall blocks countries {', '.join(countries)}"
    try:
        GeoIP(config.firewall.geoip_db).close()
    except GeoIPError as exc:
        return f"{where}: {exc} (the firewall blocks countries {', '.join(countries)})"
    return None


class _BootFailed(Exception):
    pass


class _SeedInvalid(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass
class _Servers:
    """What serve() owns besides the supervisor; restarted after a failed exec."""

    admin: AdminServer
    metrics: MetricsEndpoint | None


def serve(config: Config, seed: Seed) -> int:
    """``config`` holds the process settings; ``seed`` the rest of the file, judged and
    written only if the database is empty (invariant 1)."""
    inherited = upgrade.take_from_environ()  # set when SIGUSR2 re-executed us
    configure_logging()
    setproctitle("mc-proxy: supervisor")
    enable_fault_dumps()
    raise_fd_limit()
    try:
        return _serve(config, seed, inherited)
    except _SeedInvalid as invalid:
        for problem in invalid.problems:  # as `mc-proxy check` prints them
            print(problem, file=sys.stderr)
        return 1
    except _BootFailed as failed:
        if inherited is None:
            log.error("%s", failed)
            return 1
        return upgrade.caretake(inherited, config.path, str(failed))
    except UpgradeFailed as failed:
        return upgrade.caretake(failed.inherited, config.path, str(failed))


def _serve(config: Config, seed: Seed, inherited: upgrade.Inherited | None) -> int:
    """Raises _BootFailed before the supervisor runs (after an upgrade, the caller then
    keeps the previous workers serving), UpgradeFailed if the new workers cannot boot."""
    try:
        store = Store.open(config.database_path)
    except StoreError as exc:
        raise _BootFailed(str(exc)) from None
    if store.is_empty() and inherited is None:
        try:
            initial = seed.take()
        except ConfigError as exc:
            store.close()
            raise _SeedInvalid(exc.problems) from None
        store.seed(initial)
        del initial
        log.info("database %s was empty: seeded from %s", config.database_path, config.path)
    else:
        seed.drop()  # the database holds the state: the file's listeners and rules are ignored
    state = store.load()
    if problem := geoip_problem(config, state):
        raise _BootFailed(problem)
    supervisor = Supervisor(config, store, state)
    try:
        supervisor.open_sockets(inherited)
        metrics = start_metrics(config, supervisor, wipe=inherited is None)
    except (ListenError, MetricsError) as exc:
        raise _BootFailed(str(exc)) from None
    supervisor.create_shared_memory(inherited)
    supervisor.start_health_checks()
    try:
        admin = AdminServer(config.admin_socket, supervisor).start()
    except AdminSocketError as exc:
        raise _BootFailed(str(exc)) from None
    if inherited is not None:
        supervisor.adopt(inherited)
        upgrade.close_originals(inherited)  # from here on the supervisor owns copies
    supervisor.install_signal_handlers()
    servers = _Servers(admin, metrics)

    def before_exec() -> None:
        servers.admin.stop()
        if servers.metrics is not None:
            servers.metrics.close()
        supervisor.store.close()

    def after_failed_exec() -> None:
        supervisor.store = Store.open(config.database_path)
        servers.admin = AdminServer(config.admin_socket, supervisor).start()
        servers.metrics = start_metrics(config, supervisor, wipe=False)

    supervisor.exec_hooks = (before_exec, after_failed_exec)
    log.info(
        "mc-proxy %s: %d listeners, %d routes, %d workers%s",
        __version__,
        len(state.listeners),
        sum(len(listener.routes) for listener in state.listeners.values()),
        config.worker_count(),
        " (upgraded in place)" if inherited is not None else "",
    )
    try:
        return supervisor.run()
    finally:
        servers.admin.stop()
        if servers.metrics is not None:
            servers.metrics.close()
        supervisor.store.close()
