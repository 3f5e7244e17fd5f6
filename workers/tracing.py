"""OpenTelemetry tracing: one request's spans from the front door, across the Ray hop, to the kernel.

Every process (the front door, each Serve replica, which Ray starts in processes of its own) calls
`setup(TracingConfig)` once; with the default exporter "none" nothing is installed and the spans
come from OpenTelemetry's no-op tracer (the API default), which records nothing. The tracer is the
global provider's (`trace.get_tracer`), so an embedding application's own provider works too.

The context crosses the Ray hop inside the request: `ExplainSpec.trace` holds the W3C
`traceparent` (and `tracestate`) of the front door's handle-call span as a plain dict, which is
pickled with the spec; the replica starts its spans as children of it (`extract`). A client's
`traceparent` gRPC metadata becomes the parent of the front door's span the same way.

Exporters: "otlp" (OTLP over gRPC to `endpoint`; needs the optional package
opentelemetry-exporter-otlp-proto-grpc, imported only then: `pip install attribution-service[otlp]`),
"console" (JSON spans on stdout) and "memory" (kept in the process, for tests and debugging:
`finished_spans()`; a replica answers them through `OnlineWorker.finished_spans`).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, StatusCode  # noqa: F401  (re-exported)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from workers.schema import build, check

log = logging.getLogger(__name__)

EXPORTERS = ("none", "otlp", "console", "memory")
TRACER_NAME = "attribution"
_PROPAGATOR = TraceContextTextMapPropagator()
_FIELDS = ("traceparent", "tracestate")

tracer = trace.get_tracer(TRACER_NAME)  # a proxy: it follows the global provider once one is set
_NO_SPAN = contextlib.nullcontext(trace.INVALID_SPAN)  # what `span` gives while tracing is off


@dataclass(frozen=True)
class TracingConfig:
    """The `tracing:` section of the config file.

    exporter: "none" (the default: no provider is installed, spans cost nothing), "otlp", "console",
        or "memory" (spans kept in the process; for tests).
    endpoint: the OTLP collector's gRPC address ("" = the exporter's default, or
        OTEL_EXPORTER_OTLP_ENDPOINT); only for "otlp".
    service_name: the `service.name` resource of the front door's spans; a replica's is
        `<service_name>-worker`.
    sample_ratio: the share of traces started here that are recorded (0..1); a request whose
        client sent a `traceparent` follows the client's sampling decision.
    """

    exporter: str = "none"
    endpoint: str = ""
    service_name: str = "attribution"
    sample_ratio: float = 1.0

    def __post_init__(self) -> None:
        check(self.exporter in EXPORTERS, "tracing.exporter", f"must be one of {', '.join(EXPORTERS)}")
        check(not self.endpoint or self.exporter == "otlp", "tracing.endpoint", "is only read by exporter: otlp")
        check(bool(self.service_name), "tracing.service_name", "must not be empty")
        check(0.0 <= self.sample_ratio <= 1.0, "tracing.sample_ratio", "must be 0..1")

    @property
    def enabled(self) -> bool:
        return self.exporter != "none"

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> "TracingConfig":
        return build(cls, raw, "tracing")


_installed: dict[str, Any] = {}  # what `setup` installed in this process: config, provider, memory exporter
_active = False                 # spans are recorded (setup ran; shutdown stops it)


def enabled() -> bool:
    """Whether this process records spans (setup installed a provider, and no shutdown since)."""
    return _active


def span(name: str, **options):
    """`tracer.start_as_current_span(name, **options)` while this process traces; else a shared
    do-nothing context (yielding a non-recording span), so a span costs one check when tracing is off."""
    return tracer.start_as_current_span(name, **options) if _active else _NO_SPAN


def setup(config: TracingConfig | Mapping[str, Any] | None, role: str = "") -> bool:
    """Installs this process's tracer provider for `config`; True when spans are recorded.

    Once per process: OpenTelemetry's global provider cannot be replaced, so a later call resumes
    the first provider (and says so when its config differs). role: appended to the service name
    ("worker" in a replica)."""
    global _active
    if config is None or isinstance(config, Mapping):
        config = TracingConfig.from_dict(dict(config or {}))
    if not config.enabled:
        return _active
    if _installed:
        if _installed["config"] != config:
            log.warning("tracing is already set up in this process (exporter %s); keeping it",
                        _installed["config"].exporter)
        _active = True
        return True
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    name = f"{config.service_name}-{role}" if role else config.service_name
    provider = TracerProvider(resource=Resource.create({"service.name": name}),
                              sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)))
    memory = None
    if config.exporter == "memory":
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        memory = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(memory))
    elif config.exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    else:
        provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(config.endpoint)))
    trace.set_tracer_provider(provider)
    if trace.get_tracer_provider() is not provider:  # another provider was set first (an embedding app's)
        log.warning("a tracer provider was already set in this process; tracing.exporter %s is not installed",
                    config.exporter)
        provider.shutdown()
        return False
    _installed.update(config=config, provider=provider, memory=memory)
    _active = True
    log.info("tracing: %s spans as %s%s", config.exporter, name,
             f" to {config.endpoint}" if config.endpoint else "")
    return True


def _otlp_exporter(endpoint: str):
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError:
        check(False, "tracing.exporter", "otlp needs the package opentelemetry-exporter-otlp-proto-grpc "
                                         "(pip install 'attribution-service[otlp]')")
    return OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()


def shutdown() -> None:
    """Exports what is buffered and stops recording (on graceful shutdown; `setup` resumes)."""
    global _active
    _active = False
    provider = _installed.get("provider")
    if provider is not None:
        provider.force_flush(5000)


def finished_spans() -> list:
    """The spans kept by the "memory" exporter (empty for the others)."""
    memory = _installed.get("memory")
    return list(memory.get_finished_spans()) if memory is not None else []


def span_record(span) -> dict:
    """A finished SDK span as a plain picklable dict: name, ids (hex), parent id, kind, attributes, times."""
    context, parent = span.get_span_context(), span.parent
    return {"name": span.name, "trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}",
            "parent_id": f"{parent.span_id:016x}" if parent is not None else None, "kind": span.kind.name,
            "attributes": dict(span.attributes or {}), "start": span.start_time, "end": span.end_time,
            "links": [f"{link.context.span_id:016x}" for link in span.links]}


def finished_span_records() -> list[dict]:
    """`finished_spans` as plain dicts (`span_record`), which cross a Ray call."""
    return [span_record(span) for span in finished_spans()]


def clear_spans() -> None:
    memory = _installed.get("memory")
    if memory is not None:
        memory.clear()


# ------------------------------------------------------------------ context --

def carrier_from_metadata(metadata) -> dict[str, str] | None:
    """The W3C trace headers among gRPC metadata pairs (None when the client sent none)."""
    found = None
    for key, value in metadata or ():
        if key in _FIELDS:
            found = found or {}
            found[key] = value if isinstance(value, str) else value.decode("ascii", "replace")
    return found


def extract(carrier: Mapping[str, str] | None) -> Context | None:
    """The context a carrier names, for `tracer.start_as_current_span(..., context=)`; None: no parent."""
    return _PROPAGATOR.extract(carrier) if carrier else None


def inject() -> dict[str, str] | None:
    """The current span's context as a carrier (the dict that crosses the Ray hop); None when there is none."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier or None


def trace_id(carrier: Mapping[str, str] | None) -> str | None:
    """The 32-hex trace id a carrier's `traceparent` names, or None."""
    parts = (carrier or {}).get("traceparent", "").split("-")
    if len(parts) >= 4 and len(parts[1]) == 32 and parts[1] != "0" * 32:
        return parts[1].lower()
    return None


def link(carrier: Mapping[str, str] | None):
    """A span link to the context a carrier names (None when it names none)."""
    context = trace.get_current_span(extract(carrier)).get_span_context() if carrier else None
    return trace.Link(context) if context is not None and context.is_valid else None
