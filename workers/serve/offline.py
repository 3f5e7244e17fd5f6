"""The offline Serve application `attribution_offline`: one `OfflineWorker` deployment holding every
model, which streams a job's progress and result (workers/offline.py runs the job itself)."""
from __future__ import annotations

import dataclasses
import logging
from typing import AsyncIterator

import torch

from workers.errors import AttributionError, InternalError
from workers.evaluation.jobspec import EvaluationOutcome, EvaluationSpec
from workers.config import Limits, ModelConfig, OfflineConfig, model_config_from_dict, model_to_dict
from workers.models import ModelRegistry, select_device
from workers.offline import OfflineExecutor, chunk_rows
from workers.schema import build
from workers.spec import ExplainResult, ExplainSpec, ModelDescription
from workers.stages import ContextCache

log = logging.getLogger(__name__)

OFFLINE_APP = "attribution_offline"


class OfflineWorker:
    """The class behind the `OfflineWorker` deployment: every model, bounded job concurrency."""

    def __init__(self, models: list[dict], default_model: str = "", device: str = "auto",
                 cache_dir: str | None = None, offline: dict | None = None, limits: dict | None = None):
        cfg = build(OfflineConfig, offline, "jobs.offline")
        request_limits = build(Limits, limits, "server.limits")
        configs: list[ModelConfig] = [model_config_from_dict(m) for m in models]
        # Ray sets OMP_NUM_THREADS from num_cpus; be explicit, as the online worker is.
        torch.set_num_threads(max(1, cfg.threads or int(cfg.num_cpus)))
        registry = ModelRegistry(configs, default_model, select_device(device), cache_dir)
        self._contexts = ContextCache(registry, cfg.budget, request_limits, chunk_rows(cfg, request_limits))
        self._executor = OfflineExecutor(self._contexts.get, concurrency=cfg.max_ongoing_requests,
                                         items_per_chunk=cfg.items_per_chunk)
        log.info("offline worker ready for %s (%d jobs at once, %d torch threads)", ", ".join(registry.names()),
                 cfg.max_ongoing_requests, torch.get_num_threads())

    async def run(self, spec: ExplainSpec | EvaluationSpec
                  ) -> AsyncIterator[float | ExplainResult | EvaluationOutcome | AttributionError]:
        """Streams fractions then the result (an evaluation's `EvaluationOutcome`); a failure is the last
        item, typed (never raised through Ray)."""
        try:
            async for event in self._executor.stream(spec):
                yield event
        except AttributionError as exc:
            yield exc
        except Exception as exc:  # a bug or device fault: typed for the caller, traceback in the replica log
            log.exception("offline job %s failed", spec.request_id)
            yield InternalError(f"offline worker failure: {type(exc).__name__}")

    def describe(self) -> list[ModelDescription]:
        return self._contexts.describe()


def offline_deployment(cfg: OfflineConfig):
    """The Serve deployment object of the offline workers."""
    from ray import serve

    return serve.deployment(
        OfflineWorker,
        name="OfflineWorker",
        num_replicas=cfg.replicas,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus,
                           **({"resources": dict(cfg.resources)} if cfg.resources else {})},
        max_ongoing_requests=cfg.max_ongoing_requests,
        health_check_period_s=10,
        health_check_timeout_s=30,
    )


def build_offline_app(args: dict):
    """Serve `import_path` target: args = {models: [...], default_model, device, cache_dir, offline: {...}}."""
    cfg = build(OfflineConfig, args.get("offline"), "jobs.offline")
    return offline_deployment(cfg).bind(list(args["models"]), default_model=args.get("default_model", ""),
                                        device=args.get("device", "auto"), cache_dir=args.get("cache_dir") or None,
                                        offline=dataclasses.asdict(cfg), limits=args.get("limits"))


def offline_app_args(config, offline: OfflineConfig) -> dict:
    """`build_offline_app` arguments for a `workers.serve.app.AppConfig` (also what serve.yaml would carry)."""
    return {"models": [model_to_dict(m) for m in config.models], "default_model": config.default,
            "device": config.device, "cache_dir": config.cache_dir, "offline": dataclasses.asdict(offline),
            "limits": dataclasses.asdict(config.limits)}


def deploy_offline(config, offline: OfflineConfig = OfflineConfig()) -> str:
    """Deploys the offline application on the connected Ray cluster (after `deploy_all`); returns its name."""
    from ray import serve

    serve.start(proxy_location="Disabled")
    serve.run(build_offline_app(offline_app_args(config, offline)), name=OFFLINE_APP, route_prefix=None)
    return OFFLINE_APP
