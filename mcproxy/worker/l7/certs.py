"""Server certificates of L7 routes, reloaded when the files on disk change.

A renewed certificate (certbot, cert-manager, a cron job) must be served to
new handshakes within seconds, without a restart and without touching open
connections. :class:`CertStore` keeps one ``SSLContext`` per (cert, key)
pair and, at most once per :data:`CHECK_INTERVAL` per pair, compares the
files' (inode, size, mtime) with those it loaded. A changed pair is loaded
into a *new* context; connections made with the old one keep it. A pair that
does not load (a half-written renewal, a key that no longer matches) keeps
the previous context and is tried again on the next check.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from mcproxy.worker.l7.tls import server_context

__all__ = ["CHECK_INTERVAL", "CertStore"]

CHECK_INTERVAL = 1.0
"""Seconds between stat checks of one pair: a rotation shows within about this long."""

log = logging.getLogger("mcproxy.l7")

_Signature = tuple[tuple[int, int, int], tuple[int, int, int]]


@dataclass(slots=True)
class _Entry:
    context: ssl.SSLContext
    signature: _Signature
    checked: float


def _signature(cert_path: str, key_path: str) -> _Signature:
    cert, key = os.stat(cert_path), os.stat(key_path)
    return (
        (cert.st_ino, cert.st_size, cert.st_mtime_ns),
        (key.st_ino, key.st_size, key.st_mtime_ns),
    )


class CertStore:
    def __init__(
        self,
        load: Callable[[str, str], ssl.SSLContext] = server_context,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._load = load
        self._clock = clock
        self._entries: dict[tuple[str, str], _Entry] = {}

    def context(self, cert_path: str, key_path: str) -> ssl.SSLContext:
        """The context for a new handshake. Raises OSError/ssl.SSLError if never loadable."""
        now = self._clock()
        entry = self._entries.get((cert_path, key_path))
        if entry is None:
            signature = _signature(cert_path, key_path)
            entry = _Entry(self._load(cert_path, key_path), signature, now)
            self._entries[(cert_path, key_path)] = entry
            return entry.context
        if now - entry.checked >= CHECK_INTERVAL:
            entry.checked = now
            try:
                signature = _signature(cert_path, key_path)
                if signature != entry.signature:
                    entry.context = self._load(cert_path, key_path)
                    entry.signature = signature
                    log.info("reloaded certificate %s", cert_path)
            except (OSError, ssl.SSLError) as exc:
                log.warning("keeping the loaded certificate for %s: %s", cert_path, exc)
        return entry.context
