"""The front door's backend on Ray Serve: one deployment handle per model application.

Handles route straight to the model's `OnlineWorker` replicas (Serve picks the
least-loaded one); requests that arrive together travel as one call
(service/backends/coalesce.py). Each request's "ray.handle_call" span is the parent of its
replica-side spans (workers/tracing.py); a coalesced call gets a span linked to its members'.
Ray's own failures are translated here into the project's error tree, so nothing
Ray-specific reaches the servicer.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from service.backends.coalesce import Coalescer
from service.backends.limiter import GradientLimit
from workers import tracing
from workers.serve.app import APP_PREFIX, AppConfig, app_name
from workers.errors import (AttributionError, DeadlineExceeded, InternalError, ModelNotFound, Overloaded,
                            Unavailable)
from workers.spec import ExplainResult, ExplainSpec, ModelDescription

log = logging.getLogger(__name__)


class ServeBackend:
    def __init__(self, models: list[str], default: str = "", coalesce_max_requests: int = 32,
                 coalesce_max_cost: int = 256, autoscaled: frozenset[str] = frozenset(),
                 max_in_flight_per_replica: int = 4, adaptive_in_flight: bool = False):
        from ray import serve

        if not models:
            raise Unavailable("no attribution applications are deployed on this Ray cluster")
        self.default = default or models[0]
        # Serve's autoscaler counts ongoing requests: these models get one call per request.
        self._alone = frozenset(autoscaled)
        self._handles = {name: serve.get_app_handle(app_name(name)) for name in models}
        self._closed = False
        self._live: dict[str, int] = {}  # running replicas per model, from `refresh_replicas`
        # Set when a call finds a replica gone, so health is re-read at once (service/server.py).
        self.replicas_changed = asyncio.Event()
        self.max_in_flight_per_replica = max_in_flight_per_replica
        # With adaptive_in_flight, max_in_flight_per_replica is the ceiling of a limit learnt per model
        # from the calls' latency (service/backends/limiter.py); else it is the limit.
        self.adaptive_in_flight = adaptive_in_flight and max_in_flight_per_replica > 0
        self.limiters: dict[str, GradientLimit] = {}
        self.coalescer = Coalescer(self._dispatch, self._call, coalesce_max_requests, coalesce_max_cost,
                                   limit=self._call_limit,
                                   observe=self._observe_call if self.adaptive_in_flight else None)

    def _limiter(self, model: str) -> GradientLimit:
        if model not in self.limiters:
            self.limiters[model] = GradientLimit(initial=min(4, self.max_in_flight_per_replica),
                                                 max_limit=self.max_in_flight_per_replica)
        return self.limiters[model]

    def _per_replica_limit(self, model: str) -> int:
        return self._limiter(model).limit if self.adaptive_in_flight else self.max_in_flight_per_replica

    def _call_limit(self, model: str) -> int:
        """Calls in flight allowed for `model`: a few per running replica (0 = unbounded).

        Autoscaled models are not bounded: Serve scales them on the requests it sees ongoing."""
        if model in self._alone or self.max_in_flight_per_replica <= 0:
            return 0
        return self._per_replica_limit(model) * max(1, self._live.get(model, 1))

    def _observe_call(self, model: str, seconds: float, cost: int, in_flight: int) -> None:
        if model in self._alone:
            return
        replicas = max(1, self._live.get(model, 1))
        self._limiter(model).observe(seconds, cost, -(-in_flight // replicas))

    @classmethod
    def from_config(cls, config: AppConfig, **options) -> "ServeBackend":
        return cls([m.name for m in config.models], config.default,
                   autoscaled=frozenset(m.name for m in config.models if m.autoscaling), **options)

    @classmethod
    def discover(cls, default: str = "", **options) -> "ServeBackend":
        """Attaches to the running `attribution-*` applications of the connected cluster."""
        from ray import serve

        running, autoscaled = [], set()
        for name, app in serve.status().applications.items():
            if name.startswith(APP_PREFIX) and str(app.status).endswith("RUNNING"):
                running.append(name[len(APP_PREFIX):])
                if _autoscales(name):
                    autoscaled.add(name[len(APP_PREFIX):])
        return cls(sorted(running), default, autoscaled=frozenset(autoscaled), **options)

    def _handle(self, model: str):
        name = model or self.default
        if name not in self._handles:
            raise ModelNotFound(name, list(self._handles))
        return self._handles[name]

    async def models(self) -> list[ModelDescription]:
        return list(await asyncio.gather(*(self._call(h.describe.remote()) for h in self._handles.values())))

    async def explain(self, spec: ExplainSpec) -> ExplainResult:
        if self._closed:
            raise Unavailable("the service is shutting down")
        name = spec.model or self.default
        if self._live.get(name) == 0:
            raise Unavailable(f"no replica of model {name!r} is running right now; Serve is starting one",
                              retry_after_s=1.0)
        timeout = None if spec.deadline is None else spec.deadline - time.time()
        if timeout is not None and timeout <= 0:
            raise DeadlineExceeded("the deadline passed before the request reached a worker; it was not computed")
        self._handle(name)  # unknown models fail here, before coalescing
        # The handle call's span: the replica's spans (queue, kernel) are its children, through the
        # context the spec carries across the hop; coalesced or not, each request keeps its own trace.
        with tracing.span("ray.handle_call", kind=tracing.SpanKind.CLIENT,
                          attributes={"attribution.model": name}) as span:
            if span.is_recording():
                spec.trace = tracing.inject()
            # A timeout or a cancelled caller cancels the future; the coalescer cancels the Ray
            # request once no member of its call is waiting (a Ray handle never does so by itself).
            try:
                outcome = await asyncio.wait_for(self.coalescer.submit(name, spec, alone=name in self._alone),
                                                 timeout)
            except asyncio.TimeoutError:
                raise DeadlineExceeded("the deadline passed while the request was queued or computing") from None
            if isinstance(outcome, AttributionError):
                raise outcome
            if span.is_recording():
                span.set_attributes({"attribution.batch_requests": outcome.batch_requests,
                                     "attribution.queue_ms": outcome.queue_ms,
                                     "attribution.compute_ms": outcome.compute_ms})
            return outcome

    def _dispatch(self, model: str, specs: list[ExplainSpec]):
        handle = self._handle(model)
        if len(specs) == 1:
            return handle.explain.remote(specs[0])
        if tracing.enabled():  # one call for several traces: a span of its own, linked to each member's
            links = [link for link in map(tracing.link, (s.trace for s in specs)) if link is not None]
            with tracing.span("ray.coalesced_call", context=tracing.Context(), kind=tracing.SpanKind.CLIENT,
                              links=links, attributes={"attribution.model": model,
                                                       "attribution.requests": len(specs)}):
                return handle.explain_many.remote(specs)
        return handle.explain_many.remote(specs)

    def live_replicas(self) -> dict[str, int]:
        """Running replicas per model as last read (empty before the first `refresh_replicas`)."""
        return dict(self._live)

    async def refresh_replicas(self) -> dict[str, int]:
        """Reads Serve's status: how many replicas of each model's worker are RUNNING."""
        from ray import serve

        status = await asyncio.to_thread(serve.status)
        live = {}
        for name in self._handles:
            app = status.applications.get(app_name(name))
            count = 0
            if app is not None:
                for deployment in app.deployments.values():
                    count += int(deployment.replica_states.get("RUNNING", 0))
            live[name] = count
        self._live = live
        return live

    async def call(self, model: str, method: str, *args):
        """Calls any other worker method (batching settings, device memory)."""
        return await self._call(getattr(self._handle(model), method).remote(*args))

    async def _call(self, response):
        return await ray_call(response, self.replicas_changed.set)

    async def close(self) -> None:
        self._closed = True
        await self.coalescer.close()


def _autoscales(app: str) -> bool:
    """Whether a deployment of the running application `app` has an autoscaling config.

    Read from Serve's instance details (what `serve status` and the dashboard show; Ray 2.58's
    client has no public call for one application's config). Unknown counts as not autoscaling.
    """
    try:
        from ray.serve.context import _get_global_client

        details = _get_global_client().get_serve_details()
        deployments = details["applications"][app]["deployments"].values()
        return any((d.get("deployment_config") or {}).get("autoscaling_config") for d in deployments)
    except Exception as exc:  # an older or newer Serve shape: coalesce as for any model
        log.warning("cannot read whether %s autoscales (%s); its requests may be coalesced", app,
                    type(exc).__name__)
        return False


async def ray_call(response, on_replica_lost: Callable[[], None] | None = None):
    """Awaits a Serve response, translating Ray's failures into `workers.errors` (for online and offline calls)."""
    from ray.exceptions import RayActorError, RayTaskError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError

    try:
        return await response
    except BackPressureError:
        raise Overloaded("the model's queue is full; retry with backoff", retry_after_s=0.2,
                         reason="backpressure") from None
    except (RayActorError, DeploymentUnavailableError) as exc:
        if on_replica_lost is not None:
            on_replica_lost()
        raise Unavailable(f"no healthy worker for this model right now ({type(exc).__name__})",
                          retry_after_s=1.0) from None
    except RequestCancelledError:
        raise DeadlineExceeded("the request was cancelled before it finished") from None
    except RayTaskError as exc:
        cause = exc.cause if isinstance(getattr(exc, "cause", None), AttributionError) else None
        if cause is not None:
            raise cause from None
        log.error("worker call failed: %s", exc)
        raise InternalError("a worker failed while explaining") from None
