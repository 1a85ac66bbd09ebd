"""End to end: grpcio client -> mc-proxy (2 workers, TLS) -> grpcio server, h2c and TLS."""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from mcproxy.worker.l7.tls import BACKEND_CA_ENV
from tests.certs import CA, issue, make_ca
from tests.e2e.grpc_service import BIG_MESSAGE_OPTIONS, GrpcBackend, stub
from tests.e2e.harness import ProxyProcess, free_port, wait_for

H2C = "grpc.test"
TLS = "grpcs.test"
QUEUE = "queue.test"


class Stack:
    def __init__(self, ca: CA, port: int, backends: dict[str, GrpcBackend]) -> None:
        self.ca = ca
        self.port = port
        self.backends = backends

    def channel(self, hostname: str) -> grpc.Channel:
        credentials = grpc.ssl_channel_credentials(root_certificates=self.ca.pem)
        return grpc.secure_channel(
            f"127.0.0.1:{self.port}",
            credentials,
            options=[
                ("grpc.ssl_target_name_override", hostname),
                ("grpc.default_authority", hostname),
                *BIG_MESSAGE_OPTIONS,
            ],
        )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("grpc")
    ca = make_ca()
    ca_file = ca.write(directory)
    backend_cert, backend_key = issue(ca, "127.0.0.1", directory)
    backends = {
        H2C: GrpcBackend(),
        TLS: GrpcBackend(tls=(backend_cert.read_bytes(), backend_key.read_bytes())),
        QUEUE: GrpcBackend(max_concurrent_streams=1),
    }
    routes = []
    for hostname, backend in backends.items():
        cert, key = issue(ca, hostname, directory)
        routes.append(
            {
                "hostname": hostname,
                "backend": backend.addr,
                "mode": "l7",
                "tls_cert": str(cert),
                "tls_key": str(key),
                "backend_tls": hostname == TLS,
            }
        )
    port = free_port()
    config = {"listeners": [{"addr": f"127.0.0.1:{port}", "routes": routes}]}
    proxy = ProxyProcess(directory, config, env={BACKEND_CA_ENV: str(ca_file)})
    try:
        with proxy:
            yield Stack(ca, port, backends)
    finally:
        for backend in backends.values():
            backend.close()


both = pytest.mark.parametrize("hostname", [H2C, TLS])


@both
def test_unary_call_with_trailing_metadata(stack: Stack, hostname: str) -> None:
    with stack.channel(hostname) as channel:
        call = stub(channel, "unary_unary", "Unary")
        reply, state = call.with_call(b"hello", timeout=10)
    assert reply == b"hello"
    assert ("x-trailer", "done") in tuple(state.trailing_metadata())


@both
def test_server_streaming(stack: Stack, hostname: str) -> None:
    with stack.channel(hostname) as channel:
        replies = list(stub(channel, "unary_stream", "ServerStream")(b"20,1000", timeout=10))
    assert [len(r) for r in replies] == [1000] * 20


@both
def test_client_streaming(stack: Stack, hostname: str) -> None:
    messages = [bytes([k]) * (k * 100 + 1) for k in range(30)]
    with stack.channel(hostname) as channel:
        reply = stub(channel, "stream_unary", "ClientStream")(iter(messages), timeout=10)
    digest = hashlib.sha256(b"".join(messages)).hexdigest()
    assert reply == f"30,{sum(map(len, messages))},{digest}".encode()


@both
def test_bidirectional_streaming_is_interactive(stack: Stack, hostname: str) -> None:
    # Each message is sent only after the echo of the previous one came back: nothing
    # on the way may wait for more data or for the end of the stream.
    outgoing: queue.Queue[bytes | None] = queue.Queue()

    def requests() -> Iterator[bytes]:
        while (message := outgoing.get(timeout=10)) is not None:
            yield message

    with stack.channel(hostname) as channel:
        replies = stub(channel, "stream_stream", "Bidi")(requests(), timeout=20)
        echoed = []
        for k in range(10):
            outgoing.put(f"ping {k}".encode())
            echoed.append(next(replies))
        outgoing.put(None)
        assert list(replies) == []
    assert echoed == [f"ping {k}".encode() for k in range(10)]


@both
def test_a_16_mib_message_each_way(stack: Stack, hostname: str) -> None:
    message = hashlib.sha256(b"big").digest() * (16 * 1024 * 1024 // 32)
    with stack.channel(hostname) as channel:
        reply = stub(channel, "unary_unary", "Unary")(message, timeout=30)
    assert len(reply) == 16 * 1024 * 1024
    assert reply == message


@both
def test_an_expired_deadline_is_deadline_exceeded_and_cancels_the_backend(
    stack: Stack, hostname: str
) -> None:
    backend = stack.backends[hostname]
    before = len(backend.cancelled)
    with stack.channel(hostname) as channel, pytest.raises(grpc.RpcError) as failure:
        stub(channel, "unary_unary", "Sleep")(b"10", timeout=0.5)
    error: Any = failure.value
    assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    # The cancellation travels on to the backend: its handler sees the client gone.
    wait_for(lambda: len(backend.cancelled) > before, 10, "the backend handler to return")
    assert backend.cancelled[before] is True


@both
def test_a_non_ok_status_keeps_its_details(stack: Stack, hostname: str) -> None:
    with stack.channel(hostname) as channel, pytest.raises(grpc.RpcError) as failure:
        stub(channel, "unary_unary", "Unary")(b"fail:no access for you", timeout=10)
    error: Any = failure.value
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == "no access for you"


def test_a_backend_taking_one_stream_per_connection_gets_more_connections(stack: Stack) -> None:
    backend = stack.backends[QUEUE]
    with stack.channel(QUEUE) as channel:
        sleep = stub(channel, "unary_unary", "Sleep")
        # All six calls share one client connection, so one worker: its pool for this
        # backend grows to one connection per call (the backend's MAX_CONCURRENT_STREAMS is 1;
        # a stream over it would be refused and the call would fail).
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda _: sleep(b"0.3", timeout=30), range(6)))
    assert results == [b"slept"] * 6
    assert 1 <= backend.peak <= 6


def test_calls_on_many_channels_at_once(stack: Stack) -> None:
    errors: list[BaseException] = []

    def client(k: int) -> None:
        try:
            with stack.channel(H2C if k % 2 else TLS) as channel:
                for n in range(5):
                    payload = f"{k}-{n}".encode()
                    assert stub(channel, "unary_unary", "Unary")(payload, timeout=10) == payload
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
