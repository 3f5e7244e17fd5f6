"""Admission control by cost and deadline: refuse at once what cannot finish in time.

Each model has a `ModelAdmission` in the front door (service/servicer.py). It knows

- its **service rate**: cost units (samples) per second the model's workers
  complete, an exponentially weighted estimate over one-second windows in which
  work was queued the whole time (so idle time does not read as slowness),
  seeded from the first batches' own kernel rate;
- its **queued cost**: cost admitted here and not finished yet.

A request is refused with RESOURCE_EXHAUSTED (and a RetryInfo delay) when the
work ahead of it plus its own cost would take longer than its remaining
deadline (`deadline_too_short`), or would push the queued cost past
`rate x target_queue_delay_s` (`queue_full`). Calls without a deadline are
judged against `default_deadline_s`. An estimate that nothing has confirmed for
`_STALE_S` (no busy window measured, no batch seen) is not trusted to refuse a
call to an idle model, and while no busy window confirms it, the batches that
do run pull it toward their own kernel rate: otherwise a rate learnt on one
method (cost units are not equally costly across methods) could refuse every
call of another for good, and a refused call teaches the estimate nothing.
The check needs only the request's
declared cost (validation.estimate_cost), so it runs before any decoding:
a refusal costs microseconds. Replicas check again with their own view
(an instance per replica in workers/serve/online.py, deadlines only), because
several front doors can share them.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from workers.errors import Overloaded
from workers.schema import check

_WINDOW_S = 1.0
# An estimate older than this (no busy window measured, no batch seen) is stale: see the module's doc.
_STALE_S = 3.0


@dataclass(frozen=True)
class AdmissionConfig:
    """The `server.admission` section.

    enabled: refuse by cost and deadline (off: every request queues, as before).
    target_queue_delay_s: the queued cost may reach rate x this (the latency a call without a
        deadline may meet in the queue).
    default_deadline_s: the deadline assumed, for admission only, for calls that carry none.
    deadline_fraction: a call is admitted only if its predicted finish is within this fraction of its
        remaining deadline (the estimate is an average; the margin keeps admitted calls in time).
    min_queued_cost: the queue bound's floor, so a cold or low estimate never refuses everything.
    smoothing: weight of each new one-second rate measurement in the estimate, 0..1.
    max_retry_after_s: the longest RetryInfo delay suggested.
    max_loop_lag_s: the front door's own saturation bound (service/loop_lag.py): while its event loop
        runs later than this, a growing share of new Explain calls is refused (all of them at twice
        it); 0 = off, the default (docs/architecture.md says why).
    """

    enabled: bool = True
    target_queue_delay_s: float = 1.0
    default_deadline_s: float = 30.0
    deadline_fraction: float = 0.5
    min_queued_cost: int = 64
    smoothing: float = 0.3
    max_retry_after_s: float = 5.0
    max_loop_lag_s: float = 0.0

    def __post_init__(self) -> None:
        check(0.01 <= self.target_queue_delay_s <= 600, "server.admission.target_queue_delay_s",
               "must be 0.01..600 seconds")
        check(0.1 <= self.default_deadline_s <= 86400, "server.admission.default_deadline_s",
               "must be 0.1..86400 seconds")
        check(1 <= self.min_queued_cost <= 1 << 30, "server.admission.min_queued_cost", "must be 1..2**30")
        check(0.1 <= self.deadline_fraction <= 1, "server.admission.deadline_fraction", "must be 0.1..1")
        check(0 < self.smoothing <= 1, "server.admission.smoothing", "must be in (0, 1]")
        check(self.max_loop_lag_s == 0 or 0.001 <= self.max_loop_lag_s <= 60, "server.admission.max_loop_lag_s",
              "must be 0 (off) or 0.001..60 seconds")
        check(0.01 <= self.max_retry_after_s <= 600, "server.admission.max_retry_after_s",
               "must be 0.01..600 seconds")




class Ticket:
    """One admitted request's share of the queue; `release` it exactly once."""

    __slots__ = ("cost", "_owner", "_released")

    def __init__(self, owner: "ModelAdmission", cost: float):
        self.cost, self._owner, self._released = cost, owner, False

    def resize(self, cost: float) -> None:
        """The exact cost, once validation knows it."""
        if not self._released:
            self._owner._adjust(cost - self.cost)
            self.cost = cost

    def release(self, completed: bool) -> None:
        if not self._released:
            self._released = True
            self._owner._finish(self.cost, completed)


class ModelAdmission:
    """The admission state of one model in one front door (thread-safe)."""

    def __init__(self, model: str, config: AdmissionConfig = AdmissionConfig()):
        self.model, self.config = model, config
        self.rate: float | None = None      # cost units per second
        self.queued = 0.0                   # admitted, unfinished cost
        self._lock = threading.Lock()
        self._window_start = time.monotonic()
        self._window_cost = 0.0
        self._window_idle = True  # the queue was empty at some point of this window
        # The rate is seeded from one batch's kernel time until a busy window is measured; one small
        # batch underestimates what a full one does, so the queue bound waits for a measured rate.
        self.measured = False
        self._measured_at = float("-inf")  # monotonic time of the last busy-window measurement
        self._seen_at = float("-inf")      # ... of the last evidence of any kind (a measurement, a batch)

    @property
    def bound(self) -> float:
        """The queued cost allowed now."""
        if self.rate is None or not self.measured:
            return float("inf")
        return max(float(self.config.min_queued_cost), self.rate * self.config.target_queue_delay_s)

    def predicted_wait(self, cost: float) -> float | None:
        """Seconds until a request of `cost` admitted now would finish; None before any measurement."""
        return None if self.rate is None else (self.queued + cost) / self.rate

    def _retry_after(self, excess: float) -> float:
        delay = excess / self.rate if self.rate else 0.1
        return min(self.config.max_retry_after_s, max(0.05, delay))

    def stale(self, now: float | None = None) -> bool:
        """Whether nothing has confirmed the estimate for `_STALE_S`."""
        return (time.monotonic() if now is None else now) - self._seen_at > _STALE_S

    def admit(self, cost: float, remaining_s: float | None, queue_bound: bool = True) -> Ticket:
        """A ticket for `cost`, or `Overloaded` saying why not (queue_bound=False: deadlines only)."""
        with self._lock:
            idle_and_unsure = self.queued <= 0 and self.stale()
            if self.config.enabled and self.rate is not None and not idle_and_unsure:
                remaining = self.config.default_deadline_s if remaining_s is None else remaining_s
                wait = (self.queued + cost) / self.rate
                if queue_bound and self.queued + cost > self.bound and self.queued > 0:
                    raise Overloaded(
                        f"model {self.model!r} is at capacity: {self.queued:.0f} cost units are queued (bound "
                        f"{self.bound:.0f}, about {self.config.target_queue_delay_s:g} s of work at "
                        f"{self.rate:.0f}/s); retry after the suggested delay", self._retry_after(
                            self.queued + cost - self.bound), reason="queue_full")
                if wait > remaining * self.config.deadline_fraction:
                    raise Overloaded(
                        f"the deadline is too short for the current queue of model {self.model!r}: about "
                        f"{wait:.2f} s of work would be ahead of or part of this call, which has {remaining:.2f} "
                        "s left; retry after the suggested delay or with a longer deadline",
                        self._retry_after(self.queued + cost - remaining * self.config.deadline_fraction * self.rate),
                        reason="deadline_too_short")
            self.queued += cost
            return Ticket(self, cost)

    def observe_batch(self, batch_samples: int, compute_ms: float) -> None:
        """Seeds the rate from a batch's own kernel rate until a busy window has been measured, and pulls
        an estimate that no busy window has confirmed for `_STALE_S` toward it."""
        if batch_samples <= 0 or compute_ms <= 0:
            return
        kernel_rate = batch_samples / (compute_ms / 1e3)
        with self._lock:
            now = time.monotonic()
            self._seen_at = now
            if self.rate is None:
                self.rate = kernel_rate
            elif now - self._measured_at > _STALE_S:
                a = self.config.smoothing
                self.rate = (1 - a) * self.rate + a * kernel_rate

    def _adjust(self, delta: float) -> None:
        with self._lock:
            self.queued = max(0.0, self.queued + delta)

    def _finish(self, cost: float, completed: bool) -> None:
        with self._lock:
            self.queued = max(0.0, self.queued - cost)
            if completed:
                self._window_cost += cost
            now = time.monotonic()
            elapsed = now - self._window_start
            if elapsed >= _WINDOW_S:
                if not self._window_idle and self._window_cost > 0:
                    measured = self._window_cost / elapsed
                    a = self.config.smoothing
                    self.rate = measured if not self.measured else (1 - a) * self.rate + a * measured
                    self.measured = True
                    self._measured_at = self._seen_at = now
                self._window_start, self._window_cost = now, 0.0
                self._window_idle = self.queued <= 0
            elif self.queued <= 0:
                self._window_idle = True  # idle time would read as slowness: this window measures nothing


class Admission:
    """`ModelAdmission` per model name, made on first use."""

    def __init__(self, config: AdmissionConfig = AdmissionConfig()):
        self.config = config
        self._models: dict[str, ModelAdmission] = {}
        self._lock = threading.Lock()

    def model(self, name: str) -> ModelAdmission:
        with self._lock:
            if name not in self._models:
                self._models[name] = ModelAdmission(name, self.config)
            return self._models[name]

    def models(self) -> dict[str, ModelAdmission]:
        with self._lock:
            return dict(self._models)
