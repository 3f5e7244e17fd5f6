"""Offline jobs: a durable queue (SQLite, or PostgreSQL shared by a cluster's front doors), a runner feeding the offline workers, the job RPCs.

    jobs = Jobs.create(data_dir, backend, servicer.models, limits=config.limits,
                       config=JobsConfig.from_dict(sections.get("jobs")), registry=metrics.registry)
    await jobs.start()             # recovers what a killed process left, starts the runner
    ...servicer.SubmitJob -> jobs.service.submit(request, context), and so on...
    await jobs.stop()              # running jobs go back to the queue; the store closes

store.py holds the jobs, runner.py runs them, service.py answers the RPCs,
events.py carries changes to watchers, metrics.py exports them, cli.py is
`attribution jobs`, offline_backend.py talks to the offline Serve application.
"""
from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Mapping

from prometheus_client import CollectorRegistry

from service.config import Limits
from service.decoding.pool import ImageDecoder
from service.evaluation.defaults import ModelDefaults
from service.jobs.config import JobsConfig
from service.jobs.metrics import JobMetrics
from service.backends.offline import OfflineBackend
from service.jobs.runner import JobRunner
from service.jobs.service import JobService
from service.jobs.store import JobStore, open_store
from workers.spec import ModelDescription

__all__ = ["Jobs", "JobsConfig", "JobRunner", "JobService", "JobStore", "open_store"]


@dataclass
class Jobs:
    """The offline queue of one front door: store, runner, RPC handlers and metrics."""

    store: JobStore
    runner: JobRunner
    service: JobService
    metrics: JobMetrics | None = None
    defaults: ModelDefaults | None = None  # adopted recommendations (service/evaluation/defaults.py)

    @classmethod
    def create(cls, data_dir: str | os.PathLike | None, backend: OfflineBackend,
               models: Mapping[str, ModelDescription], *, limits: Limits, config: JobsConfig = JobsConfig(),
               registry: CollectorRegistry | None = None, decoder: ImageDecoder | None = None,
               audit=None) -> "Jobs":
        """Opens the store (`config.store`, else `<data_dir>/jobs.sqlite3`; None: the user's data directory)
        and wires the parts."""
        datasets = config.evaluation.list_datasets()  # a missing data set fails the start, not a job
        store = open_store(data_dir, max_attempts=config.max_attempts, url=config.store, lease_s=config.lease_s)
        metrics = JobMetrics(registry, store.counts) if registry is not None else None
        runner = JobRunner(store, backend, models, limits=limits, config=config, metrics=metrics, decoder=decoder,
                           audit=audit, datasets=datasets)
        defaults = ModelDefaults(store, refresh_s=config.poll_s)
        return cls(store=store, runner=runner, service=JobService(store, runner, defaults), metrics=metrics,
                   defaults=defaults)

    async def start(self) -> None:
        await asyncio.to_thread(self.defaults.load)
        await self.runner.start()

    def close(self) -> None:
        """Closes the metrics and the store of a queue that never started (a failed server start)."""
        if self.metrics is not None:
            self.metrics.close()
        self.store.close()

    async def stop(self) -> None:
        """Stops the runner (running jobs are requeued) and closes the backend, then the store."""
        try:
            await self.runner.stop()
            await self.runner.backend.close()
        finally:
            if self.metrics is not None:
                self.metrics.close()
            self.store.close()
