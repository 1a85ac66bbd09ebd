"""TLS contexts of L7 routes, reloaded when the files on disk change.

A renewed certificate (certbot, cert-manager, a cron job) must be served to
new handshakes within seconds, without a restart and without touching open
connections. :class:`CertStore` keeps one server ``SSLContext`` per (cert,
key, client CA) and :class:`BackendContexts` one client context per backend
trust (CA, client cert, client key, ALPN); at most once per
:data:`CHECK_INTERVAL` per entry, each compares its files' (inode, size,
mtime) with those it loaded. A changed entry is loaded into a *new* context;
connections made with the old one keep it. An entry that does not load (a
half-written renewal, a key that no longer matches) keeps the previous
context and is tried again on the next check.

:func:`client_cert_header` is the ``X-Forwarded-Client-Cert`` value that
tells a backend which client certificate a ``client_ca`` route verified.
"""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from mcproxy.worker.l7.tls import ALPN_H2, backend_context, server_context

__all__ = ["CHECK_INTERVAL", "BackendContexts", "BackendTrust", "CertStore", "client_cert_header"]

CHECK_INTERVAL = 1.0
"""Seconds between stat checks of one entry: a rotation shows within about this long."""

log = logging.getLogger("mcproxy.l7")

_Signature = tuple[tuple[int, int, int] | None, ...]


@dataclass(slots=True)
class _Entry:
    context: ssl.SSLContext
    signature: _Signature
    checked: float


def _signature(paths: tuple[str | None, ...]) -> _Signature:
    signature: list[tuple[int, int, int] | None] = []
    for path in paths:
        if path is None:
            signature.append(None)
        else:
            st = os.stat(path)
            signature.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(signature)


class _ContextCache:
    """One context per tuple of file paths, reloaded when any of the files changes."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._entries: dict[tuple[str | None, ...], _Entry] = {}

    def get(
        self,
        paths: tuple[str | None, ...],
        load: Callable[[], ssl.SSLContext],
        what: str,
        key: tuple[str | None, ...] | None = None,
    ) -> ssl.SSLContext:
        """``key`` (default: ``paths``) names the entry; ``paths`` are the files to watch."""
        key = paths if key is None else key
        now = self._clock()
        entry = self._entries.get(key)
        if entry is None:
            signature = _signature(paths)
            entry = _Entry(load(), signature, now)
            self._entries[key] = entry
            return entry.context
        if now - entry.checked >= CHECK_INTERVAL:
            entry.checked = now
            try:
                signature = _signature(paths)
                if signature != entry.signature:
                    entry.context = load()
                    entry.signature = signature
                    log.info("reloaded %s", what)
            except (OSError, ssl.SSLError) as exc:
                log.warning("keeping the loaded %s: %s", what, exc)
        return entry.context


class CertStore:
    """Server contexts of L7 routes, per (cert, key, client CA)."""

    def __init__(
        self,
        load: Callable[..., ssl.SSLContext] = server_context,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._load = load
        self._cache = _ContextCache(clock)

    def context(
        self, cert_path: str, key_path: str, client_ca: str | None = None
    ) -> ssl.SSLContext:
        """The context for a new handshake. Raises OSError/ssl.SSLError if never loadable."""

        def load() -> ssl.SSLContext:
            if client_ca is None:
                return self._load(cert_path, key_path)
            return self._load(cert_path, key_path, client_ca)

        return self._cache.get((cert_path, key_path, client_ca), load, f"certificate {cert_path}")


@dataclass(frozen=True, slots=True)
class BackendTrust:
    """How a route's TLS backends are verified and what the proxy presents to them.

    ``ca`` replaces the system store (None: the system store plus
    ``$MCPROXY_BACKEND_CA``); ``server_name`` is the SNI and the name verified
    (None: the backend's host); ``client_cert``/``client_key``: mutual TLS.
    """

    ca: str | None = None
    server_name: str | None = None
    client_cert: str | None = None
    client_key: str | None = None


DEFAULT_TRUST = BackendTrust()


class BackendContexts:
    """Client contexts for TLS backends, per (CA, client cert, client key, ALPN).

    The default trust (no ``backend_ca``, no client certificate) uses the
    context made at worker boot from ``$MCPROXY_BACKEND_CA``, which never
    reloads (as before); the others reload like route certificates.
    """

    def __init__(
        self,
        default: Callable[[str], ssl.SSLContext] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._defaults: dict[str, ssl.SSLContext] = {}
        self._default = default or (lambda alpn: backend_context(alpn=alpn))
        self._cache = _ContextCache(clock)

    def context(self, trust: BackendTrust, alpn: str = ALPN_H2) -> ssl.SSLContext:
        """Raises OSError/ssl.SSLError when the files do not load (the dial then fails)."""
        if trust.ca is None and trust.client_cert is None:
            context = self._defaults.get(alpn)
            if context is None:
                context = self._defaults[alpn] = self._default(alpn)
            return context

        def load() -> ssl.SSLContext:
            return backend_context(
                ca=trust.ca, client_cert=trust.client_cert, client_key=trust.client_key, alpn=alpn
            )

        paths = (trust.ca, trust.client_cert, trust.client_key)
        what = f"backend trust (ca={trust.ca}, client cert={trust.client_cert})"
        return self._cache.get(paths, load, what, key=(*paths, alpn))


def client_cert_header(der: bytes) -> bytes:
    """``Hash=<sha256 of the DER, hex>;Subject="<RFC 4514 subject>"`` for a verified client.

    The subject's ``"`` and ``\\`` are escaped so that the quoted string stays one value.
    """
    from cryptography import x509

    digest = hashlib.sha256(der).hexdigest()
    try:
        subject = x509.load_der_x509_certificate(der).subject.rfc4514_string()
    except ValueError:
        subject = ""
    quoted = subject.replace("\\", "\\\\").replace('"', '\\"')
    return f'Hash={digest};Subject="{quoted}"'.encode("utf-8", "surrogateescape")
