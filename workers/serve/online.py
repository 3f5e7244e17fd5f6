"""Ray Serve deployments: the online worker, one per model, batching across clients.

A replica loads its model once (eval, frozen, hooks tapped) and serves every
online method through `@serve.batch`, whose `batch_size_fn` counts samples: a
SmoothGrad-50 request costs 50, a Grad-CAM request 1. The kernel runs on a
thread pool sized by `max_concurrent_batches`, off the replica's event loop, so
the next batch keeps filling while one computes; batches that queue behind a
busy model merge into one (workers/slots.py). Batching parameters come from
the deployment's `user_config` and change at runtime through `reconfigure`.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import torch
from ray import serve

from workers.affinity import pin_process
from workers.batching import FoldBudget, rows_per_chunk
from workers.config import BatchingConfig, Limits, ModelConfig, model_config_from_dict
from workers.schema import build
from workers.admission import ModelAdmission
from workers.errors import AttributionError, Cancelled, DeadlineExceeded, InternalError, Overloaded
from workers.models import describe, load_model, select_device
from workers import tracing as workers_tracing
from workers.pipeline import WorkerContext, explain_batch
from workers.slots import ComputeSlots
from workers.spec import ExplainResult, ExplainSpec, ModelDescription

log = logging.getLogger(__name__)

# Ray's batcher forms batches whether or not the model is free; let them all
# through to the compute slots, which bound concurrency (max_concurrent_batches,
# changeable at runtime) and merge the batches that wait (workers/slots.py).
_BATCHER_CONCURRENCY = 16
_INITIAL_MAX_BATCH = BatchingConfig().max_batch_samples
_ABANDONED_KEEP_S = 300.0


def _item_cost(item: tuple[ExplainSpec, float]) -> int:
    return item[0].cost


def _batch_cost(items: list[tuple[ExplainSpec, float]]) -> int:
    return sum(spec.cost for spec, _ in items)


class OnlineWorker:
    """One model on one device; the class behind the `OnlineWorker` deployment."""

    def __init__(self, model: dict, device: str = "auto", cache_dir: str | None = None,
                 is_default: bool = False, threads: int = 0, limits: dict | None = None,
                 tracing: dict | None = None):
        cfg: ModelConfig = model_config_from_dict(model)
        # This replica's own tracer provider (it runs in a process of its own): its spans continue
        # the front door's traces, whose context each spec carries (ExplainSpec.trace).
        workers_tracing.setup(tracing, role="worker")
        # Before torch starts its thread pool, which then inherits the cores.
        pinned = pin_process(cfg.cpu_affinity, f"models[{cfg.name}].cpu_affinity")
        # Ray sets OMP_NUM_THREADS from the actor's num_cpus; be explicit so a
        # replica never silently computes on one core.
        torch.set_num_threads(max(1, threads or int(cfg.num_cpus)))
        self.device = select_device(device)
        self.model = load_model(cfg, self.device, cache_dir and os.fspath(cache_dir))
        self.is_default = is_default
        self.config = BatchingConfig()
        self.ctx = WorkerContext.create(self.model, FoldBudget(), build(Limits, limits, "server.limits"))
        self._pool = ThreadPoolExecutor(_BATCHER_CONCURRENCY, thread_name_prefix="kernel")
        self.slots = ComputeSlots(self.config.max_concurrent_batches, self.config.max_batch_samples,
                                  _item_cost, self._run, dead=self._dead)
        # Deadline checks of its own: several front doors may share this replica, and each knows
        # only the work it sent (the queue bound stays the front doors' job).
        self.admission = ModelAdmission(cfg.name)
        # Specs whose caller cancelled, by id(); the entry holds the spec, so its id cannot be reused
        # while it is listed, and is forgotten once the spec is answered or after _ABANDONED_KEEP_S.
        self._abandoned: dict[int, tuple[ExplainSpec, float]] = {}
        self.refused = 0
        self.computed = 0
        # Adaptive batch wait: a request that finds the model idle, after a gap longer than the wait
        # since the last arrival, goes at once (company is not coming; waiting only costs latency);
        # while requests arrive closer together than that, batches wait `batch_wait_timeout_s` to fill.
        self._waiting = 0      # requests between arrival and the batcher's answer
        self._wait_now = None  # the batch wait last set on the batcher
        self._last_arrival = 0.0  # time.time() of the last request that went to the batcher
        log.info("online worker for %s ready on %s (%d torch threads%s)", cfg.name, self.device,
                 torch.get_num_threads(), f", pinned to cores {list(pinned)}" if pinned else "")

    def reconfigure(self, user_config: dict) -> None:
        """Applies batching settings; called by Serve at start and on every config change."""
        cfg = build(BatchingConfig, user_config, "batching")
        self.config = cfg
        self.ctx.budget = FoldBudget(max_bytes=cfg.fold_max_bytes or None, max_rows=cfg.fold_max_rows or None,
                                     measure=cfg.fold_measure)
        if cfg.fold_measure and self.model.text is None:  # the chunk-size probe runs now, before the first batch
            rows_per_chunk(self.model.module, self.model.spec.shape, self.ctx.budget, device=self.device)
        self.explain_batched.set_max_batch_size(cfg.max_batch_samples)
        self.explain_batched.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self._wait_now = cfg.batch_wait_timeout_s
        self.slots.resize(cfg.max_concurrent_batches, cfg.max_batch_samples)

    def batching(self) -> dict:
        """The settings in force (for tests and operators)."""
        return dict(asdict(self.config), compute_slots=self.slots.slots)

    def describe(self) -> ModelDescription:
        return describe(self.model, self.is_default)

    async def explain(self, spec: ExplainSpec, in_group: bool = False) -> ExplainResult | AttributionError:
        """One request; answers the result or the request's typed error (never raises it)."""
        arrived = time.time()
        remaining = None if spec.deadline is None else spec.deadline - arrived
        try:
            ticket = self.admission.admit(spec.cost, remaining, queue_bound=False)
        except Overloaded as exc:
            self.refused += 1
            return exc
        try:
            if spec.cost > self.config.max_batch_samples:
                # Bigger than a whole batch: it runs as a batch of its own.
                (outcome,) = await self.slots.run([(spec, arrived)])
            else:
                if not in_group:  # a coalesced call decided once for its members
                    self._adapt_wait(arrived)
                self._waiting += 1
                try:
                    outcome = await self.explain_batched((spec, arrived))
                finally:
                    self._waiting -= 1
        except asyncio.CancelledError:  # the front door cancelled: drop the work wherever it waits
            now = time.monotonic()
            for key in [k for k, (_, when) in self._abandoned.items() if now - when > _ABANDONED_KEEP_S]:
                del self._abandoned[key]
            self._abandoned[id(spec)] = (spec, now)
            ticket.release(completed=False)
            raise
        if isinstance(outcome, ExplainResult):
            self.admission.observe_batch(outcome.batch_samples, outcome.compute_ms)
        ticket.release(completed=isinstance(outcome, ExplainResult))
        return outcome

    def _adapt_wait(self, arrived: float) -> None:
        """Each arrival decides: at once if the model is idle and nobody came within a wait, else wait."""
        if self.config.adaptive_wait:
            wait = self.config.batch_wait_timeout_s
            quiet = self._waiting == 0 and self.slots.idle and arrived - self._last_arrival > wait
            self._set_batch_wait(0.0 if quiet else wait)
        self._last_arrival = arrived

    def _set_batch_wait(self, seconds: float) -> None:
        if seconds != self._wait_now:
            self.explain_batched.set_batch_wait_timeout_s(seconds)
            self._wait_now = seconds

    async def explain_many(self, specs: list[ExplainSpec]) -> list[ExplainResult | AttributionError]:
        """Requests the front door coalesced into one call: each enters the batcher on its own."""
        self._adapt_wait(time.time())  # once for the call: its members arrive together
        return list(await asyncio.gather(*(self.explain(spec, in_group=True) for spec in specs)))

    def _dead(self, item: tuple[ExplainSpec, float]) -> AttributionError | None:
        spec = item[0]
        if self._abandoned.pop(id(spec), None) is not None:
            return Cancelled("the caller cancelled the request; it was dropped before it was computed")
        if spec.deadline is not None and time.time() > spec.deadline:
            return DeadlineExceeded("the request's deadline passed while it waited; it was dropped")
        return None

    def overload_stats(self) -> dict:
        """Counters for operators and tests: what was refused, dropped (and where), computed."""
        return {"refused": self.refused, "dropped_waiting": self.slots.dropped,
                "dropped_in_batch": self.ctx.dropped, "rows_skipped": self.ctx.rows_skipped,
                "fold_checks": self.ctx.fold_checks,
                "computed": self.computed,
                "service_rate": self.admission.rate, "queued_cost": self.admission.queued,
                "batch_wait_s": self._wait_now, "computing": not self.slots.idle}

    @serve.batch(max_batch_size=_INITIAL_MAX_BATCH, batch_wait_timeout_s=0.01,
                 max_concurrent_batches=_BATCHER_CONCURRENCY, batch_size_fn=_batch_cost)
    async def explain_batched(self, items: list[tuple[ExplainSpec, float]]) -> list:
        return await self.slots.run(items)

    async def _run(self, items: list[tuple[ExplainSpec, float]]) -> list:
        loop = asyncio.get_running_loop()
        try:
            started, outcomes = await loop.run_in_executor(self._pool, self._compute, [s for s, _ in items])
        except Exception as exc:  # the batch machinery itself broke: fail each request, typed
            log.exception("batch of %d failed", len(items))
            return [InternalError(f"worker failure: {type(exc).__name__}")] * len(items)
        if workers_tracing.enabled():
            _queue_spans(items, started)
        for (spec, arrived), outcome in zip(items, outcomes):
            self._abandoned.pop(id(spec), None)
            if isinstance(outcome, ExplainResult):
                outcome.queue_ms = max(0.0, (started - arrived) * 1e3)
                self.computed += 1
        return outcomes

    def _compute(self, specs: list[ExplainSpec]) -> tuple[float, list]:
        started = time.time()
        return started, explain_batch(self.ctx, specs, abandoned=lambda spec: id(spec) in self._abandoned)

    def check_health(self) -> None:
        """Serve restarts the replica when this raises: a tiny real forward."""
        spec, text = self.model.spec, self.model.text
        with torch.inference_mode():
            if text is not None:  # a text model: one pad token
                ids = torch.full((1, 1), text.pad_id, device=self.device)
                out = text.forward.plain(ids, torch.ones_like(ids))
            else:
                out = self.model.module(torch.zeros((1,) + spec.shape, device=self.device))
        if not torch.isfinite(out).all():
            raise RuntimeError("model produced non-finite logits on a zero input")

    def finished_spans(self) -> list[dict]:
        """This replica's finished spans, when its tracing exporter is "memory" (tests, debugging); else []."""
        return workers_tracing.finished_span_records()

    def device_memory(self) -> dict:
        if self.device.type != "cuda":
            return {}
        return {"allocated_bytes": torch.cuda.memory_allocated(self.device),
                "reserved_bytes": torch.cuda.memory_reserved(self.device)}


def _queue_spans(items: list[tuple[ExplainSpec, float]], started: float) -> None:
    """Each traced request's wait in this replica, from its arrival to its batch's compute (after the fact)."""
    for spec, arrived in items:
        if spec.trace:
            span = workers_tracing.tracer.start_span("replica.queue", context=workers_tracing.extract(spec.trace),
                                                     start_time=int(arrived * 1e9),
                                                     attributes={"attribution.request_id": spec.request_id})
            span.end(end_time=int(max(started, arrived) * 1e9))


def online_deployment(cfg: ModelConfig, batching: BatchingConfig):
    """The Serve deployment object for one model's online worker."""
    replicas = ({"autoscaling_config": dict(cfg.autoscaling)} if cfg.autoscaling
                else {"num_replicas": max(1, cfg.replicas)})
    return serve.deployment(
        OnlineWorker,
        name="OnlineWorker",
        **replicas,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus,
                           **({"resources": dict(cfg.resources)} if cfg.resources else {})},
        max_ongoing_requests=batching.max_ongoing_requests,
        max_queued_requests=batching.max_queued_requests,
        user_config=asdict(batching),
        health_check_period_s=10,
        health_check_timeout_s=30,
    )
