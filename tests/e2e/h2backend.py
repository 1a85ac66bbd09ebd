"""An HTTP/2 backend for the L7 tests: h2c (prior knowledge) or TLS, in a thread of its own.

Built on the h2 library with asyncio streams, with real flow control so large
bodies and slow readers behave as they would against a production server.

Paths:
``/headers``        JSON: the request's header list, the PROXY header's source
                    and the number of this TCP connection.
``/bytes/N``        N bytes of ``harness.pattern(N)``.
``/sink``           (POST) reads the body; JSON with its length and sha256.
``/echo``           (POST) echoes the body back as it arrives.
``/trailers``       a body, then trailers ``x-checksum: ok``.
``/sse/N``          N server-sent events; event k+1 is sent only after the test
                    called :meth:`H2Backend.release_event` k+1 times.
``/status/N``       an empty response with status N.
``/healthz``        an empty response with :attr:`H2Backend.health_status` (200 unless set).
Every response to other paths carries ``x-backend: <name>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import ssl
import threading
from collections.abc import Awaitable, Callable

import h2.config
import h2.connection
import h2.events
import h2.settings

from mcproxy.worker.proxy_protocol import ProxyHeaderDecoder
from tests.e2e.harness import pattern

__all__ = ["H2Backend"]


class _Stream:
    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = asyncio.Queue[bytes | None]()
        self.window_open = asyncio.Event()
        self.reset = False


class _Connection:
    def __init__(
        self,
        backend: H2Backend,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        number: int,
        proxy_header: str | None,
    ) -> None:
        self.backend = backend
        self.reader = reader
        self.writer = writer
        self.number = number
        self.proxy_header = proxy_header
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.conn = h2.connection.H2Connection(config)
        self.streams: dict[int, _Stream] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        initial = {h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.backend.max_streams}
        if self.backend.max_header_list_size is not None:
            limit = self.backend.max_header_list_size
            initial[h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE] = limit
        self.conn.local_settings = h2.settings.Settings(client=False, initial_values=initial)
        self.conn.initiate_connection()
        await self.flush()
        while True:
            data = await self.reader.read(65536)
            if not data:
                break
            try:
                events = self.conn.receive_data(data)
            except h2.exceptions.ProtocolError:
                await self.flush()
                break
            for event in events:
                self.handle(event)
            await self.flush()
        for stream in self.streams.values():
            stream.reset = True
            stream.window_open.set()
            stream.body.put_nowait(None)

    def handle(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            stream = self.streams[event.stream_id] = _Stream()
            stream.headers = list(event.headers)
            path = dict(event.headers).get(b":path", b"")
            if path == b"/healthz":
                self.backend.health_checks += 1
            else:
                self.backend.requests += 1
            self.backend.seen.append(stream.headers)
            task = asyncio.get_running_loop().create_task(self.respond(event.stream_id, stream))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        elif isinstance(event, h2.events.DataReceived):
            stream_or_none = self.streams.get(event.stream_id)
            if stream_or_none is not None:
                stream_or_none.body.put_nowait(event.data)
            else:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            if (stream_or_none := self.streams.get(event.stream_id)) is not None:
                stream_or_none.body.put_nowait(None)
        elif isinstance(event, h2.events.StreamReset):
            if (stream_or_none := self.streams.get(event.stream_id)) is not None:
                self.backend.resets += 1
                stream_or_none.reset = True
                stream_or_none.window_open.set()
                stream_or_none.body.put_nowait(None)
        elif isinstance(event, h2.events.TrailersReceived):
            self.backend.trailers_seen.append(list(event.headers))
        elif isinstance(event, h2.events.WindowUpdated):
            for stream in self.streams.values():
                stream.window_open.set()

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.writer.write(data)
            with contextlib.suppress(ConnectionError):
                await self.writer.drain()

    async def read_body(self, sid: int, stream: _Stream) -> bytes:
        chunks = []
        while (chunk := await stream.body.get()) is not None:
            chunks.append(chunk)
            self.ack(sid, len(chunk))
        return b"".join(chunks)

    def ack(self, sid: int, size: int) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.conn.acknowledge_received_data(size, sid)
        data = self.conn.data_to_send()  # the WINDOW_UPDATE must go now, not with the next read
        if data:
            self.writer.write(data)

    async def send_body(self, sid: int, stream: _Stream, data: bytes, end: bool = True) -> None:
        view = memoryview(data)
        while view and not stream.reset:
            window = min(
                self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size
            )
            if window <= 0:
                stream.window_open.clear()
                await stream.window_open.wait()
                continue
            self.conn.send_data(sid, bytes(view[:window]))
            view = view[window:]
            await self.flush()
        if end and not stream.reset:
            self.conn.end_stream(sid)
            await self.flush()

    async def respond(self, sid: int, stream: _Stream) -> None:
        headers = dict(stream.headers)
        path = headers.get(b":path", b"/").decode()
        try:
            await self.backend.handler_for(path)(self, sid, stream, path)
        except (h2.exceptions.ProtocolError, ConnectionError):
            pass
        finally:
            self.streams.pop(sid, None)
            await self.flush()

    def send_headers(self, sid: int, status: int, extra: list[tuple[bytes, bytes]] = []) -> None:  # noqa: B006
        named = [(b"x-backend", self.backend.name.encode())] if self.backend.name else []
        self.conn.send_headers(sid, [(b":status", str(status).encode()), *named, *extra])


Handler = Callable[[_Connection, int, _Stream, str], Awaitable[None]]


async def _headers(c: _Connection, sid: int, stream: _Stream, path: str) -> None:
    await c.read_body(sid, stream)
    body = json.dumps(
        {
            "headers": [[n.decode(), v.decode()] for n, v in stream.headers],
            "proxy_header": c.proxy_header,
            "connection": c.number,
        }
    ).encode()
    c.send_headers(sid, 200, [(b"content-type", b"application/json")])
    await c.send_body(sid, stream, body)


async def _bytes(c: _Connection, sid: int, stream: _Stream, path: str) -> None:
    size = int(path.rsplit("/", 1)[1])
    await c.read_body(sid, stream)
    c.send_headers(sid, 200, [(b"content-length", str(size).encode())])
    await c.send_body(sid, stream, pattern(size))


async def _sink(c: _Connection, sid: int, stream: _Stream, path: str) -> None:
    digest, length = hashlib.sha256(), 0
    while (chunk := await stream.body.get()) is not None:
        digest.update(chunk)
        length += len(chunk)
        c.ack(sid, len(chunk))
    body = json.dumps({"length": length, "sha256": digest.hexdigest()}).encode()
    c.send_headers(sid, 200, [(b"content-type", b"application/json")])
    await c.send_body(sid, stream, body)


async def _echo(c: _Connection, sid: int, stream: _Stream, path: str) -> None:
    c.send_headers(sid, 200)
    await c.flush()
    while (chunk := await stream.body.get()) is not None:
        await c.send_body(sid, stream, chunk, end=False)
        c.ack(sid, len(chunk))
    if not stream.reset:
        c.conn.end_stream(sid)


async def _trailers(c: _Connection, sid: int, stream: _Stream, path: str) -> None:
    await c.read_body(sid, stream)
    c.send_headers(sid, 200)
    await c.send_body(sid, stream, b"body before trailers\n", end=False)
    c.conn.send_headers(sid, [(b"x-checksum", b"ok")], end_stream=True)


async def _sse(c: _Connection, sid: int, stream: _Stream, path: str) -> None:
    count = int(path.rsplit("/", 1)[1])
    await c.read_body(sid, stream)
    c.send_headers(sid, 200, [(b"content-type", b"text/event-stream")])
    await c.flush()
    loop = asyncio.get_running_loop()
    for k in range(count):
        await c.send_body(sid, stream, f"id: {k}\ndata: event {k}\n\n".encode(), end=False)
        if k + 1 < count:
            released = await loop.run_in_executor(None, c.backend._sse_gate.acquire, True, 30)
            if not released or stream.reset:
                return
    c.conn.end_stream(sid)


async def _healthz(c: _Connection, sid: int, stream: _Stream, path: str) -> None:
    await c.read_body(sid, stream)
    status = str(c.backend.health_status).encode()
    c.conn.send_headers(sid, [(b":status", status)], end_stream=True)


async def _status(c: _Connection, sid: int, stream: _Stream, path: str) -> None:
    await c.read_body(sid, stream)
    c.conn.send_headers(sid, [(b":status", path.rsplit("/", 1)[1].encode())], end_stream=True)


class H2Backend:
    """Serves on 127.0.0.1:<port> from its own thread until :meth:`close`."""

    def __init__(
        self,
        tls: tuple[str, str] | None = None,
        proxy_protocol: bool = False,
        max_streams: int = 100,
        name: str = "",
        max_header_list_size: int | None = None,
    ) -> None:
        self.name = name
        self.health_status = 200
        self.health_checks = 0
        self.proxy_protocol = proxy_protocol
        self.max_streams = max_streams
        self.max_header_list_size = max_header_list_size
        """Advertised as SETTINGS_MAX_HEADER_LIST_SIZE when set."""
        self.connections = 0
        self.requests = 0
        self.resets = 0
        self.seen: list[list[tuple[bytes, bytes]]] = []
        """Every request's header list, in arrival order."""
        self.trailers_seen: list[list[tuple[bytes, bytes]]] = []
        self._sse_gate = threading.Semaphore(0)
        self._ssl: ssl.SSLContext | None = None
        if tls is not None:
            self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._ssl.load_cert_chain(*tls)
            self._ssl.set_alpn_protocols(["h2"])
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._server: asyncio.Server | None = None
        self.port = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("h2 backend did not start")

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def handler_for(self, path: str) -> Handler:
        routes: dict[str, Handler] = {
            "headers": _headers,
            "bytes": _bytes,
            "sink": _sink,
            "echo": _echo,
            "trailers": _trailers,
            "sse": _sse,
            "status": _status,
            "healthz": _healthz,
        }
        return routes.get(path.split("/")[1].split("?", maxsplit=1)[0], _headers)

    def release_event(self) -> None:
        self._sse_gate.release()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._started.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        # TLS is started by hand after the optional PROXY header.
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        header = None
        try:
            if self.proxy_protocol:
                # One byte at a time: what follows the header stays in the reader for h2.
                decoder = ProxyHeaderDecoder()
                while (parsed := decoder.feed(await reader.readexactly(1))) is None:
                    pass
                header = f"{parsed.source[0]}:{parsed.source[1]}" if parsed.source else "local"
            if self._ssl is not None:
                await writer.start_tls(self._ssl)
            await _Connection(self, reader, writer, number, header).run()
        except Exception:  # a test peer going away ends its connection alone
            pass
        finally:
            writer.close()
