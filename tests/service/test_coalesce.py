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
