"""The sans-I/O core of the L7 proxy: exchanges, and the flow-control accounting between legs.

A *leg* is one connection seen as a protocol state machine: the client's
(``H2Front`` over an ``h2`` server connection, or ``H11Front`` over
``h11``) or a backend's (``H2Back``, an ``h2`` client connection). An
:class:`Exchange` is one request and its response; it joins a stream on a
client leg to a stream on a backend leg through two :class:`Flow` s, one per
direction. A flow holds what its source sent that its destination has not yet
taken, and owns the accounting rule that bounds memory end to end:

    bytes received from ``src`` are acknowledged to ``src`` (for HTTP/2:
    ``acknowledge_received_data``, which reopens the peer's window) only once
    ``dst`` has taken them, and ``dst`` takes at most its ``capacity()``: the
    peer's flow-control window, one frame, and nothing while the transport
    under it is paused.

So a flow never buffers more than the window its source was given, a slow
reader stalls its writer, and bytes dropped (a stream reset on either side)
are acknowledged anyway so the shared connection window is not leaked.
Padding is never forwarded, so legs acknowledge it as it arrives.

Endpoints (:class:`Endpoint`) are the per-stream handles a leg gives out. The
legs talk to their I/O only through :class:`LegIO`; nothing here touches a
socket or the event loop, so tests drive it with bytes.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from typing import Protocol

from h2.errors import ErrorCodes

from mcproxy.model import PolicyKind
from mcproxy.worker.l7.headers import Headers, status_of

__all__ = ["Endpoint", "Exchange", "ExchangeQueue", "Flow", "LegIO", "local_response"]

MAX_REQUEUES = 3
"""Retries of a request a backend refused unprocessed (GOAWAY, REFUSED_STREAM)."""


class LegIO(Protocol):
    """What a leg asks of the glue that owns its transport."""

    def wake(self) -> None:
        """The leg has bytes to send: call ``data_to_send()`` soon."""

    def schedule(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` soon, from the event loop (never re-entrantly)."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self) -> None:
        """Close the connection once what is queued has been sent."""

    def abort(self) -> None:
        """Reset the connection now."""


class Endpoint(Protocol):
    """One stream of one leg, as an exchange sees it."""

    def capacity(self) -> int:
        """How many body bytes :meth:`send_data` may take now (0: wait for ``Flow.pump``)."""

    def send_head(self, headers: Headers, end: bool) -> None: ...

    def send_informational(self, headers: Headers) -> None: ...

    def send_data(self, data: bytes, end: bool) -> None: ...

    def send_trailers(self, trailers: Headers) -> None: ...

    def end(self) -> None: ...

    def ack(self, size: int) -> None:
        """``size`` bytes received from this endpoint were taken by the other leg."""

    def reset(self, code: int) -> None:
        """Abort this stream (for HTTP/1.1: the connection)."""

    def close_after_response(self) -> None:
        """Close the connection once the response in progress is out (HTTP/1.1; HTTP/2: no-op)."""

    def stop_request(self) -> None:
        """The response is complete and the rest of the request body is not wanted.

        HTTP/2 resets the stream with NO_ERROR and calls ``Exchange.request_stopped``;
        HTTP/1.1 reads and discards the rest (bounded) or closes the connection.
        """

    def release(self) -> None:
        """The exchange is over: forget the stream."""

    @property
    def resettable(self) -> bool:
        """Whether :meth:`reset` ends this stream alone (HTTP/2) or the whole connection."""


class _Local:
    """The source of a response mc-proxy makes itself: nothing to acknowledge."""

    def ack(self, size: int) -> None:
        return None


_LOCAL = _Local()


class _Source(Protocol):
    def ack(self, size: int) -> None: ...


class Flow:
    """One direction of an exchange: head, body chunks and end, from ``src`` to ``dst``."""

    __slots__ = (
        "_again",
        "_pumping",
        "buffered",
        "chunks",
        "discarding",
        "done",
        "dst",
        "ended",
        "exchange",
        "forwarded",
        "head",
        "head_sent",
        "moved",
        "src",
        "trailers",
    )

    def __init__(self, exchange: Exchange, src: _Source, dst: Endpoint | None) -> None:
        self.exchange: Exchange | None = exchange
        """None once the exchange finished (so that it is freed by reference counting)."""
        self.moved = 0
        """Progress made (heads, chunks, ends): what the deadline sweep watches."""
        self.src = src
        self.dst = dst
        self.head: Headers | None = None
        self.head_sent = False
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        """Body bytes received and not yet taken by ``dst`` (nor acknowledged to ``src``)."""
        self.forwarded = 0
        self.ended = False
        self.trailers: Headers | None = None
        self.done = False
        """The end (or trailers) went to ``dst``, or the flow was dropped."""
        self.discarding = False
        """Dropped: whatever still arrives is acknowledged at once and thrown away."""
        self._pumping = False
        self._again = False

    # --- from the source leg ----------------------------------------------------

    def receive_head(self, headers: Headers, ended: bool) -> None:
        self.head = headers
        self.moved += 1
        if ended:
            self.ended = True
        self.pump()

    def receive_informational(self, headers: Headers) -> None:
        if self.dst is not None and not self.head_sent and not self.discarding:
            self.dst.send_informational(headers)

    def receive_data(self, data: bytes) -> None:
        if self.discarding or self.ended:
            self.src.ack(len(data))
            return
        if data:
            self.moved += 1
            self.chunks.append(data)
            self.buffered += len(data)
            self.pump()

    def receive_end(self, trailers: Headers | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        self.moved += 1
        if trailers:
            self.trailers = trailers
        if self.discarding:
            self._finish()
        else:
            self.pump()

    # --- towards the destination leg -----------------------------------------------

    def pump(self) -> None:
        """Move what ``dst`` can take now; called again on window updates and resumes."""
        if self._pumping:  # re-entered through an acknowledgement: loop once more instead
            self._again = True
            return
        self._pumping = True
        try:
            self._again = True
            while self._again and not self.done:
                self._again = False
                self._pump_once()
        finally:
            self._pumping = False

    def _pump_once(self) -> None:
        dst = self.dst
        if dst is None or self.discarding:
            return
        if not self.head_sent:
            if self.head is None:
                return
            end = self.ended and not self.chunks and self.trailers is None
            self.head_sent = True
            self.moved += 1
            dst.send_head(self.head, end)
            if self.discarding or self.done:  # the send failed and dropped this flow
                return
            if end:
                self._finish()
                return
        while self.chunks:
            room = dst.capacity()
            if room <= 0:
                return
            chunk = self.chunks[0]
            if len(chunk) <= room:
                piece = self.chunks.popleft()
            else:
                piece, self.chunks[0] = chunk[:room], chunk[room:]
            self.buffered -= len(piece)
            self.forwarded += len(piece)
            self.moved += 1
            end = not self.chunks and self.ended and self.trailers is None
            dst.send_data(piece, end)
            self.src.ack(len(piece))
            if end:
                self._finish()
                return
            if self.discarding or self.done:  # the send failed and dropped this flow
                return
        if self.ended:
            if self.trailers is not None:
                dst.send_trailers(self.trailers)
            else:
                dst.end()
            self._finish()

    def drop(self) -> None:
        """Stop forwarding: acknowledge what is buffered (the window is shared) and discard."""
        if self.discarding:
            return
        self.discarding = True
        buffered, self.buffered = self.buffered, 0
        self.chunks.clear()
        if buffered:
            self.src.ack(buffered)
        if self.ended:
            self._finish()

    def _finish(self) -> None:
        if not self.done:
            self.done = True
            if self.exchange is not None:
                self.exchange.flow_done(self)


class ExchangeQueue(Protocol):
    """Where an exchange waits for a backend stream (``pool.BackendPool``; named here
    so that the pool depends on the bridge and not the other way round)."""

    def submit(self, exchange: Exchange) -> None: ...

    def withdraw(self, exchange: Exchange) -> None: ...


class Exchange:
    """One request and its response, between a client stream and (maybe) a backend stream.

    ``request`` goes from the client endpoint to the backend endpoint, which
    is ``None`` until a backend stream is opened for it (it may wait in a
    :class:`~mcproxy.worker.l7.pool.BackendPool` queue); ``response`` goes
    the other way. ``on_finished`` is called once, when both are done or
    the exchange was reset.

    ``moved`` counts progress (a head, a chunk received or forwarded, an end,
    either way); the router's deadline sweep calls :meth:`timed_out` when it
    has not changed for ``idle_timeout``.
    """

    def __init__(
        self,
        client: Endpoint,
        method: str,
        route: str,
        on_finished: Callable[[Exchange], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.method = method
        self.route = route
        self.request = Flow(self, client, None)
        self.response = Flow(self, _LOCAL, client)
        self.backend: Endpoint | None = None
        """The backend stream, while it is usable."""
        self.attached: Endpoint | None = None
        """The backend stream to release when the exchange ends."""
        self.group: ExchangeQueue | None = None
        """The pool whose queue holds this exchange, while it waits for a stream."""
        self.home: ExchangeQueue | None = None
        """The pool this exchange goes to (the router chose it; kept for a retry)."""
        self.owner: object = client
        """The client connection, for the pool's fair share (the router sets it)."""
        self.seen = 0
        self.stale = 0
        """Deadline sweeps in a row that saw no progress."""
        self.status = 0
        self.blocked_by: PolicyKind | None = None
        self.requeues = 0
        self.finished = False
        self.reset_code: int | None = None
        self.detail = ""
        """Why mc-proxy answered or reset this exchange itself (for the access log)."""
        self.on_dial: Callable[[float], None] | None = None
        """Told how long a backend dial took, when this exchange waited for one."""
        self.failover: Callable[[Exchange, int, str], bool] | None = None
        """Asked first when no backend stream could be had and no byte of the request was
        sent: True when it moved the exchange to another backend (ARCHITECTURE.md,
        "Backends and health")."""
        self.started = clock()
        self._clock = clock
        self.duration = 0.0
        self._on_finished = on_finished

    @property
    def moved(self) -> int:
        """Progress of both flows: an exchange whose count stands still is stalled."""
        return self.request.moved + self.response.moved

    # --- backend stream -----------------------------------------------------------

    def submit(self) -> None:
        """Queue for a backend stream (the router chose the group in ``home``)."""
        if not self.finished and self.home is not None and self.backend is None:
            self.home.submit(self)

    def attach(self, backend: Endpoint) -> None:
        """A backend stream is open for us: send the request head and whatever body waits."""
        self.attached = backend
        self.backend = backend
        self.request.dst = backend
        self.response.src = backend
        self.request.pump()

    def requeue_or_fail(self, detail: str) -> None:
        """The backend refused the stream unprocessed: retry if no body byte was sent."""
        self.backend = None
        self.attached = None
        self.request.dst = None
        self.response.src = _LOCAL
        if self.request.forwarded or self.requeues >= MAX_REQUEUES or self.home is None:
            self.backend_failed(502, detail)
            return
        self.requeues += 1
        self.request.head_sent = False
        self.request.done = False  # nothing reached the backend: start over
        self.home.submit(self)

    # --- events from the legs -------------------------------------------------------

    def client_reset(self, code: int) -> None:
        """The client stream was reset (or the client connection is gone)."""
        if self.finished:
            return
        self.reset_code = code
        self.request.drop()
        self.response.drop()
        if self.group is not None:
            self.group.withdraw(self)
        if self.backend is not None:
            self.backend.reset(code)
        self._finish()

    def backend_reset(self, code: int) -> None:
        """The backend reset its stream."""
        if self.finished:
            return
        self.backend = None
        if code == ErrorCodes.REFUSED_STREAM and not self.response.head_sent:
            self.requeue_or_fail("backend refused the stream")
            return
        self.request.drop()
        if code == ErrorCodes.NO_ERROR and self.response.ended:
            # "Stop sending the request": the response is whole, let it finish.
            self._maybe_stop_request()
            return
        if not self.response.head_sent and not self.client.resettable:
            self.backend_failed(502, "backend reset the stream")
            return
        self.response.drop()
        self._reset_client(code)

    def timed_out(self) -> None:
        """No progress for ``idle_timeout``: reset both legs (HTTP/1.1, nothing sent: 408)."""
        if self.finished:
            return
        detail = "no progress within idle_timeout"
        if self.group is not None:
            self.group.withdraw(self)
        backend, self.backend = self.backend, None
        if backend is not None:
            backend.reset(ErrorCodes.CANCEL)
        if not self.client.resettable and not self.response.head_sent:
            if self.response.buffered:  # from the backend stream just reset: free its window
                self.response.src.ack(self.response.buffered)
            self.client.close_after_response()
            self.respond_locally(408, detail)
            return
        self.detail = detail
        self.request.drop()
        self.response.drop()
        self._reset_client(ErrorCodes.CANCEL)

    def backend_failed(self, status: int, detail: str) -> None:
        """No backend stream, or its connection broke: a local error or a reset to the client."""
        if self.finished:
            return
        if (
            self.failover is not None
            and not self.request.head_sent
            and not self.request.forwarded
            and self.failover(self, status, detail)
        ):
            return
        self.backend = None
        self.request.drop()
        if self.response.head_sent:
            self.response.drop()
            self._reset_client(ErrorCodes.INTERNAL_ERROR)
        else:
            self.response.chunks.clear()
            self.response.buffered = 0
            self.respond_locally(status, detail)

    def respond_locally(
        self, status: int, detail: str, blocked_by: PolicyKind | None = None
    ) -> None:
        """Answer the client ourselves (403, 421, 502, 504...) with a one-line body.

        The body names the status only; ``detail`` (which may name the backend) is
        for the access log.
        """
        self.blocked_by = blocked_by
        self.detail = detail
        self.request.drop()
        if self.group is not None:
            self.group.withdraw(self)
        response = self.response
        response.src = _LOCAL
        response.discarding = False
        response.head, body = local_response(status)
        response.chunks = deque([body])
        response.buffered = len(body)
        response.ended = True
        response.trailers = None
        self.status = status
        response.pump()

    def _reset_client(self, code: int) -> None:
        self.reset_code = code
        self.client.reset(code)
        self._finish()

    def flow_done(self, flow: Flow) -> None:
        if self.request.done and self.response.done:
            self._finish()
        else:
            self._maybe_stop_request()

    def _maybe_stop_request(self) -> None:
        """Once the response is out, a request body nobody reads is stopped."""
        if self.response.done and not self.request.done and self.request.discarding:
            self.client.stop_request()

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        self.duration = self._clock() - self.started
        if self.response.head_sent and self.status == 0 and self.response.head is not None:
            self.status = status_of(self.response.head)
        if self.group is not None:
            self.group.withdraw(self)
        self.client.release()
        if self.attached is not None:
            attached, self.attached = self.attached, None
            attached.release()
        self._on_finished(self)
        # Nothing comes back to a finished exchange: cutting the flows' way back breaks the
        # exchange <-> flow cycle, so that reference counting frees both at once and the
        # garbage collector never runs for requests (ARCHITECTURE.md, "L7 routes: speed").
        self.request.exchange = None
        self.response.exchange = None

    def request_stopped(self) -> None:
        """The client endpoint will not deliver more of the request (after ``stop_request``)."""
        self.request.drop()
        self.request.ended = True
        self.request._finish()


def local_response(status: int) -> tuple[Headers, bytes]:
    """A minimal text response: ``502 Bad Gateway``."""
    body = f"{status} {HTTPStatus(status).phrase}\n".encode()
    headers: Headers = [
        (b":status", str(status).encode()),
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    return headers, body
