"""Each model's recommendation, and the defaults an operator adopted from it.

An evaluation job that ends SUCCEEDED stores its `Recommendation` beside its result. GetModel and
ListModels report the model's latest one (`ModelInfo.recommendation`); `AdoptRecommendation` stores
one (the latest, or a named job's) as the model's adopted defaults in the job store, so it survives
restarts and every front door on a shared store sees it. An adopted recommendation makes:
    ModelInfo.default_method = its method: an ExplainRequest (or job) naming no method gets it;
    ModelInfo.default_cam_layer = its CAM layer: a CAM request naming no layer gets it.
Nothing adopted: METHOD_UNSPECIFIED is refused as before, and the config's CAM layer stays the default.

`ModelDefaults.apply(model)` is on the Explain path, so it reads a cached copy of the adoptions,
re-read from the store in the background at most every `refresh_s` (another front door's adoption
shows here within that time; this front door's own at once).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Mapping

from service import codec
from service.model_info import model_info
from service._proto import attribution_pb2 as pb
from service.validation import resolve_model
from workers.errors import FailedPrecondition, InvalidArgument
from workers.spec import ModelDescription

if TYPE_CHECKING:  # service.jobs imports this module: no import of it at load
    from service.jobs.records import JobStore

log = logging.getLogger(__name__)


class ModelDefaults:
    """The adopted recommendations of a store's models, cached for the Explain path."""

    def __init__(self, store: JobStore, refresh_s: float = 2.0):
        self.store, self.refresh_s = store, refresh_s
        self._adopted: dict[str, pb.Recommendation] = {}
        self._read_at = float("-inf")
        self._refreshing: asyncio.Task | None = None

    def load(self) -> None:
        """Reads the adoptions now (blocking)."""
        self._adopted = {model: pb.Recommendation.FromString(blob) for model, blob in self.store.adoptions().items()}
        self._read_at = time.monotonic()

    def _maybe_refresh(self) -> None:
        if time.monotonic() - self._read_at < self.refresh_s or (self._refreshing and not self._refreshing.done()):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._read_at = time.monotonic()  # one refresh at a time, even when it fails
        self._refreshing = loop.create_task(self._refresh())

    async def _refresh(self) -> None:
        try:
            await asyncio.to_thread(self.load)
        except Exception as exc:  # the store is unreachable for now: keep what was read last
            log.warning("reading the adopted recommendations failed: %s", exc)

    def adopted(self, model: str) -> pb.Recommendation | None:
        self._maybe_refresh()
        return self._adopted.get(model)

    def apply(self, model: ModelDescription) -> ModelDescription:
        """`model` with its adopted method and CAM layer as its defaults (itself when nothing is adopted)."""
        chosen = self.adopted(model.name)
        if chosen is None:
            return model
        method = codec.METHOD_NAMES.get(chosen.method, "")
        layer = chosen.cam_layer if chosen.cam_layer in model.cam_layers else model.default_cam_layer
        return dataclasses.replace(model, default_method=method if method in model.online_methods else "",
                                   default_cam_layer=layer)

    async def describe(self, model: ModelDescription, limits, max_job_items: int) -> pb.ModelInfo:
        """ModelInfo with the adopted defaults and the latest recommendation."""
        info = model_info(self.apply(model), limits, max_job_items)
        latest = await asyncio.to_thread(self.store.recommendation, model.name)
        if latest is not None:
            info.recommendation.ParseFromString(latest[1])
            adopted = self._adopted.get(model.name)
            info.recommendation.adopted = adopted is not None and adopted.evaluation_job_id == latest[0]
        return info

    async def adopt(self, request: pb.AdoptRecommendationRequest, models: Mapping[str, ModelDescription],
                    limits, max_job_items: int) -> pb.ModelInfo:
        """Stores the recommendation of `request.evaluation_job_id` (else the model's latest) as adopted."""
        model = resolve_model(request.model, models)
        job_id = request.evaluation_job_id
        if job_id:
            job = await asyncio.to_thread(self.store.get, job_id)  # JobNotFound: NOT_FOUND
            if not job.is_evaluation or job.model != model.name:
                raise InvalidArgument.field("evaluation_job_id", f"job {job_id} is not an evaluation of model "
                                                                 f"{model.name!r}")
            if job.state != pb.SUCCEEDED:
                raise FailedPrecondition(f"evaluation {job_id} is {pb.JobState.Name(job.state)}; only a SUCCEEDED "
                                         "evaluation's recommendation can be adopted")
        found = await asyncio.to_thread(self.store.recommendation, model.name, job_id)
        if found is None:
            what = f"evaluation {job_id} made no recommendation (no method passed its checks)" if job_id else \
                f"model {model.name!r} has no succeeded evaluation with a recommendation; run an evaluation job first"
            raise FailedPrecondition(what)
        chosen = pb.Recommendation.FromString(found[1])
        if codec.METHOD_NAMES.get(chosen.method, "") not in model.online_methods:
            raise FailedPrecondition(f"the recommendation is {pb.Method.Name(chosen.method)}, which model "
                                     f"{model.name!r} serves as jobs only: it cannot be the default of Explain "
                                     "requests; name it in your job requests instead")
        chosen.adopted = True
        await asyncio.to_thread(self.store.adopt, model.name, found[0], chosen.SerializeToString())
        self._adopted[model.name] = chosen
        log.info("model %s: adopted %s%s from evaluation %s", model.name, pb.Method.Name(chosen.method),
                 f" at {chosen.cam_layer}" if chosen.cam_layer else "", found[0])
        return await self.describe(model, limits, max_job_items)
