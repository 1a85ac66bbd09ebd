"""L7 backend choice and failover (worker/l7/backends.py) with a fake exchange and pools."""

from __future__ import annotations

from typing import Any, cast

from mcproxy.health import route_targets
from mcproxy.model import Address, Balance, Route
from mcproxy.worker.balance import Balancer, LocalCounts
from mcproxy.worker.l7.backends import Choices
from mcproxy.worker.l7.bridge import Exchange

A, B, C = (Address("127.0.0.1", port) for port in (9001, 9002, 9003))


class FakeExchange:
    def __init__(self) -> None:
        self.failover: Any = None
        self.status = 0
        self.detail = ""


class Pool:
    def __init__(self, backend: Address, log: list[tuple[Address, object]]) -> None:
        self.backend = backend
        self.log = log

    def submit(self, exchange: Exchange) -> None:
        self.log.append((self.backend, exchange))


def setup(balance: Balance = Balance.ROUND_ROBIN) -> tuple[Choices, Balancer, list[Any], Route]:
    counts = LocalCounts()
    balancer = Balancer(lambda: 0.0, route_targets, counts)  # type: ignore[arg-type]
    submitted: list[tuple[Address, object]] = []
    choices = Choices(balancer, "l", "192.0.2.1", lambda route, b: Pool(b, submitted))
    return choices, balancer, submitted, Route("web.test", (A, B, C), balance=balance)


def test_a_failed_dial_moves_the_request_to_the_next_backend_and_ejects_the_first() -> None:
    choices, balancer, submitted, route = setup()
    exchange = cast(Exchange, FakeExchange())
    first = choices.choose(route)
    assert first == A
    choices.routed(exchange, route, first)
    assert exchange.failover is not None
    assert exchange.failover(exchange, 502, "refused")
    assert submitted == [(B, exchange)]
    assert balancer.passive.ejected(A)  # no check: one failure is enough
    assert exchange.failover(exchange, 504, "timeout")
    assert submitted[-1] == (C, exchange)
    assert not exchange.failover(exchange, 502, "refused")  # all tried: answer locally
    cast(Any, exchange).status, cast(Any, exchange).detail = 502, "refused"
    assert choices.finished(exchange) == (C, (A, B))


def test_a_full_queue_fails_over_without_ejecting() -> None:
    choices, balancer, _, route = setup()
    exchange = cast(Exchange, FakeExchange())
    choices.routed(exchange, route, A)
    assert exchange.failover is not None and exchange.failover(exchange, 503, "queue full")
    assert not balancer.passive.ejected(A)


def test_least_conn_counts_a_request_until_it_ends_and_moves_the_count_on_failover() -> None:
    choices, balancer, _, route = setup(Balance.LEAST_CONN)
    one, two = cast(Exchange, FakeExchange()), cast(Exchange, FakeExchange())
    choices.routed(one, route, A)
    assert balancer.counts.active(A) == 1
    assert choices.choose(route) != A  # the busy one is avoided
    choices.routed(two, route, B)
    assert two.failover is not None and two.failover(two, 502, "refused")
    assert (balancer.counts.active(B), balancer.counts.active(C)) == (0, 1)
    cast(Any, one).status = 200
    assert choices.finished(one) == (A, ())
    assert balancer.counts.active(A) == 0
