"""The AttributionService RPCs over gRPC: the explain flow, the model descriptions, the job RPCs.

Explain and ExplainStream wrap `service.flow.ExplainFlow` (admit -> validate ->
backend -> encode -> metrics -> audit), which classifies every failure once by
service/errors.py; a unary call ends with that status, a streamed request
answers with `ExplainResponse.error` and the stream goes on.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from typing import AsyncIterator

import grpc

from service import errors
from service.model_info import model_info
from service._proto import attribution_pb2 as pb
from service._proto import attribution_pb2_grpc as pb_grpc
from service.flow import ExplainFlow
from service.interceptors import MalformedMessage, current_request_id
from service.validation import resolve_model
from workers import tracing
from workers.spec import ModelDescription

log = logging.getLogger(__name__)

_JOBS_UNIMPLEMENTED = ("offline jobs (SubmitJob, GetJob, WatchJob, CancelJob, ListJobs) are not enabled on "
                       "this server (it runs without an offline backend); use Explain or ExplainStream")
_DONE = object()


def _call_ended(context) -> bool:
    """The call is over (cancelled by the client or by its deadline): nothing sent now reaches the
    client, and aborting it would only log an error for a normal outcome."""
    return context.cancelled() or context.done()


class AttributionServicer(pb_grpc.AttributionServiceServicer):
    """Serves Explain, ExplainStream, ListModels and GetModel over one backend."""

    def __init__(self, flow: ExplainFlow, stream_max_in_flight: int = 8, jobs=None):
        self.flow = flow
        self._models = flow.models
        self._limits = flow.limits
        self._stream_max_in_flight = stream_max_in_flight
        self.jobs = jobs  # service.jobs.Jobs, when the server runs an offline queue

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
        return await self.flow.run(request, request_id, context.time_remaining,
                                   tracing.carrier_from_metadata(context.invocation_metadata()))

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
            # The unary call's rich status, details included (a BadRequest naming each bad field).
            rich = outcome.to_rpc_status()
            return pb.ExplainResponse(request_id=request_id, model=request.model, method=request.method,
                                      error=pb.ExplainError(code=rich.code, message=rich.message, details=rich.details))
        return outcome

    # ------------------------------------------------------------- models --

    @property
    def _job_items(self) -> int:
        """Items a SubmitJob request may carry here; 0 without an offline queue."""
        return self.jobs.runner.limits.max_items if self.jobs is not None else 0

    async def _describe(self, model: ModelDescription) -> pb.ModelInfo:
        """ModelInfo; with an offline queue, the adopted defaults and the latest evaluation's recommendation too."""
        if self.jobs is None or self.jobs.defaults is None:
            return model_info(model, self._limits, self._job_items)
        return await self.jobs.defaults.describe(model, self._limits, self._job_items)

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        try:
            return pb.ListModelsResponse(models=[await self._describe(m) for m in self._models.values()])
        except Exception as exc:
            await errors.abort_with(context, exc)

    async def GetModel(self, request: pb.GetModelRequest, context) -> pb.ModelInfo:
        try:
            return await self._describe(resolve_model(request.name, self._models))
        except Exception as exc:
            await errors.abort_with(context, exc)

    async def AdoptRecommendation(self, request: pb.AdoptRecommendationRequest, context) -> pb.ModelInfo:
        try:
            if self.jobs is None or self.jobs.defaults is None:
                raise errors.Unimplemented("recommendations come from evaluation jobs, which this server does not "
                                           "run (it runs without an offline backend)")
            return await self.jobs.defaults.adopt(request, self._models, self._limits, self._job_items)
        except Exception as exc:
            await errors.abort_with(context, exc)

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
