"""An adaptive bound on the handle calls in flight to a model's replicas, from their latency.

The shape of Netflix's concurrency-limits `Gradient2` (and of Envoy's adaptive concurrency
filter): a slow average of the answered calls' latency stands for the latency without queueing,
a fast one for the latency now, and their ratio (the gradient) scales the limit down while calls
queue in the replica and lets it grow by a headroom of sqrt(limit) while they do not:

    gradient  = clamp(tolerance * long / short, 0.5, 1.0)
    new limit = limit * gradient + sqrt(limit)
    limit     = (1 - smoothing) * limit + smoothing * new limit,   within [1, max_limit]

A sample is a call's latency per cost unit, not the raw latency: a coalesced call's compute grows
with what it carries, and a smaller limit makes calls carry more, so raw latency would read the
limit's own effect as queueing and drive it down. The limit does not grow while fewer than half
of it are in use (the load, not the replica, bounds the calls then), and the slow average decays
toward the fast one when latency falls back after an overload (it would otherwise hold the
overload's latency as its norm).
"""
from __future__ import annotations

import math


class GradientLimit:
    """Calls in flight allowed per replica of one model, adapted from each answered call."""

    def __init__(self, initial: float = 4.0, max_limit: int = 16, min_limit: int = 1, tolerance: float = 1.5,
                 smoothing: float = 0.2, long_window: int = 600, short_window: int = 10):
        self.max_limit, self.min_limit = max(1, max_limit), max(1, min_limit)
        self.tolerance, self.smoothing = tolerance, smoothing
        self._long_alpha, self._short_alpha = 2.0 / (long_window + 1), 2.0 / (short_window + 1)
        self.estimate = float(min(max(initial, self.min_limit), self.max_limit))
        self.long: float | None = None    # seconds per cost unit, slow average: the norm
        self.short: float | None = None   # seconds per cost unit, fast average: now
        self.samples = 0

    @property
    def limit(self) -> int:
        return max(self.min_limit, int(self.estimate))

    def observe(self, seconds: float, cost: int, in_flight: int) -> int:
        """One answered call: its latency, the cost it carried, and the calls in flight (per replica)
        when it was sent. Answers the new limit."""
        if seconds <= 0 or cost <= 0:
            return self.limit
        sample = seconds / cost
        self.samples += 1
        if self.long is None:
            self.long = self.short = sample
            return self.limit
        self.short += self._short_alpha * (sample - self.short)
        self.long += self._long_alpha * (sample - self.long)
        if self.long > 2 * self.short:  # latency fell back after an overload: let the norm follow
            self.long = 0.95 * self.long + 0.05 * self.short
        if in_flight < self.estimate / 2 and self.short <= self.long:
            return self.limit  # load-limited: nothing says the replica could take more
        gradient = min(1.0, max(0.5, self.tolerance * self.long / self.short))
        target = self.estimate * gradient + math.sqrt(self.estimate)
        self.estimate = (1 - self.smoothing) * self.estimate + self.smoothing * target
        self.estimate = min(float(self.max_limit), max(float(self.min_limit), self.estimate))
        return self.limit
