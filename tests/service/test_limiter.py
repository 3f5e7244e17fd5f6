"""The adaptive bound on calls in flight (service/backends/limiter.py), driven by synthetic latencies."""
from __future__ import annotations

import asyncio

from service.backends.coalesce import Coalescer
from service.backends.limiter import GradientLimit


def feed(limit: GradientLimit, calls: int, seconds_per_cost: float, cost: int = 8, in_flight: int | None = None):
    for _ in range(calls):
        limit.observe(seconds_per_cost * cost, cost, limit.limit if in_flight is None else in_flight)
    return limit.limit


def test_the_limit_grows_to_its_ceiling_while_latency_per_cost_stays_at_its_norm():
    limit = GradientLimit(initial=2, max_limit=12)
    assert feed(limit, 200, 0.002) == 12


def test_the_limit_shrinks_when_calls_start_to_queue_and_recovers_after():
    limit = GradientLimit(initial=12, max_limit=12)
    feed(limit, 200, 0.002)
    assert limit.limit == 12
    shrunk = feed(limit, 30, 0.010)          # five times slower per cost unit: queueing in the replica
    assert shrunk < 6
    assert feed(limit, 400, 0.002) == 12     # latency back to normal: the norm follows, the limit regrows


def test_the_limit_never_leaves_its_bounds():
    limit = GradientLimit(initial=3, max_limit=5)
    feed(limit, 50, 0.001)
    for seconds in (0.5, 5.0, 50.0):
        feed(limit, 50, seconds)
        assert 1 <= limit.limit <= 5
    assert feed(limit, 2000, 1e-4) == 5


def test_a_load_limited_model_does_not_raise_its_limit():
    limit = GradientLimit(initial=8, max_limit=32)
    assert feed(limit, 300, 0.002, in_flight=1) == 8   # one call at a time says nothing about more


def test_bigger_calls_that_cost_proportionally_more_are_not_read_as_queueing():
    limit = GradientLimit(initial=4, max_limit=8)
    feed(limit, 100, 0.002, cost=4)
    assert feed(limit, 100, 0.002, cost=64) == 8


def test_the_coalescer_reports_each_answered_call_to_the_limit():
    seen = []

    async def scenario():
        loop = asyncio.get_running_loop()

        def dispatch(model, specs):
            future = loop.create_future()
            loop.call_later(0.02, future.set_result, [f"ok-{s.cost}" for s in specs])
            return future

        async def receive(response):
            return await response

        coalescer = Coalescer(dispatch, receive, observe=lambda *args: seen.append(args))
        specs = [type("Spec", (), {"method": "m", "cost": c})() for c in (3, 5)]
        return await asyncio.gather(*(coalescer.submit("demo", s) for s in specs))

    assert asyncio.run(scenario()) == ["ok-3", "ok-5"]
    ((model, seconds, cost, in_flight),) = seen
    assert model == "demo" and cost == 8 and in_flight == 1 and 0.015 < seconds < 5
