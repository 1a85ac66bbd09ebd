"""The supervisor's health-check runner: an asyncio loop in a thread of its own.

Why a thread with its own loop: the supervisor's loop is a ``selectors`` loop
that must never wait on a backend, and a thousand probes a second are
simplest as coroutines. The thread shares nothing with the supervisor's loop
but two thread-safe doors: :meth:`HealthRunner.set_targets` (the loop hands
in the targets of its current state) and the ``on_verdict`` callback (called
in this thread; the supervisor queues the verdict and wakes its loop). grpcio
threads already live in this process, and workers are started by fork+exec
(invariant 5), so one more thread is safe.

What a probe is (:func:`probe`): ``tcp``, a connect within ``timeout``;
``http``, a GET of ``path`` over the target's protocol (HTTP/2 with prior
knowledge in cleartext, ALPN h2 over TLS; or HTTP/1.1) and TLS settings,
healthy on a 2xx or 3xx status within ``timeout``. Which checks run when, and
what the results mean, is :class:`mcproxy.health.Monitor`'s business.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping

import h2.config
import h2.connection
import h2.events

from mcproxy.health import CheckTarget, Monitor, RouteKey, Verdict, state_targets
from mcproxy.model import ProxyState

__all__ = ["HealthRunner", "probe"]

log = logging.getLogger("mcproxy.health")

BACKEND_CA_ENV = "MCPROXY_BACKEND_CA"
_LINGER_RESET = struct.pack("ii", 1, 0)
_MAX_RESPONSE_HEAD = 16 * 1024
"""An HTTP/1.1 status line beyond this many bytes is a failed check, not a buffer."""


class CheckFailed(Exception):
    """A probe's result: why the backend is not healthy (the message is the reason)."""


_contexts: dict[tuple[bool, str | None, str | None, str | None, str], ssl.SSLContext] = {}


def _context(target: CheckTarget) -> ssl.SSLContext:
    """One TLS client context per distinct set of settings, built once."""
    ca = target.ca or os.environ.get(BACKEND_CA_ENV) or None
    alpn = "h2" if target.protocol == "h2" else "http/1.1"
    key = (target.verify, ca, target.client_cert, target.client_key, alpn)
    context = _contexts.get(key)
    if context is None:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if ca:
            context.load_verify_locations(cafile=ca)
        if not target.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if target.client_cert and target.client_key:
            context.load_cert_chain(target.client_cert, target.client_key)
        context.set_alpn_protocols([alpn])
        _contexts[key] = context
    return context


@functools.lru_cache(maxsize=4096)
def _ip_endpoint(host: str, port: int) -> tuple[socket.AddressFamily, tuple[str, int]] | None:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return (socket.AF_INET6 if ip.version == 6 else socket.AF_INET), (host, port)


def _authority(target: CheckTarget) -> str:
    host = target.server_name or target.address.host or "localhost"
    return f"[{host}]:{target.address.port}" if ":" in host else f"{host}:{target.address.port}"


async def probe(target: CheckTarget) -> str:
    """Run one check of ``target`` (no time limit here); returns the reason it passed.

    Raises :class:`CheckFailed` (or OSError, ssl.SSLError) when it failed.
    """
    host = target.address.host or "127.0.0.1"
    port = target.address.port
    if target.kind == "tcp" and not target.tls:
        loop = asyncio.get_running_loop()
        endpoint = _ip_endpoint(host, port)
        if endpoint is None:  # a hostname (stock asyncio resolves in a thread pool)
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            endpoint = infos[0][0], (str(infos[0][4][0]), int(infos[0][4][1]))
        family, sockaddr = endpoint
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setblocking(False)
            await loop.sock_connect(sock, sockaddr)
            # Close with a RST, as HAProxy's connect checks do: no FIN exchange, and no
            # TIME_WAIT socket left here per check (60,000 of them at 1,000 checks a second).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        return "connected"
    ssl_context = _context(target) if target.tls else None
    server_hostname = None
    if ssl_context is not None:
        server_hostname = target.server_name or host
    reader, writer = await asyncio.open_connection(
        host,
        port,
        ssl=ssl_context,
        server_hostname=server_hostname,
        limit=_MAX_RESPONSE_HEAD,
    )
    try:
        if target.kind == "tcp":
            return "connected (TLS)"
        if target.protocol == "h1":
            status = await _get_h1(reader, writer, target)
        else:
            status = await _get_h2(reader, writer, target)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    if 200 <= status < 400:
        return f"HTTP {status}"
    raise CheckFailed(f"HTTP {status}")


async def _get_h1(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, t: CheckTarget
) -> int:
    writer.write(
        f"GET {t.path} HTTP/1.1\r\nHost: {_authority(t)}\r\nUser-Agent: mc-proxy-health\r\n"
        "Connection: close\r\n\r\n".encode("latin-1")
    )
    await writer.drain()
    try:
        line = await reader.readuntil(b"\r\n")
    except asyncio.IncompleteReadError as exc:
        raise CheckFailed("closed before the status line") from exc
    except asyncio.LimitOverrunError as exc:
        raise CheckFailed("status line too long") from exc
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise CheckFailed("not an HTTP/1.1 response")
    return int(parts[1])


async def _get_h2(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, t: CheckTarget
) -> int:
    if t.tls:
        ssl_object = writer.get_extra_info("ssl_object")
        alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        if alpn not in ("h2", None):
            raise CheckFailed(f"backend chose ALPN {alpn!r}, not h2")
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    conn.initiate_connection()
    conn.send_headers(
        1,
        [
            (":method", "GET"),
            (":scheme", "https" if t.tls else "http"),
            (":authority", _authority(t)),
            (":path", t.path),
            ("user-agent", "mc-proxy-health"),
        ],
        end_stream=True,
    )
    writer.write(conn.data_to_send())
    await writer.drain()
    while True:
        data = await reader.read(65536)
        if not data:
            raise CheckFailed("closed before the response")
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id == 1:
                for name, value in event.headers:
                    if name == b":status":
                        return int(value)
                raise CheckFailed("response without :status")
            if isinstance(event, h2.events.StreamReset | h2.events.ConnectionTerminated):
                raise CheckFailed(f"reset: {getattr(event, 'error_code', '?')}")
        pending = conn.data_to_send()
        if pending:
            writer.write(pending)


class HealthRunner:
    """Runs :class:`~mcproxy.health.Monitor`'s checks in a thread; reports verdicts."""

    def __init__(
        self,
        on_verdict: Callable[[Verdict], None],
        prober: Callable[[CheckTarget], Awaitable[str]] | None = None,
    ) -> None:
        self._on_verdict = on_verdict
        self._probe = prober or probe
        self.monitor = Monitor(time.monotonic)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._wake: asyncio.Event | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._ready = threading.Event()
        self._stopped = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.checks_run = 0
        self.verdicts: tuple[Verdict, ...] = ()
        """Every target's state, republished after each change (read by other threads)."""
        self.users: dict[CheckTarget, tuple[RouteKey, ...]] = {}
        """The routes that use each target (for log lines), replaced whole."""
        self._listeners: object = None
        self._by_target: tuple[tuple[Verdict, ...], dict[CheckTarget, Verdict]] = ((), {})

    def by_target(self) -> Mapping[CheckTarget, Verdict]:
        """The current verdicts by target (any thread; rebuilt only after a change)."""
        verdicts = self.verdicts
        cached = self._by_target
        if cached[0] is not verdicts:
            cached = (verdicts, {v.target: v for v in verdicts})
            self._by_target = cached
        return cached[1]

    def start(self) -> HealthRunner:
        self._thread = threading.Thread(target=self._main, name="mc-proxy health", daemon=True)
        self._thread.start()
        self._ready.wait(5.0)
        return self

    def set_state(self, state: ProxyState) -> None:
        """Check the targets of ``state``'s routes (thread-safe); worked out in the runner's
        thread, so that a change to 10,000 routes costs the supervisor's loop nothing."""
        loop = self._loop
        if loop is None or self._stopped:
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._set_state, state)

    def _set_state(self, state: ProxyState) -> None:
        if state.listeners is self._listeners:
            return  # a firewall change: the routes are the same
        self._listeners = state.listeners
        users = state_targets(state)
        self.users = users
        self._set_targets(frozenset(users))

    def set_targets(self, targets: Iterable[CheckTarget]) -> None:
        """Check these targets from now on (thread-safe)."""
        wanted = frozenset(targets)
        loop = self._loop
        if loop is None or self._stopped:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(self._set_targets, wanted)

    def stop(self) -> None:
        self._stopped = True
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._wake_up)
        if self._thread is not None:
            self._thread.join(5.0)

    # --- in the runner's thread ----------------------------------------------------------

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._run())
        except Exception:
            log.exception("health-check runner failed")
        finally:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            with contextlib.suppress(Exception):
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.close()

    def _wake_up(self) -> None:
        """Re-arm the one timer for the next due check (in the runner's thread)."""
        loop = self._loop
        if loop is None or self._stopped:
            if self._wake is not None:
                self._wake.set()
            return
        due = self.monitor.next_due()
        if due is None:
            return
        at = loop.time() + max(0.0, due - time.monotonic())
        timer = self._timer
        if timer is not None and not timer.cancelled() and timer.when() <= at:
            return  # already due to wake up in time
        if timer is not None:
            timer.cancel()
        self._timer = loop.call_at(at, self._tick)

    def _tick(self) -> None:
        """Start every due check (one task each), then sleep until the next one is due."""
        self._timer = None
        loop = self._loop
        assert loop is not None
        for target in self.monitor.due():
            task = loop.create_task(self._check(target))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._wake_up()

    def _set_targets(self, targets: frozenset[CheckTarget]) -> None:
        self.monitor.set_targets(targets)
        self._publish()
        self._wake_up()

    def _publish(self) -> None:
        self.verdicts = tuple(self.monitor.verdicts())

    async def _run(self) -> None:
        self._wake = asyncio.Event()
        self._ready.set()
        self._wake_up()
        await self._wake.wait()  # set by stop()

    async def _check(self, target: CheckTarget) -> None:
        try:
            async with asyncio.timeout(target.timeout):
                reason = await self._probe(target)
            ok = True
        except TimeoutError:
            ok, reason = False, f"timeout after {target.timeout:g}s"
        except CheckFailed as exc:
            ok, reason = False, str(exc)
        except ssl.SSLError as exc:
            ok, reason = False, f"TLS: {exc.reason or exc}"
        except OSError as exc:
            ok, reason = False, exc.strerror or str(exc)
        except Exception as exc:  # a bug in a probe must not stop the others
            ok, reason = False, f"{type(exc).__name__}: {exc}"
        self.checks_run += 1
        verdict = self.monitor.report(target, ok, reason)
        if verdict is not None:
            self._publish()
            try:
                self._on_verdict(verdict)
            except Exception:
                log.exception("verdict callback failed")
        self._wake_up()  # its next check may be due before the timer
