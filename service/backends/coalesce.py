"""Coalescing: the requests for one model and method that reach the backend in the same
event-loop turn travel to the replicas as one call.

A Ray Serve handle call costs the front door about a millisecond of CPU however
small the request (routing, the object reference, the result's deserialization),
which on a busy front door is most of its work per request. The replica batches
the members of a coalesced call exactly as if they had come one by one (each
enters its cost batcher), so nothing changes for the kernels; the front door pays
one call for many requests.

A group is sent at the end of the loop turn it was opened in (`loop.call_soon`)
when the model has a free call slot, so at low load every call travels alone and
pays nothing. Calls in flight per model are bounded (`limit(model)`: a few per
live replica): while every slot is taken the open group keeps collecting, and it
is sent when a call returns. The replica could not have started those requests
sooner (its compute slots are busy and its queue holds the calls already sent),
so the wait costs them nothing, and under load one call carries what arrived
during a batch's compute instead of whatever shared one loop turn. A group closes
early at `max_requests` members or `max_cost` cost units, so that its first member
never waits for a second replica batch to finish behind it; closed groups wait
for a slot in the order they were formed.

Cancellation: a member cancelled (or timed out) before its group is sent is left out
of the call, so work waiting here for a slot is dropped without reaching Ray;
once sent, the call is cancelled on the replica when every member is cancelled.
A member cancelled alone inside a live group is computed (its deadline still
applies on the replica), and its result is discarded.

Models that autoscale are not coalesced: Serve's autoscaler counts ongoing
requests per replica, and a coalesced call is one request however many it carries.
"""
from __future__ import annotations

import asyncio
import collections
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
# limit(model) -> calls in flight allowed for the model now; 0 = no bound.
Limit = Callable[[str], int]
# observe(model, seconds, cost, in_flight) -> None: an answered call's latency, the cost it
# carried and the model's calls in flight when it was sent (an adaptive limit learns from it).
Observe = Callable[[str, float, int, int], None]


class _Group:
    __slots__ = ("model", "key", "specs", "futures", "cost", "response", "delivered", "queued", "sent_at",
                 "sent_in_flight")

    def __init__(self, model: str, key: tuple[str, str] | None):
        self.model = model
        self.key = key          # its entry in `_open` while it collects; None for a lone call
        self.specs: list[ExplainSpec] = []
        self.futures: list[asyncio.Future] = []
        self.cost = 0
        self.response: Response | None = None
        self.delivered = False
        self.queued = False     # waiting for a call slot
        self.sent_at = 0.0      # loop time it was dispatched
        self.sent_in_flight = 0  # the model's calls in flight then, itself included


class Coalescer:
    """Forms groups per (model, method); one `dispatch` per group, one future per member."""

    def __init__(self, dispatch: Dispatch, receive: Receive, max_requests: int = 32, max_cost: int = 256,
                 limit: Limit | None = None, observe: Observe | None = None):
        self._dispatch = dispatch
        self._receive = receive
        self._limit = limit or (lambda model: 0)
        self._observe = observe
        self.max_requests = max(1, max_requests)
        self.max_cost = max(1, max_cost)
        self._open: dict[tuple[str, str], _Group] = {}
        self._queued: dict[str, collections.deque[_Group]] = collections.defaultdict(collections.deque)
        self._in_flight: collections.Counter[str] = collections.Counter()
        self._tasks: set[asyncio.Task] = set()
        self.calls = 0      # dispatches made
        self.requests = 0   # members sent in them
        self.dropped = 0    # members that ended (cancelled, timed out) while their group waited here

    def submit(self, model: str, spec: ExplainSpec, alone: bool = False) -> asyncio.Future:
        """The member's future: the replica's outcome (a result or a typed error) or a transport error.

        `alone`: a call of its own, never shared (for models whose Serve autoscaling counts requests).
        """
        loop = asyncio.get_running_loop()
        key = (model, spec.method)
        group = None if alone else self._open.get(key)
        if group is not None and (len(group.specs) >= self.max_requests
                                  or group.cost + spec.cost > self.max_cost):
            self._close(group)
            group = None
        if group is None:
            group = _Group(model, None if alone else key)
            if not alone:
                self._open[key] = group
            loop.call_soon(self._ready, group)
        future = loop.create_future()
        group.specs.append(spec)
        group.futures.append(future)
        group.cost += spec.cost
        future.add_done_callback(functools.partial(self._member_done, group))
        return future

    def models(self) -> list[str]:
        """Models this coalescer has sent (or held) calls for."""
        return sorted(set(self._in_flight) | set(self._queued))

    def limit(self, model: str) -> int:
        """Calls in flight allowed for `model` now (0 = no bound)."""
        return self._limit(model)

    def in_flight(self, model: str) -> int:
        """Calls sent for `model` and not yet answered."""
        return self._in_flight[model]

    def waiting(self, model: str) -> int:
        """Requests for `model` held here until a call slot frees."""
        return sum(1 for g in self._queued[model] for f in g.futures if not f.done())

    def _close(self, group: _Group) -> None:
        """No more members: a group that is full, or about to be sent."""
        if group.key is not None and self._open.get(group.key) is group:
            del self._open[group.key]

    def _has_slot(self, model: str) -> bool:
        limit = self._limit(model)
        return limit <= 0 or self._in_flight[model] < limit

    def _ready(self, group: _Group) -> None:
        """End of the turn the group was opened in: send it, or queue it for a slot (still collecting)."""
        group.queued = True
        self._queued[group.model].append(group)
        self._pump(group.model)

    def _pump(self, model: str) -> None:
        """A call returned: send the groups waiting, oldest first, while slots are free."""
        queue = self._queued[model]
        while queue and self._has_slot(model):
            group = queue.popleft()
            group.queued = False
            self._close(group)
            self._send(group)

    def _send(self, group: _Group) -> None:
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
        self._in_flight[group.model] += 1
        group.cost = sum(s.cost for s in group.specs)
        group.sent_at = asyncio.get_running_loop().time()
        group.sent_in_flight = self._in_flight[group.model]
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
        finally:
            self._in_flight[group.model] -= 1
            self._pump(group.model)
        if self._observe is not None:
            self._observe(group.model, asyncio.get_running_loop().time() - group.sent_at, group.cost,
                          group.sent_in_flight)
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

    def _member_done(self, group: _Group, future: asyncio.Future) -> None:
        if not future.cancelled() or group.delivered:
            return
        if group.response is None:
            if group.queued:
                self.dropped += 1
        elif all(f.cancelled() for f in group.futures):
            group.delivered = True
            group.response.cancel()

    async def close(self) -> None:
        for queue in self._queued.values():
            while queue:
                group = queue.popleft()
                self._close(group)
                self._fail(group, Unavailable("the service is shutting down"))
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
