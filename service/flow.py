"""One Explain request end to end, whatever transport carries it.

admit (cost and deadline) -> validate and decode (off the loop) -> the backend ->
encode (off the loop) -> metrics -> audit, each a span of the request's trace
(workers/tracing.py). The gRPC servicer (service/servicer.py) wraps it for Explain and ExplainStream; everything here speaks `ExplainRequest`,
`ExplainResponse` and the project's error tree, never a gRPC context.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
import uuid
from typing import Callable, Sequence

from service import codec, errors
from service._proto import attribution_pb2 as pb
from service.backends.protocol import ExplainBackend
from service.config import Limits
from service.decoding.pool import ImageDecoder
from service.interceptors import REQUEST_ID
from service.metrics import UNKNOWN, ServiceMetrics, Stopwatch
from service.validation import estimate_cost, resolve_model, validate_explain
from workers import tracing
from workers.admission import Admission
from workers.errors import Cancelled, DeadlineExceeded, Overloaded
from workers.spec import ModelDescription


def with_default_flag(models: Sequence[ModelDescription]) -> dict[str, ModelDescription]:
    """Models by name, exactly one flagged default (the first when the backend flags none)."""
    if models and not any(m.is_default for m in models):
        models = [dataclasses.replace(models[0], is_default=True)] + list(models[1:])
    return {m.name: m for m in models}


class ExplainFlow:
    """The explain path over one backend, its models (described once at start) and its collaborators."""

    def __init__(self, backend: ExplainBackend, models: Sequence[ModelDescription], limits: Limits,
                 metrics: ServiceMetrics, decoder: ImageDecoder | None = None, admission: Admission | None = None,
                 max_explains: int = 0, audit=None, inline_max_bytes: int = 64 * 1024, inline_max_calls: int = 0,
                 shedder=None):
        self._backend = backend
        self.models = with_default_flag(models)
        self.limits = limits
        self._metrics = metrics
        self._decoder = decoder
        self.admission = admission or Admission()
        self._max_explains = max_explains  # concurrent explain calls; 0 = no limit (health is never limited)
        self._explaining = 0
        self.audit = audit  # service.audit.AuditLog, when the server keeps an audit log
        # Requests and results at most this big are validated and encoded on the event loop.
        self.inline_max_bytes = inline_max_bytes
        self.inline_max_calls = inline_max_calls  # ... while at most this many calls are in progress (0: always)
        self.shedder = shedder  # service.loop_lag.LagShedder: refuses while this process's loop runs late
        self.defaults = None  # service.evaluation.defaults.ModelDefaults, when the server runs evaluation jobs

    def _inline(self) -> bool:
        """Few calls in progress: the loop has time for small work, and a thread hop would cost more.
        Under load the loop itself is the bottleneck, and worker threads overlap their work with it."""
        return self.inline_max_bytes > 0 and (self.inline_max_calls <= 0 or self._explaining <= self.inline_max_calls)

    def _small_request(self, request: pb.ExplainRequest) -> bool:
        return (self._inline() and request.inputs.WhichOneof("source") == "tensor"
                and request.ByteSize() <= self.inline_max_bytes)

    def _small_result(self, spec, result) -> bool:
        if not self._inline() or spec.output.png_overlay:
            return False
        values = sum(a.map.numel() for item in result.items for a in item.attributions)
        return values * 4 <= self.inline_max_bytes

    async def run(self, request: pb.ExplainRequest, request_id: str,
                  time_remaining: Callable[[], float | None],
                  trace: dict[str, str] | None = None) -> pb.ExplainResponse | errors.Status:
        """One request end to end; a failure comes back as its classified Status.

        `time_remaining()` is the caller's deadline in seconds from now (None: no deadline).
        `trace`: the client's W3C trace context (its `traceparent` metadata), the parent of this
        request's spans (workers/tracing.py); the spec carries it on, so the audit record names the trace.
        """
        with tracing.span("Explain", context=tracing.extract(trace), kind=tracing.SpanKind.SERVER) as span:
            outcome = await self._run(request, request_id, time_remaining, trace, span)
            if isinstance(outcome, errors.Status) and span.is_recording():
                span.set_attribute("rpc.grpc.status_code", outcome.code_number)
                span.set_status(tracing.StatusCode.ERROR, outcome.code_name)
            return outcome

    async def _run(self, request: pb.ExplainRequest, request_id: str, time_remaining: Callable[[], float | None],
                   trace: dict[str, str] | None, span) -> pb.ExplainResponse | errors.Status:
        watch = Stopwatch()
        request_id = request_id or uuid.uuid4().hex
        REQUEST_ID.set(request_id)
        model_label, method_label, status = UNKNOWN, codec.METHOD_NAMES.get(request.method, UNKNOWN), errors.OK
        if span.is_recording():
            span.set_attributes({"attribution.request_id": request_id, "attribution.method": method_label})
        ticket, counted = None, False
        with self._metrics.track_inflight():
            try:
                model = resolve_model(request.model, self.models)
                if self.defaults is not None:  # the adopted method and CAM layer, when the request names none
                    model = self.defaults.apply(model)
                model_label = model.name
                if self._max_explains and self._explaining >= self._max_explains:
                    raise Overloaded(f"this server is answering {self._explaining} explain calls, its limit "
                                     "(server.max_concurrent_rpcs); retry after the suggested delay",
                                     retry_after_s=0.1, reason="concurrency")
                if self.shedder is not None and self.shedder.should_shed():
                    lag = self.shedder.lag.lag
                    raise Overloaded(f"this front door is saturated (its event loop runs {lag * 1e3:.0f} ms late); "
                                     "retry after the suggested delay, or on another instance",
                                     retry_after_s=min(1.0, max(0.05, 4 * lag)), reason="front_door_busy")
                self._explaining += 1
                counted = True
                # Before any decoding: a refusal costs microseconds, not a validation.
                admission = self.admission.model(model.name)
                with tracing.span("admission"):
                    estimate = estimate_cost(request, self.limits)
                    if estimate is not None:
                        ticket = admission.admit(estimate, time_remaining())
                # Off the event loop when it is real CPU work (images to decode, large tensors), so
                # the loop keeps serving health checks and other streams; a small tensor request is
                # validated inline, where the thread hop would cost more than the work.
                validate = functools.partial(validate_explain, request, model, self.limits, request_id=request_id,
                                             time_remaining=time_remaining(), decoder=self._decoder)
                with tracing.span("validate") as step:
                    spec = validate() if self._small_request(request) else await asyncio.to_thread(validate)
                    if step.is_recording():
                        step.set_attributes({"attribution.items": spec.items, "attribution.cost": spec.cost})
                if ticket is None:  # its declared sizes were out of bounds: admitted on the validated cost
                    ticket = admission.admit(spec.cost, time_remaining())
                else:
                    ticket.resize(spec.cost)
                if spec.deadline is not None and time.time() >= spec.deadline:
                    self._metrics.dropped.labels("front_door").inc()
                    raise DeadlineExceeded("the deadline passed before the request reached a worker; it was "
                                           "not computed")
                with tracing.span("backend", attributes={"attribution.model": model.name}):
                    # The workers' spans continue this one (a Serve backend hands on its call's own span);
                    # untraced here, the client's context still travels, for the audit record.
                    spec.trace = (tracing.inject() if span.is_recording() else None) or trace
                    result = await self._backend.explain(spec)
                admission.observe_batch(result.batch_samples, result.compute_ms)
                ticket.release(completed=True)
                encode = functools.partial(codec.encode_result, result, spec, model)
                with tracing.span("encode"):
                    response = encode() if self._small_result(spec, result) else await asyncio.to_thread(encode)
                self._metrics.observe_result(spec, result)
                response.timings.total_ms = watch.seconds * 1e3
                if self.audit is not None:  # after total_ms: the record holds the final response
                    with tracing.span("audit"):
                        await self.audit.record_async(spec, response)
                return response
            except asyncio.CancelledError:  # the client went away or its deadline passed
                remaining = time_remaining()
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

