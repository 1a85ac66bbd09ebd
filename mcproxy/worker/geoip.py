"""Country of a client IP from a MaxMind DB (GeoLite2/GeoIP2 Country format).

The firewall asks :meth:`GeoIP.country` once per connection when country
rules exist. The C reader walks the mapped file quickly but decodes the whole
record (names in eight languages; ``bench/admission.py`` times it), so answers are kept in
a small per-worker cache, emptied when it fills up and on every reload.

:meth:`GeoIP.refresh` is called about once a second from the worker's loop
(never per connection): it compares the file's identity (device, inode, size,
mtime) with the open one and, when it changed, opens the new file and swaps
it in. A new file that cannot be read is logged and the old reader
stays. Replace the file atomically (write elsewhere, rename over it), as
``geoipupdate`` does: rewriting a mapped file in place can crash the reader.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import maxminddb

__all__ = ["GeoIP", "GeoIPError"]

log = logging.getLogger("mcproxy.worker")

_Signature = tuple[int, int, int, int]
CACHE_SIZE = 4096
"""Recent clients' countries; clearing it when full is cheaper than keeping LRU order."""


class GeoIPError(Exception):
    """The database cannot be opened; the message names the file and the reason."""


def _signature(path: str) -> _Signature:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _open(path: str) -> tuple[Any, _Signature]:
    try:
        signature = _signature(path)
        reader = maxminddb.open_database(path)
    except FileNotFoundError:
        raise GeoIPError(f"GeoIP database {path}: file not found") from None
    except (OSError, ValueError, RuntimeError) as exc:
        raise GeoIPError(f"GeoIP database {path} is not a readable MaxMind DB: {exc}") from None
    return reader, signature


class GeoIP:
    def __init__(self, path: str) -> None:
        """Open ``path``; raises :class:`GeoIPError` with a clear reason."""
        self.path = path
        self._reader, self._signature = _open(path)
        self._failed: _Signature | None = None
        self._cache: dict[str, str | None] = {}
        """The signature of a replacement that failed to open (not retried until it changes)."""

    def country(self, ip: str) -> str | None:
        """ISO 3166 code of the country of ``ip``, or None when the database does not know it.

        The location (``country``) wins; the registration (``registered_country``)
        stands in when the database has no location for the network.
        """
        try:
            return self._cache[ip]
        except KeyError:
            pass
        code = self._lookup(ip)
        if len(self._cache) >= CACHE_SIZE:
            self._cache.clear()
        self._cache[ip] = code
        return code

    def _lookup(self, ip: str) -> str | None:
        try:
            record = self._reader.get(ip)
        except ValueError:  # e.g. an IPv6 address against an IPv4-only database
            return None
        if not isinstance(record, dict):
            return None
        for key in ("country", "registered_country"):
            section = record.get(key)
            if isinstance(section, dict):
                code = section.get("iso_code")
                if isinstance(code, str):
                    return code
        return None

    def refresh(self) -> bool:
        """Reopen the file if it was replaced; True when a new database was swapped in."""
        try:
            signature = _signature(self.path)
        except OSError:
            return False  # mid-replacement or removed: keep serving from the open one
        if signature in (self._signature, self._failed):
            return False
        try:
            reader, signature = _open(self.path)
        except GeoIPError as exc:
            self._failed = signature
            log.error("%s; keeping the previous database", exc)
            return False
        old, self._reader, self._signature, self._failed = self._reader, reader, signature, None
        self._cache.clear()
        old.close()
        log.info("GeoIP database %s reloaded", self.path)
        return True

    def close(self) -> None:
        self._reader.close()
