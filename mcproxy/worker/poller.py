"""One epoll set for the worker's proxied sockets, watched by the event loop as one descriptor.

Why not ``loop.add_reader`` per socket: uvloop (libuv) pays, per socket it
starts watching, one ``ioctl`` and three ``epoll_ctl`` calls, three more to
stop, two for every change of the event mask, a handle object and a Python
``WeakValueDictionary`` miss (an exception) on every add or remove; an L4
connection starts and stops watching two sockets and changes a mask or two,
which came to about a tenth of mc-proxy's CPU per new connection
(``bench/``, ``l4_connrate``). And libuv stops watching a socket after it
reports an error once, so a reader that takes only the data that came before
a reset never hears of the reset. Here a socket costs one ``epoll_ctl`` to
start, one per mask change, and none to stop if it is closed at once (the
kernel drops a closed descriptor from every epoll set); the set is
level-triggered, so an error or a hang-up is reported until it is handled.

Contract for handlers: they are called with the epoll event bits and must
tolerate a spurious call (``recv``/``send`` raising ``BlockingIOError``): an
event read in one batch may belong to a descriptor that a handler earlier in
the batch closed and a new socket reused.
"""

from __future__ import annotations

import asyncio
import select
from collections.abc import Callable

__all__ = ["ERROR", "READ", "WRITE", "Handler", "Poller"]

READ = select.EPOLLIN
WRITE = select.EPOLLOUT
ERROR = select.EPOLLERR | select.EPOLLHUP
"""Always reported, whatever the mask: a handler treats them as a reason to read."""

Handler = Callable[[int], None]

_BATCH = 256
"""Events handled per wake-up; more stay ready and come on the loop's next turn."""


class Poller:
    """Socket descriptors, their event masks and handlers, on top of one event loop."""

    __slots__ = ("_epoll", "_handlers", "_masks")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._epoll = select.epoll()
        self._handlers: dict[int, Handler] = {}
        self._masks: dict[int, int] = {}
        loop.add_reader(self._epoll.fileno(), self._dispatch)

    def watch(self, fd: int, mask: int, handler: Handler) -> None:
        """Call ``handler(events)`` while ``fd`` has any of ``mask`` (or an error) ready."""
        self._handlers[fd] = handler
        self.set_mask(fd, mask)

    def set_mask(self, fd: int, mask: int) -> None:
        """Change what ``fd`` is watched for; 0 stops watching but keeps its handler."""
        old = self._masks.get(fd, 0)
        if mask == old:
            return
        if not mask:
            # Out of the set: a socket that has hung up must not wake us again and again.
            self._epoll.unregister(fd)
            del self._masks[fd]
        elif old:
            try:
                self._epoll.modify(fd, mask)
            except FileNotFoundError:  # closed without forget() and the number reused
                self._epoll.register(fd, mask)
            self._masks[fd] = mask
        else:
            self._epoll.register(fd, mask)
            self._masks[fd] = mask

    def forget(self, fd: int, closing: bool) -> None:
        """Stop watching ``fd``; ``closing``: it is closed right after, which drops it
        from the epoll set for free (the worker never duplicates these descriptors)."""
        self._handlers.pop(fd, None)
        if self._masks.pop(fd, 0) and not closing:
            self._epoll.unregister(fd)

    def _dispatch(self) -> None:
        handlers = self._handlers
        for fd, events in self._epoll.poll(0, _BATCH):
            handler = handlers.get(fd)
            if handler is not None:
                handler(events)
