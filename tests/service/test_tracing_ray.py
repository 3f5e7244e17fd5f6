"""Tracing across the real Ray hop: the replica's spans continue the front door's trace.

The replica runs in a process of its own with its own tracer provider (the deployment's `tracing` args,
exporter "memory"); `OnlineWorker.finished_spans` hands its spans back. The front door runs in this
process, its spans kept by the same in-memory exporter kind.
"""
from __future__ import annotations

import secrets

import grpc
import pytest

from service._proto import attribution_pb2 as pb
from service._proto import attribution_pb2_grpc as pb_grpc
from service.backends.serve import ServeBackend
from tests.service.conftest import explain_request
from tests.support import LoopThread, start_front_door
from workers import tracing
from workers.config import ModelConfig
from workers.serve.app import AppConfig, app_name, deploy_all, shutdown_all

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def deployed(ray_session, demo_cache_dir):
    from ray import serve

    app = AppConfig(models=(ModelConfig(name="demo", source="demo"),), cache_dir=str(demo_cache_dir),
                    tracing=tracing.TracingConfig(exporter="memory"))
    assert tracing.setup(app.tracing)
    deploy_all(app)
    backend = ServeBackend.from_config(app)
    loop = LoopThread()
    running = start_front_door(loop, backend)
    yield serve.get_app_handle(app_name("demo")), running
    loop.call(running.stop(0.0))
    loop.close()
    shutdown_all(app)
    tracing.shutdown()


def _traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def _by_trace(spans: list[dict], trace_id: str) -> dict[str, dict]:
    return {s["name"]: s for s in spans if s["trace_id"] == trace_id}


def test_the_replica_s_kernel_span_is_a_child_of_the_front_door_s_handle_call(deployed, demo_batch):
    handle, running = deployed
    tracing.clear_spans()
    header, trace_id, client_span = _traceparent()
    with grpc.insecure_channel(running.address) as channel:
        pb_grpc.AttributionServiceStub(channel).Explain(
            explain_request(demo_batch.images[:2], pb.SMOOTHGRAD, noise={"samples": 4}),
            metadata=[("traceparent", header)], timeout=120)
    front = _by_trace(tracing.finished_span_records(), trace_id)
    replica = _by_trace(handle.finished_spans.remote().result(timeout_s=60), trace_id)
    assert front["Explain"]["parent_id"] == client_span
    call = front["ray.handle_call"]
    assert call["kind"] == "CLIENT" and call["parent_id"] == front["backend"]["span_id"]
    assert replica["kernel"]["parent_id"] == call["span_id"]
    assert replica["replica.queue"]["parent_id"] == call["span_id"]
    assert call["start"] <= replica["replica.queue"]["start"] <= replica["kernel"]["start"] <= call["end"]
    assert front["encode"]["start"] >= call["end"]


def test_concurrent_requests_keep_their_own_traces_when_their_calls_are_coalesced(deployed, demo_batch):
    handle, running = deployed
    tracing.clear_spans()
    contexts = [_traceparent() for _ in range(12)]
    request = explain_request(demo_batch.images[:1], pb.SMOOTHGRAD, noise={"samples": 4})
    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.AttributionServiceStub(channel)
        futures = [stub.Explain.future(request, metadata=[("traceparent", header)], timeout=120)
                   for header, _, _ in contexts]
        [f.result() for f in futures]
    front_spans = tracing.finished_span_records()
    replica_spans = handle.finished_spans.remote().result(timeout_s=60)
    calls = set()
    for _, trace_id, _ in contexts:
        call = _by_trace(front_spans, trace_id)["ray.handle_call"]
        assert _by_trace(replica_spans, trace_id)["kernel"]["parent_id"] == call["span_id"]
        calls.add(call["span_id"])
    for coalesced in (s for s in front_spans if s["name"] == "ray.coalesced_call"):
        assert coalesced["parent_id"] is None and set(coalesced["links"]) <= calls
        assert len(coalesced["links"]) == coalesced["attributes"]["attribution.requests"] > 1
