"""Offline job metrics: jobs by state, queue depth, job durations, offline samples/s.

Jobs by state and queue depth are read from the store at scrape time, so they
are true after a restart and whichever process ran the jobs; durations and
samples are recorded by the runner as work happens. Everything goes into the
`CollectorRegistry` passed in (the front door's own, never the process-wide one).
"""
from __future__ import annotations

import logging
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service._proto import attribution_pb2 as pb

log = logging.getLogger(__name__)

# A job runs from seconds (a few Grad-CAM items) to a night (a thousand Score-CAM images).
DURATION_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0,
                    14400.0, 28800.0, 86400.0)


class _StoreCollector(Collector):
    """`attribution_jobs{state}` and `attribution_jobs_queue_depth`, counted in the store per scrape."""

    def __init__(self, counts: Callable[[], dict[int, int]]):
        self._counts = counts

    def describe(self):
        # Describing without reading the store keeps registration free of I/O.
        return [GaugeMetricFamily("attribution_jobs", "Offline jobs in the store, by state.", labels=["state"]),
                GaugeMetricFamily("attribution_jobs_queue_depth", "Offline jobs waiting to run (QUEUED).")]

    def collect(self):
        try:
            counts = self._counts()
        except Exception:  # a scrape must not fail because the store is closing
            log.warning("cannot count jobs for /metrics", exc_info=True)
            return
        by_state = GaugeMetricFamily("attribution_jobs", "Offline jobs in the store, by state.", labels=["state"])
        for state, count in sorted(counts.items()):
            by_state.add_metric([pb.JobState.Name(state).lower()], count)
        yield by_state
        yield GaugeMetricFamily("attribution_jobs_queue_depth", "Offline jobs waiting to run (QUEUED).",
                                value=counts.get(pb.QUEUED, 0))


class JobMetrics:
    """The jobs' metrics on `registry`; `counts` is the store's `counts` method."""

    def __init__(self, registry: CollectorRegistry, counts: Callable[[], dict[int, int]]):
        self.registry = registry
        self._collector = _StoreCollector(counts)
        registry.register(self._collector)
        self.duration = Histogram("attribution_job_duration_seconds",
                                  "Start to final state of an offline job's last attempt.",
                                  ["method", "state"], buckets=DURATION_BUCKETS, registry=registry)
        self.samples = Counter("attribution_offline_samples",
                               "Samples of offline work done (items x targets x folded rows per item, counted "
                               "as progress is reported); rate() gives samples per second.",
                               ["model", "method"], registry=registry)

    def observe_finished(self, method: str, state: int, seconds: float) -> None:
        self.duration.labels(method, pb.JobState.Name(state).lower()).observe(max(0.0, seconds))

    def add_samples(self, model: str, method: str, samples: float) -> None:
        if samples > 0:
            self.samples.labels(model, method).inc(samples)

    def close(self) -> None:
        """Unregisters the store collector, so a closed store is never scraped."""
        try:
            self.registry.unregister(self._collector)
        except KeyError:
            pass
