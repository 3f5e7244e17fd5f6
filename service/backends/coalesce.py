"""Coalescing: the requests for one model and method that reach the backend in the same
event-loop turn travel to the replicas as one call.

A Ray Serve handle call costs the front door about a millisecond of CPU however
small the request (routing, the object reference, the result's deserialization),
which on a busy front door is most of its work per request. The replica batches
the members of a coalesced call exactly as if they had come one by one (each
enters its cost batcher), so nothing changes for the kernels; the front door pays
one call for many requests.

No request waits for company: a group is sent at the end of the loop turn it was
opened in (`loop.call_soon`), so at low load every call travels alone, as before,
and under load the requests that arrived together share a call. A group closes
early at `max_requests` members or `max_cost` cost units, so that its first member
never waits for a second replica batch to finish behind it.

Cancellation: a member cancelled before its group is sent is left out of the call;
once sent, the call is cancelled on the replica when every member is cancelled.
A member cancelled alone inside a live group is computed (its deadline still
applies on the replica), and its result is discarded.

Models that autoscale are not coalesced: Serve's autoscaler counts ongoing
requests per replica, and a coalesced call is one request however many it carries.
"""
from __future__ import annotations

import asyncio
import functools
from typing import Any, Awaitable, Callable, Protocol

from workers.errors import AttributionError, Unavailable
from workers.spec import ExplainSpec


class Response(Protocol):
    def cancel(self) -> None: ...


# dispatch(model, specs) -> a cancellable response; receive(response) awaits it and
# translates transport failures into `workers.errors` (ServeBackend._call).
Dispatch = Callable[[str, list[ExplainSpec]], Response]
Receive = Callable[[Response], Awaitable[Any]]


class _Group:
    __slots__ = ("model", "specs", "futures", "cost", "response", "delivered")

    def __init__(self, model: str):
        self.model = model
        self.specs: list[ExplainSpec] = []
        self.futures: list[asyncio.Future] = []
        self.cost = 0
        self.response: Response | None = None
        self.delivered = False


class Coalescer:
    """Forms groups per (model, method); one `dispatch` per group, one future per member."""

    def __init__(self, dispatch: Dispatch, receive: Receive, max_requests: int = 32, max_cost: int = 256):
        self._dispatch = dispatch
        self._receive = receive
        self.max_requests = max(1, max_requests)
        self.max_cost = max(1, max_cost)
        self._open: dict[tuple[str, str], _Group] = {}
        self._tasks: set[asyncio.Task] = set()
        self.calls = 0      # dispatches made
        self.requests = 0   # members sent in them

    def submit(self, model: str, spec: ExplainSpec, alone: bool = False) -> asyncio.Future:
        """The member's future: the replica's outcome (a result or a typed error) or a transport error.

        `alone`: a call of its own, never shared (for models whose Serve autoscaling counts requests).
        """
        loop = asyncio.get_running_loop()
        key = (model, spec.method)
        group = None if alone else self._open.get(key)
        if group is not None and (len(group.specs) >= self.max_requests
                                  or group.cost + spec.cost > self.max_cost):
            group = None
        if group is None:
            group = _Group(model)
            if not alone:
                self._open[key] = group
            loop.call_soon(self._flush, key, group)
        future = loop.create_future()
        group.specs.append(spec)
        group.futures.append(future)
        group.cost += spec.cost
        future.add_done_callback(functools.partial(self._member_done, group))
        return future

    def _flush(self, key: tuple[str, str], group: _Group) -> None:
        if self._open.get(key) is group:
            del self._open[key]
        members = [(s, f) for s, f in zip(group.specs, group.futures) if not f.done()]
        group.specs = [s for s, _ in members]
        group.futures = [f for _, f in members]
        if not members:
            return
        try:
            group.response = self._dispatch(group.model, group.specs)
        except AttributionError as exc:
            self._fail(group, exc)
            return
        self.calls += 1
        self.requests += len(members)
        task = asyncio.get_running_loop().create_task(self._deliver(group))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, group: _Group) -> None:
        try:
            outcome = await self._receive(group.response)
        except AttributionError as exc:
            self._fail(group, exc)
            return
        except asyncio.CancelledError:  # the backend is closing
            self._fail(group, Unavailable("the service is shutting down"))
            raise
        outcomes = [outcome] if len(group.futures) == 1 else outcome
        group.delivered = True
        for future, one in zip(group.futures, outcomes):
            if not future.done():
                future.set_result(one)

    @staticmethod
    def _fail(group: _Group, exc: AttributionError) -> None:
        group.delivered = True
        for future in group.futures:
            if not future.done():
                future.set_exception(exc)

    @staticmethod
    def _member_done(group: _Group, future: asyncio.Future) -> None:
        if (future.cancelled() and not group.delivered and group.response is not None
                and all(f.cancelled() for f in group.futures)):
            group.delivered = True
            group.response.cancel()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
