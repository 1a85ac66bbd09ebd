"""The admin gRPC server: a Unix socket only, mode 0600 from the moment it exists.

Access control is the file mode: whoever can open the socket can change the
routing, so it is never a TCP port and it is created with umask 0177 (there
is no moment when it is 0666). grpc core unlinks a socket already at the path
before binding, which would silently steal the socket of a running instance;
so an existing path is probed first: a socket nobody answers on is stale and
replaced, one that answers means another instance runs and we refuse to
start, and anything that is not a socket is left alone.

Besides ``mc_proxy.v1.ProxyAdminService`` the server offers
``grpc.health.v1.Health`` and server reflection, so grpcurl and
grpc_health_probe work against it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import logging
import os
import socket
import stat

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mcproxy.admin.servicer import AdminBackend, AdminServicer
from mcproxy.admin.v1 import admin_pb2, admin_pb2_grpc

__all__ = ["SERVICE_NAME", "AdminServer", "AdminSocketError"]

log = logging.getLogger("mcproxy.admin")

SERVICE_NAME: str = admin_pb2.DESCRIPTOR.services_by_name["ProxyAdminService"].full_name
_PROBE_TIMEOUT = 1.0
_THREADS = 8
MAX_REQUEST_BYTES = 256 * 1024 * 1024
"""Calls that change things queue behind one another in the supervisor's loop anyway."""


class AdminSocketError(Exception):
    """The admin socket cannot be created; the message says why and what to do."""


class AdminServer:
    """``AdminServer(path, backend).start()`` serves until :meth:`stop`."""

    def __init__(self, path: str, backend: AdminBackend) -> None:
        self.path = os.path.abspath(path)
        self.backend = backend
        self.health = health.HealthServicer()
        self._server: grpc.Server | None = None
        self._inode: tuple[int, int] | None = None

    def start(self) -> AdminServer:
        """Bind the socket (0600) and start serving; raises :class:`AdminSocketError`."""
        claim_socket_path(self.path)
        server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(_THREADS, thread_name_prefix="admin"),
            # An ApplyState document of 100,000 routes is ~7 MB; gRPC's default is 4 MiB.
            options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES)],
        )
        servicer = AdminServicer(self.backend)
        admin_pb2_grpc.add_ProxyAdminServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        reflection.enable_server_reflection(
            [SERVICE_NAME, health_name, reflection.SERVICE_NAME], server
        )
        previous = os.umask(0o177)  # the socket is born 0600: no window where others can connect
        try:
            server.add_insecure_port(f"unix:{self.path}")
        except RuntimeError as exc:
            raise AdminSocketError(
                f"{self.path}: cannot listen on the admin socket: {exc}"
            ) from exc
        finally:
            os.umask(previous)
        info = os.stat(self.path)
        self._inode = (info.st_dev, info.st_ino)
        server.start()
        self._server = server
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("admin API on unix:%s", self.path)
        return self

    def stop(self, grace: float = 1.0) -> None:
        """Refuse new calls, let running ones finish for ``grace`` seconds, remove the socket."""
        if self._server is None:
            return
        self.health.enter_graceful_shutdown()
        self._server.stop(grace).wait()
        self._server = None
        # Only our own socket: a successor may already have replaced it.
        with contextlib.suppress(OSError):
            info = os.stat(self.path)
            if (info.st_dev, info.st_ino) == self._inode:
                os.unlink(self.path)


def claim_socket_path(path: str) -> None:
    """Make ``path`` free for a new socket, or raise :class:`AdminSocketError`.

    Creates the parent directory (0700) if needed; removes a stale socket.
    """
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as exc:  # e.g. under systemd's ProtectSystem=strict
        raise AdminSocketError(
            f"{path}: cannot create the directory {directory}: {exc.strerror or exc}"
            " (check admin.socket)"
        ) from exc
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise AdminSocketError(
            f"{path} exists and is not a socket; refusing to replace it (check admin.socket)"
        )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(_PROBE_TIMEOUT)
        try:
            probe.connect(path)
        except FileNotFoundError:
            return
        except ConnectionRefusedError:
            pass  # nobody listens: left over from a process that died
        except OSError as exc:
            if exc.errno != errno.ECONNREFUSED:
                raise AdminSocketError(
                    f"{path}: cannot tell whether another mc-proxy uses this admin socket"
                    f" ({exc}); refusing to replace it"
                ) from exc
        else:
            raise AdminSocketError(
                f"{path}: another process answers on this admin socket (is mc-proxy already"
                " running with this config?); refusing to start"
            )
    log.warning("removing stale admin socket %s", path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
