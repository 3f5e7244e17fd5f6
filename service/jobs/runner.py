"""JobRunner: claims queued jobs and runs them on the offline backend, `concurrency` at a time.

Stages of one job: claim (the store marks it RUNNING under a new attempt token) ->
prepare (the stored request decoded and validated again, offline=True) -> execute
(the backend's stream: progress published at once to watchers, persisted every
`progress_persist_s`) -> encode (ExplainResponse bytes) -> finish (final state and
result in one store transaction, under the token). A stale token at any write
means another attempt owns the job now: this one drops its work silently.

An evaluation job (`JobRecord.is_evaluation`) takes the same path with an `EvaluationSpec`
(service/evaluation/validation.py): the offline worker runs it phase by phase (workers/evaluation/job.py)
and answers an `EvaluationOutcome`, stored as the wire `EvaluationResult` with its `Recommendation`
beside it. It is not audited map by map: it explains no prediction, and the job row (request, model
version, times, result) is its record; its summary is logged.

Cancellation reaches a running job two ways: `cancel(job_id)` from CancelJob in
this process, or the store's cancel flag read back at each progress write (a
CancelJob served by another process). Either closes the backend stream, which
stops the kernel at its next chunk boundary.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import Mapping

from service import codec, errors
from service._proto import attribution_pb2 as pb
from service.config import Limits
from service.jobs.config import JobsConfig
from service.jobs.events import JobEvents
from service.jobs.metrics import JobMetrics
from service.backends.offline import OfflineBackend
from service.jobs.store import CANCELLED, FAILED, SUCCEEDED, JobRecord, JobStore, StaleAttempt
from service.decoding.pool import ImageDecoder
from service.validation import resolve_model, validate_explain
from workers.errors import Cancelled, InternalError, Unavailable
from workers.evaluation.jobspec import EvaluationOutcome, EvaluationSpec
from workers.spec import ExplainResult, ExplainSpec, ModelDescription

log = logging.getLogger(__name__)

_MAX_RETRY_PAUSE_S = 30.0


@dataclasses.dataclass
class _Progress:
    """What watchers were last shown of a running job, and when the store last heard."""

    shown: float = 0.0
    persisted_at: float = dataclasses.field(default_factory=time.monotonic)


class JobRunner:
    """Runs the store's jobs on `backend`; publishes every change on `events`.

    models: the servicer's model descriptions by name (one flagged default).
    limits: the front door's per-request limits (a job may carry `config.max_items` items).
    decoder: decodes the jobs' encoded images (the server's isolated pool).
    """

    def __init__(self, store: JobStore, backend: OfflineBackend, models: Mapping[str, ModelDescription], *,
                 limits: Limits, config: JobsConfig = JobsConfig(), events: JobEvents | None = None,
                 metrics: JobMetrics | None = None, decoder: ImageDecoder | None = None, audit=None,
                 datasets: Mapping[str, tuple] | None = None):
        self.store, self.backend, self.config, self.metrics = store, backend, config, metrics
        self.datasets = dict(datasets or {})  # evaluation data sets: name -> image files (jobs.evaluation)
        self.models = dict(models)
        self.limits = config.request_limits(limits)
        self.decoder = decoder  # the server's image decoder (None: in-process, trusted inputs only)
        self.events = events or JobEvents()
        self._wake = asyncio.Event()
        self._cancels: dict[str, asyncio.Event] = {}
        self._tasks: list[asyncio.Task] = []
        self.audit = audit  # service.audit.AuditLog: a succeeded job's maps are audited like online ones
        self._to_audit: dict[str, tuple[ExplainSpec, pb.ExplainResponse]] = {}

    async def start(self, recover: bool = True) -> None:
        """Settles what a killed process left RUNNING (unless `recover` is False), then starts the slots."""
        if recover:
            summary = await asyncio.to_thread(self.store.recover)
            if any(summary.values()):
                log.warning("jobs left running by a previous process: %s", summary)
        self._tasks = [asyncio.create_task(self._slot(), name=f"job-slot-{i}")
                       for i in range(self.config.concurrency)]

    async def stop(self) -> None:
        """Stops every slot; jobs they were running go back to the queue. Call before closing the backend."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def wake(self) -> None:
        """A job was queued: an idle slot claims it now rather than at its next poll."""
        self._wake.set()

    def cancel(self, job_id: str) -> bool:
        """Stops the job if it runs here; answers whether it did."""
        flag = self._cancels.get(job_id)
        if flag is not None:
            flag.set()
        return flag is not None

    def publish(self, job: JobRecord) -> None:
        self.events.publish(job)

    # ------------------------------------------------------------ slots --

    async def _slot(self) -> None:
        while True:
            self._wake.clear()
            job = await self._claim()
            if job is None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.config.poll_s)
                continue
            try:
                await self._run(job)
            except Exception:  # the store failed under us; the job stays RUNNING until recover()
                log.exception("job %s could not be settled", job.id)
                await asyncio.sleep(self.config.poll_s)

    async def _claim(self) -> JobRecord | None:
        claim = asyncio.ensure_future(asyncio.to_thread(self.store.claim))
        try:
            return await asyncio.shield(claim)
        except asyncio.CancelledError:
            job = await claim  # the claim ran to its end in its thread: give the job back
            if job is not None:
                await asyncio.to_thread(self.store.release, job.id, job.token)
            raise
        except Exception:  # the store is busy or closing: try again at the next poll
            log.exception("claiming a job failed")
            await asyncio.sleep(self.config.poll_s)
            return None

    async def _run(self, job: JobRecord) -> None:
        cancel = self._cancels[job.id] = asyncio.Event()
        if job.cancel_requested:  # asked before a graceful stop gave the job back
            cancel.set()
        self.publish(job)
        beat = asyncio.create_task(self._heartbeat(job, cancel), name=f"job-heartbeat-{job.id}")
        try:
            state, error, result, recommendation = await self._attempt(job, cancel)
            final = await asyncio.to_thread(self.store.finish, job.id, job.token, state, error=error, result=result,
                                            recommendation=recommendation)
        except StaleAttempt as exc:
            log.warning("dropping the work of job %s: %s", job.id, exc.message)
            return
        except asyncio.CancelledError:  # the runner is stopping: the next start runs the job again
            with contextlib.suppress(StaleAttempt):
                await asyncio.to_thread(self.store.release, job.id, job.token)
            raise
        finally:
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)
            del self._cancels[job.id]
            audited = self._to_audit.pop(job.id, None)
        if audited is not None and self.audit is not None and final.state == SUCCEEDED:
            # Only once the result is durable: a job redone after a crash is logged once.
            await self.audit.record_async(*audited, path="offline")
        self.publish(final)
        if self.metrics is not None:
            kind = "evaluation" if final.is_evaluation else codec.METHOD_NAMES.get(final.method, "unknown")
            self.metrics.observe_finished(kind, final.state, final.finished - final.started)
        log.info("job %s %s after %.1f s", job.id, pb.JobState.Name(final.state), final.finished - final.started)

    async def _heartbeat(self, job: JobRecord, cancel: asyncio.Event) -> None:
        """Renews the job's lease (a shared store's) every third of it, and picks up a cancel asked through
        another front door. An attempt that lost the job stops working on it: its final write would not land."""
        period = max(0.05, float(getattr(self.store, "lease_s", 0.0) or self.config.lease_s) / 3)
        while not cancel.is_set():
            await asyncio.sleep(period)
            try:
                if await asyncio.to_thread(self.store.heartbeat, job.id, job.token):
                    cancel.set()
            except StaleAttempt as exc:
                log.warning("job %s: %s (its lease ran out); stopping its work", job.id, exc.message)
                cancel.set()
            except Exception as exc:  # the store is unreachable for now: the lease may still hold at the next beat
                log.warning("job %s: renewing its lease failed: %s", job.id, exc)

    async def _attempt(self, job: JobRecord,
                       cancel: asyncio.Event) -> tuple[int, tuple[int, str], bytes | None, bytes | None]:
        """(final state, (code, message), result bytes, recommendation bytes) of one attempt; raises StaleAttempt."""
        try:
            if job.is_evaluation:
                return await self._evaluate(job, cancel)
            spec, model = await self._prepare(job)
            result = await self._execute(job, spec, cancel)
            response = await asyncio.to_thread(_encode, result, spec, model, job.started)
            self._to_audit[job.id] = (spec, response)
            return SUCCEEDED, (0, ""), response.SerializeToString(), None
        except Cancelled as exc:
            if cancel.is_set():
                return CANCELLED, (0, ""), None, None
            status = errors.classify(Unavailable(f"the offline worker stopped the job: {exc.message}"))
        except StaleAttempt:
            raise
        except Exception as exc:  # classified once; a traceback never reaches the client
            status = errors.classify(exc)
        return FAILED, (status.code_number, status.message), None, None

    async def _evaluate(self, job: JobRecord, cancel: asyncio.Event) -> tuple[int, tuple[int, str], bytes, bytes | None]:
        """An evaluation job: validated again, run on the offline worker, stored as an EvaluationResult."""
        from service.evaluation.results import evaluation_result
        from service.evaluation.validation import validate_evaluation

        request = pb.EvaluationRequest.FromString(await asyncio.to_thread(self.store.request, job.id))
        checked = await asyncio.to_thread(validate_evaluation, request, self.models, self.limits,
                                          self.config.evaluation, self.datasets, request_id=job.id,
                                          decoder=self.decoder)
        outcome = await self._execute(job, checked.spec, cancel)
        result = await asyncio.to_thread(evaluation_result, outcome, checked.spec, checked.model, checked.pinned,
                                         job.id, time.time())
        log.info("evaluation %s of %s on %d items: ranking %s, recommended %s; %d forward / %d backward rows in "
                 "%.1f s (floor %.1f s)", job.id, outcome.model, outcome.num_items, outcome.ranking,
                 outcome.recommended or "none", outcome.forward_rows, outcome.backward_rows, outcome.seconds,
                 outcome.floor_seconds)
        recommendation = result.recommendation.SerializeToString() if result.HasField("recommendation") else None
        return SUCCEEDED, (0, ""), result.SerializeToString(), recommendation

    async def _prepare(self, job: JobRecord) -> tuple[ExplainSpec, ModelDescription]:
        raw = await asyncio.to_thread(self.store.request, job.id)
        request = pb.ExplainRequest.FromString(raw)
        model = resolve_model(request.model, self.models)
        spec = await asyncio.to_thread(validate_explain, request, model, self.limits, offline=True,
                                       request_id=job.id, decoder=self.decoder)
        return spec, model

    async def _execute(self, job: JobRecord, spec: ExplainSpec | EvaluationSpec,
                       cancel: asyncio.Event) -> ExplainResult | EvaluationOutcome:
        """The backend's result; reruns on Unavailable (a replica died) up to `config.retries` times."""
        progress = _Progress(shown=job.progress)
        for attempt in range(self.config.retries + 1):
            try:
                return await self._until_cancelled(self._consume(job, spec, progress), cancel)
            except Unavailable as exc:
                if attempt == self.config.retries:
                    raise
                pause = min(_MAX_RETRY_PAUSE_S, 2.0 ** attempt)
                log.warning("job %s: %s; running it again in %.0f s", job.id, exc.message, pause)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(cancel.wait(), pause)
                if cancel.is_set():
                    raise Cancelled("the job was cancelled") from None
        raise InternalError("unreachable: the retry loop always returns or raises")

    @staticmethod
    async def _until_cancelled(work, cancel: asyncio.Event):
        """`work`'s result, or `Cancelled` as soon as `cancel` is set (the work is then cancelled)."""
        task = asyncio.ensure_future(work)
        waiter = asyncio.ensure_future(cancel.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if task.cancelled():
            raise Cancelled("the job was cancelled")
        return task.result()

    async def _consume(self, job: JobRecord, spec: ExplainSpec | EvaluationSpec,
                       progress: _Progress) -> ExplainResult | EvaluationOutcome:
        async with contextlib.aclosing(self.backend.run(spec)) as stream:
            async for item in stream:
                if isinstance(item, (ExplainResult, EvaluationOutcome)):
                    self._count_samples(spec, progress, 1.0)  # the last steps may have been coalesced away
                    return item
                await self._advance(job, spec, progress, min(1.0, max(0.0, float(item))))
        raise InternalError("the offline worker ended the job without a result")

    async def _advance(self, job: JobRecord, spec: ExplainSpec, progress: _Progress, fraction: float) -> None:
        # Shown progress only grows, even when a retry starts the work over: watchers
        # rely on it to order events.
        if fraction <= progress.shown:
            return
        self._count_samples(spec, progress, fraction)
        self.publish(dataclasses.replace(job, progress=fraction))
        now = time.monotonic()
        if now - progress.persisted_at >= self.config.progress_persist_s:
            progress.persisted_at = now
            if await asyncio.to_thread(self.store.set_progress, job.id, job.token, fraction):
                self.cancel(job.id)  # CancelJob reached another process's store entry

    def _count_samples(self, spec: ExplainSpec, progress: _Progress, fraction: float) -> None:
        """Counts the work between what was shown and `fraction`, then shows `fraction`."""
        if self.metrics is not None and fraction > progress.shown and isinstance(spec, ExplainSpec):
            self.metrics.add_samples(spec.model, spec.method, (fraction - progress.shown) * spec.cost)
        progress.shown = max(progress.shown, fraction)


def _encode(result: ExplainResult, spec: ExplainSpec, model: ModelDescription,
            started: float) -> pb.ExplainResponse:
    response = codec.encode_result(result, spec, model)
    response.timings.total_ms = max(0.0, time.time() - started) * 1e3
    return response
