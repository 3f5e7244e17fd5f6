"""The one config: every section of a config file, loaded and checked before anything starts.

    models: [...]            # workers/config.py ModelConfig (name, source, input, replicas, ...)
    default_model: demo
    batching: {...}          # workers/config.py BatchingConfig
    device: auto
    cache_dir: ""
    server: {...}            # service/config.py ServerConfig, with limits, admission, decode, coalesce
    jobs: {...}              # service/jobs/config.py JobsConfig, with offline
    audit: {...}             # service/audit/log.py AuditConfig
    tracing: {...}           # workers/tracing.py TracingConfig (the front door's and the replicas' spans)

`ServiceConfig.load(path)` reads the file and validates all of it: an unknown key
at any level is refused with its path (`server.limits.max_itmes`), as is a value
of the wrong type or out of bounds. `attribution serve --config FILE --check`
runs exactly this and exits. The server's limits are passed to the workers
(`AppConfig.limits`), so the kernels enforce what the front door promises.
"""
from __future__ import annotations

import dataclasses
import pathlib
from dataclasses import dataclass, field
from typing import Any

from service.audit import AuditConfig
from service.config import ServerConfig
from service.jobs.config import JobsConfig
from workers.serve.app import AppConfig
from workers.config import load_config_file
from workers.errors import InvalidArgument
from workers.schema import check
from workers.tracing import TracingConfig

APP_KEYS = ("models", "default_model", "batching", "device", "cache_dir", "tracing")
SECTIONS = APP_KEYS + ("server", "jobs", "audit")


@dataclass(frozen=True)
class ServiceConfig:
    app: AppConfig = field(default_factory=AppConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None, server_overrides: dict[str, Any] | None = None) -> "ServiceConfig":
        raw = {} if raw is None else raw
        check(isinstance(raw, dict), "the config file", "must be a mapping of sections")
        unknown = sorted(set(raw) - set(SECTIONS), key=str)
        check(not unknown, "the config file", f"unknown keys: {', '.join(map(str, unknown))}; "
                                              f"known: {', '.join(SECTIONS)}")
        server_raw = raw.get("server")
        if server_overrides:
            check(server_raw is None or isinstance(server_raw, dict), "server", "must be a mapping")
            server_raw = dict(server_raw or {}, **server_overrides)
        server = ServerConfig.from_dict(server_raw)
        app = AppConfig.from_dict({k: raw[k] for k in APP_KEYS if k in raw})
        return cls(app=dataclasses.replace(app, limits=server.limits), server=server,
                   jobs=JobsConfig.from_dict(raw.get("jobs")), audit=AuditConfig.from_dict(raw.get("audit")))

    @classmethod
    def load(cls, path: str | pathlib.Path | None,
             server_overrides: dict[str, Any] | None = None) -> "ServiceConfig":
        """The file at `path` (None: every default), with command-line overrides of `server:` keys."""
        if path is None:
            return cls.from_dict({}, server_overrides)
        try:
            raw = load_config_file(path)
        except OSError as exc:
            raise InvalidArgument.field("--config", f"cannot read {str(path)!r}: {exc.strerror}") from None
        except ValueError as exc:  # JSON or YAML syntax
            raise InvalidArgument.field("--config", f"{str(path)!r} does not parse: {exc}") from None
        return cls.from_dict(raw, server_overrides)

    @property
    def tracing(self) -> TracingConfig:
        """The `tracing:` section; it travels with the app config, since the replicas trace too."""
        return self.app.tracing

    def summary(self) -> str:
        """What `--check` prints: the models and the settings that decide capacity."""
        models = ", ".join(f"{m.name} ({m.source}, {m.replicas if not m.autoscaling else 'autoscaling'} "
                           f"replica{'s' if m.replicas != 1 else ''})" for m in self.app.models)
        s, lim = self.server, self.server.limits
        if self.jobs.store:
            from service.pgschema import redact

            store = f"shared store {redact(self.jobs.store)} (lease {self.jobs.lease_s:g} s)"
        else:
            store = "SQLite in the data directory"
        return (f"models: {models}; default {self.app.default}\n"
                f"server: {s.host}:{s.port}, metrics {s.metrics_port}, limits {lim.max_items} explanations / "
                f"{lim.max_samples} samples / {lim.max_steps} steps per request, admission "
                f"{'on' if s.admission.enabled else 'off'}\n"
                f"jobs: {store}, concurrency {self.jobs.concurrency}, {self.jobs.offline.replicas} offline replica(s); "
                f"audit: {'on' if self.audit.enabled else 'off by default'}; tracing: {self.tracing.exporter}")
