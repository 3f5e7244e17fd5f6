"""The AttributionService RPCs: decode -> validate -> backend -> encode.

Nothing here is model-specific: the model descriptions come from the backend
once at start, validation.py turns a request into an ExplainSpec, the backend
runs it, codec.py encodes the answer. Every failure is classified once by
service/errors.py; a unary call ends with that status, a streamed request
answers with `ExplainResponse.error` and the stream goes on.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from typing import AsyncIterator, Sequence

import grpc

from service import codec, errors
from service._proto import attribution_pb2 as pb
from service._proto import attribution_pb2_grpc as pb_grpc
from service.backend import ExplainBackend
from service.config import Limits
from service.decoding.pool import ImageDecoder
from service.interceptors import REQUEST_ID, MalformedMessage, current_request_id
from service.metrics import UNKNOWN, ServiceMetrics, Stopwatch
from workers.admission import Admission
from service.validation import estimate_cost, resolve_model, validate_explain
from workers.errors import Cancelled, DeadlineExceeded, Overloaded
from workers.spec import ModelDescription

log = logging.getLogger(__name__)

_JOBS_UNIMPLEMENTED = ("offline jobs (SubmitJob, GetJob, WatchJob, CancelJob, ListJobs) are not enabled on "
                       "this server (it runs without an offline backend); use Explain or ExplainStream")
_DONE = object()


def _with_default_flag(models: Sequence[ModelDescription]) -> dict[str, ModelDescription]:
    """Models by name, exactly one flagged default (the first when the backend flags none)."""
    if models and not any(m.is_default for m in models):
        models = [dataclasses.replace(models[0], is_default=True)] + list(models[1:])
    return {m.name: m for m in models}


def _call_ended(context) -> bool:
    """The call is over (cancelled by the client or by its deadline): nothing sent now reaches the
    client, and aborting it would only log an error for a normal outcome."""
    return context.cancelled() or context.done()


class AttributionServicer(pb_grpc.AttributionServiceServicer):
    """Serves Explain, ExplainStream, ListModels and GetModel over one backend."""

    def __init__(self, backend: ExplainBackend, models: Sequence[ModelDescription], limits: Limits,
                 metrics: ServiceMetrics, stream_max_in_flight: int = 8, decoder: ImageDecoder | None = None,
                 admission: Admission | None = None, max_explains: int = 0):
        self._backend = backend
        self._decoder = decoder
        self._models = _with_default_flag(models)
        self._limits = limits
        self._metrics = metrics
        self._stream_max_in_flight = stream_max_in_flight
        self.admission = admission or Admission()
        self._max_explains = max_explains  # concurrent explain calls; 0 = no limit (health is never limited)
        self._explaining = 0
        self.jobs = None    # service.jobs.Jobs, when the server runs an offline queue
        self.audit = None   # service.audit.AuditLog, when the server keeps an audit log

    @classmethod
    async def create(cls, backend: ExplainBackend, limits: Limits, metrics: ServiceMetrics,
                     stream_max_in_flight: int = 8, decoder: ImageDecoder | None = None,
                     admission: Admission | None = None, max_explains: int = 0) -> "AttributionServicer":
        """Fetches the model descriptions from the backend once and caches them."""
        return cls(backend, await backend.models(), limits, metrics, stream_max_in_flight, decoder, admission,
                   max_explains)

    @property
    def models(self) -> dict[str, ModelDescription]:
        return dict(self._models)


    # ------------------------------------------------------------ explain --

    async def Explain(self, request: pb.ExplainRequest, context) -> pb.ExplainResponse:
        outcome = await self._explain(request, context, request.request_id or current_request_id())
        if isinstance(outcome, errors.Status):
            if _call_ended(context):  # a deadline race: gRPC has ended the call already; nobody to tell
                return pb.ExplainResponse()
            try:
                await errors.abort(context, outcome)
            except grpc.aio.AbortError:
                raise
            except Exception:  # the call ended between the check and the abort: the same race, not a fault
                if _call_ended(context):
                    return pb.ExplainResponse()
                raise
        return outcome

    async def _explain(self, request: pb.ExplainRequest, context,
                       request_id: str) -> pb.ExplainResponse | errors.Status:
        """One request end to end; a failure comes back as its classified Status."""
        watch = Stopwatch()
        request_id = request_id or uuid.uuid4().hex
        REQUEST_ID.set(request_id)
        model_label, method_label, status = UNKNOWN, codec.METHOD_NAMES.get(request.method, UNKNOWN), errors.OK
        ticket, counted = None, False
        with self._metrics.track_inflight():
            try:
                model = resolve_model(request.model, self._models)
                model_label = model.name
                if self._max_explains and self._explaining >= self._max_explains:
                    raise Overloaded(f"this server is answering {self._explaining} explain calls, its limit "
                                     "(server.max_concurrent_rpcs); retry after the suggested delay",
                                     retry_after_s=0.1, reason="concurrency")
                self._explaining += 1
                counted = True
                # Before any decoding: a refusal costs microseconds, not a validation.
                admission = self.admission.model(model.name)
                estimate = estimate_cost(request, self._limits)
                if estimate is not None:
                    ticket = admission.admit(estimate, context.time_remaining())
                # Off the event loop: image decoding and map encoding are real CPU work,
                # and the loop must keep serving health checks and other streams.
                spec = await asyncio.to_thread(validate_explain, request, model, self._limits,
                                               request_id=request_id, time_remaining=context.time_remaining(),
                                               decoder=self._decoder)
                if ticket is None:  # its declared sizes were out of bounds: admitted on the validated cost
                    ticket = admission.admit(spec.cost, context.time_remaining())
                else:
                    ticket.resize(spec.cost)
                if spec.deadline is not None and time.time() >= spec.deadline:
                    self._metrics.dropped.labels("front_door").inc()
                    raise DeadlineExceeded("the deadline passed before the request reached a worker; it was "
                                           "not computed")
                result = await self._backend.explain(spec)
                admission.observe_batch(result.batch_samples, result.compute_ms)
                ticket.release(completed=True)
                response = await asyncio.to_thread(codec.encode_result, result, spec, model)
                self._metrics.observe_result(spec, result)
                response.timings.total_ms = watch.seconds * 1e3
                if self.audit is not None:  # after total_ms: the record holds the final response
                    await self.audit.record_async(spec, response)
                return response
            except asyncio.CancelledError:  # the client went away or its deadline passed
                remaining = context.time_remaining()
                late = remaining is not None and remaining <= 0
                status = errors.classify(DeadlineExceeded("the deadline passed") if late
                                         else Cancelled("the call was cancelled"))
                raise
            except Exception as exc:  # every failure is classified here, once; no traceback leaves the server
                status = errors.classify(exc)
                if status.reason:
                    self._metrics.rejected.labels(model_label, status.reason).inc()
                return status
            finally:
                if ticket is not None:
                    ticket.release(completed=False)  # a no-op when the result already released it
                if counted:
                    self._explaining -= 1
                self._metrics.observe_request(model_label, method_label, status.code_name, watch.seconds)

    async def ExplainStream(self, request_iterator: AsyncIterator[pb.ExplainRequest],
                            context) -> AsyncIterator[pb.ExplainResponse]:
        """Answers requests concurrently, at most `stream_max_in_flight` at once.

        A slot is held from the moment a request is read until its response is
        handed to gRPC, so a client that stops reading also stops the server
        from reading (and buffering) more.
        """
        responses: asyncio.Queue = asyncio.Queue()
        slots = asyncio.Semaphore(self._stream_max_in_flight)
        pending: set[asyncio.Task] = set()

        async def answer(request: pb.ExplainRequest) -> None:
            responses.put_nowait(await self._stream_response(request, context))

        async def read_all() -> None:
            async for request in request_iterator:
                await slots.acquire()
                if isinstance(request, MalformedMessage):  # the stream goes on, as after any failed request
                    responses.put_nowait(pb.ExplainResponse(error=pb.ExplainError(
                        code=errors.Status(grpc.StatusCode.INVALID_ARGUMENT, "").code_number,
                        message=request.message)))
                    continue
                task = asyncio.create_task(answer(request))
                pending.add(task)
                task.add_done_callback(pending.discard)
            if pending:
                await asyncio.wait(list(pending))

        reader = asyncio.create_task(read_all())
        reader.add_done_callback(lambda _: responses.put_nowait(_DONE))
        try:
            while (item := await responses.get()) is not _DONE:
                yield item
                slots.release()
            reader.result()  # a failed read fails the stream
        finally:
            reader.cancel()
            for task in list(pending):
                task.cancel()

    async def _stream_response(self, request: pb.ExplainRequest, context) -> pb.ExplainResponse:
        request_id = request.request_id or uuid.uuid4().hex
        outcome = await self._explain(request, context, request_id)
        if isinstance(outcome, errors.Status):
            return pb.ExplainResponse(request_id=request_id, model=request.model, method=request.method,
                                      error=pb.ExplainError(code=outcome.code_number, message=outcome.message))
        return outcome

    # ------------------------------------------------------------- models --

    @property
    def _job_items(self) -> int:
        """Items a SubmitJob request may carry here; 0 without an offline queue."""
        return self.jobs.runner.limits.max_items if self.jobs is not None else 0

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[codec.model_info(m, self._limits, self._job_items)
                                             for m in self._models.values()])

    async def GetModel(self, request: pb.GetModelRequest, context) -> pb.ModelInfo:
        try:
            model = resolve_model(request.name, self._models)
        except Exception as exc:
            await errors.abort_with(context, exc)
        return codec.model_info(model, self._limits, self._job_items)

    # --------------------------------------------------------------- jobs --

    async def SubmitJob(self, request, context):
        return await self._delegate_job("submit", request, context)

    async def GetJob(self, request, context):
        return await self._delegate_job("get", request, context)

    async def CancelJob(self, request, context):
        return await self._delegate_job("cancel", request, context)

    async def ListJobs(self, request, context):
        return await self._delegate_job("list", request, context)

    async def WatchJob(self, request, context):
        try:
            if self.jobs is None:
                raise errors.Unimplemented(_JOBS_UNIMPLEMENTED)
            async for event in self.jobs.service.watch(request, context):
                yield event
        except Exception as exc:
            await errors.abort_with(context, exc)

    async def _delegate_job(self, name: str, request, context):
        try:
            if self.jobs is None:
                raise errors.Unimplemented(_JOBS_UNIMPLEMENTED)
            return await getattr(self.jobs.service, name)(request, context)
        except Exception as exc:
            await errors.abort_with(context, exc)
