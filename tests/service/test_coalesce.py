"""The coalescer on its own: which requests share a call, and what cancellation does.

The transport is an in-memory response the test resolves by hand, so each case
says exactly which calls were made and which were cancelled.
"""
from __future__ import annotations

import asyncio
import dataclasses

import pytest

from service.backends.coalesce import Coalescer
from workers.errors import Overloaded, Unavailable


@dataclasses.dataclass
class FakeSpec:
    method: str
    cost: int = 1


class Pending:
    """A sent call: resolved by the test, cancellable like a Serve response."""

    def __init__(self, model, specs):
        self.model, self.specs = model, list(specs)
        self.future = asyncio.get_running_loop().create_future()
        self.cancelled = False

    def cancel(self):
        self.cancelled = True
        if not self.future.done():
            self.future.cancel()


class Transport:
    def __init__(self):
        self.sent: list[Pending] = []

    def dispatch(self, model, specs):
        self.sent.append(Pending(model, specs))
        return self.sent[-1]

    async def receive(self, response):
        try:
            return await response.future
        except asyncio.CancelledError:
            if response.cancelled:
                raise Unavailable("cancelled") from None
            raise

    def answer(self, index, value):
        call = self.sent[index]
        call.future.set_result(value if len(call.specs) > 1 else value[0])


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


async def _turn():
    await asyncio.sleep(0)
    await asyncio.sleep(0)


def test_requests_of_one_turn_share_a_call_and_each_gets_its_own_outcome():
    async def main():
        t = Transport()
        c = Coalescer(t.dispatch, t.receive)
        futures = [c.submit("m", FakeSpec("gradcam")) for _ in range(5)]
        await _turn()
        assert len(t.sent) == 1 and len(t.sent[0].specs) == 5
        t.answer(0, [f"r{i}" for i in range(5)])
        assert await asyncio.gather(*futures) == [f"r{i}" for i in range(5)]
        assert (c.calls, c.requests) == (1, 5)
    run(main())


def test_a_lone_request_travels_alone_without_waiting():
    async def main():
        t = Transport()
        c = Coalescer(t.dispatch, t.receive)
        first = c.submit("m", FakeSpec("gradcam"))
        await _turn()
        second = c.submit("m", FakeSpec("gradcam"))
        await _turn()
        assert [len(p.specs) for p in t.sent] == [1, 1]
        t.answer(1, ["b"])
        t.answer(0, ["a"])
        assert await asyncio.gather(first, second) == ["a", "b"]
    run(main())


def test_groups_split_by_model_method_count_and_cost():
    async def main():
        t = Transport()
        c = Coalescer(t.dispatch, t.receive, max_requests=3, max_cost=100)
        for _ in range(4):
            c.submit("m", FakeSpec("gradcam"))
        c.submit("m", FakeSpec("smoothgrad", cost=60))
        c.submit("m", FakeSpec("smoothgrad", cost=60))
        c.submit("other", FakeSpec("gradcam"))
        await _turn()
        shape = sorted((p.model, p.specs[0].method, len(p.specs)) for p in t.sent)
        assert shape == [("m", "gradcam", 1), ("m", "gradcam", 3), ("m", "smoothgrad", 1),
                         ("m", "smoothgrad", 1), ("other", "gradcam", 1)]
        for i, p in enumerate(t.sent):
            t.answer(i, [None] * len(p.specs))
        await _turn()
    run(main())


def test_a_member_cancelled_before_the_call_is_sent_is_left_out():
    async def main():
        t = Transport()
        c = Coalescer(t.dispatch, t.receive)
        futures = [c.submit("m", FakeSpec("gradcam")) for _ in range(3)]
        futures[1].cancel()
        await _turn()
        assert len(t.sent[0].specs) == 2
        t.answer(0, ["a", "c"])
        assert [await futures[0], await futures[2]] == ["a", "c"]
    run(main())


def test_the_call_is_cancelled_when_every_member_is_and_not_before():
    async def main():
        t = Transport()
        c = Coalescer(t.dispatch, t.receive)
        futures = [c.submit("m", FakeSpec("gradcam")) for _ in range(3)]
        await _turn()
        futures[0].cancel()
        futures[1].cancel()
        await _turn()
        assert not t.sent[0].cancelled
        t.answer(0, ["a", "b", "c"])
        assert await futures[2] == "c"

        more = [c.submit("m", FakeSpec("gradcam")) for _ in range(2)]
        await _turn()
        for f in more:
            f.cancel()
        await _turn()
        assert t.sent[1].cancelled
    run(main())


def test_a_transport_error_reaches_every_member():
    async def main():
        t = Transport()
        c = Coalescer(t.dispatch, t.receive)
        futures = [c.submit("m", FakeSpec("gradcam")) for _ in range(3)]
        await _turn()
        t.sent[0].future.set_exception(Overloaded("queue full", retry_after_s=0.2))
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        assert [type(o) for o in outcomes] == [Overloaded] * 3
    run(main())


def test_a_dispatch_that_refuses_fails_its_members():
    async def main():
        def refuse(model, specs):
            raise Unavailable("no replica")
        c = Coalescer(refuse, None)
        futures = [c.submit("m", FakeSpec("gradcam")) for _ in range(2)]
        with pytest.raises(Unavailable):
            await futures[0]
        with pytest.raises(Unavailable):
            await futures[1]
    run(main())


def test_close_answers_waiting_members_unavailable():
    async def main():
        t = Transport()
        c = Coalescer(t.dispatch, t.receive)
        future = c.submit("m", FakeSpec("gradcam"))
        await _turn()
        await c.close()
        with pytest.raises(Unavailable, match="shutting down"):
            await future
    run(main())


def test_alone_requests_never_share_a_call():
    async def main():
        t = Transport()
        c = Coalescer(t.dispatch, t.receive)
        futures = [c.submit("scaled", FakeSpec("gradcam"), alone=True) for _ in range(3)]
        futures.append(c.submit("scaled", FakeSpec("gradcam")))
        futures.append(c.submit("scaled", FakeSpec("gradcam")))
        await _turn()
        assert sorted(len(p.specs) for p in t.sent) == [1, 1, 1, 2]
        for i, p in enumerate(t.sent):
            t.answer(i, ["x"] * len(p.specs))
        assert await asyncio.gather(*futures) == ["x"] * 5
    run(main())


# ----------------------------------------------------- calls in flight per model --

def test_while_every_call_slot_is_taken_requests_gather_and_go_together_when_one_returns():
    async def main():
        t = Transport()
        c = Coalescer(t.dispatch, t.receive, limit=lambda model: 1)
        first = c.submit("m", FakeSpec("gradcam"))
        await _turn()
        assert len(t.sent) == 1 and c.in_flight("m") == 1
        later = []
        for _ in range(3):  # arriving in separate loop turns while the one slot is taken
            later.append(c.submit("m", FakeSpec("gradcam")))
            await _turn()
        assert len(t.sent) == 1 and c.waiting("m") == 3
        t.answer(0, ["a"])
        assert await first == "a"
        await _turn()
        assert [len(p.specs) for p in t.sent] == [1, 3] and c.waiting("m") == 0
        t.answer(1, ["b", "c", "d"])
        assert await asyncio.gather(*later) == ["b", "c", "d"]
        assert (c.calls, c.requests, c.in_flight("m")) == (2, 4, 0)
    run(main())


def test_a_bound_on_one_model_leaves_another_model_alone():
    async def main():
        t = Transport()
        c = Coalescer(t.dispatch, t.receive, limit=lambda model: 1 if model == "busy" else 0)
        c.submit("busy", FakeSpec("gradcam"))
        await _turn()
        c.submit("busy", FakeSpec("gradcam"))
        await _turn()
        c.submit("free", FakeSpec("gradcam"))
        await _turn()
        c.submit("free", FakeSpec("gradcam"))
        await _turn()
        assert [p.model for p in t.sent] == ["busy", "free", "free"]
        assert c.waiting("busy") == 1
    run(main())


def test_waiting_groups_go_oldest_first_and_full_groups_close():
    async def main():
        t = Transport()
        c = Coalescer(t.dispatch, t.receive, max_requests=2, limit=lambda model: 1)
        c.submit("m", FakeSpec("gradcam"))
        await _turn()
        for _ in range(3):
            c.submit("m", FakeSpec("gradcam"))
        c.submit("m", FakeSpec("smoothgrad", cost=8))
        await _turn()
        t.answer(0, ["x"])
        await _turn()
        # one slot: the oldest waiting group (two Grad-CAM requests, full) goes first, alone
        assert [(p.specs[0].method, len(p.specs)) for p in t.sent] == [("gradcam", 1), ("gradcam", 2)]
        t.answer(1, ["x", "x"])
        await _turn()
        t.answer(2, ["x"] * len(t.sent[2].specs))
        await _turn()
        assert [(p.specs[0].method, len(p.specs)) for p in t.sent[2:]] == [("gradcam", 1), ("smoothgrad", 1)]
    run(main())


def test_a_request_that_ends_while_waiting_for_a_slot_never_reaches_the_transport():
    async def main():
        t = Transport()
        c = Coalescer(t.dispatch, t.receive, limit=lambda model: 1)
        c.submit("m", FakeSpec("gradcam"))
        await _turn()
        timed_out = c.submit("m", FakeSpec("gradcam"))
        kept = c.submit("m", FakeSpec("gradcam"))
        await _turn()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(timed_out, 0.01)  # what ServeBackend.explain does at a deadline
        assert c.dropped == 1
        t.answer(0, ["a"])
        await _turn()
        assert [len(p.specs) for p in t.sent] == [1, 1]
        t.answer(1, ["k"])
        assert await kept == "k"
    run(main())


def test_a_failed_call_frees_its_slot():
    async def main():
        t = Transport()
        c = Coalescer(t.dispatch, t.receive, limit=lambda model: 1)
        first = c.submit("m", FakeSpec("gradcam"))
        await _turn()
        second = c.submit("m", FakeSpec("gradcam"))
        await _turn()
        t.sent[0].future.set_exception(Unavailable("replica died"))
        with pytest.raises(Unavailable):
            await first
        await _turn()
        assert len(t.sent) == 2 and c.in_flight("m") == 1
        t.answer(1, ["b"])
        assert await second == "b"
    run(main())


def test_close_fails_requests_waiting_for_a_slot():
    async def main():
        t = Transport()
        c = Coalescer(t.dispatch, t.receive, limit=lambda model: 1)
        c.submit("m", FakeSpec("gradcam"))
        await _turn()
        waiting = c.submit("m", FakeSpec("gradcam"))
        await _turn()
        await c.close()
        with pytest.raises(Unavailable, match="shutting down"):
            await waiting
        assert len(t.sent) == 1
    run(main())
