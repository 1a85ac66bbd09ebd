"""Listening sockets, created by the supervisor and lent to the workers.

Every worker slot gets its own SO_REUSEPORT socket per listener, and the
supervisor keeps its copy open for the life of the process (invariant 7): when
a worker dies, the connections the kernel already queued on its socket wait
there for the respawned worker instead of being reset.
"""

from __future__ import annotations

import errno
import socket

from mcproxy.model import Address

__all__ = ["ListenError", "open_listening_socket"]

BACKLOG = 4096


class ListenError(Exception):
    """A listener cannot be bound; the message names the address and the reason."""


def open_listening_socket(
    addr: Address, backlog: int = BACKLOG, reuse_port: bool = True
) -> socket.socket:
    """Bind one SO_REUSEPORT member for ``addr``; ``:port`` is dual-stack when IPv6 exists.

    ``reuse_port=False`` is for a socket that must be the only one on its port
    (the metrics endpoint)."""
    if addr.host:
        try:
            infos = socket.getaddrinfo(
                addr.host, addr.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except socket.gaierror as exc:
            raise ListenError(f"cannot listen on {addr}: {exc}") from exc
        family, _, _, _, sockaddr = infos[0]
        return _bind(
            addr, family, (str(sockaddr[0]), int(sockaddr[1])), backlog, reuse_port=reuse_port
        )
    try:
        return _bind(
            addr,
            socket.AF_INET6,
            ("::", addr.port),
            backlog,
            reuse_port=reuse_port,
            dual_stack=True,
        )
    except ListenError as exc:
        if not isinstance(exc.__cause__, OSError) or exc.__cause__.errno not in (
            errno.EAFNOSUPPORT,
            errno.EADDRNOTAVAIL,
        ):
            raise
        return _bind(addr, socket.AF_INET, ("0.0.0.0", addr.port), backlog, reuse_port=reuse_port)


def _bind(
    addr: Address,
    family: socket.AddressFamily,
    sockaddr: tuple[str, int],
    backlog: int,
    *,
    reuse_port: bool,
    dual_stack: bool = False,
) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if dual_stack:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(sockaddr)
        sock.listen(backlog)
        sock.setblocking(False)
        sock.set_inheritable(True)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {addr}: {exc.strerror or exc}") from exc
    return sock
