"""In-process job events: the runner publishes every change, WatchJob streams read them.

Everything runs on the front door's event loop, so no lock is needed. A
subscriber never holds more than a few pending events: consecutive RUNNING
events are coalesced (a slow watcher sees the newest progress, in order), while
state changes are always kept.
"""
from __future__ import annotations

import asyncio
from collections import deque
from contextlib import contextmanager
from typing import Iterator

from service.jobs.store import QUEUED, RUNNING, JobRecord


def order_key(job: JobRecord) -> tuple[int, float]:
    """Events of one job, in the order they happen: QUEUED < RUNNING (by progress) < final.

    Within one process a job's progress only grows (the runner publishes the
    running maximum), so the key is increasing along a job's life and a watcher
    can drop anything not newer than what it already sent.
    """
    rank = 0 if job.state == QUEUED else 1 if job.state == RUNNING else 2
    return rank, job.progress


class Subscription:
    """One watcher's pending events of one job."""

    def __init__(self) -> None:
        self._pending: deque[JobRecord] = deque()
        self._ready = asyncio.Event()

    def put(self, job: JobRecord) -> None:
        if self._pending and job.state == RUNNING and self._pending[-1].state == RUNNING:
            self._pending[-1] = job
        else:
            self._pending.append(job)
        self._ready.set()

    async def get(self, timeout: float | None = None) -> JobRecord | None:
        """The next event, or None after `timeout` seconds without one."""
        if not self._pending:
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except asyncio.TimeoutError:
                return None
        return self._pending.popleft()


class JobEvents:
    """Publish/subscribe of job changes by job id."""

    def __init__(self) -> None:
        self._subscribers: dict[str, set[Subscription]] = {}

    @contextmanager
    def subscribe(self, job_id: str) -> Iterator[Subscription]:
        sub = Subscription()
        self._subscribers.setdefault(job_id, set()).add(sub)
        try:
            yield sub
        finally:
            subs = self._subscribers.get(job_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subscribers[job_id]

    def publish(self, job: JobRecord) -> None:
        for sub in self._subscribers.get(job.id, ()):
            sub.put(job)

    def watchers(self, job_id: str) -> int:
        return len(self._subscribers.get(job_id, ()))
