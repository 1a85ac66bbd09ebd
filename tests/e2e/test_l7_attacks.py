"""End to end: clients that hold backend streams hostage, and a good client that must not notice.

The real ``mc-proxy serve`` with 2 workers and two L7 routes (``a.test`` and
``b.test``) sharing one h2c backend, ``idle_timeout`` 2 s. Each attacker runs
in a thread and keeps its attack up (a stream or connection that is reset is
replaced) while a good client makes fresh-connection requests to the other
route, over HTTP/1.1 and HTTP/2 in turn, each with its own deadline. We check
the good client's success rate while the attack runs, and that the stalled
streams were reset after ``idle_timeout`` (not before, not much later).
Loopback only; every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import pytest

from tests.certs import CA, make_ca
from tests.e2e.h2backend import H2Backend
from tests.e2e.harness import ProxyProcess, client_context, free_port, l7_route, pattern

IDLE = 2.0
ATTACK = "a.test"
GOOD = "b.test"
GOOD_SIZE = 20_000
MEASURE = 2.5 * IDLE
"""The good client runs this long while the attack is up: more than one reset-and-replace cycle."""


LIMITED = "limited.test"
"""A route whose backend advertises SETTINGS_MAX_HEADER_LIST_SIZE = BACKEND_HEADER_LIMIT."""
BACKEND_HEADER_LIMIT = 4096


@dataclass
class Stack:
    port: int
    ca: CA
    backend: H2Backend
    proxy: ProxyProcess
    limited: H2Backend


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("attacks")
    ca = make_ca()
    backend = H2Backend()
    limited = H2Backend(max_header_list_size=BACKEND_HEADER_LIMIT)
    port = free_port()
    config = {
        "listeners": [
            {
                "addr": f"127.0.0.1:{port}",
                "routes": [
                    l7_route(directory, ca, ATTACK, backend.addr),
                    l7_route(directory, ca, GOOD, backend.addr),
                    l7_route(directory, ca, LIMITED, limited.addr),
                ],
            }
        ],
        "proxy": {
            "connect_timeout": "3s",
            "handshake_timeout": "5s",
            "idle_timeout": f"{IDLE:g}s",
            "shutdown_timeout": "5s",
        },
    }
    try:
        with ProxyProcess(directory, config, workers=2) as proxy:
            yield Stack(port, ca, backend, proxy, limited)
    finally:
        backend.close()
        limited.close()


def _tls(stack: Stack, host: str, alpn: str, timeout: float = 5.0) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", stack.port), timeout=timeout)
    return client_context(stack.ca.pem, [alpn]).wrap_socket(raw, server_hostname=host)


class H2Client:
    """A blocking HTTP/2 client over TLS that acknowledges nothing unless told to."""

    def __init__(self, stack: Stack, host: str, window: int | None = None) -> None:
        self.host = host
        self.tls = _tls(stack, host, "h2")
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        if window is not None:
            self.conn.local_settings = h2.settings.Settings(
                client=True,
                initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window},
            )
        self.conn.initiate_connection()
        self.closed = False
        self.flush()

    def flush(self) -> None:
        out = self.conn.data_to_send()
        if out and not self.closed:
            try:
                self.tls.sendall(out)
            except OSError:
                self.closed = True

    def request(
        self,
        path: str,
        method: str = "GET",
        end: bool = True,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> int:
        sid = self.conn.get_next_available_stream_id()
        headers = [
            (b":method", method.encode()),
            (b":scheme", b"https"),
            (b":authority", self.host.encode()),
            (b":path", path.encode()),
            *(extra or []),
        ]
        if method == "POST":
            headers.append((b"content-length", b"1000"))
        self.conn.send_headers(sid, headers, end_stream=end)
        self.flush()
        return sid

    def events(self, timeout: float) -> list[h2.events.Event]:
        """What arrives within ``timeout`` (one read), [] on silence; ``closed`` on EOF."""
        if self.closed:
            return []
        self.tls.settimeout(timeout)
        try:
            data = self.tls.recv(65536)
        except (TimeoutError, ssl.SSLWantReadError):
            return []
        except OSError:
            data = b""
        if not data:
            self.closed = True
            return []
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.closed = True
            return []
        self.flush()
        return events

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.tls.close()


def good_h2(stack: Stack, deadline: float) -> bool:
    client = H2Client(stack, GOOD)
    try:
        sid = client.request(f"/bytes/{GOOD_SIZE}")
        status, body = b"", b""
        while time.monotonic() < deadline and not client.closed:
            for event in client.events(0.2):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == sid:
                    status = dict(event.headers)[b":status"]
                elif isinstance(event, h2.events.DataReceived) and event.stream_id == sid:
                    body += event.data
                    client.conn.acknowledge_received_data(event.flow_controlled_length, sid)
                    client.flush()
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == sid:
                    return status == b"200" and body == pattern(GOOD_SIZE)
                elif isinstance(event, h2.events.StreamReset) and event.stream_id == sid:
                    return False
        return False
    finally:
        client.close()


def good_h1(stack: Stack, deadline: float) -> bool:
    with _tls(stack, GOOD, "http/1.1") as tls:
        tls.sendall(
            f"GET /bytes/{GOOD_SIZE} HTTP/1.1\r\nHost: {GOOD}\r\nConnection: close\r\n\r\n".encode()
        )
        received = b""
        while time.monotonic() < deadline:
            tls.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = tls.recv(65536)
            if not chunk:
                break
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return head.startswith(b"HTTP/1.1 200") and body == pattern(GOOD_SIZE)


def good_client(stack: Stack, duration: float, at_least: int = 8) -> tuple[int, int]:
    """Fresh-connection requests in turn over HTTP/1.1 and HTTP/2: (succeeded, made).

    For ``duration`` and at least ``at_least`` requests (within a minute), each with a
    deadline of its own (generous: the machine may be loaded; a starved request never ends).
    """
    ok = made = 0
    start = time.monotonic()
    while made < 200:
        now = time.monotonic()
        if (now > start + duration and made >= at_least) or now > start + 60:
            break
        request = good_h2 if made % 2 else good_h1
        with contextlib.suppress(OSError):
            ok += request(stack, time.monotonic() + 10.0)
        made += 1
    return ok, made


@dataclass
class Attacker:
    """Runs ``attack`` in a thread until :meth:`stop`; collects when each stall was reset."""

    stop_event: threading.Event = field(default_factory=threading.Event)
    stall_times: list[float] = field(default_factory=list)
    """Seconds from a stalled request's last byte to its reset."""
    errors: list[BaseException] = field(default_factory=list)
    opened: int = 0
    thread: threading.Thread | None = None

    def start(self, target: Any) -> None:
        def run() -> None:
            try:
                target(self)
            except BaseException as exc:  # reported by the test
                self.errors.append(exc)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        assert self.thread is not None
        self.thread.join(30)
        assert not self.thread.is_alive()
        assert not self.errors, self.errors


def h2_stall_attack(
    stack: Stack, connections: int, streams: int, *, window: int | None, path: str, method: str
) -> Any:
    def attack(state: Attacker) -> None:
        clients = [H2Client(stack, ATTACK, window) for _ in range(connections)]
        opened: list[dict[int, float]] = [{} for _ in clients]
        for client, times in zip(clients, opened, strict=True):
            for _ in range(streams):
                times[client.request(path, method=method, end=method != "POST")] = time.monotonic()
                state.opened += 1
        while not state.stop_event.is_set():
            for k in range(len(clients)):
                client = clients[k]
                if client.closed:  # replaced: the attack goes on
                    client.close()
                    client = clients[k] = H2Client(stack, ATTACK, window)
                    opened[k] = {}
                for event in client.events(0.02):
                    if isinstance(event, h2.events.StreamReset):
                        since = opened[k].pop(event.stream_id, None)
                        if since is not None:
                            state.stall_times.append(time.monotonic() - since)
                    elif isinstance(event, h2.events.StreamEnded):
                        opened[k].pop(event.stream_id, None)
                while len(opened[k]) < streams and not client.closed:
                    try:
                        sid = client.request(path, method=method, end=method != "POST")
                    except h2.exceptions.ProtocolError:
                        client.closed = True
                        break
                    opened[k][sid] = time.monotonic()
                    state.opened += 1
        for client in clients:
            client.close()

    return attack


def h1_stall_attack(stack: Stack, connections: int) -> Any:
    def attack(state: Attacker) -> None:
        selector = selectors.DefaultSelector()
        head = f"POST /sink HTTP/1.1\r\nHost: {ATTACK}\r\nContent-Length: 1000\r\n\r\n".encode()

        def open_one() -> None:
            tls = _tls(stack, ATTACK, "http/1.1")
            tls.sendall(head)
            tls.setblocking(False)
            selector.register(tls, selectors.EVENT_READ, [time.monotonic(), b""])
            state.opened += 1

        for _ in range(connections):
            open_one()
        missing = 0
        while not state.stop_event.is_set():
            # A few replacements per round, so the timing of the others' resets stays honest.
            for _ in range(min(missing, 5)):
                open_one()
                missing -= 1
            for key, _ in selector.select(0.05):
                tls = key.fileobj
                assert isinstance(tls, ssl.SSLSocket)
                try:
                    chunk = tls.recv(65536)
                except ssl.SSLWantReadError:
                    continue
                except OSError:
                    chunk = b""
                if chunk:
                    key.data[1] += chunk
                    continue
                since, received = key.data
                selector.unregister(tls)
                tls.close()
                if received.startswith(b"HTTP/1.1 408"):
                    state.stall_times.append(time.monotonic() - since)
                else:
                    state.errors.append(AssertionError(f"stalled POST got {received[:40]!r}"))
                    return
                missing += 1
        for key in list(selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        selector.close()

    return attack


def run_attack(stack: Stack, attack: Any, expected_stalls: int) -> tuple[Attacker, int, int]:
    state = Attacker()
    state.start(attack)
    deadline = time.monotonic() + 30
    while state.opened < expected_stalls and time.monotonic() < deadline and not state.errors:
        time.sleep(0.05)
    assert state.opened >= expected_stalls, f"the attack did not get going: {state.errors}"
    ok, made = good_client(stack, MEASURE)
    # Keep the attack up until every first-round stall was reset, within a deadline.
    deadline = time.monotonic() + 4 * IDLE + 10
    while len(state.stall_times) < expected_stalls and time.monotonic() < deadline:
        time.sleep(0.1)
    state.stop()
    return state, ok, made


def check(state: Attacker, ok: int, made: int, expected_stalls: int) -> None:
    times = sorted(state.stall_times)
    print(  # for the closing note: pytest -s shows it
        f"good {ok}/{made}; stalls reset {len(times)}, after "
        f"min {times[0]:.2f} median {times[len(times) // 2]:.2f} max {times[-1]:.2f} s"
        if times
        else f"good {ok}/{made}; no stall reset"
    )
    assert made >= 8, f"the good client made only {made} requests"
    assert ok / made >= 0.95, f"good client: {ok} of {made} succeeded during the attack"
    assert len(state.stall_times) >= expected_stalls
    # Reset after idle_timeout of no progress: not before, not much after (a loaded machine).
    assert min(state.stall_times) >= IDLE * 0.9
    assert times[len(times) // 2] < IDLE * 1.25 + 5


def test_http2_posts_that_never_send_their_body(stack: Stack) -> None:
    attack = h2_stall_attack(stack, 4, 100, window=None, path="/sink", method="POST")
    state, ok, made = run_attack(stack, attack, 400)
    check(state, ok, made, 400)


def test_http2_readers_that_never_open_their_window(stack: Stack) -> None:
    attack = h2_stall_attack(stack, 4, 25, window=0, path=f"/bytes/{1 << 20}", method="GET")
    state, ok, made = run_attack(stack, attack, 100)
    check(state, ok, made, 100)


def test_http1_posts_with_a_content_length_and_no_body(stack: Stack) -> None:
    state, ok, made = run_attack(stack, h1_stall_attack(stack, 250), 250)
    check(state, ok, made, 250)


def test_a_header_list_over_the_backends_limit_is_refused_before_it_can_break_the_connection(
    stack: Stack,
) -> None:
    # A download on the limited backend runs while requests whose header list fits our own
    # limit, but not the backend's advertised one once forwarded, keep coming. Sent, they
    # could make the backend fail the shared connection; they get 431 and never leave.
    size = 4 << 20
    downloader = H2Client(stack, LIMITED)
    download = downloader.request(f"/bytes/{size}")
    body = b""
    before = stack.limited.requests
    sender = H2Client(stack, LIMITED)
    big = [(b"x-big", b"v" * (BACKEND_HEADER_LIMIT - 100))]
    refused: dict[int, bytes] = {sender.request("/headers", extra=big): b"" for _ in range(20)}
    deadline = time.monotonic() + 30
    done = False
    while time.monotonic() < deadline and not (done and all(refused.values())):
        for event in downloader.events(0.05):
            if isinstance(event, h2.events.DataReceived):
                body += event.data
                downloader.conn.acknowledge_received_data(event.flow_controlled_length, download)
                downloader.flush()
            elif isinstance(event, h2.events.StreamEnded) and event.stream_id == download:
                done = True
            elif isinstance(event, h2.events.StreamReset):
                raise AssertionError(f"the download was reset: {event}")
        for event in sender.events(0.01):
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id in refused:
                refused[event.stream_id] = dict(event.headers)[b":status"]
    downloader.close()
    sender.close()
    assert done and body == pattern(size)
    assert set(refused.values()) == {b"431"}
    assert stack.limited.requests <= before + 1  # the download at most, none of the others
    assert not [h for h in stack.limited.seen if any(n == b"x-big" for n, _ in h)]
