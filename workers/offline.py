"""Offline work: Score-CAM, Ablation-CAM, occlusion, RISE, XRAI and bulk runs of any online method, with
progress and cancellation.

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

from workers.batching import iter_chunks
from workers.config import Limits, OfflineConfig
from workers.errors import AttributionError, Cancelled
from workers.evaluation.jobspec import EvaluationOutcome, EvaluationSpec
from workers.kernels.perturbation import ablation_cam, occlusion, score_cam
from workers.kernels.rise import rise
from workers.kernels.xrai import xrai
from workers.models import ModelRegistry
from workers.pipeline import explain_batch
from workers.stages import (ContextCache, WorkerContext, build_items, check_finite, resolve_targets,
                            to_device)
from workers.postprocess import finish_maps
from workers.spec import (OFFLINE_ONLY_METHODS, ExplainResult, ExplainSpec, ItemExplanation, params_for_items,
                          ModelDescription)

log = logging.getLogger(__name__)

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
        items.extend(run_chunk(ctx, slice_spec(spec, chunk), report, cancelled))
        if progress is not None:
            progress(chunk.stop / total)
    return ExplainResult(request_id=spec.request_id, model=ctx.model.name, model_version=ctx.model.version,
                         method=spec.method, items=items, compute_ms=(time.perf_counter() - started) * 1e3,
                         batch_samples=spec.cost, batch_requests=1)


def _scaled(progress: Callable[[float], None], done: int, size: int, total: int) -> Callable[[float], None]:
    """A chunk's own 0..1 fraction as the whole spec's fraction."""
    return lambda fraction: progress((done + fraction * size) / total)


def slice_spec(spec: ExplainSpec, chunk: slice) -> ExplainSpec:
    """The spec restricted to items `chunk`: inputs, per-item targets and per-item baselines."""
    target, params = spec.target, spec.params
    if target.kind == "indices" and len(target.indices) > 1:
        target = dataclasses.replace(target, indices=target.indices[chunk])
    params = params_for_items(spec.method, params, chunk)
    pixels = spec.pixels_u8[chunk] if spec.pixels_u8 is not None else None
    mask = None if spec.attention_mask is None else spec.attention_mask[chunk]  # text: the chunk's mask
    return dataclasses.replace(spec, inputs=spec.inputs[chunk], pixels_u8=pixels, target=target, params=params,
                               geometry=spec.geometry[chunk], attention_mask=mask)


def _online_chunk(ctx: WorkerContext, spec: ExplainSpec, _progress: Progress,
                  _cancelled: IsCancelled) -> list[ItemExplanation]:
    """A chunk of an online method: the online pipeline itself, one batch of one request."""
    (outcome,) = explain_batch(ctx, [spec])
    if isinstance(outcome, AttributionError):
        raise outcome
    return outcome.items


def _perturbation_chunk(ctx: WorkerContext, spec: ExplainSpec, progress: Progress,
                        cancelled: IsCancelled) -> list[ItemExplanation]:
    """A chunk of an offline-only method: predict, resolve targets, run the kernel, finish the maps."""
    model = ctx.model
    x = to_device(spec.inputs, model.device)                             # (n, C, H, W)
    with torch.inference_mode():
        probs = torch.softmax(model.module(x).float(), dim=1)           # (n, classes)
    check_finite(probs, {}, 1)                                          # before any costly pass
    targets, k = resolve_targets(spec.target, probs, model.num_classes, x.shape[0], x.device)  # (n*k,)
    rows = x if k == 1 else x.repeat_interleave(k, dim=0)               # (n*k, C, H, W)
    p = spec.params
    if spec.method in ("score_cam", "ablation_cam"):
        kernel = score_cam if spec.method == "score_cam" else ablation_cam
        maps = kernel(model.module, ctx.taps, rows, targets, p.layer or model.default_cam_layer,
                      top_k_channels=p.top_k_channels, budget=ctx.budget, progress=progress,
                      cancelled=cancelled)                               # (n*k, H, W)
    elif spec.method == "rise":  # one forward per mask scores all k targets of an item
        maps = rise(model.module, x, targets.view(x.shape[0], k), masks=p.masks, grid=p.grid,
                    keep_probability=p.keep_probability, seed=spec.seed, budget=ctx.budget,
                    progress=progress, cancelled=cancelled).flatten(0, 1)  # (n*k, H, W)
    elif spec.method == "xrai":
        maps = xrai(model.module, rows, targets, mean=model.spec.mean, std=model.spec.std, steps=p.steps,
                    scales=p.segmentation_scales, budget=ctx.budget, num_classes=model.num_classes,
                    progress=progress, cancelled=cancelled)              # (n*k, H, W)
    else:
        maps = occlusion(model.module, rows, targets, patch_size=p.patch_size, stride=p.stride,
                         baseline_value=p.baseline_value, budget=ctx.budget, progress=progress,
                         cancelled=cancelled)                            # (n*k, H, W)
    maps = finish_maps(maps, "none", spec.output.normalization)         # single plane: nothing to reduce
    check_finite(probs, {spec.method: maps}, k)
    return build_items(probs, targets, k, {spec.method: maps})


# ------------------------------------------------------------- streaming

def chunk_rows(config: OfflineConfig, limits: Limits) -> int:
    """The kernel rows one chunk of a job can need: its items, each with up to max_top_k targets."""
    return config.items_per_chunk * limits.max_top_k


class OfflineExecutor:
    """Runs specs on `concurrency` threads; `stream(spec)` yields fractions, then the result."""

    def __init__(self, contexts: Callable[[str], WorkerContext], *, concurrency: int = 1, items_per_chunk: int = 8):
        self._contexts = contexts
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="offline")
        self._running: set[threading.Event] = set()
        self.items_per_chunk = items_per_chunk

    async def stream(self, spec: ExplainSpec | EvaluationSpec
                     ) -> AsyncIterator[float | ExplainResult | EvaluationOutcome]:
        """Progress fractions (coalesced when the reader is slower), then the `ExplainResult` (an
        `EvaluationSpec`'s `EvaluationOutcome`, workers/evaluation/job.py).

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

        def compute():
            if isinstance(spec, EvaluationSpec):
                from workers.evaluation.job import run_evaluation  # it runs the methods through this module

                return run_evaluation(self._contexts, spec, items_per_chunk=self.items_per_chunk, progress=report,
                                      cancelled=stop.is_set)
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
        limits = limits or Limits()
        self._contexts = ContextCache(registry, config.budget, limits, chunk_rows(config, limits))
        self._executor = OfflineExecutor(self._contexts.get, concurrency=config.max_ongoing_requests,
                                         items_per_chunk=config.items_per_chunk)

    def run(self, spec: ExplainSpec | EvaluationSpec) -> AsyncIterator[float | ExplainResult | EvaluationOutcome]:
        return self._executor.stream(spec)

    async def models(self) -> list[ModelDescription]:
        return await asyncio.to_thread(self._contexts.describe)

    async def close(self) -> None:
        await asyncio.to_thread(self._executor.close, True)
        self._contexts.close()
