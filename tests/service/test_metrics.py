"""metrics.py: the exporter's real Prometheus text, parsed, after real calls."""
from __future__ import annotations

import urllib.request

import grpc
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from service._proto import attribution_pb2 as pb
from service.metrics import ServiceMetrics, start_metrics_server
from tests.service.conftest import explain_request


def _scrape(port: int) -> dict[str, list]:
    """Family name -> samples, from http://127.0.0.1:port/metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def _value(families, sample_name: str, **labels) -> float:
    family = sample_name.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
    for sample in families.get(family, []):
        if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
            return sample.value
    return 0.0


def test_requests_latency_stages_batches_and_samples(server, stub, demo_batch):
    port = server.running.metrics_port
    assert port
    before = _scrape(port)
    x = demo_batch.images[:2]
    stub.Explain(explain_request(x, pb.SMOOTHGRAD, noise={"samples": 5}), timeout=60)
    stub.Explain(explain_request(x, pb.GRAD_CAM), timeout=60)
    with pytest.raises(grpc.RpcError):
        stub.Explain(explain_request(x, pb.SMOOTHGRAD, noise={"samples": 999}), timeout=60)
    with pytest.raises(grpc.RpcError):
        stub.Explain(explain_request(x, model="nope"), timeout=60)
    list(stub.ExplainStream(iter([explain_request(x[:1], pb.LAYER_CAM)]), timeout=60))
    after = _scrape(port)

    def delta(name, **labels):
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert delta("attribution_requests_total", model="demo", method="smoothgrad", code="OK") == 1
    assert delta("attribution_requests_total", model="demo", method="grad_cam", code="OK") == 1
    assert delta("attribution_requests_total", model="demo", method="layer_cam", code="OK") == 1
    assert delta("attribution_requests_total", model="demo", method="smoothgrad", code="INVALID_ARGUMENT") == 1
    # A name the client made up never becomes a label value.
    assert delta("attribution_requests_total", model="unknown", method="vanilla", code="NOT_FOUND") == 1
    assert not any(s.labels.get("model") == "nope" for s in after["attribution_requests"])
    assert delta("attribution_request_latency_seconds_count", model="demo", method="smoothgrad") == 2
    assert delta("attribution_queue_seconds_count", model="demo", method="grad_cam") == 1
    assert delta("attribution_compute_seconds_count", model="demo", method="smoothgrad") == 1
    assert delta("attribution_compute_seconds_sum", model="demo", method="smoothgrad") > 0
    assert delta("attribution_batch_samples_count", model="demo") == 3
    assert delta("attribution_batch_samples_sum", model="demo") == 2 * 5 + 2 + 1
    assert delta("attribution_batch_requests_sum", model="demo") == 3
    assert delta("attribution_samples_total", model="demo", method="smoothgrad") == 10
    assert _value(after, "attribution_inflight_requests") == 0
    buckets = [s for s in after["attribution_request_latency_seconds"] if s.name.endswith("_bucket")]
    assert buckets and all(s.labels["le"] for s in buckets)


def test_registries_are_private_and_the_exporter_stops():
    first, second = ServiceMetrics(), ServiceMetrics()  # would collide on the global registry
    first.observe_request("m", "vanilla", "OK", 0.01)
    assert first.registry.get_sample_value("attribution_requests_total",
                                           {"model": "m", "method": "vanilla", "code": "OK"}) == 1
    assert second.registry.get_sample_value("attribution_requests_total",
                                            {"model": "m", "method": "vanilla", "code": "OK"}) is None
    port, stop = start_metrics_server(0, first.registry, "127.0.0.1")
    try:
        families = _scrape(port)
        assert _value(families, "attribution_requests_total", model="m") == 1
        assert "attribution_inflight_requests" in families
    finally:
        stop()
    with pytest.raises(OSError):
        _scrape(port)
    empty_port, stop_empty = start_metrics_server(0, CollectorRegistry(), "127.0.0.1")
    stop_empty()
    assert empty_port != 0


def test_replica_watcher_exports_live_replicas_and_losses():
    """The replica watcher feeds `attribution_model_replicas` and counts replicas lost between reads."""
    import asyncio

    from service.server import DrainingHealthServicer, _watch_replicas

    reads = [{"demo": 2, "other": 1}, {"demo": 1, "other": 1}, {"demo": 0}, {"demo": 3, "other": 1}]
    metrics = ServiceMetrics()
    seen: list[tuple[float, float, float]] = []

    class ScriptedBackend:
        """Serve's status as a script; each read also says "changed", so the watcher reads the next at once."""

        def __init__(self) -> None:
            self.replicas_changed = asyncio.Event()
            self.done = asyncio.Event()

        async def refresh_replicas(self) -> dict[str, int]:
            seen.append(tuple(_sample(metrics, name, model) for name, model in  # as the previous read left them
                              (("attribution_model_replicas", "demo"),
                               ("attribution_model_replica_losses_total", "demo"),
                               ("attribution_model_replicas", "other"))))
            if not reads:
                self.done.set()
                await asyncio.Event().wait()  # no further read: the test cancels the watcher here
            self.replicas_changed.set()
            return reads.pop(0)

    async def run() -> None:
        backend = ScriptedBackend()
        watcher = asyncio.create_task(_watch_replicas(DrainingHealthServicer(), backend, ["demo", "other"], metrics))
        await asyncio.wait_for(backend.done.wait(), 10)
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher

    asyncio.run(run())
    # Before the first read nothing is set; a model missing from a read has no running replica.
    assert seen[0] == (-1, -1, -1)
    assert seen[1:] == [(2, 0, 1), (1, 1, 1), (0, 2, 0), (3, 2, 1)]


def _sample(metrics: ServiceMetrics, name: str, model: str) -> float:
    value = metrics.registry.get_sample_value(name, {"model": model})
    return -1.0 if value is None else value
