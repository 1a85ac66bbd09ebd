"""TLS without sockets: bytes already read go first; certificates rotate from disk."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest

from mcproxy.worker.l7.certs import CHECK_INTERVAL, CertStore
from mcproxy.worker.l7.tls import TlsSession, backend_context, server_context
from tests.certs import CA, issue, make_ca


@pytest.fixture(scope="module")
def ca() -> CA:
    return make_ca()


def _client(ca: CA, alpn: list[str]) -> TlsSession:
    context = ssl.create_default_context(cadata=ca.pem.decode())
    context.set_alpn_protocols(alpn)
    return TlsSession(context, server_side=False, server_hostname="web.test")


def _handshake(client: TlsSession, server: TlsSession, first: bytes = b"") -> None:
    if first:
        server.receive(first)
    for _ in range(10):
        client_done = client.do_handshake()
        out = client.data_to_send()
        if out:
            server.receive(out)
        server_done = server.do_handshake()
        out = server.data_to_send()
        if out:
            client.receive(out)
        if client_done and server_done:
            return
    raise AssertionError("handshake did not finish")


def test_consumed_client_hello_is_fed_first_and_alpn_h2_wins(tmp_path: Path, ca: CA) -> None:
    cert, key = issue(ca, "web.test", tmp_path)
    client = _client(ca, ["h2", "http/1.1"])
    client.do_handshake()
    hello = client.data_to_send()  # what the listener read to route by SNI
    server = TlsSession(server_context(str(cert), str(key)), server_side=True)
    _handshake(client, server, first=hello)
    assert server.alpn == "h2"
    assert server.version in ("TLSv1.2", "TLSv1.3")
    client.write(b"ping")
    server.receive(client.data_to_send())
    assert server.read() == b"ping"


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated")
def test_tls_1_1_is_refused(tmp_path: Path, ca: CA) -> None:
    cert, key = issue(ca, "web.test", tmp_path)
    context = ssl.create_default_context(cadata=ca.pem.decode())
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(ssl.SSLError):
        client = TlsSession(context, server_side=False, server_hostname="web.test")
        server = TlsSession(server_context(str(cert), str(key)), server_side=True)
        _handshake(client, server)


def test_backend_context_trusts_an_extra_ca_file(tmp_path: Path, ca: CA) -> None:
    context = backend_context(str(ca.write(tmp_path)))
    assert any(
        c.get("subject") == ((("commonName", "mc-proxy test CA"),),) for c in context.get_ca_certs()
    )


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_renewed_certificate_is_used_after_the_next_check(tmp_path: Path, ca: CA) -> None:
    cert, key = issue(ca, "web.test", tmp_path)
    clock = Clock()
    store = CertStore(clock=clock)
    first = store.context(str(cert), str(key))
    renewed_dir = tmp_path / "renewed"
    renewed_dir.mkdir()
    new_cert, new_key = issue(ca, "web.test", renewed_dir)
    os.replace(new_key, key)
    os.replace(new_cert, cert)
    assert store.context(str(cert), str(key)) is first, "checked at most once a second"
    clock.now += CHECK_INTERVAL
    second = store.context(str(cert), str(key))
    assert second is not first


def test_a_half_written_renewal_keeps_the_old_certificate(tmp_path: Path, ca: CA) -> None:
    cert, key = issue(ca, "web.test", tmp_path)
    clock = Clock()
    store = CertStore(clock=clock)
    first = store.context(str(cert), str(key))
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    new_cert, _ = issue(ca, "web.test", other_dir)
    os.replace(new_cert, cert)  # the key does not match this certificate yet
    clock.now += CHECK_INTERVAL
    assert store.context(str(cert), str(key)) is first


def test_an_unreadable_backend_ca_file_is_named_in_the_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"MCPROXY_BACKEND_CA=.*missing\.pem: cannot load"):
        backend_context(str(tmp_path / "missing.pem"))
