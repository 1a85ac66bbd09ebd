"""``mc-proxy serve``: assemble the supervisor's parts in the order that is safe.

Order matters: listening sockets and the database come first so that a bad
address or database fails fast with a clear message; the workers are started
by fork+exec, so starting grpcio's threads before them is safe (invariant 5).
"""

from __future__ import annotations

import logging
import resource
import sys

from setproctitle import setproctitle

from mcproxy import __version__
from mcproxy.admin.server import AdminServer, AdminSocketError
from mcproxy.config import Config
from mcproxy.model import ProxyState
from mcproxy.supervisor.manager import Supervisor, enable_fault_dumps
from mcproxy.supervisor.metrics import MetricsError, start_metrics
from mcproxy.supervisor.sockets import ListenError
from mcproxy.supervisor.store import Store, StoreError
from mcproxy.worker.geoip import GeoIP, GeoIPError

__all__ = ["geoip_problem", "serve"]

log = logging.getLogger("mcproxy.supervisor")


def configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s pid=%(process)d %(message)s",
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


def serve(config: Config) -> int:
    configure_logging()
    setproctitle("mc-proxy: supervisor")
    enable_fault_dumps()
    raise_fd_limit()
    try:
        store = Store.open(config.database_path)
    except StoreError as exc:
        log.error("%s", exc)
        return 1
    if store.is_empty():
        store.seed(config.seed)
        log.info("database %s was empty: seeded from %s", config.database_path, config.path)
    state = store.load()
    if problem := geoip_problem(config, state):
        log.error("%s", problem)
        return 1
    supervisor = Supervisor(config, store, state)
    try:
        supervisor.open_sockets()
        metrics = start_metrics(config, supervisor)
    except (ListenError, MetricsError) as exc:
        log.error("%s", exc)
        return 1
    supervisor.create_shared_memory()
    supervisor.start_health_checks()
    try:
        admin = AdminServer(config.admin_socket, supervisor).start()
    except AdminSocketError as exc:
        log.error("%s", exc)
        return 1
    supervisor.install_signal_handlers()
    log.info(
        "mc-proxy %s: %d listeners, %d routes, %d workers",
        __version__,
        len(state.listeners),
        sum(len(listener.routes) for listener in state.listeners.values()),
        config.worker_count(),
    )
    try:
        return supervisor.run()
    finally:
        admin.stop()
        if metrics is not None:
            metrics.close()
        store.close()
