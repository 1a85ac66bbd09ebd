"""``mc-proxy serve``: assemble the supervisor's parts in the order that is safe.

Order matters: listening sockets and the database come first so that a bad
address or database fails fast with a clear message; the workers are started
by fork+exec, so starting grpcio's threads before them is safe (invariant 5).
"""

from __future__ import annotations

import logging
import sys

from setproctitle import setproctitle

from mcproxy import __version__
from mcproxy.config import Config
from mcproxy.supervisor.manager import Supervisor, enable_fault_dumps
from mcproxy.supervisor.sockets import ListenError
from mcproxy.supervisor.store import Store, StoreError

__all__ = ["serve"]

log = logging.getLogger("mcproxy.supervisor")


def configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s pid=%(process)d %(message)s",
        stream=sys.stderr,
    )


def serve(config: Config) -> int:
    configure_logging()
    setproctitle("mc-proxy: supervisor")
    enable_fault_dumps()
    try:
        store = Store.open(config.database_path)
    except StoreError as exc:
        log.error("%s", exc)
        return 1
    if store.is_empty():
        store.seed(config.seed)
        log.info("database %s was empty: seeded from %s", config.database_path, config.path)
    state = store.load()
    supervisor = Supervisor(config, store, state)
    try:
        supervisor.open_sockets()
    except ListenError as exc:
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
        store.close()
