"""The five job RPCs as plain async methods the servicer delegates to.

Each takes the request message (and the call context, unused here) and returns
the response message, or raises a `workers.errors` type that the servicer hands
to `service.errors.abort_with`. `watch` is an async generator of JobEvents: the
current state first, then every change in order, ending after a final state.
"""
from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import AsyncIterator

from service._proto import attribution_pb2 as pb
from service.jobs.events import order_key
from service.jobs.runner import JobRunner
from service import codec
from service.jobs.store import (ALL_STATES, CANCELLED, EVALUATION, FAILED, RUNNING, SUCCEEDED, JobRecord, JobStore,
                                NewJob)
from service.validation import _PARAMS_FIELD, resolve_model, validate_explain
from workers.errors import InvalidArgument

log = logging.getLogger(__name__)

MIN_PRIORITY, MAX_PRIORITY = -100, 100
MAX_KEY_CHARS = 128
MAX_ITEM_NAME_CHARS = 256
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 50, 500


def job_proto(job: JobRecord, result: bytes | None = None) -> pb.Job:
    """A stored job as the wire `Job`; `result` is the stored ExplainResponse (an evaluation's
    EvaluationResult) bytes, if asked for."""
    out = pb.Job(id=job.id, state=job.state, progress=job.progress, priority=job.priority,
                 idempotency_key=job.idempotency_key, model=job.model, method=job.method,
                 num_items=job.num_items, created_unix_s=job.created, started_unix_s=job.started,
                 finished_unix_s=job.finished, item_names=json.loads(job.item_names or "[]"),
                 is_evaluation=job.is_evaluation)
    if job.state == FAILED:
        out.error.CopyFrom(pb.ExplainError(code=job.error_code, message=job.error_message))
    if result is not None:
        (out.evaluation if job.is_evaluation else out.result).ParseFromString(result)
    return out


def _job_id(job_id: str) -> str:
    if not job_id:
        raise InvalidArgument.field("id", "must be set")
    return job_id


class JobService:
    """SubmitJob, GetJob, WatchJob, CancelJob and ListJobs over a store and its runner."""

    def __init__(self, store: JobStore, runner: JobRunner, defaults=None):
        self.store, self.runner = store, runner
        self.defaults = defaults  # service.evaluation.defaults.ModelDefaults: adopted methods and layers

    async def submit(self, request: pb.SubmitJobRequest, context=None) -> pb.Job:
        """Validates the request as an offline one (or an evaluation) and queues it; the same idempotency key
        gives the same job."""
        key = request.idempotency_key
        if not MIN_PRIORITY <= request.priority <= MAX_PRIORITY:
            raise InvalidArgument.field("priority", f"must be {MIN_PRIORITY}..{MAX_PRIORITY}, got {request.priority}")
        if len(key) > MAX_KEY_CHARS or not key.isprintable():
            raise InvalidArgument.field("idempotency_key", f"must be at most {MAX_KEY_CHARS} printable characters")
        names = list(request.item_names)
        if any(len(n) > MAX_ITEM_NAME_CHARS or not n.isprintable() for n in names):
            raise InvalidArgument.field("item_names", f"each must be at most {MAX_ITEM_NAME_CHARS} printable "
                                                      "characters")
        if request.HasField("evaluation"):
            if request.HasField("request"):
                raise InvalidArgument.field("request", "set either request (an explanation job) or evaluation "
                                                       "(an evaluation job), not both")
            return await self._submit_evaluation(request, names)
        model = resolve_model(request.request.model, self.runner.models)
        if self.defaults is not None:
            model = self.defaults.apply(model)  # a request naming no method (or CAM layer) gets the adopted one
        job_id = uuid.uuid4().hex
        # Validated now so a bad request fails the call, not the job; off the loop: images decode here.
        spec = await asyncio.to_thread(validate_explain, request.request, model, self.runner.limits, offline=True,
                                       decoder=self.runner.decoder,
                                       request_id=job_id)
        if names and len(names) != spec.items:
            raise InvalidArgument.field("item_names", f"has {len(names)} names for {spec.items} items; give one "
                                                      "per item, or none")
        stored = pb.ExplainRequest()
        stored.CopyFrom(request.request)
        # Pinned, so the job runs the same model and keeps its request id whatever the defaults become.
        stored.request_id, stored.model = spec.request_id, model.name
        stored.method = codec.METHOD_ENUMS[spec.method]
        field = _PARAMS_FIELD[spec.method]
        if field in ("cam", "score_cam") and not getattr(stored, field).layer:
            getattr(stored, field).layer = spec.params.layer
        new = NewJob(id=job_id, priority=request.priority, idempotency_key=key, model=model.name,
                     method=stored.method, num_items=spec.items, request=stored.SerializeToString(),
                     item_names=json.dumps(names))
        job, created = await asyncio.to_thread(self.store.submit, new)
        if created:
            self.runner.wake()
        return job_proto(job)

    async def _submit_evaluation(self, request: pb.SubmitJobRequest, names: list[str]) -> pb.Job:
        from service.evaluation.validation import validate_evaluation

        job_id = uuid.uuid4().hex
        runner = self.runner
        checked = await asyncio.to_thread(validate_evaluation, request.evaluation, runner.models, runner.limits,
                                          runner.config.evaluation, runner.datasets, request_id=job_id,
                                          decoder=runner.decoder)
        items = checked.spec.items
        if names and len(names) != items:
            raise InvalidArgument.field("item_names", f"has {len(names)} names for {items} items; give one "
                                                      "per item, or none")
        new = NewJob(id=job_id, priority=request.priority, idempotency_key=request.idempotency_key,
                     model=checked.model.name, method=pb.METHOD_UNSPECIFIED, num_items=items,
                     request=checked.pinned.SerializeToString(), item_names=json.dumps(names or checked.item_names),
                     kind=EVALUATION)
        job, created = await asyncio.to_thread(self.store.submit, new)
        if created:
            self.runner.wake()
        return job_proto(job)

    async def get(self, request: pb.GetJobRequest, context=None) -> pb.Job:
        job = await asyncio.to_thread(self.store.get, _job_id(request.id))
        return await self._with_result(job, request.include_result)

    async def watch(self, request: pb.WatchJobRequest, context=None) -> AsyncIterator[pb.JobEvent]:
        """The job now, then each change in order; ends after the final state.

        The subscription opens before the store is read, so no change falls between
        the two; events not newer than what was sent are dropped. Without an event
        for `poll_s` the store is read again, which also follows jobs another
        process runs.
        """
        job_id = _job_id(request.id)
        with self.runner.events.subscribe(job_id) as events:
            job = await asyncio.to_thread(self.store.get, job_id)
            sent = None
            while True:
                if sent is None or order_key(job) > order_key(sent):
                    yield pb.JobEvent(job=await self._with_result(job, request.include_result))
                    sent = job
                if sent.final:
                    return
                job = (await events.get(timeout=self.runner.config.poll_s)
                       or await asyncio.to_thread(self.store.get, job_id))

    async def cancel(self, request: pb.CancelJobRequest, context=None) -> pb.Job:
        """QUEUED: CANCELLED at once. RUNNING: stopped at the next chunk; waits up to `cancel_wait_s` to say so."""
        job_id = _job_id(request.id)
        with self.runner.events.subscribe(job_id) as events:
            job = await asyncio.to_thread(self.store.cancel, job_id)
            if job.state == CANCELLED:
                self.runner.publish(job)
            elif job.state == RUNNING:
                job = await self._wait_stopped(job, events)
        return job_proto(job)

    async def _wait_stopped(self, job: JobRecord, events) -> JobRecord:
        self.runner.cancel(job.id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.runner.config.cancel_wait_s
        while not job.final and (left := deadline - loop.time()) > 0:
            event = await events.get(timeout=left)
            if event is None:
                break
            job = event
        if not job.final:  # perhaps stopped by another process's runner
            job = await asyncio.to_thread(self.store.get, job.id)
        return job

    async def list(self, request: pb.ListJobsRequest, context=None) -> pb.ListJobsResponse:
        states = list(request.states)
        unknown = [s for s in states if s not in ALL_STATES]
        if unknown:
            raise InvalidArgument.field("states", f"unknown job states {unknown}; use QUEUED, RUNNING, SUCCEEDED, "
                                                  "FAILED or CANCELLED")
        page_size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        jobs, token = await asyncio.to_thread(self.store.list, states, page_size, request.page_token)
        return pb.ListJobsResponse(jobs=[job_proto(j) for j in jobs], next_page_token=token)

    async def _with_result(self, job: JobRecord, include_result: bool) -> pb.Job:
        result = None
        if include_result and job.state == SUCCEEDED:
            result = await asyncio.to_thread(self.store.result, job.id)
        return job_proto(job, result)
