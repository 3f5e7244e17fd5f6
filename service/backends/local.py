"""In-process backend: the real pipeline without Ray, on worker threads of this process.

Used by `attribution explain --local`, by single-process deployments, by the
front door's own tests and by the GPU check (loadtests/gpu_check.py). By default
each call runs as its own batch; with `max_batch_cost`, calls that wait while the
model computes merge into one batch up to that cost (workers/slots.py, the same
compute slots the Serve replicas use), so one process batches across clients too.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from workers.batching import FoldBudget
from workers.config import Limits
from workers.errors import AttributionError, Unavailable
from workers.models import ModelRegistry, describe
from workers.pipeline import explain_batch
from workers.slots import ComputeSlots
from workers.stages import ContextCache, WorkerContext
from workers.spec import ExplainResult, ExplainSpec, ModelDescription


class LocalBackend:
    def __init__(self, registry: ModelRegistry, budget: FoldBudget | None = None, threads: int = 1,
                 limits: Limits | None = None, max_batch_cost: int = 0):
        self.registry = registry
        self.budget = budget or FoldBudget()
        self.limits = limits or Limits()
        self._contexts = ContextCache(registry, self.budget, self.limits)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="explain")
        self._closed = False
        self.max_batch_cost = max_batch_cost
        self._slots: dict[str, ComputeSlots] = {}  # per model, when batching across calls

    def context(self, name: str = "") -> WorkerContext:
        return self._contexts.get(name)

    async def models(self) -> list[ModelDescription]:
        loop = asyncio.get_running_loop()
        contexts = [await loop.run_in_executor(self._pool, self.context, n) for n in self.registry.names()]
        return [describe(c.model, is_default=c.model.name == self.registry.default) for c in contexts]

    def explain_sync(self, spec: ExplainSpec) -> ExplainResult:
        if self._closed:
            raise Unavailable("the backend is shutting down")
        queued_at = time.perf_counter()
        ctx = self.context(spec.model)
        started = time.perf_counter()
        (outcome,) = explain_batch(ctx, [spec])
        if isinstance(outcome, AttributionError):
            raise outcome
        outcome.queue_ms = (started - queued_at) * 1e3
        return outcome

    async def explain(self, spec: ExplainSpec) -> ExplainResult:
        if self.max_batch_cost:
            return await self._explain_batched(spec)
        loop = asyncio.get_running_loop()
        submitted = time.perf_counter()
        result = await loop.run_in_executor(self._pool, self.explain_sync, spec)
        # queue time: waiting for the worker thread, measured from submission
        result.queue_ms = max(0.0, (time.perf_counter() - submitted) * 1e3 - result.compute_ms)
        return result

    async def _explain_batched(self, spec: ExplainSpec) -> ExplainResult:
        name = self.registry.config(spec.model).name  # a lookup: loading happens on the worker thread
        if name not in self._slots:
            self._slots[name] = ComputeSlots(1, self.max_batch_cost, lambda s: s.cost, self._compute_batch)
        submitted = time.perf_counter()
        (outcome,) = await self._slots[name].run([spec])
        if isinstance(outcome, AttributionError):
            raise outcome
        outcome.queue_ms = max(0.0, (time.perf_counter() - submitted) * 1e3 - outcome.compute_ms)
        return outcome

    async def _compute_batch(self, specs: list[ExplainSpec]) -> list:
        if self._closed:
            return [Unavailable("the backend is shutting down")] * len(specs)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, explain_batch, self.context(specs[0].model), specs)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        self._contexts.close()
