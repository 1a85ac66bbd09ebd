"""A grpcio test service with bytes in and bytes out: no generated code needed.

Methods of ``test.Echo`` (all messages are raw bytes):

``Unary``         echoes the request; ``fail:<details>`` aborts with
                  PERMISSION_DENIED and those details; every reply carries the
                  trailing metadata ``x-trailer: done``.
``Sleep``         waits up to ``<seconds>`` for the client to go away; records
                  in ``cancelled`` whether it did.
``ServerStream``  request ``<count>,<size>``: ``count`` messages of ``size`` bytes.
``ClientStream``  reads every message; replies ``<count>,<bytes>,<sha256>``.
``Bidi``          echoes every message as it arrives.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

__all__ = ["BIG_MESSAGE_OPTIONS", "GrpcBackend", "method", "stub"]

MAX_MESSAGE = 64 * 1024 * 1024
BIG_MESSAGE_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
]


def method(name: str) -> str:
    return f"/test.Echo/{name}"


def stub(channel: grpc.Channel, kind: str, name: str) -> Any:
    """A callable for ``test.Echo/<name>``; ``kind`` is ``unary_unary``, ``stream_stream``..."""
    factory = getattr(channel, kind)
    return factory(method(name), request_serializer=None, response_deserializer=None)


class GrpcBackend:
    def __init__(
        self,
        tls: tuple[bytes, bytes] | None = None,
        max_concurrent_streams: int | None = None,
    ) -> None:
        self.cancelled: list[bool] = []
        self.sleeping = threading.Semaphore(0)
        self.active = 0
        self.peak = 0
        """Most Sleep calls running at once."""
        self._lock = threading.Lock()
        self.streamed = 0
        """Messages produced by ServerStream so far (to watch back-pressure)."""
        options: list[tuple[str, Any]] = list(BIG_MESSAGE_OPTIONS)
        if max_concurrent_streams is not None:
            options.append(("grpc.max_concurrent_streams", max_concurrent_streams))
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), options=options)
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self._unary),
            "Sleep": grpc.unary_unary_rpc_method_handler(self._sleep),
            "ServerStream": grpc.unary_stream_rpc_method_handler(self._server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(self._client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(self._bidi),
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("test.Echo", handlers),)
        )
        if tls is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            credentials = grpc.ssl_server_credentials([(tls[1], tls[0])])
            self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
        self.server.start()

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.stop(grace=None)

    def _unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        context.set_trailing_metadata((("x-trailer", "done"),))
        if request.startswith(b"fail:"):
            context.abort(grpc.StatusCode.PERMISSION_DENIED, request[5:].decode())
        return request

    def _sleep(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        done = threading.Event()
        context.add_callback(done.set)
        with self._lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        self.sleeping.release()
        done.wait(float(request.decode()))
        with self._lock:
            self.active -= 1
        self.cancelled.append(not context.is_active())
        return b"slept"

    def _server_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        count, size = (int(x) for x in request.decode().split(","))
        block = hashlib.sha256(b"stream").digest() * (size // 32 + 1)
        message = block[:size]
        for _ in range(count):
            self.streamed += 1
            yield message

    def _client_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        digest, count, total = hashlib.sha256(), 0, 0
        for message in requests:
            digest.update(message)
            count += 1
            total += len(message)
        return f"{count},{total},{digest.hexdigest()}".encode()

    def _bidi(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from requests
