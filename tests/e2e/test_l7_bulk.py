"""End to end: 1 GiB each way through an L7 route with the proxy's peak memory recorded,
and a reader that stops reading slows the writer instead of filling the proxy.

The figures are printed (``pytest -s``) and attached as test properties.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.certs import issue, make_ca
from tests.e2e.grpc_service import BIG_MESSAGE_OPTIONS, GrpcBackend, stub
from tests.e2e.harness import ProxyProcess, free_port

MIB = 1 << 20
GIB_IN_MESSAGES = 1024
"""1 GiB as 1024 gRPC messages of 1 MiB."""
RSS_GROWTH_LIMIT = 128 * MIB
"""What a worker may add to its resident set while 1 GiB passes: windows, not bodies."""
HOSTNAME = "bulk.test"


class Bulk:
    def __init__(self, proxy: ProxyProcess, channel: grpc.Channel, backend: GrpcBackend) -> None:
        self.proxy = proxy
        self.channel = channel
        self.backend = backend

    def memory(self) -> dict[int, tuple[int, int]]:
        """Worker pid -> (VmRSS, VmHWM) in bytes; VmHWM is the peak since the worker started."""
        figures = {}
        for pid in self.proxy.worker_pids():
            fields = dict(
                line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            )
            kib = [int(fields[name].split()[0]) for name in ("VmRSS", "VmHWM")]
            figures[pid] = (kib[0] * 1024, kib[1] * 1024)
        return figures


@pytest.fixture
def bulk(tmp_path: Path) -> Iterator[Bulk]:
    ca = make_ca()
    cert, key = issue(ca, HOSTNAME, tmp_path)
    backend = GrpcBackend()
    port = free_port()
    route = {
        "hostname": HOSTNAME,
        "backend": backend.addr,
        "mode": "l7",
        "tls_cert": str(cert),
        "tls_key": str(key),
    }
    proxy = ProxyProcess(
        tmp_path, {"listeners": [{"addr": f"127.0.0.1:{port}", "routes": [route]}]}
    )
    channel = grpc.secure_channel(
        f"127.0.0.1:{port}",
        grpc.ssl_channel_credentials(root_certificates=ca.pem),
        options=[
            ("grpc.ssl_target_name_override", HOSTNAME),
            ("grpc.default_authority", HOSTNAME),
            *BIG_MESSAGE_OPTIONS,
        ],
    )
    try:
        with proxy:
            yield Bulk(proxy, channel, backend)
    finally:
        channel.close()
        backend.close()


def test_one_gib_up_and_one_gib_down_with_bounded_memory(bulk: Bulk, record_property: Any) -> None:
    baseline = max(rss for rss, _ in bulk.memory().values())
    message = hashlib.sha256(b"upload").digest() * (MIB // 32)
    digest = hashlib.sha256()
    for _ in range(GIB_IN_MESSAGES):
        digest.update(message)

    started = time.monotonic()
    reply = stub(bulk.channel, "stream_unary", "ClientStream")(
        iter([message] * GIB_IN_MESSAGES), timeout=100
    )
    upload_seconds = time.monotonic() - started
    assert reply == f"{GIB_IN_MESSAGES},{GIB_IN_MESSAGES * MIB},{digest.hexdigest()}".encode()
    peak_after_upload = max(hwm for _, hwm in bulk.memory().values())

    started = time.monotonic()
    received = 0
    expected = (hashlib.sha256(b"stream").digest() * (MIB // 32 + 1))[:MIB]
    download = stub(bulk.channel, "unary_stream", "ServerStream")
    for reply in download(f"{GIB_IN_MESSAGES},{MIB}".encode(), timeout=100):
        assert reply == expected
        received += len(reply)
    download_seconds = time.monotonic() - started
    assert received == GIB_IN_MESSAGES * MIB
    peak = max(hwm for _, hwm in bulk.memory().values())

    figures = {
        "worker_rss_before_mib": round(baseline / MIB, 1),
        "worker_peak_rss_after_upload_mib": round(peak_after_upload / MIB, 1),
        "worker_peak_rss_after_download_mib": round(peak / MIB, 1),
        "upload_seconds": round(upload_seconds, 2),
        "download_seconds": round(download_seconds, 2),
    }
    for name, value in figures.items():
        record_property(name, value)
    print(f"\n1 GiB each way through mc-proxy: {figures}")
    assert peak - baseline < RSS_GROWTH_LIMIT


def test_a_reader_that_stops_stalls_the_backend_instead_of_filling_the_proxy(
    bulk: Bulk, record_property: Any
) -> None:
    baseline = max(rss for rss, _ in bulk.memory().values())
    replies = stub(bulk.channel, "unary_stream", "ServerStream")(
        f"{GIB_IN_MESSAGES},{MIB}".encode(), timeout=100
    )
    next(replies)
    # The backend produces until every window on the way is full, then waits: watch its
    # count until it holds still for a second.
    deadline = time.monotonic() + 30
    produced = -1
    while produced != bulk.backend.streamed:
        assert time.monotonic() < deadline, "the backend never stopped producing"
        produced = bulk.backend.streamed
        time.sleep(1.0)
    record_property("messages_produced_while_reader_stopped", produced)
    print(f"\nbackend stalled after {produced} MiB of {GIB_IN_MESSAGES} with the reader stopped")
    # What the backend got out is what every window and socket buffer on the way
    # holds (grpcio's client window grows with its BDP probe): far from the whole
    # body, and the proxy's own share of it stays within its windows.
    assert produced < GIB_IN_MESSAGES // 4
    stalled_rss = max(rss for rss, _ in bulk.memory().values())
    record_property("worker_rss_growth_while_stalled_mib", round((stalled_rss - baseline) / MIB, 1))
    assert stalled_rss - baseline < RSS_GROWTH_LIMIT
    remaining = sum(1 for _ in replies)
    assert remaining == GIB_IN_MESSAGES - 1
