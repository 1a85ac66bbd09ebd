"""TLS as a sans-I/O object, so that bytes already read go into the session first.

The listener reads the ClientHello to route by SNI before anyone knows the
connection will be terminated here. :class:`TlsSession` wraps an
``ssl.SSLObject`` between two ``ssl.MemoryBIO`` s: whatever the glue
receives (those consumed bytes first, then the socket's) is fed with
:meth:`TlsSession.receive`, and what the session wants to send comes out of
:meth:`TlsSession.data_to_send`. Nothing is read twice and nothing is lost.
The same class speaks to TLS backends, on the client side.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl

__all__ = [
    "ALPN_H2",
    "ALPN_HTTP1",
    "BACKEND_CA_ENV",
    "TlsSession",
    "backend_context",
    "server_context",
]

ALPN_H2 = "h2"
ALPN_HTTP1 = "http/1.1"
BACKEND_CA_ENV = "MCPROXY_BACKEND_CA"
"""A PEM file of extra CAs trusted for ``backend_tls`` (beside the system store)."""
_READ_SIZE = 256 * 1024

log = logging.getLogger("mcproxy.l7")


def server_context(cert_path: str, key_path: str, client_ca: str | None = None) -> ssl.SSLContext:
    """The client-facing context of an L7 route: TLS 1.2 minimum, ALPN h2 and http/1.1.

    With ``client_ca`` the handshake requires a client certificate issued by
    that CA (``CERT_REQUIRED``): a client without one, or with another CA's,
    fails the handshake. The context is per route certificate, so the SNI
    picks the CA.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_alpn_protocols([ALPN_H2, ALPN_HTTP1])
    context.load_cert_chain(cert_path, key_path)
    if client_ca:
        context.load_verify_locations(cafile=client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def backend_context(
    extra_ca: str | None = None,
    *,
    ca: str | None = None,
    client_cert: str | None = None,
    client_key: str | None = None,
    alpn: str = ALPN_H2,
) -> ssl.SSLContext:
    """The context for ``backend_tls``.

    With ``ca`` (a route's ``backend_ca``) the backend is verified against
    that file *instead of* the system store; without it, against the system
    store plus ``extra_ca``, which defaults to ``$MCPROXY_BACKEND_CA`` (the
    global fallback). An unreadable ``$MCPROXY_BACKEND_CA`` raises at worker
    boot rather than failing every request later. ``client_cert`` and
    ``client_key`` are presented to a backend that asks (mutual TLS).
    ``alpn`` is the one protocol offered: ``h2`` or ``http/1.1``.
    """
    if ca:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    else:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols([alpn])
    if not ca:
        extra_ca = extra_ca if extra_ca is not None else os.environ.get(BACKEND_CA_ENV)
        if extra_ca:
            try:
                context.load_verify_locations(cafile=extra_ca)
            except (OSError, ssl.SSLError) as exc:
                reason = getattr(exc, "strerror", None) or str(exc)
                raise RuntimeError(f"{BACKEND_CA_ENV}={extra_ca}: cannot load: {reason}") from exc
    if client_cert:
        context.load_cert_chain(client_cert, client_key or None)
    return context


class TlsSession:
    """One TLS connection without a socket: bytes in, plaintext out, bytes to send."""

    __slots__ = ("_incoming", "_obj", "_outgoing", "closed", "error")

    def __init__(
        self, context: ssl.SSLContext, server_side: bool, server_hostname: str | None = None
    ) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._obj = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side, server_hostname=server_hostname
        )
        self.closed = False
        """True once the peer's close_notify (or EOF, or a TLS error) was read."""
        self.error: str | None = None
        """What ended the connection, when it was a TLS error after the handshake."""

    def receive(self, data: bytes) -> None:
        """Bytes from the peer; ``b""`` means EOF."""
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    def do_handshake(self) -> bool:
        """Advance the handshake: True when complete. Raises ``ssl.SSLError`` on failure."""
        try:
            self._obj.do_handshake()
        except ssl.SSLWantReadError:
            return False
        return True

    def read(self) -> bytes:
        """All the plaintext available now (possibly ``b""``)."""
        chunks: list[bytes] = []
        while True:
            try:
                chunk = self._obj.read(_READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self.closed = True
                break
            except ssl.SSLError as exc:
                # An alert after the handshake (a TLS 1.3 backend refusing our client
                # certificate, a corrupt record): the end of this connection, not a bug.
                self.closed = True
                self.error = f"TLS: {exc.reason or exc}"
                log.info("TLS connection ended by an error: %s", exc)
                break
            if not chunk:
                self.closed = True
                break
            chunks.append(chunk)
        if len(chunks) == 1:
            return chunks[0]
        return b"".join(chunks)

    def write(self, plaintext: bytes) -> None:
        if plaintext:
            self._obj.write(plaintext)

    def close(self) -> None:
        """Queue a close_notify."""
        with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLError):
            self._obj.unwrap()

    def data_to_send(self) -> bytes:
        return self._outgoing.read()

    def peer_certificate(self) -> bytes | None:
        """The peer's certificate (DER), if it sent one (a client, under ``client_ca``)."""
        try:
            return self._obj.getpeercert(binary_form=True)
        except ValueError:  # before the handshake
            return None

    @property
    def alpn(self) -> str | None:
        return self._obj.selected_alpn_protocol()

    @property
    def version(self) -> str | None:
        return self._obj.version()
