"""The access log: one line per connection, written without logging's per-record machinery.

Lines go to the ``mcproxy.access`` logger and read exactly as if ``logging``
had written them. When that logger would hand an INFO record to one plain
``StreamHandler`` with the worker's format (:data:`WORKER_FORMAT`, set by
``logging.basicConfig`` in ``worker/main.py``) and nothing else, the line is
rendered here and written to that handler's stream. Going through
``Logger.info`` cost about a tenth of mc-proxy's CPU per new L4 connection
under load (``bench/``, ``l4_connrate``): a ``LogRecord``, the caller lookup,
the handler lock and the formatter. Any other set-up (a
handler, filter or level of its own) goes through ``logging`` as usual.

Inside an event loop, the lines of one loop turn go out together, in one
write at the start of the next turn (and at exit): a write system call per
line was about 15% of a worker's CPU per HTTP/2 request (ARCHITECTURE.md,
"L7 routes: speed"). Outside a loop each line is written at once.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import time
from typing import TextIO

from mcproxy.settings import LOG_FORMAT

__all__ = ["WORKER_FORMAT", "AccessLog"]

WORKER_FORMAT = LOG_FORMAT
"""The worker's log format; the access log renders it itself when it writes directly."""
MAX_PENDING = 512
"""Lines held for the end of a loop turn at most; more are written at once."""


def _direct_stream(logger: logging.Logger) -> TextIO | None:
    """The stream to write to directly, or None when only ``logging`` does it right."""
    if not logger.isEnabledFor(logging.INFO):
        return None
    handlers: list[logging.Handler] = []
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        handlers += current.handlers
        current = current.parent if current.propagate else None
    if len(handlers) != 1:
        return None
    (handler,) = handlers
    formatter = handler.formatter
    if (
        type(handler) is not logging.StreamHandler
        or handler.level > logging.INFO
        or handler.filters
        or formatter is None
        or type(formatter) is not logging.Formatter
        or getattr(formatter, "_fmt", None) != WORKER_FORMAT
        or formatter.datefmt is not None
        or formatter.converter is not time.localtime
        or formatter.default_time_format != logging.Formatter.default_time_format
        or formatter.default_msec_format != logging.Formatter.default_msec_format
    ):
        return None
    stream: TextIO = handler.stream
    return stream


class AccessLog:
    """Writes access-log lines; decides once, at the first line, how to write them."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger("mcproxy.access")
        self._decided = False
        self._stream: TextIO | None = None
        self._prefix = ""
        self._second = -1
        self._asctime = ""
        self._pending: list[str] = []

    def write(self, line: str) -> None:
        if not self._decided:
            self._stream = _direct_stream(self.logger)
            self._prefix = f"INFO {self.logger.name} pid={os.getpid()} "
            self._decided = True
            if self._stream is not None:
                atexit.register(self.flush)
        if self._stream is None:
            self.logger.info(line)
            return
        now = time.time()
        second = int(now)
        if second != self._second:  # strftime once a second, as logging would render it
            self._second = second
            self._asctime = time.strftime(
                logging.Formatter.default_time_format, time.localtime(second)
            )
        millis = int((now - second) * 1000)
        pending = self._pending
        pending.append(f"{self._asctime},{millis:03d} {self._prefix}{line}\n")
        if len(pending) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop running: at once
                self.flush()
        elif len(pending) >= MAX_PENDING:
            self.flush()

    def flush(self) -> None:
        """Write the lines held so far."""
        pending = self._pending
        if pending and self._stream is not None:
            self._stream.write("".join(pending))
            pending.clear()
            self._stream.flush()
