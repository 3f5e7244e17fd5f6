"""Offline work: Score-CAM, occlusion and bulk runs of any online method, with progress and cancellation.

`run_offline` explains one spec chunk by chunk of items (a thousand images never
sit on the device at once) and reports the fraction done after every kernel chunk;
`cancelled()` is read between chunks, and the perturbation kernels read it between
their own chunks too. `OfflineExecutor` runs it on a small thread pool and streams
progress fractions, then the `ExplainResult`, to an async generator; closing that
generator early (the caller cancelled) sets the flag, so the kernel stops at its
next chunk boundary.

Deployment shape: ONE Serve application, `attribution_offline`, whose
`OfflineWorker` replicas hold every configured model (loaded on first use). Offline
capacity is reserved once for the whole service, not per model, and never shares
a replica with the online `attribution-<model>` applications, so a flood of
Score-CAM jobs queues here and cannot raise online latency beyond the CPU/GPU the
offline replicas are given. Concurrency is bounded twice: `max_ongoing_requests`
jobs per replica, and a thread pool of that size inside it. (The name avoids the
`attribution-` prefix, which `ServeBackend.discover` reads as a model application.)
`LocalOfflineWorker` is the same without Ray, for single-process use and tests.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable

import torch

from workers.batching import FoldBudget, iter_chunks
from workers.config import Limits, ModelConfig, OfflineConfig, model_config_from_dict
from workers.errors import AttributionError, Cancelled, InternalError, InvalidArgument
from workers.schema import build
from workers.kernels.perturbation import occlusion, score_cam
from workers.models import ModelRegistry, describe, select_device
from workers.pipeline import TOP_PREDICTIONS, WorkerContext, check_finite, explain_batch, to_device
from workers.postprocess import finish_maps
from workers.spec import (OFFLINE_ONLY_METHODS, AttributionMap, ExplainResult, ExplainSpec, ItemExplanation,
                          ModelDescription, TargetSpec)

log = logging.getLogger(__name__)

OFFLINE_APP = "attribution_offline"
Progress = Callable[[float], None] | None
IsCancelled = Callable[[], bool] | None
_DONE = object()


# ---------------------------------------------------------------- the work

def run_offline(ctx: WorkerContext, spec: ExplainSpec, *, items_per_chunk: int = 8, progress: Progress = None,
                cancelled: IsCancelled = None) -> ExplainResult:
    """Explains `spec` chunk by chunk of items; raises `Cancelled` between chunks when asked."""
    started = time.perf_counter()
    run_chunk = _perturbation_chunk if spec.method in OFFLINE_ONLY_METHODS else _online_chunk
    total, items = spec.items, []
    for chunk in iter_chunks(total, items_per_chunk):
        if cancelled is not None and cancelled():
            raise Cancelled(f"job cancelled after {chunk.start} of {total} items")
        report = None if progress is None else _scaled(progress, chunk.start, chunk.stop - chunk.start, total)
        items.extend(run_chunk(ctx, _slice(spec, chunk), report, cancelled))
        if progress is not None:
            progress(chunk.stop / total)
    return ExplainResult(request_id=spec.request_id, model=ctx.model.name, model_version=ctx.model.version,
                         method=spec.method, items=items, compute_ms=(time.perf_counter() - started) * 1e3,
                         batch_samples=spec.cost, batch_requests=1)


def _scaled(progress: Callable[[float], None], done: int, size: int, total: int) -> Callable[[float], None]:
    """A chunk's own 0..1 fraction as the whole spec's fraction."""
    return lambda fraction: progress((done + fraction * size) / total)


def _slice(spec: ExplainSpec, chunk: slice) -> ExplainSpec:
    """The spec restricted to items `chunk`: inputs, per-item targets and per-item baselines."""
    target, params = spec.target, spec.params
    if target.kind == "indices" and len(target.indices) > 1:
        target = dataclasses.replace(target, indices=target.indices[chunk])
    custom = params.baseline_tensor
    if custom is not None and custom.shape[0] > 1:
        params = dataclasses.replace(params, baseline_tensor=custom[chunk])
    return dataclasses.replace(spec, inputs=spec.inputs[chunk], target=target, params=params)


def _online_chunk(ctx: WorkerContext, spec: ExplainSpec, _progress: Progress,
                  _cancelled: IsCancelled) -> list[ItemExplanation]:
    """A chunk of an online method: the online pipeline itself, one batch of one request."""
    (outcome,) = explain_batch(ctx, [spec])
    if isinstance(outcome, AttributionError):
        raise outcome
    return outcome.items


def _perturbation_chunk(ctx: WorkerContext, spec: ExplainSpec, progress: Progress,
                        cancelled: IsCancelled) -> list[ItemExplanation]:
    """A chunk of Score-CAM or occlusion: predict, resolve targets, run the kernel, finish the maps."""
    model = ctx.model
    x = to_device(spec.inputs, model.device)                             # (n, C, H, W)
    with torch.inference_mode():
        probs = torch.softmax(model.module(x).float(), dim=1)           # (n, classes)
    check_finite(probs, {}, 1)                                          # before any costly pass
    targets, k = _targets(spec.target, probs, model.num_classes)        # (n*k,)
    rows = x if k == 1 else x.repeat_interleave(k, dim=0)               # (n*k, C, H, W)
    p = spec.params
    if spec.method == "score_cam":
        maps = score_cam(model.module, ctx.taps, rows, targets, p.layer or model.default_cam_layer,
                         top_k_channels=p.top_k_channels, budget=ctx.budget, progress=progress,
                         cancelled=cancelled)                            # (n*k, H, W)
    else:
        maps = occlusion(model.module, rows, targets, patch_size=p.patch_size, stride=p.stride,
                         baseline_value=p.baseline_value, budget=ctx.budget, progress=progress,
                         cancelled=cancelled)                            # (n*k, H, W)
    maps = finish_maps(maps, "none", spec.output.normalization)         # single plane: nothing to reduce
    check_finite(probs, {spec.method: maps}, k)
    return _items(spec.method, probs, targets, k, maps)


def _targets(target: TargetSpec, probs: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, int]:
    """Explained class per row `(n*k,)`, best first per item for top-k, and k."""
    n = probs.shape[0]
    if target.kind == "top_k":
        k = min(target.k, num_classes)
        return probs.topk(k, dim=1).indices.reshape(-1), k
    if target.kind == "indices":
        if len(target.indices) not in (1, n):
            raise InvalidArgument.field("target.class_indices", f"give one index or one per item ({n})")
        idx = torch.tensor(target.indices, dtype=torch.long, device=probs.device)
        return (idx.expand(n) if idx.numel() == 1 else idx), 1
    return probs.argmax(dim=1), 1


def _items(method: str, probs: torch.Tensor, targets: torch.Tensor, k: int,
           maps: torch.Tensor) -> list[ItemExplanation]:
    n = probs.shape[0]
    top = probs.topk(min(TOP_PREDICTIONS, probs.shape[1]), dim=1)
    rows = torch.arange(n, device=probs.device).repeat_interleave(k)
    scores = probs[rows, targets].cpu().tolist()
    classes, top_classes, top_scores = targets.cpu().tolist(), top.indices.cpu().tolist(), top.values.cpu().tolist()
    return [ItemExplanation(top_classes[i], top_scores[i], [
        AttributionMap(method=method, target=classes[r], target_score=scores[r], map=maps[r])
        for r in range(i * k, (i + 1) * k)]) for i in range(n)]


# ------------------------------------------------------------- streaming

def chunk_rows(config: OfflineConfig, limits: Limits) -> int:
    """The kernel rows one chunk of a job can need: its items, each with up to max_top_k targets."""
    return config.items_per_chunk * limits.max_top_k


class _Contexts:
    """One WorkerContext per model, created on first use; safe from any pool thread."""

    def __init__(self, registry: ModelRegistry, budget: FoldBudget, limits: Limits, max_rows: int):
        self.registry, self.budget = registry, budget
        self.limits, self.max_rows = limits, max_rows
        self._contexts: dict[str, WorkerContext] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> WorkerContext:
        with self._lock:  # two first jobs of a model must not load it twice
            model = self.registry.get(name)
            if model.name not in self._contexts:
                self._contexts[model.name] = WorkerContext.create(model, self.budget, self.limits, self.max_rows)
            return self._contexts[model.name]

    def describe(self) -> list[ModelDescription]:
        return [describe(self.get(name).model, name == self.registry.default) for name in self.registry.names()]

    def close(self) -> None:
        with self._lock:
            for ctx in self._contexts.values():
                ctx.taps.close()
            self._contexts.clear()


class OfflineExecutor:
    """Runs specs on `concurrency` threads; `stream(spec)` yields fractions, then the result."""

    def __init__(self, contexts: Callable[[str], WorkerContext], *, concurrency: int = 1, items_per_chunk: int = 8):
        self._contexts = contexts
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="offline")
        self._running: set[threading.Event] = set()
        self.items_per_chunk = items_per_chunk

    async def stream(self, spec: ExplainSpec) -> AsyncIterator[float | ExplainResult]:
        """Progress fractions (coalesced when the reader is slower), then the `ExplainResult`.

        Raises the spec's typed error. Closing the generator early (CancelledError or
        aclose) sets the cancel flag: the kernel raises `Cancelled` at its next chunk
        boundary and the pool thread is free again.
        """
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def report(fraction: float) -> None:
            try:
                loop.call_soon_threadsafe(updates.put_nowait, fraction)
            except RuntimeError:  # the loop closed under a job being abandoned: nobody is listening
                stop.set()

        def compute() -> ExplainResult:
            return run_offline(self._contexts(spec.model), spec, items_per_chunk=self.items_per_chunk,
                               progress=report, cancelled=stop.is_set)

        def finished(done: asyncio.Future) -> None:
            if not done.cancelled():
                done.exception()  # retrieved here: an abandoned job's Cancelled is expected, not news
            updates.put_nowait(_DONE)

        self._running.add(stop)
        future = loop.run_in_executor(self._pool, compute)
        future.add_done_callback(finished)
        try:
            while True:
                item = await updates.get()
                while item is not _DONE and not updates.empty():
                    item = updates.get_nowait()
                if item is _DONE:
                    break
                yield item
            yield future.result()
        finally:
            stop.set()
            self._running.discard(stop)

    def close(self, wait: bool = False) -> None:
        """Stops every running spec at its next chunk; `wait` also waits for the threads to end."""
        for stop in list(self._running):
            stop.set()
        self._pool.shutdown(wait=wait, cancel_futures=True)


class LocalOfflineWorker:
    """The offline worker in this process (no Ray); the `OfflineBackend` the job runner calls."""

    def __init__(self, registry: ModelRegistry, config: OfflineConfig = OfflineConfig(), limits: Limits | None = None):
        self._contexts = _Contexts(registry, config.budget, limits or Limits(), chunk_rows(config, limits or Limits()))
        self._executor = OfflineExecutor(self._contexts.get, concurrency=config.max_ongoing_requests,
                                         items_per_chunk=config.items_per_chunk)

    def run(self, spec: ExplainSpec) -> AsyncIterator[float | ExplainResult]:
        return self._executor.stream(spec)

    async def models(self) -> list[ModelDescription]:
        return await asyncio.to_thread(self._contexts.describe)

    async def close(self) -> None:
        await asyncio.to_thread(self._executor.close, True)
        self._contexts.close()


class OfflineWorker:
    """The class behind the `OfflineWorker` deployment: every model, bounded job concurrency."""

    def __init__(self, models: list[dict], default_model: str = "", device: str = "auto",
                 cache_dir: str | None = None, offline: dict | None = None, limits: dict | None = None):
        cfg = build(OfflineConfig, offline, "jobs.offline")
        request_limits = build(Limits, limits, "server.limits")
        configs: list[ModelConfig] = [model_config_from_dict(m) for m in models]
        # Ray sets OMP_NUM_THREADS from num_cpus; be explicit, as the online worker is.
        torch.set_num_threads(max(1, cfg.threads or int(cfg.num_cpus)))
        registry = ModelRegistry(configs, default_model, select_device(device), cache_dir)
        self._contexts = _Contexts(registry, cfg.budget, request_limits, chunk_rows(cfg, request_limits))
        self._executor = OfflineExecutor(self._contexts.get, concurrency=cfg.max_ongoing_requests,
                                         items_per_chunk=cfg.items_per_chunk)
        log.info("offline worker ready for %s (%d jobs at once, %d torch threads)", ", ".join(registry.names()),
                 cfg.max_ongoing_requests, torch.get_num_threads())

    async def run(self, spec: ExplainSpec) -> AsyncIterator[float | ExplainResult | AttributionError]:
        """Streams fractions then the result; a failure is the last item, typed (never raised through Ray)."""
        try:
            async for event in self._executor.stream(spec):
                yield event
        except AttributionError as exc:
            yield exc
        except Exception as exc:  # a bug or device fault: typed for the caller, traceback in the replica log
            log.exception("offline job %s failed", spec.request_id)
            yield InternalError(f"offline worker failure: {type(exc).__name__}")

    def describe(self) -> list[ModelDescription]:
        return self._contexts.describe()


def offline_deployment(cfg: OfflineConfig):
    """The Serve deployment object of the offline workers."""
    from ray import serve

    return serve.deployment(
        OfflineWorker,
        name="OfflineWorker",
        num_replicas=cfg.replicas,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        max_ongoing_requests=cfg.max_ongoing_requests,
        health_check_period_s=10,
        health_check_timeout_s=30,
    )


def build_offline_app(args: dict):
    """Serve `import_path` target: args = {models: [...], default_model, device, cache_dir, offline: {...}}."""
    cfg = build(OfflineConfig, args.get("offline"), "jobs.offline")
    return offline_deployment(cfg).bind(list(args["models"]), default_model=args.get("default_model", ""),
                                        device=args.get("device", "auto"), cache_dir=args.get("cache_dir") or None,
                                        offline=dataclasses.asdict(cfg), limits=args.get("limits"))


def offline_app_args(config, offline: OfflineConfig) -> dict:
    """`build_offline_app` arguments for a `workers.app.AppConfig` (also what serve.yaml would carry)."""
    from workers.app import model_to_dict

    return {"models": [model_to_dict(m) for m in config.models], "default_model": config.default,
            "device": config.device, "cache_dir": config.cache_dir, "offline": dataclasses.asdict(offline),
            "limits": dataclasses.asdict(config.limits)}


def deploy_offline(config, offline: OfflineConfig = OfflineConfig()) -> str:
    """Deploys the offline application on the connected Ray cluster (after `deploy_all`); returns its name."""
    from ray import serve

    serve.start(proxy_location="Disabled")
    serve.run(build_offline_app(offline_app_args(config, offline)), name=OFFLINE_APP, route_prefix=None)
    return OFFLINE_APP
