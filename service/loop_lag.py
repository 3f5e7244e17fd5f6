"""How late the front door's event loop runs: the signal that the front door itself is saturated.

Admission (workers/admission.py) predicts the replicas' queue; it cannot see the front
door's own CPU. When that is spent, calls wait in gRPC's backlog before any handler
runs, so refusals arrive as late as admitted calls and the work admitted is more than
the process can finish. A timer that should fire every `interval_s` measures how late
it fires; while that lateness is above the target, new Explain calls are refused with a
probability that grows with it (shedding early and cheaply, before any decoding), so
the loop drains back to the target instead of the backlog growing into the deadlines.
Health checks and ListModels are never refused by it.
"""
from __future__ import annotations

import asyncio
import random
import time


class LoopLag:
    """A sampled lateness of the running event loop, in seconds (`lag`, smoothed; `last`, raw)."""

    def __init__(self, interval_s: float = 0.005, smoothing: float = 0.3):
        self.interval_s = interval_s
        self.smoothing = smoothing
        self.lag = 0.0
        self.last = 0.0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag")

    async def _run(self) -> None:
        while True:
            expected = time.perf_counter() + self.interval_s
            await asyncio.sleep(self.interval_s)
            self.last = max(0.0, time.perf_counter() - expected)
            # Smoothed both ways: one pause (a collection, a slow callback) does not refuse calls;
            # a saturated loop, late on every sample, crosses the target within a few of them.
            self.lag += self.smoothing * (self.last - self.lag)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None


class LagShedder:
    """Refuses a share of new calls while the loop runs later than `target_s`.

    The share is 0 at the target and 1 at twice the target, linear between, so the
    refusals rise as smoothly as the lag does instead of switching all calls off and on.
    """

    def __init__(self, lag: LoopLag, target_s: float, rng: random.Random | None = None):
        self.lag = lag
        self.target_s = target_s
        self._random = (rng or random.Random()).random
        self.shed = 0

    def share(self) -> float:
        excess = self.lag.lag - self.target_s
        return 0.0 if excess <= 0 else min(1.0, excess / self.target_s)

    def should_shed(self) -> bool:
        share = self.share()
        if share > 0 and (share >= 1 or self._random() < share):
            self.shed += 1
            return True
        return False
