"""Tracing in one process: a real gRPC front door over LocalBackend, spans kept by the SDK's in-memory exporter.

The client's `traceparent` metadata is the parent of the front door's span; the kernel's span is a child of
the backend span through the context the spec carries (as it does across the Ray hop:
tests/service/test_tracing_ray.py); the audit record names the trace.
"""
from __future__ import annotations

import dataclasses
import json
import secrets

import grpc
import pytest

from service.audit.records import SCHEMA_VERSION
from service._proto import attribution_pb2 as pb
from service._proto import attribution_pb2_grpc as pb_grpc
from service.audit import LOG_NAME
from service.audit.verify import read_records
from service.backends.local import LocalBackend
from service.server import create_server
from service.settings import ServiceConfig
from tests.service.conftest import explain_request, test_config
from tests.support import LoopThread
from workers import tracing
from workers.errors import InvalidArgument
from workers.serve.app import online_app_args


def traceparent() -> tuple[str, str, str]:
    """(traceparent, trace id, span id): a fresh sampled client context."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


@pytest.fixture(scope="module")
def front_door(demo_registry, tmp_path_factory):
    """A traced server with an audit log; spans from the memory exporter, cleared per test."""
    assert tracing.setup({"exporter": "memory"}), "a tracer provider was set before this module"
    data_dir = tmp_path_factory.mktemp("traced")
    loop = LoopThread()
    running = loop.call(create_server(test_config(), LocalBackend(demo_registry), data_dir=data_dir))
    yield running, data_dir
    loop.call(running.stop(0.0))
    loop.close()
    tracing.shutdown()


@pytest.fixture
def spans():
    tracing.clear_spans()
    return lambda trace_id: [s for s in tracing.finished_span_records() if s["trace_id"] == trace_id]


def _explain(address: str, request: pb.ExplainRequest, metadata=()) -> pb.ExplainResponse:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.AttributionServiceStub(channel).Explain(request, metadata=metadata, timeout=60)


def _audit_records(data_dir) -> list[dict]:
    lines = (data_dir / "audit" / LOG_NAME).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _wait_for_record(data_dir, request_id: str) -> dict:
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        path = data_dir / "audit" / LOG_NAME
        if path.exists():
            found = [r for r in _audit_records(data_dir) if r["request_id"] == request_id]
            if found:
                return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no audit record for {request_id}")


def test_a_client_traceparent_parents_the_request_s_spans_down_to_the_kernel(front_door, spans, demo_batch):
    running, data_dir = front_door
    header, trace_id, client_span = traceparent()
    request = explain_request(demo_batch.images[:2], pb.SMOOTHGRAD, noise={"samples": 4}, request_id="traced-1")
    _explain(running.address, request, [("traceparent", header)])
    record = _wait_for_record(data_dir, "traced-1")
    got = {s["name"]: s for s in spans(trace_id)}
    assert {"Explain", "admission", "validate", "backend", "kernel", "encode", "audit"} <= set(got), got
    root = got["Explain"]
    assert root["parent_id"] == client_span and root["kind"] == "SERVER"
    for step in ("admission", "validate", "backend", "encode", "audit"):
        assert got[step]["parent_id"] == root["span_id"], step
    kernel = got["kernel"]
    assert kernel["parent_id"] == got["backend"]["span_id"]
    assert kernel["attributes"]["attribution.request_id"] == "traced-1"
    assert root["start"] <= got["validate"]["start"] < got["kernel"]["start"] < got["encode"]["start"] <= root["end"]
    assert record["trace_id"] == trace_id and record["schema"] == SCHEMA_VERSION


def test_without_a_traceparent_the_server_starts_the_trace_and_the_audit_record_names_it(front_door, spans,
                                                                                       demo_batch):
    running, data_dir = front_door
    _explain(running.address, explain_request(demo_batch.images[:1], request_id="traced-2"))
    record = _wait_for_record(data_dir, "traced-2")
    got = {s["name"]: s for s in spans(record["trace_id"])}
    assert got["Explain"]["parent_id"] is None
    assert got["kernel"]["parent_id"] == got["backend"]["span_id"]


def test_a_failed_request_s_span_is_an_error_with_its_status(front_door, spans, demo_batch):
    running, _ = front_door
    header, trace_id, _ = traceparent()
    request = explain_request(demo_batch.images[:1], model="no-such-model")
    with pytest.raises(grpc.RpcError) as failure:
        _explain(running.address, request, [("traceparent", header)])
    (root,) = [s for s in spans(trace_id) if s["name"] == "Explain"]
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    assert root["attributes"]["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]


def test_audit_verify_reads_the_traced_records(front_door, demo_batch):
    running, data_dir = front_door
    _explain(running.address, explain_request(demo_batch.images[:1], request_id="traced-3"))
    _wait_for_record(data_dir, "traced-3")
    logged, invalid = read_records([data_dir / "audit" / LOG_NAME])
    assert logged and not invalid


def test_untraced_the_client_s_trace_id_still_reaches_the_audit_record(demo_registry, tmp_path, demo_batch):
    from workers.spec import ExplainSpec

    traced = tracing.enabled()
    tracing.shutdown()  # this process records nothing now: the no-op path
    loop = LoopThread()
    running = loop.call(create_server(test_config(), LocalBackend(demo_registry), data_dir=tmp_path))
    try:
        header, trace_id, _ = traceparent()
        _explain(running.address, explain_request(demo_batch.images[:1], request_id="untraced"),
                 [("traceparent", header)])
        record = _wait_for_record(tmp_path, "untraced")
    finally:
        loop.call(running.stop(0.0))
        loop.close()
        if traced:
            tracing.setup({"exporter": "memory"})
    assert record["trace_id"] == trace_id
    assert all(s["trace_id"] != trace_id for s in tracing.finished_span_records())
    assert ExplainSpec.__dataclass_fields__["trace"].default is None


def test_the_tracing_section_is_checked_and_reaches_the_replicas():
    config = ServiceConfig.from_dict({"tracing": {"exporter": "otlp", "endpoint": "collector:4317",
                                                  "sample_ratio": 0.25}})
    assert config.tracing == tracing.TracingConfig("otlp", "collector:4317", "attribution", 0.25)
    args = online_app_args(config.app, config.app.models[0])
    assert args["tracing"] == dataclasses.asdict(config.tracing)
    assert ServiceConfig.from_dict({}).tracing.exporter == "none"
    for bad, where in [({"exporter": "jaeger"}, "tracing.exporter"), ({"sample_ratio": 2}, "tracing.sample_ratio"),
                       ({"endpoint": "x:1"}, "tracing.endpoint"), ({"sampel_ratio": 1}, "tracing"),
                       ({"sample_ratio": "all"}, "tracing.sample_ratio")]:
        with pytest.raises(InvalidArgument, match=where.replace(".", r"\.")):
            ServiceConfig.from_dict({"tracing": bad})


def test_carriers_and_trace_ids():
    header, trace_id, _ = traceparent()
    assert tracing.carrier_from_metadata([("authorization", "x"), ("traceparent", header)]) == {"traceparent": header}
    assert tracing.carrier_from_metadata([("x-other", "1")]) is None
    assert tracing.trace_id({"traceparent": header}) == trace_id
    assert tracing.trace_id({"traceparent": "00-" + "0" * 32 + "-" + "1" * 16 + "-01"}) is None
    assert tracing.trace_id(None) is None and tracing.trace_id({"traceparent": "junk"}) is None


def test_the_otlp_and_console_exporters_build():
    pytest.importorskip("opentelemetry.exporter.otlp.proto.grpc")  # the [otlp] extra
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    assert isinstance(tracing._otlp_exporter("localhost:4317"), OTLPSpanExporter)
    assert ServiceConfig.from_dict({"tracing": {"exporter": "console"}}).tracing.enabled
