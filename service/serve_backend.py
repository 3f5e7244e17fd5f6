"""The front door's backend on Ray Serve: one deployment handle per model application.

Handles route straight to the model's `OnlineWorker` replicas (Serve picks the
least-loaded one). Ray's own failures are translated here into the project's
error tree, so nothing Ray-specific reaches the servicer.
"""
from __future__ import annotations

import asyncio
import logging
import time

from workers.app import APP_PREFIX, AppConfig, app_name
from workers.errors import (AttributionError, DeadlineExceeded, InternalError, ModelNotFound, Overloaded,
                            Unavailable)
from workers.spec import ExplainResult, ExplainSpec, ModelDescription

log = logging.getLogger(__name__)


class ServeBackend:
    def __init__(self, models: list[str], default: str = ""):
        from ray import serve

        if not models:
            raise Unavailable("no attribution applications are deployed on this Ray cluster")
        self.default = default or models[0]
        self._handles = {name: serve.get_app_handle(app_name(name)) for name in models}
        self._closed = False
        self._live: dict[str, int] = {}  # running replicas per model, from `refresh_replicas`

    @classmethod
    def from_config(cls, config: AppConfig) -> "ServeBackend":
        return cls([m.name for m in config.models], config.default)

    @classmethod
    def discover(cls, default: str = "") -> "ServeBackend":
        """Attaches to the running `attribution-*` applications of the connected cluster."""
        from ray import serve

        running = [name[len(APP_PREFIX):] for name, app in serve.status().applications.items()
                   if name.startswith(APP_PREFIX) and str(app.status).endswith("RUNNING")]
        return cls(sorted(running), default)

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
        response = self._handle(spec.model).explain.remote(spec)
        try:
            outcome = await asyncio.wait_for(self._call(response), timeout)
        except asyncio.TimeoutError:
            response.cancel()
            raise DeadlineExceeded("the deadline passed while the request was queued or computing") from None
        except asyncio.CancelledError:
            # The client cancelled or its deadline came first: a Ray handle does not cancel the
            # request by itself, and the replica would compute it for nobody.
            response.cancel()
            raise
        if isinstance(outcome, AttributionError):
            raise outcome
        return outcome

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

    @staticmethod
    async def _call(response):
        from ray.exceptions import RayActorError, RayTaskError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError

        try:
            return await response
        except BackPressureError:
            raise Overloaded("the model's queue is full; retry with backoff", retry_after_s=0.2,
                             reason="backpressure") from None
        except (RayActorError, DeploymentUnavailableError) as exc:
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

    async def close(self) -> None:
        self._closed = True
