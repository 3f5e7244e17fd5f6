"""The job runner's side of the offline workers: what runs a job's spec, whatever runs it.

`ServeOfflineBackend` streams from the `attribution_offline` Serve application
(`handle.options(stream=True).run`); `workers.offline.LocalOfflineWorker` is the
in-process twin. Both yield progress fractions, then the `ExplainResult`, and raise
only `workers.errors` types. Closing the stream early cancels the request: on
Serve the replica's generator gets CancelledError and sets the flag the kernel
reads between chunks.
"""
from __future__ import annotations

import logging
from typing import AsyncIterator, Protocol

from service.backends.serve import ray_call
from workers.errors import AttributionError, Unavailable
from workers.serve.offline import OFFLINE_APP
from workers.spec import ExplainResult, ExplainSpec

log = logging.getLogger(__name__)


class OfflineBackend(Protocol):
    def run(self, spec: ExplainSpec) -> AsyncIterator[float | ExplainResult]:
        """Fractions done (0..1, not necessarily distinct), then the result; closing it early cancels."""

    async def close(self) -> None:
        """Releases what the backend holds; idempotent."""


class ServeOfflineBackend:
    """Streams offline specs to the `OfflineWorker` replicas of one Serve application."""

    def __init__(self, app: str = OFFLINE_APP):
        from ray import serve

        self.app = app
        self._handle = serve.get_app_handle(app).options(stream=True)
        self._closed = False

    async def run(self, spec: ExplainSpec) -> AsyncIterator[float | ExplainResult]:
        if self._closed:
            raise Unavailable("the service is shutting down")
        stream = self._handle.run.remote(spec)
        finished = False
        try:
            while True:
                try:
                    # The online backend's mapping of Ray failures (dead replica ->
                    # Unavailable, ...) applies to each step of the stream as well.
                    item = await ray_call(stream.__anext__())
                except StopAsyncIteration:
                    finished = True
                    return
                if isinstance(item, AttributionError):
                    finished = True
                    raise item
                yield item
        finally:
            if not finished:
                # The caller stopped reading (job cancelled, service stopping): stop the replica too.
                stream.cancel()

    async def close(self) -> None:
        self._closed = True
