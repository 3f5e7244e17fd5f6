"""Build the Ray Serve applications from config: what `serve run` / `serve deploy` load.

One application per model, named `attribution-<model>`, whose ingress is that
model's `OnlineWorker` deployment. The front door calls each application's
handle directly (no router hop). `build_online_app` is the `import_path` that
deploy/serve.yaml names; `deploy_all` is what `attribution serve` calls.
"""
from __future__ import annotations

import dataclasses
import pathlib
from dataclasses import dataclass, field
from typing import Any

from workers.config import BatchingConfig, Limits, ModelConfig, model_config_from_dict
from workers.errors import InvalidArgument
from workers.schema import build, check, refuse_unknown

APP_PREFIX = "attribution-"


def app_name(model: str) -> str:
    return APP_PREFIX + model


@dataclass(frozen=True)
class AppConfig:
    """The worker side of the one config: models, batching, device, cache."""

    models: tuple[ModelConfig, ...] = (ModelConfig(name="demo", source="demo"),)
    default_model: str = ""
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    # The front door's limits (`server.limits`), which the kernels enforce too; set by ServiceConfig.
    limits: Limits = field(default_factory=Limits)
    device: str = "auto"           # auto | cpu | cuda | cuda:N
    cache_dir: str = ""            # demo model cache; "" = the user's cache directory

    def __post_init__(self):
        names = [m.name for m in self.models]
        if not names:
            raise InvalidArgument.field("models", "configure at least one model")
        if len(set(names)) != len(names):
            raise InvalidArgument.field("models", f"model names must be unique: {names}")
        if self.default_model and self.default_model not in names:
            raise InvalidArgument.field("default_model", f"{self.default_model!r} is not among {names}")

    @property
    def default(self) -> str:
        return self.default_model or self.models[0].name

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> "AppConfig":
        """The worker sections of a config (models, default_model, batching, device, cache_dir)."""
        raw = dict(raw or {})
        refuse_unknown(cls, raw, "")
        check("limits" not in raw, "limits", "belongs in the server section: server.limits")
        models = raw.pop("models", None)
        if models is not None:
            check(isinstance(models, list), "models", "must be a list of models")
            models = tuple(model_config_from_dict(m, f"models[{i}]") for i, m in enumerate(models))
        config = build(cls, raw, "")
        return config if models is None else dataclasses.replace(config, models=models)

    def model(self, name: str) -> ModelConfig:
        for m in self.models:
            if m.name == name:
                return m
        raise InvalidArgument.field("model", f"unknown model {name!r}")


def model_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The fields that differ from the defaults: what a config file would say."""
    out: dict[str, Any] = {"name": cfg.name, "source": cfg.source}
    for f in dataclasses.fields(ModelConfig):
        value = getattr(cfg, f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if f.name not in out and value != default:
            out[f.name] = dataclasses.asdict(value) if f.name == "input" else (
                list(value) if isinstance(value, tuple) else value)
    if "input" in out:
        out["input"]["mean"], out["input"]["std"] = list(cfg.input.mean), list(cfg.input.std)
    return out


def build_online_app(args: dict[str, Any]):
    """Serve `import_path` target: args = {model: {...}, batching: {...}, limits: {...}, device, cache_dir, is_default}."""
    from workers.deployment import online_deployment

    cfg = model_config_from_dict(args["model"])
    batching = build(BatchingConfig, args.get("batching"), "batching")
    limits = build(Limits, args.get("limits"), "server.limits")
    deployment = online_deployment(cfg, batching)
    return deployment.bind(model_to_dict(cfg), device=args.get("device", "auto"),
                           cache_dir=args.get("cache_dir") or None, is_default=bool(args.get("is_default")),
                           limits=dataclasses.asdict(limits))


def online_app_args(config: AppConfig, cfg: ModelConfig) -> dict[str, Any]:
    """`build_online_app` arguments for one model (also what serve.yaml carries)."""
    return {"model": model_to_dict(cfg), "batching": dataclasses.asdict(config.batching),
            "limits": dataclasses.asdict(config.limits), "device": config.device, "cache_dir": config.cache_dir,
            "is_default": cfg.name == config.default}


def deploy_all(config: AppConfig, timeout_s: float = 300.0) -> list[str]:
    """Deploys every model's application on the connected Ray cluster; returns app names."""
    from ray import serve

    serve.start(proxy_location="Disabled")
    names = []
    for cfg in config.models:
        app = build_online_app(online_app_args(config, cfg))
        name = app_name(cfg.name)
        serve.run(app, name=name, route_prefix=None, blocking=False)
        names.append(name)
    return names


def shutdown_all(config: AppConfig) -> None:
    from ray import serve

    for cfg in config.models:
        serve.delete(app_name(cfg.name), _blocking=True)


def serve_yaml(config: AppConfig, path: pathlib.Path, offline=None) -> None:
    """Writes a `serve run`-able config for this AppConfig."""
    import yaml

    apps = [{"name": app_name(m.name), "route_prefix": None, "import_path": "workers.app:build_online_app",
             "args": {k: v for k, v in online_app_args(config, m).items() if k != "cache_dir"}}
            for m in config.models]
    from workers.offline import OFFLINE_APP, OfflineConfig, offline_app_args

    offline_args = offline_app_args(config, offline or OfflineConfig())
    offline_args.pop("cache_dir")
    apps.append({"name": OFFLINE_APP, "route_prefix": None, "import_path": "workers.offline:build_offline_app",
                 "args": offline_args})
    header = ("# Generated by workers.app.serve_yaml: `serve run deploy/serve.yaml` (or `serve deploy`), then\n"
              "# `attribution serve --address auto --attach` as the gRPC front door on each node.\n")
    path.write_text(header + yaml.safe_dump({"proxy_location": "Disabled", "applications": apps}, sort_keys=False))
