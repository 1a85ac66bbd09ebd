"""CPU per request inside the L7 legs alone: no sockets, no TLS, no peers' share.

``python -m bench.l7_legs [--requests 2000] [--rounds 5] [--protocol h2|http1]`` drives
requests through the sans-I/O world of the unit tests (``tests/unit/l7world.py``: an
h2 or h11 client -> ``H2Front``/``H11Front`` -> the backend pool -> ``H2Back`` -> an h2
server) and counts ``time.process_time`` only inside the legs' ``receive_data`` and
``data_to_send`` (and callbacks they scheduled), so the pure-Python peers do not dilute
a difference. On a shared machine this is far steadier than ``python -m bench``:
alternate A and B and compare the medians, as for any A/B.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from tests.unit.l7world import BackendPeer, H2ClientPeer, H11ClientPeer, World

__all__ = ["main", "run"]


class _Meter:
    def __init__(self) -> None:
        self.spent = 0.0

    def wrap(self, obj: Any, name: str) -> None:
        inner: Callable[..., Any] = getattr(obj, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.process_time()
            try:
                return inner(*args, **kwargs)
            finally:
                self.spent += time.process_time() - started

        setattr(obj, name, timed)


def _answer(world: World, meter: _Meter, wrapped: set[int]) -> None:
    for backend in world.backends:
        if id(backend) not in wrapped:
            wrapped.add(id(backend))
            _meter_leg(meter, backend)
        for request in backend.requests():
            backend.respond(request.stream_id, body=b"hello world")
        backend.events.clear()


def _meter_leg(meter: _Meter, peer: H2ClientPeer | H11ClientPeer | BackendPeer) -> None:
    meter.wrap(peer.leg, "receive_data")
    meter.wrap(peer.leg, "data_to_send")


def run(requests: int, protocol: str = "h2", batch: int = 50) -> float:
    """Microseconds of leg CPU per request (client leg, pool and backend leg together)."""
    world = World()
    meter = _Meter()
    wrapped: set[int] = set()
    h2_client = world.h2_client() if protocol == "h2" else None
    h11_client = world.h11_client() if protocol != "h2" else None
    client = h2_client or h11_client
    assert client is not None
    _meter_leg(meter, client)
    world.run()
    done = 0
    while done < requests:
        if h2_client is not None:
            for _ in range(batch):
                h2_client.request(extra=[(b"user-agent", b"bench/1.0"), (b"accept", b"*/*")])
        else:
            assert h11_client is not None
            h11_client.send(
                b"GET / HTTP/1.1\r\nhost: web.test\r\nuser-agent: bench/1.0\r\naccept: */*\r\n\r\n"
            )
            batch = 1
        world.run()
        _answer(world, meter, wrapped)
        world.run()
        if h2_client is not None:
            h2_client.ack_all()
            h2_client.events.clear()
            h2_client._acked = 0  # events were cleared
        else:
            assert h11_client is not None
            h11_client.received = b""
        world.run()
        done += batch
    return meter.spent / done * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--protocol", choices=("h2", "http1"), default="h2")
    args = parser.parse_args()
    figures = [run(args.requests, args.protocol) for _ in range(args.rounds)]
    print(
        f"{args.protocol}: median {statistics.median(figures):.1f} us of leg CPU per request "
        f"({', '.join(f'{f:.1f}' for f in figures)})"
    )


if __name__ == "__main__":
    main()
