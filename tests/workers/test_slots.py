"""Compute slots: bounded concurrency, and batches waiting behind a busy model merge."""
from __future__ import annotations

import asyncio

import pytest

from workers.slots import ComputeSlots


def _slots(slots=1, max_cost=100, fail_on=None):
    calls: list[list[int]] = []
    release = asyncio.Event()

    async def compute(items):
        calls.append(list(items))
        if len(calls) == 1:
            await release.wait()  # hold the first batch so the others queue
        if fail_on is not None and fail_on in items:
            raise RuntimeError("boom")
        return [i * 10 for i in items]

    return ComputeSlots(slots, max_cost, cost=lambda i: i, compute=compute), calls, release


def test_waiting_batches_merge_and_results_split_back():
    async def scenario():
        slots, calls, release = _slots()
        first = asyncio.ensure_future(slots.run([1]))
        await asyncio.sleep(0)
        waiters = [asyncio.ensure_future(slots.run([i, i + 1])) for i in (2, 4, 6)]
        await asyncio.sleep(0)
        release.set()
        return await first, await asyncio.gather(*waiters), calls

    first, rest, calls = asyncio.run(scenario())
    assert first == [10]
    assert rest == [[20, 30], [40, 50], [60, 70]]
    assert calls == [[1], [2, 3, 4, 5, 6, 7]]  # the three waiting batches ran as one


def test_merging_respects_the_cost_budget_and_slot_count():
    async def scenario():
        slots, calls, release = _slots(slots=1, max_cost=10)
        first = asyncio.ensure_future(slots.run([1]))
        await asyncio.sleep(0)
        waiters = [asyncio.ensure_future(slots.run([c])) for c in (6, 3, 4)]
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(first, *waiters)
        return calls

    assert asyncio.run(scenario()) == [[1], [6, 3], [4]]


def test_failure_reaches_every_merged_waiter_and_slots_recover():
    async def scenario():
        slots, calls, release = _slots(fail_on=3)
        first = asyncio.ensure_future(slots.run([1]))
        await asyncio.sleep(0)
        a, b = asyncio.ensure_future(slots.run([2])), asyncio.ensure_future(slots.run([3]))
        await asyncio.sleep(0)
        release.set()
        await first
        results = await asyncio.gather(a, b, return_exceptions=True)
        after = await slots.run([5])
        return results, after

    results, after = asyncio.run(scenario())
    assert all(isinstance(r, RuntimeError) for r in results)
    assert after == [50]


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_at_most_slots_batches_run_at_once(slots):
    async def scenario():
        running, peak = 0, 0

        async def compute(items):
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.01)
            running -= 1
            return items

        gate = ComputeSlots(slots, 1, cost=lambda i: 1, compute=compute)
        await asyncio.gather(*(gate.run([i]) for i in range(12)))
        gate.resize(1, 1)
        return peak

    assert asyncio.run(scenario()) == slots
