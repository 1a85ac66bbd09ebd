"""TLS without sockets: bytes already read go first; certificates rotate from disk."""

from __future__ import annotations

import hashlib
import os
import ssl
from pathlib import Path

import pytest

from mcproxy.worker.l7.certs import (
    CHECK_INTERVAL,
    BackendContexts,
    BackendTrust,
    CertStore,
    client_cert_header,
)
from mcproxy.worker.l7.tls import TlsSession, backend_context, server_context
from tests.certs import CA, issue, issue_client, make_ca


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


def test_client_ca_requires_a_certificate_from_that_ca(tmp_path: Path, ca: CA) -> None:
    cert, key = issue(ca, "web.test", tmp_path)
    clients = make_ca("client CA")
    client_ca = tmp_path / "clients.pem"
    client_ca.write_bytes(clients.pem)
    good_cert, good_key = issue_client(clients, "alice", tmp_path)
    stranger_cert, stranger_key = issue_client(make_ca("other CA"), "mallory", tmp_path)
    context = server_context(str(cert), str(key), str(client_ca))

    def client(pair: tuple[Path, Path] | None) -> TlsSession:
        ctx = ssl.create_default_context(cadata=ca.pem.decode())
        if pair is not None:
            ctx.load_cert_chain(*pair)
        return TlsSession(ctx, server_side=False, server_hostname="web.test")

    for pair in (None, (stranger_cert, stranger_key)):
        server = TlsSession(context, server_side=True)
        with pytest.raises(ssl.SSLError):
            peer = client(pair)
            _handshake(peer, server)
            peer.write(b"x")  # TLS 1.3: the client learns of the refusal on its next read
            server.receive(peer.data_to_send())
            server.read()
    server = TlsSession(context, server_side=True)
    _handshake(client((good_cert, good_key)), server)
    der = server.peer_certificate()
    assert der is not None
    value = client_cert_header(der)
    expected = hashlib.sha256(der).hexdigest()
    assert value == f'Hash={expected};Subject="CN=alice"'.encode()


def test_backend_contexts_use_the_route_ca_instead_of_the_system_store(
    tmp_path: Path, ca: CA
) -> None:
    path = ca.write(tmp_path)
    contexts = BackendContexts()
    trusted = contexts.context(BackendTrust(ca=str(path)), "http/1.1")
    subjects = [c.get("subject") for c in trusted.get_ca_certs()]
    assert subjects == [((("commonName", "mc-proxy test CA"),),)]
    assert contexts.context(BackendTrust(ca=str(path)), "http/1.1") is trusted
    assert contexts.context(BackendTrust(ca=str(path)), "h2") is not trusted
    assert contexts.context(BackendTrust()) is contexts.context(BackendTrust(server_name="x"))


def test_backend_mtls_presents_the_client_certificate(tmp_path: Path, ca: CA) -> None:
    cert, key = issue(ca, "backend.test", tmp_path)
    client_cert, client_key = issue_client(ca, "mc-proxy", tmp_path)
    ca_path = ca.write(tmp_path)
    server = TlsSession(server_context(str(cert), str(key), str(ca_path)), server_side=True)
    trust = BackendTrust(ca=str(ca_path), client_cert=str(client_cert), client_key=str(client_key))
    context = BackendContexts().context(trust, "http/1.1")
    client = TlsSession(context, server_side=False, server_hostname="backend.test")
    _handshake(client, server)
    assert server.alpn == "http/1.1"
    der = server.peer_certificate()
    assert der is not None and b"mc-proxy" in der


def test_backend_contexts_reload_a_renewed_client_certificate(tmp_path: Path, ca: CA) -> None:
    client_cert, client_key = issue_client(ca, "mc-proxy", tmp_path)
    clock = Clock()
    contexts = BackendContexts(clock=clock)
    trust = BackendTrust(client_cert=str(client_cert), client_key=str(client_key))
    first = contexts.context(trust)
    renewed = tmp_path / "renewed"
    renewed.mkdir()
    new_cert, new_key = issue_client(ca, "mc-proxy", renewed)
    os.replace(new_key, client_key)
    os.replace(new_cert, client_cert)
    assert contexts.context(trust) is first
    clock.now += CHECK_INTERVAL
    assert contexts.context(trust) is not first


def test_a_backend_outside_the_route_ca_fails_verification(tmp_path: Path, ca: CA) -> None:
    cert, key = issue(make_ca("another CA"), "backend.test", tmp_path)
    server = TlsSession(server_context(str(cert), str(key)), server_side=True)
    context = BackendContexts().context(BackendTrust(ca=str(ca.write(tmp_path))), "http/1.1")
    client = TlsSession(context, server_side=False, server_hostname="backend.test")
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        _handshake(client, server)


def test_a_tls_error_after_the_handshake_ends_the_session_without_raising(
    tmp_path: Path, ca: CA
) -> None:
    cert, key = issue(ca, "web.test", tmp_path)
    client = _client(ca, ["http/1.1"])
    server = TlsSession(server_context(str(cert), str(key)), server_side=True)
    _handshake(client, server)
    server.receive(b"\x17\x03\x03\x00\x10" + b"\x00" * 16)  # a record that does not decrypt
    assert server.read() == b""
    assert server.closed and server.error is not None and server.error.startswith("TLS: ")
