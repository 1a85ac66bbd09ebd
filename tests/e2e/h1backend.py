"""An HTTP/1.1 + WebSocket backend for the L7 tests: aiohttp, cleartext or TLS, in a thread.

A real, widely used HTTP/1.1 server (not our code) on its own event loop.

Paths:
``/headers``        JSON: the request's headers, the peer's address (so keep-alive
                    reuse shows as one peer port), the client certificate's subject
                    (TLS with ``client_ca``), and the request count of this connection.
``/bytes/N``        N bytes of ``harness.pattern(N)``, streamed (no content-length).
``/sink``           (POST) reads the body; JSON with its length and sha256.
``/echo``           (POST) echoes the body back as it arrives.
``/sse/N``          N server-sent events; event k+1 is sent only after the test
                    called :meth:`H1Backend.release_event` k+1 times.
``/status/N``       an empty response with status N.
``/ws``             WebSocket: text and binary messages echoed; the text
                    ``close:CODE`` makes the server close with CODE.
``/page``           an HTML page whose script fetches ``/headers``, talks over a
                    WebSocket to ``/ws`` and reads 3 events of ``/sse/3`` (call
                    :meth:`H1Backend.release_event` 3 times), then shows what it got
                    as JSON in ``#out`` and sets the title to ``done`` (a browser test).
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import threading
from typing import Any

from aiohttp import WSMsgType, web

from tests.e2e.harness import pattern

__all__ = ["H1Backend"]


class H1Backend:
    def __init__(
        self,
        tls: tuple[str, str] | None = None,
        client_ca: str | None = None,
    ) -> None:
        self.peers: list[tuple[str, int]] = []
        """The peer address of every request, in order."""
        self.ws_closed: list[int | None] = []
        """The close codes of the WebSockets that ended."""
        self.written = 0
        """Bytes of ``/bytes/N`` bodies handed to the transport so far (back-pressure tests)."""
        self._tls = tls
        self._client_ca = client_ca
        self._loop = asyncio.new_event_loop()
        self._events: asyncio.Semaphore | None = None
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0
        self._thread = threading.Thread(target=self._run, name="h1backend", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the aiohttp backend did not start")

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def release_event(self) -> None:
        def release() -> None:
            assert self._events is not None
            self._events.release()

        self._loop.call_soon_threadsafe(release)

    def close(self) -> None:
        async def stop() -> None:
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    # --- the server --------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        self._events = asyncio.Semaphore(0)
        app = web.Application(client_max_size=1 << 34)
        app.router.add_get("/headers", self._headers)
        app.router.add_get("/bytes/{n}", self._bytes)
        app.router.add_post("/sink", self._sink)
        app.router.add_post("/echo", self._echo)
        app.router.add_get("/sse/{n}", self._sse)
        app.router.add_route("*", "/status/{n}", self._status)
        app.router.add_get("/ws", self._ws)
        app.router.add_get("/page", self._page)
        context = None
        if self._tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self._tls)
            context.set_alpn_protocols(["http/1.1"])
            if self._client_ca is not None:
                context.load_verify_locations(cafile=self._client_ca)
                context.verify_mode = ssl.CERT_REQUIRED
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    def _note(self, request: web.Request) -> tuple[str, int]:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        address = (str(peer[0]), int(peer[1])) if peer else ("", 0)
        self.peers.append(address)
        return address

    async def _headers(self, request: web.Request) -> web.Response:
        peer = self._note(request)
        subject = None
        if request.transport is not None:
            ssl_object = request.transport.get_extra_info("ssl_object")
            if ssl_object is not None:
                cert: Any = ssl_object.getpeercert()
                if cert:
                    subject = dict(x[0] for x in cert["subject"])
        body = {
            "method": request.method,
            "version": f"{request.version.major}.{request.version.minor}",
            "headers": list(request.headers.items()),
            "peer": list(peer),
            "client_subject": subject,
        }
        return web.json_response(body)

    async def _bytes(self, request: web.Request) -> web.StreamResponse:
        self._note(request)
        size = int(request.match_info["n"])
        data = pattern(size)
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        view = memoryview(data)
        for start in range(0, size, 256 * 1024):
            piece = bytes(view[start : start + 256 * 1024])
            await response.write(piece)  # waits while the transport is paused: back-pressure
            self.written += len(piece)
        await response.write_eof()
        return response

    async def _sink(self, request: web.Request) -> web.Response:
        self._note(request)
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_chunked(256 * 1024):
            digest.update(chunk)
            size += len(chunk)
        return web.json_response({"size": size, "sha256": digest.hexdigest()})

    async def _echo(self, request: web.Request) -> web.StreamResponse:
        self._note(request)
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        async for chunk in request.content.iter_chunked(64 * 1024):
            await response.write(chunk)
        await response.write_eof()
        return response

    async def _sse(self, request: web.Request) -> web.StreamResponse:
        self._note(request)
        assert self._events is not None
        count = int(request.match_info["n"])
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for k in range(count):
            await self._events.acquire()
            await response.write(f"data: event {k}\n\n".encode())
        await response.write_eof()
        return response

    async def _status(self, request: web.Request) -> web.Response:
        self._note(request)
        return web.Response(status=int(request.match_info["n"]))

    async def _page(self, request: web.Request) -> web.Response:
        self._note(request)
        return web.Response(text=PAGE, content_type="text/html")

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        self._note(request)
        ws = web.WebSocketResponse(max_msg_size=1 << 24)
        await ws.prepare(request)
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                text = message.data
                if text.startswith("close:"):
                    await ws.close(code=int(text.split(":", 1)[1]), message=b"bye")
                    break
                await ws.send_str(text)
            elif message.type is WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        self.ws_closed.append(ws.close_code)
        return ws


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>loading</title></head>
<body><pre id="out"></pre>
<script>
const out = {};
async function run() {
  try {
    const reply = await fetch("/headers");
    const seen = await reply.json();
    out.fetch = reply.status;
    out.backend_version = seen.version;
    await new Promise((resolve) => {
      const ws = new WebSocket("wss://" + location.host + "/ws");
      ws.onopen = () => ws.send("ping from the browser");
      ws.onmessage = (event) => { out.ws = event.data; ws.close(1000, "done"); };
      ws.onerror = () => { out.ws_error = true; };
      ws.onclose = (event) => { out.ws_close = event.code; resolve(); };
    });
    await new Promise((resolve) => {
      const events = new EventSource("/sse/3");
      out.sse = [];
      events.onmessage = (event) => {
        out.sse.push(event.data);
        if (out.sse.length === 3) { events.close(); resolve(); }
      };
      events.onerror = () => { out.sse_error = true; events.close(); resolve(); };
    });
  } catch (error) {
    out.error = String(error);
  }
  document.getElementById("out").textContent = JSON.stringify(out);
  document.title = "done";
}
run();
</script>
</body></html>
"""
